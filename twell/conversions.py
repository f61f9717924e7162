"""Building, unpacking and converting the sparse containers (:class:`~twell.TwELL`, :class:`~twell.Hybrid`):
NumPy inputs run :mod:`twell.reference`, CuPy (or ``__dlpack__`` GPU) inputs the CUDA kernels of
:mod:`twell.kernels.pack`.

A container that comes from a user is checked before any kernel reads it: host containers by the
reference (every use re-checks the invariants, so an array changed after construction is caught), device
containers by a validation kernel that reports the first row breaking a rule (docs/format.md,
"invariants") with one 8-byte read-back.  No kernel can read or write outside a container's arrays.
"""

from __future__ import annotations

import numpy as np

from . import _backend as B
from . import reference
from .format import (DEFAULT_COMPRESSION, DEFAULT_TILE_WIDTH, Hybrid, NeuronMajorPattern, TwELL,
                     check_dense_row_threshold, twell_layout)

__all__ = ["pack_twell", "unpack_twell", "twell_to_scipy", "twell_from_scipy", "pack_hybrid", "unpack_hybrid",
           "hybrid_to_scipy", "hybrid_from_scipy", "transpose_pattern", "checked_device_twell",
           "checked_device_hybrid"]


def _gpu_pack():
    from .kernels import pack  # noqa: PLC0415 - CuPy is imported only by GPU calls
    return pack


def _not_capturing(what: str):
    from .gpu.streams import CaptureError, capturing  # noqa: PLC0415
    if capturing(B.cupy_or_none()):
        raise CaptureError(f"{what} checks a user's container with a host read-back and cannot be captured in a "
                           "CUDA graph; call it outside the capture")


def checked_device_twell(tw: TwELL, name: str):
    """A device TwELL on the current device, its invariants checked on the GPU (raises ValueError)."""
    _not_capturing(f"an op on the TwELL {name!r}")
    B.check_on_current_device({name: tw.counts})
    _gpu_pack().validate_twell(tw, name)
    return tw


def checked_device_hybrid(hy: Hybrid, name: str):
    """A device Hybrid on the current device, its invariants checked on the GPU (raises ValueError)."""
    _not_capturing(f"an op on the Hybrid {name!r}")
    B.check_on_current_device({name: hy.row_ptr})
    _gpu_pack().validate_hybrid(hy, name)
    return hy


def _dense_arg(dense, name="dense"):
    xp = B.array_module(dense, names=[name])
    dense = B.to_module(dense, xp, name)
    B.check_array(dense, name, ndim=2)
    B.check_float_dtype(dense, name)
    if dense.shape[1] < 1:
        raise ValueError(f"{name} must have at least one column, got shape {tuple(dense.shape)}")
    return xp, dense


def pack_twell(dense, tile_width: int = DEFAULT_TILE_WIDTH, compression: int = DEFAULT_COMPRESSION,
               dense_row_threshold: int | None = None) -> TwELL:
    """Pack a dense matrix into TwELL (every non-zero kept; overflow -> dense backup).

    Parameters
    ----------
    dense : array (M, n), bfloat16 / float16 / float32 / float64
        NumPy (packed by the reference) or CuPy / ``__dlpack__`` GPU array
        (packed by the CUDA kernel; one host synchronisation to size the backup).
    tile_width : int
        Columns per tile: 32, 64, 128 or 256.
    compression : int
        Slots per tile are ``tile_width // compression``.
    dense_row_threshold : int or None
        Rows with more non-zeros than this go to the dense backup even if no
        tile overflows.  None: only tile overflow routes a row.

    Returns
    -------
    TwELL
    """
    xp, dense = _dense_arg(dense)
    twell_layout(dense.shape[1], tile_width, compression)
    threshold = check_dense_row_threshold(dense_row_threshold, dense.shape[1])
    if xp is np:
        return reference.pack_twell(dense, tile_width, compression, threshold)
    B.check_on_current_device({"dense": dense})
    return _gpu_pack().pack_twell(dense, tile_width, compression, threshold)


def unpack_twell(tw: TwELL):
    """Unpack a :class:`TwELL` to a dense matrix.

    Parameters
    ----------
    tw : TwELL (M, n)
        Host (NumPy) or device (CuPy) container.

    Returns
    -------
    dense : array (M, n), ``tw.dtype``, same array module as ``tw``
        Compact rows from the slots, backup rows from ``backup_values``.
    """
    if not isinstance(tw, TwELL):
        raise TypeError(f"tw must be a TwELL, got {type(tw).__name__}")
    if tw.xp is np:
        return reference.unpack_twell(tw)
    return _gpu_pack().unpack_twell(checked_device_twell(tw, "tw"))


def twell_to_scipy(tw: TwELL):
    """Convert a :class:`TwELL` to SciPy.

    Parameters
    ----------
    tw : TwELL (M, n)
        Host or device container (device arrays are copied to the host).

    Returns
    -------
    scipy.sparse.csr_array (M, n)
        Exactly the non-zeros of ``tw``, sorted indices; bfloat16 / float16
        values become float32 (SciPy has neither).
    """
    if not isinstance(tw, TwELL):
        raise TypeError(f"tw must be a TwELL, got {type(tw).__name__}")
    return reference.twell_to_scipy(tw.host())


