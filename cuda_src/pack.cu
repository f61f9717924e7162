// pack.cu -- dense -> TwELL / Hybrid packing, unpacking, and backup-row routing.
//
// Layouts are specified in docs/format.md.  Every kernel is deterministic: entries are placed by
// warp prefix sums in ascending column order, never by atomics (the only atomics are the integer
// per-neuron activity counters, whose result does not depend on order).
#include "common.cuh"

// Route codes written per row by the TwELL pack (docs/format.md, "routing").
#define ROUTE_COMPACT 0
#define ROUTE_THRESHOLD 1
#define ROUTE_OVERFLOW 2

// One warp per row.  Lane l owns columns [l*E, l*E+E) of every tile (E = TILE/32), so a warp
// prefix sum over per-lane counts gives each entry its slot in ascending column order.
// RELU: entries are !(v <= 0) (the gate epilogue); else entries are v != 0.
// VEC: n % E == 0, so every lane chunk is either fully in bounds (vector load) or fully out.
template <typename T, int TILE, bool RELU, bool VEC>
__global__ void __launch_bounds__(256) pack_twell(
    const T* __restrict__ dense, int M, int n, int n_tiles, int slots, int threshold,
    int* __restrict__ counts, u8* __restrict__ indices, T* __restrict__ values,
    int* __restrict__ row_nnz, int* __restrict__ row_route, int* __restrict__ neuron_counts,
    int* __restrict__ totals)
{
    constexpr int E = TILE / 32;
    constexpr int U = 4;                         // tiles whose loads are issued together
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= M) return;
    const T* src = dense + (long long)row * n;
    int nnz = 0;
    bool overflow = false;
    for (int t0 = 0; t0 < n_tiles; t0 += U) {
        Chunk<T, E, VEC> ch[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int col = (t0 + u) * TILE + lane * E;
            if (t0 + u < n_tiles && col < n) {
                if (VEC) ch[u].load(src + col);
                else ch[u].load_partial(src + col, n - col);
            } else {
                ch[u].load_partial(src, 0);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int t = t0 + u;
            if (t >= n_tiles) break;
            const int col0 = t * TILE + lane * E;
            unsigned mask = 0;
#pragma unroll
            for (int k = 0; k < E; ++k)
                if (col0 + k < n && is_entry<RELU>(ch[u].v[k])) mask |= 1u << k;
            const int c = __popc(mask);
            const int incl = warp_inclusive_scan(c);
            const int total = __shfl_sync(0xffffffffu, incl, 31);
            const long long base = ((long long)row * n_tiles + t) * slots;
            int pos = incl - c;
#pragma unroll
            for (int k = 0; k < E; ++k) {
                if (mask & (1u << k)) {
                    if (pos < slots) {
                        indices[base + pos] = (u8)(lane * E + k);
                        values[base + pos] = ch[u].v[k];
                    }
                    if (neuron_counts) atomicAdd(neuron_counts + col0 + k, 1);
                    ++pos;
                }
            }
            for (int s = total + lane; s < slots; s += 32) {
                indices[base + s] = 0;
                values[base + s] = from_f<T>(0.0f);
            }
            if (lane == 0) counts[(long long)row * n_tiles + t] = total;
            nnz += total;
            overflow |= total > slots;
        }
    }
    if (lane == 0) {
        const int route = overflow ? ROUTE_OVERFLOW : (nnz > threshold ? ROUTE_THRESHOLD : ROUTE_COMPACT);
        row_nnz[row] = nnz;
        row_route[row] = route;
        // Integer counts (order-independent): totals[0] backup rows, totals[1] overflowed rows, totals[3]
        // entries of the compact rows (totals[2] is left to the kernels that follow: a work counter).
        if (route != ROUTE_COMPACT) atomicAdd(totals, 1);
        else atomicAdd(totals + 3, nnz);
        if (overflow) atomicAdd(totals + 1, 1);
    }
}

// Backup-row compaction: backup_slot[r] = rank of row r among the routed rows (route != 0) in row
// order, or -1; backup_rows[slot] = r (ascending).  Deterministic.  Two kernels over blocks of
// ROUTE_BLOCK_ROWS rows (coalesced: round i of a block reads rows base + i * ROUTE_THREADS + tid):
// route_rows_count writes each block's (routed, overflowed) counts; route_rows_place gives every block
// the sum of the earlier blocks' counts, then places its rows round by round with a block scan.
// totals[0] = routed (backup) rows, totals[1] = rows routed by tile overflow, totals[2] = 0 (a work
// counter for the kernels that follow).  (Was one CTA with a contiguous row range per thread:
// uncoalesced, 24 us at M = 16,384; then 8 rounds per block, ~18 us for the two kernels: each round is
// a block scan with two barriers, so the latency grows with the rounds -- now one round per block and
// the earlier blocks' counts summed by a warp.)
#define ROUTE_THREADS 1024
#define ROUTE_ROUNDS 1
#define ROUTE_BLOCK_ROWS (ROUTE_THREADS * ROUTE_ROUNDS)

