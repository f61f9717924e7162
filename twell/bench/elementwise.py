"""The dense CuPy baselines' fused elementwise kernels (``cupy.ElementwiseKernel``).

* forward ``h = relu(z) ⊙ u``: fp32 product (fp64 for float64), rounded once; a variant reading ``z`` and
  ``u`` from the two halves of one ``(M, 2n)`` array (``dense_cupy_cat``);
* backward of ``h`` with the L1 term: ``dt = dh + s·sign(h)`` (``s = λ/M``), ``du = dt ⊙ relu(z)``,
  ``dz = dt ⊙ u ⊙ [z > 0]`` in one kernel;
* bfloat16 with ``n % 4 == 0``: the same arithmetic on ``uint64`` views, four values per thread, bitwise
  equal to the generic kernels and ≈ 3× faster (measured on the H200 at M = 16384: 0.16 ms vs 0.45 ms;
  the generic CuPy bf16 kernel makes the whole FFN slower than PyTorch eager).  Set
  ``TWELL_BENCH_GENERIC_ELEMENTWISE=1`` in the environment to use the generic kernels anyway.

The kernel bodies are module constants so that tests can compile them (NVRTC, or the host compiler for
the bf16x4 backward).
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["relu_mul_kernel", "relu_mul_bwd_kernel", "use_bf16x4"]

ACC_PREAMBLE = r"""
template <typename T> struct twell_bench_acc { typedef float type; };
template <> struct twell_bench_acc<double> { typedef double type; };
"""

RELU_MUL_OP = r"""
typedef twell_bench_acc<T>::type A;
const A zz = (A)z;
const A uu = (A)u;
h = (T)(zz > (A)0 ? zz * uu : (A)0);
"""

# zu is the (M, 2n) output of x @ [Wg; Wu]^T, read row-major; h is (M, n).
CAT_INDEX = r"""
long long r, c;
if (small) {
    const unsigned int ii = (unsigned int)i, nn = (unsigned int)n;
    r = ii / nn;
    c = ii - (unsigned int)r * nn;
} else {
    r = i / n;
    c = i - r * n;
}
const long long base = r * 2 * n + c;
"""

RELU_MUL_CAT_OP = CAT_INDEX + r"""
typedef twell_bench_acc<T>::type A;
const A zz = (A)zu[base];
const A uu = (A)zu[base + n];
h = (T)(zz > (A)0 ? zz * uu : (A)0);
"""

# bfloat16, four values per thread (8-byte loads and stores on uint64 views):
# the same arithmetic as the generic kernel (fp32 product, one round-to-nearest-even).
BF16X4_PREAMBLE = r"""
__device__ __forceinline__ unsigned long long twell_bench_f2bf(float f) {
    const unsigned int b = __float_as_uint(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return 0x7fc0ull;  /* NaN */
    return (unsigned long long)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}
__device__ __forceinline__ unsigned long long twell_bench_relu_mul4(unsigned long long zv, unsigned long long uv) {
    unsigned long long out = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const float zf = __uint_as_float((unsigned int)((zv >> (16 * k)) & 0xffffull) << 16);
        const float uf = __uint_as_float((unsigned int)((uv >> (16 * k)) & 0xffffull) << 16);
        out |= twell_bench_f2bf(zf > 0.f ? zf * uf : 0.f) << (16 * k);
    }
    return out;
}
"""
RELU_MUL_BF16X4_OP = "h = twell_bench_relu_mul4(z, u);"
RELU_MUL_CAT_BF16X4_OP = CAT_INDEX + "h = twell_bench_relu_mul4(zu[base], zu[base + n]);"

# Backward of h = relu(z) * u with the L1 term: dt = dh + s * sign(h) (s = λ/M), du = dt * relu(z),
# dz = dt * u * (z > 0); fp32 math (fp64 for float64), each output rounded once.  Inputs are read into
# registers before the outputs are written, so du may alias dh and dz may alias z (the dense training
# baseline writes them in place: CuPy passes an input that *is* an output array without copying it).
RELU_MUL_BWD_OP = r"""
typedef twell_bench_acc<T>::type A;
const A zz = (A)z;
const A uu = (A)u;
A dt = (A)dh;
A gu = (A)0, gz = (A)0;
if (zz > (A)0) {
    if (s != 0) {
        const A hh = zz * uu;
        dt += hh > (A)0 ? (A)s : (hh < (A)0 ? -(A)s : (A)0);
    }
    gu = dt * zz;
    gz = dt * uu;
}
du = (T)gu;
dz = (T)gz;
"""

BF16X4_BWD_PREAMBLE = BF16X4_PREAMBLE + r"""
__device__ __forceinline__ float twell_bench_bf(unsigned long long v, int k) {
    return __uint_as_float((unsigned int)((v >> (16 * k)) & 0xffffull) << 16);
}
__device__ __forceinline__ void twell_bench_relu_mul_bwd4(unsigned long long dhv, unsigned long long zv,
                                                          unsigned long long uv, float s,
                                                          unsigned long long &du, unsigned long long &dz) {
    unsigned long long a = 0, b = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const float zf = twell_bench_bf(zv, k);
        const float uf = twell_bench_bf(uv, k);
        float dt = twell_bench_bf(dhv, k), gu = 0.f, gz = 0.f;
        if (zf > 0.f) {
            if (s != 0.f) {
                const float hh = zf * uf;
                dt += hh > 0.f ? s : (hh < 0.f ? -s : 0.f);
            }
            gu = dt * zf;
            gz = dt * uf;
        }
        a |= twell_bench_f2bf(gu) << (16 * k);
        b |= twell_bench_f2bf(gz) << (16 * k);
    }
    du = a;
    dz = b;
}
"""
RELU_MUL_BWD_BF16X4_OP = r"""
const unsigned long long dhv = dh, zv = z, uv = u;
twell_bench_relu_mul_bwd4(dhv, zv, uv, s, du, dz);
"""


#: compiled kernels by (variant, bf16x4): a cache, built on first use.
_KERNELS: dict = {}


def relu_mul_kernel(cat: bool, bf16x4: bool = False):
    """``h = relu(z) * u`` in fp32 (fp64 for float64), rounded once (CuPy ElementwiseKernel).

    ``bf16x4``: the bfloat16 kernel on ``uint64`` views (four values per thread).
    """
    key = (cat, bf16x4)
    k = _KERNELS.get(key)
    if k is None:
        import cupy as cp  # noqa: PLC0415
        if bf16x4 and cat:
            k = cp.ElementwiseKernel("raw uint64 zu, int64 n, int32 small", "uint64 h", RELU_MUL_CAT_BF16X4_OP,
                                     "twell_bench_relu_mul_cat_bf16x4", preamble=BF16X4_PREAMBLE)
        elif bf16x4:
            k = cp.ElementwiseKernel("uint64 z, uint64 u", "uint64 h", RELU_MUL_BF16X4_OP,
                                     "twell_bench_relu_mul_bf16x4", preamble=BF16X4_PREAMBLE)
        elif cat:
            k = cp.ElementwiseKernel("raw T zu, int64 n, int32 small", "T h", RELU_MUL_CAT_OP,
                                     "twell_bench_relu_mul_cat", preamble=ACC_PREAMBLE)
        else:
            k = cp.ElementwiseKernel("T z, T u", "T h", RELU_MUL_OP, "twell_bench_relu_mul",
                                     preamble=ACC_PREAMBLE)
        _KERNELS[key] = k
    return k


def relu_mul_bwd_kernel(bf16x4: bool):
    """``(du, dz) = backward of h = relu(z) * u`` (with the L1 term), fused; see ``RELU_MUL_BWD_OP``.

    Generic: ``k(dh, z, u, float64 s, du, dz)``; ``bf16x4``: on ``uint64`` views, ``s`` float32.
    """
    key = ("bwd", bf16x4)
    k = _KERNELS.get(key)
    if k is None:
        import cupy as cp  # noqa: PLC0415
        if bf16x4:
            k = cp.ElementwiseKernel("uint64 dh, uint64 z, uint64 u, float32 s", "uint64 du, uint64 dz",
                                     RELU_MUL_BWD_BF16X4_OP, "twell_bench_relu_mul_bwd_bf16x4",
                                     preamble=BF16X4_BWD_PREAMBLE)
        else:
            k = cp.ElementwiseKernel("T dh, T z, T u, float64 s", "T du, T dz", RELU_MUL_BWD_OP,
                                     "twell_bench_relu_mul_bwd", preamble=ACC_PREAMBLE)
        _KERNELS[key] = k
    return k


def use_bf16x4(dtype, n: int) -> bool:
    """Whether the bf16x4 kernels apply: bfloat16, ``n % 4 == 0``, TWELL_BENCH_GENERIC_ELEMENTWISE unset."""
    return np.dtype(dtype).name == "bfloat16" and n % 4 == 0 and not os.environ.get("TWELL_BENCH_GENERIC_ELEMENTWISE")
