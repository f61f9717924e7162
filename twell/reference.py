"""NumPy/SciPy reference of every twell op (the CPU backend and the tests' oracle).

Written for clarity first, but vectorised: no Python loop runs over rows or
non-zeros, only over row blocks (so that no temporary grows much beyond
``_BLOCK_ELEMENTS`` float64 values) and over chunks of non-zeros in the SDDMM.
The paper's shapes (M = 16,384, d = 2048, n = 5632 at ~30 active neurons per
token) run in seconds on two cores.

Conventions
-----------
* **Neuron-major weights.**  ``w_gate``, ``w_up`` and ``w_down`` all have shape
  ``(n, d)``, row-major: ``w_gate`` / ``w_up`` as ``nn.Linear(d, n).weight``,
  ``w_down`` is the *transpose* of ``nn.Linear(n, d).weight``.  Shapes are
  checked, but when ``d == n`` a wrongly oriented ``w_down`` cannot be detected.
* **Precision.**  Every op computes in float64 (inputs are upcast).  Results are
  rounded once, to ``out_dtype`` (None: the dtype of the main input ``x`` /
  ``h``).  Pack / unpack / conversions never change a value.  All arrays of one
  op must share one float dtype (bfloat16 through ml_dtypes, float16, float32,
  float64).
* **Non-zero** means ``value != 0``: NaN counts as a non-zero, ``-0.0`` does not.
* **Inactive neurons contribute exactly nothing.**  ``y`` (and every gradient) is a sum over the active
  neurons of each token only (``relu(z) != 0``, NaN active), on every path and in every row, compact or
  backup: an inactive neuron's weights are never multiplied, so NaN / Inf in them cannot reach that
  token (a dense computation would give ``0 · Inf = NaN`` there).  NaN / Inf in ``x``, in the gate
  pre-activations or in an active neuron's weights propagate as in the dense computation.
* **ReLU** keeps a value where ``not (z <= 0)``, so NaN propagates exactly like
  the dense ``relu``.  The gate values are rounded to ``x.dtype`` *before* the
  pattern is taken (a positive ``z`` that rounds to 0 is inactive), so inference
  and training see the same pattern as a dense ``relu`` computed in ``x.dtype``.
* **Training state.**  Inside the reference the saved gate values ``g`` (already
  rounded to ``x.dtype``), ``up_values`` and ``up_backup`` are stored in float64.
* **L1 penalty.**  The penalty is ``λ · (1/M) Σ_t Σ_j |h_tj|`` (averaged over the
  M tokens, summed over the n neurons), as in the paper; ``stats.l1`` is the
  unweighted ``(1/M) Σ|h|``.  Its gradient ``(λ/M) · sign(h)`` is added to
  ``dh`` inside :func:`gated_ffn_backward` (on the pattern only).
* FFN ops need ``M >= 1``; pack / unpack / conversions accept ``M = 0``.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from . import _backend as B
from .format import Hybrid, NeuronMajorPattern, TwELL, check_dense_row_threshold, twell_layout
from .results import FFNStats, SavedForBackward

__all__ = [
    "pack_twell",
    "unpack_twell",
    "twell_to_scipy",
    "twell_from_scipy",
    "pack_hybrid",
    "unpack_hybrid",
    "hybrid_to_scipy",
    "hybrid_from_scipy",
    "transpose_pattern",
    "gate_twell",
    "gated_ffn_dense",
    "ffn_dense",
    "gated_up_down",
    "down_projection",
    "gated_ffn",
    "ffn",
    "gated_ffn_forward",
    "gated_ffn_backward",
]

F64 = np.float64
#: Elements per row block of dense temporaries (float64: 32 MiB).
_BLOCK_ELEMENTS = 1 << 22
#: Gathered elements per operand and SDDMM chunk (float64: 2 MiB, cache-friendly).
_SDDMM_ELEMENTS = 1 << 18
_INT32_MAX = np.iinfo(np.int32).max


# --------------------------------------------------------------------------- validation


def _host_matrix(a, name: str):
    """A 2-D NumPy float array (any of the supported float dtypes)."""
    if B.is_gpu_array(a):
        raise TypeError(f"{name} lives on a CUDA device; the reference needs a host (NumPy) array")
    B.check_array(a, name, ndim=2)
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    B.check_float_dtype(a, name)
    return a


def _float_dtype(dtype, name: str):
    """Resolve a dtype argument ('bfloat16' included) and check it is a supported float dtype."""
    B.bfloat16_dtype()  # registers "bfloat16" with NumPy
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"{name} must be a float dtype in {{{', '.join(B.FLOAT_DTYPE_NAMES)}}}, "
                        f"got {dtype!r}") from exc
    if dt.name not in B.FLOAT_DTYPE_NAMES:
        raise TypeError(f"{name} must be a float dtype in {{{', '.join(B.FLOAT_DTYPE_NAMES)}}}, got {dt.name}")
    return dt


def _out_dtype(out_dtype, default):
    return np.dtype(default) if out_dtype is None else _float_dtype(out_dtype, "out_dtype")


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _check_l1_weight(value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"l1_weight must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"l1_weight must be a finite number >= 0, got {value}")
    return value


def _check_ffn_args(x, weights: dict):
    """Validate ``x`` (M, d) and neuron-major weights (n, d) of x's dtype; return (M, d, n)."""
    _host_matrix(x, "x")
    m, d = x.shape
    if m < 1 or d < 1:
        raise ValueError(f"x must have shape (M, d) with M >= 1 and d >= 1, got {tuple(x.shape)}")
    n = None
    first = None
    for name, w in weights.items():
        _host_matrix(w, name)
        if w.shape[1] != d:
            raise ValueError(f"{name} must have shape (n, d) with d = x.shape[1] = {d} (neuron-major: "
                             f"w_down is the transpose of nn.Linear's down weight), got {tuple(w.shape)}")
        if n is None:
            n, first = w.shape[0], name
            if n < 1:
                raise ValueError(f"{name} must have at least one row (n >= 1), got {tuple(w.shape)}")
        elif w.shape[0] != n:
            raise ValueError(f"{name} must have shape (n, d) = ({n}, {d}) like {first} (neuron-major: "
                             f"w_down is the transpose of nn.Linear's down weight), got {tuple(w.shape)}")
        if w.dtype != x.dtype:
            raise TypeError(f"{name} must have the same dtype as x ({x.dtype.name}), got {w.dtype.name}")
    return m, d, n


