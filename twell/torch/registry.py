"""Python objects behind the integers of the op schemas: density trackers and statistics slots (weakly, by
id), and the training forwards' saved states (by handle, bounded) with their lifetime rules."""

from __future__ import annotations

import contextlib
import itertools
import threading
import warnings
import weakref

from twell.dispatch import DensityTracker

from .stats import StatsSlot

#: Most training-forward states kept for their backward at once by default (oldest evicted first, with a
#: warning); :func:`set_max_saved_states` changes the bound.  In eager mode a state is also freed when its
#: autograd graph is; under ``torch.compile`` only the backward (or this bound) frees it.
MAX_SAVED_STATES = 512

_lock = threading.Lock()
_trackers: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_slots: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_ids = itertools.count(1)


# --------------------------------------------------------------------------- trackers and statistics slots


def tracker_id(tracker) -> int:
    """The id standing for ``tracker`` in an op call (-1: None), registered weakly on first use."""
    if tracker is None:
        return -1
    tid = getattr(tracker, "_twell_torch_id", None)
    if tid is None:
        if not isinstance(tracker, DensityTracker):
            raise TypeError(f"tracker must be a twell.DensityTracker or None, got {type(tracker).__name__}")
        with _lock:
            tid = next(_ids)
            _trackers[tid] = tracker
        tracker._twell_torch_id = tid
    return tid


def tracker_of(tid: int):
    """The tracker registered under ``tid`` (None for -1 or a tracker since freed)."""
    return None if tid < 0 else _trackers.get(tid)


def new_stats_slot():
    """A new :class:`StatsSlot` and its id (registered weakly: the caller keeps the slot alive)."""
    slot = StatsSlot()
    with _lock:
        sid = next(_ids)
        _slots[sid] = slot
    return slot, sid


def slot_of(sid: int):
    """The statistics slot registered under ``sid`` (None for -1 or a slot since freed)."""
    return None if sid < 0 else _slots.get(sid)


# --------------------------------------------------------------------------- saved states

# saved states of training forwards by handle, and the handles whose state a backward consumed (so that a
# second backward can say so); both bounded.  Handles made under retain_saved_state() are in _retained: their
# backward never consumes them.
_saved: dict = {}
_consumed: dict = {}
_retained: set = set()
_bound = [MAX_SAVED_STATES]
_local = threading.local()
_CONSUMED_KEPT = 4096
_handles = itertools.count(1)


def saved_state_count() -> int:
    """Training-forward states currently kept for a backward."""
    with _lock:
        return len(_saved)


def max_saved_states() -> int:
    """The current bound on kept training-forward states (:data:`MAX_SAVED_STATES` unless changed)."""
    return _bound[0]


def set_max_saved_states(limit: int) -> int:
    """Keep at most ``limit`` (>= 1) training-forward states for their backward (more alive at once: the oldest
    are evicted, with a warning, and their backward raises).  Returns the previous bound, to restore it."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"the saved-state limit must be an integer >= 1, got {limit!r}")
    with _lock:
        previous, _bound[0] = _bound[0], limit
    return previous


@contextlib.contextmanager
def retain_saved_state():
    """Training forwards run inside keep their saved state through any number of backward passes (until
    their graph is freed, or the :func:`set_max_saved_states` bound evicts them), as autograd's
    ``retain_graph=True`` expects; ``torch.autograd.gradcheck`` needs it.  Outside, a backward frees the state."""
    previous = getattr(_local, "retain", False)
    _local.retain = True
    try:
        yield
    finally:
        _local.retain = previous


def register_state(saved) -> int:
    """Keep a forward's saved state; returns its handle (evicts the oldest states beyond the bound)."""
    retain = getattr(_local, "retain", False)
    with _lock:
        h = next(_handles)
        _saved[h] = saved
        if retain:
            _retained.add(h)
        evicted = 0
        limit = _bound[0]
        while len(_saved) > limit:
            old = next(iter(_saved))
            del _saved[old]
            _retained.discard(old)
            evicted += 1
    if evicted:
        warnings.warn(f"twell.torch: evicted {evicted} saved training state(s) whose backward has not run "
                      f"(more than {limit} alive, the bound of twell.torch.set_max_saved_states); their backward "
                      "will raise", RuntimeWarning, stacklevel=3)
    return h


def release_state(h: int):
    """Forget a handle's state (its graph is gone)."""
    with _lock:
        _saved.pop(h, None)
        _consumed.pop(h, None)
        _retained.discard(h)


class Release:
    """Frees a handle's saved state when its autograd graph goes (held by the eager autograd context)."""

    __slots__ = ("handle",)

    def __init__(self, handle: int):
        self.handle = handle

    def __del__(self):
        try:
            release_state(self.handle)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


_CONSUMED_MESSAGE = (
    "twell.torch: the saved state of this gated_ffn forward was already consumed by a backward. twell keeps one "
    "sparse copy of the activations for the backward and frees it there, so backpropagating twice through the "
    "same graph (retain_graph=True) frees it at the first: run the forward again before the second backward, add "
    "the losses and call backward once, or run the forward inside `with twell.torch.retain_saved_state():` (keeps "
    "the state until the graph is freed)")


def take_state(h: int):
    """(saved state, retained) of a handle, or the error saying why there is none."""
    with _lock:
        saved = _saved.get(h)
        consumed = h in _consumed
        retained = h in _retained
        limit = _bound[0]
    if consumed:
        raise RuntimeError(_CONSUMED_MESSAGE)
    if saved is None:
        raise RuntimeError(
            f"twell.torch: no saved state for this backward (handle {h}): it was evicted because more than "
            f"{limit} forward states were alive at once (raise the bound with twell.torch.set_max_saved_states; "
            f"default MAX_SAVED_STATES = {MAX_SAVED_STATES}), or its graph was already freed")
    return saved, retained


def mark_consumed(h: int):
    """Record that a backward consumed the handle's state (a second backward then says so)."""
    with _lock:
        if _saved.pop(h, None) is not None:
            _consumed[h] = None
            while len(_consumed) > _CONSUMED_KEPT:
                del _consumed[next(iter(_consumed))]
