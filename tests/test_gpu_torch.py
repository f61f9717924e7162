"""twell.torch on CUDA tensors: forward and gradients vs PyTorch's dense autograd, CUDA graphs, streams,
torch.compile, the module.  Skips without PyTorch, without CUDA in PyTorch, or without a CuPy device."""

from __future__ import annotations

import gc

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import twell  # noqa: E402
from twell import _backend  # noqa: E402
from twell.gpu.streams import CaptureError  # noqa: E402
from twell.synthetic import make_problem  # noqa: E402

_CUDA = torch.cuda.is_available() and _backend.cupy_or_none() is not None
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _CUDA, reason="needs PyTorch with CUDA and CuPy with a CUDA device")]

if _CUDA:
    import twell.torch as tt
    from twell.torch import interop

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Half an ulp (relative) of each dtype: the one final rounding of an output.
HALF_ULP = {"bfloat16": 2.0 ** -9, "float16": 2.0 ** -12, "float32": 2.0 ** -25}
# (kind, mean active neurons per token); mean None: every neuron active on every token.
SPARSITY = [("uniform", 29.0), ("token_skew", 29.0), ("neuron_skew", 29.0), ("uniform", None)]


def to_torch(a, device="cuda"):
    """A NumPy array (bfloat16 through ml_dtypes) as a torch tensor on ``device``."""
    a = np.ascontiguousarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).to(device)
    return torch.from_numpy(a).to(device)


def problem(m, d, n, dtype, kind="uniform", mean=29.0, seed=0):
    """x (m, d) and neuron-major weights (n, d) on the GPU, from twell.synthetic.make_problem."""
    p = make_problem(m, d=d, n=n, mean_active=float(n) if mean is None else min(mean, n / 3), kind=kind, dtype=dtype,
                     seed=seed, xp=np)
    return [to_torch(a) for a in (p.x, p.w_gate, p.w_up, p.w_down)]


def rel_error(out, ref) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    den = torch.linalg.vector_norm(ref)
    num = torch.linalg.vector_norm(out - ref)
    return float(num / den) if den > 0 else float(num)


def dense_autograd(arrays, dy, l1_weight, *, dtype=None, gated=True):
    """PyTorch's dense computation and autograd (in ``dtype``, default the inputs'): y and the gradients of
    (y · dy).sum() + λ (1/M) Σ|h| w.r.t. x and the weights."""
    a = [t.detach().to(dtype or t.dtype).requires_grad_() for t in arrays]
    if gated:
        x, wg, wu, wd = a
        h = torch.relu(x @ wg.mT) * (x @ wu.mT)
    else:
        x, wu, wd = a
        h = torch.relu(x @ wu.mT)
    y = h @ wd
    m = x.shape[0]
    torch.autograd.backward([y, h.abs().double().sum() * (l1_weight / m)],
                            [dy.to(y.dtype), torch.ones((), dtype=torch.float64, device=y.device)])
    return [y.detach()] + [t.grad for t in a]


def check_against_dense(arrays, dy, dtype, l1_weight, *, gated=True, **kw):
    """twell's y and gradients vs float64 dense autograd: error at most twice the same-precision dense
    computation's, plus half an ulp and the fp32 accumulation noise of one length-max(d, n) dot product."""
    a = [t.detach().clone().requires_grad_() for t in arrays]
    y = (tt.gated_ffn if gated else tt.ffn)(*a, l1_weight=l1_weight, **kw)
    y.backward(dy)
    got = [y.detach()] + [t.grad for t in a]
    ref = dense_autograd(arrays, dy, l1_weight, dtype=torch.float64, gated=gated)
    dense = dense_autograd(arrays, dy, l1_weight, gated=gated)
    d, n = arrays[0].shape[1], arrays[1].shape[0]
    floor = HALF_ULP[dtype] + 4 * 2.0 ** -24 * np.sqrt(max(d, n))
    names = ["y", "dx"] + (["dw_gate", "dw_up", "dw_down"] if gated else ["dw_up", "dw_down"])
    for name, out, r, den in zip(names, got, ref, dense):
        assert out.dtype == arrays[0].dtype and out.shape == r.shape and out.device == r.device, name
        err, err_dense = rel_error(out, r), rel_error(den, r)
        assert err <= 2.0 * err_dense + floor, f"{name}: rel err {err:.3g} vs same-precision dense {err_dense:.3g}"


