"""Small helpers shared by the implementations and the runners: arrays to the host, the optional
PyTorch-with-CUDA module, availability reasons, freeing device memory, error strings."""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import sys

import numpy as np

from twell import _backend as B

__all__ = ["err_str", "as_y", "to_host", "host_f32", "host_scalar", "torch_cuda", "gpu_unavailable",
           "torch_unavailable", "free_gpu_memory"]


def err_str(exc: BaseException) -> str:
    """``"Type: first line of the message"`` (at most 300 characters), as the results record errors."""
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300]


def as_y(result):
    """``y`` from an implementation's return value (``y``, ``(y, ...)``, or an object with ``.y``)."""
    if isinstance(result, (tuple, list)):
        return result[0]
    if hasattr(result, "y") and not hasattr(result, "shape"):
        return result.y
    return result


def to_host(a) -> np.ndarray:
    """A NumPy array of ``a`` (NumPy, CuPy, or a device tensor through DLPack)."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "get"):
        return a.get()
    import cupy as cp  # noqa: PLC0415 - foreign (torch) device tensors through DLPack
    return cp.from_dlpack(a).get()


def host_f32(problem) -> tuple:
    """``(x, w_gate, w_up, w_down)`` of ``problem`` as contiguous float32 host arrays (cached on it)."""
    cache = getattr(problem, "_bench_f32", None)
    if cache is None:
        cache = tuple(np.ascontiguousarray(to_host(a).astype(np.float32)) for a in problem.arrays())
        problem._bench_f32 = cache  # noqa: SLF001
    return cache


def host_scalar(v):
    """A Python scalar of a 0-d NumPy / CuPy array (or of a scalar)."""
    return np.asarray(v.get() if hasattr(v, "get") and not isinstance(v, np.ndarray) else v).item()


def torch_cuda():
    """The ``torch`` module if it imports and has CUDA, else None."""
    try:
        import torch  # noqa: PLC0415
    except Exception:
        return None
    try:
        return torch if torch.cuda.is_available() else None
    except Exception:  # pragma: no cover
        return None


def gpu_unavailable() -> str | None:
    """None, or why the CuPy implementations cannot run."""
    return None if B.cupy_or_none() is not None else "no CUDA device (CuPy) available"


def torch_unavailable() -> str | None:
    """None, or why the PyTorch implementations cannot run."""
    if B.cupy_or_none() is None:
        return "no CUDA device (CuPy) available"
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    if torch_cuda() is None:
        return "torch has no CUDA device"
    return None


def free_gpu_memory() -> None:
    """Collect garbage and return cached device memory (CuPy's pool, PyTorch's cache if loaded)."""
    gc.collect()
    cp = B.cupy_or_none()
    if cp is None:
        return
    with contextlib.suppress(Exception):
        cp.cuda.get_current_stream().synchronize()
        cp.get_default_memory_pool().free_all_blocks()
    torch = sys.modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
