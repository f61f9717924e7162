"""Public FFN ops: argument checks, then dispatch — NumPy inputs to :mod:`twell.reference`, CuPy /
``__dlpack__`` GPU inputs to :mod:`twell.gpu`.

Weight layout (all ops): ``w_gate``, ``w_up`` and ``w_down`` are **neuron-major**, shape ``(n, d)``
row-major (n = d_ff, d = d_model).  ``w_gate`` / ``w_up`` are laid out like ``torch.nn.Linear(d, n).weight``;
``w_down`` is the **transpose** of ``torch.nn.Linear(n, d).weight``.  When ``d == n`` the layout cannot be
checked from the shapes: passing nn.Linear's down weight untransposed then silently computes with its
transpose.

Every argument is checked before any work, and an error names the argument and the rule.  GPU arrays must
be C-contiguous and on the current device; a view whose data is not 16-byte aligned is copied to an
aligned buffer first (the kernels' vector loads need it), so every view gets the aligned call's result.
"""

from __future__ import annotations

import numpy as np

from . import _backend as B
from . import reference
from .conversions import checked_device_twell
from .dispatch import DensityTracker, check_path
from .format import DEFAULT_COMPRESSION, DEFAULT_TILE_WIDTH, TwELL, check_dense_row_threshold, twell_layout
from .results import SavedForBackward

__all__ = [
    "gated_ffn", "ffn", "gated_up_down", "down_projection", "gated_ffn_forward", "gated_ffn_backward",
    "DEFAULT_INFERENCE_ROW_THRESHOLD", "GATE_KERNELS",
]

#: Default ``dense_row_threshold`` of the inference ops: rows with more active neurons are cheaper on
#: the dense (cuBLAS) backup than as gathers (docs/design.md, "routing").
DEFAULT_INFERENCE_ROW_THRESHOLD = 128
#: Values of ``gate_kernel``.
GATE_KERNELS = ("auto", "fused", "wgmma", "mma", "cublas")
_KERNEL_DTYPES = ("bfloat16", "float16", "float32")

_kernel_dtypes: frozenset = frozenset()     # np.dtype objects of _KERNEL_DTYPES (filled on first use)


def _gpu():
    from .gpu import inference, training  # noqa: PLC0415 - CuPy is imported only by GPU calls
    return inference, training


# --------------------------------------------------------------------------- argument checks


def fast_cupy_args(x, weights: dict):
    """The common GPU case in few operations (every call pays this before its first launch; the framework
    adapters call it with :func:`inference_threshold` and :func:`check_gate_kernel` before
    :func:`twell.gpu.inference.forward` to skip the rest of the checks): CuPy arrays,
    C-contiguous, 16-byte aligned, on the current device, a kernel dtype, consistent shapes.  Returns
    (cupy, n), or None and :func:`_check_ffn_args` runs the full checks (and raises the precise error, or
    copies misaligned views)."""
    global _kernel_dtypes
    cp = B.cupy_or_none()
    if cp is None or type(x) is not cp.ndarray or x.ndim != 2:
        return None
    m, d = x.shape
    dt = x.dtype
    if not _kernel_dtypes:
        _kernel_dtypes = frozenset(np.dtype(B.bfloat16_dtype() if name == "bfloat16" else name)
                                   for name in _KERNEL_DTYPES if name != "bfloat16" or B.bfloat16_dtype())
    if m < 1 or d < 1 or dt not in _kernel_dtypes or not x.flags.c_contiguous or x.data.ptr % 16:
        return None
    dev = x.data.device_id
    if dev != cp.cuda.runtime.getDevice():
        return None
    n = None
    for w in weights.values():
        if (type(w) is not cp.ndarray or w.ndim != 2 or w.dtype != dt or w.shape[1] != d
                or (n is not None and w.shape[0] != n) or not w.flags.c_contiguous or w.data.ptr % 16
                or w.data.device_id != dev):
            return None
        n = w.shape[0]
    if n is None or n < 1:
        return None
    return cp, n


def _check_ffn_args(x, weights: dict):
    """Validate x (M, d) and neuron-major weights (n, d); return (xp, x, weights, n)."""
    fast = fast_cupy_args(x, weights)
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
        from .runtime.launch import ctype_of  # noqa: PLC0415
        ctype_of(dt, "x")
        all_arrays = {"x": x, **weights}
        B.check_on_current_device(all_arrays)
        for name, a in all_arrays.items():
            if not a.flags.c_contiguous:
                raise ValueError(f"{name} must be C-contiguous (row-major) on the GPU path; pass a contiguous copy")
        x = _aligned(x)
        weights = {k: _aligned(v) for k, v in weights.items()}
    return xp, x, weights, n