// Sum of block_counts[stride * b + field] over b < n_blocks, by one warp (every lane gets the sum).
template <typename V>
__device__ __forceinline__ V warp_sum_blocks(const V* __restrict__ block_counts, int stride, int field,
                                             int n_blocks)
{
    V s = 0;
    for (int b = threadIdx.x & 31; b < n_blocks; b += 32) s += block_counts[(long long)stride * b + field];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    return s;
}

__global__ void __launch_bounds__(ROUTE_THREADS) route_rows_count(
    const int* __restrict__ row_route, int M, int* __restrict__ block_counts)
{
    __shared__ int warp_sums[ROUTE_THREADS / 32][2];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const long long base = (long long)blockIdx.x * ROUTE_BLOCK_ROWS;
    int cnt = 0, ovf = 0;
#pragma unroll
    for (int i = 0; i < ROUTE_ROUNDS; ++i) {
        const long long r = base + i * ROUTE_THREADS + tid;
        if (r < M) {
            const int v = row_route[r];
            cnt += v != ROUTE_COMPACT;
            ovf += v == ROUTE_OVERFLOW;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        cnt += __shfl_xor_sync(0xffffffffu, cnt, o);
        ovf += __shfl_xor_sync(0xffffffffu, ovf, o);
    }
    if (lane == 0) { warp_sums[warp][0] = cnt; warp_sums[warp][1] = ovf; }
    __syncthreads();
    if (tid == 0) {
        int c = 0, v = 0;
        for (int w = 0; w < ROUTE_THREADS / 32; ++w) { c += warp_sums[w][0]; v += warp_sums[w][1]; }
        block_counts[2 * blockIdx.x] = c;
        block_counts[2 * blockIdx.x + 1] = v;
    }
}

__global__ void __launch_bounds__(ROUTE_THREADS) route_rows_place(
    const int* __restrict__ row_route, int M, const int* __restrict__ block_counts,
    int* __restrict__ backup_slot, int* __restrict__ backup_rows, int* __restrict__ totals)
{
    __shared__ int warp_sums[ROUTE_THREADS / 32];
    __shared__ int block_base;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (warp == 0) {
        const int before = warp_sum_blocks(block_counts, 2, 0, (int)blockIdx.x);
        if (lane == 0) block_base = before;
    } else if (warp == 1 && blockIdx.x == 0) {
        const int total = warp_sum_blocks(block_counts, 2, 0, (int)gridDim.x);
        const int total_ovf = warp_sum_blocks(block_counts, 2, 1, (int)gridDim.x);
        if (lane == 0) {
            totals[0] = total;
            totals[1] = total_ovf;
            totals[2] = 0;
        }
    }
    __syncthreads();
    int running = block_base;
    const long long base = (long long)blockIdx.x * ROUTE_BLOCK_ROWS;
    for (int i = 0; i < ROUTE_ROUNDS; ++i) {
        const long long r = base + i * ROUTE_THREADS + tid;
        const int f = (r < M && row_route[r] != ROUTE_COMPACT) ? 1 : 0;
        const int incl = warp_inclusive_scan(f);
        if (lane == 31) warp_sums[warp] = incl;
        __syncthreads();
        int offset = 0, round_total = 0;
#pragma unroll 8
        for (int w = 0; w < ROUTE_THREADS / 32; ++w) {
            const int c = warp_sums[w];
            offset += (w < warp) ? c : 0;
            round_total += c;
        }
        __syncthreads();                            // warp_sums is rewritten by the next round
        if (r < M) {
            const int slot = running + offset + incl - f;
            backup_slot[r] = f ? slot : -1;
            if (f) backup_rows[slot] = (int)r;
        }
        running += round_total;
    }
}

// TwELL -> dense for the compact rows (dense must be zero-initialised; backup rows are copied by
// the caller).  One thread per (row, tile, slot).
template <typename T>
__global__ void unpack_twell(const int* __restrict__ counts, const u8* __restrict__ indices,
                             const T* __restrict__ values, const int* __restrict__ backup_slot,
                             int M, int n, int n_tiles, int slots, int tile_width, T* __restrict__ dense)
{
    const long long total = (long long)M * n_tiles * slots;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int s = (int)(i % slots);
        const long long rt = i / slots;
        const int row = (int)(rt / n_tiles);
        const int t = (int)(rt % n_tiles);
        if (backup_slot[row] >= 0) continue;
        if (s < min(counts[rt], slots)) dense[(long long)row * n + t * tile_width + indices[i]] = values[i];
    }
}

