"""Dense CuPy baselines (GPU): cuBLAS GEMMs through :func:`twell.runtime.blas.gemm` and one fused
elementwise kernel (:mod:`twell.bench.elementwise`).

* ``dense_cupy``: ``z = x Wgᵀ``, ``u = x Wuᵀ``, ``h = relu(z) ⊙ u`` (ONE fused kernel, fp32 product
  rounded once), ``y = h Wd``, outputs preallocated.
* ``dense_cupy_cat``: one GEMM against ``[Wg; Wu]`` (2n, d) (concatenated outside the timed region), the
  fused kernel reading both halves, the down GEMM.
* ``dense_cupy_matmul`` (only with ``--impl``): ``dense_cupy`` through ``cupy.matmul(out=)``.
* ``dense_cupy_train``: forward as ``dense_cupy``; backward ``dh = dy Wdᵀ``, ONE fused kernel for
  ``du = dt ⊙ relu(z)`` and ``dz = dt ⊙ u ⊙ [z > 0]`` with ``dt = dh + (λ/M) sign(h)`` (written in place
  over ``dh`` and ``z``), ``dx = du Wu`` then ``dx += dz Wg`` (beta = 1), ``dWu = duᵀ x``,
  ``dWg = dzᵀ x``, ``dWd = hᵀ dy``: 9 GEMMs, every buffer preallocated.

The GEMMs go through twell's cuBLAS binding (``cublasGemmEx``, fp32 accumulation, the call
``cupy.matmul`` makes) because CuPy's own cuBLAS wrappers refuse every call while a stream is capturing,
which would leave the CuPy baselines without a CUDA-graph time.
"""

from __future__ import annotations

import numpy as np

from twell.runtime import blas

from .common import err_str
from .elementwise import relu_mul_bwd_kernel, relu_mul_kernel, use_bf16x4

__all__ = ["gemm_fn", "dense_cupy_forward", "make_dense_cupy", "make_dense_cupy_cat", "make_dense_cupy_matmul",
           "make_dense_cupy_train"]


def gemm_fn():
    """``(gemm, info)``: ``gemm(a, b, out, *, trans_a=False, trans_b=False, beta=0.0)``.

    :func:`twell.runtime.blas.gemm` (capturable), else a ``cupy.matmul`` stand-in (not capturable) when
    libcublas cannot be loaded; ``info`` (copied into the results) says which, and the library's path.
    """
    try:
        path = blas.library_path()
    except Exception as exc:
        import cupy as cp  # noqa: PLC0415

        def gemm(a, b, out, *, trans_a=False, trans_b=False, beta=0.0):
            prod = cp.matmul(a.T if trans_a else a, b.T if trans_b else b, out=None if beta else out)
            if beta:
                out[...] = (out.astype(np.float32) * np.float32(beta) + prod.astype(np.float32)).astype(out.dtype)
            return out
        return gemm, {"gemm": "cupy.matmul", "gemm_note": f"twell.runtime.blas unavailable: {err_str(exc)}"}
    return blas.gemm, {"gemm": "cublasGemmEx (twell.runtime.blas)", "libcublas": path}


def dense_cupy_forward(x, wg, wu, wd, mm):
    """Preallocated ``(z, u, h, y)`` and ``forward()``: ``z = x Wgᵀ``, ``u = x Wuᵀ``, fused
    ``h = relu(z) ⊙ u``, ``y = h Wd``; returns ``(forward, buffers, elementwise variant)``."""
    import cupy as cp  # noqa: PLC0415
    m, n, d = x.shape[0], wg.shape[0], x.shape[1]
    z, u, h = (cp.empty((m, n), dtype=x.dtype) for _ in range(3))
    y = cp.empty((m, d), dtype=x.dtype)
    if use_bf16x4(x.dtype, n):
        k, variant = relu_mul_kernel(False, True), "bf16x4"
        ew = (z.view(np.uint64), u.view(np.uint64), h.view(np.uint64))
    else:
        k, variant = relu_mul_kernel(False), "generic"
        ew = (z, u, h)

    def forward():
        mm(x, wg, z, trans_b=True)
        mm(x, wu, u, trans_b=True)
        k(*ew)
        mm(h, wd, y)
        return y
    return forward, (z, u, h, y), variant


def make_dense_cupy(p):
    mm, info = gemm_fn()
    run, _, variant = dense_cupy_forward(*p.arrays(), mm)
    run.info = dict(info, elementwise=variant)
    return run


