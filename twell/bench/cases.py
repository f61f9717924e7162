"""Cases and their problems: which (kind, M, mean) to run, the synthetic problem of each, and the training
step's inputs (:class:`TrainProblem`, :func:`make_dy`).

Without ``--sweep`` the cases are every ``--m`` × ``--kind`` × ``--mean`` (default M per task and
backend: :mod:`twell.bench.config`).  ``--sweep``: one sweep per ``--kind`` over the sweep means at one
M (``--sweep-m``), the same for inference and training; means outside ``(0, n)`` (``(0, n]`` for uniform
problems: mean n is a fully dense batch) are skipped with a note.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from twell import _backend as B
from twell import synthetic

from .common import host_f32, to_host
from .config import (
    CPU_DEFAULT_M,
    CPU_DEFAULT_SWEEP_M,
    CPU_DEFAULT_TRAIN_M,
    GPU_DEFAULT_M,
    GPU_DEFAULT_SWEEP_M,
    GPU_DEFAULT_TRAIN_M,
    BenchConfig,
)

__all__ = ["Case", "plan_cases", "problem_kwargs", "make_case_problem", "TrainProblem", "make_dy", "DY_STREAM"]


@dataclass
class Case:
    """One benchmark case: problem kind, tokens M, target mean active neurons; ``sweep`` marks sweep points."""

    kind: str
    m: int
    mean: float
    sweep: bool = False

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.mean:g}"


def plan_cases(cfg: BenchConfig, gpu: bool, task: str = "infer") -> tuple[list, list]:
    """Return ``(cases, notes)`` of one task (the default M differs: see ``--m``)."""
    notes = []
    cases = []
    if cfg.sweep:
        m = cfg.sweep_m or (GPU_DEFAULT_SWEEP_M if gpu else CPU_DEFAULT_SWEEP_M)
        for kind in cfg.kinds:
            for mean in cfg.sweep_means:
                if not (0 < mean < cfg.n or (kind == "uniform" and mean == cfg.n)):
                    note = f"sweep mean {mean:g} skipped for {kind}: not in (0, n={cfg.n})"
                    if note not in notes:
                        notes.append(note)
                    continue
                cases.append(Case(kind, m, float(mean), sweep=True))
    else:
        if task == "train":
            default = GPU_DEFAULT_TRAIN_M if gpu else CPU_DEFAULT_TRAIN_M
        else:
            default = GPU_DEFAULT_M if gpu else CPU_DEFAULT_M
        for m in cfg.ms or default:
            for kind in cfg.kinds:
                for mean in cfg.means:
                    cases.append(Case(kind, int(m), float(mean)))
    return cases, notes


def problem_kwargs(cfg: BenchConfig, kind: str) -> dict:
    """The ``synthetic.make_problem`` options of ``kind`` that the command line sets."""
    kw = {}
    if kind in ("token_skew", "neuron_skew") and cfg.skew_sigma is not None:
        kw["skew_sigma"] = cfg.skew_sigma
    if kind == "neuron_skew":
        kw["dead_fraction"] = cfg.dead_fraction
    if kind == "token_skew" and cfg.calibrate is not None:
        kw["calibrate"] = cfg.calibrate
    return kw


def make_case_problem(case: Case, cfg: BenchConfig, gpu: bool):
    """The seeded synthetic problem of ``case`` (on the device when ``gpu``)."""
    return synthetic.make_problem(case.m, cfg.d, cfg.n, mean_active=case.mean, kind=case.kind, dtype=cfg.dtype,
                                  seed=cfg.seed, xp=B.cupy_or_none() if gpu else np,
                                  **problem_kwargs(cfg, case.kind))


@dataclass
class TrainProblem:
    """What a training step gets: the synthetic problem, a fixed ``dy`` (M, d) and λ.

    ``x``, ``w_gate``, ``w_up``, ``w_down``, ``m``, ``d``, ``n``, ``dtype`` and
    ``arrays()`` are the problem's.
    """

    problem: object
    dy: object
    l1_weight: float = 0.0
    _dy_f32: object = field(default=None, repr=False)

    x = property(lambda self: self.problem.x)
    w_gate = property(lambda self: self.problem.w_gate)
    w_up = property(lambda self: self.problem.w_up)
    w_down = property(lambda self: self.problem.w_down)
    m = property(lambda self: self.problem.m)
    d = property(lambda self: self.problem.d)
    n = property(lambda self: self.problem.n)
    dtype = property(lambda self: self.problem.dtype)

    def arrays(self) -> tuple:
        return self.problem.arrays()

    def host_f32(self) -> tuple:
        """``(x, w_gate, w_up, w_down, dy)`` as contiguous float32 host arrays (cached)."""
        if self._dy_f32 is None:
            self._dy_f32 = np.ascontiguousarray(to_host(self.dy).astype(np.float32))
        return (*host_f32(self.problem), self._dy_f32)


#: SeedSequence entropy that separates dy from the problem's own streams.
DY_STREAM = 0x6479


def make_dy(problem, seed: int):
    """``dy`` (M, d): standard normal, drawn in float32 (float64 for float64) where the problem lives,
    cast to its dtype; seeded by ``(seed, DY_STREAM)``."""
    xp = problem.xp
    gen_dt = np.float64 if problem.dtype == np.float64 else np.float32
    state = int(np.random.SeedSequence([int(seed), DY_STREAM]).generate_state(1)[0])
    dy = xp.random.default_rng(state).standard_normal((problem.m, problem.d), dtype=gen_dt)
    return dy if np.dtype(dy.dtype) == problem.dtype else dy.astype(problem.dtype)
