// gate_gemm.cu -- the gate GEMM z = x w_gateᵀ with the ReLU -> TwELL epilogue fused in: the dense gate
// activations never reach device memory.  Layout of the output: docs/format.md; design: docs/design.md
// ("The fused gate GEMM").
//
// Two kernels with the same output, bitwise:
//   gate_twell_wgmma  Hopper (sm_90a): TMA loads into 128-byte-swizzled shared memory, a 4-stage mbarrier
//                     ring, one producer warp + two consumer warpgroups (wgmma m64n256k16, fp32
//                     accumulators), persistent grid; the producer runs ahead into the next tile while the
//                     consumers run the epilogue.
//   gate_twell_mma    any sm_80+: cp.async 3-stage pipeline, ldmatrix + mma.sync m16n8k16.
// The Hopper kernel packs straight from its accumulator registers (pack_fragment_rows: a quad of threads
// holds a row, entry masks are all-gathered in the quad and popcounts give every entry its slot).  The
// portable kernel stages output rows in shared memory, rounded to T (exactly what cuBLAS would have
// written to z), then packs them like pack_twell: one warp per row, lane l owns columns [l*E, l*E+E) of
// every TwELL tile, a warp prefix sum places each entry in ascending column order.  Both write the same
// TwELL, bitwise.  The per-row route (row_nnz, overflow, threshold) is decided afterwards by
// route_twell_counts (pack.cu) from the counts.
#include "ffn_common.cuh"

#define GG_BM 128
#define GG_BN 256
#define GG_LD (GG_BN + 8)           // staging row stride (elements): conflict-free fragment stores

// ---------------------------------------------------------------- shared epilogue: staged tile -> TwELL
template <typename T> struct Pair2;
template <> struct Pair2<__nv_bfloat16> {
    typedef __nv_bfloat162 type;
    static __device__ __forceinline__ type zero() { return __float2bfloat162_rn(0.0f); }
};
template <> struct Pair2<__half> {
    typedef __half2 type;
    static __device__ __forceinline__ type zero() { return __float2half2_rn(0.0f); }
};

// Entry bits (bit k: element k is an entry, i.e. NOT (v <= 0), NaN included) of E consecutive 16-bit
// elements at p (shared memory, 2E-byte aligned), tested two at a time with one packed compare.
template <typename T, int E>
__device__ __forceinline__ unsigned entry_bits(const T* p) {
    if constexpr (E == 1) {
        return is_entry<true>(p[0]) ? 1u : 0u;
    } else {
        typedef typename Pair2<T>::type T2;
        const T2* q = reinterpret_cast<const T2*>(p);
        const T2 zero = Pair2<T>::zero();
        unsigned bits = 0;
#pragma unroll
        for (int j = 0; j < E / 2; ++j) {
            const unsigned m = __hgtu2_mask(q[j], zero);       // 0xFFFF per half where v > 0 or unordered
            bits |= ((m & 1u) | ((m >> 15) & 2u)) << (2 * j);
        }
        return bits;
    }
}

