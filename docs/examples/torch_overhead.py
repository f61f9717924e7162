"""Per-call overhead of twell.torch over the CuPy call, on one decode token (M = 1, d = 2048, n = 5632, bf16).

The same data is called four ways, inference (no autograd), on the default stream:

* ``twell.gated_ffn`` on CuPy arrays (the baseline; it allocates its output with CuPy),
* ``twell.torch.gated_ffn`` on torch tensors (PyTorch allocates the output; eager calls skip the
  dispatcher),
* ``torch.ops.twell.gated_ffn`` (the registered custom op through PyTorch's dispatcher: what a call costs
  under modes and what ``torch.compile`` pays outside its graph; for reference),
* a ``twell.torch.SparseGatedFFN(collect_stats=False)`` layer holding the same weights (its density tracker
  consulted on every call; for reference).

Host time: the wall time of each call on the host, calls issued in short bursts with a synchronisation
between bursts (the launch queue never fills, so a call never waits for the GPU), median over all calls.
GPU time: CUDA events around a long run of back-to-back calls, divided by the calls.  The overhead is the
difference of the host medians.

Run on a GPU:   python docs/examples/torch_overhead.py [--m 1] [--calls 20000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time


def host_median_us(fn, sync, calls: int, burst: int) -> float:
    times = []
    while len(times) < calls:
        sync()
        for _ in range(burst):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def gpu_us(fn, torch, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return 1e3 * start.elapsed_time(end) / iters


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--n", type=int, default=5632)
    parser.add_argument("--mean-active", type=float, default=29.0)
    parser.add_argument("--calls", type=int, default=20000, help="timed calls per variant (host medians)")
    parser.add_argument("--burst", type=int, default=16, help="calls between synchronisations (host timing)")
    parser.add_argument("--gpu-iters", type=int, default=2000, help="back-to-back calls per CUDA-event timing")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)

    import cupy as cp
    import numpy as np
    import torch

    import twell
    import twell.torch as tt
    from twell.synthetic import make_problem
    from twell.torch.interop import to_torch

    p = make_problem(args.m, d=args.d, n=args.n, mean_active=args.mean_active, dtype="bfloat16", seed=0, xp=np)
    host = [np.ascontiguousarray(a) for a in (p.x, p.w_gate, p.w_up, p.w_down)]
    cupy_args = [cp.asarray(a) for a in host]
    torch_args = [torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).cuda() for a in host]
    torch.cuda.synchronize()
    cp.cuda.Device().synchronize()

    variants = {
        "cupy: twell.gated_ffn": lambda: twell.gated_ffn(*cupy_args),
        "torch: twell.torch.gated_ffn": lambda: tt.gated_ffn(*torch_args),
        "torch: torch.ops.twell.gated_ffn (dispatcher)": lambda: torch.ops.twell.gated_ffn(
            *torch_args, 256, 8, 128, "auto", "auto", -1, -1),
    }
    # the layer as a model decodes with it: its density tracker consulted on every call, no statistics
    layer = tt.SparseGatedFFN(args.d, args.n, collect_stats=False, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        for p_, w in zip((layer.w_gate, layer.w_up, layer.w_down), torch_args[1:]):
            p_.copy_(w)
    variants["torch: SparseGatedFFN(collect_stats=False)"] = lambda: layer(torch_args[0])

    def sync():
        torch.cuda.synchronize()

    results = {}
    with torch.no_grad():
        ys = [fn() for fn in list(variants.values())[:3]]      # the layer's first call counts entries: not compared
        torch.cuda.synchronize()
        y0 = to_torch(ys[0], torch.cuda.current_device())              # the CuPy result, zero-copy
        same = all(torch.equal(y0.view(torch.int16), y.view(torch.int16)) for y in ys[1:])
        for name, fn in variants.items():
            for _ in range(200):                                  # warm-up: kernels, plans, caches
                fn()
            results[name] = {"host_us": host_median_us(fn, sync, args.calls, args.burst),
                             "gpu_us": gpu_us(fn, torch, args.gpu_iters)}

    base = results["cupy: twell.gated_ffn"]["host_us"]
    print(f"gated_ffn inference, M = {args.m}, d = {args.d}, n = {args.n}, bf16, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}, cupy {cp.__version__}, twell {twell.__version__}")
    print(f"outputs bitwise equal: {same}")
    print(f"{'variant':48s} {'host us/call':>13s} {'over cupy':>10s} {'GPU us/call':>12s}")
    for name, r in results.items():
        print(f"{name:48s} {r['host_us']:13.2f} {r['host_us'] - base:+10.2f} {r['gpu_us']:12.2f}")
    overhead = results["torch: twell.torch.gated_ffn"]["host_us"] - base
    print(f"twell.torch overhead over the CuPy call: {overhead:+.2f} us per call (host median)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"m": args.m, "d": args.d, "n": args.n, "dtype": "bfloat16", "calls": args.calls,
                       "burst": args.burst, "gpu_iters": args.gpu_iters, "device": torch.cuda.get_device_name(),
                       "torch": torch.__version__, "cupy": cp.__version__, "twell": twell.__version__,
                       "python": platform.python_version(), "bitwise_equal": same, "results": results,
                       "overhead_us": overhead}, f, indent=2)


if __name__ == "__main__":
    main()
