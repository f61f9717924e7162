"""Running one implementation on one problem: correctness check of its first call, timings (eager,
queued and CUDA graph on the GPU; host clock on the CPU), the training step's forward and peak memory;
then the dense summary and the speedups of a case.

Speedups are ``dense_best / impl`` per timing, where ``dense_best`` is the fastest (median) of the dense
implementations in that timing that passed ``--check`` when it ran; ``spd queued`` divides the faster of
the dense queued and dense graph times by the impl's queued time.  A failed capture leaves
``"graph": null`` and the reason in ``"graph_error"``.
"""

from __future__ import annotations

import contextlib
import gc

from twell import _backend as B

from .checks import CHECK_TOLERANCE, TRAIN_CHECK_RULE, rel_error, rows_f64, train_errors
from .common import err_str, free_gpu_memory, torch_cuda
from .config import BenchConfig
from .impls import Impl
from .timing import capture_cupy_graph, time_cpu, time_gpu, time_interleaved

__all__ = ["summarise_dense", "add_speedups", "run_one_gpu", "run_one_cpu", "run_one_train", "run_interleaved",
           "train_method", "PEAK_MEMORY_METHOD"]


def summarise_dense(impl_results: dict, *, forward: bool = False) -> dict:
    """The fastest passing dense implementation of each timing (``results[case]["dense"]``)."""
    def best(mode, names=None):
        cand = []
        for name, r in impl_results.items():
            if not r.get("dense") or (names is not None and name not in names):
                continue
            if r.get("check_ok") is False:
                continue
            t = r.get(mode)
            if t:
                cand.append((t["median_ms"], name))
        return min(cand) if cand else (None, None)

    cupy_names = {n for n, r in impl_results.items() if r.get("backend") == "cupy" and r.get("dense")}
    cb_ms, cb = best("eager", cupy_names)
    b_ms, b = best("eager")
    g_ms, g = best("graph")
    q_ms, q = min((t for t in (best("queued"), (g_ms, g)) if t[0] is not None), default=(None, None))
    i_ms, i = best("eager_interleaved")
    out = {"cupy_best": cb, "cupy_best_ms": cb_ms, "best": b, "best_ms": b_ms,
           "best_graph": g, "best_graph_ms": g_ms, "best_queued": q, "best_queued_ms": q_ms,
           "best_interleaved": i, "best_interleaved_ms": i_ms}
    if forward:
        f_ms, f = best("forward")
        out.update(best_forward=f, best_forward_ms=f_ms)
    return out


def add_speedups(impl_results: dict, dense: dict):
    """``speedup``, ``speedup_graph``, ``speedup_queued`` (and ``speedup_forward``) of every result."""
    def ratio(base, t):
        return (base / t["median_ms"]) if (t and base) else None
    for r in impl_results.values():
        r["speedup"] = ratio(dense["best_ms"], r.get("eager"))
        r["speedup_graph"] = ratio(dense["best_graph_ms"], r.get("graph"))
        r["speedup_queued"] = ratio(dense.get("best_queued_ms"), r.get("queued"))
        r["speedup_interleaved"] = ratio(dense.get("best_interleaved_ms"), r.get("eager_interleaved"))
        if "best_forward_ms" in dense:
            r["speedup_forward"] = ratio(dense["best_forward_ms"], r.get("forward"))


def _new_result(impl: Impl, gpu: bool) -> dict:
    r: dict = {"backend": impl.backend, "dense": impl.dense, "eager": None, "graph": None,
               "rel_err": None, "check_ok": None}
    if not gpu:
        r["graph_error"] = "no GPU"
    return r


def run_interleaved(impls: list, results: dict, arg, cfg: BenchConfig, *, gpu: bool, flush=None) -> None:
    """``results[name]["eager_interleaved"]`` for every implementation that timed without error (on the GPU:
    those that run on it): fresh ``make(arg)`` runs of all of them alive at once, timed in turn
    (:func:`time_interleaved`, ``cfg.budget_s`` per implementation)."""
    runs = {}
    try:
        for impl in impls:
            r = results.get(impl.name)
            if not r or r.get("error") or not r.get("eager") or (gpu and r.get("backend") == "numpy"):
                continue
            runs[impl.name] = impl.make(arg)
        timings = time_interleaved(runs, budget_s=cfg.budget_s, warmup=cfg.warmup, flush=flush, gpu=gpu)
        for name, t in timings.items():
            results[name]["eager_interleaved"] = t.to_dict()
    except Exception as exc:
        for name in runs:
            results[name]["interleave_error"] = err_str(exc)
    finally:
        runs.clear()
        if gpu:
            free_gpu_memory()


