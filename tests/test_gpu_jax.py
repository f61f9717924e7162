"""twell.jax on a CUDA device (buffer_callback, CuPy views of XLA's buffers on XLA's stream): values and
gradients against JAX's own dense autodiff -- a float64 oracle and the same computation in the inputs'
precision, whose error sets the tolerance -- plus the registry's recompute path and a host-overhead print.

Skipped without a GPU that both CuPy and JAX see."""

from __future__ import annotations

import os
import time

# CuPy (twell's temporaries and saved state) and XLA share the device: no 75% preallocation by XLA.  Read
# when JAX's backends start, which no test module does while it is collected.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import rel_error  # noqa: E402

jax = pytest.importorskip("jax")
jnp = jax.numpy

import twell  # noqa: E402
import twell.jax as tj  # noqa: E402
from twell.synthetic import make_problem  # noqa: E402

pytestmark = pytest.mark.gpu

DTYPES = ["bfloat16", "float16", "float32"]
HALF_ULP = {"bfloat16": 2.0 ** -9, "float16": 2.0 ** -12, "float32": 2.0 ** -25}
HIGHEST = jax.lax.Precision.HIGHEST
NAMES = ("y", "dx", "dw_gate", "dw_up", "dw_down")


@pytest.fixture(scope="module")
def gpu():
    """JAX's first CUDA device (skip if JAX or CuPy sees none)."""
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        pytest.skip("JAX sees no GPU (install jax[cuda13])")
    if not devices or twell._backend.cupy_or_none() is None:
        pytest.skip("JAX or CuPy sees no GPU")
    return devices[0]


@pytest.fixture(autouse=True)
def x64_on_gpu(request):
    """float64 available (the oracle), computations on the GPU; restored afterwards."""
    if "gpu" not in request.fixturenames:
        yield
        return
    dev = request.getfixturevalue("gpu")
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        with jax.default_device(dev):
            yield
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.fixture
def fresh_registry():
    tj.clear_registry()
    limits = tj.registry_stats()
    yield
    tj.set_registry_limits(max_entries=limits["max_entries"], max_bytes=limits["max_bytes"])
    tj.clear_registry()


def acc_dtype(dtype):
    """Where losses and statistics are summed: float64 for the float64 oracle, else float32."""
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def dense_parts(x, wg, wu, wd, precision=HIGHEST):
    """JAX's dense gated FFN: (y, l1 = mean_t sum_j |h|, l0); h = relu(z) * u in the inputs' dtype."""
    z = jnp.matmul(x, wg.T, precision=precision)
    u = jnp.matmul(x, wu.T, precision=precision)
    h = jnp.where(z > 0, z, jnp.zeros((), z.dtype)) * u
    m = x.shape[0]
    l1 = jnp.abs(h.astype(acc_dtype(x.dtype))).sum() / m
    return jnp.matmul(h, wd, precision=precision), l1, (h != 0).sum() / m


def assert_rule(name, dtype, k, got, oracle, same):
    """twell's relative error at most twice the same-precision dense error, plus a floor: half an ulp and the
    fp32 accumulation noise of one length-k dot product (k = max(d, n))."""
    floor = HALF_ULP[dtype] + 4 * 2.0 ** -24 * np.sqrt(k)
    err = rel_error(np.asarray(got), np.asarray(oracle))
    err_same = rel_error(np.asarray(same), np.asarray(oracle))
    assert err <= 2.0 * err_same + floor, f"{name}: rel err {err:.3g} vs same-precision dense {err_same:.3g}"
    return err, err_same


def check_all(arrays, dtype, lam, seed=0):
    """Forward (inference op and training forward) and the four gradients of sum(y * c) (+ the L1 penalty's
    gradient) vs the float64 oracle and the same-precision dense autodiff."""
    x, wg, wu, wd = (jnp.asarray(a) for a in arrays)
    rng = np.random.default_rng(seed)
    c = np.round(rng.standard_normal(x.shape) * 4) / 4                 # exact in every dtype: dy is c

    def train(x, wg, wu, wd, c):
        y, vjp = jax.vjp(lambda *a: tj.gated_ffn(*a, l1_weight=lam), x, wg, wu, wd)
        return y, vjp(c.astype(y.dtype))

    def dense_loss(x, wg, wu, wd):
        y, l1, _ = dense_parts(x, wg, wu, wd)
        acc = acc_dtype(x.dtype)
        return jnp.sum(y.astype(acc) * jnp.asarray(c, dtype=acc)) + lam * l1

    argnums = (0, 1, 2, 3)
    y_inf = jax.jit(tj.gated_ffn)(x, wg, wu, wd)
    y_train, grads = jax.jit(train)(x, wg, wu, wd, jnp.asarray(c, dtype=jnp.float32))
    f64 = [a.astype(jnp.float64) for a in (x, wg, wu, wd)]
    oracle = (dense_parts(*f64)[0], *jax.grad(dense_loss, argnums)(*f64))
    same = (dense_parts(x, wg, wu, wd)[0], *jax.grad(dense_loss, argnums)(x, wg, wu, wd))
    k = max(x.shape[1], wg.shape[0])
    errors = {}
    for name, out, ref, den in zip(("y (inference)", *NAMES), (y_inf, y_train, *grads), (oracle[0], *oracle),
                                   (same[0], *same)):
        assert out.dtype == x.dtype and out.shape == ref.shape, name
        errors[name] = assert_rule(name, dtype, k, out, ref, den)
    return errors


