"""Output: the fixed-width tables printed while the bench runs, the results JSON, the speedup plot.

Inference table: per case and implementation the eager median / p20 / p80, graph and queued medians (ms),
the three speedups and the ``--check`` error (``FAIL`` when it failed); the fastest dense is starred.
Training table (``results["train"]``): step / graph / forward medians, speedups, peak and saved MiB, l0
and backup rows (twell), max error and its ratio to the best dense error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .config import TASKS

__all__ = ["table_header", "format_table", "all_cases", "write_json", "plot_series", "plot_results"]

_CASE_COLS = [("case", 22, "<"), ("M", 7, ">"), ("mean", 6, ">"), ("p99", 6, ">"), ("max", 6, ">")]
_INFER_COLS = [("impl", 16, "<"), ("median ms", 10, ">"), ("p20", 9, ">"), ("p80", 9, ">"),
               ("graph ms", 9, ">"), ("queued ms", 10, ">"), ("speedup", 8, ">"), ("spd graph", 9, ">"),
               ("spd queued", 10, ">"), ("spd inter", 9, ">"), ("rel err", 9, ">")]
_TRAIN_COLS = [("impl", 17, "<"), ("step ms", 9, ">"), ("p20", 9, ">"), ("p80", 9, ">"), ("graph ms", 9, ">"),
               ("queued ms", 10, ">"), ("fwd ms", 9, ">"), ("speedup", 7, ">"), ("spd graph", 9, ">"),
               ("spd queued", 10, ">"), ("spd fwd", 7, ">"), ("spd inter", 9, ">"),
               ("peak MiB", 8, ">"), ("saved MiB", 9, ">"), ("l0", 6, ">"), ("backup", 6, ">"),
               ("max err", 9, ">"), ("err/dense", 9, ">")]
_COLS = _CASE_COLS + _INFER_COLS  # the inference table
_TASK_COLS = {"infer": _COLS, "train": _CASE_COLS + _TRAIN_COLS}
_TRAIN_TITLE = ("training: one fwd+bwd step (step/fwd ms: medians; speedups vs the fastest dense; "
                "err: max rel. error over y, dx, dW)")


def _fmt_row(values, cols=_COLS) -> str:
    return "  ".join(f"{str(v):{a}{w}}" for v, (_, w, a) in zip(values, cols)).rstrip()


def _f(v, fmt):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def table_header(task: str = "infer") -> str:
    cols = _TASK_COLS[task]
    head = _fmt_row([c for c, _, _ in cols], cols)
    return (_TRAIN_TITLE + "\n" if task == "train" else "") + head + "\n" + "-" * len(head)


def _err_cell(err: float | None, r: dict) -> str:
    return _f(err, ".2e") + (" FAIL" if r.get("check_ok") is False else "")


def _infer_cells(r: dict) -> list:
    e, g, q = r.get("eager") or {}, r.get("graph") or {}, r.get("queued") or {}
    return [_f(e.get("median_ms"), ".4f"), _f(e.get("p20_ms"), ".4f"), _f(e.get("p80_ms"), ".4f"),
            _f(g.get("median_ms"), ".4f"), _f(q.get("median_ms"), ".4f"), _f(r.get("speedup"), ".2f"),
            _f(r.get("speedup_graph"), ".2f"), _f(r.get("speedup_queued"), ".2f"), _f(r.get("speedup_interleaved"), ".2f"),
            _err_cell(r.get("rel_err"), r)]


def _train_cells(r: dict) -> list:
    e, g, fw, q = r.get("eager") or {}, r.get("graph") or {}, r.get("forward") or {}, r.get("queued") or {}
    st = r.get("stats") or {}
    return [_f(e.get("median_ms"), ".3f"), _f(e.get("p20_ms"), ".3f"), _f(e.get("p80_ms"), ".3f"),
            _f(g.get("median_ms"), ".3f"), _f(q.get("median_ms"), ".3f"), _f(fw.get("median_ms"), ".3f"),
            _f(r.get("speedup"), ".2f"), _f(r.get("speedup_graph"), ".2f"), _f(r.get("speedup_queued"), ".2f"),
            _f(r.get("speedup_forward"), ".2f"),
            _f(r.get("speedup_interleaved"), ".2f"), _f(r.get("peak_mib"), ".0f"),
            _f(r.get("saved_mib"), ".1f"), _f(st.get("l0"), ".1f"), _f(st.get("n_backup_rows"), "d"),
            _err_cell(r.get("max_rel_err"), r), _f(r.get("err_vs_dense"), ".2f")]


def _table_lines(cases: list, task: str) -> list:
    cols, cells = _TASK_COLS[task], (_train_cells if task == "train" else _infer_cells)
    lines = []
    for case in cases:
        real = (case.get("realised") or {}).get("token", {})
        base = [case["name"], case["m"], _f(real.get("mean"), ".1f"), _f(real.get("p99"), ".0f"),
                _f(real.get("max"), "d") if real.get("max") is not None else "-"]
        if case.get("error"):
            lines.append(_fmt_row(base + ["ERROR: " + case["error"]], cols))
            continue
        dense = case.get("dense") or {}
        for name, r in case.get("impls", {}).items():
            label = name + ("*" if name == dense.get("best") else "")
            if r.get("error"):
                lines.append(_fmt_row(base + [label, "ERROR: " + r["error"]], cols))
            else:
                lines.append(_fmt_row(base + [label] + cells(r), cols))
    return lines


def format_table(results: dict, *, header: bool = True) -> str:
    """Fixed-width tables of a results dict: inference cases, then training cases (``results["train"]``)."""
    blocks = []
    train = results.get("train")
    if results.get("cases") or train is None:
        blocks.append(([table_header("infer")] if header else []) + _table_lines(results.get("cases", []), "infer"))
    if train is not None:
        blocks.append(([table_header("train")] if header else []) + _table_lines(train.get("cases", []), "train"))
    return ("\n\n" if header else "\n").join("\n".join(b) for b in blocks)


def all_cases(results: dict):
    """``(task, case)`` for every inference and training case."""
    for case in results.get("cases", []):
        yield "infer", case
    for case in (results.get("train") or {}).get("cases", []):
        yield "train", case


def _json_clean(obj):
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return _json_clean(obj.tolist())
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def write_json(results: dict, path) -> None:
    """Write ``results`` as strict JSON (non-finite floats become null)."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_json_clean(results), f, indent=1, allow_nan=False)
        f.write("\n")



