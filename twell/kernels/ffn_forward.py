"""Launchers of the ``ffn_forward`` kernel family (cuda_src/ffn_forward.cu).

* :func:`twell_up_down` -- fused up/down projection from a TwELL gate (or a
  non-gated down projection) for the compact rows: the warp-per-row fast path
  (16-bit dtypes, d a multiple of 256 up to 2048) or the general CTA-per-row
  kernel (any dtype and d; also the split-row decode variant).
* :func:`dense_gate_up_down` -- decode path straight from the dense gate z (no
  TwELL, no routing, no host synchronisation; exact at any activity).
* :func:`decode_fused` -- decode batches of at most :data:`DECODE_FUSED_MAX_ROWS` rows (16-bit, d a
  multiple of 256 up to 2048): gate GEMV, entries, up and down in one kernel plus a reduction.
* :func:`excess_rows_ffn` -- exact rows from x alone for a row list whose length is known on the device
  (the backup rows past the capacity of a call sized without a host read-back).
* :func:`dense_gate_mul` -- h = relu(z) * u for dense rows (the dense path, the backup rows), with their
  statistics; :func:`fix_nonfinite_rows` -- after a dense GEMM over such rows, the sparse value wherever
  the GEMM produced NaN / Inf from an inactive neuron's weights.
"""

from __future__ import annotations

import numpy as np

from ..runtime.launch import NULL, U64, aligned, cbool, ctype_of, grid_1d, i32
from ..runtime.loader import KernelFamily, get_kernel
from .common import (DEVICE_DTYPES, MAX_LIST, THREADS, WARP_KERNEL_MAX_NC, choose_splits, cupy, launch_warp_rows,
                     raise_smem_limit, sm_count, vec_ok, warp_path_nc)
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
        for _g in (True, False):
            _names.append(f"excess_rows_ffn<{_t}, {cbool(_g)}, {cbool(_v)}>")
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
    _names.append(f"excess_rows_reduce<{_t}>")
    for _r in (True, False):
        for _v in (True, False):
            for _g in (True, False):
                _names.append(f"dense_gate_mul<{_t}, {cbool(_g)}, {cbool(_r)}, {cbool(_v)}>")
                _names.append(f"gate_mul_flat<{_t}, {cbool(_g)}, {cbool(_r)}, {cbool(_v)}>")
            _names.append(f"fix_nonfinite_rows<{_t}, {cbool(_r)}, {cbool(_v)}>")
_names.append("train_stats")

# Hot: the warp-per-row kernels and the 16-byte-load variants of the CTA kernels (the scalar-load
# fallbacks for odd d may spill a few bytes).
FAMILY = KernelFamily("ffn_forward", tuple(_names),
                      hot_kernels=(r"twell_up_down_warp<", r"csr_up_down_warp<", r"decode_",
                                   r"(twell_up_down|csr_up_down|dense_gate_up_down)<[^,]+, true"))


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
    cp = cupy()
    m, d = x.shape
    if m == 0:
        return y
    n_tiles, slots = counts.shape[1], indices.shape[2]
    ct = ctype_of(x.dtype, "x")
    sms = sm_count()
    if splits is None:
        splits = choose_splits(m, sms)
    nc = warp_path_nc(x.dtype, d, x, w_up, w_down, y)
    if nc and splits == 1:
        k = get_kernel(FAMILY, f"twell_up_down_warp<{ct}, {nc}, {cbool(gated)}>")
        launch_warp_rows(k, m, MAX_LIST * 8,
                         (x, counts, indices, values, route, i32(compact), w_up, w_down, i32(m), i32(n_tiles),
                          i32(slots), i32(tile_width), y), work_counter)
        return y
    vec = vec_ok(x.dtype, d, x, w_up, w_down, y)
    k = get_kernel(FAMILY, f"twell_up_down<{ct}, {cbool(vec)}, {cbool(gated)}>")
    smem = d * x.dtype.itemsize if gated else 0
    raise_smem_limit(k, smem)
    partial = cp.empty((m, splits, d), dtype=cp.float32) if splits > 1 else None
    k((m * splits,), (THREADS,),
      (x, counts, indices, values, route, i32(compact), w_up, w_down, i32(m), i32(d), i32(n_tiles), i32(slots),
       i32(tile_width), i32(splits), y, partial if partial is not None else y),
      shared_mem=smem)
    if splits > 1:
        _reduce(partial, route, compact, y, splits)
    return y