@pytest.mark.parametrize("dtype", DTYPES)
def test_leading_dims_and_statistics(gpu, fresh_registry, dtype):
    p = make_problem(1200, d=256, n=1024, mean_active=20.0, kind="token_skew", dtype=dtype, seed=5, xp=np)
    x, wg, wu, wd = (jnp.asarray(a) for a in p.arrays())
    x3 = x.reshape(4, 300, 256)
    y, l0, l1 = jax.jit(tj.gated_ffn_with_stats)(x3, wg, wu, wd)
    assert y.shape == x3.shape and l0.dtype == l1.dtype == jnp.float32
    y2 = jax.jit(tj.gated_ffn)(x, wg, wu, wd)
    np.testing.assert_array_equal(np.asarray(jax.jit(tj.gated_ffn)(x3, wg, wu, wd)).reshape(y2.shape),
                                  np.asarray(y2))
    _, l1d, l0d = dense_parts(*(a.astype(jnp.float64) for a in (x, wg, wu, wd)))
    assert float(l0) == pytest.approx(float(l0d), rel=0.02, abs=0.05)
    assert float(l1) == pytest.approx(float(l1d), rel=5e-2 if dtype != "float32" else 1e-4)


def test_jit_grad_two_layer_model(gpu, fresh_registry):
    """A residual 2-layer model under jit(value_and_grad) in bf16 and float32, vs the float64 oracle and the
    same-precision dense model."""
    rng = np.random.default_rng(6)
    m, d, n = 512, 256, 1024
    for dtype in ("bfloat16", "float32"):
        p = make_problem(m, d=d, n=n, mean_active=25.0, kind="uniform", dtype=dtype, seed=7, xp=np)
        layers = [tuple(jnp.asarray(a) for a in p.arrays()[1:])]
        layers.append(tuple(jnp.asarray(np.asarray(a) * 0.8, dtype=a.dtype) for a in layers[0]))
        x = jnp.asarray(p.x)
        target = jnp.asarray(rng.standard_normal((m, d)), dtype=jnp.float32)

        def model(layers, x, op):
            h, penalty = x, 0.0
            for wg, wu, wd in layers:
                y, pen = op(h, wg, wu, wd)
                h, penalty = h + y, penalty + pen
            acc = acc_dtype(h.dtype)
            return jnp.mean((h.astype(acc) - target.astype(acc)) ** 2) + penalty

        def op(h, wg, wu, wd):
            return tj.gated_ffn(h, wg, wu, wd, l1_weight=0.01), 0.0

        def op_dense(h, wg, wu, wd):
            y, l1, _ = dense_parts(h, wg, wu, wd)
            return y, 0.01 * (l1 - jax.lax.stop_gradient(l1))      # the penalty's gradient, not its value

        step = jax.jit(jax.value_and_grad(model), static_argnums=2)
        value, grads = step(layers, x, op)
        layers64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), layers)
        value64, grads64 = jax.value_and_grad(model)(layers64, x.astype(jnp.float64), op_dense)
        _, grads_same = jax.value_and_grad(model)(layers, x, op_dense)
        assert float(value) == pytest.approx(float(value64), rel=3e-2 if dtype == "bfloat16" else 1e-5)
        for i, (got, ref, same) in enumerate(zip(*(jax.tree_util.tree_leaves(t)
                                                   for t in (grads, grads64, grads_same)))):
            assert_rule(f"{dtype} leaf {i}", dtype, n, got, ref, same)


