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
// dense backup are skipped (route[row] != compact: route is the TwELL's backup_slot with compact = -1, or
// the pack kernel's route codes with compact = 0): the host computes them exactly with cuBLAS.
// splits > 1 (decode: few rows, many CTAs per row): each split takes a contiguous part of the list and
// writes an fp32 partial row; reduce_split_rows sums the partials in split order.
#include "ffn_common.cuh"

// ---------------------------------------------------------------- CTA-per-row building blocks
// list_val[e] := h_e = g_e * (x . w_up[list_col[e]]) for e in [lo, hi); one warp per entry.
// u_out (nullable): u_e is stored, rounded, at u_out[e].  Returns, in lane 0, this warp's sum of |h_e|.
template <typename T, bool VEC>
__device__ __forceinline__ float up_phase(const int* list_col, float* list_val, int lo, int hi,
                                          const T* xs, const T* __restrict__ w_up, int d,
                                          T* __restrict__ u_out = nullptr) {
    constexpr int CW = Vec<T, VEC>::N;
    const int d_chunks = d / CW, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float l1 = 0.f;
    for (int e = lo + warp; e < hi; e += FFN_WARPS) {
        const T* wr = w_up + (long long)list_col[e] * d;
        float acc = 0.f;
#pragma unroll 4
        for (int c = lane; c < d_chunks; c += 32) {
            Chunk<T, CW, VEC> w; w.load(wr + c * CW);
            const T* xc = xs + c * CW;
#pragma unroll
            for (int k = 0; k < CW; ++k) acc = fmaf(to_f<T>(w.v[k]), to_f<T>(xc[k]), acc);
        }
        acc = warp_sum(acc);
        if (lane == 0) {
            const float h = list_val[e] * acc;
            list_val[e] = h;
            l1 += fabsf(h);
            if (u_out) u_out[e] = from_f<T>(acc);
        }
    }
    return l1;
}

// sum over e in [lo, hi) of list_val[e] * w_down[list_col[e]], in list order, for the columns of one slab.
// MODE 0: store to y (rounded); 1: store fp32 to part; 2: add fp32 to part.
template <typename T, bool VEC, int MODE>
__device__ __forceinline__ void down_phase(const int* list_col, const float* list_val, int lo, int hi,
                                           const T* __restrict__ w_down, int d, T* __restrict__ yr,
                                           float* __restrict__ part) {
    constexpr int CW = Vec<T, VEC>::N;
    typedef Chunk<T, CW, VEC> C;
    const int d_chunks = d / CW, tid = threadIdx.x;
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
            if (MODE == 0) {
#pragma unroll
                for (int k = 0; k < CW; ++k) yr[c * CW + k] = from_f<T>(acc[q][k]);
            } else {
#pragma unroll
                for (int k = 0; k < CW; ++k) part[c * CW + k] = (MODE == 2 ? part[c * CW + k] : 0.f) + acc[q][k];
            }
        }
    }
}

// ---------------------------------------------------------------- general TwELL kernel (any d, dtype)
template <typename T, bool VEC, bool GATED>
__global__ void __launch_bounds__(FFN_THREADS) twell_up_down(
    const T* __restrict__ x, const int* __restrict__ counts, const u8* __restrict__ indices,
    const T* __restrict__ values, const int* __restrict__ route, int compact,
    const T* __restrict__ w_up, const T* __restrict__ w_down,
    int M, int d, int n_tiles, int slots, int tile_width, int splits,
    T* __restrict__ y, float* __restrict__ partial)
{
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* xs = reinterpret_cast<T*>(smem_raw);                       // d elements (GATED only)
    __shared__ int list_col[MAX_LIST];
    __shared__ float list_val[MAX_LIST];
    __shared__ int warp_totals[FFN_WARPS];

    const int row = blockIdx.x / splits;
    const int split = blockIdx.x - row * splits;
    if (row >= M || route[row] != compact) return;               // uniform per CTA
    const int tid = threadIdx.x;

    if (GATED) stage_row<T, VEC>(x + (long long)row * d, d, xs);
    // Active list of the row in ascending column order (block prefix sum over tiles).
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
    __syncthreads();

    const int per = (list_len + splits - 1) / splits;
    const int lo = min(split * per, list_len), hi = min(lo + per, list_len);
    if (GATED) {
        up_phase<T, VEC>(list_col, list_val, lo, hi, xs, w_up, d);
        __syncthreads();
    }
    if (splits == 1)
        down_phase<T, VEC, 0>(list_col, list_val, lo, hi, w_down, d, y + (long long)row * d, nullptr);
    else
        down_phase<T, VEC, 1>(list_col, list_val, lo, hi, w_down, d, nullptr,
                              partial + ((long long)row * splits + split) * d);
}

