"""The fused decode kernels' phases (M = 1, 2, 4; bf16 d 2048 n 5632 mean 29) beside what bounds them: the op, the
first kernel alone (with entries and with x = 0: no entries, the gate GEMV only), the reduction alone, cuBLAS's
gate GEMV, the dense baseline, a kernel that only streams w_gate (plain 16-byte loads; cp.async into shared
memory) and an empty kernel (the timing floor).  Eager and CUDA-graph replays, each after the bench's L2 flush
(a write: the L2 is left full of dirty lines) and after a read-only flush (clean lines).

    PYTHONPATH=. python docs/perf/decode_phases_probe.py
"""
import json

import cupy as cp
import numpy as np

from twell.bench.dense_cupy import make_dense_cupy
from twell.bench.timing import L2Flusher, capture_cupy_graph, time_gpu
from twell.kernels import ffn_forward as F
from twell.kernels.common import sm_count
from twell.runtime import blas
from twell.runtime.loader import get_kernel
from twell.runtime.launch import i32
from twell.synthetic import make_problem

L2 = cp.cuda.Device().attributes["L2CacheSize"]
wflush = L2Flusher(L2)
rbuf = cp.ones(4 * L2 // 4, dtype=np.int32)
rout = cp.empty(1, dtype=np.int32)
SRC = r'''
extern "C" __global__ void read_flush(const int4* __restrict__ a, long long n, int* out) {
    int4 acc = make_int4(0, 0, 0, 0);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        int4 v = a[i]; acc.x ^= v.x; acc.y ^= v.y; acc.z ^= v.z; acc.w ^= v.w;
    }
    if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x7f7f7f7f) out[0] = 1;
}
// stream n_rows rows of 4 KiB with plain 16-byte loads, 43 rows per CTA, all in flight per warp (no smem)
extern "C" __global__ void __launch_bounds__(512, 1) stream_ldg(const uint4* __restrict__ w, int rows_per_cta, int n_rows, int* out) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned acc = 0;
    for (int r = warp; r < rows_per_cta; r += 16) {
        const int row = blockIdx.x * rows_per_cta + r;
        if (row >= n_rows) break;
        uint4 v[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = __ldg(w + (long long)row * 256 + k * 32 + lane);
#pragma unroll
        for (int k = 0; k < 8; ++k) acc ^= v[k].x ^ v[k].y ^ v[k].z ^ v[k].w;
    }
    if (acc == 0x7f7f7f7fu) out[0] = 1;
}
__device__ __forceinline__ unsigned saddr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
extern "C" __global__ void __launch_bounds__(512, 1) stream_cpasync(const uint4* __restrict__ w, int rows_per_cta, int n_rows, int* out) {
    extern __shared__ uint4 ring[];
    const int r0 = blockIdx.x * rows_per_cta;
    const int rows = min(rows_per_cta, n_rows - r0);
    for (int q = threadIdx.x; q < rows * 256; q += 512)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(saddr(ring + q)), "l"(w + (long long)r0 * 256 + q) : "memory");
    asm volatile("cp.async.commit_group;" ::: "memory");
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    __syncthreads();
    if (ring[threadIdx.x].x == 0x7f7f7f7fu) out[0] = 1;
}
extern "C" __global__ void empty_kernel(int* out) { if (threadIdx.x == 1000) out[0] = 1; }
'''
mod = cp.RawModule(code=SRC, options=("-std=c++17",))
k_rf, k_ldg, k_cpa, k_empty = (mod.get_function(n) for n in ("read_flush", "stream_ldg", "stream_cpasync", "empty_kernel"))
k_cpa.max_dynamic_shared_size_bytes = 43 * 4096
nvec = rbuf.size // 4


def rflush():
    k_rf((1056,), (512,), (rbuf, np.int64(nvec), rout))


stream = cp.cuda.Stream(non_blocking=True)


def t(run, flush):
    e = time_gpu(run, budget_s=0.12, warmup=3, flush=flush).to_dict()["median_ms"]
    g = capture_cupy_graph(run, stream)
    with stream:
        r = time_gpu(g.launch, budget_s=0.12, warmup=3, flush=flush, sync_each=False).to_dict()["median_ms"]
    g.release()
    return round(e * 1e3, 1), round(r * 1e3, 1)


for m in (1, 2, 4):
    p = make_problem(m, mean_active=29.0, kind="uniform", dtype="bfloat16", seed=0, xp=cp)
    x, wg, wu, wd = p.arrays()
    y = cp.empty_like(x)
    x0 = cp.zeros_like(x)
    d, n = x.shape[1], wg.shape[0]
    npw, ctas = F.decode_grid(n, sm_count())
    partial = cp.empty((ctas, m, d), dtype=cp.float32)
    flags = cp.empty(ctas, dtype=cp.int32)
    k = get_kernel(F.FAMILY, f"decode_fused<__nv_bfloat16, {d // 256}, true>")
    r = get_kernel(F.FAMILY, "decode_reduce<__nv_bfloat16>")
    z = cp.empty((m, n), dtype=x.dtype)
    out = cp.zeros(1, dtype=np.int32)

    def k1(xx=x):
        k((ctas,), (32 * F._DF_WARPS,), (xx, wg, wu, wd, i32(m), i32(n), i32(npw), partial, flags))

    dense = make_dense_cupy(p)
    for fname, fl in (("wflush", wflush), ("rflush", rflush)):
        res = {"M": m, "flush": fname, "ctas": ctas, "neurons_per_warp": npw, "regs": int(k.num_regs),
               "op": t(lambda: F.decode_fused(x, wg, wu, wd, y), fl),
               "op x=0": t(lambda: F.decode_fused(x0, wg, wu, wd, y), fl),
               "kernel1": t(k1, fl),
               "kernel1 x=0": t(lambda: k1(x0), fl),
               "reduce": t(lambda: r((d // 256, m), (32 * F._DF_WARPS,), (partial, flags, i32(ctas), i32(m), i32(d), y)),
                           fl),
               "cublas gate": t(lambda: blas.gemm(x, wg, z, trans_b=True), fl),
               "dense cuBLAS": t(dense, fl),
               "stream ldg": t(lambda: k_ldg((131,), (512,), (wg, np.int32(43), np.int32(n), out)), fl),
               "stream cp.async": t(lambda: k_cpa((131,), (512,), (wg, np.int32(43), np.int32(n), out), shared_mem=43 * 4096), fl),
               "empty kernel": t(lambda: k_empty((1,), (32,), (out,)), fl)}
        print(json.dumps(res), flush=True)
