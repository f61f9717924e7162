"""Tensors as arrays: CPU tensors as NumPy views, CUDA tensors as CuPy views, PyTorch's streams as CuPy
streams, PyTorch's caching allocator behind CuPy's allocations, and CuPy results back as tensors.

No DLPack import per call: a CUDA tensor becomes a CuPy ``ndarray`` over ``UnownedMemory`` at the tensor's
address, memoised per (address, shape, strides, dtype, device) with no reference to the tensor.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import Tensor

from twell import _backend as B

F32, F64 = torch.float32, torch.float64


# --------------------------------------------------------------------------- dtypes


def np_dtype_of(torch_dtype):
    """NumPy dtype of a torch float dtype (bfloat16 through ml_dtypes), or None."""
    if torch_dtype == torch.bfloat16:
        return B.bfloat16_dtype()
    return {torch.float16: np.dtype(np.float16), torch.float32: np.dtype(np.float32),
            torch.float64: np.dtype(np.float64), torch.int32: np.dtype(np.int32),
            torch.int64: np.dtype(np.int64)}.get(torch_dtype)


def l1_dtype(x):
    """dtype of the L1 value of a call on ``x``: float64 for float64 inputs, else float32."""
    return F64 if x.dtype == F64 else F32


def _dtype_error(name, t):
    return TypeError(f"{name} must have dtype in {{bfloat16, float16, float32}} on CUDA (float32 / float64, "
                     f"and bfloat16 / float16 with ml_dtypes, on the CPU reference), got {t.dtype}")


# --------------------------------------------------------------------------- CPU tensors <-> NumPy


def host_array(t: Tensor, name: str):
    """Zero-copy NumPy view of a CPU tensor (bfloat16 as an ml_dtypes array)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        bf = B.bfloat16_dtype()
        if bf is None:
            raise TypeError(f"{name} is a bfloat16 CPU tensor: the CPU reference needs ml_dtypes for bfloat16 "
                            "(pip install ml_dtypes), or pass float32 / float64")
        return t.view(torch.int16).numpy().view(bf)
    if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise _dtype_error(name, t)
    return t.numpy()


def from_host(a) -> Tensor:
    """A NumPy array as a CPU tensor (zero-copy when writeable; bfloat16 through an int16 view)."""
    a = np.asarray(a)
    bf = B.bfloat16_dtype()
    if bf is not None and a.dtype == bf:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    if not a.flags.writeable:
        a = a.copy()
    return torch.from_numpy(a)