// ---------------------------------------------------------------- decode: straight from the dense gate z
// CTA per (row, split); no TwELL, no routing, no host sync: every row is exact whatever its activity.
// The split takes ranks [lo, hi) of the row's entries (ascending column), in rounds of MAX_LIST,
// and accumulates into a zero-initialised fp32 partial row (reduced by reduce_split_rows).  VEC: 16-byte loads of x / weights and
// n % 8 == 0 for the z row.  row_nnz (nullable): split 0 stores the row's entry count.  (Min. 4 CTAs per SM
// in the launch bounds: without it ptxas spilled a few bytes in some instantiations.)
template <typename T, bool VEC, bool GATED>
__global__ void __launch_bounds__(FFN_THREADS, 4) dense_gate_up_down(
    const T* __restrict__ x, const T* __restrict__ z, const T* __restrict__ w_up, const T* __restrict__ w_down,
    int M, int d, int n, int splits, float* __restrict__ partial, int* __restrict__ row_nnz)
{
    constexpr int E = 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* xs = reinterpret_cast<T*>(smem_raw);
    __shared__ int list_col[MAX_LIST];
    __shared__ float list_val[MAX_LIST];
    __shared__ int warp_totals[FFN_WARPS];
    const int row = blockIdx.x / splits;
    const int split = blockIdx.x - row * splits;
    if (row >= M) return;
    const int tid = threadIdx.x;
    const T* zr = z + (long long)row * n;
    float* part = partial + ((long long)row * splits + split) * d;

    if (GATED) stage_row<T, VEC>(x + (long long)row * d, d, xs);
    // Pass 1: entries in the row.
    int cnt = 0;
    for (int col0 = tid * E; col0 < n; col0 += FFN_THREADS * E) {
        Chunk<T, E, VEC> ch;
        if (VEC) ch.load(zr + col0); else ch.load_partial(zr + col0, n - col0);
#pragma unroll
        for (int k = 0; k < E; ++k) cnt += (col0 + k < n) && is_entry<true>(ch.v[k]);
    }
    int total;
    block_exclusive_scan(cnt, warp_totals, total);
    if (row_nnz != nullptr && split == 0 && tid == 0) row_nnz[row] = total;
    const int per = (total + splits - 1) / splits;
    const int lo_all = min(split * per, total), hi_all = min(lo_all + per, total);
    int round = 0;
    for (int lo = lo_all; round == 0 || lo < hi_all; lo += MAX_LIST, ++round) {
        const int hi = min(lo + MAX_LIST, hi_all);
        // Pass 2: ranks [lo, hi) into the list.
        int base_rank = 0;
        for (int b = 0; b < n; b += FFN_THREADS * E) {
            const int col0 = b + tid * E;
            Chunk<T, E, VEC> ch;
            if (col0 < n) { if (VEC) ch.load(zr + col0); else ch.load_partial(zr + col0, n - col0); }
            else ch.load_partial(zr, 0);
            unsigned mask = 0;
#pragma unroll
            for (int k = 0; k < E; ++k) if (col0 + k < n && is_entry<true>(ch.v[k])) mask |= 1u << k;
            int chunk_total;
            int r = base_rank + block_exclusive_scan(__popc(mask), warp_totals, chunk_total);
#pragma unroll
            for (int k = 0; k < E; ++k) {
                if (mask & (1u << k)) {
                    if (r >= lo && r < hi) { list_col[r - lo] = col0 + k; list_val[r - lo] = to_f<T>(ch.v[k]); }
                    ++r;
                }
            }
            base_rank += chunk_total;
        }
        __syncthreads();
        const int len = max(hi - lo, 0);
        if (GATED) {
            up_phase<T, VEC>(list_col, list_val, 0, len, xs, w_up, d);
            __syncthreads();
        }
        down_phase<T, VEC, 2>(list_col, list_val, 0, len, w_down, d, nullptr, part);

        __syncthreads();
    }
}

// ---------------------------------------------------------------- warp-per-row building blocks
// One warp, one gated row: acc += sum_e h_e * w_down[j_e] with h_e = g_e * (x . w_up[j_e]), software
// pipelined (w_down[j_e] and w_up[j_{e+1}] are in flight while x . w_up[j_e] is reduced).
// u_out (nullable): u_e stored rounded at u_out[e].  Returns sum_e |h_e| (same value in every lane).
template <typename T, int NC>
__device__ __forceinline__ float warp_gated_row(const uint4 (&xr)[NC], const int* lcol, const float* lval,
                                                int len, const T* __restrict__ w_up,
                                                const T* __restrict__ w_down, float (&acc)[NC][8],
                                                T* __restrict__ u_out) {
    constexpr int D = NC * 256;
    const int lane = threadIdx.x & 31;
    const T* tag = nullptr;
    float l1 = 0.f;
    uint4 ucur[NC];
    if (len > 0) {
        const uint4* wu = reinterpret_cast<const uint4*>(w_up + (long long)lcol[0] * D);
#pragma unroll
        for (int k = 0; k < NC; ++k) ucur[k] = __ldg(wu + k * 32 + lane);
    }
    for (int e = 0; e < len; ++e) {
        uint4 dv[NC], unext[NC];
        const uint4* wd = reinterpret_cast<const uint4*>(w_down + (long long)lcol[e] * D);
#pragma unroll
        for (int k = 0; k < NC; ++k) dv[k] = __ldg(wd + k * 32 + lane);
        if (e + 1 < len) {
            const uint4* wu = reinterpret_cast<const uint4*>(w_up + (long long)lcol[e + 1] * D);
#pragma unroll
            for (int k = 0; k < NC; ++k) unext[k] = __ldg(wu + k * 32 + lane);
        }
        float dot = 0.f;
#pragma unroll
        for (int k = 0; k < NC; ++k) {
            float fu[8], fx[8];
            unpack8(ucur[k], fu, tag);
            unpack8(xr[k], fx, tag);
#pragma unroll
            for (int i = 0; i < 8; ++i) dot = fmaf(fu[i], fx[i], dot);
        }
        dot = warp_sum(dot);
        const float h = lval[e] * dot;
        l1 += fabsf(h);
        if (u_out && lane == 0) u_out[e] = from_f<T>(dot);
#pragma unroll
        for (int k = 0; k < NC; ++k) {
            float fd[8];
            unpack8(dv[k], fd, tag);
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[k][i] = fmaf(h, fd[i], acc[k][i]);
        }
#pragma unroll
        for (int k = 0; k < NC; ++k) ucur[k] = unext[k];
    }
    return l1;
}

// One warp, one non-gated row: acc += sum_e lval[e] * w_down[lcol[e]], two rows in flight.
template <typename T, int NC>
__device__ __forceinline__ void warp_down_row(const int* lcol, const float* lval, int len,
                                              const T* __restrict__ w_down, float (&acc)[NC][8]) {
    constexpr int D = NC * 256;
    const int lane = threadIdx.x & 31;
    const T* tag = nullptr;
    int e = 0;
    for (; e + 2 <= len; e += 2) {
        uint4 d0[NC], d1[NC];
        const uint4* w0 = reinterpret_cast<const uint4*>(w_down + (long long)lcol[e] * D);
        const uint4* w1 = reinterpret_cast<const uint4*>(w_down + (long long)lcol[e + 1] * D);
#pragma unroll
        for (int k = 0; k < NC; ++k) { d0[k] = __ldg(w0 + k * 32 + lane); d1[k] = __ldg(w1 + k * 32 + lane); }
        const float h0 = lval[e], h1 = lval[e + 1];
#pragma unroll
        for (int k = 0; k < NC; ++k) {
            float f0[8], f1[8];
            unpack8(d0[k], f0, tag);
            unpack8(d1[k], f1, tag);
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[k][i] = fmaf(h1, f1[i], fmaf(h0, f0[i], acc[k][i]));
        }
    }
    if (e < len) {
        const uint4* w0 = reinterpret_cast<const uint4*>(w_down + (long long)lcol[e] * D);
        const float h0 = lval[e];
#pragma unroll
        for (int k = 0; k < NC; ++k) {
            float f0[8];
            unpack8(__ldg(w0 + k * 32 + lane), f0, tag);
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[k][i] = fmaf(h0, f0[i], acc[k][i]);
        }
    }
}

