"""Small launch helpers shared by the kernel launchers (CuPy imported lazily by callers)."""

from __future__ import annotations

import numpy as np

from .. import _backend as B
from .._kernels import CTYPE

NULL = np.uint64(0)  # a null device pointer argument
_CTYPE_OF_DTYPE: dict = {}  # np.dtype -> C++ type, filled by ctype_of


def ctype_of(dtype, name: str) -> str:
    """C++ type for a device dtype (or dtype name), or a TypeError naming the argument."""
    ct = CTYPE.get(dtype) if isinstance(dtype, str) else _CTYPE_OF_DTYPE.get(dtype)
    if ct is not None:
        return ct
    key = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    try:
        ct = CTYPE[key]
        if not isinstance(dtype, str):
            _CTYPE_OF_DTYPE[np.dtype(dtype)] = ct
        return ct
    except KeyError:
        raise TypeError(
            f"{name} has dtype {key}; the CUDA kernels take {{{', '.join(CTYPE)}}} "
            "(float64 runs on the host reference only)"
        ) from None


def cbool(v: bool) -> str:
    return "true" if v else "false"


def i32(v) -> np.int32:
    v = int(v)
    if not -(2**31) <= v < 2**31:
        raise OverflowError(f"value {v} does not fit the kernels' 32-bit index arithmetic")
    return np.int32(v)


def grid_1d(total: int, block: int, cap: int = 65535 * 8) -> int:
    return max(1, min(cap, -(-int(total) // block)))


def aligned(a, nbytes: int) -> bool:
    """True if the device pointer of ``a`` is a multiple of ``nbytes``."""
    return a.data.ptr % nbytes == 0


def device_matrix(a, name: str, *, ndim: int = 2):
    """Validate a device array argument: a CuPy array (DLPack imported), C-contiguous, kernel dtype."""
    cp = B.cupy_or_none()
    a = B.to_module(a, cp, name)
    B.check_array(a, name, ndim=ndim, contiguous=True)
    ctype_of(a.dtype, name)
    return a


class HostReadback:
    """Copy a few small device int32 arrays to pinned host memory without blocking now.

    The copies are enqueued on the current stream; :meth:`wait` blocks only
    until they (and the work before them) are done, so kernels queued after
    the constructor keep the GPU busy while the host waits.  ``wait`` returns
    every element of every array, in order, as Python ints.
    """

    def __init__(self, *device_arrays):
        import cupy as cp  # noqa: PLC0415

        sizes = [int(a.size) for a in device_arrays]
        total = sum(sizes)
        self._mem = cp.cuda.alloc_pinned_memory(4 * max(total, 1))
        self._host = np.frombuffer(self._mem, dtype=np.int32, count=total)
        stream = cp.cuda.get_current_stream()
        offset = 0
        for a, size in zip(device_arrays, sizes):
            if a.dtype != np.int32 or not a.flags.c_contiguous:
                raise TypeError("HostReadback takes contiguous int32 device arrays")
            cp.cuda.runtime.memcpyAsync(self._host.ctypes.data + 4 * offset, a.data.ptr, 4 * size,
                                        cp.cuda.runtime.memcpyDeviceToHost, stream.ptr)
            offset += size
        self._event = cp.cuda.Event(block=False, disable_timing=True)
        self._event.record(stream)

    def wait(self) -> tuple:
        self._event.synchronize()
        return tuple(int(v) for v in self._host)
