"""Benchmark framework: ``python -m twell bench``.

Layout of this module
---------------------
1. environment / metadata (:func:`environment_info`, also behind ``python -m twell info``)
2. implementations registry (:data:`IMPLS`, :func:`register`, :func:`register_sparse`,
   :func:`register_train`) and the built-in implementations: dense CuPy (cuBLAS
   + one fused elementwise kernel, two variants), PyTorch eager, dense NumPy and
   the NumPy reference; training steps (dense CuPy, PyTorch autograd, twell,
   dense NumPy, the NumPy reference)
3. timers (CUDA events; host clock on the CPU), L2 flushing, CUDA-graph capture
4. problems, correctness checks, training runners (peak memory), the case
   driver (:func:`run_bench`)
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

A training step (``--mode train``) registers with :func:`register_train`:
``make(tp)`` gets a :class:`TrainProblem` (the problem plus ``dy`` and
``l1_weight``) and returns ``run`` with ``run() -> (y, dx, dw_gate, dw_up,
dw_down)``, optionally ``run.forward()`` (the forward alone) and
``run.extra()`` (a dict for the results: saved-state size, statistics).

Training benchmark (``--mode train`` or ``both``)
-------------------------------------------------
Per case (same problem generation; default M 16384 on the GPU, 256 on the CPU;
``--sweep`` works too) one full step with a fixed ``dy`` (standard normal,
drawn once per case by :func:`make_dy`) and ``--l1-weight`` λ:

* ``dense_cupy_train``: forward as ``dense_cupy``; backward ``dh = dy Wdᵀ``,
  ONE fused elementwise kernel for ``du = dt ⊙ relu(z)`` and ``dz = dt ⊙ u ⊙
  [z > 0]`` with ``dt = dh + (λ/M) sign(h)`` (fp32 math, each output rounded
  once, bf16 four-per-thread on ``uint64`` views; written in place over ``dh``
  and ``z``), ``dx = du Wu`` then ``dx += dz Wg`` (cuBLAS beta = 1), ``dWu =
  duᵀ x``, ``dWg = dzᵀ x``, ``dWd = hᵀ dy``: 9 GEMMs through
  :class:`CublasGemm` (graph-capturable), every buffer preallocated.
* ``torch_autograd``: ``F.linear``/``relu``/``*``/``@`` on DLPack views with
  leaf weights, ``torch.autograd.grad`` for x and the three weights; λ > 0 adds
  ``(λ/M) sign(h)`` through a small ``autograd.Function`` on ``h``.
* ``twell_train``: ``twell.gated_ffn_forward`` + ``twell.gated_ffn_backward``.
  Its forward reads the batch's counts back to the host once, so it has no
  graph time (``graph_error`` says why).
* CPU: ``dense_numpy_train`` (float32, :func:`dense_train_math`) and
  ``reference_train`` (``twell.ops`` on float32 NumPy arrays, i.e.
  :mod:`twell.reference`).

Each is timed (eager and graph as above; "fwd ms": the forward alone, eager);
speedups are against the fastest dense of each timing.  ``peak_bytes``: device
memory of make() plus one step beyond the inputs (see
:data:`PEAK_MEMORY_METHOD`).  twell reports ``saved_mib``
(``SavedForBackward.nbytes``) and ``stats`` (nnz, l0, l1, backup rows).
``--check`` compares all five outputs over the whole batch with
:func:`dense_train_math` in float64 (CuPy float64 GEMMs on the GPU, a few
GB of temporaries at M = 16384): dense implementations must be within
:data:`CHECK_TOLERANCE`, others within 2 × the best dense error of each output
+ half an ulp (:data:`TRAIN_CHECK_RULE`).  Results go to ``results["train"]``
(``method``, ``impls``, ``cases``).

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
Each implementation is timed three times (training steps: eager and graph):

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
* **queued** (inference): eager calls queued back to back, each between its own
  pair of events, no host synchronisation between calls -- the steady state of
  a loop over layers, where Python prepares the next call while the GPU runs
  this one.  twell's own per-call read-back of the routed-row count is inside
  each call, so it is paid here too.  ``spd queued`` divides the faster of the
  dense queued and dense graph times by the impl's queued time.

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
    "register_train",
    "unregister",
    "TrainProblem",
    "make_dy",
    "dense_train_math",
    "train_reference",
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
    "GPU_DEFAULT_TRAIN_M",
    "CPU_DEFAULT_TRAIN_M",
    "TRAIN_OUTPUTS",
    "SWEEP_MEANS",
    "CHECK_TOLERANCE",
]

GPU_DEFAULT_M = (1, 8, 64, 16384, 131072)
CPU_DEFAULT_M = (256, 2048)
GPU_DEFAULT_SWEEP_M = 16384
#: default M of the training cases (--mode train|both without --m); the paper's micro-batch per GPU.
GPU_DEFAULT_TRAIN_M = (16384,)
CPU_DEFAULT_TRAIN_M = (256,)
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

    ``task="train"``: a training step instead (``--mode train``).  ``make`` then
    gets a :class:`TrainProblem` and ``run()`` returns ``(y, dx, dw_gate, dw_up,
    dw_down)``; optional attributes: ``run.forward()`` (the forward alone, timed
    as "fwd ms") and ``run.extra()`` (a dict merged into the results after the
    first, untimed call: saved-state size, sparsity statistics).
    """

    name: str
    make: Callable
    backend: str = "cupy"
    dense: bool = False
    capture: Callable | None = None
    available: Callable[[], str | None] = field(default=lambda: None)
    description: str = ""
    default: bool = True  #: run unless --impl names a selection
    task: str = "infer"  #: "infer" (y = FFN(x)) or "train" (one fwd+bwd step)


#: name -> Impl, in registration order (the table follows it).
IMPLS: dict[str, Impl] = {}
#: what an implementation times: the inference FFN or one training step.
TASKS = ("infer", "train")


def register(impl: Impl, *, replace: bool = True) -> Impl:
    """Add ``impl`` to :data:`IMPLS` (replacing one of the same name)."""
    if not isinstance(impl, Impl):
        raise TypeError(f"impl must be an Impl, got {type(impl).__name__}")
    if impl.backend not in ("cupy", "torch", "numpy"):
        raise ValueError(f"impl.backend must be 'cupy', 'torch' or 'numpy', got {impl.backend!r}")
    if impl.task not in TASKS:
        raise ValueError(f"impl.task must be one of {TASKS}, got {impl.task!r}")
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


def register_train(name: str, make: Callable, *, dense: bool = False, backend: str = "cupy",
                   capture: Callable | None = None, available: Callable[[], str | None] | None = None,
                   description: str = "") -> Impl:
    """Register a training step: ``make(train_problem) -> run`` with ``run() -> (y, dx, dw_gate, dw_up, dw_down)``.

    See :class:`Impl` (``task="train"``) for the optional ``run.forward`` / ``run.extra``.
    """
    return register(Impl(name=name, make=make, backend=backend, dense=dense, capture=capture,
                         available=available or (lambda: None), description=description, task="train"))


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

