"""CPU tests of the sparse formats (TwELL, Hybrid, neuron-major pattern) on the NumPy path.

Every layout is checked against an independent per-(row, tile) construction
written here with plain loops, and every conversion round-trips exactly.
Inputs are dyadic numbers (exact in bfloat16 / float16 / float32 / float64) so
that values can be compared bit for bit.
"""

from __future__ import annotations

import tracemalloc

import ml_dtypes
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

import twell
from twell import conversions as F
from twell import reference as R

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16), BF16]
TILE_WIDTHS = [32, 64, 128, 256]
F64 = np.float64


# --------------------------------------------------------------------------- generators (also used by test_reference)


def dyadic(rng, size, dtype, low=1, high=16):
    """Non-zero multiples of 1/8 with |v| < high/8: exact in every supported dtype."""
    v = rng.integers(low, high, size) * 0.125 * rng.choice([-1.0, 1.0], size)
    return np.asarray(v).astype(dtype)


def tiles_of(n, tile_width):
    return [(a, min(n, a + tile_width)) for a in range(0, n, tile_width)]


def sparse_dense(rng, m, n, tile_width, slots, density, dtype, specials=True):
    """Random sparse (M, n) matrix with, when they fit, special rows in random positions:
    an empty row, a tile at exactly capacity, a tile one over capacity, a full row,
    and a row with NaN and -0.0 entries."""
    out = np.zeros((m, n), dtype)
    mask = rng.random((m, n)) < density
    out[mask] = dyadic(rng, int(mask.sum()), dtype)
    if not specials:
        return out
    order = rng.permutation(m)
    tiles = tiles_of(n, tile_width)

    def fill(row, k):
        wide = [t for t in tiles if t[1] - t[0] >= k]
        if not wide:
            return
        a, b = wide[rng.integers(len(wide))]
        out[row, a:b] = 0
        out[row, a + rng.choice(b - a, size=k, replace=False)] = dyadic(rng, k, dtype)

    if m > 0:
        out[order[0]] = 0
    if m > 1:
        fill(order[1], slots)
    if m > 2:
        fill(order[2], slots + 1)
    if m > 3:
        out[order[3]] = dyadic(rng, n, dtype)
    if m > 4:
        cols = rng.choice(n, size=min(n, 3), replace=False)
        out[order[4], cols[:1]] = np.nan
        out[order[4], cols[1:]] = -0.0
    return out


def pick_threshold(kind, dense, rng):
    """dense_row_threshold edge values: None, 0, n, exactly some row's nnz, one below it."""
    n = dense.shape[1]
    nnz = (dense != 0).sum(axis=1)
    row_nnz = int(nnz[rng.integers(len(nnz))]) if len(nnz) else 0
    return {"none": None, "zero": 0, "n": n, "row": row_nnz, "below": max(row_nnz - 1, 0)}[kind]


n_cols = st.one_of(st.sampled_from([1, 31, 32, 33, 63, 255, 256, 257, 511, 600]), st.integers(1, 600))


@st.composite
def twell_problems(draw):
    tile_width = draw(st.sampled_from(TILE_WIDTHS))
    compression = draw(st.sampled_from([c for c in (1, 2, 4, 8, 16, 32) if tile_width % c == 0]))
    return dict(
        m=draw(st.integers(1, 64)), n=draw(n_cols), tile_width=tile_width, compression=compression,
        density=draw(st.sampled_from([0.0, 0.01, 0.05, 0.2, 0.6, 1.0])),
        dtype=draw(st.sampled_from(DTYPES)), seed=draw(st.integers(0, 2**32 - 1)),
        threshold=draw(st.sampled_from(["none", "zero", "n", "row", "below"])),
    )


def make_problem(p):
    rng = np.random.default_rng(p["seed"])
    slots = p["tile_width"] // p["compression"]
    dense = sparse_dense(rng, p["m"], p["n"], p["tile_width"], slots, p["density"], p["dtype"])
    return dense, pick_threshold(p["threshold"], dense, rng)


# --------------------------------------------------------------------------- independent expectations


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view(f"u{a.dtype.itemsize}")


