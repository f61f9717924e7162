"""The implementation registry (:data:`IMPLS`) and the built-in implementations' registrations.

Adding an implementation is one call::

    from twell.bench import impls
    impls.register_sparse("mine", lambda p: my_gated_ffn(p.x, p.w_gate, p.w_up, p.w_down))

``p`` is a :class:`twell.synthetic.Problem` whose arrays live on the device (CuPy).  The callable returns
``y`` (M, d); it runs on the current CuPy stream (the benchmark runs everything on one non-blocking
stream, shared with PyTorch).  If it needs set-up outside the timed region, register a factory instead:
``register_sparse(name, make=lambda p: run)`` where ``run()`` returns y.

A training step (``--mode train``) registers with :func:`register_train`: ``make(tp)`` gets a
:class:`twell.bench.cases.TrainProblem` (the problem plus ``dy`` and ``l1_weight``) and returns ``run``
with ``run() -> (y, dx, dw_gate, dw_up, dw_down)``, optionally ``run.forward()`` (the forward alone)
and ``run.extra()`` (a dict for the results: saved-state size, statistics).

Built in (registration order is the table's order): dense CuPy (:mod:`~twell.bench.dense_cupy`),
PyTorch (:mod:`~twell.bench.torch_impls`), dense NumPy (:mod:`~twell.bench.dense_host`), twell and its
reference (:mod:`~twell.bench.twell_impls`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import dense_cupy, dense_host, torch_impls, twell_impls
from .common import gpu_unavailable, torch_unavailable
from .config import TASKS, BenchConfig
from .timing import capture_torch_graph

__all__ = ["Impl", "IMPLS", "register", "register_sparse", "register_train", "unregister", "select_impls"]


@dataclass
class Impl:
    """One timed implementation of the gated FFN ``y = (relu(x Wgᵀ) ⊙ x Wuᵀ) Wd``.

    ``make(problem)`` runs outside the timed region and returns ``run``; ``run()``
    computes and returns ``y``.  ``backend`` says which bench path uses it:
    ``"cupy"`` / ``"torch"`` on the GPU, ``"numpy"`` on the CPU.  ``dense`` marks
    the baselines that speedups are measured against.  ``capture`` overrides the
    CUDA-graph capture (signature of :func:`twell.bench.timing.capture_cupy_graph`).
    ``available()`` returns None or the reason the implementation cannot run.
    ``default=False`` implementations run only when ``--impl`` names them.
    ``run.info`` (a dict, optional) is copied into the results.

    ``task="train"``: a training step instead (``--mode train``).  ``make`` then
    gets a :class:`~twell.bench.cases.TrainProblem` and ``run()`` returns ``(y, dx, dw_gate, dw_up,
    dw_down)``; optional attributes: ``run.forward()`` (the forward alone, timed
    as "fwd ms") and ``run.extra()`` (a dict merged into the results after the
    first, untimed call: saved-state size, sparsity statistics).
    """

    name: str
    make: Callable
    backend: str = "cupy"
    dense: bool = False
    capture: Callable | None = None
    available: Callable[[], str | None] = field(default=lambda: None)
    description: str = ""
    default: bool = True  #: run unless --impl names a selection
    task: str = "infer"  #: "infer" (y = FFN(x)) or "train" (one fwd+bwd step)


#: name -> Impl, in registration order (the table follows it).
IMPLS: dict[str, Impl] = {}


def register(impl: Impl, *, replace: bool = True) -> Impl:
    """Add ``impl`` to :data:`IMPLS` (replacing one of the same name)."""
    if not isinstance(impl, Impl):
        raise TypeError(f"impl must be an Impl, got {type(impl).__name__}")
    if impl.backend not in ("cupy", "torch", "numpy"):
        raise ValueError(f"impl.backend must be 'cupy', 'torch' or 'numpy', got {impl.backend!r}")
    if impl.task not in TASKS:
        raise ValueError(f"impl.task must be one of {TASKS}, got {impl.task!r}")
    if impl.name in IMPLS and not replace:
        raise ValueError(f"an implementation named {impl.name!r} is already registered")
    IMPLS[impl.name] = impl
    return impl


def register_sparse(name: str, fn: Callable | None = None, *, make: Callable | None = None,
                    backend: str = "cupy", available: Callable[[], str | None] | None = None,
                    description: str = "") -> Impl:
    """Register a (sparse) implementation: ``fn(problem) -> y``, or ``make(problem) -> run``."""
    if (fn is None) == (make is None):
        raise TypeError("register_sparse needs exactly one of fn or make")
    if make is None:
        def make(problem, _fn=fn):
            return lambda: _fn(problem)
    return register(Impl(name=name, make=make, backend=backend, dense=False,
                         available=available or (lambda: None), description=description))


def register_train(name: str, make: Callable, *, dense: bool = False, backend: str = "cupy",
                   capture: Callable | None = None, available: Callable[[], str | None] | None = None,
                   description: str = "") -> Impl:
    """Register a training step: ``make(train_problem) -> run`` with ``run() -> (y, dx, dw_gate, dw_up, dw_down)``.

    See :class:`Impl` (``task="train"``) for the optional ``run.forward`` / ``run.extra``.
    """
    return register(Impl(name=name, make=make, backend=backend, dense=dense, capture=capture,
                         available=available or (lambda: None), description=description, task="train"))


def unregister(name: str) -> None:
    """Remove ``name`` from :data:`IMPLS` (no error if it is not there)."""
    IMPLS.pop(name, None)

def select_impls(cfg: BenchConfig, gpu: bool, task: str = "infer") -> tuple[list, list]:
    """Implementations of ``task`` to run on this path, and notes about the ones left out."""
    want = ("cupy", "torch") if gpu else ("numpy",)
    chosen, notes = [], []
    names = list(IMPLS)
    if cfg.impls:
        unknown = [n for n in cfg.impls if n not in IMPLS]
        if unknown:
            raise ValueError(f"unknown implementation(s) {unknown}; registered: {names}")
        names = [n for n in names if n in cfg.impls]
    else:
        names = [n for n in names if IMPLS[n].default]
    for name in names:
        impl = IMPLS[name]
        if impl.backend not in want or impl.task != task:
            continue
        reason = impl.available()
        if reason:
            notes.append(f"{name}: skipped ({reason})")
            continue
        chosen.append(impl)
    return chosen, notes



def _register_builtins():
    register(Impl("dense_cupy", dense_cupy.make_dense_cupy, backend="cupy", dense=True, available=gpu_unavailable,
                  description="cuBLAS x@Wg^T, x@Wu^T, fused relu*mul (fp32, one rounding), h@Wd; outputs preallocated"))
    register(Impl("dense_cupy_matmul", dense_cupy.make_dense_cupy_matmul, backend="cupy", dense=True,
                  available=gpu_unavailable, default=False,
                  description="dense_cupy through cupy.matmul(out=) instead of direct cublasGemmEx (no graph)"))
    register(Impl("dense_cupy_cat", dense_cupy.make_dense_cupy_cat, backend="cupy", dense=True,
                  available=gpu_unavailable,
                  description="one cuBLAS GEMM against [Wg;Wu] (2n,d), fused relu*mul over both halves, h@Wd"))
    register(Impl("torch_eager", torch_impls.make_torch_eager, backend="torch", dense=True,
                  capture=capture_torch_graph, available=torch_unavailable,
                  description="PyTorch eager F.linear, relu, mul, F.linear on DLPack views of the CuPy arrays"))
    register(Impl("dense_numpy", dense_host.make_dense_numpy, backend="numpy", dense=True,
                  description="float32 NumPy matmuls"))
    register(Impl("reference", twell_impls.make_reference, backend="numpy", dense=False,
                  description="twell.reference.gated_ffn on float32 inputs"))
    # ---- sparse implementations: one registration each --------------------------------
    register_sparse("twell", make=twell_impls.make_twell, available=gpu_unavailable,
                    description="twell.gated_ffn with a DensityTracker and a preallocated out (as a layer runs it)")
    register(Impl("twell_stateless", twell_impls.make_twell_stateless, backend="cupy", available=gpu_unavailable,
                  default=False, description="twell.gated_ffn without a tracker (always the sparse path)"))
    register_sparse("twell_fused_gate", make=twell_impls.make_twell_fused_gate, available=gpu_unavailable,
                    description="twell.gated_ffn(gate_kernel='fused'): gate GEMM with the TwELL epilogue fused")
    # ---- training steps (--mode train) ------------------------------------------------
    register_train("dense_cupy_train", dense_cupy.make_dense_cupy_train, dense=True, available=gpu_unavailable,
                   description="9 cuBLAS GEMMs + fused relu*mul forward and fused backward elementwise kernels "
                               "(fp32 math, one rounding), buffers preallocated, du/dz in place")
    register_train("torch_autograd", torch_impls.make_torch_autograd, dense=True, backend="torch",
                   capture=capture_torch_graph, available=torch_unavailable,
                   description="PyTorch eager F.linear/relu/mul/matmul + torch.autograd.grad on DLPack views")
    register_train("dense_numpy_train", dense_host.make_dense_numpy_train, dense=True, backend="numpy",
                   description="float32 NumPy dense forward + backward")
    register_train("reference_train", twell_impls.make_reference_train, backend="numpy",
                   description="twell.gated_ffn_forward/backward on float32 NumPy arrays (twell.reference)")
    register_train("twell_train", twell_impls.make_twell_train, available=gpu_unavailable,
                   capture=twell_impls.refuse_capture(twell_impls.TWELL_TRAIN_NO_GRAPH),
                   description="twell.gated_ffn_forward + twell.gated_ffn_backward with a DensityTracker "
                               "(hybrid training kernels, or the dense path for dense batches)")
    register(Impl("twell_train_stateless", twell_impls.make_twell_train_stateless, backend="cupy",
                  capture=twell_impls.refuse_capture(twell_impls.TWELL_TRAIN_NO_GRAPH), available=gpu_unavailable,
                  default=False, task="train", description="twell training step without a tracker (always sparse)"))


_register_builtins()
