"""JAX adapter: twell's sparse gated FFN as a differentiable JAX op (``pip install twell[jax]``).

    y = twell.jax.gated_ffn(x, w_gate, w_up, w_down, l1_weight=1e-3)      # x (..., d), weights (n, d)

``gated_ffn`` is a :func:`jax.custom_vjp` op: it works under :func:`jax.jit`, :func:`jax.grad`,
:func:`jax.vmap`, :func:`jax.lax.scan` and :func:`jax.checkpoint`; forward-mode differentiation
(:func:`jax.jvp`, :func:`jax.jacfwd`) is not available.  ``import twell`` never imports JAX; this module
imports CuPy only when a computation runs on a CUDA device.

Weights are **neuron-major** ``(n, d)``, as everywhere in twell: with flax ``Dense`` layers (kernels are
``(in, out)``), ``w_gate = gate.kernel.T`` and ``w_up = up.kernel.T`` (``(d, n)`` kernels), while the down
layer's ``(n, d)`` kernel already is ``w_down``.  Keeping the parameters neuron-major saves two
transposes per call.

Where it runs (chosen when the computation is lowered, :func:`jax.lax.platform_dependent`):

* **CUDA** (bfloat16 / float16 / float32): :func:`jax.experimental.buffer_callback.buffer_callback`.  The
  callback receives XLA's device buffers and XLA's CUDA stream; it wraps the stream as a CuPy stream and
  the buffers as CuPy arrays over the same memory (no copy; bfloat16 views are built from the raw
  pointer), and runs twell's kernels on that stream, ordered with the rest of the XLA program.  The
  inference op writes ``y`` straight into XLA's output buffer; the training forward and the backward
  allocate their results with CuPy and copy them into XLA's buffers with one device-to-device copy each
  (``y``; ``dx`` and the three weight gradients).  twell's temporaries and saved state come from CuPy's
  memory pool, outside XLA's: leave room for it (``XLA_PYTHON_CLIENT_MEM_FRACTION``, default 0.75 of the
  device, or ``XLA_PYTHON_CLIENT_PREALLOCATE=false``).  float64 on a CUDA device runs the host reference
  (below), with device-host copies.
* **CPU and other platforms**: twell's float64 NumPy reference through :func:`jax.pure_callback` (slow;
  for tests and small problems).

Training state.  twell's backward needs the forward's saved state (the gate pattern and two values per
active entry), whose size depends on the data, while XLA needs every array's shape when it compiles.  So
the forward keeps that state on the host side, in a bounded registry, under a fresh integer id that it
writes into a small ``int32 (2,)`` output (with one tiny kernel, no synchronisation); the id, ``x`` and
the weights are the op's residuals.  The backward reads the id back (an 8-byte device-to-host copy and
one wait for XLA's stream to reach it), takes the state out of the registry, and runs twell's backward.
If the state is not there -- evicted by the registry's limits, or never stored, or the residuals came from
a forward run again under rematerialisation -- the backward first recomputes the forward from the
residuals: results never depend on the registry, only the time does (:func:`registry_stats` counts hits
and recomputes, :func:`set_registry_limits` sets the bounds).

Under :func:`jax.vmap` every callback sees the mapped axes as leading dimensions (``vmap_method=
"expand_dims"``, no copies) and makes one core call per mapped element (the inference op with unmapped
weights: one call over all rows), so ``M``, the L1 mean and the statistics are per element.

The L1 penalty.  ``l1_weight`` (λ, a static Python number) adds the gradient of ``λ · (1/M) Σ_t Σ_j |h_tj|``
(M tokens, n neurons) in the backward, as :func:`twell.gated_ffn_backward` does; the penalty's value is not
part of ``y``.  :func:`gated_ffn_with_stats` also returns ``l0`` (mean active neurons per token) and ``l1``
(``(1/M) Σ|h|``) as float32 scalars (float64 for float64 inputs) computed in the same call; its ``l1`` is
differentiable, so ``loss + lam * l1`` with a traced ``lam`` (a warm-up schedule) needs no recompilation.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import threading
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from . import _backend as B
from . import ops as _ops
from .dispatch import PATHS, DensityTracker

__all__ = [
    "gated_ffn", "gated_ffn_with_stats", "registry_stats", "set_registry_limits", "clear_registry",
    "DEFAULT_MAX_ENTRIES", "DEFAULT_MAX_BYTES",
]

#: Default bounds of the saved-state registry (entries, bytes of saved state): past them the oldest
#: entries are dropped, and their backward recomputes the forward.
DEFAULT_MAX_ENTRIES = 1024
DEFAULT_MAX_BYTES = 8 << 30

_DTYPES = ("bfloat16", "float16", "float32", "float64")
_KERNEL_DTYPES = ("bfloat16", "float16", "float32")
_F32 = np.float32


def _stat_dtype(dtype):
    """dtype of the l0 / l1 outputs: float32, float64 for float64 inputs."""
    return np.float64 if np.dtype(dtype) == np.float64 else _F32

# Where a CPU computation runs: "pure" (jax.pure_callback) or "buffer" (jax buffer_callback with NumPy
# views of the host buffers: the CUDA path's plumbing, for tests on machines without a GPU).
_HOST_CALLBACK = "pure"


# --------------------------------------------------------------------------- saved-state registry


class _Registry:
    """Saved forward states by integer id, oldest dropped first past the entry / byte bounds."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._ids = itertools.count(1)                    # 0 means "not stored"
        self.max_entries = DEFAULT_MAX_ENTRIES
        self.max_bytes = DEFAULT_MAX_BYTES
        self.bytes = 0
        self.counts = {"stored": 0, "hits": 0, "recomputes": 0, "evicted": 0, "not_stored": 0}

    def put(self, saved, key, stream) -> int:
        nbytes = int(saved.nbytes)
        with self._lock:
            if self.max_entries < 1 or nbytes > self.max_bytes:
                self.counts["not_stored"] += 1
                return 0
            ident = next(self._ids)
            self._entries[ident] = (saved, key, nbytes, stream)
            self.bytes += nbytes
            self.counts["stored"] += 1
            while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
                _, (_, _, size, _) = self._entries.popitem(last=False)
                self.bytes -= size
                self.counts["evicted"] += 1
            return ident

    def pop(self, ident: int, key):
        """(saved state, the stream that made it), or (None, None): the backward recomputes."""
        with self._lock:
            entry = self._entries.pop(ident, None) if ident else None
            if entry is not None:
                self.bytes -= entry[2]
            if entry is None or entry[1] != key:
                self.counts["recomputes"] += 1
                return None, None
            self.counts["hits"] += 1
            return entry[0], entry[3]

    def trim(self):
        with self._lock:
            while self._entries and (len(self._entries) > self.max_entries or self.bytes > self.max_bytes):
                _, (_, _, size, _) = self._entries.popitem(last=False)
                self.bytes -= size
                self.counts["evicted"] += 1

    def clear(self):
        with self._lock:
            self._entries.clear()
            self.bytes = 0


