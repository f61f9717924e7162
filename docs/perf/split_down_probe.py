"""A/B of the inference up/down kernels on the synthetic problems, same process, CUDA events: the fused
warp kernel vs the split path -- ``twell_up_lists`` (pipeline depth 2 / 3) and ``down_token_blocks`` (every
block configuration, 2 / 3 windows in flight) timed separately; y compared bitwise with the fused kernel.

    PYTHONPATH=. python docs/perf/split_down_probe.py [M ...]
"""

from __future__ import annotations

import sys

import cupy as cp
import numpy as np

from twell import synthetic
from twell.kernels import ffn_forward, gate_gemm, pack


def time_ms(fn, reps=20):
    fn()
    cp.cuda.Device().synchronize()
    ev = [(cp.cuda.Event(), cp.cuda.Event()) for _ in range(reps)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    cp.cuda.Device().synchronize()
    return round(float(np.median([cp.cuda.get_elapsed_time(a, b) for a, b in ev])), 4)


def main():
    sizes = [int(a) for a in sys.argv[1:]] or [16384]
    C = pack.ROUTE_COMPACT
    for m in sizes:
        for kind in ("uniform", "token_skew"):
            prob = synthetic.make_problem(m=m, kind=kind, seed=0, xp=cp)
            x, wg, wu, wd = (cp.asarray(a) for a in (prob.x, prob.w_gate, prob.w_up, prob.w_down))
            p = gate_gemm.gate_twell_async(x, wg, 256, 8, 128)
            mask = (p.row_route == C)[:, None]
            y_ref = cp.empty_like(x)
            wc = cp.zeros(1, cp.int32)

            def fused():
                wc.fill(0)
                ffn_forward.twell_up_down(x, p.counts, p.indices, p.values, p.row_route, wu, wd, 256, y_ref,
                                          compact=C, work_counter=wc, split=False)

            fused()
            row = {"m": m, "kind": kind, "entries": int(cp.where(p.row_route == C, p.row_nnz, 0).sum()),
                   "fused": [time_ms(fused) for _ in range(2)]}
            for depth in (2, 3):
                ffn_forward.UP_DEPTH = depth

                def up():
                    wc.fill(0)
                    return ffn_forward.up_lists(x, p.counts, p.indices, p.values, p.row_route, C, wu, 256, True,
                                                128, wc)
                row[f"up depth {depth}"] = [time_ms(up) for _ in range(2)]
            ffn_forward.UP_DEPTH = 2
            lists, win_off, nw = up()
            for cfg in ffn_forward.DOWN_BLOCK_CONFIGS:
                for stages in (2, 3):
                    y = cp.empty_like(x)
                    try:
                        def down():
                            ffn_forward.down_token_blocks(lists, win_off, nw, p.row_route, C, wd, y, cfg, stages)
                        down()
                    except Exception as e:  # noqa: BLE001  (shared memory over the limit)
                        row[f"down {cfg} st{stages}"] = repr(e)[:60]
                        continue
                    same = bool(cp.all(cp.where(mask, y.view(cp.uint16) == y_ref.view(cp.uint16), True)))
                    row[f"down {cfg} st{stages}"] = [time_ms(down) for _ in range(2)] + ([] if same else ["DIFF"])
            print(row, flush=True)


if __name__ == "__main__":
    main()