def dy_for(arrays, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = arrays[0]
    return (torch.randn(x.shape, generator=g, device="cuda") * 2.0 ** -6).to(x.dtype)


# --------------------------------------------------------------------------- forward and gradients


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("kind,mean", SPARSITY)
@pytest.mark.parametrize("m,d,n", [(37, 200, 1000), (4096, 2048, 5632)])
def test_gated_forward_and_gradients_vs_dense_autograd(m, d, n, dtype, kind, mean):
    arrays = problem(m, d, n, dtype, kind, mean, seed=m + d)
    check_against_dense(arrays, dy_for(arrays), dtype, 0.01)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_backup_rows_and_l1(dtype):
    arrays = problem(300, 256, 900, dtype, mean=60.0, seed=4)
    check_against_dense(arrays, dy_for(arrays), dtype, 0.5, dense_row_threshold=40)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("m", [3, 700])
def test_non_gated_ffn_vs_dense_autograd(dtype, m):
    x, _, wu, wd = problem(m, 256, 1000, dtype, seed=m)
    check_against_dense([x, wu, wd], dy_for([x]), dtype, 0.05, gated=False)


@pytest.mark.parametrize("m", [1, 4, 64, 513, 3000])
def test_inference_matches_the_cupy_call_bitwise(m):
    """Without autograd the adapter is the inference op on the same data, on the same stream: bitwise."""
    x, wg, wu, wd = problem(m, 2048, 5632, "bfloat16", seed=m)
    y = tt.gated_ffn(x, wg, wu, wd)
    y_planned = tt.gated_ffn(x, wg, wu, wd)         # the second call runs on the first one's validated plan
    dev = x.device.index
    with interop.on_device(dev):
        ref = twell.gated_ffn(*(interop.view(t, dev, "t") for t in (x, wg, wu, wd)))
        ref = interop.to_torch(ref, dev)
    torch.cuda.synchronize()
    assert torch.equal(y.view(torch.int16), ref.view(torch.int16))
    assert torch.equal(y_planned.view(torch.int16), ref.view(torch.int16))
    assert tt.saved_state_count() == 0


@pytest.mark.parametrize("m", [1, 3, 4])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("dtype,d", [("bfloat16", 2048), ("float16", 256)])
def test_eager_decode_plan_matches_the_cupy_call(m, gated, dtype, d):
    """Eager decode calls after the first reuse its validated plan and launch the fused decode by address
    (twell.torch.impl): bitwise the CuPy call, through in-place weight updates, replaced weights, misaligned
    inputs and on a side stream."""
    from twell.torch import impl  # noqa: PLC0415
    x, wg, wu, wd = problem(m, d, 1000, dtype, seed=m + d)
    f = tt.gated_ffn if gated else tt.ffn
    ws = (wg, wu, wd) if gated else (wu, wd)
    dev = x.device.index

    def cupy_call(xx, *w):
        with interop.on_device(dev):
            ref = (twell.gated_ffn if gated else twell.ffn)(*(interop.view(t, dev, "t") for t in (xx,) + w))
            return interop.to_torch(ref, dev)

    first = f(x, *ws)
    w3 = (wg, wu, wd) if gated else (wu, wu, wd)
    key = impl._plan_key(x, *w3, dev, (gated, 256, 8, 128, "auto", "auto"))
    assert key in impl._plans and impl._plans[key].decode_ok   # remembered after the validated call
    poison = torch.full_like(x, float("nan"))
    del poison                                             # y most likely reuses this block
    y = f(x, *ws)                                          # the plan
    torch.cuda.synchronize()
    assert _bitwise(y, first) and _bitwise(y, cupy_call(x, *ws))
    ws[-1].mul_(2)                                         # same address, new values: read at launch
    assert _bitwise(f(x, *ws), cupy_call(x, *ws))
    new_down = ws[-1].clone()                              # another address: a new plan
    ws = ws[:-1] + (new_down,)
    assert _bitwise(f(x, *ws), cupy_call(x, *ws))
    buf = torch.empty(m * d + 1, dtype=x.dtype, device="cuda")
    xm = buf[1:].view(m, d)                                # misaligned: the validated (copying) path
    xm.copy_(x)
    assert _bitwise(f(xm, *ws), cupy_call(x, *ws))
    expected = f(x, *ws)
    slow = torch.zeros_like(x)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side), torch.no_grad():        # queued on the side stream behind its copy
        torch.cuda._sleep(int(1e8))
        slow.copy_(x)
        got = f(slow, *ws)
    torch.cuda.synchronize()
    assert _bitwise(got, expected)