# Backward of h = relu(z) * u with the L1 term: dt = dh + s * sign(h) (s = λ/M), du = dt * relu(z),
# dz = dt * u * (z > 0); fp32 math (fp64 for float64), each output rounded once.  Inputs are read into
# registers before the outputs are written, so du may alias dh and dz may alias z (the dense training
# baseline writes them in place: CuPy passes an input that *is* an output array without copying it).
_RELU_MUL_BWD_OP = r"""
typedef twell_bench_acc<T>::type A;
const A zz = (A)z;
const A uu = (A)u;
A dt = (A)dh;
A gu = (A)0, gz = (A)0;
if (zz > (A)0) {
    if (s != 0) {
        const A hh = zz * uu;
        dt += hh > (A)0 ? (A)s : (hh < (A)0 ? -(A)s : (A)0);
    }
    gu = dt * zz;
    gz = dt * uu;
}
du = (T)gu;
dz = (T)gz;
"""

_BF16X4_BWD_PREAMBLE = _BF16X4_PREAMBLE + r"""
__device__ __forceinline__ float twell_bench_bf(unsigned long long v, int k) {
    return __uint_as_float((unsigned int)((v >> (16 * k)) & 0xffffull) << 16);
}
__device__ __forceinline__ void twell_bench_relu_mul_bwd4(unsigned long long dhv, unsigned long long zv,
                                                          unsigned long long uv, float s,
                                                          unsigned long long &du, unsigned long long &dz) {
    unsigned long long a = 0, b = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const float zf = twell_bench_bf(zv, k);
        const float uf = twell_bench_bf(uv, k);
        float dt = twell_bench_bf(dhv, k), gu = 0.f, gz = 0.f;
        if (zf > 0.f) {
            if (s != 0.f) {
                const float hh = zf * uf;
                dt += hh > 0.f ? s : (hh < 0.f ? -s : 0.f);
            }
            gu = dt * zf;
            gz = dt * uf;
        }
        a |= twell_bench_f2bf(gu) << (16 * k);
        b |= twell_bench_f2bf(gz) << (16 * k);
    }
    du = a;
    dz = b;
}
"""
_RELU_MUL_BWD_BF16X4_OP = r"""
const unsigned long long dhv = dh, zv = z, uv = u;
twell_bench_relu_mul_bwd4(dhv, zv, uv, s, du, dz);
"""


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


def _relu_mul_bwd_kernel(bf16x4: bool):
    """``(du, dz) = backward of h = relu(z) * u`` (with the L1 term), fused; see ``_RELU_MUL_BWD_OP``.

    Generic: ``k(dh, z, u, float64 s, du, dz)``; ``bf16x4``: on ``uint64`` views, ``s`` float32.
    """
    key = ("bwd", bf16x4)
    k = _KERNEL_CACHE.get(key)
    if k is None:
        import cupy as cp  # noqa: PLC0415
        if bf16x4:
            k = cp.ElementwiseKernel("uint64 dh, uint64 z, uint64 u, float32 s", "uint64 du, uint64 dz",
                                     _RELU_MUL_BWD_BF16X4_OP, "twell_bench_relu_mul_bwd_bf16x4",
                                     preamble=_BF16X4_BWD_PREAMBLE)
        else:
            k = cp.ElementwiseKernel("T dh, T z, T u, float64 s", "T du, T dz", _RELU_MUL_BWD_OP,
                                     "twell_bench_relu_mul_bwd", preamble=_ACC_PREAMBLE)
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
        self._scalars: dict = {}  # (value, f64) -> ctypes scalar (host pointer mode: read at call time)

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

    def _scalar(self, value: float, f64: bool):
        key = (float(value), f64)
        c = self._scalars.get(key)
        if c is None:
            c = self._scalars[key] = (self._ct.c_double if f64 else self._ct.c_float)(float(value))
        return c

    def gemm(self, a, b, out, *, trans_a: bool = False, trans_b: bool = False, beta: float = 0.0):
        """``out[:] = op(a) @ op(b) + beta * out`` (row-major; ``op(m)`` is ``m.T`` when asked).

        ``op(a)`` (R, K), ``op(b)`` (K, C), ``out`` (R, C); all C-contiguous, one dtype.
        ``beta = 1`` accumulates into ``out`` (fp32 accumulation, one rounding of the sum).
        """
        ra, ka = (a.shape[1], a.shape[0]) if trans_a else (a.shape[0], a.shape[1])
        kb, cb = (b.shape[1], b.shape[0]) if trans_b else (b.shape[0], b.shape[1])
        if ka != kb or tuple(out.shape) != (ra, cb):
            raise ValueError(f"gemm shapes do not match: a {a.shape} (trans_a={trans_a}), b {b.shape} "
                             f"(trans_b={trans_b}), out {out.shape}")
        if not (a.flags.c_contiguous and b.flags.c_contiguous and out.flags.c_contiguous):
            raise ValueError("gemm operands must be C-contiguous")
        name = np.dtype(a.dtype).name
        if np.dtype(b.dtype).name != name or np.dtype(out.dtype).name != name or name not in _CUDA_DATATYPE:
            raise TypeError(f"gemm dtypes must all be one of {tuple(_CUDA_DATATYPE)}")
        dt = _CUDA_DATATYPE[name]
        f64 = name == "float64"
        one, beta_c = self._scalar(1.0, f64), self._scalar(beta, f64)
        compute = _CUBLAS_COMPUTE_64F if f64 else _CUBLAS_COMPUTE_32F
        self._bind()
        vp, addr = self._ct.c_void_p, self._ct.addressof
        # column-major view: out^T (C x R) = op(b)^T (C x K) @ op(a)^T (K x R); a row-major matrix is its
        # transpose in column-major order, with the leading dimension = its number of columns
        status = self.lib.cublasGemmEx(
            self.handle, _CUBLAS_OP_T if trans_b else _CUBLAS_OP_N, _CUBLAS_OP_T if trans_a else _CUBLAS_OP_N,
            cb, ra, ka, vp(addr(one)), vp(b.data.ptr), dt, b.shape[1], vp(a.data.ptr), dt, a.shape[1],
            vp(addr(beta_c)), vp(out.data.ptr), dt, cb, compute, _CUBLAS_GEMM_DEFAULT)
        self._check(status, "cublasGemmEx")
        return out

    def mm(self, a, w, out, *, transposed: bool):
        """``out[:] = a @ (w.T if transposed else w)``: :meth:`gemm` with ``trans_b=transposed``."""
        return self.gemm(a, w, out, trans_b=transposed)


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
    """``(gemm, info)``: ``gemm(a, b, out, trans_a=False, trans_b=False, beta=0.0)`` (see
    :meth:`CublasGemm.gemm`) through :class:`CublasGemm`, else ``cupy.matmul`` (not capturable)."""
    try:
        g = cublas_gemm()
    except Exception as exc:
        import cupy as cp  # noqa: PLC0415

        def gemm(a, b, out, trans_a=False, trans_b=False, beta=0.0):
            prod = cp.matmul(a.T if trans_a else a, b.T if trans_b else b, out=None if beta else out)
            if beta:
                out[...] = (out.astype(np.float32) * np.float32(beta) + prod.astype(np.float32)).astype(out.dtype)
            return out
        return gemm, {"gemm": "cupy.matmul", "gemm_note": f"direct cuBLAS unavailable: {_err_str(exc)}"}
    return g.gemm, {"gemm": "cublasGemmEx (ctypes)", "libcublas": g.library_path}


