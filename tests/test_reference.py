"""CPU tests of the NumPy/SciPy reference ops against independent dense float64 math.

Two kinds of inputs:

* dyadic inputs (small multiples of powers of two): every float64 sum is exact
  whatever its order, so the reference must match the dense formulas *bit for
  bit*, in every dtype (bfloat16, float16, float32, float64) after the one
  final rounding;
* Gaussian float64 inputs: relative error against the dense formulas, and
  central finite differences of the training loss.

Sizes stay small here (the whole file runs in well under a minute); the
full-size run (M = 16,384, d = 2048, n = 5632) is done by ``python -m twell bench``.
"""

from __future__ import annotations

import dataclasses
import time
from unittest.mock import patch

import numpy as np
import pytest
from conftest import rel_error
from hypothesis import given
from hypothesis import strategies as st
from test_format import (
    BF16,
    DTYPES,
    TILE_WIDTHS,
    check_hybrid_layout,
    check_twell_layout,
    expected_twell,
    n_cols,
    same_values,
    sparse_dense,
)

import twell
from twell import reference as R

F64 = np.float64


# --------------------------------------------------------------------------- inputs


def dyadic_ffn(rng, m, d, n, dtype, bias):
    """x (M, d) and neuron-major weights (n, d), all small multiples of 1/4 (exact in every dtype).

    Column 0 of x is 1 and column 0 of the gate weights is ``-bias/4``; rows of x
    get scales {0, 1/2, 1, 2} so some tokens are silent and some dense.
    """
    x = rng.integers(-2, 3, (m, d)) * 0.5
    x *= rng.choice([0.0, 0.5, 1.0, 2.0], m)[:, None]
    x[:, 0] = 1.0
    ws = [rng.integers(-3, 4, (n, d)) * 0.25 for _ in range(3)]
    ws[0][:, 0] = -0.25 * bias
    return [a.astype(dtype) for a in (x, *ws)]


def gaussian_ffn(rng, m, d, n, bias=0.5):
    x = rng.standard_normal((m, d))
    x[:, 0] = 1.0
    wg, wu, wd = (rng.standard_normal((n, d)) / np.sqrt(d) for _ in range(3))
    wg[:, 0] -= bias
    return x, wg, wu, wd


@st.composite
def ffn_problems(draw, dtypes=tuple(DTYPES)):
    tile_width = draw(st.sampled_from(TILE_WIDTHS))
    return dict(
        m=draw(st.integers(1, 64)), d=draw(st.integers(1, 48)), n=draw(n_cols), tile_width=tile_width,
        compression=draw(st.sampled_from([c for c in (1, 2, 4, 8, 16, 32) if tile_width % c == 0])),
        dtype=draw(st.sampled_from(dtypes)), seed=draw(st.integers(0, 2**32 - 1)),
        bias=draw(st.sampled_from([-4, 0, 2, 6, 12, 40])),
        threshold=draw(st.sampled_from([None, 0, 1, 3, 17, 600])),
    )


def setup(p):
    rng = np.random.default_rng(p["seed"])
    return rng, dyadic_ffn(rng, p["m"], p["d"], p["n"], p["dtype"], p["bias"])


# --------------------------------------------------------------------------- independent dense math


def relu_in(z, dtype):
    """Dense relu rounded to ``dtype`` then back to float64 (NaN propagates)."""
    return np.where(z > 0, z, np.where(np.isnan(z), z, 0.0)).astype(dtype).astype(F64)


def dense_forward(x, wg, wu, wd):
    x64, wg64, wu64, wd64 = (np.asarray(a, F64) for a in (x, wg, wu, wd))
    g = relu_in(x64 @ wg64.T, x.dtype)
    u = x64 @ wu64.T
    h = g * u
    return g, u, h, h @ wd64


def dense_backward(x, wg, wu, wd, dy, lam):
    x64, wg64, wu64, wd64, dy64 = (np.asarray(a, F64) for a in (x, wg, wu, wd, dy))
    g, u, h, _ = dense_forward(x, wg, wu, wd)
    on = g != 0
    m = x.shape[0]
    dh = np.where(on, dy64 @ wd64.T + lam / m * np.sign(h), 0.0)
    du = dh * g
    dz = np.where(on, dh * u, 0.0)
    return du @ wu64 + dz @ wg64, dz.T @ x64, du.T @ x64, h.T @ dy64


