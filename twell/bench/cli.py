"""Command line of ``python -m twell bench``: the options (:func:`add_bench_arguments`), their validation
into a :class:`~twell.bench.config.BenchConfig` (:func:`config_from_args`) and :func:`bench_main`
(run, print, write the JSON and the plot; exit status 1 when a check failed or something errored).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

from twell import _backend as B
from twell import synthetic

from .config import (
    CPU_DEFAULT_M,
    CPU_DEFAULT_SWEEP_M,
    CPU_DEFAULT_TRAIN_M,
    FLUSH_AUTO_MAX_M,
    GPU_DEFAULT_M,
    GPU_DEFAULT_SWEEP_M,
    GPU_DEFAULT_TRAIN_M,
    MODE_TASKS,
    SWEEP_MEANS,
    BenchConfig,
)
from .impls import IMPLS
from .report import all_cases, format_table, plot_results, write_json
from .run import run_bench

__all__ = ["add_bench_arguments", "config_from_args", "bench_main"]


def _int_list(text: str) -> tuple:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return vals


def _float_list(text: str) -> tuple:
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(not math.isfinite(v) or v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers > 0, got {text!r}")
    return vals


def _kind_list(text: str) -> tuple:
    vals = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in vals if v not in synthetic.KINDS]
    if not vals or bad:
        raise argparse.ArgumentTypeError(f"kinds must be from {', '.join(synthetic.KINDS)}; got {text!r}")
    return vals


def _name_list(text: str) -> tuple:
    vals = tuple(v.strip() for v in text.split(",") if v.strip())
    if not vals:
        raise argparse.ArgumentTypeError("expected comma-separated implementation names")
    return vals


def _int_at_least(minimum: int):
    """argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return v
    return parse


_pos_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return v


def _pos_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


