"""compute-sanitizer run of the fully fused forward kernel (perf-notes.md, v6) on small token-skew problems:
both dtypes, gated and not, clusters 1 and 2, d = 1024 and 2048; prints (backup rows, overflowed rows,
rows handed out, deferred rows) per launch.  Under racecheck the kernel runs so slowly that the gather
warps would defer every row after the default 20 ms wait; WAIT_US raises the limit so the gathers run.

Run on the GPU from the repository root:
  PYTHONPATH=. compute-sanitizer --tool memcheck python docs/perf/fused_forward_sanitize.py
  WAIT_US=600000000 PYTHONPATH=. compute-sanitizer --tool racecheck python docs/perf/fused_forward_sanitize.py
"""
import os

import cupy as cp

from twell import synthetic
from twell.kernels import gate_gemm

gate_gemm.FUSED_FORWARD_WAIT_US = int(os.environ.get("WAIT_US", "20000"))

for dtype in ("bfloat16", "float16"):
    for gated in (True, False):
        for cluster in (1, 2):
            for d in (1024, 2048):
                p = synthetic.make_problem(700, d, 1000, mean_active=20.0, kind="token_skew", dtype=dtype, seed=1,
                                           xp=cp)
                x, wg, wu, wd = p.arrays()
                y = cp.full(x.shape, cp.nan, x.dtype)
                q = gate_gemm.ffn_twell_fused_async(x, wg, wu, wd, y, 8, 40, gated=gated, neuron_counts=True,
                                                    cluster=cluster)
                cp.cuda.Device().synchronize()
                print(dtype, "gated" if gated else "non-gated", "cluster", cluster, "d", d,
                      cp.asnumpy(q.totals).tolist(), flush=True)
