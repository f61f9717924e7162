"""Train a sparse gated FFN in JAX with twell.jax: a jitted training step with the L1 penalty.

A student FFN learns to imitate a fixed sparse teacher FFN on random tokens.  The loss is the mean
squared error plus ``lam · l1``, where ``l1 = (1/M) Σ|h|`` comes out of
:func:`twell.jax.gated_ffn_with_stats` together with ``l0`` (active neurons per token).  Because ``l1`` is an
output of the op, ``lam`` can be a traced value: here it warms up linearly over the first fifth of the
steps without recompiling the step.  The MSE and l0 both fall.

Parameters are float32 "master" weights in twell's neuron-major layout ``(n, d)``; the step casts them
to the compute dtype (bfloat16 on a GPU), and the casts' gradients bring the updates back to float32.
Adam comes from optax when it is installed, else from a few lines below.  ``--flax`` runs the same
model as a flax.linen module (when flax is installed).

Run on a GPU:   python docs/examples/jax_sparse_ffn.py
On the CPU the same code runs twell's float64 reference (small sizes; slow).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import twell.jax as tj

try:                                        # optional: optax's Adam
    import optax
except ImportError:                         # pragma: no cover - depends on the environment
    optax = None

try:                                        # optional: the flax.linen version of the model
    import flax.linen as nn
except ImportError:                         # pragma: no cover - depends on the environment
    nn = None


def neuron_major_init(key, n, d):
    return jax.random.normal(key, (n, d), jnp.float32) * d ** -0.5


def init_params(key, d, n):
    kg, ku, kd = jax.random.split(key, 3)
    return {"w_gate": neuron_major_init(kg, n, d), "w_up": neuron_major_init(ku, n, d),
            "w_down": neuron_major_init(kd, n, d)}


def make_teacher(key, d, n):
    """A sparse teacher: its gate bias (weight column 0; x[:, 0] = 1) keeps about 3% of neurons active."""
    params = init_params(key, d, n)
    params["w_gate"] = params["w_gate"].at[:, 0].set(-1.9)
    return params


def batch(key, m, d, teacher):
    x = jax.random.normal(key, (m, d), jnp.float32).at[:, 0].set(1.0)
    z = x @ teacher["w_gate"].T
    target = (jnp.maximum(z, 0) * (x @ teacher["w_up"].T)) @ teacher["w_down"]
    return x, target


def ffn(params, x, dtype):
    """The student: (y, l0, l1) from twell, computed in ``dtype``."""
    w = [params[k].astype(dtype) for k in ("w_gate", "w_up", "w_down")]
    return tj.gated_ffn_with_stats(x.astype(dtype), *w)


if nn is not None:
    class SparseGatedFFN(nn.Module):
        """The same FFN as a flax.linen module; its parameters are stored neuron-major (n, d), so no
        transposes (a ``Dense(n)`` kernel would be (d, n): ``w_gate = kernel.T``)."""

        d: int
        n: int
        dtype: object = jnp.bfloat16

        @nn.compact
        def __call__(self, x):
            init = (lambda key, shape: neuron_major_init(key, *shape))
            w = [self.param(name, init, (self.n, self.d)).astype(self.dtype)
                 for name in ("w_gate", "w_up", "w_down")]
            return tj.gated_ffn_with_stats(x.astype(self.dtype), *w)


def adam(lr, b1=0.9, b2=0.999, eps=1e-8):
    """(init, update) of Adam: optax's when installed, else the same rule here."""
    if optax is not None:
        opt = optax.adam(lr, b1, b2, eps)
        return opt.init, opt.update

    def init(params):
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return {"m": zeros, "v": zeros, "t": jnp.zeros((), jnp.int32)}

    def update(grads, state, params=None):
        t = state["t"] + 1
        m = jax.tree_util.tree_map(lambda a, g: b1 * a + (1 - b1) * g, state["m"], grads)
        v = jax.tree_util.tree_map(lambda a, g: b2 * a + (1 - b2) * g * g, state["v"], grads)
        scale = lr * jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        updates = jax.tree_util.tree_map(lambda a, b: -scale * a / (jnp.sqrt(b) + eps), m, v)
        return updates, {"m": m, "v": v, "t": t}

    return init, update


def train(steps=200, m=4096, d=512, n=2048, lr=3e-3, lam=2e-3, seed=0, dtype=None, use_flax=False, verbose=True):
    """Train for ``steps`` Adam steps; returns {"loss": [...], "mse": [...], "l0": [...]} (host floats)."""
    on_gpu = jax.default_backend() == "gpu"
    dtype = dtype or (jnp.bfloat16 if on_gpu else jnp.float32)
    key_teacher, key_student, key_data = jax.random.split(jax.random.PRNGKey(seed), 3)
    teacher = make_teacher(key_teacher, d, n)
    if use_flax:
        if nn is None:
            raise SystemExit("--flax needs flax (pip install flax)")
        model = SparseGatedFFN(d=d, n=n, dtype=dtype)
        params = model.init(key_student, jnp.zeros((1, d)))["params"]
        apply = (lambda p, x: model.apply({"params": p}, x))
    else:
        params = init_params(key_student, d, n)
        apply = (lambda p, x: ffn(p, x, dtype))
    opt_init, opt_update = adam(lr)
    opt_state = opt_init(params)
    warmup = max(1, steps // 5)

    def loss_fn(params, x, target, lam_now):
        y, l0, l1 = apply(params, x)
        mse = jnp.mean((y.astype(jnp.float32) - target) ** 2)
        return mse + lam_now * l1, (mse, l0, l1)

    @jax.jit
    def step(params, opt_state, key, lam_now):
        x, target = batch(key, m, d, teacher)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, target, lam_now)
        updates, opt_state = opt_update(grads, opt_state, params)
        params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
        return params, opt_state, loss, aux

    history = {"loss": [], "mse": [], "l0": []}
    start = time.perf_counter()
    for i in range(1, steps + 1):
        lam_now = jnp.float32(lam * min(1.0, i / warmup))          # traced: no recompilation
        params, opt_state, loss, (mse, l0, l1) = step(params, opt_state, jax.random.fold_in(key_data, i), lam_now)
        history["loss"].append(float(loss))
        history["mse"].append(float(mse))
        history["l0"].append(float(l0))
        if verbose and (i == 1 or i % max(1, steps // 10) == 0):
            print(f"step {i:4d}  loss {float(loss):.5f}  mse {float(mse):.5f}  l0 {float(l0):7.1f} / {n}"
                  f"  l1 {float(l1):.4f}  lam {float(lam_now):.1e}  {time.perf_counter() - start:6.1f} s")
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu = jax.default_backend() == "gpu"
    parser.add_argument("--steps", type=int, default=200 if gpu else 40)
    parser.add_argument("--m", type=int, default=4096 if gpu else 256, help="tokens per batch")
    parser.add_argument("--d", type=int, default=512 if gpu else 64)
    parser.add_argument("--n", type=int, default=2048 if gpu else 256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--lam", type=float, default=2e-3, help="L1 weight after the warm-up")
    parser.add_argument("--flax", action="store_true", help="the flax.linen module (needs flax)")
    args = parser.parse_args()
    print(f"backend {jax.default_backend()}, optimizer {'optax' if optax is not None else 'built-in'} Adam"
          f"{', flax.linen' if args.flax else ''}")
    train(steps=args.steps, m=args.m, d=args.d, n=args.n, lr=args.lr, lam=args.lam, use_flax=args.flax)