// One warp packs the NR rows of a staged block (row stride GG_LD) whose row 0 is z row `row0` and whose
// column 0 is z column n0 (a multiple of GG_BN).  Lane l owns columns [l*E, l*E+E) of each TwELL tile.
// The NR rows' compares and scans interleave; entries (rare) are written by a loop over the set bits
// that re-reads their values from shared memory, so the cost is the scan, not the tile width.
// Columns >= n were loaded as zeros (TMA / cp.async zero fill), so they are never entries.
template <typename T, int TILE, int NR>
__device__ __forceinline__ void pack_staged_rows(
    const T* staged, int row0, int n0, int M, int n, int n_tiles, int slots,
    int* __restrict__ counts, u8* __restrict__ indices, T* __restrict__ values, int* __restrict__ neuron_counts)
{
    constexpr int E = TILE / 32;
    const int lane = threadIdx.x & 31;
    const int t0 = n0 / TILE;
#pragma unroll 1
    for (int s = 0; s < GG_BN / TILE; ++s) {
        const int t = t0 + s;
        if (t >= n_tiles) break;
        const int c0 = s * TILE + lane * E;                       // column in the staged block
        unsigned mask[NR];
        int incl[NR];
#pragma unroll
        for (int r = 0; r < NR; ++r) {
            mask[r] = entry_bits<T, E>(staged + r * GG_LD + c0);
            incl[r] = __popc(mask[r]);
        }
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
#pragma unroll
            for (int r = 0; r < NR; ++r) {
                const int y = __shfl_up_sync(0xffffffffu, incl[r], o);
                if (lane >= o) incl[r] += y;
            }
        }
#pragma unroll
        for (int r = 0; r < NR; ++r) {
            const int row = row0 + r;
            const int total = __shfl_sync(0xffffffffu, incl[r], 31);
            if (row >= M) continue;                              // warp-uniform
            const long long base = ((long long)row * n_tiles + t) * slots;
            unsigned m = mask[r];
            int pos = incl[r] - __popc(m);
            while (m) {
                const int k = __ffs(m) - 1;
                m &= m - 1u;
                if (pos < slots) {
                    indices[base + pos] = (u8)(lane * E + k);
                    values[base + pos] = staged[r * GG_LD + c0 + k];
                }
                if (neuron_counts) atomicAdd(neuron_counts + n0 + c0 + k, 1);
                ++pos;
            }
            for (int q = total + lane; q < slots; q += 32) {
                indices[base + q] = 0;
                values[base + q] = from_f<T>(0.0f);
            }
            if (lane == 0) counts[(long long)row * n_tiles + t] = total;
        }
    }
}

// ---------------------------------------------------------------- Hopper epilogue: fragments -> TwELL
// The wgmma m64n256 accumulator fragment of a consumer warp holds 16 full rows of the tile: thread `lane`
// has rows lane/4 (h = 0) and lane/4 + 8 (h = 1), pair i (0..31) = columns 8i + 2q, 8i + 2q + 1 with
// q = lane % 4 -- so the four threads of a quad hold one row between them.  The epilogue packs straight
// from the registers, one row half h at a time: each thread converts its 32 pairs of the row to T, tests
// them with one packed compare each and keeps two 32-bit entry masks (word w: pairs 16w..16w+15; bit j =
// low element of pair 16w+j, bit 16+j = high element); it parks the converted pairs in its own 128 bytes
// of shared memory (read back only for the rare entries).  After an all-gather of the masks inside the
// quad, a tile's count and each entry's slot (the number of entries of its TwELL tile at smaller columns)
// are popcounts of masked words.  The quad zero-fills the row's slot blocks with vector stores, then
// (after __syncwarp) each entry's owner writes its (index, value): the TwELL of pack_twell, bitwise.
#define GW_EPI_BYTES_PER_THREAD 128  // 32 converted pairs of one row

// Zero `len` bytes at p, shared by the `parts` threads of a group (this one is `part`): 16-byte stores
// where the address allows, single bytes for an unaligned head and tail.
__device__ __forceinline__ void zero_bytes(unsigned char* p, int len, int part, int parts) {
    const int head = min(len, (int)((16u - ((unsigned)(size_t)p & 15u)) & 15u));
    for (int i = part; i < head; i += parts) p[i] = 0;
    const int vecs = (len - head) >> 4;
    uint4* v = reinterpret_cast<uint4*>(p + head);
    for (int i = part; i < vecs; i += parts) v[i] = make_uint4(0u, 0u, 0u, 0u);
    for (int i = head + 16 * vecs + part; i < len; i += parts) p[i] = 0;
}

