"""Session-8 probe (perf-notes.md, v17-v18): (1) the fused gate GEMM with a 4-CTA cluster (the w tile
multicast to four row blocks: its L2 -> SM traffic a quarter, the x tiles unchanged) against clusters 1
and 2, alone and in the whole forward (separate and fully fused); (2) the inference row threshold after
v14 (backup rows no longer pay a gate GEMM) under token skew and in the mixed regime of the sparsity
sweep; (3) the GPU time of each step of the backup-row path.

Needs ``gate_gemm.WGMMA_CLUSTERS`` to contain 4 for part (1) (skipped otherwise).
Run on the GPU from the repository root:  PYTHONPATH=. python docs/perf/cluster_threshold_probe.py [parts]
(parts: any of "cluster", "threshold", "backup"; default all).
"""

import json
import sys

import cupy as cp
import numpy as np

import twell
from twell import synthetic
from twell._kernels import get_kernel
from twell.kernels import ffn_forward, gate_gemm, pack
from twell.kernels._launch import NULL, i32


def queued(fn, k=20, reps=7):
    """Median over reps of (time of k calls queued back to back) / k, in ms."""
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
    return round(float(np.median(out)), 4)


def eager(fn, reps=40):
    """Median of single calls between two events, host sync after each, in ms."""
    stream = cp.cuda.get_current_stream()
    out = []
    for _ in range(reps):
        e1, e2 = cp.cuda.Event(), cp.cuda.Event()
        e1.record(stream)
        fn()
        e2.record(stream)
        e2.synchronize()
        out.append(cp.cuda.get_elapsed_time(e1, e2))
    return round(float(np.median(out)), 4)


def dense(x, wg, wu, wd):
    return cp.matmul(ffn_forward.gate_mul(cp.matmul(x, wg.T), cp.matmul(x, wu.T), relu=True), wd)


