"""Public FFN ops.  NumPy inputs run :mod:`twell.reference`; CuPy / ``__dlpack__`` GPU inputs run the kernels.

Weight layout (all ops): ``w_gate``, ``w_up`` and ``w_down`` are **neuron-major**,
shape ``(n, d)`` row-major (n = d_ff, d = d_model).  ``w_gate`` / ``w_up`` are laid
out like ``torch.nn.Linear(d, n).weight``; ``w_down`` is the **transpose** of
``torch.nn.Linear(n, d).weight``.  When ``d == n`` the layout cannot be checked
from the shapes: passing nn.Linear's down weight untransposed then silently
computes with its transpose.
"""

from __future__ import annotations

import numpy as np

from . import _backend as B
from .format import DEFAULT_COMPRESSION, DEFAULT_TILE_WIDTH, check_dense_row_threshold, twell_layout

__all__ = [
    "gated_ffn", "ffn", "gated_up_down", "down_projection", "gated_ffn_forward", "gated_ffn_backward",
    "DEFAULT_INFERENCE_ROW_THRESHOLD",
]

#: Default ``dense_row_threshold`` of the inference ops: rows with more active neurons are cheaper on
#: the dense (cuBLAS) backup than as gathers (docs/design.md, "routing").
DEFAULT_INFERENCE_ROW_THRESHOLD = 128


_KERNEL_DTYPES = ("bfloat16", "float16", "float32")


_kernel_dtypes: frozenset = frozenset()     # np.dtype objects of _KERNEL_DTYPES (filled on first use)


def _valid_cupy_args(x, weights: dict):
    """The common GPU case in few operations (every op call pays this before its first launch): all
    CuPy arrays, C-contiguous, on x's device, a kernel dtype, consistent shapes.  Returns (cupy, n) or
    None, in which case :func:`_check_ffn_args` runs the full checks (and raises the precise error)."""
    global _kernel_dtypes
    cp = B.cupy_or_none()
    if cp is None or type(x) is not cp.ndarray or x.ndim != 2:
        return None
    m, d = x.shape
    dt = x.dtype
    if not _kernel_dtypes:
        _kernel_dtypes = frozenset(np.dtype(B.bfloat16_dtype() if name == "bfloat16" else name)
                                   for name in _KERNEL_DTYPES if name != "bfloat16" or B.bfloat16_dtype())
    if m < 1 or d < 1 or dt not in _kernel_dtypes or not x.flags.c_contiguous:
        return None
    dev = x.data.device_id
    n = None
    for w in weights.values():
        if (type(w) is not cp.ndarray or w.ndim != 2 or w.dtype != dt or w.shape[1] != d
                or (n is not None and w.shape[0] != n) or not w.flags.c_contiguous or w.data.device_id != dev):
            return None
        n = w.shape[0]
    if n is None or n < 1:
        return None
    return cp, n


