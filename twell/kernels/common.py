"""Launch helpers shared by the kernel launchers (the Python side of ``cuda_src/common.cuh`` and
``ffn_common.cuh``): dtypes, the warp-per-row persistent launch, shared-memory limits, device facts.

Nothing here imports CuPy at module level.
"""

from __future__ import annotations

import threading

import numpy as np

from ..runtime.launch import aligned

#: Device dtypes of the kernel families (float64 runs on the host reference only).
DEVICE_DTYPES = ("bfloat16", "float16", "float32")
#: Longest active list of a compact row the FFN kernels hold (ffn_common.cuh MAX_LIST): the ops route
#: longer rows to the dense backup.
MAX_LIST = 512
#: Threads of the CTA-per-row FFN kernels (ffn_common.cuh FFN_THREADS).
THREADS = 128
#: Warps per CTA of the warp-per-row kernels, and the largest d / 256 they take (d <= 2048).
WARP_KERNEL_WARPS = 4
WARP_KERNEL_MAX_NC = 8

_smem_lock = threading.Lock()
_sm_counts: dict = {}


def cupy():
    import cupy as cp  # noqa: PLC0415
    return cp


def sm_count() -> int:
    """Multiprocessors of the current device (memoized per device)."""
    cp = cupy()
    dev = cp.cuda.runtime.getDevice()
    n = _sm_counts.get(dev)
    if n is None:
        n = _sm_counts[dev] = cp.cuda.Device(dev).attributes["MultiProcessorCount"]
    return n


def raise_smem_limit(kernel, nbytes: int):
    """Let ``kernel`` take ``nbytes`` of dynamic shared memory.  The limit only ever grows, under a lock:
    two threads launching one kernel with different sizes can never lower it between another thread's
    check and launch."""
    if nbytes <= 48 * 1024 or kernel.max_dynamic_shared_size_bytes >= nbytes:
        return
    with _smem_lock:
        if kernel.max_dynamic_shared_size_bytes < nbytes:
            kernel.max_dynamic_shared_size_bytes = nbytes


def vec_ok(dtype, d: int, *arrays) -> bool:
    """16-byte loads apply: d a multiple of the 16-byte chunk and every array 16-byte aligned."""
    width = 16 // np.dtype(dtype).itemsize
    return d % width == 0 and all(aligned(a, 16) for a in arrays)


def warp_path_nc(dtype, d: int, *arrays) -> int:
    """16-byte chunks per lane of the warp-per-row kernels, or 0 if they cannot take this shape (16-bit
    dtype, d = 256 * NC with NC <= 8, 16-byte aligned arrays)."""
    if np.dtype(dtype).itemsize != 2 or d % 256 or not 1 <= d // 256 <= WARP_KERNEL_MAX_NC:
        return 0
    return d // 256 if all(aligned(a, 16) for a in arrays) else 0


def blocks_per_sm(kernel, threads: int, static_smem: int) -> int:
    """CTAs of ``kernel`` one multiprocessor holds, from its registers and static shared memory."""
    regs = max(int(kernel.num_regs), 1)
    per_warp = -(-regs * 32 // 256) * 256
    warps = min(64, 65536 // per_warp)
    by_regs = warps // (threads // 32)
    by_smem = (227 * 1024) // max(static_smem + 1024, 1)
    return max(1, min(by_regs, by_smem, 2048 // threads, 32))


def launch_warp_rows(kernel, m: int, list_bytes_per_warp: int, args: tuple, work_counter=None):
    """Launch a warp-per-row kernel on a persistent grid: as many CTAs as fit on the device (from the
    kernel's registers and static shared memory), never more warps than rows.  Rows are handed out by
    ``work_counter``, a zeroed int32 device scalar (allocated if None) passed as the last argument."""
    threads = 32 * WARP_KERNEL_WARPS
    blocks = min(blocks_per_sm(kernel, threads, WARP_KERNEL_WARPS * list_bytes_per_warp) * sm_count(),
                 -(-m // WARP_KERNEL_WARPS))
    if work_counter is None:
        work_counter = cupy().zeros(1, dtype=np.int32)
    kernel((blocks,), (threads,), tuple(args) + (work_counter,))


def choose_splits(m: int, n_sms: int) -> int:
    """Work items per row of the CTA-per-row kernels: 1 for batches that fill the GPU, more for small
    batches."""
    target = 8 * n_sms
    if m >= target:
        return 1
    return int(min(32, max(1, -(-target // max(m, 1)))))
