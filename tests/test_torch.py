"""twell.torch on CPU tensors (the float64 NumPy reference): autograd, custom ops, torch.compile, the module."""

from __future__ import annotations

import copy
import gc
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import twell  # noqa: E402
import twell.torch as tt  # noqa: E402
from twell import reference  # noqa: E402
from twell.torch import interop, registry  # noqa: E402

F64 = torch.float64


def dense_gated(x, w_gate, w_up, w_down):
    """The dense computation with torch ops: (relu(x w_gateᵀ) ⊙ (x w_upᵀ)) w_down."""
    return (torch.relu(x @ w_gate.mT) * (x @ w_up.mT)) @ w_down


def away_from_kinks(m, d, n, *, seed=0, margin=1e-3, dtype=F64, active=0.4):
    """x (m, d) and neuron-major weights (n, d) whose gate pre-activations and, where the gate is active, up
    activations are at least ``margin`` away from 0 (finite differences then never cross relu's or |h|'s kink);
    about ``active`` of the neurons fire per token (x[:, 0] = 1 carries a bias)."""
    from scipy.stats import norm
    for s in range(seed, seed + 1000):
        g = torch.Generator().manual_seed(s)
        x = torch.randn(m, d, generator=g, dtype=F64)
        x[:, 0] = 1.0
        w = [torch.randn(n, d, generator=g, dtype=F64) / d ** 0.5 for _ in range(3)]
        w[0][:, 0] = -float(norm.isf(active))
        z, u = x @ w[0].T, x @ w[1].T
        on = z > 0
        if z.abs().min() > margin and (u.abs()[on].min() > margin if on.any() else True) and 0 < on.sum() < on.numel():
            return [a.to(dtype) for a in (x, *w)]
    raise AssertionError("no problem away from the kinks")


def leaves(arrays, requires_grad=True):
    return [a.clone().requires_grad_(requires_grad) for a in arrays]


# --------------------------------------------------------------------------- import


def test_import_twell_does_not_import_torch():
    code = "import sys, twell; twell.gated_ffn; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("m,d,n,threshold", [(5, 8, 16, "auto"), (33, 24, 70, 3), (1, 16, 40, None)])
def test_forward_equals_reference(dtype, m, d, n, threshold):
    x, wg, wu, wd = away_from_kinks(m, d, n, dtype=dtype, seed=m)
    ref = reference.gated_ffn_dense(*(a.numpy() for a in (x, wg, wu, wd)))
    with torch.no_grad():
        y_inf = tt.gated_ffn(x, wg, wu, wd, dense_row_threshold=threshold)
    y_train = tt.gated_ffn(*leaves((x, wg, wu, wd)), dense_row_threshold=threshold)
    for y in (y_inf, y_train):
        assert y.dtype == dtype and y.shape == (m, d)
        np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-12 if dtype == F64 else 1e-5, atol=1e-12
                                   if dtype == F64 else 1e-6)


def test_forward_equals_torch_dense():
    x, wg, wu, wd = away_from_kinks(6, 8, 16)
    torch.testing.assert_close(tt.gated_ffn(x, wg, wu, wd), dense_gated(x, wg, wu, wd), rtol=1e-12, atol=1e-12)


def test_leading_batch_dims():
    x, wg, wu, wd = away_from_kinks(12, 8, 16)
    flat = tt.gated_ffn(x, wg, wu, wd)
    for shape in [(3, 4, 8), (2, 3, 2, 8)]:
        y = tt.gated_ffn(x.reshape(shape), wg, wu, wd)
        assert y.shape == shape
        torch.testing.assert_close(y.reshape(12, 8), flat, rtol=0, atol=0)
    y1 = tt.gated_ffn(x[0], wg, wu, wd)                                # (d,): one token
    assert y1.shape == (8,)
    torch.testing.assert_close(y1, flat[0], rtol=1e-13, atol=1e-15)   # the reference is not batch-invariant
    # a non-contiguous batch (CPU: the reference takes any layout) and with autograd
    xb = x.reshape(3, 4, 8).transpose(0, 1).requires_grad_()
    y = tt.gated_ffn(xb, *leaves((wg, wu, wd)))
    assert y.shape == (4, 3, 8)
    torch.testing.assert_close(y, dense_gated(xb, wg, wu, wd), rtol=1e-12, atol=1e-12)
    y.sum().backward()
    assert xb.grad.shape == xb.shape