def _check_ffn_args(x, weights: dict, *, gpu_contiguous=True):
    """Validate x (M, d) and neuron-major weights (n, d); return (xp, x, weights)."""
    if gpu_contiguous:
        fast = _valid_cupy_args(x, weights)
        if fast is not None:
            return fast[0], x, weights, fast[1]
    arrays = {"x": x, **weights}
    xp = B.check_same_module(arrays)
    x = B.to_module(x, xp, "x")
    weights = {k: B.to_module(v, xp, k) for k, v in weights.items()}
    B.check_array(x, "x", ndim=2)
    dt = B.check_float_dtype(x, "x")
    m, d = x.shape
    if m < 1 or d < 1:
        raise ValueError(f"x must have shape (M, d) with M >= 1 tokens and d >= 1, got {tuple(x.shape)}")
    n = None
    for name, w in weights.items():
        B.check_array(w, name, ndim=2)
        if np.dtype(w.dtype) != dt:
            raise TypeError(f"{name} must have the dtype of x ({dt.name}), got {np.dtype(w.dtype).name}")
        if w.shape[1] != d:
            hint = ""
            if w.shape[0] == d:
                hint = (" — weights are neuron-major (n, d); w_down is the transpose of nn.Linear(n, d).weight"
                        if name == "w_down" else " — weights are neuron-major (n, d) like nn.Linear(d, n).weight")
            raise ValueError(f"{name} must have shape (n, d) with d = x.shape[1] = {d}, got {tuple(w.shape)}{hint}")
        if n is None:
            n = w.shape[0]
        elif w.shape[0] != n:
            raise ValueError(f"{name} must have n = {n} rows like the other weights, got {tuple(w.shape)}")
    if n is not None and n < 1:
        raise ValueError("weights must have at least one row (d_ff >= 1)")
    if xp is not np:
        dev = x.device.id
        for name, a in arrays.items():
            a = x if name == "x" else weights[name]
            if a.device.id != dev:
                raise ValueError(f"{name} is on device {a.device.id} but x is on device {dev}")
            if gpu_contiguous and not a.flags.c_contiguous:
                raise ValueError(f"{name} must be C-contiguous (row-major) on the GPU path; pass a contiguous copy")
        from .kernels._launch import ctype_of
        ctype_of(dt, "x")
    return xp, x, weights, n


_thresholds: dict = {}


def _inference_threshold(value, n, tile_width, compression):
    key = (value, type(value), n, tile_width, type(tile_width), compression, type(compression))
    try:
        threshold = _thresholds.get(key)
    except TypeError:                        # an unhashable argument: the checks below raise the error
        threshold = None
    if threshold is None:
        threshold = check_dense_row_threshold(DEFAULT_INFERENCE_ROW_THRESHOLD if value == "auto" else value, n)
        twell_layout(n, tile_width, compression)
        if len(_thresholds) < 256:
            _thresholds[key] = threshold
    return threshold


def gated_ffn(x, w_gate, w_up, w_down, *, tile_width=DEFAULT_TILE_WIDTH, compression=DEFAULT_COMPRESSION,
              dense_row_threshold="auto", return_stats=False, check_finite=False, out=None, gate_kernel="auto"):
    """Sparse gated FFN for inference: ``y = (relu(x w_gateᵀ) ⊙ (x w_upᵀ)) w_down``.

    Parameters
    ----------
    x : array (M, d), bfloat16 / float16 / float32 (float64: host only)
        Tokens.  NumPy → reference; CuPy or ``__dlpack__`` CUDA array → kernels
        (the result is a CuPy array).
    w_gate, w_up : array (n, d)
        Gate and up weights, neuron-major (``nn.Linear(d, n).weight`` layout).
    w_down : array (n, d)
        Down weight, neuron-major: the transpose of ``nn.Linear(n, d).weight``.
    tile_width, compression : int
        TwELL layout of the gate activations (``tile_width // compression``
        slots per tile).
    dense_row_threshold : int, None or "auto"
        Rows with more active neurons take the dense (cuBLAS) backup path, as do
        rows with an overflowing tile.  "auto": a tuned default; None: only
        overflow routes.  GPU rows longer than the kernel's list (512) always do.
    return_stats : bool
        Also return :class:`~twell.FFNStats` (nnz, l0, per-neuron counts, rows
        on the dense backup and how many of them overflowed a tile).
    check_finite : bool
        Raise ``ValueError`` if a weight holds NaN/Inf (costs a read of the
        weights and a host sync).  NaN/Inf in ``x`` always propagate exactly as
        in the dense computation.
    out : array (M, d), optional
        Preallocated C-contiguous output of x's dtype and module.
    gate_kernel : {"auto", "fused", "wgmma", "mma", "cublas"}
        GPU gate GEMM.  "wgmma" (Hopper) and "mma" (compute capability ≥ 8.0)
        are the fused GEMM whose epilogue writes TwELL directly (16-bit dtypes,
        d a multiple of 8); "fused" picks the device's one where it can run;
        "cublas" runs cuBLAS then the pack kernel.  "auto" runs "wgmma" on
        Hopper where it can (faster end to end on the H200, docs/perf-notes.md)
        and "cublas" elsewhere (the portable kernel is slower than cuBLAS).
        Ignored on NumPy inputs and for M ≤ 64 (decode path).

    Returns
    -------
    y : array (M, d), dtype of x
    stats : FFNStats, if ``return_stats``

    Notes
    -----
    GPU path: gate GEMM with the ReLU → TwELL epilogue fused (or cuBLAS + the
    pack kernel) → fused up/down kernel for the compact rows, while the host
    reads the number of backup rows (one 8-byte read-back overlapped with the
    up/down kernel) → cuBLAS for the backup rows (after the fused gate their gate
    row is unpacked from the TwELL, or recomputed when a tile overflowed).
    Bitwise deterministic.
    """
    xp, x, w, n = _check_ffn_args(x, {"w_gate": w_gate, "w_up": w_up, "w_down": w_down})
    threshold = _inference_threshold(dense_row_threshold, n, tile_width, compression)
    gate_kernel = _check_gate_kernel(gate_kernel)
    _check_finite(xp, w, check_finite)
    out = _check_out(out, xp, x)
    if xp is np:
        from . import reference
        res = reference.gated_ffn(x, w["w_gate"], w["w_up"], w["w_down"], tile_width=tile_width,
                                  compression=compression, dense_row_threshold=threshold,
                                  return_stats=return_stats)
        return _into(res, out, return_stats)
    from .kernels import ops
    return ops.gated_ffn(x, w["w_gate"], w["w_up"], w["w_down"], tile_width, compression, threshold, return_stats,
                         out, gate_kernel)


