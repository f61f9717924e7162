"""GPU orchestration of the public FFN ops (arguments already validated by :mod:`twell.ops`).

Everything runs on the current CuPy stream.  The only host synchronisation in
the inference ops is the 8-byte read-back of (backup rows, overflowed rows),
which is enqueued right after the pack kernel (on a side stream) and waited for
while the fused up/down kernel runs, so the GPU does not idle.
"""

from __future__ import annotations

from ..format import TwELL, twell_layout
from ..results import FFNStats
from . import blas, ffn_forward, gate_gemm, pack
from ._launch import HostReadback


def _cp():
    import cupy  # noqa: PLC0415
    return cupy


_effective_thresholds: dict = {}


def _effective_threshold(threshold: int, n: int, tile_width: int, compression: int) -> int:
    key = (threshold, n, tile_width, compression)
    eff = _effective_thresholds.get(key)
    if eff is None:
        n_tiles, slots = twell_layout(n, tile_width, compression)
        eff = _effective_thresholds[key] = min(threshold, ffn_forward.MAX_LIST, n_tiles * slots)
    return eff


def _output(out, m, d, dtype):
    cp = _cp()
    if out is None:
        return cp.empty((m, d), dtype=dtype)
    return out


#: Batches up to this many rows take the decode path (no TwELL, no routing, no host sync).
#: (CUDA-graph capture of the whole op still fails: CuPy refuses cuBLAS calls during capture.)
DECODE_MAX_ROWS = 64
#: ... and up to this many (<= ffn_forward.DECODE_FUSED_MAX_ROWS), where the operands allow and no stats
#: are asked for, the fused decode kernels: their gate GEMV runs on CUDA cores, so its cost grows with
#: the rows, while the split path's cuBLAS gate does not (docs/perf-notes.md, v20).
DECODE_FUSED_ROWS = 4


def _decode_forward(x, z, w_up, w_down, return_stats, gated, out):
    """Every row sparse and exact straight from the dense gate z: one kernel + a split reduction."""
    cp = _cp()
    m, d = x.shape
    n = z.shape[1]
    y = _output(out, m, d, x.dtype)
    ffn_forward.dense_gate_up_down(x, z, w_up, w_down, y, gated=gated)
    if not return_stats:
        return y
    active = ~(z <= 0)
    nnz = active.sum(dtype=cp.int64)
    stats = FFNStats(n_rows=m, n_cols=n, nnz=nnz, l0=nnz / max(m, 1), l1=None,
                     neuron_counts=active.sum(axis=0, dtype=cp.int32), n_backup_rows=0, n_overflow_rows=0)
    return y, stats


def _sparse_forward(x, w_first, w_up, w_down, tile_width, compression, threshold, return_stats, gated, out,
                    gate_kernel="auto"):
    """gate GEMM → TwELL (fused kernel, or cuBLAS + pack) → fused up/down (compact rows) + cuBLAS (backup rows)."""
    cp = _cp()
    m, d = x.shape
    n = w_down.shape[0]
    eff = _effective_threshold(threshold, n, tile_width, compression)
    if m <= DECODE_MAX_ROWS:
        if not return_stats and m <= DECODE_FUSED_ROWS:
            y = _output(out, m, d, x.dtype)
            if ffn_forward.decode_fused_supported(x, w_first, w_up, w_down, y):
                # gate GEMV, entries, up and down in one kernel (+ a reduction): w_gate read once
                return ffn_forward.decode_fused(x, w_first, w_up, w_down, y, gated=gated)
        return _decode_forward(x, cp.matmul(x, w_first.T), w_up, w_down, return_stats, gated, out)
    kernel = gate_gemm.choose_gate_kernel(gate_kernel, x, w_first)
    fused_forward, n_deferred = False, 0
    if kernel == "wgmma" and not gate_gemm.FUSED_FORWARD:
        # The common Hopper case: the GEMM is launched before anything else (the GPU idles until then).
        z = None
        p = gate_gemm.gate_twell_async(x, w_first, tile_width, compression, eff, kernel=kernel,
                                       neuron_counts=return_stats)
        y = _output(out, m, d, x.dtype)
    elif kernel == "cublas":
        y = _output(out, m, d, x.dtype)
        z = cp.matmul(x, w_first.T)                                    # (M, n)
        p = pack.pack_twell_async(z, tile_width, compression, eff, relu=True, neuron_counts=return_stats)
    else:
        y = _output(out, m, d, x.dtype)
        z = None                                                       # never materialised
        fused_forward = (kernel == "wgmma" and gate_gemm.FUSED_FORWARD
                         and gate_gemm.fused_forward_supported(x, w_first, w_up, w_down, y, tile_width, eff))
        if fused_forward:                                              # GEMM, route and up/down: one kernel
            p = gate_gemm.ffn_twell_fused_async(x, w_first, w_up, w_down, y, compression, eff, gated=gated,
                                                neuron_counts=return_stats)
        else:
            p = gate_gemm.gate_twell_async(x, w_first, tile_width, compression, eff, kernel=kernel,
                                           neuron_counts=return_stats)
    if fused_forward:
        n_backup, n_overflow, _, n_deferred = HostReadback(p.totals).wait()
        if n_deferred:
            # Some gather warp gave up waiting for its row's tiles (the grid was not fully resident): route
            # and compute every compact row again with the separate kernels (same arithmetic, bitwise).
            p = gate_gemm.route_pending(p)
            readback = HostReadback(p.totals[:2], overlap=True)
            ffn_forward.twell_up_down(x, p.counts, p.indices, p.values, p.row_route, w_up, w_down, tile_width,
                                      y, compact=pack.ROUTE_COMPACT, gated=gated, work_counter=p.totals[2:3])
            n_backup, n_overflow = readback.wait()
    else:
        readback = HostReadback(p.totals[:2], overlap=True)      # the up/down kernel only touches totals[2]
        ffn_forward.twell_up_down(x, p.counts, p.indices, p.values, p.row_route, w_up, w_down, tile_width, y,
                                  compact=pack.ROUTE_COMPACT, gated=gated, work_counter=p.totals[2:3])
        n_backup, n_overflow = readback.wait()
    if n_backup:
        _backup_forward(x, p, z, w_first, w_up, w_down, y, n_backup, n_overflow, gated)
    if not return_stats:
        return y
    nnz = p.row_nnz.sum(dtype=cp.int64)
    stats = FFNStats(n_rows=m, n_cols=n, nnz=nnz, l0=nnz / max(m, 1), l1=None, neuron_counts=p.neuron_counts,
                     n_backup_rows=n_backup, n_overflow_rows=n_overflow, gate_kernel=kernel,
                     fused_forward=fused_forward, n_deferred_rows=n_deferred)
    return y, stats


