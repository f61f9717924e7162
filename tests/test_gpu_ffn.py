"""GPU inference ops (gated_ffn, ffn, gated_up_down, down_projection) vs the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import rel_error
from hypothesis import given
from hypothesis import strategies as st

import twell
from twell import reference
from twell.ops import DEFAULT_INFERENCE_ROW_THRESHOLD

pytestmark = pytest.mark.gpu

DTYPES = ["bfloat16", "float16", "float32"]
# Dense computation in the same precision (cuBLAS GEMMs, h rounded once) sets the error scale.
FLOOR = {"bfloat16": 2e-3, "float16": 3e-4, "float32": 1e-5}
# Half an ulp (relative): the error of the one final rounding of the output, which alone dominates the
# comparison with the dense computation on tiny outputs (a handful of elements).
HALF_ULP = {"bfloat16": 2.0 ** -9, "float16": 2.0 ** -12, "float32": 2.0 ** -25}


def _np_dtype(name):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def make_ffn(rng, m, d, n, dtype, mean_active=12.0, row_bias=None):
    """x (M, d) with x[:, 0] = 1 (or row_bias), neuron-major weights, about mean_active active per row."""
    from scipy.stats import norm
    x = rng.standard_normal((m, d)).astype(np.float32)
    x[:, 0] = 1.0 if row_bias is None else row_bias
    wg = (rng.standard_normal((n, d)) / np.sqrt(d)).astype(np.float32)
    wu = (rng.standard_normal((n, d)) / np.sqrt(d)).astype(np.float32)
    wd = (rng.standard_normal((n, d)) / np.sqrt(d)).astype(np.float32)
    rate = min(max(mean_active / n, 1e-4), 0.9)
    wg[:, 0] = -norm.isf(rate) * np.sqrt((d - 1) / d)
    dt = _np_dtype(dtype)
    return [a.astype(dt) for a in (x, wg, wu, wd)]


def observed_tracker(m, backup_rows):
    """A DensityTracker that has observed one sparse call of M rows with ``backup_rows`` backup rows."""
    tr = twell.DensityTracker()
    tr.observe_sparse(m, 12 * m, backup_rows)
    return tr


def nan_inf_past_capacity(cp, run, heavy=200, observed=1):
    """700 rows, the first ``heavy`` of them backup rows, a tracker that observed ``observed`` backup rows (1:
    a capacity of 128 rows; 0: none, every backup row past it), NaN / Inf in x within the capacity (row 30)
    and past it, non-finite weights of inactive neurons and of an active one: ``run(dev arrays, tracker)``
    must give y with the reference's NaN / Inf and its finite values to fp32 accuracy."""
    m, d, n = 700, 64, 500
    rng = np.random.default_rng(13)
    bias = np.ones(m, np.float32)
    bias[:heavy] = -3.0                                             # backup rows
    arrays = make_ffn(rng, m, d, n, "float32", mean_active=10, row_bias=bias)
    arrays[1][[10, 20]] = 0                                         # neurons 10 and 20 never fire
    arrays[2][10, 3] = np.inf
    arrays[3][20, 5] = np.nan
    arrays[0][heavy - 10, 5] = np.nan                               # past the capacity
    arrays[0][30, 9] = np.inf                                       # within it (observed > 0)
    z = arrays[0].astype(np.float64) @ arrays[1].astype(np.float64).T
    live = int(np.flatnonzero(z[heavy - 5] > 0)[0])
    arrays[3][live, 4] = np.inf                                     # an active neuron of a row past it
    ref = reference.gated_ffn(*arrays).astype(np.float64)
    assert np.isnan(ref[heavy - 10]).all() and np.isinf(ref).any()
    y = run([cp.asarray(a) for a in arrays], observed_tracker(m, observed)).get().astype(np.float64)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    np.testing.assert_array_equal(np.isinf(y), np.isinf(ref))
    fin = np.isfinite(ref)
    assert rel_error(cp.asarray(np.where(fin, y, 0)), np.where(fin, ref, 0)) < 1e-5


