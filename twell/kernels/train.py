"""GPU training path: hybrid-routed gated FFN forward and backward (arguments validated by twell.ops).

Host synchronisation: exactly one, in the forward: the read-back of 6 int32
(compact entries, backup rows, compact rows to refill, a work counter, and two
workspace bounds for the backward) -- the hybrid format is sized by what the
batch needs.  When the batch is small enough to presize the compact entries
(PRESIZE_MAX_BYTES), the up/down kernel is queued before the wait, so the GPU
does not idle during it.  The backward never synchronises.
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

#: ``gate_kernel="auto"`` in the training forward: True resolves it as the inference path does (the Hopper
#: fused gate GEMM where it can run, else cuBLAS + pack); False keeps cuBLAS + pack.  From same-process A/B
#: runs on the H200 (docs/perf-notes.md, v8): the fused gate saves 0.05-0.1 ms per step.
TRAINING_AUTO_FUSED = True


def training_gate_kernel(requested: str, x, w_gate) -> str:
    """Resolve the training forward's ``gate_kernel`` (see :data:`TRAINING_AUTO_FUSED`)."""
    if requested == "auto" and not TRAINING_AUTO_FUSED:
        return "cublas"
    return gate_gemm.choose_gate_kernel(requested, x, w_gate)


#: Largest transient buffer (bytes) for presizing the training forward's compact entries (see
#: gated_ffn_forward): 16 MiB at M = 16,384 with the default threshold; larger batches size them first.
PRESIZE_MAX_BYTES = 64 << 20


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
    readback = HostReadback(plan.totals, bounds)
    # Presized: the compact entries and the up/down kernel are queued before the read-back is waited for,
    # into buffers of the largest possible size (M * min(eff, n) entries), copied to their exact size after
    # it (the GPU is busy with the up/down kernel meanwhile); else they are sized first.
    cap = m * min(eff, n)
    presized = cap * (4 + 2 * x.dtype.itemsize) <= PRESIZE_MAX_BYTES
    if presized:
        n_entries = cap
    else:
        nnz, n_backup, n_redo, _, item_bound, partial_bound = readback.wait()
        n_entries = nnz
    col_indices = cp.empty(n_entries, dtype=cp.int32)
    values = cp.empty(n_entries, dtype=x.dtype)
    u_values = cp.empty(n_entries, dtype=x.dtype)
    y = cp.empty((m, d), dtype=x.dtype)
    row_l1 = cp.empty(m, dtype=cp.float32)      # compact rows: the up/down kernel; backup rows: after it
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

    def up_down(work_counter):
        ffn_forward.csr_up_down(x, plan.row_ptr, col_indices, values, plan.backup_slot, w_up, w_down, y, u_values,
                                row_l1, work_counter=work_counter)

    if presized or not n_redo:
        up_down(plan.totals[3:4])
    if presized:
        nnz, n_backup, n_redo, _, item_bound, partial_bound = readback.wait()
    if n_redo:
        # rare (fused gate only): compact rows whose TwELL tile overflowed its slots get their entries from a
        # recomputed dense gate row, exactly; when presized, the up/down kernel then runs again (same values
        # for every other row)
        rows = plan.redo_rows_buf[:n_redo]
        z_rows = cp.matmul(x[rows], w_gate.T)
        vec = n % 8 == 0 and aligned(z_rows, 8 * z_rows.dtype.itemsize)
        fill = get_kernel("pack", f"fill_hybrid_rows<{ct}, true, {cbool(vec)}>")
        fill((grid_1d(n_redo, wpb, cap=2**31 - 1),), (32 * wpb,),
             (z_rows, i32(n_redo), i32(n), cp.ascontiguousarray(plan.row_ptr[rows]),
              cp.full(n_redo, -1, dtype=cp.int32), col_indices, values))
        up_down(cp.zeros(1, dtype=cp.int32))
    tw = None
    backup_rows = plan.backup_rows_buf[:n_backup]
    if n_backup:
        x_b = x[backup_rows]
        z_backup = z[backup_rows] if z is not None else cp.matmul(x_b, w_gate.T)
        z = None
        backup_values = pack.relu_keep_nan(z_backup)
        up_backup = cp.matmul(x_b, w_up.T)
        h = ffn_forward.backup_gate_mul_l1(backup_values, up_backup, backup_rows, row_l1)
        y[backup_rows] = cp.matmul(h, w_down)
    else:
        backup_values = cp.empty((0, n), dtype=x.dtype)
        up_backup = cp.empty((0, n), dtype=x.dtype)
    z = None                                                            # the dense gate is not kept
    if presized:                                                        # exact sizes for the saved state
        col_indices, values, u_values = col_indices[:nnz].copy(), values[:nnz].copy(), u_values[:nnz].copy()
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
