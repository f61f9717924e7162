"""The ``torch.library.custom_op`` registrations: ``twell::gated_ffn`` (inference), ``twell::ffn`` (non-gated,
with a dense-masked backward), ``twell::gated_ffn_fwd`` and ``twell::gated_ffn_bwd`` (training), each with a
fake (meta) implementation, and ``register_autograd`` on the forward ops, so that ``torch.compile`` traces them
as opaque nodes without graph breaks.

Integers stand in for Python objects in the schemas: a tracker and a statistics slot by their registry ids
(-1: none), a training forward's saved state by its handle (a CPU 0-d int64 tensor).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .impl import infer_impl, train_bwd_impl, train_fwd_impl
from .interop import l1_dtype
from .registry import Release, slot_of, tracker_of


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


# --------------------------------------------------------------------------- inference


@torch.library.custom_op("twell::gated_ffn", mutates_args=())
def gated_ffn_op(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, tile_width: int, compression: int,
                 dense_row_threshold: Optional[int], gate_kernel: str, path: str, tracker_id: int,
                 stats_slot: int, torch_memory: bool = True) -> Tensor:
    return infer_impl(x, w_gate, w_up, w_down, True, tile_width, compression, dense_row_threshold, gate_kernel,
                      path, tracker_of(tracker_id), slot_of(stats_slot), torch_memory)


@gated_ffn_op.register_fake
def _(x, w_gate, w_up, w_down, tile_width, compression, dense_row_threshold, gate_kernel, path, tracker_id,
      stats_slot, torch_memory=True):
    _fake_check(x, (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)))
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------- non-gated


@torch.library.custom_op("twell::ffn", mutates_args=())
def ffn_op(x: Tensor, w_up: Tensor, w_down: Tensor, l1_weight: float, tile_width: int, compression: int,
           dense_row_threshold: Optional[int], gate_kernel: str, path: str, tracker_id: int,
           stats_slot: int, torch_memory: bool = True) -> Tensor:
    return infer_impl(x, w_up, w_up, w_down, False, tile_width, compression, dense_row_threshold, gate_kernel,
                      path, tracker_of(tracker_id), slot_of(stats_slot), torch_memory)


@ffn_op.register_fake
def _(x, w_up, w_down, l1_weight, tile_width, compression, dense_row_threshold, gate_kernel, path, tracker_id,
      stats_slot, torch_memory=True):
    _fake_check(x, (("w_up", w_up), ("w_down", w_down)))
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _ffn_setup_context(ctx, inputs, output):
    x, w_up, w_down, l1_weight = inputs[:4]
    ctx.save_for_backward(x, w_up, w_down)
    ctx.l1_weight = l1_weight
    ctx.n_options = len(inputs) - 3


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
    return (dx, dw_up, dw_down) + (None,) * ctx.n_options


ffn_op.register_autograd(_ffn_backward, setup_context=_ffn_setup_context)


# --------------------------------------------------------------------------- training


@torch.library.custom_op("twell::gated_ffn_fwd", mutates_args=())
def gated_ffn_fwd_op(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, l1_weight: float,
                     dense_row_threshold: Optional[int], gate_kernel: str, path: str, tracker_id: int,
                     stats_slot: int, keep_state: bool, explicit_l1: bool,
                     torch_memory: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    return train_fwd_impl(x, w_gate, w_up, w_down, l1_weight, dense_row_threshold, gate_kernel, path,
                          tracker_of(tracker_id), slot_of(stats_slot), keep_state, torch_memory)


@gated_ffn_fwd_op.register_fake
def _(x, w_gate, w_up, w_down, l1_weight, dense_row_threshold, gate_kernel, path, tracker_id, stats_slot, keep_state,
      explicit_l1, torch_memory=True):
    _fake_check(x, (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)))
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((), dtype=l1_dtype(x)),
            torch.empty((), dtype=torch.int64, device="cpu"))


@torch.library.custom_op("twell::gated_ffn_bwd", mutates_args=())
def gated_ffn_bwd_op(dy: Tensor, dl1: Optional[Tensor], handle: Tensor, x: Tensor, w_gate: Tensor, w_up: Tensor,
                     w_down: Tensor, torch_memory: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return train_bwd_impl(dy, dl1, handle, x, torch_memory)


@gated_ffn_bwd_op.register_fake
def _(dy, dl1, handle, x, w_gate, w_up, w_down, torch_memory=True):
    return tuple(torch.empty_like(a, memory_format=torch.contiguous_format) for a in (x, w_gate, w_up, w_down))


def _fwd_setup_context(ctx, inputs, output):
    x, w_gate, w_up, w_down = inputs[:4]
    explicit_l1 = inputs[11]
    _, _, handle = output
    ctx.save_for_backward(x, w_gate, w_up, w_down, handle)
    ctx.explicit_l1 = explicit_l1
    ctx.torch_memory = inputs[12] if len(inputs) > 12 else True
    ctx.n_options = len(inputs) - 4
    ctx.set_materialize_grads(False)
    if type(handle) is torch.Tensor:        # eager (not traced): free the state with the graph
        ctx.twell_release = Release(int(handle))


def _train_backward(ctx, dy, dl1, backward_op):
    x, w_gate, w_up, w_down, handle = ctx.saved_tensors
    dl1 = dl1 if ctx.explicit_l1 else None
    if dy is None and dl1 is None:
        return (None,) * (4 + ctx.n_options)
    if dy is None:
        dy = torch.zeros_like(x, memory_format=torch.contiguous_format)
    grads = backward_op(dy, dl1, handle, x, w_gate, w_up, w_down, ctx.torch_memory)
    need = ctx.needs_input_grad
    return tuple(g if need[i] else None for i, g in enumerate(grads)) + (None,) * ctx.n_options


def _fwd_backward(ctx, dy, dl1, _dhandle):
    return _train_backward(ctx, dy, dl1, gated_ffn_bwd_op)


gated_ffn_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


class EagerGatedTrain(torch.autograd.Function):
    """``twell::gated_ffn_fwd`` and its registered backward for eager calls on plain tensors, without the
    dispatcher: the same implementation functions, arguments, saved state and gradients as the custom ops,
    minus their dispatch (a layer's training forward + backward at M = 16,384 took 0.4-0.9 ms more host
    time through the registered ops and autograd than in the implementation functions alone; through this
    class 1.19 + 1.09 ms against 2.18 + 1.22 ms before, docs/perf/train_host_probe.py,
    docs/performance-history.md v30).
    ``torch.compile`` and function transforms use the custom ops (see ``functional.run_gated``)."""

    @staticmethod
    def forward(x, w_gate, w_up, w_down, l1_weight, dense_row_threshold, gate_kernel, path, tracker_id, stats_slot,
                keep_state, explicit_l1, torch_memory):
        return train_fwd_impl(x, w_gate, w_up, w_down, l1_weight, dense_row_threshold, gate_kernel, path,
                              tracker_of(tracker_id), slot_of(stats_slot), keep_state, torch_memory)

    setup_context = staticmethod(_fwd_setup_context)

    @staticmethod
    def backward(ctx, dy, dl1, _dhandle):
        return _train_backward(ctx, dy, dl1, _bwd_eager)


def _bwd_eager(dy, dl1, handle, x, w_gate, w_up, w_down, torch_memory):
    return train_bwd_impl(dy, dl1, handle, x, torch_memory)
