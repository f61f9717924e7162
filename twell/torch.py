"""PyTorch adapter: twell's FFN ops on torch tensors, differentiable, ``torch.compile``-able, graph-capturable.

``import twell.torch`` (the ``[torch]`` extra); ``import twell`` alone never imports PyTorch.

* :func:`gated_ffn` / :func:`ffn` take and return tensors of shape ``(..., d)`` (leading dimensions are
  flattened to ``(M, d)`` and restored).  CUDA tensors run the kernels on PyTorch's current stream; CPU
  tensors run the NumPy reference (float64 math), so ``torch.autograd.gradcheck`` works on CPU float64.
* Without autograd (``torch.is_grad_enabled()`` False, or no input requiring grad) the call is the
  inference op :func:`twell.gated_ffn` (fastest path, capturable in ``torch.cuda.graph`` for M <= 512 or
  ``path="dense"``); with autograd it is :func:`twell.gated_ffn_forward` / :func:`twell.gated_ffn_backward`.
* :class:`SparseGatedFFN` is an ``nn.Module`` holding the three weights in twell's neuron-major layout.

How it is wired (docs/frameworks.md, "PyTorch"):

* ``torch.library.custom_op`` ops ``twell::gated_ffn`` (inference), ``twell::ffn`` (non-gated, with a
  dense-masked backward), ``twell::gated_ffn_fwd`` and ``twell::gated_ffn_bwd`` (training), each with a
  fake (meta) implementation, and ``register_autograd`` on the forward ops: ``torch.compile`` traces
  them as opaque nodes without graph breaks.
* The training forward's saved state (a :class:`twell.SavedForBackward` with data-dependent sizes) is
  not a tensor: it lives in a bounded registry keyed by an int64 *handle*, a CPU 0-d tensor returned as
  an extra output of ``twell::gated_ffn_fwd`` and passed to ``twell::gated_ffn_bwd``.  The backward
  consumes it; a second backward through the same graph raises :class:`RuntimeError` (unless the forward
  ran inside :func:`retain_saved_state`).
* Tensors become CuPy arrays without DLPack: a CuPy ``ndarray`` over ``UnownedMemory`` at the tensor's
  address, memoised per (address, shape, strides, dtype, device) with no reference to the tensor.
  Outputs of the inference op are allocated by PyTorch (``torch.empty``) and passed as ``out=``.
* Eager inference calls with plain tensors skip the dispatcher (a custom op costs tens of microseconds
  per call); ``torch.compile``, fake tensors, dispatch / function modes and tensor subclasses go through
  the registered op.  Both run the same code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import threading
import warnings
import weakref
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from . import _backend as B
from . import ops as _ops
from .dispatch import DensityTracker, check_path
from .format import DEFAULT_COMPRESSION, DEFAULT_TILE_WIDTH
from .ops import DEFAULT_INFERENCE_ROW_THRESHOLD
from .results import FFNStats

__all__ = [
    "gated_ffn", "ffn", "SparseGatedFFN", "TorchFFNStats", "retain_saved_state",
    "MAX_SAVED_STATES", "TORCH_MEMORY", "saved_state_count",
]

#: Most training-forward states kept for their backward at once (oldest evicted first, with a warning).
#: In eager mode a state is also freed when its autograd graph is; under ``torch.compile`` only the
#: backward (or this bound) frees it.
MAX_SAVED_STATES = 512
#: Training calls and inference batches of more than 512 rows allocate twell's device memory (saved state,
#: gradients, temporaries) from PyTorch's caching allocator, so one pool serves the whole model; False:
#: CuPy's memory pool.  Small inference batches always use CuPy's pool (fewer host operations per call).
TORCH_MEMORY = True
#: Inference batches above this many rows allocate from PyTorch's pool (when TORCH_MEMORY).
_TORCH_MEMORY_ROWS = 512

_F32, _F64 = torch.float32, torch.float64
_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)


# --------------------------------------------------------------------------- dtypes


def _np_dtype_of(torch_dtype):
    """NumPy dtype of a torch float dtype (bfloat16 through ml_dtypes), or None."""
    if torch_dtype == torch.bfloat16:
        return B.bfloat16_dtype()
    return {torch.float16: np.dtype(np.float16), torch.float32: np.dtype(np.float32),
            torch.float64: np.dtype(np.float64), torch.int32: np.dtype(np.int32),
            torch.int64: np.dtype(np.int64)}.get(torch_dtype)


def _dtype_error(name, t):
    return TypeError(f"{name} must have dtype in {{bfloat16, float16, float32}} on CUDA (float32 / float64, "
                     f"and bfloat16 / float16 with ml_dtypes, on the CPU reference), got {t.dtype}")


# --------------------------------------------------------------------------- CPU tensors <-> NumPy


def _host_array(t: Tensor, name: str):
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


def _from_host(a) -> Tensor:
    a = np.asarray(a)
    bf = B.bfloat16_dtype()
    if bf is not None and a.dtype == bf:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    if not a.flags.writeable:
        a = a.copy()
    return torch.from_numpy(a)


# --------------------------------------------------------------------------- CUDA tensors <-> CuPy

_cp = None
_inference = None           # twell.gpu.inference, imported with CuPy
_views: dict = {}           # (ptr, shape, strides, dtype, device) -> CuPy view (no reference to any tensor)
_VIEW_CACHE_SIZE = 1024
_streams: dict = {}         # (stream pointer, device) -> cupy Stream wrapping PyTorch's stream
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _cupy():
    global _cp, _inference
    if _cp is None:
        cp = B.cupy_or_none()
        if cp is None:
            raise RuntimeError("CUDA tensors need CuPy with a CUDA device (pip install 'twell[cuda13]' or "
                               "'twell[cuda12]'); CPU tensors run the NumPy reference")
        from .gpu import inference  # noqa: PLC0415
        _inference = inference
        _cp = cp
    return _cp


def _evict_oldest(cache: dict, size: int):
    """Make room in a bounded memo dict (tolerates another thread evicting at the same time)."""
    while len(cache) >= size:
        try:
            cache.pop(next(iter(cache)), None)
        except (RuntimeError, StopIteration):
            break


def _make_view(key, name):
    cp = _cupy()
    ptr, shape, strides, tdtype, dev = key
    dt = _np_dtype_of(tdtype)
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
    _evict_oldest(_views, _VIEW_CACHE_SIZE)
    _views[key] = view
    return view


def _view(t: Tensor, dev: int, name: str):
    """CuPy array over ``t``'s memory (memoised; holds no reference to ``t``)."""
    key = (t.data_ptr(), t.shape, t.stride(), t.dtype, dev)
    v = _views.get(key)
    return _make_view(key, name) if v is None else v


