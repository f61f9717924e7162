"""Correctness checks (``--check``) and error metrics.

Inference: the first ``--check-rows`` rows of every implementation's ``y`` (and of its graph replay) against
``twell.reference.gated_ffn_dense`` in float64 on the host: ``‖y − ref‖ / ‖ref‖`` (:func:`rel_error`)
must be within :data:`CHECK_TOLERANCE` of the dtype.

Training: all five outputs (:data:`TRAIN_OUTPUTS`) over the whole batch against
:func:`~twell.bench.dense_host.dense_train_math` in float64 (CuPy float64 GEMMs on the GPU, a few GB of
temporaries at M = 16384), computed where the reference lives (:func:`rel_error_like`); the pass rule is
:data:`TRAIN_CHECK_RULE` (:func:`apply_train_check`).
"""

from __future__ import annotations

import math

import numpy as np

from twell import _backend as B
from twell import reference

from .common import as_y, to_host
from .dense_host import dense_train_math

__all__ = ["CHECK_TOLERANCE", "TRAIN_OUTPUTS", "HALF_ULP", "TRAIN_CHECK_RULE", "rows_f64", "reference_rows",
           "rel_error", "rel_error_like", "train_reference", "train_errors", "apply_train_check"]

#: rel. error ||y - ref|| / ||ref|| above which an implementation fails --check.
CHECK_TOLERANCE = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 1e-4, "float64": 1e-9}
#: the outputs of a training step, in the order ``run()`` returns them.
TRAIN_OUTPUTS = ("y", "dx", "dw_gate", "dw_up", "dw_down")
#: half an ulp (relative) of each dtype: the slack of the sparse-vs-dense error bar.
HALF_ULP = {"bfloat16": 2.0 ** -9, "float16": 2.0 ** -12, "float32": 2.0 ** -25, "float64": 2.0 ** -54}
#: the pass rule of the training check (also written to the JSON).
TRAIN_CHECK_RULE = ("dense implementations: every output's rel. error <= CHECK_TOLERANCE[dtype]; others: "
                    "<= 2 x the smallest passing dense error of that output + half an ulp of the dtype "
                    "(CHECK_TOLERANCE[dtype] when no dense implementation passed)")


def rows_f64(y, rows: int) -> np.ndarray:
    """The first ``rows`` rows of an implementation's ``y`` as a float64 host array."""
    y = as_y(y)
    part = y[:rows]
    if not isinstance(part, np.ndarray) and not hasattr(part, "get") and hasattr(part, "contiguous"):
        part = part.contiguous()
    return np.asarray(to_host(part)).astype(np.float64)


def reference_rows(problem, rows: int) -> tuple[np.ndarray, str]:
    """float64 ``y`` of the first ``rows`` tokens on the host, and the reference's name."""
    x = to_host(problem.x[:rows]).astype(np.float64)
    wg, wu, wd = (to_host(a).astype(np.float64) for a in (problem.w_gate, problem.w_up, problem.w_down))
    y = reference.gated_ffn_dense(x, wg, wu, wd)
    return np.asarray(as_y(y), dtype=np.float64), "twell.reference.gated_ffn_dense (float64)"


def rel_error(y: np.ndarray, ref: np.ndarray) -> float:
    """||y - ref|| / ||ref|| (inf when y has a non-finite value or the shapes differ)."""
    if y.shape != ref.shape or not np.all(np.isfinite(y)):
        return float("inf")
    den = float(np.linalg.norm(ref))
    num = float(np.linalg.norm(y - ref))
    return num / den if den > 0 else num


def train_reference(tp) -> dict:
    """float64 ``{output: array}`` of the whole step of a ``TrainProblem``, where the problem lives (CuPy
    float64 GEMMs on the GPU)."""
    f64 = [a.astype(np.float64) for a in (*tp.arrays(), tp.dy)]
    return dict(zip(TRAIN_OUTPUTS, dense_train_math(*f64, tp.l1_weight)))


def _like(a, ref):
    """``a`` in ``ref``'s array module (torch tensors through DLPack)."""
    if isinstance(ref, np.ndarray):
        return np.asarray(to_host(a))
    if hasattr(a, "get") and not isinstance(a, np.ndarray):
        return a
    import cupy as cp  # noqa: PLC0415
    return cp.from_dlpack(a.detach() if hasattr(a, "detach") else a)


def rel_error_like(a, ref) -> float:
    """:func:`rel_error` computed where ``ref`` lives (float64; no host copy of device arrays)."""
    xp = np if isinstance(ref, np.ndarray) else B.cupy_or_none()
    a = _like(a, ref)
    if tuple(a.shape) != tuple(ref.shape):
        return float("inf")
    a = a.astype(np.float64)
    if not bool(xp.isfinite(a).all()):
        return float("inf")
    den = float(xp.linalg.norm(ref))
    num = float(xp.linalg.norm(a - ref))
    return num / den if den > 0 else num


def train_errors(outs, ref: dict) -> dict:
    """``{output: rel. error}`` of a training step's five outputs against :func:`train_reference`."""
    if len(outs) != len(TRAIN_OUTPUTS):
        raise ValueError(f"a training step must return {len(TRAIN_OUTPUTS)} arrays {TRAIN_OUTPUTS}, "
                         f"got {len(outs)}")
    return {name: rel_error_like(a, ref[name]) for name, a in zip(TRAIN_OUTPUTS, outs)}


def apply_train_check(impl_results: dict, dtype: str) -> None:
    """Set ``check_ok``, ``check_limit`` and ``err_vs_dense`` from the ``rel_err`` dicts (see TRAIN_CHECK_RULE)."""
    tol = CHECK_TOLERANCE[dtype]
    checked = {n: r for n, r in impl_results.items() if isinstance(r.get("rel_err"), dict)}
    bars: dict = {}
    for r in checked.values():
        if r.get("dense"):
            r["check_limit"] = dict.fromkeys(TRAIN_OUTPUTS, tol)
            r["check_ok"] = all(r["rel_err"][k] <= tol for k in TRAIN_OUTPUTS)
            if r["check_ok"]:
                for k in TRAIN_OUTPUTS:
                    bars[k] = min(bars.get(k, math.inf), r["rel_err"][k])
    for r in checked.values():
        if not r.get("dense"):
            r["check_limit"] = ({k: 2.0 * bars[k] + HALF_ULP[dtype] for k in TRAIN_OUTPUTS} if bars
                                else dict.fromkeys(TRAIN_OUTPUTS, tol))
            r["check_ok"] = all(r["rel_err"][k] <= r["check_limit"][k] for k in TRAIN_OUTPUTS)
        if bars:
            r["err_vs_dense"] = max((r["rel_err"][k] / bars[k]) if bars[k] > 0 else
                                    (0.0 if r["rel_err"][k] == 0 else math.inf) for k in TRAIN_OUTPUTS)