def _aligned(a):
    """``a`` itself if its data is 16-byte aligned, else an aligned copy (CuPy allocations are 256-byte
    aligned): the kernels' 16-byte loads and the tensor maps need aligned rows."""
    return a if a.data.ptr % 16 == 0 else a.copy()


def _fast_out(out, x, inputs) -> bool:
    """The common GPU case of :func:`_check_out` in few operations, after :func:`fast_cupy_args` passed (so
    x and the inputs are C-contiguous CuPy arrays): out a C-contiguous CuPy array of x's shape, dtype and
    device whose bytes do not meet any input's.  False: the full check decides (and raises the precise
    error)."""
    if (type(out) is not type(x) or out.dtype != x.dtype or out.shape != x.shape or not out.flags.c_contiguous
            or out.data.device_id != x.data.device_id):
        return False
    lo = out.data.ptr
    hi = lo + out.nbytes
    for _, a in inputs:
        p = a.data.ptr
        if p < hi and lo < p + a.nbytes:
            return False
    return True


def _check_out(out, xp, x, shape=None, inputs=(), fast=False):
    """Validate ``out`` before any work: an array of x's module, dtype and shape, C-contiguous, writable, on
    x's device, not overlapping an input.  ``fast``: the operands passed :func:`fast_cupy_args`."""
    if out is None:
        return None
    if fast and shape is None and _fast_out(out, x, inputs):
        return out
    shape = tuple(x.shape) if shape is None else shape
    if not hasattr(out, "shape") or not hasattr(out, "dtype"):
        raise TypeError(f"out must be an array of shape {shape}, got {type(out).__name__}")
    if B.array_module(out, x, names=["out", "x"]) is not xp:
        raise TypeError("out must live where x lives")
    out = B.to_module(out, xp, "out")
    B.check_array(out, "out", shape=shape, dtype=x.dtype, contiguous=True)
    if xp is np:
        if not out.flags.writeable:
            raise ValueError("out is read-only")
        for name, a in inputs:
            if np.may_share_memory(out, a):
                raise ValueError(f"out must not overlap {name}")
    else:
        if out.device.id != x.device.id:
            raise ValueError(f"out is on device {out.device.id} but x is on device {x.device.id}")
        for name, a in inputs:
            if B.device_ranges_overlap(out, a):
                raise ValueError(f"out must not overlap {name}")
    return out


def _into(res, out, with_stats):
    if out is None:
        return res
    y = res[0] if with_stats else res
    np.copyto(out, y)
    return (out, res[1]) if with_stats else out


def check_gate_kernel(value):
    if not isinstance(value, str) or value not in GATE_KERNELS:
        raise ValueError(f"gate_kernel must be one of {GATE_KERNELS}, got {value!r}")
    return value


def _check_tracker(tracker):
    if tracker is not None and not isinstance(tracker, DensityTracker):
        raise TypeError(f"tracker must be a twell.DensityTracker or None, got {type(tracker).__name__}")
    return tracker


_thresholds: dict = {}      # memo of the inference threshold checks: (value, n, layout) -> threshold


def inference_threshold(value, n, tile_width, compression):
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"dense_row_threshold must be 'auto', None or an integer >= 0, got {value!r}")
        value = DEFAULT_INFERENCE_ROW_THRESHOLD
    key = (value, type(value), n, tile_width, type(tile_width), compression, type(compression))
    try:
        threshold = _thresholds.get(key)
    except TypeError:                        # an unhashable argument: the checks below raise the error
        threshold = None
    if threshold is None:
        threshold = check_dense_row_threshold(value, n)
        twell_layout(n, tile_width, compression)
        if len(_thresholds) < 256:
            _thresholds[key] = threshold
    return threshold


def _check_finite(xp, weights, enabled):
    if not B.check_bool(enabled, "check_finite"):
        return
    for name, a in weights.items():
        if not bool(xp.isfinite(a).all()):
            raise ValueError(f"{name} contains NaN or Inf (check_finite=True)")


def _check_l1(l1_weight) -> float:
    if isinstance(l1_weight, (bool, np.bool_)) or not isinstance(l1_weight, (int, float, np.floating, np.integer)):
        raise TypeError(f"l1_weight must be a real number, got {type(l1_weight).__name__}")
    v = float(l1_weight)
    if not np.isfinite(v) or v < 0:
        raise ValueError(f"l1_weight must be finite and >= 0, got {v}")
    return v


# --------------------------------------------------------------------------- inference


