"""Launchers of the ``ffn_forward`` kernel family (cuda_src/ffn_forward.cu).

Same op names as :mod:`twell.reference`: :func:`gated_up_down` (fused gated
up/down projection from a TwELL gate) and :func:`down_projection` (non-gated).
"""

from __future__ import annotations

import numpy as np

from .._kernels import KernelFamily, get_kernel, register_family
from ._launch import aligned, cbool, ctype_of, grid_1d, i32
from .pack import DEVICE_DTYPES

#: Longest active list of a compact row the kernel holds (cuda_src/ffn_forward.cu MAX_LIST); the FFN
#: ops route longer rows to the dense backup.
MAX_LIST = 512
THREADS = 128

_names = []
for _d in DEVICE_DTYPES:
    _t = ctype_of(_d, "dtype")
    for _v in (True, False):
        for _g in (True, False):
            _names.append(f"twell_up_down<{_t}, {cbool(_v)}, {cbool(_g)}>")
    _names.append(f"reduce_split_rows<{_t}>")
    _names.append(f"gate_mul<{_t}, true>")
    _names.append(f"gate_mul<{_t}, false>")

FAMILY = register_family(KernelFamily("ffn_forward", tuple(_names), hot_kernels=("twell_up_down<",)))


def _cp():
    import cupy  # noqa: PLC0415
    return cupy


def choose_splits(m: int, sm_count: int) -> int:
    """Work items per row: 1 for batches that fill the GPU, more for decode-sized batches."""
    target = 8 * sm_count
    if m >= target:
        return 1
    return int(min(32, max(1, -(-target // max(m, 1)))))


def _vec_ok(dtype, d, *arrays) -> bool:
    width = 16 // dtype.itemsize
    return d % width == 0 and all(aligned(a, 16) for a in arrays)


def twell_up_down(x, counts, indices, values, backup_slot, w_up, w_down, tile_width: int, y, *,
                  gated: bool = True, splits: int | None = None):
    """Launch the fused up/down kernel for the compact rows of a TwELL gate (backup rows untouched).

    x (M, d); counts (M, NT) int32; indices (M, NT, S) uint8; values (M, NT, S);
    backup_slot (M,) int32; w_up, w_down (n, d); y (M, d) written for compact rows.
    ``gated=False``: the TwELL values are h itself and w_up is unused.
    """
    cp = _cp()
    m, d = x.shape
    if m == 0:
        return y
    n_tiles, slots = counts.shape[1], indices.shape[2]
    ct = ctype_of(x.dtype, "x")
    if splits is None:
        splits = choose_splits(m, cp.cuda.Device().attributes["MultiProcessorCount"])
    vec = _vec_ok(x.dtype, d, x, w_up, w_down, y)
    k = get_kernel("ffn_forward", f"twell_up_down<{ct}, {cbool(vec)}, {cbool(gated)}>")
    smem = d * x.dtype.itemsize if gated else 0
    if smem > 48 * 1024:
        k.max_dynamic_shared_size_bytes = smem
    partial = cp.empty((m, splits, d), dtype=cp.float32) if splits > 1 else None
    k((m * splits,), (THREADS,),
      (x, counts, indices, values, backup_slot, w_up, w_down, i32(m), i32(d), i32(n_tiles), i32(slots),
       i32(tile_width), i32(splits), y, partial if partial is not None else y),
      shared_mem=smem)
    if splits > 1:
        r = get_kernel("ffn_forward", f"reduce_split_rows<{ct}>")
        r((grid_1d(m * d, 256),), (256,), (partial, backup_slot, i32(m), i32(d), i32(splits), y))
    return y


def gate_mul(g, u, *, relu: bool):
    """h = g * u (``relu``: relu(g) * u) in fp32, rounded once; NaN propagates like the dense computation."""
    cp = _cp()
    h = cp.empty_like(u)
    if h.size:
        k = get_kernel("ffn_forward", f"gate_mul<{ctype_of(u.dtype, 'u')}, {cbool(relu)}>")
        k((grid_1d(h.size, 256),), (256,), (g, u, np.int64(h.size), h))
    return h