def check_devices(x: Tensor, named) -> int:
    """x's CUDA device index (-1: CPU) after checking every tensor is where x is."""
    dev = x.get_device()
    for name, w in named:
        if not isinstance(w, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
        wd = w.get_device()
        if wd != dev:
            if wd < 0 or dev < 0:
                raise TypeError(f"tensors must all be on the CPU or all on one CUDA device: x is on {x.device}, "
                                f"{name} on {w.device}")
            raise ValueError(f"{name} is on {w.device} but x is on {x.device}: every tensor must be on x's device")
    return dev


# --------------------------------------------------------------------------- CUDA tensors <-> CuPy

_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_raw_alloc = getattr(torch._C, "_cuda_cudaCachingAllocator_raw_alloc", None)
_raw_delete = getattr(torch._C, "_cuda_cudaCachingAllocator_raw_delete", None)


def evict_oldest(cache: dict, size: int):
    """Make room in a bounded memo dict (tolerates another thread evicting at the same time)."""
    while len(cache) >= size:
        try:
            cache.pop(next(iter(cache)), None)
        except (RuntimeError, StopIteration):
            break


def current_stream_ptr(dev: int) -> int:
    """PyTorch's current stream on ``dev`` (its address)."""
    if _raw_stream is not None:
        return _raw_stream(dev)
    return torch.cuda.current_stream(dev).cuda_stream


class StreamRef:
    """The CUDA stream protocol for one raw stream pointer (what ``cupy.cuda.Stream.from_external`` reads)."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)


class _TorchBlock:
    """Owner of one block of PyTorch's caching allocator handed to CuPy (freed when CuPy lets it go)."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __del__(self):
        try:
            if _raw_delete is not None:
                _raw_delete(self.ptr)
            else:
                torch.cuda.caching_allocator_delete(self.ptr)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class CudaInterop:
    """CUDA tensors as CuPy arrays for one CuPy module: memoised views, PyTorch's current stream as a CuPy
    stream (one wrapper per stream pointer), and CuPy allocators drawing from PyTorch's caching allocator.

    ``raw_stream(dev) -> int`` gives PyTorch's current stream pointer on ``dev`` (default: PyTorch's own
    accessor).  :func:`cuda_interop` returns the instance every call uses.
    """

    VIEW_CACHE_SIZE = 1024
    STREAM_CACHE_SIZE = 64

    def __init__(self, cp, *, raw_stream=None):
        self.cp = cp
        self._raw_stream = current_stream_ptr if raw_stream is None else raw_stream
        self._views: dict = {}          # (ptr, shape, strides, dtype, device) -> view (no reference to any tensor)
        self._streams: dict = {}        # (stream pointer, device) -> cupy Stream wrapping PyTorch's stream
        self._mallocs: dict = {}        # (device, stream pointer) -> CuPy allocator over PyTorch's

    def _make_view(self, key, name):
        cp = self.cp
        ptr, shape, strides, tdtype, dev = key
        dt = np_dtype_of(tdtype)
        if dt is None:
            raise TypeError(f"{name} must have dtype in {{bfloat16, float16, float32}}, got {tdtype}")
        itemsize = dt.itemsize
        if any(s == 0 for s in shape):
            nbytes = 0
        else:
            nbytes = itemsize * (1 + sum((n - 1) * abs(s) for n, s in zip(shape, strides)))
        if any(s < 0 for s in strides):      # torch has no negative strides; keep the rule explicit
            raise ValueError(f"{name} has negative strides")
        mem = cp.cuda.UnownedMemory(ptr, nbytes, None, dev)
        view = cp.ndarray(tuple(shape), dt, cp.cuda.MemoryPointer(mem, 0), tuple(s * itemsize for s in strides))
        evict_oldest(self._views, self.VIEW_CACHE_SIZE)
        self._views[key] = view
        return view

    def view(self, t: Tensor, dev: int, name: str):
        """CuPy array over ``t``'s memory (memoised; holds no reference to ``t``)."""
        key = (t.data_ptr(), t.shape, t.stride(), t.dtype, dev)
        v = self._views.get(key)
        return self._make_view(key, name) if v is None else v

    def stream_ptr(self, dev: int) -> int:
        """PyTorch's current stream on ``dev`` (its address)."""
        return self._raw_stream(dev)

    def stream(self, dev: int):
        """PyTorch's current stream on ``dev`` as a CuPy stream (one wrapper per stream pointer)."""
        ptr = self._raw_stream(dev)
        s = self._streams.get((ptr, dev))
        if s is None:
            cp = self.cp
            from_external = getattr(cp.cuda.Stream, "from_external", None)
            if from_external is not None:
                s = from_external(StreamRef(ptr))
            else:                                                   # CuPy < 14
                s = cp.cuda.ExternalStream(ptr, dev)
            evict_oldest(self._streams, self.STREAM_CACHE_SIZE)
            self._streams[(ptr, dev)] = s
        return s

    def torch_malloc(self, dev: int, stream_ptr: int):
        """A CuPy allocator drawing from PyTorch's caching allocator, blocks tied to (dev, stream) as PyTorch's
        own allocations on that stream are."""
        key = (dev, stream_ptr)
        f = self._mallocs.get(key)
        if f is None:
            cp = self.cp

            def malloc(size: int):
                if size == 0:
                    return cp.cuda.MemoryPointer(cp.cuda.UnownedMemory(0, 0, None, dev), 0)
                if _raw_alloc is not None and torch.cuda.current_device() == dev:
                    ptr = _raw_alloc(size, stream_ptr)
                else:
                    ptr = torch.cuda.caching_allocator_alloc(size, dev, stream_ptr)
                return cp.cuda.MemoryPointer(cp.cuda.UnownedMemory(ptr, size, _TorchBlock(ptr), dev), 0)

            evict_oldest(self._mallocs, self.STREAM_CACHE_SIZE)
            self._mallocs[key] = f = malloc
        return f

    @contextlib.contextmanager
    def on_device(self, dev: int, torch_memory: bool = False, stream=None):
        """CuPy's current device and stream set to ``dev`` and PyTorch's current stream there (or ``stream``);
        with ``torch_memory``, CuPy allocations come from PyTorch's caching allocator."""
        cp = self.cp
        if stream is None:
            stream = self.stream(dev)
        with contextlib.ExitStack() as stack:
            if cp.cuda.runtime.getDevice() != dev:
                stack.enter_context(cp.cuda.Device(dev))
            stack.enter_context(stream)
            if torch_memory:
                stack.enter_context(cp.cuda.using_allocator(self.torch_malloc(dev, stream.ptr)))
            yield stream


_shared: list = []          # the CudaInterop every call uses, made on the first CUDA call


def cuda_interop() -> CudaInterop:
    """The :class:`CudaInterop` of CuPy's device runtime (raises when CuPy has no CUDA device)."""
    if _shared:
        return _shared[0]
    cp = B.cupy_or_none()
    if cp is None:
        raise RuntimeError("CUDA tensors need CuPy with a CUDA device (pip install 'twell[cuda13]' or "
                           "'twell[cuda12]'); CPU tensors run the NumPy reference")
    ci = CudaInterop(cp)
    if not _shared:
        _shared.append(ci)
    return _shared[0]


def view(t: Tensor, dev: int, name: str):
    """:meth:`CudaInterop.view` of :func:`cuda_interop`."""
    return cuda_interop().view(t, dev, name)


def stream(dev: int):
    """:meth:`CudaInterop.stream` of :func:`cuda_interop`."""
    return cuda_interop().stream(dev)


def on_device(dev: int, torch_memory: bool = False, stream=None):
    """:meth:`CudaInterop.on_device` of :func:`cuda_interop`."""
    return cuda_interop().on_device(dev, torch_memory, stream)


class _CudaArray:
    """A ``__cuda_array_interface__`` (v2, no stream: no synchronisation) that keeps its owner alive."""

    def __init__(self, cai: dict, owner):
        self.__cuda_array_interface__ = cai
        self.owner = owner


def to_torch(a, dev: int) -> Tensor:
    """A CuPy array as a torch tensor sharing its memory (the tensor keeps the array alive)."""
    bf = B.bfloat16_dtype()
    is_bf16 = bf is not None and a.dtype == bf
    tdtype = torch.bfloat16 if is_bf16 else torch.from_numpy(np.empty(0, a.dtype)).dtype
    if a.size == 0:
        return torch.empty(tuple(a.shape), dtype=tdtype, device=torch.device("cuda", dev))
    cai = {"shape": tuple(a.shape), "typestr": "<i2" if is_bf16 else a.dtype.str, "data": (a.data.ptr, False),
           "strides": None if a.flags.c_contiguous else tuple(a.strides), "version": 2}
    t = torch.as_tensor(_CudaArray(cai, a), device=torch.device("cuda", dev))
    return t.view(torch.bfloat16) if is_bf16 else t
