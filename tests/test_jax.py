"""twell.jax on the CPU (the NumPy reference through jax.pure_callback, and through buffer_callback with host
views): values and gradients against JAX's own dense computation in float64."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = jax.numpy

import twell  # noqa: E402
import twell.jax as tj  # noqa: E402

NAMES = ("x", "w_gate", "w_up", "w_down")


@pytest.fixture(autouse=True)
def cpu_x64():
    """Every test here runs on JAX's CPU device in float64 (restored afterwards)."""
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        with jax.default_device(jax.devices("cpu")[0]):
            yield
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.fixture(params=["pure", "buffer"])
def host_callback(request, monkeypatch):
    """Both host plumbings: jax.pure_callback (the default) and buffer_callback over host buffers (the
    CUDA path's plumbing: output buffers written in place, ids in an int32 buffer)."""
    monkeypatch.setattr(tj, "_HOST_CALLBACK", request.param)
    return request.param


@pytest.fixture
def fresh_registry():
    tj.clear_registry()
    limits = tj.registry_stats()
    yield
    tj.set_registry_limits(max_entries=limits["max_entries"], max_bytes=limits["max_bytes"])
    tj.clear_registry()


def problem(rng, lead, d, n, margin=0.0, dtype=np.float64):
    """x (*lead, d) and neuron-major weights (n, d); a bias column keeps a fraction of neurons active.
    ``margin``: redraw until every gate and up pre-activation is at least that far from 0 (no ReLU or |h|
    kink within a finite-difference step)."""
    for _ in range(1000):
        x = rng.standard_normal((*lead, d))
        w = [rng.standard_normal((n, d)) / np.sqrt(d) for _ in range(3)]
        x2 = x.reshape(-1, d)
        if margin == 0.0 or (np.abs(x2 @ w[0].T).min() > margin and np.abs(x2 @ w[1].T).min() > margin):
            return tuple(a.astype(dtype) for a in (x, *w))
    raise AssertionError("no draw away from the kinks")


def dense(x, w_gate, w_up, w_down):
    """JAX's dense computation: (y, l1 = mean_t sum_j |h_tj|, l0 = mean active per token)."""
    x2 = x.reshape(-1, x.shape[-1])
    h = jnp.maximum(x2 @ w_gate.T, 0) * (x2 @ w_up.T)
    m = x2.shape[0]
    return (h @ w_down).reshape(x.shape), jnp.abs(h).sum() / m, (h != 0).sum() / m


def dense_loss(c, lam):
    def loss(x, wg, wu, wd):
        y, l1, _ = dense(x, wg, wu, wd)
        return jnp.sum(jnp.sin(y) * c) + lam * l1
    return loss


def twell_loss(c, lam, **kw):
    def loss(x, wg, wu, wd):
        return jnp.sum(jnp.sin(tj.gated_ffn(x, wg, wu, wd, l1_weight=lam, **kw)) * c)
    return loss


def assert_close(got, want, rtol=1e-10, what=""):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, what
    scale = max(np.abs(want).max(), 1e-300)
    assert np.abs(got - want).max() <= rtol * scale, f"{what}: max error {np.abs(got - want).max():.3g} of {scale:.3g}"


# --------------------------------------------------------------------------- import hygiene