def ffn(x, w_up, w_down, *, tile_width=DEFAULT_TILE_WIDTH, compression=DEFAULT_COMPRESSION,
        dense_row_threshold="auto", return_stats=False, check_finite=False, out=None, gate_kernel="auto"):
    """Sparse non-gated FFN for inference: ``y = relu(x w_upᵀ) w_down``.

    Parameters and returns as :func:`gated_ffn` (``w_up`` plays the gate's role:
    its ReLU output is packed into TwELL and only the down projection is
    sparse).
    """
    xp, x, w, n = _check_ffn_args(x, {"w_up": w_up, "w_down": w_down})
    threshold = _inference_threshold(dense_row_threshold, n, tile_width, compression)
    gate_kernel = _check_gate_kernel(gate_kernel)
    _check_finite(xp, w, check_finite)
    out = _check_out(out, xp, x)
    if xp is np:
        from . import reference
        res = reference.ffn(x, w["w_up"], w["w_down"], tile_width=tile_width, compression=compression,
                            dense_row_threshold=threshold, return_stats=return_stats)
        return _into(res, out, return_stats)
    from .kernels import ops
    return ops.ffn(x, w["w_up"], w["w_down"], tile_width, compression, threshold, return_stats, out,
                   gate_kernel)


def _check_gate_kernel(value):
    from .kernels.gate_gemm import GATE_KERNELS  # the launcher's list (importing it needs no GPU)
    if value not in GATE_KERNELS:
        raise ValueError(f"gate_kernel must be one of {GATE_KERNELS}, got {value!r}")
    return value


def _check_out(out, xp, x):
    if out is None:
        return None
    if B.array_module(out, x, names=["out", "x"]) is not xp:
        raise TypeError("out must live where x lives")
    out = B.to_module(out, xp, "out")
    B.check_array(out, "out", shape=tuple(x.shape), dtype=x.dtype, contiguous=True)
    return out


def _into(res, out, with_stats):
    if out is None:
        return res
    y = res[0] if with_stats else res
    np.copyto(out, y)
    return (out, res[1]) if with_stats else out


