"""Row-major cuBLAS GEMM on the current CuPy stream, capturable in CUDA graphs.

The one cuBLAS binding of twell, used by the kernels' orchestration and by the benchmarks.  It calls
``cublasGemmEx`` through ctypes on the libcublas that CuPy loads, rather than through CuPy:

* ``cupy.matmul`` and CuPy's cuBLAS wrappers refuse to run while the current stream is capturing a CUDA
  graph (CuPy's ``setStream`` raises), and cannot add into an existing output;
* ``cupy.cublas.gemm`` takes no 16-bit types.

cuBLAS itself captures fine when the handle has a user workspace (``cublasSetWorkspace``; a
``cublasSetStream`` resets it to the default pool, so it is set again after every stream change).  Each
(device, thread) has its own handle; each (handle, stream) its own 32 MiB workspace, so GEMMs on two
streams never share one (a stream first seen during a capture borrows the handle's first one).  fp32 accumulation (``CUBLAS_COMPUTE_32F``; 64F for float64), the call
``cupy.matmul`` makes for 2-D operands, so results are bitwise those of ``cupy.matmul``.

nvmath-python's cuBLAS bindings would do the same; they are not used because they add a dependency for
three functions, and a ctypes call costs ~1 µs of host time per GEMM here.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

__all__ = ["gemm", "gemm_pair", "DTYPES", "WORKSPACE_BYTES", "library_path"]

_CUDA_DATATYPE = {"float16": 2, "bfloat16": 14, "float32": 0, "float64": 1}   # cudaDataType_t
#: dtype names :func:`gemm` takes.
DTYPES = frozenset(_CUDA_DATATYPE)
_COMPUTE_32F, _COMPUTE_64F = 68, 70
_GEMM_DEFAULT = -1
_OP_N, _OP_T = 0, 1
#: cuBLAS workspace per (handle, stream): what cuBLAS asks for on Hopper.
WORKSPACE_BYTES = 32 << 20
_MAX_STREAMS_PER_HANDLE = 16

_lib = None
_lib_lock = threading.Lock()
_local = threading.local()


def _load():
    """libcublas as CuPy loads it (cuda.pathfinder finds the wheel's copy or the system's)."""
    global _lib
    if _lib is not None:
        return _lib
    with _lib_lock:
        if _lib is None:
            path = None
            try:
                from cuda.pathfinder import load_nvidia_dynamic_lib  # noqa: PLC0415
                path = load_nvidia_dynamic_lib("cublas").abs_path
            except Exception:  # noqa: BLE001 - fall back to the loader's search path
                path = None
            if path is None:
                from ctypes.util import find_library  # noqa: PLC0415
                path = find_library("cublas")
            if path is None:
                raise RuntimeError("libcublas was not found: install the CUDA extra of twell "
                                   "(pip install 'twell[cuda13]' or 'twell[cuda12]')")
            lib = ctypes.CDLL(path)
            vp, i32 = ctypes.c_void_p, ctypes.c_int
            lib.cublasCreate_v2.argtypes = [ctypes.POINTER(vp)]
            lib.cublasSetStream_v2.argtypes = [vp, vp]
            lib.cublasSetWorkspace_v2.argtypes = [vp, vp, ctypes.c_size_t]
            lib.cublasGemmEx.argtypes = [vp, i32, i32, i32, i32, i32, vp, vp, i32, i32, vp, i32, i32, vp, vp, i32,
                                         i32, i32, i32]
            i64 = ctypes.c_longlong
            lib.cublasGemmStridedBatchedEx.argtypes = [vp, i32, i32, i32, i32, i32, vp, vp, i32, i32, i64, vp, i32, i32,
                                                       i64, vp, vp, i32, i32, i64, i32, i32, i32]
            for fn in (lib.cublasCreate_v2, lib.cublasSetStream_v2, lib.cublasSetWorkspace_v2, lib.cublasGemmEx,
                       lib.cublasGemmStridedBatchedEx):
                fn.restype = i32
            _lib = lib
    return _lib


def library_path() -> str:
    """Path of the libcublas the GEMMs run on."""
    return _load()._name  # noqa: SLF001


def _check(status: int, what: str):
    if status != 0:
        raise RuntimeError(f"{what} failed with cuBLAS status {status}")


class _Handle:
    """One cuBLAS handle of one device, used by one thread, with a workspace per stream it ran on.

    Workspaces come from CuPy's default memory pool directly (never from an allocator installed for a
    graph capture: they outlive every call).  A stream first seen while it is capturing a graph (where
    allocating could be refused) gets the handle's first workspace, made at creation."""

    def __init__(self, cp, lib, device_id: int):
        handle = ctypes.c_void_p()
        _check(lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
        self.lib, self.handle, self.device_id = lib, handle, device_id
        self.stream = None
        self.fallback = self._workspace(cp)
        self.workspaces: dict = {}                  # stream pointer -> workspace (a cupy MemoryPointer)
        self.scalars: dict = {}                     # (value, f64) -> ctypes scalar (host pointer mode)

    @staticmethod
    def _workspace(cp):
        return cp.get_default_memory_pool().malloc(WORKSPACE_BYTES)

    def bind(self, cp, stream):
        ptr = stream.ptr
        if ptr == self.stream:
            return
        ws = self.workspaces.get(ptr)
        if ws is None:
            if stream.is_capturing():
                ws = self.fallback
            else:
                if len(self.workspaces) >= _MAX_STREAMS_PER_HANDLE:
                    # Drop the oldest.  No synchronisation: that stream may be destroyed already (waiting on
                    # it would be undefined), and none is needed -- the block was allocated while that
                    # stream was current, and CuPy's pool hands a freed block only to later allocations on
                    # the same stream, which run after the GEMMs that used it.
                    del self.workspaces[next(iter(self.workspaces))]
                ws = self.workspaces[ptr] = self._workspace(cp)
        vp = ctypes.c_void_p
        _check(self.lib.cublasSetStream_v2(self.handle, vp(ptr)), "cublasSetStream")
        # cublasSetStream resets the workspace to cuBLAS's default pool (which allocates while capturing)
        _check(self.lib.cublasSetWorkspace_v2(self.handle, vp(ws.ptr), ctypes.c_size_t(WORKSPACE_BYTES)),
               "cublasSetWorkspace")
        self.stream = ptr

    def scalar(self, value: float, f64: bool):
        key = (float(value), f64)
        c = self.scalars.get(key)
        if c is None:
            c = self.scalars[key] = (ctypes.c_double if f64 else ctypes.c_float)(float(value))
        return c


def _handle(cp) -> _Handle:
    dev = cp.cuda.runtime.getDevice()
    handles = getattr(_local, "handles", None)
    if handles is None:
        handles = _local.handles = {}
    h = handles.get(dev)
    if h is None:
        h = handles[dev] = _Handle(cp, _load(), dev)
    return h


def gemm(a, b, out=None, *, trans_a: bool = False, trans_b: bool = False, beta: float = 0.0):
    """``out = op(a) @ op(b) + beta * out`` on the current CuPy stream; returns ``out``.

    Parameters
    ----------
    a : cupy.ndarray (m, k), or (k, m) with ``trans_a``; C-contiguous
    b : cupy.ndarray (k, n), or (n, k) with ``trans_b``; C-contiguous, a's dtype
    out : cupy.ndarray (m, n), C-contiguous, a's dtype, or None (allocated; ``beta`` must be 0)
    beta : float
        0 overwrites ``out`` (NaN in it does not propagate); 1 accumulates (fp32, one rounding of the sum).

    float16 / bfloat16 / float32 accumulate in fp32, float64 in fp64.  Capturable in a CUDA graph.
    """
    import cupy as cp  # noqa: PLC0415

    m = a.shape[1] if trans_a else a.shape[0]
    k = a.shape[0] if trans_a else a.shape[1]
    kb, n = (b.shape[1], b.shape[0]) if trans_b else (b.shape[0], b.shape[1])
    if out is None:
        if beta != 0.0:
            raise ValueError("gemm with beta != 0 needs out")
        out = cp.empty((m, n), dtype=a.dtype)
    if k != kb or tuple(out.shape) != (m, n):
        raise ValueError(f"gemm shapes do not match: a {a.shape} (trans_a={trans_a}), b {b.shape} "
                         f"(trans_b={trans_b}), out {out.shape}")
    name = np.dtype(out.dtype).name
    if name not in _CUDA_DATATYPE or a.dtype != out.dtype or b.dtype != out.dtype:
        raise TypeError(f"gemm takes operands of one dtype in {sorted(DTYPES)}, got {a.dtype}, {b.dtype}, "
                        f"{out.dtype}")
    if not (a.flags.c_contiguous and b.flags.c_contiguous and out.flags.c_contiguous):
        raise ValueError("gemm takes C-contiguous arrays")
    if m == 0 or n == 0:
        return out
    if k == 0:
        if beta == 0.0:
            out.fill(0)
        return out
    h = _handle(cp)
    h.bind(cp, cp.cuda.get_current_stream())
    f64 = name == "float64"
    dt = _CUDA_DATATYPE[name]
    one, beta_c = h.scalar(1.0, f64), h.scalar(beta, f64)
    vp, addr = ctypes.c_void_p, ctypes.addressof
    # Row-major out (m, n) is column-major out^T (n, m) = op(b)^T op(a)^T: swap the operands; a row-major
    # matrix read column-major is its transpose, with the leading dimension = its number of columns.
    _check(h.lib.cublasGemmEx(h.handle, _OP_T if trans_b else _OP_N, _OP_T if trans_a else _OP_N, n, m, k,
                              vp(addr(one)), vp(b.data.ptr), dt, b.shape[1], vp(a.data.ptr), dt, a.shape[1],
                              vp(addr(beta_c)), vp(out.data.ptr), dt, n, _COMPUTE_64F if f64 else _COMPUTE_32F,
                              _GEMM_DEFAULT), "cublasGemmEx")
    return out


def gemm_pair(a, b0, b1):
    """``(a @ b0ᵀ, a @ b1ᵀ)`` as two halves of one ``(2, m, n)`` array, by one batched cuBLAS call when it
    can (else two :func:`gemm` calls).  Returns ``(out0, out1)``, C-contiguous views.

    The gate and up projections share ``a`` = x: one call over both weights fills twice as many output
    tiles as either alone — measured on the H200 (docs/perf/gemm_pair_probe.py; d 2048, n 5632, bf16,
    queued device time): 0.035 against 0.040 ms for two GEMMs at M = 512, 1.06 against 1.11 ms at
    M = 16,384, and less host time per call (0.036 against 0.047 ms).  The batch is
    ``cublasGemmStridedBatchedEx`` with the distance between the two weights as the batch stride (cuBLAS
    reads matrix i at base + i · stride, whatever lies between), so the weights need not be one array.
    Same fp32 accumulation as :func:`gemm`; capturable.

    a (m, k); b0, b1 (n, k), C-contiguous, one dtype.
    """
    import cupy as cp  # noqa: PLC0415

    m, k = a.shape
    n = b0.shape[0]
    out = cp.empty((2, m, n), dtype=a.dtype)
    if b1.shape != b0.shape or b0.shape[1] != k or b0.dtype != a.dtype or b1.dtype != a.dtype:
        raise ValueError(f"gemm_pair takes a (m, k) and two (n, k) weights of a's dtype, got a {a.shape} "
                         f"{a.dtype}, b0 {b0.shape} {b0.dtype}, b1 {b1.shape} {b1.dtype}")
    item = a.dtype.itemsize
    lo, hi, swap = (b0, b1, False) if b0.data.ptr <= b1.data.ptr else (b1, b0, True)
    stride, rem = divmod(hi.data.ptr - lo.data.ptr, item)
    name = np.dtype(a.dtype).name
    if (rem or stride == 0 or m == 0 or n == 0 or k == 0 or name not in _CUDA_DATATYPE
            or not (a.flags.c_contiguous and b0.flags.c_contiguous and b1.flags.c_contiguous)):
        gemm(a, b0, out[0], trans_b=True)
        gemm(a, b1, out[1], trans_b=True)
        return out[0], out[1]
    h = _handle(cp)
    h.bind(cp, cp.cuda.get_current_stream())
    f64 = name == "float64"
    dt = _CUDA_DATATYPE[name]
    one, zero = h.scalar(1.0, f64), h.scalar(0.0, f64)
    vp, addr = ctypes.c_void_p, ctypes.addressof
    # column-major: out_iᵀ (n, m) = w_i (n, k, read as its transpose) · aᵀ; batch i reads lo + i · stride
    _check(h.lib.cublasGemmStridedBatchedEx(
        h.handle, _OP_T, _OP_N, n, m, k, vp(addr(one)), vp(lo.data.ptr), dt, k, stride, vp(a.data.ptr), dt, k, 0,
        vp(addr(zero)), vp(out.data.ptr), dt, n, m * n, 2, _COMPUTE_64F if f64 else _COMPUTE_32F, _GEMM_DEFAULT),
        "cublasGemmStridedBatchedEx")
    return (out[1], out[0]) if swap else (out[0], out[1])
