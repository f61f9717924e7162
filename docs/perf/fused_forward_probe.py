"""A/B of the fully fused forward (perf-notes.md, v6) on the H200: the kernels alone (fused gate GEMM +
route + up/down kernels vs the one fused kernel, with and without the producer warps gathering during
the GEMM) and the whole inference op with the gather warps inside the gate GEMM's persistent kernel vs
the separate kernels, in one process, alternating; eager and queued medians (forward_ab_probe.py's
timers), plus the GEMM → TwELL kernel alone for scale.

Run on the GPU from the repository root:  PYTHONPATH=. python docs/perf/fused_forward_probe.py
"""
import json
import sys

import cupy as cp

import twell
from docs.perf.forward_ab_probe import eager, queued
from twell import synthetic
from twell.kernels import ffn_forward, gate_gemm


def case(m, kind, thresholds=(128,), rounds=2):
    p = synthetic.make_problem(m, kind=kind, xp=cp)
    x, wg, wu, wd = p.arrays()
    res = {"M": m, "kind": kind}
    res["gate alone queued"] = queued(lambda: gate_gemm.gate_twell_async(x, wg, 256, 8, 128))
    y = cp.empty_like(x)

    def separate_kernels():
        q = gate_gemm.gate_twell_async(x, wg, 256, 8, 128)
        ffn_forward.twell_up_down(x, q.counts, q.indices, q.values, q.row_route, wu, wd, 256, y, compact=0,
                                  work_counter=q.totals[2:3])

    res["separate kernels queued"] = queued(separate_kernels)
    for pg in (True, False):
        gate_gemm.FUSED_FORWARD_PRODUCER_GATHERS = pg
        res[f"fused kernel producer_gathers={pg} queued"] = queued(
            lambda: gate_gemm.ffn_twell_fused_async(x, wg, wu, wd, y, 8, 128))
    gate_gemm.FUSED_FORWARD_PRODUCER_GATHERS = True
    for rep in range(rounds):
        for fused in (True, False):
            gate_gemm.FUSED_FORWARD = fused
            for th in thresholds:
                f = lambda th=th: twell.gated_ffn(x, wg, wu, wd, dense_row_threshold=th)  # noqa: E731
                f()
                f()
                tag = f"{'fused' if fused else 'separate'} th{th}"
                res[f"{tag} eager r{rep}"] = eager(f)
                res[f"{tag} queued r{rep}"] = queued(f)
    gate_gemm.FUSED_FORWARD = True
    _, stats = twell.gated_ffn(x, wg, wu, wd, return_stats=True)
    res["fused_forward"] = stats.fused_forward
    res["backup rows"] = stats.n_backup_rows
    res["deferred rows"] = stats.n_deferred_rows
    gate_gemm.FUSED_FORWARD = False
    return res


if __name__ == "__main__":
    cases = [(16384, "uniform", (128,)), (16384, "token_skew", (64, 96, 128)), (131072, "uniform", (128,)),
             (131072, "token_skew", (128,))]
    if len(sys.argv) > 1:
        cases = cases[: int(sys.argv[1])]
    for m, kind, ths in cases:
        print(json.dumps(case(m, kind, ths)), flush=True)
        cp.get_default_memory_pool().free_all_blocks()