def test_import_twell_does_not_import_jax_or_cupy():
    code = ("import sys, twell; assert 'jax' not in sys.modules, 'twell imported jax'; "
            "import twell.jax; assert 'cupy' not in sys.modules, 'twell.jax imported cupy'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("lead", [(37,), (3, 5), (2, 3, 4), ()])
def test_forward_matches_reference(host_callback, lead):
    rng = np.random.default_rng(1)
    x, wg, wu, wd = problem(rng, lead, 24, 70)
    y = tj.gated_ffn(x, wg, wu, wd)
    assert y.shape == x.shape and y.dtype == jnp.float64
    ref = twell.reference.gated_ffn_dense(x.reshape(-1, 24), wg, wu, wd).reshape(x.shape)
    assert_close(y, ref, 1e-12, "y")
    assert_close(jax.jit(tj.gated_ffn)(x, wg, wu, wd), ref, 1e-12, "jit y")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_forward_lower_precisions(host_callback, dtype):
    rng = np.random.default_rng(2)
    x, wg, wu, wd = (jnp.asarray(a, dtype=dtype) for a in problem(rng, (40,), 32, 90))
    y = jax.jit(tj.gated_ffn)(x, wg, wu, wd)
    assert y.dtype == jnp.dtype(dtype)
    f64 = [np.asarray(a, dtype=np.float64) for a in (x, wg, wu, wd)]
    # the reference rounds the gate to x's dtype before taking the pattern, then rounds y once
    ref = twell.reference.gated_ffn(*(np.asarray(a) for a in (x, wg, wu, wd)))
    assert_close(y, np.asarray(ref, dtype=np.float64), 1e-6, "y vs reference")
    dense_y = np.asarray(dense(*map(jnp.asarray, f64))[0])
    assert_close(y, dense_y, {"float32": 1e-5, "bfloat16": 3e-2, "float16": 5e-3}[dtype], "y vs dense")


def test_stats_match_dense(host_callback):
    rng = np.random.default_rng(3)
    x, wg, wu, wd = problem(rng, (6, 7), 16, 50)
    y, l0, l1 = jax.jit(tj.gated_ffn_with_stats)(x, wg, wu, wd)
    yd, l1d, l0d = dense(x, wg, wu, wd)
    assert_close(y, yd, 1e-12, "y")
    assert float(l0) == float(l0d)
    assert float(l1) == pytest.approx(float(l1d), rel=1e-12)
    assert l0.dtype == l1.dtype == jnp.float64           # float32 for the other dtypes
    _, l0_32, l1_32 = tj.gated_ffn_with_stats(*(jnp.asarray(a, jnp.float32) for a in (x, wg, wu, wd)))
    assert l0_32.dtype == l1_32.dtype == jnp.float32


def test_empty_batch():
    x = jnp.zeros((0, 8))
    w = jnp.ones((5, 8))
    y, l0, l1 = tj.gated_ffn_with_stats(x, w, w, w)
    assert y.shape == (0, 8) and float(l0) == 0.0 and float(l1) == 0.0
    grads = jax.grad(lambda *a: jnp.sum(tj.gated_ffn(*a, l1_weight=1.0)), argnums=(0, 1, 2, 3))(x, w, w, w)
    assert all(float(jnp.abs(g).sum()) == 0.0 for g in grads)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("lam", [0.0, 0.37])
@pytest.mark.parametrize("lead", [(29,), (3, 4)])
def test_grad_matches_dense_autodiff(host_callback, fresh_registry, lam, lead):
    rng = np.random.default_rng(4)
    x, wg, wu, wd = problem(rng, lead, 20, 60)
    c = rng.standard_normal(x.shape)
    args = (x, wg, wu, wd)
    want = jax.grad(dense_loss(c, lam), argnums=(0, 1, 2, 3))(*args)
    got = jax.grad(twell_loss(c, lam), argnums=(0, 1, 2, 3))(*args)
    got_jit = jax.jit(jax.grad(twell_loss(c, lam), argnums=(0, 1, 2, 3)))(*args)
    for name, g, gj, w in zip(NAMES, got, got_jit, want):
        assert g.dtype == w.dtype
        assert_close(g, w, 1e-11, name)
        assert_close(gj, w, 1e-11, "jit " + name)
    value, _ = jax.block_until_ready(jax.value_and_grad(twell_loss(c, lam))(*args))
    y, _, _ = dense(*args)
    assert float(value) == pytest.approx(float(jnp.sum(jnp.sin(y) * c)), rel=1e-12)
    stats = tj.registry_stats()
    assert stats["entries"] == 0 and stats["hits"] >= 3 and stats["recomputes"] == 0


def test_check_grads_away_from_kinks(host_callback):
    from jax.test_util import check_grads
    rng = np.random.default_rng(5)
    args = problem(rng, (3,), 4, 6, margin=0.05)
    check_grads(tj.gated_ffn, args, order=1, modes=["rev"], eps=1e-6)
    check_grads(lambda *a: tj.gated_ffn_with_stats(*a)[::2], args, order=1, modes=["rev"], eps=1e-6)


@pytest.mark.parametrize("lam", [0.8, -1.3])
def test_l1_output_is_differentiable_with_a_traced_weight(host_callback, fresh_registry, lam):
    """``loss + lam * l1`` with lam a traced value (a schedule): the l1 cotangent joins the static
    l1_weight; a negative total weight works too."""
    rng = np.random.default_rng(6)
    x, wg, wu, wd = problem(rng, (25,), 12, 40)
    c = rng.standard_normal(x.shape)

    def loss(params, lam):
        y, l0, l1 = tj.gated_ffn_with_stats(x, *params, l1_weight=0.25)
        return jnp.sum(y * c) + lam * l1 + 5.0 * l0          # l0 has no gradient

    got = jax.jit(jax.grad(loss))((wg, wu, wd), jnp.asarray(lam))
    want = jax.grad(lambda p: jnp.sum(dense(x, *p)[0] * c) + (lam + 0.25) * dense(x, *p)[1])((wg, wu, wd))
    for name, g, w in zip(NAMES[1:], got, want):
        assert_close(g, w, 1e-11, name)


def test_jit_grad_two_layer_model(host_callback, fresh_registry):
    rng = np.random.default_rng(7)
    d, n = 16, 48
    x = rng.standard_normal((4, 9, d))
    layers = [problem(rng, (1,), d, n)[1:] for _ in range(2)]
    target = rng.standard_normal(x.shape)

    def model(layers, x, op):
        h, penalty = x, 0.0
        for wg, wu, wd in layers:
            y, p = op(h, wg, wu, wd)
            h, penalty = h + y, penalty + p
        return jnp.mean((h - target) ** 2) + penalty

    def op(h, wg, wu, wd):
        return tj.gated_ffn(h, wg, wu, wd, l1_weight=0.05), 0.0

    def op_dense(h, wg, wu, wd):
        y, l1, _ = dense(h, wg, wu, wd)
        return y, 0.05 * (l1 - jax.lax.stop_gradient(l1))      # the penalty's gradient, not its value

    step = jax.jit(jax.value_and_grad(model), static_argnums=2)
    value, grads = step(layers, x, op)
    value_d, grads_d = jax.value_and_grad(model)(layers, x, op_dense)
    assert float(value) == pytest.approx(float(value_d), rel=1e-12)
    for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_d)):
        assert_close(got, want, 1e-10)
    again = step(layers, x, op)[1]                       # compiled once, runs again
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(grads)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_scan_and_checkpoint(host_callback, fresh_registry):
    """Layers under lax.scan with jax.checkpoint: the backward recomputes the forward (a fresh state per
    layer); the forward pass's states stay in the registry until its bounds push them out."""
    rng = np.random.default_rng(8)
    d, n = 12, 30
    x = rng.standard_normal((10, d))
    stack = jnp.stack([jnp.stack(problem(rng, (1,), d, n)[1:]) for _ in range(3)])

    def model(stack, op):
        def body(h, w):
            return h + op(h, w[0], w[1], w[2]), None
        return jnp.sum(jax.lax.scan(jax.checkpoint(body), x, stack)[0] ** 2)

    got = jax.jit(jax.grad(model), static_argnums=1)(stack, lambda h, a, b, c: tj.gated_ffn(h, a, b, c))
    want = jax.grad(model)(stack, lambda h, a, b, c: dense(h, a, b, c)[0])
    assert_close(got, want, 1e-10)