// `pairs`: this thread's 128 bytes of shared memory (8 x 16 bytes; group v is stored at (v + lane) % 8,
// which keeps the warp's 16-byte stores free of bank conflicts).
template <typename T, int TILE>
__device__ __forceinline__ void pack_fragment_rows(
    const float (&acc)[128], uint4* pairs, int row_base, int n0, int M, int n_tiles, int slots,
    int* __restrict__ counts, u8* __restrict__ indices, T* __restrict__ values, int* __restrict__ neuron_counts)
{
    typedef typename Pair2<T>::type T2;
    constexpr int PAIRS = TILE / 8;                 // fragment pairs of one TwELL tile per thread: 4..32
    constexpr int TILES = GG_BN / TILE;
    const int lane = threadIdx.x & 31, q = lane & 3;
    const int t0 = n0 / TILE;
    const int nt = min(TILES, n_tiles - t0);        // TwELL tiles of this column block that exist
    const T2 zero = Pair2<T>::zero();
    const unsigned short* pairs_u16 = reinterpret_cast<const unsigned short*>(pairs);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = row_base + (lane >> 2) + 8 * h;
        unsigned w0 = 0u, w1 = 0u;
#pragma unroll
        for (int v = 0; v < 8; ++v) {
            unsigned pk[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = 4 * v + e;
                T pr[2] = {from_f<T>(acc[4 * i + 2 * h]), from_f<T>(acc[4 * i + 2 * h + 1])};
                pk[e] = *reinterpret_cast<const unsigned*>(pr);
                const unsigned m = __hgtu2_mask(*reinterpret_cast<const T2*>(pr), zero) & (0x00010001u << (i & 15));
                if (i < 16) w0 |= m; else w1 |= m;
            }
            pairs[(v + lane) & 7] = make_uint4(pk[0], pk[1], pk[2], pk[3]);
        }
        unsigned quad0[4], quad1[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            quad0[j] = __shfl_sync(0xffffffffu, w0, (lane & ~3) | j);
            quad1[j] = __shfl_sync(0xffffffffu, w1, (lane & ~3) | j);
        }
        int all0 = 0;                               // entries of word 0 in the whole quad (T = 256)
#pragma unroll
        for (int j = 0; j < 4; ++j) all0 += __popc(quad0[j]);
        // counts, and the row's slot blocks of this column block (contiguous) zero-filled by the quad
        const long long first = (long long)row * n_tiles + t0;
        if (row < M) {
            if (q == 0) {
#pragma unroll
                for (int s = 0; s < TILES; ++s) {
                    if (s < nt) {
                        int c = 0;
                        if constexpr (PAIRS == 32) {
                            c = all0;
#pragma unroll
                            for (int j = 0; j < 4; ++j) c += __popc(quad1[j]);
                        } else {
                            constexpr unsigned lowp = (PAIRS >= 16) ? 0xFFFFu : ((1u << (PAIRS & 15)) - 1u);
                            const unsigned sel = (lowp << ((s * PAIRS) & 15)) * 0x10001u;
#pragma unroll
                            for (int j = 0; j < 4; ++j) c += __popc(((s * PAIRS) < 16 ? quad0[j] : quad1[j]) & sel);
                        }
                        counts[first + s] = c;
                    }
                }
            }
            zero_bytes(indices + first * slots, nt * slots, q, 4);
            zero_bytes(reinterpret_cast<unsigned char*>(values + first * slots), nt * slots * (int)sizeof(T), q, 4);
        }
        __syncwarp();                               // zero fill before the entries (other lanes' slots)
        if (row < M) {
            unsigned long long bits = (unsigned long long)w0 | ((unsigned long long)w1 << 32);
            while (bits) {
                const int k = __ffsll((long long)bits) - 1;
                bits &= bits - 1ull;
                const int w = k >> 5, j = k & 15, b = (k >> 4) & 1, p = 16 * w + j;
                const int s = p / PAIRS;
                // pairs [tile start, p) of word w, and the same plus pair p itself
                const int lo_j = max(s * PAIRS - 16 * w, 0);
                unsigned lt = ((1u << j) - 1u) & ~((1u << lo_j) - 1u);
                lt |= lt << 16;
                const unsigned le = lt | (0x00010001u << j);
                const unsigned own = w ? w1 : w0;
                int pos = b ? (int)((own >> j) & 1u) : 0;
                if (PAIRS == 32 && w == 1) pos += all0;
#pragma unroll
                for (int jq = 0; jq < 4; ++jq)
                    pos += __popc((w ? quad1[jq] : quad0[jq]) & (jq < q ? le : lt));
                const int col = 8 * p + 2 * q + b;          // column inside the block
                if (pos < slots) {
                    const long long at = (first + s) * slots + pos;
                    indices[at] = (u8)(col - s * TILE);
                    const unsigned short raw = pairs_u16[8 * (((p >> 2) + lane) & 7) + 2 * (p & 3) + b];
                    values[at] = *reinterpret_cast<const T*>(&raw);
                }
                if (neuron_counts) atomicAdd(neuron_counts + n0 + col, 1);
            }
        }
    }
}