def _check_twell_for(tw, x_rows: int, n: int, name: str):
    from .format import TwELL
    if not isinstance(tw, TwELL):
        raise TypeError(f"{name} must be a TwELL, got {type(tw).__name__}")
    if tw.n_rows != x_rows:
        raise ValueError(f"{name} has {tw.n_rows} rows but x has {x_rows}")
    if tw.n_cols != n:
        raise ValueError(f"{name} has {tw.n_cols} columns but the weights have n = {n} rows")


def gated_up_down(x, gate, w_up, w_down, *, out=None):
    """Fused gated up/down projection from a TwELL gate: ``y = (g ⊙ (x w_upᵀ)) w_down``.

    ``u = x w_upᵀ`` is evaluated only at the entries of ``gate`` (no dense h).

    Parameters
    ----------
    x : array (M, d)
    gate : TwELL (M, n)
        The gate activations g (e.g. from :func:`twell.pack_twell` of relu(x w_gateᵀ)),
        same module and dtype as x.
    w_up, w_down : arrays (n, d), neuron-major
    out : array (M, d), optional

    Returns
    -------
    y : array (M, d)
    """
    xp, x, w, n = _check_ffn_args(x, {"w_up": w_up, "w_down": w_down})
    _check_twell_for(gate, x.shape[0], n, "gate")
    if B.array_module(gate.values, x, names=["gate", "x"]) is not xp or gate.dtype != x.dtype:
        raise TypeError("gate must hold values of x's dtype in x's array module")
    out = _check_out(out, xp, x)
    if xp is np:
        from . import reference
        return _into(reference.gated_up_down(x, gate, w["w_up"], w["w_down"]), out, False)
    from .kernels import ops
    return ops.gated_up_down(x, gate, w["w_up"], w["w_down"], out)


def down_projection(h, w_down, *, out=None):
    """Sparse down projection ``y = h w_down`` of a TwELL ``h`` (M, n) with ``w_down`` (n, d).

    Returns
    -------
    y : array (M, d), dtype of w_down
    """
    from .format import TwELL
    if not isinstance(h, TwELL):
        raise TypeError(f"h must be a TwELL, got {type(h).__name__}")
    xp = B.array_module(h.values, w_down, names=["h", "w_down"])
    w_down = B.to_module(w_down, xp, "w_down")
    B.check_array(w_down, "w_down", ndim=2)
    if w_down.shape[0] != h.n_cols:
        raise ValueError(f"w_down must have shape (n, d) with n = h.n_cols = {h.n_cols}, got {tuple(w_down.shape)}")
    if np.dtype(w_down.dtype) != np.dtype(h.dtype):
        raise TypeError(f"w_down must have the dtype of h ({np.dtype(h.dtype).name}), got {np.dtype(w_down.dtype).name}")
    if xp is not np and not w_down.flags.c_contiguous:
        raise ValueError("w_down must be C-contiguous (row-major) on the GPU path")
    if out is not None:
        out = B.to_module(out, xp, "out")
        B.check_array(out, "out", shape=(h.n_rows, w_down.shape[1]), dtype=w_down.dtype, contiguous=True)
    if xp is np:
        from . import reference
        return _into(reference.down_projection(h, w_down), out, False)
    from .kernels import ops
    return ops.down_projection(h, w_down, out)


def _check_finite(xp, weights, enabled):
    if not enabled:
        return
    for name, a in weights.items():
        if not bool(xp.isfinite(a).all()):
            raise ValueError(f"{name} contains NaN or Inf (check_finite=True)")


