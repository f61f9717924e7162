"""``torch.distributed`` helpers for twell's PyTorch layers: statistics over a process group, and a
neuron-sharded (tensor-parallel) gated FFN.

Data parallelism needs nothing from twell: :class:`~twell.torch.SparseGatedFFN` is an ordinary module, so
DDP and FSDP wrap it like any other; :func:`gather_stats` sums its per-rank statistics.

Tensor parallelism over d_ff: all three weights are neuron-major ``(n, d)``, so rank r holds rows
:func:`twell.distributed.shard` of each and computes a partial output; the output is summed over the group
(all-reduce forward, identity backward) and the input's gradient too (identity forward, all-reduce
backward) — the Megatron-style pair of regions around the layer.  Weight gradients stay local.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from twell.distributed import shard

from .module import SparseGatedFFN
from .stats import TorchFFNStats

__all__ = ["gather_stats", "TensorParallelSparseGatedFFN", "reduce_from_group", "copy_to_group"]


def gather_stats(stats: TorchFFNStats, group=None, *, sharded_neurons: bool = False) -> dict:
    """Statistics of every rank of ``group``: ``l0`` and ``l1`` over the global batch (data parallel: each
    rank saw other tokens) or over all neurons of the same tokens (``sharded_neurons``: tensor parallel),
    per-neuron counts summed (data parallel) or concatenated in rank order (tensor parallel).  Returns a
    dict of tensors on the statistics' device (one all-reduce, plus an all-gather of the counts)."""
    world = dist.get_world_size(group)
    device = stats.neuron_counts.device if stats.neuron_counts is not None else torch.device("cuda")
    l1 = stats.l1
    sums = torch.stack([stats.nnz.to(device, torch.float64),
                        (l1 if l1 is not None else torch.zeros((), dtype=torch.float64)).to(device, torch.float64)
                        * stats.n_rows])
    dist.all_reduce(sums, group=group)
    rows = stats.n_rows if sharded_neurons else stats.n_rows * world
    counts = stats.neuron_counts
    if counts is not None:
        if sharded_neurons:
            parts = [torch.empty_like(counts) for _ in range(world)]
            dist.all_gather(parts, counts.contiguous(), group=group)
            counts = torch.cat(parts)
        else:
            counts = counts.clone()
            dist.all_reduce(counts, group=group)
    return {"n_rows": rows, "nnz": sums[0], "l0": sums[0] / max(rows, 1),
            "l1": None if l1 is None else sums[1] / max(rows, 1), "neuron_counts": counts}


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, dy):
        return dy, None


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dx):
        dx = dx.clone()
        dist.all_reduce(dx, group=ctx.group)
        return dx, None


def reduce_from_group(x: Tensor, group=None) -> Tensor:
    """Sum of ``x`` over the group (forward); its gradient passes through unchanged."""
    return _ReduceFromGroup.apply(x, group)


def copy_to_group(x: Tensor, group=None) -> Tensor:
    """``x`` unchanged (forward); its gradient is summed over the group."""
    return _CopyToGroup.apply(x, group)


class TensorParallelSparseGatedFFN(nn.Module):
    """A :class:`~twell.torch.SparseGatedFFN` whose d_ff is split over the ranks of ``group``.

    Each rank holds a :class:`~twell.torch.SparseGatedFFN` of its rows (``self.local``); the forward takes
    the full ``x`` (the same on every rank) and returns the full ``y`` on every rank.  Build it from the
    full module with :meth:`from_full` (each rank keeps its rows) or from scratch (``d``, ``n``, options as
    :class:`~twell.torch.SparseGatedFFN`).  ``local.last_stats`` are this rank's: :func:`gather_stats` with
    ``sharded_neurons=True`` combines them.
    """

    def __init__(self, d: int, n: int, *, group=None, **options):
        super().__init__()
        self.group = group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        rows = shard(n, rank, world)
        self.rows = (rows.start, rows.stop)
        self.local = SparseGatedFFN(d, rows.stop - rows.start, **options)

    @classmethod
    def from_full(cls, full: SparseGatedFFN, *, group=None) -> TensorParallelSparseGatedFFN:
        opts = dict(l1_weight=full.l1_weight, dense_row_threshold=full.dense_row_threshold, path=full.path,
                    gate_kernel=full.gate_kernel, collect_stats=full.collect_stats, torch_memory=full.torch_memory,
                    dtype=full.w_gate.dtype, device=full.w_gate.device)
        tp = cls(full.d, full.n, group=group, **opts)
        a, b = tp.rows
        with torch.no_grad():
            for name in ("w_gate", "w_up", "w_down"):
                getattr(tp.local, name).copy_(getattr(full, name)[a:b])
        return tp

    def forward(self, x: Tensor) -> Tensor:
        return reduce_from_group(self.local(copy_to_group(x, self.group)), self.group)
