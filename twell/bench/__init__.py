"""Benchmark framework behind ``python -m twell bench`` (and ``info``, ``plot``).

Times the gated FFN ``y = (relu(x Wgᵀ) ⊙ x Wuᵀ) Wd`` -- and, with ``--mode train|both``, one training step
-- on seeded synthetic problems (:mod:`twell.synthetic`): dense baselines (cuBLAS + fused elementwise
kernels, PyTorch, NumPy) against twell's sparse implementations, with optional correctness checks.

Modules (each imports only the ones listed before it, and no module imports :mod:`twell.kernels`)
------------------------------------------------------------------------------------------------------
* :mod:`~twell.bench.env`          -- versions, CUDA / NVRTC, devices, git revision (``python -m twell info``)
* :mod:`~twell.bench.timing`       -- CUDA-event / host timers, L2 flusher, CUDA-graph capture (stand-alone)
* :mod:`~twell.bench.config`       -- :class:`BenchConfig`, default sizes, sweep means, JSON schema
* :mod:`~twell.bench.common`       -- small helpers (host copies, optional PyTorch, error strings)
* :mod:`~twell.bench.elementwise`  -- the dense baselines' fused CuPy elementwise kernels
* :mod:`~twell.bench.dense_cupy`   -- dense CuPy baselines on :func:`twell.runtime.blas.gemm`
* :mod:`~twell.bench.dense_host`   -- dense NumPy baselines, :func:`dense_train_math`
* :mod:`~twell.bench.torch_impls`  -- PyTorch eager / autograd baselines
* :mod:`~twell.bench.twell_impls`  -- twell's implementations (public API) and its reference
* :mod:`~twell.bench.impls`        -- the registry :data:`IMPLS` and the built-in registrations
* :mod:`~twell.bench.cases`        -- case planning, problems, :class:`TrainProblem`, ``dy``
* :mod:`~twell.bench.checks`       -- ``--check``: references, error metrics, tolerances
* :mod:`~twell.bench.report`       -- tables, JSON, plot
* :mod:`~twell.bench.runners`      -- one implementation on one problem: check, timings, peak memory
* :mod:`~twell.bench.run`          -- :func:`run_bench`, the case driver
* :mod:`~twell.bench.cli`          -- options, :func:`config_from_args`, :func:`bench_main`

Adding an implementation: see :mod:`twell.bench.impls`.

The names below are also reachable as attributes of this package (``twell.bench.time_gpu``, ...); they
are imported on first access, so ``from twell.bench.timing import time_gpu`` imports the timer alone.
"""

from __future__ import annotations

import importlib

#: attribute -> the submodule that defines it.
_EXPORTS = {
    **dict.fromkeys(("arch_for", "git_revision", "environment_info", "format_info"), "env"),
    **dict.fromkeys(("Timing", "L2Flusher", "time_gpu", "time_cpu", "CapturedGraph", "capture_cupy_graph",
                     "capture_torch_graph"), "timing"),
    **dict.fromkeys(("JSON_SCHEMA", "GPU_DEFAULT_M", "CPU_DEFAULT_M", "GPU_DEFAULT_TRAIN_M", "CPU_DEFAULT_TRAIN_M",
                     "GPU_DEFAULT_SWEEP_M", "CPU_DEFAULT_SWEEP_M", "SWEEP_MEANS", "MODE_TASKS", "BenchConfig"),
                    "config"),
    **dict.fromkeys(("dense_train_math",), "dense_host"),
    **dict.fromkeys(("Impl", "IMPLS", "register", "register_sparse", "register_train", "unregister"), "impls"),
    **dict.fromkeys(("Case", "plan_cases", "TrainProblem", "make_dy"), "cases"),
    **dict.fromkeys(("CHECK_TOLERANCE", "TRAIN_OUTPUTS", "train_reference", "rel_error"), "checks"),
    **dict.fromkeys(("format_table", "write_json", "plot_results"), "report"),
    **dict.fromkeys(("run_bench",), "run"),
    **dict.fromkeys(("add_bench_arguments", "config_from_args", "bench_main"), "cli"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
