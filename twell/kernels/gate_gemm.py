"""Launchers of the ``gate_gemm`` kernel family (cuda_src/gate_gemm.cu): the gate GEMM with the
ReLU → TwELL epilogue fused in (no dense gate activations in device memory).

* ``gate_twell_wgmma`` -- Hopper (compute capability 9.0, ``sm_90a``): TMA + wgmma, warp-specialised,
  persistent grid.  Its tensor maps (``cuTensorMapEncodeTiled`` through ctypes on the driver library)
  are passed by value as ``__grid_constant__`` parameters.
* ``gate_twell_mma`` -- any compute capability ≥ 8.0: cp.async + mma.sync (the portable path; on an
  H200 it runs when forced with ``gate_kernel="mma"``).

Both produce exactly the TwELL of ``pack_twell(relu=True)`` applied to the GEMM rounded to the input
dtype (docs/format.md), and :func:`gate_twell_async` then routes rows from the counts with
``route_twell_counts`` (pack family), so the result is a :class:`~twell.kernels.pack.TwellPending`
like :func:`~twell.kernels.pack.pack_twell_async`'s.
"""

from __future__ import annotations

import ctypes

import numpy as np

from .._backend import bfloat16_dtype
from ..format import TILE_WIDTHS, twell_layout
from ..runtime.launch import NULL, SLOT, DriverLaunch, ctype_of, grid_1d, i32, threshold_i32
from ..runtime.loader import KernelFamily, get_kernel
from . import pack
from .common import cupy, raise_smem_limit, sm_count
from .pack import TwellPending

#: Output tile of both kernels (rows x columns of z per CTA work item).
BLOCK_M, BLOCK_N = 128, 256
WGMMA_THREADS, WGMMA_STAGES, WGMMA_BK = 384, 4, 64
MMA_THREADS, MMA_STAGES, MMA_BK = 256, 3, 32
WGMMA_SMEM = 1024 + WGMMA_STAGES * (BLOCK_M + BLOCK_N) * WGMMA_BK * 2 + 256 * 128 + 2 * WGMMA_STAGES * 8
MMA_SMEM = MMA_STAGES * (BLOCK_M + BLOCK_N) * (MMA_BK + 8) * 2

#: Thread-block cluster sizes compiled for the Hopper kernel (the w tile is multicast across the cluster).
WGMMA_CLUSTERS = (1, 2)
#: Cluster size the ops use: 2 (the w tile multicast to two row blocks) measured 1.5–2.5 % faster end to
#: end than 1 at M = 16,384 and 131,072, and 4 slower (docs/performance-history.md, v5 and v17).
DEFAULT_CLUSTER = 2
GATE_KERNELS = ("auto", "fused", "wgmma", "mma", "cublas")
FUSED_DTYPES = ("bfloat16", "float16")

_names = []
for _d in FUSED_DTYPES:
    _t = ctype_of(_d, "dtype")
    for _w in TILE_WIDTHS:
        for _c in WGMMA_CLUSTERS:
            _names.append(f"gate_twell_wgmma<{_t}, {_w}, {_c}, true>")
        _names.append(f"gate_twell_mma<{_t}, {_w}>")
# The GEMM mainloop without the epilogue: for the benchmark probes' breakdown only.
_names += [f"gate_twell_wgmma<__nv_bfloat16, 256, {_c}, false>" for _c in WGMMA_CLUSTERS]

FAMILY = KernelFamily("gate_gemm", tuple(_names), hot_kernels=(r"gate_twell_",))

_ROUTE_WARPS = 8


# --------------------------------------------------------------------------- tensor maps (driver API)

_CU_DTYPE = {"bfloat16": 9, "float16": 6}  # CUtensorMapDataType
_SWIZZLE_128B, _L2_PROMOTION_256B = 3, 3


_encode = None


def _driver():
    global _encode
    if _encode is not None:
        return _encode
    lib = ctypes.CDLL("libcuda.so.1")
    fn = lib.cuTensorMapEncodeTiled
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                   ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64),
                   ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32),
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    _encode = fn
    return fn


def encode_tensor_map(a, box_rows: int, box_cols: int = WGMMA_BK) -> np.ndarray:
    """A 2-D tiled ``CUtensorMap`` of the row-major 16-bit matrix ``a`` (rows, cols): boxes of
    ``box_rows x box_cols`` elements, 128-byte swizzle, zero fill out of bounds.  Returned as a
    one-element NumPy array of 128 bytes, which CuPy passes to a kernel by value."""
    rows, cols = a.shape
    buf = ctypes.create_string_buffer(128 + 128)
    addr = (ctypes.addressof(buf) + 127) // 128 * 128
    dims = (ctypes.c_uint64 * 2)(cols, rows)
    strides = (ctypes.c_uint64 * 1)(cols * a.dtype.itemsize)
    box = (ctypes.c_uint32 * 2)(box_cols, box_rows)
    elem = (ctypes.c_uint32 * 2)(1, 1)
    rc = _driver()(addr, _CU_DTYPE[a.dtype.name], 2, ctypes.c_void_p(a.data.ptr), dims, strides, box, elem,
                   0, _SWIZZLE_128B, _L2_PROMOTION_256B, 0)
    if rc != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUresult {rc} for a {a.shape} {a.dtype} matrix")
    out = np.empty(1, dtype=np.dtype((np.void, 128)))
    ctypes.memmove(out.ctypes.data, addr, 128)
    return out


