"""Result containers shared by the reference and the GPU path: statistics and saved state."""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

import numpy as np

from .format import Hybrid

__all__ = ["FFNStats", "SavedForBackward"]


def _host_scalar(v):
    if v is None:
        return None
    if hasattr(v, "get") and not isinstance(v, np.ndarray):
        v = v.get()
    v = np.asarray(v)
    return v.item()


@dataclass
class FFNStats:
    """Sparsity statistics of one FFN call.

    Scalars are 0-d arrays of the input's array module (no host synchronisation
    on the GPU path until you read them: ``float(stats.l0)``); ``to_dict`` copies
    everything to the host.

    Attributes
    ----------
    n_rows : int
        Tokens ``M``.
    n_cols : int
        Hidden width ``n`` (d_ff).
    nnz : 0-d int64 array
        Active (non-zero) hidden activations in the whole batch.
    l0 : 0-d float64 array
        Mean active neurons per token, ``nnz / M``.
    l1 : 0-d float64 array or None
        ``(1/M) * sum |h|`` (training forward only; None for inference).
    neuron_counts : int32 array (n,) or None
        Tokens on which each neuron was active (dead neurons have 0).
    n_backup_rows : int or 0-d int32 array
        Rows computed densely: the dense backup rows of the sparse path, every
        row on the dense path.  A host int, except after a GPU training forward
        that sized its saved state on the device (a density tracker that has
        observed the layer): a 0-d device array there (``int()`` waits for it).
    n_overflow_rows : int or None
        Of those, rows routed because a TwELL tile overflowed (inference only).
    gate_kernel : str or None
        How the gate GEMM ran on the GPU: "wgmma" / "mma" (fused GEMM → TwELL
        epilogue), "cublas" (cuBLAS, then the pack kernel on the sparse path);
        None on the host reference.
    path : str
        Which path computed the call: "sparse" (TwELL / hybrid, with exact
        dense backup rows), "small_batch" (inference batches of at most 512
        rows: every row sparse and exact from the dense gate, no routing),
        "dense" (every row through cuBLAS; chosen with ``path="dense"`` or by a
        :class:`~twell.DensityTracker` for a dense batch), or "reference"
        (NumPy inputs).
    """

    n_rows: int
    n_cols: int
    nnz: object
    l0: object
    l1: object = None
    neuron_counts: object = None
    n_backup_rows: int = 0
    n_overflow_rows: int | None = None
    gate_kernel: str | None = None
    path: str = "sparse"

    def to_dict(self) -> dict:
        """All statistics as host Python values (neuron_counts as a list)."""
        counts = self.neuron_counts
        if counts is not None and hasattr(counts, "get") and not isinstance(counts, np.ndarray):
            counts = counts.get()
        return {
            "n_rows": int(self.n_rows),
            "n_cols": int(self.n_cols),
            "nnz": _host_scalar(self.nnz),
            "l0": _host_scalar(self.l0),
            "l1": _host_scalar(self.l1),
            "neuron_counts": None if counts is None else np.asarray(counts).tolist(),
            "n_backup_rows": int(self.n_backup_rows),
            "n_overflow_rows": None if self.n_overflow_rows is None else int(self.n_overflow_rows),
            "gate_kernel": self.gate_kernel,
            "path": self.path,
        }


_call_ids = itertools.count(1)
#: Attributes of a SavedForBackward that a forward sized on the device fills in when first read.
_SIZED_LATER = frozenset({"gate", "up_values", "up_backup", "workspace"})
_sizing_lock = threading.Lock()


@dataclass
class SavedForBackward:
    """What :func:`twell.gated_ffn_backward` needs from :func:`twell.gated_ffn_forward`.

    Holds references to the inputs (not copies) plus state proportional to the
    number of non-zeros.  It can be consumed once; a second backward raises.

    Attributes
    ----------
    x, w_gate, w_up, w_down : arrays
        References to the forward inputs (x (M, d), weights (n, d)).
    gate : Hybrid
        Pattern of ``g = relu(x w_gateᵀ)`` with the gate values ``g`` as values;
        backup rows hold dense ``g`` rows.
    up_values : array (nnz,)
        ``u = x w_upᵀ`` at each compact entry of ``gate``.
    up_backup : array (R, n)
        Dense ``u`` rows of the backup rows.
    l1_weight : float
        λ of the L1 penalty; the backward adds ``(λ / M) * sign(h)`` to ``dh``.
    workspace : tuple of int or None
        GPU path: upper bounds (work items, fp32 partial slots) of the
        neuron-major weight-gradient kernel, read back in the forward's single
        host synchronisation so the backward needs none.
    call_id : int
        Unique id of the forward call that made it.
    consumed : bool
        Set by the backward.
    pending : callable or None
        GPU forward that sized its state on the device (no host synchronisation
        in the forward): ``pending(saved)`` returns ``(gate, up_values,
        up_backup, workspace)`` once the forward's counts have reached the host
        (reading ``saved.x`` and the weights then).  It runs at the first
        read of any of those four attributes (the backward's, normally, by
        when the counts have long arrived); None afterwards.
    """

    x: object
    w_gate: object
    w_up: object
    w_down: object
    gate: Hybrid
    up_values: object
    up_backup: object
    l1_weight: float
    workspace: tuple | None = None
    call_id: int = field(default_factory=lambda: next(_call_ids))
    consumed: bool = False
    pending: object = field(default=None, repr=False, compare=False)

    def __getattribute__(self, name):
        if name in _SIZED_LATER and object.__getattribute__(self, "pending") is not None:
            with _sizing_lock:
                finish = object.__getattribute__(self, "pending")
                if finish is not None:
                    for key, value in zip(("gate", "up_values", "up_backup", "workspace"), finish(self)):
                        object.__setattr__(self, key, value)
                    object.__setattr__(self, "pending", None)
        return object.__getattribute__(self, name)

    @property
    def n_rows(self) -> int:
        return int(self.x.shape[0])

    @property
    def nbytes(self) -> int:
        """Device/host bytes held by the saved state itself (inputs excluded): an array that is a view counts
        as the whole buffer it keeps alive (a forward sized on the device keeps buffers of the largest size
        its batch could need), each buffer once."""
        g = self.gate
        arrays = [g.row_ptr, g.col_indices, g.values, g.backup_slot, g.backup_rows, g.backup_values,
                  self.up_values, self.up_backup]
        if g.transposed is not None:
            arrays += [g.transposed.col_ptr, g.transposed.row_indices, g.transposed.positions]
        held = {}
        for a in arrays:
            while getattr(a, "base", None) is not None and hasattr(a.base, "nbytes"):
                a = a.base
            held[id(a)] = int(a.nbytes)
        return int(sum(held.values()))
