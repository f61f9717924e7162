// ffn_backward.cu -- backward of the hybrid-routed gated FFN (training), compact rows.
//
// With h = g * u on the pattern of g = relu(z) and the L1 term s * sum|h| (s = lambda / M):
//   dh_e = dy[t] . w_down[j] + s * sign(h_e)     (SDDMM on the pattern)
//   du_e = dh_e * g_e,  dz_e = dh_e * u_e        (the pattern is where z > 0)
//   dx[t] = sum_e du_e w_up[j] + dz_e w_gate[j]  (token-major, one accumulator)
//   dw_up[j] = sum_e du_e x[t], dw_gate[j] = sum_e dz_e x[t], dw_down[j] = sum_e h_e dy[t]
//                                                (neuron-major: each gathered x row serves two products)
// Token-major kernels: one warp per row (fast path) or one CTA per row (any d / dtype).  Neuron-major
// kernel: one CTA per (neuron, chunk of <= WG_CHUNK entries); chunks of neurons with more entries write
// fp32 partials that reduce_weight_partials sums in chunk order.  No atomics on values: every result
// is bitwise reproducible.  Dense-backup rows are handled by cuBLAS on the host side (their
// contributions to the weight gradients are added here, before the single rounding).
#include "ffn_common.cuh"

__device__ __forceinline__ float sign_of(float v) { return (float)((v > 0.f) - (v < 0.f)); }

