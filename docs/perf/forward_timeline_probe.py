"""Event timeline inside one twell.gated_ffn call (perf-notes.md, v5): CUDA events and host clocks at the
entry and exit of the gate, up/down and read-back steps, for the fused and the cuBLAS gate.  Each line
prints, per mark, the GPU time (ms since the call's first event) and the host time (ms since the call).

Run on the GPU from the repository root:  PYTHONPATH=. python docs/perf/forward_timeline_probe.py [kind]
(kind: uniform (default) or token_skew).
"""

import functools
import sys
import time

import cupy as cp

import twell
from twell import synthetic
from twell.kernels import _launch, gate_gemm
from twell.kernels import ops as kops

marks: list = []


def mark(tag):
    ev = cp.cuda.Event()
    ev.record()
    marks.append((tag, ev, time.perf_counter()))


def instrument(module, name):
    """Replace module.name by a wrapper that marks its entry and exit."""
    fn = getattr(module, name)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        mark(name + ">")
        out = fn(*args, **kwargs)
        mark(name + "<")
        return out

    setattr(module, name, wrapped)


def main():
    instrument(kops.gate_gemm, "gate_twell_async")
    instrument(kops.gate_gemm, "ffn_twell_fused_async")
    instrument(kops.pack, "pack_twell_async")
    instrument(kops.ffn_forward, "twell_up_down")
    instrument(gate_gemm, "choose_gate_kernel")
    instrument(_launch.HostReadback, "wait")
    instrument(kops.pack, "route_rows")
    p = synthetic.make_problem(16384, kind=sys.argv[1] if len(sys.argv) > 1 else "uniform", xp=cp)
    x, wg, wu, wd = p.x, p.w_gate, p.w_up, p.w_down
    dev = cp.cuda.Device()
    for gk, fused_forward in (("fused", False), ("cublas", False), ("fused", True), ("fused", False)):
        gate_gemm.FUSED_FORWARD = fused_forward
        for _ in range(3):
            twell.gated_ffn(x, wg, wu, wd, gate_kernel=gk)
        dev.synchronize()
        for it in range(3):
            marks.clear()
            mark("start")
            twell.gated_ffn(x, wg, wu, wd, gate_kernel=gk)
            mark("end")
            dev.synchronize()
            _, ev0, host0 = marks[0]
            cells = [f"{tag} gpu {cp.cuda.get_elapsed_time(ev0, ev):.3f} host {1e3 * (host - host0):.3f}"
                     for tag, ev, host in marks[1:]]
            print(gk, "fused_forward" if fused_forward else "", it, " | ".join(cells), flush=True)
        # host time per call in steady state (calls back to back: the GPU is busy, so this is the host's
        # own work plus its wait for the read-back)
        t0 = time.perf_counter()
        for _ in range(50):
            twell.gated_ffn(x, wg, wu, wd, gate_kernel=gk)
        dev.synchronize()
        print(gk, "host+wait ms per call", round((time.perf_counter() - t0) / 50 * 1e3, 4), flush=True)
        marks.clear()


if __name__ == "__main__":
    main()
