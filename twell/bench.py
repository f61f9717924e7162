"""Benchmark framework: ``python -m twell bench``.

Layout of this module
---------------------
1. environment / metadata (:func:`environment_info`, also behind ``python -m twell info``)
2. implementations registry (:data:`IMPLS`, :func:`register`, :func:`register_sparse`)
   and the built-in implementations: dense CuPy (cuBLAS + one fused elementwise
   kernel, two variants), PyTorch eager, dense NumPy and the NumPy reference
3. timers (CUDA events; host clock on the CPU), L2 flushing, CUDA-graph capture
4. problems, correctness check, the case driver (:func:`run_bench`)
5. output: fixed-width table, JSON, plot
6. command-line arguments (:func:`add_bench_arguments`, :func:`bench_main`)

Adding an implementation
------------------------
One call::

    from twell import bench
    bench.register_sparse("twell", lambda p: twell.gated_ffn(p.x, p.w_gate, p.w_up, p.w_down))

``p`` is a :class:`twell.synthetic.Problem` whose arrays live on the device
(CuPy).  The callable returns ``y`` (M, d); it runs on the current CuPy stream
(the benchmark runs everything on one non-blocking stream, shared with
PyTorch).  If it needs set-up outside the timed region, register a factory
instead: ``register_sparse(name, make=lambda p: run)`` where ``run()`` returns y.
A ``"twell"`` entry calling ``twell.ops.gated_ffn`` is pre-registered and used
as soon as that function exists.

Dense baselines (GPU)
---------------------
``dense_cupy``: ``z = x Wgᵀ``, ``u = x Wuᵀ``, ``h = relu(z) ⊙ u``, ``y = h Wd`` with
preallocated outputs.  The GEMMs call ``cublasGemmEx`` (fp32 accumulation) on
a cuBLAS handle of our own through ``ctypes`` (:class:`CublasGemm`), the same
call ``cupy.matmul`` makes, because CuPy's wrappers refuse every cuBLAS call
while a stream is capturing, which would leave the CuPy baseline without a
CUDA-graph time.  ``h`` comes from ONE fused ``cupy.ElementwiseKernel`` (fp32
product, rounded once); for bfloat16 with ``n % 4 == 0`` it runs on ``uint64``
views, four values per thread, bitwise equal to the generic kernel and ≈ 3×
faster (measured on the H200 at M = 16384: 0.16 ms vs 0.45 ms; the generic
CuPy bf16 kernel makes the whole FFN slower than PyTorch eager; set
``TWELL_BENCH_GENERIC_ELEMENTWISE=1`` to use it anyway).
``dense_cupy_cat``: one GEMM against ``[Wg; Wu]`` (2n, d) (concatenated outside
the timed region), the fused kernel reading both halves, the down GEMM.
``dense_cupy_matmul`` (only with ``--impl``): ``dense_cupy`` through
``cupy.matmul(out=)``.  ``torch_eager``: ``F.linear``, ``relu``, ``*``,
``F.linear`` on DLPack views of the same arrays, on the same stream.

Timing (GPU)
------------
Each implementation is timed twice:

* **eager**: CUDA events recorded on the current stream immediately before and
  after each call, host synchronisation after each call, the same measurement
  as ``cupyx.profiler.benchmark`` (so Python launch overhead counts: at decode
  sizes that is what a Python caller pays).  Our own loop instead of
  ``cupyx.profiler.benchmark`` so that the L2 can be flushed *outside* the
  timed window.
* **graph**: the call captured once into a CUDA graph (allocations inside the
  capture come from a private memory pool kept alive with the graph; PyTorch
  through ``torch.cuda.CUDAGraph``); each replay is bracketed by events,
  replays are queued back to back without host synchronisation, so the times
  are pure device time.  A capture failure (a host synchronisation, a CuPy
  cuBLAS call, ...) is recorded as ``"graph": null`` with ``"graph_error"``.

Repetitions adapt to ``--budget`` seconds per timing (at least 5 repetitions,
after ``--warmup`` untimed calls).  Reported: median, p20, p80 in ms.
``--flush-l2`` (default ``auto``: on for M <= 4096) overwrites a buffer of
4× the L2 size before every timed call, outside the events, so that decode
sizes do not measure weights left in L2 by the previous repetition.

Speedups are ``dense_best / impl`` per mode, where ``dense_best`` is the fastest
(median) of the dense implementations (``dense_cupy``, ``dense_cupy_cat``,
``torch_eager``) in that mode that passed ``--check`` when it ran.

``--check`` compares the first ``--check-rows`` rows of every implementation's
``y`` (and of its graph replay) with ``twell.reference.gated_ffn_dense`` in
float64 on the host: ``‖y − ref‖ / ‖ref‖`` against :data:`CHECK_TOLERANCE`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import _backend as B
from . import synthetic

__all__ = [
    "Impl",
    "IMPLS",
    "register",
    "register_sparse",
    "unregister",
    "environment_info",
    "format_info",
    "BenchConfig",
    "run_bench",
    "format_table",
    "write_json",
    "plot_results",
    "add_bench_arguments",
    "bench_main",
    "GPU_DEFAULT_M",
    "CPU_DEFAULT_M",
    "SWEEP_MEANS",
    "CHECK_TOLERANCE",
]

GPU_DEFAULT_M = (1, 8, 64, 16384, 131072)
CPU_DEFAULT_M = (256, 2048)
GPU_DEFAULT_SWEEP_M = 16384
CPU_DEFAULT_SWEEP_M = 256
SWEEP_MEANS = (8, 16, 29, 64, 128, 200, 300, 450, 600)
#: rel. error ||y - ref|| / ||ref|| above which an implementation fails --check.
CHECK_TOLERANCE = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 1e-4, "float64": 1e-9}
#: --flush-l2 auto: flush for M up to this.
FLUSH_AUTO_MAX_M = 4096
MIN_REPEAT = 5
MAX_REPEAT = 5000
_GRAPH_BATCH = 64
JSON_SCHEMA = "twell.bench/1"


# =============================================================================
# 1. environment / metadata
# =============================================================================
def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_version_str(v) -> str | None:
    """CUDA's integer versions (12040, 13020) as '12.4'; tuples as 'a.b'."""
    if v is None:
        return None
    if isinstance(v, tuple):
        return ".".join(str(int(p)) for p in v)
    v = int(v)
    if v <= 0:
        return None
    return f"{v // 1000}.{(v % 1000) // 10}"


def arch_for(cc: tuple[int, int]) -> str:
    """The NVRTC arch string twell compiles for: sm_90a on cc 9.0, else sm_XY."""
    major, minor = int(cc[0]), int(cc[1])
    return "sm_90a" if (major, minor) == (9, 0) else f"sm_{major}{minor}"


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def git_revision() -> str | None:
    """``git rev-parse HEAD`` of the source tree twell was imported from, or None."""
    root = _repo_root()
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except Exception:
        return None
    rev = out.stdout.strip()
    return rev if out.returncode == 0 and rev else None


