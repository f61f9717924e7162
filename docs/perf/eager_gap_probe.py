"""Where the eager-vs-queued gap of the inference forward comes from (perf-notes.md, v13).

Times pieces of ``twell.gated_ffn`` (M = 16,384 by default, fused gate) in the bench's two modes —
eager (events around each call, host sync after it) and queued (calls back to back) — so that the gap
of each piece shows what it adds when the GPU starts idle.  Then a cProfile of 200 calls (host time).

Run on the GPU from the repository root:  PYTHONPATH=. python docs/perf/eager_gap_probe.py [M] [kind]
"""

import cProfile
import io
import pstats
import sys
import time

import cupy as cp
import numpy as np

import twell
from twell import bench, synthetic
from twell.kernels import _launch, ffn_forward, gate_gemm, pack


def main():
    m = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
    kind = sys.argv[2] if len(sys.argv) > 2 else "uniform"
    p = synthetic.make_problem(m, kind=kind, xp=cp)
    x, wg, wu, wd = p.x, p.w_gate, p.w_up, p.w_down
    y = cp.empty_like(x)
    tiny = cp.zeros(1, dtype=cp.float32)

    def gate_only():
        return gate_gemm.gate_twell_async(x, wg, 256, 8, 128)

    def gate_updown():
        q = gate_gemm.gate_twell_async(x, wg, 256, 8, 128)
        ffn_forward.twell_up_down(x, q.counts, q.indices, q.values, q.row_route, wu, wd, 256, y,
                                  compact=pack.ROUTE_COMPACT, work_counter=q.totals[2:3])

    def gate_updown_readback():
        q = gate_gemm.gate_twell_async(x, wg, 256, 8, 128)
        rb = _launch.HostReadback(q.totals[:2], overlap=True)
        ffn_forward.twell_up_down(x, q.counts, q.indices, q.values, q.row_route, wu, wd, 256, y,
                                  compact=pack.ROUTE_COMPACT, work_counter=q.totals[2:3])
        rb.wait()

    pieces = [
        ("tiny kernel (tiny += 1)", lambda: tiny.__iadd__(1)),
        ("cuBLAS x w_gate^T", lambda: cp.matmul(x, wg.T)),
        ("dense 3 GEMMs (cupy matmul, no elementwise)", lambda: cp.matmul(cp.matmul(x, wg.T) * cp.matmul(x, wu.T), wd)),
        ("gate_twell_async (GEMM + route)", gate_only),
        ("  + twell_up_down", gate_updown),
        ("  + read-back and wait", gate_updown_readback),
        ("twell.gated_ffn", lambda: twell.gated_ffn(x, wg, wu, wd)),
        ("twell.gated_ffn(out=y)", lambda: twell.gated_ffn(x, wg, wu, wd, out=y)),
    ]
    print(f"M = {m}, {kind}; ms: median (p20-p80)", flush=True)
    for name, fn in pieces:
        for _ in range(3):
            fn()
        e = bench.time_gpu(fn, budget_s=1.0, warmup=5, sync_each=True)
        q = bench.time_gpu(fn, budget_s=1.0, warmup=5, sync_each=False)
        te, tq = e.to_dict(), q.to_dict()
        print(f"{name:48s} eager {te['median_ms']:.4f} ({te['p20_ms']:.4f}-{te['p80_ms']:.4f})  queued "
              f"{tq['median_ms']:.4f} ({tq['p20_ms']:.4f}-{tq['p80_ms']:.4f})  gap {te['median_ms'] - tq['median_ms']:+.4f}",
              flush=True)

    # host time of one call, without the GPU (median of perf_counter around the call, sync outside)
    for name, fn in pieces[3:]:
        ts = []
        for _ in range(50):
            cp.cuda.Device().synchronize()
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        cp.cuda.Device().synchronize()
        print(f"host time of the call: {name:40s} {1e6 * float(np.median(ts)):8.1f} us", flush=True)

    # host time until the GEMM launch returns (gate_twell_async's launch), per call
    orig = gate_gemm.gate_twell_async
    stamps = []

    def stamped(*a, **k):
        stamps.append(time.perf_counter())
        return orig(*a, **k)

    gate_gemm.gate_twell_async = stamped
    import twell.kernels.ops as kops
    kops.gate_gemm.gate_twell_async = stamped
    pre = []
    for _ in range(50):
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        twell.gated_ffn(x, wg, wu, wd)
        pre.append(stamps[-1] - t0)
    cp.cuda.Device().synchronize()
    gate_gemm.gate_twell_async = orig
    kops.gate_gemm.gate_twell_async = orig
    print(f"host time from the call to gate_twell_async's entry: {1e6 * float(np.median(pre)):.1f} us", flush=True)

    pr = cProfile.Profile()
    pr.enable()
    for _ in range(200):
        twell.gated_ffn(x, wg, wu, wd)
    cp.cuda.Device().synchronize()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
    print(s.getvalue()[:7000], flush=True)


if __name__ == "__main__":
    main()
