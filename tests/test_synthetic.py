"""twell.synthetic: seeded problems with controlled activation sparsity (CPU; one GPU test)."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from twell import synthetic
from twell.synthetic import Problem, adversarial_problem, describe, make_problem

BF16 = np.dtype(ml_dtypes.bfloat16)


def _bits(a):
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _same(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(_bits(a), _bits(b))


def _active(p: Problem) -> np.ndarray:
    return (p.x.astype(np.float32) @ p.w_gate.astype(np.float32).T) > 0


# ---------------------------------------------------------------------------- reproducibility
@pytest.mark.parametrize("kind", synthetic.KINDS)
def test_same_seed_same_arrays(kind):
    a = make_problem(96, 64, 384, kind=kind, seed=7)
    b = make_problem(96, 64, 384, kind=kind, seed=7)
    for name in ("x", "w_gate", "w_up", "w_down"):
        assert _same(getattr(a, name), getattr(b, name)), name
    assert a.params == b.params
    c = make_problem(96, 64, 384, kind=kind, seed=8)
    for name in ("x", "w_gate", "w_up", "w_down"):
        assert not _same(getattr(a, name), getattr(c, name)), name


def test_streams_independent_of_m_and_kind():
    small = make_problem(32, 64, 256, seed=3)
    big = make_problem(80, 64, 256, seed=3)
    assert _same(small.x, big.x[:32])  # token prefix does not depend on m
    for name in ("w_gate", "w_up", "w_down"):
        assert _same(getattr(small, name), getattr(big, name))
    skew = make_problem(32, 64, 256, seed=3, kind="token_skew")
    # same thresholds (median calibration) and weights; only x differs
    assert _same(skew.w_up, small.w_up) and _same(skew.w_gate, small.w_gate)
    assert not _same(skew.x, small.x)
    skew_big = make_problem(80, 64, 256, seed=3, kind="token_skew")
    assert _same(skew.x, skew_big.x[:32])


def test_construction_invariants():
    p = make_problem(50, 128, 300, seed=1)
    assert p.x.shape == (50, 128) and p.w_gate.shape == p.w_up.shape == p.w_down.shape == (300, 128)
    assert (p.m, p.d, p.n) == (50, 128, 300)
    assert p.xp is np and p.dtype == BF16
    assert np.all(p.x[:, 0].astype(np.float32) == 1.0)
    # w_gate[:, 0] = -kappa * ||w_gate[:, 1:]||, kappa = isf(29/300) > 0
    c = -p.w_gate[:, 0].astype(np.float64)
    norms = np.linalg.norm(p.w_gate[:, 1:].astype(np.float64), axis=1)
    np.testing.assert_allclose(c / norms, p.params["kappa"], rtol=2e-2)
    # weights ~ N(0, 1/d)
    assert abs(p.w_up.astype(np.float64).std() * math.sqrt(128) - 1) < 0.05
    assert p.nbytes == sum(a.nbytes for a in p.arrays())
    h = p.host("float32")
    assert h.x.dtype == np.float32 and np.array_equal(h.x, p.x.astype(np.float32))


# ---------------------------------------------------------------------------- realised rates
@pytest.mark.parametrize("m,d,n,target", [(512, 256, 1024, 29.0), (256, 2048, 5632, 29.0), (512, 256, 1024, 200.0)])
def test_uniform_mean_close_to_target(m, d, n, target):
    p = make_problem(m, d, n, mean_active=target, seed=0)
    s = describe(p)
    assert abs(s["token"]["mean"] - target) <= 0.1 * target
    # every neuron has the same rate: never-active share is (1 - rate)^m
    assert s["neuron"]["frac_dead"] == pytest.approx((1 - target / n) ** m, abs=0.05)
    if m * target / n > 10:
        assert s["neuron"]["cv"] < 0.5
    assert s["rows"] == m and s["n"] == n
    assert s["nnz"] == int(_active(p).sum())


def test_token_skew_paper_like():
    p = make_problem(4096, 256, 5632, kind="token_skew", mean_active=29.0, seed=0)
    assert p.params["calibrate"] == "median" and p.params["skew_sigma"] == synthetic.DEFAULT_TOKEN_SIGMA
    assert 36 < p.params["expected_mean_active"] < 42  # median 29 -> mean ~39
    s = describe(p)["token"]
    assert abs(s["p50"] - 29) <= 3
    assert abs(s["mean"] - p.params["expected_mean_active"]) <= 0.1 * p.params["expected_mean_active"]
    assert s["max"] >= 4 * s["mean"]
    assert p.token_scale is not None and p.token_scale.shape == (4096,)


def test_token_skew_mean_calibration_and_heavy_case():
    p = make_problem(4096, 256, 5632, kind="token_skew", calibrate="mean", seed=1)
    s = describe(p)["token"]
    assert abs(s["mean"] - 29) <= 2.9
    assert s["p50"] < s["mean"]
    heavy = make_problem(4096, 256, 5632, kind="token_skew", skew_sigma=0.35, seed=2)
    t = describe(heavy)["token"]
    assert abs(t["p50"] - 29) <= 3
    assert t["p99"] > 400  # the heavy case: median 29, p99 ~700
    assert t["mean"] > 2 * t["p50"]


def test_neuron_skew_dead_and_heavy():
    p = make_problem(2048, 256, 2048, kind="neuron_skew", dead_fraction=0.3, seed=0)
    assert p.dead.sum() == round(0.3 * 2048)
    act = _active(p)
    assert act[:, p.dead].sum() == 0  # dead neurons never fire
    s = describe(p)
    assert abs(s["token"]["mean"] - 29) <= 2.9
    assert 0.3 <= s["neuron"]["frac_dead"] <= 0.4  # + alive neurons with tiny rates
    assert s["neuron"]["cv"] > 1.5
    assert s["neuron"]["top1pct_share"] > 0.1
    none_dead = make_problem(2048, 256, 2048, kind="neuron_skew", dead_fraction=0.0, skew_sigma=0.5, seed=0)
    s0 = describe(none_dead)
    assert s0["neuron"]["frac_dead"] < 0.02
    assert s0["neuron"]["cv"] < s["neuron"]["cv"]


def test_describe_max_rows_and_structure():
    p = make_problem(300, 64, 512, seed=4)
    s = describe(p, max_rows=100)
    assert s["rows"] == 100 and s["rows_total"] == 300
    assert set(s["token"]) >= {"mean", "p50", "p99", "max", "min", "frac_zero_rows"}
    assert set(s["neuron"]) >= {"frac_dead", "p50", "p99", "max", "cv"}
    assert s["tiles"]["capacity"] == {"8": 32, "4": 64, "2": 128}
    counts = _active(p)[:100].sum(axis=1)
    assert s["token"]["max"] == counts.max() and s["token"]["min"] == counts.min()
    assert s["token"]["mean"] == pytest.approx(counts.mean())
    with pytest.raises(TypeError, match="problem"):
        describe(p.x)
    with pytest.raises(ValueError, match="max_rows"):
        describe(p, max_rows=0)


# ---------------------------------------------------------------------------- adversarial
def test_adversarial_modes():
    n = 600  # not a tile multiple
    a = adversarial_problem(40, 64, n, mode="all")
    sa = describe(a)
    assert sa["token"]["min"] == n
    assert all(v == 1.0 for v in sa["tiles"]["overflow_rows_frac"].values())
    h = adversarial_problem(40, 64, n, mode="half", seed=1)
    sh = describe(h)
    assert sh["tiles"]["overflow_rows_frac"]["8"] == 1.0 and sh["tiles"]["overflow_rows_frac"]["4"] == 1.0
    assert 0.4 * n < sh["token"]["mean"] < 0.6 * n
    mx = adversarial_problem(40, 64, 2048, mode="mixed", mean_active=29.0)
    counts = _active(mx).sum(axis=1)
    assert np.all(counts[0::2] > 1800) and np.all(counts[1::2] < 100)
    assert mx.kind == "adversarial/mixed"
    with pytest.raises(ValueError, match="mode"):
        adversarial_problem(4, 64, 128, mode="nope")


# ---------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype,expect", [
    ("bfloat16", BF16), ("float16", np.dtype(np.float16)), ("float32", np.dtype(np.float32)),
    ("float64", np.dtype(np.float64)), (np.float32, np.dtype(np.float32)), (ml_dtypes.bfloat16, BF16),
    (np.dtype(np.float16), np.dtype(np.float16)),
])
def test_dtypes(dtype, expect):
    p = make_problem(64, 64, 256, dtype=dtype, seed=0)
    for a in p.arrays():
        assert a.dtype == expect
    s = describe(p)
    assert 15 < s["token"]["mean"] < 45


def test_float64_matches_float32_statistics():
    p64 = make_problem(256, 128, 1024, dtype="float64", seed=5)
    p32 = make_problem(256, 128, 1024, dtype="float32", seed=5)
    # same seeds, different generation precision: same statistics, not the same numbers
    assert abs(describe(p64)["token"]["mean"] - describe(p32)["token"]["mean"]) < 3


# ---------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(m=0), ValueError, "m"),
    (dict(m=2.5), TypeError, "m"),
    (dict(m=True), TypeError, "m"),
    (dict(d=1), ValueError, "d"),
    (dict(n=0), ValueError, "n"),
    (dict(kind="nope"), ValueError, "kind"),
    (dict(kind=3), TypeError, "kind"),
    (dict(mean_active=0), ValueError, "mean_active"),
    (dict(mean_active=-1.0), ValueError, "mean_active"),
    (dict(mean_active=256, kind="token_skew"), ValueError, "mean_active"),     # n: uniform only
    (dict(mean_active=300.0), ValueError, "mean_active"),
    (dict(mean_active=float("nan")), ValueError, "mean_active"),
    (dict(mean_active="29"), TypeError, "mean_active"),
    (dict(dtype="int32"), ValueError, "dtype"),
    (dict(dtype="nonsense"), ValueError, "dtype"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1.0), TypeError, "seed"),
    (dict(kind="token_skew", skew_sigma=-0.1), ValueError, "skew_sigma"),
    (dict(kind="uniform", skew_sigma=0.2), ValueError, "skew_sigma"),
    (dict(kind="neuron_skew", dead_fraction=1.0), ValueError, "dead_fraction"),
    (dict(kind="neuron_skew", dead_fraction=-0.1), ValueError, "dead_fraction"),
    (dict(kind="neuron_skew", dead_fraction=0.9, mean_active=100.0), ValueError, "mean_active"),
    (dict(kind="token_skew", calibrate="mode"), ValueError, "calibrate"),
    (dict(kind="uniform", calibrate="mean"), ValueError, "calibrate"),
    (dict(kind="neuron_skew", max_rate=1.5), ValueError, "max_rate"),
    (dict(kind="uniform", max_rate=0.5), ValueError, "max_rate"),
    (dict(bogus=1), TypeError, "bogus"),
    (dict(xp="jax"), ValueError, "xp"),
    (dict(xp=math), TypeError, "xp"),
])
def test_bad_arguments(kwargs, exc, word):
    args = dict(m=8, d=32, n=256)
    args.update(kwargs)
    m, d, n = args.pop("m"), args.pop("d"), args.pop("n")
    with pytest.raises(exc, match=word):
        make_problem(m, d, n, **args)


def test_cupy_without_gpu_is_a_clear_error():
    from twell import _backend

    if _backend.cupy_or_none() is not None:
        pytest.skip("a GPU is available")
    with pytest.raises(RuntimeError, match="cupy"):
        make_problem(8, 32, 256, xp="cupy")


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("kind", synthetic.KINDS)
def test_gpu_generation(cp, kind):
    p = make_problem(4096, 256, 2048, kind=kind, seed=0, xp=cp)
    assert isinstance(p.x, cp.ndarray) and p.x.dtype == BF16
    assert p.xp is cp
    q = make_problem(4096, 256, 2048, kind=kind, seed=0, xp=cp)
    assert bool(cp.all(p.x.view(cp.uint16) == q.x.view(cp.uint16)))
    s = describe(p)
    # same distribution as the NumPy problem of this seed (different bits)
    s_host = describe(make_problem(4096, 256, 2048, kind=kind, seed=0))
    assert abs(s["token"]["mean"] - s_host["token"]["mean"]) <= 0.1 * s_host["token"]["mean"]
    assert s["neuron"]["frac_dead"] == pytest.approx(s_host["neuron"]["frac_dead"], abs=0.03)


def test_uniform_all_active():
    """mean_active = n: every neuron fires on every token (a fully dense batch)."""
    p = make_problem(64, d=64, n=128, mean_active=128, dtype="float32", seed=3)
    z = p.x.astype(np.float64) @ p.w_gate.astype(np.float64).T
    assert (z > 0).all()