def dense_same_precision(cp, x, wg, wu, wd):
    """The dense computation in the inputs' precision (what the bf16 tolerance is relative to): cuBLAS
    GEMMs and h = relu(z) * u rounded once, an inactive neuron giving exactly 0."""
    from twell.kernels import ffn_forward
    z = cp.matmul(x, wg.T)
    h = ffn_forward.dense_gate_mul(z, cp.matmul(x, wu.T))
    return cp.matmul(h, wd)


def _amplification(x, wg, wu, wd, y_ref):
    """How much an fp32 rounding of z and u, relative to the magnitudes of their terms, can move y:
    ||sum over active j of (|u_j| |x|.|wg_j| + |z_j| |x|.|wu_j|) |wd_j|||  /  ||y||  (float64).  Large when an
    active gate nearly cancels (z_j small against its terms), where any fp32 computation of z has a large
    relative error."""
    x, wg, wu, wd = (a.astype(np.float64) for a in (x, wg, wu, wd))
    z, u = x @ wg.T, x @ wu.T
    active = ~(z <= 0)
    spread = (np.abs(u) * (np.abs(x) @ np.abs(wg).T) + np.abs(z) * (np.abs(x) @ np.abs(wu).T)) * active
    return float(np.linalg.norm(spread @ np.abs(wd)) / max(np.linalg.norm(y_ref), 1e-300))


def _check(cp, out, arrays, dtype):
    x, wg, wu, wd = arrays
    ref = reference.gated_ffn_dense(*[a.astype(np.float64) for a in arrays])
    dense = dense_same_precision(cp, *[cp.asarray(a) for a in arrays])
    err = rel_error(out, ref)
    err_dense = rel_error(dense, ref)
    # + the fp32 accumulation noise of the length-K dot products (K = max(d, n)), amplified where an active
    # gate nearly cancels: on a tiny float32 problem the dense computation's own error is one random draw
    # of it, so 2x that alone fails on luck (seen: 1 row, 1 active neuron of 33, z at 1 % of its terms)
    amp = max(1.0, _amplification(x, wg, wu, wd, ref)) if dtype == "float32" else 1.0
    floor = HALF_ULP[dtype] + 4 * 2.0**-24 * np.sqrt(max(x.shape[1], wg.shape[0])) * amp
    assert err <= 2.0 * err_dense + floor, f"rel err {err:.3g} vs same-precision dense {err_dense:.3g}"
    return err, err_dense


