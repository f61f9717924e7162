"""Session-8 probe (perf-notes.md, v19): the backup rows' path before and after v19, in one process.

Before (session 7): after the read-back the host queues route_rows (2 kernels), x[rows] (CuPy take),
unpack_twell_rows (memset + kernel), cupy.matmul, gate_mul, cupy.matmul, y[rows] = ... (CuPy scatter).
After: one kernel for x[rows] and the unpacked gate rows; cuBLAS GemmEx called directly; one scatter
kernel.  (A first version also queued route_rows on the read-back's side stream before the up/down
kernel: uniform batches, without backup rows, lost 0.03-0.05 ms — the side-stream kernels only got SMs
once the up/down kernel drained and the next call waited for them — so it was dropped.)

Alternating rounds of both on ``twell.gated_ffn`` (eager: events around one call + sync; queued: calls
back to back), and the host time of one call (perf_counter, no sync inside).  M = 16,384 token skew and
uniform (no backup rows: must not get slower).

Run on the GPU from the repository root:  PYTHONPATH=. python docs/perf/backup_host_probe.py
"""

import json
import time

import cupy as cp
import numpy as np

import twell
from twell import synthetic
from twell.kernels import ffn_forward, ops, pack

NEW = ops._backup_forward


def _backup_forward_session7(x, p, z, w_first, w_up, w_down, y, n_backup, n_overflow, gated):
    m = x.shape[0]
    if n_backup == m:
        rows, xr = None, x
    else:
        _, buf, _ = pack.route_rows(p.row_route)
        rows = buf[:n_backup]
        xr = x[rows]
    zr = ops._backup_gate(p, z, xr, rows, w_first, n_backup, n_overflow)
    h = ffn_forward.gate_mul(zr, cp.matmul(xr, w_up.T), relu=True) if gated else pack.relu_keep_nan(zr)
    if rows is None:
        cp.matmul(h, w_down, out=y)
    else:
        y[rows] = cp.matmul(h, w_down)


OLD = _backup_forward_session7


def use(impl):
    ops._backup_forward = impl


def queued(fn, k=10, reps=3):
    stream = cp.cuda.get_current_stream()
    out = []
    for _ in range(reps):
        e1, e2 = cp.cuda.Event(), cp.cuda.Event()
        fn()
        stream.synchronize()
        e1.record(stream)
        for _ in range(k):
            fn()
        e2.record(stream)
        e2.synchronize()
        out.append(cp.cuda.get_elapsed_time(e1, e2) / k)
    return float(np.median(out))


def eager(fn, reps=25):
    stream = cp.cuda.get_current_stream()
    out = []
    for _ in range(reps):
        e1, e2 = cp.cuda.Event(), cp.cuda.Event()
        e1.record(stream)
        fn()
        e2.record(stream)
        e2.synchronize()
        out.append(cp.cuda.get_elapsed_time(e1, e2))
    return float(np.median(out))


def host_us(fn, reps=30):
    ts = []
    for _ in range(reps):
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    cp.cuda.Device().synchronize()
    return 1e6 * float(np.median(ts))


def behind_busy_gpu(fn, reps=20):
    """GPU time of fn's kernels queued behind a busy GPU (a large GEMM first), so that no host gap between
    its launches shows: median of (event after fn - event before fn), in ms."""
    a = cp.ones((8192, 8192), dtype=cp.float32)
    out = []
    for _ in range(reps):
        cp.matmul(a, a)
        e1, e2 = cp.cuda.Event(), cp.cuda.Event()
        e1.record()
        fn()
        e2.record()
        e2.synchronize()
        out.append(cp.cuda.get_elapsed_time(e1, e2))
    return round(float(np.median(out)), 4)


def route_rows_times():
    for m in (16384, 131072):
        rng = np.random.default_rng(0)
        codes = cp.asarray((rng.random(m) < 0.03).astype(np.int32))
        print(json.dumps({"route_rows GPU ms (behind a busy GPU)": behind_busy_gpu(lambda: pack.route_rows(codes)),
                          "M": m, "routed": int(codes.sum())}), flush=True)


def main():
    route_rows_times()
    for kind in ("token_skew", "uniform"):
        p = synthetic.make_problem(16384, kind=kind, xp=cp)
        x, wg, wu, wd = p.x, p.w_gate, p.w_up, p.w_down
        f = lambda: twell.gated_ffn(x, wg, wu, wd)  # noqa: E731
        ys = {}
        t = {}
        for r in range(6):
            for name, impl in ((("old", OLD), ("new", NEW)) if r % 2 == 0 else (("new", NEW), ("old", OLD))):
                use(impl)
                ys[name] = f().view(cp.uint16)
                t.setdefault(f"{name} eager", []).append(eager(f))
                t.setdefault(f"{name} queued", []).append(queued(f))
                t.setdefault(f"{name} host us", []).append(host_us(f))
        use(NEW)
        res = {"kind": kind, "bitwise old == new": bool((ys["old"] == ys["new"]).all())}
        for k, v in t.items():
            res[k] = {"median": round(float(np.median(v)), 4), "min": round(float(np.min(v)), 4),
                      "all": [round(a, 4) for a in v]}
        print(json.dumps(res), flush=True)
        x = wg = wu = wd = p = None
        cp.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
