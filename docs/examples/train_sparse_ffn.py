"""Train a one-layer sparse gated FFN with twell and CuPy only (no PyTorch, no autograd).

A student FFN learns to imitate a fixed sparse teacher FFN on random tokens.  The
loss is the mean squared error plus the paper's L1 penalty on the hidden
activations, ``λ · (1/M) Σ|h|``; twell's backward adds its gradient.  The MSE and
the mean number of active neurons per token (l0) both fall.

Run on a GPU:   python docs/examples/train_sparse_ffn.py
On NumPy arrays the same code runs twell's float64 reference (slow, small sizes).
"""

from __future__ import annotations

import numpy as np

import twell


def _module(use_gpu: bool):
    if use_gpu:
        import cupy
        return cupy
    return np


def train(steps=200, m=4096, d=512, n=2048, lr=3e-3, l1_weight=2e-3, seed=0, use_gpu=True, verbose=True):
    """Train for ``steps`` Adam steps; return {"loss": [...], "l0": [...], "l1": [...]} (host floats)."""
    xp = _module(use_gpu)
    rng = np.random.default_rng(seed)
    dtype = np.float32
    if use_gpu:
        import ml_dtypes
        dtype = np.dtype(ml_dtypes.bfloat16)      # compute dtype; master weights stay float32

    def randn(*shape, scale=1.0):
        return xp.asarray((rng.standard_normal(shape) * scale).astype(np.float32))

    # Teacher: sparse (about 3% of its neurons fire per token).  Column 0 of x is a constant 1 (bias).
    t_gate, t_up, t_down = randn(n, d, scale=d ** -0.5), randn(n, d, scale=d ** -0.5), randn(n, d, scale=d ** -0.5)
    t_gate[:, 0] = -1.9
    # Student: dense at the start (about half of its neurons fire).
    params = {"w_gate": randn(n, d, scale=d ** -0.5), "w_up": randn(n, d, scale=d ** -0.5),
              "w_down": randn(n, d, scale=d ** -0.5)}
    moments = {k: (xp.zeros_like(v), xp.zeros_like(v)) for k, v in params.items()}
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    history = {"loss": [], "l0": [], "l1": []}
    for step in range(1, steps + 1):
        x = randn(m, d)
        x[:, 0] = 1.0
        target = (xp.maximum(x @ t_gate.T, 0) * (x @ t_up.T)) @ t_down       # float32, dense
        xc = x.astype(dtype)
        weights = [params[k].astype(dtype) for k in ("w_gate", "w_up", "w_down")]
        y, saved, stats = twell.gated_ffn_forward(xc, *weights, l1_weight=l1_weight)
        resid = y.astype(np.float32) - target
        loss = float((resid * resid).mean())
        dy = (2.0 / resid.size * resid).astype(dtype)
        _, dw_gate, dw_up, dw_down = twell.gated_ffn_backward(saved, dy)
        for k, grad in zip(("w_gate", "w_up", "w_down"), (dw_gate, dw_up, dw_down)):
            g = grad.astype(np.float32)
            m1, m2 = moments[k]
            m1 *= beta1
            m1 += (1 - beta1) * g
            m2 *= beta2
            m2 += (1 - beta2) * g * g
            step_size = lr * np.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
            params[k] -= step_size * m1 / (xp.sqrt(m2) + eps)
        history["loss"].append(loss)
        history["l0"].append(float(stats.l0))
        history["l1"].append(float(stats.l1))
        if verbose and (step == 1 or step % max(1, steps // 10) == 0):
            print(f"step {step:4d}  mse {loss:.5f}  l0 {float(stats.l0):8.1f} / {n}  l1 {float(stats.l1):.4f}"
                  f"  dense-backup rows {stats.n_backup_rows}")
    return history


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--cpu", action="store_true", help="run the NumPy reference at a small size")
    args = parser.parse_args()
    if args.cpu:
        train(steps=args.steps, m=256, d=64, n=256, use_gpu=False)
    else:
        train(steps=args.steps)