@pytest.mark.parametrize("mean,path", [(29.0, "sparse"), (None, "dense")])
def test_module_decode_plan_follows_its_tracker(mean, path):
    """A layer without statistics decodes through the remembered launch while its tracker picks the sparse
    path, reports its density every 16th call, and takes the dense path when the tracker says so."""
    x, wg, wu, wd = problem(1, 2048, 5632, "bfloat16", mean=mean, seed=11)
    ffn = tt.SparseGatedFFN(2048, 5632, collect_stats=False, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        for p, w in zip((ffn.w_gate, ffn.w_up, ffn.w_down), (wg, wu, wd)):
            p.copy_(w)
        ref = tt.gated_ffn(x, wg, wu, wd, path=path)
        outs = [ffn(x) for _ in range(40)]
    dev = x.device.index
    with interop.on_device(dev):                           # a reporting call counts its entries: that kernel
        counted = twell.gated_ffn(*(interop.view(t, dev, "t") for t in (x, wg, wu, wd)), return_stats=True)[0]
        counted = interop.to_torch(counted, dev)
    torch.cuda.synchronize()
    reports = (0, 16, 32) if path == "sparse" else (0,)   # the first call knows nothing yet: sparse
    for i, o in enumerate(outs):
        assert _bitwise(o, counted if i in reports else ref), i
    calls = ffn.density_tracker.calls
    assert sum(calls.values()) == 3, calls                 # reports of calls 1, 17 and 33
    assert ffn.density_tracker.last_path == path


def test_leading_dims_and_misaligned_views():
    x, wg, wu, wd = problem(24, 256, 1000, "bfloat16", seed=3)
    flat = tt.gated_ffn(x, wg, wu, wd)
    assert torch.equal(tt.gated_ffn(x.view(2, 3, 4, 256), wg, wu, wd).view(24, 256), flat)
    buf = torch.empty(24 * 256 + 1, dtype=x.dtype, device="cuda")
    xm = buf[1:].view(24, 256)                      # contiguous, 2 bytes off alignment: the core copies it
    xm.copy_(x)
    assert xm.data_ptr() % 16
    assert torch.equal(tt.gated_ffn(xm, wg, wu, wd), flat)


def test_return_l1_explicit_equals_implicit():
    arrays = problem(500, 256, 1000, "bfloat16", seed=8)
    dy = dy_for(arrays)
    a = [t.clone().requires_grad_() for t in arrays]
    tt.gated_ffn(*a, l1_weight=0.25).backward(dy)
    b = [t.clone().requires_grad_() for t in arrays]
    y, l1 = tt.gated_ffn(*b, return_l1=True)
    assert l1.dtype == torch.float32 and l1.device.type == "cuda"
    torch.autograd.backward([y, 0.25 * l1], [dy, None])
    for u, v in zip(a, b):
        assert torch.equal(u.grad, v.grad)
    with torch.no_grad():
        h = torch.relu(arrays[0].float() @ arrays[1].float().mT) * (arrays[0].float() @ arrays[2].float().mT)
    assert float(l1) == pytest.approx(float(h.abs().sum() / 500), rel=2e-2)


def test_gradients_only_where_required():
    x, wg, wu, wd = problem(200, 256, 1000, "bfloat16", seed=2)
    wu = wu.clone().requires_grad_()
    y = tt.gated_ffn(x, wg, wu, wd)
    y.backward(dy_for([x]))
    assert wu.grad is not None and wu.grad.shape == wu.shape
    assert all(t.grad is None for t in (x, wg, wd))


def test_retain_graph_second_backward_raises():
    a = [t.requires_grad_() for t in problem(200, 256, 1000, "bfloat16", seed=5)]
    y = tt.gated_ffn(*a)
    y.float().sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="consumed"):
        y.float().sum().backward()
    del y
    gc.collect()
    assert tt.saved_state_count() == 0