def environment_info(*, devices: bool = True) -> dict:
    """Versions, CUDA/NVRTC state and device properties, as a JSON-able dict.

    Works without a GPU (and without CuPy): missing pieces are reported, not raised.
    """
    import twell  # noqa: PLC0415

    info: dict = {
        "twell": getattr(twell, "__version__", None),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "numpy": np.__version__,
        "scipy": _dist_version("scipy"),
        "ml_dtypes": _dist_version("ml_dtypes"),
        "cupy": "not installed",
        "torch": _dist_version("torch") or "not installed",
        "matplotlib": _dist_version("matplotlib") or "not installed",
        "cuda_available": False,
        "nvrtc_version": None,
        "cuda_runtime_version": None,
        "cuda_driver_version": None,
        "devices": [],
        "arch": None,
        "cupy_cache_dir": os.environ.get("CUPY_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cupy",
                                                                           "kernel_cache"),
        "cuda_src_dir": None,
    }
    errors: dict = {}
    try:
        import cupy  # noqa: PLC0415
    except ModuleNotFoundError:
        cupy = None
    except Exception as exc:  # pragma: no cover - broken installs
        cupy = None
        info["cupy"] = f"import failed: {type(exc).__name__}: {exc}"
    if cupy is not None:
        info["cupy"] = cupy.__version__
        try:
            info["cuda_available"] = bool(cupy.cuda.is_available())
        except Exception as exc:  # pragma: no cover
            errors["cuda_available"] = f"{type(exc).__name__}: {exc}"
        try:
            info["nvrtc_version"] = _cuda_version_str(tuple(cupy.cuda.nvrtc.getVersion()))
        except Exception as exc:
            errors["nvrtc_version"] = f"{type(exc).__name__}: {exc}"
        try:
            info["cuda_runtime_version"] = _cuda_version_str(cupy.cuda.runtime.runtimeGetVersion())
        except Exception as exc:
            errors["cuda_runtime_version"] = f"{type(exc).__name__}: {exc}"
        try:
            info["cuda_driver_version"] = _cuda_version_str(cupy.cuda.runtime.driverGetVersion())
        except Exception as exc:
            errors["cuda_driver_version"] = f"{type(exc).__name__}: {exc}"
        if devices and info["cuda_available"]:
            try:
                for i in range(cupy.cuda.runtime.getDeviceCount()):
                    p = cupy.cuda.runtime.getDeviceProperties(i)
                    name = p.get("name", b"")
                    name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
                    cc = (int(p.get("major", 0)), int(p.get("minor", 0)))
                    info["devices"].append({
                        "id": i,
                        "name": name,
                        "compute_capability": f"{cc[0]}.{cc[1]}",
                        "sm_count": int(p.get("multiProcessorCount", 0)),
                        "l2_bytes": int(p.get("l2CacheSize", 0)),
                        "total_memory_bytes": int(p.get("totalGlobalMem", 0)),
                        "shared_memory_per_block_optin": int(p.get("sharedMemPerBlockOptin", 0)),
                        "arch": arch_for(cc),
                    })
                if info["devices"]:
                    info["arch"] = info["devices"][0]["arch"]
            except Exception as exc:  # pragma: no cover - needs a GPU
                errors["devices"] = f"{type(exc).__name__}: {exc}"
    try:
        from twell import _kernels  # noqa: PLC0415

        info["cuda_src_dir"] = str(_kernels.cuda_src_dir())
    except Exception as exc:
        errors["cuda_src_dir"] = f"{type(exc).__name__}: {exc}"
    if errors:
        info["errors"] = errors
    return info


def format_info(info: dict) -> str:
    """Human-readable ``key: value`` lines of :func:`environment_info`."""
    lines = []
    order = ["twell", "python", "python_executable", "platform", "numpy", "scipy", "ml_dtypes", "cupy",
             "torch", "matplotlib", "cuda_available", "nvrtc_version", "cuda_runtime_version",
             "cuda_driver_version", "arch", "cupy_cache_dir", "cuda_src_dir"]
    width = max(len(k) for k in order)
    for k in order:
        v = info.get(k)
        lines.append(f"{k:<{width}} : {'-' if v is None else v}")
    devs = info.get("devices") or []
    if devs:
        for dv in devs:
            lines.append(f"{'device ' + str(dv['id']):<{width}} : {dv['name']}, cc {dv['compute_capability']}, "
                         f"{dv['sm_count']} SMs, L2 {dv['l2_bytes'] / 2**20:.1f} MiB, "
                         f"{dv['total_memory_bytes'] / 2**30:.1f} GiB, arch {dv['arch']}")
    else:
        lines.append(f"{'devices':<{width}} : none")
    for k, v in (info.get("errors") or {}).items():
        lines.append(f"{'error[' + k + ']':<{width}} : {v}")
    return "\n".join(lines)


# =============================================================================
# 2. implementations registry
# =============================================================================
@dataclass
class Impl:
    """One timed implementation of the gated FFN ``y = (relu(x Wgᵀ) ⊙ x Wuᵀ) Wd``.

    ``make(problem)`` runs outside the timed region and returns ``run``; ``run()``
    computes and returns ``y``.  ``backend`` says which bench path uses it:
    ``"cupy"`` / ``"torch"`` on the GPU, ``"numpy"`` on the CPU.  ``dense`` marks
    the baselines that speedups are measured against.  ``capture`` overrides the
    CUDA-graph capture (signature of :func:`capture_cupy_graph`).
    ``available()`` returns None or the reason the implementation cannot run.
    ``default=False`` implementations run only when ``--impl`` names them.
    ``run.info`` (a dict, optional) is copied into the results.
    """

    name: str
    make: Callable
    backend: str = "cupy"
    dense: bool = False
    capture: Callable | None = None
    available: Callable[[], str | None] = field(default=lambda: None)
    description: str = ""
    default: bool = True  #: run unless --impl names a selection


#: name -> Impl, in registration order (the table follows it).
IMPLS: dict[str, Impl] = {}


def register(impl: Impl, *, replace: bool = True) -> Impl:
    """Add ``impl`` to :data:`IMPLS` (replacing one of the same name)."""
    if not isinstance(impl, Impl):
        raise TypeError(f"impl must be an Impl, got {type(impl).__name__}")
    if impl.backend not in ("cupy", "torch", "numpy"):
        raise ValueError(f"impl.backend must be 'cupy', 'torch' or 'numpy', got {impl.backend!r}")
    if impl.name in IMPLS and not replace:
        raise ValueError(f"an implementation named {impl.name!r} is already registered")
    IMPLS[impl.name] = impl
    return impl


def register_sparse(name: str, fn: Callable | None = None, *, make: Callable | None = None,
                    backend: str = "cupy", available: Callable[[], str | None] | None = None,
                    description: str = "") -> Impl:
    """Register a (sparse) implementation: ``fn(problem) -> y``, or ``make(problem) -> run``."""
    if (fn is None) == (make is None):
        raise TypeError("register_sparse needs exactly one of fn or make")
    if make is None:
        def make(problem, _fn=fn):
            return lambda: _fn(problem)
    return register(Impl(name=name, make=make, backend=backend, dense=False,
                         available=available or (lambda: None), description=description))


def unregister(name: str) -> None:
    IMPLS.pop(name, None)


def _as_y(result):
    """``y`` from an implementation's return value (``y``, ``(y, ...)``, or an object with ``.y``)."""
    if isinstance(result, (tuple, list)):
        return result[0]
    if hasattr(result, "y") and not hasattr(result, "shape"):
        return result.y
    return result


# ---- dense CuPy ------------------------------------------------------------
_ACC_PREAMBLE = r"""
template <typename T> struct twell_bench_acc { typedef float type; };
template <> struct twell_bench_acc<double> { typedef double type; };
"""

_RELU_MUL_OP = r"""
typedef twell_bench_acc<T>::type A;
const A zz = (A)z;
const A uu = (A)u;
h = (T)(zz > (A)0 ? zz * uu : (A)0);
"""

# zu is the (M, 2n) output of x @ [Wg; Wu]^T, read row-major; h is (M, n).
_CAT_INDEX = r"""
long long r, c;
if (small) {
    const unsigned int ii = (unsigned int)i, nn = (unsigned int)n;
    r = ii / nn;
    c = ii - (unsigned int)r * nn;
} else {
    r = i / n;
    c = i - r * n;
}
const long long base = r * 2 * n + c;
"""

_RELU_MUL_CAT_OP = _CAT_INDEX + r"""
typedef twell_bench_acc<T>::type A;
const A zz = (A)zu[base];
const A uu = (A)zu[base + n];
h = (T)(zz > (A)0 ? zz * uu : (A)0);
"""