// ---------------------------------------------------------------- fast path: one warp per TwELL row
// 16-bit T, d = 256 * NC.  x and y stay in registers; x and y use cache-streaming accesses so the
// gathered weight rows keep L2.
template <typename T, int NC, bool GATED>
__global__ void __launch_bounds__(32 * WARP_KERNEL_WARPS) twell_up_down_warp(
    const T* __restrict__ x, const int* __restrict__ counts, const u8* __restrict__ indices,
    const T* __restrict__ values, const int* __restrict__ route, int compact,
    const T* __restrict__ w_up, const T* __restrict__ w_down,
    int M, int n_tiles, int slots, int tile_width, T* __restrict__ y, int* __restrict__ work_counter)
{
    constexpr int D = NC * 256;
    __shared__ int s_col[WARP_KERNEL_WARPS][MAX_LIST];
    __shared__ float s_val[WARP_KERNEL_WARPS][MAX_LIST];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int* lcol = s_col[warp];
    float* lval = s_val[warp];
    for (;;) {
        const int row = next_row(work_counter);
        if (row >= M) break;
        if (route[row] != compact) continue;
        // Active list (ascending column): warp prefix sum over tiles.
        int len = 0;
        for (int t0 = 0; t0 < n_tiles; t0 += 32) {
            const int t = t0 + lane;
            const int c = (t < n_tiles) ? min(counts[(long long)row * n_tiles + t], slots) : 0;
            const int incl = warp_inclusive_scan(c);
            const int pos = len + incl - c;
            const long long base = ((long long)row * n_tiles + t) * slots;
            for (int s = 0; s < c; ++s) {
                if (pos + s < MAX_LIST) {
                    lcol[pos + s] = t * tile_width + indices[base + s];
                    lval[pos + s] = to_f<T>(values[base + s]);
                }
            }
            len += __shfl_sync(0xffffffffu, incl, 31);
        }
        len = min(len, MAX_LIST);
        __syncwarp();
        float acc[NC][8];
        zero_acc<NC>(acc);
        if (GATED) {
            uint4 xr[NC];
            load_row_stream<T, NC>(x + (long long)row * D, xr);
            warp_gated_row<T, NC>(xr, lcol, lval, len, w_up, w_down, acc, nullptr);
        } else {
            warp_down_row<T, NC>(lcol, lval, len, w_down, acc);
        }
        store_row_stream<T, NC>(y + (long long)row * D, acc);
        __syncwarp();
    }
}

// ---------------------------------------------------------------- training forward (hybrid / CSR rows)
// Fast path: one warp per compact row.  Also stores u_e at every entry (for the backward) and the
// row's sum |h| (for the L1 statistic).  Backup rows (backup_slot >= 0) are skipped.
template <typename T, int NC>
__global__ void __launch_bounds__(32 * WARP_KERNEL_WARPS) csr_up_down_warp(
    const T* __restrict__ x, const int* __restrict__ row_ptr, const int* __restrict__ col_indices,
    const T* __restrict__ g_values, const int* __restrict__ backup_slot,
    const T* __restrict__ w_up, const T* __restrict__ w_down, int M,
    T* __restrict__ y, T* __restrict__ u_values, float* __restrict__ row_l1, int* __restrict__ work_counter)
{
    constexpr int D = NC * 256;
    __shared__ int s_col[WARP_KERNEL_WARPS][MAX_LIST];
    __shared__ float s_val[WARP_KERNEL_WARPS][MAX_LIST];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int* lcol = s_col[warp];
    float* lval = s_val[warp];
    for (;;) {
        const int row = next_row(work_counter);
        if (row >= M) break;
        if (backup_slot[row] >= 0) continue;
        const int p0 = row_ptr[row];
        const int len = min(row_ptr[row + 1] - p0, MAX_LIST);
        for (int i = lane; i < len; i += 32) {
            lcol[i] = col_indices[p0 + i];
            lval[i] = to_f<T>(g_values[p0 + i]);
        }
        __syncwarp();
        float acc[NC][8];
        zero_acc<NC>(acc);
        uint4 xr[NC];
        load_row_stream<T, NC>(x + (long long)row * D, xr);
        const float l1 = warp_gated_row<T, NC>(xr, lcol, lval, len, w_up, w_down, acc, u_values + p0);
        store_row_stream<T, NC>(y + (long long)row * D, acc);
        if (lane == 0) row_l1[row] = l1;
        __syncwarp();
    }
}

// General path (any d, dtype): CTA per compact row, as twell_up_down.
template <typename T, bool VEC>
__global__ void __launch_bounds__(FFN_THREADS) csr_up_down(
    const T* __restrict__ x, const int* __restrict__ row_ptr, const int* __restrict__ col_indices,
    const T* __restrict__ g_values, const int* __restrict__ backup_slot,
    const T* __restrict__ w_up, const T* __restrict__ w_down, int M, int d,
    T* __restrict__ y, T* __restrict__ u_values, float* __restrict__ row_l1)
{
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* xs = reinterpret_cast<T*>(smem_raw);
    __shared__ int list_col[MAX_LIST];
    __shared__ float list_val[MAX_LIST];
    __shared__ float warp_l1[FFN_WARPS];
    const int row = blockIdx.x;
    if (row >= M || backup_slot[row] >= 0) return;
    const int p0 = row_ptr[row];
    const int len = min(row_ptr[row + 1] - p0, MAX_LIST);
    stage_row<T, VEC>(x + (long long)row * d, d, xs);
    for (int i = threadIdx.x; i < len; i += FFN_THREADS) {
        list_col[i] = col_indices[p0 + i];
        list_val[i] = to_f<T>(g_values[p0 + i]);
    }
    __syncthreads();
    const float l1 = up_phase<T, VEC>(list_col, list_val, 0, len, xs, w_up, d, u_values + p0);
    if ((threadIdx.x & 31) == 0) warp_l1[threadIdx.x >> 5] = l1;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.f;
        for (int w = 0; w < FFN_WARPS; ++w) s += warp_l1[w];
        row_l1[row] = s;
    }
    down_phase<T, VEC, 0>(list_col, list_val, 0, len, w_down, d, y + (long long)row * d, nullptr);
}