# --------------------------------------------------------------------------- CUDA graphs


def _bitwise(a, b):
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("m", [1, 3, 64, 512])
def test_cuda_graph_capture_replay_bitwise(m):
    x, wg, wu, wd = problem(m, 2048, 5632, "bfloat16", seed=m)
    x2 = problem(m, 2048, 5632, "bfloat16", seed=m + 100)[0]
    static_x = x.clone()
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                   # warm-up: kernels compiled, launch plans built
            for _ in range(3):
                tt.gated_ffn(static_x, wg, wu, wd)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = tt.gated_ffn(static_x, wg, wu, wd)
        graph.replay()
        torch.cuda.synchronize()
        assert _bitwise(static_y, tt.gated_ffn(x, wg, wu, wd))
        static_x.copy_(x2)
        graph.replay()
        torch.cuda.synchronize()
        assert _bitwise(static_y, tt.gated_ffn(x2, wg, wu, wd))


def test_cuda_graph_dense_path_and_large_batches():
    x, wg, wu, wd = problem(1024, 256, 1000, "bfloat16", seed=7)
    with torch.no_grad():
        eager = tt.gated_ffn(x, wg, wu, wd, path="dense")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):                   # path="dense": capturable at any M
            static_y = tt.gated_ffn(x, wg, wu, wd, path="dense")
        graph.replay()
        torch.cuda.synchronize()
        assert _bitwise(static_y, eager)
        with pytest.raises(Exception) as info:          # the sparse path at M > 512 reads back: refused
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                tt.gated_ffn(x, wg, wu, wd)
        err = info.value
        assert isinstance(err, CaptureError) or isinstance(err.__context__, CaptureError), repr(err)
    torch.cuda.synchronize()


def test_module_in_cuda_graph_has_no_stats():
    m = tt.SparseGatedFFN(256, 1000, dtype=torch.bfloat16, device="cuda")
    x = problem(64, 256, 1000, "bfloat16")[0]
    with torch.no_grad():
        eager = m(x)
        assert m.last_stats is not None and m.last_stats.path == "small_batch"
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = m(x)
        assert m.last_stats is None                     # a captured call records no statistics
        graph.replay()
        torch.cuda.synchronize()
        assert _bitwise(static_y, eager)