class _StreamRef:
    """The CUDA stream protocol for one raw stream pointer (what ``cupy.cuda.Stream.from_external`` reads)."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)


def _current_stream_ptr(dev: int) -> int:
    if _raw_stream is not None:
        return _raw_stream(dev)
    return torch.cuda.current_stream(dev).cuda_stream


def _stream(dev: int):
    """PyTorch's current stream on ``dev`` as a CuPy stream (one wrapper per stream pointer)."""
    ptr = _current_stream_ptr(dev)
    s = _streams.get((ptr, dev))
    if s is None:
        cp = _cupy()
        from_external = getattr(cp.cuda.Stream, "from_external", None)
        if from_external is not None:
            s = from_external(_StreamRef(ptr))
        else:                                                   # CuPy < 14
            s = cp.cuda.ExternalStream(ptr, dev)
        _evict_oldest(_streams, 64)
        _streams[(ptr, dev)] = s
    return s


class _CudaArray:
    """A ``__cuda_array_interface__`` (v2, no stream: no synchronisation) that keeps its owner alive."""

    def __init__(self, cai: dict, owner):
        self.__cuda_array_interface__ = cai
        self.owner = owner


def _to_torch(a, dev: int) -> Tensor:
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


_raw_alloc = getattr(torch._C, "_cuda_cudaCachingAllocator_raw_alloc", None)
_raw_delete = getattr(torch._C, "_cuda_cudaCachingAllocator_raw_delete", None)


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


_torch_mallocs: dict = {}


def _torch_malloc(dev: int, stream_ptr: int):
    """A CuPy allocator drawing from PyTorch's caching allocator, blocks tied to (dev, stream) as PyTorch's
    own allocations on that stream are."""
    key = (dev, stream_ptr)
    f = _torch_mallocs.get(key)
    if f is None:
        cp = _cupy()

        def malloc(size: int):
            if size == 0:
                return cp.cuda.MemoryPointer(cp.cuda.UnownedMemory(0, 0, None, dev), 0)
            if _raw_alloc is not None and torch.cuda.current_device() == dev:
                ptr = _raw_alloc(size, stream_ptr)
            else:
                ptr = torch.cuda.caching_allocator_alloc(size, dev, stream_ptr)
            return cp.cuda.MemoryPointer(cp.cuda.UnownedMemory(ptr, size, _TorchBlock(ptr), dev), 0)

        _evict_oldest(_torch_mallocs, 64)
        _torch_mallocs[key] = f = malloc
    return f


@contextlib.contextmanager
def _on_device(dev: int, torch_memory: bool = False, stream=None):
    """CuPy's current device and stream set to ``dev`` and PyTorch's current stream there; with
    ``torch_memory`` (and :data:`TORCH_MEMORY`), CuPy allocations come from PyTorch's caching allocator."""
    cp = _cupy()
    if stream is None:
        stream = _stream(dev)
    with contextlib.ExitStack() as stack:
        if cp.cuda.runtime.getDevice() != dev:
            stack.enter_context(cp.cuda.Device(dev))
        stack.enter_context(stream)
        if torch_memory and TORCH_MEMORY:
            stack.enter_context(cp.cuda.using_allocator(_torch_malloc(dev, stream.ptr)))
        yield stream


def _check_devices(x: Tensor, named) -> int:
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


# --------------------------------------------------------------------------- registries (ints in op schemas)

_registry_lock = threading.Lock()
_trackers: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_slots: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_ids = itertools.count(1)


def _tracker_id(tracker) -> int:
    if tracker is None:
        return -1
    tid = getattr(tracker, "_twell_torch_id", None)
    if tid is None:
        if not isinstance(tracker, DensityTracker):
            raise TypeError(f"tracker must be a twell.DensityTracker or None, got {type(tracker).__name__}")
        with _registry_lock:
            tid = next(_ids)
            _trackers[tid] = tracker
        tracker._twell_torch_id = tid
    return tid


def _tracker_of(tid: int):
    return None if tid < 0 else _trackers.get(tid)


class _StatsSlot:
    """Where a :class:`SparseGatedFFN` call leaves its raw :class:`FFNStats` (written by the op)."""

    __slots__ = ("stats", "device", "__weakref__")

    def __init__(self):
        self.stats = None
        self.device = None

    def put(self, stats, device):
        self.stats = None if stats is None else TorchFFNStats(stats, device)
        self.device = device


def _new_slot():
    slot = _StatsSlot()
    with _registry_lock:
        sid = next(_ids)
        _slots[sid] = slot
    return slot, sid


def _slot_of(sid: int):
    return None if sid < 0 else _slots.get(sid)