_TRAIN_HELP = """\
One training step per case, on the same synthetic problems as inference:
forward y = (relu(x Wg^T) * x Wu^T) Wd, backward dx, dWg, dWu, dWd for a fixed
standard-normal dy, with the L1 gradient (l1_weight / M) * sign(h).
  GPU: dense_cupy_train (9 cuBLAS GEMMs + fused elementwise kernels),
       torch_autograd (PyTorch eager + autograd, when torch has CUDA),
       twell_train (twell.gated_ffn_forward + gated_ffn_backward; no graph
       time: its forward reads counts back to the host once).
  CPU: dense_numpy_train (float32) and reference_train (twell.reference).
Columns: step ms (fwd+bwd median, p20, p80), graph ms, queued ms (steps back to
back, no host sync between them), fwd ms (forward alone), speedup / spd graph /
spd queued / spd fwd (fastest dense / impl), peak MiB (device memory
of one step beyond x, weights and dy; GPU only), saved MiB, l0 and backup rows
(twell), max err and err/dense with --check (rel. error vs float64 over the
whole batch, and its ratio to the best dense error).  JSON: key "train".
"""


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--d", type=_pos_int, default=2048, help="d_model (default 2048)")
    p.add_argument("--n", type=_pos_int, default=5632, help="d_ff (default 5632)")
    p.add_argument("--m", type=_int_list, default=None, metavar="M[,M...]",
                   help=f"tokens per case (default inference: GPU {','.join(map(str, GPU_DEFAULT_M))}, "
                        f"CPU {','.join(map(str, CPU_DEFAULT_M))}; training: GPU "
                        f"{','.join(map(str, GPU_DEFAULT_TRAIN_M))}, CPU {','.join(map(str, CPU_DEFAULT_TRAIN_M))})")
    p.add_argument("--kind", type=_kind_list, default=None, metavar="KIND[,KIND...]",
                   help=f"problem kinds from {', '.join(synthetic.KINDS)} (default uniform)")
    p.add_argument("--mean", type=_float_list, default=(29.0,), metavar="A[,A...]",
                   help="target active neurons per token (median for token_skew; default 29)")
    p.add_argument("--dtype", choices=B.FLOAT_DTYPE_NAMES, default="bfloat16")
    p.add_argument("--seed", type=_nonneg_int, default=0)
    p.add_argument("--sweep", action="store_true",
                   help=f"sweep the mean over {','.join(map(str, SWEEP_MEANS))} at one M (--sweep-m), one sweep "
                        "per --kind (default uniform), for every task of --mode; means >= --n are skipped (but mean = n for uniform) "
                        "with a note")
    p.add_argument("--sweep-m", type=_pos_int, default=None,
                   help=f"M of the sweep (default GPU {GPU_DEFAULT_SWEEP_M}, CPU {CPU_DEFAULT_SWEEP_M})")
    p.add_argument("--sweep-means", type=_float_list, default=None, metavar="A[,A...]",
                   help="override the sweep's list of means")
    p.add_argument("--skew-sigma", type=float, default=None,
                   help="token_skew: per-token lognormal sigma (default 0.13); neuron_skew: per-neuron log-rate "
                        "sigma (default 1.5)")
    p.add_argument("--dead-fraction", type=float, default=0.3, help="neuron_skew: share of dead neurons (0.3)")
    p.add_argument("--calibrate", choices=("median", "mean"), default=None,
                   help="token_skew: make the median (default) or the mean count equal --mean")
    p.add_argument("--check", action="store_true",
                   help="inference: compare every implementation's y with the float64 reference on the first "
                        "--check-rows rows; training: every output (y, dx, dW) over the whole batch (see below)")
    p.add_argument("--check-rows", type=_pos_int, default=256, help="inference --check rows (default 256)")
    p.add_argument("--budget", type=_pos_float, default=0.5, metavar="SECONDS",
                   help="time budget of each timing (eager and graph separately; default 0.5 s)")
    p.add_argument("--warmup", type=_nonneg_int, default=3, help="untimed calls before timing (default 3)")
    p.add_argument("--no-graph", action="store_true", help="skip CUDA-graph timing")
    p.add_argument("--interleave", action="store_true",
                   help="also time the implementations of each case eagerly in turn, one call each per round "
                        "(a drift of the clocks then moves them alike): 'spd inter' in the table")
    p.add_argument("--flush-l2", choices=("auto", "on", "off"), default="auto",
                   help=f"flush L2 before each timed call (auto: M <= {FLUSH_AUTO_MAX_M})")
    p.add_argument("--impl", type=_name_list, default=None, metavar="NAME[,NAME...]",
                   help=f"only these implementations (registered: {', '.join(IMPLS)})")
    p.add_argument("--backend", choices=("auto", "gpu", "cpu"), default="auto",
                   help="auto: GPU when CuPy sees a device, else CPU")
    p.add_argument("--describe-rows", type=_pos_int, default=None,
                   help="rows used for the realised statistics (default: all on GPU, 4096 on CPU)")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write results as JSON")
    p.add_argument("--plot", dest="plot_path", default=None, metavar="PATH",
                   help="plot speedup vs realised mean active (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="print only the final table")
    t = p.add_argument_group("training benchmark (--mode train|both)", _TRAIN_HELP)
    t.add_argument("--mode", choices=tuple(MODE_TASKS), default="infer",
                   help="infer: inference y = FFN(x) (default); train: the training step only; both: inference, "
                        "then training")
    t.add_argument("--l1-weight", type=_nonneg_float, default=0.0, metavar="LAMBDA",
                   help="training: lambda of the L1 penalty lambda * (1/M) * sum(|h|) (default 0; the "
                        "paper uses 2e-5 to 3e-4)")


def config_from_args(args, parser: argparse.ArgumentParser) -> BenchConfig:
    """Validate the parsed arguments together; ``parser.error`` (exit 2) on a bad combination."""
    n = args.n
    if args.d < 2:
        parser.error("--d must be >= 2 (column 0 of x is the bias input)")
    for mean in args.mean:
        if not 0 < mean < n:
            parser.error(f"--mean {mean:g} must be in (0, n={n})")
    if args.sweep_means is not None:
        for mean in args.sweep_means:
            if not 0 < mean < n:
                parser.error(f"--sweep-means {mean:g} must be in (0, n={n})")
    if args.skew_sigma is not None and (not math.isfinite(args.skew_sigma) or args.skew_sigma < 0):
        parser.error(f"--skew-sigma must be >= 0, got {args.skew_sigma}")
    if not 0 <= args.dead_fraction < 1:
        parser.error(f"--dead-fraction must be in [0, 1), got {args.dead_fraction}")
    if args.impl:
        unknown = [x for x in args.impl if x not in IMPLS]
        if unknown:
            parser.error(f"--impl: unknown implementation(s) {', '.join(unknown)}; registered: {', '.join(IMPLS)}")
        for task in MODE_TASKS[args.mode]:
            if not any(IMPLS[x].task == task for x in args.impl):
                names = ", ".join(k for k, v in IMPLS.items() if v.task == task)
                parser.error(f"--impl names no {'training' if task == 'train' else 'inference'} implementation "
                             f"but --mode {args.mode} runs that task (registered: {names})")
    if args.sweep and args.m is not None:
        parser.error("--m and --sweep exclude each other (use --sweep-m)")
    if args.plot_path is not None and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib: pip install matplotlib (or twell[plot])")
    return BenchConfig(
        d=args.d, n=n, ms=tuple(args.m or ()), kinds=tuple(args.kind or ("uniform",)), means=tuple(args.mean),
        dtype=args.dtype, seed=args.seed, sweep=args.sweep, sweep_m=args.sweep_m,
        sweep_means=tuple(args.sweep_means or SWEEP_MEANS), skew_sigma=args.skew_sigma,
        dead_fraction=args.dead_fraction, calibrate=args.calibrate, check=args.check, check_rows=args.check_rows,
        budget_s=args.budget, warmup=args.warmup, graphs=not args.no_graph, interleave=args.interleave,
        flush_l2=args.flush_l2,
        impls=tuple(args.impl) if args.impl else None, backend=args.backend, describe_rows=args.describe_rows,
        mode=args.mode, l1_weight=args.l1_weight,
    )


def bench_main(args, parser: argparse.ArgumentParser, argv: list | None = None) -> int:
    cfg = config_from_args(args, parser)
    if args.json_path:
        parent = Path(args.json_path).resolve().parent
        if not parent.is_dir():
            parser.error(f"--json: directory {parent} does not exist")
    quiet = args.quiet

    def log(s):
        if not quiet:
            print(s, flush=True)

    command = [sys.executable, "-m", "twell", *(argv if argv is not None else sys.argv[1:])]
    try:
        results = run_bench(cfg, log=log, command=command)
    except (RuntimeError, ValueError) as exc:
        print(f"twell bench: error: {exc}", file=sys.stderr)
        return 1
    if quiet:
        print(format_table(results))
    cases = list(all_cases(results))
    failed = [(c["name"], c["m"], name) for _, c in cases for name, r in c.get("impls", {}).items()
              if r.get("check_ok") is False]
    errors = [(c["name"], c["m"], c["error"]) for _, c in cases if c.get("error")]
    errors += [(c["name"], c["m"], f"{name}: {r['error']}") for _, c in cases
               for name, r in c.get("impls", {}).items() if r.get("error")]
    for note in results["notes"]:
        if quiet:
            print(f"note: {note}")
    if failed:
        print(f"CHECK FAILED: {', '.join(f'{n} ({c}, M={m})' for c, m, n in failed)}", file=sys.stderr)
    if errors:
        for name, m, err in errors:
            print(f"ERROR {name} M={m}: {err}", file=sys.stderr)
    if args.json_path:
        write_json(results, args.json_path)
        print(f"wrote {args.json_path}")
    if args.plot_path:
        try:
            plot_results(results, args.plot_path)
            print(f"wrote {args.plot_path}")
        except (RuntimeError, ValueError) as exc:
            print(f"twell bench: plot: {exc}", file=sys.stderr)
            return 1
    return 1 if (failed or errors) else 0
