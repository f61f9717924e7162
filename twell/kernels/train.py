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
from . import blas, ffn_backward, ffn_forward, gate_gemm, pack
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

#: What ``gate_kernel="auto"`` runs in the training forward: "fused" (the device's fused gate GEMM where it
#: can run, else cuBLAS + pack) or "cublas".  Chosen from same-process A/B runs (docs/perf-notes.md, v8).
TRAINING_AUTO_GATE = "cublas"


def training_gate_kernel(requested: str, x, w_gate) -> str:
    """Resolve the training forward's ``gate_kernel`` ("auto" follows :data:`TRAINING_AUTO_GATE`)."""
    if requested == "auto":
        requested = TRAINING_AUTO_GATE
    return gate_gemm.choose_gate_kernel(requested, x, w_gate)


def gated_ffn_forward(x, w_gate, w_up, w_down, l1_weight: float, threshold: int, gate_kernel: str = "auto"):
    """Training forward (see twell.ops.gated_ffn_forward).  Order of work, chosen so that the GPU is not left
    waiting on the host: gate (cuBLAS + count kernel, or the fused gate GEMM -> TwELL) -> the Hybrid's plan
    (two kernels) and the backward's workspace bounds -> the one host read-back -> compact entries (CSR) ->
    the up/down kernel of the compact rows -> only then the host-heavy dense-backup rows (cuBLAS), which
    queue behind it."""
    cp = _cp()
    m, d = x.shape
    n = w_gate.shape[0]
    eff = min(threshold, ffn_forward.MAX_LIST)
    if m * min(eff, n) >= 2**31:
        raise ValueError(f"M = {m} tokens with up to {min(eff, n)} compact entries each overflow the int32 row "
                         "offsets; split the batch")
    kernel = training_gate_kernel(gate_kernel, x, w_gate)
    ct = ctype_of(x.dtype, "x")
    z = tw = None
    if kernel == "cublas":
        z = cp.matmul(x, w_gate.T)                                      # cuBLAS (M, n)
        p = pack.pack_hybrid_async(z, eff, relu=True, neuron_counts=True)
        plan, neuron_counts = p.plan, p.neuron_counts
    else:
        # TwELL of relu(x w_gate^T) from the GEMM's epilogue (no dense z in device memory); its tiles hold
        # FUSED_COMPRESSION-compressed slots, so a compact row whose tile overflowed is refilled ("redo")
        tw = gate_gemm.gate_twell_async(x, w_gate, FUSED_TILE_WIDTH, FUSED_COMPRESSION, eff, kernel=kernel,
                                        neuron_counts=True)
        plan = pack.hybrid_plan(tw.row_nnz, eff, tw.row_route)
        neuron_counts = tw.neuron_counts
    bounds = ffn_backward.workspace_bounds(neuron_counts)
    nnz, n_backup, n_redo, _, item_bound, partial_bound = HostReadback(plan.totals, bounds).wait()
    col_indices = cp.empty(nnz, dtype=cp.int32)
    values = cp.empty(nnz, dtype=x.dtype)
    wpb = pack.WARPS_PER_BLOCK
    if z is not None:
        vec = n % 8 == 0 and aligned(z, 8 * z.dtype.itemsize)
        fill = get_kernel("pack", f"fill_hybrid_rows<{ct}, true, {cbool(vec)}>")
        fill((grid_1d(m, wpb, cap=2**31 - 1),), (32 * wpb,),
             (z, i32(m), i32(n), plan.row_ptr, plan.backup_slot, col_indices, values))
    else:
        k = get_kernel("pack", f"twell_rows_to_csr<{ct}>")
        k((grid_1d(m, wpb, cap=2**31 - 1),), (32 * wpb,),
          (tw.counts, tw.indices, tw.values, i32(m), i32(tw.counts.shape[1]), i32(tw.indices.shape[2]),
           i32(FUSED_TILE_WIDTH), tw.row_route, plan.backup_slot, plan.row_ptr, col_indices, values))
        if n_redo:                                                      # rare: exact, from recomputed rows
            rows = plan.redo_rows_buf[:n_redo]
            z_rows = cp.matmul(x[rows], w_gate.T)
            vec = n % 8 == 0 and aligned(z_rows, 8 * z_rows.dtype.itemsize)
            fill = get_kernel("pack", f"fill_hybrid_rows<{ct}, true, {cbool(vec)}>")
            fill((grid_1d(n_redo, wpb, cap=2**31 - 1),), (32 * wpb,),
                 (z_rows, i32(n_redo), i32(n), cp.ascontiguousarray(plan.row_ptr[rows]),
                  cp.full(n_redo, -1, dtype=cp.int32), col_indices, values))
        tw = None
    backup_rows = plan.backup_rows_buf[:n_backup]
    z_backup = z[backup_rows] if (z is not None and n_backup) else None
    z = None                                                            # the dense gate is not kept
    y = cp.empty((m, d), dtype=x.dtype)
    u_values = cp.empty(nnz, dtype=x.dtype)
    row_l1 = cp.empty(m, dtype=cp.float32)      # compact rows: the kernel below; backup rows: after it
    ffn_forward.csr_up_down(x, plan.row_ptr, col_indices, values, plan.backup_slot, w_up, w_down, y, u_values,
                            row_l1, work_counter=plan.totals[3:4])
    if n_backup:
        x_b = x[backup_rows]
        if z_backup is None:
            z_backup = cp.matmul(x_b, w_gate.T)
        backup_values = pack.relu_keep_nan(z_backup)
        up_backup = cp.matmul(x_b, w_up.T)
        h = ffn_forward.gate_mul(backup_values, up_backup, relu=False)
        y[backup_rows] = cp.matmul(h, w_down)
        row_l1[backup_rows] = cp.abs(h.astype(cp.float32)).sum(axis=1)
    else:
        backup_values = cp.empty((0, n), dtype=x.dtype)
        up_backup = cp.empty((0, n), dtype=x.dtype)
    l1_l0 = ffn_forward.train_stats(row_l1, plan.nnz_all)
    gate = Hybrid(plan.row_ptr, col_indices, values, plan.backup_slot, backup_rows, backup_values, n, eff)
    stats = FFNStats(n_rows=m, n_cols=n, nnz=plan.nnz_all[0], l0=l1_l0[1], l1=l1_l0[0], neuron_counts=neuron_counts,
                     n_backup_rows=n_backup, n_overflow_rows=None, gate_kernel=kernel)
    saved = SavedForBackward(x, w_gate, w_up, w_down, gate, u_values, up_backup, l1_weight,
                             workspace=(item_bound, partial_bound))
    return y, saved, stats


