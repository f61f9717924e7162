"""A/B of the training forward with the cuBLAS + pack gate vs the fused gate (perf-notes.md, v5), M = 16,384.
Medians of 15 CUDA-event timings (cupyx.profiler.benchmark).  "bwd ms" is the forward + backward median
minus the forward median, so it is noisy.

Run on the GPU from the repository root:  PYTHONPATH=. python docs/perf/train_gate_ab_probe.py
"""

import json

import cupy as cp
import cupyx.profiler as prof
import numpy as np

import twell
from twell import synthetic


def med(fn, n=15):
    r = prof.benchmark(fn, n_repeat=n, n_warmup=2)
    return round(float(np.median(r.gpu_times[0] * 1e3)), 4)


def case(kind):
    p = synthetic.make_problem(16384, kind=kind, xp=cp)
    x, wg, wu, wd = p.x, p.w_gate, p.w_up, p.w_down
    dy = cp.random.default_rng(0).standard_normal(x.shape, dtype=cp.float32).astype(x.dtype)
    res = {"kind": kind}
    for gk in ("cublas", "wgmma"):
        def forward(gk=gk):
            return twell.gated_ffn_forward(x, wg, wu, wd, l1_weight=2e-5, gate_kernel=gk)

        _, saved, stats = forward()
        res[gk + " backup"] = int(stats.n_backup_rows)
        res[gk + " nnz"] = int(saved.gate.nnz)
        res[gk + " fwd ms"] = med(forward)
        res[gk + " bwd ms"] = med(lambda: twell.gated_ffn_backward(forward()[1], dy)) - res[gk + " fwd ms"]
    return res


if __name__ == "__main__":
    for kind in ("uniform", "token_skew"):
        print(json.dumps(case(kind)), flush=True)