// TwELL -> dense for a list of rows: dense (R, n) row r is row rows[r] of the TwELL (rows == nullptr: row
// r itself), zero-initialised by the caller.  Slots past a tile's capacity are not stored, so a row whose
// tile overflowed comes out incomplete: the caller recomputes those rows.  One thread per (r, tile, slot).
template <typename T>
__global__ void unpack_twell_rows(const int* __restrict__ counts, const u8* __restrict__ indices,
                                  const T* __restrict__ values, const int* __restrict__ rows, int R, int n,
                                  int n_tiles, int slots, int tile_width, T* __restrict__ dense)
{
    const long long total = (long long)R * n_tiles * slots;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int s = (int)(i % slots);
        const long long rt = i / slots;
        const int r = (int)(rt / n_tiles);
        const int t = (int)(rt % n_tiles);
        const long long src = (long long)(rows != nullptr ? rows[r] : r) * n_tiles + t;
        if (s < min(counts[src], slots))
            dense[(long long)r * n + t * tile_width + indices[src * slots + s]] = values[src * slots + s];
    }
}

// Copies n_bytes from src to dst with the CTA's threads: 16-byte vectors when both are 16-byte aligned
// and n_bytes % 16 == 0 (rows of a contiguous array with d * sizeof(T) % 16 == 0), else 2-byte units
// (every T here has an even size).
__device__ __forceinline__ void block_copy_bytes(unsigned char* __restrict__ dst,
                                                 const unsigned char* __restrict__ src, long long n_bytes)
{
    if ((((unsigned long long)dst | (unsigned long long)src | (unsigned long long)n_bytes) & 15ull) == 0) {
        for (long long i = threadIdx.x; i < n_bytes / 16; i += blockDim.x)
            reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(src)[i];
    } else {
        for (long long i = threadIdx.x; i < n_bytes / 2; i += blockDim.x)
            reinterpret_cast<unsigned short*>(dst)[i] = reinterpret_cast<const unsigned short*>(src)[i];
    }
}

// Zeroes n_bytes at dst (even) with the CTA's threads, 16-byte vectors where aligned.
__device__ __forceinline__ void block_zero_bytes(unsigned char* __restrict__ dst, long long n_bytes)
{
    if ((((unsigned long long)dst | (unsigned long long)n_bytes) & 15ull) == 0) {
        for (long long i = threadIdx.x; i < n_bytes / 16; i += blockDim.x)
            reinterpret_cast<uint4*>(dst)[i] = make_uint4(0u, 0u, 0u, 0u);
    } else {
        for (long long i = threadIdx.x; i < n_bytes / 2; i += blockDim.x)
            reinterpret_cast<unsigned short*>(dst)[i] = 0;
    }
}

// The dense backup's inputs in one pass (inference, after the fused gate): for backup row r (TwELL row
// rows[r]), xr[r] = x[rows[r]] (d values) and zr[r] = its relu'd gate row unpacked from the TwELL (zeros
// elsewhere).  Slots past a tile's capacity are not stored, so a row with an overflowing tile comes out
// incomplete: the caller recomputes those rows.  x, xr, zr C-contiguous.  One CTA per backup row.
template <typename T>
__global__ void __launch_bounds__(256) gather_backup_rows(
    const T* __restrict__ x, int d, const int* __restrict__ counts, const u8* __restrict__ indices,
    const T* __restrict__ values, const int* __restrict__ rows, int n, int n_tiles, int slots, int tile_width,
    T* __restrict__ xr, T* __restrict__ zr)
{
    const long long r = blockIdx.x;
    const long long src = rows[r];
    block_copy_bytes(reinterpret_cast<unsigned char*>(xr + r * d),
                     reinterpret_cast<const unsigned char*>(x + src * d), (long long)d * sizeof(T));
    T* zrow = zr + r * n;
    block_zero_bytes(reinterpret_cast<unsigned char*>(zrow), (long long)n * sizeof(T));
    __syncthreads();                                  // zeros before the entries (same addresses)
    const long long rt0 = src * n_tiles;
    for (int i = threadIdx.x; i < n_tiles * slots; i += blockDim.x) {
        const int t = i / slots, s = i - t * slots;
        if (s < min(counts[rt0 + t], slots))
            zrow[t * tile_width + indices[(rt0 + t) * slots + s]] = values[(rt0 + t) * slots + s];
    }
}