# bfloat16, four values per thread (8-byte loads and stores on uint64 views):
# the same arithmetic as the generic kernel (fp32 product, one round-to-nearest-even).
_BF16X4_PREAMBLE = r"""
__device__ __forceinline__ unsigned long long twell_bench_f2bf(float f) {
    const unsigned int b = __float_as_uint(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return 0x7fc0ull;  /* NaN */
    return (unsigned long long)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}
__device__ __forceinline__ unsigned long long twell_bench_relu_mul4(unsigned long long zv, unsigned long long uv) {
    unsigned long long out = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const float zf = __uint_as_float((unsigned int)((zv >> (16 * k)) & 0xffffull) << 16);
        const float uf = __uint_as_float((unsigned int)((uv >> (16 * k)) & 0xffffull) << 16);
        out |= twell_bench_f2bf(zf > 0.f ? zf * uf : 0.f) << (16 * k);
    }
    return out;
}
"""
_RELU_MUL_BF16X4_OP = "h = twell_bench_relu_mul4(z, u);"
_RELU_MUL_CAT_BF16X4_OP = _CAT_INDEX + "h = twell_bench_relu_mul4(zu[base], zu[base + n]);"


_KERNEL_CACHE: dict = {}


def _relu_mul_kernel(cat: bool, bf16x4: bool = False):
    """``h = relu(z) * u`` in fp32 (fp64 for float64), rounded once (CuPy ElementwiseKernel).

    ``bf16x4``: the bfloat16 kernel on ``uint64`` views (four values per thread).
    """
    key = (cat, bf16x4)
    k = _KERNEL_CACHE.get(key)
    if k is None:
        import cupy as cp  # noqa: PLC0415
        if bf16x4 and cat:
            k = cp.ElementwiseKernel("raw uint64 zu, int64 n, int32 small", "uint64 h", _RELU_MUL_CAT_BF16X4_OP,
                                     "twell_bench_relu_mul_cat_bf16x4", preamble=_BF16X4_PREAMBLE)
        elif bf16x4:
            k = cp.ElementwiseKernel("uint64 z, uint64 u", "uint64 h", _RELU_MUL_BF16X4_OP,
                                     "twell_bench_relu_mul_bf16x4", preamble=_BF16X4_PREAMBLE)
        elif cat:
            k = cp.ElementwiseKernel("raw T zu, int64 n, int32 small", "T h", _RELU_MUL_CAT_OP,
                                     "twell_bench_relu_mul_cat", preamble=_ACC_PREAMBLE)
        else:
            k = cp.ElementwiseKernel("T z, T u", "T h", _RELU_MUL_OP, "twell_bench_relu_mul",
                                     preamble=_ACC_PREAMBLE)
        _KERNEL_CACHE[key] = k
    return k


def _use_bf16x4(dtype, n: int) -> bool:
    return np.dtype(dtype).name == "bfloat16" and n % 4 == 0 and not os.environ.get("TWELL_BENCH_GENERIC_ELEMENTWISE")


# cuBLAS called directly through ctypes: CuPy's own cuBLAS wrappers refuse any
# call while the current stream is capturing ("calling cuBLAS API during stream
# capture is currently unsupported", cupy_backends/cuda/libs/cublas.pyx,
# setStream), which would leave every CuPy dense baseline without a CUDA-graph
# time.  cuBLAS itself supports capture when the handle has a user workspace.
_CUDA_DATATYPE = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 14}  # cudaDataType_t
_CUBLAS_COMPUTE_32F = 68
_CUBLAS_COMPUTE_64F = 70
_CUBLAS_GEMM_DEFAULT = -1
_CUBLAS_OP_N, _CUBLAS_OP_T = 0, 1
_CUBLAS_WORKSPACE_BYTES = 32 << 20


def _load_libcublas():
    """The libcublas that CuPy loaded (read from /proc/self/maps), else cuda.pathfinder's, else the system's."""
    import ctypes  # noqa: PLC0415
    import ctypes.util  # noqa: PLC0415

    with contextlib.suppress(Exception):
        from cupy_backends.cuda.libs import cublas as _cupy_cublas  # noqa: F401, PLC0415 - loads libcublas
    path = None
    with contextlib.suppress(OSError), open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if fields and "/libcublas.so" in fields[-1]:
                path = fields[-1]
                break
    if path is None:
        with contextlib.suppress(Exception):
            from cuda.pathfinder import load_nvidia_dynamic_lib  # noqa: PLC0415
            path = load_nvidia_dynamic_lib("cublas").abs_path
    if path is None:
        path = ctypes.util.find_library("cublas")
    if path is None:
        raise RuntimeError("libcublas was not found")
    return ctypes.CDLL(path)


