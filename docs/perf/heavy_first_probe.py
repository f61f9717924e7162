"""A/B of the up/down kernel's longest-first row order (perf-notes.md, v10): twell.gated_ffn at M = 16,384 with
ffn_forward.HEAVY_FIRST_ENTRIES = None (row order) and a few thresholds, alternating rounds; y must be
bitwise the same for every setting.  Prints eager (synchronised single calls, median) and queued (30
calls back to back) ms per call.

Run on the GPU from the repository root:  PYTHONPATH=. python docs/perf/heavy_first_probe.py
"""
import time

import cupy as cp
import numpy as np

import twell
from twell import synthetic
from twell.kernels import ffn_forward

SETTINGS = (None, 32, 48, 64)


def eager_ms(args, reps=25):
    times = []
    for _ in range(reps):
        cp.cuda.Device().synchronize()
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        twell.gated_ffn(*args)
        b.record()
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b))
    return float(np.median(times))


def queued_ms(args, reps=30):
    cp.cuda.Device().synchronize()
    a, b = cp.cuda.Event(), cp.cuda.Event()
    a.record()
    for _ in range(reps):
        twell.gated_ffn(*args)
    b.record()
    b.synchronize()
    return cp.cuda.get_elapsed_time(a, b) / reps


for kind in ("uniform", "token_skew"):
    p = synthetic.make_problem(16384, kind=kind, xp=cp)
    args = p.arrays()
    ref = None
    for h in SETTINGS:
        ffn_forward.HEAVY_FIRST_ENTRIES = h
        for _ in range(3):
            y = twell.gated_ffn(*args)
        same = True
        if ref is None:
            ref = y.view(cp.uint16).copy()
        else:
            same = bool((y.view(cp.uint16) == ref).all())
        print(kind, "heavy_first", h, "bitwise equal to row order:", same, flush=True)
        assert same
    t0 = time.perf_counter()
    for rnd in range(3):
        cells = []
        for h in SETTINGS:
            ffn_forward.HEAVY_FIRST_ENTRIES = h
            cells.append(f"{h}: eager {eager_ms(args):.4f} queued {queued_ms(args):.4f}")
        print(kind, "round", rnd, " | ".join(cells), flush=True)
    print(kind, "probe seconds", round(time.perf_counter() - t0, 1), flush=True)