# --------------------------------------------------------------------------- the registry


def test_registry_miss_recomputes_the_forward(host_callback, fresh_registry):
    rng = np.random.default_rng(9)
    x, wg, wu, wd = problem(rng, (33,), 20, 64)
    c = rng.standard_normal(x.shape)
    op = jax.jit(lambda *a: tj.gated_ffn(*a, l1_weight=0.2))

    def run(evict):                                      # (callbacks run asynchronously: wait for them)
        y, vjp = jax.block_until_ready(jax.vjp(op, x, wg, wu, wd))
        assert tj.registry_stats()["entries"] == 1
        if evict:
            tj.clear_registry()
        return jax.block_until_ready(vjp(jnp.cos(y) * c))

    before = tj.registry_stats()
    want = run(False)
    got = run(True)                                      # evicted between the forward and the backward
    after = tj.registry_stats()
    assert after["hits"] - before["hits"] == 1 and after["recomputes"] - before["recomputes"] == 1
    for name, g, w in zip(NAMES, got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)

    # nothing stored at all
    grad = jax.jit(jax.grad(twell_loss(c, 0.2), argnums=(0, 1, 2, 3)))
    want = grad(x, wg, wu, wd)
    tj.set_registry_limits(max_entries=0)
    got = jax.block_until_ready(grad(x, wg, wu, wd))
    stats = tj.registry_stats()
    assert stats["entries"] == 0 and stats["not_stored"] >= 1
    for name, g, w in zip(NAMES, got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)


