// ffn_backward.cu -- backward of the hybrid-routed gated FFN (training), compact rows.
//
// With h = g * u on the pattern of g = relu(z) and the L1 term s * sum|h| (s = lambda / M):
//   dh_e = dy[t] . w_down[j] + s * sign(h_e)     (SDDMM on the pattern)
//   du_e = dh_e * g_e,  dz_e = dh_e * u_e        (the pattern is where z > 0)
//   dx[t] = sum_e du_e w_up[j] + dz_e w_gate[j]  (token-major, one accumulator)
//   dw_up[j] = sum_e du_e x[t], dw_gate[j] = sum_e dz_e x[t], dw_down[j] = sum_e h_e dy[t]
// Three passes, each gathering one kind of row (docs/performance-history.md, v8):
//   dh_dw_down  neuron-major, gathers dy rows: each dy[t] serves both dh_e (dot with the CTA's one
//               w_down[j] row) and dw_down[j]; writes du, dz per entry (fp32).
//   dw_up_gate  neuron-major, gathers x rows: each x[t] serves dw_up[j] and dw_gate[j].
//   csr_dx      token-major, gathers w_up[j] and w_gate[j] rows: dx (one warp or one CTA per row).
// so a (token, neuron) pair moves 16 KiB instead of 20 KiB (the token-major dh pass re-gathered w_down),
// and each pass's gathered working set is one or two arrays, not three.  Neuron-major kernels: one CTA
// per (neuron, chunk of <= WG_CHUNK entries); chunks of neurons with more entries write fp32 partials
// that reduce_weight_partials sums in chunk order.  No atomics on values: every result is bitwise
// reproducible.  Dense-backup rows are handled by cuBLAS afterwards (their contributions are added into
// dx and the weight gradients by GEMMs with beta = 1, queued behind these kernels).
#include "ffn_common.cuh"

__device__ __forceinline__ float sign_of(float v) { return (float)((v > 0.f) - (v < 0.f)); }
// ---------------------------------------------------------------- token-major dx, warp per row
// dx[row] = sum_e du_e w_up[j_e] + dz_e w_gate[j_e], entries in row order; the next entry's weight rows
// are in flight while the current ones are accumulated.
template <typename T, int NC>
__global__ void __launch_bounds__(32 * WARP_KERNEL_WARPS) csr_dx_warp(
    const int* __restrict__ row_ptr, const int* __restrict__ col_indices, const float* __restrict__ du,
    const float* __restrict__ dz, const int* __restrict__ backup_slot, const T* __restrict__ w_gate,
    const T* __restrict__ w_up, int M, T* __restrict__ dx, int* __restrict__ work_counter)
{
    constexpr int D = NC * 256;
    __shared__ int s_col[WARP_KERNEL_WARPS][MAX_LIST];
    __shared__ float s_du[WARP_KERNEL_WARPS][MAX_LIST];
    __shared__ float s_dz[WARP_KERNEL_WARPS][MAX_LIST];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const T* tag = nullptr;
    int* lcol = s_col[warp];
    float* lu = s_du[warp];
    float* lz = s_dz[warp];
    for (;;) {
        const int row = next_row(work_counter);
        if (row >= M) break;
        if (backup_slot[row] >= 0) continue;
        const int p0 = row_ptr[row];
        const int len = min(row_ptr[row + 1] - p0, MAX_LIST);
        for (int i = lane; i < len; i += 32) {
            lcol[i] = col_indices[p0 + i];
            lu[i] = du[p0 + i];
            lz[i] = dz[p0 + i];
        }
        __syncwarp();
        float acc[NC][8];
        zero_acc<NC>(acc);
        for (int e = 0; e < len; ++e) {
            const long long off = (long long)lcol[e] * D;
            uint4 wu[NC], wg[NC];
#pragma unroll
            for (int k = 0; k < NC; ++k) {
                wu[k] = __ldg(reinterpret_cast<const uint4*>(w_up + off) + k * 32 + lane);
                wg[k] = __ldg(reinterpret_cast<const uint4*>(w_gate + off) + k * 32 + lane);
            }
            const float cu = lu[e], cz = lz[e];
#pragma unroll
            for (int k = 0; k < NC; ++k) {
                float fu[8], fg[8];
                unpack8(wu[k], fu, tag);
                unpack8(wg[k], fg, tag);
#pragma unroll
                for (int i = 0; i < 8; ++i) acc[k][i] = fmaf(cz, fg[i], fmaf(cu, fu[i], acc[k][i]));
            }
        }
        store_row_stream<T, NC>(dx + (long long)row * D, acc);
        __syncwarp();
    }
}

