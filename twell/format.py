"""Sparse activation formats: TwELL (inference) and Hybrid (training).

The exact layout of every array is specified in ``docs/format.md``; this module
holds the containers and their validation and knows nothing of how they are built
(pack / unpack / SciPy conversions: :mod:`twell.conversions`).  Containers are plain
dataclasses of arrays and are array-module agnostic: the arrays are all NumPy or
all CuPy.

No value is ever dropped: a row whose tile overflows (TwELL) or whose non-zero
count exceeds ``dense_row_threshold`` is routed whole to the dense backup.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from . import _backend as B

__all__ = [
    "TwELL",
    "Hybrid",
    "NeuronMajorPattern",
    "twell_layout",
    "check_dense_row_threshold",
    "DEFAULT_TILE_WIDTH",
    "DEFAULT_COMPRESSION",
    "TILE_WIDTHS",
]

DEFAULT_TILE_WIDTH = 256
DEFAULT_COMPRESSION = 8
#: Largest tile width: tile-local column indices are stored as uint8.
MAX_TILE_WIDTH = 256
#: Supported tile widths (one warp covers a tile, 1/2/4/8 columns per lane).
TILE_WIDTHS = (32, 64, 128, 256)


def twell_layout(n_cols: int, tile_width: int = DEFAULT_TILE_WIDTH, compression: int = DEFAULT_COMPRESSION):
    """Validate TwELL layout parameters and return ``(n_tiles, slots)``.

    Rules: ``tile_width`` is one of 32, 64, 128, 256 (a warp covers a tile with 1, 2, 4 or 8 columns per
    lane, and tile-local indices
    are uint8); ``compression`` is a positive integer dividing ``tile_width``;
    ``slots = tile_width // compression`` is the per-tile capacity.
    """
    n_cols = B.check_int(n_cols, "n_cols", minimum=1)
    tile_width = B.check_int(tile_width, "tile_width", minimum=32, maximum=MAX_TILE_WIDTH)
    if tile_width not in TILE_WIDTHS:
        raise ValueError(f"tile_width must be one of {TILE_WIDTHS}, got {tile_width}")
    compression = B.check_int(compression, "compression", minimum=1)
    if tile_width % compression:
        raise ValueError(f"compression must divide tile_width={tile_width}, got {compression}")
    n_tiles = -(-n_cols // tile_width)
    return n_tiles, tile_width // compression


def check_dense_row_threshold(value, n_cols: int):
    """Validate ``dense_row_threshold`` (None, or an int >= 0); return an int (None -> n_cols)."""
    if value is None:
        return int(n_cols)
    return B.check_int(value, "dense_row_threshold", minimum=0)


def _xp_of(*arrays):
    return B.array_module(*arrays)


def _to_host(a):
    return a if isinstance(a, np.ndarray) else a.get()


@dataclass(frozen=True)
class TwELL:
    """Tile-wise ELLPACK matrix of shape ``(M, n_cols)`` with a dense backup.

    Attributes (``S = slots = tile_width // compression``, ``NT = n_tiles``)
    ----------
    counts : int32 (M, NT)
        True number of non-zeros of each (row, tile); may exceed ``S``.
    indices : uint8 (M, NT, S)
        Tile-local column of each stored entry (global column =
        ``tile * tile_width + index``), ascending in the first ``min(count, S)``
        slots; unused slots hold 0.
    values : float (M, NT, S)
        Value of each stored entry; unused slots hold 0.
    backup_slot : int32 (M,)
        -1 for a row held in the compact part, else its position in
        ``backup_rows``.
    backup_rows : int32 (R,)
        Ascending ids of the rows routed to the dense backup (a tile
        overflowed, or the row has more than ``dense_row_threshold`` non-zeros).
    backup_values : float (R, n_cols)
        The complete dense rows of the backup rows.  For those rows the compact
        slots are not authoritative.
    n_cols : int
        Number of columns ``n``.
    tile_width : int
        Columns per tile ``T``.
    dense_row_threshold : int
        Rows with more non-zeros than this were routed to the backup
        (``n_cols`` means "only on tile overflow").
    """

    counts: object
    indices: object
    values: object
    backup_slot: object
    backup_rows: object
    backup_values: object
    n_cols: int
    tile_width: int = DEFAULT_TILE_WIDTH
    dense_row_threshold: int | None = None

    def __post_init__(self):
        if self.dense_row_threshold is None:
            object.__setattr__(self, "dense_row_threshold", int(self.n_cols))
        self.validate()

    # -- derived sizes ---------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return int(self.counts.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, int(self.n_cols))

    @property
    def n_tiles(self) -> int:
        return int(self.counts.shape[1])

    @property
    def slots(self) -> int:
        return int(self.indices.shape[2])

    @property
    def compression(self) -> int:
        return self.tile_width // self.slots

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def n_backup(self) -> int:
        return int(self.backup_rows.shape[0])

    @property
    def xp(self):
        return _xp_of(self.counts)

    def validate(self):
        """Check shapes and dtypes of all arrays (cheap; no data scan)."""
        B.check_array(self.indices, "indices", ndim=3, dtype=np.uint8)
        slots = int(self.indices.shape[2])
        if slots < 1 or self.tile_width % slots:
            raise ValueError(f"indices.shape[2] (slots) must be >= 1 and divide tile_width={self.tile_width}, "
                             f"got {slots}")
        n_tiles, _ = twell_layout(self.n_cols, self.tile_width, self.tile_width // slots)
        B.check_array(self.counts, "counts", ndim=2, dtype=np.int32)
        m = self.counts.shape[0]
        B.check_array(self.counts, "counts", shape=(m, n_tiles))
        B.check_array(self.indices, "indices", shape=(m, n_tiles, self.indices.shape[2]))
        B.check_array(self.values, "values", shape=tuple(self.indices.shape))
        B.check_float_dtype(self.values, "values")
        B.check_array(self.backup_slot, "backup_slot", shape=(m,), dtype=np.int32)
        B.check_array(self.backup_rows, "backup_rows", ndim=1, dtype=np.int32)
        r = self.backup_rows.shape[0]
        B.check_array(self.backup_values, "backup_values", shape=(r, self.n_cols), dtype=self.values.dtype)
        _xp_of(self.counts, self.indices, self.values, self.backup_slot, self.backup_rows, self.backup_values)
        B.check_int(self.dense_row_threshold, "dense_row_threshold", minimum=0)
        if isinstance(self.counts, np.ndarray):
            self.check_contents()

    def check_contents(self):
        """Check the data invariants (docs/format.md); raise ``ValueError`` naming the broken one.

        Host containers are checked on construction; device containers only
        when this is called (it copies the arrays to the host).
        """
        _check_twell_contents(self.host() if not isinstance(self.counts, np.ndarray) else self)

    def host(self) -> "TwELL":
        """A copy with every array on the host (NumPy)."""
        return dataclasses.replace(self, **{f: _to_host(getattr(self, f)) for f in _TWELL_ARRAYS})

    def row_nnz(self):
        """Exact non-zeros per row, int64 (M,): compact counts, backup rows counted from their dense row."""
        nnz = self.counts.sum(axis=1, dtype=np.int64)
        if self.n_backup:
            nnz[self.backup_rows] = (self.backup_values != 0).sum(axis=1)
        return nnz


_TWELL_ARRAYS = ("counts", "indices", "values", "backup_slot", "backup_rows", "backup_values")


@dataclass(frozen=True)
class NeuronMajorPattern:
    """Column-major (neuron-major) view of a Hybrid's compact pattern.

    Attributes (``nnz`` = number of compact entries)
    ----------
    col_ptr : int32 (n_cols + 1,)
        Entries of column ``j`` are ``col_ptr[j]:col_ptr[j+1]``.
    row_indices : int32 (nnz,)
        Row of each entry, ascending within a column.
    positions : int32 (nnz,)
        Index of the same entry in the row-major ``col_indices`` / ``values``.
    """

    col_ptr: object
    row_indices: object
    positions: object

    def __post_init__(self):
        B.check_array(self.col_ptr, "col_ptr", ndim=1, dtype=np.int32)
        B.check_array(self.row_indices, "row_indices", ndim=1, dtype=np.int32)
        B.check_array(self.positions, "positions", shape=(self.row_indices.shape[0],), dtype=np.int32)

    @property
    def n_cols(self) -> int:
        return int(self.col_ptr.shape[0]) - 1


@dataclass(frozen=True)
class Hybrid:
    """Hybrid training format of shape ``(M, n_cols)``: CSR compact rows + dense backup rows.

    Attributes (``nnz`` = non-zeros of the compact rows, ``R`` = backup rows)
    ----------
    row_ptr : int32 (M + 1,)
        CSR offsets of the compact rows; a backup row has an empty range.
    col_indices : int32 (nnz,)
        Global column of each compact entry, ascending within a row.
    values : float (nnz,)
        Value of each compact entry.
    backup_slot : int32 (M,)
        -1 for a compact row, else its position in ``backup_rows``.
    backup_rows : int32 (R,)
        Ascending ids of the rows with more than ``dense_row_threshold`` non-zeros.
    backup_values : float (R, n_cols)
        Their dense rows.
    n_cols : int
    dense_row_threshold : int
        Rows with more non-zeros than this are dense-backup rows.
    transposed : NeuronMajorPattern or None
        Neuron-major pattern of the compact part (see :func:`transpose_pattern`).
    """

    row_ptr: object
    col_indices: object
    values: object
    backup_slot: object
    backup_rows: object
    backup_values: object
    n_cols: int
    dense_row_threshold: int
    transposed: NeuronMajorPattern | None = None

    def __post_init__(self):
        self.validate()

    @property
    def n_rows(self) -> int:
        return int(self.row_ptr.shape[0]) - 1

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, int(self.n_cols))

    @property
    def nnz(self) -> int:
        return int(self.col_indices.shape[0])

    @property
    def n_backup(self) -> int:
        return int(self.backup_rows.shape[0])

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def xp(self):
        return _xp_of(self.row_ptr)

    def validate(self):
        B.check_int(self.n_cols, "n_cols", minimum=1)
        B.check_array(self.row_ptr, "row_ptr", ndim=1, dtype=np.int32)
        if self.row_ptr.shape[0] < 1:
            raise ValueError("row_ptr must have M + 1 >= 1 entries")
        m = self.row_ptr.shape[0] - 1
        B.check_array(self.col_indices, "col_indices", ndim=1, dtype=np.int32)
        B.check_array(self.values, "values", shape=(self.col_indices.shape[0],))
        B.check_float_dtype(self.values, "values")
        B.check_array(self.backup_slot, "backup_slot", shape=(m,), dtype=np.int32)
        B.check_array(self.backup_rows, "backup_rows", ndim=1, dtype=np.int32)
        B.check_array(self.backup_values, "backup_values", shape=(self.backup_rows.shape[0], self.n_cols),
                      dtype=self.values.dtype)
        B.check_int(self.dense_row_threshold, "dense_row_threshold", minimum=0)
        if self.transposed is not None:
            if self.transposed.n_cols != self.n_cols:
                raise ValueError("transposed.col_ptr must have n_cols + 1 entries")
            if self.transposed.row_indices.shape[0] != self.col_indices.shape[0]:
                raise ValueError("transposed pattern must have as many entries as col_indices")
        _xp_of(self.row_ptr, self.col_indices, self.values, self.backup_slot, self.backup_rows,
               self.backup_values)
        if isinstance(self.row_ptr, np.ndarray):
            self.check_contents()

    def check_contents(self):
        """Check the data invariants (docs/format.md); raise ``ValueError`` naming the broken one.

        Host containers are checked on construction; device containers only
        when this is called (it copies the arrays to the host).
        """
        _check_hybrid_contents(self.host() if not isinstance(self.row_ptr, np.ndarray) else self)

    def host(self) -> "Hybrid":
        arrays = {f: _to_host(getattr(self, f)) for f in _HYBRID_ARRAYS}
        t = self.transposed
        if t is not None:
            t = NeuronMajorPattern(_to_host(t.col_ptr), _to_host(t.row_indices), _to_host(t.positions))
        return dataclasses.replace(self, transposed=t, **arrays)


_HYBRID_ARRAYS = ("row_ptr", "col_indices", "values", "backup_slot", "backup_rows", "backup_values")


# --------------------------------------------------------------------------- content checks


def _check_routing(m: int, backup_slot, backup_rows):
    r = backup_rows.shape[0]
    if r and (backup_rows.min() < 0 or backup_rows.max() >= m or np.any(np.diff(backup_rows) <= 0)):
        raise ValueError("backup_rows must be strictly ascending row ids in [0, M)")
    want = np.full(m, -1, dtype=np.int64)
    want[backup_rows] = np.arange(r)
    if not np.array_equal(backup_slot, want):
        raise ValueError("backup_slot must be -1 for compact rows and the row's position in backup_rows otherwise")


def _check_twell_contents(tw):
    m, nt, s = tw.indices.shape
    counts = tw.counts
    if counts.size and counts.min() < 0:
        raise ValueError("counts must be >= 0")
    _check_routing(m, tw.backup_slot, tw.backup_rows)
    compact = tw.backup_slot < 0
    if np.any(counts[compact] > s):
        raise ValueError("a compact row has a tile with more non-zeros than slots (it must be a backup row): "
                         "values would be lost")
    stored = np.arange(s)[None, None, :] < np.minimum(counts, s)[:, :, None]
    idx = tw.indices.astype(np.int64)
    cols = idx + (np.arange(nt) * tw.tile_width)[None, :, None]
    if np.any(stored & ((idx >= tw.tile_width) | (cols >= tw.n_cols))):
        raise ValueError("indices must be tile-local columns inside the tile and below n_cols")
    if s > 1 and np.any(stored[:, :, 1:] & (idx[:, :, 1:] <= idx[:, :, :-1])):
        raise ValueError("indices must be strictly ascending within the stored slots of a tile")


def _check_hybrid_contents(hy):
    ptr = hy.row_ptr.astype(np.int64)
    if ptr[0] != 0 or ptr[-1] != hy.nnz or np.any(np.diff(ptr) < 0):
        raise ValueError(f"row_ptr must start at 0, be non-decreasing and end at nnz = {hy.nnz}")
    _check_routing(hy.n_rows, hy.backup_slot, hy.backup_rows)
    if hy.n_backup and np.any(ptr[hy.backup_rows + 1] != ptr[hy.backup_rows]):
        raise ValueError("backup rows must have empty compact ranges in row_ptr")
    cols = hy.col_indices.astype(np.int64)
    if hy.nnz and (cols.min() < 0 or cols.max() >= hy.n_cols):
        raise ValueError(f"col_indices must be in [0, n_cols = {hy.n_cols})")
    if hy.nnz > 1:
        row_of = np.repeat(np.arange(hy.n_rows), np.diff(ptr))
        same_row = row_of[1:] == row_of[:-1]
        if np.any(same_row & (cols[1:] <= cols[:-1])):
            raise ValueError("col_indices must be strictly ascending within a row")
    t = hy.transposed
    if t is not None:
        cp_ = t.col_ptr.astype(np.int64)
        if cp_[0] != 0 or cp_[-1] != hy.nnz or np.any(np.diff(cp_) < 0):
            raise ValueError(f"transposed.col_ptr must start at 0, be non-decreasing and end at nnz = {hy.nnz}")
        if not np.array_equal(np.sort(t.positions), np.arange(hy.nnz)):
            raise ValueError("transposed.positions must be a permutation of the entries")
