"""twell's own implementations, through its public API only.

* ``twell``: ``twell.gated_ffn`` (TwELL kernels; GPU).
* ``twell_fused_gate``: ``twell.gated_ffn(..., gate_kernel="fused")`` (gate GEMM with the TwELL epilogue).
* ``reference``: ``twell.reference.gated_ffn`` on float32 host copies (CPU).
* ``twell_train``: ``twell.gated_ffn_forward`` + ``twell.gated_ffn_backward`` (hybrid training kernels;
  GPU).  Its forward reads the batch's counts back to the host once, so it has no graph time
  (:data:`TWELL_TRAIN_NO_GRAPH`, through :func:`refuse_capture`).
* ``reference_train``: the same two calls on float32 NumPy arrays (i.e. :mod:`twell.reference`).

Training steps report ``saved_bytes`` / ``saved_mib`` (``SavedForBackward.nbytes``) and ``stats``
(nnz, l0, l1, backup rows) through ``run.extra()``.
"""

from __future__ import annotations

import twell
from twell import reference

from .common import as_y, host_f32, host_scalar

__all__ = ["make_twell", "make_twell_fused_gate", "make_reference", "make_twell_train", "make_reference_train",
           "twell_train_step", "refuse_capture", "TWELL_TRAIN_NO_GRAPH"]

#: why twell_train has no CUDA-graph time.
TWELL_TRAIN_NO_GRAPH = ("not capturable: gated_ffn_forward reads the batch's non-zero counts back to the host "
                        "once per call (the hybrid format is sized from them)")


def make_twell(p):
    x, wg, wu, wd = p.arrays()
    return lambda: as_y(twell.gated_ffn(x, wg, wu, wd))


def make_twell_fused_gate(p):
    x, wg, wu, wd = p.arrays()
    return lambda: as_y(twell.gated_ffn(x, wg, wu, wd, gate_kernel="fused"))


def make_reference(p):
    x, wg, wu, wd = host_f32(p)
    return lambda: as_y(reference.gated_ffn(x, wg, wu, wd))


def twell_train_step(x, wg, wu, wd, dy, l1_weight):
    """``run() -> (y, dx, dw_gate, dw_up, dw_down)`` through ``twell.gated_ffn_forward`` +
    ``twell.gated_ffn_backward`` (GPU kernels, or the reference on NumPy); ``run.forward`` and
    ``run.extra`` (saved-state size and statistics of the last step)."""
    last: dict = {}

    def forward():
        return twell.gated_ffn_forward(x, wg, wu, wd, l1_weight=l1_weight)

    def run():
        y, saved, stats = forward()
        last["saved_bytes"], last["stats"] = saved.nbytes, stats
        return (y, *twell.gated_ffn_backward(saved, dy))

    def extra():
        st, nbytes = last.get("stats"), last.get("saved_bytes")
        if st is None:
            return {}
        return {"saved_bytes": int(nbytes), "saved_mib": nbytes / 2**20,
                "stats": {"nnz": int(host_scalar(st.nnz)), "l0": float(host_scalar(st.l0)),
                          "l1": None if st.l1 is None else float(host_scalar(st.l1)),
                          "n_backup_rows": int(st.n_backup_rows)}}
    run.forward = forward
    run.extra = extra
    return run


def make_twell_train(tp):
    return twell_train_step(*tp.arrays(), tp.dy, tp.l1_weight)


def make_reference_train(tp):
    return twell_train_step(*tp.host_f32(), tp.l1_weight)


def refuse_capture(reason: str):
    """A ``capture`` (see ``Impl``) that always fails with ``reason``: the impl gets no graph time."""
    def capture(run, stream):
        raise RuntimeError(reason)
    return capture