// ---------------------------------------------------------------- token-major dx, CTA per row (any d)
template <typename T, bool VEC>
__global__ void __launch_bounds__(FFN_THREADS) csr_dx(
    const int* __restrict__ row_ptr, const int* __restrict__ col_indices, const float* __restrict__ du,
    const float* __restrict__ dz, const int* __restrict__ backup_slot, const T* __restrict__ w_gate,
    const T* __restrict__ w_up, int M, int d, T* __restrict__ dx)
{
    constexpr int CW = Vec<T, VEC>::N;
    typedef Chunk<T, CW, VEC> C;
    __shared__ int l_col[MAX_LIST];
    __shared__ float l_du[MAX_LIST];
    __shared__ float l_dz[MAX_LIST];
    const int row = blockIdx.x;
    if (row >= M || backup_slot[row] >= 0) return;
    const int tid = threadIdx.x;
    const int p0 = row_ptr[row];
    const int len = min(row_ptr[row + 1] - p0, MAX_LIST);
    const int d_chunks = d / CW;
    for (int i = tid; i < len; i += FFN_THREADS) {
        l_col[i] = col_indices[p0 + i];
        l_du[i] = du[p0 + i];
        l_dz[i] = dz[p0 + i];
    }
    __syncthreads();
    for (int c = tid; c < d_chunks; c += FFN_THREADS) {
        float acc[CW];
#pragma unroll
        for (int k = 0; k < CW; ++k) acc[k] = 0.f;
        for (int e = 0; e < len; ++e) {
            const long long off = (long long)l_col[e] * d + c * CW;
            C wu, wg;
            wu.load(w_up + off);
            wg.load(w_gate + off);
            const float cu = l_du[e], cz = l_dz[e];
#pragma unroll
            for (int k = 0; k < CW; ++k) acc[k] = fmaf(cz, to_f<T>(wg.v[k]), fmaf(cu, to_f<T>(wu.v[k]), acc[k]));
        }
        T* dst = dx + (long long)row * d + c * CW;
#pragma unroll
        for (int k = 0; k < CW; ++k) dst[k] = from_f<T>(acc[k]);
    }
}

// ---------------------------------------------------------------- neuron-major passes
#define WG_THREADS 256
#define WG_WARPS (WG_THREADS / 32)
#define WG_CHUNK 128
#define WG_GROUP 8      // gathered rows in flight per thread
// Item -> neuron: the last j with item_ptr[j] <= item (item_ptr has n + 1 entries, non-decreasing).
__device__ __forceinline__ int neuron_of_item(const int* __restrict__ item_ptr, int n, int item) {
    int lo = 0, hi = n;  // answer in [lo, hi)
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (item_ptr[mid] <= item) lo = mid; else hi = mid;
    }
    return lo;
}

// The CTA's work item: neuron j, entries [e0, e0 + len) of its column, and where its result goes.
struct WgItem {
    int j, k, items_j, e0, len;
};
__device__ __forceinline__ bool wg_item(const int* __restrict__ item_ptr, const int* __restrict__ col_ptr, int n,
                                        WgItem& w) {
    const int item = blockIdx.x;
    if (item >= item_ptr[n]) return false;
    w.j = neuron_of_item(item_ptr, n, item);
    w.k = item - item_ptr[w.j];
    w.items_j = item_ptr[w.j + 1] - item_ptr[w.j];
    w.e0 = col_ptr[w.j] + w.k * WG_CHUNK;
    w.len = max(0, min(WG_CHUNK, col_ptr[w.j + 1] - w.e0));
    return true;
}