def _check_twell(tw, name: str):
    """A host TwELL whose contents hold the invariants now (its arrays may have changed since it was built)."""
    if not isinstance(tw, TwELL):
        raise TypeError(f"{name} must be a TwELL, got {type(tw).__name__}")
    if tw.xp is not np:
        raise TypeError(f"{name} lives on a CUDA device; the reference needs host arrays (use {name}.host())")
    tw.validate()
    return tw


def _check_hybrid(hy, name: str):
    """A host Hybrid whose contents hold the invariants now."""
    if not isinstance(hy, Hybrid):
        raise TypeError(f"{name} must be a Hybrid, got {type(hy).__name__}")
    if hy.xp is not np:
        raise TypeError(f"{name} lives on a CUDA device; the reference needs host arrays (use {name}.host())")
    hy.validate()
    return hy


def _active_product(g, values, w):
    """``Σ_j values[r, j] · w[j]`` over the active entries ``g[r, j] != 0`` only (float64, CSR): an inactive
    neuron's row of ``w`` is never multiplied."""
    rows, cols = np.nonzero(g != 0)
    return _csr(rows, cols, values[rows, cols], g.shape) @ w


def _f64(a):
    """float64 view/copy of ``a`` (no copy when it already is float64)."""
    return np.asarray(a, dtype=F64)


# --------------------------------------------------------------------------- small building blocks