def _reduce(partial, route, compact: int, y, splits: int):
    m, d = y.shape
    r = get_kernel(FAMILY, f"reduce_split_rows<{ctype_of(y.dtype, 'y')}>")
    r((grid_1d(m * d, 256),), (256,), (partial, NULL if route is None else route, i32(compact), i32(m), i32(d),
                                       i32(splits), y))


def dense_gate_up_down(x, z, w_up, w_down, y, *, gated: bool = True, splits: int | None = None, row_nnz=None):
    """y = (relu(z) ⊙ (x w_upᵀ)) w_down (``gated``) or relu(z) w_down, reading the dense gate z (M, n).

    Every row is computed sparsely and exactly, whatever its number of active
    neurons; no host synchronisation.  For small batches.  ``row_nnz`` (int32 (M,), optional) receives
    each row's number of entries.
    """
    cp = cupy()
    m, d = x.shape
    n = z.shape[1]
    if m == 0:
        return y
    if splits is None:
        splits = choose_splits(m, sm_count())
    ct = ctype_of(x.dtype, "x")
    vec = vec_ok(x.dtype, d, x, w_up, w_down) and n % 8 == 0 and aligned(z, 16)
    k = get_kernel(FAMILY, f"dense_gate_up_down<{ct}, {cbool(vec)}, {cbool(gated)}>")
    smem = d * x.dtype.itemsize if gated else 0
    raise_smem_limit(k, smem)
    partial = cp.zeros((m, splits, d), dtype=cp.float32)
    k((m * splits,), (THREADS,), (x, z, w_up, w_down, i32(m), i32(d), i32(n), i32(splits), partial,
                                  NULL if row_nnz is None else row_nnz),
      shared_mem=smem)
    _reduce(partial, None, 0, y, splits)
    return y


#: excess_rows_ffn: CTAs per SM of its persistent grid, and the most dynamic shared memory it may take.
_EXCESS_CTAS_PER_SM, EXCESS_MAX_SMEM = 2, 200 * 1024


