"""A/B of the dense-backup rows on a side stream next to the up/down kernel (perf-notes.md, session 7):
``twell.gated_ffn`` under token skew with ``kernels.ops.BACKUP_OVERLAP_SMS`` = 0 (serial), 8, 16, 24, 32,
three interleaved rounds, eager and queued medians, and the bitwise equality of y across settings.

Run on the GPU from the repository root:  PYTHONPATH=. python docs/perf/backup_overlap_probe.py [M ...]
"""

import sys

import cupy as cp
import numpy as np

import twell
from twell import bench, synthetic
from twell.kernels import ops as kops

SETTINGS = (0, 8, 16, 24, 32)


def main():
    for m in [int(a) for a in sys.argv[1:]] or [16384]:
        p = synthetic.make_problem(m, kind="token_skew", xp=cp)
        args = (p.x, p.w_gate, p.w_up, p.w_down)
        y0, stats = twell.gated_ffn(*args, return_stats=True)
        print(f"M = {m} token_skew: backup rows {stats.n_backup_rows}, overflowed {stats.n_overflow_rows}",
              flush=True)
        ref = y0.view(cp.uint16).copy()
        res = {s: ([], []) for s in SETTINGS}
        for rnd in range(3):
            for s in SETTINGS:
                kops.BACKUP_OVERLAP_SMS = s
                fn = lambda: twell.gated_ffn(*args)   # noqa: E731
                assert bool((fn().view(cp.uint16) == ref).all()), f"y differs with BACKUP_OVERLAP_SMS={s}"
                e = bench.time_gpu(fn, budget_s=0.6, warmup=3, sync_each=True).to_dict()["median_ms"]
                q = bench.time_gpu(fn, budget_s=0.6, warmup=3, sync_each=False).to_dict()["median_ms"]
                res[s][0].append(e)
                res[s][1].append(q)
        kops.BACKUP_OVERLAP_SMS = 16
        for s in SETTINGS:
            e, q = res[s]
            print(f"  reserved SMs {s:3d}: eager {' '.join(f'{v:.4f}' for v in e)} (median {np.median(e):.4f})"
                  f"  queued {' '.join(f'{v:.4f}' for v in q)} (median {np.median(q):.4f})", flush=True)


if __name__ == "__main__":
    main()
