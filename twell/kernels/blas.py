"""Row-major cuBLAS GEMM that accumulates into its output, through CuPy's cuBLAS binding.

``cupy.matmul`` cannot add into an existing array and ``cupy.cublas.gemm`` takes
no 16-bit types; the training backward needs ``out += op(a) @ op(b)`` on bf16 /
fp16 arrays (the dense-backup rows' contributions added to gradients that the
sparse kernels already wrote), with fp32 accumulation and one rounding.
"""

from __future__ import annotations

import numpy as np

_CUDA_DATATYPE = {"float16": 2, "bfloat16": 14, "float32": 0}   # cudaDataType_t
#: dtype names :func:`gemm` takes.
DTYPES = frozenset(_CUDA_DATATYPE)
_CUBLAS_COMPUTE_32F = 68
_CUBLAS_GEMM_DEFAULT = -1
_OP_N, _OP_T = 0, 1
# host scalars for cuBLAS's host pointer mode (alpha, beta are read at call time: keep them alive)
_SCALARS = {v: np.array([v], dtype=np.float32) for v in (0.0, 1.0)}


def gemm(a, b, out, *, trans_a: bool = False, trans_b: bool = False, beta: float = 0.0):
    """``out = op(a) @ op(b) + beta * out`` on the current CuPy stream (cuBLAS ``GemmEx``, fp32 compute).

    Parameters
    ----------
    a : cupy.ndarray (m, k), or (k, m) with ``trans_a``; C-contiguous
    b : cupy.ndarray (k, n), or (n, k) with ``trans_b``; C-contiguous, a's dtype
    out : cupy.ndarray (m, n), C-contiguous, a's dtype (float16, bfloat16 or float32)
    beta : {0.0, 1.0}
    """
    from cupy_backends.cuda.libs import cublas  # noqa: PLC0415

    import cupy as cp  # noqa: PLC0415
    m, n = out.shape
    k = a.shape[0] if trans_a else a.shape[1]
    if (a.shape[1] if trans_a else a.shape[0]) != m or (b.shape[1] if trans_b else b.shape[0]) != k or \
            (b.shape[0] if trans_b else b.shape[1]) != n:
        raise ValueError(f"gemm shapes do not match: a {a.shape}, b {b.shape}, out {out.shape}")
    dt = _CUDA_DATATYPE.get(np.dtype(out.dtype).name)
    if dt is None or a.dtype != out.dtype or b.dtype != out.dtype:
        raise TypeError(f"gemm takes float16 / bfloat16 / float32 operands of one dtype, got {a.dtype}, "
                        f"{b.dtype}, {out.dtype}")
    if not (a.flags.c_contiguous and b.flags.c_contiguous and out.flags.c_contiguous):
        raise ValueError("gemm takes C-contiguous arrays")
    if m == 0 or n == 0:
        return out
    handle = cp.cuda.device.get_cublas_handle()
    if cublas.getPointerMode(handle) != cublas.CUBLAS_POINTER_MODE_HOST:
        cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    # Row-major out (m, n) is column-major out^T (n, m) = op(b)^T op(a)^T: swap the operands.
    cublas.gemmEx(handle, _OP_T if trans_b else _OP_N, _OP_T if trans_a else _OP_N, n, m, k,
                  _SCALARS[1.0].ctypes.data, b.data.ptr, dt, max(b.shape[1], 1), a.data.ptr, dt, max(a.shape[1], 1),
                  _SCALARS[float(beta)].ctypes.data, out.data.ptr, dt, max(n, 1), _CUBLAS_COMPUTE_32F,
                  _CUBLAS_GEMM_DEFAULT)
    return out


__all__ = ["gemm", "DTYPES"]