def excess_smem_bytes(d: int, n: int) -> int:
    """Dynamic shared memory of :func:`excess_rows_ffn`: x and h as float, a flag byte and a 2-byte list
    entry per neuron."""
    return -(-(4 * (d + n) + 2 * -(-n // 2) + 2 * n) // 16) * 16


def excess_rows_ffn(x, w_first, w_up, w_down, rows, count, start: int, y, *, gated: bool = True, row_l1=None):
    """``y[rows[i]]`` for ``start <= i < count``, computed exactly from x alone: the backup rows beyond the
    capacity of a call that sized its backup without a host read-back.  ``count`` (int32 (1,)) is read on the
    device; with ``count <= start`` both kernels do nothing.  A persistent grid of G CTAs: R < G rows are
    split G // R ways over the neurons (the whole GPU streams the weights even for one row; a second kernel
    sums the splits' fp32 partials in order), R >= G rows take a CTA each.  Per row and neuron slice: the GEMV
    of ``w_first`` (and of ``w_up`` over the active neurons), then the down projection over the active
    neurons in order: deterministic; NaN / Inf as in the dense computation.  ``row_l1`` (float32 (M,),
    optional): ``row_l1[rows[i]] = sum |h|`` of those rows (the training forward's L1).

    x (M, d), w_first / w_up / w_down (n, d), y (M, d): C-contiguous, one dtype (``w_up`` unused if not
    gated); rows int32 with valid entries up to ``count``.  Needs :func:`excess_smem_bytes` of shared memory
    (at most :data:`EXCESS_MAX_SMEM`) and a G × d float32 workspace.
    """
    cp = cupy()
    d, n = x.shape[1], w_first.shape[0]
    smem = excess_smem_bytes(d, n)
    if smem > EXCESS_MAX_SMEM:
        raise ValueError(f"excess_rows_ffn needs {smem} bytes of shared memory for d = {d}, n = {n} (at most "
                         f"{EXCESS_MAX_SMEM})")
    ct = ctype_of(x.dtype, "x")
    vec = vec_ok(x.dtype, d, x, w_first, w_up, w_down, y)
    k = get_kernel(FAMILY, f"excess_rows_ffn<{ct}, {cbool(gated)}, {cbool(vec)}>")
    raise_smem_limit(k, smem)
    g = _EXCESS_CTAS_PER_SM * sm_count()
    part = cp.empty(g * d + g, dtype=cp.float32)                      # G partial rows, then G partial L1s
    part_l1 = part[g * d:]
    k((g,), (256,), (x, i32(d), w_first, w_up if gated else w_first, w_down, i32(n), rows, count, i32(start), y,
                     NULL if row_l1 is None else row_l1, part, part_l1), shared_mem=smem)
    r = get_kernel(FAMILY, f"excess_rows_reduce<{ct}>")
    r((2 * sm_count(),), (256,), (rows, count, i32(start), i32(g), i32(d), part, part_l1, y,
                                  NULL if row_l1 is None else row_l1))
    return y


def decode_fused_supported(x, w_first, w_up, w_down, y) -> bool:
    """Whether :func:`decode_fused` takes these operands: at most DECODE_FUSED_MAX_ROWS rows, a 16-bit
    dtype, d = 256 * NC with NC <= 8, C-contiguous 16-byte-aligned arrays of one dtype."""
    m, d = x.shape
    arrays = (x, w_first, w_up, w_down, y)
    return (1 <= m <= DECODE_FUSED_MAX_ROWS and x.dtype.itemsize == 2 and d % 256 == 0
            and 1 <= d // 256 <= WARP_KERNEL_MAX_NC
            and all(a.dtype == x.dtype and a.flags.c_contiguous and aligned(a, 16) for a in arrays))


def decode_grid(n: int, sms: int) -> tuple:
    """(neurons per warp, CTAs) of :func:`decode_fused` for n neurons on ``sms`` multiprocessors: two CTAs
    per SM (96 registers, 39 KB of shared memory each) where n allows -- one wave, 16 warps per SM with a
    w_gate row in flight each -- and at most _DF_MAX_NPW neurons per warp."""
    npw = min(_DF_MAX_NPW, max(1, -(-n // (_DF_WARPS * 2 * sms))))
    return npw, -(-n // (_DF_WARPS * npw))


class DecodePlan:
    """:func:`decode_fused` for one shape on one device: its two kernels, their grids and the workspace a
    call needs (the per-CTA fp32 partials of every row, then one int32 flag per CTA).  Made by
    :func:`decode_plan`; :meth:`launch` takes device addresses, so a caller that has validated its operands
    once (the PyTorch adapter's eager decode calls) launches without building any array."""

    __slots__ = ("m", "n", "d", "nc", "npw", "ctas", "partial_bytes", "workspace_bytes", "_fused", "_reduce",
                 "_m", "_n", "_npw", "_ctas", "_d")

    def __init__(self, dtype, m: int, n: int, d: int, gated: bool, sms: int):
        self.m, self.n, self.d, self.nc = m, n, d, d // 256
        self.npw, self.ctas = decode_grid(n, sms)
        self.partial_bytes = 4 * self.ctas * m * d                      # a multiple of 16 bytes (d % 256 == 0)
        self.workspace_bytes = self.partial_bytes + 4 * self.ctas
        ct = ctype_of(dtype, "x")
        self._fused = get_kernel(FAMILY, f"decode_fused<{ct}, {self.nc}, {cbool(gated)}>").kernel
        self._reduce = get_kernel(FAMILY, f"decode_reduce<{ct}>").kernel
        self._m, self._n, self._npw, self._ctas, self._d = i32(m), i32(n), i32(self.npw), i32(self.ctas), i32(d)

    def launch(self, x: int, w_first: int, w_up: int, w_down: int, y: int, workspace: int, stream=None):
        """Queue both kernels on ``stream`` (anything with the stream's address as ``ptr``; None: CuPy's
        current stream).  Every other argument is a device address (int) of an operand that satisfies
        :func:`decode_fused_supported` for this plan's shape; ``workspace``: ``workspace_bytes`` bytes,
        16-byte aligned, owned by the caller until the kernels have run (stream order)."""
        partial, flags = U64(workspace), U64(workspace + self.partial_bytes)
        self._fused((self.ctas,), (32 * _DF_WARPS,),
                    (U64(x), U64(w_first), U64(w_up), U64(w_down), self._m, self._n, self._npw, partial, flags),
                    0, stream)
        self._reduce((self.nc, self.m), (32 * _DF_WARPS,), (partial, flags, self._ctas, self._m, self._d, U64(y)),
                     0, stream)


_decode_plans: dict = {}        # (device, dtype, m, n, d, gated) -> DecodePlan


def decode_plan(dtype, m: int, n: int, d: int, gated: bool) -> DecodePlan:
    """The :class:`DecodePlan` of this shape on the current device (memoized)."""
    dev = cupy().cuda.runtime.getDevice()
    key = (dev, dtype, m, n, d, gated)
    plan = _decode_plans.get(key)
    if plan is None:
        plan = _decode_plans[key] = DecodePlan(dtype, m, n, d, gated, sm_count())
    return plan


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
    cp = cupy()
    m, d = x.shape
    if not decode_fused_supported(x, w_first, w_up, w_down, y):
        raise ValueError("decode_fused takes at most 8 rows of a 16-bit dtype, d = 256 * k (k <= 8), and "
                         "C-contiguous 16-byte-aligned arrays of one dtype")
    plan = decode_plan(x.dtype, m, w_first.shape[0], d, gated)
    workspace = cp.empty(plan.workspace_bytes, dtype=cp.uint8)     # only flagged CTAs write their partials
    plan.launch(x.data.ptr, w_first.data.ptr, w_up.data.ptr, w_down.data.ptr, y.data.ptr, workspace.data.ptr)
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
        k = get_kernel(FAMILY, f"csr_up_down_warp<{ct}, {nc}>")
        launch_warp_rows(k, m, MAX_LIST * 8, (x, row_ptr, col_indices, g_values, backup_slot, w_up, w_down, i32(m),
                                              y, u_values, row_l1), work_counter)
        return
    vec = vec_ok(x.dtype, d, x, w_up, w_down, y)
    k = get_kernel(FAMILY, f"csr_up_down<{ct}, {cbool(vec)}>")
    smem = d * x.dtype.itemsize
    raise_smem_limit(k, smem)
    k((m,), (THREADS,), (x, row_ptr, col_indices, g_values, backup_slot, w_up, w_down, i32(m), i32(d), y,
                         u_values, row_l1), shared_mem=smem)


def train_stats(row_l1, nnz_all):
    """Device float64 (2,): ``(sum(row_l1) / M, nnz_all / M)`` -- the training forward's L1 and L0 statistics
    in one launch (``row_l1`` float32 (M,), ``nnz_all`` int64 (1,); M = 0 divides by 1)."""
    cp = cupy()
    out = cp.empty(2, dtype=cp.float64)
    get_kernel(FAMILY, "train_stats")((1,), (1024,), (row_l1, i32(row_l1.shape[0]), nnz_all, out))
    return out


#: dense_gate_mul: threads per CTA and the most rows one CTA takes (cuda_src DG_THREADS, DG_MAX_ROWS), and
#: CTAs per SM it aims for (one wave: ~100 registers a thread leave room for 2 CTAs an SM; more rows per CTA,
#: fewer neuron-count flushes).
_DG_THREADS, _DG_MAX_ROWS, _DG_CTAS_PER_SM = 256, 64, 2
#: gate_mul_flat (dense_gate_mul with no output but h): CTAs of 256 threads per SM of its grid-stride grid.
_FLAT_CTAS_PER_SM = 8
#: fix_nonfinite_rows: rows (warps) per CTA (cuda_src FIX_WARPS).
_FIX_WARPS = 8


def dense_gate_mul(z, u, *, gated: bool = True, relu: bool = True, h=None, g_out=None, rows=None, row_nnz=None,
                   row_l1=None, neuron_counts=None, nnz_total=None, summary=None, summary_threshold: int = 0):
    """``h = relu(z) * u`` (``gated``; else ``h = relu(z)``) for R dense rows, fp32 product rounded once; an
    inactive neuron (z <= 0) gives exactly 0.  ``relu=False``: z holds given gate values (a user's TwELL),
    every non-zero is an entry and g = z.  Returns h.

    z (R, n) gate pre-activations (or relu'd gate values); u (R, n) (ignored if not gated); all C-contiguous
    of one dtype.  Optional outputs: ``h`` (R, n) (allocated if None), ``g_out`` (R, n) = relu(z) keeping NaN
    (may be ``z`` itself: in place);
    per row, at index ``rows[r]`` (``rows`` int32 (R,) or None for r): ``row_nnz`` int32, ``row_l1`` float32
    (sum |h|); ``neuron_counts`` int32 (n,) (added to); ``nnz_total`` uint64 (1,) (added to); ``summary``
    uint64 (3,) (added to): the entries of rows with at most ``summary_threshold`` entries, the rows with
    more, all entries (a :class:`~twell.DensityTracker`'s observation).  With none of them, a flat
    grid-stride kernel (``gate_mul_flat``: the same values; measured 0.142 against 0.166 ms at M = 16,384,
    n 5632, docs/performance-history.md, v32).
    """
    cp = cupy()
    r, n = z.shape
    if h is None:
        h = cp.empty_like(z)
    if r == 0 or n == 0:
        return h
    if (g_out is None and rows is None and row_nnz is None and row_l1 is None and neuron_counts is None
            and nnz_total is None and summary is None):
        vec = all(aligned(a, 16) for a in (z, h, *((u,) if gated else ())))
        k = get_kernel(FAMILY, f"gate_mul_flat<{ctype_of(z.dtype, 'z')}, {cbool(gated)}, {cbool(relu)}, {cbool(vec)}>")
        k((max(1, min(-(-r * n // (8 * 256)), _FLAT_CTAS_PER_SM * sm_count())),), (256,),
          (z, u if gated else z, np.int64(r * n), h))
        return h
    vec = n % 8 == 0 and vec_ok(z.dtype, 8, z, *((u,) if gated else ()), h, *((g_out,) if g_out is not None else ()))
    k = get_kernel(FAMILY, f"dense_gate_mul<{ctype_of(z.dtype, 'z')}, {cbool(gated)}, {cbool(relu)}, {cbool(vec)}>")
    per_cta = max(1, min(_DG_MAX_ROWS, -(-r // (_DG_CTAS_PER_SM * sm_count()))))
    k((-(-r // per_cta),), (_DG_THREADS,),
      (z, u if gated else z, i32(r), i32(n), i32(per_cta), NULL if rows is None else rows, h,
       NULL if g_out is None else g_out, NULL if row_nnz is None else row_nnz, NULL if row_l1 is None else row_l1,
       NULL if neuron_counts is None else neuron_counts, NULL if nnz_total is None else nnz_total,
       i32(min(summary_threshold, 2**31 - 1)), NULL if summary is None else summary))
    return h


def fix_nonfinite_rows(out, gate, a1, w1, a2=None, w2=None, *, out_rows=None, relu: bool = True):
    """After ``out[out_rows] = a1 @ w1 (+ a2 @ w2)`` by a dense GEMM whose coefficients are 0 for inactive
    neurons: recompute every non-finite element as the sum over active neurons only (an inactive neuron's
    non-finite weights must not turn 0 into NaN).  Active: ``!(gate <= 0)``, or ``gate != 0`` with
    ``relu=False``.  gate, a1, a2 (R, n); w1, w2 (n, d); out (M, d) or (R, d).
    One streaming read of the rows when everything is finite; no host synchronisation."""
    r, n = a1.shape
    d = out.shape[1]
    if r == 0 or d == 0:
        return out
    vec = d % 8 == 0 and aligned(out, 16)
    k = get_kernel(FAMILY, f"fix_nonfinite_rows<{ctype_of(out.dtype, 'out')}, {cbool(relu)}, {cbool(vec)}>")
    grid = max(1, min(-(-r // _FIX_WARPS), 8 * sm_count()))
    k((grid,), (32 * _FIX_WARPS,), (out, NULL if out_rows is None else out_rows, i32(r), i32(d), i32(n), gate, a1,
                                    w1, NULL if a2 is None else a2, NULL if w2 is None else w2))
    return out