def same_values(a, b):
    """Equal dtype and equal values (NaN == NaN, -0.0 == 0.0)."""
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(
        np.asarray(a, F64), np.asarray(b, F64), equal_nan=True)


def expected_twell(dense, tile_width, compression, threshold):
    m, n = dense.shape
    slots = tile_width // compression
    tiles = tiles_of(n, tile_width)
    counts = np.zeros((m, len(tiles)), np.int32)
    indices = np.zeros((m, len(tiles), slots), np.uint8)
    values = np.zeros((m, len(tiles), slots), dense.dtype)
    for r in range(m):
        for t, (a, b) in enumerate(tiles):
            nz = np.flatnonzero(dense[r, a:b] != 0)
            counts[r, t] = len(nz)
            k = min(len(nz), slots)
            indices[r, t, :k] = nz[:k]
            values[r, t, :k] = dense[r, a + nz[:k]]
    limit = n if threshold is None else threshold
    backup = [r for r in range(m) if (counts[r] > slots).any() or counts[r].sum() > limit]
    return counts, indices, values, np.array(backup, np.int32)


def check_twell_layout(tw, dense, tile_width, compression, threshold):
    counts, indices, values, backup = expected_twell(dense, tile_width, compression, threshold)
    m, n = dense.shape
    assert isinstance(tw, twell.TwELL)
    assert tw.shape == (m, n) and tw.tile_width == tile_width and tw.compression == compression
    assert tw.dense_row_threshold == (n if threshold is None else threshold)
    assert tw.dtype == dense.dtype
    np.testing.assert_array_equal(tw.counts, counts)
    np.testing.assert_array_equal(tw.indices, indices)
    np.testing.assert_array_equal(bits(tw.values), bits(values))
    np.testing.assert_array_equal(tw.backup_rows, backup)
    slot = np.full(m, -1, np.int32)
    slot[backup] = np.arange(len(backup))
    np.testing.assert_array_equal(tw.backup_slot, slot)
    assert tw.backup_values.dtype == dense.dtype
    np.testing.assert_array_equal(bits(tw.backup_values), bits(dense[backup]))


def expected_hybrid(dense, threshold):
    m, n = dense.shape
    limit = n if threshold is None else threshold
    row_ptr, cols, vals, backup = [0], [], [], []
    for r in range(m):
        nz = np.flatnonzero(dense[r] != 0)
        if len(nz) > limit:
            backup.append(r)
        else:
            cols.extend(nz)
            vals.extend(dense[r, nz])
        row_ptr.append(len(cols))
    return (np.array(row_ptr, np.int32), np.array(cols, np.int32), np.array(vals, dense.dtype).reshape(-1),
            np.array(backup, np.int32))


def check_hybrid_layout(hy, dense, threshold, transpose=True):
    row_ptr, cols, vals, backup = expected_hybrid(dense, threshold)
    m, n = dense.shape
    assert isinstance(hy, twell.Hybrid)
    assert hy.shape == (m, n) and hy.dtype == dense.dtype
    assert hy.dense_row_threshold == (n if threshold is None else threshold)
    np.testing.assert_array_equal(hy.row_ptr, row_ptr)
    np.testing.assert_array_equal(hy.col_indices, cols)
    np.testing.assert_array_equal(bits(hy.values), bits(vals))
    np.testing.assert_array_equal(hy.backup_rows, backup)
    slot = np.full(m, -1, np.int32)
    slot[backup] = np.arange(len(backup))
    np.testing.assert_array_equal(hy.backup_slot, slot)
    np.testing.assert_array_equal(bits(hy.backup_values), bits(dense[backup]))
    if not transpose:
        assert hy.transposed is None
        return
    check_transposed(hy)


def check_transposed(hy):
    """The neuron-major pattern against scipy's CSR -> CSC conversion of entry ids."""
    tp = hy.transposed
    assert isinstance(tp, twell.NeuronMajorPattern)
    ids = sp.csr_array((np.arange(hy.nnz, dtype=F64), hy.col_indices, hy.row_ptr), shape=hy.shape).tocsc()
    ids.sort_indices()
    np.testing.assert_array_equal(tp.col_ptr, ids.indptr)
    np.testing.assert_array_equal(tp.row_indices, ids.indices)
    np.testing.assert_array_equal(tp.positions, ids.data.astype(np.int64))
    assert tp.col_ptr.dtype == tp.row_indices.dtype == tp.positions.dtype == np.int32


