"""Session-8 probe (perf-notes.md, v20): the fused decode kernels against the split decode path, per
batch size, to place the cut-over (``ffn_forward.DECODE_FUSED_MAX_ROWS`` bounds what the kernel takes,
``ops.DECODE_FUSED_ROWS`` what the ops send to it).  Eager timings with the L2 flushed before each call
(the bench's rule for M <= 4096), uniform problem, mean 29 active, d 2048, n 5632, bf16; outputs compared.

Run on the GPU from the repository root:  PYTHONPATH=. python docs/perf/decode_probe.py
"""

import json

import cupy as cp
from twell import bench, synthetic
from twell.kernels import ffn_forward, ops


def main():
    flusher = bench.L2Flusher(cp.cuda.Device().attributes["L2CacheSize"])
    for m in (1, 2, 3, 4, 6, 8):
        p = synthetic.make_problem(m, kind="uniform", xp=cp)
        x, wg, wu, wd = p.x, p.w_gate, p.w_up, p.w_down
        y = cp.empty_like(x)

        def fused():
            return ffn_forward.decode_fused(x, wg, wu, wd, y)

        def split():
            return ops._decode_forward(x, cp.matmul(x, wg.T), wu, wd, False, True, None)

        a, b = fused().astype(cp.float32), split().astype(cp.float32)
        res = {"M": m, "max rel diff fused vs split": float(cp.abs(a - b).max() / cp.abs(b).max())}
        for rnd in range(2):
            for name, fn in (("fused", fused), ("split", split)):
                t = bench.time_gpu(fn, budget_s=0.15, warmup=3, flush=flusher)
                res[f"{name} r{rnd}"] = round(t.to_dict()["median_ms"], 4)
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
