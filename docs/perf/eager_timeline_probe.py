"""Where one eager call's time goes: host time stamps inside the call beside the GPU's progress (M 16,384,
bf16, d 2048, n 5632).

An eager call (the bench's ``eager`` timing: an event, the call, an event, a host synchronisation) costs its
GPU work plus whatever host time passes before its first kernel is queued, plus any gap the host leaves
between kernels.  This probe wraps the launchers it names (monkeypatching, for this probe only) to stamp
host times and record CUDA events at those points:

* ``--path dense`` (default mean 512): the dense path -- the op with a ``DensityTracker`` (what a layer
  runs), with ``path="dense"`` and a preallocated ``out``, and without ``out`` -- against the bench's
  ``dense_cupy`` baseline: host ms before the first GEMM call, of that call, after it, of the whole call;
  eager and queued device ms.
* ``--path sparse`` (default mean 29): the sparse path (fused gate → TwELL, up/down, the read-back of the
  dense-backup count), without and with a tracker: host ms at the gate launch, after the up/down launch, at
  the start and end of the read-back wait, at the call's end; GPU ms (from the call's first event) when the
  gate and the up/down kernels finish; eager and queued device ms.

Medians of ``--calls`` eager calls (after 5 warm-up calls); queued: ``twell.bench.timing.time_gpu`` with calls
back to back.  No L2 flush (the bench flushes only up to M = 4,096).

    PYTHONPATH=. python docs/perf/eager_timeline_probe.py [--path dense|sparse] [--mean X] [--m 16384]
"""

import argparse
import statistics
import time

import cupy as cp

import twell
from twell.bench.dense_cupy import make_dense_cupy
from twell.bench.timing import time_gpu
from twell.gpu import inference
from twell.kernels import gate_gemm
from twell.runtime import blas, launch
from twell.synthetic import make_problem


class _Problem:                     # what the bench's implementation factories take
    def __init__(self, arrays):
        self._arrays = arrays

    def arrays(self):
        return self._arrays


def queued_ms(fn):
    return time_gpu(fn, budget_s=0.1, warmup=2, sync_each=False).to_dict()["median_ms"]


def timeline(fn, stream, calls, stamps, events):
    """Medians over eager calls of the host stamps (ms after the call started) and of the events (ms after the
    call's first event)."""
    for _ in range(5):
        fn()
    stream.synchronize()
    rows = []
    for _ in range(calls):
        stamps.clear()
        events.clear()
        stream.synchronize()
        start, end = cp.cuda.Event(), cp.cuda.Event()
        t0 = time.perf_counter()
        start.record(stream)
        fn()
        t1 = time.perf_counter()
        end.record(stream)
        end.synchronize()
        row = {f"host {k}": 1e3 * (v - t0) for k, v in stamps.items()}
        row["host call end"] = 1e3 * (t1 - t0)
        row.update({f"gpu {k} done": cp.cuda.get_elapsed_time(start, e) for k, e in events.items()})
        row["eager"] = cp.cuda.get_elapsed_time(start, end)
        rows.append(row)
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", choices=("dense", "sparse"), default="dense")
    ap.add_argument("--mean", type=float, default=None, help="mean active neurons per token (uniform)")
    ap.add_argument("--m", type=int, default=16384)
    ap.add_argument("--calls", type=int, default=60)
    args = ap.parse_args(argv)
    mean = args.mean if args.mean is not None else (512.0 if args.path == "dense" else 29.0)
    p = make_problem(args.m, d=2048, n=5632, mean_active=mean, dtype="bfloat16", seed=0, xp=cp)
    x, wg, wu, wd = arrays = (p.x, p.w_gate, p.w_up, p.w_down)
    out = cp.empty_like(x)
    stream = cp.cuda.get_current_stream()
    stamps, events = {}, {}

    def stamp(name, fn, event=None):
        def wrapped(*a, **k):
            stamps.setdefault(f"{name} in", time.perf_counter())
            r = fn(*a, **k)
            stamps.setdefault(f"{name} out", time.perf_counter())
            if event:
                events.setdefault(event, cp.cuda.Event())
                events[event].record(stream)
            return r
        return wrapped

    if args.path == "dense":
        blas.gemm_pair = stamp("first GEMM", blas.gemm_pair)
        blas.gemm = stamp("first GEMM", blas.gemm)
        variants = {
            "dense_cupy (baseline)": make_dense_cupy(_Problem(arrays)),
            "twell, tracker, out": (lambda t: lambda: twell.gated_ffn(x, wg, wu, wd, out=out, tracker=t))(
                twell.DensityTracker()),
            "twell, path=dense, out": lambda: twell.gated_ffn(x, wg, wu, wd, out=out, path="dense"),
            "twell, path=dense": lambda: twell.gated_ffn(x, wg, wu, wd, path="dense"),
        }
    else:
        gate_gemm._launch_wgmma_planned = stamp("gate", gate_gemm._launch_wgmma_planned, "gate")
        inference.ffn_forward.twell_up_down = stamp("up/down", inference.ffn_forward.twell_up_down, "up/down")
        launch.HostReadback.wait = stamp("read-back wait", launch.HostReadback.wait)
        variants = {
            "twell, out": lambda: twell.gated_ffn(x, wg, wu, wd, out=out),
            "twell, tracker, out": (lambda t: lambda: twell.gated_ffn(x, wg, wu, wd, out=out, tracker=t))(
                twell.DensityTracker()),
        }
    print(f"M {args.m}, uniform mean {mean:g}, {args.path} path, medians of {args.calls} eager calls (ms)")
    for name, fn in variants.items():
        res = timeline(fn, stream, args.calls, stamps, events)
        res["queued"] = queued_ms(fn)
        print(f"{name}:")
        for k, v in res.items():
            print(f"  {k:28s} {v:8.4f}")


if __name__ == "__main__":
    main()
