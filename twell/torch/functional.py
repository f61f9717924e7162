"""The public functions :func:`gated_ffn` and :func:`ffn`: options checked, leading dimensions flattened, the
inference or training op chosen (eager inference calls with plain tensors skip the dispatcher)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from twell import ops as core
from twell.dispatch import DensityTracker, check_path
from twell.format import DEFAULT_COMPRESSION, DEFAULT_TILE_WIDTH
from twell.ops import DEFAULT_INFERENCE_ROW_THRESHOLD

from .impl import infer_impl
from .interop import evict_oldest, l1_dtype
from .ops import EagerGatedTrain, ffn_op, gated_ffn_fwd_op, gated_ffn_op
from .registry import slot_of, tracker_of
from .registry import tracker_id as registered_tracker_id

_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)


_checked: dict = {}         # options (with their types) that passed check_options -> its result
_CHECKED_CACHE = 256


def check_options(l1_weight, dense_row_threshold, tile_width, compression, gate_kernel, path):
    """Options checked before anything runs (types the op schemas need); returns (l1_weight, threshold).
    Options that passed once (same values of the same types) return the memoised result."""
    try:
        key = (type(l1_weight), l1_weight, type(dense_row_threshold), dense_row_threshold, type(tile_width),
               tile_width, type(compression), compression, gate_kernel, path)
        done = _checked.get(key)
    except TypeError:                   # an unhashable option: the checks below name it
        key = done = None
    if done is not None:
        return done
    done = _check_options(l1_weight, dense_row_threshold, tile_width, compression, gate_kernel, path)
    if key is not None:
        evict_oldest(_checked, _CHECKED_CACHE)
        _checked[key] = done
    return done


def _check_options(l1_weight, dense_row_threshold, tile_width, compression, gate_kernel, path):
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
    if gate_kernel not in core.GATE_KERNELS:
        raise ValueError(f"gate_kernel must be one of {core.GATE_KERNELS}, got {gate_kernel!r}")
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


def run_gated(x, w_gate, w_up, w_down, *, l1_weight, return_l1, tile_width, compression, dense_row_threshold,
              gate_kernel, path, tracker_id, slot_id, torch_memory):
    """gated_ffn with checked options and the registry ids resolved by the caller (SparseGatedFFN passes its
    own)."""
    x2 = _flat(x)
    try:
        grad = torch.is_grad_enabled() and (x.requires_grad or w_gate.requires_grad or w_up.requires_grad
                                            or w_down.requires_grad)
    except AttributeError:
        _check_tensors((("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)))
        raise
    if not grad and not return_l1:
        if not torch.compiler.is_compiling() and _eager_plain((x2, w_gate, w_up, w_down)):
            y = infer_impl(x2, w_gate, w_up, w_down, True, tile_width, compression, dense_row_threshold,
                           gate_kernel, path, tracker_of(tracker_id), slot_of(slot_id), torch_memory)
        else:
            y = gated_ffn_op(x2, w_gate, w_up, w_down, tile_width, compression, dense_row_threshold, gate_kernel,
                             path, tracker_id, slot_id, torch_memory)
        return y if x2 is x else y.view(x.shape)
    args = (x2, w_gate, w_up, w_down, l1_weight, dense_row_threshold, gate_kernel, path, tracker_id, slot_id, grad,
            bool(return_l1), torch_memory)
    if (not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()
            and _eager_plain((x2, w_gate, w_up, w_down))):
        y, l1, _ = EagerGatedTrain.apply(*args)
    else:
        y, l1, _ = gated_ffn_fwd_op(*args)
    y = y if x2 is x else y.view(x.shape)
    return (y, l1) if return_l1 else y


def gated_ffn(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, *, l1_weight: float = 0.0,
              return_l1: bool = False, tile_width: int = DEFAULT_TILE_WIDTH, compression: int = DEFAULT_COMPRESSION,
              dense_row_threshold="auto", gate_kernel: str = "auto", path: str = "auto",
              tracker: DensityTracker | None = None, torch_memory: bool = True):
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
    torch_memory : bool
        True (default): twell's device memory of a training call (saved state, gradients, temporaries) and
        of an inference batch of more than 512 rows comes from PyTorch's caching allocator, so one pool
        serves the whole model; False: from CuPy's memory pool.  Small inference batches always use CuPy's
        pool (fewer host operations per call).  No effect on CPU tensors.

    Returns
    -------
    y : Tensor (..., d), dtype of x; ``(y, l1)`` with ``return_l1``.

    Without autograd this is :func:`twell.gated_ffn` (capturable in a CUDA graph for M <= 512 or
    ``path="dense"``); with autograd, :func:`twell.gated_ffn_forward` (no host synchronisation once the
    layer's tracker has observed a call, one before; not capturable) and :func:`twell.gated_ffn_backward`.
    Gradients go to every input that requires one.
    """
    l1_weight, threshold = check_options(l1_weight, dense_row_threshold, tile_width, compression, gate_kernel, path)
    return run_gated(x, w_gate, w_up, w_down, l1_weight=l1_weight, return_l1=return_l1, tile_width=tile_width,
                     compression=compression, dense_row_threshold=threshold, gate_kernel=gate_kernel, path=path,
                     tracker_id=registered_tracker_id(tracker), slot_id=-1, torch_memory=bool(torch_memory))


def ffn(x: Tensor, w_up: Tensor, w_down: Tensor, *, l1_weight: float = 0.0, return_l1: bool = False,
        tile_width: int = DEFAULT_TILE_WIDTH, compression: int = DEFAULT_COMPRESSION, dense_row_threshold="auto",
        gate_kernel: str = "auto", path: str = "auto", tracker: DensityTracker | None = None,
        torch_memory: bool = True):
    """Sparse non-gated FFN ``y = relu(x w_upᵀ) w_down`` on torch tensors, differentiable.

    The forward is :func:`twell.ffn` (the inference op, with or without autograd).  The backward uses dense
    torch ops masked to relu's pattern (the core has no sparse non-gated backward): it recomputes
    ``z = x w_upᵀ`` and costs about a dense backward.  ``l1_weight`` adds ``(λ/M) sign(h)`` as in
    :func:`gated_ffn`; ``return_l1`` also returns ``(1/M) Σ relu(z)`` computed with torch (one dense GEMM).
    Other parameters as in :func:`gated_ffn` (``torch_memory`` applies to the forward: batches of more than
    512 rows).
    """
    l1_weight, threshold = check_options(l1_weight, dense_row_threshold, tile_width, compression, gate_kernel, path)
    tracker_id = registered_tracker_id(tracker)
    torch_memory = bool(torch_memory)
    x2 = _flat(x)
    try:
        grad = torch.is_grad_enabled() and (x.requires_grad or w_up.requires_grad or w_down.requires_grad)
    except AttributeError:
        _check_tensors((("w_up", w_up), ("w_down", w_down)))
        raise
    if not grad and not torch.compiler.is_compiling() and _eager_plain((x2, w_up, w_down)):
        y = infer_impl(x2, w_up, w_up, w_down, False, tile_width, compression, threshold, gate_kernel, path,
                       tracker_of(tracker_id), None, torch_memory)
    else:
        y = ffn_op(x2, w_up, w_down, l1_weight, tile_width, compression, threshold, gate_kernel, path, tracker_id, -1,
                   torch_memory)
    y = y if x2 is x else y.view(x.shape)
    if not return_l1:
        return y
    l1 = torch.relu(x2 @ w_up.mT).to(l1_dtype(x2)).sum() / x2.shape[0]
    return y, l1