def test_module_large_batch_in_cuda_graph():
    """M = 2,048 (the sparse path) captures under torch.cuda.graph through a SparseGatedFFN without statistics
    once its tracker has observed an eager call: the backup is sized on the device.  The replay is bitwise
    the eager call, and with new inputs that need the dense backup in hundreds of rows (past the captured
    capacity: the exact kernel) it stays exact."""
    m, d, n = 2048, 2048, 5632
    x, wg, wu, wd = problem(m, d, n, "bfloat16", seed=31)
    layer = tt.SparseGatedFFN(d, n, collect_stats=False, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        for param, w in ((layer.w_gate, wg), (layer.w_up, wu), (layer.w_down, wd)):
            param.copy_(w)
        static_x = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            layer(static_x)                             # observed (read back)
            torch.cuda.synchronize()
            eager = layer(static_x)                     # sized on the device
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        static_y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert _bitwise(static_y, eager)
        x2 = x.clone()
        x2[:400, 0] = -3.0                              # bias input flipped: hundreds of active neurons
        static_x.copy_(x2)
        static_y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = tt.gated_ffn(x2, wg, wu, wd)              # no tracker: the read-back path, exact
        assert torch.isfinite(static_y).all() and rel_error(static_y, ref) < 4 * 2.0**-9   # 4 half-ulps of bf16


# --------------------------------------------------------------------------- streams


def test_runs_on_torch_current_stream():
    """Work is queued on torch's current stream: behind a long sleep and a copy on a side stream, the op must
    see the copied input (on another stream it would read the zeros)."""
    x, wg, wu, wd = problem(300, 256, 1000, "bfloat16", seed=9)
    expected = tt.gated_ffn(x, wg, wu, wd)
    a = [t.clone().requires_grad_() for t in (x, wg, wu, wd)]
    tt.gated_ffn(*a).backward(dy_for([x]))
    buf = torch.zeros_like(x)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        assert interop.stream(torch.cuda.current_device()).ptr == side.cuda_stream
        torch.cuda._sleep(int(2e8))
        buf.copy_(x)
        with torch.no_grad():
            y = tt.gated_ffn(buf, wg, wu, wd)
        torch.cuda._sleep(int(2e8))
        buf.copy_(x)
        b = [buf.clone().requires_grad_()] + [t.clone().requires_grad_() for t in (wg, wu, wd)]
        tt.gated_ffn(*b).backward(dy_for([x]))
    torch.cuda.synchronize()
    assert torch.equal(y, expected)
    for u, v in zip(a, b):
        assert torch.equal(u.grad, v.grad)


# --------------------------------------------------------------------------- torch.compile


class _Block(torch.nn.Module):
    def __init__(self, d, n):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d, device="cuda", dtype=torch.bfloat16)
        self.ffn = tt.SparseGatedFFN(d, n, l1_weight=1e-3, device="cuda", dtype=torch.bfloat16) if _CUDA else None

    def forward(self, x):
        return x + self.ffn(self.norm(x))