def _dense_cupy_forward(x, wg, wu, wd, mm):
    """Preallocated ``(z, u, h, y)`` and ``forward()``: ``z = x Wgᵀ``, ``u = x Wuᵀ``, fused
    ``h = relu(z) ⊙ u``, ``y = h Wd``; returns ``(forward, buffers, elementwise variant)``."""
    import cupy as cp  # noqa: PLC0415
    m, n, d = x.shape[0], wg.shape[0], x.shape[1]
    z, u, h = (cp.empty((m, n), dtype=x.dtype) for _ in range(3))
    y = cp.empty((m, d), dtype=x.dtype)
    if _use_bf16x4(x.dtype, n):
        k, variant = _relu_mul_kernel(False, True), "bf16x4"
        ew = (z.view(np.uint64), u.view(np.uint64), h.view(np.uint64))
    else:
        k, variant = _relu_mul_kernel(False), "generic"
        ew = (z, u, h)

    def forward():
        mm(x, wg, z, trans_b=True)
        mm(x, wu, u, trans_b=True)
        k(*ew)
        mm(h, wd, y)
        return y
    return forward, (z, u, h, y), variant


def _make_dense_cupy(p):
    mm, info = _gemm_fn()
    run, _, variant = _dense_cupy_forward(*p.arrays(), mm)
    run.info = dict(info, elementwise=variant)
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
        mm(x, wcat, zu, trans_b=True)
        k(*ew)
        mm(h, wd, y)
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


def _make_twell_fused_gate(p):
    from twell.ops import gated_ffn  # noqa: PLC0415
    x, wg, wu, wd = p.arrays()
    return lambda: _as_y(gated_ffn(x, wg, wu, wd, gate_kernel="fused"))


def _fused_forward_unavailable():
    why = _twell_unavailable()
    if why is not None:
        return why
    import cupy as cp  # noqa: PLC0415
    if cp.cuda.Device().compute_capability != "90":
        return "the fully fused forward needs a Hopper GPU (sm_90a)"
    return None


def _make_twell_fused_forward(p):
    """twell.ops.gated_ffn with the fully fused forward switched on for the call (gather warps inside the
    gate GEMM's persistent kernel; off by default: docs/perf-notes.md, v6)."""
    from twell.kernels import gate_gemm  # noqa: PLC0415
    from twell.ops import gated_ffn  # noqa: PLC0415
    x, wg, wu, wd = p.arrays()

    def run():
        old = gate_gemm.FUSED_FORWARD
        gate_gemm.FUSED_FORWARD = True
        try:
            return _as_y(gated_ffn(x, wg, wu, wd))
        finally:
            gate_gemm.FUSED_FORWARD = old
    return run


# ---- training steps (task="train") ------------------------------------------------
def _make_dense_cupy_train(tp):
    """Dense fwd+bwd: 9 cuBLAS GEMMs (graph-capturable) and two fused elementwise kernels.

    Forward as ``dense_cupy``.  Backward: ``dh = dy Wdᵀ``; one kernel for ``du = dt ⊙ relu(z)`` and
    ``dz = dt ⊙ u ⊙ [z > 0]`` with ``dt = dh + (λ/M) sign(h)`` (written in place over ``dh`` and
    ``z``); ``dx = du Wu`` then ``dx += dz Wg`` (beta = 1); ``dWu = duᵀ x``, ``dWg = dzᵀ x``,
    ``dWd = hᵀ dy``.  All buffers are allocated here, outside the timed step.
    """
    import cupy as cp  # noqa: PLC0415
    x, wg, wu, wd = tp.arrays()
    dy, m, n, d = tp.dy, tp.m, tp.n, tp.d
    mm, info = _gemm_fn()
    forward, (z, u, h, y), variant = _dense_cupy_forward(x, wg, wu, wd, mm)
    dh = cp.empty((m, n), dtype=x.dtype)
    dx = cp.empty((m, d), dtype=x.dtype)
    dwg, dwu, dwd = (cp.empty((n, d), dtype=x.dtype) for _ in range(3))
    du, dz = dh, z  # in place: dh and z are dead once du and dz exist
    scale = tp.l1_weight / max(m, 1)
    if variant == "bf16x4":
        dh4, z4, u4 = dh.view(np.uint64), z.view(np.uint64), u.view(np.uint64)
        kb, bw = _relu_mul_bwd_kernel(True), (dh4, z4, u4, np.float32(scale), dh4, z4)
    else:
        kb, bw = _relu_mul_bwd_kernel(False), (dh, z, u, np.float64(scale), dh, z)

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


_TORCH_L1: dict = {}


def _torch_l1_grad():
    """``apply(h, scale)``: identity whose backward adds ``scale * sign(h)`` (the gradient of ``scale·Σ|h|``).

    Cheaper than a ``scale * h.abs().sum()`` loss term (no forward pass over h) and free of the
    reference cycle a tensor hook capturing ``h`` would create.
    """
    fn = _TORCH_L1.get("apply")
    if fn is None:
        torch = _torch_cuda()

        class _L1Grad(torch.autograd.Function):
            @staticmethod
            def forward(ctx, h, scale):
                ctx.save_for_backward(h)
                ctx.scale = scale
                return h.view_as(h)

            @staticmethod
            def backward(ctx, grad):
                (h,) = ctx.saved_tensors
                return grad.add(torch.sign(h), alpha=ctx.scale), None

        fn = _TORCH_L1["apply"] = _L1Grad.apply
    return fn


def _make_torch_autograd(tp):
    """PyTorch eager + autograd on DLPack views: leaf weights, ``torch.autograd.grad`` for x and the weights."""
    torch = _torch_cuda()
    F = torch.nn.functional
    x, wg, wu, wd = (torch.from_dlpack(a).requires_grad_(True) for a in tp.arrays())
    dy = torch.from_dlpack(tp.dy)
    inputs = (x, wg, wu, wd)
    scale = tp.l1_weight / max(tp.m, 1)
    l1 = _torch_l1_grad() if scale else None

    def forward():
        h = F.relu(F.linear(x, wg)) * F.linear(x, wu)
        if l1 is not None:
            h = l1(h, scale)
        return h @ wd

    def run():
        y = forward()
        dx, dwg, dwu, dwd = torch.autograd.grad(y, inputs, grad_outputs=dy)
        return y.detach(), dx, dwg, dwu, dwd
    run.forward = forward
    run.info = {"l1": "custom autograd.Function adding (λ/M)·sign(h) to dh" if l1 is not None else "none"}
    return run