_REGISTRY = _Registry()


def registry_stats() -> dict:
    """State of the saved-state registry: ``entries``, ``bytes`` held, the limits, and counters since the
    process started -- ``stored``, ``hits`` (backwards that found their state), ``recomputes`` (backwards
    that recomputed the forward), ``evicted``, ``not_stored`` (a state over ``max_bytes``)."""
    r = _REGISTRY
    with r._lock:
        return {"entries": len(r._entries), "bytes": r.bytes, "max_entries": r.max_entries,
                "max_bytes": r.max_bytes, **r.counts}


def set_registry_limits(max_entries: int | None = None, max_bytes: int | None = None):
    """Bound the saved states kept between forward and backward (``None``: leave that bound as it is).

    Every forward under differentiation stores one state until its backward takes it; a forward whose
    backward never comes (rematerialisation runs the forward again; a gradient that is not used) leaves
    its state until the bounds push it out.  ``max_entries = 0`` stores nothing: every backward then
    recomputes its forward (about a third more work per training step)."""
    r = _REGISTRY
    with r._lock:
        if max_entries is not None:
            r.max_entries = B.check_int(max_entries, "max_entries", minimum=0)
        if max_bytes is not None:
            r.max_bytes = B.check_int(max_bytes, "max_bytes", minimum=0)
    r.trim()


def clear_registry():
    """Drop every saved state (their backwards, if they come, recompute the forward)."""
    _REGISTRY.clear()


