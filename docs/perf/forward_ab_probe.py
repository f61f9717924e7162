"""A/B of the whole inference forward on the H200 (perf-notes.md, v5): thread-block cluster 1 vs 2 of the
fused gate GEMM, and the inference row threshold under token skew.  Eager (events around one call, host
sync after it) and queued (20 calls back to back between two events) medians.

Run on the GPU from the repository root:  PYTHONPATH=. python docs/perf/forward_ab_probe.py
"""
import json

import cupy as cp
import numpy as np

import twell
from twell import synthetic
from twell.kernels import gate_gemm


def queued(fn, k=20, reps=7):
    """Median over reps of (time of k calls queued back to back) / k, in ms."""
    stream = cp.cuda.get_current_stream()
    out = []
    for _ in range(reps):
        e1, e2 = cp.cuda.Event(), cp.cuda.Event()
        fn()
        stream.synchronize()
        e1.record(stream)
        for _ in range(k):
            fn()
        e2.record(stream)
        e2.synchronize()
        out.append(cp.cuda.get_elapsed_time(e1, e2) / k)
    return round(float(np.median(out)), 4)


def eager(fn, reps=40):
    """Median of single calls between two events, host sync after each, in ms."""
    stream = cp.cuda.get_current_stream()
    out = []
    for _ in range(reps):
        e1, e2 = cp.cuda.Event(), cp.cuda.Event()
        e1.record(stream)
        fn()
        e2.record(stream)
        e2.synchronize()
        out.append(cp.cuda.get_elapsed_time(e1, e2))
    return round(float(np.median(out)), 4)


def case(m, kind):
    p = synthetic.make_problem(m, kind=kind, xp=cp)
    x, wg, wu, wd = p.x, p.w_gate, p.w_up, p.w_down
    res = {"M": m, "kind": kind}
    for rep in range(2):
        for cl in (1, 2):
            gate_gemm.WGMMA_CLUSTER = cl
            f = lambda: twell.gated_ffn(x, wg, wu, wd)  # noqa: E731
            f()
            f()
            res[f"cluster{cl} eager r{rep}"] = eager(f)
            res[f"cluster{cl} queued r{rep}"] = queued(f)
    gate_gemm.WGMMA_CLUSTER = 2
    if kind == "token_skew":
        for th in (64, 96, 128, 192):
            f = lambda th=th: twell.gated_ffn(x, wg, wu, wd, dense_row_threshold=th)  # noqa: E731
            f()
            res[f"threshold {th} eager"] = eager(f)
            res[f"threshold {th} queued"] = queued(f)
    return res


if __name__ == "__main__":
    for m, kind in ((16384, "uniform"), (16384, "token_skew"), (131072, "uniform")):
        print(json.dumps(case(m, kind)), flush=True)
        cp.get_default_memory_pool().free_all_blocks()