// Store an accumulator pair (row, col), (row, col + 1) into the staged tile, rounded to T.
template <typename T>
__device__ __forceinline__ void stage_pair(T* staged, int r, int c, float a, float b) {
    T p[2] = {from_f<T>(a), from_f<T>(b)};
    *reinterpret_cast<unsigned*>(staged + r * GG_LD + c) = *reinterpret_cast<const unsigned*>(p);
}

template <typename T> struct MmaType;
template <> struct MmaType<__nv_bfloat16> { static constexpr bool bf16 = true; };
template <> struct MmaType<__half> { static constexpr bool bf16 = false; };

// ================================================================ Hopper: TMA + wgmma, warp-specialised
#define GW_BK 64                     // one 128-byte swizzle row of 16-bit elements
#define GW_STAGES 4
#define GW_THREADS 384               // warpgroup 0: producer; 1, 2: consumers (64 rows each)
#define GW_A_BYTES (GG_BM * GW_BK * 2)
#define GW_B_BYTES (GG_BN * GW_BK * 2)
#define GW_STAGE_BYTES (GW_A_BYTES + GW_B_BYTES)
// dynamic shared memory: 1024 alignment slack + stages + epilogue pairs (256 consumer threads x 128 bytes)
// + 2 * STAGES mbarriers
#define GW_EPI_BYTES (256 * GW_EPI_BYTES_PER_THREAD)
#define GW_SMEM_BYTES (1024 + GW_STAGES * GW_STAGE_BYTES + GW_EPI_BYTES + 2 * GW_STAGES * 8)

// A CUtensorMap (cuda.h), passed by value as a __grid_constant__ parameter.
struct alignas(64) TensorMap { unsigned long long opaque[16]; };

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define TWELL_HAS_WGMMA 1
#endif