def expected_csr(dense):
    """scipy CSR of the non-zeros of ``dense`` (bf16 / fp16 -> float32)."""
    dt = dense.dtype if dense.dtype in (np.float32, np.float64) else np.dtype(np.float32)
    return sp.csr_array(np.asarray(dense, dt))


def check_csr(c, dense):
    ref = expected_csr(dense)
    assert isinstance(c, sp.csr_array)
    assert c.shape == dense.shape and c.dtype == ref.dtype
    assert c.has_sorted_indices
    np.testing.assert_array_equal(c.indptr, ref.indptr)
    np.testing.assert_array_equal(c.indices, ref.indices)
    np.testing.assert_array_equal(bits(c.data), bits(ref.data))
    assert not np.any(c.data == 0)


def duplicated_coo(dense, rng):
    """COO float64 holding every non-zero split into two halves, plus explicit zeros, shuffled."""
    rows, cols = np.nonzero(dense != 0)
    v = np.asarray(dense[rows, cols], F64)
    zr = rng.integers(0, dense.shape[0], 5)
    zc = rng.integers(0, dense.shape[1], 5)
    r = np.concatenate([rows, rows, zr])
    c = np.concatenate([cols, cols, zc])
    d = np.concatenate([v / 2, v / 2, np.zeros(5)])
    perm = rng.permutation(len(r))
    return sp.coo_array((d[perm], (r[perm], c[perm])), shape=dense.shape)


def noncanonical_csr(dense, rng):
    """float64 CSR with shuffled column order inside rows, every non-zero split in two halves, and a
    pair of entries cancelling to zero in some rows (scipy does not canonicalise on construction)."""
    rows, cols = np.nonzero(dense != 0)
    v = np.asarray(dense[rows, cols], F64)
    zr = rng.integers(0, dense.shape[0], 3)
    zc = rng.integers(0, dense.shape[1], 3)
    r = np.concatenate([rows, rows, zr, zr])
    c = np.concatenate([cols, cols, zc, zc])
    d = np.concatenate([v / 2, v / 2, np.ones(3), -np.ones(3)])
    # cancelling pairs only on positions that are zero in dense
    ok = np.ones(len(r), bool)
    ok[2 * len(rows):] = np.tile(dense[zr, zc] == 0, 2)
    r, c, d = r[ok], c[ok], d[ok]
    order = np.lexsort((rng.random(len(r)), r))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=dense.shape[0]))])
    m = sp.csr_array((d[order], c[order], indptr), shape=dense.shape)
    assert not m.has_canonical_format or len(r) < 2
    return m