def make_dense_cupy_cat(p):
    import cupy as cp  # noqa: PLC0415
    x, wg, wu, wd = p.arrays()
    m, n, d = p.m, p.n, p.d
    wcat = cp.concatenate([wg, wu], axis=0)  # (2n, d), once, outside the timed region
    zu = cp.empty((m, 2 * n), dtype=x.dtype)
    h = cp.empty((m, n), dtype=x.dtype)
    y = cp.empty((m, d), dtype=x.dtype)
    mm, info = gemm_fn()
    small = np.int32(1 if m * 2 * n < 2**31 else 0)
    if use_bf16x4(x.dtype, n):
        k = relu_mul_kernel(True, True)
        ew = (zu.view(np.uint64), np.int64(n // 4), small, h.view(np.uint64))
        info = dict(info, elementwise="bf16x4")
    else:
        k = relu_mul_kernel(True)
        ew = (zu, np.int64(n), small, h)
        info = dict(info, elementwise="generic")

    def run():
        mm(x, wcat, zu, trans_b=True)
        k(*ew)
        mm(h, wd, y)
        return y
    run.info = info
    run.keep = wcat  # the concatenated weight lives as long as the closure
    return run


def make_dense_cupy_matmul(p):
    """Like dense_cupy but through ``cupy.matmul(..., out=)`` (CuPy refuses graph capture of it)."""
    import cupy as cp  # noqa: PLC0415
    x, wg, wu, wd = p.arrays()
    m, n, d = p.m, p.n, p.d
    z = cp.empty((m, n), dtype=x.dtype)
    u = cp.empty((m, n), dtype=x.dtype)
    h = cp.empty((m, n), dtype=x.dtype)
    y = cp.empty((m, d), dtype=x.dtype)
    wgT, wuT = wg.T, wu.T
    k = relu_mul_kernel(False)

    def run():
        cp.matmul(x, wgT, out=z)
        cp.matmul(x, wuT, out=u)
        k(z, u, h)
        cp.matmul(h, wd, out=y)
        return y
    run.info = {"gemm": "cupy.matmul"}
    return run


def make_dense_cupy_train(tp):
    """Dense fwd+bwd: 9 cuBLAS GEMMs (graph-capturable) and two fused elementwise kernels.

    Forward as ``dense_cupy``.  Backward: ``dh = dy Wdᵀ``; one kernel for ``du = dt ⊙ relu(z)`` and
    ``dz = dt ⊙ u ⊙ [z > 0]`` with ``dt = dh + (λ/M) sign(h)`` (written in place over ``dh`` and
    ``z``); ``dx = du Wu`` then ``dx += dz Wg`` (beta = 1); ``dWu = duᵀ x``, ``dWg = dzᵀ x``,
    ``dWd = hᵀ dy``.  All buffers are allocated here, outside the timed step.
    """
    import cupy as cp  # noqa: PLC0415
    x, wg, wu, wd = tp.arrays()
    dy, m, n, d = tp.dy, tp.m, tp.n, tp.d
    mm, info = gemm_fn()
    forward, (z, u, h, y), variant = dense_cupy_forward(x, wg, wu, wd, mm)
    dh = cp.empty((m, n), dtype=x.dtype)
    dx = cp.empty((m, d), dtype=x.dtype)
    dwg, dwu, dwd = (cp.empty((n, d), dtype=x.dtype) for _ in range(3))
    du, dz = dh, z  # in place: dh and z are dead once du and dz exist
    scale = tp.l1_weight / max(m, 1)
    if variant == "bf16x4":
        dh4, z4, u4 = dh.view(np.uint64), z.view(np.uint64), u.view(np.uint64)
        kb, bw = relu_mul_bwd_kernel(True), (dh4, z4, u4, np.float32(scale), dh4, z4)
    else:
        kb, bw = relu_mul_bwd_kernel(False), (dh, z, u, np.float64(scale), dh, z)

    def run():
        forward()
        mm(dy, wd, dh, trans_b=True)
        kb(*bw)
        mm(du, wu, dx)
        mm(dz, wg, dx, beta=1.0)
        mm(du, x, dwu, trans_a=True)
        mm(dz, x, dwg, trans_a=True)
        mm(h, dy, dwd, trans_a=True)
        return y, dx, dwg, dwu, dwd
    run.forward = forward
    run.info = dict(info, elementwise=variant, gemms=9, in_place="du over dh, dz over z")
    return run