def _copy_info(r: dict, run) -> None:
    info = getattr(run, "info", None)
    if isinstance(info, dict):
        r.update(info)


def _time_gpu_impl(r: dict, impl: Impl, run, cfg: BenchConfig, flush, stream, on_graph=None) -> None:
    """Eager, queued and (unless ``--no-graph``) CUDA-graph timings of ``run`` into ``r``.

    ``on_graph(y)`` (optional) sees the output of the first replay (for ``--check``).
    A failed capture leaves ``r["graph"] = None`` and the reason in ``r["graph_error"]``.
    """
    r["eager"] = time_gpu(run, budget_s=cfg.budget_s, warmup=cfg.warmup, flush=flush).to_dict()
    # Calls queued back to back (events around each, no host sync between calls): the steady state of a
    # loop over layers, where the host prepares the next call while the GPU runs this one.
    r["queued"] = time_gpu(run, budget_s=cfg.budget_s, warmup=cfg.warmup, flush=flush, sync_each=False).to_dict()
    if not cfg.graphs:
        return
    cap = None
    try:
        cap = (impl.capture or capture_cupy_graph)(run, stream)
        cap.launch()
        stream.synchronize()
        if on_graph is not None:
            on_graph(cap.y)
        r["graph"] = time_gpu(cap.launch, budget_s=cfg.budget_s, warmup=cfg.warmup, flush=flush,
                              sync_each=False).to_dict()
    except Exception as exc:
        r["graph"] = None
        r["graph_error"] = err_str(exc)
    finally:
        if cap is not None:
            with contextlib.suppress(Exception):
                cap.release()


def run_one_gpu(impl: Impl, problem, cfg: BenchConfig, ref, tol, flush, stream) -> dict:
    """One inference implementation on the GPU: check its first call against ``ref``, then time it."""
    r = _new_result(impl, gpu=True)
    run = None
    try:
        run = impl.make(problem)
        _copy_info(r, run)
        y = run()
        stream.synchronize()
        if ref is not None:
            r["rel_err"] = rel_error(rows_f64(y, ref.shape[0]), ref)
            r["check_ok"] = bool(r["rel_err"] <= tol)
        del y

        def on_graph(y):
            r["graph_rel_err"] = rel_error(rows_f64(y, ref.shape[0]), ref)
        _time_gpu_impl(r, impl, run, cfg, flush, stream, on_graph if ref is not None else None)
        if callable(getattr(run, "extra", None)):
            r.update(run.extra())
    except Exception as exc:
        r["error"] = err_str(exc)
    finally:
        run = None
        free_gpu_memory()
    return r


def run_one_cpu(impl: Impl, problem, cfg: BenchConfig, ref, tol) -> dict:
    """One inference implementation on the CPU (host clock); float32 copies are checked at float32's tolerance."""
    r = _new_result(impl, gpu=False)
    try:
        run = impl.make(problem)
        y = run()
        if ref is not None:
            r["rel_err"] = rel_error(rows_f64(y, ref.shape[0]), ref)
            r["check_ok"] = bool(r["rel_err"] <= max(tol, CHECK_TOLERANCE["float32"]))
        del y
        r["eager"] = time_cpu(run, budget_s=cfg.budget_s, warmup=1).to_dict()
    except Exception as exc:
        r["error"] = err_str(exc)
    return r