# --------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class _Config:
    l1_weight: float
    dense_row_threshold: int | None
    path: str
    gate_kernel: str
    tracker: DensityTracker | None
    with_stats: bool
    host_callback: str = "pure"


def _config(l1_weight, dense_row_threshold, path, gate_kernel, tracker, with_stats) -> _Config:
    """Validate the static arguments (before tracing: errors name the argument)."""
    if isinstance(l1_weight, jax.Array):
        raise TypeError("l1_weight must be a static Python number (it is fixed when the op is compiled); for a "
                        "traced or scheduled λ use gated_ffn_with_stats and add lam * l1 to the loss")
    if isinstance(l1_weight, (bool, np.bool_)) or not isinstance(l1_weight, (int, float, np.integer, np.floating)):
        raise TypeError(f"l1_weight must be a real number, got {type(l1_weight).__name__}")
    l1_weight = float(l1_weight)
    if not math.isfinite(l1_weight) or l1_weight < 0:
        raise ValueError(f"l1_weight must be finite and >= 0, got {l1_weight}")
    if isinstance(dense_row_threshold, str) and dense_row_threshold == "auto":
        dense_row_threshold = _ops.DEFAULT_INFERENCE_ROW_THRESHOLD
    if dense_row_threshold is not None:
        dense_row_threshold = B.check_int(dense_row_threshold, "dense_row_threshold", minimum=0)
    if not isinstance(path, str) or path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if not isinstance(gate_kernel, str) or gate_kernel not in _ops.GATE_KERNELS:
        raise ValueError(f"gate_kernel must be one of {_ops.GATE_KERNELS}, got {gate_kernel!r}")
    if tracker is not None and not isinstance(tracker, DensityTracker):
        raise TypeError(f"tracker must be a twell.DensityTracker or None, got {type(tracker).__name__}")
    return _Config(l1_weight, dense_row_threshold, path, gate_kernel, tracker, bool(with_stats), _HOST_CALLBACK)


# --------------------------------------------------------------------------- public ops


def gated_ffn(x, w_gate, w_up, w_down, *, l1_weight=0.0, dense_row_threshold=128, path="auto",
              gate_kernel="auto", tracker=None):
    """Sparse gated FFN ``y = (relu(x w_gateᵀ) ⊙ (x w_upᵀ)) w_down`` as a differentiable JAX op.

    Parameters
    ----------
    x : array (..., d), bfloat16 / float16 / float32 (float64: host reference)
        Tokens; leading dimensions are flattened into the M rows of one call.
    w_gate, w_up, w_down : arrays (n, d), x's dtype
        Neuron-major weights: ``w_gate`` / ``w_up`` as ``torch.nn.Linear(d, n).weight`` (the transpose of a
        flax ``Dense(n)`` kernel), ``w_down`` the transpose of ``torch.nn.Linear(n, d).weight`` (a flax
        ``Dense(d)`` kernel as it is).
    l1_weight : float, static
        λ of the L1 penalty ``λ · (1/M) Σ|h|`` whose gradient the backward adds (M = rows of this call;
        under :func:`jax.vmap`, of each mapped call).
    dense_row_threshold : int, None or "auto", static
        Rows with more active neurons run densely (cuBLAS); None: only rows over the kernels' list length;
        "auto": 128.
    path : {"auto", "sparse", "dense"}, static
        As in :func:`twell.gated_ffn`; "auto" follows ``tracker``, else sparse.
    gate_kernel : {"auto", "fused", "wgmma", "mma", "cublas"}, static
    tracker : twell.DensityTracker, optional, static
        One per layer: it picks the sparse or the dense path from the layer's last call.

    Returns
    -------
    y : array (..., d), x's dtype

    Without differentiation the inference op (:func:`twell.gated_ffn`) computes ``y``; under
    :func:`jax.grad` the training forward (:func:`twell.gated_ffn_forward`).  Both are exact to rounding;
    their last bits may differ.
    """
    cfg = _config(l1_weight, dense_row_threshold, path, gate_kernel, tracker, with_stats=False)
    return _apply(cfg, x, w_gate, w_up, w_down)[0]


