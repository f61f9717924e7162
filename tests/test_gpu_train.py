"""GPU training path (gated_ffn_forward / gated_ffn_backward) vs the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import rel_error
from hypothesis import given
from hypothesis import strategies as st
from test_gpu_ffn import DTYPES, HALF_ULP, _np_dtype, make_ffn, nan_inf_past_capacity
from test_gpu_ffn import observed_tracker as _observed

import twell
from twell import reference

pytestmark = pytest.mark.gpu


def dense_train_same_precision(cp, x, wg, wu, wd, dy, l1_weight):
    """Dense fwd + bwd in the inputs' precision (cuBLAS GEMMs, elementwise in fp32 rounded once)."""
    from twell.kernels import ffn_backward, ffn_forward
    m = x.shape[0]
    z = cp.matmul(x, wg.T)
    u = cp.matmul(x, wu.T)
    h = ffn_forward.dense_gate_mul(z, u)
    y = cp.matmul(h, wd)
    dh = cp.matmul(dy, wd.T)
    g = cp.where(z > 0, z, cp.zeros((), z.dtype)).astype(x.dtype)
    du, dz, h2 = ffn_backward.backup_row_grads(dh, g, u, l1_weight / m)
    dx = (cp.matmul(du, wu).astype(cp.float32) + cp.matmul(dz, wg).astype(cp.float32)).astype(x.dtype)
    return y, dx, cp.matmul(dz.T, x), cp.matmul(du.T, x), cp.matmul(h2.T, dy)


def reference_train(arrays, dy, l1_weight, threshold=128):
    f64 = [a.astype(np.float64) for a in arrays]
    y, saved, stats = reference.gated_ffn_forward(*f64, l1_weight=l1_weight, dense_row_threshold=threshold)
    grads = reference.gated_ffn_backward(saved, dy.astype(np.float64))
    return y, grads, stats


def check_train(cp, arrays, dy, dtype, l1_weight, threshold=128, **options):
    dev = [cp.asarray(a) for a in arrays]
    dyd = cp.asarray(dy)
    y, saved, stats = twell.gated_ffn_forward(*dev, l1_weight=l1_weight, dense_row_threshold=threshold, **options)
    grads = twell.gated_ffn_backward(saved, dyd)
    ry, rgrads, rstats = reference_train(arrays, dy, l1_weight, threshold)
    dense = dense_train_same_precision(cp, *dev, dyd, l1_weight)
    names = ["y", "dx", "dw_gate", "dw_up", "dw_down"]
    # Noise floor: half an ulp of the dtype, plus the fp32 accumulation noise of one length-K dot product
    # (K = max(d, n); 4 u sqrt(K)).  For 16-bit dtypes the ulp dominates; for float32 with a handful of
    # entries the dense computation's own error is one random draw of that noise, so "2x dense" alone
    # would fail on luck (dh summed in another order than cuBLAS's).
    floor = HALF_ULP[dtype] + 4 * 2.0**-24 * np.sqrt(max(arrays[0].shape[1], arrays[1].shape[0]))
    for name, out, ref, den in zip(names, (y, *grads), (ry, *rgrads), dense):
        assert out.dtype == dev[0].dtype, name
        err, err_dense = rel_error(out, ref), rel_error(den, ref)
        assert err <= 2.0 * err_dense + floor, f"{name}: rel err {err:.3g} vs dense {err_dense:.3g}"
    assert int(stats.nnz) == pytest.approx(int(rstats.nnz), rel=0.02, abs=3)
    assert float(stats.l0) == int(stats.nnz) / max(arrays[0].shape[0], 1)
    assert float(stats.l1) == pytest.approx(float(rstats.l1), rel=5e-2 if dtype != "float32" else 1e-4, abs=1e-6)
    return stats, saved


