"""The density tracker's path choice (CPU: the cost model and the host-side bookkeeping)."""

from __future__ import annotations

import numpy as np
import pytest

import twell
from twell import dispatch


@pytest.mark.parametrize("mean, want", [(8, "sparse"), (29, "sparse"), (128, "dense"), (512, "dense"),
                                        (1500, "dense")])
def test_large_batch_choice_follows_the_measured_break_even(mean, want):
    m, n, d = 16384, 5632, 2048
    threshold = 128
    over = mean > threshold
    compact = 0 if over else m * mean
    backup = m if over else 0
    for training in (False, True):
        s, dn = dispatch.predict_times(m, n, d, 2, compact, backup, training=training)
        assert ("dense" if s > dn else "sparse") == want


def test_break_even_is_near_the_measured_one():
    """Inference and training break even at 60-90 active neurons per token of 5,632 (M = 16,384)."""
    for training in (False, True):
        k = next(k for k in range(1, 400) if np.subtract(*dispatch.predict_times(
            16384, 5632, 2048, 2, 16384 * k, 0, training=training)) > 0)
        assert 60 <= k <= 90, (training, k)


@pytest.mark.parametrize("mean, backup, compact_per_token, want", [
    (29, 512, 33.9, "sparse"),          # token skew, mean 29 (38.9 realised): 0.73 of dense measured
    (64, 2641, 48.1, "dense"),          # token skew, mean 64 (76.9 realised): 1.00 of dense measured
])
def test_inference_backup_rows_cost_what_the_sweep_measured(mean, backup, compact_per_token, want):
    """Many backup rows: at the sweep's token-skew mean of 64 (16 % of the rows over the threshold) the
    sparse path measured as slow as dense on the device (and slower per eager call), so the dense floor
    takes the dense path; at mean 29 the sparse path stays.  Training keeps the sparse path in both."""
    m = 16384
    s, dn = dispatch.predict_times(m, 5632, 2048, 2, round(compact_per_token * m), backup, training=False)
    assert ("dense" if s > dn else "sparse") == want
    s, dn = dispatch.predict_times(m, 5632, 2048, 2, round(compact_per_token * m), backup, training=True)
    assert s < dn


@pytest.mark.parametrize("m, want", [(1, "sparse"), (8, "sparse"), (64, "dense"), (512, "dense")])
def test_small_batches_use_the_measured_small_batch_times(m, want):
    s, dn = dispatch.predict_times(m, 5632, 2048, 2, m * 29, 0, training=False, entries=m * 29)
    assert ("dense" if s > dn else "sparse") == want


def test_tracker_without_observation_is_sparse_and_validates_paths():
    tr = twell.DensityTracker()
    assert tr.choose(16384, 5632, 2048, 2, training=False) == "sparse"
    assert dispatch.check_path("dense") == "dense"
    with pytest.raises(ValueError, match="path must be one of"):
        dispatch.check_path("fast")


def test_tracker_follows_observations():
    tr = twell.DensityTracker()
    tr.observe_sparse(16384, 16384 * 20, 0)
    assert tr.choose(16384, 5632, 2048, 2, training=True) == "sparse"
    tr.observe_sparse(16384, 100, 16000)
    assert tr.choose(16384, 5632, 2048, 2, training=True) == "dense"
    assert tr.last_path == "sparse" and tr.calls == {"sparse": 2, "dense": 0}
    assert "backup rows" in repr(tr)


def test_small_batch_observations_are_sampled():
    tr = twell.DensityTracker()
    assert tr.wants_small_batch_observation()              # nothing known yet: every call reports
    tr.observe_sparse(4, 100, 0)
    wants = [tr.wants_small_batch_observation() for _ in range(48)]
    assert sum(wants) == 3                                  # then every SMALL_BATCH_INTERVAL-th call