// dst[rows[r]] = src[r] for r < R: rows of width d (C-contiguous).  One CTA per row.  count (nullable): only
// r < *count (a row count known on the device alone).
template <typename T>
__global__ void __launch_bounds__(256) scatter_rows(const T* __restrict__ src, const int* __restrict__ rows,
                                                    int d, T* __restrict__ dst, const int* __restrict__ count)
{
    const long long r = blockIdx.x;
    if (count != nullptr && r >= *count) return;
    block_copy_bytes(reinterpret_cast<unsigned char*>(dst + (long long)rows[r] * d),
                     reinterpret_cast<const unsigned char*>(src + r * d), (long long)d * sizeof(T));
}

// xr[r] = x[rows[r]] for r < *count, zeros for the other r < C (the grid): rows of width d, C-contiguous.
// The rows of a list whose length is known on the device alone, gathered into a buffer of fixed capacity.
template <typename T>
__global__ void __launch_bounds__(256) gather_rows_counted(const T* __restrict__ x, int d,
                                                           const int* __restrict__ rows,
                                                           const int* __restrict__ count, T* __restrict__ xr)
{
    const long long r = blockIdx.x;
    unsigned char* dst = reinterpret_cast<unsigned char*>(xr + r * d);
    if (r < *count)
        block_copy_bytes(dst, reinterpret_cast<const unsigned char*>(x + (long long)rows[r] * d),
                         (long long)d * sizeof(T));
    else
        block_zero_bytes(dst, (long long)d * sizeof(T));
}

// Hybrid pass 1: entries per row (one warp per row) and optional per-neuron counts.
template <typename T, bool RELU, bool VEC>
__global__ void __launch_bounds__(256) count_row_entries(
    const T* __restrict__ dense, int M, int n, int* __restrict__ row_nnz, int* __restrict__ neuron_counts)
{
    constexpr int E = 8;
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= M) return;
    const T* src = dense + (long long)row * n;
    int c = 0;
    for (int col0 = lane * E; col0 < n; col0 += 32 * E) {
        Chunk<T, E, VEC> ch;
        if (VEC) ch.load(src + col0); else ch.load_partial(src + col0, n - col0);
#pragma unroll
        for (int k = 0; k < E; ++k) {
            if (col0 + k < n && is_entry<RELU>(ch.v[k])) {
                ++c;
                if (neuron_counts) atomicAdd(neuron_counts + col0 + k, 1);
            }
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) c += __shfl_xor_sync(0xffffffffu, c, o);
    if (lane == 0) row_nnz[row] = c;
}

// Hybrid pass 2: compact rows' entries in ascending column order at row_ptr[row] (one warp per
// row).  Backup rows (row_ptr[row+1] == row_ptr[row] while they have entries) are skipped by
// backup_slot.
template <typename T, bool RELU, bool VEC>
__global__ void __launch_bounds__(256) fill_hybrid_rows(
    const T* __restrict__ dense, int M, int n, const int* __restrict__ row_ptr,
    const int* __restrict__ backup_slot, int* __restrict__ col_indices, T* __restrict__ values)
{
    constexpr int E = 8;
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= M || backup_slot[row] >= 0) return;
    const T* src = dense + (long long)row * n;
    int out = row_ptr[row];
    for (int base = 0; base < n; base += 32 * E) {
        const int col0 = base + lane * E;
        Chunk<T, E, VEC> ch;
        if (col0 < n) { if (VEC) ch.load(src + col0); else ch.load_partial(src + col0, n - col0); }
        else ch.load_partial(src, 0);
        unsigned mask = 0;
#pragma unroll
        for (int k = 0; k < E; ++k)
            if (col0 + k < n && is_entry<RELU>(ch.v[k])) mask |= 1u << k;
        const int c = __popc(mask);
        const int incl = warp_inclusive_scan(c);
        int pos = out + incl - c;
#pragma unroll
        for (int k = 0; k < E; ++k) {
            if (mask & (1u << k)) {
                col_indices[pos] = col0 + k;
                values[pos] = ch.v[k];
                ++pos;
            }
        }
        out += __shfl_sync(0xffffffffu, incl, 31);
    }
}

// Hybrid -> dense for the compact rows (dense zero-initialised).  One warp per row.
template <typename T>
__global__ void unpack_hybrid_rows(const int* __restrict__ row_ptr, const int* __restrict__ col_indices,
                                   const T* __restrict__ values, int M, int n, T* __restrict__ dense)
{
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= M) return;
    for (int p = row_ptr[row] + lane; p < row_ptr[row + 1]; p += 32)
        dense[(long long)row * n + col_indices[p]] = values[p];
}

// out = relu(a) keeping NaN (where NOT (a <= 0)), elementwise; used for dense backup rows of a gate.
template <typename T>
__global__ void relu_keep_nan(const T* __restrict__ a, long long total, T* __restrict__ out)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = is_entry<true>(a[i]) ? a[i] : from_f<T>(0.0f);
}