def row_backup(g_dense, tile_width, compression, threshold):
    """Expected backup rows and overflow rows of the TwELL of ``g_dense``."""
    counts, _, _, backup = expected_twell(g_dense, tile_width, compression, threshold)
    return backup, int((counts > tile_width // compression).any(axis=1).sum())


def check_inference_stats(st_, a_dense, tile_width, compression, threshold):
    m, n = a_dense.shape
    active = a_dense != 0
    backup, overflow = row_backup(a_dense, tile_width, compression, threshold)
    assert isinstance(st_, twell.FFNStats)
    assert (st_.n_rows, st_.n_cols) == (m, n)
    assert st_.nnz.shape == () and st_.nnz.dtype == np.int64 and int(st_.nnz) == active.sum()
    assert st_.l0.shape == () and st_.l0.dtype == F64 and float(st_.l0) == active.sum() / m
    assert st_.l1 is None
    assert st_.neuron_counts.dtype == np.int32
    np.testing.assert_array_equal(st_.neuron_counts, active.sum(axis=0))
    assert st_.n_backup_rows == len(backup)
    assert st_.n_overflow_rows == overflow


# --------------------------------------------------------------------------- inference


@given(ffn_problems())
def test_gate_twell_layout(p):
    _, (x, wg, _, _) = setup(p)
    tw = R.gate_twell(x, wg, p["tile_width"], p["compression"], p["threshold"])
    g = relu_in(np.asarray(x, F64) @ np.asarray(wg, F64).T, x.dtype).astype(x.dtype)
    check_twell_layout(tw, g, p["tile_width"], p["compression"], p["threshold"])


@given(ffn_problems())
def test_gated_ffn_exact(p):
    _, (x, wg, wu, wd) = setup(p)
    g, _, _, y_ref = dense_forward(x, wg, wu, wd)
    y, stats = R.gated_ffn(x, wg, wu, wd, tile_width=p["tile_width"], compression=p["compression"],
                           dense_row_threshold=p["threshold"], return_stats=True)
    assert same_values(y, y_ref.astype(x.dtype))
    check_inference_stats(stats, g, p["tile_width"], p["compression"], p["threshold"])
    y_plain = R.gated_ffn(x, wg, wu, wd, tile_width=p["tile_width"], compression=p["compression"],
                          dense_row_threshold=p["threshold"])
    assert same_values(y_plain, y)
    assert same_values(R.gated_ffn_dense(x, wg, wu, wd), y_ref.astype(x.dtype))


@given(ffn_problems())
def test_ffn_exact(p):
    _, (x, wg, _, wd) = setup(p)
    wu = wg  # carries the bias column that sets the sparsity
    x64, wu64, wd64 = (np.asarray(a, F64) for a in (x, wu, wd))
    h = relu_in(x64 @ wu64.T, x.dtype)
    y_ref = (h @ wd64).astype(x.dtype)
    y, stats = R.ffn(x, wu, wd, tile_width=p["tile_width"], compression=p["compression"],
                     dense_row_threshold=p["threshold"], return_stats=True)
    assert same_values(y, y_ref)
    check_inference_stats(stats, h, p["tile_width"], p["compression"], p["threshold"])
    assert same_values(R.ffn_dense(x, wu, wd), y_ref)


@given(ffn_problems(), st.sampled_from([0.0, 0.05, 0.3, 1.0]))
def test_gated_up_down_and_down_projection_on_crafted_patterns(p, density):
    """Gates with empty rows, tiles at / one over capacity, full rows, NaN entries."""
    rng, (x, _, wu, wd) = setup(p)
    slots = p["tile_width"] // p["compression"]
    g = sparse_dense(rng, p["m"], p["n"], p["tile_width"], slots, density, x.dtype)
    gate = twell.pack_twell(g, p["tile_width"], p["compression"], p["threshold"])
    x64, wu64, wd64, g64 = (np.asarray(a, F64) for a in (x, wu, wd, g))
    y = R.gated_up_down(x, gate, wu, wd)
    y_ref = ((g64 * (x64 @ wu64.T)) @ wd64).astype(x.dtype)
    assert same_values(y, y_ref)
    nan_rows = np.isnan(g64).any(axis=1)
    assert np.isnan(np.asarray(y, F64)[nan_rows]).all()
    assert not np.isnan(np.asarray(y, F64)[~nan_rows]).any()
    assert same_values(R.down_projection(gate, wd), (g64 @ wd64).astype(x.dtype))


def cond_error(out, h, wd) -> float:
    """||out - h wd|| / || |h| |wd| ||: the error relative to the sum of absolute terms, so that a row whose
    terms cancel (d = 1 makes that likely) is judged by the rounding it cannot avoid."""
    ref = np.einsum("tj,jk->tk", h, wd)
    scale = np.linalg.norm(np.einsum("tj,jk->tk", np.abs(h), np.abs(wd)))
    err = np.linalg.norm(np.asarray(out, F64) - ref)
    return float(err / scale) if scale > 0 else float(err)


@given(ffn_problems(dtypes=(np.dtype(np.float64),)))
def test_inference_gaussian_float64(p):
    rng = np.random.default_rng(p["seed"])
    x, wg, wu, wd = gaussian_ffn(rng, p["m"], p["d"], p["n"], bias=p["bias"] / 8)
    kw = dict(tile_width=p["tile_width"], compression=p["compression"], dense_row_threshold=p["threshold"])
    h = np.maximum(np.einsum("tk,jk->tj", x, wg), 0) * np.einsum("tk,jk->tj", x, wu)
    assert cond_error(R.gated_ffn(x, wg, wu, wd, **kw), h, wd) < 1e-13
    h = np.maximum(np.einsum("tk,jk->tj", x, wu), 0)
    assert cond_error(R.ffn(x, wu, wd, **kw), h, wd) < 1e-13


@pytest.mark.parametrize("dtype", [np.float32, np.float64, BF16])
@pytest.mark.parametrize("compression", [1, 8])
def test_nan_in_x_propagates_like_dense(dtype, compression):
    rng = np.random.default_rng(7)
    x, wg, wu, wd = dyadic_ffn(rng, 12, 16, 300, dtype, bias=4)
    x[[2, 7], [5, 0]] = np.nan
    _, _, _, y_ref = dense_forward(x, wg, wu, wd)
    y, stats = R.gated_ffn(x, wg, wu, wd, tile_width=64, compression=compression, return_stats=True)
    y64 = np.asarray(y, F64)
    np.testing.assert_array_equal(np.isnan(y64).any(axis=1), np.isin(np.arange(12), [2, 7]))
    assert np.isnan(y64[[2, 7]]).all()
    assert same_values(y, y_ref.astype(dtype))
    # a NaN row has every neuron active: it overflows its tiles unless compression == 1
    backup = R.gate_twell(x, wg, 64, compression).backup_rows
    if compression == 1:
        assert stats.n_backup_rows == 0 and len(backup) == 0
    else:
        assert {2, 7} <= set(backup.tolist()) and stats.n_backup_rows == len(backup)
    assert same_values(R.ffn(x, wu, wd, tile_width=64, compression=compression),
                       (relu_in(np.asarray(x, F64) @ np.asarray(wu, F64).T, dtype)
                        @ np.asarray(wd, F64)).astype(dtype))
    y2, saved, stats2 = R.gated_ffn_forward(x, wg, wu, wd, dense_row_threshold=299)
    assert same_values(y2, y_ref.astype(dtype))
    assert {2, 7} <= set(saved.gate.backup_rows.tolist()) and np.isnan(float(stats2.l1))


def test_out_dtype():
    rng = np.random.default_rng(1)
    x, wg, wu, wd = (a.astype(np.float32) for a in gaussian_ffn(rng, 9, 20, 70))
    _, _, _, y_ref = dense_forward(x, wg, wu, wd)
    y = R.gated_ffn(x, wg, wu, wd, out_dtype=np.float64)
    assert y.dtype == F64 and rel_error(y, y_ref) < 1e-14
    assert R.gated_ffn(x, wg, wu, wd, out_dtype="bfloat16").dtype == BF16
    assert R.ffn(x, wu, wd, out_dtype="float16").dtype == np.float16
    y, saved, _ = R.gated_ffn_forward(x, wg, wu, wd, out_dtype=F64)
    assert y.dtype == F64 and rel_error(y, y_ref) < 1e-14
    grads = R.gated_ffn_backward(saved, np.ones_like(x), out_dtype=F64)
    assert all(a.dtype == F64 for a in grads)
    assert all(a.dtype == np.float32 for a in R.gated_ffn_backward(R.gated_ffn_forward(x, wg, wu, wd)[1],
                                                                   np.ones_like(x)))


# --------------------------------------------------------------------------- training


@given(ffn_problems(), st.booleans())
def test_forward_backward_exact(p, with_l1):
    rng, (x, wg, wu, wd) = setup(p)
    m, n = x.shape[0], wg.shape[0]
    lam = m / 16 if with_l1 else 0.0  # lam / M = 1/16 keeps the math exact
    g, u, h, y_ref = dense_forward(x, wg, wu, wd)
    y, saved, stats = R.gated_ffn_forward(x, wg, wu, wd, l1_weight=lam, dense_row_threshold=p["threshold"])
    threshold = n if p["threshold"] is None else p["threshold"]
    assert same_values(y, y_ref.astype(x.dtype))

    active = g != 0
    backup = np.flatnonzero(active.sum(axis=1) > threshold)
    assert (stats.n_rows, stats.n_cols, stats.n_backup_rows, stats.n_overflow_rows) == (m, n, len(backup), None)
    assert stats.nnz.dtype == np.int64 and int(stats.nnz) == active.sum()
    assert stats.l0.dtype == F64 and float(stats.l0) == active.sum() / m
    assert stats.l1.shape == () and stats.l1.dtype == F64
    np.testing.assert_allclose(float(stats.l1), np.abs(h).sum() / m, rtol=1e-15)
    np.testing.assert_array_equal(stats.neuron_counts, active.sum(axis=0))
    assert stats.neuron_counts.dtype == np.int32

    assert isinstance(saved, twell.SavedForBackward) and not saved.consumed
    assert saved.x is x and saved.w_gate is wg and saved.w_up is wu and saved.w_down is wd
    assert saved.l1_weight == lam
    check_hybrid_layout(saved.gate, g, threshold)
    rows = np.repeat(np.arange(m), np.diff(saved.gate.row_ptr))
    np.testing.assert_array_equal(saved.up_values, u[rows, saved.gate.col_indices])
    np.testing.assert_array_equal(saved.up_backup, u[backup])

    dy = (rng.integers(-2, 3, x.shape) * 0.5).astype(x.dtype)
    grads = R.gated_ffn_backward(saved, dy)
    assert saved.consumed
    refs = dense_backward(x, wg, wu, wd, dy, lam)
    for name, got, ref in zip(("dx", "dw_gate", "dw_up", "dw_down"), grads, refs):
        assert got.shape == ref.shape, name
        assert same_values(got, ref.astype(x.dtype)), name


@given(ffn_problems(dtypes=(np.dtype(np.float64),)), st.floats(0.0, 3.0))
def test_forward_backward_gaussian_float64(p, lam):
    rng = np.random.default_rng(p["seed"])
    x, wg, wu, wd = gaussian_ffn(rng, p["m"], p["d"], p["n"], bias=p["bias"] / 8)
    dy = rng.standard_normal(x.shape)
    y, saved, _ = R.gated_ffn_forward(x, wg, wu, wd, l1_weight=lam, dense_row_threshold=p["threshold"])
    assert rel_error(y, dense_forward(x, wg, wu, wd)[3]) < 1e-13
    for got, ref in zip(R.gated_ffn_backward(saved, dy), dense_backward(x, wg, wu, wd, dy, lam)):
        assert rel_error(got, ref) < 1e-12


@given(ffn_problems(), st.integers(1, 2000), st.integers(1, 200))
def test_row_blocks_and_sddmm_chunks(p, block, chunk):
    """Tiny row blocks (``_BLOCK_ELEMENTS``) and SDDMM chunks give the same exact results."""
    rng, (x, wg, wu, wd) = setup(p)
    m, thr = x.shape[0], p["threshold"]
    kw = dict(tile_width=p["tile_width"], compression=p["compression"], dense_row_threshold=thr)
    g, _, _, y_ref = dense_forward(x, wg, wu, wd)
    g_x = g.astype(x.dtype)
    dy = (rng.integers(-2, 3, x.shape) * 0.5).astype(x.dtype)
    with patch.object(R, "_BLOCK_ELEMENTS", block), patch.object(R, "_SDDMM_ELEMENTS", chunk):
        check_twell_layout(R.gate_twell(x, wg, p["tile_width"], p["compression"], thr), g_x, p["tile_width"],
                           p["compression"], thr)
        check_twell_layout(R.pack_twell(g_x, p["tile_width"], p["compression"], thr), g_x, p["tile_width"],
                           p["compression"], thr)
        check_hybrid_layout(R.pack_hybrid(g_x, thr), g_x, thr)
        assert same_values(R.gated_ffn(x, wg, wu, wd, **kw), y_ref.astype(x.dtype))
        h = relu_in(np.asarray(x, F64) @ np.asarray(wg, F64).T, x.dtype)
        assert same_values(R.ffn(x, wg, wd, **kw), (h @ np.asarray(wd, F64)).astype(x.dtype))
        y, saved, _ = R.gated_ffn_forward(x, wg, wu, wd, l1_weight=m / 16, dense_row_threshold=thr)
        grads = R.gated_ffn_backward(saved, dy)
    assert same_values(y, y_ref.astype(x.dtype))
    for got, ref in zip(grads, dense_backward(x, wg, wu, wd, dy, m / 16)):
        assert same_values(got, ref.astype(x.dtype))


def _fd_problem(seed, m, d, n):
    """Gaussian problem with every z and every active u at least 1e-3 away from 0."""
    rng = np.random.default_rng(seed)
    while True:
        x, wg, wu, wd = gaussian_ffn(rng, m, d, n, bias=0.2)
        z, u = x @ wg.T, x @ wu.T
        if np.abs(z).min() > 1e-3 and np.abs(u[z > 0]).min(initial=1.0) > 1e-3 and (z > 0).any():
            return rng, [x, wg, wu, wd]


@pytest.mark.parametrize("threshold", [0, 2, None])
@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_backward_matches_finite_differences(threshold, lam):
    m, d, n = 5, 4, 7
    rng, params = _fd_problem(11 + (threshold or 9), m, d, n)
    r = rng.standard_normal((m, d))

    def loss(ps):
        y, _, stats = R.gated_ffn_forward(*ps, l1_weight=lam, dense_row_threshold=threshold)
        return float(np.sum(y * r)) + lam * float(stats.l1)

    _, saved, stats = R.gated_ffn_forward(*params, l1_weight=lam, dense_row_threshold=threshold)
    if threshold == 0:
        assert stats.n_backup_rows == int(((params[0] @ params[1].T) > 0).any(axis=1).sum()) > 0
    grads = R.gated_ffn_backward(saved, r)
    order = (0, 1, 2, 3)  # grads are (dx, dw_gate, dw_up, dw_down) for params (x, w_gate, w_up, w_down)
    eps = 1e-5
    for k, grad in zip(order, grads):
        fd = np.zeros_like(params[k])
        for idx in np.ndindex(*params[k].shape):
            plus = [a.copy() for a in params]
            minus = [a.copy() for a in params]
            plus[k][idx] += eps
            minus[k][idx] -= eps
            fd[idx] = (loss(plus) - loss(minus)) / (2 * eps)
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8, err_msg=f"gradient {k}")


def test_all_zero_and_silent_rows():
    rng = np.random.default_rng(5)
    x, wg, wu, wd = gaussian_ffn(rng, 6, 8, 40)
    x[:] = 0.0  # z = 0 everywhere: no neuron active
    y, stats = R.gated_ffn(x, wg, wu, wd, tile_width=32, compression=4, return_stats=True)
    assert not y.any() and int(stats.nnz) == 0 and not stats.neuron_counts.any()
    y, saved, stats = R.gated_ffn_forward(x, wg, wu, wd, l1_weight=1.0)
    assert not y.any() and float(stats.l1) == 0.0 and saved.gate.nnz == 0
    grads = R.gated_ffn_backward(saved, rng.standard_normal(x.shape))
    assert all(not a.any() for a in grads)
    # M = 1
    x1 = rng.standard_normal((1, 8))
    y1 = R.gated_ffn(x1, wg, wu, wd, tile_width=32, compression=4)
    assert rel_error(y1, dense_forward(x1, wg, wu, wd)[3]) < 1e-13


def test_backward_without_stored_transposed_pattern():
    """A saved state whose gate has no neuron-major pattern (e.g. built elsewhere) gives the same gradients."""
    rng = np.random.default_rng(4)
    x, wg, wu, wd = gaussian_ffn(rng, 10, 12, 90, bias=1.0)
    dy = rng.standard_normal(x.shape)
    _, saved, _ = R.gated_ffn_forward(x, wg, wu, wd, l1_weight=0.5, dense_row_threshold=16)
    assert saved.gate.n_backup > 0 and saved.gate.nnz > 0
    bare = dataclasses.replace(saved, gate=dataclasses.replace(saved.gate, transposed=None))
    for got, ref in zip(R.gated_ffn_backward(bare, dy), R.gated_ffn_backward(saved, dy)):
        np.testing.assert_array_equal(got, ref)


def test_saved_state_finished_at_first_read():
    """A state sized later (the GPU forward with a tracker) is finished once, at the first read of any of its
    four sized attributes, from the state's own inputs; copies (dataclasses.replace) see the finished state,
    and nbytes counts the whole buffers that views keep alive."""
    rng = np.random.default_rng(6)
    x, wg, wu, wd = gaussian_ffn(rng, 10, 12, 90, bias=1.0)
    _, saved, _ = R.gated_ffn_forward(x, wg, wu, wd, dense_row_threshold=16)
    calls = []

    def finish(state):
        calls.append(state.x is x)
        return saved.gate, saved.up_values, saved.up_backup, (3, 4)

    later = twell.SavedForBackward(x, wg, wu, wd, None, None, None, 0.5, pending=finish)
    assert calls == [] and later.l1_weight == 0.5 and later.n_rows == 10       # other attributes: not finished
    assert later.workspace == (3, 4) and calls == [True] and later.pending is None
    assert later.gate is saved.gate and later.up_backup is saved.up_backup and calls == [True]
    copy = dataclasses.replace(twell.SavedForBackward(x, wg, wu, wd, None, None, None, 0.5, pending=finish),
                               l1_weight=1.0)
    assert copy.pending is None and copy.gate is saved.gate and calls == [True, True]
    big = np.zeros(1000)
    viewed = dataclasses.replace(saved, up_values=big[:saved.gate.nnz])
    assert viewed.nbytes == saved.nbytes - saved.up_values.nbytes + big.nbytes
    for got, want in zip(R.gated_ffn_backward(later, np.ones_like(x)),
                         R.gated_ffn_backward(dataclasses.replace(saved, l1_weight=0.5), np.ones_like(x))):
        np.testing.assert_array_equal(got, want)


def test_backward_state_errors():
    rng = np.random.default_rng(2)
    x, wg, wu, wd = (a.astype(np.float32) for a in gaussian_ffn(rng, 4, 6, 50))
    _, saved, _ = R.gated_ffn_forward(x, wg, wu, wd)
    with pytest.raises(ValueError, match=r"dy must have shape \(4, 6\)"):
        R.gated_ffn_backward(saved, np.ones((4, 5), np.float32))
    with pytest.raises(TypeError, match="dy must have the same dtype as x"):
        R.gated_ffn_backward(saved, np.ones((4, 6), np.float64))
    with pytest.raises(TypeError, match="dy must be an array"):
        R.gated_ffn_backward(saved, [[1.0] * 6] * 4)
    with pytest.raises(ValueError, match="dy must be 2-D"):
        R.gated_ffn_backward(saved, np.ones(24, np.float32))
    with pytest.raises(TypeError, match="out_dtype must be a float dtype"):
        R.gated_ffn_backward(saved, np.ones((4, 6), np.float32), out_dtype=np.int16)
    assert not saved.consumed  # failed validation does not consume the state
    R.gated_ffn_backward(saved, np.ones((4, 6), np.float32))
    assert saved.consumed
    with pytest.raises(ValueError, match="already consumed by a backward; run the forward again"):
        R.gated_ffn_backward(saved, np.ones((4, 6), np.float32))
    with pytest.raises(TypeError, match="saved must be a SavedForBackward"):
        R.gated_ffn_backward(saved.gate, np.ones((4, 6), np.float32))


# --------------------------------------------------------------------------- bad input

_rng = np.random.default_rng(0)
X = _rng.standard_normal((4, 6)).astype(np.float32)
W = _rng.standard_normal((40, 6)).astype(np.float32)
W2 = _rng.standard_normal((41, 6)).astype(np.float32)
GATE = R.gate_twell(X, W, 32, 4)

BAD_FFN_ARGS = [
    ("x", [[1.0] * 6] * 4, TypeError, "x must be an array"),
    ("x", X[0], ValueError, "x must be 2-D"),
    ("x", X.astype(np.int32), TypeError, "x must have dtype"),
    ("x", X[:0], ValueError, r"x must have shape \(M, d\) with M >= 1"),
    ("x", X.astype(np.float64), TypeError, "must have the same dtype as x"),
]


def _ffn_calls():
    """(name, callable taking overrides, argument names it accepts)."""
    return {
        "gated_ffn": (lambda a: R.gated_ffn(a["x"], a["w_gate"], a["w_up"], a["w_down"]),
                      ("x", "w_gate", "w_up", "w_down")),
        "gated_ffn_dense": (lambda a: R.gated_ffn_dense(a["x"], a["w_gate"], a["w_up"], a["w_down"]),
                            ("x", "w_gate", "w_up", "w_down")),
        "gated_ffn_forward": (lambda a: R.gated_ffn_forward(a["x"], a["w_gate"], a["w_up"], a["w_down"]),
                              ("x", "w_gate", "w_up", "w_down")),
        "ffn": (lambda a: R.ffn(a["x"], a["w_up"], a["w_down"]), ("x", "w_up", "w_down")),
        "ffn_dense": (lambda a: R.ffn_dense(a["x"], a["w_up"], a["w_down"]), ("x", "w_up", "w_down")),
        "gate_twell": (lambda a: R.gate_twell(a["x"], a["w_gate"]), ("x", "w_gate")),
        "gated_up_down": (lambda a: R.gated_up_down(a["x"], GATE, a["w_up"], a["w_down"]), ("x", "w_up", "w_down")),
    }


def _bad_cases():
    cases = []
    for fname, (call, names) in _ffn_calls().items():
        for arg, value, exc, match in BAD_FFN_ARGS:
            cases.append(pytest.param(call, {arg: value}, exc, match, id=f"{fname}-{match[:20]}"))
        for w in names[1:]:
            cases += [
                pytest.param(call, {w: W[:, :5]}, ValueError, f"{w} must have shape \\(n, d\\) with d = x.shape",
                             id=f"{fname}-{w}-d"),
                pytest.param(call, {w: W.T.copy()}, ValueError, f"{w} must have shape", id=f"{fname}-{w}-transposed"),
                pytest.param(call, {w: W.astype(np.float64)}, TypeError, f"{w} must have the same dtype as x",
                             id=f"{fname}-{w}-dtype"),
                pytest.param(call, {w: W[0]}, ValueError, f"{w} must be 2-D", id=f"{fname}-{w}-ndim"),
                pytest.param(call, {w: "weights"}, TypeError, f"{w} must be an array", id=f"{fname}-{w}-str"),
            ]
            if w != names[1]:
                cases.append(pytest.param(call, {w: W2}, ValueError, f"{w} must have shape \\(n, d\\) = \\(40, 6\\)",
                                          id=f"{fname}-{w}-n"))
    return cases


@pytest.mark.parametrize("call, override, exc, match", _bad_cases())
def test_ffn_bad_arrays(call, override, exc, match):
    args = {"x": X, "w_gate": W, "w_up": W, "w_down": W, **override}
    with pytest.raises(exc, match=match):
        call(args)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: R.gated_ffn(X, W, W, W, tile_width=80), ValueError, "tile_width must be one of"),
    (lambda: R.gated_ffn(X, W, W, W, compression=7), ValueError, "compression must divide"),
    (lambda: R.gated_ffn(X, W, W, W, dense_row_threshold=-3), ValueError, "dense_row_threshold must be >= 0"),
    (lambda: R.gated_ffn(X, W, W, W, return_stats="yes"), TypeError, "return_stats must be a bool"),
    (lambda: R.gated_ffn(X, W, W, W, out_dtype="int8"), TypeError, "out_dtype must be a float dtype"),
    (lambda: R.ffn(X, W, W, tile_width=0), ValueError, "tile_width must be >= 32"),
    (lambda: R.ffn(X, W, W, compression=None), TypeError, "compression must be an integer"),
    (lambda: R.ffn(X, W, W, return_stats=1), TypeError, "return_stats must be a bool"),
    (lambda: R.ffn(X, W, W, out_dtype="nonsense"), TypeError, "out_dtype must be a float dtype"),
    (lambda: R.gate_twell(X, W, 32, 64), ValueError, "compression must be <= |compression must divide"),
    (lambda: R.gated_ffn_dense(X, W, W, W, out_dtype=np.int64), TypeError, "out_dtype"),
    (lambda: R.ffn_dense(X, W, W, out_dtype=complex), TypeError, "out_dtype"),
    (lambda: R.gated_ffn_forward(X, W, W, W, l1_weight=-1.0), ValueError, "l1_weight must be a finite number >= 0"),
    (lambda: R.gated_ffn_forward(X, W, W, W, l1_weight=float("nan")), ValueError, "l1_weight must be a finite"),
    (lambda: R.gated_ffn_forward(X, W, W, W, l1_weight="0.1"), TypeError, "l1_weight must be a real number"),
    (lambda: R.gated_ffn_forward(X, W, W, W, l1_weight=True), TypeError, "l1_weight must be a real number"),
    (lambda: R.gated_ffn_forward(X, W, W, W, dense_row_threshold=2.0), TypeError, "dense_row_threshold must be an"),
    (lambda: R.gated_ffn_forward(X, W, W, W, out_dtype=np.int8), TypeError, "out_dtype must be a float dtype"),
    (lambda: R.gated_up_down(X, X, W, W), TypeError, "gate must be a TwELL"),
    (lambda: R.gated_up_down(X, R.gate_twell(X, W2, 32, 4), W, W), ValueError,
     r"gate must have shape \(M, n\) = \(4, 40\)"),
    (lambda: R.gated_up_down(X[:3], GATE, W, W), ValueError, r"gate must have shape \(M, n\) = \(3, 40\)"),
    (lambda: R.gated_up_down(X.astype(F64), R.gate_twell(X, W, 32, 4), W.astype(F64), W.astype(F64)), TypeError,
     "gate must have values of dtype float64"),
    (lambda: R.gated_up_down(X, GATE, W, W, out_dtype="int32"), TypeError, "out_dtype"),
    (lambda: R.down_projection(X, W), TypeError, "h must be a TwELL"),
    (lambda: R.down_projection(GATE, W2), ValueError, r"w_down must have shape \(n, d\) with n = h.n_cols = 40"),
    (lambda: R.down_projection(GATE, W.astype(F64)), TypeError, "w_down must have the same dtype as h"),
    (lambda: R.down_projection(GATE, [[0.0]]), TypeError, "w_down must be an array"),
    (lambda: R.down_projection(GATE, W[0]), ValueError, "w_down must be 2-D"),
    (lambda: R.down_projection(GATE, W, out_dtype="bool"), TypeError, "out_dtype"),
])
def test_op_bad_parameters(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --------------------------------------------------------------------------- speed


def test_reference_speed_paper_width():
    """M = 2048 tokens at the paper's d = 2048, n = 5632 (~30 active neurons per token, a few dense
    tokens): inference, non-gated inference, training forward and backward together in < 30 s.
    The full M = 16,384 run is done by ``python -m twell bench``."""
    rng = np.random.default_rng(0)
    m, d, n = 2048, 2048, 5632
    x = rng.standard_normal((m, d))
    x[:, 0] = 1.0
    x[:8, 1:] *= 3.0  # a few tokens with hundreds of active neurons -> backup rows
    wg, wu, wd = (rng.standard_normal((n, d)) * 0.02 for _ in range(3))
    wg[:, 0] = -2.3
    wu_sparse = wg.copy()
    start = time.perf_counter()
    y, stats = R.gated_ffn(x, wg, wu, wd, return_stats=True)
    y_ffn = R.ffn(x, wu_sparse, wd)
    y_fwd, saved, fstats = R.gated_ffn_forward(x, wg, wu, wd, l1_weight=1e-3)
    grads = R.gated_ffn_backward(saved, rng.standard_normal((m, d)))
    elapsed = time.perf_counter() - start
    assert 15 < float(stats.l0) < 60 and stats.n_backup_rows >= 8 and fstats.n_backup_rows >= 8
    # spot-check rows (including the dense ones) against dense math
    rows = np.r_[0:8, 1000:1024]
    _, _, _, y_ref = dense_forward(x[rows], wg, wu, wd)
    assert rel_error(y[rows], y_ref) < 1e-12 and rel_error(y_fwd[rows], y_ref) < 1e-12
    assert rel_error(y_ffn[rows], np.maximum(x[rows] @ wu_sparse.T, 0) @ wd) < 1e-12
    assert all(np.isfinite(a).all() for a in grads)
    assert elapsed < 30, f"reference took {elapsed:.1f} s"
