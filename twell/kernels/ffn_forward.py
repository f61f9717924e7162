"""Launchers of the ``ffn_forward`` kernel family (cuda_src/ffn_forward.cu).

* :func:`twell_up_down` -- fused up/down projection from a TwELL gate (or a
  non-gated down projection) for the compact rows: the warp-per-row fast path
  (16-bit dtypes, d a multiple of 256 up to 2048) or the general CTA-per-row
  kernel (any dtype and d; also the split-row decode variant).
* :func:`dense_gate_up_down` -- decode path straight from the dense gate z (no
  TwELL, no routing, no host synchronisation; exact at any activity).
* :func:`decode_fused` -- decode batches of at most :data:`DECODE_FUSED_MAX_ROWS` rows (16-bit, d a
  multiple of 256 up to 2048): gate GEMV, entries, up and down in one kernel plus a reduction.
* :func:`gate_mul` -- h = (relu) g * u for the dense backup rows.
"""

from __future__ import annotations

import numpy as np

from .._kernels import KernelFamily, get_kernel, register_family
from ._launch import NULL, aligned, cbool, ctype_of, grid_1d, i32
from .pack import DEVICE_DTYPES

#: Longest active list of a compact row the kernels hold (cuda_src/ffn_forward.cu MAX_LIST); the FFN
#: ops route longer rows to the dense backup.
MAX_LIST = 512
THREADS = 128
WARP_KERNEL_WARPS = 4
WARP_KERNEL_MAX_NC = 8  # d <= 2048 on the warp-per-row path
#: Largest batch of the fused decode kernel (cuda_src/ffn_forward.cu DF_MAX_ROWS), and its CTA shape.
DECODE_FUSED_MAX_ROWS = 8
_DF_WARPS, _DF_MAX_NPW = 8, 8

_names = []
for _d in DEVICE_DTYPES:
    _t = ctype_of(_d, "dtype")
    for _v in (True, False):
        for _g in (True, False):
            _names.append(f"twell_up_down<{_t}, {cbool(_v)}, {cbool(_g)}>")
            _names.append(f"dense_gate_up_down<{_t}, {cbool(_v)}, {cbool(_g)}>")
        _names.append(f"csr_up_down<{_t}, {cbool(_v)}>")
    if _d != "float32":
        for _nc in range(1, WARP_KERNEL_MAX_NC + 1):
            for _g in (True, False):
                _names.append(f"twell_up_down_warp<{_t}, {_nc}, {cbool(_g)}>")
            _names.append(f"csr_up_down_warp<{_t}, {_nc}>")
            for _g in (True, False):
                _names.append(f"decode_fused<{_t}, {_nc}, {cbool(_g)}>")
        _names.append(f"decode_reduce<{_t}>")
    _names.append(f"reduce_split_rows<{_t}>")
    _names.append(f"gate_mul<{_t}, true>")
    _names.append(f"gate_mul<{_t}, false>")
    _names.append(f"backup_gate_mul_l1<{_t}>")
_names.append("train_stats")

# Hot: the warp-per-row kernels and the 16-byte-load variants of the CTA kernels (the scalar-load
# fallbacks for odd d may spill a few bytes).
FAMILY = register_family(KernelFamily("ffn_forward", tuple(_names),
                                      hot_kernels=(r"twell_up_down_warp<", r"csr_up_down_warp<", r"decode_",
                                                   r"(twell_up_down|csr_up_down|dense_gate_up_down)<[^,]+, true")))


def _cp():
    import cupy  # noqa: PLC0415
    return cupy


def _sm_count() -> int:
    return _cp().cuda.Device().attributes["MultiProcessorCount"]


