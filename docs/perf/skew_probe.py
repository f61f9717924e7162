"""Session-8 probe (perf-notes.md, v17-v19): where the token-skew forward's extra time goes, and a longer
interleaved A/B of the gate GEMM's cluster size (1 vs 2) than session 3's.

(1) cluster: rounds alternating cluster 1 and 2 — ``gate_twell_async`` alone (queued) and the whole
    ``gated_ffn`` (eager and queued), M = 16,384 uniform / token skew, M = 131,072 uniform.
(2) updown: the up/down kernel alone (work counter reset by a 4-byte memset before each call; the memset
    alone is timed too) on uniform and token-skew TwELL at several row thresholds: GPU time per
    gathered entry, to tell a per-entry cost from a tail.

Run on the GPU from the repository root:  PYTHONPATH=. python docs/perf/skew_probe.py [parts]
"""

import json
import sys

import cupy as cp
import numpy as np

import twell
from twell import synthetic
from twell.kernels import ffn_forward, gate_gemm, pack


def queued(fn, k=20, reps=5):
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
    return float(np.median(out))


def eager(fn, reps=25):
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
    return float(np.median(out))


def summary(values):
    v = np.asarray(values)
    return {"median": round(float(np.median(v)), 4), "min": round(float(v.min()), 4),
            "max": round(float(v.max()), 4)}


def cluster_part():
    for m, kind, rounds in ((16384, "uniform", 8), (16384, "token_skew", 8), (131072, "uniform", 3)):
        p = synthetic.make_problem(m, kind=kind, xp=cp)
        x, wg, wu, wd = p.x, p.w_gate, p.w_up, p.w_down
        t = {}
        for r in range(rounds):
            for cl in ((1, 2) if r % 2 == 0 else (2, 1)):
                gate_gemm.WGMMA_CLUSTER = cl
                t.setdefault(f"gate cl{cl} queued", []).append(
                    queued(lambda: gate_gemm.gate_twell_async(x, wg, 256, 8, 128), k=10, reps=3))
                f = lambda: twell.gated_ffn(x, wg, wu, wd)  # noqa: E731
                t.setdefault(f"op cl{cl} eager", []).append(eager(f))
                t.setdefault(f"op cl{cl} queued", []).append(queued(f, k=10, reps=3))
        gate_gemm.WGMMA_CLUSTER = 2
        res = {"part": "cluster", "M": m, "kind": kind, "rounds": rounds}
        res.update({k: summary(v) for k, v in t.items()})
        res["op cl1 minus cl2 eager, per round"] = [round(a - b, 4) for a, b in zip(t["op cl1 eager"], t["op cl2 eager"])]
        res["op cl1 minus cl2 queued, per round"] = [round(a - b, 4) for a, b in zip(t["op cl1 queued"], t["op cl2 queued"])]
        print(json.dumps(res), flush=True)
        x = wg = wu = wd = p = None
        cp.get_default_memory_pool().free_all_blocks()


def updown_part():
    m = 16384
    for kind, ths in (("uniform", (128,)), ("token_skew", (128, 96, 64, 48, 32))):
        p = synthetic.make_problem(m, kind=kind, xp=cp)
        x, wg, wu, wd = p.x, p.w_gate, p.w_up, p.w_down
        y = cp.empty_like(x)
        for th in ths:
            q = gate_gemm.gate_twell_async(x, wg, 256, 8, th)
            compact = q.row_route == pack.ROUTE_COMPACT
            entries = int(q.row_nnz[compact].sum())
            rows = int(compact.sum())
            longest = int(q.row_nnz[compact].max())
            counter = q.totals[2:3]

            def reset():
                counter.fill(0)

            def run():
                counter.fill(0)
                ffn_forward.twell_up_down(x, q.counts, q.indices, q.values, q.row_route, wu, wd, 256, y,
                                          compact=pack.ROUTE_COMPACT, work_counter=counter)
            t_reset = [queued(reset, k=20, reps=3) for _ in range(3)]
            t_run = [queued(run, k=10, reps=3) for _ in range(5)]
            ms = float(np.median(t_run)) - float(np.median(t_reset))
            print(json.dumps({"part": "updown", "kind": kind, "threshold": th, "compact rows": rows,
                              "entries": entries, "longest": longest, "reset ms": summary(t_reset),
                              "reset + up/down ms": summary(t_run), "up/down ms": round(ms, 4),
                              "ns per entry": round(ms * 1e6 / entries, 3),
                              "ns per row": round(ms * 1e6 / rows, 2)}), flush=True)
        x = wg = wu = wd = p = None
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    parts = sys.argv[1:] or ["updown", "cluster"]
    for part in parts:
        {"cluster": cluster_part, "updown": updown_part}[part]()
