"""GPU training: the forward ``x → hybrid gate → y (+ saved state)`` and the backward ``saved, dy → grads``,
each by the sparse path (hybrid: compact rows through the sparse kernels, rows over the threshold through
cuBLAS) or the dense path (every row through cuBLAS: the dense floor), chosen in :func:`forward`.

Host synchronisation.  The sparse forward's saved state is sized by what the batch needs: 6 int32 (compact
entries, backup rows, compact rows to refill, a work counter, two workspace bounds of the backward) are
copied to the host.  Two ways to wait for them:

* *sized on the device* (a :class:`~twell.DensityTracker` that has observed the layer, and a batch small
  enough to presize the compact entries, :data:`PRESIZE_MAX_BYTES`): the forward never waits.  The compact
  entries go to buffers of the largest size the batch could need; the backup rows up to a capacity from
  the tracker's recent observations (:func:`~twell.gpu.inference.backup_capacity`) through cuBLAS on a
  fixed-size buffer, rows past it through the exact kernel ``excess_rows_ffn`` (their gate and up rows are
  recomputed with cuBLAS when the state is finished); compact rows whose TwELL tile overflowed become
  backup rows.  The saved state is finished (:attr:`~twell.SavedForBackward.pending`) when the backward
  first reads it, by when the copy has long arrived: the host queues the next layers while the GPU works.
* *read back* (otherwise): the forward waits for the copy once, after queueing the up/down kernel when the
  entries could be presized.

The dense forward and every backward never synchronise.
"""

from __future__ import annotations

import functools

from ..format import Hybrid, NeuronMajorPattern
from ..kernels import ffn_backward, ffn_forward, gate_gemm, pack
from ..kernels.common import MAX_LIST, cupy
from ..results import FFNStats, SavedForBackward
from ..runtime import blas
from ..runtime.launch import HostReadback, aligned, cbool, ctype_of, grid_1d, i32
from ..runtime.loader import get_kernel
from .inference import backup_capacity

#: TwELL layout of the fused gate GEMM's output in the training forward (converted to the Hybrid's CSR
#: right away): 256-column tiles of 32 slots; a row that overflows a tile but stays under the Hybrid's
#: threshold has its CSR entries refilled from a recomputed dense gate row (exact, rare).
FUSED_TILE_WIDTH, FUSED_COMPRESSION = 256, 8
#: Largest transient buffer (bytes) for presizing the compact entries: 16 MiB at M = 16,384 with the
#: default threshold; larger batches size them first.
PRESIZE_MAX_BYTES = 64 << 20


def forward(x, w_gate, w_up, w_down, *, l1_weight: float, threshold: int, gate_kernel: str, path: str, tracker):
    """The GPU training forward (see :func:`twell.gated_ffn_forward`)."""
    cp = cupy()
    if cp.cuda.get_current_stream().is_capturing():
        from .streams import CaptureError  # noqa: PLC0415
        raise CaptureError("gated_ffn_forward sizes its saved state on the host and cannot be captured in a CUDA "
                           "graph; capture inference (gated_ffn / ffn) instead")
    m, d = x.shape
    n = w_gate.shape[0]
    if gate_kernel in ("wgmma", "mma"):
        gate_gemm.choose_gate_kernel(gate_kernel, x, w_gate)    # an explicit kernel that cannot run raises on any path
    if path == "auto":
        path = tracker.choose(m, n, d, x.dtype.itemsize, training=True) if tracker is not None else "sparse"
    if path == "dense":
        y, saved, stats, density = dense_forward(
            x, w_gate, w_up, w_down, l1_weight=l1_weight, threshold=threshold,
            summary_threshold=tracker.dense_row_threshold if tracker is not None else None)
        if tracker is not None:
            tracker.observe_summary(density, m, path="dense")
        return y, saved, stats
    capacity = None if tracker is None else backup_capacity(tracker, m, n, d)
    y, saved, stats, observed = sparse_forward(x, w_gate, w_up, w_down, l1_weight=l1_weight, threshold=threshold,
                                               gate_kernel=gate_kernel, capacity=capacity)
    if tracker is not None and isinstance(observed, tuple):
        tracker.observe_sparse(m, *observed)
    elif tracker is not None:                               # the plan's device totals
        tracker.observe_sparse_totals(observed, m, backup_index=1, compact_index=0)
    return y, saved, stats