@pytest.mark.skipif(twell._backend.bfloat16_dtype() is None, reason="needs ml_dtypes")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cpu_tensors_run_the_reference(dtype):
    x, wg, wu, wd = [a.to(dtype) for a in away_from_kinks(7, 16, 32)]
    y = tt.gated_ffn(x, wg, wu, wd)
    assert y.dtype == dtype
    ref = reference.gated_ffn(*(interop.host_array(a, "a") for a in (x, wg, wu, wd)))
    np.testing.assert_array_equal(interop.host_array(y, "y"), ref)
    xl, wgl, wul, wdl = leaves((x, wg, wu, wd))
    y2 = tt.gated_ffn(xl, wgl, wul, wdl)
    y2.float().sum().backward()
    assert xl.grad.dtype == dtype and wdl.grad.shape == wd.shape


# --------------------------------------------------------------------------- autograd


def test_eager_training_skips_the_dispatcher_with_the_same_results(monkeypatch):
    """An eager training call on plain tensors runs the ops' implementation through EagerGatedTrain (no
    dispatcher); y, l1 and every gradient equal the registered custom op's (forced here), with and without
    the explicit l1 and λ; the saved state is released with the graph."""
    from twell.torch import functional, ops
    calls = []
    real_apply = ops.EagerGatedTrain.apply
    monkeypatch.setattr(ops.EagerGatedTrain, "apply", lambda *a: calls.append(1) or real_apply(*a))
    base = leaves(away_from_kinks(6, 8, 20, seed=5))

    def run(lam, explicit):
        inputs = [t.detach().clone().requires_grad_(True) for t in base]
        out = tt.gated_ffn(*inputs, l1_weight=lam, return_l1=explicit, dense_row_threshold=3)
        y, l1 = out if explicit else (out, None)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=F64).view_as(y)).sum() + (0.0 if l1 is None else 0.7 * l1)
        loss.backward()
        return [y.detach(), *(() if l1 is None else (l1.detach(),)), *(t.grad for t in inputs)]

    for lam, explicit in ((0.0, False), (0.2, False), (0.2, True)):
        calls.clear()
        eager = run(lam, explicit)
        assert calls == [1]
        with monkeypatch.context() as m:
            m.setattr(functional, "_eager_plain", lambda tensors: False)      # the registered op
            registered = run(lam, explicit)
        assert calls == [1]
        for a, b in zip(eager, registered):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    gc.collect()
    assert tt.saved_state_count() == 0


@pytest.mark.parametrize("threshold", [128, 2])
def test_gradcheck_gated_ffn_with_l1(threshold):
    """float64 gradcheck w.r.t. x and the three weights, the L1 penalty λ·(1/M)Σ|h| an output (λ = 0.3);
    threshold 2 puts the rows with more active neurons on the dense backup."""
    inputs = leaves(away_from_kinks(5, 8, 16, seed=11))

    def f(x, wg, wu, wd):
        y, l1 = tt.gated_ffn(x, wg, wu, wd, return_l1=True, dense_row_threshold=threshold)
        return y, 0.3 * l1

    with tt.retain_saved_state():
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)
        assert torch.autograd.gradcheck(lambda *a: tt.gated_ffn(*a, dense_row_threshold=threshold), inputs)
    gc.collect()
    assert tt.saved_state_count() == 0


