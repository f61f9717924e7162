"""GPU inference: ``x → gate → h → y`` by one of four paths, chosen in :func:`forward`.

* **fused decode** (M ≤ 4, 16-bit, d = 256·k ≤ 2048, no statistics asked): one kernel streams w_gate once,
  keeps the active entries and gathers their w_up / w_down rows; a second sums the per-CTA partials.
* **small batch** (M ≤ :data:`SMALL_BATCH_ROWS`): the gate GEMM (cuBLAS) then one kernel that computes
  every row sparsely and exactly from the dense gate, whatever its activity (no TwELL, no routing, no
  host synchronisation: capturable in a CUDA graph).
* **sparse** (larger M): gate GEMM → TwELL (the fused Hopper kernel, or cuBLAS + the pack kernel) →
  fused up/down for the compact rows → the rows that need the dense backup through cuBLAS.  Two ways to
  size the backup:

  - *queued* (a :class:`~twell.DensityTracker` that has observed a call, no statistics asked): a capacity
    of rows from the tracker's recent observations (:func:`backup_capacity`); the backup rows up to it go
    through cuBLAS on a fixed-size buffer, any beyond it through an exact kernel from x alone
    (``excess_rows_ffn``).  No host synchronisation: the host queues the next layers while the GPU works,
    and the call is capturable in a CUDA graph.
  - *read back* (otherwise): the host reads how many rows need the backup (12 bytes) while the up/down
    kernel runs, then sizes cuBLAS to them exactly.  Not capturable.
* **dense** (``path="dense"``, or what a :class:`~twell.DensityTracker` picks for a dense batch): three
  cuBLAS GEMMs and one elementwise kernel (which also counts the entries when statistics or the tracker's
  periodic report ask for them).  Capturable.

Every path is exact (the same NaN / Inf rule, docs/design.md) and bitwise deterministic.
"""

from __future__ import annotations

from ..kernels import ffn_forward, gate_gemm, pack
from ..kernels.common import MAX_LIST, cupy
from ..results import FFNStats
from ..runtime import blas
from ..runtime.launch import HostReadback
from .streams import CaptureError, capture_allocations, capturing, require_out

#: Largest batch of the small-batch path (no TwELL, no routing, no host sync, capturable).
SMALL_BATCH_ROWS = 512
#: Queued backup: the fewest rows of its capacity, and the granularity (rows) it is rounded up to.
BACKUP_CAPACITY_MIN, BACKUP_CAPACITY_STEP = 64, 64
#: Queued backup: its capacity over the recent peak of backup rows (a replay of the small model's checkpoints
#: puts 5-6 % of calls past a capacity of 1.25x, 2-3 % past 2x; docs/performance-history.md, v31).
BACKUP_CAPACITY_FACTOR = 2.0
#: Largest batch of the fused decode kernels: their gate GEMV runs on CUDA cores, so its cost grows with
#: the rows while cuBLAS's does not (measured cut-over 4 rows, docs/performance-history.md, v20).
FUSED_DECODE_ROWS = 4