# saved states of training forwards by handle, and the handles whose state a backward consumed (so that a
# second backward can say so); both bounded.  Handles made under retain_saved_state() are in _retained: their
# backward never consumes them.
_saved: dict = {}
_consumed: dict = {}
_retained: set = set()
_local = threading.local()
_CONSUMED_KEPT = 4096
_handles = itertools.count(1)


def saved_state_count() -> int:
    """Training-forward states currently kept for a backward."""
    with _registry_lock:
        return len(_saved)


@contextlib.contextmanager
def retain_saved_state():
    """Training forwards run inside keep their saved state through any number of backward passes (until
    their graph is freed, or :data:`MAX_SAVED_STATES` evicts them), as autograd's ``retain_graph=True``
    expects; ``torch.autograd.gradcheck`` needs it.  Outside, a backward frees the state."""
    previous = getattr(_local, "retain", False)
    _local.retain = True
    try:
        yield
    finally:
        _local.retain = previous


def _register_state(saved) -> int:
    retain = getattr(_local, "retain", False)
    with _registry_lock:
        h = next(_handles)
        _saved[h] = saved
        if retain:
            _retained.add(h)
        evicted = 0
        while len(_saved) > MAX_SAVED_STATES:
            old = next(iter(_saved))
            del _saved[old]
            _retained.discard(old)
            evicted += 1
    if evicted:
        warnings.warn(f"twell.torch: evicted {evicted} saved training state(s) whose backward has not run "
                      f"(more than twell.torch.MAX_SAVED_STATES = {MAX_SAVED_STATES} alive); their backward "
                      "will raise", RuntimeWarning, stacklevel=3)
    return h


def _release_state(h: int):
    with _registry_lock:
        _saved.pop(h, None)
        _consumed.pop(h, None)
        _retained.discard(h)


class _Release:
    """Frees a handle's saved state when its autograd graph goes (held by the eager autograd context)."""

    __slots__ = ("handle",)

    def __init__(self, handle: int):
        self.handle = handle

    def __del__(self):
        try:
            _release_state(self.handle)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


_CONSUMED_MESSAGE = (
    "twell.torch: the saved state of this gated_ffn forward was already consumed by a backward. twell keeps one "
    "sparse copy of the activations for the backward and frees it there, so backpropagating twice through the "
    "same graph (retain_graph=True) frees it at the first: run the forward again before the second backward, add "
    "the losses and call backward once, or run the forward inside `with twell.torch.retain_saved_state():` (keeps "
    "the state until the graph is freed)")


def _take_state(h: int):
    """(saved state, retained) of a handle, or the error saying why there is none."""
    with _registry_lock:
        saved = _saved.get(h)
        consumed = h in _consumed
        retained = h in _retained
    if consumed:
        raise RuntimeError(_CONSUMED_MESSAGE)
    if saved is None:
        raise RuntimeError(
            f"twell.torch: no saved state for this backward (handle {h}): it was evicted because more than "
            f"twell.torch.MAX_SAVED_STATES = {MAX_SAVED_STATES} forward states were alive at once (raise it), or "
            "its graph was already freed")
    return saved, retained


def _mark_consumed(h: int):
    with _registry_lock:
        if _saved.pop(h, None) is not None:
            _consumed[h] = None
            while len(_consumed) > _CONSUMED_KEPT:
                del _consumed[next(iter(_consumed))]


# --------------------------------------------------------------------------- statistics


class TorchFFNStats:
    """:class:`twell.FFNStats` of one call as torch tensors and host values.

    Tensor fields are converted when first read and never synchronise: ``nnz`` (int64), ``l0`` and ``l1``
    (float64, ``l1`` None for inference) are 0-d tensors and ``neuron_counts`` an int32 ``(n,)`` tensor on
    the call's device, ready when the call's stream reaches them (``float(stats.l0)`` waits for them).
    ``n_rows``, ``n_cols``, ``n_backup_rows``, ``n_overflow_rows``, ``gate_kernel`` and ``path`` are host
    values.  ``raw`` is the core's :class:`~twell.FFNStats`; :meth:`to_dict` copies everything to the host.
    """

    __slots__ = ("raw", "device", "_cache")

    def __init__(self, raw: FFNStats, device):
        self.raw = raw
        self.device = device
        self._cache = {}

    def _tensor(self, name):
        if name not in self._cache:
            v = getattr(self.raw, name)
            if v is None:
                t = None
            elif isinstance(v, (np.ndarray, np.generic, int, float)):
                t = torch.from_numpy(np.array(v))
            else:
                t = _to_torch(v, self.device.index)
            self._cache[name] = t
        return self._cache[name]

    nnz = property(lambda self: self._tensor("nnz"), doc="Active hidden activations in the batch (0-d int64).")
    l0 = property(lambda self: self._tensor("l0"), doc="Mean active neurons per token (0-d float64).")
    l1 = property(lambda self: self._tensor("l1"), doc="(1/M) Σ|h| (training; 0-d float64), else None.")
    neuron_counts = property(lambda self: self._tensor("neuron_counts"),
                             doc="Tokens on which each neuron was active (int32 (n,)).")
    n_rows = property(lambda self: int(self.raw.n_rows))
    n_cols = property(lambda self: int(self.raw.n_cols))
    n_backup_rows = property(lambda self: int(self.raw.n_backup_rows))
    n_overflow_rows = property(lambda self: self.raw.n_overflow_rows)
    gate_kernel = property(lambda self: self.raw.gate_kernel)
    path = property(lambda self: self.raw.path)

    def to_dict(self) -> dict:
        """Every statistic as host Python values (synchronises on the GPU)."""
        return self.raw.to_dict()

    def __repr__(self) -> str:
        return (f"TorchFFNStats(n_rows={self.n_rows}, n_cols={self.n_cols}, path={self.path!r}, "
                f"n_backup_rows={self.n_backup_rows}, gate_kernel={self.gate_kernel!r})")