def _twell_ops_train(x, wg, wu, wd, dy, l1_weight):
    """``twell.gated_ffn_forward`` + ``gated_ffn_backward`` (GPU kernels, or the reference on NumPy)."""
    from twell.ops import gated_ffn_backward, gated_ffn_forward  # noqa: PLC0415
    last: dict = {}

    def forward():
        return gated_ffn_forward(x, wg, wu, wd, l1_weight=l1_weight)

    def run():
        y, saved, stats = forward()
        last["saved_bytes"], last["stats"] = saved.nbytes, stats
        return (y, *gated_ffn_backward(saved, dy))

    def extra():
        st, nbytes = last.get("stats"), last.get("saved_bytes")
        if st is None:
            return {}
        return {"saved_bytes": int(nbytes), "saved_mib": nbytes / 2**20,
                "stats": {"nnz": int(_host_scalar(st.nnz)), "l0": float(_host_scalar(st.l0)),
                          "l1": None if st.l1 is None else float(_host_scalar(st.l1)),
                          "n_backup_rows": int(st.n_backup_rows)}}
    run.forward = forward
    run.extra = extra
    return run


def _host_scalar(v):
    return np.asarray(v.get() if hasattr(v, "get") and not isinstance(v, np.ndarray) else v).item()


def _twell_train_unavailable() -> str | None:
    if B.cupy_or_none() is None:
        return "no CUDA device (CuPy) available"
    return _twell_ops_train_missing()


def _twell_ops_train_missing() -> str | None:
    try:
        mod = importlib.import_module("twell.ops")
    except Exception as exc:
        return f"twell.ops cannot be imported ({type(exc).__name__}: {exc})"
    missing = [f for f in ("gated_ffn_forward", "gated_ffn_backward") if not hasattr(mod, f)]
    return f"twell.ops lacks {', '.join(missing)}" if missing else None


def _make_twell_train(tp):
    return _twell_ops_train(*tp.arrays(), tp.dy, tp.l1_weight)


#: why twell_train has no CUDA-graph time.
TWELL_TRAIN_NO_GRAPH = ("not capturable: gated_ffn_forward reads the batch's non-zero counts back to the host "
                        "once per call (the hybrid format is sized from them)")


def _refuse_capture(reason: str):
    def capture(run, stream):
        raise RuntimeError(reason)
    return capture


def _make_dense_numpy_train(tp):
    x, wg, wu, wd = _host_f32(tp.problem)
    dy = _host_dy_f32(tp)
    lam = tp.l1_weight

    def run():
        return dense_train_math(x, wg, wu, wd, dy, lam)
    run.forward = lambda: dense_train_math(x, wg, wu, wd, dy, lam, forward_only=True)
    return run


def _make_reference_train(tp):
    return _twell_ops_train(*_host_f32(tp.problem), _host_dy_f32(tp), tp.l1_weight)


def _host_dy_f32(tp):
    if tp._dy_f32 is None:  # noqa: SLF001
        tp._dy_f32 = np.ascontiguousarray(_to_host(tp.dy).astype(np.float32))  # noqa: SLF001
    return tp._dy_f32  # noqa: SLF001


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
    register_sparse("twell_fused_gate", make=_make_twell_fused_gate, available=_twell_unavailable,
                    description="twell.ops.gated_ffn(gate_kernel='fused'): gate GEMM with the TwELL epilogue fused")
    register_sparse("twell_fused_forward", make=_make_twell_fused_forward, available=_fused_forward_unavailable,
                    description="twell.ops.gated_ffn with gate_gemm.FUSED_FORWARD: route and up/down gathered "
                                "inside the gate GEMM's persistent kernel")
    # ---- training steps (--mode train) ------------------------------------------------
    register_train("dense_cupy_train", _make_dense_cupy_train, dense=True, available=_gpu_unavailable,
                   description="9 cuBLAS GEMMs + fused relu*mul forward and fused backward elementwise kernels "
                               "(fp32 math, one rounding), buffers preallocated, du/dz in place")
    register_train("torch_autograd", _make_torch_autograd, dense=True, backend="torch",
                   capture=_capture_torch_graph, available=_torch_unavailable,
                   description="PyTorch eager F.linear/relu/mul/matmul + torch.autograd.grad on DLPack views")
    register_train("dense_numpy_train", _make_dense_numpy_train, dense=True, backend="numpy",
                   description="float32 NumPy dense forward + backward")
    register_train("reference_train", _make_reference_train, backend="numpy",
                   available=lambda: _twell_ops_train_missing(),
                   description="twell.gated_ffn_forward/backward on float32 NumPy arrays (twell.reference)")
    register_train("twell_train", _make_twell_train, available=_twell_train_unavailable,
                   capture=_refuse_capture(TWELL_TRAIN_NO_GRAPH),
                   description="twell.gated_ffn_forward + twell.gated_ffn_backward (hybrid training kernels)")


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
    mode: str = "infer"  #: "infer", "train" or "both"
    l1_weight: float = 0.0  #: λ of the training step's L1 penalty


#: --mode -> the tasks it runs, in order.
MODE_TASKS = {"infer": ("infer",), "train": ("train",), "both": ("infer", "train")}


@dataclass
class Case:
    kind: str
    m: int
    mean: float
    sweep: bool = False

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.mean:g}"


def plan_cases(cfg: BenchConfig, gpu: bool, task: str = "infer") -> tuple[list, list]:
    """Return ``(cases, notes)`` of one task (the default M differs: see ``--m``)."""
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
        if task == "train":
            default = GPU_DEFAULT_TRAIN_M if gpu else CPU_DEFAULT_TRAIN_M
        else:
            default = GPU_DEFAULT_M if gpu else CPU_DEFAULT_M
        for m in cfg.ms or default:
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


@dataclass
class TrainProblem:
    """What a training step gets: the synthetic problem, a fixed ``dy`` (M, d) and λ.

    ``x``, ``w_gate``, ``w_up``, ``w_down``, ``m``, ``d``, ``n``, ``dtype`` and
    ``arrays()`` are the problem's.
    """

    problem: object
    dy: object
    l1_weight: float = 0.0
    _dy_f32: object = field(default=None, repr=False)

    x = property(lambda self: self.problem.x)
    w_gate = property(lambda self: self.problem.w_gate)
    w_up = property(lambda self: self.problem.w_up)
    w_down = property(lambda self: self.problem.w_down)
    m = property(lambda self: self.problem.m)
    d = property(lambda self: self.problem.d)
    n = property(lambda self: self.problem.n)
    dtype = property(lambda self: self.problem.dtype)

    def arrays(self) -> tuple:
        return self.problem.arrays()


#: SeedSequence entropy that separates dy from the problem's own streams.
_DY_STREAM = 0x6479


def make_dy(problem, seed: int):
    """``dy`` (M, d): standard normal, drawn in float32 (float64 for float64) where the problem lives,
    cast to its dtype; seeded by ``(seed, _DY_STREAM)``."""
    xp = problem.xp
    gen_dt = np.float64 if problem.dtype == np.float64 else np.float32
    state = int(np.random.SeedSequence([int(seed), _DY_STREAM]).generate_state(1)[0])
    dy = xp.random.default_rng(state).standard_normal((problem.m, problem.d), dtype=gen_dt)
    return dy if np.dtype(dy.dtype) == problem.dtype else dy.astype(problem.dtype)


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


