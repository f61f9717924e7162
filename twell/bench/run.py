"""The case driver: :func:`run_bench` runs every case of a :class:`~twell.bench.config.BenchConfig` and
returns the results dict (schema ``twell.bench/1``; written by :func:`twell.bench.report.write_json`).

Per case: the seeded synthetic problem, its realised statistics (``synthetic.describe``), the reference
(with ``--check``), every selected implementation (:mod:`twell.bench.runners`), the dense summary and the
speedups; the case's table rows are logged as soon as it finishes.  On the GPU everything runs on one
non-blocking CuPy stream, also PyTorch's current stream, and the L2 is flushed before timed calls for
M <= ``FLUSH_AUTO_MAX_M`` (``--flush-l2 auto``).

Training (``--mode train`` or ``both``): per case one full step with a fixed ``dy`` (standard normal,
:func:`~twell.bench.cases.make_dy`) and ``--l1-weight`` λ; each implementation is timed (eager and
graph; "fwd ms": the forward alone, eager), its peak device memory measured
(:data:`~twell.bench.runners.PEAK_MEMORY_METHOD`), and with ``--check`` all five outputs are compared
over the whole batch (:mod:`twell.bench.checks`).  Results go to ``results["train"]`` (``l1_weight``,
``method``, ``impls``, ``cases``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import shlex
import sys
import time

from twell import _backend as B
from twell import synthetic

from .cases import DY_STREAM, Case, TrainProblem, make_case_problem, make_dy, plan_cases
from .checks import CHECK_TOLERANCE, TRAIN_CHECK_RULE, TRAIN_OUTPUTS, apply_train_check, reference_rows, train_reference
from .common import err_str, free_gpu_memory, torch_cuda
from .config import FLUSH_AUTO_MAX_M, JSON_SCHEMA, MODE_TASKS, BenchConfig
from .env import environment_info, git_revision
from .impls import select_impls
from .report import format_table, table_header
from .runners import (add_speedups, run_interleaved, run_one_cpu, run_one_gpu, run_one_train, summarise_dense,
                      train_method)
from .timing import L2Flusher

__all__ = ["run_bench"]


def run_bench(cfg: BenchConfig, *, log=None, command: list | None = None) -> dict:
    """Run every case of ``cfg``; return the results dict (see ``write_json``).

    Inference cases go to ``results["cases"]``; with ``cfg.mode`` "train" or
    "both", training cases to ``results["train"]["cases"]``.
    """
    log = log or (lambda s: None)
    cp = B.cupy_or_none()
    if cfg.backend == "gpu" and cp is None:
        raise RuntimeError("--backend gpu was requested but CuPy with a CUDA device is not available")
    if cfg.mode not in MODE_TASKS:
        raise ValueError(f"mode must be one of {tuple(MODE_TASKS)}, got {cfg.mode!r}")
    gpu = cp is not None and cfg.backend != "cpu"
    tasks = MODE_TASKS[cfg.mode]
    plan, notes = {}, []
    for task in ("infer", "train"):
        impls, impl_notes = select_impls(cfg, gpu, task) if task in tasks else ([], [])
        cases, case_notes = plan_cases(cfg, gpu, task) if task in tasks else ([], [])
        plan[task] = (impls, cases)
        notes += [x for x in impl_notes + case_notes if x not in notes]
    env = environment_info()
    results = {
        "schema": JSON_SCHEMA,
        "meta": {
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(command if command is not None else [sys.executable, *sys.argv]),
            "git_revision": git_revision(),
            "backend": "gpu" if gpu else "cpu",
            "device": (env["devices"][0] if gpu and env["devices"] else None),
            "environment": env,
            "timer": ("CUDA events around each call on the bench stream; eager: host sync after each call "
                      "(cupyx.profiler.benchmark semantics); graph: replays queued back to back"
                      if gpu else "time.perf_counter around each call (median of repeats)"),
        },
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
        "impls": {i.name: {"backend": i.backend, "dense": i.dense, "description": i.description}
                  for i in plan["infer"][0]},
        "notes": notes,
        "cases": [],
    }
    if "train" in tasks:
        results["train"] = {
            "l1_weight": cfg.l1_weight,
            "method": train_method(gpu),
            "impls": {i.name: {"backend": i.backend, "dense": i.dense, "description": i.description}
                      for i in plan["train"][0]},
            "cases": [],
        }
    for note in notes:
        log(f"note: {note}")
    use_torch = any(i.backend == "torch" for impls, _ in plan.values() for i in impls)
    with _device_session(gpu, use_torch, results) as stream:
        l2 = (env["devices"][0]["l2_bytes"] if env["devices"] else 0) or (50 << 20)
        flusher = None
        for task in tasks:
            impls, cases = plan[task]
            sink = results["cases"] if task == "infer" else results["train"]["cases"]
            log(("\n" if task != tasks[0] else "") + table_header(task))
            for case in cases:
                flush = None
                if gpu and (cfg.flush_l2 == "on" or (cfg.flush_l2 == "auto" and case.m <= FLUSH_AUTO_MAX_M)):
                    flusher = flusher or L2Flusher(l2)
                    flush = flusher
                sink.append(_run_case(case, cfg, impls, gpu=gpu, stream=stream, flush=flush, log=log, task=task))
        flusher = None
    return results


@contextlib.contextmanager
def _device_session(gpu: bool, use_torch: bool, results: dict):
    """On the GPU: one non-blocking CuPy stream, current for CuPy and (if used) PyTorch; yields it."""
    if not gpu:
        yield None
        return
    cp = B.cupy_or_none()
    torch = torch_cuda() if use_torch else None
    if torch is not None:
        results["meta"]["torch_cuda"] = torch.version.cuda
    stream = cp.cuda.Stream(non_blocking=True)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(stream)
            if torch is not None:
                stack.enter_context(torch.cuda.stream(torch.cuda.ExternalStream(stream.ptr)))
            yield stream
    finally:
        free_gpu_memory()


def _run_case(case: Case, cfg: BenchConfig, impls: list, *, gpu: bool, stream=None, flush=None, log,
              task: str = "infer") -> dict:
    out: dict = {"name": case.name, "kind": case.kind, "m": case.m, "d": cfg.d, "n": cfg.n, "dtype": cfg.dtype,
                 "mean_active_target": case.mean, "sweep": case.sweep, "seed": cfg.seed,
                 "flush_l2": flush is not None, "impls": {}}
    t_case = time.perf_counter()
    problem = None
    try:
        problem = make_case_problem(case, cfg, gpu)
        out["problem"] = problem.params
        rows = cfg.describe_rows
        if rows is None and not gpu:
            rows = 4096
        out["realised"] = synthetic.describe(problem, max_rows=rows)
        if task == "train":
            _train_case_body(out, problem, cfg, impls, gpu=gpu, stream=stream, flush=flush)
        else:
            _infer_case_body(out, problem, case, cfg, impls, gpu=gpu, stream=stream, flush=flush)
        dense = summarise_dense(out["impls"], forward=task == "train")
        add_speedups(out["impls"], dense)
        out["dense"] = dense
    except Exception as exc:
        out["error"] = err_str(exc)
    finally:
        problem = None
        if gpu:
            free_gpu_memory()
    out["seconds"] = time.perf_counter() - t_case
    log(format_table({"train": {"cases": [out]}} if task == "train" else {"cases": [out]}, header=False))
    return out


def _infer_case_body(out: dict, problem, case: Case, cfg: BenchConfig, impls: list, *, gpu, stream, flush):
    ref = None
    if cfg.check:
        ref, source = reference_rows(problem, min(cfg.check_rows, case.m))
        out["check"] = {"rows": int(ref.shape[0]), "reference": source,
                        "tolerance": CHECK_TOLERANCE[cfg.dtype]}
    tol = CHECK_TOLERANCE[cfg.dtype]
    for impl in impls:
        if gpu:
            out["impls"][impl.name] = run_one_gpu(impl, problem, cfg, ref, tol, flush, stream)
        else:
            out["impls"][impl.name] = run_one_cpu(impl, problem, cfg, ref, tol)
    if cfg.interleave:
        run_interleaved(impls, out["impls"], problem, cfg, gpu=gpu, flush=flush)


def _train_case_body(out: dict, problem, cfg: BenchConfig, impls: list, *, gpu, stream, flush):
    tp = TrainProblem(problem, make_dy(problem, cfg.seed), cfg.l1_weight)
    out["l1_weight"] = cfg.l1_weight
    out["dy"] = {"distribution": "standard normal", "seed": [cfg.seed, DY_STREAM], "dtype": cfg.dtype}
    ref = None
    # the CPU implementations compute from float32 copies: check them at float32's tolerance
    check_dtype = cfg.dtype if gpu else "float32"
    if cfg.check:
        ref = train_reference(tp)
        out["check"] = {"outputs": list(TRAIN_OUTPUTS), "rows": int(tp.m),
                        "reference": "dense_train_math in float64 " + ("(CuPy, GPU)" if gpu else "(NumPy)"),
                        "rule": TRAIN_CHECK_RULE, "dtype": check_dtype}
    try:
        for impl in impls:
            out["impls"][impl.name] = run_one_train(impl, tp, cfg, ref, gpu=gpu, flush=flush, stream=stream)
        if cfg.interleave:
            run_interleaved(impls, out["impls"], tp, cfg, gpu=gpu, flush=flush)
    finally:
        ref = tp = None
    if cfg.check:
        apply_train_check(out["impls"], check_dtype)