// Sum WG_GROUP per-lane values over the warp with 4 + 2 + 1 + 2 shuffles (instead of 8 x 5): afterwards
// lane l with (l & 3) == 0 holds the warp total of value (l >> 2).  Fixed order: bitwise reproducible.
__device__ __forceinline__ float warp_sum_group8(const float (&v)[WG_GROUP]) {
    const int lane = threadIdx.x & 31;
    float a[4];
    const bool hi16 = lane & 16;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float keep = hi16 ? v[i + 4] : v[i], send = hi16 ? v[i] : v[i + 4];
        a[i] = keep + __shfl_xor_sync(0xffffffffu, send, 16);
    }
    float b[2];
    const bool hi8 = lane & 8;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const float keep = hi8 ? a[i + 2] : a[i], send = hi8 ? a[i] : a[i + 2];
        b[i] = keep + __shfl_xor_sync(0xffffffffu, send, 8);
    }
    const bool hi4 = lane & 4;
    float c = (hi4 ? b[1] : b[0]) + __shfl_xor_sync(0xffffffffu, hi4 ? b[0] : b[1], 4);
    c += __shfl_xor_sync(0xffffffffu, c, 2);
    c += __shfl_xor_sync(0xffffffffu, c, 1);
    // value index held: bit 2 of it from lane bit 4, bit 1 from lane bit 3, bit 0 from lane bit 2
    return c;
}

// ---------------------------------------------------------------- work plan of the neuron-major passes
// A neuron with c entries is max(ceil(c / WG_CHUNK), 1) work items; one with more than one item writes
// that many fp32 partials.  One CTA of PLAN_THREADS each (n is d_ff: a few thousand).
#define PLAN_THREADS 1024
__device__ __forceinline__ int wg_items_of(int c) { return max((c + WG_CHUNK - 1) / WG_CHUNK, 1); }

// bounds[0] = work items, bounds[1] = partial slots, from per-neuron counts that bound the compact counts
// (the forward's counts include backup rows): sizes the backward's grid and workspace at the one host sync.
__global__ void __launch_bounds__(PLAN_THREADS) weight_grad_bounds(const int* __restrict__ neuron_counts, int n,
                                                                   int* __restrict__ bounds)
{
    __shared__ int ws[PLAN_THREADS / 32];
    int items = 0, partials = 0;
    for (int j = threadIdx.x; j < n; j += PLAN_THREADS) {
        const int it = wg_items_of(neuron_counts[j]);
        items += it;
        partials += it > 1 ? it : 0;
    }
    items = block_sum_n<PLAN_THREADS>(items, ws);
    partials = block_sum_n<PLAN_THREADS>(partials, ws);
    if (threadIdx.x == 0) { bounds[0] = items; bounds[1] = partials; }
}

// item_ptr[0..n], partial_ptr[0..n]: exclusive prefixes of each neuron's items and partial slots, from the
// compact pattern's column offsets col_ptr[0..n].
__global__ void __launch_bounds__(PLAN_THREADS) weight_grad_items(const int* __restrict__ col_ptr, int n,
                                                                  int* __restrict__ item_ptr,
                                                                  int* __restrict__ partial_ptr)
{
    __shared__ int ws[PLAN_THREADS / 32];
    int carry_items = 0, carry_partials = 0;
    for (int j0 = 0; j0 < n; j0 += PLAN_THREADS) {
        const int j = j0 + threadIdx.x;
        const int it = j < n ? wg_items_of(col_ptr[j + 1] - col_ptr[j]) : 0;
        int total_items, total_partials;
        const int ei = block_exclusive_scan_n<PLAN_THREADS>(it, ws, total_items);
        const int ep = block_exclusive_scan_n<PLAN_THREADS>(it > 1 ? it : 0, ws, total_partials);
        if (j < n) { item_ptr[j] = carry_items + ei; partial_ptr[j] = carry_partials + ep; }
        carry_items += total_items;
        carry_partials += total_partials;
    }
    if (threadIdx.x == 0) { item_ptr[n] = carry_items; partial_ptr[n] = carry_partials; }
}