# ---- training check ------------------------------------------------------------------
#: the outputs of a training step, in the order ``run()`` returns them.
TRAIN_OUTPUTS = ("y", "dx", "dw_gate", "dw_up", "dw_down")
#: half an ulp (relative) of each dtype: the slack of the sparse-vs-dense error bar.
HALF_ULP = {"bfloat16": 2.0 ** -9, "float16": 2.0 ** -12, "float32": 2.0 ** -25, "float64": 2.0 ** -54}
TRAIN_CHECK_RULE = ("dense implementations: every output's rel. error <= CHECK_TOLERANCE[dtype]; others: "
                    "<= 2 x the smallest passing dense error of that output + half an ulp of the dtype "
                    "(CHECK_TOLERANCE[dtype] when no dense implementation passed)")


def train_reference(tp: TrainProblem) -> dict:
    """float64 ``{output: array}`` of the whole step, where the problem lives (CuPy float64 GEMMs on the GPU)."""
    f64 = [a.astype(np.float64) for a in (*tp.arrays(), tp.dy)]
    return dict(zip(TRAIN_OUTPUTS, dense_train_math(*f64, tp.l1_weight)))


def _like(a, ref):
    """``a`` in ``ref``'s array module (torch tensors through DLPack)."""
    if isinstance(ref, np.ndarray):
        return np.asarray(_to_host(a))
    if hasattr(a, "get") and not isinstance(a, np.ndarray):
        return a
    import cupy as cp  # noqa: PLC0415
    return cp.from_dlpack(a.detach() if hasattr(a, "detach") else a)


def rel_error_like(a, ref) -> float:
    """:func:`rel_error` computed where ``ref`` lives (float64; no host copy of device arrays)."""
    xp = np if isinstance(ref, np.ndarray) else B.cupy_or_none()
    a = _like(a, ref)
    if tuple(a.shape) != tuple(ref.shape):
        return float("inf")
    a = a.astype(np.float64)
    if not bool(xp.isfinite(a).all()):
        return float("inf")
    den = float(xp.linalg.norm(ref))
    num = float(xp.linalg.norm(a - ref))
    return num / den if den > 0 else num


def _train_errors(outs, ref: dict) -> dict:
    if len(outs) != len(TRAIN_OUTPUTS):
        raise ValueError(f"a training step must return {len(TRAIN_OUTPUTS)} arrays {TRAIN_OUTPUTS}, "
                         f"got {len(outs)}")
    return {name: rel_error_like(a, ref[name]) for name, a in zip(TRAIN_OUTPUTS, outs)}


def _apply_train_check(impl_results: dict, dtype: str) -> None:
    """Set ``check_ok``, ``check_limit`` and ``err_vs_dense`` from the ``rel_err`` dicts (see TRAIN_CHECK_RULE)."""
    tol = CHECK_TOLERANCE[dtype]
    checked = {n: r for n, r in impl_results.items() if isinstance(r.get("rel_err"), dict)}
    bars: dict = {}
    for r in checked.values():
        if r.get("dense"):
            r["check_limit"] = dict.fromkeys(TRAIN_OUTPUTS, tol)
            r["check_ok"] = all(r["rel_err"][k] <= tol for k in TRAIN_OUTPUTS)
            if r["check_ok"]:
                for k in TRAIN_OUTPUTS:
                    bars[k] = min(bars.get(k, math.inf), r["rel_err"][k])
    for r in checked.values():
        if not r.get("dense"):
            r["check_limit"] = ({k: 2.0 * bars[k] + HALF_ULP[dtype] for k in TRAIN_OUTPUTS} if bars
                                else dict.fromkeys(TRAIN_OUTPUTS, tol))
            r["check_ok"] = all(r["rel_err"][k] <= r["check_limit"][k] for k in TRAIN_OUTPUTS)
        if bars:
            r["err_vs_dense"] = max((r["rel_err"][k] / bars[k]) if bars[k] > 0 else
                                    (0.0 if r["rel_err"][k] == 0 else math.inf) for k in TRAIN_OUTPUTS)


def _err_str(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300]


def _select_impls(cfg: BenchConfig, gpu: bool, task: str = "infer") -> tuple[list, list]:
    """Implementations of ``task`` to run on this path, and notes about the ones left out."""
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
        if impl.backend not in want or impl.task != task:
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


def _summarise_dense(impl_results: dict, *, forward: bool = False) -> dict:
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
    q_ms, q = min((t for t in (best("queued"), (g_ms, g)) if t[0] is not None), default=(None, None))
    out = {"cupy_best": cb, "cupy_best_ms": cb_ms, "best": b, "best_ms": b_ms,
           "best_graph": g, "best_graph_ms": g_ms, "best_queued": q, "best_queued_ms": q_ms}
    if forward:
        f_ms, f = best("forward")
        out.update(best_forward=f, best_forward_ms=f_ms)
    return out


def _add_speedups(impl_results: dict, dense: dict):
    def ratio(base, t):
        return (base / t["median_ms"]) if (t and base) else None
    for r in impl_results.values():
        r["speedup"] = ratio(dense["best_ms"], r.get("eager"))
        r["speedup_graph"] = ratio(dense["best_graph_ms"], r.get("graph"))
        r["speedup_queued"] = ratio(dense.get("best_queued_ms"), r.get("queued"))
        if "best_forward_ms" in dense:
            r["speedup_forward"] = ratio(dense["best_forward_ms"], r.get("forward"))


def _new_result(impl: Impl, gpu: bool) -> dict:
    r: dict = {"backend": impl.backend, "dense": impl.dense, "eager": None, "graph": None,
               "rel_err": None, "check_ok": None}
    if not gpu:
        r["graph_error"] = "no GPU"
    return r


def _copy_info(r: dict, run) -> None:
    info = getattr(run, "info", None)
    if isinstance(info, dict):
        r.update(info)


def _time_gpu_impl(r: dict, impl: Impl, run, cfg: BenchConfig, flush, stream, on_graph=None, *,
                   queued: bool = True) -> None:
    """Eager and (unless ``--no-graph``) CUDA-graph timings of ``run`` into ``r``.

    ``on_graph(y)`` (optional) sees the output of the first replay (for ``--check``).
    A failed capture leaves ``r["graph"] = None`` and the reason in ``r["graph_error"]``.
    """
    r["eager"] = time_gpu(run, budget_s=cfg.budget_s, warmup=cfg.warmup, flush=flush).to_dict()
    # Calls queued back to back (events around each, no host sync between calls): the steady state of a
    # loop over layers, where the host prepares the next call while the GPU runs this one.
    if queued:
        r["queued"] = time_gpu(run, budget_s=cfg.budget_s, warmup=cfg.warmup, flush=flush,
                               sync_each=False).to_dict()
    if not cfg.graphs:
        return
    cap = None
    try:
        cap = (impl.capture or capture_cupy_graph)(run, stream)
        cap.launch()
        stream.synchronize()
        if on_graph is not None:
            on_graph(cap.y)
        r["graph"] = time_gpu(cap.launch, budget_s=cfg.budget_s, warmup=cfg.warmup, flush=flush,
                              sync_each=False).to_dict()
    except Exception as exc:
        r["graph"] = None
        r["graph_error"] = _err_str(exc)
    finally:
        if cap is not None:
            with contextlib.suppress(Exception):
                cap.release()