// ---------------------------------------------------------------- deterministic pattern transpose
// CSR (row-major) pattern -> neuron-major, rows ascending within each column, no sort and no
// order-dependent atomics.  Rows are cut into blocks of 64; a block marks, per column, which of its
// rows hold the column (64-bit mask, atomicOr: the result does not depend on order).  The rank of an
// entry among its column's entries of the block is a popcount of the lower bits; ranks across blocks
// come from a column-wise prefix sum over the blocks' popcounts.
#define TRANSPOSE_ROWS 64
#define TRANSPOSE_THREADS 256

__device__ __forceinline__ void transpose_block_masks(const int* __restrict__ row_ptr,
                                                      const int* __restrict__ col_indices, int M, int n,
                                                      unsigned long long* mask)
{
    const int r0 = blockIdx.x * TRANSPOSE_ROWS;
    for (int c = threadIdx.x; c < n; c += TRANSPOSE_THREADS) mask[c] = 0ull;
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int r = warp; r < TRANSPOSE_ROWS && r0 + r < M; r += TRANSPOSE_THREADS / 32)
        for (int e = row_ptr[r0 + r] + lane; e < row_ptr[r0 + r + 1]; e += 32)
            atomicOr(mask + col_indices[e], 1ull << r);
    __syncthreads();
}

// Pass 1: per (block, column) entry counts.
__global__ void __launch_bounds__(TRANSPOSE_THREADS) transpose_count(
    const int* __restrict__ row_ptr, const int* __restrict__ col_indices, int M, int n, int* __restrict__ block_counts)
{
    extern __shared__ unsigned long long mask[];
    transpose_block_masks(row_ptr, col_indices, M, n, mask);
    int* out = block_counts + (long long)blockIdx.x * n;
    for (int c = threadIdx.x; c < n; c += TRANSPOSE_THREADS) out[c] = __popcll(mask[c]);
}

// Pass 2: column-wise exclusive prefix over blocks (in place) and per-column totals.
__global__ void transpose_scan(int* __restrict__ block_counts, int n_blocks, int n, int* __restrict__ col_counts)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= n) return;
    int run = 0;
    // 16 independent loads in flight per batch (the loop is otherwise one dependent round trip per block)
    for (int b0 = 0; b0 < n_blocks; b0 += 16) {
        int v[16];
#pragma unroll
        for (int k = 0; k < 16; ++k) v[k] = b0 + k < n_blocks ? block_counts[(long long)(b0 + k) * n + c] : 0;
#pragma unroll
        for (int k = 0; k < 16; ++k) {
            if (b0 + k < n_blocks) block_counts[(long long)(b0 + k) * n + c] = run;
            run += v[k];
        }
    }
    col_counts[c] = run;
}

// Pass 3: place every entry.
__global__ void __launch_bounds__(TRANSPOSE_THREADS) transpose_place(
    const int* __restrict__ row_ptr, const int* __restrict__ col_indices, int M, int n,
    const int* __restrict__ block_offsets, const int* __restrict__ col_ptr,
    int* __restrict__ row_indices, int* __restrict__ positions)
{
    extern __shared__ unsigned long long mask[];
    transpose_block_masks(row_ptr, col_indices, M, n, mask);
    const int r0 = blockIdx.x * TRANSPOSE_ROWS;
    const int* off = block_offsets + (long long)blockIdx.x * n;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int r = warp; r < TRANSPOSE_ROWS && r0 + r < M; r += TRANSPOSE_THREADS / 32) {
        const unsigned long long below = (1ull << r) - 1ull;
        for (int e = row_ptr[r0 + r] + lane; e < row_ptr[r0 + r + 1]; e += 32) {
            const int c = col_indices[e];
            const int pos = col_ptr[c] + off[c] + __popcll(mask[c] & below);
            row_indices[pos] = r0 + r;
            positions[pos] = e;
        }
    }
}

// ---------------------------------------------------------------- the Hybrid's plan (training forward)
// From each row's entry count (and, after the fused gate GEMM, its TwELL route code): which rows are
// backup rows (nnz > threshold), which compact rows overflowed a TwELL tile and must be refilled from a
// recomputed dense row ("redo"; with redo_to_backup such rows become backup rows instead: a forward that
// sizes its state on the device cannot refill a count it does not know), and the compact rows' CSR offsets -- in two kernels over blocks of
// ROUTE_BLOCK_ROWS rows (per-block sums, then ordered placement), instead of a dozen array operations
// and a cumsum on the host's critical path.  Outputs, all deterministic (row order):
//   backup_slot[r] = rank among backup rows or -1; backup_rows[slot] = r; redo_rows[k] = r (if row_route)
//   row_ptr[0..M] (exclusive prefix of the compact rows' counts; backup rows have length 0)
//   totals = {compact entries, backup rows, redo rows, 0 (a work counter for the kernels that follow)}
//   nnz_all = entries of every row (int64, for the statistics)
#define PLAN_FIELDS 3   // per-block int sums: backup rows, redo rows, compact entries

