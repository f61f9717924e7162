"""Statistics of a call as torch tensors (:class:`TorchFFNStats`) and the slot a module's call leaves them in."""

from __future__ import annotations

import numpy as np
import torch

from twell.results import FFNStats

from .interop import to_torch


class TorchFFNStats:
    """:class:`twell.FFNStats` of one call as torch tensors and host values.

    Tensor fields are converted when first read and never synchronise: ``nnz`` (int64), ``l0`` and ``l1``
    (float64, ``l1`` None for inference) are 0-d tensors and ``neuron_counts`` an int32 ``(n,)`` tensor on
    the call's device, ready when the call's stream reaches them (``float(stats.l0)`` waits for them).
    ``n_rows``, ``n_cols``, ``n_backup_rows``, ``n_overflow_rows``, ``gate_kernel`` and ``path`` are host
    values.  ``raw`` is the core's :class:`~twell.FFNStats`; :meth:`to_dict` copies everything to the host.
    """

    __slots__ = ("raw", "device", "_cache")

    def __init__(self, raw: FFNStats, device):
        self.raw = raw
        self.device = device
        self._cache = {}

    def _tensor(self, name):
        if name not in self._cache:
            v = getattr(self.raw, name)
            if v is None:
                t = None
            elif isinstance(v, (np.ndarray, np.generic, int, float)):
                t = torch.from_numpy(np.array(v))
            else:
                t = to_torch(v, self.device.index)
            self._cache[name] = t
        return self._cache[name]

    nnz = property(lambda self: self._tensor("nnz"), doc="Active hidden activations in the batch (0-d int64).")
    l0 = property(lambda self: self._tensor("l0"), doc="Mean active neurons per token (0-d float64).")
    l1 = property(lambda self: self._tensor("l1"), doc="(1/M) Σ|h| (training; 0-d float64), else None.")
    neuron_counts = property(lambda self: self._tensor("neuron_counts"),
                             doc="Tokens on which each neuron was active (int32 (n,)).")
    n_rows = property(lambda self: int(self.raw.n_rows))
    n_cols = property(lambda self: int(self.raw.n_cols))
    n_backup_rows = property(lambda self: int(self.raw.n_backup_rows))
    n_overflow_rows = property(lambda self: self.raw.n_overflow_rows)
    gate_kernel = property(lambda self: self.raw.gate_kernel)
    path = property(lambda self: self.raw.path)

    def to_dict(self) -> dict:
        """Every statistic as host Python values (synchronises on the GPU)."""
        return self.raw.to_dict()

    def __repr__(self) -> str:
        return (f"TorchFFNStats(n_rows={self.n_rows}, n_cols={self.n_cols}, path={self.path!r}, "
                f"n_backup_rows={self.n_backup_rows}, gate_kernel={self.gate_kernel!r})")


class StatsSlot:
    """Where a :class:`~twell.torch.SparseGatedFFN` call leaves its raw :class:`FFNStats` (written by the op)."""

    __slots__ = ("stats", "device", "__weakref__")

    def __init__(self):
        self.stats = None
        self.device = None

    def put(self, stats, device):
        self.stats = None if stats is None else TorchFFNStats(stats, device)
        self.device = device