#ifdef TWELL_HAS_WGMMA
__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(unsigned long long* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
    unsigned done = 0;
    do {
        asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done) : "r"(smem_addr(bar)), "r"(parity) : "memory");
    } while (!done);
}
// Arrive on the mbarrier at the same shared-memory offset in CTA `cta` of the cluster.
__device__ __forceinline__ void mbar_arrive_cluster(unsigned long long* bar, unsigned cta) {
    asm volatile("{\n .reg .b32 ra;\n mapa.shared::cluster.u32 ra, %0, %1;\n mbarrier.arrive.shared::cluster.b64 _, [ra];\n}\n"
                 :: "r"(smem_addr(bar)), "r"(cta) : "memory");
}
__device__ __forceinline__ unsigned cluster_ctarank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.aligned;\nbarrier.cluster.wait.aligned;" ::: "memory");
}
// The same box lands at the same shared-memory offset of every CTA in cta_mask, each CTA's mbarrier at
// `bar`'s offset receiving the bytes.
__device__ __forceinline__ void tma_load_2d_multicast(void* dst, const TensorMap* map, unsigned long long* bar,
                                                      int c_inner, int c_outer, unsigned short cta_mask,
                                                      unsigned long long policy) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster.L2::cache_hint"
                 " [%0], [%1, {%3, %4}], [%2], %5, %6;"
                 :: "r"(smem_addr(dst)), "l"(reinterpret_cast<unsigned long long>(map)), "r"(smem_addr(bar)),
                    "r"(c_inner), "r"(c_outer), "h"(cta_mask), "l"(policy) : "memory");
}
__device__ __forceinline__ void tma_load_2d(void* dst, const TensorMap* map, unsigned long long* bar, int c_inner, int c_outer,
                                            unsigned long long policy) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint"
                 " [%0], [%1, {%3, %4}], [%2], %5;"
                 :: "r"(smem_addr(dst)), "l"(reinterpret_cast<unsigned long long>(map)), "r"(smem_addr(bar)),
                    "r"(c_inner), "r"(c_outer), "l"(policy) : "memory");
}
// L2 policy of the tile loads: normal priority for both operands.  (evict_last on the weight tiles, which
// every row block re-reads, would pin w_gate in L2 and crowd the w_up / w_down rows that the up/down
// gathers read right after this kernel.)  The TwELL output is written with ordinary stores for the same
// reason (the up/down kernel reads it next, ideally from L2).
__device__ __forceinline__ unsigned long long policy_evict_normal() {
    unsigned long long p;
    asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(p));
    return p;
}

// A consumer warp releases a stage in every CTA of the cluster (each CTA's producer multicasts into all).
template <int CLUSTER>
__device__ __forceinline__ void release_stage(unsigned long long* bar) {
    if (CLUSTER == 1) {
        mbar_arrive(bar);
    } else {
#pragma unroll
        for (int c = 0; c < CLUSTER; ++c) mbar_arrive_cluster(bar, (unsigned)c);
    }
}

// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart.
__device__ __forceinline__ unsigned long long smem_desc(const void* p) {
    const unsigned long long a = smem_addr(p);
    return ((a & 0x3FFFFull) >> 4) | (1ull << 16) | ((1024ull >> 4) << 32) | (1ull << 62);
}

#define WGMMA_REGS \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
    "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
    "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
    "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
    "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"

template <bool BF16>
__device__ __forceinline__ void wgmma_m64n256k16(float d[128], unsigned long long da, unsigned long long db, int scale_d) {
    if (BF16) {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {" WGMMA_REGS "}, %128, %129, p, 1, 1, 0, 0;\n}\n"
                     : 
      "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
      "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
      "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
      "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
      "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
      "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
      "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
      "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
      "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
      "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
      "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
      "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
      "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
                     : "l"(da), "l"(db), "r"(scale_d));
    } else {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 {" WGMMA_REGS "}, %128, %129, p, 1, 1, 0, 0;\n}\n"
                     : 
      "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
      "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
      "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
      "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
      "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
      "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
      "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
      "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
      "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
      "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
      "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
      "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
      "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
      "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
      "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
                     : "l"(da), "l"(db), "r"(scale_d));
    }
}
#endif  // TWELL_HAS_WGMMA