def _run_one_gpu(impl: Impl, problem, cfg: BenchConfig, ref, tol, flush, stream) -> dict:
    r = _new_result(impl, gpu=True)
    run = None
    try:
        run = impl.make(problem)
        _copy_info(r, run)
        y = run()
        stream.synchronize()
        if ref is not None:
            r["rel_err"] = rel_error(_rows_f64(y, ref.shape[0]), ref)
            r["check_ok"] = bool(r["rel_err"] <= tol)
        del y

        def on_graph(y):
            r["graph_rel_err"] = rel_error(_rows_f64(y, ref.shape[0]), ref)
        _time_gpu_impl(r, impl, run, cfg, flush, stream, on_graph if ref is not None else None)
    except Exception as exc:
        r["error"] = _err_str(exc)
    finally:
        run = None
        _free_gpu_memory()
    return r


def _run_one_cpu(impl: Impl, problem, cfg: BenchConfig, ref, tol) -> dict:
    r = _new_result(impl, gpu=False)
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


# ---- training step runners -------------------------------------------------------------
#: How "peak_bytes" is measured (also written to the JSON, train.method.peak_memory).
PEAK_MEMORY_METHOD = (
    "bytes allocated by one step beyond its inputs (x, weights, dy), after warm-up: CuPy implementations "
    "run make() (preallocated buffers count) and one step with a fresh cupy.cuda.MemoryPool as the "
    "allocator, peak = the maximum of pool.used_bytes() sampled after every allocation (exact for "
    "stream-ordered pool reuse; 512-byte rounding); PyTorch: torch.cuda.max_memory_allocated() after "
    "reset_peak_memory_stats(), minus memory_allocated() before make(). Outputs (y and the gradients) "
    "count; cuBLAS handles/workspaces created earlier do not.")
#: Pools whose blocks could not all be returned (something outside the step kept an array): kept
#: alive so that no array ever points into freed device memory.
_KEPT_POOLS: list = []


def _peak_step_bytes(impl: Impl, tp: TrainProblem, stream) -> int:
    """Peak device bytes of ``impl.make(tp)`` + one step (see :data:`PEAK_MEMORY_METHOD`)."""
    cp = B.cupy_or_none()
    _free_gpu_memory()
    if impl.backend == "torch":
        torch = _torch_cuda()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run = impl.make(tp)
        outs = run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del outs, run
        _free_gpu_memory()
        return int(peak)
    pool = cp.cuda.MemoryPool()
    peak = 0

    def malloc(size):
        nonlocal peak
        mem = pool.malloc(size)
        peak = max(peak, pool.used_bytes())
        return mem

    try:
        with cp.cuda.using_allocator(malloc):
            run = impl.make(tp)
            outs = run()
            stream.synchronize()
            del outs, run
    finally:
        gc.collect()
        stream.synchronize()
        pool.free_all_blocks()
        if pool.used_bytes():
            _KEPT_POOLS.append(pool)
    return int(peak)


def _run_one_train(impl: Impl, tp: TrainProblem, cfg: BenchConfig, ref, *, gpu: bool, flush=None,
                   stream=None) -> dict:
    """Check (first call), time the step (eager + graph on the GPU) and its forward, measure peak memory."""
    r = _new_result(impl, gpu)
    r.update(forward=None, peak_bytes=None, peak_mib=None)
    run = None
    try:
        run = impl.make(tp)
        _copy_info(r, run)
        outs = run()
        if gpu:
            stream.synchronize()
        if ref is not None:
            r["rel_err"] = _train_errors(outs, ref)
            r["max_rel_err"] = max(r["rel_err"].values())
        del outs
        if callable(getattr(run, "extra", None)):
            r.update(run.extra())
        fwd = getattr(run, "forward", None)
        if gpu:
            def on_graph(outs):
                r["graph_max_rel_err"] = max(_train_errors(outs, ref).values())
            _time_gpu_impl(r, impl, run, cfg, flush, stream, on_graph if ref is not None else None,
                           queued=False)
            if fwd is not None:
                r["forward"] = time_gpu(fwd, budget_s=cfg.budget_s, warmup=cfg.warmup, flush=flush).to_dict()
            run = fwd = None
            try:
                r["peak_bytes"] = _peak_step_bytes(impl, tp, stream)
                r["peak_mib"] = r["peak_bytes"] / 2**20
            except Exception as exc:
                r["peak_error"] = _err_str(exc)
        else:
            r["eager"] = time_cpu(run, budget_s=cfg.budget_s, warmup=1).to_dict()
            if fwd is not None:
                r["forward"] = time_cpu(fwd, budget_s=cfg.budget_s, warmup=1).to_dict()
    except Exception as exc:
        r["error"] = _err_str(exc)
    finally:
        run = fwd = None
        if gpu:
            _free_gpu_memory()
    return r


def _train_method(gpu: bool) -> dict:
    return {
        "step": "one training step of the gated FFN: forward y, backward dx, dw_gate, dw_up, dw_down for a fixed "
                "dy (standard normal, see make_dy), L1 gradient (l1_weight / M) * sign(h) included",
        "timer": "step timed like inference (eager and graph); 'forward' = the forward alone, eager",
        "peak_memory": PEAK_MEMORY_METHOD if gpu else "not measured on the CPU",
        "check": ("every output over the whole batch against dense_train_math in float64 "
                  + ("(CuPy float64 GEMMs on the GPU); " if gpu else "(NumPy); ") + TRAIN_CHECK_RULE),
        "speedup": "fastest passing dense implementation (median) / implementation, per timing",
    }


# ---- the case driver ----------------------------------------------------------------------
def run_bench(cfg: BenchConfig, *, log=None, command: list | None = None) -> dict:
    """Run every case of ``cfg``; return the results dict (see ``write_json``).

    Inference cases go to ``results["cases"]``; with ``cfg.mode`` "train" or
    "both", training cases to ``results["train"]["cases"]``.
    """
    log = log or (lambda s: None)
    cp = B.cupy_or_none()
    if cfg.backend == "gpu" and cp is None:
        raise RuntimeError("--backend gpu was requested but CuPy with a CUDA device is not available")
    if cfg.mode not in MODE_TASKS:
        raise ValueError(f"mode must be one of {tuple(MODE_TASKS)}, got {cfg.mode!r}")
    gpu = cp is not None and cfg.backend != "cpu"
    tasks = MODE_TASKS[cfg.mode]
    plan, notes = {}, []
    for task in ("infer", "train"):
        impls, impl_notes = _select_impls(cfg, gpu, task) if task in tasks else ([], [])
        cases, case_notes = plan_cases(cfg, gpu, task) if task in tasks else ([], [])
        plan[task] = (impls, cases)
        notes += [x for x in impl_notes + case_notes if x not in notes]
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
        "impls": {i.name: {"backend": i.backend, "dense": i.dense, "description": i.description}
                  for i in plan["infer"][0]},
        "notes": notes,
        "cases": [],
    }
    if "train" in tasks:
        results["train"] = {
            "l1_weight": cfg.l1_weight,
            "method": _train_method(gpu),
            "impls": {i.name: {"backend": i.backend, "dense": i.dense, "description": i.description}
                      for i in plan["train"][0]},
            "cases": [],
        }
    for note in notes:
        log(f"note: {note}")
    use_torch = any(i.backend == "torch" for impls, _ in plan.values() for i in impls)
    with _device_session(gpu, use_torch, results) as stream:
        l2 = (env["devices"][0]["l2_bytes"] if env["devices"] else 0) or (50 << 20)
        flusher = None
        for task in tasks:
            impls, cases = plan[task]
            sink = results["cases"] if task == "infer" else results["train"]["cases"]
            log(("\n" if task != tasks[0] else "") + table_header(task))
            for case in cases:
                flush = None
                if gpu and (cfg.flush_l2 == "on" or (cfg.flush_l2 == "auto" and case.m <= FLUSH_AUTO_MAX_M)):
                    flusher = flusher or L2Flusher(l2)
                    flush = flusher
                sink.append(_run_case(case, cfg, impls, gpu=gpu, stream=stream, flush=flush, log=log, task=task))
        flusher = None
    return results