def _inference(x, w_first, w_up, w_down, weights, *, gated, tile_width, compression, dense_row_threshold,
               return_stats, check_finite, out, gate_kernel, path, tracker):
    fast = fast_cupy_args(x, weights)
    xp, x, w, n = (fast[0], x, weights, fast[1]) if fast is not None else _check_ffn_args(x, weights)
    threshold = inference_threshold(dense_row_threshold, n, tile_width, compression)
    B.check_bool(return_stats, "return_stats")
    gate_kernel = check_gate_kernel(gate_kernel)
    path = check_path(path)
    tracker = _check_tracker(tracker)
    out = _check_out(out, xp, x, inputs=[("x", x), *w.items()], fast=fast is not None)
    _check_finite(xp, w, check_finite)
    if xp is np:
        if gated:
            res = reference.gated_ffn(x, w["w_gate"], w["w_up"], w["w_down"], tile_width=tile_width,
                                      compression=compression, dense_row_threshold=threshold,
                                      return_stats=return_stats)
        else:
            res = reference.ffn(x, w["w_up"], w["w_down"], tile_width=tile_width, compression=compression,
                                dense_row_threshold=threshold, return_stats=return_stats)
        return _into(res, out, return_stats)
    inference, _ = _gpu()
    first = w["w_gate"] if gated else w["w_up"]
    return inference.forward(x, first, w["w_up"], w["w_down"], gated=gated, tile_width=tile_width,
                             compression=compression, threshold=threshold, return_stats=bool(return_stats), out=out,
                             gate_kernel=gate_kernel, path=path, tracker=tracker)


def gated_ffn(x, w_gate, w_up, w_down, *, tile_width=DEFAULT_TILE_WIDTH, compression=DEFAULT_COMPRESSION,
              dense_row_threshold="auto", return_stats=False, check_finite=False, out=None, gate_kernel="auto",
              path="auto", tracker=None):
    """Sparse gated FFN for inference: ``y = (relu(x w_gateᵀ) ⊙ (x w_upᵀ)) w_down``.

    Parameters
    ----------
    x : array (M, d), bfloat16 / float16 / float32 (float64: host only)
        Tokens.  NumPy → reference; CuPy or ``__dlpack__`` CUDA array → kernels (the result is a CuPy
        array).  GPU arrays: C-contiguous, on the current device.
    w_gate, w_up : array (n, d)
        Gate and up weights, neuron-major (``nn.Linear(d, n).weight`` layout).
    w_down : array (n, d)
        Down weight, neuron-major: the transpose of ``nn.Linear(n, d).weight``.
    tile_width, compression : int
        TwELL layout of the gate activations (``tile_width // compression`` slots per tile).
    dense_row_threshold : int, None or "auto"
        Rows with more active neurons take the dense (cuBLAS) backup path, as do rows with an overflowing
        tile.  "auto": 128; None: only overflow routes.  GPU rows longer than the kernels' list (512)
        always do.
    return_stats : bool
        Also return :class:`~twell.FFNStats` (nnz, l0, per-neuron counts, the path, rows on the dense
        backup and how many of them overflowed a tile).
    check_finite : bool
        Raise ``ValueError`` if a weight holds NaN/Inf (costs a read of the weights and a host sync).
        Otherwise NaN/Inf follow the rule of docs/design.md: an inactive neuron contributes nothing,
        everything else propagates as in the dense computation, on every path.
    out : array (M, d), optional
        Preallocated C-contiguous output of x's dtype, module and device, not overlapping an input.
        Required inside a CUDA-graph capture.
    gate_kernel : {"auto", "fused", "wgmma", "mma", "cublas"}
        GPU gate GEMM of the sparse path.  "wgmma" (Hopper) and "mma" (compute capability ≥ 8.0) are the
        fused GEMM whose epilogue writes TwELL directly (16-bit dtypes, d a multiple of 8); "fused" picks
        the device's one where it can run; "cublas" runs cuBLAS then the pack kernel.  "auto" runs
        "wgmma" on Hopper where it can and "cublas" elsewhere.  Small batches (M ≤ 512) always use
        cuBLAS (or the fused decode kernels); ignored on NumPy inputs.
    path : {"auto", "sparse", "dense"}
        "sparse": the sparse path (for M ≤ 512 the small-batch kernels); "dense": three cuBLAS GEMMs
        (exact, the same results as the sparse path to rounding; statistics still computed);
        "auto": what ``tracker`` predicts to be faster from the last call, else sparse.
    tracker : DensityTracker, optional
        Remembers this layer's density across calls (``path="auto"``): pass the same one to every call
        of one layer.  On the sparse path (M > 512, no statistics asked) a tracker that has observed a call
        also sizes the dense backup on the device, from that call: no host read-back, capturable.

    Returns
    -------
    y : array (M, d), dtype of x
    stats : FFNStats, if ``return_stats``

    Notes
    -----
    GPU paths (docs/design.md): fused decode kernels (M ≤ 4, no statistics), small batches (M ≤ 512:
    cuBLAS gate, then every row sparse and exact, no host sync, capturable in a CUDA graph), the sparse
    path (gate → TwELL → fused up/down for the compact rows and cuBLAS for the backup rows; the backup
    is sized on the device from ``tracker``'s last observation, with an exact kernel for rows beyond it,
    or else by a 12-byte host read-back), the dense path (capturable).  Bitwise deterministic.
    """
    return _inference(x, w_gate, w_up, w_down, {"w_gate": w_gate, "w_up": w_up, "w_down": w_down}, gated=True,
                      tile_width=tile_width, compression=compression, dense_row_threshold=dense_row_threshold,
                      return_stats=return_stats, check_finite=check_finite, out=out, gate_kernel=gate_kernel,
                      path=path, tracker=tracker)