__device__ __forceinline__ void plan_row(const int* __restrict__ row_nnz, const int* __restrict__ row_route,
                                         long long r, int M, int threshold, int redo_to_backup, int& backup,
                                         int& redo, int& len, int& all) {
    backup = redo = len = all = 0;
    if (r < M) {
        all = row_nnz[r];
        const bool overflowed = row_route != nullptr && row_route[r] == ROUTE_OVERFLOW;
        backup = all > threshold || (redo_to_backup && overflowed);
        redo = !backup && overflowed;
        len = backup ? 0 : all;
    }
}

__global__ void __launch_bounds__(ROUTE_THREADS) hybrid_plan_count(
    const int* __restrict__ row_nnz, const int* __restrict__ row_route, int M, int threshold, int redo_to_backup,
    int* __restrict__ block_counts, long long* __restrict__ block_all)
{
    __shared__ int ws[ROUTE_THREADS / 32];
    __shared__ long long wl[ROUTE_THREADS / 32];
    const int tid = threadIdx.x;
    const long long base = (long long)blockIdx.x * ROUTE_BLOCK_ROWS;
    int nb = 0, nr = 0, nl = 0;
    long long na = 0;
#pragma unroll
    for (int i = 0; i < ROUTE_ROUNDS; ++i) {
        int b, rd, len, all;
        plan_row(row_nnz, row_route, base + i * ROUTE_THREADS + tid, M, threshold, redo_to_backup, b, rd, len,
                 all);
        nb += b; nr += rd; nl += len; na += all;
    }
    nb = block_sum_n<ROUTE_THREADS>(nb, ws);
    nr = block_sum_n<ROUTE_THREADS>(nr, ws);
    nl = block_sum_n<ROUTE_THREADS>(nl, ws);
    na = block_sum_n<ROUTE_THREADS>(na, wl);
    if (tid == 0) {
        block_counts[PLAN_FIELDS * blockIdx.x] = nb;
        block_counts[PLAN_FIELDS * blockIdx.x + 1] = nr;
        block_counts[PLAN_FIELDS * blockIdx.x + 2] = nl;
        block_all[blockIdx.x] = na;
    }
}

__global__ void __launch_bounds__(ROUTE_THREADS) hybrid_plan_place(
    const int* __restrict__ row_nnz, const int* __restrict__ row_route, int M, int threshold, int redo_to_backup,
    const int* __restrict__ block_counts, const long long* __restrict__ block_all,
    int* __restrict__ backup_slot, int* __restrict__ backup_rows, int* __restrict__ redo_rows,
    int* __restrict__ row_ptr, int* __restrict__ totals, long long* __restrict__ nnz_all)
{
    __shared__ int ws[ROUTE_THREADS / 32];
    __shared__ int bases[PLAN_FIELDS];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (warp < PLAN_FIELDS) {                                  // warp f: field f's sums
        const int before = warp_sum_blocks(block_counts, PLAN_FIELDS, warp, (int)blockIdx.x);
        if (lane == 0) bases[warp] = before;
        if (blockIdx.x == 0) {
            const int total = warp_sum_blocks(block_counts, PLAN_FIELDS, warp, (int)gridDim.x);
            if (lane == 0) {
                const int slot = warp == 2 ? 0 : warp + 1;    // totals = {compact entries, backup, redo, 0}
                totals[slot] = total;
                if (warp == 2) { row_ptr[M] = total; totals[3] = 0; }
            }
        }
    } else if (warp == PLAN_FIELDS && blockIdx.x == 0) {
        const long long a = warp_sum_blocks(block_all, 1, 0, (int)gridDim.x);
        if (lane == 0) *nnz_all = a;
    }
    __syncthreads();
    int run_backup = bases[0], run_redo = bases[1], run_len = bases[2];
    const long long base = (long long)blockIdx.x * ROUTE_BLOCK_ROWS;
    for (int i = 0; i < ROUTE_ROUNDS; ++i) {
        const long long r = base + i * ROUTE_THREADS + tid;
        int b, rd, len, all;
        plan_row(row_nnz, row_route, r, M, threshold, redo_to_backup, b, rd, len, all);
        int flags_total, len_total;
        const int flags = block_exclusive_scan_n<ROUTE_THREADS>(b | (rd << 16), ws, flags_total);
        const int off = block_exclusive_scan_n<ROUTE_THREADS>(len, ws, len_total);
        if (r < M) {
            const int bs = run_backup + (flags & 0xffff);
            backup_slot[r] = b ? bs : -1;
            if (b) backup_rows[bs] = (int)r;
            if (rd) redo_rows[run_redo + (flags >> 16)] = (int)r;
            row_ptr[r] = run_len + off;
        }
        run_backup += flags_total & 0xffff;
        run_redo += flags_total >> 16;
        run_len += len_total;
    }
}

