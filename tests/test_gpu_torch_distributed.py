"""torch.distributed with twell's layers on the GPU: DDP and FSDP around SparseGatedFFN with one rank (the
gradients equal the plain module's), the tensor-parallel layer with one rank, statistics gathered."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def group():
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    import torch.distributed as dist
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)
    yield dist.group.WORLD


def _problem(seed=0, m=1024, d=256, n=1024):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(m, d, generator=g).to("cuda", torch.bfloat16)
    x[:, 0] = 1.0
    return x


def _module(d=256, n=1024):
    from twell.torch import SparseGatedFFN
    torch.manual_seed(0)
    mod = SparseGatedFFN(d, n, l1_weight=1e-3, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        mod.w_gate[:, 0] = -2.5 * mod.w_gate[:, 1:].norm(dim=1)            # sparse: a few active per token
    return mod


def _grads(mod, x):
    y = mod(x)
    (y.float() ** 2).mean().backward()
    inner = getattr(mod, "module", mod)                  # DDP holds the layer as .module
    return [p.grad.detach().clone() for p in (inner.w_gate, inner.w_up, inner.w_down)]


def test_ddp_one_rank_equals_plain(group):
    from torch.nn.parallel import DistributedDataParallel as DDP
    x = _problem()
    plain = _module()
    wrapped = DDP(_module(), device_ids=[torch.cuda.current_device()])
    for a, b in zip(_grads(plain, x), _grads(wrapped, x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fsdp_one_rank_equals_plain(group):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    x = _problem(1)
    plain = _module()
    wrapped = FSDP(_module(), use_orig_params=True)
    y1, y2 = plain(x), wrapped(x)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    (y2.float() ** 2).mean().backward()
    (y1.float() ** 2).mean().backward()
    for name in ("w_gate", "w_up", "w_down"):
        a = getattr(plain, name).grad
        # FSDP prefixes the names of the wrapped module's parameters
        b = {k.rsplit(".", 1)[-1]: p for k, p in wrapped.named_parameters()}[name].grad
        torch.testing.assert_close(a, b.view_as(a), rtol=1e-2, atol=1e-3)


def test_tensor_parallel_one_rank_and_stats(group):
    from twell.torch.distributed import TensorParallelSparseGatedFFN, gather_stats
    x = _problem(2).requires_grad_(True)
    full = _module()
    tp = TensorParallelSparseGatedFFN.from_full(full, group=group)
    y_full = full(x)
    y_tp = tp(x)
    torch.testing.assert_close(y_full, y_tp, rtol=0, atol=0)
    g = gather_stats(tp.local.last_stats, group, sharded_neurons=True)
    assert int(g["nnz"]) == int(full.last_stats.nnz)
    assert g["neuron_counts"].shape == (1024,)
    (y_tp.float().sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