@contextlib.contextmanager
def _device_session(gpu: bool, use_torch: bool, results: dict):
    """On the GPU: one non-blocking CuPy stream, current for CuPy and (if used) PyTorch; yields it."""
    if not gpu:
        yield None
        return
    cp = B.cupy_or_none()
    torch = _torch_cuda() if use_torch else None
    if torch is not None:
        results["meta"]["torch_cuda"] = torch.version.cuda
    stream = cp.cuda.Stream(non_blocking=True)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(stream)
            if torch is not None:
                stack.enter_context(torch.cuda.stream(torch.cuda.ExternalStream(stream.ptr)))
            yield stream
    finally:
        _free_gpu_memory()


def _run_case(case: Case, cfg: BenchConfig, impls: list, *, gpu: bool, stream=None, flush=None, log,
              task: str = "infer") -> dict:
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
        if task == "train":
            _train_case_body(out, problem, cfg, impls, gpu=gpu, stream=stream, flush=flush)
        else:
            _infer_case_body(out, problem, case, cfg, impls, gpu=gpu, stream=stream, flush=flush)
        dense = _summarise_dense(out["impls"], forward=task == "train")
        _add_speedups(out["impls"], dense)
        out["dense"] = dense
    except Exception as exc:
        out["error"] = _err_str(exc)
    finally:
        problem = None
        if gpu:
            _free_gpu_memory()
    out["seconds"] = time.perf_counter() - t_case
    log(format_table({"train": {"cases": [out]}} if task == "train" else {"cases": [out]}, header=False))
    return out


def _infer_case_body(out: dict, problem, case: Case, cfg: BenchConfig, impls: list, *, gpu, stream, flush):
    ref = None
    if cfg.check:
        ref, source = reference_rows(problem, min(cfg.check_rows, case.m))
        out["check"] = {"rows": int(ref.shape[0]), "reference": source,
                        "tolerance": CHECK_TOLERANCE[cfg.dtype]}
    tol = CHECK_TOLERANCE[cfg.dtype]
    for impl in impls:
        if gpu:
            out["impls"][impl.name] = _run_one_gpu(impl, problem, cfg, ref, tol, flush, stream)
        else:
            out["impls"][impl.name] = _run_one_cpu(impl, problem, cfg, ref, tol)


def _train_case_body(out: dict, problem, cfg: BenchConfig, impls: list, *, gpu, stream, flush):
    tp = TrainProblem(problem, make_dy(problem, cfg.seed), cfg.l1_weight)
    out["l1_weight"] = cfg.l1_weight
    out["dy"] = {"distribution": "standard normal", "seed": [cfg.seed, _DY_STREAM], "dtype": cfg.dtype}
    ref = None
    # the CPU implementations compute from float32 copies: check them at float32's tolerance
    check_dtype = cfg.dtype if gpu else "float32"
    if cfg.check:
        ref = train_reference(tp)
        out["check"] = {"outputs": list(TRAIN_OUTPUTS), "rows": int(tp.m),
                        "reference": "dense_train_math in float64 " + ("(CuPy, GPU)" if gpu else "(NumPy)"),
                        "rule": TRAIN_CHECK_RULE, "dtype": check_dtype}
    try:
        for impl in impls:
            out["impls"][impl.name] = _run_one_train(impl, tp, cfg, ref, gpu=gpu, flush=flush, stream=stream)
    finally:
        ref = tp = None
    if cfg.check:
        _apply_train_check(out["impls"], check_dtype)


# =============================================================================
# 5. output
# =============================================================================
_CASE_COLS = [("case", 22, "<"), ("M", 7, ">"), ("mean", 6, ">"), ("p99", 6, ">"), ("max", 6, ">")]
_INFER_COLS = [("impl", 16, "<"), ("median ms", 10, ">"), ("p20", 9, ">"), ("p80", 9, ">"),
               ("graph ms", 9, ">"), ("queued ms", 10, ">"), ("speedup", 8, ">"), ("spd graph", 9, ">"),
               ("spd queued", 10, ">"), ("rel err", 9, ">")]
_TRAIN_COLS = [("impl", 17, "<"), ("step ms", 9, ">"), ("p20", 9, ">"), ("p80", 9, ">"), ("graph ms", 9, ">"),
               ("fwd ms", 9, ">"), ("speedup", 7, ">"), ("spd graph", 9, ">"), ("spd fwd", 7, ">"),
               ("peak MiB", 8, ">"), ("saved MiB", 9, ">"), ("l0", 6, ">"), ("backup", 6, ">"),
               ("max err", 9, ">"), ("err/dense", 9, ">")]
_COLS = _CASE_COLS + _INFER_COLS  # the inference table
_TASK_COLS = {"infer": _COLS, "train": _CASE_COLS + _TRAIN_COLS}
_TRAIN_TITLE = ("training: one fwd+bwd step (step/fwd ms: medians; speedups vs the fastest dense; "
                "err: max rel. error over y, dx, dW)")


def _fmt_row(values, cols=_COLS) -> str:
    return "  ".join(f"{str(v):{a}{w}}" for v, (_, w, a) in zip(values, cols)).rstrip()


def _f(v, fmt):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def table_header(task: str = "infer") -> str:
    cols = _TASK_COLS[task]
    head = _fmt_row([c for c, _, _ in cols], cols)
    return (_TRAIN_TITLE + "\n" if task == "train" else "") + head + "\n" + "-" * len(head)


def _err_cell(err: float | None, r: dict) -> str:
    return _f(err, ".2e") + (" FAIL" if r.get("check_ok") is False else "")


def _infer_cells(r: dict) -> list:
    e, g, q = r.get("eager") or {}, r.get("graph") or {}, r.get("queued") or {}
    return [_f(e.get("median_ms"), ".4f"), _f(e.get("p20_ms"), ".4f"), _f(e.get("p80_ms"), ".4f"),
            _f(g.get("median_ms"), ".4f"), _f(q.get("median_ms"), ".4f"), _f(r.get("speedup"), ".2f"),
            _f(r.get("speedup_graph"), ".2f"), _f(r.get("speedup_queued"), ".2f"), _err_cell(r.get("rel_err"), r)]