// ---------------------------------------------------------------- decode, fused: gate GEMV + up/down
// Decode batches of at most DF_MAX_ROWS rows (16-bit T, d = 256 * NC), in two kernels and nothing on
// the host in between.  decode_fused: CTA c owns neurons [c * 8 * npw, (c + 1) * 8 * npw), warp w of it
// neurons j = c * 8 * npw + w + 8 * i (i < npw).  Per neuron the warp streams its w_gate row once (the
// next one in flight) against the staged x rows: z = x_m . w_gate[j] in fp32, rounded to T like a
// GEMM's output, and entries are !(z <= 0) (NaN included, as the dense relu keeps it).  Entries go to
// the warp's list in (neuron, row) order; h = g * (x_m . w_up[j]) by the same warp (GATED; else h = g);
// then every thread owns 16-byte column chunks and accumulates h * w_down[j] over the CTA's lists in
// (warp, entry) order into fp32 registers per row, written as the CTA's partial (rows x d) with a flag
// (a CTA without entries writes only flags[c] = 0).  decode_reduce sums the flagged partials of each
// row in a fixed tree (warp w: CTAs w, w + 8, ...; then the 8 warp sums in order) and rounds once.
// No atomics, no memset: deterministic, and a row's y depends only on its own x row.
#define DF_WARPS 8
#define DF_THREADS (32 * DF_WARPS)
#define DF_MAX_ROWS 8
#define DF_MAX_NPW 8                                        // neurons per warp (run-time npw <= this)
#define DF_WARP_LIST (DF_MAX_NPW * DF_MAX_ROWS)

template <typename T, int NC>
__device__ __forceinline__ float dot_row_smem(const uint4 (&w)[NC], const T* xs_row) {
    const int lane = threadIdx.x & 31;
    const T* tag = nullptr;
    const uint4* xr = reinterpret_cast<const uint4*>(xs_row);
    float dot = 0.f;
#pragma unroll
    for (int k = 0; k < NC; ++k) {
        float fw[8], fx[8];
        unpack8(w[k], fw, tag);
        unpack8(xr[k * 32 + lane], fx, tag);
#pragma unroll
        for (int i = 0; i < 8; ++i) dot = fmaf(fw[i], fx[i], dot);
    }
    return warp_sum(dot);
}

template <typename T, int NC, bool GATED>
__global__ void __launch_bounds__(DF_THREADS) decode_fused(
    const T* __restrict__ x, const T* __restrict__ w_gate, const T* __restrict__ w_up,
    const T* __restrict__ w_down, int M, int n, int npw, float* __restrict__ partial, int* __restrict__ flags)
{
    constexpr int D = NC * 256;
    __shared__ __align__(16) T xs[DF_MAX_ROWS * D];
    __shared__ int e_row[DF_WARPS][DF_WARP_LIST];
    __shared__ int e_col[DF_WARPS][DF_WARP_LIST];
    __shared__ float e_val[DF_WARPS][DF_WARP_LIST];
    __shared__ int w_count[DF_WARPS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const T* tag = nullptr;
    for (int c = threadIdx.x; c < M * D / 8; c += DF_THREADS)
        reinterpret_cast<uint4*>(xs)[c] = __ldg(reinterpret_cast<const uint4*>(x) + c);
    __syncthreads();

    // gate: this warp's neurons, the next w_gate row in flight while the current one is reduced
    const int j0 = blockIdx.x * DF_WARPS * npw + warp;
    int cnt = 0;
    uint4 cur[NC], nxt[NC];
    if (j0 < n) {
        const uint4* wr = reinterpret_cast<const uint4*>(w_gate + (long long)j0 * D);
#pragma unroll
        for (int k = 0; k < NC; ++k) cur[k] = __ldg(wr + k * 32 + lane);
    }
    for (int i = 0; i < npw; ++i) {
        const int j = j0 + i * DF_WARPS;
        if (j >= n) break;
        const int jn = j + DF_WARPS;
        if (i + 1 < npw && jn < n) {
            const uint4* wr = reinterpret_cast<const uint4*>(w_gate + (long long)jn * D);
#pragma unroll
            for (int k = 0; k < NC; ++k) nxt[k] = __ldg(wr + k * 32 + lane);
        }
        // every row's partial dot first (the w_gate row unpacked once), then the row reductions
        // interleaved so that their shuffle latencies overlap
        float fw[NC][8];
#pragma unroll
        for (int k = 0; k < NC; ++k) unpack8(cur[k], fw[k], tag);
        float dots[DF_MAX_ROWS];
#pragma unroll
        for (int m = 0; m < DF_MAX_ROWS; ++m) {
            dots[m] = 0.f;
            if (m < M) {
                const uint4* xr = reinterpret_cast<const uint4*>(xs + m * D);
#pragma unroll
                for (int k = 0; k < NC; ++k) {
                    float fx[8];
                    unpack8(xr[k * 32 + lane], fx, tag);
#pragma unroll
                    for (int q = 0; q < 8; ++q) dots[m] = fmaf(fw[k][q], fx[q], dots[m]);
                }
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
#pragma unroll
            for (int m = 0; m < DF_MAX_ROWS; ++m)
                if (m < M) dots[m] += __shfl_xor_sync(0xffffffffu, dots[m], o);
#pragma unroll
        for (int m = 0; m < DF_MAX_ROWS; ++m) {
            if (m < M) {
                const T zt = from_f<T>(dots[m]);
                if (is_entry<true>(zt)) {
                    if (lane == 0) {
                        e_row[warp][cnt] = m;
                        e_col[warp][cnt] = j;
                        e_val[warp][cnt] = to_f<T>(zt);
                    }
                    ++cnt;
                }
            }
        }
#pragma unroll
        for (int k = 0; k < NC; ++k) cur[k] = nxt[k];
    }
    __syncwarp();
    // up: h = g * (x_m . w_up[j]) for this warp's entries, the next w_up row in flight
    if (GATED && cnt > 0) {
        const uint4* wr = reinterpret_cast<const uint4*>(w_up + (long long)e_col[warp][0] * D);
#pragma unroll
        for (int k = 0; k < NC; ++k) cur[k] = __ldg(wr + k * 32 + lane);
        for (int e = 0; e < cnt; ++e) {
            if (e + 1 < cnt) {
                const uint4* wn = reinterpret_cast<const uint4*>(w_up + (long long)e_col[warp][e + 1] * D);
#pragma unroll
                for (int k = 0; k < NC; ++k) nxt[k] = __ldg(wn + k * 32 + lane);
            }
            const float u = dot_row_smem<T, NC>(cur, xs + e_row[warp][e] * D);
            __syncwarp();
            if (lane == 0) e_val[warp][e] *= u;
#pragma unroll
            for (int k = 0; k < NC; ++k) cur[k] = nxt[k];
        }
    }
    if (lane == 0) w_count[warp] = cnt;
    __syncthreads();

    // down: thread t owns the 16-byte column chunks t, t + DF_THREADS, ... of every row
    int total = 0;
#pragma unroll
    for (int w = 0; w < DF_WARPS; ++w) total += w_count[w];
    if (threadIdx.x == 0) flags[blockIdx.x] = total > 0;
    if (total == 0) return;
    for (int c = threadIdx.x; c < D / 8; c += DF_THREADS) {
        float acc[DF_MAX_ROWS][8];
#pragma unroll
        for (int m = 0; m < DF_MAX_ROWS; ++m)
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[m][i] = 0.f;
        for (int w = 0; w < DF_WARPS; ++w) {
            for (int e = 0; e < w_count[w]; ++e) {
                float fd[8];
                unpack8(__ldg(reinterpret_cast<const uint4*>(w_down + (long long)e_col[w][e] * D) + c), fd, tag);
                const float h = e_val[w][e];
                const int row = e_row[w][e];
#pragma unroll
                for (int m = 0; m < DF_MAX_ROWS; ++m) {
                    if (m == row) {
#pragma unroll
                        for (int i = 0; i < 8; ++i) acc[m][i] = fmaf(h, fd[i], acc[m][i]);
                    }
                }
            }
        }
#pragma unroll
        for (int m = 0; m < DF_MAX_ROWS; ++m) {
            if (m < M) {
                float4* dst = reinterpret_cast<float4*>(partial + ((long long)blockIdx.x * M + m) * D) + 2 * c;
                dst[0] = make_float4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]);
                dst[1] = make_float4(acc[m][4], acc[m][5], acc[m][6], acc[m][7]);
            }
        }
    }
}

// y[m, cols] = sum of the flagged CTAs' partials (see decode_fused); CTA (column group of 256, row m).
template <typename T>
__global__ void __launch_bounds__(DF_THREADS) decode_reduce(const float* __restrict__ partial,
                                                            const int* __restrict__ flags, int G, int M, int d,
                                                            T* __restrict__ y)
{
    __shared__ float4 sums[DF_WARPS][32][2];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int m = blockIdx.y, col = blockIdx.x * 256 + lane * 8;
    float4 a = make_float4(0.f, 0.f, 0.f, 0.f), b = a;
#pragma unroll 4
    for (int g = warp; g < G; g += DF_WARPS) {
        if (flags[g]) {
            const float4* p = reinterpret_cast<const float4*>(partial + ((long long)g * M + m) * d + col);
            const float4 p0 = p[0], p1 = p[1];
            a.x += p0.x; a.y += p0.y; a.z += p0.z; a.w += p0.w;
            b.x += p1.x; b.y += p1.y; b.z += p1.z; b.w += p1.w;
        }
    }
    sums[warp][lane][0] = a;
    sums[warp][lane][1] = b;
    __syncthreads();
    if (warp == 0) {
        float t[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int w = 0; w < DF_WARPS; ++w) {
            const float4 s0 = sums[w][lane][0], s1 = sums[w][lane][1];
            t[0] += s0.x; t[1] += s0.y; t[2] += s0.z; t[3] += s0.w;
            t[4] += s1.x; t[5] += s1.y; t[6] += s1.z; t[7] += s1.w;
        }
        *reinterpret_cast<uint4*>(y + (long long)m * d + col) = pack8<T>(t);
    }
}

// y[row, :] = sum over splits (in order) of partial[row, split, :], for compact rows only.
template <typename T>
__global__ void reduce_split_rows(const float* __restrict__ partial, const int* __restrict__ route, int compact,
                                  int M, int d, int splits, T* __restrict__ y)
{
    const long long total = (long long)M * d;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int row = (int)(i / d);
        if (route && route[row] != compact) continue;
        const int col = (int)(i - (long long)row * d);
        const float* p = partial + (long long)row * splits * d + col;
        float s = 0.f;
        for (int k = 0; k < splits; ++k) s += p[(long long)k * d];
        y[i] = from_f<T>(s);
    }
}