#: line style of each plotted mode, marker of each problem kind.
_MODE_STYLE = {"eager": "-", "queued": (0, (5, 1)), "graph": "--", "train eager": "-.",
               "train queued": (0, (3, 1, 1, 1, 1, 1)), "train graph": ":"}
_KIND_MARKER = {"uniform": "o", "token_skew": "s", "neuron_skew": "^"}


def plot_series(results: dict) -> dict:
    """``{(impl, mode, kind, M): [(realised mean active, speedup), ...]}``: the lines of :func:`plot_results`.

    Per task the sweep cases if there are any, else every case; ``mode`` is "eager" / "queued" / "graph" for
    inference and "train eager" / "train queued" / "train graph" for training.  One line per implementation,
    mode, kind (each kind of a multi-kind sweep is its own line) and M; points sorted by the realised mean.
    """
    series: dict = {}
    for task in TASKS:
        every = [c for t, c in all_cases(results) if t == task]
        for c in [c for c in every if c.get("sweep")] or every:
            real = (c.get("realised") or {}).get("token", {}).get("mean")
            if real is None:
                continue
            for name, r in (c.get("impls") or {}).items():
                for mode, key in (("eager", "speedup"), ("queued", "speedup_queued"), ("graph", "speedup_graph")):
                    s = r.get(key)
                    if s is not None:
                        label = mode if task == "infer" else f"train {mode}"
                        series.setdefault((name, label, c["kind"], c["m"]), []).append((real, s))
    for pts in series.values():
        pts.sort()
    return series


def plot_results(results, out_path) -> Path:
    """Speedup vs realised mean active neurons per token (:func:`plot_series`), one line per implementation,
    mode and kind: colour = implementation, line style = mode, marker = kind.

    ``results`` is a results dict or the path of a bench JSON.  Needs matplotlib.
    """
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as exc:
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib (or twell[plot])") from exc
    if not isinstance(results, dict):
        with open(results) as f:
            results = json.load(f)
    series = plot_series(results)
    if not series:
        raise ValueError("no speedups to plot in these results (no case has timings)")
    names = sorted({key[0] for key in series})
    colours = {name: f"C{i % 10}" for i, name in enumerate(names)}
    fig, ax = plt.subplots(figsize=(8, 5))
    for (name, mode, kind, m), pts in sorted(series.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colours[name], linestyle=_MODE_STYLE.get(mode, "-"),
                marker=_KIND_MARKER.get(kind, "x"), label=f"{name} ({mode}) {kind} M={m}")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("realised mean active neurons per token")
    ax.set_ylabel("speedup vs fastest dense")
    dev = (results.get("meta") or {}).get("device") or {}
    ax.set_title(f"twell bench — {dev.get('name', results.get('meta', {}).get('backend', ''))}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path