# --------------------------------------------------------------------------- dense


def dense_forward(x, w_gate, w_up, w_down, *, l1_weight: float, threshold: int, summary_threshold: int | None = None):
    """Every row dense: the gate and up GEMMs as one batched call, one elementwise kernel (h, relu(z) in place
    over z, the L1 and entry statistics), the down GEMM; the saved state is the Hybrid whose every row is a
    backup row (g and u kept, h recomputed)."""
    cp = cupy()
    m, d = x.shape
    n = w_gate.shape[0]
    z, u = blas.gemm_pair(x, w_gate, w_up)                 # one batched GEMM: (2, M, n)
    g = z                                                   # relu(z) written over z: no third (M, n) buffer
    row_l1 = cp.empty(m, dtype=cp.float32)
    counts = cp.zeros(n, dtype=cp.int32)
    nnz_total = cp.zeros(1, dtype=cp.uint64)
    summary = None if summary_threshold is None else cp.zeros(3, dtype=cp.uint64)   # a tracker's observation
    h = ffn_forward.dense_gate_mul(z, u, g_out=g, row_l1=row_l1, neuron_counts=counts, nnz_total=nnz_total,
                                   summary=summary, summary_threshold=summary_threshold or 0)
    z = None
    y = blas.gemm(h, w_down)
    ffn_forward.fix_nonfinite_rows(y, g, h, w_down)
    nnz_all = nnz_total.view(cp.int64)
    l1_l0 = ffn_forward.train_stats(row_l1, nnz_all)
    every = cp.arange(m, dtype=cp.int32)
    empty_i, empty_v = cp.empty(0, dtype=cp.int32), cp.empty(0, dtype=x.dtype)
    gate = Hybrid(cp.zeros(m + 1, dtype=cp.int32), empty_i, empty_v, every, every, g, n, threshold,
                  NeuronMajorPattern(cp.zeros(n + 1, dtype=cp.int32), empty_i, empty_i))
    stats = FFNStats(n_rows=m, n_cols=n, nnz=nnz_all[0], l0=l1_l0[1], l1=l1_l0[0], neuron_counts=counts,
                     n_backup_rows=m, n_overflow_rows=None, gate_kernel="cublas", path="dense")
    saved = SavedForBackward(x, w_gate, w_up, w_down, gate, empty_v, u, l1_weight, workspace=(0, 0))
    return y, saved, stats, summary


# --------------------------------------------------------------------------- sparse


