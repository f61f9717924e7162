"""The gate and up projections as one strided-batched cuBLAS call (``twell.runtime.blas.gemm_pair``, what
the dense path and the small-batch path run) against two ``cublasGemmEx`` calls, for M = 512 … 16,384
(bf16, d 2048, n 5632): host time of the call, eager time (call + synchronisation) and queued device time,
and whether the outputs are bitwise equal.

    PYTHONPATH=. python docs/perf/gemm_pair_probe.py [--json out.json]
"""

import argparse
import json
import statistics
import time

import cupy as cp
import numpy as np

from twell import _backend as B
from twell.bench.timing import time_gpu
from twell.runtime import blas


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    bf16 = B.bfloat16_dtype()

    def arr(shape):
        return cp.asarray((rng.standard_normal(shape, dtype=np.float32) * 0.05).astype(bf16))

    wg, wu = arr((5632, 2048)), arr((5632, 2048))
    results = {}
    for m in (512, 1024, 2048, 4096, 8192, 16384):
        x = arr((m, 2048))
        variants = {"pair": lambda: blas.gemm_pair(x, wg, wu),
                    "two": lambda: (blas.gemm(x, wg, trans_b=True), blas.gemm(x, wu, trans_b=True))}
        row, outs = {}, {}
        for name, fn in variants.items():
            for _ in range(10):
                fn()
            cp.cuda.Device().synchronize()
            host, eager = [], []
            for _ in range(args.calls):
                cp.cuda.Device().synchronize()
                t0 = time.perf_counter()
                out = fn()
                t1 = time.perf_counter()
                cp.cuda.Device().synchronize()
                host.append(t1 - t0)
                eager.append(time.perf_counter() - t0)
            queued = time_gpu(fn, budget_s=0.1, warmup=2, sync_each=False).to_dict()["median_ms"]
            row[name] = {"host_ms": 1e3 * statistics.median(host), "eager_ms": 1e3 * statistics.median(eager),
                         "queued_ms": queued}
            outs[name] = [cp.asnumpy(a).view(np.int16) for a in out]
        row["bitwise_equal"] = all(bool((a == b).all()) for a, b in zip(outs["pair"], outs["two"]))
        results[m] = row
        print(json.dumps({"m": m, **row}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
