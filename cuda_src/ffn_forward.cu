// ffn_forward.cu -- fused gated up/down projection from TwELL (inference), non-gated down projection,
// and the split-row reduction used by the decode regime.
//
// One CTA (4 warps) per work item = (row, split).  The CTA
//   1. stages the token's x row in shared memory and builds the row's active list (column, g) from the
//      TwELL tiles with a block prefix sum (ascending column order: deterministic);
//   2. phase 1 (GATED): warp w computes u_j = x . w_up[j] for list entries w, w+4, ... (16-byte loads,
//      fp32 accumulation, xor-shuffle reduction) and stores h_j = g_j * u_j in shared memory;
//   3. phase 2: every thread owns 16-byte column chunks of y and accumulates h_j * w_down[j, chunk]
//      over the list in list order (a fully coalesced 4 KiB row read per neuron per CTA).
// No atomics; the summation order is fixed, so results are bitwise reproducible.  Rows routed to the
// dense backup (backup_slot >= 0) are skipped: the host computes them exactly with cuBLAS.
// splits > 1 (decode: few rows, many CTAs per row): each split takes a contiguous part of the list and
// writes an fp32 partial row; reduce_split_rows sums the partials in split order.
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

// Block-wide exclusive scan of one int per thread (FFN_THREADS threads); returns the block total.
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

template <typename T, bool VEC, bool GATED>
__global__ void __launch_bounds__(FFN_THREADS) twell_up_down(
    const T* __restrict__ x, const int* __restrict__ counts, const u8* __restrict__ indices,
    const T* __restrict__ values, const int* __restrict__ backup_slot,
    const T* __restrict__ w_up, const T* __restrict__ w_down,
    int M, int d, int n_tiles, int slots, int tile_width, int splits,
    T* __restrict__ y, float* __restrict__ partial)
{
    constexpr int CW = Vec<T, VEC>::N;
    typedef Chunk<T, CW, VEC> C;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* xs = reinterpret_cast<T*>(smem_raw);                       // d elements (GATED only)
    __shared__ int list_col[MAX_LIST];
    __shared__ float list_val[MAX_LIST];
    __shared__ int warp_totals[FFN_WARPS];

    const int row = blockIdx.x / splits;
    const int split = blockIdx.x - row * splits;
    if (row >= M || backup_slot[row] >= 0) return;               // uniform per CTA
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int d_chunks = d / CW;

    // ---- 1. active list of the row (ascending column) and the x row
    int list_len = 0;
    for (int t0 = 0; t0 < n_tiles; t0 += FFN_THREADS) {
        const int t = t0 + tid;
        const int c = (t < n_tiles) ? min(counts[(long long)row * n_tiles + t], slots) : 0;
        int chunk_total;
        const int pos = list_len + block_exclusive_scan(c, warp_totals, chunk_total);
        const long long base = ((long long)row * n_tiles + t) * slots;
        for (int s = 0; s < c; ++s) {
            if (pos + s < MAX_LIST) {
                list_col[pos + s] = t * tile_width + indices[base + s];
                list_val[pos + s] = to_f<T>(values[base + s]);
            }
        }
        list_len += chunk_total;
    }
    list_len = min(list_len, MAX_LIST);
    const T* xr = x + (long long)row * d;
    if (GATED) {
        for (int c = tid; c < d_chunks; c += FFN_THREADS) {
            C ch; ch.load(xr + c * CW);
#pragma unroll
            for (int k = 0; k < CW; ++k) xs[c * CW + k] = ch.v[k];
        }
    }
    __syncthreads();

    // This work item's part of the list.
    const int per = (list_len + splits - 1) / splits;
    const int lo = min(split * per, list_len), hi = min(lo + per, list_len);

    // ---- 2. h_j = g_j * (x . w_up[j])
    if (GATED) {
        for (int e = lo + warp; e < hi; e += FFN_WARPS) {
            const T* wr = w_up + (long long)list_col[e] * d;
            float acc = 0.f;
#pragma unroll 4
            for (int c = lane; c < d_chunks; c += 32) {
                C w; w.load(wr + c * CW);
                const T* xc = xs + c * CW;
#pragma unroll
                for (int k = 0; k < CW; ++k) acc = fmaf(to_f<T>(w.v[k]), to_f<T>(xc[k]), acc);
            }
            acc = warp_sum(acc);
            if (lane == 0) list_val[e] *= acc;
        }
        __syncthreads();
    }

    // ---- 3. y[row] (+)= sum_j h_j * w_down[j]
    for (int slab = 0; slab < d_chunks; slab += FFN_THREADS * SLAB_CHUNKS) {
        float acc[SLAB_CHUNKS][CW];
#pragma unroll
        for (int q = 0; q < SLAB_CHUNKS; ++q)
#pragma unroll
            for (int k = 0; k < CW; ++k) acc[q][k] = 0.f;
        int e = lo;
        for (; e + 4 <= hi; e += 4) {
            C w[4][SLAB_CHUNKS];
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const T* wr = w_down + (long long)list_col[e + r] * d;
#pragma unroll
                for (int q = 0; q < SLAB_CHUNKS; ++q) {
                    const int c = slab + q * FFN_THREADS + tid;
                    if (c < d_chunks) w[r][q].load(wr + c * CW);
                }
            }
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const float h = list_val[e + r];
#pragma unroll
                for (int q = 0; q < SLAB_CHUNKS; ++q)
                    if (slab + q * FFN_THREADS + tid < d_chunks)
#pragma unroll
                        for (int k = 0; k < CW; ++k) acc[q][k] = fmaf(h, to_f<T>(w[r][q].v[k]), acc[q][k]);
            }
        }
        for (; e < hi; ++e) {
            const T* wr = w_down + (long long)list_col[e] * d;
            const float h = list_val[e];
#pragma unroll
            for (int q = 0; q < SLAB_CHUNKS; ++q) {
                const int c = slab + q * FFN_THREADS + tid;
                if (c < d_chunks) {
                    C w; w.load(wr + c * CW);
#pragma unroll
                    for (int k = 0; k < CW; ++k) acc[q][k] = fmaf(h, to_f<T>(w.v[k]), acc[q][k]);
                }
            }
        }