@given(
    m=st.sampled_from([1, 3, 8, 64, 65, 130, 517, 1100]),
    d=st.sampled_from([8, 64, 72, 100, 256, 2048]),
    n=st.sampled_from([33, 300, 1000, 5632]),
    dtype=st.sampled_from(DTYPES),
    tile_width=st.sampled_from([64, 256]),
    mean=st.sampled_from([1.0, 10.0, 40.0]),
    gate_kernel=st.sampled_from(["auto", "fused", "mma", "cublas"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_gated_ffn_matches_reference(cp, m, d, n, dtype, tile_width, mean, gate_kernel, seed):
    rng = np.random.default_rng(seed)
    arrays = make_ffn(rng, m, d, n, dtype, mean_active=min(mean, n / 2))
    dev = [cp.asarray(a) for a in arrays]
    out = cp.full((m, d), np.nan, dtype=dev[0].dtype)          # poisoned: every row must be written
    if gate_kernel == "mma" and (dtype == "float32" or d % 8):
        gate_kernel = "fused"                                    # the fused kernels take 16-bit, d % 8 == 0
    y, stats = twell.gated_ffn(*dev, tile_width=tile_width, return_stats=True, out=out, gate_kernel=gate_kernel)
    assert y is out
    _check(cp, y, arrays, dtype)
    _, ref_stats = reference.gated_ffn(*arrays, tile_width=tile_width, return_stats=True,
                                       dense_row_threshold=DEFAULT_INFERENCE_ROW_THRESHOLD)
    assert int(stats.nnz) == pytest.approx(int(ref_stats.nnz), rel=0.02, abs=3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_ffn_empty_full_and_overflow_rows(cp, dtype):
    rng = np.random.default_rng(5)
    m, d, n = 600, 256, 700                 # over the small-batch limit: the sparse path with backup rows
    bias = np.ones(m, np.float32)
    bias[0] = 100.0    # nothing active
    bias[1] = -100.0   # all n active -> overflow -> dense backup
    bias[2] = -3.0     # heavy row
    arrays = make_ffn(rng, m, d, n, dtype, mean_active=10, row_bias=bias)
    dev = [cp.asarray(a) for a in arrays]
    for threshold in ("auto", None, 0, 5):
        out = cp.full((m, d), np.nan, dtype=dev[0].dtype)
        y, stats = twell.gated_ffn(*dev, dense_row_threshold=threshold, return_stats=True, out=out)
        _check(cp, y, arrays, dtype)
        assert stats.n_backup_rows >= 1 and stats.n_overflow_rows >= 1
        assert np.all(y[0].get().astype(np.float32) == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 5, 64, 512])
def test_decode_path_exact_for_any_row_activity(cp, dtype, m):
    """Small batches run straight from z: empty, heavy and all-active rows are all exact."""
    rng = np.random.default_rng(m)
    d, n = 256, 1500
    bias = np.ones(m, np.float32)
    bias[0] = -100.0                  # all n active
    if m > 2:
        bias[1] = 100.0               # nothing active
        bias[2] = -2.0                # heavy
    arrays = make_ffn(rng, m, d, n, dtype, mean_active=30, row_bias=bias)
    dev = [cp.asarray(a) for a in arrays]
    out = cp.full((m, d), np.nan, dtype=dev[0].dtype)
    y, stats = twell.gated_ffn(*dev, return_stats=True, out=out)
    _check(cp, y, arrays, dtype)
    z = arrays[0].astype(np.float32) @ arrays[1].astype(np.float32).T
    assert int(stats.nnz) == pytest.approx(int((z > 0).sum()), rel=0.01, abs=3)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("m, d, n", [(1, 2048, 5632), (3, 256, 1500), (8, 768, 37), (5, 1024, 1), (8, 512, 4000),
                                     (8, 2048, 9000)])
@pytest.mark.parametrize("gated", [True, False])
def test_decode_fused_exact_deterministic_batch_invariant(cp, dtype, m, d, n, gated):
    """The fused decode kernels (gate GEMV + up/down + reduction; M <= 8 rows of a 16-bit dtype with
    d = 256 k): exact against float64 for empty, all-active, heavy and ordinary rows, every output element
    written (poisoned out), bitwise repeatable, each row's y bitwise the same when computed alone, and what
    the op returns for batches up to inference.FUSED_DECODE_ROWS."""
    from twell.gpu import inference
    from twell.kernels import ffn_forward
    rng = np.random.default_rng(1000 * m + n + d)
    bias = np.ones(m, np.float32)
    bias[0] = -100.0                  # all n active
    if m > 2:
        bias[1] = 100.0               # nothing active
        bias[2] = -2.0                # heavy
    arrays = make_ffn(rng, m, d, n, dtype, mean_active=min(30.0, n), row_bias=bias)
    dev = [cp.asarray(a) for a in arrays]
    assert ffn_forward.decode_fused_supported(dev[0], dev[1], dev[2], dev[3], cp.empty_like(dev[0]))

    def run(x):
        out = cp.full((x.shape[0], d), np.nan, dtype=x.dtype)      # poisoned: every element must be written
        return ffn_forward.decode_fused(x, dev[1], dev[2] if gated else dev[1], dev[3], out, gated=gated)

    y = run(dev[0])
    if m <= inference.FUSED_DECODE_ROWS:
        op = twell.gated_ffn(*dev) if gated else twell.ffn(dev[0], dev[1], dev[3])
        np.testing.assert_array_equal(op.view(cp.uint16).get(), y.view(cp.uint16).get())
    # against float64, within 2x the error of the same computation in the inputs' precision (z and y
    # rounded); with fewer than 32 neurons a row's few products can put z on the other side of a rounding
    # boundary than cuBLAS's accumulation order does, hence one more half-ulp of slack there
    slack = HALF_ULP[dtype] * (2 if n < 32 else 1)
    if gated:
        ref = reference.gated_ffn_dense(*[a.astype(np.float64) for a in arrays])
        dense = dense_same_precision(cp, *dev)
    else:
        from twell.kernels import pack
        ref = reference.ffn_dense(*[a.astype(np.float64) for a in (arrays[0], arrays[1], arrays[3])])
        dense = cp.matmul(pack.relu_keep_nan(cp.matmul(dev[0], dev[1].T)), dev[3])
    assert rel_error(y, ref) <= 2.0 * rel_error(dense, ref) + slack
    bits = y.view(cp.uint16).get()
    for _ in range(4):
        np.testing.assert_array_equal(run(dev[0]).view(cp.uint16).get(), bits)
    for i in range(m):
        np.testing.assert_array_equal(run(dev[0][i:i + 1]).view(cp.uint16).get()[0], bits[i])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_decode_fused_nan_inf_propagate_like_dense(cp, dtype):
    rng = np.random.default_rng(3)
    arrays = make_ffn(rng, 4, 256, 500, dtype, mean_active=10)       # the op's fused decode batches
    arrays[0][1, 5] = np.nan
    arrays[0][2, 9] = np.inf
    dev = [cp.asarray(a) for a in arrays]
    y = twell.gated_ffn(*dev).get().astype(np.float32)
    dense = dense_same_precision(cp, *dev).get().astype(np.float32)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(dense))
    np.testing.assert_array_equal(np.isinf(y), np.isinf(dense))
    ok = np.isfinite(dense)
    assert rel_error(y[ok], dense[ok]) < FLOOR[dtype] * 5


def test_decode_fused_rejects_unsupported_operands(cp):
    from twell.kernels import ffn_forward
    rng = np.random.default_rng(4)
    dev = [cp.asarray(a) for a in make_ffn(rng, 9, 256, 100, "float16")]
    y = cp.empty_like(dev[0])
    assert not ffn_forward.decode_fused_supported(*dev, y)              # 9 rows
    with pytest.raises(ValueError, match="decode_fused takes"):
        ffn_forward.decode_fused(*dev, y)
    small = [cp.asarray(a) for a in make_ffn(rng, 4, 100, 100, "float16")]
    assert not ffn_forward.decode_fused_supported(*small, cp.empty_like(small[0]))   # d not 256 k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated", [True, False])
def test_every_row_dense(cp, dtype, gated):
    """A dense batch (every row over the threshold) takes the plain cuBLAS backup for every row and stays
    exact."""
    rng = np.random.default_rng(11)
    arrays = make_ffn(rng, 600, 128, 400, dtype, mean_active=150)
    dev = [cp.asarray(a) for a in arrays]
    out = cp.full((600, 128), np.nan, dtype=dev[0].dtype)
    if gated:
        y, stats = twell.gated_ffn(*dev, dense_row_threshold=10, return_stats=True, out=out)
        _check(cp, y, arrays, dtype)
    else:
        y, stats = twell.ffn(dev[0], dev[1], dev[3], dense_row_threshold=10, return_stats=True, out=out)
        ref = reference.ffn_dense(*[a.astype(np.float64) for a in (arrays[0], arrays[1], arrays[3])])
        assert rel_error(y, ref) < 4 * HALF_ULP[dtype] + 1e-6
    assert stats.n_backup_rows == 600 and stats.path == "sparse"


@pytest.mark.parametrize("dtype", DTYPES)
def test_ffn_non_gated(cp, dtype):
    rng = np.random.default_rng(7)
    for m in (7, 300, 1500):
        x, wg, wu, wd = make_ffn(rng, m, 256, 900, dtype, mean_active=20)
        dev = [cp.asarray(a) for a in (x, wg, wd)]
        out = cp.full((m, 256), np.nan, dtype=dev[0].dtype)
        y = twell.ffn(*dev, out=out)
        ref = reference.ffn_dense(*[a.astype(np.float64) for a in (x, wg, wd)])
        z = cp.matmul(dev[0], dev[1].T)
        dense = cp.matmul(cp.where(z > 0, z, cp.zeros((), z.dtype)), dev[2])
        assert rel_error(y, ref) <= 2.0 * rel_error(dense, ref) + HALF_ULP[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_up_down_at_and_over_capacity(cp, dtype):
    """Hand-built gate: tiles exactly at capacity (compact) and one over (backup)."""
    rng = np.random.default_rng(9)
    m, d, n = 6, 96, 300
    g = np.zeros((m, n), np.float32)
    g[0, :16] = rng.random(16) + 0.1          # tile 0 at capacity (16 slots)
    g[1, 64:81] = rng.random(17) + 0.1        # one over -> backup
    g[2, 290:300] = rng.random(10)            # partial last tile
    g[4, ::7] = rng.random(len(range(0, n, 7))) + 0.5
    dt = _np_dtype(dtype)
    g = g.astype(dt)
    x = rng.standard_normal((m, d)).astype(dt)
    wu = (rng.standard_normal((n, d)) / 10).astype(dt)
    wd = (rng.standard_normal((n, d)) / 10).astype(dt)
    tw = twell.pack_twell(cp.asarray(g), tile_width=64, compression=4)
    assert 1 in tw.backup_rows.get() and 0 not in tw.backup_rows.get()
    out = cp.full((m, d), np.nan, dtype=dt)
    y = twell.gated_up_down(cp.asarray(x), tw, cp.asarray(wu), cp.asarray(wd), out=out)
    ref = (g.astype(np.float64) * (x.astype(np.float64) @ wu.astype(np.float64).T)) @ wd.astype(np.float64)
    assert rel_error(y, ref) < FLOOR[dtype] * 3
    yd = twell.down_projection(tw, cp.asarray(wd))
    assert rel_error(yd, g.astype(np.float64) @ wd.astype(np.float64)) < FLOOR[dtype] * 3


def test_user_twell_with_long_compact_rows(cp):
    """A TwELL whose compact rows exceed the kernel's list length is still exact (routed on the fly)."""
    rng = np.random.default_rng(1)
    m, d, n = 4, 64, 2048
    g = (rng.random((m, n)) * (rng.random((m, n)) < 0.5)).astype(np.float32)
    tw = twell.pack_twell(cp.asarray(g), tile_width=256, compression=1)   # 256 slots: nothing overflows
    assert tw.n_backup == 0
    x = rng.standard_normal((m, d)).astype(np.float32)
    wu = rng.standard_normal((n, d)).astype(np.float32) / 30
    wd = rng.standard_normal((n, d)).astype(np.float32) / 30
    y = twell.gated_up_down(cp.asarray(x), tw, cp.asarray(wu), cp.asarray(wd))
    ref = (g.astype(np.float64) * (x.astype(np.float64) @ wu.astype(np.float64).T)) @ wd.astype(np.float64)
    assert rel_error(y, ref) < 1e-5


@pytest.mark.parametrize("m", [1, 8, 64, 2000])
def test_gated_ffn_bitwise_deterministic(cp, m):
    rng = np.random.default_rng(m)
    dev = [cp.asarray(a) for a in make_ffn(rng, m, 2048, 5632, "bfloat16", mean_active=29)]
    first = twell.gated_ffn(*dev).get()
    for _ in range(9):
        np.testing.assert_array_equal(twell.gated_ffn(*dev).get().view(np.uint16), first.view(np.uint16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_inf_in_x_propagate_like_dense(cp, dtype):
    rng = np.random.default_rng(2)
    arrays = make_ffn(rng, 20, 64, 500, dtype, mean_active=10)
    arrays[0][3, 5] = np.nan
    arrays[0][7, 9] = np.inf
    dev = [cp.asarray(a) for a in arrays]
    y = twell.gated_ffn(*dev).get().astype(np.float32)
    dense = dense_same_precision(cp, *dev).get().astype(np.float32)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(dense))
    np.testing.assert_array_equal(np.isinf(y), np.isinf(dense))
    ok = np.isfinite(dense)
    assert rel_error(y[ok], dense[ok]) < FLOOR[dtype] * 5


def test_dlpack_inputs_from_torch(cp):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    rng = np.random.default_rng(4)
    arrays = make_ffn(rng, 64, 128, 512, "float32", mean_active=10)
    tens = [torch.from_numpy(a).cuda() for a in arrays]
    y = twell.gated_ffn(*tens)
    assert isinstance(y, cp.ndarray)
    yc = twell.gated_ffn(*[cp.asarray(a) for a in arrays])
    np.testing.assert_array_equal(y.get(), yc.get())


def test_gpu_ffn_bad_input(cp):
    rng = np.random.default_rng(0)
    x, wg, wu, wd = [cp.asarray(a) for a in make_ffn(rng, 8, 64, 128, "float32")]
    with pytest.raises(TypeError, match="w_up must have the dtype of x"):
        twell.gated_ffn(x, wg, wu.astype(cp.float16), wd)
    with pytest.raises(ValueError, match="w_down must have shape \\(n, d\\)"):
        twell.gated_ffn(x, wg, wu, cp.ascontiguousarray(wd.T))
    with pytest.raises(ValueError, match="w_gate must be C-contiguous"):
        twell.gated_ffn(x, cp.asfortranarray(wg), wu, wd)
    with pytest.raises(TypeError, match="host .* device|device .* host"):
        twell.gated_ffn(x.get(), wg, wu, wd)
    with pytest.raises(ValueError, match="x must be 2-D"):
        twell.gated_ffn(x[0], wg, wu, wd)
    bad = wg.copy()
    bad[3, 3] = cp.nan
    with pytest.raises(ValueError, match="w_gate contains NaN"):
        twell.gated_ffn(x, bad, wu, wd, check_finite=True)
    with pytest.raises(TypeError, match="out must have dtype"):
        twell.gated_ffn(x, wg, wu, wd, out=cp.empty((8, 64), cp.float16))


def test_many_short_lived_streams(cp):
    """GEMMs on more streams than the cuBLAS handle keeps workspaces for, each stream destroyed after its
    call: dropping the oldest workspace must not touch its (destroyed) stream, and every result stays
    bitwise the same as on the null stream."""
    from twell.runtime import blas
    rng = np.random.default_rng(5)
    a = cp.asarray(rng.standard_normal((300, 256)).astype(np.float32))
    b = cp.asarray(rng.standard_normal((256, 200)).astype(np.float32))
    want = blas.gemm(a, b).get()
    for _ in range(3 * blas._MAX_STREAMS_PER_HANDLE):
        s = cp.cuda.Stream(non_blocking=True)
        with s:
            got = blas.gemm(a, b)
        s.synchronize()
        np.testing.assert_array_equal(got.get(), want)
        del s, got
    assert len(blas._handle(cp).workspaces) <= blas._MAX_STREAMS_PER_HANDLE


@pytest.mark.parametrize("m", [8, 3000])
def test_ops_run_on_the_current_stream(cp, m):
    """Every launch and the host read-back follow the current CuPy stream (here a non-blocking one)."""
    rng = np.random.default_rng(21)
    dev = [cp.asarray(a) for a in make_ffn(rng, m, 256, 1024, "bfloat16", mean_active=20)]
    want = twell.gated_ffn(*dev).get()
    y_ref, saved_ref, _ = twell.gated_ffn_forward(*dev)
    dy = cp.asarray(rng.standard_normal((m, 256)).astype(_np_dtype("bfloat16")))
    grads_ref = [g.get() for g in twell.gated_ffn_backward(saved_ref, dy)]
    cp.cuda.Device().synchronize()
    side = cp.cuda.Stream(non_blocking=True)
    with side:
        y = twell.gated_ffn(*dev)
        y_train, saved, _ = twell.gated_ffn_forward(*dev)
        grads = twell.gated_ffn_backward(saved, dy)
    side.synchronize()
    np.testing.assert_array_equal(y.get().view(np.uint16), want.view(np.uint16))
    np.testing.assert_array_equal(y_train.get().view(np.uint16), y_ref.get().view(np.uint16))
    for g, r in zip(grads, grads_ref):
        np.testing.assert_array_equal(g.get().view(np.uint16), r.view(np.uint16))
