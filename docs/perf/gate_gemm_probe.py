"""The gate GEMM alone, at M = 16,384 by default (bf16, d 2048, n 5632, uniform, mean 29 active):

* cuBLAS ``z = x w_gateᵀ`` (z stored), and cuBLAS + the pack kernel (what ``gate_kernel="cublas"`` runs);
* the Hopper GEMM → TwELL kernel with its routing kernel (``gate_gemm.gate_twell_async``, what
  ``gate_kernel="auto"`` runs on Hopper), per cluster size;
* the same kernel's mainloop without the epilogue (``gate_gemm.gate_gemm_mainloop``): the difference is
  the epilogue's share;
* the portable mma.sync kernel (``kernel="mma"``).

Device times of calls queued back to back (CUDA events, ``twell.bench.timing.time_gpu``), median and
p20–p80; TFLOP/s of the 2·M·n·d GEMM; entries found (cuBLAS + pack vs the fused kernel: equal up to the
few z values whose rounding differs).  Needs a Hopper GPU (compute capability 9.0).

    PYTHONPATH=. python docs/perf/gate_gemm_probe.py [--m 16384] [--mean 29] [--budget 0.5]
"""

import argparse
import json

import cupy as cp

from twell.bench.timing import time_gpu
from twell.kernels import gate_gemm, pack
from twell.runtime import blas
from twell.synthetic import make_problem

TILE_WIDTH, COMPRESSION, THRESHOLD = 256, 8, 128      # the inference ops' defaults


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", type=int, default=16384)
    ap.add_argument("--mean", type=float, default=29.0)
    ap.add_argument("--budget", type=float, default=0.5, help="seconds per timing")
    args = ap.parse_args()
    if cp.cuda.Device().compute_capability != "90":
        raise SystemExit("gate_gemm_probe: the Hopper kernel needs compute capability 9.0")
    p = make_problem(args.m, mean_active=args.mean, kind="uniform", dtype="bfloat16", seed=0, xp=cp)
    x, wg = p.x, p.w_gate
    m, d = x.shape
    n = wg.shape[0]
    z = cp.empty((m, n), dtype=x.dtype)

    def cublas_pack():
        return pack.pack_twell_async(blas.gemm(x, wg, z, trans_b=True), TILE_WIDTH, COMPRESSION, THRESHOLD,
                                     relu=True)

    def fused(kernel, cluster=gate_gemm.DEFAULT_CLUSTER):
        return lambda: gate_gemm.gate_twell_async(x, wg, TILE_WIDTH, COMPRESSION, THRESHOLD, kernel=kernel,
                                                  cluster=cluster)

    cases = {"cublas (z stored)": lambda: blas.gemm(x, wg, z, trans_b=True), "cublas + pack": cublas_pack}
    for cluster in gate_gemm.WGMMA_CLUSTERS:
        cases[f"wgmma mainloop only, cluster {cluster}"] = (
            lambda c=cluster: gate_gemm.gate_gemm_mainloop(x, wg, cluster=c))
        cases[f"wgmma -> TwELL + route, cluster {cluster}"] = fused("wgmma", cluster)
    cases["mma -> TwELL + route"] = fused("mma")

    entries = {"cublas + pack": int(cublas_pack().row_nnz.sum()),
               "wgmma": int(fused("wgmma")().row_nnz.sum())}
    print(json.dumps({"M": m, "d": d, "n": n, "mean": args.mean, "entries": entries}), flush=True)
    base = None
    for name, fn in cases.items():
        t = time_gpu(fn, budget_s=args.budget, warmup=3, sync_each=False).to_dict()
        base = t["median_ms"] if base is None else base
        print(json.dumps({"case": name, "median_ms": round(t["median_ms"], 4),
                          "p20_p80_ms": [round(t["p20_ms"], 4), round(t["p80_ms"], 4)],
                          "tflops": round(2.0 * m * n * d / (t["median_ms"] * 1e-3) / 1e12, 1),
                          "cublas_time_over_this": round(base / t["median_ms"], 3)}), flush=True)


if __name__ == "__main__":
    main()