// Store one finished weight-gradient chunk: the result itself when the neuron is one item, else an fp32
// partial for reduce_weight_partials.
template <typename T, int CW>
__device__ __forceinline__ void wg_store(const WgItem& w, int d, int c, int slot, const float (&acc)[CW],
                                         T* __restrict__ dst, const int* __restrict__ partial_ptr,
                                         float* __restrict__ partial) {
    if (w.items_j == 1) {
        const long long o = (long long)w.j * d + c * CW;
#pragma unroll
        for (int q = 0; q < CW; ++q) dst[o + q] = from_f<T>(acc[q]);
    } else {
        float* p = partial + ((long long)(partial_ptr[w.j] + w.k) * 3 + slot) * d + c * CW;
#pragma unroll
        for (int q = 0; q < CW; ++q) p[q] = acc[q];
    }
}

// Pass 1 (gathers dy): dh_e = dy[t_e] . w_down[j] + s sign(h_e); du_e = dh_e g_e, dz_e = dh_e u_e written at the
// entry's row-major position; dw_down[j] = sum_e h_e dy[t_e] (partial slot 2).
template <typename T, bool VEC>
__global__ void __launch_bounds__(WG_THREADS) dh_dw_down(
    const T* __restrict__ dy, const int* __restrict__ col_ptr, const int* __restrict__ row_indices,
    const int* __restrict__ positions, const T* __restrict__ g_values, const T* __restrict__ u_values,
    const T* __restrict__ w_down, const int* __restrict__ item_ptr, const int* __restrict__ partial_ptr,
    int n, int d, float l1_scale, float* __restrict__ du, float* __restrict__ dz,
    T* __restrict__ dw_down, float* __restrict__ partial)
{
    constexpr int CW = Vec<T, VEC>::N;
    typedef Chunk<T, CW, VEC> C;
    __shared__ int s_row[WG_CHUNK];
    __shared__ float s_g[WG_CHUNK], s_u[WG_CHUNK], s_h[WG_CHUNK];
    __shared__ float s_dot[WG_WARPS][WG_CHUNK];
    WgItem w;
    if (!wg_item(item_ptr, col_ptr, n, w)) return;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    for (int i = tid; i < WG_CHUNK; i += WG_THREADS) {
        float g = 0.f, u = 0.f;
        int r = 0;
        if (i < w.len) {
            const int pos = positions[w.e0 + i];
            r = row_indices[w.e0 + i];
            g = to_f<T>(g_values[pos]);
            u = to_f<T>(u_values[pos]);
        }
        s_row[i] = r;
        s_g[i] = g;
        s_u[i] = u;
        s_h[i] = g * u;
#pragma unroll
        for (int q = 0; q < WG_WARPS; ++q) s_dot[q][i] = 0.f;
    }
    __syncthreads();
    const int d_chunks = d / CW;
    const long long wrow = (long long)w.j * d;
    // Warp-uniform loop over this thread's chunks: every lane of a warp shuffles in every round.
    for (int c0 = warp * 32; c0 < d_chunks; c0 += WG_THREADS) {
        const int c = c0 + lane;
        const bool on = c < d_chunks;
        float wf[CW], ad[CW];
        {
            C wv;
            if (on) wv.load(w_down + wrow + c * CW); else wv.load_partial(w_down, 0);
#pragma unroll
            for (int q = 0; q < CW; ++q) { wf[q] = to_f<T>(wv.v[q]); ad[q] = 0.f; }
        }
        for (int i = 0; i < w.len; i += WG_GROUP) {
            C dv[WG_GROUP];
#pragma unroll
            for (int r = 0; r < WG_GROUP; ++r) {
                if (on && i + r < w.len) dv[r].load(dy + (long long)s_row[i + r] * d + c * CW);
                else dv[r].load_partial(dy, 0);
            }
            float part[WG_GROUP];
#pragma unroll
            for (int r = 0; r < WG_GROUP; ++r) {
                const float h = s_h[i + r];
                float p = 0.f;
#pragma unroll
                for (int q = 0; q < CW; ++q) {
                    const float f = to_f<T>(dv[r].v[q]);
                    p = fmaf(wf[q], f, p);
                    ad[q] = fmaf(h, f, ad[q]);
                }
                part[r] = p;
            }
            const float tot = warp_sum_group8(part);
            const int r = ((lane >> 4) & 1) * 4 + ((lane >> 3) & 1) * 2 + ((lane >> 2) & 1);
            if ((lane & 3) == 0 && i + r < w.len) s_dot[warp][i + r] += tot;
        }
        if (on) wg_store<T, CW>(w, d, c, 2, ad, dw_down, partial_ptr, partial);
    }
    __syncthreads();
    for (int i = tid; i < w.len; i += WG_THREADS) {
        float s = 0.f;
#pragma unroll
        for (int q = 0; q < WG_WARPS; ++q) s += s_dot[q][i];
        const float g = s_g[i], u = s_u[i];
        const float dh = s + l1_scale * sign_of(g * u);
        const int pos = positions[w.e0 + i];
        du[pos] = dh * g;
        dz[pos] = dh * u;
    }
}