def test_registry_bounds_evict_oldest(fresh_registry):
    rng = np.random.default_rng(10)
    x, wg, wu, wd = problem(rng, (8,), 8, 20)
    tj.set_registry_limits(max_entries=2)
    vjps = [jax.block_until_ready(jax.vjp(lambda *a: tj.gated_ffn(*a), x * s, wg, wu, wd))[1]
            for s in (1.0, 1.5, 2.0)]
    stats = tj.registry_stats()
    assert stats["entries"] == 2 and stats["evicted"] == 1
    dy = jnp.ones_like(x)
    outs = [jax.block_until_ready(vjp(dy)) for vjp in vjps]      # the first recomputes, the others hit
    stats2 = tj.registry_stats()
    assert stats2["recomputes"] - stats["recomputes"] == 1 and stats2["hits"] - stats["hits"] == 2
    for s, got in zip((1.0, 1.5, 2.0), outs):
        want = jax.grad(lambda *a: jnp.sum(dense(*a)[0]), argnums=(0, 1, 2, 3))(x * s, wg, wu, wd)
        for g, w in zip(got, want):
            assert_close(g, w, 1e-11)
    tj.set_registry_limits(max_bytes=0)
    assert tj.registry_stats()["entries"] == 0
    with pytest.raises(ValueError, match="max_entries"):
        tj.set_registry_limits(max_entries=-1)


def test_jacrev_shares_one_forward(host_callback, fresh_registry):
    """vmap over the cotangents (jax.jacrev): one forward state, many backwards (all but one recompute)."""
    rng = np.random.default_rng(11)
    x, wg, wu, wd = problem(rng, (3,), 4, 10)
    got = jax.jacrev(tj.gated_ffn, argnums=(0, 1))(x, wg, wu, wd)
    want = jax.jacrev(lambda *a: dense(*a)[0], argnums=(0, 1))(x, wg, wu, wd)
    for g, w in zip(got, want):
        assert_close(g, w, 1e-11)


# --------------------------------------------------------------------------- vmap