def ffn(x, w_up, w_down, *, tile_width=DEFAULT_TILE_WIDTH, compression=DEFAULT_COMPRESSION,
        dense_row_threshold="auto", return_stats=False, check_finite=False, out=None, gate_kernel="auto",
        path="auto", tracker=None):
    """Sparse non-gated FFN for inference: ``y = relu(x w_upᵀ) w_down``.

    Parameters and returns as :func:`gated_ffn` (``w_up`` plays the gate's role: its ReLU output is
    packed into TwELL and only the down projection is sparse).
    """
    return _inference(x, w_up, w_up, w_down, {"w_up": w_up, "w_down": w_down}, gated=False, tile_width=tile_width,
                      compression=compression, dense_row_threshold=dense_row_threshold, return_stats=return_stats,
                      check_finite=check_finite, out=out, gate_kernel=gate_kernel, path=path, tracker=tracker)


def _check_twell_for(tw, x_rows: int, n: int, name: str):
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
        The gate activations g (e.g. from :func:`twell.pack_twell` of relu(x w_gateᵀ)), same module and
        dtype as x.  Its invariants are checked before use (on the GPU by one validation kernel and an
        8-byte read-back); a container that breaks one raises ``ValueError`` naming the row and rule.
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
    out = _check_out(out, xp, x, inputs=[("x", x), *w.items()])
    if xp is np:
        return _into(reference.gated_up_down(x, gate, w["w_up"], w["w_down"]), out, False)
    checked_device_twell(gate, "gate")
    inference, _ = _gpu()
    y = B.cupy_or_none().empty(x.shape, dtype=x.dtype) if out is None else out
    return inference.twell_product(x, gate, w["w_up"], w["w_down"], y, gated=True)


def down_projection(h, w_down, *, out=None):
    """Sparse down projection ``y = h w_down`` of a TwELL ``h`` (M, n) with ``w_down`` (n, d).

    ``h`` is checked as ``gate`` is in :func:`gated_up_down`.

    Returns
    -------
    y : array (M, d), dtype of w_down
    """
    if not isinstance(h, TwELL):
        raise TypeError(f"h must be a TwELL, got {type(h).__name__}")
    xp = B.array_module(h.values, w_down, names=["h", "w_down"])
    w_down = B.to_module(w_down, xp, "w_down")
    B.check_array(w_down, "w_down", ndim=2)
    if w_down.shape[0] != h.n_cols:
        raise ValueError(f"w_down must have shape (n, d) with n = h.n_cols = {h.n_cols}, got {tuple(w_down.shape)}")
    if np.dtype(w_down.dtype) != np.dtype(h.dtype):
        raise TypeError(f"w_down must have the dtype of h ({np.dtype(h.dtype).name}), got {np.dtype(w_down.dtype).name}")
    shape = (h.n_rows, w_down.shape[1])
    if xp is np:
        out = _check_out(out, xp, w_down, shape=shape, inputs=[("w_down", w_down)])
        return _into(reference.down_projection(h, w_down), out, False)
    B.check_on_current_device({"w_down": w_down})
    if not w_down.flags.c_contiguous:
        raise ValueError("w_down must be C-contiguous (row-major) on the GPU path")
    w_down = _aligned(w_down)
    out = _check_out(out, xp, w_down, shape=shape, inputs=[("w_down", w_down)])
    checked_device_twell(h, "h")
    inference, _ = _gpu()
    cp = B.cupy_or_none()
    y = cp.empty(shape, dtype=w_down.dtype) if out is None else out
    unread_x = cp.empty((h.n_rows, w_down.shape[1]), dtype=w_down.dtype)   # the non-gated kernel stages no x
    return inference.twell_product(unread_x, h, w_down, w_down, y, gated=False)


