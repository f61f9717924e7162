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


class _Event:
    """A stand-in CUDA event that records whether it was queried or waited for."""

    def __init__(self):
        self.touched = False

    @property
    def done(self):
        self.touched = True
        return True

    def synchronize(self):
        self.touched = True


def test_choose_without_waiting_touches_no_event():
    """Inside a CUDA-graph capture (wait=False) the tracker must not query or wait for a pending copy (a
    query invalidates a global-mode capture): it decides from the last resolved observation."""
    tr = twell.DensityTracker()
    tr.observe_sparse(16384, 16384 * 20, 0)
    event = _Event()
    tr._pending = (event, None, np.full(16384, 1000, np.int32), None)      # a dense call's copy in flight
    assert tr.choose(16384, 5632, 2048, 2, training=False, wait=False) == "sparse"
    assert not event.touched
    assert tr.choose(16384, 5632, 2048, 2, training=False) == "dense"        # outside a capture: resolved
    assert event.touched