def test_dense_observations_are_sampled():
    """Dense-path calls report every DENSE_INTERVAL-th time once something is known; the others are still
    counted."""
    tr = twell.DensityTracker()
    assert tr.dense_call_observes()                         # nothing known yet: every call reports
    tr.observe_sparse(16384, 600 * 16384, 16000)
    wants = [tr.dense_call_observes() for _ in range(4 * tr.DENSE_INTERVAL)]
    assert sum(wants) == 4 and wants[tr.DENSE_INTERVAL - 1]
    assert tr.calls == {"sparse": 1, "dense": 4 * tr.DENSE_INTERVAL - 4} and tr.last_path == "dense"


class _Event:
    """A stand-in CUDA event that records whether it was queried or waited for; ``arrived``: whether its
    copy has reached the host (a query says so; waiting makes it so)."""

    def __init__(self, arrived=True):
        self.touched = False
        self.waited = False
        self.arrived = arrived

    @property
    def done(self):
        self.touched = True
        return self.arrived

    def synchronize(self):
        self.touched = self.waited = self.arrived = True


def _pending(tr, event, per_row, m=16384):
    """A dense call's copy of its row counts in flight, as ``observe_rows`` queues it."""
    buf = np.full(m, per_row, np.int32)
    return (event, tr._next_seq("dense"), lambda: tr._summarise(buf), None)


def test_choose_without_waiting_touches_no_event():
    """Inside a CUDA-graph capture (wait=False) the tracker must not query or wait for a pending copy (a
    query invalidates a global-mode capture): it decides from the last resolved observation."""
    tr = twell.DensityTracker()
    tr.observe_sparse(16384, 16384 * 20, 0)
    event = _Event()
    tr._pending.append(_pending(tr, event, 1000))                                # a dense call's copy in flight
    assert tr.choose(16384, 5632, 2048, 2, training=False, wait=False) == "sparse"
    assert not event.touched
    assert tr.choose(16384, 5632, 2048, 2, training=False) == "dense"        # outside a capture: resolved
    assert event.touched


def test_choose_does_not_wait_for_copies_still_in_flight():
    """Outside a capture the tracker reads the copies that have arrived and never waits for one while it
    knows a density (the host keeps queueing work); the newest arrived copy decides."""
    tr = twell.DensityTracker()
    tr.observe_sparse(16384, 16384 * 20, 0)
    arrived, in_flight = _Event(), _Event(arrived=False)
    tr._pending.extend([_pending(tr, arrived, 1000), _pending(tr, in_flight, 5)])
    assert tr.choose(16384, 5632, 2048, 2, training=False) == "dense"        # from the arrived copy
    assert in_flight.touched and not in_flight.waited
    assert len(tr._pending) == 1
    in_flight.arrived = True
    assert tr.choose(16384, 5632, 2048, 2, training=False) == "sparse"
    assert not tr._pending


def test_choose_waits_only_when_nothing_is_known():
    tr = twell.DensityTracker()
    event = _Event(arrived=False)
    tr._pending.append(_pending(tr, event, 1000))
    assert tr.choose(16384, 5632, 2048, 2, training=False) == "dense"
    assert event.waited


def test_a_late_copy_never_overrides_a_newer_call():
    """A dense call's copy that arrives after a later sparse call was observed is ignored."""
    tr = twell.DensityTracker()
    event = _Event(arrived=False)
    tr.observe_sparse(16384, 16384 * 20, 0)
    tr._pending.append(_pending(tr, event, 1000))
    tr.observe_sparse(16384, 16384 * 20, 0)                  # newer than the copy in flight
    event.arrived = True
    assert tr.choose(16384, 5632, 2048, 2, training=False) == "sparse"
    assert not tr._pending


