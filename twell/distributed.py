"""Neuron-sharded tensor parallelism of the gated FFN over NCCL, for CuPy pipelines.

All three weights are neuron-major ``(n, d)``, so sharding d_ff over ranks is row slicing: rank r holds
rows ``shard(n, r, world)`` of ``w_gate``, ``w_up`` and ``w_down`` and computes the partial output
``y_r = gated_ffn(x, w_gate[r], w_up[r], w_down[r])``; the full ``y`` is the sum of the partials (one
all-reduce).  In training the backward's ``dx`` is summed the same way and each rank keeps the weight
gradients of its own rows.  Routing (``dense_row_threshold``, backup rows) then acts per shard, on a row's
entries among the shard's neurons.

The communicator is CuPy's NCCL one (:class:`cupy.cuda.nccl.NcclCommunicator`), e.g. one process per GPU::

    from cupy.cuda import nccl
    uid = nccl.get_unique_id()                   # on rank 0, sent to the others (any channel)
    comm = nccl.NcclCommunicator(world, uid, rank)

bfloat16 is reduced with NCCL's own bf16 type (``ncclBfloat16``, which CuPy's dtype table lacks), so no
fp32 copy is made.  Everything runs on the current CuPy stream.  See ``docs/distributed.md`` (and
:mod:`twell.torch.distributed` for ``torch.distributed``).
"""

from __future__ import annotations

import numpy as np

from . import _backend as B
from .ops import gated_ffn, gated_ffn_backward, gated_ffn_forward
from .results import FFNStats

__all__ = ["shard", "shard_weights", "all_reduce_sum", "tensor_parallel_gated_ffn",
           "tensor_parallel_gated_ffn_forward", "tensor_parallel_gated_ffn_backward", "gather_stats"]

#: ncclDataType_t of each dtype (ncclBfloat16 = 9 since NCCL 2.10).
NCCL_DTYPES = {"float16": 6, "float32": 7, "float64": 8, "bfloat16": 9, "int32": 2, "int64": 4}
_NCCL_SUM = 0


def shard(n: int, rank: int, world: int) -> slice:
    """Rows of d_ff that ``rank`` of ``world`` holds: contiguous, sizes differing by at most one."""
    n, rank, world = (B.check_int(v, name, minimum=lo) for v, name, lo in ((n, "n", 1), (rank, "rank", 0),
                                                                          (world, "world", 1)))
    if rank >= world:
        raise ValueError(f"rank must be < world = {world}, got {rank}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def shard_weights(w_gate, w_up, w_down, rank: int, world: int):
    """This rank's contiguous row shards of the three neuron-major weights (copies: C-contiguous)."""
    s = shard(w_gate.shape[0], rank, world)
    xp = B.array_module(w_gate, w_up, w_down, names=["w_gate", "w_up", "w_down"])
    return tuple(xp.ascontiguousarray(w[s]) for w in (w_gate, w_up, w_down))


def all_reduce_sum(a, comm):
    """Sum ``a`` over every rank of ``comm`` in place (NCCL, on the current CuPy stream); returns ``a``."""
    cp = B.cupy_or_none()
    if cp is None or type(a) is not cp.ndarray:
        raise TypeError(f"all_reduce_sum takes a CuPy array, got {type(a).__name__}")
    if not a.flags.c_contiguous:
        raise ValueError("all_reduce_sum takes a C-contiguous array")
    dt = NCCL_DTYPES.get(np.dtype(a.dtype).name)
    if dt is None:
        raise TypeError(f"all_reduce_sum takes {sorted(NCCL_DTYPES)}, got {a.dtype}")
    comm.allReduce(a.data.ptr, a.data.ptr, a.size, dt, _NCCL_SUM, cp.cuda.get_current_stream().ptr)
    return a


def tensor_parallel_gated_ffn(x, w_gate, w_up, w_down, *, comm, out=None, **options):
    """``y = Σ_ranks gated_ffn(x, this rank's weight rows)``: the full FFN output on every rank.

    ``x`` (M, d) is the same on every rank; ``w_gate``, ``w_up``, ``w_down`` are this rank's row shards
    (n_r, d).  ``options`` as :func:`twell.gated_ffn` (``return_stats`` excluded: use
    :func:`tensor_parallel_gated_ffn_forward` or call the op per shard).
    """
    if options.get("return_stats"):
        raise ValueError("tensor_parallel_gated_ffn returns y only; gather statistics with gather_stats")
    y = gated_ffn(x, w_gate, w_up, w_down, out=out, **options)
    return all_reduce_sum(y, comm)


def tensor_parallel_gated_ffn_forward(x, w_gate, w_up, w_down, *, comm, **options):
    """Training forward of the sharded FFN: ``(y, saved, stats)`` with ``y`` summed over ranks, ``saved``
    and ``stats`` this rank's (its neurons)."""
    y, saved, stats = gated_ffn_forward(x, w_gate, w_up, w_down, **options)
    return all_reduce_sum(y, comm), saved, stats


def tensor_parallel_gated_ffn_backward(saved, dy, *, comm):
    """Backward of the sharded FFN: ``dx`` summed over ranks; ``dw_gate``, ``dw_up``, ``dw_down`` of this
    rank's rows (no communication)."""
    dx, dw_gate, dw_up, dw_down = gated_ffn_backward(saved, dy)
    return all_reduce_sum(dx, comm), dw_gate, dw_up, dw_down


def gather_stats(stats: FFNStats, comm, *, sharded_neurons: bool) -> FFNStats:
    """Statistics of all ranks: nnz (and so l0) and l1 summed; per-neuron counts concatenated in rank order
    (``sharded_neurons``: tensor parallelism, each rank owns other neurons; needs equal shard sizes) or
    summed (data parallelism: each rank saw other tokens of the same neurons, and then ``n_rows`` is the
    global batch).  One all-reduce (and an all-gather of the counts) on the current stream."""
    cp = B.cupy_or_none()
    world = comm.size()
    scalars = cp.zeros(2, dtype=cp.float64)
    scalars[0] = cp.asarray(stats.nnz, dtype=cp.float64)
    scalars[1] = 0.0 if stats.l1 is None else cp.asarray(stats.l1, dtype=cp.float64) * stats.n_rows
    all_reduce_sum(scalars, comm)
    counts = stats.neuron_counts
    rows = stats.n_rows
    if counts is not None:
        counts = cp.ascontiguousarray(counts, dtype=cp.int32)
        if sharded_neurons:
            gathered = cp.empty(world * counts.size, dtype=cp.int32)
            comm.allGather(counts.data.ptr, gathered.data.ptr, counts.size, NCCL_DTYPES["int32"],
                           cp.cuda.get_current_stream().ptr)
            counts = gathered
        else:
            all_reduce_sum(counts, comm)
    if not sharded_neurons:
        rows = stats.n_rows * world
    n_cols = stats.n_cols * world if sharded_neurons else stats.n_cols
    nnz = scalars[0]
    return FFNStats(n_rows=rows, n_cols=n_cols, nnz=nnz.astype(cp.int64), l0=nnz / max(rows, 1),
                    l1=None if stats.l1 is None else scalars[1] / max(rows, 1), neuron_counts=counts,
                    n_backup_rows=stats.n_backup_rows, n_overflow_rows=stats.n_overflow_rows,
                    gate_kernel=stats.gate_kernel, path=stats.path)