def _gemm(a, b, *, trans_b: bool = False, out=None):
    """``op(a) @ op(b)`` into ``out`` (new if None): cuBLAS GemmEx directly for contiguous operands of one
    dtype (a third of ``cupy.matmul``'s host time), else ``cupy.matmul``."""
    cp = _cp()
    if out is None:
        out = cp.empty((a.shape[0], b.shape[0] if trans_b else b.shape[1]), dtype=a.dtype)
    if (a.dtype == b.dtype == out.dtype and a.flags.c_contiguous and b.flags.c_contiguous
            and out.flags.c_contiguous and a.dtype.name in blas.DTYPES):
        return blas.gemm(a, b, out, trans_b=trans_b)
    return cp.matmul(a, b.T if trans_b else b, out=out)


def _backup_forward(x, p, z, w_first, w_up, w_down, y, n_backup: int, n_overflow: int, gated: bool):
    """The backup rows' y with cuBLAS: u = x_b w_upᵀ, h = relu(z_b) ⊙ u (gated) or relu(z_b), y_b = h w_down.

    The host queues this after the read-back, while the up/down kernel runs, so its host time counts only
    where it outlasts that kernel (token skew, eager): few launches, cuBLAS called directly.  Every row a
    backup row (a dense batch): plain GEMMs on the whole batch, no gathers or scatters.  Otherwise the
    ordered backup-row list (:func:`pack.route_rows`); after the fused gate (``z`` None) the gathered x rows
    and the gate rows unpacked from the TwELL come from one kernel (see :func:`_backup_gate`), and the y rows
    are scattered by one kernel.
    """
    m = x.shape[0]
    if n_backup == m:
        rows, xr = None, x
        zr = _backup_gate(p, z, xr, None, w_first, n_backup, n_overflow)
    else:
        rows = pack.route_rows(p.row_route)[1][:n_backup]
        if z is None and 2 * n_overflow <= n_backup and x.flags.c_contiguous:
            xr, zr = pack.gather_backup_rows(x, p.counts, p.indices, p.values, rows, w_first.shape[0],
                                             p.tile_width)
            if n_overflow:
                _recompute_overflowed(p, zr, xr, rows, w_first, n_overflow)
        else:
            xr = x[rows]
            zr = _backup_gate(p, z, xr, rows, w_first, n_backup, n_overflow)
    h = ffn_forward.gate_mul(zr, _gemm(xr, w_up, trans_b=True), relu=True) if gated else pack.relu_keep_nan(zr)
    if rows is None:
        _gemm(h, w_down, out=y)
    elif y.flags.c_contiguous:
        pack.scatter_rows(_gemm(h, w_down), rows, y)
    else:
        y[rows] = _gemm(h, w_down)


def _recompute_overflowed(p, zr, xr, rows, w_first, n_overflow: int):
    """Gate rows (R, n) of the backup rows whose TwELL tile overflowed, recomputed with cuBLAS in place."""
    cp = _cp()
    overflowed = (p.row_route if rows is None else p.row_route[rows]) == pack.ROUTE_OVERFLOW
    _, pos_buf, _ = pack.route_rows(overflowed.astype(cp.int32))   # their positions, in order
    pos = pos_buf[:n_overflow]
    zr[pos] = cp.matmul(xr[pos], w_first.T)


