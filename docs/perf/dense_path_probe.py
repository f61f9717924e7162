"""twell's dense path against the dense cuBLAS baseline on dense batches (M = 16,384, bf16, d 2048,
n 5632, uniform problems with 512, 1500 and 5632 (every neuron) active per token by default).

Inference: ``twell.gated_ffn(..., path="dense")`` (3 cuBLAS GEMMs + one elementwise kernel that also counts
the entries, then the NaN/Inf fix-up's read of y), the sparse path forced (``path="sparse"``), the op with
a ``DensityTracker`` (what a layer runs: the warm-up calls teach it the density; the path it took is
printed), and the bench's ``dense_cupy`` baseline.  Training (``--mode train`` or ``both``): the step
``gated_ffn_forward`` + ``gated_ffn_backward`` with ``path="dense"``, ``"sparse"`` and a tracker, against
the bench's ``dense_cupy_train`` (9 GEMMs, two fused elementwise kernels).

Device times (CUDA events, ``twell.bench.timing.time_gpu``): eager (host sync after each call) and queued
(calls back to back); medians.  ``vs baseline`` = baseline time / this time (same timing kind).

    PYTHONPATH=. python docs/perf/dense_path_probe.py [--mean 512,1500,5632] [--m 16384] [--mode both]
"""

import argparse
import json

import cupy as cp

import twell
from twell.bench import TrainProblem, make_dy
from twell.bench.dense_cupy import make_dense_cupy, make_dense_cupy_train
from twell.bench.timing import time_gpu
from twell.synthetic import make_problem

L1_WEIGHT = 2e-5


def inference_runs(p):
    x, wg, wu, wd = p.arrays()
    tracker = twell.DensityTracker()

    def op(**kw):
        y = cp.empty_like(x)
        return lambda: twell.gated_ffn(x, wg, wu, wd, out=y, **kw)

    runs = {"baseline dense_cupy": make_dense_cupy(p), "twell path=dense": op(path="dense"),
            "twell path=sparse": op(path="sparse"), "twell tracker": op(tracker=tracker)}
    return runs, tracker


def training_runs(p):
    tp = TrainProblem(p, make_dy(p, 0), L1_WEIGHT)
    tracker = twell.DensityTracker()

    def step(**kw):
        def run():
            y, saved, _ = twell.gated_ffn_forward(*p.arrays(), l1_weight=L1_WEIGHT, **kw)
            return (y, *twell.gated_ffn_backward(saved, tp.dy))
        return run

    runs = {"baseline dense_cupy_train": make_dense_cupy_train(tp), "twell path=dense": step(path="dense"),
            "twell path=sparse": step(path="sparse"), "twell tracker": step(tracker=tracker)}
    return runs, tracker


def measure(label, runs, tracker, budget):
    base = {}
    for name, run in runs.items():
        eager = time_gpu(run, budget_s=budget, warmup=3).to_dict()["median_ms"]
        queued = time_gpu(run, budget_s=budget, warmup=3, sync_each=False).to_dict()["median_ms"]
        base = base or {"eager": eager, "queued": queued}
        res = {"case": label, "impl": name, "eager_ms": round(eager, 4), "queued_ms": round(queued, 4),
               "vs_baseline_eager": round(base["eager"] / eager, 3),
               "vs_baseline_queued": round(base["queued"] / queued, 3)}
        if name == "twell tracker":
            res["tracker_path"] = tracker.last_path
        print(json.dumps(res), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mean", default="512,1500,5632", help="comma-separated active neurons per token")
    ap.add_argument("--m", type=int, default=16384)
    ap.add_argument("--mode", default="both", choices=("infer", "train", "both"))
    ap.add_argument("--budget", type=float, default=0.5, help="seconds per timing")
    args = ap.parse_args()
    for mean in (float(v) for v in args.mean.split(",")):
        p = make_problem(args.m, mean_active=mean, kind="uniform", dtype="bfloat16", seed=0, xp=cp)
        if args.mode in ("infer", "both"):
            measure(f"infer mean {mean:g}", *inference_runs(p), args.budget)
        if args.mode in ("train", "both"):
            measure(f"train mean {mean:g}", *training_runs(p), args.budget)
        p = None
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