def assert_same_twell(a, b):
    for f in ("counts", "indices", "backup_slot", "backup_rows"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(bits(a.values), bits(b.values))
    assert same_values(a.backup_values, b.backup_values)
    assert (a.n_cols, a.tile_width, a.dense_row_threshold) == (b.n_cols, b.tile_width, b.dense_row_threshold)


# --------------------------------------------------------------------------- TwELL


@given(twell_problems())
def test_pack_twell_layout_and_round_trip(p):
    dense, thr = make_problem(p)
    tw = F.pack_twell(dense, p["tile_width"], p["compression"], thr)
    check_twell_layout(tw, dense, p["tile_width"], p["compression"], thr)
    assert same_values(F.unpack_twell(tw), dense)
    assert same_values(F.unpack_twell(tw), dense)
    np.testing.assert_array_equal(tw.row_nnz(), (dense != 0).sum(axis=1))
    direct = R.pack_twell(dense, p["tile_width"], p["compression"], thr)
    assert_same_twell(direct, tw)


@given(twell_problems())
def test_twell_scipy_round_trip(p):
    dense, thr = make_problem(p)
    rng = np.random.default_rng(p["seed"] + 1)
    tw = F.pack_twell(dense, p["tile_width"], p["compression"], thr)
    check_csr(F.twell_to_scipy(tw), dense)
    check_csr(F.twell_to_scipy(tw), dense)
    ref = expected_csr(dense)
    for matrix in (ref, sp.csr_matrix(ref), ref.tocsc(), duplicated_coo(dense, rng), noncanonical_csr(dense, rng)):
        back = F.twell_from_scipy(matrix, p["tile_width"], p["compression"], thr, dtype=dense.dtype)
        check_twell_layout(back, np.where(dense == 0, 0, dense).astype(dense.dtype), p["tile_width"],
                           p["compression"], thr)
        assert same_values(F.unpack_twell(back), dense)


def test_twell_from_scipy_dtype_default_and_cast():
    rng = np.random.default_rng(3)
    dense = sparse_dense(rng, 9, 70, 32, 4, 0.1, np.float32)
    tw = F.twell_from_scipy(sp.csr_array(dense), 32, 8)
    assert tw.dtype == np.float32 and same_values(F.unpack_twell(tw), dense)
    # values that round to zero in the target dtype are dropped (not stored as zeros)
    m = sp.csr_array(np.array([[1e-30, 2.0, 0.0, 3.0]]))
    tw16 = F.twell_from_scipy(m, 32, 8, dtype="float16")
    np.testing.assert_array_equal(tw16.counts, [[2]])
    np.testing.assert_array_equal(tw16.indices[0, 0, :2], [1, 3])
    assert F.unpack_twell(tw16).dtype == np.float16


def test_twell_capacity_edges_exact():
    """Exactly `slots` non-zeros in a tile stays compact; one more routes the row to the backup."""
    t, c = 32, 8  # 4 slots
    dense = np.zeros((3, 70), np.float32)
    dense[0, [1, 5, 9, 31]] = [1, 2, 3, 4]  # at capacity in tile 0
    dense[1, [33, 34, 40, 50, 63]] = 1  # one over in tile 1
    dense[2, [64, 65, 66, 67]] = [5, 6, 7, 8]  # at capacity in the partial last tile (6 columns)
    tw = F.pack_twell(dense, t, c)
    np.testing.assert_array_equal(tw.backup_rows, [1])
    np.testing.assert_array_equal(tw.counts, [[4, 0, 0], [0, 5, 0], [0, 0, 4]])
    np.testing.assert_array_equal(tw.indices[0, 0], [1, 5, 9, 31])
    np.testing.assert_array_equal(tw.indices[2, 2], [0, 1, 2, 3])
    # the backup row's slots hold its first 4 entries of the overflowing tile
    np.testing.assert_array_equal(tw.indices[1, 1], [1, 2, 8, 18])
    assert np.array_equal(F.unpack_twell(tw), dense)
    # threshold: row 0 has 4 non-zeros -> threshold 4 keeps it compact, 3 routes it
    np.testing.assert_array_equal(F.pack_twell(dense, t, c, 4).backup_rows, [1])
    np.testing.assert_array_equal(F.pack_twell(dense, t, c, 3).backup_rows, [0, 1, 2])


def test_twell_all_zero_and_empty():
    for m, n in [(5, 300), (1, 1), (0, 40)]:
        dense = np.zeros((m, n), np.float64)
        tw = F.pack_twell(dense, 64, 4, 0)
        assert tw.shape == (m, n) and tw.n_backup == 0
        assert tw.counts.shape == (m, -(-n // 64)) and not tw.counts.any()
        assert not tw.indices.any() and not tw.values.any()
        assert same_values(F.unpack_twell(tw), dense)
        c = F.twell_to_scipy(tw)
        assert c.shape == (m, n) and c.nnz == 0
        assert_same_twell(F.twell_from_scipy(sp.csr_array((m, n)), 64, 4, 0, dtype=np.float64), tw)


def test_twell_nan_counts_as_nonzero():
    dense = np.zeros((2, 40), np.float32)
    dense[0, 3] = np.nan
    dense[1, 7] = -0.0
    tw = F.pack_twell(dense, 32, 8)
    np.testing.assert_array_equal(tw.counts, [[1, 0], [0, 0]])
    assert np.isnan(tw.values[0, 0, 0]) and tw.indices[0, 0, 0] == 3
    c = F.twell_to_scipy(tw)
    assert c.nnz == 1 and np.isnan(c.data[0])


def test_twell_from_scipy_does_not_densify():
    """A (1000, 100000) float64 matrix would need 800 MB dense; building must stay small."""
    m, n, per_row = 1000, 100_000, 8
    rng = np.random.default_rng(0)
    n_tiles = -(-n // 256)
    tiles = np.stack([rng.choice(n_tiles - 1, per_row, replace=False) for _ in range(m)])
    rows = np.repeat(np.arange(m), per_row)
    cols = (tiles * 256 + rng.integers(0, 256, tiles.shape)).reshape(-1)
    cols[:3] = [0, 1, 2]  # row 0 overflows its first tile (1 slot) -> one dense backup row
    matrix = sp.coo_array((np.ones(len(rows)), (rows, cols)), shape=(m, n))
    tracemalloc.start()
    try:
        tw = F.twell_from_scipy(matrix, 256, 256)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100e6, f"peak {peak / 1e6:.0f} MB"
    np.testing.assert_array_equal(tw.backup_rows, [0])
    assert tw.row_nnz().sum() == len(np.unique(rows * n + cols))


# --------------------------------------------------------------------------- Hybrid


@given(twell_problems(), st.booleans())
def test_pack_hybrid_layout_and_round_trip(p, transpose):
    dense, thr = make_problem(p)
    hy = F.pack_hybrid(dense, thr, transpose)
    check_hybrid_layout(hy, dense, thr, transpose)
    assert same_values(F.unpack_hybrid(hy), dense)
    assert same_values(F.unpack_hybrid(hy), dense)
    if not transpose:
        # transpose_pattern on its own (public dispatcher) matches the scipy conversion too
        tp = F.transpose_pattern(hy)
        check_transposed(twell.Hybrid(hy.row_ptr, hy.col_indices, hy.values, hy.backup_slot, hy.backup_rows,
                                      hy.backup_values, hy.n_cols, hy.dense_row_threshold, transposed=tp))


@given(twell_problems())
def test_hybrid_scipy_round_trip(p):
    dense, thr = make_problem(p)
    rng = np.random.default_rng(p["seed"] + 2)
    hy = F.pack_hybrid(dense, thr)
    check_csr(F.hybrid_to_scipy(hy), dense)
    check_csr(F.hybrid_to_scipy(hy), dense)
    ref = expected_csr(dense)
    for matrix in (ref, sp.csr_matrix(ref), duplicated_coo(dense, rng), noncanonical_csr(dense, rng)):
        back = F.hybrid_from_scipy(matrix, thr, True, dtype=dense.dtype)
        check_hybrid_layout(back, np.where(dense == 0, 0, dense).astype(dense.dtype), thr)
        assert same_values(F.unpack_hybrid(back), dense)


def test_hybrid_threshold_edges_and_default():
    dense = np.zeros((4, 300), np.float32)
    dense[0, :128] = 1  # exactly the default threshold: compact
    dense[1, :129] = 2  # one over: backup
    dense[3, 299] = 3
    hy = F.pack_hybrid(dense)
    np.testing.assert_array_equal(hy.backup_rows, [1])
    np.testing.assert_array_equal(hy.row_ptr, [0, 128, 128, 128, 129])
    np.testing.assert_array_equal(hy.transposed.col_ptr[[0, 1, 128, 129, 299, 300]], [0, 1, 128, 128, 128, 129])
    assert np.array_equal(F.unpack_hybrid(hy), dense)
    np.testing.assert_array_equal(F.pack_hybrid(dense, 0).backup_rows, [0, 1, 3])


def test_hybrid_all_zero_and_empty():
    for m, n in [(3, 10), (0, 5)]:
        hy = F.pack_hybrid(np.zeros((m, n)), 0)
        assert hy.nnz == 0 and hy.n_backup == 0 and hy.shape == (m, n)
        np.testing.assert_array_equal(hy.transposed.col_ptr, np.zeros(n + 1))
        assert same_values(F.unpack_hybrid(hy), np.zeros((m, n)))
        assert F.hybrid_to_scipy(hy).nnz == 0


def test_hybrid_from_scipy_does_not_densify():
    m, n = 20_000, 100_000  # 16 GB dense
    rng = np.random.default_rng(1)
    matrix = sp.random_array((m, n), density=1e-5, format="csr", rng=rng)
    tracemalloc.start()
    try:
        hy = F.hybrid_from_scipy(matrix, 128)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50e6, f"peak {peak / 1e6:.0f} MB"
    assert hy.nnz == matrix.nnz and hy.n_backup == 0
    check_transposed(hy)


# --------------------------------------------------------------------------- bad input


GOOD = np.ones((3, 40), np.float32)


@pytest.mark.parametrize("call, exc, match", [
    (lambda f: f.pack_twell(np.ones(4, np.float32)), ValueError, "dense must be 2-D"),
    (lambda f: f.pack_twell(np.ones((2, 4), np.int32)), TypeError, "dense must have dtype"),
    (lambda f: f.pack_twell(np.ones((2, 0), np.float32)), ValueError, "dense must have at least one column"),
    (lambda f: f.pack_twell(GOOD, 48), ValueError, "tile_width must be one of"),
        (lambda f: f.pack_twell(GOOD, 96), ValueError, "tile_width must be one of"),
    (lambda f: f.pack_twell(GOOD, 512), ValueError, "tile_width must be <= 256"),
    (lambda f: f.pack_twell(GOOD, 16), ValueError, "tile_width must be >= 32"),
    (lambda f: f.pack_twell(GOOD, 64.0), TypeError, "tile_width must be an integer"),
    (lambda f: f.pack_twell(GOOD, 64, 3), ValueError, "compression must divide"),
    (lambda f: f.pack_twell(GOOD, 64, 0), ValueError, "compression must be >= 1"),
    (lambda f: f.pack_twell(GOOD, 64, 8, -1), ValueError, "dense_row_threshold must be >= 0"),
    (lambda f: f.pack_twell(GOOD, 64, 8, 1.5), TypeError, "dense_row_threshold must be an integer"),
    (lambda f: f.pack_twell(GOOD, 64, 8, True), TypeError, "dense_row_threshold must be an integer"),
    (lambda f: f.unpack_twell(GOOD), TypeError, "tw must be a TwELL"),
    (lambda f: f.twell_to_scipy(F.pack_hybrid(GOOD)), TypeError, "tw must be a TwELL"),
    (lambda f: f.twell_from_scipy(GOOD), TypeError, "matrix must be a scipy.sparse"),
    (lambda f: f.twell_from_scipy(sp.csr_array(np.ones((2, 3), np.int64))), TypeError, "matrix has dtype int64"),
    (lambda f: f.twell_from_scipy(sp.csr_array(GOOD), dtype=np.int32), TypeError, "dtype must be a float dtype"),
    (lambda f: f.twell_from_scipy(sp.csr_array(GOOD), dtype="nonsense"), TypeError, "dtype must be a float dtype"),
    (lambda f: f.twell_from_scipy(sp.coo_array(np.ones(3))), ValueError, "matrix must be 2-D"),
    (lambda f: f.twell_from_scipy(sp.csr_array(GOOD), 40), ValueError, "tile_width must be one of"),
    (lambda f: f.twell_from_scipy(sp.csr_array(GOOD), 32, 5), ValueError, "compression must divide"),
    (lambda f: f.twell_from_scipy(sp.csr_array(GOOD), 32, 8, -2), ValueError, "dense_row_threshold"),
    (lambda f: f.pack_hybrid(np.ones((2, 2, 2), np.float32)), ValueError, "dense must be 2-D"),
    (lambda f: f.pack_hybrid(np.ones((2, 2), bool)), TypeError, "dense must have dtype"),
    (lambda f: f.pack_hybrid(GOOD, -1), ValueError, "dense_row_threshold must be >= 0"),
    (lambda f: f.pack_hybrid(GOOD, 4, "yes"), TypeError, "transpose must be a bool"),
    (lambda f: f.unpack_hybrid(F.pack_twell(GOOD)), TypeError, "hy must be a Hybrid"),
    (lambda f: f.hybrid_to_scipy(GOOD), TypeError, "hy must be a Hybrid"),
    (lambda f: f.hybrid_from_scipy([[1.0]]), TypeError, "matrix must be a scipy.sparse"),
    (lambda f: f.hybrid_from_scipy(sp.csr_array(GOOD), 4, 1), TypeError, "transpose must be a bool"),
    (lambda f: f.hybrid_from_scipy(sp.csr_array(GOOD), 4.0), TypeError, "dense_row_threshold must be an integer"),
    (lambda f: f.transpose_pattern(F.pack_twell(GOOD)), TypeError, "hy must be a Hybrid"),
], ids=lambda v: v if isinstance(v, str) else None)
@pytest.mark.parametrize("module", [F, R], ids=["conversions", "reference"])
def test_bad_input(module, call, exc, match):
    with pytest.raises(exc, match=match):
        call(module)


@pytest.mark.parametrize("fn", [R.pack_twell, R.pack_hybrid])
def test_reference_rejects_non_arrays(fn):
    with pytest.raises(TypeError, match="dense must be an array"):
        fn([[1.0, 0.0]])
    with pytest.raises(TypeError, match="dense must be a numpy.ndarray"):
        fn(sp.csr_array(GOOD))


def test_containers_reject_malformed_contents():
    tw = F.pack_twell(np.eye(3, 40, k=33, dtype=np.float32), 32, 8)

    def twell_with(**kw):
        fields = dict(counts=tw.counts, indices=tw.indices, values=tw.values, backup_slot=tw.backup_slot,
                      backup_rows=tw.backup_rows, backup_values=tw.backup_values)
        fields.update(kw)
        return twell.TwELL(n_cols=tw.n_cols, tile_width=32, **fields)

    with pytest.raises(ValueError, match="indices must be tile-local columns inside the tile and below n_cols"):
        twell_with(indices=np.full_like(tw.indices, 20))
    with pytest.raises(ValueError, match="counts must be >= 0"):
        twell_with(counts=tw.counts - 2)
    with pytest.raises(ValueError, match="more non-zeros than slots .* values would be lost"):
        twell_with(counts=tw.counts + 5)
    with pytest.raises(ValueError, match="backup_slot must be -1 for compact rows"):
        twell_with(backup_slot=np.zeros_like(tw.backup_slot))
    with pytest.raises(ValueError, match="strictly ascending within the stored slots"):
        twell.TwELL(np.full((1, 2), 2, np.int32), np.zeros((1, 2, 2), np.uint8), np.ones((1, 2, 2), np.float32),
                    np.full(1, -1, np.int32), np.zeros(0, np.int32), np.zeros((0, 40), np.float32), 40, 32)

    hy = F.pack_hybrid(np.eye(3, 40, dtype=np.float32))

    def hybrid_with(**kw):
        fields = dict(row_ptr=hy.row_ptr, col_indices=hy.col_indices, values=hy.values, backup_slot=hy.backup_slot,
                      backup_rows=hy.backup_rows, backup_values=hy.backup_values)
        fields.update(kw)
        return twell.Hybrid(n_cols=40, dense_row_threshold=128, **fields)

    ptr = hy.row_ptr.copy()
    ptr[-1] = 1
    with pytest.raises(ValueError, match="row_ptr must start at 0, be non-decreasing and end at nnz"):
        hybrid_with(row_ptr=ptr)
    with pytest.raises(ValueError, match="col_indices must be in"):
        hybrid_with(col_indices=hy.col_indices + 40)
    with pytest.raises(ValueError, match="strictly ascending within a row"):
        hybrid_with(row_ptr=np.array([0, 3, 3, 3], np.int32), col_indices=np.array([5, 5, 7], np.int32))
    with pytest.raises(ValueError, match="backup rows must have empty compact ranges"):
        hybrid_with(backup_slot=np.array([0, -1, -1], np.int32), backup_rows=np.array([0], np.int32),
                    backup_values=np.zeros((1, 40), np.float32))