def test_implicit_l1_gradient_is_the_penalty_gradient():
    """l1_weight = λ adds the gradient of λ·(1/M)Σ|h| in the backward (the paper's form): the same gradients as
    the explicit penalty and as torch's dense autograd of loss + λ·(1/M)Σ|h|."""
    arrays = away_from_kinks(9, 8, 16, seed=5)
    m = arrays[0].shape[0]
    dy = torch.randn(m, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    lam = 0.7

    def grads(fn):
        a = leaves(arrays)
        fn(*a).backward()
        return [t.grad for t in a]

    implicit = grads(lambda *a: (tt.gated_ffn(*a, l1_weight=lam) * dy).sum())

    def explicit(*a):
        y, l1 = tt.gated_ffn(*a, return_l1=True)
        return (y * dy).sum() + lam * l1

    def dense(x, wg, wu, wd):
        h = torch.relu(x @ wg.mT) * (x @ wu.mT)
        return ((h @ wd) * dy).sum() + lam * h.abs().sum() / m

    for a, b, c in zip(implicit, grads(explicit), grads(dense)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_return_l1_value_and_dtype():
    x, wg, wu, wd = away_from_kinks(6, 8, 16)
    y, l1 = tt.gated_ffn(x, wg, wu, wd, return_l1=True)
    h = torch.relu(x @ wg.mT) * (x @ wu.mT)
    assert l1.dtype == F64 and l1.shape == ()
    torch.testing.assert_close(l1, h.abs().sum() / 6)
    _, l1_32 = tt.gated_ffn(*(a.float() for a in (x, wg, wu, wd)), return_l1=True)
    assert l1_32.dtype == torch.float32
    assert tt.saved_state_count() == 0          # no autograd: no state kept


@pytest.mark.parametrize("which", [(0,), (2,), (1, 3), (0, 1, 2, 3)])
def test_gradients_only_for_inputs_that_require_them(which):
    arrays = away_from_kinks(7, 8, 16, seed=3)
    ref = leaves(arrays)
    (dense_gated(*ref) ** 2).sum().backward()
    a = [t.clone().requires_grad_(i in which) for i, t in enumerate(arrays)]
    (tt.gated_ffn(*a, l1_weight=0.0) ** 2).sum().backward()
    for i, t in enumerate(a):
        if i in which:
            torch.testing.assert_close(t.grad, ref[i].grad, rtol=1e-11, atol=1e-12)
        else:
            assert t.grad is None


def test_grad_mode_off_runs_inference_op():
    m = tt.SparseGatedFFN(8, 16, dtype=F64)
    x = torch.randn(4, 8, dtype=F64)
    with torch.no_grad():
        m(x)
    assert m.last_stats.l1 is None              # inference statistics
    m(x).sum().backward()
    assert m.last_stats.l1 is not None          # training forward
    x.requires_grad_()
    with torch.no_grad():                       # grad disabled: inference even with requires_grad inputs
        y = m(x)
    assert not y.requires_grad and m.last_stats.l1 is None
    assert tt.saved_state_count() == 0


def dispatcher_calls(fn, op_name="twell::gated_ffn"):
    """(fn's result, how many times the registered op ``op_name`` went through PyTorch's dispatcher)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(1 for e in prof.events() if e.name == op_name)


def test_eager_inference_skips_the_dispatcher():
    """Plain eager inference calls the op's implementation directly; under a TorchFunctionMode (here the
    torch.device context) the registered op runs; the results are the same."""
    x, wg, wu, wd = away_from_kinks(5, 8, 16)

    def under_mode():
        with torch.device("cpu"):
            return tt.gated_ffn(x, wg, wu, wd)

    with torch.no_grad():
        y, calls = dispatcher_calls(lambda: tt.gated_ffn(x, wg, wu, wd))
        assert calls == 0
        y2, calls = dispatcher_calls(under_mode)
        assert calls == 1
    torch.testing.assert_close(y, y2, rtol=0, atol=0)


def test_retain_graph_second_backward_raises():
    a = leaves(away_from_kinks(5, 8, 16))
    y = tt.gated_ffn(*a, l1_weight=0.01)
    y.sum().backward(retain_graph=True)
    first = a[0].grad.clone()
    with pytest.raises(RuntimeError, match="consumed") as info:
        y.sum().backward()
    assert "retain_graph" in str(info.value) and "retain_saved_state" in str(info.value)
    torch.testing.assert_close(a[0].grad, first)            # nothing accumulated by the failed backward
    # the way out: keep the state
    with tt.retain_saved_state():
        y = tt.gated_ffn(*a, l1_weight=0.01)
    for t in a:
        t.grad = None
    y.sum().backward(retain_graph=True)
    g1 = a[1].grad.clone()
    y.sum().backward()
    torch.testing.assert_close(a[1].grad, 2 * g1, rtol=1e-12, atol=1e-12)
    del y
    gc.collect()
    assert tt.saved_state_count() == 0


def test_retained_state_gives_the_same_gradients_twice():
    a = leaves(away_from_kinks(5, 8, 16))
    with tt.retain_saved_state():
        y = tt.gated_ffn(*a, l1_weight=0.2)
    g = [torch.autograd.grad(y.sum(), a, retain_graph=True) for _ in range(2)]
    for u, v in zip(*g):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_saved_state_freed_with_the_graph():
    a = leaves(away_from_kinks(5, 8, 16))
    y = tt.gated_ffn(*a)
    assert tt.saved_state_count() == 1
    del y                                                   # no backward: freed with the graph
    gc.collect()
    assert tt.saved_state_count() == 0
    y = tt.gated_ffn(*a)
    y.sum().backward()                                      # consumed by the backward
    assert tt.saved_state_count() == 0


def test_eviction_beyond_max_saved_states():
    assert tt.max_saved_states() == tt.MAX_SAVED_STATES == 512
    previous = tt.set_max_saved_states(2)
    try:
        assert previous == tt.MAX_SAVED_STATES and tt.max_saved_states() == 2
        a = leaves(away_from_kinks(5, 8, 16))
        ys = [tt.gated_ffn(*a), tt.gated_ffn(*a)]
        with pytest.warns(RuntimeWarning, match="evicted 1"):
            ys.append(tt.gated_ffn(*a))
        with pytest.raises(RuntimeError, match="MAX_SAVED_STATES"):
            ys[0].sum().backward()
        ys[2].sum().backward()
        del ys
        gc.collect()
        assert tt.saved_state_count() == 0
    finally:
        tt.set_max_saved_states(previous)
    assert tt.max_saved_states() == 512
    with pytest.raises(ValueError, match="integer >= 1"):
        tt.set_max_saved_states(0)


def test_gradient_of_unused_output_is_not_needed():
    """A loss built only from l1 (y unused) differentiates, with dy taken as zero."""
    arrays = away_from_kinks(5, 8, 16)
    a = leaves(arrays)
    _, l1 = tt.gated_ffn(*a, return_l1=True)
    l1.backward()
    b = leaves(arrays)
    h = torch.relu(b[0] @ b[1].mT) * (b[0] @ b[2].mT)
    (h.abs().sum() / 5).backward()
    for u, v in zip(a, b):
        torch.testing.assert_close(u.grad, v.grad if v.grad is not None else torch.zeros_like(u))


# --------------------------------------------------------------------------- non-gated


def test_ffn_forward_and_gradcheck():
    x, _, wu, wd = away_from_kinks(6, 8, 16, seed=2)
    ref = reference.ffn_dense(*(a.numpy() for a in (x, wu, wd)))
    np.testing.assert_allclose(tt.ffn(x, wu, wd).numpy(), ref, rtol=1e-12, atol=1e-12)
    assert tt.ffn(x.reshape(2, 3, 8), wu, wd).shape == (2, 3, 8)
    inputs = leaves((x, wu, wd))
    assert torch.autograd.gradcheck(lambda *a: tt.ffn(*a), inputs)

    def f(*a):
        y, l1 = tt.ffn(*a, return_l1=True)
        return y, 0.4 * l1

    assert torch.autograd.gradcheck(f, inputs)
    # implicit λ equals the explicit penalty
    dy = torch.randn(6, 8, dtype=F64)
    g1 = torch.autograd.grad((tt.ffn(*inputs, l1_weight=0.4) * dy).sum(), inputs)
    y, l1 = tt.ffn(*inputs, return_l1=True)
    g2 = torch.autograd.grad((y * dy).sum() + 0.4 * l1, inputs)
    for u, v in zip(g1, g2):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- module


def test_module_from_linear_to_linear_round_trip():
    torch.manual_seed(0)
    d, n = 8, 24
    gate, up, down = (torch.nn.Linear(d, n, bias=False, dtype=F64), torch.nn.Linear(d, n, bias=False, dtype=F64),
                      torch.nn.Linear(n, d, bias=False, dtype=F64))
    m = tt.SparseGatedFFN.from_linear(gate, up, down, l1_weight=0.01)
    assert m.w_down.shape == (n, d) and m.l1_weight == 0.01
    torch.testing.assert_close(m.w_down, down.weight.T, rtol=0, atol=0)
    x = torch.randn(2, 5, d, dtype=F64)
    torch.testing.assert_close(m(x), down(torch.relu(gate(x)) * up(x)), rtol=1e-12, atol=1e-12)
    g2, u2, d2 = m.to_linear()
    for a, b in ((g2, gate), (u2, up), (d2, down)):
        assert a.bias is None and a.weight.shape == b.weight.shape and a.weight.dtype == F64
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)
    # the copies are independent of the module
    with torch.no_grad():
        m.w_gate.zero_()
    assert gate.weight.abs().sum() > 0 and g2.weight.abs().sum() > 0


def test_from_linear_rejects_biases_and_bad_shapes():
    lin = torch.nn.Linear
    with pytest.raises(ValueError, match="gate has a bias"):
        tt.SparseGatedFFN.from_linear(lin(8, 16), lin(8, 16, bias=False), lin(16, 8, bias=False))
    with pytest.raises(ValueError, match="down has a bias"):
        tt.SparseGatedFFN.from_linear(lin(8, 16, bias=False), lin(8, 16, bias=False), lin(16, 8))
    with pytest.raises(ValueError, match=r"down.weight must have shape \(d, n\)"):
        tt.SparseGatedFFN.from_linear(lin(8, 16, bias=False), lin(8, 16, bias=False), lin(8, 16, bias=False))
    with pytest.raises(TypeError, match="up must be an nn.Linear"):
        tt.SparseGatedFFN.from_linear(lin(8, 16, bias=False), torch.nn.Identity(), lin(16, 8, bias=False))


def test_module_init_like_linear():
    torch.manual_seed(0)
    d, n = 64, 256
    m = tt.SparseGatedFFN(d, n)
    assert [name for name, _ in m.named_parameters()] == ["w_gate", "w_up", "w_down"]
    for w, fan_in in ((m.w_gate, d), (m.w_up, d), (m.w_down, n)):
        assert w.shape == (n, d) and w.dtype == torch.float32 and w.requires_grad
        bound = fan_in ** -0.5
        assert w.abs().max() <= bound
        assert abs(w.std().item() - bound / 3 ** 0.5) < 0.05 * bound     # uniform(-b, b): std b / sqrt(3)
    ref = torch.nn.Linear(d, n).weight                                    # nn.Linear's own bound, the same
    assert ref.abs().max() <= d ** -0.5
    assert tt.SparseGatedFFN(8, 16, dtype=F64).w_up.dtype == F64


def test_module_last_stats():
    torch.manual_seed(1)
    m = tt.SparseGatedFFN(8, 32, dtype=F64, l1_weight=0.01)
    assert m.last_stats is None
    x = torch.randn(3, 7, 8, dtype=F64)
    y = m(x)
    s = m.last_stats
    assert isinstance(s, tt.TorchFFNStats)
    assert s.n_rows == 21 and s.n_cols == 32 and s.path == "reference" and s.n_backup_rows == 0
    assert isinstance(s.neuron_counts, torch.Tensor) and s.neuron_counts.shape == (32,)
    assert s.neuron_counts.dtype == torch.int32
    with torch.no_grad():
        h = torch.relu(x @ m.w_gate.mT) * (x @ m.w_up.mT)
    assert int(s.nnz) == int((h != 0).sum())
    assert float(s.l0) == pytest.approx(int(s.nnz) / 21)
    assert float(s.l1) == pytest.approx(float(h.abs().sum() / 21))
    torch.testing.assert_close(s.neuron_counts, (h != 0).reshape(-1, 32).sum(0).to(torch.int32))
    assert s.to_dict()["n_rows"] == 21
    y.sum().backward()
    m.collect_stats = False
    m(x)
    assert m.last_stats is s                    # not updated
    assert isinstance(m.density_tracker, twell.DensityTracker)
    assert tt.SparseGatedFFN(8, 32).density_tracker is not m.density_tracker


def test_module_options_and_errors():
    m = tt.SparseGatedFFN(8, 16, dtype=F64)
    x = torch.randn(4, 8, dtype=F64)
    m.path = "dense"
    torch.testing.assert_close(m(x), dense_gated(x, m.w_gate, m.w_up, m.w_down), rtol=1e-12, atol=1e-12)
    m.path = "fast"
    with pytest.raises(ValueError, match="path must be one of"):
        m(x)
    with pytest.raises(ValueError, match="d must be an integer >= 1"):
        tt.SparseGatedFFN(0, 16)
    with pytest.raises(ValueError, match="l1_weight must be finite"):
        tt.SparseGatedFFN(8, 16, l1_weight=-1.0)
    with pytest.raises(TypeError, match="density_tracker must be a twell.DensityTracker"):
        m.density_tracker = object()
    assert "d=8, n=16" in repr(m)


def test_module_copy_and_state_dict():
    m = tt.SparseGatedFFN(8, 16, dtype=F64, l1_weight=0.5)
    x = torch.randn(4, 8, dtype=F64)
    m(x)
    m2 = copy.deepcopy(m)
    assert m2.density_tracker is not m.density_tracker and m2.last_stats is None and m2.l1_weight == 0.5
    torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)
    m3 = tt.SparseGatedFFN(8, 16, dtype=F64)
    m3.load_state_dict(m.state_dict())
    torch.testing.assert_close(m3(x), m(x), rtol=0, atol=0)


def test_module_training_step_decreases_loss():
    torch.manual_seed(0)
    teacher = tt.SparseGatedFFN(16, 64, dtype=F64)
    student = tt.SparseGatedFFN(16, 64, dtype=F64, l1_weight=1e-4)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    x = torch.randn(64, 16, dtype=F64)
    with torch.no_grad():
        target = teacher(x)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = ((student(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# --------------------------------------------------------------------------- torch.compile, fake tensors


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(8, dtype=F64)
        self.ffn = tt.SparseGatedFFN(8, 32, dtype=F64, l1_weight=0.01)

    def forward(self, x):
        return x + self.ffn(self.norm(x))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_module(backend):
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable")
    torch.manual_seed(0)
    block = _Block()
    compiled = torch.compile(block, backend=backend, fullgraph=True)      # fullgraph: no graph break
    x = torch.randn(2, 6, 8, dtype=F64, requires_grad=True)
    y = compiled(x)
    y.square().sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    assert block.ffn.last_stats is not None and block.ffn.last_stats.l1 is not None
    x.grad = None
    block.zero_grad()
    y_ref = block(x)
    y_ref.square().sum().backward()
    want = [x.grad] + [p.grad for p in block.parameters()]
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), y_ref, rtol=1e-12, atol=1e-12)
    gc.collect()


def test_torch_compile_functional_with_l1():
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable")
    arrays = away_from_kinks(5, 8, 16)

    def loss_fn(x, wg, wu, wd):
        y, l1 = tt.gated_ffn(x, wg, wu, wd, return_l1=True)
        return (y ** 2).sum() + 0.1 * l1

    a, b = leaves(arrays), leaves(arrays)
    torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(*a).backward()
    loss_fn(*b).backward()
    for u, v in zip(a, b):
        torch.testing.assert_close(u.grad, v.grad, rtol=1e-12, atol=1e-12)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(3, 5, 8, dtype=torch.bfloat16)
        w = [torch.empty(40, 8, dtype=torch.bfloat16) for _ in range(3)]
        y = tt.gated_ffn(x, *w)
        assert y.shape == (3, 5, 8) and y.dtype == torch.bfloat16
        y2, l1 = tt.gated_ffn(x, *w, return_l1=True)
        assert y2.shape == (3, 5, 8) and l1.shape == () and l1.dtype == torch.float32
        assert tt.ffn(x, w[1], w[2]).shape == (3, 5, 8)
        outs = torch.ops.twell.gated_ffn_bwd(torch.empty(15, 8, dtype=torch.bfloat16), None,
                                             torch.empty((), dtype=torch.int64), x.reshape(15, 8), *w)
        assert [tuple(o.shape) for o in outs] == [(15, 8), (40, 8), (40, 8), (40, 8)]
        with pytest.raises(ValueError, match=r"w_up must have shape \(n, d\)"):
            tt.gated_ffn(x, w[0], torch.empty(40, 9, dtype=torch.bfloat16), w[2])


def test_opcheck():
    from torch.library import opcheck
    x, wg, wu, wd = away_from_kinks(5, 8, 16)
    opcheck(torch.ops.twell.gated_ffn.default, (x, wg, wu, wd, 256, 8, 128, "auto", "auto", -1, -1))
    opcheck(torch.ops.twell.ffn.default, (x.clone().requires_grad_(), wu, wd, 0.1, 256, 8, 128, "auto", "auto", -1, -1))
    # the training ops hold state across calls (each forward a new handle): schema and fake tensors only
    opcheck(torch.ops.twell.gated_ffn_fwd.default, (x, wg, wu, wd, 0.0, 128, "auto", "auto", -1, -1, False, False),
            test_utils=("test_schema", "test_faketensor"))


# --------------------------------------------------------------------------- errors


def test_errors_name_the_argument():
    x, wg, wu, wd = away_from_kinks(4, 8, 16)
    with pytest.raises(TypeError, match="w_gate must have the dtype of x"):
        tt.gated_ffn(x, wg.float(), wu, wd)
    with pytest.raises(ValueError, match=r"w_down must have shape \(n, d\).*transpose of nn.Linear"):
        tt.gated_ffn(x, wg, wu, torch.randn(8, 16, dtype=F64))
    with pytest.raises(TypeError, match="x must have dtype"):
        tt.gated_ffn(x.to(torch.int32), wg.to(torch.int32), wu.to(torch.int32), wd.to(torch.int32))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        tt.gated_ffn(x.numpy(), wg, wu, wd)
    with pytest.raises(TypeError, match="w_up must be a torch.Tensor"):
        tt.gated_ffn(x, wg, wu.numpy(), wd)
    with pytest.raises(ValueError, match="x must have shape"):
        tt.gated_ffn(x[:0], wg, wu, wd)
    with pytest.raises(ValueError, match="l1_weight must be finite"):
        tt.gated_ffn(x, wg, wu, wd, l1_weight=float("nan"))
    with pytest.raises(ValueError, match="dense_row_threshold must be 'auto'"):
        tt.gated_ffn(x, wg, wu, wd, dense_row_threshold="always")
    with pytest.raises(ValueError, match="gate_kernel must be one of"):
        tt.gated_ffn(x, wg, wu, wd, gate_kernel="magic")
    with pytest.raises(TypeError, match="tracker must be a twell.DensityTracker"):
        tt.gated_ffn(x, wg, wu, wd, tracker="t")
    with pytest.raises(TypeError, match="w_gate must have the dtype of x"):      # the training path too
        tt.gated_ffn(x.requires_grad_(), wg.float(), wu, wd)


def test_tracker_accepted():
    x, wg, wu, wd = away_from_kinks(4, 8, 16)
    tracker = twell.DensityTracker()
    y = tt.gated_ffn(x, wg, wu, wd, tracker=tracker)
    torch.testing.assert_close(y, tt.gated_ffn(x, wg, wu, wd, tracker=tracker), rtol=0, atol=0)
    assert registry.tracker_of(tracker._twell_torch_id) is tracker


# --------------------------------------------------------------------------- CuPy views (built without a device)


def test_cupy_views_and_streams_are_memoised():
    cupy = pytest.importorskip("cupy")
    ci = interop.CudaInterop(cupy, raw_stream=lambda dev: 0x1234 + dev)
    base = torch.zeros(6, 10, dtype=torch.float32)
    t = base[1:, 2:9]                                       # strided: ptr offset, row stride 10
    v = ci.view(t, 0, "x")
    assert v.shape == (5, 7) and v.strides == (40, 4) and v.data.ptr == t.data_ptr()
    assert v.data.mem.size == 4 * (4 * 10 + 6 + 1)          # the span the view reaches
    assert ci.view(t, 0, "x") is v                          # memoised by (ptr, shape, strides, dtype, device)
    assert ci.view(base[1:, 2:8], 0, "x") is not v
    assert sys.getrefcount(t) == 2                          # the cache holds no reference to the tensor
    if twell._backend.bfloat16_dtype() is not None:
        vb = ci.view(torch.zeros(3, 4, dtype=torch.bfloat16), 0, "w_up")
        assert vb.dtype == twell._backend.bfloat16_dtype() and vb.strides == (8, 2)
    with pytest.raises(TypeError, match="w_up must have dtype"):
        ci.view(torch.zeros(3, 4, dtype=torch.uint8), 0, "w_up")
    s = ci.stream(0)
    assert s.ptr == 0x1234 and ci.stream(0) is s and ci.stream(1).ptr == 0x1235


def test_torch_memory_option_is_passed_through():
    """torch_memory chooses the GPU memory pool (no effect on CPU tensors): accepted by every entry point, the
    op schemas and the module (kept by copies)."""
    x, wg, wu, wd = away_from_kinks(5, 8, 16)
    ref = tt.gated_ffn(x, wg, wu, wd)
    torch.testing.assert_close(tt.gated_ffn(x, wg, wu, wd, torch_memory=False), ref, rtol=0, atol=0)
    torch.testing.assert_close(tt.ffn(x, wu, wd, torch_memory=False), tt.ffn(x, wu, wd), rtol=0, atol=0)
    a = leaves((x, wg, wu, wd))
    tt.gated_ffn(*a, torch_memory=False).sum().backward()
    assert all(t.grad is not None for t in a)
    for name in ("gated_ffn", "ffn", "gated_ffn_fwd", "gated_ffn_bwd"):
        assert "bool torch_memory=True" in str(getattr(torch.ops.twell, name).default._schema)
    m = tt.SparseGatedFFN(8, 16, dtype=F64, torch_memory=False)
    assert m.torch_memory is False and copy.deepcopy(m).torch_memory is False
    assert tt.SparseGatedFFN(8, 16).torch_memory is True
    m(x).sum().backward()
    assert m.w_up.grad is not None and tt.saved_state_count() == 0
