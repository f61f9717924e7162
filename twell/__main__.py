"""Command line: ``python -m twell {info,warmup,check,bench,plot}`` (also the ``twell`` console script).

``info``   versions, CUDA / NVRTC, devices, CuPy cache dir, where ``cuda_src`` is (``--json``).
``warmup`` compile every kernel family for the current device now (CuPy caches them on disk).
``check``  every op against the float64 reference on random problems (:mod:`twell.check`).
``bench``  benchmark on synthetic problems (see :mod:`twell.bench` and ``bench --help``).
``plot``   ``plot RESULTS.json OUT.png``: speedup vs realised mean active neurons.
"""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args, parser, argv) -> int:
    from .bench.env import environment_info, format_info  # noqa: PLC0415

    info = environment_info()
    if args.json:
        print(json.dumps(info, indent=1, sort_keys=False))
    else:
        print(format_info(info))
    return 0


def _cmd_warmup(args, parser, argv) -> int:
    from . import _backend as B  # noqa: PLC0415
    from .kernels import FAMILIES  # noqa: PLC0415
    from .runtime.loader import device_arch, warmup  # noqa: PLC0415

    cp = B.cupy_or_none()
    if cp is None:
        print("twell warmup: error: no CUDA device (CuPy sees none); kernels are compiled for the device they "
              "run on", file=sys.stderr)
        return 2
    arch = device_arch(args.device)
    print(f"twell: compiling {len(FAMILIES)} kernel families for {arch} (device {cp.cuda.Device(args.device).id}; "
          "loaded from CuPy's kernel cache when already compiled)", flush=True)
    try:
        from tqdm import tqdm  # noqa: PLC0415
        bar = tqdm(total=len(FAMILIES), unit="family")

        def progress(name, seconds):
            bar.set_postfix_str(f"{name} {seconds:.1f} s")
            bar.update(1)
    except ImportError:
        bar = None

        def progress(name, seconds):
            print(f"  {name}: {seconds:.1f} s", flush=True)
    done = warmup(FAMILIES, device_id=args.device, progress=progress)
    if bar is not None:
        bar.close()
    print(f"twell: {len(done)} families ready ({max(done.values()):.1f} s)")
    return 0


def _cmd_check(args, parser, argv) -> int:
    from .check import as_dicts, format_results, run_checks  # noqa: PLC0415

    dtypes = tuple(t.strip() for t in args.dtype.split(",")) if args.dtype else None
    try:
        results = run_checks(args.backend, dtypes, args.seed)
    except (RuntimeError, ValueError, TypeError) as exc:
        print(f"twell check: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(as_dicts(results), indent=1) if args.json else format_results(results))
    return 0 if all(r.ok for r in results) else 1


def _cmd_bench(args, parser, argv) -> int:
    from .bench.cli import bench_main  # noqa: PLC0415

    return bench_main(args, parser, argv)


def _cmd_plot(args, parser, argv) -> int:
    from .bench.report import plot_results  # noqa: PLC0415

    try:
        with open(args.results) as f:
            results = json.load(f)
    except OSError as exc:
        print(f"twell plot: error: cannot read {args.results}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except json.JSONDecodeError as exc:
        print(f"twell plot: error: {args.results} is not valid JSON: {exc}", file=sys.stderr)
        return 1
    try:
        out = plot_results(results, args.out)
    except (RuntimeError, ValueError) as exc:
        print(f"twell plot: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


_BENCH_DESCRIPTION = """\
Times the gated FFN y = (relu(x Wg^T) * x Wu^T) Wd on seeded synthetic problems
(twell.synthetic) with controlled activation sparsity.

GPU (CuPy sees a device): dense_cupy / dense_cupy_cat (cuBLAS + one fused
elementwise kernel), torch_eager (if PyTorch has CUDA), and every registered
sparse implementation; eager and CUDA-graph medians (CUDA events), speedup vs
the fastest dense.  CPU: dense_numpy (float32) and twell.reference.gated_ffn,
timed with perf_counter.  See the twell.bench package docstring for details.
"""


def build_parser() -> argparse.ArgumentParser:
    from .bench import cli as bench_cli  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m twell",
                                     description="twell: activation-sparse transformer FFN kernels")
    sub = parser.add_subparsers(dest="command", metavar="{info,warmup,check,bench,plot}")
    sub.required = True

    p = sub.add_parser("info", help="versions, CUDA/NVRTC, devices, cache and source locations")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info, subparser=p)

    p = sub.add_parser("warmup", help="compile every kernel family for the current device now")
    p.add_argument("--device", type=int, default=None, help="CUDA device id (default: the current one)")
    p.set_defaults(func=_cmd_warmup, subparser=p)

    p = sub.add_parser("check", help="check every op against the float64 reference on random problems")
    p.add_argument("--backend", choices=("auto", "gpu", "cpu"), default="auto",
                   help="gpu: the CUDA kernels; cpu: the NumPy path; auto: gpu when CuPy sees a device")
    p.add_argument("--dtype", default=None,
                   help="comma-separated dtypes (default: bfloat16,float16,float32 on gpu, float64 on cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_check, subparser=p)

    p = sub.add_parser("bench", help="benchmark dense baselines and registered sparse implementations",
                       description=_BENCH_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_cli.add_bench_arguments(p)
    p.set_defaults(func=_cmd_bench, subparser=p)

    p = sub.add_parser("plot", help="plot speedup vs realised mean active from a bench JSON")
    p.add_argument("results", help="JSON written by bench --json")
    p.add_argument("out", help="output image (png, svg, pdf)")
    p.set_defaults(func=_cmd_plot, subparser=p)
    return parser


def main(argv: list | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    return int(args.func(args, args.subparser, argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