# --------------------------------------------------------------------------- implementations (real tensors)


def _infer_impl(x, w_first, w_up, w_down, gated, tile_width, compression, threshold, gate_kernel, path, tracker,
                slot):
    """The inference op on real 2-D tensors: y (M, d), allocated by PyTorch."""
    named = (("w_gate", w_first), ("w_up", w_up), ("w_down", w_down)) if gated else (("w_up", w_up),
                                                                                    ("w_down", w_down))
    dev = _check_devices(x, named)
    op = _ops.gated_ffn if gated else _ops.ffn
    if dev < 0:
        arrays = {"x": _host_array(x, "x")}
        arrays.update((k, _host_array(w, k)) for k, w in named)
        res = op(*arrays.values(), tile_width=tile_width, compression=compression, dense_row_threshold=threshold,
                 return_stats=slot is not None, gate_kernel=gate_kernel, path=path, tracker=tracker)
        if slot is None:
            return _from_host(res)
        slot.put(res[1], x.device)
        return _from_host(res[0])
    cp = _cupy()
    y = x.new_empty(x.shape)           # contiguous, PyTorch-owned
    cx = _view(x, dev, "x")
    if gated:
        cw = {"w_gate": _view(w_first, dev, "w_gate"), "w_up": _view(w_up, dev, "w_up"),
              "w_down": _view(w_down, dev, "w_down")}
    else:
        cw = {"w_up": _view(w_up, dev, "w_up"), "w_down": _view(w_down, dev, "w_down")}
    cy = _view(y, dev, "out")
    stream = _stream(dev)
    args = (op, cx, cw, cy, gated, tile_width, compression, threshold, gate_kernel, path, tracker, slot, stream)
    if x.shape[0] <= _TORCH_MEMORY_ROWS and cp.cuda.runtime.getDevice() == dev:
        with stream:                    # the common case without contextlib's cost
            res, want = _infer_run(*args)
    else:
        with _on_device(dev, torch_memory=True, stream=stream):
            res, want = _infer_run(*args)
    if slot is not None:
        slot.put(res[1] if want else None, x.device)
    return y


def _infer_run(op, cx, cw, cy, gated, tile_width, compression, threshold, gate_kernel, path, tracker, slot, stream):
    """The inference call on CuPy views, inside the device / stream context; returns (result, stats asked).

    Inside a CUDA-graph capture no statistics are kept (their memory would belong to the graph) and the
    tracker is not consulted: reading a dense call's pending observation synchronises, which a capture
    forbids; ``path="auto"`` then captures the sparse path (``path="dense"`` the dense one)."""
    capturing = (slot is not None or tracker is not None) and stream.is_capturing()
    if capturing:
        tracker = None
    want = slot is not None and not capturing
    fast = _ops._fast_cupy_args(cx, cw)
    if fast is not None:
        # every argument is a well-formed CuPy array (the core's own fast check) and out is fresh: what is left
        # are the options' checks, memoised in the core
        thr = _ops._inference_threshold(threshold, fast[1], tile_width, compression)
        _ops._check_gate_kernel(gate_kernel)
        check_path(path)
        res = _inference.forward(cx, cw["w_gate"] if gated else cw["w_up"], cw["w_up"], cw["w_down"], gated=gated,
                                 tile_width=tile_width, compression=compression, threshold=thr, return_stats=want,
                                 out=cy, gate_kernel=gate_kernel, path=path, tracker=tracker)
    else:           # the public op: its full checks raise the precise error (or copy a misaligned view)
        res = op(cx, *cw.values(), tile_width=tile_width, compression=compression, dense_row_threshold=threshold,
                 return_stats=want, out=cy, gate_kernel=gate_kernel, path=path, tracker=tracker)
    return res, want


def _l1_dtype(x):
    return _F64 if x.dtype == _F64 else _F32


def _train_fwd_impl(x, w_gate, w_up, w_down, l1_weight, threshold, gate_kernel, path, tracker, slot, keep_state):
    """The training forward on real 2-D tensors: (y, l1 (0-d), handle (CPU int64 0-d; 0 if not kept))."""
    named = (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down))
    dev = _check_devices(x, named)
    if dev < 0:
        arrays = [_host_array(x, "x")] + [_host_array(w, k) for k, w in named]
        y, saved, stats = _ops.gated_ffn_forward(*arrays, l1_weight=l1_weight, dense_row_threshold=threshold,
                                                 gate_kernel=gate_kernel, path=path, tracker=tracker)
        y_t = _from_host(y)
        l1 = torch.tensor(float(stats.l1), dtype=_l1_dtype(x))
    else:
        cx = _view(x, dev, "x")
        cw = [_view(w, dev, k) for k, w in named]
        with _on_device(dev, torch_memory=True):
            y, saved, stats = _ops.gated_ffn_forward(cx, *cw, l1_weight=l1_weight, dense_row_threshold=threshold,
                                                     gate_kernel=gate_kernel, path=path, tracker=tracker)
            y_t = _to_torch(y, dev)
            l1 = _to_torch(stats.l1, dev).to(_l1_dtype(x))
    if slot is not None:
        slot.put(stats, x.device)
    h = _register_state(saved) if keep_state else 0
    return y_t, l1, torch.tensor(h, dtype=torch.int64)