class CublasGemm:
    """Row-major GEMMs ``out = a @ w`` / ``out = a @ w.T`` on the current CuPy stream.

    One cuBLAS handle (per device) with a 32 MiB user workspace, so that the
    calls can be captured into CUDA graphs.  ``cublasGemmEx`` with fp32
    accumulation (``CUBLAS_COMPUTE_32F``; ``64F`` for float64), the same call
    ``cupy.matmul`` makes for 2-D operands.
    """

    def __init__(self, workspace_bytes: int = _CUBLAS_WORKSPACE_BYTES):
        import ctypes  # noqa: PLC0415

        import cupy as cp  # noqa: PLC0415
        self._ct = ctypes
        lib = _load_libcublas()
        vp, i32 = ctypes.c_void_p, ctypes.c_int
        lib.cublasCreate_v2.argtypes = [ctypes.POINTER(vp)]
        lib.cublasSetStream_v2.argtypes = [vp, vp]
        lib.cublasSetWorkspace_v2.argtypes = [vp, vp, ctypes.c_size_t]
        lib.cublasGemmEx.argtypes = [vp, i32, i32, i32, i32, i32, vp, vp, i32, i32, vp, i32, i32, vp, vp, i32, i32,
                                     i32, i32]
        for fn in (lib.cublasCreate_v2, lib.cublasSetStream_v2, lib.cublasSetWorkspace_v2, lib.cublasGemmEx):
            fn.restype = i32
        self.lib = lib
        self.library_path = lib._name  # noqa: SLF001
        handle = vp()
        self._check(lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
        self.handle = handle
        self.workspace = cp.empty(int(workspace_bytes), dtype=np.uint8)
        self._stream = None
        self._scalars = {"f32": (ctypes.c_float(1.0), ctypes.c_float(0.0)),
                         "f64": (ctypes.c_double(1.0), ctypes.c_double(0.0))}

    @staticmethod
    def _check(status: int, what: str):
        if status != 0:
            raise RuntimeError(f"{what} failed: cuBLAS status {status}")

    def _bind(self):
        import cupy as cp  # noqa: PLC0415
        ptr = cp.cuda.get_current_stream().ptr
        if ptr != self._stream:
            vp = self._ct.c_void_p
            self._check(self.lib.cublasSetStream_v2(self.handle, vp(ptr)), "cublasSetStream")
            # cublasSetStream resets the workspace to the default pool: set ours again
            self._check(self.lib.cublasSetWorkspace_v2(self.handle, vp(self.workspace.data.ptr),
                                                       self._ct.c_size_t(self.workspace.nbytes)),
                        "cublasSetWorkspace")
            self._stream = ptr

    def mm(self, a, w, out, *, transposed: bool):
        """``out[:] = a @ (w.T if transposed else w)``; all C-contiguous, one dtype.

        ``a`` (M, K); ``w`` (N, K) if ``transposed`` else (K, N); ``out`` (M, N).
        """
        m, k = a.shape
        if transposed:
            n = w.shape[0]
            ok = w.shape[1] == k
        else:
            n = w.shape[1]
            ok = w.shape[0] == k
        if not ok or tuple(out.shape) != (m, n):
            raise ValueError(f"gemm shapes do not match: a {a.shape}, w {w.shape} (transposed={transposed}), "
                             f"out {out.shape}")
        if not (a.flags.c_contiguous and w.flags.c_contiguous and out.flags.c_contiguous):
            raise ValueError("gemm operands must be C-contiguous")
        name = np.dtype(a.dtype).name
        if np.dtype(w.dtype).name != name or np.dtype(out.dtype).name != name or name not in _CUDA_DATATYPE:
            raise TypeError(f"gemm dtypes must all be one of {tuple(_CUDA_DATATYPE)}")
        dt = _CUDA_DATATYPE[name]
        one, zero = self._scalars["f64" if name == "float64" else "f32"]
        compute = _CUBLAS_COMPUTE_64F if name == "float64" else _CUBLAS_COMPUTE_32F
        self._bind()
        vp, addr = self._ct.c_void_p, self._ct.addressof
        # column-major view: out^T (n x m) = op(w) (n x k) @ a^T (k x m)
        status = self.lib.cublasGemmEx(
            self.handle, _CUBLAS_OP_T if transposed else _CUBLAS_OP_N, _CUBLAS_OP_N, n, m, k,
            vp(addr(one)), vp(w.data.ptr), dt, k if transposed else n, vp(a.data.ptr), dt, k,
            vp(addr(zero)), vp(out.data.ptr), dt, n, compute, _CUBLAS_GEMM_DEFAULT)
        self._check(status, "cublasGemmEx")
        return out


_CUBLAS: dict = {}


def cublas_gemm() -> CublasGemm:
    """The :class:`CublasGemm` of the current device (created on first use)."""
    import cupy as cp  # noqa: PLC0415
    dev = cp.cuda.Device().id
    g = _CUBLAS.get(dev)
    if g is None:
        g = _CUBLAS[dev] = CublasGemm()
    return g


def _gemm_fn():
    """``(mm, info)``: ``mm(a, w, out, transposed)`` through :class:`CublasGemm`, else ``cupy.matmul``."""
    try:
        g = cublas_gemm()
    except Exception as exc:
        import cupy as cp  # noqa: PLC0415

        def mm(a, w, out, transposed):
            return cp.matmul(a, w.T if transposed else w, out=out)
        return mm, {"gemm": "cupy.matmul", "gemm_note": f"direct cuBLAS unavailable: {_err_str(exc)}"}
    return (lambda a, w, out, transposed: g.mm(a, w, out, transposed=transposed)), \
        {"gemm": "cublasGemmEx (ctypes)", "libcublas": g.library_path}


def _make_dense_cupy(p):
    import cupy as cp  # noqa: PLC0415
    x, wg, wu, wd = p.arrays()
    m, n, d = p.m, p.n, p.d
    z = cp.empty((m, n), dtype=x.dtype)
    u = cp.empty((m, n), dtype=x.dtype)
    h = cp.empty((m, n), dtype=x.dtype)
    y = cp.empty((m, d), dtype=x.dtype)
    mm, info = _gemm_fn()
    if _use_bf16x4(x.dtype, n):
        k = _relu_mul_kernel(False, True)
        ew = (z.view(np.uint64), u.view(np.uint64), h.view(np.uint64))
        info = dict(info, elementwise="bf16x4")
    else:
        k = _relu_mul_kernel(False)
        ew = (z, u, h)
        info = dict(info, elementwise="generic")

    def run():
        mm(x, wg, z, True)
        mm(x, wu, u, True)
        k(*ew)
        mm(h, wd, y, False)
        return y
    run.info = info
    return run


def _make_dense_cupy_cat(p):
    import cupy as cp  # noqa: PLC0415
    x, wg, wu, wd = p.arrays()
    m, n, d = p.m, p.n, p.d
    wcat = cp.concatenate([wg, wu], axis=0)  # (2n, d), once, outside the timed region
    zu = cp.empty((m, 2 * n), dtype=x.dtype)
    h = cp.empty((m, n), dtype=x.dtype)
    y = cp.empty((m, d), dtype=x.dtype)
    mm, info = _gemm_fn()
    small = np.int32(1 if m * 2 * n < 2**31 else 0)
    if _use_bf16x4(x.dtype, n):
        k = _relu_mul_kernel(True, True)
        ew = (zu.view(np.uint64), np.int64(n // 4), small, h.view(np.uint64))
        info = dict(info, elementwise="bf16x4")
    else:
        k = _relu_mul_kernel(True)
        ew = (zu, np.int64(n), small, h)
        info = dict(info, elementwise="generic")

    def run():
        mm(x, wcat, zu, True)
        k(*ew)
        mm(h, wd, y, False)
        return y
    run.info = info
    run.keep = wcat  # the concatenated weight lives as long as the closure
    return run


def _make_dense_cupy_matmul(p):
    """Like dense_cupy but through ``cupy.matmul(..., out=)`` (CuPy refuses graph capture of it)."""
    import cupy as cp  # noqa: PLC0415
    x, wg, wu, wd = p.arrays()
    m, n, d = p.m, p.n, p.d
    z = cp.empty((m, n), dtype=x.dtype)
    u = cp.empty((m, n), dtype=x.dtype)
    h = cp.empty((m, n), dtype=x.dtype)
    y = cp.empty((m, d), dtype=x.dtype)
    wgT, wuT = wg.T, wu.T
    k = _relu_mul_kernel(False)

    def run():
        cp.matmul(x, wgT, out=z)
        cp.matmul(x, wuT, out=u)
        k(z, u, h)
        cp.matmul(h, wd, out=y)
        return y
    run.info = {"gemm": "cupy.matmul"}
    return run


def _gpu_unavailable() -> str | None:
    return None if B.cupy_or_none() is not None else "no CUDA device (CuPy) available"


# ---- PyTorch eager -----------------------------------------------------------
def _torch_cuda():
    try:
        import torch  # noqa: PLC0415
    except Exception:
        return None
    try:
        return torch if torch.cuda.is_available() else None
    except Exception:  # pragma: no cover
        return None


def _torch_unavailable() -> str | None:
    if B.cupy_or_none() is None:
        return "no CUDA device (CuPy) available"
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    if _torch_cuda() is None:
        return "torch has no CUDA device"
    return None


def _make_torch_eager(p):
    torch = _torch_cuda()
    F = torch.nn.functional
    # zero-copy views of the CuPy arrays (DLPack)
    x = torch.from_dlpack(p.x)
    wg = torch.from_dlpack(p.w_gate)
    wu = torch.from_dlpack(p.w_up)
    wd_t = torch.from_dlpack(p.w_down).t()  # (d, n): F.linear(h, wd_t) = h @ w_down

    def run():
        z = F.linear(x, wg)
        u = F.linear(x, wu)
        return F.linear(F.relu(z) * u, wd_t)
    return run


def _capture_torch_graph(run, stream):
    """Capture ``run`` with ``torch.cuda.CUDAGraph``; replays go to torch's current stream."""
    torch = _torch_cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = run()
    state = {"g": g, "y": y}

    def release():
        state.clear()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return CapturedGraph(launch=g.replay, y=y, release=release)


# ---- CPU implementations -------------------------------------------------------
def _host_f32(p):
    cache = getattr(p, "_bench_f32", None)
    if cache is None:
        cache = tuple(np.ascontiguousarray(a.astype(np.float32)) for a in p.arrays())
        p._bench_f32 = cache  # noqa: SLF001
    return cache


def _make_dense_numpy(p):
    x, wg, wu, wd = _host_f32(p)

    def run():
        z = x @ wg.T
        u = x @ wu.T
        np.maximum(z, 0, out=z)
        z *= u
        return z @ wd
    return run


def _reference_gated_ffn():
    mod = importlib.import_module("twell.reference")
    return getattr(mod, "gated_ffn")


def _reference_unavailable() -> str | None:
    try:
        _reference_gated_ffn()
    except Exception as exc:
        return f"twell.reference.gated_ffn is not available ({type(exc).__name__}: {exc})"
    return None


def _make_reference(p):
    fn = _reference_gated_ffn()
    x, wg, wu, wd = _host_f32(p)
    return lambda: _as_y(fn(x, wg, wu, wd))


# ---- twell (sparse; used as soon as twell.ops.gated_ffn exists) --------------------
def _twell_unavailable() -> str | None:
    if B.cupy_or_none() is None:
        return "no CUDA device (CuPy) available"
    try:
        mod = importlib.import_module("twell.ops")
    except Exception as exc:
        return f"twell.ops cannot be imported ({type(exc).__name__}: {exc})"
    if not hasattr(mod, "gated_ffn"):
        return "twell.ops.gated_ffn does not exist yet"
    return None


def _make_twell(p):
    from twell.ops import gated_ffn  # noqa: PLC0415
    x, wg, wu, wd = p.arrays()
    return lambda: _as_y(gated_ffn(x, wg, wu, wd))


def _register_builtins():
    register(Impl("dense_cupy", _make_dense_cupy, backend="cupy", dense=True, available=_gpu_unavailable,
                  description="cuBLAS x@Wg^T, x@Wu^T, fused relu*mul (fp32, one rounding), h@Wd; outputs preallocated"))
    register(Impl("dense_cupy_matmul", _make_dense_cupy_matmul, backend="cupy", dense=True,
                  available=_gpu_unavailable, default=False,
                  description="dense_cupy through cupy.matmul(out=) instead of direct cublasGemmEx (no graph)"))
    register(Impl("dense_cupy_cat", _make_dense_cupy_cat, backend="cupy", dense=True,
                  available=_gpu_unavailable,
                  description="one cuBLAS GEMM against [Wg;Wu] (2n,d), fused relu*mul over both halves, h@Wd"))
    register(Impl("torch_eager", _make_torch_eager, backend="torch", dense=True, capture=_capture_torch_graph,
                  available=_torch_unavailable,
                  description="PyTorch eager F.linear, relu, mul, F.linear on DLPack views of the CuPy arrays"))
    register(Impl("dense_numpy", _make_dense_numpy, backend="numpy", dense=True,
                  description="float32 NumPy matmuls"))
    register(Impl("reference", _make_reference, backend="numpy", dense=False, available=_reference_unavailable,
                  description="twell.reference.gated_ffn on float32 inputs"))
    # ---- sparse implementations: one registration each --------------------------------
    register_sparse("twell", make=_make_twell, available=_twell_unavailable,
                    description="twell.ops.gated_ffn (TwELL kernels)")


_register_builtins()


# =============================================================================
# 3. timers, L2 flush, CUDA graphs
# =============================================================================
@dataclass
class Timing:
    times_ms: list

    def to_dict(self) -> dict:
        t = np.asarray(self.times_ms, dtype=np.float64)
        return {
            "median_ms": float(np.median(t)),
            "p20_ms": float(np.percentile(t, 20)),
            "p80_ms": float(np.percentile(t, 80)),
            "min_ms": float(t.min()),
            "n_repeat": int(t.size),
        }


class L2Flusher:
    """Overwrites a device buffer of 4× the L2 size (an elementwise fill) on the current stream."""

    def __init__(self, l2_bytes: int):
        import cupy as cp  # noqa: PLC0415
        nbytes = max(4 * int(l2_bytes), 64 << 20)
        self.buf = cp.empty(nbytes // 4, dtype=np.int32)
        self._v = np.int32(1)

    def __call__(self):
        self.buf.fill(self._v)  # a non-zero fill is a kernel that writes every line
        self._v = np.int32(3 - int(self._v))


def time_gpu(fn, *, budget_s: float, warmup: int, flush=None, sync_each: bool = True,
             min_repeat: int = MIN_REPEAT, max_repeat: int = MAX_REPEAT) -> Timing:
    """Per-call device times (ms) of ``fn()`` on the current CuPy stream.

    ``sync_each=True``: events around each call and a host sync after it (the
    ``cupyx.profiler.benchmark`` measurement; Python launch gaps count).
    ``sync_each=False``: calls are queued back to back in batches, each between
    its own pair of events (device time only; for graph replays).
    ``flush()`` (optional) runs before each call, outside the events.
    """
    import cupy as cp  # noqa: PLC0415
    stream = cp.cuda.get_current_stream()
    for _ in range(max(0, int(warmup))):
        if flush is not None:
            flush()
        fn()
    stream.synchronize()
    times: list = []
    t0 = time.perf_counter()
    if sync_each:
        ev1, ev2 = cp.cuda.Event(), cp.cuda.Event()
        while len(times) < max_repeat:
            if flush is not None:
                flush()
            ev1.record(stream)
            fn()
            ev2.record(stream)
            ev2.synchronize()
            times.append(cp.cuda.get_elapsed_time(ev1, ev2))
            if len(times) >= min_repeat and time.perf_counter() - t0 > budget_s:
                break
        return Timing(times)
    starts = [cp.cuda.Event() for _ in range(_GRAPH_BATCH)]
    ends = [cp.cuda.Event() for _ in range(_GRAPH_BATCH)]
    while len(times) < max_repeat:
        k = min(_GRAPH_BATCH, max_repeat - len(times))
        for i in range(k):
            if flush is not None:
                flush()
            starts[i].record(stream)
            fn()
            ends[i].record(stream)
        ends[k - 1].synchronize()
        times.extend(cp.cuda.get_elapsed_time(starts[i], ends[i]) for i in range(k))
        if len(times) >= min_repeat and time.perf_counter() - t0 > budget_s:
            break
    return Timing(times)


def time_cpu(fn, *, budget_s: float, warmup: int = 1, min_repeat: int = 3, max_repeat: int = 50) -> Timing:
    """Host timings (ms) of ``fn()`` with ``time.perf_counter``.

    The first call is a warm-up (``warmup >= 1``) unless it alone takes more
    than the budget, in which case it is the only sample.  Then at least
    ``min_repeat`` samples while within twice the budget, more until the budget
    is spent.
    """
    t = time.perf_counter()
    fn()
    first = (time.perf_counter() - t) * 1e3
    if warmup <= 0 or first > budget_s * 1e3:
        times = [first]
        if first > budget_s * 1e3:
            return Timing(times)
    else:
        times = []
    for _ in range(max(0, warmup - 1)):
        fn()
    t0 = time.perf_counter()
    while len(times) < max_repeat:
        t = time.perf_counter()
        fn()
        now = time.perf_counter()
        times.append((now - t) * 1e3)
        spent = now - t0
        if spent > 2 * budget_s or (len(times) >= min_repeat and spent > budget_s):
            break
    return Timing(times)


@dataclass
class CapturedGraph:
    """A captured call: ``launch()`` replays it on the current stream, ``y`` is its output."""

    launch: Callable
    y: object
    release: Callable


def capture_cupy_graph(run, stream) -> CapturedGraph:
    """Capture ``run()`` on ``stream`` (non-blocking) into a CUDA graph.

    ``run`` is called once on ``stream`` first (lazy initialisation, kernel
    compilation).  Allocations made during the capture come from a private
    ``cupy.cuda.MemoryPool`` that stays alive with the graph, so the replayed
    kernels never write into memory handed to someone else.
    """
    import cupy as cp  # noqa: PLC0415
    pool = cp.cuda.MemoryPool()
    with stream:
        run()
        stream.synchronize()
        with cp.cuda.using_allocator(pool.malloc):
            stream.begin_capture()
            try:
                y = run()
            except BaseException:
                with contextlib.suppress(Exception):
                    stream.end_capture()
                raise
            graph = stream.end_capture()
    state = {"graph": graph, "y": y, "pool": pool}

    def launch():
        graph.launch(stream)

    def release():
        stream.synchronize()
        state.clear()
        pool.free_all_blocks()

    return CapturedGraph(launch=launch, y=y, release=release)


# =============================================================================
# 4. problems, check, driver
# =============================================================================
@dataclass
class BenchConfig:
    """Everything ``run_bench`` needs (built from the command line by :func:`config_from_args`)."""

    d: int = 2048
    n: int = 5632
    ms: tuple = ()
    kinds: tuple = ("uniform",)
    means: tuple = (29.0,)
    dtype: str = "bfloat16"
    seed: int = 0
    sweep: bool = False
    sweep_m: int | None = None
    sweep_means: tuple = SWEEP_MEANS
    skew_sigma: float | None = None
    dead_fraction: float = 0.3
    calibrate: str | None = None
    check: bool = False
    check_rows: int = 256
    budget_s: float = 0.5
    warmup: int = 3
    graphs: bool = True
    flush_l2: str = "auto"
    impls: tuple | None = None
    backend: str = "auto"
    describe_rows: int | None = None


@dataclass
class Case:
    kind: str
    m: int
    mean: float
    sweep: bool = False

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.mean:g}"


def plan_cases(cfg: BenchConfig, gpu: bool) -> tuple[list, list]:
    """Return ``(cases, notes)``."""
    notes = []
    cases = []
    if cfg.sweep:
        m = cfg.sweep_m or (GPU_DEFAULT_SWEEP_M if gpu else CPU_DEFAULT_SWEEP_M)
        for kind in cfg.kinds:
            for mean in cfg.sweep_means:
                if not 0 < mean < cfg.n:
                    notes.append(f"sweep mean {mean:g} skipped: not in (0, n={cfg.n})")
                    continue
                cases.append(Case(kind, m, float(mean), sweep=True))
    else:
        ms = cfg.ms or (GPU_DEFAULT_M if gpu else CPU_DEFAULT_M)
        for m in ms:
            for kind in cfg.kinds:
                for mean in cfg.means:
                    cases.append(Case(kind, int(m), float(mean)))
    return cases, notes


def _problem_kwargs(cfg: BenchConfig, kind: str) -> dict:
    kw = {}
    if kind in ("token_skew", "neuron_skew") and cfg.skew_sigma is not None:
        kw["skew_sigma"] = cfg.skew_sigma
    if kind == "neuron_skew":
        kw["dead_fraction"] = cfg.dead_fraction
    if kind == "token_skew" and cfg.calibrate is not None:
        kw["calibrate"] = cfg.calibrate
    return kw


def _to_host(a):
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "get"):
        return a.get()
    import cupy as cp  # noqa: PLC0415 - foreign (torch) device tensors through DLPack
    return cp.from_dlpack(a).get()


def _rows_f64(y, rows: int) -> np.ndarray:
    y = _as_y(y)
    part = y[:rows]
    if not isinstance(part, np.ndarray) and not hasattr(part, "get") and hasattr(part, "contiguous"):
        part = part.contiguous()
    return np.asarray(_to_host(part)).astype(np.float64)


def reference_rows(problem, rows: int) -> tuple[np.ndarray, str]:
    """float64 ``y`` of the first ``rows`` tokens on the host, and the reference's name."""
    x = _to_host(problem.x[:rows]).astype(np.float64)
    wg, wu, wd = (_to_host(a).astype(np.float64) for a in (problem.w_gate, problem.w_up, problem.w_down))
    try:
        fn = getattr(importlib.import_module("twell.reference"), "gated_ffn_dense")
    except Exception as exc:
        fn, source = None, f"local float64 formula (twell.reference.gated_ffn_dense unavailable: {type(exc).__name__})"
    else:
        source = "twell.reference.gated_ffn_dense (float64)"
    if fn is not None:
        return np.asarray(_as_y(fn(x, wg, wu, wd)), dtype=np.float64), source
    z = x @ wg.T
    u = x @ wu.T
    return (np.maximum(z, 0.0) * u) @ wd, source


def rel_error(y: np.ndarray, ref: np.ndarray) -> float:
    """||y - ref|| / ||ref|| (inf when y has a non-finite value or the shapes differ)."""
    if y.shape != ref.shape or not np.all(np.isfinite(y)):
        return float("inf")
    den = float(np.linalg.norm(ref))
    num = float(np.linalg.norm(y - ref))
    return num / den if den > 0 else num


def _err_str(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300]


def _select_impls(cfg: BenchConfig, gpu: bool) -> tuple[list, list]:
    """Implementations to run on this path, and notes about the ones left out."""
    want = ("cupy", "torch") if gpu else ("numpy",)
    chosen, notes = [], []
    names = list(IMPLS)
    if cfg.impls:
        unknown = [n for n in cfg.impls if n not in IMPLS]
        if unknown:
            raise ValueError(f"unknown implementation(s) {unknown}; registered: {names}")
        names = [n for n in names if n in cfg.impls]
    else:
        names = [n for n in names if IMPLS[n].default]
    for name in names:
        impl = IMPLS[name]
        if impl.backend not in want:
            continue
        reason = impl.available()
        if reason:
            notes.append(f"{name}: skipped ({reason})")
            continue
        chosen.append(impl)
    return chosen, notes


def _free_gpu_memory():
    gc.collect()
    cp = B.cupy_or_none()
    if cp is None:
        return
    with contextlib.suppress(Exception):
        cp.cuda.get_current_stream().synchronize()
        cp.get_default_memory_pool().free_all_blocks()
    torch = sys.modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()


def _summarise_dense(impl_results: dict) -> dict:
    def best(mode, names=None):
        cand = []
        for name, r in impl_results.items():
            if not r.get("dense") or (names is not None and name not in names):
                continue
            if r.get("check_ok") is False:
                continue
            t = r.get(mode)
            if t:
                cand.append((t["median_ms"], name))
        return min(cand) if cand else (None, None)

    cupy_names = {n for n, r in impl_results.items() if r.get("backend") == "cupy" and r.get("dense")}
    cb_ms, cb = best("eager", cupy_names)
    b_ms, b = best("eager")
    g_ms, g = best("graph")
    return {"cupy_best": cb, "cupy_best_ms": cb_ms, "best": b, "best_ms": b_ms,
            "best_graph": g, "best_graph_ms": g_ms}


def _add_speedups(impl_results: dict, dense: dict):
    for r in impl_results.values():
        e, g = r.get("eager"), r.get("graph")
        r["speedup"] = (dense["best_ms"] / e["median_ms"]) if (e and dense["best_ms"]) else None
        r["speedup_graph"] = (dense["best_graph_ms"] / g["median_ms"]) if (g and dense["best_graph_ms"]) else None


def _run_one_gpu(impl: Impl, problem, cfg: BenchConfig, ref, tol, flush, stream) -> dict:
    r: dict = {"backend": impl.backend, "dense": impl.dense, "eager": None, "graph": None,
               "rel_err": None, "check_ok": None}
    run = None
    try:
        run = impl.make(problem)
        if isinstance(getattr(run, "info", None), dict):
            r.update(run.info)
        y = run()
        stream.synchronize()
        if ref is not None:
            r["rel_err"] = rel_error(_rows_f64(y, ref.shape[0]), ref)
            r["check_ok"] = bool(r["rel_err"] <= tol)
        del y
        r["eager"] = time_gpu(run, budget_s=cfg.budget_s, warmup=cfg.warmup, flush=flush).to_dict()
        if cfg.graphs:
            cap = None
            try:
                cap = (impl.capture or capture_cupy_graph)(run, stream)
                cap.launch()
                stream.synchronize()
                if ref is not None:
                    r["graph_rel_err"] = rel_error(_rows_f64(cap.y, ref.shape[0]), ref)
                r["graph"] = time_gpu(cap.launch, budget_s=cfg.budget_s, warmup=cfg.warmup, flush=flush,
                                      sync_each=False).to_dict()
            except Exception as exc:
                r["graph"] = None
                r["graph_error"] = _err_str(exc)
            finally:
                if cap is not None:
                    with contextlib.suppress(Exception):
                        cap.release()
    except Exception as exc:
        r["error"] = _err_str(exc)
    finally:
        run = None
        _free_gpu_memory()
    return r


def _run_one_cpu(impl: Impl, problem, cfg: BenchConfig, ref, tol) -> dict:
    r: dict = {"backend": impl.backend, "dense": impl.dense, "eager": None, "graph": None,
               "graph_error": "no GPU", "rel_err": None, "check_ok": None}
    try:
        run = impl.make(problem)
        y = run()
        if ref is not None:
            r["rel_err"] = rel_error(_rows_f64(y, ref.shape[0]), ref)
            r["check_ok"] = bool(r["rel_err"] <= max(tol, CHECK_TOLERANCE["float32"]))
        del y
        r["eager"] = time_cpu(run, budget_s=cfg.budget_s, warmup=1).to_dict()
    except Exception as exc:
        r["error"] = _err_str(exc)
    return r


def run_bench(cfg: BenchConfig, *, log=None, command: list | None = None) -> dict:
    """Run every case of ``cfg``; return the results dict (see ``write_json``)."""
    log = log or (lambda s: None)
    cp = B.cupy_or_none()
    if cfg.backend == "gpu" and cp is None:
        raise RuntimeError("--backend gpu was requested but CuPy with a CUDA device is not available")
    gpu = cp is not None and cfg.backend != "cpu"
    impls, impl_notes = _select_impls(cfg, gpu)
    cases, case_notes = plan_cases(cfg, gpu)
    env = environment_info()
    results = {
        "schema": JSON_SCHEMA,
        "meta": {
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(command if command is not None else [sys.executable, *sys.argv]),
            "git_revision": git_revision(),
            "backend": "gpu" if gpu else "cpu",
            "device": (env["devices"][0] if gpu and env["devices"] else None),
            "environment": env,
            "timer": ("CUDA events around each call on the bench stream; eager: host sync after each call "
                      "(cupyx.profiler.benchmark semantics); graph: replays queued back to back"
                      if gpu else "time.perf_counter around each call (median of repeats)"),
        },
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
        "impls": {i.name: {"backend": i.backend, "dense": i.dense, "description": i.description} for i in impls},
        "notes": impl_notes + case_notes,
        "cases": [],
    }
    for note in results["notes"]:
        log(f"note: {note}")
    if gpu:
        torch = _torch_cuda() if any(i.backend == "torch" for i in impls) else None
        if torch is not None:
            results["meta"]["torch_cuda"] = torch.version.cuda
        stream = cp.cuda.Stream(non_blocking=True)
        with contextlib.ExitStack() as stack:
            stack.enter_context(stream)
            if torch is not None:
                ext = torch.cuda.ExternalStream(stream.ptr)
                stack.enter_context(torch.cuda.stream(ext))
            l2 = (env["devices"][0]["l2_bytes"] if env["devices"] else 0) or (50 << 20)
            flusher = None
            for case in cases:
                flush_on = cfg.flush_l2 == "on" or (cfg.flush_l2 == "auto" and case.m <= FLUSH_AUTO_MAX_M)
                if flush_on and flusher is None:
                    flusher = L2Flusher(l2)
                results["cases"].append(_run_case(case, cfg, impls, gpu=True, stream=stream,
                                                  flush=flusher if flush_on else None, log=log))
            flusher = None
            _free_gpu_memory()
    else:
        for case in cases:
            results["cases"].append(_run_case(case, cfg, impls, gpu=False, log=log))
    return results


def _run_case(case: Case, cfg: BenchConfig, impls: list, *, gpu: bool, stream=None, flush=None, log) -> dict:
    out: dict = {"name": case.name, "kind": case.kind, "m": case.m, "d": cfg.d, "n": cfg.n, "dtype": cfg.dtype,
                 "mean_active_target": case.mean, "sweep": case.sweep, "seed": cfg.seed,
                 "flush_l2": flush is not None, "impls": {}}
    t_case = time.perf_counter()
    problem = None
    try:
        problem = synthetic.make_problem(case.m, cfg.d, cfg.n, mean_active=case.mean, kind=case.kind,
                                         dtype=cfg.dtype, seed=cfg.seed, xp=B.cupy_or_none() if gpu else np,
                                         **_problem_kwargs(cfg, case.kind))
        out["problem"] = problem.params
        rows = cfg.describe_rows
        if rows is None and not gpu:
            rows = 4096
        out["realised"] = synthetic.describe(problem, max_rows=rows)
        ref = None
        if cfg.check:
            ref, source = reference_rows(problem, min(cfg.check_rows, case.m))
            out["check"] = {"rows": int(ref.shape[0]), "reference": source,
                            "tolerance": CHECK_TOLERANCE[cfg.dtype]}
        tol = CHECK_TOLERANCE[cfg.dtype]
        for impl in impls:
            if gpu:
                r = _run_one_gpu(impl, problem, cfg, ref, tol, flush, stream)
            else:
                r = _run_one_cpu(impl, problem, cfg, ref, tol)
            out["impls"][impl.name] = r
        dense = _summarise_dense(out["impls"])
        _add_speedups(out["impls"], dense)
        out["dense"] = dense
    except Exception as exc:
        out["error"] = _err_str(exc)
    finally:
        problem = None
        if gpu:
            _free_gpu_memory()
    out["seconds"] = time.perf_counter() - t_case
    log(format_table({"cases": [out]}, header=False))
    return out


# =============================================================================
# 5. output
# =============================================================================
_COLS = [("case", 22, "<"), ("M", 7, ">"), ("mean", 6, ">"), ("p99", 6, ">"), ("max", 6, ">"),
         ("impl", 16, "<"), ("median ms", 10, ">"), ("p20", 9, ">"), ("p80", 9, ">"),
         ("graph ms", 9, ">"), ("speedup", 8, ">"), ("spd graph", 9, ">"), ("rel err", 9, ">")]


def _fmt_row(values) -> str:
    return "  ".join(f"{str(v):{a}{w}}" for v, (_, w, a) in zip(values, _COLS)).rstrip()


def _f(v, fmt):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def table_header() -> str:
    head = _fmt_row([c for c, _, _ in _COLS])
    return head + "\n" + "-" * len(head)


def format_table(results: dict, *, header: bool = True) -> str:
    """Fixed-width table of a results dict (all cases, all implementations)."""
    lines = [table_header()] if header else []
    for case in results.get("cases", []):
        real = (case.get("realised") or {}).get("token", {})
        base = [case["name"], case["m"], _f(real.get("mean"), ".1f"), _f(real.get("p99"), ".0f"),
                _f(real.get("max"), "d") if real.get("max") is not None else "-"]
        if case.get("error"):
            lines.append(_fmt_row(base + ["ERROR: " + case["error"]]))
            continue
        dense = case.get("dense") or {}
        for name, r in case.get("impls", {}).items():
            label = name + ("*" if name == dense.get("best") else "")
            if r.get("error"):
                lines.append(_fmt_row(base + [label, "ERROR: " + r["error"]]))
                continue
            e, g = r.get("eager") or {}, r.get("graph") or {}
            err = _f(r.get("rel_err"), ".2e")
            if r.get("check_ok") is False:
                err += " FAIL"
            lines.append(_fmt_row(base + [
                label, _f(e.get("median_ms"), ".4f"), _f(e.get("p20_ms"), ".4f"), _f(e.get("p80_ms"), ".4f"),
                _f(g.get("median_ms"), ".4f"), _f(r.get("speedup"), ".2f"), _f(r.get("speedup_graph"), ".2f"),
                err]))
    return "\n".join(lines)


def _json_clean(obj):
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return _json_clean(obj.tolist())
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def write_json(results: dict, path) -> None:
    """Write ``results`` as strict JSON (non-finite floats become null)."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_json_clean(results), f, indent=1, allow_nan=False)
        f.write("\n")


def plot_results(results, out_path) -> Path:
    """Speedup vs realised mean active neurons per token, one line per implementation and mode.

    ``results`` is a results dict or the path of a bench JSON.  Uses the sweep
    cases if there are any, else every case.  Needs matplotlib.
    """
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as exc:
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib (or twell[plot])") from exc
    if not isinstance(results, dict):
        with open(results) as f:
            results = json.load(f)
    cases = [c for c in results.get("cases", []) if c.get("sweep")] or list(results.get("cases", []))
    series: dict = {}
    for c in cases:
        real = (c.get("realised") or {}).get("token", {}).get("mean")
        if real is None:
            continue
        for name, r in (c.get("impls") or {}).items():
            for mode, key in (("eager", "speedup"), ("graph", "speedup_graph")):
                s = r.get(key)
                if s is not None:
                    series.setdefault((name, mode, c["kind"], c["m"]), []).append((real, s))
    if not series:
        raise ValueError("no speedups to plot in these results (no case has timings)")
    fig, ax = plt.subplots(figsize=(8, 5))
    for (name, mode, kind, m), pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="-" if mode == "eager" else "--",
                label=f"{name} ({mode}) {kind} M={m}")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("realised mean active neurons per token")
    ax.set_ylabel("speedup vs fastest dense")
    dev = (results.get("meta") or {}).get("device") or {}
    ax.set_title(f"twell bench — {dev.get('name', results.get('meta', {}).get('backend', ''))}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


# =============================================================================
# 6. command line
# =============================================================================
def _int_list(text: str) -> tuple:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return vals


def _float_list(text: str) -> tuple:
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(not math.isfinite(v) or v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers > 0, got {text!r}")
    return vals


def _kind_list(text: str) -> tuple:
    vals = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in vals if v not in synthetic.KINDS]
    if not vals or bad:
        raise argparse.ArgumentTypeError(f"kinds must be from {', '.join(synthetic.KINDS)}; got {text!r}")
    return vals


def _name_list(text: str) -> tuple:
    vals = tuple(v.strip() for v in text.split(",") if v.strip())
    if not vals:
        raise argparse.ArgumentTypeError("expected comma-separated implementation names")
    return vals


def _pos_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def _pos_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--d", type=_pos_int, default=2048, help="d_model (default 2048)")
    p.add_argument("--n", type=_pos_int, default=5632, help="d_ff (default 5632)")
    p.add_argument("--m", type=_int_list, default=None, metavar="M[,M...]",
                   help=f"tokens per case (default GPU {','.join(map(str, GPU_DEFAULT_M))}; "
                        f"CPU {','.join(map(str, CPU_DEFAULT_M))})")
    p.add_argument("--kind", type=_kind_list, default=None, metavar="KIND[,KIND...]",
                   help=f"problem kinds from {', '.join(synthetic.KINDS)} (default uniform)")
    p.add_argument("--mean", type=_float_list, default=(29.0,), metavar="A[,A...]",
                   help="target active neurons per token (median for token_skew; default 29)")
    p.add_argument("--dtype", choices=B.FLOAT_DTYPE_NAMES, default="bfloat16")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--sweep", action="store_true",
                   help=f"sweep the mean over {','.join(map(str, SWEEP_MEANS))} at one M (--sweep-m) "
                        "on uniform (or --kind)")
    p.add_argument("--sweep-m", type=_pos_int, default=None,
                   help=f"M of the sweep (default GPU {GPU_DEFAULT_SWEEP_M}, CPU {CPU_DEFAULT_SWEEP_M})")
    p.add_argument("--sweep-means", type=_float_list, default=None, metavar="A[,A...]",
                   help="override the sweep's list of means")
    p.add_argument("--skew-sigma", type=float, default=None,
                   help="token_skew: per-token lognormal sigma (default 0.13); neuron_skew: per-neuron log-rate "
                        "sigma (default 1.5)")
    p.add_argument("--dead-fraction", type=float, default=0.3, help="neuron_skew: share of dead neurons (0.3)")
    p.add_argument("--calibrate", choices=("median", "mean"), default=None,
                   help="token_skew: make the median (default) or the mean count equal --mean")
    p.add_argument("--check", action="store_true",
                   help="compare every implementation with the float64 reference on the first --check-rows rows")
    p.add_argument("--check-rows", type=_pos_int, default=256)
    p.add_argument("--budget", type=_pos_float, default=0.5, metavar="SECONDS",
                   help="time budget of each timing (eager and graph separately; default 0.5 s)")
    p.add_argument("--warmup", type=_nonneg_int, default=3, help="untimed calls before timing (default 3)")
    p.add_argument("--no-graph", action="store_true", help="skip CUDA-graph timing")
    p.add_argument("--flush-l2", choices=("auto", "on", "off"), default="auto",
                   help=f"flush L2 before each timed call (auto: M <= {FLUSH_AUTO_MAX_M})")
    p.add_argument("--impl", type=_name_list, default=None, metavar="NAME[,NAME...]",
                   help=f"only these implementations (registered: {', '.join(IMPLS)})")
    p.add_argument("--backend", choices=("auto", "gpu", "cpu"), default="auto",
                   help="auto: GPU when CuPy sees a device, else CPU")
    p.add_argument("--describe-rows", type=_pos_int, default=None,
                   help="rows used for the realised statistics (default: all on GPU, 4096 on CPU)")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write results as JSON")
    p.add_argument("--plot", dest="plot_path", default=None, metavar="PATH",
                   help="plot speedup vs realised mean active (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="print only the final table")


def config_from_args(args, parser: argparse.ArgumentParser) -> BenchConfig:
    """Validate the parsed arguments together; ``parser.error`` (exit 2) on a bad combination."""
    n = args.n
    if args.d < 2:
        parser.error("--d must be >= 2 (column 0 of x is the bias input)")
    for mean in args.mean:
        if not 0 < mean < n:
            parser.error(f"--mean {mean:g} must be in (0, n={n})")
    if args.sweep_means is not None:
        for mean in args.sweep_means:
            if not 0 < mean < n:
                parser.error(f"--sweep-means {mean:g} must be in (0, n={n})")
    if args.skew_sigma is not None and (not math.isfinite(args.skew_sigma) or args.skew_sigma < 0):
        parser.error(f"--skew-sigma must be >= 0, got {args.skew_sigma}")
    if not 0 <= args.dead_fraction < 1:
        parser.error(f"--dead-fraction must be in [0, 1), got {args.dead_fraction}")
    if args.impl:
        unknown = [x for x in args.impl if x not in IMPLS]
        if unknown:
            parser.error(f"--impl: unknown implementation(s) {', '.join(unknown)}; registered: {', '.join(IMPLS)}")
    if args.sweep and args.m is not None:
        parser.error("--m and --sweep exclude each other (use --sweep-m)")
    if args.plot_path is not None and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib: pip install matplotlib (or twell[plot])")
    return BenchConfig(
        d=args.d, n=n, ms=tuple(args.m or ()), kinds=tuple(args.kind or ("uniform",)), means=tuple(args.mean),
        dtype=args.dtype, seed=args.seed, sweep=args.sweep, sweep_m=args.sweep_m,
        sweep_means=tuple(args.sweep_means or SWEEP_MEANS), skew_sigma=args.skew_sigma,
        dead_fraction=args.dead_fraction, calibrate=args.calibrate, check=args.check, check_rows=args.check_rows,
        budget_s=args.budget, warmup=args.warmup, graphs=not args.no_graph, flush_l2=args.flush_l2,
        impls=tuple(args.impl) if args.impl else None, backend=args.backend, describe_rows=args.describe_rows,
    )


def bench_main(args, parser: argparse.ArgumentParser, argv: list | None = None) -> int:
    cfg = config_from_args(args, parser)
    if args.json_path:
        parent = Path(args.json_path).resolve().parent
        if not parent.is_dir():
            parser.error(f"--json: directory {parent} does not exist")
    quiet = args.quiet

    def log(s):
        if not quiet:
            print(s, flush=True)

    if not quiet:
        print(table_header(), flush=True)
    command = [sys.executable, "-m", "twell", *(argv if argv is not None else sys.argv[1:])]
    try:
        results = run_bench(cfg, log=log, command=command)
    except (RuntimeError, ValueError) as exc:
        print(f"twell bench: error: {exc}", file=sys.stderr)
        return 1
    if quiet:
        print(format_table(results))
    failed = [(c["name"], c["m"], name) for c in results["cases"] for name, r in c.get("impls", {}).items()
              if r.get("check_ok") is False]
    errors = [(c["name"], c["m"], c["error"]) for c in results["cases"] if c.get("error")]
    errors += [(c["name"], c["m"], f"{name}: {r['error']}") for c in results["cases"]
               for name, r in c.get("impls", {}).items() if r.get("error")]
    for note in results["notes"]:
        if quiet:
            print(f"note: {note}")
    if failed:
        print(f"CHECK FAILED: {', '.join(f'{n} ({c}, M={m})' for c, m, n in failed)}", file=sys.stderr)
    if errors:
        for name, m, err in errors:
            print(f"ERROR {name} M={m}: {err}", file=sys.stderr)
    if args.json_path:
        write_json(results, args.json_path)
        print(f"wrote {args.json_path}")
    if args.plot_path:
        try:
            plot_results(results, args.plot_path)
            print(f"wrote {args.plot_path}")
        except (RuntimeError, ValueError) as exc:
            print(f"twell bench: plot: {exc}", file=sys.stderr)
            return 1
    return 1 if (failed or errors) else 0
