"""Timing probe of the fused gate GEMM (perf-notes.md, v3): the kernel alone, with and without the TwELL
packing, into preallocated or fresh buffers, against cuBLAS (z stored) and cuBLAS + pack.

Run on the GPU from the repository root:  PYTHONPATH=. python docs/perf/gate_gemm_probe.py
(Medians of CUDA-event timings through cupyx.profiler.benchmark.)
"""

import json

import cupy as cp
import cupyx.profiler as prof
import ml_dtypes
import numpy as np
from scipy.stats import norm

from twell._kernels import get_kernel
from twell.kernels import gate_gemm, pack
from twell.kernels._launch import NULL, i32

BF16 = np.dtype(ml_dtypes.bfloat16)


def med(fn, n=25):
    r = prof.benchmark(fn, n_repeat=n, n_warmup=3)
    return round(float(np.median(r.gpu_times[0] * 1e3)), 4)


def problem(m, d=2048, n=5632, mean=29, seed=0):
    rng = cp.random.default_rng(seed)
    x = rng.standard_normal((m, d), dtype=cp.float32)
    x[:, 0] = 1
    wg = rng.standard_normal((n, d), dtype=cp.float32) / np.sqrt(d)
    wg[:, 0] = -norm.isf(mean / n) * np.sqrt((d - 1) / d)
    return x.astype(BF16), wg.astype(BF16)


def main():
    for m in (16384, 131072):
        x, wg = problem(m)
        n, d = wg.shape
        n_tiles, slots = 22, 32
        res = {"M": m, "cublas_gemm": med(lambda: cp.matmul(x, wg.T))}
        z = cp.matmul(x, wg.T)
        res["pack_kernel"] = med(lambda: pack.pack_twell_async(z, 256, 8, 128, relu=True))
        z = None

        def buffers():
            return (cp.empty((m, n_tiles), cp.int32), cp.empty((m, n_tiles, slots), cp.uint8),
                    cp.empty((m, n_tiles, slots), x.dtype))

        pre = buffers()
        for cluster in (1, 2):
            for do_pack in (True, False):
                k = get_kernel("gate_gemm",
                               f"gate_twell_wgmma<__nv_bfloat16, 256, {cluster}, {'true' if do_pack else 'false'}, 0, 0>")
                k.max_dynamic_shared_size_bytes = gate_gemm.WGMMA_SMEM
                mx, mw = gate_gemm.tensor_map(x, 128), gate_gemm.tensor_map(wg, 256 // cluster)
                grid = 132 if cluster == 1 else 2 * gate_gemm.max_active_clusters(k, 384, gate_gemm.WGMMA_SMEM, 2)

                def launch(b, k=k, mx=mx, mw=mw, grid=grid):
                    k((grid,), (384,), (mx, mw, i32(m), i32(n), i32(d), i32(n_tiles), i32(slots), b[0], b[1], b[2],
                                        NULL, NULL, NULL, NULL, NULL, i32(0), NULL, NULL, NULL, i32(0), i32(0)),
                      shared_mem=gate_gemm.WGMMA_SMEM)
                    return b

                res[f"kernel cluster={cluster} pack={do_pack} preallocated"] = med(lambda: launch(pre))
                if do_pack:
                    res[f"kernel cluster={cluster} pack=True fresh buffers"] = med(lambda: launch(buffers()))
        res["gate_twell_async (kernel + routing)"] = med(
            lambda: gate_gemm.gate_twell_async(x, wg, 256, 8, 128, kernel="wgmma", cluster=1))
        print(json.dumps(res), flush=True)
        x = wg = pre = None  # free before the next size
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
