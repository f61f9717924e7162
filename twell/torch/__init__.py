"""PyTorch adapter: twell's FFN ops on torch tensors, differentiable, ``torch.compile``-able, graph-capturable.

``import twell.torch`` (the ``[torch]`` extra); ``import twell`` alone never imports PyTorch.

* :func:`gated_ffn` / :func:`ffn` take and return tensors of shape ``(..., d)`` (leading dimensions are
  flattened to ``(M, d)`` and restored).  CUDA tensors run the kernels on PyTorch's current stream; CPU
  tensors run the NumPy reference (float64 math), so ``torch.autograd.gradcheck`` works on CPU float64.
* Without autograd (``torch.is_grad_enabled()`` False, or no input requiring grad) the call is the
  inference op :func:`twell.gated_ffn` (fastest path, capturable in ``torch.cuda.graph`` for M <= 512,
  ``path="dense"``, or a module whose density tracker has observed a call, without statistics); with autograd it is :func:`twell.gated_ffn_forward` / :func:`twell.gated_ffn_backward`.
* :class:`SparseGatedFFN` is an ``nn.Module`` holding the three weights in twell's neuron-major layout.
* ``torch_memory=True`` (the default of every entry point) allocates twell's device memory of training calls
  and of large inference batches from PyTorch's caching allocator; False from CuPy's pool.

How it is wired (docs/frameworks.md, "PyTorch"), one module per job:

* :mod:`twell.torch.ops`: ``torch.library.custom_op`` ops ``twell::gated_ffn`` (inference), ``twell::ffn``
  (non-gated, with a dense-masked backward), ``twell::gated_ffn_fwd`` and ``twell::gated_ffn_bwd``
  (training), each with a fake (meta) implementation, and ``register_autograd`` on the forward ops:
  ``torch.compile`` traces them as opaque nodes without graph breaks.
* :mod:`twell.torch.registry`: the training forward's saved state (a :class:`twell.SavedForBackward` with
  data-dependent sizes) is not a tensor: it lives in a bounded registry keyed by an int64 *handle*, a CPU
  0-d tensor returned as an extra output of ``twell::gated_ffn_fwd`` and passed to ``twell::gated_ffn_bwd``.
  The backward consumes it; a second backward through the same graph raises :class:`RuntimeError` (unless
  the forward ran inside :func:`retain_saved_state`).  Trackers and statistics slots are registered there
  under ids (ints in the op schemas).
* :mod:`twell.torch.interop`: tensors become CuPy arrays without DLPack: a CuPy ``ndarray`` over
  ``UnownedMemory`` at the tensor's address, memoised per (address, shape, strides, dtype, device) with no
  reference to the tensor; PyTorch's current stream as a CuPy stream; PyTorch's allocator behind CuPy's.
* :mod:`twell.torch.impl`: what the ops run on real tensors.  Outputs of the inference op are allocated by
  PyTorch (``torch.empty``) and passed as ``out=``.
* :mod:`twell.torch.functional`: :func:`gated_ffn` and :func:`ffn`.  Eager inference calls with plain
  tensors skip the dispatcher (a custom op costs tens of microseconds per call); ``torch.compile``, fake
  tensors, dispatch / function modes and tensor subclasses go through the registered op.  Both run the same
  code.
* :mod:`twell.torch.module`: :class:`SparseGatedFFN`; :mod:`twell.torch.stats`: :class:`TorchFFNStats`.
"""

from __future__ import annotations

from .functional import ffn, gated_ffn
from .module import SparseGatedFFN
from .registry import MAX_SAVED_STATES, max_saved_states, retain_saved_state, saved_state_count, set_max_saved_states
from .stats import TorchFFNStats

__all__ = [
    "gated_ffn", "ffn", "SparseGatedFFN", "TorchFFNStats", "retain_saved_state",
    "MAX_SAVED_STATES", "max_saved_states", "set_max_saved_states", "saved_state_count",
]
