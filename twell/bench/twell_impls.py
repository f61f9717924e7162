"""twell's own implementations, through its public API only.

* ``twell``: ``twell.gated_ffn`` as a layer calls it: a preallocated output and a
  :class:`twell.DensityTracker` that remembers the problem's density from the previous call (the
  warm-up calls teach it), so dense batches take the dense path (GPU).
* ``twell_stateless``: ``twell.gated_ffn`` without a tracker: every call takes the sparse path.
* ``twell_fused_gate``: ``twell.gated_ffn(..., gate_kernel="fused")`` (gate GEMM with the TwELL epilogue).
* ``reference``: ``twell.reference.gated_ffn`` on float32 host copies (CPU).
* ``twell_train``: ``twell.gated_ffn_forward`` + ``twell.gated_ffn_backward`` with a tracker (the hybrid
  training kernels, or the dense path for dense batches; GPU; once the tracker has observed the problem
  the forward sizes its state on the device and never waits for the host).  ``twell_train_stateless``:
  without one (the forward waits for its read-back).  The training forward is not capturable, so neither
  has a graph time (:data:`TWELL_TRAIN_NO_GRAPH`, through :func:`refuse_capture`).
* ``reference_train``: the same two calls on float32 NumPy arrays (i.e. :mod:`twell.reference`).

Training steps report ``saved_bytes`` / ``saved_mib`` (``SavedForBackward.nbytes``) and ``stats``
(nnz, l0, l1, backup rows) through ``run.extra()``.
"""

from __future__ import annotations

import twell
from twell import reference

from .common import as_y, host_f32, host_scalar

__all__ = ["make_twell", "make_twell_stateless", "make_twell_fused_gate", "make_reference", "make_twell_train",
           "make_twell_train_stateless", "make_reference_train", "twell_train_step", "refuse_capture",
           "TWELL_TRAIN_NO_GRAPH"]

#: why twell_train has no CUDA-graph time.
TWELL_TRAIN_NO_GRAPH = ("not capturable: gated_ffn_forward reads the batch's non-zero counts back to the host "
                        "once per call (the hybrid format is sized from them)")


def _inference_run(p, **options):
    import cupy as cp  # noqa: PLC0415
    x, wg, wu, wd = p.arrays()
    out = cp.empty(x.shape, dtype=x.dtype)            # preallocated: what a captured graph writes

    def run():
        return as_y(twell.gated_ffn(x, wg, wu, wd, out=out, **options))
    tracker = options.get("tracker")
    if tracker is not None:
        run.extra = lambda: {"paths": dict(tracker.calls), "last_path": tracker.last_path}
    return run


def make_twell(p):
    return _inference_run(p, tracker=twell.DensityTracker())


def make_twell_stateless(p):
    return _inference_run(p)


def make_twell_fused_gate(p):
    x, wg, wu, wd = p.arrays()
    return lambda: as_y(twell.gated_ffn(x, wg, wu, wd, gate_kernel="fused"))


def make_reference(p):
    x, wg, wu, wd = host_f32(p)
    return lambda: as_y(reference.gated_ffn(x, wg, wu, wd))


def twell_train_step(x, wg, wu, wd, dy, l1_weight, tracker=None):
    """``run() -> (y, dx, dw_gate, dw_up, dw_down)`` through ``twell.gated_ffn_forward`` +
    ``twell.gated_ffn_backward`` (GPU kernels, or the reference on NumPy); ``run.forward`` and
    ``run.extra`` (saved-state size and statistics of the last step)."""
    last: dict = {}

    def forward():
        return twell.gated_ffn_forward(x, wg, wu, wd, l1_weight=l1_weight, tracker=tracker)

    def run():
        y, saved, stats = forward()
        grads = twell.gated_ffn_backward(saved, dy)
        last["saved"], last["stats"] = saved, stats     # read after the step: a state sized on the device is
        return (y, *grads)                              # finished by the backward, not by nbytes in the step

    def extra():
        st, saved = last.get("stats"), last.get("saved")
        if st is None:
            return {}
        nbytes = saved.nbytes
        return {"saved_bytes": int(nbytes), "saved_mib": nbytes / 2**20,
                "stats": {"nnz": int(host_scalar(st.nnz)), "l0": float(host_scalar(st.l0)),
                          "l1": None if st.l1 is None else float(host_scalar(st.l1)),
                          "n_backup_rows": int(st.n_backup_rows), "path": st.path}}
    run.forward = forward
    run.extra = extra
    return run


def make_twell_train(tp):
    return twell_train_step(*tp.arrays(), tp.dy, tp.l1_weight, tracker=twell.DensityTracker())


def make_twell_train_stateless(tp):
    return twell_train_step(*tp.arrays(), tp.dy, tp.l1_weight)


def make_reference_train(tp):
    return twell_train_step(*tp.host_f32(), tp.l1_weight)


def refuse_capture(reason: str):
    """A ``capture`` (see ``Impl``) that always fails with ``reason``: the impl gets no graph time."""
    def capture(run, stream):
        raise RuntimeError(reason)
    return capture
