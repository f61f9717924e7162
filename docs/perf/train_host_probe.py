"""Host time of a training step's FFN (forward + backward) at M = 16,384, bf16, d 2048, n 5632.

First the host time of one CuPy allocation inside the PyTorch adapter, from PyTorch's and from CuPy's
allocator.  Then per case the medians of the host time of the forward and of the backward call
(``perf_counter`` around each, the GPU idle before the step) and of the step's GPU time (CUDA events):
the CuPy calls with a density tracker that has observed the layer (the forward sizes its state on the
device) and without one (the forward waits for its read-back); ``twell.torch.SparseGatedFFN``; the
adapter's implementation functions called directly (no custom op, no autograd), with PyTorch's and with
CuPy's allocator; a dense PyTorch FFN.  Last, cProfile tables (own and cumulative time) of the direct calls.

    PYTHONPATH=. python docs/perf/train_host_probe.py [--m 16384] [--mean 35] [--steps 40]
"""

import argparse
import cProfile
import io
import pstats
import statistics
import time

import cupy as cp
import torch

import twell
from twell.synthetic import make_problem
from twell.torch import SparseGatedFFN


def timed(forward, backward, steps):
    """Medians (forward host ms, backward host ms, step GPU ms)."""
    fw, bw, gpu = [], [], []
    for i in range(steps + 5):
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        t0 = time.perf_counter()
        state = forward()
        t1 = time.perf_counter()
        backward(state)
        t2 = time.perf_counter()
        e1.record()
        torch.cuda.synchronize()
        if i >= 5:
            fw.append((t1 - t0) * 1e3)
            bw.append((t2 - t1) * 1e3)
            gpu.append(e0.elapsed_time(e1))
    return statistics.median(fw), statistics.median(bw), statistics.median(gpu)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=16384)
    ap.add_argument("--mean", type=float, default=35.0)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    p = make_problem(args.m, mean_active=args.mean, kind="neuron_skew", dtype="bfloat16", seed=0, xp=cp)
    x, wg, wu, wd = p.arrays()
    dy = cp.asarray(cp.random.default_rng(1).standard_normal(x.shape, dtype=cp.float32)).astype(x.dtype)
    tx, twg, twu, twd, tdy = (torch.from_dlpack(a) for a in (x, wg, wu, wd, dy))
    lam = 1e-3

    tracker = twell.DensityTracker()
    twell.gated_ffn_forward(x, wg, wu, wd, l1_weight=lam, tracker=tracker)      # observed: sized on the device
    cases = {
        "cupy, tracker (sized on the device)": (
            lambda: twell.gated_ffn_forward(x, wg, wu, wd, l1_weight=lam, tracker=tracker)[1],
            lambda saved: twell.gated_ffn_backward(saved, dy)),
        "cupy, no tracker (read back)": (
            lambda: twell.gated_ffn_forward(x, wg, wu, wd, l1_weight=lam)[1],
            lambda saved: twell.gated_ffn_backward(saved, dy)),
    }
    mod = SparseGatedFFN(x.shape[1], wg.shape[0], l1_weight=lam, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        mod.w_gate.copy_(twg)
        mod.w_up.copy_(twu)
        mod.w_down.copy_(twd)
    xr = tx.detach().clone().requires_grad_(True)
    cases["twell.torch SparseGatedFFN"] = (lambda: mod(xr), lambda y: y.backward(tdy))
    from twell.torch import impl
    tr2 = twell.DensityTracker()
    ws = (mod.w_gate.detach(), mod.w_up.detach(), mod.w_down.detach())

    def impl_fwd():                             # the adapter's implementation without the custom op / autograd
        return impl.train_fwd_impl(xr.detach(), *ws, lam, 128, "auto", "auto", tr2, None, True, True)[2]

    cases["twell.torch impl functions (no autograd)"] = (
        impl_fwd, lambda h: impl.train_bwd_impl(tdy, None, h, xr.detach(), True))
    tr3 = twell.DensityTracker()
    cases["... with CuPy's memory pool"] = (
        lambda: impl.train_fwd_impl(xr.detach(), *ws, lam, 128, "auto", "auto", tr3, None, True, False)[2],
        lambda h: impl.train_bwd_impl(tdy, None, h, xr.detach(), False))
    dg, du, dd = (w.detach().clone().requires_grad_(True) for w in (twg, twu, twd))

    def dense():
        return (torch.relu(xr @ dg.T) * (xr @ du.T)) @ dd

    cases["dense PyTorch"] = (dense, lambda y: y.backward(tdy))
    from twell.torch.interop import cuda_interop
    for torch_memory in (False, True):
        with cuda_interop().on_device(torch.cuda.current_device(), torch_memory=torch_memory):
            t0 = time.perf_counter()
            for _ in range(1000):
                cp.empty(4096, dtype=cp.int32)
            print(f"cp.empty inside twell.torch, torch_memory={torch_memory}: "
                  f"{(time.perf_counter() - t0) * 1e3:.3f} us per allocation", flush=True)
    for name, (f, b) in cases.items():
        fh, bh, g = timed(f, b, args.steps)
        print(f"{name:40s} host forward {fh:6.3f} ms  backward {bh:6.3f} ms  step GPU {g:6.3f} ms", flush=True)

    pr = cProfile.Profile()
    f, b = cases["twell.torch impl functions (no autograd)"]
    torch.cuda.synchronize()
    pr.enable()
    for _ in range(20):
        b(f())
        torch.cuda.synchronize()
    pr.disable()
    for key, rows in (("tottime", 40), ("cumulative", 45)):
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats(key).print_stats(rows)
        print("\n".join(s.getvalue().splitlines()[:rows + 12]))


if __name__ == "__main__":
    main()