def test_registry_miss_gives_the_same_gradients(gpu, fresh_registry):
    """An evicted state (or none stored) makes the backward recompute the forward: bitwise the same result
    (the kernels are deterministic)."""
    p = make_problem(3000, d=512, n=2048, mean_active=30.0, kind="token_skew", dtype="bfloat16", seed=8, xp=np)
    args = tuple(jnp.asarray(a) for a in p.arrays())
    c = jnp.asarray(np.random.default_rng(8).standard_normal(args[0].shape), dtype=jnp.bfloat16)
    op = jax.jit(lambda *a: tj.gated_ffn(*a, l1_weight=0.03))

    def run(evict):                                      # (callbacks run asynchronously: wait for them)
        y, vjp = jax.vjp(op, *args)
        y.block_until_ready()
        assert tj.registry_stats()["entries"] == 1
        if evict:
            tj.clear_registry()
        return jax.block_until_ready(vjp(y * c))

    before = tj.registry_stats()
    want = run(False)
    got = run(True)
    after = tj.registry_stats()
    assert after["hits"] - before["hits"] == 1 and after["recomputes"] - before["recomputes"] == 1
    for name, g, w in zip(NAMES[1:], got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)

    grad = jax.jit(jax.grad(lambda *a: jnp.sum(op(*a).astype(jnp.float32) * c), argnums=(0, 1, 2, 3)))
    want = grad(*args)
    tj.set_registry_limits(max_entries=0)
    got = jax.block_until_ready(grad(*args))
    assert tj.registry_stats()["not_stored"] >= 1
    for name, g, w in zip(NAMES[1:], got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)


def test_vmap_and_traced_l1_weight(gpu, fresh_registry):
    """vmap with mapped weights (one call per element), and lam * l1 with a traced lam (both signs)."""
    rng = np.random.default_rng(9)
    p = make_problem(5 * 64, d=128, n=512, mean_active=20.0, kind="uniform", dtype="bfloat16", seed=9, xp=np)
    x, wg, wu, wd = (jnp.asarray(a) for a in p.arrays())
    xb = x.reshape(5, 64, 128)
    wgb = jnp.stack([(wg.astype(jnp.float32) * s).astype(wg.dtype) for s in (1.0, 0.9, 1.1, 1.0, 0.95)])
    to64 = (lambda *a: [b.astype(jnp.float64) for b in a])

    def dense_map(xb, wgb, wu, wd):
        return jax.vmap(lambda xi, w: dense_parts(xi, w, wu, wd))(xb, wgb)

    y = jax.jit(jax.vmap(lambda xi, w: tj.gated_ffn(xi, w, wu, wd)))(xb, wgb)
    assert_rule("vmap y", "bfloat16", 512, y, dense_map(*to64(xb, wgb, wu, wd))[0], dense_map(xb, wgb, wu, wd)[0])

    c = rng.standard_normal(xb.shape).round(1)

    def loss(wgb, lam):
        y, _, l1 = jax.vmap(lambda xi, w: tj.gated_ffn_with_stats(xi, w, wu, wd))(xb, wgb)
        return jnp.sum(y.astype(jnp.float32) * c.astype(np.float32)) + lam * jnp.sum(l1)

    def loss_dense(wgb, lam, xb, wu, wd):
        y, l1, _ = dense_map(xb, wgb, wu, wd)
        acc = acc_dtype(xb.dtype)
        return jnp.sum(y.astype(acc) * c.astype(acc)) + lam.astype(acc) * jnp.sum(l1)

    for lam in (0.5, -0.2):
        lam = jnp.float32(lam)
        got = jax.jit(jax.grad(loss))(wgb, lam)
        oracle = jax.grad(loss_dense)(*to64(wgb), lam, *to64(xb, wu, wd))
        same = jax.grad(loss_dense)(wgb, lam, xb, wu, wd)
        assert_rule(f"vmap dw_gate, lam {float(lam)}", "bfloat16", 512, got, oracle, same)


def test_float64_runs_the_host_reference(gpu):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((9, 16))
    w = [rng.standard_normal((40, 16)) / 4 for _ in range(3)]
    y = jax.jit(tj.gated_ffn)(jnp.asarray(x), *map(jnp.asarray, w))
    np.testing.assert_allclose(np.asarray(y), twell.reference.gated_ffn_dense(x, *w), rtol=1e-12, atol=1e-12)


def test_buffers_are_viewed_in_place_on_xla_stream(gpu):
    """The callback's CuPy views alias XLA's buffers (bfloat16 included) and CuPy runs on XLA's stream."""
    import cupy as cp
    from jax.experimental.buffer_callback import buffer_callback

    seen = {}

    def cb(ctx, out, x):
        ptr = x.__cuda_array_interface__["data"][0]
        dev = int(cp.cuda.runtime.pointerGetAttributes(ptr).device)
        with cp.cuda.Device(dev), tj._xla_stream(cp, int(ctx.stream), dev):
            v, o = tj._cupy_view(cp, x, dev), tj._cupy_view(cp, out[0], dev)
            seen.update(view_ptr=v.data.ptr, buffer_ptr=ptr, dtype=v.dtype, out_ptr=o.data.ptr,
                        out_buffer=out[0].__cuda_array_interface__["data"][0],
                        stream=cp.cuda.get_current_stream().ptr == int(ctx.stream))
            o.view(cp.uint16)[...] = v.view(cp.uint16) ^ 0x8000           # negate through the bits

    x = jnp.asarray(np.random.default_rng(11).standard_normal((33, 40)), dtype=jnp.bfloat16)
    out = jax.jit(buffer_callback(cb, (jax.ShapeDtypeStruct(x.shape, x.dtype),)))(x)[0]
    assert seen["view_ptr"] == seen["buffer_ptr"] and seen["out_ptr"] == seen["out_buffer"]
    assert seen["dtype"] == np.dtype(jnp.bfloat16) and seen["stream"]
    np.testing.assert_array_equal(np.asarray(out), -np.asarray(x))


