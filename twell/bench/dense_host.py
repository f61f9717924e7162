"""Dense host baselines (NumPy, float32) and :func:`dense_train_math`, the dense training step in any
array module (also the float64 ``--check`` reference of the training benchmark)."""

from __future__ import annotations

import numpy as np

from twell import _backend as B

from .common import host_f32

__all__ = ["make_dense_numpy", "make_dense_numpy_train", "dense_train_math"]


def make_dense_numpy(p):
    """``y`` with float32 NumPy matmuls on float32 copies of the problem (made outside the timed region)."""
    x, wg, wu, wd = host_f32(p)

    def run():
        z = x @ wg.T
        u = x @ wu.T
        np.maximum(z, 0, out=z)
        z *= u
        return z @ wd
    return run


def make_dense_numpy_train(tp):
    """One float32 NumPy training step (:func:`dense_train_math`); ``run.forward`` is its forward alone."""
    x, wg, wu, wd, dy = tp.host_f32()
    lam = tp.l1_weight

    def run():
        return dense_train_math(x, wg, wu, wd, dy, lam)
    run.forward = lambda: dense_train_math(x, wg, wu, wd, dy, lam, forward_only=True)
    return run


def dense_train_math(x, w_gate, w_up, w_down, dy, l1_weight: float = 0.0, *, forward_only: bool = False):
    """Dense gated-FFN forward + backward with the inputs' array module (NumPy or CuPy) and dtype.

    ``y = (relu(x Wgᵀ) ⊙ x Wuᵀ) Wd``; with ``dt = dy Wdᵀ + (λ/M) sign(h)``: ``du = dt ⊙ relu(z)``,
    ``dz = dt ⊙ u ⊙ [z > 0]``, ``dx = du Wu + dz Wg``, ``dWg = dzᵀ x``, ``dWu = duᵀ x``,
    ``dWd = hᵀ dy``.  Returns ``(y, dx, dw_gate, dw_up, dw_down)`` (``y`` alone if
    ``forward_only``).  In float64 it is the ``--check`` reference of the training benchmark.
    """
    xp = np if isinstance(x, np.ndarray) else B.cupy_or_none()
    m = x.shape[0]
    z = x @ w_gate.T
    u = x @ w_up.T
    g = xp.maximum(z, 0, out=z)
    h = g * u
    y = h @ w_down
    if forward_only:
        return y
    on = g > 0  # == z > 0 (NaN stays off)
    dt = dy @ w_down.T
    if l1_weight:
        dt += (l1_weight / max(m, 1)) * xp.sign(h)
    du = dt * g
    del g, z
    dt *= u
    dt *= on
    dz = dt
    del u, on
    dx = du @ w_up
    dx += dz @ w_gate
    return y, dx, dz.T @ x, du.T @ x, h.T @ dy