def gated_ffn_backward(saved: SavedForBackward, dy):
    """Training backward (see twell.ops.gated_ffn_backward).  The compact part's kernels (transpose, the two
    neuron-major passes, the token-major dx) are queued first -- they are nearly all of the GPU time -- and
    the dense-backup rows' cuBLAS work after them, adding into dx rows and the weight gradients (beta = 1),
    so the host issues it while the GPU is busy."""
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
    dw_gate = cp.empty((n, d), dtype=w_gate.dtype)
    dw_up = cp.empty((n, d), dtype=w_up.dtype)
    dw_down = cp.empty((n, d), dtype=w_down.dtype)
    item_bound, partial_bound = saved.workspace
    # neuron-major first (du, dz per entry come out of it), then the token-major dx of the compact rows
    ffn_backward.weight_grads(x, dy, pattern, gate.values, saved.up_values, w_down, scale, du, dz, dw_gate, dw_up,
                              dw_down, item_bound=item_bound, partial_bound=partial_bound)
    ffn_backward.csr_dx(gate.row_ptr, gate.col_indices, du, dz, gate.backup_slot, w_gate, w_up, dx)
    if gate.n_backup:
        rows = gate.backup_rows
        dy_b, x_b = dy[rows], x[rows]
        dh = cp.matmul(dy_b, w_down.T)
        du_b, dz_b, h_b = ffn_backward.backup_row_grads(dh, gate.backup_values, saved.up_backup, scale)
        dx_b = cp.matmul(du_b, w_up)
        blas.gemm(dz_b, w_gate, dx_b, beta=1.0)                        # dx_b += dz_b w_gate
        dx[rows] = dx_b
        blas.gemm(du_b, x_b, dw_up, trans_a=True, beta=1.0)            # dw_up += du_bᵀ x_b
        blas.gemm(dz_b, x_b, dw_gate, trans_a=True, beta=1.0)
        blas.gemm(h_b, dy_b, dw_down, trans_a=True, beta=1.0)
    return dx, dw_gate, dw_up, dw_down


__all__ = ["gated_ffn_forward", "gated_ffn_backward", "FORWARD_HOST_SYNCS"]