def _backup_gate(p, z, xr, rows, w_first, n_backup: int, n_overflow: int):
    """Gate pre-activations (relu'd where they come from TwELL) of the backup rows, (R, n).

    ``rows``: the ordered backup-row list (None: every row).  From the dense z when cuBLAS computed it.
    After the fused gate z was never stored: a row routed by the row threshold has every entry in its TwELL
    (no tile overflowed), so its gate row is unpacked from there (relu(z) exactly, NaN kept); only rows
    whose tile overflowed recompute their gate row with cuBLAS (all rows when most of them overflowed).
    """
    cp = _cp()
    if z is not None:
        return z if rows is None else z[rows]
    if 2 * n_overflow > n_backup:
        # Mostly overflowed rows (very dense batches): one GEMM over all of them is cheaper than unpacking
        # plus a GEMM over a gathered subset and its scatter.
        return cp.matmul(xr, w_first.T)
    zr = pack.unpack_twell_rows(p.counts, p.indices, p.values, rows, w_first.shape[0], p.tile_width)
    if n_overflow:
        _recompute_overflowed(p, zr, xr, rows, w_first, n_overflow)
    return zr


def gated_ffn(x, w_gate, w_up, w_down, tile_width, compression, threshold, return_stats, out=None,
              gate_kernel="auto"):
    """GPU gated FFN (see :func:`twell.gated_ffn`)."""
    return _sparse_forward(x, w_gate, w_up, w_down, tile_width, compression, threshold, return_stats, True, out,
                           gate_kernel)


def ffn(x, w_up, w_down, tile_width, compression, threshold, return_stats, out=None, gate_kernel="auto"):
    """GPU non-gated FFN (see :func:`twell.ffn`)."""
    return _sparse_forward(x, w_up, w_up, w_down, tile_width, compression, threshold, return_stats, False, out,
                           gate_kernel)


def _long_compact_rows(tw: TwELL):
    """Compact rows whose active list exceeds the kernel's MAX_LIST (only possible in user-built TwELL)."""
    cp = _cp()
    nnz = cp.minimum(tw.counts, tw.slots).sum(axis=1)
    return cp.flatnonzero((nnz > ffn_forward.MAX_LIST) & (tw.backup_slot < 0)).astype(cp.int32)


def _twell_rows_dense(tw: TwELL, rows):
    """Dense rows of a TwELL's compact part."""
    cp = _cp()
    sub = TwELL(tw.counts[rows], tw.indices[rows], tw.values[rows], cp.full(rows.shape[0], -1, cp.int32),
                cp.zeros(0, cp.int32), cp.zeros((0, tw.n_cols), tw.dtype), tw.n_cols, tw.tile_width,
                tw.dense_row_threshold)
    return pack.unpack_twell(sub)


def _sparse_product(x, tw: TwELL, w_up, w_down, gated: bool, out):
    cp = _cp()
    m, d = x.shape
    y = _output(out, m, d, x.dtype)
    long_rows = _long_compact_rows(tw)   # host sync (size of the result), user-built TwELL only
    backup_slot = tw.backup_slot
    if long_rows.size:
        backup_slot = backup_slot.copy()
        backup_slot[long_rows] = 0       # any value >= 0: the kernel skips the row
    ffn_forward.twell_up_down(x, tw.counts, tw.indices, tw.values, backup_slot, w_up, w_down, tw.tile_width, y,
                              gated=gated)
    for rows, g in ((tw.backup_rows, tw.backup_values), (long_rows, None)):
        if rows.size == 0:
            continue
        if g is None:
            g = _twell_rows_dense(tw, rows)
        h = ffn_forward.gate_mul(g, cp.matmul(x[rows], w_up.T), relu=False) if gated else g
        y[rows] = cp.matmul(h, w_down)
    return y


def gated_up_down(x, gate: TwELL, w_up, w_down, out=None):
    """y = (g ⊙ (x w_upᵀ)) w_down for a TwELL ``gate`` holding g (see :func:`twell.gated_up_down`)."""
    return _sparse_product(x, gate, w_up, w_down, True, out)


def down_projection(h: TwELL, w_down, out=None):
    """y = h w_down for a TwELL ``h`` (see :func:`twell.down_projection`)."""
    cp = _cp()
    m = h.n_rows
    dummy_x = cp.empty((m, w_down.shape[1]), dtype=w_down.dtype)  # unread: non-gated kernel stages no x
    return _sparse_product(dummy_x, h, w_down, w_down, False, out)


def gated_ffn_forward(x, w_gate, w_up, w_down, l1_weight, threshold, gate_kernel="auto"):
    from . import train
    return train.gated_ffn_forward(x, w_gate, w_up, w_down, l1_weight, threshold, gate_kernel)


def gated_ffn_backward(saved, dy):
    from . import train
    return train.gated_ffn_backward(saved, dy)
