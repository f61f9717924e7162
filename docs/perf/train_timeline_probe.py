"""Per-launch GPU timeline of one training step (``gated_ffn_forward`` + ``gated_ffn_backward``), M = 16,384
(perf-notes.md, v8): every raw kernel launch and every cuBLAS matmul of the step is bracketed by CUDA events,
so each line shows a launch's GPU time and the idle gap before it.  Then the uninstrumented step time
(median of 20) for the cuBLAS and the fused gate in the forward.

Run on the GPU from the repository root:  PYTHONPATH=. python docs/perf/train_timeline_probe.py [kind ...]
(kinds: uniform, token_skew, neuron_skew; default uniform token_skew).
"""

import sys
import time

import cupy as cp
import numpy as np

import twell
from twell import _kernels, bench, synthetic

events: list = []
ACTIVE = [False]


def mark(tag):
    if ACTIVE[0]:
        ev = cp.cuda.Event()
        ev.record()
        events.append((tag, ev))


class Timed:
    """A RawKernel stand-in that brackets each launch with events (attributes forwarded)."""

    def __init__(self, name, kernel):
        self._name, self._kernel = name, kernel

    def __call__(self, *args, **kwargs):
        mark("<" + self._name)
        out = self._kernel(*args, **kwargs)
        mark(">" + self._name)
        return out

    def __getattr__(self, attr):
        return getattr(self._kernel, attr)

    def __setattr__(self, attr, value):  # kernel attributes (e.g. the dynamic shared memory limit)
        if attr.startswith("_"):
            object.__setattr__(self, attr, value)
        else:
            setattr(self._kernel, attr, value)


def instrument():
    import twell.kernels.ffn_backward, twell.kernels.ffn_forward, twell.kernels.gate_gemm  # noqa: F401, E401
    import twell.kernels.pack, twell.kernels.train  # noqa: F401, E401 (loaded lazily: patch them first)
    get_kernel = _kernels.get_kernel

    def timed_get_kernel(family, name):
        return Timed(name.split("<")[0], get_kernel(family, name))

    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("twell.kernels") and getattr(mod, "get_kernel", None) is get_kernel:
            mod.get_kernel = timed_get_kernel
    matmul = cp.matmul

    def timed_matmul(*args, **kwargs):
        mark("<matmul")
        out = matmul(*args, **kwargs)
        mark(">matmul")
        return out

    cp.matmul = timed_matmul


def step(tp, gate_kernel):
    y, saved, stats = twell.gated_ffn_forward(tp.x, tp.w_gate, tp.w_up, tp.w_down, l1_weight=tp.l1_weight,
                                              gate_kernel=gate_kernel)
    mark("|forward done")
    return twell.gated_ffn_backward(saved, tp.dy)


def timeline(tp, gate_kernel):
    events.clear()
    ACTIVE[0] = True
    mark("|start")
    step(tp, gate_kernel)
    mark("|end")
    ACTIVE[0] = False
    cp.cuda.Device().synchronize()
    t0 = events[0][1]
    rows, last_end, open_at = [], 0.0, {}
    for tag, ev in events[1:]:
        t = cp.cuda.get_elapsed_time(t0, ev)
        if tag[0] == "<":
            open_at[tag[1:]] = t
        elif tag[0] == ">":
            start = open_at.pop(tag[1:])
            rows.append(f"  {tag[1:]:28s} start {start:7.3f} gpu {t - start:7.3f} gap {start - last_end:6.3f}")
            last_end = t
        else:
            rows.append(f"  {tag[1:]:28s} at    {t:7.3f}")
    return rows


def median_step_ms(tp, gate_kernel, reps=20):
    dev = cp.cuda.Device()
    times = []
    for _ in range(reps):
        dev.synchronize()
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        step(tp, gate_kernel)
        b.record()
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b))
    return float(np.median(times))


def main():
    kinds = sys.argv[1:] or ["uniform", "token_skew"]
    instrument()
    for kind in kinds:
        p = synthetic.make_problem(16384, kind=kind, xp=cp)
        tp = bench.TrainProblem(p, bench.make_dy(p, 0), 2e-5)
        for gk in ("cublas", "fused"):
            for _ in range(3):
                step(tp, gk)
        # A/B rounds, alternating, so clock and thermal drift hit both alike
        for rnd in range(3):
            for gk in ("cublas", "fused"):
                t0 = time.perf_counter()
                ms = median_step_ms(tp, gk)
                print(f"{kind} round {rnd} gate={gk}: step median {ms:.3f} ms "
                      f"(host {time.perf_counter() - t0:.2f} s for 20)", flush=True)
        for gk in ("cublas", "fused"):
            print(f"{kind} gate={gk} timeline:", flush=True)
            for row in timeline(tp, gk):
                print(row, flush=True)


if __name__ == "__main__":
    main()