def test_backup_capacity_from_the_tracker():
    """The queued backup's rows: BACKUP_CAPACITY_FACTOR times the peak share of backup rows of the recent
    observations scaled to M, + 64, rounded up to 64, at most M; 0 when none of them had a backup row; None
    without an observation or when the exact kernel's shared memory would not fit."""
    from twell.gpu.inference import BACKUP_CAPACITY_FACTOR, backup_capacity
    from twell.kernels.ffn_forward import EXCESS_MAX_SMEM, excess_smem_bytes

    def expected(rows):                                          # the formula, for a peak of ``rows`` rows
        return 64 + 64 * -(-int(BACKUP_CAPACITY_FACTOR * rows) // 64)

    tr = twell.DensityTracker()
    assert backup_capacity(tr, 16384, 5632, 2048) is None
    tr.observe_sparse(16384, 29 * 16384, 0)
    assert backup_capacity(tr, 16384, 5632, 2048) == 0           # no backup row lately: no cuBLAS backup
    tr.observe_sparse(8192, 29 * 8192, 25)                       # 50 rows at M = 16,384
    assert backup_capacity(tr, 16384, 5632, 2048) == expected(50) > 64
    assert backup_capacity(tr, 8192, 5632, 2048) == expected(25)
    tr.observe_sparse(16384, 29 * 16384, 3)                      # fewer now: the peak of recent calls holds
    assert backup_capacity(tr, 16384, 5632, 2048) == expected(50)
    for _ in range(tr.PEAK_WINDOW - 1):                          # until it leaves the window
        tr.observe_sparse(16384, 29 * 16384, 3)
    assert backup_capacity(tr, 16384, 5632, 2048) == expected(3) == 128
    tr.observe_sparse(1000, 0, 1000)                            # every row: capped at M
    assert backup_capacity(tr, 700, 5632, 2048) == 700
    assert excess_smem_bytes(2048, 5632) == 4 * (2048 + 5632) + 3 * 5632
    n_big = EXCESS_MAX_SMEM // 7
    assert excess_smem_bytes(2048, n_big) > EXCESS_MAX_SMEM and backup_capacity(tr, 700, n_big, 2048) is None


def test_asynchronous_observations_with_a_host_stand_in_for_cupy(monkeypatch):
    """The tracker's copies of device summaries and sparse totals into its pinned ring, with a stand-in for
    CuPy whose "device" arrays are host arrays and whose copies happen at once: the observations read the
    right words, a later decision uses them, and slots are reused round the ring."""
    import ctypes
    import sys
    import types

    class _Event:
        done = True

        def __init__(self, **_):
            pass

        def record(self, stream=None):
            pass

        def synchronize(self):
            pass

    def memcpy(dst, src, nbytes, kind, stream):
        ctypes.memmove(dst, src, nbytes)

    runtime = types.SimpleNamespace(memcpyAsync=memcpy, memcpyDeviceToHost=2)
    cuda = types.SimpleNamespace(get_current_stream=lambda: types.SimpleNamespace(ptr=0),
                                 alloc_pinned_memory=lambda n: bytearray(n), runtime=runtime, Event=_Event)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=cuda))

    def dev(a):
        a = np.ascontiguousarray(a)
        return types.SimpleNamespace(data=types.SimpleNamespace(ptr=a.ctypes.data), keep=a)

    tr = twell.DensityTracker()
    for i in range(3 * (tr.MAX_PENDING + 1)):                       # round the ring of pinned slots
        tr.observe_sparse_totals(dev(np.array([7 + i, 2, 99, 1000 + i], np.int32)), 16384)
        obs = tr.observation()
        assert (obs.m, obs.backup_rows, obs.compact_entries) == (16384, 7 + i, 1000 + i)
    assert tr.last_path == "sparse" and tr.calls["sparse"] == 3 * (tr.MAX_PENDING + 1)
    tr.observe_summary(dev(np.array([500, 3, 900], np.uint64)), 4096, path="dense")
    obs = tr.observation()
    assert (obs.m, obs.compact_entries, obs.backup_rows, obs.entries) == (4096, 500, 3, 900)
    assert tr.last_path == "dense"
