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

``--kernels``: the dense path's pieces one by one (queued device time), beside the baseline's: the two
projection GEMMs, ``dense_gate_mul`` with h alone (the flat kernel), with the inference outputs (h, row
counts; h and a tracker's summary) and with the training ones
(h, relu(z), row L1, row and neuron counts) against the baseline's fused relu·mul, ``fix_nonfinite_rows``
over y, and ``backup_row_grads`` against the baseline's fused backward kernel.

    PYTHONPATH=. python docs/perf/dense_path_probe.py [--mean 512,1500,5632] [--m 16384] [--mode both] [--kernels]
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
            res["tracker_path"], res["tracker_calls"] = tracker.last_path, dict(tracker.calls)
        print(json.dumps(res), flush=True)
    # the baseline once more: a drift of the clocks over the case shows as a second ratio far from 1
    first = next(iter(runs.values()))
    again = time_gpu(first, budget_s=budget, warmup=3).to_dict()["median_ms"]
    print(json.dumps({"case": label, "impl": "baseline again", "eager_ms": round(again, 4),
                      "vs_baseline_eager": round(base["eager"] / again, 3)}), flush=True)


def kernel_breakdown(p, budget):
    """Queued device time (ms) of each piece of the dense path and of the baseline's kernels."""
    from twell.bench.elementwise import relu_mul_bwd_kernel, relu_mul_kernel
    from twell.kernels import ffn_backward, ffn_forward
    from twell.runtime import blas
    x, wg, wu, wd = p.arrays()
    m, n = x.shape[0], wg.shape[0]
    z, u = blas.gemm(x, wg, trans_b=True), blas.gemm(x, wu, trans_b=True)
    h, g, y = cp.empty_like(z), cp.empty_like(z), blas.gemm(z, wd)
    row_nnz, counts = cp.empty(m, dtype=cp.int32), cp.zeros(n, dtype=cp.int32)
    row_l1, total, total3 = cp.empty(m, dtype=cp.float32), cp.zeros(1, dtype=cp.uint64), cp.zeros(3, dtype=cp.uint64)
    du, dz = cp.empty_like(z), cp.empty_like(z)
    fwd4, bwd4 = relu_mul_kernel(False, True), relu_mul_bwd_kernel(True)
    v = (z.view(cp.uint64), u.view(cp.uint64), h.view(cp.uint64))
    wcat, zu = cp.concatenate([wg, wu]), cp.empty((m, 2 * n), dtype=x.dtype)
    pieces = {
        "gemm x wg^T": lambda: blas.gemm(x, wg, z, trans_b=True),
        "gemms x wg^T, x wu^T": lambda: (blas.gemm(x, wg, z, trans_b=True), blas.gemm(x, wu, u, trans_b=True)),
        "gemm x [wg; wu]^T (baseline cat)": lambda: blas.gemm(x, wcat, zu, trans_b=True),
        "gemm h wd": lambda: blas.gemm(h, wd, y),
        "baseline relu_mul (bf16x4)": lambda: fwd4(*v),
        "dense_gate_mul h only (the flat kernel)": lambda: ffn_forward.dense_gate_mul(z, u, h=h),
        "dense_gate_mul h + row counts": lambda: ffn_forward.dense_gate_mul(z, u, h=h, row_nnz=row_nnz),
        "dense_gate_mul h + tracker summary": lambda: ffn_forward.dense_gate_mul(
            z, u, h=h, summary=total3, summary_threshold=128),
        "dense_gate_mul training outputs": lambda: ffn_forward.dense_gate_mul(
            z, u, h=h, g_out=g, row_l1=row_l1, row_nnz=row_nnz, neuron_counts=counts, nnz_total=total),
        "fix_nonfinite_rows y": lambda: ffn_forward.fix_nonfinite_rows(y, g, h, wd),
        "baseline relu_mul_bwd (bf16x4)": lambda: bwd4(v[0], v[1], v[2], cp.float32(1e-9), du.view(cp.uint64),
                                                       dz.view(cp.uint64)),
        "backup_row_grads": lambda: ffn_backward.backup_row_grads(h, g, u, 1e-9),
    }
    for name, fn in pieces.items():
        t = time_gpu(fn, budget_s=budget, warmup=3, sync_each=False).to_dict()["median_ms"]
        print(json.dumps({"m": m, "mean_active": p.params.get("mean_active"), "piece": name, "queued_ms": round(t, 4)}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mean", default="512,1500,5632", help="comma-separated active neurons per token")
    ap.add_argument("--m", type=int, default=16384)
    ap.add_argument("--mode", default="both", choices=("infer", "train", "both"))
    ap.add_argument("--budget", type=float, default=0.5, help="seconds per timing")
    ap.add_argument("--kernels", action="store_true", help="time the dense path's pieces instead of the op")
    args = ap.parse_args()
    for mean in (float(v) for v in args.mean.split(",")):
        p = make_problem(args.m, mean_active=mean, kind="uniform", dtype="bfloat16", seed=0, xp=cp)
        if args.kernels:
            kernel_breakdown(p, args.budget)
            continue
        if args.mode in ("infer", "both"):
            measure(f"infer mean {mean:g}", *inference_runs(p), args.budget)
        if args.mode in ("train", "both"):
            measure(f"train mean {mean:g}", *training_runs(p), args.budget)
        p = None
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
