"""PyTorch baselines (GPU): eager inference and eager + autograd training, on zero-copy DLPack views of the
problem's CuPy arrays, on the bench stream (made PyTorch's current stream by the runner).

* ``torch_eager``: ``F.linear``, ``relu``, ``*``, ``F.linear``.
* ``torch_autograd``: the same forward with leaf weights, ``torch.autograd.grad`` for x and the three
  weights; λ > 0 adds ``(λ/M) sign(h)`` through a small ``autograd.Function`` on ``h``.
"""

from __future__ import annotations

from .common import torch_cuda

__all__ = ["make_torch_eager", "make_torch_autograd"]


def make_torch_eager(p):
    torch = torch_cuda()
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


#: the autograd.Function of the L1 gradient, built once (a cache).
_TORCH_L1: dict = {}


def _torch_l1_grad():
    """``apply(h, scale)``: identity whose backward adds ``scale * sign(h)`` (the gradient of ``scale·Σ|h|``).

    Cheaper than a ``scale * h.abs().sum()`` loss term (no forward pass over h) and free of the
    reference cycle a tensor hook capturing ``h`` would create.
    """
    fn = _TORCH_L1.get("apply")
    if fn is None:
        torch = torch_cuda()

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


def make_torch_autograd(tp):
    """PyTorch eager + autograd on DLPack views: leaf weights, ``torch.autograd.grad`` for x and the weights."""
    torch = torch_cuda()
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