# --------------------------------------------------------------------------- selection


_capabilities: dict = {}


def _capability() -> int:
    """Compute capability of the current device as an int (90 for Hopper), memoized per device."""
    cp = cupy()
    dev = cp.cuda.runtime.getDevice()
    cc = _capabilities.get(dev)
    if cc is None:
        cc = _capabilities[dev] = int(cp.cuda.Device(dev).compute_capability)
    return cc


_fused_dtypes: frozenset = frozenset()   # np.dtype objects of FUSED_DTYPES (filled on first use)


def _fused_dtype_objects() -> frozenset:
    global _fused_dtypes
    if not _fused_dtypes:
        bf16 = bfloat16_dtype()
        _fused_dtypes = frozenset(np.dtype(bf16 if name == "bfloat16" else name)
                                  for name in FUSED_DTYPES if name != "bfloat16" or bf16 is not None)
    return _fused_dtypes


def fused_supported(x, w) -> str | None:
    """Why the fused gate kernels cannot take these operands, or None if they can."""
    if x.dtype in _fused_dtype_objects() and x.shape[1] % 8 == 0 and (x.data.ptr | w.data.ptr) % 16 == 0 \
            and x.flags.c_contiguous and w.flags.c_contiguous and _capability() >= 80:
        return None                                            # the common case in one test
    if x.dtype.name not in FUSED_DTYPES:
        return f"dtype {x.dtype.name} (the fused gate GEMM takes bfloat16 / float16)"
    d = x.shape[1]
    if d % 8:
        return f"d = {d} is not a multiple of 8 (16-byte rows for the tensor maps and cp.async)"
    if x.data.ptr % 16 or w.data.ptr % 16:
        return "x or w_gate is not 16-byte aligned"
    if not (x.flags.c_contiguous and w.flags.c_contiguous):
        return "x or w_gate is not C-contiguous"
    if _capability() < 80:
        return "the device's compute capability is below 8.0"
    return None


def auto_gate_kernel(x, w) -> str:
    """What ``gate_kernel="auto"`` runs: the Hopper fused kernel ("wgmma") where it can run, else "cublas".

    Since the epilogue packs from registers (docs/performance-history.md, v5) the Hopper kernel takes 92–96 % of
    cuBLAS's time for ``x w_gateᵀ`` alone and the whole forward is faster with it than with cuBLAS + pack
    (1.135 vs 1.155 ms at M = 16,384; 8.22 vs 8.43 ms at 131,072).  The portable mma.sync kernel is ~3.5×
    slower than cuBLAS, so other devices stay on cuBLAS + pack.
    """
    if _capability() == 90 and fused_supported(x, w) is None:
        return "wgmma"
    return "cublas"


def fused_kernel_for_device() -> str:
    """The fused gate kernel of this device: "wgmma" on compute capability 9.0, else "mma"."""
    return "wgmma" if _capability() == 90 else "mma"


def choose_gate_kernel(requested: str, x, w) -> str:
    """Resolve ``gate_kernel`` ("auto", "fused", "wgmma", "mma", "cublas") for these operands.

    "auto" runs :func:`auto_gate_kernel`; "fused" the fused kernel of the device (:func:`fused_kernel_for_device`)
    where it can run, else cuBLAS + pack.  An explicit "wgmma" / "mma" that cannot run (other dtypes, d not a
    multiple of 8, misaligned pointers, wrong device) raises ValueError.
    """
    if requested not in GATE_KERNELS:
        raise ValueError(f"gate_kernel must be one of {GATE_KERNELS}, got {requested!r}")
    if requested == "auto":
        return auto_gate_kernel(x, w)
    if requested == "cublas":
        return "cublas"
    why = fused_supported(x, w)
    if requested == "fused":
        return "cublas" if why is not None else fused_kernel_for_device()
    if why is not None:
        raise ValueError(f"gate_kernel={requested!r} cannot run: {why}")
    if requested == "wgmma" and _capability() != 90:
        raise ValueError("gate_kernel='wgmma' needs a Hopper GPU (compute capability 9.0, sm_90a)")
    return requested


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig (cuda.h)
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p), ("attrs", ctypes.c_void_p),
                ("numAttrs", ctypes.c_uint)]