@given(
    m=st.sampled_from([1, 7, 64, 129, 1000, 2100]),
    d=st.sampled_from([64, 72, 100, 256, 2048]),
    n=st.sampled_from([40, 300, 1000, 5632]),
    dtype=st.sampled_from(DTYPES),
    mean=st.sampled_from([1.0, 12.0, 40.0]),
    l1_weight=st.sampled_from([0.0, 0.01, 3.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_forward_backward_match_reference(cp, m, d, n, dtype, mean, l1_weight, seed):
    rng = np.random.default_rng(seed)
    arrays = make_ffn(rng, m, d, n, dtype, mean_active=min(mean, n / 3))
    dy = rng.standard_normal((m, d)).astype(_np_dtype(dtype))
    check_train(cp, arrays, dy, dtype, l1_weight)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_full_rows_and_neurons_on_every_token(cp, dtype):
    rng = np.random.default_rng(3)
    m, d, n = 300, 256, 900
    bias = np.ones(m, np.float32)
    bias[0] = 100.0     # nothing active
    bias[1] = -100.0    # every neuron active -> dense backup
    arrays = make_ffn(rng, m, d, n, dtype, mean_active=15, row_bias=bias)
    arrays[1][5, 0] = 3.0     # neuron 5 active on (almost) every token: its column splits over chunks
    arrays[1][6, 0] = 3.0
    dy = rng.standard_normal((m, d)).astype(_np_dtype(dtype))
    stats, _ = check_train(cp, arrays, dy, dtype, 0.1)
    assert stats.n_backup_rows >= 1
    assert int(stats.neuron_counts[5]) > 250


@pytest.mark.parametrize("dtype", DTYPES)
def test_adversarial_every_row_dense(cp, dtype):
    """Every row exceeds the threshold: all rows take the exact dense backup."""
    rng = np.random.default_rng(4)
    arrays = make_ffn(rng, 200, 128, 500, dtype, mean_active=200)
    dy = rng.standard_normal((200, 128)).astype(_np_dtype(dtype))
    stats, saved = check_train(cp, arrays, dy, dtype, 0.05, threshold=20)
    assert stats.n_backup_rows == 200


def test_bitwise_deterministic(cp):
    rng = np.random.default_rng(9)
    dev = [cp.asarray(a) for a in make_ffn(rng, 3000, 2048, 5632, "bfloat16", mean_active=29)]
    arrays_skew = dev
    dy = cp.asarray(rng.standard_normal((3000, 2048)).astype(_np_dtype("bfloat16")))
    first = None
    for _ in range(4):
        y, saved, _ = twell.gated_ffn_forward(*arrays_skew, l1_weight=0.01)
        outs = [a.get().view(np.uint16) for a in (y, *twell.gated_ffn_backward(saved, dy))]
        if first is None:
            first = outs
        else:
            for a, b in zip(outs, first):
                np.testing.assert_array_equal(a, b)


def test_saved_state_is_small_and_consumed_once(cp):
    rng = np.random.default_rng(1)
    m, d, n = 4096, 256, 5632
    dev = [cp.asarray(a) for a in make_ffn(rng, m, d, n, "bfloat16", mean_active=29)]
    y, saved, stats = twell.gated_ffn_forward(*dev)
    nnz = int(stats.nnz)
    # pattern (int32 column) + g + u per non-zero, row offsets and routing (row_ptr, backup_slot, the
    # backup-row list's buffer): no buffers sized for the worst case.
    assert saved.nbytes <= nnz * 8 + m * 12 + 64 + saved.gate.n_backup * (n * 4 + 4)
    dy = cp.ones_like(y)
    twell.gated_ffn_backward(saved, dy)
    with pytest.raises(ValueError, match="consumed"):
        twell.gated_ffn_backward(saved, dy)


def test_backward_bad_input(cp):
    rng = np.random.default_rng(2)
    dev = [cp.asarray(a) for a in make_ffn(rng, 64, 128, 300, "float32", mean_active=10)]
    y, saved, _ = twell.gated_ffn_forward(*dev)
    with pytest.raises(ValueError, match="dy must have shape"):
        twell.gated_ffn_backward(saved, cp.ones((63, 128), cp.float32))
    with pytest.raises(TypeError, match="dy must have dtype"):
        twell.gated_ffn_backward(saved, cp.ones((64, 128), cp.float16))
    with pytest.raises(TypeError, match="saved must be"):
        twell.gated_ffn_backward((y, saved), cp.ones((64, 128), cp.float32))
    with pytest.raises(ValueError, match="l1_weight"):
        twell.gated_ffn_forward(*dev, l1_weight=-1.0)


def test_training_example_runs_and_learns(cp):
    import runpy
    from pathlib import Path
    example = Path(__file__).resolve().parents[1] / "docs" / "examples" / "train_sparse_ffn.py"
    ns = runpy.run_path(str(example), run_name="not_main")
    history = ns["train"](steps=30, m=2048, d=256, n=1024, seed=0, verbose=False)
    assert history["loss"][-1] < 0.8 * history["loss"][0]
    assert history["l0"][-1] < history["l0"][0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_blas_gemm_accumulates(cp, dtype, trans_a, trans_b):
    """blas.gemm: out = op(a) op(b) + beta out, row-major, every transpose combination, vs float64."""
    from twell.runtime import blas
    rng = np.random.default_rng(7)
    m, k, n = 37, 53, 29
    a = rng.standard_normal((k, m) if trans_a else (m, k))
    b = rng.standard_normal((n, k) if trans_b else (k, n))
    c = rng.standard_normal((m, n))
    dt = _np_dtype(dtype)
    ad, bd, cd = (cp.asarray(v.astype(dt)) for v in (a, b, c))
    a64, b64, c64 = (cp.asnumpy(v).astype(np.float64) for v in (ad, bd, cd))
    prod = (a64.T if trans_a else a64) @ (b64.T if trans_b else b64)
    out = blas.gemm(ad, bd, cd, trans_a=trans_a, trans_b=trans_b, beta=1.0)
    assert out is cd
    assert rel_error(out, prod + c64) <= 2 * HALF_ULP[dtype] + 1e-6
    out0 = blas.gemm(ad, bd, cp.full((m, n), np.nan, dtype=dt), trans_a=trans_a, trans_b=trans_b)
    assert rel_error(out0, prod) <= 2 * HALF_ULP[dtype] + 1e-6
    with pytest.raises(ValueError, match="shapes"):
        blas.gemm(ad, bd, cp.empty((m + 1, n), dtype=dt), trans_a=trans_a, trans_b=trans_b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["one array", "up first", "apart"])
def test_blas_gemm_pair_equals_two_gemms(cp, dtype, layout):
    """blas.gemm_pair: both products of one batched call (weights anywhere in memory, either order), vs
    float64 and vs two gemm calls."""
    from twell.runtime import blas
    rng = np.random.default_rng(8)
    m, k, n = 37, 64, 29
    dt = _np_dtype(dtype)
    a = cp.asarray(rng.standard_normal((m, k)).astype(dt))
    w = rng.standard_normal((2, n, k)).astype(dt)
    if layout == "one array":
        both = cp.asarray(w)
        b0, b1 = both[0], both[1]
    elif layout == "up first":
        both = cp.asarray(w[::-1].copy())
        b0, b1 = both[1], both[0]
    else:
        b0, _gap, b1 = cp.asarray(w[0]), cp.empty(12345, dtype=cp.int8), cp.asarray(w[1])
    out0, out1 = blas.gemm_pair(a, b0, b1)
    a64 = cp.asnumpy(a).astype(np.float64)
    for out, b in ((out0, b0), (out1, b1)):
        assert out.flags.c_contiguous and out.shape == (m, n)
        assert rel_error(out, a64 @ cp.asnumpy(b).astype(np.float64).T) <= 2 * HALF_ULP[dtype] + 1e-6
        assert rel_error(out, blas.gemm(a, b, trans_b=True)) <= 2 * HALF_ULP[dtype] + 1e-6
    with pytest.raises(ValueError, match="gemm_pair"):
        blas.gemm_pair(a, b0, b1[:-1])


# --------------------------------------------------------------------------- saved state sized on the device


def _spy_queued(monkeypatch):
    """Capacities of the training forwards that sized their state on the device."""
    import twell.gpu.training as training
    calls = []
    real = training.backup_rows_queued

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(training, "backup_rows_queued", spy)
    return calls


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heavy, observed", [(0, 0), (1, 0), (20, 0), (40, 40), (300, 0), (300, 2), (2048, 0)])
@pytest.mark.parametrize("gate_kernel", ["auto", "cublas"])
def test_sized_on_device_exact(cp, monkeypatch, dtype, heavy, observed, gate_kernel):
    """With a tracker that has observed the layer the training forward never waits for the host: no backup
    rows, rows within the capacity, rows past it (y and L1 from the exact kernel, g and u recomputed when
    the state is finished) and every row a backup row; forward, statistics and gradients against the float64
    reference, bitwise repeatable, the tracker then knows the true count."""
    m, d, n = 2048, 256, 1024
    rng = np.random.default_rng(heavy + 5)
    bias = np.ones(m, np.float32)
    bias[rng.choice(m, heavy, replace=False)] = -3.0                 # hundreds active: backup rows
    arrays = make_ffn(rng, m, d, n, dtype, mean_active=12, row_bias=bias)
    dy = rng.standard_normal((m, d)).astype(_np_dtype(dtype))
    _, _, read_back = twell.gated_ffn_forward(*[cp.asarray(a) for a in arrays], gate_kernel=gate_kernel)
    n_backup = int(read_back.n_backup_rows)
    assert n_backup >= heavy
    calls = _spy_queued(monkeypatch)
    outs = []
    for _ in range(2):
        tr = _observed(m, observed)
        stats, saved = check_train(cp, arrays, dy, dtype, 0.05, path="sparse", gate_kernel=gate_kernel, tracker=tr)
        assert int(stats.n_backup_rows) >= n_backup                  # + rows whose TwELL tile overflowed
        assert saved.pending is None and saved.gate.n_backup == int(stats.n_backup_rows)
        cp.cuda.Device().synchronize()
        obs = tr.observation()
        assert obs.backup_rows == int(stats.n_backup_rows) and obs.m == m
        outs.append(int(stats.n_backup_rows))
    capacity = calls[0]
    assert calls == [capacity] * 2 and capacity == (64 + 64 * -(-2 * observed // 64) if observed else 0)
    assert outs[0] == outs[1]
    dev = [cp.asarray(a) for a in arrays]
    bits = []
    for _ in range(2):
        y, saved, _ = twell.gated_ffn_forward(*dev, l1_weight=0.05, path="sparse", gate_kernel=gate_kernel,
                                              tracker=_observed(m, observed))
        bits.append([a.get().view(np.uint32 if a.dtype.itemsize == 4 else np.uint16)
                     for a in (y, *twell.gated_ffn_backward(saved, cp.asarray(dy)))])
    for a, b in zip(*bits):
        np.testing.assert_array_equal(a, b)


def test_sized_on_device_does_not_wait(cp):
    """The forward leaves its state to be finished (no host wait); without an observation it reads back."""
    rng = np.random.default_rng(7)
    dev = [cp.asarray(a) for a in make_ffn(rng, 1024, 256, 1024, "bfloat16", mean_active=12)]
    tr = twell.DensityTracker()
    _, saved, stats = twell.gated_ffn_forward(*dev, tracker=tr)
    assert object.__getattribute__(saved, "pending") is None and isinstance(stats.n_backup_rows, int)
    cp.cuda.Device().synchronize()
    _, saved, stats = twell.gated_ffn_forward(*dev, tracker=tr)
    assert object.__getattribute__(saved, "pending") is not None
    assert saved.nbytes >= 1024 * 128 * 8                              # buffers of the largest size
    twell.gated_ffn_backward(saved, cp.ones((1024, 256), dev[0].dtype))
    assert saved.pending is None


def test_sized_on_device_overflowed_tiles_become_backup_rows(cp):
    """After the fused gate, a compact row whose TwELL tile overflowed is refilled when read back and is a
    backup row when sized on the device; both exact."""
    m, d, n = 1024, 256, 1024
    rng = np.random.default_rng(17)
    arrays = make_ffn(rng, m, d, n, "bfloat16", mean_active=8)
    x, wg = arrays[0].astype(np.float32), arrays[1].astype(np.float32)
    x[:, 1] = 0.0
    x[:30, 1] = 2.0                                                   # rows 0-29: neurons 0-59 also active
    wg[:60, 1] = 3.0                                                  # 60 > 32 slots of tile 0, < 128 entries
    arrays[0], arrays[1] = x.astype(arrays[0].dtype), wg.astype(arrays[1].dtype)
    from twell.kernels import gate_gemm
    if gate_gemm.choose_gate_kernel("fused", cp.asarray(arrays[0]), cp.asarray(arrays[1])) == "cublas":
        pytest.skip("no fused gate kernel on this device")
    dy = rng.standard_normal((m, d)).astype(np.float32).astype(arrays[0].dtype)
    read_back, _ = check_train(cp, arrays, dy, "bfloat16", 0.05, path="sparse", gate_kernel="fused")
    on_device, _ = check_train(cp, arrays, dy, "bfloat16", 0.05, path="sparse", gate_kernel="fused",
                               tracker=_observed(m, 0))
    assert int(read_back.n_backup_rows) < 30 <= int(on_device.n_backup_rows)


@pytest.mark.parametrize("heavy, observed", [(200, 1), (40, 0)])
def test_sized_on_device_nan_inf_rule(cp, heavy, observed):
    """Rows past the capacity (the exact kernel) and within it follow the dense NaN / Inf rule in y."""
    def run(dev, tracker):
        y, saved, stats = twell.gated_ffn_forward(*dev, path="sparse", tracker=tracker)
        assert saved.gate.n_backup == heavy and np.isnan(float(stats.l1))
        return y

    nan_inf_past_capacity(cp, run, heavy, observed)
