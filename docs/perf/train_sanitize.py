"""compute-sanitizer run of the training kernels (perf-notes.md, v8) on small token-skew problems: bf16,
fp16 and fp32, d = 256 (warp-per-row dx path) and 200 (CTA path), the fused and the cuBLAS gate, compact
entries presized and sized first; n = 160 and a low threshold so that backup rows, split neurons (> 128
entries) and the partial reduction all run.  Prints the backup rows and the checksum of each gradient per case.

Run on the GPU from the repository root:
  PYTHONPATH=. compute-sanitizer --tool memcheck python docs/perf/train_sanitize.py
  PYTHONPATH=. compute-sanitizer --tool racecheck python docs/perf/train_sanitize.py
"""
import cupy as cp

import twell
from twell import bench, synthetic
from twell.kernels import train

for dtype in ("bfloat16", "float16", "float32"):
    for d in (256, 200):
        for gate in ("fused", "cublas"):
            for presize in (64 << 20, 0):
                if gate == "fused" and (dtype == "float32" or d % 8):
                    continue
                train.PRESIZE_MAX_BYTES = presize
                p = synthetic.make_problem(700, d, 160, mean_active=30.0, kind="token_skew", dtype=dtype, seed=1,
                                           xp=cp)
                dy = bench.make_dy(p, 0)
                y, saved, stats = twell.gated_ffn_forward(p.x, p.w_gate, p.w_up, p.w_down, l1_weight=1e-3,
                                                          dense_row_threshold=35, gate_kernel=gate)
                grads = twell.gated_ffn_backward(saved, dy)
                cp.cuda.Device().synchronize()
                sums = " ".join(f"{float(g.astype(cp.float32).sum()):.4g}" for g in (y, *grads))
                print(dtype, "d", d, gate, "presized" if presize else "sized first", "backup rows",
                      stats.n_backup_rows, "max neuron count", int(stats.neuron_counts.max()), "sums", sums,
                      flush=True)