def sparse_forward(x, w_gate, w_up, w_down, *, l1_weight: float, threshold: int, gate_kernel: str,
                   presize_max_bytes: int = PRESIZE_MAX_BYTES, capacity: int | None = None):
    """The hybrid forward.  Order of work, so that the GPU is not left waiting on the host: gate (cuBLAS +
    count kernel, or the fused gate GEMM → TwELL) → the Hybrid's plan and the backward's workspace bounds →
    the copy of the counts to the host → compact entries (CSR) → the up/down kernel of the compact rows →
    only then the host-heavy dense-backup rows (cuBLAS), which queue behind it.  ``presize_max_bytes``: the
    largest presized buffer (0: always size first).  ``capacity``: backup rows sized on the device (see the
    module docstring; used when the entries can be presized), None: read back.  Returns (y, saved, stats,
    observed): (compact entries, backup rows) read back, or the plan's device totals."""
    cp = cupy()
    m, d = x.shape
    n = w_gate.shape[0]
    eff = min(threshold, MAX_LIST)
    if m * min(eff, n) >= 2**31:
        raise ValueError(f"M = {m} tokens with up to {min(eff, n)} compact entries each overflow the int32 row "
                         "offsets; split the batch")
    kernel = gate_gemm.choose_gate_kernel(gate_kernel, x, w_gate)
    ct = ctype_of(x.dtype, "x")
    cap = m * min(eff, n)
    presized = cap * (4 + 2 * x.dtype.itemsize) <= presize_max_bytes
    on_device = capacity is not None and presized and m > 0
    z = tw = None
    if kernel == "cublas":
        z = blas.gemm(x, w_gate, trans_b=True)                             # (M, n)
        p = pack.pack_hybrid_async(z, eff, relu=True, neuron_counts=True)
        plan, neuron_counts = p.plan, p.neuron_counts
    else:
        # TwELL of relu(x w_gate^T) from the GEMM's epilogue (no dense z in device memory); its tiles hold
        # FUSED_COMPRESSION-compressed slots, so a compact row whose tile overflowed is refilled ("redo"), or,
        # sized on the device, made a backup row
        tw = gate_gemm.gate_twell_async(x, w_gate, FUSED_TILE_WIDTH, FUSED_COMPRESSION, eff, kernel=kernel,
                                        neuron_counts=True)
        plan = pack.hybrid_plan(tw.row_nnz, eff, tw.row_route, redo_to_backup=on_device)
        neuron_counts = tw.neuron_counts
    bounds = ffn_backward.workspace_bounds(neuron_counts)
    readback = HostReadback(plan.totals, bounds)
    # Presized: the compact entries and the up/down kernel are queued before the read-back is waited for,
    # into buffers of the largest possible size (M * min(eff, n) entries), copied to their exact size after
    # it (the GPU is busy with the up/down kernel meanwhile) or, sized on the device, kept; else they are
    # sized first.
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
        fill = get_kernel(pack.FAMILY, f"fill_hybrid_rows<{ct}, true, {cbool(vec)}>")
        fill((grid_1d(m, wpb, cap=2**31 - 1),), (32 * wpb,),
             (z, i32(m), i32(n), plan.row_ptr, plan.backup_slot, col_indices, values))
    else:
        k = get_kernel(pack.FAMILY, f"twell_rows_to_csr<{ct}>")
        k((grid_1d(m, wpb, cap=2**31 - 1),), (32 * wpb,),
          (tw.counts, tw.indices, tw.values, i32(m), i32(tw.counts.shape[1]), i32(tw.indices.shape[2]),
           i32(FUSED_TILE_WIDTH), tw.row_route, plan.backup_slot, plan.row_ptr, col_indices, values))

    def up_down(work_counter):
        ffn_forward.csr_up_down(x, plan.row_ptr, col_indices, values, plan.backup_slot, w_up, w_down, y, u_values,
                                row_l1, work_counter=work_counter)

    if presized or not n_redo:
        up_down(plan.totals[3:4])
    if on_device:
        backup_values, up_backup = backup_rows_queued(x, z, w_gate, w_up, w_down, y, row_l1, plan, capacity)
        l1_l0 = ffn_forward.train_stats(row_l1, plan.nnz_all)
        finish = functools.partial(finish_saved, readback, plan, (col_indices, values, u_values),
                                   (backup_values, up_backup), capacity, n, eff)
        stats = FFNStats(n_rows=m, n_cols=n, nnz=plan.nnz_all[0], l0=l1_l0[1], l1=l1_l0[0],
                         neuron_counts=neuron_counts, n_backup_rows=plan.totals[1], n_overflow_rows=None,
                         gate_kernel=kernel, path="sparse")
        saved = SavedForBackward(x, w_gate, w_up, w_down, None, None, None, l1_weight, workspace=None, pending=finish)
        return y, saved, stats, plan.totals
    if presized:
        nnz, n_backup, n_redo, _, item_bound, partial_bound = readback.wait()
    if n_redo:
        # rare (fused gate only): compact rows whose TwELL tile overflowed its slots get their entries from a
        # recomputed dense gate row, exactly; when presized, the up/down kernel then runs again (same values
        # for every other row)
        rows = plan.redo_rows_buf[:n_redo]
        z_rows = blas.gemm(x[rows], w_gate, trans_b=True)
        vec = n % 8 == 0 and aligned(z_rows, 8 * z_rows.dtype.itemsize)
        fill = get_kernel(pack.FAMILY, f"fill_hybrid_rows<{ct}, true, {cbool(vec)}>")
        fill((grid_1d(n_redo, wpb, cap=2**31 - 1),), (32 * wpb,),
             (z_rows, i32(n_redo), i32(n), cp.ascontiguousarray(plan.row_ptr[rows]),
              cp.full(n_redo, -1, dtype=cp.int32), col_indices, values))
        up_down(cp.zeros(1, dtype=cp.int32))
    tw = None
    backup_rows = plan.backup_rows_buf[:n_backup]
    if n_backup:
        x_b = x[backup_rows]
        z_b = z[backup_rows] if z is not None else blas.gemm(x_b, w_gate, trans_b=True)
        z = None
        up_backup = blas.gemm(x_b, w_up, trans_b=True)
        backup_values = cp.empty_like(z_b)
        h = ffn_forward.dense_gate_mul(z_b, up_backup, g_out=backup_values, rows=backup_rows, row_l1=row_l1)
        z_b = None
        y_b = blas.gemm(h, w_down)
        ffn_forward.fix_nonfinite_rows(y_b, backup_values, h, w_down)
        pack.scatter_rows(y_b, backup_rows, y)
    else:
        backup_values = cp.empty((0, n), dtype=x.dtype)
        up_backup = cp.empty((0, n), dtype=x.dtype)
    z = None                                                            # the dense gate is not kept
    if presized:                                                        # exact sizes for the saved state
        col_indices, values, u_values = col_indices[:nnz].copy(), values[:nnz].copy(), u_values[:nnz].copy()
    l1_l0 = ffn_forward.train_stats(row_l1, plan.nnz_all)
    gate = Hybrid(plan.row_ptr, col_indices, values, plan.backup_slot, backup_rows, backup_values, n, eff)
    stats = FFNStats(n_rows=m, n_cols=n, nnz=plan.nnz_all[0], l0=l1_l0[1], l1=l1_l0[0], neuron_counts=neuron_counts,
                     n_backup_rows=n_backup, n_overflow_rows=None, gate_kernel=kernel, path="sparse")
    saved = SavedForBackward(x, w_gate, w_up, w_down, gate, u_values, up_backup, l1_weight,
                             workspace=(item_bound, partial_bound))
    return y, saved, stats, (nnz, n_backup)


