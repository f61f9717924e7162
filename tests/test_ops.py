"""The public ops (twell.ops) on NumPy arrays: dispatch to the reference, ``out=``, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

import twell
from twell import reference


@pytest.fixture
def ffn_arrays():
    rng = np.random.default_rng(0)
    m, d, n = 40, 24, 300
    x = rng.standard_normal((m, d))
    x[:, 0] = 1.0
    w = [rng.standard_normal((n, d)) / np.sqrt(d) for _ in range(3)]
    w[0][:, 0] = -1.5
    return [x, *w]


def test_ops_match_reference(ffn_arrays):
    x, wg, wu, wd = ffn_arrays
    np.testing.assert_allclose(twell.gated_ffn(x, wg, wu, wd), reference.gated_ffn_dense(x, wg, wu, wd),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(twell.ffn(x, wu, wd), reference.ffn_dense(x, wu, wd), rtol=1e-12, atol=1e-12)
    out = np.full((40, 24), np.nan)
    y, stats = twell.gated_ffn(x, wg, wu, wd, out=out, return_stats=True)
    assert y is out and np.all(np.isfinite(out))
    assert float(stats.l0) == pytest.approx(((x @ wg.T) > 0).sum() / 40)
    g = twell.pack_twell(np.maximum(x @ wg.T, 0))
    np.testing.assert_allclose(twell.gated_up_down(x, g, wu, wd), reference.gated_ffn_dense(x, wg, wu, wd),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(twell.down_projection(g, wd), np.maximum(x @ wg.T, 0) @ wd, rtol=1e-12, atol=1e-12)
    y, saved, stats = twell.gated_ffn_forward(x, wg, wu, wd, l1_weight=0.5)
    grads = twell.gated_ffn_backward(saved, np.ones_like(y))
    assert [a.shape for a in grads] == [x.shape, wg.shape, wu.shape, wd.shape]
    with pytest.raises(ValueError, match="consumed"):
        twell.gated_ffn_backward(saved, np.ones_like(y))


@pytest.mark.parametrize("call, exc, message", [
    (lambda x, wg, wu, wd: twell.gated_ffn(x[:0], wg, wu, wd), ValueError, "M >= 1"),
    (lambda x, wg, wu, wd: twell.gated_ffn(x[0], wg, wu, wd), ValueError, "x must be 2-D"),
    (lambda x, wg, wu, wd: twell.gated_ffn(x.astype(np.float32), wg, wu, wd), TypeError,
     "w_gate must have the dtype of x"),
    (lambda x, wg, wu, wd: twell.gated_ffn(x, wg, wu, wd.T.copy()), ValueError,
     "w_down must have shape \\(n, d\\).*transpose of nn.Linear"),
    (lambda x, wg, wu, wd: twell.gated_ffn(x, wg, wu[:10], wd), ValueError, "w_up must have n = 300 rows"),
    (lambda x, wg, wu, wd: twell.gated_ffn(x.astype(np.int32), wg, wu, wd), TypeError, "x must have dtype in"),
    (lambda x, wg, wu, wd: twell.gated_ffn(x, wg, wu, wd, tile_width=48), ValueError, "tile_width must be one of"),
    (lambda x, wg, wu, wd: twell.gated_ffn(x, wg, wu, wd, dense_row_threshold=-1), ValueError,
     "dense_row_threshold must be >= 0"),
    (lambda x, wg, wu, wd: twell.gated_ffn(x, wg, wu, wd, out=np.empty((40, 24), np.float32)), TypeError,
     "out must have dtype float64"),
    (lambda x, wg, wu, wd: twell.gated_ffn(x, wg, wu, wd, out=np.empty((39, 24))), ValueError,
     "out must have shape"),
    (lambda x, wg, wu, wd: twell.gated_ffn(x, wg, wu, wd, gate_kernel="tensor"), ValueError,
     "gate_kernel must be one of"),
    (lambda x, wg, wu, wd: twell.ffn(x, wu, wd, gate_kernel=None), ValueError, "gate_kernel must be one of"),
    (lambda x, wg, wu, wd: twell.gated_ffn_forward(x, wg, wu, wd, l1_weight=-1.0), ValueError, "l1_weight"),
    (lambda x, wg, wu, wd: twell.gated_ffn_forward(x, wg, wu, wd, l1_weight="0.1"), TypeError, "l1_weight"),
    (lambda x, wg, wu, wd: twell.gated_ffn_backward((x, wg), x), TypeError, "saved must be the SavedForBackward"),
    (lambda x, wg, wu, wd: twell.gated_up_down(x, np.ones((40, 300)), wu, wd), TypeError, "gate must be a TwELL"),
    (lambda x, wg, wu, wd: twell.gated_up_down(x, twell.pack_twell(np.ones((39, 300))), wu, wd), ValueError,
     "gate has 39 rows but x has 40"),
    (lambda x, wg, wu, wd: twell.down_projection(twell.pack_twell(np.ones((4, 300))), wd[:5]), ValueError,
     "w_down must have shape \\(n, d\\) with n = h.n_cols"),
])
def test_bad_input(ffn_arrays, call, exc, message):
    with pytest.raises(exc, match=message):
        call(*ffn_arrays)


def test_check_finite_rejects_non_finite_weights(ffn_arrays):
    x, wg, wu, wd = ffn_arrays
    wg = wg.copy()
    wg[0, 1] = np.inf
    with pytest.raises(ValueError, match="w_gate contains NaN or Inf"):
        twell.gated_ffn(x, wg, wu, wd, check_finite=True)
    twell.gated_ffn(x, wg, wu, wd)   # not checked by default (it costs a pass over the weights)


def test_nan_in_x_propagates_like_dense(ffn_arrays):
    x, wg, wu, wd = ffn_arrays
    x = x.copy()
    x[3, 5] = np.nan
    y = twell.gated_ffn(x, wg, wu, wd)
    with np.errstate(invalid="ignore"):
        dense = reference.gated_ffn_dense(x, wg, wu, wd)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(dense))


@pytest.mark.parametrize("gate_kernel", ["auto", "fused", "wgmma", "mma", "cublas"])
def test_gate_kernel_is_ignored_on_the_reference(ffn_arrays, gate_kernel):
    """On NumPy inputs every gate_kernel runs the same float64 reference."""
    x, wg, wu, wd = ffn_arrays
    np.testing.assert_array_equal(twell.gated_ffn(x, wg, wu, wd, gate_kernel=gate_kernel),
                                  twell.gated_ffn(x, wg, wu, wd))
