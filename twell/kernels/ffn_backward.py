"""Launchers of the ``ffn_backward`` kernel family (cuda_src/ffn_backward.cu): training backward.

* :func:`csr_backward` -- token-major: dh on the pattern (+ L1 term), du / dz per entry, dx rows.
* :func:`weight_grads` -- neuron-major dw_gate, dw_up, dw_down from the transposed pattern.
* :func:`backup_row_grads` -- du, dz, h of the dense backup rows (elementwise, for cuBLAS).
"""

from __future__ import annotations

import numpy as np

from .._kernels import KernelFamily, get_kernel, register_family
from ._launch import cbool, ctype_of, grid_1d, i32
from .ffn_forward import (MAX_LIST, THREADS, WARP_KERNEL_MAX_NC, _raise_smem_limit, _vec_ok, launch_warp_rows,
                          warp_path_nc)
from .pack import DEVICE_DTYPES

#: Entries of one neuron handled by one CTA of the weight-gradient kernel (cuda_src WG_CHUNK).
WG_CHUNK = 128
WG_THREADS = 256

_names = []
for _d in DEVICE_DTYPES:
    _t = ctype_of(_d, "dtype")
    for _v in (True, False):
        _names.append(f"csr_backward<{_t}, {cbool(_v)}>")
        _names.append(f"weight_grads<{_t}, {cbool(_v)}>")
    if _d != "float32":
        for _nc in range(1, WARP_KERNEL_MAX_NC + 1):
            _names.append(f"csr_backward_warp<{_t}, {_nc}>")
    _names.append(f"reduce_weight_partials<{_t}>")
    _names.append(f"backup_row_grads<{_t}>")

FAMILY = register_family(KernelFamily(
    "ffn_backward", tuple(_names),
    hot_kernels=(r"csr_backward_warp<", r"(csr_backward|weight_grads)<[^,]+, true")))


def _cp():
    import cupy  # noqa: PLC0415
    return cupy


def csr_backward(dy, row_ptr, col_indices, g_values, u_values, backup_slot, w_gate, w_up, w_down,
                 l1_scale: float, dx, du, dz, *, work_counter=None):
    """Token-major backward of the compact rows: du, dz (fp32, per entry) and dx rows (backup rows untouched)."""
    m, d = dy.shape
    if m == 0:
        return
    ct = ctype_of(dy.dtype, "dy")
    nc = warp_path_nc(dy.dtype, d, dy, w_gate, w_up, w_down, dx)
    if nc:
        k = get_kernel("ffn_backward", f"csr_backward_warp<{ct}, {nc}>")
        launch_warp_rows(k, m, MAX_LIST * 12, (dy, row_ptr, col_indices, g_values, u_values, backup_slot, w_gate,
                                               w_up, w_down, i32(m), np.float32(l1_scale), dx, du, dz), work_counter)
        return
    vec = _vec_ok(dy.dtype, d, dy, w_gate, w_up, w_down, dx)
    k = get_kernel("ffn_backward", f"csr_backward<{ct}, {cbool(vec)}>")
    smem = d * dy.dtype.itemsize
    _raise_smem_limit(k, smem)
    k((m,), (THREADS,), (dy, row_ptr, col_indices, g_values, u_values, backup_slot, w_gate, w_up, w_down, i32(m),
                         i32(d), np.float32(l1_scale), dx, du, dz), shared_mem=smem)


def workspace_bounds(neuron_counts):
    """Device int32 (2,): upper bounds on weight-gradient work items and on fp32 partial slots.

    ``neuron_counts`` counts every row (backup rows too), so it bounds the
    compact counts the backward sees; both bounds are monotone in the counts.
    """
    cp = _cp()
    chunks = (neuron_counts + (WG_CHUNK - 1)) // WG_CHUNK
    items = cp.maximum(chunks, 1).sum(dtype=cp.int32)
    partials = cp.where(neuron_counts > WG_CHUNK, chunks, 0).sum(dtype=cp.int32)
    return cp.stack([items, partials]).astype(cp.int32)


def weight_grads(x, dy, pattern, g_values, u_values, du, dz, dw_gate, dw_up, dw_down, *, has_backup: bool,
                 item_bound: int, partial_bound: int):
    """Neuron-major weight gradients of the compact entries, added to the backup part already in dw_*.

    ``pattern`` is the NeuronMajorPattern of the compact part.  Every row of
    dw_* is written (neurons without entries get the backup part, or 0).
    """
    cp = _cp()
    m, d = x.shape
    n = dw_up.shape[0]
    ct = ctype_of(x.dtype, "x")
    col_ptr = pattern.col_ptr
    items = cp.maximum((cp.diff(col_ptr) + (WG_CHUNK - 1)) // WG_CHUNK, 1).astype(cp.int32)
    item_ptr = cp.zeros(n + 1, dtype=cp.int32)
    cp.cumsum(items, dtype=cp.int32, out=item_ptr[1:])
    partial_ptr = cp.zeros(n + 1, dtype=cp.int32)
    cp.cumsum(cp.where(items > 1, items, 0), dtype=cp.int32, out=partial_ptr[1:])
    partial = cp.empty((max(partial_bound, 1), 3, d), dtype=cp.float32)
    vec = _vec_ok(x.dtype, d, x, dy, dw_gate, dw_up, dw_down)
    k = get_kernel("ffn_backward", f"weight_grads<{ct}, {cbool(vec)}>")
    k((max(item_bound, 1),), (WG_THREADS,),
      (x, dy, col_ptr, pattern.row_indices, pattern.positions, g_values, u_values, du, dz, item_ptr, partial_ptr,
       i32(n), i32(d), i32(has_backup), dw_gate, dw_up, dw_down, partial))
    if partial_bound:
        r = get_kernel("ffn_backward", f"reduce_weight_partials<{ct}>")
        r((-(-d // 256), min(n, 65535)), (256,),
          (item_ptr, partial_ptr, partial, i32(n), i32(d), i32(has_backup), dw_gate, dw_up, dw_down))


def backup_row_grads(dh, g, u, l1_scale: float):
    """du, dz (relu mask) and h = g*u of the backup rows, each rounded once to the dtype of ``dh``."""
    cp = _cp()
    du, dz, h = cp.empty_like(dh), cp.empty_like(dh), cp.empty_like(dh)
    if dh.size:
        k = get_kernel("ffn_backward", f"backup_row_grads<{ctype_of(dh.dtype, 'dh')}>")
        k((grid_1d(dh.size, 256),), (256,), (dh, g, u, np.int64(dh.size), np.float32(l1_scale), du, dz, h))
    return du, dz, h