def gated_ffn_with_stats(x, w_gate, w_up, w_down, *, l1_weight=0.0, dense_row_threshold=128, path="auto",
                         gate_kernel="auto", tracker=None):
    """:func:`gated_ffn` plus its sparsity statistics: ``(y, l0, l1)``.

    ``l0`` is the mean number of active neurons per token and ``l1 = (1/M) Σ_t Σ_j |h_tj|``, both float32
    scalars (float64 for float64 inputs) computed by the same call (under :func:`jax.vmap`, one per mapped
    call).  ``l1`` is differentiable (its gradient ``(1/M) sign(h)`` joins the backward's L1 term, at no
    extra cost), ``l0`` has zero gradient.  Always runs the training forward (the inference op has no
    ``l1``).
    """
    cfg = _config(l1_weight, dense_row_threshold, path, gate_kernel, tracker, with_stats=True)
    return _apply(cfg, x, w_gate, w_up, w_down)


def _apply(cfg, x, w_gate, w_up, w_down):
    x, w_gate, w_up, w_down = (jnp.asarray(a) for a in (x, w_gate, w_up, w_down))
    if x.ndim < 1:
        raise ValueError(f"x must have shape (..., d), got {tuple(x.shape)}")
    d = x.shape[-1]
    dt = np.dtype(x.dtype)
    if dt.name not in _DTYPES:
        raise TypeError(f"x must have dtype in {{{', '.join(_DTYPES)}}}, got {dt.name}")
    n = None
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if w.ndim != 2 or w.shape[1] != d:
            hint = ""
            if w.ndim == 2 and w.shape[0] == d:
                hint = (" -- weights are neuron-major (n, d): pass a flax Dense(n) kernel transposed"
                        if name != "w_down" else " -- w_down is neuron-major (n, d): a flax Dense(d) kernel as "
                        "it is, the transpose of torch.nn.Linear(n, d).weight")
            raise ValueError(f"{name} must have shape (n, d) with d = x.shape[-1] = {d}, got {tuple(w.shape)}{hint}")
        if n is None:
            n = w.shape[0]
        elif w.shape[0] != n:
            raise ValueError(f"{name} must have n = {n} rows like w_gate, got {tuple(w.shape)}")
        if np.dtype(w.dtype) != dt:
            raise TypeError(f"{name} must have x's dtype ({dt.name}), got {np.dtype(w.dtype).name}: cast it "
                            f"(w.astype(x.dtype) is differentiable)")
    if d < 1 or n < 1:
        raise ValueError(f"d and n must be >= 1, got d = {d}, n = {n}")
    m = math.prod(x.shape[:-1])
    if m == 0:
        zero = jnp.zeros((), _stat_dtype(dt))
        return jnp.zeros(x.shape, x.dtype), zero, zero
    y, l0, l1 = _op(cfg, x.reshape(m, d), w_gate, w_up, w_down)
    return y.reshape(x.shape), l0, l1


# --------------------------------------------------------------------------- custom_vjp


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _op(cfg, x, w_gate, w_up, w_down):
    return _primal_call(cfg, x, w_gate, w_up, w_down)


def _op_fwd(cfg, x, w_gate, w_up, w_down):
    y, handle, l0, l1 = _forward_call(cfg, x, w_gate, w_up, w_down)
    return (y, l0, l1), (handle, x, w_gate, w_up, w_down)


def _op_bwd(cfg, residuals, cotangents):
    handle, x, w_gate, w_up, w_down = residuals
    dy, _, ct_l1 = cotangents                      # l0 is piecewise constant: no gradient
    return _backward_call(cfg, handle, x, w_gate, w_up, w_down, dy.astype(x.dtype),
                          ct_l1.astype(_stat_dtype(x.dtype)) if cfg.with_stats else None)


_op.defvjp(_op_fwd, _op_bwd)


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def _stats_shapes(cfg, dtype):
    return (_sds((), _stat_dtype(dtype)),) * 2 if cfg.with_stats else ()


def _dispatch(cfg, host_fn, device_fn, *args):
    """Lowered per platform: CUDA → ``device_fn`` (kernels; float64 → host), everything else → ``host_fn``."""
    kernels = np.dtype(args[0].dtype).name in _KERNEL_DTYPES
    return jax.lax.platform_dependent(*args, cpu=partial(host_fn, cfg), cuda=partial(device_fn if kernels
                                      else host_fn, cfg), default=partial(host_fn, cfg))


