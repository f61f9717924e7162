"""GPU: the fully fused forward (Hopper gate GEMM → TwELL → route → up/down of the compact rows in one
persistent kernel, gather warps next to the MMA warps) against the separate kernels (fused gate GEMM,
then route_twell_counts and twell_up_down_warp: bitwise the same arithmetic) and the float64 reference.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_gpu_ffn import _check

import twell
from twell import synthetic
from twell.kernels import gate_gemm

pytestmark = pytest.mark.gpu


@pytest.fixture
def hopper(cp):
    if cp.cuda.Device().compute_capability != "90":
        pytest.skip("the fused forward runs on Hopper (sm_90a) only")
    return cp


def _forward(cp, monkeypatch, arrays, *, fused, gated=True, wait_us=None, poison=True, **kw):
    monkeypatch.setattr(gate_gemm, "FUSED_FORWARD", fused)
    if wait_us is not None:
        monkeypatch.setattr(gate_gemm, "FUSED_FORWARD_WAIT_US", wait_us)
    x, wg, wu, wd = arrays
    out = cp.full(x.shape, cp.nan, dtype=x.dtype) if poison else None   # every row must be written
    if gated:
        y, stats = twell.gated_ffn(x, wg, wu, wd, return_stats=True, out=out, **kw)
    else:
        y, stats = twell.ffn(x, wu, wd, return_stats=True, out=out, **kw)
    assert stats.fused_forward is fused
    return y, stats


def _bits(cp, a):
    return cp.asnumpy(a.view(cp.uint16))


def _same(cp, a, b):
    np.testing.assert_array_equal(_bits(cp, a), _bits(cp, b))


CASES = [
    # m, d, n, kind, mean active, extra op arguments
    (1100, 1024, 1000, "uniform", 12.0, {}),                          # m >= 8 x SMs: the warp path
    (4133, 2048, 5632, "token_skew", 29.0, {}),                        # m off the 128-row blocks
    (2500, 2048, 777, "uniform", 20.0, {"dense_row_threshold": 24}),  # n off the 256 tiles; many backups
    (3000, 1024, 3000, "uniform", 40.0, {"compression": 32}),         # 8 slots: tiles overflow
    (16384, 2048, 5632, "uniform", 29.0, {}),
]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_fused_forward_equals_separate_kernels(hopper, monkeypatch, dtype, gated, case):
    cp = hopper
    m, d, n, kind, mean, kw = CASES[case]
    prob = synthetic.make_problem(m, d, n, mean_active=mean, kind=kind, dtype=dtype, seed=case, xp=cp)
    arrays = prob.arrays()
    y_sep, s_sep = _forward(cp, monkeypatch, arrays, fused=False, gated=gated, **kw)
    y, s = _forward(cp, monkeypatch, arrays, fused=True, gated=gated, **kw)
    _same(cp, y, y_sep)
    assert s.n_deferred_rows == 0
    assert (s.n_backup_rows, s.n_overflow_rows, int(s.nnz)) == (s_sep.n_backup_rows, s_sep.n_overflow_rows,
                                                                int(s_sep.nnz))
    np.testing.assert_array_equal(cp.asnumpy(s.neuron_counts), cp.asnumpy(s_sep.neuron_counts))
    if case == 2:
        assert s.n_backup_rows > 0
    if case == 3:
        assert s.n_overflow_rows > 0
    if gated and m <= 4200:
        _check(cp, y, [cp.asnumpy(a) for a in arrays], dtype)


@pytest.mark.parametrize("gated", [True, False])
def test_fused_forward_deferred_rows_fall_back_exactly(hopper, monkeypatch, gated):
    """wait_us = 0: gather warps defer every row whose tiles are not packed yet when they first look; the
    host then reroutes and recomputes the compact rows with the separate kernels -- same bits."""
    cp = hopper
    prob = synthetic.make_problem(8192, 2048, 5632, mean_active=29.0, kind="token_skew", seed=7, xp=cp)
    arrays = prob.arrays()
    y_sep, s_sep = _forward(cp, monkeypatch, arrays, fused=False, gated=gated)
    y, s = _forward(cp, monkeypatch, arrays, fused=True, gated=gated, wait_us=0)
    assert s.n_deferred_rows > 0
    assert s.n_backup_rows == s_sep.n_backup_rows
    _same(cp, y, y_sep)


def test_fused_forward_bitwise_deterministic(hopper, monkeypatch):
    cp = hopper
    prob = synthetic.make_problem(6000, 2048, 5632, mean_active=29.0, kind="token_skew", seed=3, xp=cp)
    arrays = prob.arrays()
    first, _ = _forward(cp, monkeypatch, arrays, fused=True)
    for _ in range(9):
        y, _ = _forward(cp, monkeypatch, arrays, fused=True, poison=False)
        _same(cp, y, first)


def test_fused_forward_only_where_it_applies(hopper, monkeypatch):
    """Other tile widths, d or thresholds above its 128-entry list run the separate kernels."""
    cp = hopper
    monkeypatch.setattr(gate_gemm, "FUSED_FORWARD", True)
    arrays = synthetic.make_problem(700, 1024, 1000, mean_active=10.0, seed=1, xp=cp).arrays()
    _, stats = twell.gated_ffn(*arrays, return_stats=True)
    assert stats.fused_forward
    _, stats = twell.gated_ffn(*arrays, return_stats=True, tile_width=64)
    assert stats.gate_kernel == "wgmma" and not stats.fused_forward
    wide = synthetic.make_problem(700, 1024, 2000, mean_active=10.0, seed=1, xp=cp).arrays()  # 256 slots
    _, stats = twell.gated_ffn(*wide, return_stats=True, dense_row_threshold=200)
    assert stats.gate_kernel == "wgmma" and not stats.fused_forward
    other_d = synthetic.make_problem(700, 1536, 1000, mean_active=10.0, seed=1, xp=cp).arrays()
    _, stats = twell.gated_ffn(*other_d, return_stats=True)
    assert stats.gate_kernel == "wgmma" and not stats.fused_forward
