"""The sparse path's backup sized on the device, piece by piece (M = 16,384, bf16, d 2048, n 5632).

* ``excess``: ``excess_rows_ffn`` (the exact kernel for backup rows past the capacity) on R rows, R = 0, 1,
  8, 64, 264, 1,024 — what a row past the capacity costs, and what the kernel costs when it has no work;
* ``queued``: the whole queued backup (``backup_rows_queued``: the row list, the capacity's gathers, three
  cuBLAS GEMMs, scatter, the exact kernel) with no backup row in the batch, for capacities 0, 64 and 128 —
  what a quiet layer pays per call for its capacity;
* ``op``: ``twell.gated_ffn`` at uniform mean 29 with a tracker that has observed the layer (the backup
  sized on the device) and without one (the backup-row count read back), and the dense baseline.

Queued device times (CUDA events, calls back to back, ``twell.bench.timing.time_gpu``), medians in ms; one
JSON line each.  Run it on two code versions (``PYTHONPATH``) to compare them.

    PYTHONPATH=. python docs/perf/backup_probe.py [--budget 0.3] [--parts excess,queued,op]
"""

import argparse
import json

import cupy as cp

import twell
from twell.bench.dense_cupy import make_dense_cupy
from twell.bench.timing import time_gpu
from twell.gpu import inference
from twell.kernels import ffn_forward
from twell.synthetic import make_problem


def emit(**kw):
    print(json.dumps(kw), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", type=int, default=16384)
    ap.add_argument("--budget", type=float, default=0.3, help="seconds per timing")
    ap.add_argument("--parts", default="excess,queued,op")
    args = ap.parse_args()
    parts = args.parts.split(",")
    p = make_problem(args.m, mean_active=29, kind="uniform", dtype="bfloat16", seed=0, xp=cp)
    x, wg, wu, wd = p.arrays()
    m = x.shape[0]
    y = cp.empty_like(x)
    rows = cp.arange(m, dtype=cp.int32)

    def t(fn):
        return round(time_gpu(fn, budget_s=args.budget, warmup=3, sync_each=False).to_dict()["median_ms"], 4)

    if "excess" in parts:
        for r in (0, 1, 8, 64, 264, 1024):
            count = cp.asarray([r], dtype=cp.int32)
            emit(part="excess", rows=r, ms=t(lambda c=count: ffn_forward.excess_rows_ffn(x, wg, wu, wd, rows, c, 0, y)))
    if "queued" in parts:
        route = cp.zeros(m, dtype=cp.int32)                  # no backup row
        for capacity in (0, 64, 128):
            emit(part="queued", capacity=capacity, backup_rows=0,
                 ms=t(lambda c=capacity: inference.backup_rows_queued(x, wg, wu, wd, y, route, c, True)))
    if "op" in parts:
        tracker = twell.DensityTracker()
        twell.gated_ffn(x, wg, wu, wd, out=y, tracker=tracker)
        cp.cuda.Device().synchronize()
        emit(part="op", impl="dense_cupy", ms=t(make_dense_cupy(p)))
        emit(part="op", impl="twell tracker", ms=t(lambda: twell.gated_ffn(x, wg, wu, wd, out=y, tracker=tracker)),
             capacity=inference.backup_capacity(tracker, m, wg.shape[0], x.shape[1]), path=tracker.last_path)
        emit(part="op", impl="twell read-back", ms=t(lambda: twell.gated_ffn(x, wg, wu, wd, out=y)))
        emit(part="op", impl="dense_cupy again", ms=t(make_dense_cupy(p)))


if __name__ == "__main__":
    main()
