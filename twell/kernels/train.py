"""GPU training path: hybrid-routed gated FFN forward and backward (arguments validated by twell.ops).

Host synchronisation: exactly one, in the forward, right after the per-row
counts (4 int32: compact non-zeros, backup rows, and two workspace bounds for
the backward) -- the hybrid format is sized by what the batch needs.  The
backward never synchronises.
"""

from __future__ import annotations

from .. import _backend as B
from ..results import FFNStats, SavedForBackward
from . import ffn_backward, ffn_forward, pack
from ._launch import HostReadback

#: Host synchronisations per training forward (the backward has none); see docs/design.md.
FORWARD_HOST_SYNCS = 1


def _cp():
    import cupy  # noqa: PLC0415
    return cupy


def gated_ffn_forward(x, w_gate, w_up, w_down, l1_weight: float, threshold: int):
    cp = _cp()
    m, d = x.shape
    n = w_gate.shape[0]
    eff = min(threshold, ffn_forward.MAX_LIST)
    if m * min(eff, n) >= 2**31:
        raise ValueError(f"M = {m} tokens with up to {min(eff, n)} compact entries each overflow the int32 row "
                         "offsets; split the batch")
    z = cp.matmul(x, w_gate.T)                                          # cuBLAS (M, n)
    p = pack.pack_hybrid_async(z, eff, relu=True, neuron_counts=True)
    bounds = ffn_backward.workspace_bounds(p.neuron_counts)
    nnz, n_backup, item_bound, partial_bound = HostReadback(p.nnz_dev, p.totals[:1], bounds).wait()
    gate = pack.finish_hybrid(p, z, nnz, n_backup, relu=True, transpose=False)
    del z
    y = cp.empty((m, d), dtype=x.dtype)
    u_values = cp.empty(nnz, dtype=x.dtype)
    row_l1 = cp.zeros(m, dtype=cp.float32)
    ffn_forward.csr_up_down(x, gate.row_ptr, gate.col_indices, gate.values, gate.backup_slot, w_up, w_down, y,
                            u_values, row_l1, work_counter=p.totals[2:3])
    if n_backup:
        rows = gate.backup_rows
        up_backup = cp.matmul(x[rows], w_up.T)
        h = ffn_forward.gate_mul(gate.backup_values, up_backup, relu=False)
        y[rows] = cp.matmul(h, w_down)
        row_l1[rows] = cp.abs(h.astype(cp.float32)).sum(axis=1)
    else:
        up_backup = cp.empty((0, n), dtype=x.dtype)
    nnz_all = p.row_nnz.sum(dtype=cp.int64)
    stats = FFNStats(n_rows=m, n_cols=n, nnz=nnz_all, l0=nnz_all / max(m, 1),
                     l1=row_l1.sum(dtype=cp.float64) / max(m, 1), neuron_counts=p.neuron_counts,
                     n_backup_rows=n_backup, n_overflow_rows=None)
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