def _train_bwd_impl(dy, dl1, handle, x):
    """The training backward: (dx, dw_gate, dw_up, dw_down) from the handle's saved state."""
    h = int(handle)
    kept, retained = _take_state(h)
    # the core marks what it is given consumed: give it a shallow copy (the registry says what is consumed),
    # with λ plus the gradient of l1 when l1 is used in the loss (a host read of that gradient)
    saved = dataclasses.replace(kept, l1_weight=float(kept.l1_weight) + (0.0 if dl1 is None else float(dl1)))
    dy = dy.contiguous()
    dev = x.get_device()
    try:
        if dy.get_device() != dev:
            raise ValueError(f"the gradient of y is on {dy.device} but the forward ran on {x.device}")
        if dev < 0:
            grads = _ops.gated_ffn_backward(saved, _host_array(dy, "dy"))
            return tuple(_from_host(g) for g in grads)
        cdy = _view(dy, dev, "dy")
        with _on_device(dev, torch_memory=True):
            grads = _ops.gated_ffn_backward(saved, cdy)
            return tuple(_to_torch(g, dev) for g in grads)
    finally:
        if saved.consumed and not retained:
            _mark_consumed(h)


# --------------------------------------------------------------------------- fake (meta) implementations


def _fake_check(x, named):
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, d), got shape {tuple(x.shape)}")
    m, d = x.shape
    n = None
    for name, w in named:
        if w.dim() != 2:
            raise ValueError(f"{name} must be 2-D (n, d), got shape {tuple(w.shape)}")
        if w.dtype != x.dtype:
            raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {w.dtype}")
        if w.shape[1] != d:
            raise ValueError(f"{name} must have shape (n, d) with d = x.shape[1] = {d}, got {tuple(w.shape)}")
        if n is None:
            n = w.shape[0]
        elif w.shape[0] != n:
            raise ValueError(f"{name} must have n = {n} rows like the other weights, got {tuple(w.shape)}")


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("twell::gated_ffn", mutates_args=())
def _gated_ffn_op(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, tile_width: int, compression: int,
                  dense_row_threshold: Optional[int], gate_kernel: str, path: str, tracker_id: int,
                  stats_slot: int) -> Tensor:
    return _infer_impl(x, w_gate, w_up, w_down, True, tile_width, compression, dense_row_threshold, gate_kernel,
                       path, _tracker_of(tracker_id), _slot_of(stats_slot))


@_gated_ffn_op.register_fake
def _(x, w_gate, w_up, w_down, tile_width, compression, dense_row_threshold, gate_kernel, path, tracker_id,
      stats_slot):
    _fake_check(x, (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)))
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("twell::ffn", mutates_args=())
def _ffn_op(x: Tensor, w_up: Tensor, w_down: Tensor, l1_weight: float, tile_width: int, compression: int,
            dense_row_threshold: Optional[int], gate_kernel: str, path: str, tracker_id: int,
            stats_slot: int) -> Tensor:
    return _infer_impl(x, w_up, w_up, w_down, False, tile_width, compression, dense_row_threshold, gate_kernel,
                       path, _tracker_of(tracker_id), _slot_of(stats_slot))


@_ffn_op.register_fake
def _(x, w_up, w_down, l1_weight, tile_width, compression, dense_row_threshold, gate_kernel, path, tracker_id,
      stats_slot):
    _fake_check(x, (("w_up", w_up), ("w_down", w_down)))
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _ffn_setup_context(ctx, inputs, output):
    x, w_up, w_down, l1_weight = inputs[:4]
    ctx.save_for_backward(x, w_up, w_down)
    ctx.l1_weight = l1_weight


def _ffn_backward(ctx, dy):
    """y = relu(x w_upᵀ) w_down differentiated with dense torch ops masked to relu's pattern (no sparse
    non-gated backward in the core): z = x w_upᵀ is recomputed, dz = (dy w_downᵀ + (λ/M) sign(h)) on the
    pattern, dx = dz w_up, dw_up = dzᵀ x, dw_down = hᵀ dy."""
    x, w_up, w_down = ctx.saved_tensors
    need = ctx.needs_input_grad
    z = x @ w_up.mT
    active = ~(z <= 0)                          # NaN counts as active, like the forward's relu
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    h = torch.where(active, z, zero)
    dh = dy @ w_down.mT
    if ctx.l1_weight:
        dh = dh + (ctx.l1_weight / x.shape[0]) * torch.sign(h)
    dz = torch.where(active, dh, zero)
    dx = dz @ w_up if need[0] else None
    dw_up = dz.mT @ x if need[1] else None
    dw_down = h.mT @ dy if need[2] else None
    return (dx, dw_up, dw_down) + (None,) * 8


_ffn_op.register_autograd(_ffn_backward, setup_context=_ffn_setup_context)


@torch.library.custom_op("twell::gated_ffn_fwd", mutates_args=())
def _gated_ffn_fwd_op(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, l1_weight: float,
                      dense_row_threshold: Optional[int], gate_kernel: str, path: str, tracker_id: int,
                      stats_slot: int, keep_state: bool, explicit_l1: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _train_fwd_impl(x, w_gate, w_up, w_down, l1_weight, dense_row_threshold, gate_kernel, path,
                           _tracker_of(tracker_id), _slot_of(stats_slot), keep_state)


@_gated_ffn_fwd_op.register_fake
def _(x, w_gate, w_up, w_down, l1_weight, dense_row_threshold, gate_kernel, path, tracker_id, stats_slot, keep_state,
      explicit_l1):
    _fake_check(x, (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)))
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((), dtype=_l1_dtype(x)),
            torch.empty((), dtype=torch.int64, device="cpu"))


