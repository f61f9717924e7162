"""Which path an FFN call takes: sparse (TwELL / hybrid, with exact dense backup rows) or dense (cuBLAS).

Both paths are exact; the choice only changes the time.  The sparse path wins when few neurons are active
per token and loses when many are (every model goes through that regime during its L1 warm-up), so a
layer that calls the op repeatedly keeps a :class:`DensityTracker`: each call reports how dense its batch
was, and the next call takes the path the cost model below predicts to be faster.  A call without a
tracker takes the sparse path (``path="auto"``), or the one it is told (``path="sparse"`` / ``"dense"``).

Cost model (times of one call; constants measured on an H200, bf16, docs/performance-history.md):

* dense inference: 3 GEMMs of M x n x d, or reading the three weight matrices once, whichever is longer;
  training: 9 such GEMMs (forward 3, backward 6).
* sparse: the gate GEMM (one of the three), plus every compact entry's weight-row gathers (2 rows of d
  elements per entry in inference, 7 in training), plus each dense backup row at the dense per-row cost
  (with an overhead for gathering and scattering its rows and, in inference, recomputing its gate row).

Calibrated against the measured break-even of the sweeps (about 70-80 active neurons per token of
5,632 for inference and training at M = 16,384).

Inference batches of at most 512 rows (the small-batch path: latency-bound, launch overheads matter)
use measured times instead: the small-batch path's time as a function of the batch's entries and the
best dense time as a function of M, both CUDA-graph replays on the H200 at d = 2048, n = 5,632, bf16
(docs/benchmarks.md, decode table), interpolated and scaled by n·d for other shapes.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

__all__ = ["DensityTracker", "PATHS", "predict_times", "check_path"]

#: Values of the ``path`` argument of the FFN ops.
PATHS = ("auto", "sparse", "dense")

#: bf16 GEMM rate of cuBLAS on the gate GEMM's shape (FLOP/s) and device memory read rate (B/s).
GEMM_FLOPS = 660e12
MEMORY_BYTES_PER_S = 3.8e12
#: Rate of the sparse kernels' random weight-row gathers (B/s; the rows mostly come from L2).
GATHER_BYTES_PER_S = 8.5e12
#: Weight rows of d elements gathered per compact entry: inference (up, down) and a training step.
GATHER_ROWS_INFERENCE, GATHER_ROWS_TRAINING = 2, 7
#: A dense backup row costs this much more than the same row inside the dense computation's remaining
#: GEMMs.  Training: its row gathers and scatters.  Inference: also its gate row recomputed (cuBLAS) and,
#: sized on the device, the spare rows of the capacity -- calibrated on the sweep's device times
#: (token skew, means 29 and 64: 0.73 and 1.00 of dense measured, 0.70 and 1.04 predicted;
#: docs/performance-history.md, v31).
BACKUP_ROW_OVERHEAD_INFERENCE, BACKUP_ROW_OVERHEAD_TRAINING = 2.5, 1.15


#: Small-batch path: (entries of the batch, ms) and best dense: (M, ms), measured (see the module docstring).
SMALL_BATCH_MS = ((24, 0.0211), (207, 0.0306), (1894, 0.0489), (14746, 0.0990))
SMALL_DENSE_MS = ((1, 0.0332), (64, 0.0375), (512, 0.0634))
_SMALL_SHAPE = 2048 * 5632
SMALL_BATCH_ROWS = 512


def _interp(points, v: float) -> float:
    """Piecewise-linear through ``points``, extended linearly beyond both ends."""
    (x0, y0), (x1, y1) = points[0], points[1]
    for a, b in zip(points, points[1:]):
        (x0, y0), (x1, y1) = a, b
        if v <= x1:
            break
    return y0 + (y1 - y0) * (v - x0) / (x1 - x0)


def check_path(path) -> str:
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    return path


def predict_times(m: int, n: int, d: int, itemsize: int, compact_entries: int, backup_rows: int, *,
                  training: bool, entries: int | None = None) -> tuple[float, float]:
    """Predicted ``(sparse, dense)`` seconds of one call with this density (see the module docstring).
    ``entries``: every row's entries (the small-batch path's work; default: the compact entries plus the
    backup rows at twice the usual row threshold each)."""
    if not training and m <= SMALL_BATCH_ROWS:
        scale = n * d / _SMALL_SHAPE
        if entries is None:
            entries = compact_entries + backup_rows * min(256, n)
        return (max(_interp(SMALL_BATCH_MS, entries / max(scale, 1e-9)) * scale, 0.0) * 1e-3,
                _interp(SMALL_DENSE_MS, m) * scale * 1e-3)
    gemm = 2.0 * m * n * d / GEMM_FLOPS
    weights = n * d * itemsize / MEMORY_BYTES_PER_S
    gemms = 9 if training else 3
    dense = max(gemms * gemm, (3 if training else 1) * 3 * weights)
    per_row_dense = dense / max(m, 1)
    rows = GATHER_ROWS_TRAINING if training else GATHER_ROWS_INFERENCE
    sparse = (max(gemm, weights) + compact_entries * rows * d * itemsize / GATHER_BYTES_PER_S
              + backup_rows * per_row_dense * (gemms - 1) / gemms
              * (BACKUP_ROW_OVERHEAD_TRAINING if training else BACKUP_ROW_OVERHEAD_INFERENCE))
    return sparse, dense


@dataclass
class _Observation:
    m: int
    compact_entries: int
    backup_rows: int
    entries: int | None = None          # every row's entries, when known


class DensityTracker:
    """Remembers how dense one layer's last call was and picks the path of its next call.

    Pass the same tracker to every call of one layer (``tracker=``); the layers of :mod:`twell.torch`
    hold one each.  After a sparse call it knows the compact entries and the rows on the dense backup
    (read back by the call anyway); after a dense call, the entries per row (copied back asynchronously
    and read at the next decision, by when the copy has long finished).  The decision is the cheaper of
    the two paths by :func:`predict_times` for the next call's shape; with no observation yet, sparse.

    Thread-safe; captured CUDA-graph calls neither update it nor are affected by later changes (the path
    is fixed when the graph is captured).

    Attributes
    ----------
    last_path : str or None
        The path the last observed call took.
    calls : dict
        How many calls took each path.
    """

    #: Small batches (decode) report their density only every this many calls: a report costs an
    #: asynchronous copy and an event (~10 µs of host time), and a model's density changes slowly.
    SMALL_BATCH_INTERVAL = 16
    #: Dense-path inference calls (M > 512) report their density only every this many calls: a report
    #: costs the counting variant of the elementwise kernel (≈ 0.02 ms more at M = 16,384, d_ff 5,632),
    #: an asynchronous copy and an event.
    DENSE_INTERVAL = 4
    #: Dense calls whose counts may still be on their way to the host; one more waits for the oldest.
    MAX_PENDING = 8
    #: Observations whose share of backup rows :meth:`backup_peak` takes the largest of.
    PEAK_WINDOW = 16

    def __init__(self, dense_row_threshold: int = 128):
        self._lock = threading.Lock()
        self._small_calls = 0
        self._dense_calls = 0
        self._obs: _Observation | None = None
        self._backup_shares: deque = deque(maxlen=self.PEAK_WINDOW)   # backup rows / M of recent calls
        self._obs_seq = -1                 # the call the observation comes from
        self._seq = 0                      # calls observed so far
        # copies on their way to the host, oldest first: (event, seq, read() -> _Observation, device buffer)
        self._pending: deque = deque()
        self._ring = None                  # pinned host slots of the dense calls' summaries (made on first use)
        self._ring_next = 0
        self._events: list = []            # events of resolved copies, reused
        self.dense_row_threshold = int(dense_row_threshold)
        self._choice = None                # ((observation, call shape), path) of the last decision
        self.last_path: str | None = None
        self.calls = {"sparse": 0, "dense": 0}

    def wants_small_batch_observation(self) -> bool:
        """Whether this small-batch call should report its density (every SMALL_BATCH_INTERVAL-th)."""
        with self._lock:
            self._small_calls += 1
            return self._small_calls % self.SMALL_BATCH_INTERVAL == 1 or self._obs is None and not self._pending

    def dense_call_observes(self) -> bool:
        """Whether this dense-path inference call should report its density (every DENSE_INTERVAL-th, and
        every call while nothing is known); a call that does not is counted in :attr:`calls` here."""
        with self._lock:
            self._dense_calls += 1
            if self._dense_calls % self.DENSE_INTERVAL == 1 or self._obs is None and not self._pending:
                return True
            self.last_path = "dense"
            self.calls["dense"] = self.calls.get("dense", 0) + 1
            return False

    def _set(self, obs: _Observation, seq: int):
        if obs.m:
            self._backup_shares.append(obs.backup_rows / obs.m)
        if seq > self._obs_seq:                # a copy that arrives late never overrides a newer call
            self._obs, self._obs_seq = obs, seq

    def _next_seq(self, path: str) -> int:
        self._seq += 1
        self.last_path = path
        self.calls[path] = self.calls.get(path, 0) + 1
        return self._seq

    def observe_sparse(self, m: int, compact_entries: int, backup_rows: int):
        """Record a sparse call's density (host integers)."""
        with self._lock:
            self._set(_Observation(int(m), int(compact_entries), int(backup_rows)), self._next_seq("sparse"))

    def _queue(self, cp, stream, seq, read, keep):
        """Record an event after a copy to the host was queued on ``stream``; bounded: beyond MAX_PENDING
        copies in flight, wait for the oldest."""
        event = self._events.pop() if self._events else cp.cuda.Event(block=False, disable_timing=True)
        event.record(stream)
        self._pending.append((event, seq, read, keep))
        while len(self._pending) > self.MAX_PENDING:
            self._resolve(self._pending.popleft(), block=True)

    def observe_rows(self, row_nnz, *, path: str):
        """Record a call from its per-row entry counts on the device (int32 (M,)): an asynchronous copy to
        pinned host memory, summarised by a later :meth:`choose` once it has arrived (small batches)."""
        import cupy as cp  # noqa: PLC0415
        m = int(row_nnz.shape[0])
        host = cp.cuda.alloc_pinned_memory(4 * max(m, 1))
        buf = np.frombuffer(host, dtype=np.int32, count=m)
        stream = cp.cuda.get_current_stream()
        if m:
            cp.cuda.runtime.memcpyAsync(buf.ctypes.data, row_nnz.data.ptr, 4 * m, cp.cuda.runtime.memcpyDeviceToHost,
                                        stream.ptr)
        with self._lock:
            self._queue(cp, stream, self._next_seq(path), lambda: self._summarise(buf), (host, row_nnz))

    def observe_summary(self, summary, m: int, *, path: str):
        """Record a call from its device summary (uint64 (3,): entries of the rows at most
        ``dense_row_threshold`` long, rows longer, all entries; see ``dense_gate_mul``): a 24-byte asynchronous
        copy into a pinned slot of this tracker, read by a later :meth:`choose` once it has arrived."""
        m = int(m)
        self._observe_copy(summary, 24, path, lambda s: _Observation(m, int(s[0]), int(s[1]), int(s[2])))

    def observe_sparse_totals(self, totals, m: int, *, backup_index: int = 0, compact_index: int = 3):
        """Record a sparse call whose backup was sized without a read-back, from its device totals (int32
        (4,); the inference gate's: backup rows, overflowed rows, a work counter, compact entries; the
        training plan's: compact entries, backup rows, rows to refill, a work counter -- the indexes say
        which word is which): a 16-byte asynchronous copy into a pinned slot of this tracker, read by a
        later :meth:`choose` once it has arrived."""
        m = int(m)

        def read(slot):
            words = slot.view(np.int32)
            return _Observation(m, int(words[compact_index]), int(words[backup_index]))

        self._observe_copy(totals, 16, "sparse", read)

    def _observe_copy(self, device_array, nbytes: int, path: str, read):
        """Queue an asynchronous copy of the first ``nbytes`` of ``device_array`` into a pinned slot of this
        tracker on the current stream; ``read(slot)`` makes the observation once it has arrived."""
        import cupy as cp  # noqa: PLC0415
        stream = cp.cuda.get_current_stream()
        with self._lock:
            slot = self._ring_slot(cp)
            cp.cuda.runtime.memcpyAsync(slot.ctypes.data, device_array.data.ptr, nbytes,
                                        cp.cuda.runtime.memcpyDeviceToHost, stream.ptr)
            self._queue(cp, stream, self._next_seq(path), lambda: read(slot), device_array)

    def _ring_slot(self, cp):
        """The next pinned 24-byte slot for an asynchronous copy (made on first use; a slot is reused only after
        its copy was resolved: MAX_PENDING + 1 slots).  Call under the lock."""
        if self._ring is None:
            slots = self.MAX_PENDING + 1
            mem = cp.cuda.alloc_pinned_memory(24 * slots)
            self._ring = (mem, np.frombuffer(mem, dtype=np.uint64, count=3 * slots).reshape(slots, 3))
        slot = self._ring[1][self._ring_next]
        self._ring_next = (self._ring_next + 1) % self._ring[1].shape[0]
        return slot

    def _summarise(self, row_nnz: np.ndarray) -> _Observation:
        over = row_nnz > self.dense_row_threshold
        return _Observation(int(row_nnz.shape[0]), int(row_nnz[~over].sum(dtype=np.int64)), int(over.sum()),
                            int(row_nnz.sum(dtype=np.int64)))

    def _resolve(self, pending, *, block: bool) -> bool:
        """Turn one pending copy into the observation once it has arrived (``block``: wait for it)."""
        event, seq, read, _keep = pending
        if block:
            event.synchronize()
        elif not event.done:
            return False
        self._set(read(), seq)
        self._events.append(event)
        return True

    def observation(self, wait: bool = True) -> _Observation | None:
        """The latest call's density that has reached the host.  Copies from dense calls that have arrived are
        read without waiting (the host keeps queueing work while the GPU runs: a decision may use a call a
        few steps old, the density changes slowly); it waits for one only when nothing else is known.
        ``wait`` False (inside a CUDA-graph capture, where even querying an event is not allowed): only what
        is already resolved."""
        with self._lock:
            if wait:
                while self._pending and self._resolve(self._pending[0], block=False):
                    self._pending.popleft()
                if self._obs is None and self._pending:
                    self._resolve(self._pending.popleft(), block=True)
            return self._obs

    def backup_peak(self, m: int) -> float | None:
        """The largest share of backup rows among the last :data:`PEAK_WINDOW` observed calls that have
        reached the host, scaled to M rows (None before any).  A layer's count of backup rows swings from
        step to step in training (a few rows, then hundreds): a backup sized on the device takes its
        capacity from this peak rather than from the latest call alone."""
        with self._lock:
            return max(self._backup_shares) * m if self._backup_shares else None

    def choose(self, m: int, n: int, d: int, itemsize: int, *, training: bool, wait: bool = True) -> str:
        """"sparse" or "dense" for a call of M tokens, from the last observation scaled to M (``wait``: see
        :meth:`observation`)."""
        obs = self.observation(wait)
        if obs is None or obs.m == 0:
            return "sparse"
        key = (obs, m, n, d, itemsize, training)
        last = self._choice
        if last is not None and last[0] == key:        # the same observation and call shape: the same answer
            return last[1]
        choice = self._predict(obs, m, n, d, itemsize, training)
        self._choice = (key, choice)
        return choice

    @staticmethod
    def _predict(obs: _Observation, m: int, n: int, d: int, itemsize: int, training: bool) -> str:
        scale = m / obs.m
        sparse, dense = predict_times(m, n, d, itemsize, round(obs.compact_entries * scale),
                                      round(obs.backup_rows * scale), training=training,
                                      entries=None if obs.entries is None else round(obs.entries * scale))
        return "dense" if sparse > dense else "sparse"

    def __repr__(self) -> str:
        obs = self._obs
        what = "no observation" if obs is None else (
            f"last M={obs.m}: {obs.compact_entries / max(obs.m, 1):.1f} compact entries/token, "
            f"{obs.backup_rows} backup rows")
        return f"DensityTracker({what}, last path {self.last_path}, calls {self.calls})"