// ---------------------------------------------------------------- dense rows
// The dense path and the dense backup rows: from the gate pre-activations z (or relu'd gate values: the
// same entries) of R rows, h = relu(z) * u (GATED; else h = relu(z)), the fp32 product rounded once.  An
// inactive neuron (z <= 0) gives h = 0 exactly, whatever u holds: an inactive neuron contributes nothing,
// on every path (docs/design.md, "NaN and Inf"); NaN gates are entries, as the dense relu keeps them.
// RELU = false: z holds gate values given by the user (a TwELL's): every non-zero is an entry, negative
// ones included, and g = z.
// Optional outputs (nullptr: skipped): g_out = relu(z) (NaN kept); for row r, stored at index
// rows[r] (rows nullptr: r) of row_nnz (entries) and row_l1 (sum |h| of the rounded h, fp32); neuron_counts
// (+= entries per column); nnz_total (+= entries, 64-bit); summary (3 x 64-bit, added to: the entries of
// rows with at most summary_threshold entries, the rows with more, all entries -- what a density tracker
// needs, so that only 24 bytes go back to the host).
// Work split (a streaming kernel: it must run at the copy rate): one CTA of DG_THREADS per rows_per_cta
// (<= DG_MAX_ROWS) rows and every column.  Lane l of warp w owns the 8-column chunk c = 32 w + l (+ DG_THREADS
// chunks per step) and walks the CTA's rows DG_UNROLL at a time, every load of the group issued first; a
// column's entries are counted in registers over the CTA's rows (one integer atomic per column and CTA).  A
// row's entries and L1 over the warp's 256 columns are reduced in the warp and added by lane 0 to the warp's
// shared-memory slot of the row; after the one barrier the slots are summed in warp order.  No per-row
// barrier, and a fixed summation order: bitwise deterministic.
// h = relu(z) * u (GATED; else relu(z)) over `total` elements of C-contiguous z, u and h, with none of
// dense_gate_mul's optional outputs: the same values (the same arithmetic), by a flat grid-stride streaming
// kernel, 8 elements per thread and step (16-byte loads and stores when VEC).
template <typename T, bool GATED, bool RELU, bool VEC>
__global__ void __launch_bounds__(256) gate_mul_flat(const T* __restrict__ z, const T* __restrict__ u,
                                                      long long total, T* __restrict__ h)
{
    constexpr int E = 8;
    const long long chunks = (total + E - 1) / E;
    for (long long c = blockIdx.x * (long long)blockDim.x + threadIdx.x; c < chunks;
         c += (long long)gridDim.x * blockDim.x) {
        const long long base = c * E;
        const int valid = (int)min((long long)E, total - base);
        Chunk<T, E, VEC> zc, uc;
        if (VEC && valid == E) {
            zc.load(z + base);
            if (GATED) uc.load(u + base);
        } else {
            zc.load_partial(z + base, valid);
            if (GATED) uc.load_partial(u + base, valid);
        }
        __align__(16) T hv[E];
#pragma unroll
        for (int k = 0; k < E; ++k) {
            const bool entry = k < valid && is_entry<RELU>(zc.v[k]);
            const float g = entry ? to_f<T>(zc.v[k]) : 0.f;
            hv[k] = from_f<T>(entry ? (GATED ? g * to_f<T>(uc.v[k]) : g) : 0.f);
        }
        if (VEC && valid == E) {
#pragma unroll
            for (int s = 0; s < (int)(E * sizeof(T) / 16); ++s)
                reinterpret_cast<uint4*>(h + base)[s] = reinterpret_cast<const uint4*>(hv)[s];
        } else {
#pragma unroll
            for (int k = 0; k < E; ++k)
                if (k < valid) h[base + k] = hv[k];
        }
    }
}