def _fill_stats(cfg, outs, k):
    """(y, l0, l1) from a callback's outputs: zeros for the statistics when none were asked for."""
    outs = tuple(outs)
    if cfg.with_stats:
        return outs
    zero = jnp.zeros((), _F32)
    return (*outs[:k], zero, zero)


@partial(jax.jit, static_argnums=0)
def _primal_call(cfg, x, w_gate, w_up, w_down):
    return _dispatch(cfg, _primal_host, _primal_device, x, w_gate, w_up, w_down)


@partial(jax.jit, static_argnums=0)
def _forward_call(cfg, x, w_gate, w_up, w_down):
    return _dispatch(cfg, _forward_host, _forward_device, x, w_gate, w_up, w_down)


@partial(jax.jit, static_argnums=0)
def _backward_call(cfg, handle, x, w_gate, w_up, w_down, dy, ct_l1):
    args = (handle, x, w_gate, w_up, w_down, dy) + (() if ct_l1 is None else (ct_l1,))
    kernels = np.dtype(x.dtype).name in _KERNEL_DTYPES
    return jax.lax.platform_dependent(*args, cpu=partial(_backward_host, cfg), cuda=partial(
        _backward_device if kernels else _backward_host, cfg), default=partial(_backward_host, cfg))


def _primal_shapes(cfg, x):
    return (_sds(x.shape, x.dtype), *_stats_shapes(cfg, x.dtype))


def _forward_shapes(cfg, x):
    return (_sds(x.shape, x.dtype), _sds((2,), np.int32), *_stats_shapes(cfg, x.dtype))


def _backward_shapes(x, w):
    return (_sds(x.shape, x.dtype), *(_sds(w.shape, w.dtype),) * 3)


def _host_callback(cfg, fn, shapes, *args, x_index=0):
    if cfg.host_callback == "buffer":
        from jax.experimental.buffer_callback import buffer_callback  # noqa: PLC0415
        return buffer_callback(partial(_buffer_host_cb, fn), shapes, vmap_method="expand_dims")(*args)
    return jax.pure_callback(partial(_pure_cb, fn, shapes, x_index), shapes, *args, vmap_method="expand_dims")


def _device_callback(fn, shapes, *args):
    try:
        from jax.experimental.buffer_callback import buffer_callback  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the JAX version
        raise ImportError(f"twell.jax on a CUDA device needs jax.experimental.buffer_callback (JAX >= 0.7): "
                          f"{exc}") from exc
    return buffer_callback(partial(_cuda_cb, fn), shapes, vmap_method="expand_dims",
                           command_buffer_compatible=False)(*args)


def _primal_host(cfg, x, w_gate, w_up, w_down):
    shapes = _primal_shapes(cfg, x)
    return _fill_stats(cfg, _host_callback(cfg, partial(_exec_primal, cfg), shapes, x, w_gate, w_up, w_down), 1)


def _primal_device(cfg, x, w_gate, w_up, w_down):
    shapes = _primal_shapes(cfg, x)
    return _fill_stats(cfg, _device_callback(partial(_exec_primal, cfg), shapes, x, w_gate, w_up, w_down), 1)


def _forward_host(cfg, x, w_gate, w_up, w_down):
    shapes = _forward_shapes(cfg, x)
    return _fill_stats(cfg, _host_callback(cfg, partial(_exec_forward, cfg), shapes, x, w_gate, w_up, w_down), 2)


def _forward_device(cfg, x, w_gate, w_up, w_down):
    shapes = _forward_shapes(cfg, x)
    return _fill_stats(cfg, _device_callback(partial(_exec_forward, cfg), shapes, x, w_gate, w_up, w_down), 2)


def _backward_host(cfg, handle, x, w_gate, w_up, w_down, dy, ct_l1=None):
    args = (handle, x, w_gate, w_up, w_down, dy) + (() if ct_l1 is None else (ct_l1,))
    return tuple(_host_callback(cfg, partial(_exec_backward, cfg), _backward_shapes(x, w_gate), *args, x_index=1))