// Pass 2 (gathers x): dw_up[j] = sum_e du_e x[t_e], dw_gate[j] = sum_e dz_e x[t_e] (partial slots 0 and 1).
template <typename T, bool VEC>
__global__ void __launch_bounds__(WG_THREADS) dw_up_gate(
    const T* __restrict__ x, const int* __restrict__ col_ptr, const int* __restrict__ row_indices,
    const int* __restrict__ positions, const float* __restrict__ du, const float* __restrict__ dz,
    const int* __restrict__ item_ptr, const int* __restrict__ partial_ptr, int n, int d,
    T* __restrict__ dw_gate, T* __restrict__ dw_up, float* __restrict__ partial)
{
    constexpr int CW = Vec<T, VEC>::N;
    typedef Chunk<T, CW, VEC> C;
    // Gathered x rows in flight per thread.  WG_GROUP (8) for every instantiation but the vectorized
    // fp32 one, which takes 4: with 8 rows ptxas 12.x (NVRTC of the cuda12 extra) squeezes that kernel
    // into 32 registers and spills 4 bytes to local memory (ptxas 13.x: 44 registers, no spill); with 4
    // rows (16 load registers + 8 accumulators) it fits in 32 registers without a spill under both.
    // The 16-bit kernels (the hot path) and fp32 scalar one keep 8 rows: their code is unchanged.  G must
    // divide WG_CHUNK: s_du / s_dz[i + r] are read for every r < G, past w.len too.
    constexpr int G = (VEC && sizeof(T) == 4) ? 4 : WG_GROUP;
    static_assert(WG_CHUNK % G == 0, "the row groups must tile WG_CHUNK");
    __shared__ int s_row[WG_CHUNK];
    __shared__ float s_du[WG_CHUNK], s_dz[WG_CHUNK];
    WgItem w;
    if (!wg_item(item_ptr, col_ptr, n, w)) return;
    const int tid = threadIdx.x;
    for (int i = tid; i < WG_CHUNK; i += WG_THREADS) {
        float a = 0.f, b = 0.f;
        int r = 0;
        if (i < w.len) {
            const int pos = positions[w.e0 + i];
            r = row_indices[w.e0 + i];
            a = du[pos];
            b = dz[pos];
        }
        s_row[i] = r;
        s_du[i] = a;
        s_dz[i] = b;
    }
    __syncthreads();
    const int d_chunks = d / CW;
    for (int c = tid; c < d_chunks; c += WG_THREADS) {
        float au[CW], ag[CW];
#pragma unroll
        for (int q = 0; q < CW; ++q) au[q] = ag[q] = 0.f;
        for (int i = 0; i < w.len; i += G) {
            C xv[G];
#pragma unroll
            for (int r = 0; r < G; ++r) {
                if (i + r < w.len) xv[r].load(x + (long long)s_row[i + r] * d + c * CW);
                else xv[r].load_partial(x, 0);
            }
#pragma unroll
            for (int r = 0; r < G; ++r) {
                const float cu = s_du[i + r], cz = s_dz[i + r];
#pragma unroll
                for (int q = 0; q < CW; ++q) {
                    const float xf = to_f<T>(xv[r].v[q]);
                    au[q] = fmaf(cu, xf, au[q]);
                    ag[q] = fmaf(cz, xf, ag[q]);
                }
            }
        }
        wg_store<T, CW>(w, d, c, 0, au, dw_up, partial_ptr, partial);
        wg_store<T, CW>(w, d, c, 1, ag, dw_gate, partial_ptr, partial);
    }
}