#define DG_THREADS 256
#define DG_WARPS (DG_THREADS / 32)
#define DG_MAX_ROWS 64
#define DG_UNROLL 4
// g_out may be z itself (relu(z) in place: each element is read, then written, by the same thread), so
// neither is __restrict__.
template <typename T, bool GATED, bool RELU, bool VEC>
__global__ void __launch_bounds__(DG_THREADS) dense_gate_mul(
    const T* z, const T* __restrict__ u, int R, int n, int rows_per_cta, const int* __restrict__ rows,
    T* __restrict__ h, T* g_out, int* __restrict__ row_nnz, float* __restrict__ row_l1,
    int* __restrict__ neuron_counts, unsigned long long* __restrict__ nnz_total, int summary_threshold,
    unsigned long long* __restrict__ summary)
{
    constexpr int E = 8;
    __shared__ int s_cnt[DG_MAX_ROWS][DG_WARPS];
    __shared__ float s_l1[DG_MAX_ROWS][DG_WARPS];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int r0 = blockIdx.x * rows_per_cta;
    const int rn = min(rows_per_cta, R - r0);
    if (rn <= 0) return;
    const bool want_cnt = row_nnz != nullptr || nnz_total != nullptr || summary != nullptr;
    const bool want_l1 = row_l1 != nullptr;
    if (want_cnt || want_l1) {
        for (int i = tid; i < DG_MAX_ROWS * DG_WARPS; i += DG_THREADS) {
            (&s_cnt[0][0])[i] = 0;
            (&s_l1[0][0])[i] = 0.f;
        }
        __syncthreads();
    }
    const int n_chunks = (n + E - 1) / E;
    for (int cw = warp * 32; cw < n_chunks; cw += DG_THREADS) {      // warp-uniform: every lane reduces
        const int c0 = (cw + lane) * E;
        const int valid = cw + lane < n_chunks ? min(E, n - c0) : 0;  // VEC: E or 0
        int col[E];
#pragma unroll
        for (int k = 0; k < E; ++k) col[k] = 0;
        for (int rr = 0; rr < rn; rr += DG_UNROLL) {
            Chunk<T, E, VEC> zc[DG_UNROLL], uc[DG_UNROLL];
#pragma unroll
            for (int q = 0; q < DG_UNROLL; ++q) {
                const long long base = (long long)(r0 + rr + q) * n + c0;
                const int v = rr + q < rn ? valid : 0;
                if (VEC && v == E) {
                    zc[q].load(z + base);
                    if (GATED) uc[q].load(u + base);
                } else {
                    zc[q].load_partial(z + base, v);
                    if (GATED) uc[q].load_partial(u + base, v);
                }
            }
#pragma unroll
            for (int q = 0; q < DG_UNROLL; ++q) {
                if (rr + q >= rn) break;                               // warp-uniform
                const long long base = (long long)(r0 + rr + q) * n + c0;
                __align__(16) T hv[E];
                __align__(16) T gv[E];
                int cnt = 0;
                float l1 = 0.f;
#pragma unroll
                for (int k = 0; k < E; ++k) {
                    const bool entry = k < valid && is_entry<RELU>(zc[q].v[k]);
                    const float g = entry ? to_f<T>(zc[q].v[k]) : 0.f;
                    const float hf = entry ? (GATED ? g * to_f<T>(uc[q].v[k]) : g) : 0.f;
                    hv[k] = from_f<T>(hf);
                    gv[k] = from_f<T>(g);
                    cnt += entry;
                    col[k] += entry;
                    l1 += fabsf(to_f<T>(hv[k]));
                }
                if (VEC && valid == E) {                               // 16-byte stores (E * sizeof(T) is 16 or 32)
#pragma unroll
                    for (int s = 0; s < (int)(E * sizeof(T) / 16); ++s) {
                        reinterpret_cast<uint4*>(h + base)[s] = reinterpret_cast<const uint4*>(hv)[s];
                        if (g_out) reinterpret_cast<uint4*>(g_out + base)[s] = reinterpret_cast<const uint4*>(gv)[s];
                    }
                } else {
#pragma unroll
                    for (int k = 0; k < E; ++k) {
                        if (k < valid) {
                            h[base + k] = hv[k];
                            if (g_out) g_out[base + k] = gv[k];
                        }
                    }
                }
                if (want_cnt) {
                    cnt = __reduce_add_sync(0xffffffffu, cnt);
                    if (lane == 0) s_cnt[rr + q][warp] += cnt;
                }
                if (want_l1) {
                    l1 = warp_sum(l1);
                    if (lane == 0) s_l1[rr + q][warp] += l1;
                }
            }
        }
        if (neuron_counts != nullptr) {
#pragma unroll
            for (int k = 0; k < E; ++k)
                if (k < valid && col[k]) atomicAdd(neuron_counts + c0 + k, col[k]);
        }
    }
    if (!want_cnt && !want_l1) return;
    __syncthreads();
    if (warp == 0) {
        long long cta_entries = 0, compact_entries = 0, over_rows = 0;
        for (int r = lane; r < rn; r += 32) {
            int cnt = 0;
            float l1 = 0.f;
#pragma unroll
            for (int w = 0; w < DG_WARPS; ++w) {
                cnt += s_cnt[r][w];
                l1 += s_l1[r][w];
            }
            const int out = rows != nullptr ? rows[r0 + r] : r0 + r;
            if (row_nnz) row_nnz[out] = cnt;
            if (row_l1) row_l1[out] = l1;
            cta_entries += cnt;
            if (cnt > summary_threshold) ++over_rows;
            else compact_entries += cnt;
        }
        if (nnz_total || summary) {
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                cta_entries += __shfl_xor_sync(0xffffffffu, cta_entries, o);
                compact_entries += __shfl_xor_sync(0xffffffffu, compact_entries, o);
                over_rows += __shfl_xor_sync(0xffffffffu, over_rows, o);
            }
            if (lane == 0) {
                if (nnz_total) atomicAdd(nnz_total, (unsigned long long)cta_entries);
                if (summary) {                      // the density tracker's summary of the call
                    atomicAdd(summary, (unsigned long long)compact_entries);
                    atomicAdd(summary + 1, (unsigned long long)over_rows);
                    atomicAdd(summary + 2, (unsigned long long)cta_entries);
                }
            }
        }
    }
}

