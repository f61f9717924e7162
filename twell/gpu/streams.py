"""Streams, CUDA-graph capture and the allocations of the FFN ops.

Every op runs on the current CuPy stream (PyTorch's current stream under :mod:`twell.torch`).  While
that stream is capturing a CUDA graph, the op's temporaries are allocated with the stream-ordered
allocator (``cudaMallocAsync`` / ``cudaFreeAsync`` on the capturing stream): captured, they become memory
nodes of the graph, allocated and freed inside each replay, so no memory the graph uses can be
handed to anything else between replays.  The output must then be preallocated (``out=``): it is what
the graph writes on every replay.
"""

from __future__ import annotations

import contextlib

__all__ = ["capturing", "capture_allocations", "CaptureError"]


class CaptureError(RuntimeError):
    """An op was called in a way that cannot be captured in a CUDA graph (the message says why and what
    to do instead)."""


class _StreamOrdered:
    """Owner of one ``cudaMallocAsync`` allocation, freed with ``cudaFreeAsync`` on the same stream when the
    last array using it goes (inside the capture, for the op's temporaries)."""

    __slots__ = ("runtime", "ptr", "stream")

    def __init__(self, runtime, size: int, stream: int):
        self.runtime, self.stream, self.ptr = runtime, stream, 0
        self.ptr = runtime.mallocAsync(size, stream)

    def __del__(self):
        if self.ptr:                                   # 0 when the allocation itself failed
            self.runtime.freeAsync(self.ptr, self.stream)


def _stream_ordered_malloc(size: int):
    import cupy as cp  # noqa: PLC0415
    if size == 0:
        return cp.cuda.MemoryPointer(cp.cuda.UnownedMemory(0, 0, None, cp.cuda.runtime.getDevice()), 0)
    owner = _StreamOrdered(cp.cuda.runtime, size, cp.cuda.get_current_stream().ptr)
    return cp.cuda.MemoryPointer(cp.cuda.UnownedMemory(owner.ptr, size, owner, cp.cuda.runtime.getDevice()), 0)


def capturing(cp) -> bool:
    """Whether the current CuPy stream is capturing a CUDA graph."""
    return cp.cuda.get_current_stream().is_capturing()


@contextlib.contextmanager
def capture_allocations(cp, active: bool):
    """Temporaries allocated inside are graph memory nodes when ``active`` (the stream is capturing)."""
    if not active:
        yield
        return
    with cp.cuda.using_allocator(_stream_ordered_malloc):
        yield


def require_out(out, op: str):
    if out is None:
        raise CaptureError(f"{op} inside a CUDA-graph capture needs out= (a preallocated output that the graph "
                           "writes on every replay)")
