"""GPU training path: hybrid-routed gated FFN forward and backward (arguments validated by twell.ops).

Host synchronisation: exactly one, in the forward, right after the per-row
counts (4 int32: compact non-zeros, backup rows, and two workspace bounds for
the backward) -- the hybrid format is sized by what the batch needs.  The
backward never synchronises.
"""

from __future__ import annotations

from .. import _backend as B
from .._kernels import get_kernel
from ..format import Hybrid
from ..results import FFNStats, SavedForBackward
from . import ffn_backward, ffn_forward, gate_gemm, pack
from ._launch import HostReadback, aligned, cbool, ctype_of, grid_1d, i32

#: Host synchronisations per training forward (the backward has none); see docs/design.md.
FORWARD_HOST_SYNCS = 1


def _cp():
    import cupy  # noqa: PLC0415
    return cupy


#: TwELL layout of the fused gate GEMM's output in the training forward (converted to the Hybrid's CSR
#: right away): 256-column tiles of 32 slots; a row that overflows a tile but stays under the Hybrid's
#: threshold has its CSR entries refilled from a recomputed dense gate row (exact, rare).
FUSED_TILE_WIDTH, FUSED_COMPRESSION = 256, 8


def _fused_gate_hybrid(x, w_gate, eff: int, kernel: str):
    """Hybrid gate pattern from the fused gate GEMM (TwELL in its epilogue, then TwELL -> CSR): no dense
    z in device memory.  The Hybrid's rule is unchanged (backup iff row entries > eff): backup rows and
    compact rows that overflowed a TwELL tile get their dense gate row recomputed with cuBLAS.  One host
    read-back (nnz, backup rows, overflowed compact rows, workspace bounds)."""
    cp = _cp()
    m, d = x.shape
    n = w_gate.shape[0]
    ct = ctype_of(x.dtype, "x")
    tw = gate_gemm.gate_twell_async(x, w_gate, FUSED_TILE_WIDTH, FUSED_COMPRESSION, eff, kernel=kernel,
                                    neuron_counts=True)
    route = (tw.row_nnz > eff).astype(cp.int32)
    backup_slot, backup_rows_buf, totals = pack.route_rows(route)
    redo = ((tw.row_route == pack.ROUTE_OVERFLOW) & (route == 0)).astype(cp.int32)
    _, redo_rows_buf, redo_totals = pack.route_rows(redo)
    row_ptr = cp.zeros(m + 1, dtype=cp.int32)
    cp.cumsum(cp.where(route == 0, tw.row_nnz, 0), dtype=cp.int32, out=row_ptr[1:])
    bounds = ffn_backward.workspace_bounds(tw.neuron_counts)
    nnz, n_backup, n_redo, item_bound, partial_bound = HostReadback(
        row_ptr[-1:], totals[:1], redo_totals[:1], bounds).wait()
    col_indices = cp.empty(nnz, dtype=cp.int32)
    values = cp.empty(nnz, dtype=x.dtype)
    n_tiles, slots = tw.counts.shape[1], tw.indices.shape[2]
    k = get_kernel("pack", f"twell_rows_to_csr<{ct}>")
    k((grid_1d(m, pack.WARPS_PER_BLOCK, cap=2**31 - 1),), (32 * pack.WARPS_PER_BLOCK,),
      (tw.counts, tw.indices, tw.values, i32(m), i32(n_tiles), i32(slots), i32(FUSED_TILE_WIDTH), tw.row_route,
       backup_slot, row_ptr, col_indices, values))
    if n_redo:
        rows = redo_rows_buf[:n_redo]
        z_rows = cp.matmul(x[rows], w_gate.T)
        vec = n % 8 == 0 and aligned(z_rows, 8 * z_rows.dtype.itemsize)
        fill = get_kernel("pack", f"fill_hybrid_rows<{ct}, true, {cbool(vec)}>")
        fill((grid_1d(n_redo, pack.WARPS_PER_BLOCK, cap=2**31 - 1),), (32 * pack.WARPS_PER_BLOCK,),
             (z_rows, i32(n_redo), i32(n), cp.ascontiguousarray(row_ptr[rows]), cp.full(n_redo, -1, dtype=cp.int32),
              col_indices, values))
    backup_rows = backup_rows_buf[:n_backup]
    if n_backup:
        backup_values = pack.relu_keep_nan(cp.matmul(x[backup_rows], w_gate.T))
    else:
        backup_values = cp.empty((0, n), dtype=x.dtype)
    gate = Hybrid(row_ptr, col_indices, values, backup_slot, backup_rows, backup_values, n, eff)
    return gate, tw.row_nnz, tw.neuron_counts, totals[2:3], item_bound, partial_bound