def test_vmap_forward_and_grad(host_callback, fresh_registry):
    rng = np.random.default_rng(12)
    d, n = 10, 30
    xb = rng.standard_normal((5, 7, d))
    _, wg, wu, wd = problem(rng, (1,), d, n)
    wgb = jnp.stack([wg * s for s in (1.0, 0.5, 1.5, 0.8, 1.2)])
    # x mapped, weights shared (one call over all rows) and weights mapped (one call per element)
    assert_close(jax.vmap(lambda xi: tj.gated_ffn(xi, wg, wu, wd))(xb), dense(xb, wg, wu, wd)[0], 1e-12)
    y = jax.jit(jax.vmap(lambda xi, w: tj.gated_ffn(xi, w, wu, wd)))(xb, wgb)
    assert_close(y, jax.vmap(lambda xi, w: dense(xi, w, wu, wd)[0])(xb, wgb), 1e-12)
    # statistics per mapped call
    _, l0, l1 = jax.vmap(lambda xi, w: tj.gated_ffn_with_stats(xi, w, wu, wd))(xb, wgb)
    _, l1d, l0d = jax.vmap(lambda xi, w: dense(xi, w, wu, wd))(xb, wgb)
    assert_close(l0, l0d, 1e-12, "l0")
    assert_close(l1, l1d, 1e-12, "l1")

    # the L1 mean is per mapped call (M = 7 rows each)
    def loss(xb, wgb, op):
        return jnp.sum(jax.vmap(lambda xi, w: op(xi, w))(xb, wgb))

    def op(xi, w):
        return jnp.sum(tj.gated_ffn(xi, w, wu, wd, l1_weight=0.3) ** 2)

    def op_dense(xi, w):
        y, l1, _ = dense(xi, w, wu, wd)
        return jnp.sum(y ** 2) + 0.3 * l1

    got = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(xb, wgb, op)
    want = jax.grad(loss, argnums=(0, 1))(xb, wgb, op_dense)
    for g, w in zip(got, want):
        assert_close(g, w, 1e-11)
    got = jax.vmap(jax.grad(lambda xi: op(xi, wg)))(xb)
    want = jax.vmap(jax.grad(lambda xi: op_dense(xi, wg)))(xb)
    assert_close(got, want, 1e-11)


# --------------------------------------------------------------------------- arguments


def test_argument_errors():
    x = jnp.ones((4, 8))
    w = jnp.ones((6, 8))
    with pytest.raises(ValueError, match="neuron-major"):
        tj.gated_ffn(x, w.T, w, w)
    with pytest.raises(ValueError, match="w_down"):
        tj.gated_ffn(x, w, w, jnp.ones((8, 6)))
    with pytest.raises(ValueError, match="n = 6 rows"):
        tj.gated_ffn(x, w, jnp.ones((5, 8)), w)
    with pytest.raises(TypeError, match="astype"):
        tj.gated_ffn(x, w.astype(jnp.float32), w, w)
    with pytest.raises(TypeError, match="dtype"):
        tj.gated_ffn(x.astype(jnp.int32), w, w, w)
    with pytest.raises(ValueError, match="path"):
        tj.gated_ffn(x, w, w, w, path="fast")
    with pytest.raises(ValueError, match="gate_kernel"):
        tj.gated_ffn(x, w, w, w, gate_kernel="magic")
    with pytest.raises(ValueError, match="l1_weight"):
        tj.gated_ffn(x, w, w, w, l1_weight=-1.0)
    with pytest.raises(TypeError, match="gated_ffn_with_stats"):
        jax.jit(lambda lam: tj.gated_ffn(x, w, w, w, l1_weight=lam))(0.1)
    with pytest.raises(ValueError, match="dense_row_threshold"):
        tj.gated_ffn(x, w, w, w, dense_row_threshold=-2)
    with pytest.raises(TypeError, match="tracker"):
        tj.gated_ffn(x, w, w, w, tracker="layer0")


def test_options_pass_through(host_callback):
    rng = np.random.default_rng(13)
    x, wg, wu, wd = problem(rng, (20,), 8, 30)
    ref = dense(x, wg, wu, wd)[0]
    tracker = twell.DensityTracker()
    for kw in ({"dense_row_threshold": None}, {"dense_row_threshold": "auto"}, {"dense_row_threshold": 0},
               {"path": "dense"}, {"path": "sparse", "gate_kernel": "cublas"}, {"tracker": tracker}):
        assert_close(tj.gated_ffn(x, wg, wu, wd, **kw), ref, 1e-12, str(kw))
        g = jax.grad(lambda a: jnp.sum(tj.gated_ffn(a, wg, wu, wd, **kw)))(x)
        assert_close(g, jax.grad(lambda a: jnp.sum(dense(a, wg, wu, wd)[0]))(x), 1e-11, str(kw))