// Rows written by a dense GEMM over coefficients that are exactly 0 for inactive neurons (y = h w_down
// of the dense forward and the backup rows; dx = du w_up + dz w_gate of the dense backward): a GEMM turns
// 0 * Inf into NaN, so every non-finite out[r, c] is recomputed as the sum over the row's active neurons j
// (is_entry<RELU>(gate[r, j])) of a1[r, j] w1[j, c] (+ a2[r, j] w2[j, c]), in fp32 and neuron order.  Finite
// outputs are left alone: the common case is one streaming read of the rows (a warp per row, 8-element
// chunks, 16-byte loads when VEC: d % 8 == 0 and out 16-byte aligned).  NaN / Inf that come from active
// neurons or from x stay.  Row r of the coefficients is row out_rows[r] of out (out_rows nullptr: r).
#define FIX_WARPS 8
template <typename T, bool RELU>
__device__ __noinline__ float fix_recompute(int d, int n, long long base, int c, const T* __restrict__ gate,
                                            const T* __restrict__ a1, const T* __restrict__ w1,
                                            const T* __restrict__ a2, const T* __restrict__ w2)
{
    float s = 0.f;
    for (int j = 0; j < n; ++j) {
        if (!is_entry<RELU>(gate[base + j])) continue;
        s = fmaf(to_f<T>(a1[base + j]), to_f<T>(w1[(long long)j * d + c]), s);
        if (a2 != nullptr) s = fmaf(to_f<T>(a2[base + j]), to_f<T>(w2[(long long)j * d + c]), s);
    }
    return s;
}

template <typename T, bool RELU, bool VEC>
__global__ void __launch_bounds__(32 * FIX_WARPS) fix_nonfinite_rows(
    T* __restrict__ out, const int* __restrict__ out_rows, int R, int d, int n, const T* __restrict__ gate,
    const T* __restrict__ a1, const T* __restrict__ w1, const T* __restrict__ a2, const T* __restrict__ w2)
{
    constexpr int E = 8;
    const int lane = threadIdx.x & 31;
    const int n_chunks = (d + E - 1) / E;
    for (int r = blockIdx.x * FIX_WARPS + (threadIdx.x >> 5); r < R; r += gridDim.x * FIX_WARPS) {
        T* o = out + (long long)(out_rows != nullptr ? out_rows[r] : r) * d;
        const long long base = (long long)r * n;
#pragma unroll 4
        for (int c = lane; c < n_chunks; c += 32) {
            Chunk<T, E, VEC> ch;
            if (VEC) ch.load(o + c * E);
            else ch.load_partial(o + c * E, min(E, d - c * E));
            bool finite = true;
#pragma unroll
            for (int k = 0; k < E; ++k) finite &= isfinite(to_f<T>(ch.v[k]));
            if (finite) continue;                                      // rare: element by element
            for (int k = 0; k < E && c * E + k < d; ++k)
                if (!isfinite(to_f<T>(ch.v[k])))
                    o[c * E + k] = from_f<T>(fix_recompute<T, RELU>(d, n, base, c * E + k, gate, a1, w1, a2, w2));
        }
    }
}

// The backup rows past a capacity, without a host read-back: rows[start + i] for i < R = *count - start, each
// computed exactly from x alone (no work when R <= 0).  Work items of a persistent grid of G CTAs: with R < G
// rows, S = G / R CTAs per row, each over a contiguous slice of the neurons, so that the whole GPU streams the
// weights even for one row; with R >= G, one CTA per row (S = 1).  Per item: x as float in shared memory; per
// neuron j of the slice (a warp each, 16-byte loads when VEC): z = x w_first_j rounded to T; active = !(z <= 0)
// (NaN is active); gated: u = x w_up_j rounded to T and h = T(z * u), else h = z.  The slice's active neurons in
// order (one warp's ballots), then its part of y = the sum over them, in order, of h_j w_down_j (fp32).  S = 1:
// y rounded to T (and row_l1[row] = sum |h|); S > 1: fp32 partials in part / part_l1 (item-major, G rows of d),
// summed in split order by excess_rows_reduce.  The dense computation's values, and an inactive neuron's
// non-finite weights never reach y (the rule of fix_nonfinite_rows); bitwise deterministic for a given R.
// Dynamic shared memory (excess_smem_bytes): x as float (d), h as float (n), active flags (n bytes), the
// active list as slice-local ushort (n).
#define EX_THREADS 256
#define EX_UNROLL 4

template <typename T, bool VEC>
__device__ __forceinline__ float excess_dot(const T* __restrict__ w, const float* xs, int d) {
    constexpr int CW = Vec<T, VEC>::N;
    const int n_chunks = d / CW, lane = threadIdx.x & 31;
    float acc = 0.f;
    for (int c0 = lane; c0 < n_chunks; c0 += 32 * EX_UNROLL) {
        Chunk<T, CW, VEC> wc[EX_UNROLL];
#pragma unroll
        for (int q = 0; q < EX_UNROLL; ++q)
            if (c0 + 32 * q < n_chunks) wc[q].load(w + (c0 + 32 * q) * CW);
#pragma unroll
        for (int q = 0; q < EX_UNROLL; ++q) {
            if (c0 + 32 * q >= n_chunks) break;
            const float* xc = xs + (c0 + 32 * q) * CW;
#pragma unroll
            for (int k = 0; k < CW; ++k) acc = fmaf(xc[k], to_f<T>(wc[q].v[k]), acc);
        }
    }
    return warp_sum(acc);
}