def _backward_device(cfg, handle, x, w_gate, w_up, w_down, dy, ct_l1=None):
    args = (handle, x, w_gate, w_up, w_down, dy) + (() if ct_l1 is None else (ct_l1,))
    return tuple(_device_callback(partial(_exec_backward, cfg), _backward_shapes(x, w_gate), *args))


# --------------------------------------------------------------------------- callbacks: arrays in, arrays out


def _pure_cb(fn, shapes, x_index, *args):
    """jax.pure_callback body: NumPy views of the inputs, NumPy outputs allocated here (with the leading
    dimensions that vmap's "expand_dims" added to every input: one per mapped axis)."""
    args = tuple(np.asarray(a) for a in args)
    k = args[x_index].ndim - 2
    lead = np.broadcast_shapes(*(a.shape[:k] for a in args))
    outs = tuple(np.empty(lead + tuple(s.shape), s.dtype) for s in shapes)
    fn(_HOST, outs, *args)
    return outs


def _buffer_host_cb(fn, ctx, outs, *args):
    """buffer_callback body on the CPU (tests): NumPy views of XLA's host buffers."""
    del ctx
    fn(_HOST, tuple(np.asarray(o) for o in outs), *(np.asarray(a) for a in args))


def _cuda_cb(fn, ctx, outs, *args):
    """buffer_callback body on a CUDA device: CuPy views of XLA's buffers, on XLA's stream."""
    if all(math.prod(o.shape) == 0 for o in outs):      # vmap over an empty axis: nothing to compute
        return None
    try:
        dev_ptr = args[0].__cuda_array_interface__["data"][0]
    except Exception:  # noqa: BLE001 - a host buffer (the CUDA branch lowered for a CPU device)
        return _buffer_host_cb(fn, ctx, outs, *args)
    cp = B.cupy_or_none()
    if cp is None:
        raise RuntimeError("twell.jax: this computation runs on a CUDA device but CuPy cannot see one; install "
                           "twell[cuda13] (or [cuda12]) next to jax[cuda]")
    dev = int(cp.cuda.runtime.pointerGetAttributes(dev_ptr).device)
    with cp.cuda.Device(dev), _xla_stream(cp, int(ctx.stream), dev):
        fn(_Cuda(cp, dev), tuple(_cupy_view(cp, o, dev) for o in outs), *(_cupy_view(cp, a, dev) for a in args))


class _StreamRef:
    """A raw stream pointer with the CUDA stream protocol (for ``cupy.cuda.Stream.from_external``)."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)


_streams: dict = {}
_streams_lock = threading.Lock()


def _xla_stream(cp, ptr: int, dev: int):
    """XLA's stream as a CuPy stream (one object per (stream, device), kept)."""
    key = (ptr, dev)
    stream = _streams.get(key)
    if stream is None:
        with _streams_lock:
            stream = _streams.get(key)
            if stream is None:
                if hasattr(cp.cuda.Stream, "from_external"):
                    stream = cp.cuda.Stream.from_external(_StreamRef(ptr))
                else:  # pragma: no cover - CuPy < 14
                    stream = cp.cuda.ExternalStream(ptr, dev)
                _streams[key] = stream
    return stream


def _cupy_view(cp, buf, dev):
    """A CuPy array over an XLA buffer's memory (no copy; bfloat16 too, which the interface spells '<V2')."""
    cai = buf.__cuda_array_interface__
    shape = tuple(int(s) for s in cai["shape"])
    dtype = np.dtype(buf.dtype)
    strides = cai.get("strides")
    if strides is not None:
        want, step = [], dtype.itemsize
        for extent in reversed(shape):
            want.append(step)
            step *= extent
        if tuple(strides) != tuple(reversed(want)) and math.prod(shape) > 1:
            raise ValueError(f"twell.jax: XLA passed a non-row-major buffer (shape {shape}, strides {strides})")
    ptr = int(cai["data"][0])
    nbytes = math.prod(shape) * dtype.itemsize
    mem = cp.cuda.UnownedMemory(ptr, nbytes, buf, dev)
    return cp.ndarray(shape, dtype, cp.cuda.MemoryPointer(mem, 0))