// col_ptr[0..n] = exclusive prefix of col_counts (one CTA; the transposed pattern's column offsets).
__global__ void __launch_bounds__(ROUTE_THREADS) column_offsets(const int* __restrict__ col_counts, int n,
                                                                int* __restrict__ col_ptr)
{
    __shared__ int ws[ROUTE_THREADS / 32];
    int carry = 0;
    for (int c0 = 0; c0 < n; c0 += ROUTE_THREADS) {
        const int c = c0 + threadIdx.x;
        const int v = c < n ? col_counts[c] : 0;
        int total;
        const int excl = block_exclusive_scan_n<ROUTE_THREADS>(v, ws, total);
        if (c < n) col_ptr[c] = carry + excl;
        carry += total;
    }
    if (threadIdx.x == 0) col_ptr[n] = carry;
}

// TwELL -> CSR entries of the compact Hybrid rows (training forward after the fused gate GEMM).  One
// warp per row; lane l takes tiles l, l + 32, ...: a warp scan of the tile counts places each tile's
// slots (already in ascending column order) at row_ptr[row] + offset.  Rows that are Hybrid backup rows
// (backup_slot >= 0) are skipped.  A compact row that overflowed a TwELL tile (its slots hold only the first
// S entries of a tile; the caller refills it from a recomputed dense row) gets placeholder entries (column
// 0, value 0) so that a kernel reading it before the refill stays in bounds.
template <typename T>
__global__ void __launch_bounds__(256) twell_rows_to_csr(
    const int* __restrict__ counts, const u8* __restrict__ indices, const T* __restrict__ values, int M,
    int n_tiles, int slots, int tile_width, const int* __restrict__ row_route, const int* __restrict__ backup_slot,
    const int* __restrict__ row_ptr, int* __restrict__ col_indices, T* __restrict__ out_values)
{
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= M || backup_slot[row] >= 0) return;
    int out = row_ptr[row];
    if (row_route[row] == ROUTE_OVERFLOW) {
        for (int p = out + lane; p < row_ptr[row + 1]; p += 32) {
            col_indices[p] = 0;
            out_values[p] = from_f<T>(0.0f);
        }
        return;
    }
    for (int t0 = 0; t0 < n_tiles; t0 += 32) {
        const int t = t0 + lane;
        const long long rt = (long long)row * n_tiles + t;
        const int c = t < n_tiles ? counts[rt] : 0;               // <= slots: the row did not overflow
        const int incl = warp_inclusive_scan(c);
        int pos = out + incl - c;
        for (int s = 0; s < c; ++s, ++pos) {
            col_indices[pos] = t * tile_width + indices[rt * slots + s];
            out_values[pos] = values[rt * slots + s];
        }
        out += __shfl_sync(0xffffffffu, incl, 31);
    }
}

// Route rows from TwELL counts (after the fused gate GEMM, which writes counts and slots but sees only
// 256 columns of a row at a time).  One warp per row; same codes and totals as pack_twell.
__global__ void __launch_bounds__(256) route_twell_counts(
    const int* __restrict__ counts, int M, int n_tiles, int slots, int threshold,
    int* __restrict__ row_nnz, int* __restrict__ row_route, int* __restrict__ totals)
{
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= M) return;
    int nnz = 0;
    bool overflow = false;
    for (int t = lane; t < n_tiles; t += 32) {
        const int c = counts[(long long)row * n_tiles + t];
        nnz += c;
        overflow |= c > slots;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) nnz += __shfl_xor_sync(0xffffffffu, nnz, o);
    overflow = __any_sync(0xffffffffu, overflow);
    if (lane == 0) {
        const int route = overflow ? ROUTE_OVERFLOW : (nnz > threshold ? ROUTE_THRESHOLD : ROUTE_COMPACT);
        row_nnz[row] = nnz;
        row_route[row] = route;
        if (route != ROUTE_COMPACT) atomicAdd(totals, 1);       // totals as pack_twell's
        else atomicAdd(totals + 3, nnz);
        if (overflow) atomicAdd(totals + 1, 1);
    }
}