template <typename T, bool GATED, bool VEC>
__global__ void __launch_bounds__(EX_THREADS) excess_rows_ffn(
    const T* __restrict__ x, int d, const T* __restrict__ w_first, const T* __restrict__ w_up,
    const T* __restrict__ w_down, int n, const int* __restrict__ rows, const int* __restrict__ count, int start,
    T* __restrict__ y, float* __restrict__ row_l1, float* __restrict__ part, float* __restrict__ part_l1)
{
    constexpr int CW = Vec<T, VEC>::N;
    extern __shared__ float ex_smem[];
    __shared__ float l1_warps[EX_THREADS / 32];
    __shared__ int s_nact;
    float* xs = ex_smem;                                               // d
    float* hs = xs + d;                                                // n (slice-local)
    unsigned char* act = reinterpret_cast<unsigned char*>(hs + n);     // n (slice-local)
    unsigned short* list = reinterpret_cast<unsigned short*>(act + ((n + 1) & ~1));   // n (slice-local)
    const int R = *count - start;
    if (R <= 0) return;
    const int G = gridDim.x;
    const int S = R >= G ? 1 : G / R;
    const int ns = (n + S - 1) / S;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = EX_THREADS / 32;
    for (int it = blockIdx.x; it < R * S; it += G) {
        const int i = it / S, s = it - i * S;
        const long long row = rows[start + i];
        const int j0 = s * ns, len = max(0, min(n, j0 + ns) - j0);
        __syncthreads();                                               // the previous item's reads are done
        for (int k = threadIdx.x; k < d; k += EX_THREADS) xs[k] = to_f<T>(x[row * d + k]);
        __syncthreads();
        for (int jj = warp; jj < len; jj += warps) {
            const long long j = j0 + jj;
            const float z = to_f<T>(from_f<T>(excess_dot<T, VEC>(w_first + j * d, xs, d)));
            const bool a = !(z <= 0.f);
            float h = z;
            if (GATED && a) h = to_f<T>(from_f<T>(z * to_f<T>(from_f<T>(excess_dot<T, VEC>(w_up + j * d, xs, d)))));
            if (lane == 0) { hs[jj] = a ? h : 0.f; act[jj] = a; }
        }
        __syncthreads();
        if (warp == 0) {                                               // the active list, in neuron order
            int nact = 0;
            for (int b = 0; b < len; b += 32) {
                const bool a = b + lane < len && act[b + lane];
                const unsigned m = __ballot_sync(0xffffffffu, a);
                if (a) list[nact + __popc(m & ((1u << lane) - 1u))] = (unsigned short)(b + lane);
                nact += __popc(m);
            }
            if (lane == 0) s_nact = nact;
        }
        float l1 = 0.f;
        if (row_l1 != nullptr)                                         // CTA-uniform
            for (int jj = threadIdx.x; jj < len; jj += EX_THREADS) l1 += fabsf(hs[jj]);
        __syncthreads();
        const int nact = s_nact;
        if (row_l1 != nullptr) {
            l1 = block_sum_n<EX_THREADS>(l1, l1_warps);
            if (threadIdx.x == 0) {
                if (S == 1) row_l1[row] = l1;
                else part_l1[it] = l1;
            }
        }
        for (int c = threadIdx.x; c < d / CW; c += EX_THREADS) {
            float acc[CW];
#pragma unroll
            for (int k = 0; k < CW; ++k) acc[k] = 0.f;
            for (int e0 = 0; e0 < nact; e0 += EX_UNROLL) {
                Chunk<T, CW, VEC> wc[EX_UNROLL];
#pragma unroll
                for (int q = 0; q < EX_UNROLL; ++q)
                    if (e0 + q < nact) wc[q].load(w_down + (long long)(j0 + list[e0 + q]) * d + c * CW);
#pragma unroll
                for (int q = 0; q < EX_UNROLL; ++q) {
                    if (e0 + q >= nact) break;
                    const float h = hs[list[e0 + q]];
#pragma unroll
                    for (int k = 0; k < CW; ++k) acc[k] = fmaf(h, to_f<T>(wc[q].v[k]), acc[k]);
                }
            }
            if (S == 1) {
                __align__(16) T out[CW];
#pragma unroll
                for (int k = 0; k < CW; ++k) out[k] = from_f<T>(acc[k]);
                if (VEC) *reinterpret_cast<uint4*>(y + row * d + c * CW) = *reinterpret_cast<const uint4*>(out);
                else y[row * d + c] = out[0];
            } else {
#pragma unroll
                for (int k = 0; k < CW; ++k) part[(long long)it * d + c * CW + k] = acc[k];
            }
        }
    }
}

// The second half of excess_rows_ffn when it split rows (S = G / R >= 2): y[rows[start + i]] = the sum over the S
// splits, in split order, of the fp32 partials, rounded to T; row_l1 likewise.  No work otherwise.
template <typename T>
__global__ void __launch_bounds__(256) excess_rows_reduce(
    const int* __restrict__ rows, const int* __restrict__ count, int start, int G, int d,
    const float* __restrict__ part, const float* __restrict__ part_l1, T* __restrict__ y, float* __restrict__ row_l1)
{
    const int R = *count - start;
    if (R <= 0 || G / R < 2) return;                                   // S = 1: excess_rows_ffn wrote y
    const int S = G / R;
    const long long total = (long long)R * d;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total; e += (long long)gridDim.x * blockDim.x) {
        const int i = (int)(e / d), c = (int)(e - (long long)i * d);
        float acc = 0.f;
        for (int s = 0; s < S; ++s) acc += part[((long long)i * S + s) * d + c];
        y[(long long)rows[start + i] * d + c] = from_f<T>(acc);
        if (row_l1 != nullptr && c == 0) {
            float l1 = 0.f;
            for (int s = 0; s < S; ++s) l1 += part_l1[i * S + s];
            row_l1[rows[start + i]] = l1;
        }
    }
}

// Training statistics in one launch (one CTA of 1024 threads): out[0] = sum(row_l1) / M (float64
// accumulation in a fixed order), out[1] = nnz_all / M.
__global__ void __launch_bounds__(1024) train_stats(const float* __restrict__ row_l1, int M,
                                                    const long long* __restrict__ nnz_all, double* __restrict__ out)
{
    __shared__ double ws[32];
    double s = 0.0;
    for (int r = threadIdx.x; r < M; r += 1024) s += (double)row_l1[r];
    s = block_sum_n<1024>(s, ws);
    if (threadIdx.x == 0) {
        const double m = (double)max(M, 1);
        out[0] = s / m;
        out[1] = (double)(*nnz_all) / m;
    }
}