class _HostBackend:
    """Array plumbing of the host (NumPy) callbacks."""

    xp = np

    @staticmethod
    def copy_into(dst, src):
        np.copyto(dst, src, casting="unsafe")

    @staticmethod
    def set_scalar(arr, idx, value):
        arr[idx] = value

    @staticmethod
    def aligned(a):
        return a

    @staticmethod
    def out_target(view):
        return view

    @staticmethod
    def stream():
        return None

    @staticmethod
    def synchronize():
        pass

    @staticmethod
    def read_ids(handle, ct_l1):
        ids = np.ascontiguousarray(handle).view(np.int64)[..., 0]
        return ids, None if ct_l1 is None else np.asarray(ct_l1, dtype=np.float64)


_HOST = _HostBackend()


class _Cuda:
    """Array plumbing of the CUDA callbacks (everything on the current stream: XLA's)."""

    def __init__(self, cp, dev):
        self.xp, self.cp, self.dev = cp, cp, dev

    def copy_into(self, dst, src):
        cp = self.cp
        if dst.dtype == src.dtype and dst.shape == src.shape and src.flags.c_contiguous and dst.flags.c_contiguous:
            if dst.nbytes:
                cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, dst.nbytes,
                                            cp.cuda.runtime.memcpyDeviceToDevice,
                                            cp.cuda.get_current_stream().ptr)
        else:
            cp.copyto(dst, src, casting="unsafe")

    def set_scalar(self, arr, idx, value):
        """``arr[idx] = value`` for a 0-d device ``value`` (a statistic): a copy kernel, no synchronisation."""
        self.cp.copyto(arr[idx] if idx else arr, value, casting="unsafe")

    def stream(self):
        return self.cp.cuda.get_current_stream().ptr

    def synchronize(self):
        self.cp.cuda.get_current_stream().synchronize()

    @staticmethod
    def aligned(a):
        return a if a.data.ptr % 16 == 0 else a.copy()

    @staticmethod
    def out_target(view):
        return view if view.data.ptr % 16 == 0 else None

    def read_ids(self, handle, ct_l1):
        """One read-back of the ids (and the l1 cotangents) and one wait for XLA's stream to reach it."""
        from .runtime.launch import HostReadback  # noqa: PLC0415
        cp = self.cp
        arrays = [cp.ascontiguousarray(handle).reshape(-1)]
        if ct_l1 is not None:
            arrays.append(cp.ascontiguousarray(ct_l1).reshape(-1).view(cp.int32))
        values = np.asarray(HostReadback(*arrays).wait(), dtype=np.int64).astype(np.int32)
        count = int(handle.size)
        ids = values[:count].view(np.int64).reshape(handle.shape[:-1])
        cts = None if ct_l1 is None else values[count:].view(np.float32).astype(np.float64).reshape(ct_l1.shape)
        return ids, cts


# --------------------------------------------------------------------------- the computations


def _pick(a, idx, k):
    """Element ``idx`` of the ``k`` leading (vmapped) dimensions of ``a``; size-1 dimensions broadcast."""
    if not k:
        return a
    return a[tuple(0 if a.shape[j] == 1 else i for j, i in enumerate(idx))]


def _threshold(cfg):
    return cfg.dense_row_threshold


def _exec_primal(cfg, be, outs, x, w_gate, w_up, w_down):
    """y (and the statistics) without saved state."""
    k = x.ndim - 2
    out_y = outs[0]
    lead = out_y.shape[:k]
    if not cfg.with_stats and all(math.prod(w.shape[:k]) == 1 for w in (w_gate, w_up, w_down)):
        # shared weights: every mapped call is rows of one call
        d = x.shape[-1]
        ws = [w.reshape(w.shape[-2:]) for w in (w_gate, w_up, w_down)]
        _inference(cfg, be, x.reshape(-1, d), *ws, out_y.reshape(-1, d))
        return
    for idx in np.ndindex(*lead):
        xi, wg, wu, wd = (_pick(a, idx, k) for a in (x, w_gate, w_up, w_down))
        if not cfg.with_stats:
            _inference(cfg, be, xi, wg, wu, wd, out_y[idx])
            continue
        y, _, stats = _ops.gated_ffn_forward(xi, wg, wu, wd, l1_weight=cfg.l1_weight,
                                             dense_row_threshold=_threshold(cfg), gate_kernel=cfg.gate_kernel,
                                             path=cfg.path, tracker=cfg.tracker)
        be.copy_into(out_y[idx], y)
        be.set_scalar(outs[1], idx, stats.l0)
        be.set_scalar(outs[2], idx, stats.l1)


