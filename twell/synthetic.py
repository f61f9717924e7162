"""Seeded synthetic FFN problems with controlled activation sparsity.

Construction, all three weights neuron-major
``(n, d)`` row-major (``w_gate``, ``w_up`` as in ``nn.Linear``; ``w_down`` is the
transpose of ``nn.Linear``'s down weight)::

    x[t, :]      ~ N(0, 1),  x[t, 0] = 1          (column 0 is a bias input)
    x[t, 1:]    *= s_t                            (per-token scale; 1 unless token_skew)
    w_*[j, :]    ~ N(0, 1/d)
    w_gate[j, 0] = -c_j = -kappa_j * ||w_gate[j, 1:]||

so that ``z_tj = x_t · w_gate_j = -c_j + s_t * N(0, ||w_gate[j,1:]||²)`` over random
tokens, and neuron ``j`` fires on a token of scale ``s`` with probability
``P(z > 0) = Φ̄(kappa_j / s)`` (``Φ̄`` = ``scipy.stats.norm.sf``).  ``kappa_j`` is the
threshold in units of the neuron's own pre-activation standard deviation: using
the realised row norm (instead of ``sqrt((d-1)/d)``) makes the rate exact per
neuron for any ``d``.

Kinds
-----
``"uniform"``
    ``s_t = 1``, ``kappa_j = Φ̄⁻¹(mean_active / n)`` for every neuron: every token
    and every neuron has the same rate (per-token counts are Binomial-like; the
    max over 16k tokens is ≈ 2× the mean).
``"token_skew"``
    ``s_t = exp(sigma · N(0, 1))`` (``skew_sigma``, default 0.13), the same
    ``kappa`` for every neuron.  ``calibrate="median"`` (default) solves
    ``n · Φ̄(kappa) = mean_active``, i.e. the token of median scale has the target
    rate, so the realised *median* count is ≈ ``mean_active`` and the mean is
    higher (sigma 0.13, target 29 → median ≈ 29, mean ≈ 39, max ≈ 9–10× mean at
    M = 16k, the paper-like case; sigma 0.35 → median 29, mean ≈ 95, p99 ≈ 700,
    a heavy case).  ``calibrate="mean"`` solves
    ``n · E_s[Φ̄(kappa / s)] = mean_active`` (Gauss–Hermite quadrature over the
    lognormal, 201 nodes) so the *mean* count is the target.
``"neuron_skew"``
    ``s_t = 1``; a seeded random ``dead_fraction`` of the neurons get
    ``kappa = 50`` (they never fire); the others get rates
    ``r_j ∝ exp(sigma · N(0, 1))`` (``skew_sigma``, default 1.5: a heavy-tailed
    lognormal, coefficient of variation ≈ 2.9), normalised with a cap
    ``max_rate`` (default 0.9, water-filling) so that ``Σ_j r_j = mean_active``,
    and ``kappa_j = Φ̄⁻¹(r_j)``.  Alive neurons with tiny rates may also never
    fire in a finite batch: the *realised* dead fraction is at least the
    requested one.

Randomness: one ``numpy.random.SeedSequence(seed)`` is spawned into independent
streams for x, w_gate, w_up, w_down and the host-side parameters (token scales,
neuron rates, dead set).  So the weights depend only on ``(seed, d, n)`` and the
thresholds, not on ``m`` or ``kind``; the token scales and neuron rates are drawn
on the host with NumPy and are identical for ``xp=numpy`` and ``xp=cupy``; the
big arrays are drawn with ``xp.random.default_rng`` (NumPy's PCG64 vs CuPy's
XORWOW), so NumPy and CuPy problems of one seed are statistically alike, not
bitwise equal.

Arrays are drawn in float32 (float64 for ``dtype="float64"``), and cast once to
``dtype``.  Rounding of ``c_j`` and of ``x`` shifts the rates slightly (≈ 1–2 % in
bf16): :func:`describe` reports what the rounded arrays actually do.
On CuPy, bfloat16 arrays come from ``float32_array.astype(ml_dtypes.bfloat16)``
(a CuPy elementwise cast, supported by CuPy ≥ 14 with ml_dtypes installed).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from . import _backend as B

__all__ = [
    "KINDS",
    "Problem",
    "make_problem",
    "adversarial_problem",
    "describe",
    "DEFAULT_TOKEN_SIGMA",
    "DEFAULT_NEURON_SIGMA",
    "DEAD_KAPPA",
]

KINDS = ("uniform", "token_skew", "neuron_skew")
ADVERSARIAL_MODES = ("all", "half", "mixed")
#: Per-token lognormal sigma of ``token_skew`` (paper-like: median 29, mean ≈ 39).
DEFAULT_TOKEN_SIGMA = 0.13
#: Per-neuron log-rate sigma of ``neuron_skew``.
DEFAULT_NEURON_SIGMA = 1.5
#: Threshold (in pre-activation standard deviations) of a dead neuron: P(fire) ≈ 0.
DEAD_KAPPA = 50.0
#: Threshold that makes a neuron fire on every token (adversarial "all").
ALWAYS_KAPPA = -12.0
_CALIBRATIONS = ("median", "mean")
_HERMITE_NODES = 201
_TWELL_COMPRESSIONS = (8, 4, 2)


# ----------------------------------------------------------------------------
# the problem container
# ----------------------------------------------------------------------------
@dataclass
class Problem:
    """One synthetic FFN layer problem.

    Attributes
    ----------
    x : array (m, d)
        Tokens; ``x[:, 0] == 1`` (bias input; ±1 in the adversarial "mixed" mode).
    w_gate, w_up, w_down : arrays (n, d)
        Neuron-major weights (``w_down`` is the transpose of ``nn.Linear``'s).
    kind : str
        ``"uniform"``, ``"token_skew"``, ``"neuron_skew"`` or ``"adversarial/<mode>"``.
    seed : int
    params : dict
        JSON-able generation parameters and the analytically expected
        statistics (``expected_mean_active``, ``expected_median_active``).
    token_scale : numpy array (m,) or None
        ``s_t`` (host), None when all are 1.
    kappa : numpy array (n,)
        Per-neuron threshold in pre-activation standard deviations (host).
    dead : numpy bool array (n,)
        Neurons made dead on purpose (host).
    """

    x: object
    w_gate: object
    w_up: object
    w_down: object
    kind: str
    seed: int
    params: dict = field(default_factory=dict)
    token_scale: np.ndarray | None = None
    kappa: np.ndarray | None = None
    dead: np.ndarray | None = None

    @property
    def m(self) -> int:
        return int(self.x.shape[0])

    @property
    def d(self) -> int:
        return int(self.x.shape[1])

    @property
    def n(self) -> int:
        return int(self.w_gate.shape[0])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.x.dtype)

    @property
    def xp(self):
        return np if isinstance(self.x, np.ndarray) else B.array_module(self.x)

    def arrays(self) -> tuple:
        """``(x, w_gate, w_up, w_down)``."""
        return (self.x, self.w_gate, self.w_up, self.w_down)

    def host(self, dtype=None) -> "Problem":
        """A copy on the host (NumPy), optionally cast to ``dtype``."""
        def conv(a):
            a = a if isinstance(a, np.ndarray) else a.get()
            return a if dtype is None else a.astype(_resolve_dtype(dtype)[1])
        return dataclasses.replace(self, x=conv(self.x), w_gate=conv(self.w_gate),
                                   w_up=conv(self.w_up), w_down=conv(self.w_down))

    @property
    def nbytes(self) -> int:
        return int(sum(int(a.nbytes) for a in self.arrays()))


# ----------------------------------------------------------------------------
# argument validation
# ----------------------------------------------------------------------------
def _resolve_xp(xp):
    if xp is None or xp is np:
        return np
    if isinstance(xp, str):
        if xp == "numpy":
            return np
        if xp == "cupy":
            cp = B.cupy_or_none()
            if cp is None:
                raise RuntimeError("xp='cupy' was requested but CuPy with a CUDA device is not available")
            return cp
        raise ValueError(f"xp must be numpy, cupy, 'numpy' or 'cupy', got {xp!r}")
    name = getattr(xp, "__name__", "")
    if name == "cupy":
        return xp
    if name == "numpy":
        return np
    raise TypeError(f"xp must be the numpy or cupy module, got {xp!r}")


def _resolve_dtype(dtype):
    """Return ``(name, numpy dtype)`` for one of bfloat16/float16/float32/float64."""
    try:
        name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    except TypeError as exc:
        raise TypeError(f"dtype must be one of {B.FLOAT_DTYPE_NAMES}, got {dtype!r}") from exc
    if name not in B.FLOAT_DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {B.FLOAT_DTYPE_NAMES}, got {dtype!r}")
    if name == "bfloat16":
        bf = B.bfloat16_dtype()
        if bf is None:  # pragma: no cover - depends on the environment
            raise TypeError("dtype='bfloat16' needs the ml_dtypes package")
        return name, bf
    return name, np.dtype(name)


def _check_real(value, name, *, lo=None, hi=None, lo_open=True, hi_open=True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (v >= hi if hi_open else v > hi):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {value!r}")
    return v


def _check_shape_args(m, d, n):
    m = B.check_int(m, "m", minimum=1)
    d = B.check_int(d, "d", minimum=2)  # column 0 is the bias input
    n = B.check_int(n, "n", minimum=1)
    return m, d, n


def _check_seed(seed) -> int:
    return B.check_int(seed, "seed", minimum=0)


# ----------------------------------------------------------------------------
# calibration helpers (host, float64)
# ----------------------------------------------------------------------------
def _norm():
    from scipy.stats import norm  # noqa: PLC0415
    return norm


def _lognormal_mean_rate(kappa: float, sigma: float) -> float:
    """``E[Φ̄(kappa / s)]`` with ``log s ~ N(0, sigma²)`` (Gauss–Hermite)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(_HERMITE_NODES)
    weights = weights / math.sqrt(2.0 * math.pi)
    s = np.exp(sigma * nodes)
    return float(np.sum(weights * _norm().sf(kappa / s)))


def _solve_kappa_mean(rate: float, sigma: float) -> float:
    from scipy.optimize import brentq  # noqa: PLC0415
    f = lambda k: _lognormal_mean_rate(k, sigma) - rate  # noqa: E731
    lo, hi = -60.0, 60.0
    if f(lo) < 0 or f(hi) > 0:  # pragma: no cover - extreme sigma
        raise ValueError(f"cannot calibrate token_skew to rate {rate} with skew_sigma={sigma}")
    return float(brentq(f, lo, hi, xtol=1e-12, rtol=1e-12, maxiter=500))


def _waterfill(raw: np.ndarray, total: float, cap: float) -> np.ndarray:
    """Rates ``min(t * raw, cap)`` with ``t`` chosen so that they sum to ``total``."""
    from scipy.optimize import brentq  # noqa: PLC0415
    raw = np.asarray(raw, dtype=np.float64)
    if total >= cap * raw.size:
        raise ValueError("mean_active is too large for the alive neurons at this max_rate")
    f = lambda lt: float(np.minimum(np.exp(lt) * raw, cap).sum()) - total  # noqa: E731
    lo = math.log(total / raw.sum()) - 1.0
    hi = math.log(cap / raw.min()) + 1.0
    while f(lo) > 0:  # pragma: no cover - defensive
        lo -= 10.0
    lt = brentq(f, lo, hi, xtol=1e-14, rtol=1e-14, maxiter=1000)
    return np.minimum(np.exp(lt) * raw, cap)


# ----------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------
def _rng(xp, seed_seq):
    if xp is np:
        return np.random.default_rng(seed_seq)
    return xp.random.default_rng(seed_seq)


def _generate(m, d, n, *, kappa, token_scale, x0, dtype, seed, xp):
    """Draw ``(x, w_gate, w_up, w_down)``; ``kappa`` (n,) host float64."""
    dname, dt = _resolve_dtype(dtype)
    gen_dt = np.float64 if dname == "float64" else np.float32
    ss = np.random.SeedSequence(seed)
    s_x, s_g, s_u, s_d, _s_aux = ss.spawn(5)
    inv_sqrt_d = 1.0 / math.sqrt(d)

    # x: N(0,1), scaled rows, bias column
    x = _rng(xp, s_x).standard_normal((m, d), dtype=gen_dt)
    if token_scale is not None:
        x[:, 1:] *= xp.asarray(np.asarray(token_scale, dtype=gen_dt))[:, None]
    if x0 is None:
        x[:, 0] = 1
    else:
        x[:, 0] = xp.asarray(np.asarray(x0, dtype=gen_dt))
    x = _cast(x, dt)

    # gate: N(0, 1/d), column 0 = -kappa * ||row[1:]||
    wg = _rng(xp, s_g).standard_normal((n, d), dtype=gen_dt)
    wg *= gen_dt(inv_sqrt_d)
    norms = xp.sqrt((wg[:, 1:].astype(np.float64) ** 2).sum(axis=1))
    wg[:, 0] = (-xp.asarray(np.asarray(kappa, dtype=np.float64)) * norms).astype(gen_dt)
    wg = _cast(wg, dt)

    wu = _rng(xp, s_u).standard_normal((n, d), dtype=gen_dt)
    wu *= gen_dt(inv_sqrt_d)
    wu = _cast(wu, dt)
    wd = _rng(xp, s_d).standard_normal((n, d), dtype=gen_dt)
    wd *= gen_dt(inv_sqrt_d)
    wd = _cast(wd, dt)
    return x, wg, wu, wd


def _cast(a, dt):
    if np.dtype(a.dtype) == dt:
        return a
    return a.astype(dt)


def _aux_rng(seed: int) -> np.random.Generator:
    """Host generator for the small parameters (independent of the array streams)."""
    return np.random.default_rng(np.random.SeedSequence(seed).spawn(5)[4])


def make_problem(
    m,
    d=2048,
    n=5632,
    *,
    mean_active=29.0,
    kind="uniform",
    dtype="bfloat16",
    seed=0,
    xp=np,
    skew_sigma=None,
    dead_fraction=0.3,
    **kw,
) -> Problem:
    """Make one seeded FFN problem with a controlled activation rate.

    Parameters
    ----------
    m, d, n : int
        Tokens, d_model (>= 2: column 0 is the bias input), d_ff.
    mean_active : float in (0, n]
        Target active neurons per token (the median token for
        ``token_skew`` with ``calibrate="median"``).  ``n`` (every neuron active on
        every token: a fully dense batch) only for ``kind="uniform"``.
    kind : {"uniform", "token_skew", "neuron_skew"}
        See the module docstring.
    dtype : {"bfloat16", "float16", "float32", "float64"} or a dtype
    seed : int >= 0
    xp : numpy (default) or cupy (module or name)
        Where the arrays are generated.
    skew_sigma : float >= 0 or None
        ``token_skew``: per-token log-scale sigma (default 0.13).
        ``neuron_skew``: per-neuron log-rate sigma (default 1.5).
        Ignored (must be None) for ``uniform``.
    dead_fraction : float in [0, 1)
        ``neuron_skew`` only: share of neurons that never fire.
    calibrate : {"median", "mean"}  (keyword, ``token_skew`` only, default "median")
    max_rate : float in (0, 1)  (keyword, ``neuron_skew`` only, default 0.9)
        Cap on a single neuron's firing rate.

    Returns
    -------
    Problem
    """
    m, d, n = _check_shape_args(m, d, n)
    if not isinstance(kind, str):
        raise TypeError(f"kind must be a string, got {type(kind).__name__}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    mean_active = _check_real(mean_active, "mean_active", lo=0.0, hi=float(n), hi_open=False)
    if mean_active == n and kind != "uniform":
        raise ValueError(f"mean_active = n = {n} (every neuron active) is only available for kind='uniform'")
    dname, _ = _resolve_dtype(dtype)
    seed = _check_seed(seed)
    xp = _resolve_xp(xp)
    calibrate = kw.pop("calibrate", None)
    max_rate = kw.pop("max_rate", None)
    if kw:
        raise TypeError(f"make_problem() got unexpected keyword argument(s): {', '.join(sorted(kw))}")
    if skew_sigma is not None:
        skew_sigma = _check_real(skew_sigma, "skew_sigma", lo=0.0, lo_open=False)
    dead_fraction = _check_real(dead_fraction, "dead_fraction", lo=0.0, hi=1.0, lo_open=False)
    if calibrate is not None and kind != "token_skew":
        raise ValueError(f"calibrate applies to kind='token_skew' only, got kind={kind!r}")
    if max_rate is not None and kind != "neuron_skew":
        raise ValueError(f"max_rate applies to kind='neuron_skew' only, got kind={kind!r}")
    if skew_sigma is not None and kind == "uniform":
        raise ValueError("skew_sigma applies to kind='token_skew' or 'neuron_skew', not 'uniform'")

    norm = _norm()
    rate = mean_active / n
    params = {
        "generator": "twell.synthetic/1",
        "m": m, "d": d, "n": n, "kind": kind, "dtype": dname, "seed": seed,
        "mean_active": mean_active, "xp": "numpy" if xp is np else "cupy",
    }
    token_scale = None
    dead = np.zeros(n, dtype=bool)
    aux = _aux_rng(seed)

    if kind == "uniform":
        k = float(norm.isf(rate)) if rate < 1.0 else -DEAD_KAPPA      # rate 1: every neuron always fires
        kappa = np.full(n, k)
        params.update(kappa=k, expected_mean_active=mean_active, expected_median_active=mean_active)
    elif kind == "token_skew":
        sigma = DEFAULT_TOKEN_SIGMA if skew_sigma is None else skew_sigma
        calibrate = "median" if calibrate is None else calibrate
        if calibrate not in _CALIBRATIONS:
            raise ValueError(f"calibrate must be one of {_CALIBRATIONS}, got {calibrate!r}")
        if calibrate == "median":
            k = float(norm.isf(rate))
        else:
            k = _solve_kappa_mean(rate, sigma)
        # draw m scales with a generator of its own so the scales of the first
        # rows do not depend on m
        token_scale = np.exp(sigma * aux.standard_normal(m))
        kappa = np.full(n, k)
        params.update(
            skew_sigma=sigma, calibrate=calibrate, kappa=k,
            expected_mean_active=n * _lognormal_mean_rate(k, sigma),
            expected_median_active=n * float(norm.sf(k)),
        )
    else:  # neuron_skew
        sigma = DEFAULT_NEURON_SIGMA if skew_sigma is None else skew_sigma
        max_rate = 0.9 if max_rate is None else _check_real(max_rate, "max_rate", lo=0.0, hi=1.0)
        n_dead = int(round(dead_fraction * n))
        n_alive = n - n_dead
        if n_alive < 1:
            raise ValueError(f"dead_fraction={dead_fraction} leaves no alive neuron out of n={n}")
        if mean_active >= max_rate * n_alive:
            raise ValueError(
                f"mean_active={mean_active} must be < max_rate * alive neurons = {max_rate} * {n_alive} "
                f"(dead_fraction={dead_fraction})")
        perm = aux.permutation(n)
        dead[perm[:n_dead]] = True
        raw = np.exp(sigma * aux.standard_normal(n_alive))
        rates = _waterfill(raw, mean_active, max_rate)
        kappa = np.full(n, DEAD_KAPPA)
        kappa[perm[n_dead:]] = norm.isf(rates)
        params.update(
            skew_sigma=sigma, dead_fraction=dead_fraction, n_dead=n_dead, max_rate=max_rate,
            expected_mean_active=float(rates.sum()),
            expected_neuron_rate_cv=float(np.concatenate([rates, np.zeros(n_dead)]).std()
                                          / (rates.sum() / n)),
        )

    x, wg, wu, wd = _generate(m, d, n, kappa=kappa, token_scale=token_scale, x0=None,
                              dtype=dname, seed=seed, xp=xp)
    return Problem(x=x, w_gate=wg, w_up=wu, w_down=wd, kind=kind, seed=seed, params=params,
                   token_scale=token_scale, kappa=kappa, dead=dead)


def adversarial_problem(
    m,
    d=2048,
    n=5632,
    *,
    mode="all",
    mean_active=29.0,
    dtype="bfloat16",
    seed=0,
    xp=np,
) -> Problem:
    """A problem whose rows overflow TwELL tiles, for exactness tests.

    Modes
    -----
    ``"all"``
        Every neuron fires on every token (``kappa = -12``): every tile of every
        row is full, so every row overflows at any compression factor.
    ``"half"``
        Every neuron fires with probability 1/2 (``kappa = 0``): a 256-column
        tile holds ≈ 128 ± 8 non-zeros, so every row overflows at C = 8 and 4
        (capacity 32 / 64) and about half the tiles at C = 2.
    ``"mixed"``
        Even rows dense, odd rows sparse: the thresholds are set for
        ``mean_active`` active neurons, and the bias input ``x[t, 0]`` is ``+1`` on
        odd rows (≈ ``mean_active`` active) and ``-1`` on even rows (the sign of
        the threshold flips: ≈ ``n - mean_active`` active).  Exercises routing
        of some rows to the dense backup while the others stay compact.
    """
    m, d, n = _check_shape_args(m, d, n)
    if not isinstance(mode, str) or mode not in ADVERSARIAL_MODES:
        raise ValueError(f"mode must be one of {ADVERSARIAL_MODES}, got {mode!r}")
    dname, _ = _resolve_dtype(dtype)
    seed = _check_seed(seed)
    xp = _resolve_xp(xp)
    x0 = None
    if mode == "all":
        k = ALWAYS_KAPPA
    elif mode == "half":
        k = 0.0
    else:
        mean_active = _check_real(mean_active, "mean_active", lo=0.0, hi=float(n))
        k = float(_norm().isf(mean_active / n))
        x0 = np.where(np.arange(m) % 2 == 0, -1.0, 1.0)
    kappa = np.full(n, k)
    x, wg, wu, wd = _generate(m, d, n, kappa=kappa, token_scale=None, x0=x0, dtype=dname, seed=seed, xp=xp)
    params = {
        "generator": "twell.synthetic/1", "m": m, "d": d, "n": n, "kind": f"adversarial/{mode}",
        "mode": mode, "dtype": dname, "seed": seed, "kappa": k, "xp": "numpy" if xp is np else "cupy",
    }
    return Problem(x=x, w_gate=wg, w_up=wu, w_down=wd, kind=f"adversarial/{mode}", seed=seed,
                   params=params, token_scale=None, kappa=kappa, dead=np.zeros(n, dtype=bool))


# ----------------------------------------------------------------------------
# realised statistics
# ----------------------------------------------------------------------------
def _host(a):
    return a if isinstance(a, np.ndarray) else a.get()


def _pct(a, q) -> float:
    return float(np.percentile(a, q)) if a.size else float("nan")


def describe(problem: Problem, max_rows=None, *, tile_width: int = 256,
             compressions=_TWELL_COMPRESSIONS, chunk_elements: int = 1 << 26) -> dict:
    """Realised activation statistics of ``relu(x w_gateᵀ)``.

    ``z`` is computed in float32 (float64 for float64 problems) from the actual
    (rounded) arrays, chunked over rows, with ``xp`` matmuls on the problem's
    device.  ``max_rows`` uses the first ``max_rows`` rows only (for speed on the
    CPU).  Returns a JSON-able dict::

        rows, rows_total, n, nnz,
        token: {mean, std, min, p50, p90, p99, max, frac_zero_rows, max_over_mean},
        neuron: {frac_dead, mean, p50, p99, max, cv, top1pct_share},
        tiles: {tile_width, max_count: {p50, p99, max},
                capacity: {C: slots}, overflow_rows_frac: {C: fraction}}

    ``overflow_rows_frac[C]`` is the share of rows with at least one tile holding
    more non-zeros than a twell TwELL tile of compression ``C`` stores
    (``tile_width // C`` slots); such rows go to the dense backup.
    """
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be a Problem, got {type(problem).__name__}")
    rows_total = problem.m
    rows = rows_total if max_rows is None else min(rows_total, B.check_int(max_rows, "max_rows", minimum=1))
    tile_width = B.check_int(tile_width, "tile_width", minimum=1)
    xp = problem.xp
    n = problem.n
    acc = np.float64 if problem.dtype == np.float64 else np.float32
    wg = problem.w_gate.astype(acc)
    x = problem.x
    n_tiles = -(-n // tile_width)
    pad = n_tiles * tile_width - n
    chunk = max(1, int(chunk_elements) // max(n, 1))

    token_counts = xp.empty(rows, dtype=np.int32)
    tile_max = xp.empty(rows, dtype=np.int32)
    neuron_counts = xp.zeros(n, dtype=np.int64)
    for s in range(0, rows, chunk):
        e = min(rows, s + chunk)
        z = x[s:e].astype(acc) @ wg.T
        act = z > 0
        del z
        token_counts[s:e] = act.sum(axis=1)
        neuron_counts += act.sum(axis=0)
        if pad:
            act = xp.concatenate([act, xp.zeros((e - s, pad), dtype=bool)], axis=1)
        tile_max[s:e] = act.reshape(e - s, n_tiles, tile_width).sum(axis=2).max(axis=1)
        del act

    tc = _host(token_counts).astype(np.int64)
    nc = _host(neuron_counts).astype(np.int64)
    tm = _host(tile_max).astype(np.int64)
    mean_t = float(tc.mean())
    nc_sorted = np.sort(nc)[::-1]
    top = max(1, int(math.ceil(0.01 * n)))
    total = int(nc.sum())
    capacity = {}
    overflow = {}
    for c in compressions:
        c = int(c)
        if c < 1 or tile_width % c:
            continue
        slots = tile_width // c
        capacity[str(c)] = slots
        overflow[str(c)] = float((tm > slots).mean())
    return {
        "rows": int(rows),
        "rows_total": int(rows_total),
        "n": int(n),
        "nnz": total,
        "token": {
            "mean": mean_t,
            "std": float(tc.std()),
            "min": int(tc.min()),
            "p50": _pct(tc, 50),
            "p90": _pct(tc, 90),
            "p99": _pct(tc, 99),
            "max": int(tc.max()),
            "frac_zero_rows": float((tc == 0).mean()),
            "max_over_mean": float(tc.max() / mean_t) if mean_t > 0 else float("inf"),
        },
        "neuron": {
            "frac_dead": float((nc == 0).mean()),
            "mean": float(nc.mean()),
            "p50": _pct(nc, 50),
            "p99": _pct(nc, 99),
            "max": int(nc.max()),
            "cv": float(nc.std() / nc.mean()) if nc.mean() > 0 else float("nan"),
            "top1pct_share": float(nc_sorted[:top].sum() / total) if total else float("nan"),
        },
        "tiles": {
            "tile_width": int(tile_width),
            "max_count": {"p50": _pct(tm, 50), "p99": _pct(tm, 99), "max": int(tm.max())},
            "capacity": capacity,
            "overflow_rows_frac": overflow,
        },
    }