def choose_splits(m: int, sm_count: int) -> int:
    """Work items per row: 1 for batches that fill the GPU, more for decode-sized batches."""
    target = 8 * sm_count
    if m >= target:
        return 1
    return int(min(32, max(1, -(-target // max(m, 1)))))


def _vec_ok(dtype, d, *arrays) -> bool:
    width = 16 // dtype.itemsize
    return d % width == 0 and all(aligned(a, 16) for a in arrays)


def warp_path_nc(dtype, d, *arrays) -> int:
    """16-byte chunks per lane of the warp-per-row kernel, or 0 if it cannot take this shape."""
    if np.dtype(dtype).itemsize != 2 or d % 256 or not 1 <= d // 256 <= WARP_KERNEL_MAX_NC:
        return 0
    return d // 256 if all(aligned(a, 16) for a in arrays) else 0


def _blocks_per_sm(kernel, threads: int, static_smem: int) -> int:
    regs = max(int(kernel.num_regs), 1)
    per_warp = -(-regs * 32 // 256) * 256
    warps = min(64, 65536 // per_warp)
    by_regs = warps // (threads // 32)
    by_smem = (227 * 1024) // max(static_smem + 1024, 1)
    return max(1, min(by_regs, by_smem, 2048 // threads, 32))


def launch_warp_rows(kernel, m: int, list_bytes_per_warp: int, args: tuple, work_counter=None):
    """Launch a warp-per-row kernel on a persistent grid: as many CTAs as fit on the device (from the
    kernel's registers and static shared memory), never more warps than rows.  Rows are handed out by
    ``work_counter``, a zeroed int32 device scalar (allocated if None) passed as the last argument."""
    threads = 32 * WARP_KERNEL_WARPS
    blocks = min(_blocks_per_sm(kernel, threads, WARP_KERNEL_WARPS * list_bytes_per_warp) * _sm_count(),
                 -(-m // WARP_KERNEL_WARPS))
    if work_counter is None:
        work_counter = _cp().zeros(1, dtype=np.int32)
    kernel((blocks,), (threads,), tuple(args) + (work_counter,))


def twell_up_down(x, counts, indices, values, route, w_up, w_down, tile_width: int, y, *, compact: int = -1,
                  gated: bool = True, splits: int | None = None, work_counter=None):
    """Fused up/down for the compact rows of a TwELL gate (backup rows are left untouched).

    x (M, d); counts (M, NT) int32; indices (M, NT, S) uint8; values (M, NT, S);
    route (M,) int32: a row is computed iff ``route[row] == compact`` (a TwELL's
    ``backup_slot`` with compact = -1, or the pack kernel's route codes with
    compact = 0); w_up, w_down (n, d); y (M, d) written for compact rows.
    ``gated=False``: the TwELL values are h itself and ``w_up`` is unused.
    ``work_counter``: a zeroed int32 device scalar for the warp path's dynamic
    row scheduler (allocated if not given).
    """
    cp = _cp()
    m, d = x.shape
    if m == 0:
        return y
    n_tiles, slots = counts.shape[1], indices.shape[2]
    ct = ctype_of(x.dtype, "x")
    sms = _sm_count()
    if splits is None:
        splits = choose_splits(m, sms)
    nc = warp_path_nc(x.dtype, d, x, w_up, w_down, y)
    if nc and splits == 1:
        k = get_kernel("ffn_forward", f"twell_up_down_warp<{ct}, {nc}, {cbool(gated)}>")
        launch_warp_rows(k, m, MAX_LIST * 8,
                         (x, counts, indices, values, route, i32(compact), w_up, w_down, i32(m), i32(n_tiles),
                          i32(slots), i32(tile_width), y), work_counter)
        return y
    vec = _vec_ok(x.dtype, d, x, w_up, w_down, y)
    k = get_kernel("ffn_forward", f"twell_up_down<{ct}, {cbool(vec)}, {cbool(gated)}>")
    smem = d * x.dtype.itemsize if gated else 0
    _raise_smem_limit(k, smem)
    partial = cp.empty((m, splits, d), dtype=cp.float32) if splits > 1 else None
    k((m * splits,), (THREADS,),
      (x, counts, indices, values, route, i32(compact), w_up, w_down, i32(m), i32(d), i32(n_tiles), i32(slots),
       i32(tile_width), i32(splits), y, partial if partial is not None else y),
      shared_mem=smem)
    if splits > 1:
        _reduce(partial, route, compact, y, splits)
    return y


def _raise_smem_limit(kernel, smem: int):
    if smem > 48 * 1024:
        kernel.max_dynamic_shared_size_bytes = smem


def _reduce(partial, route, compact: int, y, splits: int):
    m, d = y.shape
    r = get_kernel("ffn_forward", f"reduce_split_rows<{ctype_of(y.dtype, 'y')}>")
    r((grid_1d(m * d, 256),), (256,), (partial, NULL if route is None else route, i32(compact), i32(m), i32(d),
                                       i32(splits), y))


def dense_gate_up_down(x, z, w_up, w_down, y, *, gated: bool = True, splits: int | None = None):
    """y = (relu(z) ⊙ (x w_upᵀ)) w_down (``gated``) or relu(z) w_down, reading the dense gate z (M, n).

    Every row is computed sparsely and exactly, whatever its number of active
    neurons; no host synchronisation.  For decode-sized M.
    """
    cp = _cp()
    m, d = x.shape
    n = z.shape[1]
    if m == 0:
        return y
    if splits is None:
        splits = choose_splits(m, _sm_count())
    ct = ctype_of(x.dtype, "x")
    vec = _vec_ok(x.dtype, d, x, w_up, w_down) and n % 8 == 0 and aligned(z, 16)
    k = get_kernel("ffn_forward", f"dense_gate_up_down<{ct}, {cbool(vec)}, {cbool(gated)}>")
    smem = d * x.dtype.itemsize if gated else 0
    _raise_smem_limit(k, smem)
    partial = cp.zeros((m, splits, d), dtype=cp.float32)
    k((m * splits,), (THREADS,), (x, z, w_up, w_down, i32(m), i32(d), i32(n), i32(splits), partial),
      shared_mem=smem)
    _reduce(partial, None, 0, y, splits)
    return y


def decode_fused_supported(x, w_first, w_up, w_down, y) -> bool:
    """Whether :func:`decode_fused` takes these operands: at most DECODE_FUSED_MAX_ROWS rows, a 16-bit
    dtype, d = 256 * NC with NC <= 8, C-contiguous 16-byte-aligned arrays of one dtype."""
    m, d = x.shape
    arrays = (x, w_first, w_up, w_down, y)
    return (1 <= m <= DECODE_FUSED_MAX_ROWS and x.dtype.itemsize == 2 and d % 256 == 0
            and 1 <= d // 256 <= WARP_KERNEL_MAX_NC
            and all(a.dtype == x.dtype and a.flags.c_contiguous and aligned(a, 16) for a in arrays))


def decode_fused(x, w_first, w_up, w_down, y, *, gated: bool = True):
    """y = (relu(x w_firstᵀ) ⊙ (x w_upᵀ)) w_down (``gated``; else relu(x w_firstᵀ) w_down) for a decode
    batch, without materialising the gate: one kernel streams w_first once, keeps the entries and gathers
    their w_up / w_down rows into per-CTA fp32 partials; a second sums the partials in a fixed order.

    Parameters
    ----------
    x : cupy.ndarray (M, d), M <= DECODE_FUSED_MAX_ROWS, bfloat16 / float16, d = 256 * NC (NC <= 8)
    w_first, w_up, w_down : cupy.ndarray (n, d), x's dtype, neuron-major (``w_up`` unused if not gated)
    y : cupy.ndarray (M, d), x's dtype; every element is written

    All C-contiguous and 16-byte aligned (:func:`decode_fused_supported`).  Deterministic; a row's result
    depends only on its own x row.
    """
    cp = _cp()
    m, d = x.shape
    n = w_first.shape[0]
    if not decode_fused_supported(x, w_first, w_up, w_down, y):
        raise ValueError("decode_fused takes at most 8 rows of a 16-bit dtype, d = 256 * k (k <= 8), and "
                         "C-contiguous 16-byte-aligned arrays of one dtype")
    nc = d // 256
    # two CTAs per SM (96 registers, 39 KB of shared memory each) where n allows: one wave, 16 warps per
    # SM with a w_gate row in flight each
    npw = min(_DF_MAX_NPW, max(1, -(-n // (_DF_WARPS * 2 * _sm_count()))))
    ctas = -(-n // (_DF_WARPS * npw))
    partial = cp.empty((ctas, m, d), dtype=cp.float32)                 # only flagged CTAs write theirs
    flags = cp.empty(ctas, dtype=cp.int32)
    ct = ctype_of(x.dtype, "x")
    k = get_kernel("ffn_forward", f"decode_fused<{ct}, {nc}, {cbool(gated)}>")
    k((ctas,), (32 * _DF_WARPS,), (x, w_first, w_up, w_down, i32(m), i32(n), i32(npw), partial, flags))
    r = get_kernel("ffn_forward", f"decode_reduce<{ct}>")
    r((nc, m), (32 * _DF_WARPS,), (partial, flags, i32(ctas), i32(m), i32(d), y))
    return y


def csr_up_down(x, row_ptr, col_indices, g_values, backup_slot, w_up, w_down, y, u_values, row_l1, *,
                work_counter=None):
    """Training forward for the compact rows of a Hybrid gate: y, u at every entry, and sum |h| per row.

    Backup rows (``backup_slot >= 0``) are left untouched in ``y`` and ``row_l1``.
    """
    m, d = x.shape
    if m == 0:
        return
    ct = ctype_of(x.dtype, "x")
    nc = warp_path_nc(x.dtype, d, x, w_up, w_down, y)
    if nc:
        k = get_kernel("ffn_forward", f"csr_up_down_warp<{ct}, {nc}>")
        launch_warp_rows(k, m, MAX_LIST * 8, (x, row_ptr, col_indices, g_values, backup_slot, w_up, w_down, i32(m),
                                              y, u_values, row_l1), work_counter)
        return
    vec = _vec_ok(x.dtype, d, x, w_up, w_down, y)
    k = get_kernel("ffn_forward", f"csr_up_down<{ct}, {cbool(vec)}>")
    smem = d * x.dtype.itemsize
    _raise_smem_limit(k, smem)
    k((m,), (THREADS,), (x, row_ptr, col_indices, g_values, backup_slot, w_up, w_down, i32(m), i32(d), y,
                         u_values, row_l1), shared_mem=smem)


def train_stats(row_l1, nnz_all):
    """Device float64 (2,): ``(sum(row_l1) / M, nnz_all / M)`` -- the training forward's L1 and L0 statistics
    in one launch (``row_l1`` float32 (M,), ``nnz_all`` int64 (1,); M = 0 divides by 1)."""
    cp = _cp()
    out = cp.empty(2, dtype=cp.float64)
    get_kernel("ffn_forward", "train_stats")((1,), (1024,), (row_l1, i32(row_l1.shape[0]), nnz_all, out))
    return out


def backup_gate_mul_l1(g, u, rows, row_l1):
    """Dense-backup rows of the training forward: ``h = g * u`` (R, n) rounded once, and
    ``row_l1[rows[r]] = sum |h[r]|`` (float32) -- one launch instead of five array operations."""
    cp = _cp()
    h = cp.empty_like(u)
    r, n = u.shape
    if r:
        k = get_kernel("ffn_forward", f"backup_gate_mul_l1<{ctype_of(u.dtype, 'u')}>")
        k((grid_1d(r, 8, cap=2**31 - 1),), (256,), (g, u, i32(r), i32(n), rows, h, row_l1))
    return h


def gate_mul(g, u, *, relu: bool):
    """h = g * u (``relu``: relu(g) * u) in fp32, rounded once; NaN propagates like the dense computation."""
    cp = _cp()
    h = cp.empty_like(u)
    if h.size:
        k = get_kernel("ffn_forward", f"gate_mul<{ctype_of(u.dtype, 'u')}, {cbool(relu)}>")
        k((grid_1d(h.size, 256),), (256,), (g, u, np.int64(h.size), h))
    return h