def test_host_overhead_print(gpu, fresh_registry):
    """Prints (does not assert) per-call times: twell.jax under jit vs twell on CuPy arrays directly vs XLA's
    dense bf16, for a decode-sized and a training-sized batch.  Run with -s to see them."""
    import cupy as cp

    def timeit(fn, reps):
        fn()
        fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps * 1e3

    lines = []
    for m in (64, 4096):
        p = make_problem(m, d=2048, n=5632, mean_active=29.0, kind="uniform", dtype="bfloat16", seed=12, xp=np)
        args = tuple(jnp.asarray(a) for a in p.arrays())
        cargs = tuple(cp.asarray(a) for a in p.arrays())
        dy = jnp.ones_like(args[0])
        cdy = cp.ones_like(cargs[0])
        infer = jax.jit(tj.gated_ffn)
        dense = jax.jit(lambda *a: dense_parts(*a, precision=None)[0])
        train = jax.jit(lambda *a: jax.vjp(tj.gated_ffn, *a)[1](dy))
        dense_train = jax.jit(lambda *a: jax.vjp(lambda *b: dense_parts(*b, precision=None)[0], *a)[1](dy))

        def cupy_infer():
            twell.gated_ffn(*cargs)
            cp.cuda.get_current_stream().synchronize()

        def cupy_train():
            _, saved, _ = twell.gated_ffn_forward(*cargs)
            twell.gated_ffn_backward(saved, cdy)
            cp.cuda.get_current_stream().synchronize()

        reps = 200 if m <= 64 else 30
        row = {
            "jax op": timeit(lambda: infer(*args).block_until_ready(), reps),
            "cupy op": timeit(cupy_infer, reps),
            "xla dense": timeit(lambda: dense(*args).block_until_ready(), reps),
            "jax fwd+bwd": timeit(lambda: jax.block_until_ready(train(*args)), reps),
            "cupy fwd+bwd": timeit(cupy_train, reps),
            "xla dense fwd+bwd": timeit(lambda: jax.block_until_ready(dense_train(*args)), reps),
        }
        lines.append(f"M={m:5d} d=2048 n=5632 bf16  " + "  ".join(f"{k} {v:.3f} ms" for k, v in row.items()))
    print("\ntwell.jax host overhead (per call, synchronised):\n" + "\n".join(lines))


# The matrix of shapes, kinds and dtypes last: the tests above each check one feature and take seconds;
# these compile XLA programs per case (the 4096-row ones take several seconds each).
CASES = [
    # m, d, n, kind, mean active per token, λ
    (37, 200, 1000, "uniform", 30.0, 0.0),
    (37, 200, 1000, "token_skew", 30.0, 0.05),
    (37, 200, 1000, "uniform", 1000.0, 0.05),              # every neuron active: every row dense
    (4096, 2048, 5632, "uniform", 29.0, 0.02),
    (4096, 2048, 5632, "token_skew", 29.0, 0.0),
    (4096, 2048, 5632, "neuron_skew", 29.0, 0.02),
    (4096, 2048, 5632, "uniform", 5632.0, 0.0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[f"{m}x{d}x{n}-{k}-{a:g}" for m, d, n, k, a, _ in CASES])
def test_forward_and_gradients_match_dense_autodiff(gpu, fresh_registry, dtype, case):
    m, d, n, kind, active, lam = case
    p = make_problem(m, d=d, n=n, mean_active=active, kind=kind, dtype=dtype, seed=3, xp=np)
    before = tj.registry_stats()                # the counts are cumulative over the process: this test's part
    check_all(p.arrays(), dtype, lam)
    stats = tj.registry_stats()
    stats.update({k: stats[k] - before[k] for k in ("stored", "hits", "recomputes", "evicted", "not_stored")})
    assert stats["entries"] == 0, f"saved states left behind: {stats}"
    assert stats["hits"] + stats["recomputes"] >= 1, f"the backward never ran: {stats}"
    if active < n:
        assert stats["recomputes"] == 0, f"the backward recomputed its forward: {stats}"
    # every neuron active (the largest saved state, all rows dense): XLA has been seen to re-run the forward
    # under jit for the float32 4096-row case, so the backward found no state and recomputed it -- correct
    # (checked above), only slower; the registry's counts are in the message of the asserts above