def _inference(cfg, be, x, w_gate, w_up, w_down, out):
    target = be.out_target(out)
    y = _ops.gated_ffn(x, w_gate, w_up, w_down, dense_row_threshold=_threshold(cfg), out=target,
                       gate_kernel=cfg.gate_kernel, path=cfg.path, tracker=cfg.tracker)
    if target is None:
        be.copy_into(out, y)


def _key(x, w):
    return (tuple(x.shape), tuple(w.shape), np.dtype(x.dtype).name)


def _exec_forward(cfg, be, outs, x, w_gate, w_up, w_down):
    """Training forward: y, the registry id of the saved state, the statistics."""
    k = x.ndim - 2
    out_y, out_id = outs[0], outs[1]
    for idx in np.ndindex(*out_y.shape[:k]):
        xi, wg, wu, wd = (_pick(a, idx, k) for a in (x, w_gate, w_up, w_down))
        y, saved, stats = _ops.gated_ffn_forward(xi, wg, wu, wd, l1_weight=cfg.l1_weight,
                                                 dense_row_threshold=_threshold(cfg), gate_kernel=cfg.gate_kernel,
                                                 path=cfg.path, tracker=cfg.tracker)
        be.copy_into(out_y[idx], y)
        # the inputs are XLA's buffers, valid only during this call: the backward gets them again
        saved.x = saved.w_gate = saved.w_up = saved.w_down = None
        ident = _REGISTRY.put(saved, _key(xi, wg), be.stream())
        out_id[idx].view(be.xp.int64).fill(ident)
        if cfg.with_stats:
            be.set_scalar(outs[2], idx, stats.l0)
            be.set_scalar(outs[3], idx, stats.l1)


def _exec_backward(cfg, be, outs, handle, x, w_gate, w_up, w_down, dy, ct_l1=None):
    """Gradients from the registry's saved state (or a recomputed forward)."""
    k = x.ndim - 2
    ids, cts = be.read_ids(handle, ct_l1)
    for idx in np.ndindex(*outs[0].shape[:k]):
        xi, wg, wu, wd, dyi = (be.aligned(_pick(a, idx, k)) for a in (x, w_gate, w_up, w_down, dy))
        ident = int(ids[tuple(0 if ids.shape[j] == 1 else i for j, i in enumerate(idx))]) if k else int(ids)
        saved, stream = _REGISTRY.pop(ident, _key(xi, wg))
        if saved is None:
            _, saved, _ = _ops.gated_ffn_forward(xi, wg, wu, wd, l1_weight=cfg.l1_weight,
                                                 dense_row_threshold=_threshold(cfg), gate_kernel=cfg.gate_kernel,
                                                 path=cfg.path)
        else:
            saved.x, saved.w_gate, saved.w_up, saved.w_down = xi, wg, wu, wd
        lam = cfg.l1_weight
        if cts is not None:
            lam += float(cts[tuple(0 if cts.shape[j] == 1 else i for j, i in enumerate(idx))] if k else cts)
        grads = _backward(be, saved, dyi, lam)
        for out, g in zip(outs, grads):
            be.copy_into(out[idx], g)
        if stream is not None and stream != be.stream():
            # the state's memory returns to the pool of the stream that allocated it: let this stream's
            # reads of it finish first
            be.synchronize()


def _backward(be, saved, dy, lam):
    saved.l1_weight = lam
    if be.xp is np and not (math.isfinite(lam) and lam >= 0):
        # the reference takes λ >= 0 only; the gradients are linear in (dy, λ)
        base = dataclasses.replace(saved, l1_weight=0.0, consumed=False)
        unit = dataclasses.replace(saved, l1_weight=1.0, consumed=False)
        g0 = _ops.gated_ffn_backward(base, dy)
        g1 = _ops.gated_ffn_backward(unit, np.zeros_like(dy))
        return tuple((a.astype(np.float64) + lam * b.astype(np.float64)).astype(a.dtype) for a, b in zip(g0, g1))
    return _ops.gated_ffn_backward(saved, dy)
