"""GPU pack / unpack kernels vs the NumPy reference (marker ``gpu``; skipped without a device)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import twell
from twell import reference

pytestmark = pytest.mark.gpu

DTYPES = ["bfloat16", "float16", "float32"]


def _np_dtype(name):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _random_sparse(rng, m, n, density, dtype, full_rows=(), empty_rows=()):
    a = rng.standard_normal((m, n)).astype(np.float32)
    a[rng.random((m, n)) >= density] = 0
    for r in full_rows:
        a[r] = rng.standard_normal(n) + 3.0
    for r in empty_rows:
        a[r] = 0
    return a.astype(_np_dtype(dtype))


def _assert_twell_equal(gpu, ref):
    g = gpu.host()
    assert g.shape == ref.shape and g.slots == ref.slots and g.tile_width == ref.tile_width
    np.testing.assert_array_equal(g.counts, ref.counts)
    np.testing.assert_array_equal(g.backup_rows, ref.backup_rows)
    np.testing.assert_array_equal(g.backup_slot, ref.backup_slot)
    np.testing.assert_array_equal(g.backup_values.view(np.uint8), ref.backup_values.view(np.uint8))
    # Slots are authoritative (and fully specified) for every row: first min(count, S) entries in column order.
    np.testing.assert_array_equal(g.indices, ref.indices)
    np.testing.assert_array_equal(g.values.view(np.uint8), ref.values.view(np.uint8))


@given(
    m=st.integers(1, 70),
    n=st.integers(1, 700),
    tile_width=st.sampled_from([32, 64, 128, 256]),
    log2c=st.integers(0, 5),
    density=st.sampled_from([0.0, 0.01, 0.05, 0.2, 0.6]),
    dtype=st.sampled_from(DTYPES),
    threshold=st.one_of(st.none(), st.integers(0, 40)),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_twell_matches_reference(cp, m, n, tile_width, log2c, density, dtype, threshold, seed):
    compression = min(2**log2c, tile_width)
    rng = np.random.default_rng(seed)
    a = _random_sparse(rng, m, n, density, dtype, full_rows=[0] if m > 2 else (), empty_rows=[m - 1])
    ref = reference.pack_twell(a, tile_width, compression, threshold)
    gpu = twell.pack_twell(cp.asarray(a), tile_width, compression, threshold)
    _assert_twell_equal(gpu, ref)
    back = twell.unpack_twell(gpu)
    np.testing.assert_array_equal(back.get().view(np.uint8), a.view(np.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_twell_capacity_edges(cp, dtype):
    """Tiles exactly at capacity stay compact; one over routes the row to the backup."""
    tile_width, compression = 64, 4  # 16 slots
    m, n = 6, 200
    a = np.zeros((m, n), np.float32)
    a[0, :16] = np.arange(1, 17)          # exactly at capacity in tile 0
    a[1, 64:81] = np.arange(1, 18)        # one over in tile 1
    a[2, 192:200] = 5.0                   # partial last tile
    a[3] = np.linspace(-1, 1, n)          # every tile overflows
    a[4, ::3] = 2.0
    a = a.astype(_np_dtype(dtype))
    gpu = twell.pack_twell(cp.asarray(a), tile_width, compression)
    ref = reference.pack_twell(a, tile_width, compression)
    _assert_twell_equal(gpu, ref)
    assert 0 not in gpu.backup_rows.get() and 1 in gpu.backup_rows.get() and 3 in gpu.backup_rows.get()


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_twell_relu_mode_keeps_nan(cp, dtype):
    from twell.kernels import pack as gpu_pack

    rng = np.random.default_rng(3)
    z = rng.standard_normal((33, 300)).astype(np.float32)
    z[5, 7] = np.nan
    z = z.astype(_np_dtype(dtype))
    tw = gpu_pack.pack_twell(cp.asarray(z), 256, 2, 300, relu=True)
    dense = twell.unpack_twell(tw).get().astype(np.float32)
    want = np.where(~(z.astype(np.float32) <= 0), z.astype(np.float32), 0)
    np.testing.assert_array_equal(np.isnan(dense), np.isnan(want))
    np.testing.assert_array_equal(np.nan_to_num(dense), np.nan_to_num(want))


@given(
    m=st.integers(1, 60), n=st.integers(1, 600), threshold=st.integers(0, 50),
    density=st.sampled_from([0.0, 0.02, 0.1, 0.5]), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1),
)
def test_pack_hybrid_matches_reference(cp, m, n, threshold, density, dtype, seed):
    rng = np.random.default_rng(seed)
    a = _random_sparse(rng, m, n, density, dtype, full_rows=[m // 2], empty_rows=[0])
    ref = reference.pack_hybrid(a, threshold, True)
    gpu = twell.pack_hybrid(cp.asarray(a), threshold, True).host()
    for f in ("row_ptr", "col_indices", "backup_slot", "backup_rows"):
        np.testing.assert_array_equal(getattr(gpu, f), getattr(ref, f), err_msg=f)
    np.testing.assert_array_equal(gpu.values.view(np.uint8), ref.values.view(np.uint8))
    np.testing.assert_array_equal(gpu.backup_values.view(np.uint8), ref.backup_values.view(np.uint8))
    for f in ("col_ptr", "row_indices", "positions"):
        np.testing.assert_array_equal(getattr(gpu.transposed, f), getattr(ref.transposed, f), err_msg=f)
    back = twell.unpack_hybrid(twell.pack_hybrid(cp.asarray(a), threshold, False)).get()
    np.testing.assert_array_equal(back.view(np.uint8), a.view(np.uint8))


def test_pack_is_deterministic(cp):
    rng = np.random.default_rng(11)
    a = cp.asarray(_random_sparse(rng, 2048, 5632, 0.01, "bfloat16"))
    first = twell.pack_twell(a).host()
    for _ in range(5):
        again = twell.pack_twell(a).host()
        np.testing.assert_array_equal(again.indices, first.indices)
        np.testing.assert_array_equal(again.values.view(np.uint8), first.values.view(np.uint8))


def test_gpu_pack_bad_input(cp):
    a = cp.ones((4, 64), dtype=cp.float32)
    with pytest.raises(ValueError, match="dense must be C-contiguous"):
        twell.pack_twell(cp.asfortranarray(cp.ones((4, 64), cp.float32)))
    with pytest.raises(TypeError, match="dense has dtype float64"):
        twell.pack_twell(a.astype(cp.float64))
    with pytest.raises(ValueError, match="tile_width"):
        twell.pack_twell(a, tile_width=48)
    with pytest.raises(ValueError, match="compression"):
        twell.pack_twell(a, tile_width=64, compression=3)
    with pytest.raises(ValueError, match="dense must be 2-D"):
        twell.pack_twell(cp.ones(5, cp.float32))


@pytest.mark.parametrize("m", [0, 1, 1000, 1024, 1025, 8193, 50_000, 200_003])
def test_route_rows_orders_the_routed_rows(cp, m):
    """backup_slot = rank among the routed rows (code != 0) in row order, backup_rows ascending, totals
    (routed, overflowed, 0) -- across the kernels' 1,024-row blocks (and more than 32 of them)."""
    from twell.kernels import pack
    rng = np.random.default_rng(m)
    codes = rng.choice([0, 0, 0, 1, 2], size=m).astype(np.int32)
    slot, rows_buf, totals = pack.route_rows(cp.asarray(codes))
    routed = np.flatnonzero(codes != 0)
    expected_slot = np.full(m, -1, dtype=np.int32)
    expected_slot[routed] = np.arange(routed.size, dtype=np.int32)
    np.testing.assert_array_equal(cp.asnumpy(slot), expected_slot)
    np.testing.assert_array_equal(cp.asnumpy(rows_buf[:routed.size]), routed)
    np.testing.assert_array_equal(cp.asnumpy(totals), [routed.size, int((codes == 2).sum()), 0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, d, n, tile_width", [(300, 2048, 5632, 256), (97, 30, 300, 64), (50, 33, 129, 32)])
def test_gather_backup_rows_and_scatter_rows(cp, dtype, m, d, n, tile_width):
    """gather_backup_rows = (x[rows], unpack_twell_rows) exactly, every element written (poisoned
    outputs), including rows whose tile overflowed (incomplete the same way); scatter_rows = dst[rows] = src.
    d = 30 / 33 take the 2-byte copy path (rows not 16-byte multiples)."""
    from twell.kernels import pack
    rng = np.random.default_rng(d + n)
    dense = _random_sparse(rng, m, n, 0.03, dtype, full_rows=(1,), empty_rows=(2,))
    x = cp.asarray(rng.standard_normal((m, d)).astype(np.float32).astype(_np_dtype(dtype)))
    p = pack.pack_twell_async(cp.asarray(dense), tile_width, 8, 64, relu=True)
    rows = cp.asarray(np.sort(rng.choice(m, size=m // 3, replace=False)).astype(np.int32))
    rows[0] = 1                                   # a row with overflowing tiles
    r = int(rows.shape[0])
    xr = cp.asarray(np.full((r, d), np.nan, np.float32).astype(_np_dtype(dtype)))  # poisoned: unwritten show
    zr = cp.asarray(np.full((r, n), np.nan, np.float32).astype(_np_dtype(dtype)))
    got_x, got_z = pack.gather_backup_rows(x, p.counts, p.indices, p.values, rows, n, tile_width, out=(xr, zr))
    assert got_x is xr and got_z is zr
    want_z = pack.unpack_twell_rows(p.counts, p.indices, p.values, rows, n, tile_width)
    np.testing.assert_array_equal(cp.asnumpy(xr.view(f"u{x.dtype.itemsize}")),
                                  cp.asnumpy(x[rows].view(f"u{x.dtype.itemsize}")))
    np.testing.assert_array_equal(cp.asnumpy(zr.view(f"u{x.dtype.itemsize}")),
                                  cp.asnumpy(want_z.view(f"u{x.dtype.itemsize}")))
    fresh_x, fresh_z = pack.gather_backup_rows(x, p.counts, p.indices, p.values, rows, n, tile_width)
    assert bool((fresh_x.view(f"u{x.dtype.itemsize}") == xr.view(f"u{x.dtype.itemsize}")).all())
    assert bool((fresh_z.view(f"u{x.dtype.itemsize}") == zr.view(f"u{x.dtype.itemsize}")).all())
    dst = cp.asarray(rng.standard_normal((m, d)).astype(np.float32).astype(x.dtype))
    want = cp.asnumpy(dst).copy()
    want[cp.asnumpy(rows)] = cp.asnumpy(xr)
    pack.scatter_rows(xr, rows, dst)
    np.testing.assert_array_equal(cp.asnumpy(dst).view(f"u{x.dtype.itemsize}"), want.view(f"u{x.dtype.itemsize}"))
    with pytest.raises(ValueError, match="C-contiguous x"):
        pack.gather_backup_rows(x[:, ::2], p.counts, p.indices, p.values, rows, n, tile_width)
    with pytest.raises(ValueError, match="out must be"):
        pack.gather_backup_rows(x, p.counts, p.indices, p.values, rows, n, tile_width, out=(zr, xr))
    with pytest.raises(ValueError, match="scatter_rows takes"):
        pack.scatter_rows(cp.zeros((r, d), cp.float64), rows, dst)


@pytest.mark.parametrize("m", [0, 1, 1000, 1024, 1025, 8193, 50_000, 200_003])
@pytest.mark.parametrize("with_route", [False, True])
def test_hybrid_plan_matches_numpy(cp, m, with_route):
    """hybrid_plan: backup rows (nnz > threshold) and redo rows (compact rows with TwELL code 2) listed in
    row order, compact CSR offsets, totals (compact entries, backup, redo, 0) and the all-row entry count --
    across the kernels' 1,024-row blocks (and more than 32 of them)."""
    from twell.kernels import pack
    rng = np.random.default_rng(m + with_route)
    thr = 40
    row_nnz = rng.integers(0, 90, size=m).astype(np.int32)
    codes = rng.choice([0, 0, 0, 2], size=m).astype(np.int32) if with_route else None
    plan = pack.hybrid_plan(cp.asarray(row_nnz), thr, None if codes is None else cp.asarray(codes))
    backup = row_nnz > thr
    rows = np.flatnonzero(backup)
    slot = np.full(m, -1, dtype=np.int32)
    slot[rows] = np.arange(rows.size, dtype=np.int32)
    np.testing.assert_array_equal(cp.asnumpy(plan.backup_slot), slot)
    np.testing.assert_array_equal(cp.asnumpy(plan.backup_rows_buf[:rows.size]), rows)
    lengths = np.where(backup, 0, row_nnz)
    row_ptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    np.testing.assert_array_equal(cp.asnumpy(plan.row_ptr), row_ptr)
    redo = np.flatnonzero(~backup & (codes == 2)) if codes is not None else np.zeros(0, dtype=np.int64)
    if codes is not None:
        np.testing.assert_array_equal(cp.asnumpy(plan.redo_rows_buf[:redo.size]), redo)
    else:
        assert plan.redo_rows_buf is None
    np.testing.assert_array_equal(cp.asnumpy(plan.totals), [row_ptr[-1], rows.size, redo.size, 0])
    assert int(plan.nnz_all[0]) == int(row_nnz.sum(dtype=np.int64))


@pytest.mark.parametrize("n", [1, 40, 1024, 1025, 5632])
def test_weight_grad_plan_kernels(cp, n):
    """weight_grad_bounds / weight_grad_items: items per neuron max(ceil(c / 128), 1), partial slots for
    neurons of more than one item, as totals and as exclusive prefixes."""
    from twell.kernels import ffn_backward as fb
    rng = np.random.default_rng(n)
    counts = rng.choice([0, 1, 5, 127, 128, 129, 300, 1000], size=n).astype(np.int32)
    items = np.maximum(-(-counts // fb.WG_CHUNK), 1)
    partials = np.where(items > 1, items, 0)
    np.testing.assert_array_equal(cp.asnumpy(fb.workspace_bounds(cp.asarray(counts))),
                                  [items.sum(), partials.sum()])
    col_ptr = cp.asarray(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    item_ptr = cp.empty(n + 1, dtype=cp.int32)
    partial_ptr = cp.empty(n + 1, dtype=cp.int32)
    fb.get_kernel(fb.FAMILY, "weight_grad_items")((1,), (fb.PLAN_THREADS,),
                                                        (col_ptr, np.int32(n), item_ptr, partial_ptr))
    np.testing.assert_array_equal(cp.asnumpy(item_ptr), np.concatenate([[0], np.cumsum(items)]))
    np.testing.assert_array_equal(cp.asnumpy(partial_ptr), np.concatenate([[0], np.cumsum(partials)]))
