"""Per-phase GPU timeline of one training step (``twell.gated_ffn_forward`` + ``twell.gated_ffn_backward``),
M = 16,384 by default (bf16, d 2048, n 5632, mean 29 active).

Every launcher call of the step (the functions of ``twell.kernels.{pack,gate_gemm,ffn_forward,
ffn_backward}``, each cuBLAS GEMM of ``twell.runtime.blas``, the kernels the training orchestration
launches itself) and the host's wait for the forward's read-back are bracketed by CUDA events and host
clocks.  One line per phase: GPU start (ms since the step's first event), GPU time, the GPU's idle gap
before it (time the GPU waited for the host), and when the host issued it.  Then the uninstrumented step
(eager: events around the step, host sync after it; median) per gate kernel.

    PYTHONPATH=. python docs/perf/train_timeline_probe.py [--kind uniform,token_skew] [--m 16384]
        [--gate cublas,auto] [--path sparse]
"""

import argparse
import functools
import inspect
import time

import cupy as cp

import twell
import twell.gpu.training as training
from twell.bench import make_dy
from twell.bench.timing import time_gpu
from twell.kernels import ffn_backward, ffn_forward, gate_gemm, pack
from twell.runtime import blas
from twell.runtime.launch import HostReadback
from twell.synthetic import make_problem

#: launcher-module functions that launch nothing (not bracketed)
HOST_ONLY = {"choose_gate_kernel", "fused_supported", "auto_gate_kernel", "fused_kernel_for_device",
             "encode_tensor_map", "max_active_clusters", "decode_fused_supported"}
marks: list = []            # (tag, event, host seconds)
state = {"on": False, "depth": 0}


def mark(tag):
    ev = cp.cuda.Event()
    ev.record()
    marks.append((tag, ev, time.perf_counter()))


def bracket(name, fn):
    """``fn`` with events at entry and exit of its outermost calls (nested launcher calls are its phase)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        outer = state["on"] and state["depth"] == 0
        if outer:
            mark("<" + name)
        state["depth"] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            state["depth"] -= 1
            if outer:
                mark(">" + name)
    return wrapped


def host_span(name, fn):
    """``fn`` (host work, no launches) with host marks at entry and exit."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if state["on"]:
            mark("|" + name)
        try:
            return fn(*args, **kwargs)
        finally:
            if state["on"]:
                mark("|" + name + " done")
    return wrapped


def instrument():
    for mod in (pack, gate_gemm, ffn_forward, ffn_backward):
        for name, fn in list(vars(mod).items()):
            if (inspect.isfunction(fn) and fn.__module__ == mod.__name__ and not name.startswith("_")
                    and name not in HOST_ONLY):
                setattr(mod, name, bracket(f"{mod.__name__.rsplit('.', 1)[1]}.{name}", fn))
    blas.gemm = bracket("cublas gemm", blas.gemm)
    get_kernel = training.get_kernel                  # kernels launched by the orchestration itself
    training.get_kernel = lambda family, expr: bracket(expr.split("<")[0], get_kernel(family, expr))
    HostReadback.wait = host_span("host waits for the read-back", HostReadback.wait)


def step(x, wg, wu, wd, dy, gate, path):
    y, saved, stats = twell.gated_ffn_forward(x, wg, wu, wd, l1_weight=2e-5, gate_kernel=gate, path=path)
    if state["on"]:
        mark("|forward returned")
    twell.gated_ffn_backward(saved, dy)
    return stats


def timeline(args5):
    marks.clear()
    state["on"] = True
    mark("|start")
    stats = step(*args5)
    mark("|end")
    state["on"] = False
    cp.cuda.Device().synchronize()
    _, ev0, host0 = marks[0]
    last_end, opened, busy = 0.0, {}, 0.0
    print(f"  path {stats.path}, gate {stats.gate_kernel}, backup rows {stats.n_backup_rows}, "
          f"l0 {float(stats.l0):.1f}")
    for tag, ev, host in marks[1:]:
        t, h = cp.cuda.get_elapsed_time(ev0, ev), 1e3 * (host - host0)
        if tag[0] == "<":
            opened[tag[1:]] = (t, h)
        elif tag[0] == ">":
            start, issued = opened.pop(tag[1:])
            busy += t - start
            print(f"  {tag[1:]:34s} start {start:7.3f}  gpu {t - start:7.3f}  idle before {start - last_end:6.3f}"
                  f"  issued {issued:7.3f}")
            last_end = max(last_end, t)
        else:
            print(f"  {tag[1:]:34s} at    {t:7.3f}  host {h:7.3f}")
    print(f"  step {last_end:.3f} ms on the GPU, phases {busy:.3f} ms, idle {last_end - busy:.3f} ms", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", default="uniform,token_skew")
    ap.add_argument("--m", type=int, default=16384)
    ap.add_argument("--mean", type=float, default=29.0)
    ap.add_argument("--gate", default="cublas,auto", help="gate_kernel values to compare")
    ap.add_argument("--path", default="sparse", choices=("sparse", "dense"))
    ap.add_argument("--budget", type=float, default=1.0, help="seconds per step timing")
    args = ap.parse_args()
    instrument()
    for kind in args.kind.split(","):
        p = make_problem(args.m, mean_active=args.mean, kind=kind, dtype="bfloat16", seed=0, xp=cp)
        dy = make_dy(p, 0)
        for gate in args.gate.split(","):
            run = (*p.arrays(), dy, gate, args.path)
            t = time_gpu(lambda: step(*run), budget_s=args.budget, warmup=3).to_dict()
            print(f"{kind} gate={gate} path={args.path}: step {t['median_ms']:.3f} ms "
                  f"(p20-p80 {t['p20_ms']:.3f}-{t['p80_ms']:.3f})", flush=True)
            timeline(run)


if __name__ == "__main__":
    main()