def _row_blocks(m: int, width: int):
    """Yield ``(start, stop)`` row ranges with about ``_BLOCK_ELEMENTS`` elements each."""
    step = max(1, _BLOCK_ELEMENTS // max(int(width), 1))
    for start in range(0, m, step):
        yield start, min(m, start + step)


def _relu(z, dtype):
    """``relu(z)`` (in place on the float64 ``z``) rounded to ``dtype``: 0 where ``z <= 0``, NaN kept."""
    return np.maximum(z, 0.0, out=z).astype(dtype, copy=False)


def _sddmm(a, b, rows, cols):
    """``out[e] = a[rows[e]] · b[cols[e]]`` in float64 (sampled dense-dense product), chunked."""
    out = np.empty(rows.shape[0], dtype=F64)
    step = max(1, _SDDMM_ELEMENTS // max(a.shape[1], 1))
    for s in range(0, rows.shape[0], step):
        e = slice(s, s + step)
        out[e] = np.einsum("kd,kd->k", a[rows[e]], b[cols[e]])
    return out


def _csr(rows, cols, vals, shape):
    """CSR array from entries sorted by row (columns ascending within a row)."""
    indptr = np.zeros(shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=shape[0]), out=indptr[1:])
    return sp.csr_array((vals, cols, indptr), shape=shape)


def _rows_of_csr(row_ptr):
    """Row id of every CSR entry."""
    return np.repeat(np.arange(row_ptr.shape[0] - 1, dtype=np.int64), np.diff(row_ptr))


def _scatter_rows(chosen, rows, cols, vals, n, dtype):
    """Dense ``(len(chosen), n)`` rows of the entries whose row is in ``chosen`` (ascending ids)."""
    out = np.zeros((chosen.shape[0], n), dtype=dtype)
    if chosen.shape[0]:
        pos = np.searchsorted(chosen, rows)
        pos_c = np.minimum(pos, chosen.shape[0] - 1)
        hit = chosen[pos_c] == rows
        out[pos_c[hit], cols[hit]] = vals[hit]
    return out


def _backup_slot(m: int, backup_rows):
    slot = np.full(m, -1, dtype=np.int32)
    slot[backup_rows] = np.arange(backup_rows.shape[0], dtype=np.int32)
    return slot


def _dense_entries(block):
    """Row-major sorted entries ``(rows, cols, vals)`` of the non-zeros of a dense block."""
    rows, cols = np.nonzero(block != 0)
    return rows, cols, block[rows, cols]


def _scipy_entries(matrix, dtype):
    """Shape, dtype and sorted, duplicate-summed, zero-free entries of a scipy.sparse matrix/array."""
    if not sp.issparse(matrix):
        raise TypeError(f"matrix must be a scipy.sparse matrix or array, got {type(matrix).__name__}")
    if len(matrix.shape) != 2:
        raise ValueError(f"matrix must be 2-D, got shape {tuple(matrix.shape)}")
    m, n = (int(s) for s in matrix.shape)
    if n < 1:
        raise ValueError(f"matrix must have at least one column, got shape {(m, n)}")
    if dtype is None:
        if np.dtype(matrix.dtype).name not in B.FLOAT_DTYPE_NAMES:
            raise TypeError(f"matrix has dtype {np.dtype(matrix.dtype).name}; pass dtype= one of "
                            f"{{{', '.join(B.FLOAT_DTYPE_NAMES)}}}")
        dt = np.dtype(matrix.dtype)
    else:
        dt = _float_dtype(dtype, "dtype")
    csr = sp.csr_array(matrix, copy=True)
    indptr, indices = np.asarray(csr.indptr, dtype=np.int64), np.asarray(csr.indices, dtype=np.int64)
    if (indptr.shape[0] != m + 1 or indptr[0] != 0 or np.any(np.diff(indptr) < 0)
            or indptr[-1] != indices.shape[0] or indices.shape[0] != csr.data.shape[0]):
        raise ValueError("matrix is not a valid CSR: indptr must have M + 1 non-decreasing entries from 0 to nnz")
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        raise ValueError(f"matrix has a column index outside [0, n = {n}): {int(indices.min())}..{int(indices.max())}")
    csr.sum_duplicates()  # sorts the indices of every row
    vals = csr.data.astype(dt)
    keep = vals != 0
    rows = _rows_of_csr(csr.indptr)[keep]
    return (m, n), dt, rows, csr.indices[keep].astype(np.int64), vals[keep]


# --------------------------------------------------------------------------- TwELL construction


def _twell_part(rows, cols, vals, m, n, tile_width, slots, threshold, dtype, dense=None):
    """TwELL arrays of ``m`` rows from row-major sorted entries.

    Slot positions come from a per-(row, tile) segmented rank: the entries are
    sorted by ``key = row * n_tiles + tile``, so an entry's slot is its index
    minus the first index of its key.  Returns ``(counts, indices, values,
    backup_rows, backup_values)`` with block-local backup row ids; backup rows
    are copied from ``dense`` when given, else scattered.
    """
    n_tiles = -(-n // tile_width)
    key = rows.astype(np.int64) * n_tiles + cols // tile_width
    counts = np.bincount(key, minlength=m * n_tiles)
    first = np.cumsum(counts) - counts
    pos = np.arange(key.shape[0], dtype=np.int64) - first[key]
    keep = pos < slots
    indices = np.zeros((m * n_tiles, slots), dtype=np.uint8)
    values = np.zeros((m * n_tiles, slots), dtype=dtype)
    indices[key[keep], pos[keep]] = cols[keep] % tile_width
    values[key[keep], pos[keep]] = vals[keep]
    counts = counts.reshape(m, n_tiles)
    backup = np.flatnonzero((counts > slots).any(axis=1) | (counts.sum(axis=1) > threshold))
    backup_values = dense[backup] if dense is not None else _scatter_rows(backup, rows, cols, vals, n, dtype)
    return (counts.astype(np.int32), indices.reshape(m, n_tiles, slots), values.reshape(m, n_tiles, slots),
            backup, backup_values)


def _assemble_twell(parts, m, n, tile_width, slots, threshold, dtype) -> TwELL:
    """Concatenate ``(start, part)`` pieces made by :func:`_twell_part` into one TwELL."""
    n_tiles = -(-n // tile_width)
    if not parts:
        counts = np.zeros((0, n_tiles), np.int32)
        indices = np.zeros((0, n_tiles, slots), np.uint8)
        values = np.zeros((0, n_tiles, slots), dtype)
        backup_rows = np.zeros(0, np.int32)
        backup_values = np.zeros((0, n), dtype)
    else:
        counts = np.concatenate([p[0] for _, p in parts])
        indices = np.concatenate([p[1] for _, p in parts])
        values = np.concatenate([p[2] for _, p in parts])
        backup_rows = np.concatenate([p[3] + s for s, p in parts]).astype(np.int32)
        backup_values = np.concatenate([p[4] for _, p in parts])
    return TwELL(counts=counts, indices=indices, values=values, backup_slot=_backup_slot(m, backup_rows),
                 backup_rows=backup_rows, backup_values=backup_values, n_cols=n, tile_width=tile_width,
                 dense_row_threshold=threshold)


def _twell_from_blocks(blocks, m, n, tile_width, slots, threshold, dtype) -> TwELL:
    """TwELL of a dense matrix given as consecutive ``(start, block)`` row blocks of ``dtype``."""
    parts = []
    for start, block in blocks:
        rows, cols, vals = _dense_entries(block)
        parts.append((start, _twell_part(rows, cols, vals, block.shape[0], n, tile_width, slots, threshold,
                                         dtype, dense=block)))
    return _assemble_twell(parts, m, n, tile_width, slots, threshold, dtype)


def _twell_compact_entries(tw: TwELL):
    """Sorted entries ``(rows, cols, vals)`` held in the compact slots of the non-backup rows.

    The container's invariants (counts >= 0, columns < n_cols, ...) were checked when it was built.
    """
    valid = np.arange(tw.slots) < tw.counts[..., None]  # the first min(count, slots) slots
    valid[tw.backup_rows] = False
    rows, tiles, slot = np.nonzero(valid)
    cols = tiles * tw.tile_width + tw.indices[rows, tiles, slot]
    return rows, cols, tw.values[rows, tiles, slot]


def _twell_csr(tw: TwELL, dtype):
    """CSR (M, n) of the compact rows only, values converted to ``dtype``."""
    rows, cols, vals = _twell_compact_entries(tw)
    return _csr(rows, cols, vals.astype(dtype), tw.shape)


# --------------------------------------------------------------------------- TwELL public


def pack_twell(dense, tile_width: int = 256, compression: int = 8, dense_row_threshold: int | None = None) -> TwELL:
    """Pack a dense ``(M, n)`` float matrix into TwELL (see :class:`twell.format.TwELL`).

    Each (row, tile) keeps its first ``slots = tile_width // compression``
    non-zeros in ascending column order; ``counts`` hold the true counts.  A row
    with any tile over capacity, or with more than ``dense_row_threshold``
    non-zeros (None: never), goes whole to the dense backup (its compact slots
    still hold the first ``slots`` entries per tile, as the GPU kernel writes).
    Values are kept exactly, in ``dense.dtype``.
    """
    _host_matrix(dense, "dense")
    m, n = dense.shape
    if n < 1:
        raise ValueError(f"dense must have at least one column, got shape {(m, n)}")
    _, slots = twell_layout(n, tile_width, compression)
    threshold = check_dense_row_threshold(dense_row_threshold, n)
    blocks = ((a, dense[a:b]) for a, b in _row_blocks(m, n))
    return _twell_from_blocks(blocks, m, n, int(tile_width), slots, threshold, dense.dtype)


def unpack_twell(tw: TwELL):
    """Dense ``(M, n_cols)`` array (``tw.dtype``): compact rows from the slots, backup rows from the backup."""
    _check_twell(tw, "tw")
    rows, cols, vals = _twell_compact_entries(tw)
    out = np.zeros(tw.shape, dtype=tw.dtype)
    out[rows, cols] = vals
    out[tw.backup_rows] = tw.backup_values
    return out


def twell_to_scipy(tw: TwELL):
    """``scipy.sparse.csr_array`` with exactly the non-zeros of ``tw`` (sorted indices).

    SciPy has no bfloat16 / float16: such values become float32 (exactly);
    float32 / float64 are kept.
    """
    _check_twell(tw, "tw")
    dtype = tw.dtype if tw.dtype in (np.float32, np.float64) else np.dtype(np.float32)
    rows, cols, vals = _twell_compact_entries(tw)
    b_local, b_cols = np.nonzero(tw.backup_values != 0)
    rows = np.concatenate([rows, tw.backup_rows[b_local].astype(np.int64)])
    cols = np.concatenate([cols, b_cols])
    vals = np.concatenate([vals.astype(dtype), tw.backup_values[b_local, b_cols].astype(dtype)])
    keep = vals != 0
    order = np.argsort(rows[keep], kind="stable")  # every row comes from one source, already sorted
    return _csr(rows[keep][order], cols[keep][order], vals[keep][order], tw.shape)


def twell_from_scipy(matrix, tile_width: int = 256, compression: int = 8, dense_row_threshold: int | None = None,
                     dtype=None) -> TwELL:
    """TwELL from any 2-D ``scipy.sparse`` matrix/array, built from its CSR form.

    Duplicates are summed, explicit zeros (also values that round to 0 in
    ``dtype``) dropped.  ``dtype`` None: the matrix's dtype (must be a float
    dtype).  Only backup rows are densified.
    """
    (m, n), dt, rows, cols, vals = _scipy_entries(matrix, dtype)
    _, slots = twell_layout(n, tile_width, compression)
    threshold = check_dense_row_threshold(dense_row_threshold, n)
    part = _twell_part(rows, cols, vals, m, n, int(tile_width), slots, threshold, dt)
    return _assemble_twell([(0, part)], m, n, int(tile_width), slots, threshold, dt)


# --------------------------------------------------------------------------- Hybrid


def _hybrid_part(rows, cols, vals, m, n, threshold, dtype, dense=None):
    """Hybrid pieces of ``m`` rows from row-major sorted entries (block-local backup row ids)."""
    row_nnz = np.bincount(rows, minlength=m)
    is_backup = row_nnz > threshold
    backup = np.flatnonzero(is_backup)
    keep = ~is_backup[rows]
    backup_values = dense[backup] if dense is not None else _scatter_rows(backup, rows, cols, vals, n, dtype)
    return np.where(is_backup, 0, row_nnz), cols[keep], vals[keep], backup, backup_values


def _assemble_hybrid(parts, m, n, threshold, dtype, transpose) -> Hybrid:
    if parts:
        row_nnz = np.concatenate([p[0] for _, p in parts])
        col_indices = np.concatenate([p[1] for _, p in parts])
        values = np.concatenate([p[2] for _, p in parts])
        backup_rows = np.concatenate([p[3] + s for s, p in parts]).astype(np.int32)
        backup_values = np.concatenate([p[4] for _, p in parts])
    else:
        row_nnz = np.zeros(0, np.int64)
        col_indices = np.zeros(0, np.int32)
        values = np.zeros(0, dtype)
        backup_rows = np.zeros(0, np.int32)
        backup_values = np.zeros((0, n), dtype)
    if col_indices.shape[0] > _INT32_MAX:
        raise ValueError(f"the compact part has {col_indices.shape[0]} non-zeros; Hybrid's int32 offsets "
                         f"allow at most {_INT32_MAX}")
    row_ptr = np.zeros(m + 1, dtype=np.int32)
    np.cumsum(row_nnz, out=row_ptr[1:])
    hy = Hybrid(row_ptr=row_ptr, col_indices=col_indices.astype(np.int32), values=values,
                backup_slot=_backup_slot(m, backup_rows), backup_rows=backup_rows, backup_values=backup_values,
                n_cols=n, dense_row_threshold=threshold)
    if transpose:
        hy = Hybrid(row_ptr=hy.row_ptr, col_indices=hy.col_indices, values=hy.values, backup_slot=hy.backup_slot,
                    backup_rows=hy.backup_rows, backup_values=hy.backup_values, n_cols=n,
                    dense_row_threshold=threshold, transposed=transpose_pattern(hy))
    return hy


def _hybrid_from_blocks(blocks, m, n, threshold, dtype, transpose) -> Hybrid:
    parts = []
    for start, block in blocks:
        rows, cols, vals = _dense_entries(block)
        parts.append((start, _hybrid_part(rows, cols, vals, block.shape[0], n, threshold, dtype, dense=block)))
    return _assemble_hybrid(parts, m, n, threshold, dtype, transpose)


def pack_hybrid(dense, dense_row_threshold: int | None = 128, transpose: bool = True) -> Hybrid:
    """Pack a dense ``(M, n)`` float matrix into the Hybrid training format (values kept exactly).

    Rows with more than ``dense_row_threshold`` non-zeros (None: never) go to the
    dense backup (empty CSR range); ``transpose`` also builds the neuron-major
    pattern.
    """
    _host_matrix(dense, "dense")
    m, n = dense.shape
    if n < 1:
        raise ValueError(f"dense must have at least one column, got shape {(m, n)}")
    threshold = check_dense_row_threshold(dense_row_threshold, n)
    transpose = _check_bool(transpose, "transpose")
    blocks = ((a, dense[a:b]) for a, b in _row_blocks(m, n))
    return _hybrid_from_blocks(blocks, m, n, threshold, dense.dtype, transpose)


def unpack_hybrid(hy: Hybrid):
    """Dense ``(M, n_cols)`` array (``hy.dtype``) of a Hybrid."""
    _check_hybrid(hy, "hy")
    out = np.zeros(hy.shape, dtype=hy.dtype)
    out[_rows_of_csr(hy.row_ptr), hy.col_indices] = hy.values
    out[hy.backup_rows] = hy.backup_values
    return out


def hybrid_to_scipy(hy: Hybrid):
    """``scipy.sparse.csr_array`` with exactly the non-zeros of ``hy`` (bf16 / fp16 values become float32)."""
    _check_hybrid(hy, "hy")
    dtype = hy.dtype if hy.dtype in (np.float32, np.float64) else np.dtype(np.float32)
    b_local, b_cols = np.nonzero(hy.backup_values != 0)
    rows = np.concatenate([_rows_of_csr(hy.row_ptr), hy.backup_rows[b_local].astype(np.int64)])
    cols = np.concatenate([hy.col_indices.astype(np.int64), b_cols])
    vals = np.concatenate([hy.values.astype(dtype), hy.backup_values[b_local, b_cols].astype(dtype)])
    keep = vals != 0
    order = np.argsort(rows[keep], kind="stable")
    return _csr(rows[keep][order], cols[keep][order], vals[keep][order], hy.shape)


def hybrid_from_scipy(matrix, dense_row_threshold: int | None = 128, transpose: bool = True, dtype=None) -> Hybrid:
    """Hybrid from any 2-D ``scipy.sparse`` matrix/array (duplicates summed, explicit zeros dropped)."""
    (m, n), dt, rows, cols, vals = _scipy_entries(matrix, dtype)
    threshold = check_dense_row_threshold(dense_row_threshold, n)
    transpose = _check_bool(transpose, "transpose")
    return _assemble_hybrid([(0, _hybrid_part(rows, cols, vals, m, n, threshold, dt))], m, n, threshold, dt,
                            transpose)


def transpose_pattern(hy: Hybrid) -> NeuronMajorPattern:
    """Neuron-major pattern of the compact part of ``hy``.

    ``col_ptr`` is the exclusive scan of a column histogram; a stable argsort of
    the row-major ``col_indices`` orders each column's entries by row, and is
    itself ``positions``.
    """
    _check_hybrid(hy, "hy")
    cols = hy.col_indices
    col_ptr = np.zeros(hy.n_cols + 1, dtype=np.int32)
    np.cumsum(np.bincount(cols, minlength=hy.n_cols), out=col_ptr[1:])
    order = np.argsort(cols, kind="stable")
    rows = _rows_of_csr(hy.row_ptr)
    return NeuronMajorPattern(col_ptr=col_ptr, row_indices=rows[order].astype(np.int32),
                              positions=order.astype(np.int32))


# --------------------------------------------------------------------------- inference ops


def _relu_blocks(x64, w64, dtype):
    """Row blocks ``(start, relu(x wᵀ) rounded to dtype)`` of float64 operands."""
    for a, b in _row_blocks(x64.shape[0], w64.shape[0]):
        yield a, _relu(x64[a:b] @ w64.T, dtype)


def _relu_twell(x, w, tile_width, compression, dense_row_threshold):
    n = w.shape[0]
    _, slots = twell_layout(n, tile_width, compression)
    threshold = check_dense_row_threshold(dense_row_threshold, n)
    return _twell_from_blocks(_relu_blocks(_f64(x), _f64(w), x.dtype), x.shape[0], n, int(tile_width), slots,
                              threshold, x.dtype)


def gate_twell(x, w_gate, tile_width: int = 256, compression: int = 8,
               dense_row_threshold: int | None = None) -> TwELL:
    """TwELL of ``g = relu(x w_gateᵀ)`` (float64 product, values rounded to ``x.dtype``).

    ``x``: (M, d); ``w_gate``: (n, d) neuron-major.  Equal to
    ``pack_twell(relu(x w_gateᵀ).astype(x.dtype), ...)`` without materialising
    the dense gate.
    """
    _check_ffn_args(x, {"w_gate": w_gate})
    return _relu_twell(x, w_gate, tile_width, compression, dense_row_threshold)


def gated_ffn_dense(x, w_gate, w_up, w_down, out_dtype=None):
    """Dense ``y = (relu(x w_gateᵀ) ⊙ (x w_upᵀ)) w_down`` in float64; weights (n, d) neuron-major."""
    _check_ffn_args(x, {"w_gate": w_gate, "w_up": w_up, "w_down": w_down})
    out_dt = _out_dtype(out_dtype, x.dtype)
    x64 = _f64(x)
    g = np.maximum(x64 @ _f64(w_gate).T, 0.0)  # np.maximum propagates NaN
    return ((g * (x64 @ _f64(w_up).T)) @ _f64(w_down)).astype(out_dt, copy=False)


def ffn_dense(x, w_up, w_down, out_dtype=None):
    """Dense ``y = relu(x w_upᵀ) w_down`` in float64; weights (n, d) neuron-major."""
    _check_ffn_args(x, {"w_up": w_up, "w_down": w_down})
    out_dt = _out_dtype(out_dtype, x.dtype)
    return (np.maximum(_f64(x) @ _f64(w_up).T, 0.0) @ _f64(w_down)).astype(out_dt, copy=False)


def _check_twell_operand(tw, name, m, n, dtype):
    _check_twell(tw, name)
    if tw.shape != (m, n):
        raise ValueError(f"{name} must have shape (M, n) = ({m}, {n}), got {tw.shape}")
    if tw.dtype != dtype:
        raise TypeError(f"{name} must have values of dtype {np.dtype(dtype).name} (like x), got {tw.dtype.name}")


def gated_up_down(x, gate: TwELL, w_up, w_down, out_dtype=None):
    """Fused up/down: ``y = (g ⊙ (x w_upᵀ)) w_down`` with ``g`` the TwELL ``gate``.

    ``u = x w_upᵀ`` is evaluated only at the stored non-zeros of the compact rows
    (SDDMM); backup rows are computed densely from ``gate.backup_values``.
    """
    m, d, n = _check_ffn_args(x, {"w_up": w_up, "w_down": w_down})
    _check_twell_operand(gate, "gate", m, n, x.dtype)
    out_dt = _out_dtype(out_dtype, x.dtype)
    x64, wu64, wd64 = _f64(x), _f64(w_up), _f64(w_down)
    rows, cols, g = _twell_compact_entries(gate)
    h = g.astype(F64) * _sddmm(x64, wu64, rows, cols)
    y = _csr(rows, cols, h, (m, n)) @ wd64
    rb = gate.backup_rows
    for a, b in _row_blocks(rb.shape[0], n):
        gb = _f64(gate.backup_values[a:b])
        y[rb[a:b]] = _active_product(gb, np.where(gb != 0, gb * (x64[rb[a:b]] @ wu64.T), 0.0), wd64)
    return y.astype(out_dt, copy=False)


def down_projection(h: TwELL, w_down, out_dtype=None):
    """Non-gated down projection ``y = h w_down`` with ``h`` a TwELL (M, n), ``w_down`` (n, d)."""
    _check_twell(h, "h")
    _host_matrix(w_down, "w_down")
    if w_down.shape[0] != h.n_cols or w_down.shape[1] < 1:
        raise ValueError(f"w_down must have shape (n, d) with n = h.n_cols = {h.n_cols} (neuron-major: the "
                         f"transpose of nn.Linear's down weight), got {tuple(w_down.shape)}")
    if w_down.dtype != h.dtype:
        raise TypeError(f"w_down must have the same dtype as h ({h.dtype.name}), got {w_down.dtype.name}")
    out_dt = _out_dtype(out_dtype, h.dtype)
    wd64 = _f64(w_down)
    y = _twell_csr(h, F64) @ wd64
    if h.n_backup:
        hb = _f64(h.backup_values)
        y[h.backup_rows] = _active_product(hb, hb, wd64)
    return y.astype(out_dt, copy=False)


def _twell_stats(tw: TwELL) -> FFNStats:
    """Inference statistics of the activation TwELL ``tw``."""
    _, cols, vals = _twell_compact_entries(tw)
    _, b_cols = np.nonzero(tw.backup_values != 0)
    active = np.concatenate([cols[vals != 0], b_cols])
    nnz = int(active.shape[0])
    m, n = tw.shape
    return FFNStats(n_rows=m, n_cols=n, nnz=np.asarray(nnz, dtype=np.int64), l0=np.asarray(nnz / m, dtype=F64),
                    l1=None, neuron_counts=np.bincount(active, minlength=n).astype(np.int32),
                    n_backup_rows=tw.n_backup,
                    n_overflow_rows=int((tw.counts > tw.slots).any(axis=1).sum()), path="reference")


def gated_ffn(x, w_gate, w_up, w_down, *, tile_width: int = 256, compression: int = 8,
              dense_row_threshold: int | None = None, return_stats: bool = False, out_dtype=None):
    """Sparse gated FFN inference: :func:`gate_twell` then :func:`gated_up_down`.

    ``x``: (M, d); ``w_gate``, ``w_up``, ``w_down``: (n, d) neuron-major.  Returns
    ``y`` (M, d) in ``out_dtype`` (None: ``x.dtype``), or ``(y, FFNStats)``.
    """
    _check_ffn_args(x, {"w_gate": w_gate, "w_up": w_up, "w_down": w_down})
    return_stats = _check_bool(return_stats, "return_stats")
    out_dt = _out_dtype(out_dtype, x.dtype)
    gate = _relu_twell(x, w_gate, tile_width, compression, dense_row_threshold)
    y = gated_up_down(x, gate, w_up, w_down, out_dtype=out_dt)
    return (y, _twell_stats(gate)) if return_stats else y


def ffn(x, w_up, w_down, *, tile_width: int = 256, compression: int = 8, dense_row_threshold: int | None = None,
        return_stats: bool = False, out_dtype=None):
    """Sparse non-gated FFN inference: ``h = relu(x w_upᵀ)`` as TwELL, then :func:`down_projection`."""
    _check_ffn_args(x, {"w_up": w_up, "w_down": w_down})
    return_stats = _check_bool(return_stats, "return_stats")
    out_dt = _out_dtype(out_dtype, x.dtype)
    h = _relu_twell(x, w_up, tile_width, compression, dense_row_threshold)
    y = down_projection(h, w_down, out_dtype=out_dt)
    return (y, _twell_stats(h)) if return_stats else y


# --------------------------------------------------------------------------- training


def gated_ffn_forward(x, w_gate, w_up, w_down, *, l1_weight: float = 0.0, dense_row_threshold: int | None = 128,
                      out_dtype=None):
    """Training forward of the gated FFN through the Hybrid format.

    Returns ``(y, saved, stats)``: ``y`` (M, d) in ``out_dtype`` (None:
    ``x.dtype``); ``saved`` a :class:`SavedForBackward` whose gate Hybrid holds
    ``g`` (rounded to ``x.dtype``, stored in float64) with its neuron-major
    pattern, ``up_values`` = ``u`` at the compact entries and ``up_backup`` the
    dense ``u`` rows of the backup rows (both float64); ``stats`` with
    ``l1 = (1/M) Σ|h|``.  ``l1_weight`` λ is only stored for the backward.
    """
    m, d, n = _check_ffn_args(x, {"w_gate": w_gate, "w_up": w_up, "w_down": w_down})
    lam = _check_l1_weight(l1_weight)
    threshold = check_dense_row_threshold(dense_row_threshold, n)
    out_dt = _out_dtype(out_dtype, x.dtype)
    x64, wu64, wd64 = _f64(x), _f64(w_up), _f64(w_down)
    blocks = ((a, g.astype(F64)) for a, g in _relu_blocks(x64, _f64(w_gate), x.dtype))
    gate = _hybrid_from_blocks(blocks, m, n, threshold, F64, transpose=True)
    rows, cols, rb = _rows_of_csr(gate.row_ptr), gate.col_indices, gate.backup_rows
    up_values = _sddmm(x64, wu64, rows, cols)
    up_backup = x64[rb] @ wu64.T
    h = gate.values * up_values
    h_backup = np.where(gate.backup_values != 0, gate.backup_values * up_backup, 0.0)
    y = _csr(rows, cols, h, (m, n)) @ wd64
    y[rb] = _active_product(gate.backup_values, h_backup, wd64)
    _, b_cols = np.nonzero(gate.backup_values != 0)
    active = np.concatenate([cols, b_cols])
    nnz = int(active.shape[0])
    stats = FFNStats(n_rows=m, n_cols=n, nnz=np.asarray(nnz, dtype=np.int64), l0=np.asarray(nnz / m, dtype=F64),
                     l1=np.asarray((np.abs(h).sum() + np.abs(h_backup).sum()) / m, dtype=F64),
                     neuron_counts=np.bincount(active, minlength=n).astype(np.int32),
                     n_backup_rows=gate.n_backup, n_overflow_rows=None, path="reference")
    saved = SavedForBackward(x=x, w_gate=w_gate, w_up=w_up, w_down=w_down, gate=gate, up_values=up_values,
                             up_backup=up_backup, l1_weight=lam)
    return y.astype(out_dt, copy=False), saved, stats


def _check_saved(saved):
    if not isinstance(saved, SavedForBackward):
        raise TypeError(f"saved must be a SavedForBackward, got {type(saved).__name__}")
    if saved.consumed:
        raise ValueError("saved state already consumed by a backward; run the forward again")
    m, d, n = _check_ffn_args(saved.x, {"w_gate": saved.w_gate, "w_up": saved.w_up, "w_down": saved.w_down})
    gate = _check_hybrid(saved.gate, "saved.gate")
    if gate.shape != (m, n):
        raise ValueError(f"saved.gate must have shape (M, n) = ({m}, {n}), got {gate.shape}")
    B.check_array(saved.up_values, "saved.up_values", shape=(gate.nnz,))
    B.check_array(saved.up_backup, "saved.up_backup", shape=(gate.n_backup, n))
    _check_l1_weight(saved.l1_weight)
    return m, d, n


def gated_ffn_backward(saved, dy, out_dtype=None):
    """Backward of :func:`gated_ffn_forward`: ``(dx, dw_gate, dw_up, dw_down)``.

    With ``P`` the gate pattern, ``λ = saved.l1_weight``:
    ``dh = (dy w_downᵀ)|_P + (λ/M) sign(h)``, ``du = dh ⊙ g``, ``dz = dh ⊙ u``
    (on ``P``), ``dx = du w_up + dz w_gate``, ``dw_up = duᵀ x``,
    ``dw_gate = dzᵀ x``, ``dw_down = hᵀ dy``.  Compact rows use sparse products
    (the weight gradients through the neuron-major pattern), backup rows dense
    ones.  ``dy`` (M, d) must have ``x``'s dtype.  Gradients are returned in
    ``out_dtype`` (None: ``x.dtype``); ``saved`` is marked consumed.
    """
    m, d, n = _check_saved(saved)
    x = saved.x
    _host_matrix(dy, "dy")
    B.check_array(dy, "dy", shape=(m, d))
    if dy.dtype != x.dtype:
        raise TypeError(f"dy must have the same dtype as x ({x.dtype.name}), got {dy.dtype.name}")
    out_dt = _out_dtype(out_dtype, x.dtype)
    saved.consumed = True

    scale = saved.l1_weight / m
    x64, dy64 = _f64(x), _f64(dy)
    wg64, wu64, wd64 = _f64(saved.w_gate), _f64(saved.w_up), _f64(saved.w_down)
    gate = saved.gate
    tp = gate.transposed if gate.transposed is not None else transpose_pattern(gate)

    # compact rows: everything on the pattern
    rows, cols = _rows_of_csr(gate.row_ptr), gate.col_indices
    g, u = _f64(gate.values), _f64(saved.up_values)
    h = g * u
    dh = _sddmm(dy64, wd64, rows, cols) + scale * np.sign(h)
    du, dz = dh * g, dh * u
    dx = _csr(rows, cols, du, (m, n)) @ wu64 + _csr(rows, cols, dz, (m, n)) @ wg64

    def neuron_major(vals):  # (n, M) CSR of the same entries
        return sp.csr_array((vals[tp.positions], tp.row_indices, tp.col_ptr), shape=(n, m))

    dw_up = neuron_major(du) @ x64
    dw_gate = neuron_major(dz) @ x64
    dw_down = neuron_major(h) @ dy64

    # backup rows: dense, masked to the pattern
    rb = gate.backup_rows
    for a, b in _row_blocks(rb.shape[0], n):
        r = rb[a:b]
        gb, ub = _f64(gate.backup_values[a:b]), _f64(saved.up_backup[a:b])
        on = gb != 0
        hb = np.where(on, gb * ub, 0.0)
        dhb = np.where(on, dy64[r] @ wd64.T + scale * np.sign(hb), 0.0)
        dub = dhb * gb
        dzb = np.where(on, dhb * ub, 0.0)  # masks keep non-finite dy / u off the pattern
        dx[r] = _active_product(gb, dub, wu64) + _active_product(gb, dzb, wg64)
        j = np.flatnonzero(on.any(axis=0))  # neurons active in these rows: the only weight rows touched
        dw_up[j] += dub[:, j].T @ x64[r]
        dw_gate[j] += dzb[:, j].T @ x64[r]
        dw_down[j] += hb[:, j].T @ dy64[r]
    return tuple(a.astype(out_dt, copy=False) for a in (dx, dw_gate, dw_up, dw_down))
