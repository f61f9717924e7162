"""Self-check: every public op against the float64 reference on random problems (``python -m twell check``).

On a GPU the kernels are checked (bf16, fp16, fp32) against the float64 reference, with the error
allowed to be at most twice that of the same computation done densely in the same precision (plus
half an ulp of the output); on a CPU-only machine the NumPy path (the reference, through the sparse
formats) is checked against plain dense float64 math, within the rounding of its output.  Packing round trips must be exact and repeated calls bitwise equal.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from . import _backend as B
from . import reference
from .conversions import pack_hybrid, pack_twell, unpack_hybrid, unpack_twell
from .ops import ffn, gated_ffn, gated_ffn_backward, gated_ffn_forward
from .synthetic import make_problem

__all__ = ["CheckResult", "run_checks", "format_results"]

HALF_ULP = {"bfloat16": 2.0 ** -9, "float16": 2.0 ** -12, "float32": 2.0 ** -25, "float64": 2.0 ** -54}
# Absolute floor of the GPU limit: the final rounding (half an ulp) for 16-bit outputs; for float32, a few
# ulps of accumulation-order noise, which on a single-row problem can exceed twice the dense error
# (seen: dx of a 1-row float32 backward at 3.0e-7 against a limit of 2.7e-7).
GPU_FLOOR = {"bfloat16": 2.0 ** -9, "float16": 2.0 ** -12, "float32": 2.0 ** -21, "float64": 2.0 ** -50}
#: (M, d, n): decode, mid-size off every tile multiple, and a batch on the warp-per-row path.
SHAPES = ((1, 256, 1000), (37, 200, 1000), (1500, 256, 1000))


@dataclass
class CheckResult:
    op: str
    dtype: str
    shape: str
    error: float
    limit: float
    ok: bool


def _host(a):
    return np.asarray(a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else a, dtype=np.float64)


def _rel(out, ref) -> float:
    out, ref = _host(out), _host(ref)
    if not np.all(np.isfinite(out)):
        return float("inf")
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / den) if den else float(np.linalg.norm(out))


def _dense_same_precision(xp, x, wg, wu, wd, dy, l1_weight):
    """The dense FFN forward and backward in the inputs' precision (GEMMs rounded to it, elementwise in fp32,
    or fp64 for fp64 inputs)."""
    m = x.shape[0]
    ew = np.float64 if x.dtype == np.float64 else np.float32
    z = xp.matmul(x, wg.T)
    u = xp.matmul(x, wu.T)
    zf, uf = z.astype(ew), u.astype(ew)
    g = xp.where(zf > 0, zf, ew(0))
    h = (g * uf).astype(x.dtype)
    y = xp.matmul(h, wd)
    dh = xp.matmul(dy, wd.T).astype(ew) + ew(l1_weight / m) * xp.sign(g * uf)
    du = (dh * g).astype(x.dtype)
    dz = (dh * uf * (zf > 0)).astype(x.dtype)
    dx = (xp.matmul(du, wu).astype(ew) + xp.matmul(dz, wg).astype(ew)).astype(x.dtype)
    return y, (dx, xp.matmul(dz.T, x), xp.matmul(du.T, x), xp.matmul(h.T, dy))


def _limit(dtype: str, dense_error: float, gpu: bool) -> float:
    """GPU: twice the same-precision dense error plus GPU_FLOOR.  CPU (the reference computes in
    float64 and rounds once): the output's rounding."""
    return 2.0 * dense_error + GPU_FLOOR[dtype] if gpu else 2.0 * HALF_ULP[dtype] + 1e-12


