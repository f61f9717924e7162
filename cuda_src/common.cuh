// common.cuh -- dtype traits, warp helpers and layout constants shared by every kernel family.
// Inlined into each family's source by twell/runtime/loader.py (CuPy's cache key hashes the source text only).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

typedef unsigned char u8;

// ---------------------------------------------------------------- dtype traits
template <typename T> struct Num;
template <> struct Num<float> {
    static __device__ __forceinline__ float to_float(float v) { return v; }
    static __device__ __forceinline__ float from_float(float v) { return v; }
};
template <> struct Num<double> {
    static __device__ __forceinline__ float to_float(double v) { return (float)v; }
    static __device__ __forceinline__ double from_float(float v) { return (double)v; }
};
template <> struct Num<__half> {
    static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
    static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};
template <> struct Num<__nv_bfloat16> {
    static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
    static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

template <typename T> __device__ __forceinline__ float to_f(T v) { return Num<T>::to_float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v) { return Num<T>::from_float(v); }

// "Is this an entry of the sparse matrix?"  RELU: keep where NOT (v <= 0), so NaN is kept and
// propagates exactly like the dense relu(NaN) = NaN.  Otherwise: keep non-zeros (NaN included).
template <bool RELU, typename T> __device__ __forceinline__ bool is_entry(T v) {
    float f = to_f<T>(v);
    return RELU ? !(f <= 0.0f) : (f != 0.0f);
}

// ---------------------------------------------------------------- vector loads
// Load N consecutive elements starting at p (p aligned to N * sizeof(T) bytes when VEC).
template <typename T, int N, bool VEC> struct Chunk {
    T v[N];
    __device__ __forceinline__ void load(const T* __restrict__ p) {
        if (VEC && (N * sizeof(T)) % 16 == 0) {
#pragma unroll
            for (int i = 0; i < (int)(N * sizeof(T) / 16); ++i)
                reinterpret_cast<uint4*>(v)[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
        } else if (VEC && (N * sizeof(T)) == 8) {
            *reinterpret_cast<uint2*>(v) = __ldg(reinterpret_cast<const uint2*>(p));
        } else if (VEC && (N * sizeof(T)) == 4) {
            *reinterpret_cast<unsigned*>(v) = __ldg(reinterpret_cast<const unsigned*>(p));
        } else {
#pragma unroll
            for (int i = 0; i < N; ++i) v[i] = p[i];
        }
    }
    // Bounds-checked scalar load of the first `valid` elements; the rest are zero.
    __device__ __forceinline__ void load_partial(const T* __restrict__ p, int valid) {
#pragma unroll
        for (int i = 0; i < N; ++i) v[i] = (i < valid) ? p[i] : from_f<T>(0.0f);
    }
};

// ---------------------------------------------------------------- warp helpers
__device__ __forceinline__ int warp_inclusive_scan(int x) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// Block-wide exclusive scan of one int per thread (THREADS threads, a multiple of 32, at most 1024);
// `total` gets the block total.  warp_sums: THREADS / 32 ints of shared memory.  Contains
// __syncthreads: every thread of the block must call it.
template <int THREADS>
__device__ __forceinline__ int block_exclusive_scan_n(int v, int* warp_sums, int& total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int incl = warp_inclusive_scan(v);
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        const int s = lane < THREADS / 32 ? warp_sums[lane] : 0;
        const int si = warp_inclusive_scan(s);
        if (lane < THREADS / 32) warp_sums[lane] = si;   // inclusive prefix of the warp totals
    }
    __syncthreads();
    const int before = warp ? warp_sums[warp - 1] : 0;
    total = warp_sums[THREADS / 32 - 1];
    __syncthreads();                                      // warp_sums is rewritten by the next call
    return before + incl - v;
}

// Block-wide sum (THREADS threads); the result in every thread.  Contains __syncthreads.
template <int THREADS, typename V>
__device__ __forceinline__ V block_sum_n(V v, V* warp_sums) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    V t = 0;
#pragma unroll
    for (int w = 0; w < THREADS / 32; ++w) t += warp_sums[w];
    __syncthreads();
    return t;
}

// ---------------------------------------------------------------- shared-memory copies (sm_80+)
__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

// 16-byte global -> shared copy; src_bytes < 16 zero-fills the rest (0: all zeros, src not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(smem_addr(dst)), "l"(src), "r"(src_bytes) : "memory");
}