def backup_rows_queued(x, z, w_gate, w_up, w_down, y, row_l1, plan, capacity: int):
    """The backup rows' y, row L1 and saved (g, u) rows without a host read-back.  The plan's ordered backup
    rows and their count stay on the device: the first ``capacity`` are gathered into fixed (capacity, ·)
    buffers (zeros past the count), their gate (gathered from the dense ``z``, or recomputed after the fused
    gate) and up rows made with cuBLAS, h and the L1 by one kernel, y by the down GEMM, and the rows within
    the count scattered into y and row_l1; rows past the capacity get y and their L1 from
    ``excess_rows_ffn`` (nothing to do when there are none).  Returns (g, u) of the capacity rows."""
    cp = cupy()
    m, n = x.shape[0], w_gate.shape[0]
    rows, count = plan.backup_rows_buf, plan.totals[1:2]
    if not capacity:                                    # no backup row in the recent calls: no cuBLAS work
        ffn_forward.excess_rows_ffn(x, w_gate, w_up, w_down, rows, count, 0, y, row_l1=row_l1)
        return cp.empty((0, n), dtype=x.dtype), cp.empty((0, n), dtype=x.dtype)
    xr = pack.gather_rows_counted(x, rows, count, capacity)
    zr = pack.gather_rows_counted(z, rows, count, capacity) if z is not None else blas.gemm(xr, w_gate, trans_b=True)
    ur = blas.gemm(xr, w_up, trans_b=True)
    l1r = cp.empty((capacity, 1), dtype=cp.float32)
    h = ffn_forward.dense_gate_mul(zr, ur, g_out=zr, row_l1=l1r.reshape(capacity))     # g = relu(z) over z
    yr = blas.gemm(h, w_down)
    ffn_forward.fix_nonfinite_rows(yr, zr, h, w_down)
    pack.scatter_rows(yr, rows[:capacity], y, count=count)
    pack.scatter_rows(l1r, rows[:capacity], row_l1.reshape(m, 1), count=count)
    ffn_forward.excess_rows_ffn(x, w_gate, w_up, w_down, rows, count, capacity, y, row_l1=row_l1)
    return zr, ur