# --------------------------------------------------------------------------- training


def gated_ffn_forward(x, w_gate, w_up, w_down, *, l1_weight=0.0, dense_row_threshold=128, gate_kernel="auto",
                      path="auto", tracker=None):
    """Training forward through the hybrid format: ``(y, saved, stats)``.

    Parameters
    ----------
    x : array (M, d); w_gate, w_up, w_down : arrays (n, d), neuron-major (see module docstring)
    l1_weight : float
        λ of the L1 penalty ``λ · (1/M) Σ_t Σ_j |h_tj|`` (averaged over tokens, summed over neurons, as in
        the paper).  Its gradient ``(λ/M) sign(h)`` is added inside :func:`gated_ffn_backward`; the forward
        reports the unweighted ``l1 = (1/M) Σ|h|`` in ``stats``.
    dense_row_threshold : int or None
        Rows with more active neurons are stored and differentiated densely (None: only rows longer than
        the kernels' list, 512).
    gate_kernel : {"auto", "fused", "wgmma", "mma", "cublas"}
        GPU gate GEMM of the sparse path, as in :func:`gated_ffn`.  With a fused kernel the gate pattern
        goes GEMM epilogue → TwELL → the hybrid's CSR (no dense gate activations in device memory).
    path, tracker
        As in :func:`gated_ffn`; the dense path keeps ``relu(z)`` and ``u`` for the backward, which then
        runs as dense GEMMs.  A tracker that has observed the layer also lets the sparse path size its
        dense backup and saved state on the device: the forward then never waits for the host (the state
        is finished at the backward's first read of it; see :class:`SavedForBackward`).

    Returns
    -------
    y : array (M, d), dtype of x
    saved : SavedForBackward
        Pattern + two values per non-zero (+ dense rows of backup rows); pass to
        :func:`gated_ffn_backward` once.
    stats : FFNStats
        l1, l0, nnz, per-neuron activity counts, rows computed densely, the path.
    """
    xp, x, w, n = _check_ffn_args(x, {"w_gate": w_gate, "w_up": w_up, "w_down": w_down})
    threshold = check_dense_row_threshold(dense_row_threshold, n)
    l1_weight = _check_l1(l1_weight)
    gate_kernel = check_gate_kernel(gate_kernel)
    path = check_path(path)
    tracker = _check_tracker(tracker)
    if xp is np:
        return reference.gated_ffn_forward(x, w["w_gate"], w["w_up"], w["w_down"], l1_weight=l1_weight,
                                           dense_row_threshold=threshold)
    _, training = _gpu()
    return training.forward(x, w["w_gate"], w["w_up"], w["w_down"], l1_weight=l1_weight, threshold=threshold,
                            gate_kernel=gate_kernel, path=path, tracker=tracker)


def gated_ffn_backward(saved, dy):
    """Backward of :func:`gated_ffn_forward`: ``(dx, dw_gate, dw_up, dw_down)``.

    Parameters
    ----------
    saved : SavedForBackward
        From the forward; consumed (a second backward raises ``ValueError``; an error raised before the
        backward starts — a bad ``dy``, out of memory — leaves it usable).
    dy : array (M, d), dtype of x, same device as the forward, C-contiguous

    Returns
    -------
    dx : array (M, d), dtype of x
    dw_gate, dw_up, dw_down : arrays (n, d), dtype of the weights (fp32 accumulation)

    The L1 term's gradient ``(λ/M) sign(h)`` is included.
    """
    if not isinstance(saved, SavedForBackward):
        raise TypeError(f"saved must be the SavedForBackward returned by gated_ffn_forward, got {type(saved).__name__}")
    if saved.consumed:
        raise ValueError("saved state already consumed by a backward; run gated_ffn_forward again")
    xp = B.array_module(saved.x, dy, names=["saved.x", "dy"])
    if xp is np:
        return reference.gated_ffn_backward(saved, dy)
    dy = B.to_module(dy, xp, "dy")
    x = saved.x
    B.check_array(dy, "dy", shape=tuple(x.shape), dtype=x.dtype, contiguous=True)
    if dy.device.id != x.device.id:
        raise ValueError(f"dy is on device {dy.device.id} but the forward ran on device {x.device.id}")
    B.check_on_current_device({"dy": dy})
    if saved.workspace is None:
        raise ValueError("saved was not produced by the GPU forward (no workspace bounds)")
    _, training = _gpu()
    return training.backward(saved, _aligned(dy))