#: How "peak_bytes" is measured (also written to the JSON, train.method.peak_memory).
PEAK_MEMORY_METHOD = (
    "bytes allocated by one step beyond its inputs (x, weights, dy), after warm-up: CuPy implementations "
    "run make() (preallocated buffers count) and one step with a fresh cupy.cuda.MemoryPool as the "
    "allocator, peak = the maximum of pool.used_bytes() sampled after every allocation (exact for "
    "stream-ordered pool reuse; 512-byte rounding); PyTorch: torch.cuda.max_memory_allocated() after "
    "reset_peak_memory_stats(), minus memory_allocated() before make(). Outputs (y and the gradients) "
    "count; cuBLAS handles/workspaces created earlier do not.")
#: Pools whose blocks could not all be returned (something outside the step kept an array): kept
#: alive so that no array ever points into freed device memory.
_KEPT_POOLS: list = []


def _peak_step_bytes(impl: Impl, tp, stream) -> int:
    """Peak device bytes of ``impl.make(tp)`` + one step (see :data:`PEAK_MEMORY_METHOD`)."""
    cp = B.cupy_or_none()
    free_gpu_memory()
    if impl.backend == "torch":
        torch = torch_cuda()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run = impl.make(tp)
        outs = run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del outs, run
        free_gpu_memory()
        return int(peak)
    pool = cp.cuda.MemoryPool()
    peak = 0

    def malloc(size):
        nonlocal peak
        mem = pool.malloc(size)
        peak = max(peak, pool.used_bytes())
        return mem

    try:
        with cp.cuda.using_allocator(malloc):
            run = impl.make(tp)
            outs = run()
            stream.synchronize()
            del outs, run
    finally:
        gc.collect()
        stream.synchronize()
        pool.free_all_blocks()
        if pool.used_bytes():
            _KEPT_POOLS.append(pool)
    return int(peak)


def run_one_train(impl: Impl, tp, cfg: BenchConfig, ref, *, gpu: bool, flush=None, stream=None) -> dict:
    """Check (first call), time the step (eager + graph on the GPU) and its forward, measure peak memory."""
    r = _new_result(impl, gpu)
    r.update(forward=None, peak_bytes=None, peak_mib=None)
    run = None
    try:
        run = impl.make(tp)
        _copy_info(r, run)
        outs = run()
        if gpu:
            stream.synchronize()
        if ref is not None:
            r["rel_err"] = train_errors(outs, ref)
            r["max_rel_err"] = max(r["rel_err"].values())
        del outs
        if callable(getattr(run, "extra", None)):
            r.update(run.extra())
        fwd = getattr(run, "forward", None)
        if gpu:
            def on_graph(outs):
                r["graph_max_rel_err"] = max(train_errors(outs, ref).values())
            _time_gpu_impl(r, impl, run, cfg, flush, stream, on_graph if ref is not None else None)
            if fwd is not None:
                r["forward"] = time_gpu(fwd, budget_s=cfg.budget_s, warmup=cfg.warmup, flush=flush).to_dict()
            run = fwd = None
            try:
                r["peak_bytes"] = _peak_step_bytes(impl, tp, stream)
                r["peak_mib"] = r["peak_bytes"] / 2**20
            except Exception as exc:
                r["peak_error"] = err_str(exc)
        else:
            r["eager"] = time_cpu(run, budget_s=cfg.budget_s, warmup=1).to_dict()
            if fwd is not None:
                r["forward"] = time_cpu(fwd, budget_s=cfg.budget_s, warmup=1).to_dict()
    except Exception as exc:
        r["error"] = err_str(exc)
    finally:
        run = fwd = None
        if gpu:
            free_gpu_memory()
    return r


def train_method(gpu: bool) -> dict:
    """``results["train"]["method"]``: how the training step is timed, measured and checked."""
    return {
        "step": "one training step of the gated FFN: forward y, backward dx, dw_gate, dw_up, dw_down for a fixed "
                "dy (standard normal, see make_dy), L1 gradient (l1_weight / M) * sign(h) included",
        "timer": "step timed like inference (eager, queued and graph); 'forward' = the forward alone, eager",
        "peak_memory": PEAK_MEMORY_METHOD if gpu else "not measured on the CPU",
        "check": ("every output over the whole batch against dense_train_math in float64 "
                  + ("(CuPy float64 GEMMs on the GPU); " if gpu else "(NumPy); ") + TRAIN_CHECK_RULE),
        "speedup": "fastest passing dense implementation (median) / implementation, per timing",
    }