def forward(x, w_first, w_up, w_down, *, gated: bool, tile_width: int, compression: int, threshold: int,
            return_stats: bool, out, gate_kernel: str, path: str, tracker, observe: bool | None = None):
    """The GPU inference op (``gated_ffn`` when ``gated``, else ``ffn`` with ``w_up`` unused).

    ``observe``: whether the tracker records this call, when the caller has already asked it (a small batch
    reports only every ``SMALL_BATCH_INTERVAL``-th call, a larger dense one without statistics every
    ``DENSE_INTERVAL``-th); None: decided here."""
    cp = cupy()
    m, d = x.shape
    n = w_down.shape[0]
    in_capture = capturing(cp)
    if in_capture:
        require_out(out, "gated_ffn" if gated else "ffn")
    if gate_kernel in ("wgmma", "mma"):
        gate_gemm.choose_gate_kernel(gate_kernel, x, w_first)   # an explicit kernel that cannot run raises on any path
    if path == "auto":
        path = ("sparse" if tracker is None else
                tracker.choose(m, n, d, x.dtype.itemsize, training=False, wait=not in_capture))
    with capture_allocations(cp, in_capture):
        y = cp.empty((m, d), dtype=x.dtype) if out is None else out
        if observe is None:
            observe = tracker is not None and not in_capture and (
                tracker.wants_small_batch_observation() if m <= SMALL_BATCH_ROWS else
                path != "dense" or return_stats or tracker.dense_call_observes())
        if path == "dense":
            row_nnz, counts, kernel, density = dense_forward(
                x, w_first, w_up, w_down, y, gated=gated, row_counts=return_stats, neuron_counts=return_stats,
                summary_threshold=tracker.dense_row_threshold if observe else None)
            summary = None
        elif m <= SMALL_BATCH_ROWS:
            row_nnz, counts, kernel = small_batch_forward(x, w_first, w_up, w_down, y, gated=gated,
                                                          row_counts=return_stats or observe,
                                                          neuron_counts=return_stats)
            summary = None
        else:
            capacity = None if tracker is None or return_stats else backup_capacity(tracker, m, n, d)
            if in_capture and capacity is None:
                raise CaptureError(
                    f"gated_ffn with M = {m} > {SMALL_BATCH_ROWS} rows takes the sparse path, which needs a "
                    "DensityTracker that has observed a call of this layer to size its dense backup on the "
                    "device (without one it reads the number of backup rows back to the host, which cannot be "
                    "captured): pass tracker= and call it eagerly once before capturing, capture batches of "
                    f"at most {SMALL_BATCH_ROWS} rows, or pass path='dense'")
            p, summary, kernel = sparse_forward(x, w_first, w_up, w_down, y, gated=gated, tile_width=tile_width,
                                                compression=compression, threshold=threshold,
                                                gate_kernel=gate_kernel, neuron_counts=return_stats,
                                                capacity=capacity)
            row_nnz, counts = p.row_nnz, p.neuron_counts
        if observe:
            if summary is not None:
                tracker.observe_sparse(m, summary[2], summary[0])
            elif path != "dense" and m > SMALL_BATCH_ROWS:           # queued backup: totals on the device
                tracker.observe_sparse_totals(p.totals, m)
            elif path == "dense":
                tracker.observe_summary(density, m, path="dense")
            elif row_nnz is not None:
                tracker.observe_rows(row_nnz, path="sparse")
        if not return_stats:
            return y
        nnz = row_nnz.sum(dtype=cp.int64)
        stats = FFNStats(n_rows=m, n_cols=n, nnz=nnz, l0=nnz / max(m, 1), l1=None, neuron_counts=counts,
                         n_backup_rows=m if path == "dense" else (summary[0] if summary else 0),
                         n_overflow_rows=summary[1] if summary else 0, gate_kernel=kernel,
                         path="dense" if path == "dense" else ("sparse" if summary else "small_batch"))
        return y, stats


# --------------------------------------------------------------------------- small batches


def small_batch_forward(x, w_first, w_up, w_down, y, *, gated: bool, row_counts: bool, neuron_counts: bool):
    """Small batches without routing: returns (row_nnz or None, neuron_counts or None, gate kernel).  Without
    counts asked, batches of at most FUSED_DECODE_ROWS rows run the fused decode kernels."""
    cp = cupy()
    m = x.shape[0]
    if not row_counts and m <= FUSED_DECODE_ROWS and ffn_forward.decode_fused_supported(x, w_first, w_up, w_down,
                                                                                         y):
        ffn_forward.decode_fused(x, w_first, w_up, w_down, y, gated=gated)
        return None, None, "decode_fused"
    z = blas.gemm(x, w_first, trans_b=True)                                      # (M, n)
    row_nnz = cp.empty(m, dtype=cp.int32) if row_counts else None
    counts = cp.zeros(w_first.shape[0], dtype=cp.int32) if neuron_counts else None
    if counts is not None:
        pack.count_row_entries(z, row_nnz, relu=True, neuron_counts=counts)
    ffn_forward.dense_gate_up_down(x, z, w_up, w_down, y, gated=gated, row_nnz=None if counts is not None else row_nnz)
    return row_nnz, counts, "cublas"