def gated_ffn_forward(x, w_gate, w_up, w_down, l1_weight: float, threshold: int, gate_kernel: str = "auto"):
    cp = _cp()
    m, d = x.shape
    n = w_gate.shape[0]
    eff = min(threshold, ffn_forward.MAX_LIST)
    if m * min(eff, n) >= 2**31:
        raise ValueError(f"M = {m} tokens with up to {min(eff, n)} compact entries each overflow the int32 row "
                         "offsets; split the batch")
    # "auto" stays on cuBLAS + pack here: measured on the H200 the fused gate made the token-skewed training
    # step slower (docs/perf-notes.md, v5), so the training forward takes it only when asked.
    kernel = "cublas" if gate_kernel == "auto" else gate_gemm.choose_gate_kernel(gate_kernel, x, w_gate)
    if kernel == "cublas":
        z = cp.matmul(x, w_gate.T)                                      # cuBLAS (M, n)
        p = pack.pack_hybrid_async(z, eff, relu=True, neuron_counts=True)
        bounds = ffn_backward.workspace_bounds(p.neuron_counts)
        nnz, n_backup, item_bound, partial_bound = HostReadback(p.nnz_dev, p.totals[:1], bounds).wait()
        gate = pack.finish_hybrid(p, z, nnz, n_backup, relu=True, transpose=False)
        del z
        row_nnz, neuron_counts, work_counter = p.row_nnz, p.neuron_counts, p.totals[2:3]
    else:
        gate, row_nnz, neuron_counts, work_counter, item_bound, partial_bound = _fused_gate_hybrid(
            x, w_gate, eff, kernel)
        nnz, n_backup = gate.nnz, gate.n_backup
    y = cp.empty((m, d), dtype=x.dtype)
    u_values = cp.empty(nnz, dtype=x.dtype)
    row_l1 = cp.zeros(m, dtype=cp.float32)
    ffn_forward.csr_up_down(x, gate.row_ptr, gate.col_indices, gate.values, gate.backup_slot, w_up, w_down, y,
                            u_values, row_l1, work_counter=work_counter)
    if n_backup:
        rows = gate.backup_rows
        up_backup = cp.matmul(x[rows], w_up.T)
        h = ffn_forward.gate_mul(gate.backup_values, up_backup, relu=False)
        y[rows] = cp.matmul(h, w_down)
        row_l1[rows] = cp.abs(h.astype(cp.float32)).sum(axis=1)
    else:
        up_backup = cp.empty((0, n), dtype=x.dtype)
    nnz_all = row_nnz.sum(dtype=cp.int64)
    stats = FFNStats(n_rows=m, n_cols=n, nnz=nnz_all, l0=nnz_all / max(m, 1),
                     l1=row_l1.sum(dtype=cp.float64) / max(m, 1), neuron_counts=neuron_counts,
                     n_backup_rows=n_backup, n_overflow_rows=None, gate_kernel=kernel)
    saved = SavedForBackward(x, w_gate, w_up, w_down, gate, u_values, up_backup, l1_weight,
                             workspace=(item_bound, partial_bound))
    return y, saved, stats


def gated_ffn_backward(saved: SavedForBackward, dy):
    cp = _cp()
    x, w_gate, w_up, w_down = saved.x, saved.w_gate, saved.w_up, saved.w_down
    m, d = x.shape
    n = w_gate.shape[0]
    B.check_array(dy, "dy", shape=(m, d), dtype=x.dtype, contiguous=True)
    if dy.device.id != x.device.id:
        raise ValueError(f"dy is on device {dy.device.id} but the forward ran on device {x.device.id}")
    if saved.workspace is None:
        raise ValueError("saved was not produced by the GPU forward (no workspace bounds)")
    saved.consumed = True
    gate = saved.gate
    scale = saved.l1_weight / max(m, 1)
    pattern = gate.transposed if gate.transposed is not None else pack.transpose_pattern(gate)
    du = cp.empty(gate.nnz, dtype=cp.float32)
    dz = cp.empty(gate.nnz, dtype=cp.float32)
    dx = cp.empty((m, d), dtype=x.dtype)
    ffn_backward.csr_backward(dy, gate.row_ptr, gate.col_indices, gate.values, saved.up_values, gate.backup_slot,
                              w_gate, w_up, w_down, scale, dx, du, dz)
    dw_gate = cp.empty((n, d), dtype=w_gate.dtype)
    dw_up = cp.empty((n, d), dtype=w_up.dtype)
    dw_down = cp.empty((n, d), dtype=w_down.dtype)
    has_backup = gate.n_backup > 0
    if has_backup:
        rows = gate.backup_rows
        dy_b, x_b = dy[rows], x[rows]
        dh = cp.matmul(dy_b, w_down.T)
        du_b, dz_b, h_b = ffn_backward.backup_row_grads(dh, gate.backup_values, saved.up_backup, scale)
        dx_b = cp.matmul(du_b, w_up)
        dx_b += cp.matmul(dz_b, w_gate)
        dx[rows] = dx_b
        cp.matmul(du_b.T, x_b, out=dw_up)
        cp.matmul(dz_b.T, x_b, out=dw_gate)
        cp.matmul(h_b.T, dy_b, out=dw_down)
    item_bound, partial_bound = saved.workspace
    ffn_backward.weight_grads(x, dy, pattern, gate.values, saved.up_values, du, dz, dw_gate, dw_up, dw_down,
                              has_backup=has_backup, item_bound=item_bound, partial_bound=partial_bound)
    return dx, dw_gate, dw_up, dw_down


__all__ = ["gated_ffn_forward", "gated_ffn_backward", "FORWARD_HOST_SYNCS"]