// ---------------------------------------------------------------- token-major, warp per row
template <typename T, int NC>
__global__ void __launch_bounds__(32 * WARP_KERNEL_WARPS) csr_backward_warp(
    const T* __restrict__ dy, const int* __restrict__ row_ptr, const int* __restrict__ col_indices,
    const T* __restrict__ g_values, const T* __restrict__ u_values, const int* __restrict__ backup_slot,
    const T* __restrict__ w_gate, const T* __restrict__ w_up, const T* __restrict__ w_down,
    int M, float l1_scale, T* __restrict__ dx, float* __restrict__ du, float* __restrict__ dz,
    int* __restrict__ work_counter)
{
    constexpr int D = NC * 256;
    __shared__ int s_col[WARP_KERNEL_WARPS][MAX_LIST];
    __shared__ float s_g[WARP_KERNEL_WARPS][MAX_LIST];
    __shared__ float s_u[WARP_KERNEL_WARPS][MAX_LIST];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const T* tag = nullptr;
    int* lcol = s_col[warp];
    float* lg = s_g[warp];
    float* lu = s_u[warp];
    for (;;) {
        const int row = next_row(work_counter);
        if (row >= M) break;
        if (backup_slot[row] >= 0) continue;
        const int p0 = row_ptr[row];
        const int len = min(row_ptr[row + 1] - p0, MAX_LIST);
        for (int i = lane; i < len; i += 32) {
            lcol[i] = col_indices[p0 + i];
            lg[i] = to_f<T>(g_values[p0 + i]);
            lu[i] = to_f<T>(u_values[p0 + i]);
        }
        __syncwarp();
        uint4 dyr[NC];
        load_row_stream<T, NC>(dy + (long long)row * D, dyr);
        float acc[NC][8];
        zero_acc<NC>(acc);
        for (int e = 0; e < len; ++e) {
            const long long off = (long long)lcol[e] * D;
            uint4 wd[NC], wu[NC], wg[NC];
#pragma unroll
            for (int k = 0; k < NC; ++k) {
                wd[k] = __ldg(reinterpret_cast<const uint4*>(w_down + off) + k * 32 + lane);
                wu[k] = __ldg(reinterpret_cast<const uint4*>(w_up + off) + k * 32 + lane);
                wg[k] = __ldg(reinterpret_cast<const uint4*>(w_gate + off) + k * 32 + lane);
            }
            float dot = 0.f;
#pragma unroll
            for (int k = 0; k < NC; ++k) {
                float fa[8], fb[8];
                unpack8(wd[k], fa, tag);
                unpack8(dyr[k], fb, tag);
#pragma unroll
                for (int i = 0; i < 8; ++i) dot = fmaf(fa[i], fb[i], dot);
            }
            const float g = lg[e], u = lu[e];
            const float dh = warp_sum(dot) + l1_scale * sign_of(g * u);
            const float cu = dh * g, cz = dh * u;
            if (lane == 0) { du[p0 + e] = cu; dz[p0 + e] = cz; }
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

// ---------------------------------------------------------------- token-major, CTA per row (any d)
template <typename T, bool VEC>
__global__ void __launch_bounds__(FFN_THREADS) csr_backward(
    const T* __restrict__ dy, const int* __restrict__ row_ptr, const int* __restrict__ col_indices,
    const T* __restrict__ g_values, const T* __restrict__ u_values, const int* __restrict__ backup_slot,
    const T* __restrict__ w_gate, const T* __restrict__ w_up, const T* __restrict__ w_down,
    int M, int d, float l1_scale, T* __restrict__ dx, float* __restrict__ du, float* __restrict__ dz)
{
    constexpr int CW = Vec<T, VEC>::N;
    typedef Chunk<T, CW, VEC> C;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* dys = reinterpret_cast<T*>(smem_raw);
    __shared__ int l_col[MAX_LIST];
    __shared__ float l_du[MAX_LIST];
    __shared__ float l_dz[MAX_LIST];
    const int row = blockIdx.x;
    if (row >= M || backup_slot[row] >= 0) return;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int p0 = row_ptr[row];
    const int len = min(row_ptr[row + 1] - p0, MAX_LIST);
    const int d_chunks = d / CW;
    stage_row<T, VEC>(dy + (long long)row * d, d, dys);
    for (int i = tid; i < len; i += FFN_THREADS) l_col[i] = col_indices[p0 + i];
    __syncthreads();
    // Phase A: dh per entry (warp per entry), du / dz to shared and global memory.
    for (int e = warp; e < len; e += FFN_WARPS) {
        const T* wr = w_down + (long long)l_col[e] * d;
        float acc = 0.f;
#pragma unroll 4
        for (int c = lane; c < d_chunks; c += 32) {
            C w; w.load(wr + c * CW);
#pragma unroll
            for (int k = 0; k < CW; ++k) acc = fmaf(to_f<T>(w.v[k]), to_f<T>(dys[c * CW + k]), acc);
        }
        acc = warp_sum(acc);
        if (lane == 0) {
            const float g = to_f<T>(g_values[p0 + e]), u = to_f<T>(u_values[p0 + e]);
            const float dh = acc + l1_scale * sign_of(g * u);
            l_du[e] = dh * g;
            l_dz[e] = dh * u;
            du[p0 + e] = dh * g;
            dz[p0 + e] = dh * u;
        }
    }
    __syncthreads();
    // Phase B: dx row, thread per 16-byte chunk, entries in list order.
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

// ---------------------------------------------------------------- neuron-major weight gradients
#define WG_THREADS 256
#define WG_CHUNK 128
// Item -> neuron: the last j with item_ptr[j] <= item (item_ptr has n + 1 entries, non-decreasing).
__device__ __forceinline__ int neuron_of_item(const int* __restrict__ item_ptr, int n, int item) {
    int lo = 0, hi = n;  // answer in [lo, hi)
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (item_ptr[mid] <= item) lo = mid; else hi = mid;
    }
    return lo;
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(WG_THREADS) weight_grads(
    const T* __restrict__ x, const T* __restrict__ dy, const int* __restrict__ col_ptr,
    const int* __restrict__ row_indices, const int* __restrict__ positions,
    const T* __restrict__ g_values, const T* __restrict__ u_values,
    const float* __restrict__ du, const float* __restrict__ dz,
    const int* __restrict__ item_ptr, const int* __restrict__ partial_ptr, int n, int d, int has_backup,
    T* __restrict__ dw_gate, T* __restrict__ dw_up, T* __restrict__ dw_down, float* __restrict__ partial)
{
    constexpr int CW = Vec<T, VEC>::N;
    typedef Chunk<T, CW, VEC> C;
    __shared__ int s_row[WG_CHUNK];
    __shared__ float s_du[WG_CHUNK], s_dz[WG_CHUNK], s_h[WG_CHUNK];
    const int item = blockIdx.x;
    if (item >= item_ptr[n]) return;
    const int j = neuron_of_item(item_ptr, n, item);
    const int k = item - item_ptr[j];
    const int items_j = item_ptr[j + 1] - item_ptr[j];
    const int e0 = col_ptr[j] + k * WG_CHUNK;
    const int len = max(0, min(WG_CHUNK, col_ptr[j + 1] - e0));
    const int tid = threadIdx.x;
    for (int i = tid; i < len; i += WG_THREADS) {
        const int pos = positions[e0 + i];
        s_row[i] = row_indices[e0 + i];
        s_du[i] = du[pos];
        s_dz[i] = dz[pos];
        s_h[i] = to_f<T>(g_values[pos]) * to_f<T>(u_values[pos]);
    }
    __syncthreads();
    const int d_chunks = d / CW;
    for (int c = tid; c < d_chunks; c += WG_THREADS) {
        float au[CW], ag[CW], ad[CW];
#pragma unroll
        for (int q = 0; q < CW; ++q) au[q] = ag[q] = ad[q] = 0.f;
        int i = 0;
        for (; i + 4 <= len; i += 4) {
            C xv[4], dv[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const long long off = (long long)s_row[i + r] * d + c * CW;
                xv[r].load(x + off);
                dv[r].load(dy + off);
            }
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const float cu = s_du[i + r], cz = s_dz[i + r], ch = s_h[i + r];
#pragma unroll
                for (int q = 0; q < CW; ++q) {
                    const float xf = to_f<T>(xv[r].v[q]);
                    au[q] = fmaf(cu, xf, au[q]);
                    ag[q] = fmaf(cz, xf, ag[q]);
                    ad[q] = fmaf(ch, to_f<T>(dv[r].v[q]), ad[q]);
                }
            }
        }
        for (; i < len; ++i) {
            const long long off = (long long)s_row[i] * d + c * CW;
            C xv, dv;
            xv.load(x + off);
            dv.load(dy + off);
            const float cu = s_du[i], cz = s_dz[i], ch = s_h[i];
#pragma unroll
            for (int q = 0; q < CW; ++q) {
                const float xf = to_f<T>(xv.v[q]);
                au[q] = fmaf(cu, xf, au[q]);
                ag[q] = fmaf(cz, xf, ag[q]);
                ad[q] = fmaf(ch, to_f<T>(dv.v[q]), ad[q]);
            }
        }
        const long long o = (long long)j * d + c * CW;
        if (items_j == 1) {
#pragma unroll
            for (int q = 0; q < CW; ++q) {
                const float bu = has_backup ? to_f<T>(dw_up[o + q]) : 0.f;
                const float bg = has_backup ? to_f<T>(dw_gate[o + q]) : 0.f;
                const float bd = has_backup ? to_f<T>(dw_down[o + q]) : 0.f;
                dw_up[o + q] = from_f<T>(au[q] + bu);
                dw_gate[o + q] = from_f<T>(ag[q] + bg);
                dw_down[o + q] = from_f<T>(ad[q] + bd);
            }
        } else {
            float* p = partial + (long long)(partial_ptr[j] + k) * 3 * d + c * CW;
#pragma unroll
            for (int q = 0; q < CW; ++q) {
                p[q] = au[q];
                p[d + q] = ag[q];
                p[2 * d + q] = ad[q];
            }
        }
    }
}

// Neurons split over several chunks: sum the partials in chunk order, add the backup part, round once.
template <typename T>
__global__ void reduce_weight_partials(const int* __restrict__ item_ptr, const int* __restrict__ partial_ptr,
                                       const float* __restrict__ partial, int n, int d, int has_backup,
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
    if (has_backup) {
        su += to_f<T>(dw_up[o]);
        sg += to_f<T>(dw_gate[o]);
        sd += to_f<T>(dw_down[o]);
    }
    dw_up[o] = from_f<T>(su);
    dw_gate[o] = from_f<T>(sg);
    dw_down[o] = from_f<T>(sd);
    }
}

// Dense backup rows: from dh = dy_b w_down^T (R, n), g_b, u_b: du, dz (with the L1 term) and h, rounded.
template <typename T>
__global__ void backup_row_grads(const T* __restrict__ dh, const T* __restrict__ g, const T* __restrict__ u,
                                 long long total, float l1_scale, T* __restrict__ du, T* __restrict__ dz,
                                 T* __restrict__ h)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const float gv = to_f<T>(g[i]), uv = to_f<T>(u[i]);
        const float hv = gv * uv;
        const float active = gv > 0.f ? 1.f : 0.f;
        const float dhv = to_f<T>(dh[i]) + l1_scale * sign_of(hv);
        du[i] = from_f<T>(dhv * gv);
        dz[i] = from_f<T>(dhv * uv * active);
        h[i] = from_f<T>(hv);
    }
}