# --------------------------------------------------------------------------- dense


def dense_forward(x, w_first, w_up, w_down, y, *, gated: bool, row_counts: bool, neuron_counts: bool,
                  summary_threshold: int | None = None):
    """The gate and up GEMMs as one batched cuBLAS call, one elementwise kernel (h, the entry counts asked
    for and, given ``summary_threshold``, a density tracker's summary), the down GEMM; returns (row_nnz or
    None, neuron_counts or None, "cublas", summary or None).  The GEMMs are queued first: nothing else
    delays the GPU's start."""
    cp = cupy()
    m = x.shape[0]
    n = w_down.shape[0]
    z, u = blas.gemm_pair(x, w_first, w_up) if gated else (blas.gemm(x, w_first, trans_b=True), None)
    row_nnz = cp.empty(m, dtype=cp.int32) if row_counts else None
    counts = cp.zeros(n, dtype=cp.int32) if neuron_counts else None
    summary = None if summary_threshold is None else cp.zeros(3, dtype=cp.uint64)
    h = ffn_forward.dense_gate_mul(z, u, gated=gated, row_nnz=row_nnz, neuron_counts=counts, summary=summary,
                                   summary_threshold=summary_threshold or 0)
    u = None
    blas.gemm(h, w_down, y)
    ffn_forward.fix_nonfinite_rows(y, z, h, w_down)
    return row_nnz, counts, "cublas", summary


# --------------------------------------------------------------------------- sparse


