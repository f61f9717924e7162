// ffn_common.cuh -- building blocks shared by the forward and backward FFN kernel families.
#pragma once
#include "common.cuh"

#define FFN_THREADS 128
#define FFN_WARPS (FFN_THREADS / 32)
// Largest active list of a compact row.  The launcher routes rows with more entries to the dense
// backup, so this is never exceeded (see twell/kernels/ffn_forward.py: MAX_LIST).
#define MAX_LIST 512
#define SLAB_CHUNKS 2   // 16-byte chunks of y per thread per slab

template <typename T, bool VEC> struct Vec {
    static constexpr int N = VEC ? (int)(16 / sizeof(T)) : 1;   // elements per chunk
};

// Block-wide exclusive scan of one int per thread (FFN_THREADS threads); `total` gets the block total.
__device__ __forceinline__ int block_exclusive_scan(int v, int* warp_totals, int& total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int incl = warp_inclusive_scan(v);
    if (lane == 31) warp_totals[warp] = incl;
    __syncthreads();
    int offset = 0;
    total = 0;
#pragma unroll
    for (int w = 0; w < FFN_WARPS; ++w) {
        const int t = warp_totals[w];
        if (w < warp) offset += t;
        total += t;
    }
    __syncthreads();
    return offset + incl - v;
}

// Stage a row of d elements in shared memory (FFN_THREADS threads).
template <typename T, bool VEC>
__device__ __forceinline__ void stage_row(const T* __restrict__ xr, int d, T* xs) {
    constexpr int CW = Vec<T, VEC>::N;
    const int d_chunks = d / CW;
    for (int c = threadIdx.x; c < d_chunks; c += FFN_THREADS) {
        Chunk<T, CW, VEC> ch; ch.load(xr + c * CW);
#pragma unroll
        for (int k = 0; k < CW; ++k) xs[c * CW + k] = ch.v[k];
    }
}

// 16-bit element <-> fp32 conversion of 16-byte chunks (8 elements).
__device__ __forceinline__ void unpack8(uint4 v, float f[8], const __nv_bfloat16*) {
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) { f[2 * i] = __uint_as_float(w[i] << 16); f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u); }
}
__device__ __forceinline__ void unpack8(uint4 v, float f[8], const __half*) {
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 p = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
        f[2 * i] = p.x; f[2 * i + 1] = p.y;
    }
}
template <typename T> __device__ __forceinline__ uint4 pack8(const float f[8]) {
    T o[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) o[i] = from_f<T>(f[i]);
    return *reinterpret_cast<uint4*>(o);
}


// ---------------------------------------------------------------- warp-per-row kernels (16-bit T, d = 256*NC)
// A warp owns a row: lane l holds 16-byte chunks l, l+32, ... of the row (NC of them) in registers.
// Rows are taken dynamically from a work counter; streamed rows (x, dy, y, dx) use cache-streaming
// accesses so the gathered weight rows keep L2.
#define WARP_KERNEL_WARPS 4

template <int NC> __device__ __forceinline__ void zero_acc(float (&acc)[NC][8]) {
#pragma unroll
    for (int k = 0; k < NC; ++k)
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[k][i] = 0.f;
}

template <typename T, int NC>
__device__ __forceinline__ void load_row_stream(const T* __restrict__ r, uint4 (&v)[NC]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int k = 0; k < NC; ++k) v[k] = __ldcs(reinterpret_cast<const uint4*>(r) + k * 32 + lane);
}

template <typename T, int NC>
__device__ __forceinline__ void store_row_stream(T* __restrict__ r, const float (&acc)[NC][8]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int k = 0; k < NC; ++k) __stcs(reinterpret_cast<uint4*>(r) + k * 32 + lane, pack8<T>(acc[k]));
}

// Next row for this warp from the work counter (dynamic scheduling; results do not depend on it).
__device__ __forceinline__ int next_row(int* work_counter) {
    int row = 0;
    if ((threadIdx.x & 31) == 0) row = atomicAdd(work_counter, 1);
    return __shfl_sync(0xffffffffu, row, 0);
}