// x (M, K) and w (n, K) row-major 16-bit, K % 8 == 0, 16-byte aligned (the tensor maps' rule); boxes
// {64, 128} for x and {64, 256 / CLUSTER} for w, 128-byte swizzle, out-of-bounds elements read as zero.
// CLUSTER CTAs (a thread-block cluster along x) take CLUSTER consecutive row blocks of the same column
// block: each loads its own x tile and 1/CLUSTER of the w tile, multicast to every CTA of the cluster, so
// the L2 -> SM traffic of the w tile is divided by CLUSTER (the kernel is otherwise L2-bandwidth bound:
// 48 KB per 4.2 MFLOP k-step at ~740 TFLOP/s is 8.7 TB/s).  A stage is refilled only when the consumers
// of every CTA in the cluster have released it.  Work: (row-block group, column block) items taken in a
// static stride by a persistent grid whose size the launcher reads from the occupancy API.
// PACK = false skips the epilogue (the GEMM mainloop alone, for the benchmark probes; never used by the ops).
template <typename T, int TILE, int CLUSTER, bool PACK>
__global__ void __cluster_dims__(CLUSTER, 1, 1) __launch_bounds__(GW_THREADS, 1) gate_twell_wgmma(
    const __grid_constant__ TensorMap map_x, const __grid_constant__ TensorMap map_w,
    int M, int n, int K, int n_tiles, int slots,
    int* __restrict__ counts, u8* __restrict__ indices, T* __restrict__ values, int* __restrict__ neuron_counts)
{
#ifdef TWELL_HAS_WGMMA
    extern __shared__ unsigned char smem_raw[];
    // 1024-byte alignment (128-byte swizzle atoms) by pointer arithmetic on the shared array itself, so the
    // compiler keeps the shared address space (STS/LDS rather than generic ST/LD in the epilogue).
    unsigned char* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
    unsigned char* stage_a = smem;
    unsigned char* stage_b = smem + GW_STAGES * GW_A_BYTES;
    uint4* epi = reinterpret_cast<uint4*>(smem + GW_STAGES * GW_STAGE_BYTES);
    unsigned long long* full = reinterpret_cast<unsigned long long*>(smem + GW_STAGES * GW_STAGE_BYTES + GW_EPI_BYTES);
    unsigned long long* empty = full + GW_STAGES;

    const unsigned rank = CLUSTER > 1 ? cluster_ctarank() : 0u;
    const int m_blocks = (M + GG_BM - 1) / GG_BM, n_blocks = (n + GG_BN - 1) / GG_BN;
    const int n_work = (m_blocks + CLUSTER - 1) / CLUSTER * n_blocks;
    const int cluster_id = blockIdx.x / CLUSTER, n_clusters = gridDim.x / CLUSTER;
    const int k_iters = (K + GW_BK - 1) / GW_BK;
    const int wg = threadIdx.x >> 7;

    if (threadIdx.x == 0) {
        for (int s = 0; s < GW_STAGES; ++s) {
            mbar_init(full + s, 1);
            mbar_init(empty + s, 8 * CLUSTER);   // one arrival per consumer warp of every CTA in the cluster
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    if (CLUSTER > 1) cluster_sync(); else __syncthreads();

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
        if (threadIdx.x == 0) {
            int stage = 0;
            unsigned phase = 0;
            const unsigned long long policy = policy_evict_normal();
            for (int w = cluster_id; w < n_work; w += n_clusters) {
                const int m0 = ((w / n_blocks) * CLUSTER + (int)rank) * GG_BM, n0 = (w % n_blocks) * GG_BN;
                for (int k = 0; k < k_iters; ++k) {
                    mbar_wait(empty + stage, phase ^ 1u);
                    mbar_expect_tx(full + stage, GW_STAGE_BYTES);
                    tma_load_2d(stage_a + stage * GW_A_BYTES, &map_x, full + stage, k * GW_BK, m0, policy);
                    if (CLUSTER == 1) {
                        tma_load_2d(stage_b + stage * GW_B_BYTES, &map_w, full + stage, k * GW_BK, n0, policy);
                    } else {
                        constexpr int part = GW_B_BYTES / CLUSTER;
                        tma_load_2d_multicast(stage_b + stage * GW_B_BYTES + rank * part, &map_w, full + stage,
                                              k * GW_BK, n0 + (int)rank * (GG_BN / CLUSTER),
                                              (unsigned short)((1u << CLUSTER) - 1u), policy);
                    }
                    if (++stage == GW_STAGES) { stage = 0; phase ^= 1u; }
                }
            }
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
        const int c = wg - 1;                                   // consumer: rows [64c, 64c + 64)
        const int lane = threadIdx.x & 31, warp_in_wg = (threadIdx.x >> 5) & 3;
        int stage = 0;
        unsigned phase = 0;
        float acc[128];
#pragma unroll
        for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
        for (int w = cluster_id; w < n_work; w += n_clusters) {
            const int m0 = ((w / n_blocks) * CLUSTER + (int)rank) * GG_BM, n0 = (w % n_blocks) * GG_BN;
            int prev = -1;
            for (int k = 0; k < k_iters; ++k) {
                mbar_wait(full + stage, phase);
                asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
                const unsigned long long da = smem_desc(stage_a + stage * GW_A_BYTES + c * 64 * 128);
                const unsigned long long db = smem_desc(stage_b + stage * GW_B_BYTES);
#pragma unroll
                for (int kk = 0; kk < GW_BK / 16; ++kk)
                    wgmma_m64n256k16<MmaType<T>::bf16>(acc, da + 2 * kk, db + 2 * kk, (k | kk) != 0);
                asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
                asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
                if (prev >= 0 && lane == 0) release_stage<CLUSTER>(empty + prev);
                prev = stage;
                if (++stage == GW_STAGES) { stage = 0; phase ^= 1u; }
            }
            asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
            if (prev >= 0 && lane == 0) release_stage<CLUSTER>(empty + prev);

            // epilogue: each warp owns 16 full rows (all 256 columns) of the tile and packs them from its
            // registers; the producer is already loading the next tile's stages meanwhile.
            if (PACK) {
                const int row0 = m0 + c * 64 + warp_in_wg * 16;
                pack_fragment_rows<T, TILE>(acc, epi + (threadIdx.x - 128) * (GW_EPI_BYTES_PER_THREAD / 16),
                                            row0, n0, M, n_tiles, slots, counts, indices, values, neuron_counts);
            } else if (M < 0) {                                 // never: keeps the accumulators (and the MMAs) live
#pragma unroll
                for (int i = 0; i < 128; ++i) values[128 * threadIdx.x + i] = from_f<T>(acc[i]);
            }
        }
    }
    // No CTA may leave while a peer can still multicast into its shared memory or arrive on its barriers.
    if (CLUSTER > 1) cluster_sync();
#endif
}

// ================================================================ portable: cp.async + mma.sync (sm_80+)
#define GM_BK 32
#define GM_LDS (GM_BK + 8)           // padded stage row (elements): conflict-free ldmatrix
#define GM_STAGES 3
#define GM_THREADS 256               // 8 warps: 2 (rows) x 4 (columns), 64 x 64 each
#define GM_SMEM_BYTES (GM_STAGES * (GG_BM + GG_BN) * GM_LDS * 2)

template <bool BF16>
__device__ __forceinline__ void mma_m16n8k16(float c[4], const unsigned a[4], const unsigned b[2]) {
    if (BF16)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned r[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

// Load k-block kb of the (BM x BK) x tile and (BN x BK) w tile into stage s (zero-filled out of bounds).
template <typename T>
__device__ __forceinline__ void mma_load_stage(T* sa, T* sb, const T* __restrict__ x, const T* __restrict__ w,
                                               int M, int n, int K, int m0, int n0, int kb) {
    const int k0 = kb * GM_BK;
    for (int i = threadIdx.x; i < (GG_BM + GG_BN) * (GM_BK / 8); i += GM_THREADS) {
        const int row = i / (GM_BK / 8), ch = i % (GM_BK / 8);
        const int k = k0 + ch * 8;
        const bool is_a = row < GG_BM;
        const int grow = is_a ? m0 + row : n0 + row - GG_BM;
        const int limit = is_a ? M : n;
        const T* base = is_a ? x : w;
        const bool ok = grow < limit && k < K;
        const T* src = ok ? base + (long long)grow * K + k : base;
        T* dst = is_a ? sa + row * GM_LDS + ch * 8 : sb + (row - GG_BM) * GM_LDS + ch * 8;
        cp_async16(dst, src, ok ? 16 : 0);
    }
}

// x (M, K), w (n, K) row-major, K % 8 == 0, 16-byte aligned rows.  One CTA per 128 x 256 output tile.
template <typename T, int TILE>
__global__ void __launch_bounds__(GM_THREADS, 1) gate_twell_mma(
    const T* __restrict__ x, const T* __restrict__ w, int M, int n, int K, int n_tiles, int slots,
    int* __restrict__ counts, u8* __restrict__ indices, T* __restrict__ values, int* __restrict__ neuron_counts)
{
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sa = reinterpret_cast<T*>(smem_raw);
    T* sb = sa + GM_STAGES * GG_BM * GM_LDS;
    const int n_blocks = (n + GG_BN - 1) / GG_BN;
    const int m0 = (blockIdx.x / n_blocks) * GG_BM, n0 = (blockIdx.x % n_blocks) * GG_BN;
    const int k_iters = (K + GM_BK - 1) / GM_BK;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = warp >> 2, wn = warp & 3;

    float acc[4][8][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

#pragma unroll
    for (int s = 0; s < GM_STAGES - 1; ++s) {
        if (s < k_iters) mma_load_stage<T>(sa + s * GG_BM * GM_LDS, sb + s * GG_BN * GM_LDS, x, w, M, n, K, m0, n0, s);
        asm volatile("cp.async.commit_group;" ::: "memory");
    }
    for (int kb = 0; kb < k_iters; ++kb) {
        asm volatile("cp.async.wait_group %0;" :: "n"(GM_STAGES - 2) : "memory");
        __syncthreads();
        const int next = kb + GM_STAGES - 1;
        if (next < k_iters) {
            const int s = next % GM_STAGES;
            mma_load_stage<T>(sa + s * GG_BM * GM_LDS, sb + s * GG_BN * GM_LDS, x, w, M, n, K, m0, n0, next);
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
        const T* a_s = sa + (kb % GM_STAGES) * GG_BM * GM_LDS;
        const T* b_s = sb + (kb % GM_STAGES) * GG_BN * GM_LDS;
#pragma unroll
        for (int kk = 0; kk < GM_BK / 16; ++kk) {
            unsigned af[4][4], bf[8][2];
#pragma unroll
            for (int i = 0; i < 4; ++i)
                ldmatrix_x4(af[i], a_s + (wm * 64 + i * 16 + (lane & 15)) * GM_LDS + kk * 16 + (lane >> 4) * 8);
#pragma unroll
            for (int p = 0; p < 4; ++p) {
                unsigned r[4];
                ldmatrix_x4(r, b_s + (wn * 64 + p * 16 + (lane & 7) + ((lane >> 4) << 3)) * GM_LDS + kk * 16 + ((lane >> 3) & 1) * 8);
                bf[2 * p][0] = r[0]; bf[2 * p][1] = r[1];
                bf[2 * p + 1][0] = r[2]; bf[2 * p + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) mma_m16n8k16<MmaType<T>::bf16>(acc[i][j], af[i], bf[j]);
        }
    }
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    __syncthreads();                                            // stages are free: reuse them as the staged tile
    T* staged = sa;
    const int q2 = 2 * (lane & 3);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int r = wm * 64 + i * 16 + (lane >> 2), col = wn * 64 + j * 8 + q2;
            stage_pair<T>(staged, r, col, acc[i][j][0], acc[i][j][1]);
            stage_pair<T>(staged, r + 8, col, acc[i][j][2], acc[i][j][3]);
        }
    __syncthreads();
#pragma unroll 1
    for (int h = 0; h < 2; ++h)
        pack_staged_rows<T, TILE, 8>(staged + (warp * 16 + 8 * h) * GG_LD, m0 + warp * 16 + 8 * h, n0, M, n,
                                     n_tiles, slots, counts, indices, values, neuron_counts);
#endif
}
