"""Timers: CUDA events on the current CuPy stream (GPU), ``time.perf_counter`` (CPU), L2 flushing and
CUDA-graph capture (CuPy and PyTorch).

Usable on its own, e.g. by probe scripts::

    from twell.bench.timing import L2Flusher, time_gpu
    t = time_gpu(lambda: f(x), budget_s=0.5, warmup=3, flush=L2Flusher(l2_bytes)).to_dict()
    t["median_ms"], t["p20_ms"], t["p80_ms"]

Nothing here imports the rest of :mod:`twell.bench` or any of twell; CuPy and PyTorch are imported when
a function needs them.

GPU measurements (what ``python -m twell bench`` reports):

* **eager** (``time_gpu(fn, sync_each=True)``): CUDA events recorded on the current stream immediately
  before and after each call, host synchronisation after each call -- the measurement of
  ``cupyx.profiler.benchmark`` (Python launch overhead counts: at decode sizes that is what a Python
  caller pays).  Our own loop instead of ``cupyx.profiler.benchmark`` so that the L2 can be flushed
  *outside* the timed window.
* **queued** / **graph** (``sync_each=False``): calls (or graph replays) queued back to back in batches,
  each between its own pair of events, no host synchronisation between calls: device time only.
* **interleaved** (:func:`time_interleaved`): several functions timed eagerly in turn, one call each per
  round (the order rotating), so that a drift of the clocks over seconds (power, temperature) moves all of
  them alike: what a speedup between two implementations should be measured with when it is close to 1.
* **graph capture**: :func:`capture_cupy_graph` captures a call once into a CUDA graph (allocations
  inside the capture come from a private memory pool kept alive with the graph);
  :func:`capture_torch_graph` does the same with ``torch.cuda.CUDAGraph``.

Repetitions adapt to ``budget_s`` (at least :data:`MIN_REPEAT`, after ``warmup`` untimed calls).
:class:`L2Flusher` overwrites a buffer of 4x the L2 size; pass it as ``flush`` and it runs before every
timed call, outside the events, so decode sizes do not measure weights left in L2 by the previous call.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["Timing", "L2Flusher", "time_gpu", "time_cpu", "time_interleaved", "CapturedGraph", "capture_cupy_graph",
           "capture_torch_graph", "MIN_REPEAT", "MAX_REPEAT", "GRAPH_BATCH"]

MIN_REPEAT = 5
MAX_REPEAT = 5000
#: events per batch of queued calls (sync_each=False)
GRAPH_BATCH = 64


@dataclass
class Timing:
    """Per-call times in ms; :meth:`to_dict` gives the median, p20, p80, min and the repeat count."""

    times_ms: list

    def to_dict(self) -> dict:
        t = np.asarray(self.times_ms, dtype=np.float64)
        return {
            "median_ms": float(np.median(t)),
            "p20_ms": float(np.percentile(t, 20)),
            "p80_ms": float(np.percentile(t, 80)),
            "min_ms": float(t.min()),
            "n_repeat": int(t.size),
        }


class L2Flusher:
    """Overwrites a device buffer of 4× the L2 size (an elementwise fill) on the current stream."""

    def __init__(self, l2_bytes: int):
        import cupy as cp  # noqa: PLC0415
        nbytes = max(4 * int(l2_bytes), 64 << 20)
        self.buf = cp.empty(nbytes // 4, dtype=np.int32)
        self._v = np.int32(1)

    def __call__(self):
        self.buf.fill(self._v)  # a non-zero fill is a kernel that writes every line
        self._v = np.int32(3 - int(self._v))


def time_gpu(fn, *, budget_s: float, warmup: int, flush=None, sync_each: bool = True,
             min_repeat: int = MIN_REPEAT, max_repeat: int = MAX_REPEAT) -> Timing:
    """Per-call device times (ms) of ``fn()`` on the current CuPy stream.

    ``sync_each=True``: events around each call and a host sync after it (the
    ``cupyx.profiler.benchmark`` measurement; Python launch gaps count).
    ``sync_each=False``: calls are queued back to back in batches, each between
    its own pair of events (device time only; for graph replays).
    ``flush()`` (optional) runs before each call, outside the events.
    """
    import cupy as cp  # noqa: PLC0415
    stream = cp.cuda.get_current_stream()
    for _ in range(max(0, int(warmup))):
        if flush is not None:
            flush()
        fn()
    stream.synchronize()
    times: list = []
    t0 = time.perf_counter()
    if sync_each:
        ev1, ev2 = cp.cuda.Event(), cp.cuda.Event()
        while len(times) < max_repeat:
            if flush is not None:
                flush()
            ev1.record(stream)
            fn()
            ev2.record(stream)
            ev2.synchronize()
            times.append(cp.cuda.get_elapsed_time(ev1, ev2))
            if len(times) >= min_repeat and time.perf_counter() - t0 > budget_s:
                break
        return Timing(times)
    starts = [cp.cuda.Event() for _ in range(GRAPH_BATCH)]
    ends = [cp.cuda.Event() for _ in range(GRAPH_BATCH)]
    while len(times) < max_repeat:
        k = min(GRAPH_BATCH, max_repeat - len(times))
        for i in range(k):
            if flush is not None:
                flush()
            starts[i].record(stream)
            fn()
            ends[i].record(stream)
        ends[k - 1].synchronize()
        times.extend(cp.cuda.get_elapsed_time(starts[i], ends[i]) for i in range(k))
        if len(times) >= min_repeat and time.perf_counter() - t0 > budget_s:
            break
    return Timing(times)


def time_cpu(fn, *, budget_s: float, warmup: int = 1, min_repeat: int = 3, max_repeat: int = 50) -> Timing:
    """Host timings (ms) of ``fn()`` with ``time.perf_counter``.

    The first call is a warm-up (``warmup >= 1``) unless it alone takes more
    than the budget, in which case it is the only sample.  Then at least
    ``min_repeat`` samples while within twice the budget, more until the budget
    is spent.
    """
    t = time.perf_counter()
    fn()
    first = (time.perf_counter() - t) * 1e3
    if warmup <= 0 or first > budget_s * 1e3:
        times = [first]
        if first > budget_s * 1e3:
            return Timing(times)
    else:
        times = []
    for _ in range(max(0, warmup - 1)):
        fn()
    t0 = time.perf_counter()
    while len(times) < max_repeat:
        t = time.perf_counter()
        fn()
        now = time.perf_counter()
        times.append((now - t) * 1e3)
        spent = now - t0
        if spent > 2 * budget_s or (len(times) >= min_repeat and spent > budget_s):
            break
    return Timing(times)


def time_interleaved(fns: dict, *, budget_s: float, warmup: int, flush=None, gpu: bool = True,
                     min_repeat: int = MIN_REPEAT, max_repeat: int = MAX_REPEAT) -> dict:
    """Eager per-call times (ms) of several functions measured in turn: ``{name: Timing}``.

    Each round calls every function once (rotating the order from round to round), each call timed like
    ``time_gpu(sync_each=True)`` on the GPU (CUDA events on the current CuPy stream around the call, host
    sync after it; ``flush()`` before it, untimed) or with ``time.perf_counter`` (``gpu=False``).  Rounds
    continue until every function has ``min_repeat`` samples and ``budget_s`` per function is spent, or
    ``max_repeat`` rounds.  ``warmup`` untimed calls of each function first.
    """
    names = list(fns)
    if not names:
        return {}
    if gpu:
        import cupy as cp  # noqa: PLC0415
        stream = cp.cuda.get_current_stream()
        ev1, ev2 = cp.cuda.Event(), cp.cuda.Event()

        def one(fn):
            ev1.record(stream)
            fn()
            ev2.record(stream)
            ev2.synchronize()
            return cp.cuda.get_elapsed_time(ev1, ev2)
    else:
        def one(fn):
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
    for name in names:
        for _ in range(max(0, int(warmup))):
            if flush is not None:
                flush()
            fns[name]()
    if gpu:
        stream.synchronize()
    times: dict = {name: [] for name in names}
    t0 = time.perf_counter()
    for r in range(max_repeat):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            if flush is not None:
                flush()
            times[name].append(one(fns[name]))
        if r + 1 >= min_repeat and time.perf_counter() - t0 > budget_s * len(names):
            break
    return {name: Timing(t) for name, t in times.items()}


@dataclass
class CapturedGraph:
    """A captured call: ``launch()`` replays it on the current stream, ``y`` is its output."""

    launch: Callable
    y: object
    release: Callable


def capture_cupy_graph(run, stream) -> CapturedGraph:
    """Capture ``run()`` on ``stream`` (non-blocking) into a CUDA graph.

    ``run`` is called once on ``stream`` first (lazy initialisation, kernel
    compilation).  Allocations made during the capture come from a private
    ``cupy.cuda.MemoryPool`` that stays alive with the graph, so the replayed
    kernels never write into memory handed to someone else.
    """
    import cupy as cp  # noqa: PLC0415
    pool = cp.cuda.MemoryPool()
    with stream:
        run()
        stream.synchronize()
        with cp.cuda.using_allocator(pool.malloc):
            stream.begin_capture()
            try:
                y = run()
            except BaseException:
                with contextlib.suppress(Exception):
                    stream.end_capture()
                raise
            graph = stream.end_capture()
    state = {"graph": graph, "y": y, "pool": pool}

    def launch():
        graph.launch(stream)

    def release():
        stream.synchronize()
        state.clear()
        pool.free_all_blocks()

    return CapturedGraph(launch=launch, y=y, release=release)



def capture_torch_graph(run, stream=None) -> CapturedGraph:
    """Capture ``run`` with ``torch.cuda.CUDAGraph``; replays go to torch's current stream.

    ``run`` is called twice on a side stream first (warm-up, as PyTorch asks); ``stream`` is unused (the
    signature of :func:`capture_cupy_graph`).
    """
    import torch  # noqa: PLC0415
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = run()
    state = {"g": g, "y": y}

    def release():
        state.clear()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return CapturedGraph(launch=g.replay, y=y, release=release)