def _train_cells(r: dict) -> list:
    e, g, fw = r.get("eager") or {}, r.get("graph") or {}, r.get("forward") or {}
    st = r.get("stats") or {}
    return [_f(e.get("median_ms"), ".3f"), _f(e.get("p20_ms"), ".3f"), _f(e.get("p80_ms"), ".3f"),
            _f(g.get("median_ms"), ".3f"), _f(fw.get("median_ms"), ".3f"), _f(r.get("speedup"), ".2f"),
            _f(r.get("speedup_graph"), ".2f"), _f(r.get("speedup_forward"), ".2f"), _f(r.get("peak_mib"), ".0f"),
            _f(r.get("saved_mib"), ".1f"), _f(st.get("l0"), ".1f"), _f(st.get("n_backup_rows"), "d"),
            _err_cell(r.get("max_rel_err"), r), _f(r.get("err_vs_dense"), ".2f")]


def _table_lines(cases: list, task: str) -> list:
    cols, cells = _TASK_COLS[task], (_train_cells if task == "train" else _infer_cells)
    lines = []
    for case in cases:
        real = (case.get("realised") or {}).get("token", {})
        base = [case["name"], case["m"], _f(real.get("mean"), ".1f"), _f(real.get("p99"), ".0f"),
                _f(real.get("max"), "d") if real.get("max") is not None else "-"]
        if case.get("error"):
            lines.append(_fmt_row(base + ["ERROR: " + case["error"]], cols))
            continue
        dense = case.get("dense") or {}
        for name, r in case.get("impls", {}).items():
            label = name + ("*" if name == dense.get("best") else "")
            if r.get("error"):
                lines.append(_fmt_row(base + [label, "ERROR: " + r["error"]], cols))
            else:
                lines.append(_fmt_row(base + [label] + cells(r), cols))
    return lines


def format_table(results: dict, *, header: bool = True) -> str:
    """Fixed-width tables of a results dict: inference cases, then training cases (``results["train"]``)."""
    blocks = []
    train = results.get("train")
    if results.get("cases") or train is None:
        blocks.append(([table_header("infer")] if header else []) + _table_lines(results.get("cases", []), "infer"))
    if train is not None:
        blocks.append(([table_header("train")] if header else []) + _table_lines(train.get("cases", []), "train"))
    return ("\n\n" if header else "\n").join("\n".join(b) for b in blocks)


def _all_cases(results: dict):
    """``(task, case)`` for every inference and training case."""
    for case in results.get("cases", []):
        yield "infer", case
    for case in (results.get("train") or {}).get("cases", []):
        yield "train", case


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
    cases if there are any, else every case (inference and training separately;
    training lines are labelled "train eager" / "train graph").  Needs matplotlib.
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
    series: dict = {}
    for task in TASKS:
        every = [c for t, c in _all_cases(results) if t == task]
        for c in [c for c in every if c.get("sweep")] or every:
            real = (c.get("realised") or {}).get("token", {}).get("mean")
            if real is None:
                continue
            for name, r in (c.get("impls") or {}).items():
                for mode, key in (("eager", "speedup"), ("graph", "speedup_graph")):
                    s = r.get(key)
                    if s is not None:
                        label = mode if task == "infer" else f"train {mode}"
                        series.setdefault((name, label, c["kind"], c["m"]), []).append((real, s))
    if not series:
        raise ValueError("no speedups to plot in these results (no case has timings)")
    fig, ax = plt.subplots(figsize=(8, 5))
    for (name, mode, kind, m), pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="-" if mode.endswith("eager") else "--",
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


def _int_at_least(minimum: int):
    """argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return v
    return parse


_pos_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return v


def _pos_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


_TRAIN_HELP = """\
One training step per case, on the same synthetic problems as inference:
forward y = (relu(x Wg^T) * x Wu^T) Wd, backward dx, dWg, dWu, dWd for a fixed
standard-normal dy, with the L1 gradient (l1_weight / M) * sign(h).
  GPU: dense_cupy_train (9 cuBLAS GEMMs + fused elementwise kernels),
       torch_autograd (PyTorch eager + autograd, when torch has CUDA),
       twell_train (twell.gated_ffn_forward + gated_ffn_backward; no graph
       time: its forward reads counts back to the host once).
  CPU: dense_numpy_train (float32) and reference_train (twell.reference).
Columns: step ms (fwd+bwd median, p20, p80), graph ms, fwd ms (forward alone),
speedup / spd graph / spd fwd (fastest dense / impl), peak MiB (device memory
of one step beyond x, weights and dy; GPU only), saved MiB, l0 and backup rows
(twell), max err and err/dense with --check (rel. error vs float64 over the
whole batch, and its ratio to the best dense error).  JSON: key "train".
"""


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--d", type=_pos_int, default=2048, help="d_model (default 2048)")
    p.add_argument("--n", type=_pos_int, default=5632, help="d_ff (default 5632)")
    p.add_argument("--m", type=_int_list, default=None, metavar="M[,M...]",
                   help=f"tokens per case (default inference: GPU {','.join(map(str, GPU_DEFAULT_M))}, "
                        f"CPU {','.join(map(str, CPU_DEFAULT_M))}; training: GPU "
                        f"{','.join(map(str, GPU_DEFAULT_TRAIN_M))}, CPU {','.join(map(str, CPU_DEFAULT_TRAIN_M))})")
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
                   help="inference: compare every implementation's y with the float64 reference on the first "
                        "--check-rows rows; training: every output (y, dx, dW) over the whole batch (see below)")
    p.add_argument("--check-rows", type=_pos_int, default=256, help="inference --check rows (default 256)")
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
    t = p.add_argument_group("training benchmark (--mode train|both)", _TRAIN_HELP)
    t.add_argument("--mode", choices=tuple(MODE_TASKS), default="infer",
                   help="infer: inference y = FFN(x) (default); train: the training step only; both: inference, "
                        "then training")
    t.add_argument("--l1-weight", type=_nonneg_float, default=0.0, metavar="LAMBDA",
                   help="training: lambda of the L1 penalty lambda * (1/M) * sum(|h|) (default 0; the "
                        "paper uses 2e-5 to 3e-4)")


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
        for task in MODE_TASKS[args.mode]:
            if not any(IMPLS[x].task == task for x in args.impl):
                names = ", ".join(k for k, v in IMPLS.items() if v.task == task)
                parser.error(f"--impl names no {'training' if task == 'train' else 'inference'} implementation "
                             f"but --mode {args.mode} runs that task (registered: {names})")
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
        mode=args.mode, l1_weight=args.l1_weight,
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

    command = [sys.executable, "-m", "twell", *(argv if argv is not None else sys.argv[1:])]
    try:
        results = run_bench(cfg, log=log, command=command)
    except (RuntimeError, ValueError) as exc:
        print(f"twell bench: error: {exc}", file=sys.stderr)
        return 1
    if quiet:
        print(format_table(results))
    cases = list(_all_cases(results))
    failed = [(c["name"], c["m"], name) for _, c in cases for name, r in c.get("impls", {}).items()
              if r.get("check_ok") is False]
    errors = [(c["name"], c["m"], c["error"]) for _, c in cases if c.get("error")]
    errors += [(c["name"], c["m"], f"{name}: {r['error']}") for _, c in cases
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