// ---------------------------------------------------------------- container validation
// Checks a container coming from a user before any other kernel reads it (docs/format.md, "invariants").
// A violated rule is reported as the smallest (index << 4 | code) through one 64-bit atomicMin into err
// (initialised to ~0 by the caller): the host raises naming the rule and the first bad row.  Every read
// is bounds-checked against the array sizes given, so a corrupted container cannot make this kernel read
// out of bounds either.
#define VALID_OK 0xffffffffffffffffull
#define BAD_SLOT 1          // backup_slot[r] not in [-1, R) or backup_rows[backup_slot[r]] != r
#define BAD_BACKUP_ROWS 2   // backup_rows not strictly ascending in [0, M), or backup_slot[backup_rows[s]] != s
#define BAD_COUNT 3         // a count < 0, or a compact row's tile count > slots
#define BAD_INDEX 4         // a stored tile-local index >= tile_width or its column >= n
#define BAD_ORDER 5         // stored indices / columns not strictly ascending
#define BAD_ROW_PTR 6       // row_ptr[0] != 0, decreasing, row_ptr[M] != nnz, or a backup row's range not empty
#define BAD_ROW_LEN 7       // a compact row longer than max_len

__device__ __forceinline__ void report_bad(unsigned long long* err, long long index, int code) {
    atomicMin(err, ((unsigned long long)index << 4) | (unsigned long long)code);
}

// Rows and backup slots (shared by TwELL and Hybrid): one thread per row r < M and per slot s < R.
__global__ void validate_routing(const int* __restrict__ backup_slot, const int* __restrict__ backup_rows,
                                 int M, int R, unsigned long long* __restrict__ err)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (long long)M + R;
         i += (long long)gridDim.x * blockDim.x) {
        if (i < M) {
            const int r = (int)i, s = backup_slot[r];
            if (s < -1 || s >= R || (s >= 0 && backup_rows[s] != r)) report_bad(err, r, BAD_SLOT);
        } else {
            const int s = (int)(i - M), r = backup_rows[s];
            if (r < 0 || r >= M || (s > 0 && backup_rows[s - 1] >= r) || backup_slot[r] != s)
                report_bad(err, (r >= 0 && r < M) ? r : s, BAD_BACKUP_ROWS);
        }
    }
}

// TwELL tiles: one warp per (row, tile); lane l checks slots l, l + 32, ... of the stored ones.
__global__ void validate_twell_tiles(const int* __restrict__ counts, const u8* __restrict__ indices,
                                     const int* __restrict__ backup_slot, int M, int n_tiles, int slots,
                                     int tile_width, int n, unsigned long long* __restrict__ err)
{
    const int lane = threadIdx.x & 31;
    const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
    for (long long rt = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5); rt < (long long)M * n_tiles;
         rt += warps) {
        const int row = (int)(rt / n_tiles), t = (int)(rt % n_tiles);
        const int c = counts[rt];
        if (c < 0 || (c > slots && backup_slot[row] < 0)) { if (lane == 0) report_bad(err, row, BAD_COUNT); continue; }
        const int stored = min(c, slots);
        const int width = min(tile_width, n - t * tile_width);          // the last tile may be partial
        for (int s = lane; s < stored; s += 32) {
            const int idx = indices[rt * slots + s];
            if (idx >= width) report_bad(err, row, BAD_INDEX);
            else if (s > 0 && indices[rt * slots + s - 1] >= idx) report_bad(err, row, BAD_ORDER);
        }
    }
}

// Hybrid rows: one warp per row.  nnz = col_indices.size; max_len bounds a compact row's length.
__global__ void validate_hybrid_rows(const int* __restrict__ row_ptr, const int* __restrict__ col_indices,
                                     const int* __restrict__ backup_slot, int M, int nnz, int n, int max_len,
                                     unsigned long long* __restrict__ err)
{
    const int lane = threadIdx.x & 31;
    const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
    for (long long r = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5); r < M; r += warps) {
        const int row = (int)r, lo = row_ptr[row], hi = row_ptr[row + 1];
        if (lo < 0 || hi < lo || hi > nnz || (row == 0 && lo != 0) || (row == M - 1 && hi != nnz)
            || (backup_slot[row] >= 0 && hi != lo)) {
            if (lane == 0) report_bad(err, row, BAD_ROW_PTR);
            continue;
        }
        if (hi - lo > max_len) { if (lane == 0) report_bad(err, row, BAD_ROW_LEN); continue; }
        for (int p = lo + lane; p < hi; p += 32) {
            const int c = col_indices[p];
            if (c < 0 || c >= n) report_bad(err, row, BAD_INDEX);
            else if (p > lo && col_indices[p - 1] >= c) report_bad(err, row, BAD_ORDER);
        }
    }
}
