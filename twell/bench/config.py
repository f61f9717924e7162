"""What a benchmark run does: :class:`BenchConfig` and the defaults it falls back on.

:func:`twell.bench.cli.config_from_args` builds a :class:`BenchConfig` from the command line; everything
downstream (:mod:`~twell.bench.cases`, :mod:`~twell.bench.runners`, :mod:`~twell.bench.run`) reads its
options from it.  The config is written to the JSON as ``results["config"]`` (every field).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "JSON_SCHEMA",
    "GPU_DEFAULT_M",
    "CPU_DEFAULT_M",
    "GPU_DEFAULT_TRAIN_M",
    "CPU_DEFAULT_TRAIN_M",
    "GPU_DEFAULT_SWEEP_M",
    "CPU_DEFAULT_SWEEP_M",
    "SWEEP_MEANS",
    "FLUSH_AUTO_MAX_M",
    "TASKS",
    "MODE_TASKS",
    "BenchConfig",
]

#: the "schema" of the results JSON.
JSON_SCHEMA = "twell.bench/1"
#: default M of the inference cases (without --m).
GPU_DEFAULT_M = (1, 8, 64, 16384, 131072)
CPU_DEFAULT_M = (256, 2048)
#: default M of the training cases (--mode train|both without --m); the paper's micro-batch per GPU.
GPU_DEFAULT_TRAIN_M = (16384,)
CPU_DEFAULT_TRAIN_M = (256,)
#: default M of a sweep (--sweep without --sweep-m).
GPU_DEFAULT_SWEEP_M = 16384
CPU_DEFAULT_SWEEP_M = 256
#: default target means of a sweep (--sweep without --sweep-means); values outside (0, n) are skipped
#: with a note (5632 is the whole width at the default n = 5632, so it is skipped there).
SWEEP_MEANS = (8, 29, 64, 128, 256, 512, 1500, 5632)
#: --flush-l2 auto: flush for M up to this.
FLUSH_AUTO_MAX_M = 4096
#: what an implementation times: the inference FFN or one training step.
TASKS = ("infer", "train")
#: --mode -> the tasks it runs, in order.
MODE_TASKS = {"infer": ("infer",), "train": ("train",), "both": ("infer", "train")}


@dataclass
class BenchConfig:
    """Everything ``run_bench`` needs (built from the command line by ``config_from_args``)."""

    d: int = 2048
    n: int = 5632
    ms: tuple = ()
    kinds: tuple = ("uniform",)
    means: tuple = (29.0,)
    dtype: str = "bfloat16"
    seed: int = 0
    sweep: bool = False
    sweep_m: int | None = None
    sweep_means: tuple = SWEEP_MEANS
    skew_sigma: float | None = None
    dead_fraction: float = 0.3
    calibrate: str | None = None
    check: bool = False
    check_rows: int = 256
    budget_s: float = 0.5
    warmup: int = 3
    graphs: bool = True
    interleave: bool = False  #: also time every implementation of a case eagerly in turn (time_interleaved)
    flush_l2: str = "auto"
    impls: tuple | None = None
    backend: str = "auto"
    describe_rows: int | None = None
    mode: str = "infer"  #: "infer", "train" or "both"
    l1_weight: float = 0.0  #: λ of the training step's L1 penalty