def finish_saved(readback, plan, compact, backup, capacity: int, n: int, eff: int, saved):
    """The saved state of a forward sized on the device, once its counts are on the host: the compact
    entries and the backup rows cut to their sizes (views), the gate and up rows of backup rows past the
    capacity recomputed with cuBLAS from ``saved``'s x and weights (their y came from ``excess_rows_ffn``).
    Returns (gate, up_values, up_backup, workspace bounds)."""
    cp = cupy()
    x, w_gate, w_up = saved.x, saved.w_gate, saved.w_up
    nnz, n_backup, _, _, item_bound, partial_bound = readback.wait()
    col_indices, values, u_values = (a[:nnz] for a in compact)
    rows = plan.backup_rows_buf[:n_backup]
    g_b, u_b = (a[:min(n_backup, capacity)] for a in backup)
    if n_backup > capacity:
        x_e = x[rows[capacity:]]
        z_e = blas.gemm(x_e, w_gate, trans_b=True)
        u_e = blas.gemm(x_e, w_up, trans_b=True)
        ffn_forward.dense_gate_mul(z_e, u_e, g_out=z_e)                 # g = relu(z) in place (keeps NaN)
        g_b, u_b = cp.concatenate([g_b, z_e]), cp.concatenate([u_b, u_e])
    gate = Hybrid(plan.row_ptr, col_indices, values, plan.backup_slot, rows, g_b, n, eff)
    return gate, u_values, u_b, (item_bound, partial_bound)


# --------------------------------------------------------------------------- backward


def backward(saved: SavedForBackward, dy):
    """The GPU training backward (see :func:`twell.gated_ffn_backward`).  The compact part's kernels (transpose,
    the two neuron-major passes, the token-major dx) are queued first -- they are nearly all of the GPU time
    -- and the dense rows' cuBLAS work after them, adding into dx rows and the weight gradients (beta = 1),
    so the host issues it while the GPU is busy.  When every row is dense (the dense path), plain GEMMs."""
    cp = cupy()
    x, w_gate, w_up, w_down = saved.x, saved.w_gate, saved.w_up, saved.w_down
    m, d = x.shape
    n = w_gate.shape[0]
    gate = saved.gate
    # every allocation before the state is marked consumed: an out-of-memory error leaves it usable
    dx = cp.empty((m, d), dtype=x.dtype)
    dw_gate = cp.empty((n, d), dtype=w_gate.dtype)
    dw_up = cp.empty((n, d), dtype=w_up.dtype)
    dw_down = cp.empty((n, d), dtype=w_down.dtype)
    compact = gate.nnz > 0 or gate.n_backup < m
    if compact:
        du = cp.empty(gate.nnz, dtype=cp.float32)
        dz = cp.empty(gate.nnz, dtype=cp.float32)
        pattern = gate.transposed if gate.transposed is not None else pack.transpose_pattern(gate)
    saved.consumed = True
    scale = saved.l1_weight / max(m, 1)
    if compact:
        item_bound, partial_bound = saved.workspace
        # neuron-major first (du, dz per entry come out of it), then the token-major dx of the compact rows
        ffn_backward.weight_grads(x, dy, pattern, gate.values, saved.up_values, w_down, scale, du, dz, dw_gate,
                                  dw_up, dw_down, item_bound=item_bound, partial_bound=partial_bound)
        ffn_backward.csr_dx(gate.row_ptr, gate.col_indices, du, dz, gate.backup_slot, w_gate, w_up, dx)
    if gate.n_backup:
        every_row = gate.n_backup == m                      # the dense path: no gathers, no scatters
        rows = gate.backup_rows
        dy_b, x_b = (dy, x) if every_row else (dy[rows], x[rows])
        dh = blas.gemm(dy_b, w_down, trans_b=True)
        g_b = gate.backup_values
        du_b, dz_b, h_b = ffn_backward.backup_row_grads(dh, g_b, saved.up_backup, scale)
        dh = None
        dx_b = dx if every_row else cp.empty((gate.n_backup, d), dtype=x.dtype)
        blas.gemm(du_b, w_up, dx_b)
        blas.gemm(dz_b, w_gate, dx_b, beta=1.0)                         # dx_b += dz_b w_gate
        ffn_forward.fix_nonfinite_rows(dx_b, g_b, du_b, w_up, dz_b, w_gate)
        if not every_row:
            pack.scatter_rows(dx_b, rows, dx)
        beta = 1.0 if compact else 0.0                      # add to the compact part's weight gradients
        blas.gemm(du_b, x_b, dw_up, trans_a=True, beta=beta)            # dw_up += du_bᵀ x_b
        blas.gemm(dz_b, x_b, dw_gate, trans_a=True, beta=beta)
        blas.gemm(h_b, dy_b, dw_down, trans_a=True, beta=beta)
    return dx, dw_gate, dw_up, dw_down