@torch.library.custom_op("twell::gated_ffn_bwd", mutates_args=())
def _gated_ffn_bwd_op(dy: Tensor, dl1: Optional[Tensor], handle: Tensor, x: Tensor, w_gate: Tensor, w_up: Tensor,
                      w_down: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _train_bwd_impl(dy, dl1, handle, x)


@_gated_ffn_bwd_op.register_fake
def _(dy, dl1, handle, x, w_gate, w_up, w_down):
    return tuple(torch.empty_like(a, memory_format=torch.contiguous_format) for a in (x, w_gate, w_up, w_down))


def _fwd_setup_context(ctx, inputs, output):
    x, w_gate, w_up, w_down = inputs[:4]
    explicit_l1 = inputs[11]
    _, _, handle = output
    ctx.save_for_backward(x, w_gate, w_up, w_down, handle)
    ctx.explicit_l1 = explicit_l1
    ctx.set_materialize_grads(False)
    if type(handle) is torch.Tensor:        # eager (not traced): free the state with the graph
        ctx.twell_release = _Release(int(handle))


def _fwd_backward(ctx, dy, dl1, _dhandle):
    x, w_gate, w_up, w_down, handle = ctx.saved_tensors
    dl1 = dl1 if ctx.explicit_l1 else None
    if dy is None and dl1 is None:
        return (None,) * 12
    if dy is None:
        dy = torch.zeros_like(x, memory_format=torch.contiguous_format)
    grads = _gated_ffn_bwd_op(dy, dl1, handle, x, w_gate, w_up, w_down)
    need = ctx.needs_input_grad
    return tuple(g if need[i] else None for i, g in enumerate(grads)) + (None,) * 8


_gated_ffn_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# --------------------------------------------------------------------------- public functions


def _check_options(l1_weight, dense_row_threshold, tile_width, compression, gate_kernel, path):
    """Options checked before anything runs (types the op schemas need); returns (l1_weight, threshold)."""
    if isinstance(l1_weight, bool) or not isinstance(l1_weight, (int, float)):
        raise TypeError(f"l1_weight must be a real number, got {type(l1_weight).__name__}")
    l1_weight = float(l1_weight)
    if not math.isfinite(l1_weight) or l1_weight < 0:
        raise ValueError(f"l1_weight must be finite and >= 0, got {l1_weight}")
    if isinstance(dense_row_threshold, str):
        if dense_row_threshold != "auto":
            raise ValueError(f"dense_row_threshold must be 'auto', None or an integer >= 0, got "
                             f"{dense_row_threshold!r}")
        dense_row_threshold = DEFAULT_INFERENCE_ROW_THRESHOLD
    elif dense_row_threshold is not None:
        if isinstance(dense_row_threshold, bool) or not isinstance(dense_row_threshold, int):
            raise TypeError(f"dense_row_threshold must be 'auto', None or an integer >= 0, got "
                            f"{type(dense_row_threshold).__name__}")
        if dense_row_threshold < 0:
            raise ValueError(f"dense_row_threshold must be >= 0, got {dense_row_threshold}")
    for name, v in (("tile_width", tile_width), ("compression", compression)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an integer, got {type(v).__name__}")
    if gate_kernel not in _ops.GATE_KERNELS:
        raise ValueError(f"gate_kernel must be one of {_ops.GATE_KERNELS}, got {gate_kernel!r}")
    check_path(path)
    return l1_weight, dense_row_threshold


def _eager_plain(tensors) -> bool:
    """True when the registered op would do nothing but call its implementation: eager, no dispatch or
    torch-function mode, plain tensors (so the dispatcher's cost is skipped)."""
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    for t in tensors:
        if type(t) not in _PLAIN_TENSORS:
            return False
    return True


def _check_tensors(named):
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _flat(x, name="x"):
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 2:
        return x
    if x.dim() < 1:
        raise ValueError(f"{name} must have shape (..., d), got a 0-d tensor")
    if x.get_device() >= 0 and not x.is_contiguous():
        raise ValueError(f"{name} must be C-contiguous (row-major) on the GPU path; pass a contiguous copy "
                         f"({name}.contiguous())")
    return x.reshape(-1, x.shape[-1])


def _gated(x, w_gate, w_up, w_down, *, l1_weight, return_l1, tile_width, compression, dense_row_threshold,
           gate_kernel, path, tracker_id, slot_id):
    """gated_ffn with the registry ids resolved by the caller (SparseGatedFFN passes its own)."""
    x2 = _flat(x)
    try:
        grad = torch.is_grad_enabled() and (x.requires_grad or w_gate.requires_grad or w_up.requires_grad
                                            or w_down.requires_grad)
    except AttributeError:
        _check_tensors((("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)))
        raise
    if not grad and not return_l1:
        if not torch.compiler.is_compiling() and _eager_plain((x2, w_gate, w_up, w_down)):
            y = _infer_impl(x2, w_gate, w_up, w_down, True, tile_width, compression, dense_row_threshold,
                            gate_kernel, path, _tracker_of(tracker_id), _slot_of(slot_id))
        else:
            y = _gated_ffn_op(x2, w_gate, w_up, w_down, tile_width, compression, dense_row_threshold, gate_kernel,
                              path, tracker_id, slot_id)
        return y if x2 is x else y.view(x.shape)
    y, l1, _ = _gated_ffn_fwd_op(x2, w_gate, w_up, w_down, l1_weight, dense_row_threshold, gate_kernel, path,
                                 tracker_id, slot_id, grad, bool(return_l1))
    y = y if x2 is x else y.view(x.shape)
    return (y, l1) if return_l1 else y


def gated_ffn(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, *, l1_weight: float = 0.0,
              return_l1: bool = False, tile_width: int = DEFAULT_TILE_WIDTH, compression: int = DEFAULT_COMPRESSION,
              dense_row_threshold="auto", gate_kernel: str = "auto", path: str = "auto",
              tracker: DensityTracker | None = None):
    """Sparse gated FFN ``y = (relu(x w_gateᵀ) ⊙ (x w_upᵀ)) w_down`` on torch tensors, differentiable.

    Parameters
    ----------
    x : Tensor (..., d)
        bfloat16 / float16 / float32 on CUDA (C-contiguous); float32 / float64 (bfloat16 / float16 with
        ml_dtypes) on the CPU, which runs the float64 NumPy reference.
    w_gate, w_up : Tensor (n, d)
        ``nn.Linear(d, n).weight`` layout.
    w_down : Tensor (n, d)
        Neuron-major: the **transpose** of ``nn.Linear(n, d).weight``.
    l1_weight : float
        λ of the L1 penalty ``λ · (1/M) Σ|h|`` whose gradient ``(λ/M) sign(h)`` the backward adds (as in
        the paper's code: the penalty is not part of ``y`` and is not scaled by a loss scale).
    return_l1 : bool
        Also return ``l1 = (1/M) Σ|h|`` (0-d, float32; float64 for float64 inputs), differentiable: adding
        ``λ * l1`` to the loss is the explicit form of the penalty (scaled with the loss).  Its gradient is
        read on the host in the backward (one synchronisation on the GPU).  Runs the training forward.
    tile_width, compression, dense_row_threshold, gate_kernel, path, tracker
        As in :func:`twell.gated_ffn` (``dense_row_threshold="auto"`` is 128, also for training).

    Returns
    -------
    y : Tensor (..., d), dtype of x; ``(y, l1)`` with ``return_l1``.

    Without autograd this is :func:`twell.gated_ffn` (capturable in a CUDA graph for M <= 512 or
    ``path="dense"``); with autograd, :func:`twell.gated_ffn_forward` (one host synchronisation, not
    capturable) and :func:`twell.gated_ffn_backward`.  Gradients go to every input that requires one.
    """
    l1_weight, threshold = _check_options(l1_weight, dense_row_threshold, tile_width, compression, gate_kernel, path)
    return _gated(x, w_gate, w_up, w_down, l1_weight=l1_weight, return_l1=return_l1, tile_width=tile_width,
                  compression=compression, dense_row_threshold=threshold, gate_kernel=gate_kernel, path=path,
                  tracker_id=_tracker_id(tracker), slot_id=-1)


def ffn(x: Tensor, w_up: Tensor, w_down: Tensor, *, l1_weight: float = 0.0, return_l1: bool = False,
        tile_width: int = DEFAULT_TILE_WIDTH, compression: int = DEFAULT_COMPRESSION, dense_row_threshold="auto",
        gate_kernel: str = "auto", path: str = "auto", tracker: DensityTracker | None = None):
    """Sparse non-gated FFN ``y = relu(x w_upᵀ) w_down`` on torch tensors, differentiable.

    The forward is :func:`twell.ffn` (the inference op, with or without autograd).  The backward uses dense
    torch ops masked to relu's pattern (the core has no sparse non-gated backward): it recomputes
    ``z = x w_upᵀ`` and costs about a dense backward.  ``l1_weight`` adds ``(λ/M) sign(h)`` as in
    :func:`gated_ffn`; ``return_l1`` also returns ``(1/M) Σ relu(z)`` computed with torch (one dense GEMM).
    Other parameters as in :func:`gated_ffn`.
    """
    l1_weight, threshold = _check_options(l1_weight, dense_row_threshold, tile_width, compression, gate_kernel, path)
    tracker_id = _tracker_id(tracker)
    x2 = _flat(x)
    try:
        grad = torch.is_grad_enabled() and (x.requires_grad or w_up.requires_grad or w_down.requires_grad)
    except AttributeError:
        _check_tensors((("w_up", w_up), ("w_down", w_down)))
        raise
    if not grad and not torch.compiler.is_compiling() and _eager_plain((x2, w_up, w_down)):
        y = _infer_impl(x2, w_up, w_up, w_down, False, tile_width, compression, threshold, gate_kernel, path,
                        _tracker_of(tracker_id), None)
    else:
        y = _ffn_op(x2, w_up, w_down, l1_weight, tile_width, compression, threshold, gate_kernel, path, tracker_id, -1)
    y = y if x2 is x else y.view(x.shape)
    if not return_l1:
        return y
    l1 = torch.relu(x2 @ w_up.mT).to(_l1_dtype(x2)).sum() / x2.shape[0]
    return y, l1


# --------------------------------------------------------------------------- module


class SparseGatedFFN(nn.Module):
    """Gated FFN ``y = (relu(x W_gateᵀ) ⊙ (x W_upᵀ)) W_down`` with twell's sparse kernels.

    Parameters ``w_gate``, ``w_up``, ``w_down`` all have shape ``(n, d)`` (neuron-major; ``w_down`` is the
    transpose of ``nn.Linear(n, d).weight``), initialised like ``nn.Linear`` (uniform in ±1/sqrt(fan_in):
    fan_in d for gate and up, n for down).

    Parameters
    ----------
    d, n : int
        Model width and hidden width (d_ff).
    l1_weight : float
        λ of the L1 penalty on the hidden activations (gradient added in the backward).
    dense_row_threshold : int or None
        Rows with more active neurons go to the dense backup (default 128).
    path : {"auto", "sparse", "dense"}
        "auto": the module's :attr:`density_tracker` picks sparse or dense from the last call's density;
        set ``module.path = "dense"`` to force the dense computation.
    gate_kernel : str
        As in :func:`twell.gated_ffn`.
    collect_stats : bool
        Keep each call's statistics in :attr:`last_stats` (costs a count kernel; inference batches of at
        most 4 rows then skip the fused decode kernels: set False for decoding).
    dtype, device
        Of the parameters.

    Attributes
    ----------
    last_stats : TorchFFNStats or None
        The last call's statistics (None before the first call, when ``collect_stats`` is False, and after
        a call captured in a CUDA graph).
    density_tracker : twell.DensityTracker
        This layer's density memory (``path="auto"``).
    """

    def __init__(self, d: int, n: int, *, l1_weight: float = 0.0, dense_row_threshold: int | None = 128,
                 path: str = "auto", gate_kernel: str = "auto", collect_stats: bool = True, dtype=None,
                 device=None):
        super().__init__()
        for name, v in (("d", d), ("n", n)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        self.d, self.n = d, n
        factory = {"dtype": dtype, "device": device}
        self.w_gate = nn.Parameter(torch.empty(n, d, **factory))
        self.w_up = nn.Parameter(torch.empty(n, d, **factory))
        self.w_down = nn.Parameter(torch.empty(n, d, **factory))
        self.l1_weight, threshold = _check_options(l1_weight, dense_row_threshold, DEFAULT_TILE_WIDTH,
                                                   DEFAULT_COMPRESSION, gate_kernel, path)
        self.dense_row_threshold = threshold
        self.path = path
        self.gate_kernel = gate_kernel
        self.collect_stats = bool(collect_stats)
        self._init_state()
        self.reset_parameters()

    def _init_state(self):
        threshold = self.dense_row_threshold
        self.density_tracker = DensityTracker(128 if threshold is None else threshold)
        self._stats_slot, self._stats_id = _new_slot()

    @property
    def density_tracker(self) -> DensityTracker:
        return self._density_tracker

    @density_tracker.setter
    def density_tracker(self, tracker: DensityTracker):
        if not isinstance(tracker, DensityTracker):
            raise TypeError(f"density_tracker must be a twell.DensityTracker, got {type(tracker).__name__}")
        self._density_tracker = tracker
        self._tracker_id = _tracker_id(tracker)

    @property
    def last_stats(self) -> TorchFFNStats | None:
        return self._stats_slot.stats

    def reset_parameters(self):
        with torch.no_grad():
            bound_in = 1.0 / math.sqrt(self.d)
            self.w_gate.uniform_(-bound_in, bound_in)
            self.w_up.uniform_(-bound_in, bound_in)
            bound_down = 1.0 / math.sqrt(self.n)
            self.w_down.uniform_(-bound_down, bound_down)

    def forward(self, x: Tensor) -> Tensor:
        _check_options(self.l1_weight, self.dense_row_threshold, DEFAULT_TILE_WIDTH, DEFAULT_COMPRESSION,
                       self.gate_kernel, self.path)
        return _gated(x, self.w_gate, self.w_up, self.w_down, l1_weight=float(self.l1_weight), return_l1=False,
                      tile_width=DEFAULT_TILE_WIDTH, compression=DEFAULT_COMPRESSION,
                      dense_row_threshold=self.dense_row_threshold, gate_kernel=self.gate_kernel, path=self.path,
                      tracker_id=self._tracker_id, slot_id=self._stats_id if self.collect_stats else -1)

    @classmethod
    def from_linear(cls, gate: nn.Linear, up: nn.Linear, down: nn.Linear, **kwargs) -> SparseGatedFFN:
        """A module computing ``down(relu(gate(x)) * up(x))`` from three bias-free ``nn.Linear`` (weights
        copied; ``down.weight`` (d, n) is stored transposed).  ``kwargs`` as in the constructor."""
        for name, lin in (("gate", gate), ("up", up), ("down", down)):
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"{name} must be an nn.Linear, got {type(lin).__name__}")
            if lin.bias is not None:
                raise ValueError(f"{name} has a bias: SparseGatedFFN has none (build the nn.Linear with bias=False)")
        n, d = gate.weight.shape
        if tuple(up.weight.shape) != (n, d):
            raise ValueError(f"up.weight must have gate.weight's shape (n, d) = {(n, d)}, got {tuple(up.weight.shape)}")
        if tuple(down.weight.shape) != (d, n):
            raise ValueError(f"down.weight must have shape (d, n) = {(d, n)} (nn.Linear(n, d)), got "
                             f"{tuple(down.weight.shape)}")
        w = gate.weight
        for name, lin in (("up", up), ("down", down)):
            if lin.weight.dtype != w.dtype or lin.weight.device != w.device:
                raise ValueError(f"{name}.weight is {lin.weight.dtype} on {lin.weight.device} but gate.weight is "
                                 f"{w.dtype} on {w.device}")
        module = cls(d, n, dtype=w.dtype, device=w.device, **kwargs)
        with torch.no_grad():
            module.w_gate.copy_(gate.weight)
            module.w_up.copy_(up.weight)
            module.w_down.copy_(down.weight.mT)
        return module

    def to_linear(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        """``(gate, up, down)`` bias-free ``nn.Linear`` modules with copies of the weights."""
        factory = {"dtype": self.w_gate.dtype, "device": self.w_gate.device}
        gate = nn.Linear(self.d, self.n, bias=False, **factory)
        up = nn.Linear(self.d, self.n, bias=False, **factory)
        down = nn.Linear(self.n, self.d, bias=False, **factory)
        with torch.no_grad():
            gate.weight.copy_(self.w_gate)
            up.weight.copy_(self.w_up)
            down.weight.copy_(self.w_down.mT)
        return gate, up, down

    def extra_repr(self) -> str:
        return (f"d={self.d}, n={self.n}, l1_weight={self.l1_weight}, dense_row_threshold={self.dense_row_threshold}, "
                f"path={self.path!r}")

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in ("_density_tracker", "_tracker_id", "_stats_slot", "_stats_id"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._init_state()