def cluster_part():
    clusters = [c for c in (1, 2, 4) if c in gate_gemm.WGMMA_CLUSTERS]
    if 4 not in clusters:
        print("cluster 4 not compiled: skipped", flush=True)
        return
    for m in (16384, 131072):
        p = synthetic.make_problem(m, kind="uniform", xp=cp)
        x, wg, wu, wd = p.x, p.w_gate, p.w_up, p.w_down
        n, d = wg.shape
        res = {"part": "gate alone", "M": m, "cublas x w_gate^T": queued(lambda: cp.matmul(x, wg.T))}
        for cl in clusters:
            res[f"cluster {cl} gate_twell_async"] = queued(
                lambda cl=cl: gate_gemm.gate_twell_async(x, wg, 256, 8, 128, cluster=cl))
            k = get_kernel("gate_gemm", f"gate_twell_wgmma<__nv_bfloat16, 256, {cl}, true, 0, 0>")
            res[f"cluster {cl} resident clusters"] = (gate_gemm.max_active_clusters(k, 384, gate_gemm.WGMMA_SMEM, cl)
                                                      if cl > 1 else 132)
            k0 = get_kernel("gate_gemm", f"gate_twell_wgmma<__nv_bfloat16, 256, {cl}, false, 0, 0>")
            grid = gate_gemm._wgmma_grid(k0, gate_gemm.WGMMA_SMEM, -(-m // 128), -(-n // 256), cl, 0)
            mx, mw = gate_gemm.tensor_map(x, 128), gate_gemm.tensor_map(wg, 256 // cl)
            buf = (cp.empty((m, 22), cp.int32), cp.empty((m, 22, 32), cp.uint8), cp.empty((m, 22, 32), x.dtype))

            def mainloop(k0=k0, grid=grid, mx=mx, mw=mw):
                k0((grid,), (384,), (mx, mw, i32(m), i32(n), i32(d), i32(22), i32(32)) + buf
                   + (NULL, NULL, NULL, NULL, NULL, i32(0), NULL, NULL, NULL, i32(0), i32(0)),
                   shared_mem=gate_gemm.WGMMA_SMEM)
            res[f"cluster {cl} mainloop only (grid {grid})"] = queued(mainloop)
        # correctness of cluster 4 against cluster 2 (same arithmetic per tile: bitwise)
        a = gate_gemm.gate_twell_async(x, wg, 256, 8, 128, cluster=2)
        b = gate_gemm.gate_twell_async(x, wg, 256, 8, 128, cluster=4)
        res["cluster 4 == cluster 2 (counts, indices, values)"] = bool(
            (a.counts == b.counts).all() and (a.indices == b.indices).all()
            and (a.values.view(cp.uint16) == b.values.view(cp.uint16)).all())
        print(json.dumps(res), flush=True)
        kinds = ("uniform", "token_skew") if m == 16384 else ("uniform",)
        for kind in kinds:
            if kind != "uniform":
                p = synthetic.make_problem(m, kind=kind, xp=cp)
                x, wg, wu, wd = p.x, p.w_gate, p.w_up, p.w_down
            res = {"part": "forward", "M": m, "kind": kind, "dense (cuBLAS + gate_mul) queued": queued(
                lambda: dense(x, wg, wu, wd))}
            ref = None
            for rnd in range(2):
                for fused in (False, True):
                    if fused and (m > 16384 or kind != "uniform"):
                        continue
                    for cl in (2, 4):
                        gate_gemm.WGMMA_CLUSTER, gate_gemm.FUSED_FORWARD = cl, fused
                        f = lambda: twell.gated_ffn(x, wg, wu, wd)  # noqa: E731
                        y = f()
                        if ref is None:
                            ref = y.copy()
                        same = bool((y.view(cp.uint16) == ref.view(cp.uint16)).all())
                        tag = f"{'fused forward' if fused else 'separate'} cluster {cl} r{rnd}"
                        res[tag + " eager"] = eager(f)
                        res[tag + " queued"] = queued(f)
                        res[tag + " bitwise"] = same
            gate_gemm.WGMMA_CLUSTER, gate_gemm.FUSED_FORWARD = 2, False
            print(json.dumps(res), flush=True)
        x = wg = wu = wd = p = None
        cp.get_default_memory_pool().free_all_blocks()


def threshold_part():
    cases = [(16384, "token_skew", 29, (64, 80, 96, 112, 128, 160)),
             (131072, "token_skew", 29, (80, 96, 128)),
             (16384, "uniform", 64, (64, 80, 96, 128)),
             (16384, "uniform", 96, (64, 80, 96, 128)),
             (16384, "uniform", 128, (64, 80, 96, 128)),
             (16384, "uniform", 200, (64, 96, 128))]
    for m, kind, mean, ths in cases:
        p = synthetic.make_problem(m, kind=kind, mean_active=mean, xp=cp)
        x, wg, wu, wd = p.x, p.w_gate, p.w_up, p.w_down
        res = {"part": "threshold", "M": m, "kind": kind, "mean": mean,
               "dense queued": queued(lambda: dense(x, wg, wu, wd))}
        ref = None
        for rnd in range(2):
            for th in ths:
                f = lambda th=th: twell.gated_ffn(x, wg, wu, wd, dense_row_threshold=th)  # noqa: E731
                y, st = twell.gated_ffn(x, wg, wu, wd, dense_row_threshold=th, return_stats=True)
                if ref is None:
                    ref = y.astype(cp.float32)
                if rnd == 0:
                    res[f"t{th} backup/overflow"] = [int(st.n_backup_rows), int(st.n_overflow_rows)]
                    res[f"t{th} max rel diff vs first"] = float(cp.abs(y.astype(cp.float32) - ref).max()
                                                                / cp.abs(ref).max())
                res[f"t{th} eager r{rnd}"] = eager(f, reps=30)
                res[f"t{th} queued r{rnd}"] = queued(f, k=10, reps=5)
        print(json.dumps(res), flush=True)
        x = wg = wu = wd = p = None
        cp.get_default_memory_pool().free_all_blocks()


def backup_part():
    p = synthetic.make_problem(16384, kind="token_skew", xp=cp)
    x, wg, wu, wd = p.x, p.w_gate, p.w_up, p.w_down
    y = cp.empty_like(x)
    for th in (128, 96):
        q = gate_gemm.gate_twell_async(x, wg, 256, 8, th)
        n_backup = int(q.totals[0].get())
        _, rows_buf, _ = pack.route_rows(q.row_route)
        rows = rows_buf[:n_backup]
        xr = x[rows]
        zr = pack.unpack_twell_rows(q.counts, q.indices, q.values, rows, wg.shape[0], 256)
        u = cp.matmul(xr, wu.T)
        h = ffn_forward.gate_mul(zr, u, relu=True)
        yb = cp.matmul(h, wd)
        res = {"part": "backup steps", "threshold": th, "n_backup": n_backup,
               "gate_twell_async": queued(lambda: gate_gemm.gate_twell_async(x, wg, 256, 8, th)),
               "twell_up_down (compact rows)": queued(lambda: ffn_forward.twell_up_down(
                   x, q.counts, q.indices, q.values, q.row_route, wu, wd, 256, y, compact=pack.ROUTE_COMPACT,
                   work_counter=q.totals[2:3])),
               "route_rows": queued(lambda: pack.route_rows(q.row_route)),
               "x[rows]": queued(lambda: x[rows]),
               "unpack_twell_rows": queued(lambda: pack.unpack_twell_rows(q.counts, q.indices, q.values, rows,
                                                                        wg.shape[0], 256)),
               "x_r w_up^T": queued(lambda: cp.matmul(xr, wu.T)),
               "gate_mul": queued(lambda: ffn_forward.gate_mul(zr, u, relu=True)),
               "h w_down": queued(lambda: cp.matmul(h, wd)),
               "y[rows] = ...": queued(lambda: y.__setitem__(rows, yb)),
               "whole op": queued(lambda: twell.gated_ffn(x, wg, wu, wd, dense_row_threshold=th))}
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    parts = sys.argv[1:] or ["cluster", "threshold", "backup"]
    for part in parts:
        {"cluster": cluster_part, "threshold": threshold_part, "backup": backup_part}[part]()
