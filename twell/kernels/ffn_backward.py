"""Launchers of the ``ffn_backward`` kernel family (cuda_src/ffn_backward.cu): training backward.

* :func:`weight_grads` -- neuron-major: dh on the pattern (+ L1 term) and du / dz per entry, then
  dw_down, dw_up, dw_gate, from the transposed pattern (two passes: one gathers dy rows, one x rows).
* :func:`csr_dx` -- token-major dx rows from du / dz (gathers w_up and w_gate rows).
* :func:`backup_row_grads` -- du, dz, h of the dense backup rows (elementwise, for cuBLAS).
"""

from __future__ import annotations

import numpy as np

from ..runtime.launch import aligned, cbool, ctype_of, grid_1d, i32
from ..runtime.loader import KernelFamily, get_kernel
from .common import DEVICE_DTYPES, MAX_LIST, THREADS, WARP_KERNEL_MAX_NC, cupy, launch_warp_rows, vec_ok, warp_path_nc

#: Entries of one neuron handled by one CTA of the weight-gradient kernel (cuda_src WG_CHUNK).
WG_CHUNK = 128
WG_THREADS = 256

_names = []
for _d in DEVICE_DTYPES:
    _t = ctype_of(_d, "dtype")
    for _v in (True, False):
        _names.append(f"csr_dx<{_t}, {cbool(_v)}>")
        _names.append(f"dh_dw_down<{_t}, {cbool(_v)}>")
        _names.append(f"dw_up_gate<{_t}, {cbool(_v)}>")
    if _d != "float32":
        for _nc in range(1, WARP_KERNEL_MAX_NC + 1):
            _names.append(f"csr_dx_warp<{_t}, {_nc}>")
    _names.append(f"reduce_weight_partials<{_t}>")
    for _v in (True, False):
        _names.append(f"backup_row_grads<{_t}, {cbool(_v)}>")
_names += ["weight_grad_bounds", "weight_grad_items"]

FAMILY = KernelFamily("ffn_backward", tuple(_names),
                      hot_kernels=(r"csr_dx_warp<", r"(csr_dx|dh_dw_down|dw_up_gate)<[^,]+, true"))


def csr_dx(row_ptr, col_indices, du, dz, backup_slot, w_gate, w_up, dx, *, work_counter=None):
    """Token-major dx rows of the compact rows from du, dz (fp32 per entry); backup rows untouched."""
    m, d = dx.shape
    if m == 0:
        return
    ct = ctype_of(dx.dtype, "dx")
    nc = warp_path_nc(dx.dtype, d, w_gate, w_up, dx)
    if nc:
        k = get_kernel(FAMILY, f"csr_dx_warp<{ct}, {nc}>")
        launch_warp_rows(k, m, MAX_LIST * 12, (row_ptr, col_indices, du, dz, backup_slot, w_gate, w_up, i32(m), dx),
                         work_counter)
        return
    vec = vec_ok(dx.dtype, d, w_gate, w_up, dx)
    k = get_kernel(FAMILY, f"csr_dx<{ct}, {cbool(vec)}>")
    k((m,), (THREADS,), (row_ptr, col_indices, du, dz, backup_slot, w_gate, w_up, i32(m), i32(d), dx))


#: Threads of the one-CTA planning kernels (cuda_src PLAN_THREADS).
PLAN_THREADS = 1024


def workspace_bounds(neuron_counts, out=None):
    """Device int32 (2,): upper bounds on weight-gradient work items and on fp32 partial slots.

    ``neuron_counts`` counts every row (backup rows too), so it bounds the
    compact counts the backward sees; both bounds are monotone in the counts.
    Written into ``out`` (int32 (2,), e.g. part of a read-back buffer) when given.
    """
    cp = cupy()
    if out is None:
        out = cp.empty(2, dtype=cp.int32)
    get_kernel(FAMILY, "weight_grad_bounds")((1,), (PLAN_THREADS,),
                                                     (neuron_counts, i32(neuron_counts.shape[0]), out))
    return out


def weight_grads(x, dy, pattern, g_values, u_values, w_down, l1_scale: float, du, dz, dw_gate, dw_up, dw_down, *,
                 item_bound: int, partial_bound: int):
    """Neuron-major backward of the compact entries: du, dz per entry and the three weight gradients.

    First pass (``dh_dw_down``, gathers dy rows): dh_e = dy[t] . w_down[j] +
    l1_scale * sign(h_e), du_e = dh_e g_e and dz_e = dh_e u_e (fp32, stored at
    the entry's row-major position in ``du`` / ``dz``), dw_down[j].  Second
    pass (``dw_up_gate``, gathers x rows): dw_up[j], dw_gate[j].  ``pattern``
    is the NeuronMajorPattern of the compact part.  Every row of dw_* is
    written (neurons without entries get 0); the caller adds the dense-backup
    rows' part afterwards.
    """
    cp = cupy()
    m, d = x.shape
    n = dw_up.shape[0]
    ct = ctype_of(x.dtype, "x")
    col_ptr = pattern.col_ptr
    item_ptr = cp.empty(n + 1, dtype=cp.int32)
    partial_ptr = cp.empty(n + 1, dtype=cp.int32)
    get_kernel(FAMILY, "weight_grad_items")((1,), (PLAN_THREADS,), (col_ptr, i32(n), item_ptr, partial_ptr))
    partial = cp.empty((max(partial_bound, 1), 3, d), dtype=cp.float32)
    grid = (max(item_bound, 1),)
    vec = vec_ok(x.dtype, d, dy, w_down, dw_down)
    k = get_kernel(FAMILY, f"dh_dw_down<{ct}, {cbool(vec)}>")
    k(grid, (WG_THREADS,),
      (dy, col_ptr, pattern.row_indices, pattern.positions, g_values, u_values, w_down, item_ptr, partial_ptr,
       i32(n), i32(d), np.float32(l1_scale), du, dz, dw_down, partial))
    vec = vec_ok(x.dtype, d, x, dw_gate, dw_up)
    k = get_kernel(FAMILY, f"dw_up_gate<{ct}, {cbool(vec)}>")
    k(grid, (WG_THREADS,),
      (x, col_ptr, pattern.row_indices, pattern.positions, du, dz, item_ptr, partial_ptr, i32(n), i32(d),
       dw_gate, dw_up, partial))
    if partial_bound:
        r = get_kernel(FAMILY, f"reduce_weight_partials<{ct}>")
        r((-(-d // 256), min(n, 65535)), (256,),
          (item_ptr, partial_ptr, partial, i32(n), i32(d), dw_gate, dw_up, dw_down))


def backup_row_grads(dh, g, u, l1_scale: float):
    """du, dz (relu mask) and h = g*u of the backup rows, each rounded once to the dtype of ``dh``."""
    cp = cupy()
    du, dz, h = cp.empty_like(dh), cp.empty_like(dh), cp.empty_like(dh)
    if dh.size:
        vec = dh.size % 8 == 0 and all(aligned(a, 16) for a in (dh, g, u, du, dz, h))
        k = get_kernel(FAMILY, f"backup_row_grads<{ctype_of(dh.dtype, 'dh')}, {cbool(vec)}>")
        k((grid_1d(-(-dh.size // 8), 256),), (256,), (dh, g, u, np.int64(dh.size), np.float32(l1_scale), du, dz, h))
    return du, dz, h