_cluster_occupancy: dict = {}


def max_active_clusters(kernel, threads: int, smem: int, cluster: int) -> int:
    """Clusters of ``cluster`` CTAs of ``kernel`` that the device runs at once (cuOccupancyMaxActiveClusters;
    0 if the driver cannot say).  A persistent grid larger than this would run its last clusters after
    the others finished: each takes a fixed share of the work, so the time would double."""
    key = (kernel.kernel.ptr, threads, smem, cluster)
    if key not in _cluster_occupancy:
        fn = ctypes.CDLL("libcuda.so.1").cuOccupancyMaxActiveClusters
        fn.restype = ctypes.c_int
        count = ctypes.c_int(0)
        cfg = _LaunchConfig(cluster * 128, 1, 1, threads, 1, 1, smem, None, None, 0)
        rc = fn(ctypes.byref(count), ctypes.c_void_p(kernel.kernel.ptr), ctypes.byref(cfg))
        _cluster_occupancy[key] = count.value if rc == 0 else 0
    return _cluster_occupancy[key]


# --------------------------------------------------------------------------- launch


def _wgmma_grid(k, smem: int, m_blocks: int, n_blocks: int, cluster: int) -> int:
    """Persistent grid of the Hopper kernel: one CTA per SM (cluster 1) or as many clusters as the
    occupancy API says run at once, never more CTAs than work items.  Sets the kernel's shared memory."""
    raise_smem_limit(k, smem)
    if cluster == 1:
        return min(m_blocks * n_blocks, sm_count())
    groups = -(-m_blocks // cluster) * n_blocks           # work items of a cluster
    resident = max_active_clusters(k, WGMMA_THREADS, smem, cluster)
    return cluster * (min(groups, resident) if resident > 0 else groups)


class _WgmmaPlan:
    """Everything of a Hopper gate launch that depends only on the operands' addresses and shapes: the
    driver launch with its parameter buffer (tensor maps, sizes), and the output layout (one allocation:
    counts, indices, values at 256-byte aligned offsets)."""

    def __init__(self, x, w, tile_width: int, compression: int, cluster: int):
        m, d = x.shape
        n = w.shape[0]
        self.n_tiles, self.slots = twell_layout(n, tile_width, compression)
        k = get_kernel(FAMILY, f"gate_twell_wgmma<{ctype_of(x.dtype, 'x')}, {tile_width}, {cluster}, true>")
        m_blocks, n_blocks = -(-m // BLOCK_M), -(-n // BLOCK_N)
        grid = _wgmma_grid(k, WGMMA_SMEM, m_blocks, n_blocks, cluster)
        self.launch = DriverLaunch(k, (grid,), (WGMMA_THREADS,), WGMMA_SMEM,
                                   (encode_tensor_map(x, BLOCK_M), encode_tensor_map(w, BLOCK_N // cluster),
                                    i32(m), i32(n), i32(d), i32(self.n_tiles), i32(self.slots), SLOT, SLOT, SLOT,
                                    SLOT))
        cells = m * self.n_tiles
        self.shapes = ((m, self.n_tiles), (m, self.n_tiles, self.slots))
        self.offset_indices = -(-cells * 4 // 256) * 256
        self.offset_values = self.offset_indices + -(-cells * self.slots // 256) * 256
        self.nbytes = self.offset_values + cells * self.slots * x.dtype.itemsize


_wgmma_plans: dict = {}     # (operand pointers and shapes, layout, cluster, device) -> _WgmmaPlan, at most 64


def _launch_wgmma_planned(cp, x, w, tile_width: int, compression: int, neuron_counts: bool, cluster: int):
    """Launch the Hopper gate GEMM → TwELL with as little host work as possible before the launch (the GPU
    idles until it: docs/performance-history.md, v13); returns (counts, indices, values, neuron_counts).
    The plan is keyed by the current device too: its kernel and tensor maps belong to that device."""
    key = (x.data.ptr, x.shape, x.dtype, w.data.ptr, w.shape, tile_width, compression, cluster,
           cp.cuda.runtime.getDevice())
    plan = _wgmma_plans.get(key)
    if plan is None:
        if len(_wgmma_plans) >= 64:
            _wgmma_plans.clear()
        plan = _wgmma_plans[key] = _WgmmaPlan(x, w, tile_width, compression, cluster)
    ncounts = cp.zeros(w.shape[0], dtype=cp.int32) if neuron_counts else None
    mem = cp.cuda.alloc(plan.nbytes)
    base = mem.ptr
    plan.launch(cp.cuda.get_current_stream().ptr, base, base + plan.offset_indices, base + plan.offset_values,
                0 if ncounts is None else ncounts.data.ptr)
    counts = cp.ndarray(plan.shapes[0], cp.int32, mem)
    indices = cp.ndarray(plan.shapes[1], cp.uint8, mem + plan.offset_indices)
    values = cp.ndarray(plan.shapes[1], x.dtype, mem + plan.offset_values)
    return counts, indices, values, ncounts


def gate_twell_async(x, w_gate, tile_width: int, compression: int, dense_row_threshold: int, *,
                     kernel: str = "wgmma", neuron_counts: bool = False,
                     cluster: int = DEFAULT_CLUSTER) -> TwellPending:
    """TwELL of ``relu(x w_gateᵀ)`` straight from the GEMM, plus the per-row routing; no host sync.

    Parameters
    ----------
    x : cupy.ndarray (M, d), bfloat16 / float16, C-contiguous, d % 8 == 0, 16-byte aligned
    w_gate : cupy.ndarray (n, d), same dtype, neuron-major
    tile_width, compression : int
        TwELL layout (``tile_width // compression`` slots per tile).
    dense_row_threshold : int
        Rows with more entries are routed to the dense backup (route code 1); rows with an
        overflowing tile get route code 2.
    kernel : {"wgmma", "mma"}
    neuron_counts : bool
        Also count, per neuron, the rows where it is active (int32 (n,)).
    cluster : {1, 2}
        Thread-block cluster size of the Hopper kernel (CTAs sharing each w tile by TMA multicast).

    Returns
    -------
    TwellPending
        counts (M, NT) int32, indices (M, NT, S) uint8, values (M, NT, S) of x's dtype, row_nnz,
        row_route, totals (backup rows, overflowed rows, 0, compact entries) on the device.
    """
    cp = cupy()
    m, d = x.shape
    n = w_gate.shape[0]
    if kernel == "wgmma":
        if cluster not in WGMMA_CLUSTERS:
            raise ValueError(f"cluster must be one of {WGMMA_CLUSTERS}, got {cluster}")
        counts, indices, values, ncounts = _launch_wgmma_planned(cp, x, w_gate, tile_width, compression,
                                                                 neuron_counts, cluster)
        n_tiles = counts.shape[1]
    elif kernel == "mma":
        n_tiles, slots = twell_layout(n, tile_width, compression)
        counts = cp.empty((m, n_tiles), dtype=cp.int32)
        indices = cp.empty((m, n_tiles, slots), dtype=cp.uint8)
        values = cp.empty((m, n_tiles, slots), dtype=x.dtype)
        ncounts = cp.zeros(n, dtype=cp.int32) if neuron_counts else None
        k = get_kernel(FAMILY, f"gate_twell_mma<{ctype_of(x.dtype, 'x')}, {tile_width}>")
        raise_smem_limit(k, MMA_SMEM)
        k((-(-m // BLOCK_M) * -(-n // BLOCK_N),), (MMA_THREADS,),
          (x, w_gate, i32(m), i32(n), i32(d), i32(n_tiles), i32(slots), counts, indices, values,
           NULL if ncounts is None else ncounts), shared_mem=MMA_SMEM)
    else:
        raise ValueError(f"kernel must be 'wgmma' or 'mma', got {kernel!r}")
    row_nnz = cp.empty(m, dtype=cp.int32)
    row_route = cp.empty(m, dtype=cp.int32)
    totals = cp.zeros(4, dtype=cp.int32)
    route = get_kernel(pack.FAMILY, "route_twell_counts")
    route((grid_1d(m, _ROUTE_WARPS, cap=2**31 - 1),), (32 * _ROUTE_WARPS,),
          (counts, i32(m), i32(n_tiles), i32(indices.shape[2]), threshold_i32(dense_row_threshold), row_nnz, row_route,
           totals))
    return TwellPending(counts, indices, values, row_nnz, row_route, totals, n, tile_width, dense_row_threshold,
                        ncounts)


def gate_gemm_mainloop(x, w_gate, *, cluster: int = DEFAULT_CLUSTER):
    """The Hopper gate GEMM's mainloop without its epilogue (bfloat16, tile width 256; writes nothing):
    for the benchmark probes' time breakdown only."""
    cp = cupy()
    m, d = x.shape
    n = w_gate.shape[0]
    n_tiles, slots = twell_layout(n, 256, 8)
    k = get_kernel(FAMILY, f"gate_twell_wgmma<__nv_bfloat16, 256, {cluster}, false>")
    grid = _wgmma_grid(k, WGMMA_SMEM, -(-m // BLOCK_M), -(-n // BLOCK_N), cluster)
    k((grid,), (WGMMA_THREADS,),
      (encode_tensor_map(x, BLOCK_M), encode_tensor_map(w_gate, BLOCK_N // cluster), i32(m), i32(n), i32(d),
       i32(n_tiles), i32(slots), NULL, NULL, cp.empty(1, dtype=x.dtype), NULL), shared_mem=WGMMA_SMEM)
