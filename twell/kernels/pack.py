"""Launchers of the ``pack`` kernel family (cuda_src/pack.cu): dense <-> TwELL / Hybrid on the GPU.

Same op names as :mod:`twell.reference`.  Packing is split into an asynchronous
part (kernels only) and a sizing step that reads the number of backup rows /
compact entries back to the host; :func:`pack_twell` and :func:`pack_hybrid`
do both, the FFN ops overlap the read-back with other kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..format import TILE_WIDTHS, Hybrid, NeuronMajorPattern, TwELL, twell_layout
from ..runtime.launch import NULL, HostReadback, aligned, cbool, ctype_of, device_matrix, grid_1d, i32, threshold_i32
from ..runtime.loader import KernelFamily, get_kernel
from .common import DEVICE_DTYPES, cupy, raise_smem_limit
ROUTE_COMPACT, ROUTE_THRESHOLD, ROUTE_OVERFLOW = 0, 1, 2
ROUTE_THREADS = 1024
ROUTE_BLOCK_ROWS = ROUTE_THREADS * 1  # cuda_src/pack.cu ROUTE_ROUNDS

_names = []
for _d in DEVICE_DTYPES:
    _t = ctype_of(_d, "dtype")
    for _w in TILE_WIDTHS:
        for _r in (True, False):
            for _v in (True, False):
                _names.append(f"pack_twell<{_t}, {_w}, {cbool(_r)}, {cbool(_v)}>")
    for _r in (True, False):
        for _v in (True, False):
            _names.append(f"count_row_entries<{_t}, {cbool(_r)}, {cbool(_v)}>")
            _names.append(f"fill_hybrid_rows<{_t}, {cbool(_r)}, {cbool(_v)}>")
    _names.append(f"unpack_twell<{_t}>")
    _names.append(f"unpack_twell_rows<{_t}>")
    _names.append(f"gather_backup_rows<{_t}>")
    _names.append(f"scatter_rows<{_t}>")
    _names.append(f"gather_rows_counted<{_t}>")
    _names.append(f"unpack_hybrid_rows<{_t}>")
    _names.append(f"relu_keep_nan<{_t}>")
    _names.append(f"twell_rows_to_csr<{_t}>")
_names += ["route_rows_count", "route_rows_place", "route_twell_counts", "transpose_count", "transpose_scan",
           "transpose_place", "hybrid_plan_count", "hybrid_plan_place", "column_offsets", "validate_routing",
           "validate_twell_tiles", "validate_hybrid_rows"]

FAMILY = KernelFamily("pack", tuple(_names),
                      hot_kernels=(r"pack_twell<", r"count_row_entries<", r"fill_hybrid_rows<"))

WARPS_PER_BLOCK = 8


@dataclass
class TwellPending:
    """TwELL arrays produced on the device, before routing and backup sizing (no host sync yet)."""

    counts: object
    indices: object
    values: object
    row_nnz: object
    row_route: object  # int32 (M,): 0 compact, 1 over the row threshold, 2 a tile overflowed
    totals: object  # int32 (4,) on the device: backup rows, overflowed rows, 0 (a work counter), compact entries
    n_cols: int
    tile_width: int
    dense_row_threshold: int
    neuron_counts: object = None


def pack_twell_async(dense, tile_width: int, compression: int, dense_row_threshold: int, *, relu: bool = False,
                     neuron_counts: bool = False) -> TwellPending:
    """Launch the TwELL pack of ``dense`` (M, n); no host sync, no ordered routing yet.

    ``relu=True`` keeps entries where ``not (v <= 0)`` (the gate epilogue: the
    values are relu(z)), otherwise non-zeros.  ``totals`` counts the routed
    rows; :func:`route_rows` gives their ordered list when it is needed.
    """
    cp = cupy()
    m, n = dense.shape
    n_tiles, slots = twell_layout(n, tile_width, compression)
    e = tile_width // 32
    ct = ctype_of(dense.dtype, "dense")
    vec = n % e == 0 and aligned(dense, e * dense.dtype.itemsize)
    counts = cp.empty((m, n_tiles), dtype=cp.int32)
    indices = cp.empty((m, n_tiles, slots), dtype=cp.uint8)
    values = cp.empty((m, n_tiles, slots), dtype=dense.dtype)
    row_nnz = cp.empty(m, dtype=cp.int32)
    row_route = cp.empty(m, dtype=cp.int32)
    totals = cp.zeros(4, dtype=cp.int32)
    ncounts = cp.zeros(n, dtype=cp.int32) if neuron_counts else None
    if m:
        k = get_kernel(FAMILY, f"pack_twell<{ct}, {tile_width}, {cbool(relu)}, {cbool(vec)}>")
        k((grid_1d(m, WARPS_PER_BLOCK, cap=2**31 - 1),), (32 * WARPS_PER_BLOCK,),
          (dense, i32(m), i32(n), i32(n_tiles), i32(slots), threshold_i32(dense_row_threshold), counts, indices, values,
           row_nnz, row_route, NULL if ncounts is None else ncounts, totals))
    return TwellPending(counts, indices, values, row_nnz, row_route, totals, n, tile_width, dense_row_threshold,
                        ncounts)


def route_rows(row_route):
    """Ordered routing of rows with ``row_route != 0``: backup_slot (M,), backup_rows buffer (capacity M)
    and device totals (backup rows, overflowed rows, 0).  Deterministic (row order; two kernels: per-block
    counts, then placement)."""
    cp = cupy()
    m = row_route.shape[0]
    backup_slot = cp.empty(m, dtype=cp.int32)
    backup_rows_buf = cp.empty(max(m, 1), dtype=cp.int32)
    totals = cp.empty(3, dtype=cp.int32)
    blocks = max(1, -(-m // ROUTE_BLOCK_ROWS))
    block_counts = cp.empty(2 * blocks, dtype=cp.int32)
    get_kernel(FAMILY, "route_rows_count")((blocks,), (ROUTE_THREADS,), (row_route, i32(m), block_counts))
    get_kernel(FAMILY, "route_rows_place")((blocks,), (ROUTE_THREADS,),
                                           (row_route, i32(m), block_counts, backup_slot, backup_rows_buf, totals))
    return backup_slot, backup_rows_buf, totals


def relu_keep_nan(a):
    """relu that keeps NaN (``where(not a <= 0, a, 0)``), like the dense relu and the pack kernels."""
    cp = cupy()
    a = cp.ascontiguousarray(a)
    out = cp.empty_like(a)
    if a.size:
        k = get_kernel(FAMILY, f"relu_keep_nan<{ctype_of(a.dtype, 'a')}>")
        k((grid_1d(a.size, 256),), (256,), (a, np.int64(a.size), out))
    return out


def finish_twell(p: TwellPending, dense, *, relu: bool = False) -> TwELL:
    """Route the rows (ordered) and build the :class:`TwELL` (one host sync to size the backup)."""
    backup_slot, backup_rows_buf, totals = route_rows(p.row_route)
    n_backup, _ = HostReadback(totals[:2]).wait()
    backup_rows = backup_rows_buf[:n_backup]
    backup_values = dense[backup_rows] if n_backup else dense[:0]
    if relu:
        backup_values = relu_keep_nan(backup_values)
    return TwELL(p.counts, p.indices, p.values, backup_slot, backup_rows, backup_values, p.n_cols, p.tile_width,
                 p.dense_row_threshold)


def pack_twell(dense, tile_width: int, compression: int, dense_row_threshold: int, *, relu: bool = False) -> TwELL:
    """GPU pack of a dense (M, n) matrix into TwELL (one host sync to size the backup)."""
    dense = device_matrix(dense, "dense")
    p = pack_twell_async(dense, tile_width, compression, dense_row_threshold, relu=relu)
    return finish_twell(p, dense, relu=relu)


def unpack_twell(tw: TwELL):
    """Dense (M, n) array of a device TwELL."""
    cp = cupy()
    m, n = tw.shape
    dense = cp.zeros((m, n), dtype=tw.dtype)
    total = m * tw.n_tiles * tw.slots
    if total:
        k = get_kernel(FAMILY, f"unpack_twell<{ctype_of(tw.dtype, 'values')}>")
        k((grid_1d(total, 256),), (256,),
          (tw.counts, tw.indices, tw.values, tw.backup_slot, i32(m), i32(n), i32(tw.n_tiles), i32(tw.slots),
           i32(tw.tile_width), dense))
    if tw.n_backup:
        dense[tw.backup_rows] = tw.backup_values
    return dense


def unpack_twell_rows(counts, indices, values, rows, n: int, tile_width: int):
    """Dense (R, n) rows of TwELL arrays: row r is TwELL row ``rows[r]`` (``rows`` int32 (R,) on the device,
    or None for every row in order).  Only the stored slots are written: a row with an overflowing tile
    (count > slots) comes out incomplete and must be recomputed by the caller.

    counts (M, NT) int32, indices (M, NT, S) uint8, values (M, NT, S); returns an array of values' dtype.
    """
    cp = cupy()
    n_tiles, slots = counts.shape[1], indices.shape[2]
    r = counts.shape[0] if rows is None else rows.shape[0]
    dense = cp.zeros((r, n), dtype=values.dtype)
    total = r * n_tiles * slots
    if total:
        k = get_kernel(FAMILY, f"unpack_twell_rows<{ctype_of(values.dtype, 'values')}>")
        k((grid_1d(total, 256),), (256,),
          (counts, indices, values, NULL if rows is None else rows, i32(r), i32(n), i32(n_tiles), i32(slots),
           i32(tile_width), dense))
    return dense


def gather_backup_rows(x, counts, indices, values, rows, n: int, tile_width: int, *, out=None):
    """The dense backup's inputs in one kernel: ``xr = x[rows]`` and ``zr`` = the relu'd gate rows ``rows``
    unpacked from TwELL arrays (zeros where no entry).  A row with an overflowing tile comes out incomplete
    in ``zr`` (slots past capacity are not stored) and must be recomputed by the caller.

    Parameters
    ----------
    x : cupy.ndarray (M, d), C-contiguous
    counts, indices, values : TwELL arrays (M, NT) int32, (M, NT, S) uint8, (M, NT, S) of x's dtype
    rows : cupy.ndarray (R,) int32, row indices < M
    out : (xr, zr) or None
        Preallocated outputs (C-contiguous, shapes and dtype as returned); every element is written.

    Returns
    -------
    xr : cupy.ndarray (R, d), zr : cupy.ndarray (R, n); both C-contiguous, x's dtype
    """
    cp = cupy()
    if not x.flags.c_contiguous:
        raise ValueError("gather_backup_rows takes a C-contiguous x")
    r, d = rows.shape[0], x.shape[1]
    n_tiles, slots = counts.shape[1], indices.shape[2]
    if out is None:
        xr = cp.empty((r, d), dtype=x.dtype)
        zr = cp.empty((r, n), dtype=values.dtype)
    else:
        xr, zr = out
        if xr.shape != (r, d) or zr.shape != (r, n) or not (xr.flags.c_contiguous and zr.flags.c_contiguous):
            raise ValueError(f"out must be C-contiguous arrays of shapes {(r, d)} and {(r, n)}")
    if r:
        k = get_kernel(FAMILY, f"gather_backup_rows<{ctype_of(x.dtype, 'x')}>")
        k((r,), (256,), (x, i32(d), counts, indices, values, rows, i32(n), i32(n_tiles), i32(slots),
                         i32(tile_width), xr, zr))
    return xr, zr


def scatter_rows(src, rows, dst, *, count=None):
    """``dst[rows] = src`` for distinct ``rows``: src (R, d), rows (R,) int32, dst (M, d); C-contiguous, one
    dtype.  ``count`` (int32 (1,) on the device, optional): only the first ``count`` rows (a length known on
    the device alone; R is then the capacity).  One kernel (16-byte vectors for aligned rows)."""
    if not (src.flags.c_contiguous and dst.flags.c_contiguous) or src.dtype != dst.dtype:
        raise ValueError("scatter_rows takes C-contiguous src and dst of one dtype")
    r = rows.shape[0]
    if r:
        k = get_kernel(FAMILY, f"scatter_rows<{ctype_of(dst.dtype, 'dst')}>")
        k((r,), (256,), (src, rows, i32(dst.shape[1]), dst, NULL if count is None else count))
    return dst


def gather_rows_counted(x, rows, count, capacity: int):
    """``xr[r] = x[rows[r]]`` for ``r < count`` and zeros for ``count <= r < capacity``: a row list whose
    length ``count`` (int32 (1,)) is known on the device alone, gathered into a (capacity, d) buffer without a
    host read-back.  x C-contiguous; rows int32 with at least ``min(count, capacity)`` valid entries."""
    cp = cupy()
    if not x.flags.c_contiguous:
        raise ValueError("gather_rows_counted takes a C-contiguous x")
    xr = cp.empty((capacity, x.shape[1]), dtype=x.dtype)
    if capacity:
        k = get_kernel(FAMILY, f"gather_rows_counted<{ctype_of(x.dtype, 'x')}>")
        k((capacity,), (256,), (x, i32(x.shape[1]), rows, count, xr))
    return xr


# --------------------------------------------------------------------------- hybrid


@dataclass
class HybridPlan:
    """Row routing and CSR offsets of a Hybrid, on the device (from :func:`hybrid_plan`).

    backup_slot (M,) int32, backup_rows_buf (capacity M) int32, redo_rows_buf (capacity M) int32 (compact
    rows whose TwELL tile overflowed; only with a route code), row_ptr (M + 1,) int32, totals (4,) int32
    = (compact entries, backup rows, redo rows, 0: a work counter), nnz_all (1,) int64 (entries of all rows).
    """

    backup_slot: object
    backup_rows_buf: object
    redo_rows_buf: object
    row_ptr: object
    totals: object
    nnz_all: object


def hybrid_plan(row_nnz, dense_row_threshold: int, row_route=None, *, redo_to_backup: bool = False) -> HybridPlan:
    """Hybrid routing from per-row entry counts, in two kernels and no host sync.

    A row is a backup row iff ``row_nnz > dense_row_threshold``; with ``row_route`` (TwELL route codes of
    the fused gate GEMM) a compact row with code ``ROUTE_OVERFLOW`` is also listed in ``redo_rows_buf`` --
    or, with ``redo_to_backup``, made a backup row (none to redo).  Every list is in row order
    (deterministic).
    """
    cp = cupy()
    m = row_nnz.shape[0]
    blocks = max(1, -(-m // ROUTE_BLOCK_ROWS))
    backup_slot = cp.empty(m, dtype=cp.int32)
    backup_rows_buf = cp.empty(max(m, 1), dtype=cp.int32)
    redo_rows_buf = cp.empty(max(m, 1), dtype=cp.int32) if row_route is not None else None
    row_ptr = cp.empty(m + 1, dtype=cp.int32)
    totals = cp.empty(4, dtype=cp.int32)
    nnz_all = cp.empty(1, dtype=cp.int64)
    block_counts = cp.empty(3 * blocks, dtype=cp.int32)
    block_all = cp.empty(blocks, dtype=cp.int64)
    route = NULL if row_route is None else row_route
    get_kernel(FAMILY, "hybrid_plan_count")((blocks,), (ROUTE_THREADS,),
                                            (row_nnz, route, i32(m), threshold_i32(dense_row_threshold),
                                             i32(redo_to_backup), block_counts, block_all))
    get_kernel(FAMILY, "hybrid_plan_place")((blocks,), (ROUTE_THREADS,),
                                            (row_nnz, route, i32(m), threshold_i32(dense_row_threshold),
                                             i32(redo_to_backup), block_counts, block_all, backup_slot, backup_rows_buf,
                                             NULL if redo_rows_buf is None else redo_rows_buf, row_ptr, totals,
                                             nnz_all))
    return HybridPlan(backup_slot, backup_rows_buf, redo_rows_buf, row_ptr, totals, nnz_all)


@dataclass
class HybridPending:
    """Hybrid routing computed on the device before sizing (row_ptr valid, entries not written)."""

    row_nnz: object
    plan: HybridPlan
    neuron_counts: object
    n_cols: int
    dense_row_threshold: int

    row_ptr = property(lambda self: self.plan.row_ptr)
    backup_slot = property(lambda self: self.plan.backup_slot)
    backup_rows_buf = property(lambda self: self.plan.backup_rows_buf)


def count_row_entries(dense, row_nnz=None, *, relu: bool = False, neuron_counts=None):
    """Entries of each row of ``dense`` (M, n) into ``row_nnz`` (int32 (M,), allocated if None; returned), and
    +1 per entry into ``neuron_counts`` (int32 (n,)) when given.  ``relu``: entries are !(v <= 0), else v != 0."""
    cp = cupy()
    m, n = dense.shape
    if row_nnz is None:
        row_nnz = cp.empty(m, dtype=cp.int32)
    if m:
        vec = n % 8 == 0 and aligned(dense, 8 * dense.dtype.itemsize)
        k = get_kernel(FAMILY, f"count_row_entries<{ctype_of(dense.dtype, 'dense')}, {cbool(relu)}, {cbool(vec)}>")
        k((grid_1d(m, WARPS_PER_BLOCK, cap=2**31 - 1),), (32 * WARPS_PER_BLOCK,),
          (dense, i32(m), i32(n), row_nnz, NULL if neuron_counts is None else neuron_counts))
    return row_nnz


def pack_hybrid_async(dense, dense_row_threshold: int, *, relu: bool = False, neuron_counts: bool = False):
    """Count entries per row, route rows, scan offsets; no host sync."""
    cp = cupy()
    m, n = dense.shape
    if m * min(dense_row_threshold, n) >= 2**31:
        raise ValueError(f"dense with M = {m} rows of up to {min(dense_row_threshold, n)} compact entries each "
                         "could overflow the Hybrid's int32 row offsets; split it")
    ncounts = cp.zeros(n, dtype=cp.int32) if neuron_counts else None
    row_nnz = count_row_entries(dense, relu=relu, neuron_counts=ncounts)
    return HybridPending(row_nnz, hybrid_plan(row_nnz, dense_row_threshold), ncounts, n, dense_row_threshold)


def finish_hybrid(p: HybridPending, dense, nnz: int, n_backup: int, *, relu: bool = False,
                  transpose: bool = True, values_from=None) -> Hybrid:
    """Write the compact entries (and optionally the transposed pattern) once sizes are known."""
    cp = cupy()
    m, n = dense.shape
    ct = ctype_of(dense.dtype, "dense")
    vec = n % 8 == 0 and aligned(dense, 8 * dense.dtype.itemsize)
    col_indices = cp.empty(nnz, dtype=cp.int32)
    values = cp.empty(nnz, dtype=dense.dtype)
    if m:
        k = get_kernel(FAMILY, f"fill_hybrid_rows<{ct}, {cbool(relu)}, {cbool(vec)}>")
        k((grid_1d(m, WARPS_PER_BLOCK, cap=2**31 - 1),), (32 * WARPS_PER_BLOCK,),
          (dense, i32(m), i32(n), p.row_ptr, p.backup_slot, col_indices, values))
    backup_rows = p.backup_rows_buf[:n_backup]
    backup_values = dense[backup_rows] if n_backup else dense[:0]
    if relu:
        backup_values = relu_keep_nan(backup_values)
    hy = Hybrid(p.row_ptr, col_indices, values, p.backup_slot, backup_rows, backup_values, n,
                p.dense_row_threshold)
    if transpose:
        hy = Hybrid(hy.row_ptr, hy.col_indices, hy.values, hy.backup_slot, hy.backup_rows, hy.backup_values, n,
                    hy.dense_row_threshold, transpose_pattern(hy))
    return hy


def pack_hybrid(dense, dense_row_threshold: int, transpose: bool = True, *, relu: bool = False) -> Hybrid:
    """GPU pack of a dense (M, n) matrix into the Hybrid format (one host sync to size it)."""
    dense = device_matrix(dense, "dense")
    p = pack_hybrid_async(dense, dense_row_threshold, relu=relu)
    nnz, n_backup = HostReadback(p.plan.totals[:2]).wait()
    return finish_hybrid(p, dense, nnz, n_backup, relu=relu, transpose=transpose)


def unpack_hybrid(hy: Hybrid):
    """Dense (M, n) array of a device Hybrid."""
    cp = cupy()
    m, n = hy.shape
    dense = cp.zeros((m, n), dtype=hy.dtype)
    if m:
        k = get_kernel(FAMILY, f"unpack_hybrid_rows<{ctype_of(hy.dtype, 'values')}>")
        k((grid_1d(m, WARPS_PER_BLOCK, cap=2**31 - 1),), (32 * WARPS_PER_BLOCK,),
          (hy.row_ptr, hy.col_indices, hy.values, i32(m), i32(n), dense))
    if hy.n_backup:
        dense[hy.backup_rows] = hy.backup_values
    return dense


TRANSPOSE_ROWS = 64
TRANSPOSE_THREADS = 256
#: Widest n the shared-memory column masks of the transpose kernels hold (8 bytes per column).
TRANSPOSE_MAX_COLS = 227 * 1024 // 8


def transpose_pattern(hy: Hybrid) -> NeuronMajorPattern:
    """Neuron-major pattern of a device Hybrid, deterministic (rows ascending within each column).

    Three kernels (per-block column masks -> column-wise prefix -> placement),
    no sort and no order-dependent atomics; for n wider than the shared-memory
    masks allow, a stable CUB radix argsort (through CuPy) gives the same result.
    """
    cp = cupy()
    n, m = hy.n_cols, hy.n_rows
    row_indices = cp.empty(hy.nnz, dtype=cp.int32)
    positions = cp.empty(hy.nnz, dtype=cp.int32)
    if hy.nnz == 0:
        return NeuronMajorPattern(cp.zeros(n + 1, dtype=cp.int32), row_indices, positions)
    col_ptr = cp.empty(n + 1, dtype=cp.int32) if n <= TRANSPOSE_MAX_COLS else cp.zeros(n + 1, dtype=cp.int32)
    if n > TRANSPOSE_MAX_COLS:
        cp.cumsum(cp.bincount(hy.col_indices, minlength=n), dtype=cp.int32, out=col_ptr[1:])
        positions = cp.argsort(hy.col_indices, kind="stable").astype(cp.int32)
        return NeuronMajorPattern(col_ptr, _entry_rows(hy.row_ptr, hy.nnz)[positions], positions)
    n_blocks = -(-m // TRANSPOSE_ROWS)
    smem = 8 * n
    counts = cp.empty((n_blocks, n), dtype=cp.int32)
    col_counts = cp.empty(n, dtype=cp.int32)
    kc = get_kernel(FAMILY, "transpose_count")
    kp = get_kernel(FAMILY, "transpose_place")
    for k in (kc, kp):
        raise_smem_limit(k, smem)
    kc((n_blocks,), (TRANSPOSE_THREADS,), (hy.row_ptr, hy.col_indices, i32(m), i32(n), counts), shared_mem=smem)
    get_kernel(FAMILY, "transpose_scan")((-(-n // 128),), (128,), (counts, i32(n_blocks), i32(n), col_counts))
    get_kernel(FAMILY, "column_offsets")((1,), (ROUTE_THREADS,), (col_counts, i32(n), col_ptr))
    kp((n_blocks,), (TRANSPOSE_THREADS,), (hy.row_ptr, hy.col_indices, i32(m), i32(n), counts, col_ptr,
                                           row_indices, positions), shared_mem=smem)
    return NeuronMajorPattern(col_ptr, row_indices, positions)


def _entry_rows(row_ptr, nnz: int):
    """Row id of every CSR entry (searchsorted over row_ptr, no host sync)."""
    cp = cupy()
    if nnz == 0:
        return cp.zeros(0, dtype=cp.int32)
    return (cp.searchsorted(row_ptr, cp.arange(nnz, dtype=cp.int32), side="right") - 1).astype(cp.int32)



# --------------------------------------------------------------------------- validation of user containers

_VALID_RULES = {
    1: "backup_slot[r] must be -1 (compact row) or the position of row r in backup_rows",
    2: "backup_rows must be strictly ascending row ids in [0, M) whose backup_slot points back to them",
    3: "counts must be >= 0, and at most slots in the tiles of a compact row",
    4: "stored column indices must lie inside their tile and below n_cols",
    5: "stored column indices must be strictly ascending within a tile (TwELL) or a row (Hybrid)",
    6: "row_ptr must start at 0, be non-decreasing, end at nnz, and give backup rows an empty range",
    7: "a compact row may hold at most max_len entries",
}
_VALIDATE_WARPS = 8


def _check_contiguous(container, fields, name):
    for f in fields:
        a = getattr(container, f)
        if not a.flags.c_contiguous:
            raise ValueError(f"{name}.{f} must be C-contiguous on the GPU")


def _raise_if_bad(err, name: str, kind: str):
    (lo, hi) = HostReadback(err.view(np.int32)).wait()
    key = (hi & 0xFFFFFFFF) << 32 | (lo & 0xFFFFFFFF)
    if key != 0xFFFFFFFFFFFFFFFF:
        row, code = key >> 4, key & 15
        raise ValueError(f"{name} is not a valid {kind} (row {row}): {_VALID_RULES[code]}")


def _routing_and_err(cp, backup_slot, backup_rows, m: int):
    err = cp.full(1, 0xFFFFFFFFFFFFFFFF, dtype=cp.uint64)
    r = backup_rows.shape[0]
    if m + r:
        get_kernel(FAMILY, "validate_routing")((grid_1d(m + r, 256),), (256,),
                                               (backup_slot, backup_rows, i32(m), i32(r), err))
    return err


def validate_twell(tw: TwELL, name: str = "tw"):
    """Check a device TwELL's data invariants (docs/format.md) before any kernel reads it: two kernels and
    one 8-byte read-back.  Raises ``ValueError`` naming the first bad row and the rule."""
    cp = cupy()
    _check_contiguous(tw, ("counts", "indices", "values", "backup_slot", "backup_rows", "backup_values"), name)
    m = tw.n_rows
    err = _routing_and_err(cp, tw.backup_slot, tw.backup_rows, m)
    cells = m * tw.n_tiles
    if cells:
        get_kernel(FAMILY, "validate_twell_tiles")(
            (grid_1d(cells, _VALIDATE_WARPS),), (32 * _VALIDATE_WARPS,),
            (tw.counts, tw.indices, tw.backup_slot, i32(m), i32(tw.n_tiles), i32(tw.slots), i32(tw.tile_width),
             i32(tw.n_cols), err))
    _raise_if_bad(err, name, "TwELL")


def validate_hybrid(hy: Hybrid, name: str = "hy", max_len: int | None = None):
    """Check a device Hybrid's data invariants (docs/format.md) before any kernel reads it (its transposed
    pattern is not checked: no op reads a user's).  Raises ``ValueError``."""
    cp = cupy()
    _check_contiguous(hy, ("row_ptr", "col_indices", "values", "backup_slot", "backup_rows", "backup_values"), name)
    m = hy.n_rows
    if m == 0 and hy.nnz:
        raise ValueError(f"{name} is not a valid Hybrid (row 0): {_VALID_RULES[6]}")
    err = _routing_and_err(cp, hy.backup_slot, hy.backup_rows, m)
    if m:
        get_kernel(FAMILY, "validate_hybrid_rows")(
            (grid_1d(m, _VALIDATE_WARPS),), (32 * _VALIDATE_WARPS,),
            (hy.row_ptr, hy.col_indices, hy.backup_slot, i32(m), i32(hy.nnz), i32(hy.n_cols),
             i32(hy.n_cols if max_len is None else max_len), err))
    _raise_if_bad(err, name, "Hybrid")