def run_checks(backend: str = "auto", dtypes=None, seed: int = 0) -> list:
    """Run the checks; ``backend`` is "gpu", "cpu" or "auto" (GPU when CuPy sees a device)."""
    cp = B.cupy_or_none()
    if backend not in ("auto", "gpu", "cpu"):
        raise ValueError(f"backend must be 'auto', 'gpu' or 'cpu', got {backend!r}")
    if backend == "gpu" and cp is None:
        raise RuntimeError("backend='gpu' but CuPy does not see a CUDA device")
    gpu = backend == "gpu" or (backend == "auto" and cp is not None)
    xp = cp if gpu else np
    if dtypes is None:
        dtypes = ("bfloat16", "float16", "float32") if gpu else ("float64",)
    results = []
    rng = np.random.default_rng(seed)
    for dtype in dtypes:
        for m, d, n in SHAPES:
            p = make_problem(m, d, n, mean_active=20.0, dtype=dtype, seed=int(rng.integers(2**31)), xp=xp)
            x, wg, wu, wd = p.x, p.w_gate, p.w_up, p.w_down
            dy = xp.asarray(rng.standard_normal((m, d))).astype(x.dtype)
            f64 = [_host(a) for a in (x, wg, wu, wd)]
            dy64 = _host(dy)
            shape = f"{m}x{d}x{n}"
            l1_weight = 0.01
            dense_y, dense_grads = _dense_same_precision(xp, x, wg, wu, wd, dy, l1_weight)

            def record(op, out, ref, dense=None):
                err = _rel(out, ref)
                lim = _limit(dtype, _rel(dense, ref), gpu) if dense is not None else 0.0
                results.append(CheckResult(op, dtype, shape, err, lim, bool(err <= lim)))

            ref_y = reference.gated_ffn_dense(*f64)
            y = gated_ffn(x, wg, wu, wd)
            record("gated_ffn", y, ref_y, dense_y)
            record("gated_ffn deterministic", gated_ffn(x, wg, wu, wd), y)
            if gpu:   # the fused gate GEMM -> TwELL epilogue (falls back to cuBLAS where it cannot run)
                record("gated_ffn fused gate", gated_ffn(x, wg, wu, wd, gate_kernel="fused"), ref_y, dense_y)
            ref_yn = reference.ffn_dense(f64[0], f64[2], f64[3])
            zn = xp.matmul(x, wu.T).astype(np.float32)
            dense_yn = xp.matmul(xp.where(zn > 0, zn, 0).astype(x.dtype), wd)
            record("ffn", ffn(x, wu, wd), ref_yn, dense_yn)

            yt, saved, _ = gated_ffn_forward(x, wg, wu, wd, l1_weight=l1_weight)
            grads = gated_ffn_backward(saved, dy)
            if gpu:   # kernels vs the float64 reference, bounded by the same-precision dense error
                ry, rsaved, _ = reference.gated_ffn_forward(*f64, l1_weight=l1_weight)
                rgrads = reference.gated_ffn_backward(rsaved, dy64)
            else:     # the reference (sparse formats) vs independent dense float64 math
                ry, rgrads = _dense_same_precision(np, *f64, dy64, l1_weight)
            record("gated_ffn_forward y", yt, ry, dense_y)
            for name, out, ref, den in zip(("dx", "dw_gate", "dw_up", "dw_down"), grads, rgrads, dense_grads):
                record(f"gated_ffn_backward {name}", out, ref, den)

            zf = xp.matmul(x, wg.T).astype(np.float32)
            g = xp.where(zf > 0, zf, np.float32(0)).astype(x.dtype)       # a real sparse gate
            record("pack/unpack TwELL (exact)", unpack_twell(pack_twell(g, 64, 4)), g)
            record("pack/unpack Hybrid (exact)", unpack_hybrid(pack_hybrid(g, 16)), g)
    return results


def format_results(results) -> str:
    lines = [f"{'op':32s} {'dtype':9s} {'M x d x n':14s} {'rel err':>10s} {'limit':>10s}  ok"]
    for r in results:
        lines.append(f"{r.op:32s} {r.dtype:9s} {r.shape:14s} {r.error:10.3e} {r.limit:10.3e}  "
                     f"{'ok' if r.ok else 'FAIL'}")
    bad = sum(not r.ok for r in results)
    lines.append(f"{len(results) - bad} passed, {bad} failed")
    return "\n".join(lines)


def as_dicts(results) -> list:
    return [asdict(r) for r in results]