def effective_threshold(threshold: int, n: int, tile_width: int, compression: int) -> int:
    """The row threshold the kernels apply: at most MAX_LIST entries and at most the TwELL's slots."""
    n_tiles = -(-n // tile_width)
    return min(threshold, MAX_LIST, n_tiles * (tile_width // compression))


def backup_capacity(tracker, m: int, n: int, d: int) -> int | None:
    """Rows of the queued backup of an M-row call: :data:`BACKUP_CAPACITY_FACTOR` times the tracker's peak
    of backup rows over its recent calls scaled to M (:meth:`~twell.DensityTracker.backup_peak`), plus
    :data:`BACKUP_CAPACITY_MIN`, rounded up to :data:`BACKUP_CAPACITY_STEP` and at most M; 0 when none of
    those calls had a backup row.  A row in the capacity costs a row of three cuBLAS GEMMs, but the
    capacity's GEMMs read every weight matrix once whatever the count (≈ 0.05 ms at d 2048, n 5632); a row
    past it costs a share of ``excess_rows_ffn``'s pass over the weights (all CTAs on one row, a CTA per row
    from a full wave on).  None (read the count back instead) when the tracker has observed no call yet, or
    when the exact kernel for rows past the capacity cannot take this shape (its shared memory)."""
    if ffn_forward.excess_smem_bytes(d, n) > ffn_forward.EXCESS_MAX_SMEM:
        return None
    obs = tracker.observation(wait=False)
    peak = tracker.backup_peak(m)
    if obs is None or obs.m == 0 or peak is None:
        return None
    if peak == 0:
        return 0
    step = BACKUP_CAPACITY_STEP
    return min(m, BACKUP_CAPACITY_MIN + step * -(-int(BACKUP_CAPACITY_FACTOR * peak) // step))


def sparse_forward(x, w_first, w_up, w_down, y, *, gated: bool, tile_width: int, compression: int, threshold: int,
                   gate_kernel: str, neuron_counts: bool, capacity: int | None = None):
    """Gate → TwELL → compact rows' up/down + dense backup rows.  Returns (TwellPending, (backup rows,
    overflowed rows, compact entries) or None when queued, gate kernel).  ``capacity``: size the backup on
    the device with this many rows (:func:`backup_rows_queued`); None: read the count back."""
    n = w_down.shape[0]
    eff = effective_threshold(threshold, n, tile_width, compression)
    kernel = gate_gemm.choose_gate_kernel(gate_kernel, x, w_first)
    if kernel == "cublas":
        z = blas.gemm(x, w_first, trans_b=True)                                  # (M, n)
        p = pack.pack_twell_async(z, tile_width, compression, eff, relu=True, neuron_counts=neuron_counts)
    else:                                                   # the GEMM launched first: the GPU idles until it
        z = None                                            # never materialised
        p = gate_gemm.gate_twell_async(x, w_first, tile_width, compression, eff, kernel=kernel,
                                       neuron_counts=neuron_counts)
    # the up/down kernel uses totals[2] as its work counter: read back the others meanwhile (unless queued)
    readback = None if capacity is not None else HostReadback(p.totals[:2], p.totals[3:], overlap=True)
    ffn_forward.twell_up_down(x, p.counts, p.indices, p.values, p.row_route, w_up, w_down, tile_width, y,
                              compact=pack.ROUTE_COMPACT, gated=gated, work_counter=p.totals[2:3])
    if readback is None:
        backup_rows_queued(x, w_first, w_up, w_down, y, p.row_route, capacity, gated)
        return p, None, kernel
    n_backup, n_overflow, compact_entries = readback.wait()
    if n_backup:
        backup_rows_forward(x, p, z, w_first, w_up, w_down, y, n_backup, n_overflow, gated)
    return p, (n_backup, n_overflow, compact_entries), kernel


def backup_rows_forward(x, p, z, w_first, w_up, w_down, y, n_backup: int, n_overflow: int, gated: bool):
    """The backup rows' y with cuBLAS: u = x_b w_upᵀ, h = relu(z_b) ⊙ u (gated) or relu(z_b), y_b = h w_down.

    The host queues this after the read-back, while the up/down kernel runs, so its host time counts only
    where it outlasts that kernel.  Every row a backup row: plain GEMMs on the whole batch.  Otherwise the
    ordered backup-row list (:func:`pack.route_rows`); after the fused gate (``z`` None) the gathered x rows
    and the gate rows unpacked from the TwELL come from one kernel, and the y rows are scattered by one.
    """
    m = x.shape[0]
    if n_backup == m:
        rows, xr = None, x
        zr = backup_gate_rows(p, z, xr, None, w_first, n_backup, n_overflow)
    else:
        rows = pack.route_rows(p.row_route)[1][:n_backup]
        if z is None and 2 * n_overflow <= n_backup:
            xr, zr = pack.gather_backup_rows(x, p.counts, p.indices, p.values, rows, w_first.shape[0], p.tile_width)
            if n_overflow:
                recompute_overflowed(p, zr, xr, rows, w_first, n_overflow)
        else:
            xr = x[rows]
            zr = backup_gate_rows(p, z, xr, rows, w_first, n_backup, n_overflow)
    u = blas.gemm(xr, w_up, trans_b=True) if gated else None
    h = ffn_forward.dense_gate_mul(zr, u, gated=gated)
    u = None
    if rows is None:
        blas.gemm(h, w_down, y)
        ffn_forward.fix_nonfinite_rows(y, zr, h, w_down)
    else:
        yr = blas.gemm(h, w_down)
        ffn_forward.fix_nonfinite_rows(yr, zr, h, w_down)
        pack.scatter_rows(yr, rows, y)


def backup_rows_queued(x, w_first, w_up, w_down, y, row_route, capacity: int, gated: bool):
    """The backup rows' y without a host read-back.  The ordered list of rows with ``row_route != 0`` and its
    length stay on the device; its first ``capacity`` rows are gathered into a fixed (capacity, d) buffer
    (zeros past the length), their gate recomputed and the FFN done with cuBLAS on the whole buffer, and the
    rows within the length scattered into y (a capacity of 0: no cuBLAS work); rows past the capacity (a
    batch denser than the layer's recent calls) are computed exactly by ``excess_rows_ffn``, which does
    nothing when there are none."""
    _, rows, totals = pack.route_rows(row_route)
    count = totals[:1]
    if capacity:
        xr = pack.gather_rows_counted(x, rows, count, capacity)
        zr = blas.gemm(xr, w_first, trans_b=True)
        u = blas.gemm(xr, w_up, trans_b=True) if gated else None
        h = ffn_forward.dense_gate_mul(zr, u, gated=gated)
        u = None
        yr = blas.gemm(h, w_down)
        ffn_forward.fix_nonfinite_rows(yr, zr, h, w_down)
        pack.scatter_rows(yr, rows[:capacity], y, count=count)
    ffn_forward.excess_rows_ffn(x, w_first, w_up, w_down, rows, count, capacity, y, gated=gated)


def recompute_overflowed(p, zr, xr, rows, w_first, n_overflow: int):
    """Gate rows (R, n) of the backup rows whose TwELL tile overflowed, recomputed with cuBLAS in place."""
    cp = cupy()
    overflowed = (p.row_route if rows is None else p.row_route[rows]) == pack.ROUTE_OVERFLOW
    _, pos_buf, _ = pack.route_rows(overflowed.astype(cp.int32))   # their positions, in order
    pos = pos_buf[:n_overflow]
    zr[pos] = blas.gemm(xr[pos], w_first, trans_b=True)


def backup_gate_rows(p, z, xr, rows, w_first, n_backup: int, n_overflow: int):
    """Gate pre-activations (relu'd where they come from TwELL) of the backup rows, (R, n).

    ``rows``: the ordered backup-row list (None: every row).  From the dense z when cuBLAS computed it.
    After the fused gate z was never stored: a row routed by the row threshold has every entry in its TwELL
    (no tile overflowed), so its gate row is unpacked from there; only rows whose tile overflowed recompute
    their gate row with cuBLAS (all rows when most of them overflowed).
    """
    if z is not None:
        return z if rows is None else z[rows]
    if 2 * n_overflow > n_backup:
        # mostly overflowed rows (dense batches): one GEMM over all of them is cheaper than unpacking plus a
        # GEMM over a gathered subset and its scatter
        return blas.gemm(xr, w_first, trans_b=True)
    zr = pack.unpack_twell_rows(p.counts, p.indices, p.values, rows, w_first.shape[0], p.tile_width)
    if n_overflow:
        recompute_overflowed(p, zr, xr, rows, w_first, n_overflow)
    return zr


# --------------------------------------------------------------------------- from a user's TwELL


def twell_product(x, tw, w_up, w_down, y, *, gated: bool):
    """y = (g ⊙ (x w_upᵀ)) w_down (gated; g the TwELL's values) or h w_down (h = the TwELL) for a validated
    device TwELL: the compact rows by the fused kernel, the backup rows and compact rows longer than the
    kernels' list by cuBLAS."""
    cp = cupy()
    nnz = cp.minimum(tw.counts, tw.slots).sum(axis=1)
    long_rows = cp.flatnonzero((nnz > MAX_LIST) & (tw.backup_slot < 0)).astype(cp.int32)   # host sync (size)
    backup_slot = tw.backup_slot
    if long_rows.size:
        backup_slot = backup_slot.copy()
        backup_slot[long_rows] = 0                          # any value >= 0: the kernel skips the row
    ffn_forward.twell_up_down(x, tw.counts, tw.indices, tw.values, backup_slot, w_up, w_down, tw.tile_width, y,
                              gated=gated)
    for rows, g in ((tw.backup_rows, tw.backup_values), (long_rows, None)):
        if rows.size == 0:
            continue
        if g is None:
            g = pack.unpack_twell_rows(tw.counts, tw.indices, tw.values, rows, tw.n_cols, tw.tile_width)
        g = cp.ascontiguousarray(g)
        u = blas.gemm(cp.ascontiguousarray(x[rows]), w_up, trans_b=True) if gated else None
        h = ffn_forward.dense_gate_mul(g, u, gated=gated, relu=False)
        yr = blas.gemm(h, w_down)
        ffn_forward.fix_nonfinite_rows(yr, g, h, w_down, relu=False)
        y[rows] = yr
    return y
