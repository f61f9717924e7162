"""Small launch helpers shared by the kernel launchers (CuPy imported lazily by callers)."""

from __future__ import annotations

import numpy as np

from .. import _backend as B
from .loader import CTYPE

NULL = np.uint64(0)  # a null device pointer argument
U64 = np.uint64     # a device address as a kernel argument (8 bytes, as the pointer it stands for)
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


def threshold_i32(v) -> np.int32:
    """A row threshold as a kernel argument: any value above int32 means the same as the int32 maximum (a row
    never has that many entries)."""
    return np.int32(min(int(v), 2**31 - 1))


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


_side_streams: dict = {}    # device id -> the non-blocking stream of overlapped read-backs


def _side_stream(cp):
    dev = cp.cuda.runtime.getDevice()
    s = _side_streams.get(dev)
    if s is None:
        s = _side_streams[dev] = cp.cuda.Stream(non_blocking=True)
    return s


class HostReadback:
    """Copy a few small device int32 arrays to pinned host memory without blocking now.

    The copies are ordered after the work already queued on the current stream; :meth:`wait` blocks only
    until they are done, so kernels queued after the constructor keep the GPU busy while the host waits.
    ``overlap=True`` (for a read-back followed by kernels before its :meth:`wait`): the copies run on a side
    stream that waits for the current one, so those kernels do not queue behind the copy engine (a D2H
    copy between two kernels of one stream delays the second by the copy's latency); they must not write
    the arrays being read.  ``wait`` returns every element of every
    array, in order, as Python ints.
    """

    def __init__(self, *device_arrays, overlap: bool = False):
        import cupy as cp  # noqa: PLC0415

        sizes = [int(a.size) for a in device_arrays]
        total = sum(sizes)
        self._mem = cp.cuda.alloc_pinned_memory(4 * max(total, 1))
        self._host = np.frombuffer(self._mem, dtype=np.int32, count=total)
        stream = cp.cuda.get_current_stream()
        if overlap:
            ready = cp.cuda.Event(block=False, disable_timing=True)
            ready.record(stream)
            stream = _side_stream(cp)
            stream.wait_event(ready)
        self._arrays = device_arrays            # alive until the copies are done
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
        self._arrays = None
        return tuple(int(v) for v in self._host)


# --------------------------------------------------------------------------- driver-API launch

#: Placeholder of a pointer argument of a :class:`DriverLaunch` that is set at each launch.
SLOT = object()


def _cu_launch_kernel():
    import ctypes  # noqa: PLC0415
    fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernel
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
    return fn


class DriverLaunch:
    """One kernel launch configuration whose parameter buffer is built once and relaunched through
    ``cuLaunchKernel`` (ctypes, the driver library CuPy itself uses), changing only the pointer ``SLOT``
    arguments.

    For the first launch of an op, where the host time before the GPU starts is paid in full by an eager
    caller: a CuPy ``RawKernel`` call of the 21-argument gate GEMM costs 24–31 µs of host time on the
    H200's host; with this launch (and the memoized plan around it) the whole ``gate_twell_async`` call
    fell from 178 to 48 µs (docs/performance-history.md, v13).  ``args`` are what the CuPy call would get:
    NumPy scalars (``np.int32``, ``np.uint64``), CuPy arrays (their pointer, fixed), 1-element NumPy
    ``void`` arrays (by-value structs such as a ``CUtensorMap``) and ``SLOT``.  The kernel's dynamic
    shared-memory limit must already be set (as for the CuPy call).
    """

    _fn = None

    def __init__(self, kernel, grid: tuple, block: tuple, shared_mem: int, args: tuple):
        import ctypes  # noqa: PLC0415
        import threading  # noqa: PLC0415
        self._func = ctypes.c_void_p(kernel.kernel.ptr)
        self._dims = tuple(int(v) for v in (tuple(grid) + (1, 1))[:3] + (tuple(block) + (1, 1))[:3])
        self._smem = int(shared_mem)
        self._storage, self._slots = [], []
        for a in args:
            if a is SLOT:
                s = ctypes.c_uint64(0)
                self._slots.append(s)
            elif isinstance(a, np.ndarray):              # a by-value struct (CUtensorMap, ...)
                s = ctypes.create_string_buffer(a.tobytes(), a.nbytes)
            elif isinstance(a, np.int32):
                s = ctypes.c_int32(int(a))
            elif isinstance(a, np.uint64):
                s = ctypes.c_uint64(int(a))
            elif hasattr(a, "data") and hasattr(a.data, "ptr"):
                s = ctypes.c_uint64(a.data.ptr)
            else:
                raise TypeError(f"DriverLaunch cannot pass an argument of type {type(a).__name__}")
            self._storage.append(s)
        self._params = (ctypes.c_void_p * len(self._storage))(*[ctypes.addressof(s) for s in self._storage])
        self._lock = threading.Lock()

    def _set_slots(self, pointers):
        if len(pointers) != len(self._slots):
            raise TypeError(f"DriverLaunch takes {len(self._slots)} slot pointers, got {len(pointers)}")
        for s, p in zip(self._slots, pointers):
            s.value = p

    def parameter_bytes(self, *pointers: int) -> list:
        """The bytes each kernel parameter would be launched with (for tests; no launch)."""
        import ctypes  # noqa: PLC0415
        with self._lock:
            self._set_slots(pointers)
            return [ctypes.string_at(self._params[i], ctypes.sizeof(s)) for i, s in enumerate(self._storage)]

    def __call__(self, stream_ptr: int, *pointers: int):
        """Launch on stream ``stream_ptr`` with the ``SLOT`` arguments set to ``pointers`` (in order)."""
        if DriverLaunch._fn is None:
            DriverLaunch._fn = _cu_launch_kernel()
        with self._lock:                               # the slots are shared by every caller of this plan
            self._set_slots(pointers)
            rc = DriverLaunch._fn(self._func, *self._dims, self._smem, stream_ptr, self._params, None)
        if rc != 0:
            raise RuntimeError(f"cuLaunchKernel failed with CUresult {rc}")