// Neurons split over several chunks: sum the partials in chunk order, round once.
template <typename T>
__global__ void reduce_weight_partials(const int* __restrict__ item_ptr, const int* __restrict__ partial_ptr,
                                       const float* __restrict__ partial, int n, int d,
                                       T* __restrict__ dw_gate, T* __restrict__ dw_up, T* __restrict__ dw_down)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= d) return;
    for (int j = blockIdx.y; j < n; j += gridDim.y) {
        const int items_j = item_ptr[j + 1] - item_ptr[j];
        if (items_j <= 1) continue;
        const float* p = partial + (long long)partial_ptr[j] * 3 * d + c;
        float su = 0.f, sg = 0.f, sd = 0.f;
        for (int k = 0; k < items_j; ++k) {
            su += p[(long long)k * 3 * d];
            sg += p[(long long)k * 3 * d + d];
            sd += p[(long long)k * 3 * d + 2 * d];
        }
        const long long o = (long long)j * d + c;
        dw_up[o] = from_f<T>(su);
        dw_gate[o] = from_f<T>(sg);
        dw_down[o] = from_f<T>(sd);
    }
}

// Dense rows (backup rows, or every row on the dense path): from dh = dy_b w_down^T (R, n), g_b, u_b: du, dz
// (with the L1 term) and h, each rounded once.  A streaming kernel (three reads, three writes): 8 elements
// per thread and step, 16-byte accesses when VEC (total % 8 == 0, every array 16-byte aligned).
template <typename T, bool VEC>
__global__ void backup_row_grads(const T* __restrict__ dh, const T* __restrict__ g, const T* __restrict__ u,
                                 long long total, float l1_scale, T* __restrict__ du, T* __restrict__ dz,
                                 T* __restrict__ h)
{
    constexpr int E = 8;
    const long long chunks = (total + E - 1) / E;
    for (long long c = blockIdx.x * (long long)blockDim.x + threadIdx.x; c < chunks;
         c += (long long)gridDim.x * blockDim.x) {
        const long long i0 = c * E;
        const int valid = (int)min((long long)E, total - i0);
        Chunk<T, E, VEC> dc, gc, uc;
        if (VEC) { dc.load(dh + i0); gc.load(g + i0); uc.load(u + i0); }
        else { dc.load_partial(dh + i0, valid); gc.load_partial(g + i0, valid); uc.load_partial(u + i0, valid); }
        __align__(16) T duv[E], dzv[E], hv[E];
#pragma unroll
        for (int k = 0; k < E; ++k) {
            // g is relu'd: 0 for an inactive neuron, which contributes exactly 0 (select, not multiply: dh or
            // u may be non-finite there); NaN gates are entries, as on the compact rows and in the reference.
            const float gv = to_f<T>(gc.v[k]), uv = to_f<T>(uc.v[k]);
            const bool entry = gv != 0.f;
            const float hf = entry ? gv * uv : 0.f;
            const float dhv = to_f<T>(dc.v[k]) + l1_scale * sign_of(hf);
            duv[k] = from_f<T>(entry ? dhv * gv : 0.f);
            dzv[k] = from_f<T>(entry ? dhv * uv : 0.f);
            hv[k] = from_f<T>(hf);
        }
        if (VEC) {
#pragma unroll
            for (int s = 0; s < (int)(E * sizeof(T) / 16); ++s) {
                reinterpret_cast<uint4*>(du + i0)[s] = reinterpret_cast<const uint4*>(duv)[s];
                reinterpret_cast<uint4*>(dz + i0)[s] = reinterpret_cast<const uint4*>(dzv)[s];
                reinterpret_cast<uint4*>(h + i0)[s] = reinterpret_cast<const uint4*>(hv)[s];
            }
        } else {
            for (int k = 0; k < valid; ++k) {
                du[i0 + k] = duv[k];
                dz[i0 + k] = dzv[k];
                h[i0 + k] = hv[k];
            }
        }
    }
}
