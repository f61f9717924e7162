"""Array-module plumbing: lazy CuPy import, DLPack in/out, argument validation.

``import twell`` never imports CuPy; the first GPU call does.  Every public
function validates its arguments with the helpers here so that errors name the
argument and the rule that was broken.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

__all__ = [
    "cupy_or_none",
    "is_gpu_array",
    "array_module",
    "to_module",
    "check_array",
    "check_same_module",
    "check_float_dtype",
    "check_int",
    "check_bool",
    "check_on_current_device",
    "device_ranges_overlap",
    "bfloat16_dtype",
    "FLOAT_DTYPE_NAMES",
]


@functools.lru_cache(maxsize=None)
def cupy_or_none():
    """Return the ``cupy`` module if it imports and sees a device, else ``None``."""
    try:
        import cupy  # noqa: PLC0415
    except Exception:  # pragma: no cover - depends on the machine
        return None
    try:
        if not cupy.cuda.is_available():
            return None
    except Exception:  # pragma: no cover
        return None
    return cupy


@functools.lru_cache(maxsize=None)
def bfloat16_dtype():
    """``numpy.dtype`` of bfloat16 (from ml_dtypes), or ``None`` if unavailable."""
    try:
        import ml_dtypes  # noqa: PLC0415
    except Exception:  # pragma: no cover
        return None
    return np.dtype(ml_dtypes.bfloat16)


FLOAT_DTYPE_NAMES = ("bfloat16", "float16", "float32", "float64")


def _is_cupy_array(a) -> bool:
    mod = type(a).__module__
    return mod.startswith("cupy") and hasattr(a, "device")


def is_gpu_array(a) -> bool:
    """True for CuPy arrays and for foreign arrays that live on a CUDA device (DLPack)."""
    if isinstance(a, np.ndarray):
        return False
    if _is_cupy_array(a):
        return True
    dev = getattr(a, "__dlpack_device__", None)
    if dev is None:
        return False
    try:
        device_type, _ = dev()
    except Exception:
        return False
    # kDLCUDA = 2, kDLCUDAManaged = 13
    return int(device_type) in (2, 13)


def array_module(*arrays, names=None):
    """Return ``numpy`` or ``cupy`` for a set of arrays that must live together.

    Foreign DLPack GPU arrays count as CuPy.  Mixing host and device arrays is a
    ``TypeError`` naming the arguments.
    """
    kinds = []
    for a in arrays:
        if a is None:
            continue
        kinds.append(is_gpu_array(a))
    if not kinds:
        return np
    if all(kinds):
        cp = cupy_or_none()
        if cp is None:
            raise RuntimeError("GPU arrays were passed but CuPy with a CUDA device is not available")
        return cp
    if not any(kinds):
        return np
    names = names or [f"argument {i}" for i in range(len(arrays))]
    where = ", ".join(
        f"{n}={'device' if is_gpu_array(a) else 'host'}" for n, a in zip(names, arrays) if a is not None
    )
    raise TypeError(f"arrays must all be on the host (NumPy) or all on a CUDA device: {where}")


def to_module(a, xp, name: str = "array"):
    """Convert ``a`` to an array of module ``xp`` without copying where possible.

    GPU arrays that are not CuPy arrays (PyTorch, JAX, ...) are imported through
    ``__dlpack__`` (zero-copy).  Host array-likes are converted with
    ``numpy.asarray``.
    """
    if xp is np:
        if isinstance(a, np.ndarray):
            return a
        if is_gpu_array(a):
            raise TypeError(f"{name} lives on a CUDA device but a host (NumPy) array was required")
        return np.asarray(a)
    if _is_cupy_array(a):
        return a
    if is_gpu_array(a):
        try:
            return xp.from_dlpack(a)
        except Exception as exc:  # pragma: no cover - depends on the foreign library
            raise TypeError(f"{name} could not be imported through __dlpack__: {exc}") from exc
    raise TypeError(f"{name} must be a CUDA device array (CuPy or __dlpack__), got {type(a).__name__}")


def check_float_dtype(a, name: str, allowed=FLOAT_DTYPE_NAMES):
    """Raise ``TypeError`` unless ``a.dtype`` is one of the allowed float dtypes."""
    dt = np.dtype(a.dtype)
    if dt.name not in allowed:
        raise TypeError(f"{name} must have dtype in {{{', '.join(allowed)}}}, got {dt.name}")
    return dt


def check_array(
    a,
    name: str,
    *,
    ndim: int | None = None,
    shape: tuple | None = None,
    dtype=None,
    dtypes=None,
    contiguous: bool = False,
):
    """Validate one array argument.

    ``shape`` entries may be ``None`` (any size).  ``dtype`` is one exact dtype,
    ``dtypes`` a tuple of accepted dtype names.  ``contiguous`` requires C order.
    """
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(a).__name__}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(a.shape)}")
    if shape is not None:
        if a.ndim != len(shape) or any(s is not None and s != t for s, t in zip(shape, a.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(a.shape)}")
    if dtype is not None and np.dtype(a.dtype) != np.dtype(dtype):
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {np.dtype(a.dtype).name}")
    if dtypes is not None and np.dtype(a.dtype).name not in dtypes:
        raise TypeError(f"{name} must have dtype in {{{', '.join(dtypes)}}}, got {np.dtype(a.dtype).name}")
    if contiguous and not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (row-major); pass an ascontiguousarray copy")
    return a


def check_same_module(arrays: dict[str, Any]):
    """``array_module`` over a ``{name: array}`` dict, with names in the error."""
    return array_module(*arrays.values(), names=list(arrays.keys()))


def check_int(value, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """Validate an integer parameter (bools rejected) and return it as ``int``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_bool(value, name: str) -> bool:
    """Validate a flag (a bool, not merely truthy) and return it."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_on_current_device(arrays: dict):
    """Raise ``ValueError`` unless every CuPy array of ``{name: array}`` lives on the current device (the
    kernels, launch plans and cuBLAS handles used are the current device's)."""
    import cupy  # noqa: PLC0415
    dev = cupy.cuda.runtime.getDevice()
    for name, a in arrays.items():
        if a is not None and a.device.id != dev:
            raise ValueError(f"{name} is on device {a.device.id} but the current device is {dev}: call twell "
                             f"inside `with cupy.cuda.Device({a.device.id}):` (every array on that device)")


def device_ranges_overlap(a, b) -> bool:
    """Whether the memory spans of two CuPy arrays overlap (conservative: bounding ranges)."""
    if a.size == 0 or b.size == 0:
        return False
    lo_a, hi_a = _span(a)
    lo_b, hi_b = _span(b)
    return lo_a < hi_b and lo_b < hi_a


def _span(a):
    lo = hi = a.data.ptr
    for extent, stride in zip(a.shape, a.strides):
        if stride >= 0:
            hi += (extent - 1) * stride
        else:
            lo += (extent - 1) * stride
    return lo, hi + a.itemsize