def test_torch_compile_inductor():
    torch.manual_seed(0)
    block = _Block(256, 1024)
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(4, 300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = compiled(x)
    y.float().square().mean().backward()
    got = [y.detach(), x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    x.grad = None
    block.zero_grad()
    y_ref = block(x)
    y_ref.float().square().mean().backward()
    want = [y_ref.detach(), x.grad] + [p.grad for p in block.parameters()]
    for a, b in zip(got, want):
        assert rel_error(a, b) < 2e-2
    with torch.no_grad():
        assert rel_error(compiled(x), y_ref) < 2e-2
    assert tt.saved_state_count() == 0


# --------------------------------------------------------------------------- module


def test_module_training_step_decreases_loss():
    torch.manual_seed(0)
    d, n, m = 256, 1024, 2048
    teacher = tt.SparseGatedFFN(d, n, device="cuda")
    student = tt.SparseGatedFFN(d, n, l1_weight=1e-4, device="cuda")
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    x = torch.randn(m, d, device="cuda")
    with torch.no_grad():
        target = teacher(x)
    losses = []
    for _ in range(60):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(student(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    s = student.last_stats
    assert s.l1 is not None and s.l1.device.type == "cuda" and float(s.l0) > 0
    assert s.neuron_counts.shape == (n,) and s.neuron_counts.device.type == "cuda"


def test_module_stats_and_paths():
    m = tt.SparseGatedFFN(256, 1000, dtype=torch.bfloat16, device="cuda")
    x = problem(2000, 256, 1000, "bfloat16")[0]
    with torch.no_grad():
        m(x)
    s = m.last_stats
    assert s.path in ("sparse", "dense") and s.n_rows == 2000 and s.l1 is None
    with torch.no_grad():
        z = x @ m.w_gate.mT
    assert int(s.nnz) == pytest.approx(int((z > 0).sum()), rel=0.02)
    assert int(s.neuron_counts.sum()) == int(s.nnz)
    m.path = "dense"
    with torch.no_grad():
        y_dense = m(x)
    assert m.last_stats.path == "dense"
    m.path = "sparse"
    with torch.no_grad():
        y_sparse = m(x)
    assert rel_error(y_sparse, y_dense) < 1e-2
    assert m.density_tracker.calls["dense"] >= 1


@pytest.mark.parametrize("torch_memory", [True, False])
def test_training_memory_pool(torch_memory):
    arrays = problem(1000, 256, 1000, "bfloat16", seed=12)
    a = [t.clone().requires_grad_() for t in arrays]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y = tt.gated_ffn(*a, l1_weight=0.01, torch_memory=torch_memory)
    grown = torch.cuda.memory_allocated() - before
    if torch_memory:        # y and the saved state come from PyTorch's caching allocator
        assert grown >= y.numel() * y.element_size()
    else:                   # only l1's float32 copy
        assert grown < y.numel() * y.element_size()
    y.backward(dy_for(arrays))
    b = [t.clone().requires_grad_() for t in arrays]
    tt.gated_ffn(*b, l1_weight=0.01, torch_memory=not torch_memory).backward(dy_for(arrays))
    for u, v in zip(a, b):
        assert torch.equal(u.grad, v.grad)


# --------------------------------------------------------------------------- errors


def test_errors_name_the_argument():
    x, wg, wu, wd = problem(16, 256, 1000, "bfloat16")
    with pytest.raises(TypeError, match="x has dtype float64"):
        tt.gated_ffn(x.double(), wg.double(), wu.double(), wd.double())
    with pytest.raises(TypeError, match="w_up on cpu"):
        tt.gated_ffn(x, wg, wu.cpu(), wd)
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        tt.gated_ffn(x.t().contiguous().t(), wg, wu, wd)
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        tt.gated_ffn(x.view(4, 4, 256).transpose(0, 1), wg, wu, wd)
    with pytest.raises(ValueError, match="w_down must be C-contiguous"):
        tt.gated_ffn(x, wg, wu, wd.t().contiguous().t())
    with pytest.raises(TypeError, match="w_gate must have the dtype of x"):
        tt.gated_ffn(x, wg.float(), wu, wd)
    with pytest.raises(TypeError, match="w_gate must have the dtype of x"):
        tt.gated_ffn(x.requires_grad_(), wg.float(), wu, wd)


@pytest.mark.parametrize("training", [True, False])
def test_rows_do_not_see_each_other(training):
    """A row's output depends on its own input alone, on every route (compact rows, backup rows, rows past
    a queued backup's capacity): changing the second half of a batch — with many more heavy rows — leaves
    the first half's outputs within rounding of the first call's (a sequence model whose FFN mixed rows
    would see future tokens)."""
    x, wg, wu, wd = problem(4096, 256, 1024, "bfloat16", kind="token_skew", mean=29.0, seed=5)
    f = tt.SparseGatedFFN(256, 1024, dtype=torch.bfloat16, device="cuda", path="sparse", collect_stats=False)
    with torch.no_grad():
        f.w_gate.copy_(wg), f.w_up.copy_(wu), f.w_down.copy_(wd)
    x2 = x.clone()
    x2[2048:] = x2[2048:].flip(0)
    x2[2048:3048] *= 3.0                                                 # more active neurons: backup rows
    outs = []
    for inp in (x, x, x2):
        if training:
            xi = inp.clone().requires_grad_(True)
            y = f(xi)
            (dx,) = torch.autograd.grad(y, xi, torch.ones_like(y))
            outs.append(torch.cat([y, dx], dim=1).detach())
        else:
            with torch.inference_mode():
                outs.append(f(inp).clone())
    torch.cuda.synchronize()
    first, second, changed = (o[:2048].float() for o in outs)
    scale = first.abs().max()
    assert torch.isfinite(changed).all()
    assert (changed - first).abs().max() <= 8 * HALF_ULP["bfloat16"] * scale
    assert (second - first).abs().max() <= 8 * HALF_ULP["bfloat16"] * scale