def twell_from_scipy(matrix, tile_width: int = DEFAULT_TILE_WIDTH, compression: int = DEFAULT_COMPRESSION,
                     dense_row_threshold: int | None = None, dtype=None) -> TwELL:
    """Build a host :class:`TwELL` from any ``scipy.sparse`` matrix or array.

    Parameters
    ----------
    matrix : scipy.sparse matrix or array (M, n)
        Explicit zeros are dropped; duplicates are summed.
    tile_width, compression, dense_row_threshold
        As in :func:`pack_twell`.
    dtype : dtype, optional
        Value dtype (default: the matrix's).

    Returns
    -------
    TwELL (M, n) with NumPy arrays.
    """
    return reference.twell_from_scipy(matrix, tile_width, compression, dense_row_threshold, dtype)


def pack_hybrid(dense, dense_row_threshold: int = 128, transpose: bool = True) -> Hybrid:
    """Pack a dense matrix into the Hybrid training format (every non-zero kept).

    Parameters
    ----------
    dense : array (M, n), bfloat16 / float16 / float32 / float64
        NumPy (reference) or CuPy / ``__dlpack__`` GPU array (kernels; one
        host synchronisation to size the arrays). A non-zero is ``v != 0``.
    dense_row_threshold : int
        Rows with more non-zeros than this go to the dense backup.
    transpose : bool
        Also build the neuron-major pattern (``Hybrid.transposed``).

    Returns
    -------
    Hybrid (M, n), arrays of the input's module, values of its dtype.
    """
    xp, dense = _dense_arg(dense)
    threshold = check_dense_row_threshold(dense_row_threshold, dense.shape[1])
    if not isinstance(transpose, (bool, np.bool_)):
        raise TypeError(f"transpose must be a bool, got {type(transpose).__name__}")
    if xp is np:
        return reference.pack_hybrid(dense, threshold, transpose)
    B.check_on_current_device({"dense": dense})
    return _gpu_pack().pack_hybrid(dense, threshold, bool(transpose))


def unpack_hybrid(hy: Hybrid):
    """Unpack a :class:`Hybrid` to a dense matrix.

    Parameters
    ----------
    hy : Hybrid (M, n)

    Returns
    -------
    dense : array (M, n), ``hy.dtype``, same array module as ``hy``
    """
    if not isinstance(hy, Hybrid):
        raise TypeError(f"hy must be a Hybrid, got {type(hy).__name__}")
    if hy.xp is np:
        return reference.unpack_hybrid(hy)
    return _gpu_pack().unpack_hybrid(checked_device_hybrid(hy, "hy"))


def hybrid_to_scipy(hy: Hybrid):
    """Convert a :class:`Hybrid` to SciPy.

    Parameters
    ----------
    hy : Hybrid (M, n)
        Host or device container (device arrays are copied to the host).

    Returns
    -------
    scipy.sparse.csr_array (M, n)
        Exactly the non-zeros of ``hy`` (bfloat16 / float16 values become float32).
    """
    if not isinstance(hy, Hybrid):
        raise TypeError(f"hy must be a Hybrid, got {type(hy).__name__}")
    return reference.hybrid_to_scipy(hy.host())


def hybrid_from_scipy(matrix, dense_row_threshold: int = 128, transpose: bool = True, dtype=None) -> Hybrid:
    """Build a host :class:`Hybrid` from any ``scipy.sparse`` matrix or array.

    Parameters
    ----------
    matrix : scipy.sparse matrix or array (M, n)
        Explicit zeros are dropped; duplicates are summed.
    dense_row_threshold : int
        Rows with more non-zeros than this become dense backup rows.
    transpose : bool
        Also build the neuron-major pattern.
    dtype : dtype, optional
        Value dtype (default: the matrix's).

    Returns
    -------
    Hybrid (M, n) with NumPy arrays.
    """
    return reference.hybrid_from_scipy(matrix, dense_row_threshold, transpose, dtype)


def transpose_pattern(hy: Hybrid) -> NeuronMajorPattern:
    """Neuron-major (column-major) pattern of the compact part of a :class:`Hybrid`.

    Parameters
    ----------
    hy : Hybrid (M, n)

    Returns
    -------
    NeuronMajorPattern
        ``col_ptr`` int32 (n + 1,), ``row_indices`` int32 (nnz,) ascending within
        each column, ``positions`` int32 (nnz,) into the row-major arrays.
        Deterministic (no order-dependent atomics) on both backends.
    """
    if not isinstance(hy, Hybrid):
        raise TypeError(f"hy must be a Hybrid, got {type(hy).__name__}")
    if hy.xp is np:
        return reference.transpose_pattern(hy)
    return _gpu_pack().transpose_pattern(checked_device_hybrid(hy, "hy"))