def gated_ffn_forward(x, w_gate, w_up, w_down, *, l1_weight=0.0, dense_row_threshold=128, gate_kernel="auto"):
    """Training forward through the hybrid format: ``(y, saved, stats)``.

    Parameters
    ----------
    x : array (M, d); w_gate, w_up, w_down : arrays (n, d), neuron-major (see module docstring)
    l1_weight : float
        λ of the L1 penalty ``λ · (1/M) Σ_t Σ_j |h_tj|`` (averaged over tokens,
        summed over neurons, as in the paper).  Its gradient ``(λ/M) sign(h)``
        is added inside :func:`gated_ffn_backward`; the forward reports the
        unweighted ``l1 = (1/M) Σ|h|`` in ``stats``.
    dense_row_threshold : int
        Rows with more active neurons are stored and differentiated densely.
    gate_kernel : {"auto", "fused", "wgmma", "mma", "cublas"}
        GPU gate GEMM, as in :func:`gated_ffn`.  With a fused kernel the gate
        pattern goes GEMM epilogue → TwELL → the hybrid's CSR (no dense gate
        activations in device memory); backup rows, and compact rows that
        overflow a TwELL tile, recompute their dense gate row with cuBLAS.
        "auto" is as in :func:`gated_ffn` (the Hopper fused kernel where it can
        run, else cuBLAS + pack; ``twell.kernels.train.TRAINING_AUTO_FUSED``:
        the fused gate saves 0.05-0.1 ms per step on the H200,
        docs/perf-notes.md v8).
        Ignored on NumPy inputs.

    Returns
    -------
    y : array (M, d), dtype of x
    saved : SavedForBackward
        Pattern + two values per non-zero (+ dense rows of backup rows); pass to
        :func:`gated_ffn_backward` once.
    stats : FFNStats
        l1, l0, nnz, per-neuron activity counts, rows on the dense backup.
    """
    xp, x, w, n = _check_ffn_args(x, {"w_gate": w_gate, "w_up": w_up, "w_down": w_down})
    threshold = check_dense_row_threshold(dense_row_threshold, n)
    l1_weight = _check_l1(l1_weight)
    gate_kernel = _check_gate_kernel(gate_kernel)
    if xp is np:
        from . import reference
        return reference.gated_ffn_forward(x, w["w_gate"], w["w_up"], w["w_down"], l1_weight=l1_weight,
                                           dense_row_threshold=threshold)
    from .kernels import ops
    return ops.gated_ffn_forward(x, w["w_gate"], w["w_up"], w["w_down"], l1_weight, threshold, gate_kernel)


def _check_l1(l1_weight) -> float:
    if isinstance(l1_weight, bool) or not isinstance(l1_weight, (int, float, np.floating, np.integer)):
        raise TypeError(f"l1_weight must be a real number, got {type(l1_weight).__name__}")
    v = float(l1_weight)
    if not np.isfinite(v) or v < 0:
        raise ValueError(f"l1_weight must be finite and >= 0, got {v}")
    return v


def gated_ffn_backward(saved, dy):
    """Backward of :func:`gated_ffn_forward`: ``(dx, dw_gate, dw_up, dw_down)``.

    Parameters
    ----------
    saved : SavedForBackward
        From the forward; consumed (a second backward raises ``ValueError``).
    dy : array (M, d), dtype of x, same device as the forward

    Returns
    -------
    dx : array (M, d), dtype of x
    dw_gate, dw_up, dw_down : arrays (n, d), dtype of the weights (fp32 accumulation)

    The L1 term's gradient ``(λ/M) sign(h)`` is included.
    """
    from .results import SavedForBackward
    if not isinstance(saved, SavedForBackward):
        raise TypeError(f"saved must be the SavedForBackward returned by gated_ffn_forward, got {type(saved).__name__}")
    if saved.consumed:
        raise ValueError("saved state already consumed by a backward; run gated_ffn_forward again")
    xp = B.array_module(saved.x, dy, names=["saved.x", "dy"])
    if xp is np:
        from . import reference
        return reference.gated_ffn_backward(saved, dy)
    from .kernels import ops
    return ops.gated_ffn_backward(saved, B.to_module(dy, xp, "dy"))

