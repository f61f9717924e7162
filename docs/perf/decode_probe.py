"""Decode-sized batches (M = 1 … 64; bf16, d 2048, n 5632, uniform, mean 29 active): the inference paths
of ``twell.gated_ffn`` side by side, eager and replayed from a CUDA graph.

* ``op``: ``twell.gated_ffn(..., out=y)`` as a caller runs it (fused decode kernels for M ≤ 4, the
  small-batch path up to 512 rows);
* ``fused decode``: the two fused decode kernels (``ffn_forward.decode_fused``; the kernel takes M ≤ 8);
* ``small batch``: cuBLAS gate + ``ffn_forward.dense_gate_up_down`` (the small-batch path without counts);
* ``dense path``: ``twell.gated_ffn(..., path="dense", out=y)``;
* ``dense cuBLAS``: the bench's ``dense_cupy`` baseline (3 GEMMs + one fused elementwise kernel).

Eager: one call, then a host sync (``time_gpu(sync_each=True)``); graph: replays queued back to back on the
capturing stream.  The L2 is flushed before every timed call (the bench's rule for M ≤ 4096).  Each path's
y is compared with the dense path's (max |diff| / max |y|).

    PYTHONPATH=. python docs/perf/decode_probe.py [--m 1,2,4,8,16,64] [--budget 0.3]
"""

import argparse
import json

import cupy as cp

import twell
from twell.bench.dense_cupy import make_dense_cupy
from twell.bench.timing import L2Flusher, capture_cupy_graph, time_gpu
from twell.kernels import ffn_forward
from twell.runtime import blas
from twell.synthetic import make_problem


def paths(p):
    """name -> run() writing its own preallocated y (the graph replays write the same buffers)."""
    x, wg, wu, wd = p.arrays()
    out = {}

    def op(**kw):
        y = cp.empty_like(x)
        return lambda: twell.gated_ffn(x, wg, wu, wd, out=y, **kw)

    out["op"] = op()
    y_fd = cp.empty_like(x)
    if ffn_forward.decode_fused_supported(x, wg, wu, wd, y_fd):
        out["fused decode"] = lambda: ffn_forward.decode_fused(x, wg, wu, wd, y_fd)
    y_sb = cp.empty_like(x)
    out["small batch"] = lambda: ffn_forward.dense_gate_up_down(x, blas.gemm(x, wg, trans_b=True), wu, wd, y_sb)
    out["dense path"] = op(path="dense")
    out["dense cuBLAS"] = make_dense_cupy(p)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", default="1,2,4,8,16,64", help="comma-separated batch sizes")
    ap.add_argument("--mean", type=float, default=29.0)
    ap.add_argument("--budget", type=float, default=0.3, help="seconds per timing")
    args = ap.parse_args()
    flush = L2Flusher(cp.cuda.Device().attributes["L2CacheSize"])
    stream = cp.cuda.Stream(non_blocking=True)
    for m in (int(v) for v in args.m.split(",")):
        p = make_problem(m, mean_active=args.mean, kind="uniform", dtype="bfloat16", seed=0, xp=cp)
        runs = paths(p)
        ref = runs["dense path"]().astype(cp.float32)
        scale = float(cp.abs(ref).max()) or 1.0
        res = {"M": m}
        for name, run in runs.items():
            y = run().astype(cp.float32)
            eager = time_gpu(run, budget_s=args.budget, warmup=3, flush=flush).to_dict()
            graph = capture_cupy_graph(run, stream)
            with stream:
                replay = time_gpu(graph.launch, budget_s=args.budget, warmup=3, flush=flush,
                                  sync_each=False).to_dict()
            graph.release()
            res[name] = {"eager_ms": round(eager["median_ms"], 4), "graph_ms": round(replay["median_ms"], 4),
                         "diff": float(cp.abs(y - ref).max()) / scale}
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