#pragma unroll
        for (int q = 0; q < SLAB_CHUNKS; ++q) {
            const int c = slab + q * FFN_THREADS + tid;
            if (c >= d_chunks) continue;
            if (splits == 1) {
                C out;
#pragma unroll
                for (int k = 0; k < CW; ++k) out.v[k] = from_f<T>(acc[q][k]);
                T* dst = y + (long long)row * d + c * CW;
                if (VEC && (CW * sizeof(T)) % 16 == 0) *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<uint4*>(out.v);
                else {
#pragma unroll
                    for (int k = 0; k < CW; ++k) dst[k] = out.v[k];
                }
            } else {
                float* dst = partial + ((long long)row * splits + split) * d + c * CW;
#pragma unroll
                for (int k = 0; k < CW; ++k) dst[k] = acc[q][k];
            }
        }
    }
}

// y[row, :] = sum over splits (in order) of partial[row, split, :], for compact rows only.
template <typename T>
__global__ void reduce_split_rows(const float* __restrict__ partial, const int* __restrict__ backup_slot,
                                  int M, int d, int splits, T* __restrict__ y)
{
    const long long total = (long long)M * d;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int row = (int)(i / d);
        if (backup_slot[row] >= 0) continue;
        const int col = (int)(i - (long long)row * d);
        const float* p = partial + (long long)row * splits * d + col;
        float s = 0.f;
        for (int k = 0; k < splits; ++k) s += p[(long long)k * d];
        y[i] = from_f<T>(s);
    }
}

// h = g * u in fp32, rounded once (dense backup rows).  RELU: g is relu'd first, keeping NaN like the
// dense relu (0 * NaN stays NaN, as in the dense computation).
template <typename T, bool RELU>
__global__ void gate_mul(const T* __restrict__ g, const T* __restrict__ u, long long total, T* __restrict__ h)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        float gv = to_f<T>(g[i]);
        if (RELU) gv = !(gv <= 0.f) ? gv : 0.f;
        h[i] = from_f<T>(gv * to_f<T>(u[i]));
    }
}
