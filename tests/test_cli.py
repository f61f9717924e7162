"""``python -m twell {info,bench,plot}`` on the CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from twell import _backend
from twell.bench import cases, checks, config, dense_host, elementwise, env, report, runners, timing
from twell.bench import impls as bench_impls
from twell.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
HAS_GPU = _backend.cupy_or_none() is not None
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
INFO_KEYS = {"twell", "python", "numpy", "scipy", "cupy", "cuda_available", "nvrtc_version", "cuda_runtime_version",
             "devices", "arch", "cupy_cache_dir", "cuda_src_dir"}
SMALL = ["--d", "64", "--n", "512", "--budget", "0.02", "--warmup", "1"]


def _run(*args, timeout=120):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "twell", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------------------- info
def test_info_text():
    r = _run("info")
    assert r.returncode == 0, r.stderr
    for key in ("twell", "numpy", "scipy", "cupy", "cuda_available", "nvrtc_version", "cupy_cache_dir",
                "cuda_src_dir"):
        assert key in r.stdout


def test_info_json():
    r = _run("info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert INFO_KEYS <= set(info)
    assert info["twell"] == __import__("twell").__version__
    assert info["numpy"] == np.__version__
    assert isinstance(info["cuda_available"], bool)
    assert isinstance(info["devices"], list)
    if not info["cuda_available"]:
        assert info["devices"] == [] and info["arch"] is None


def test_arch_for():
    assert env.arch_for((9, 0)) == "sm_90a"
    assert env.arch_for((8, 0)) == "sm_80"
    assert env.arch_for((10, 0)) == "sm_100"


# ---------------------------------------------------------------------------- bench (CPU)
def _check_results(res, n_cases):
    assert res["schema"] == config.JSON_SCHEMA
    meta = res["meta"]
    for key in ("date", "command", "git_revision", "backend", "device", "environment", "timer"):
        assert key in meta
    assert "twell" in meta["command"] and "bench" in meta["command"]
    assert INFO_KEYS <= set(meta["environment"])
    assert len(res["cases"]) == n_cases
    for case in res["cases"]:
        assert "error" not in case, case.get("error")
        for key in ("name", "kind", "m", "d", "n", "dtype", "mean_active_target", "realised", "impls", "dense",
                    "problem"):
            assert key in case
        assert set(case["realised"]) >= {"token", "neuron", "tiles"}
        for r in case["impls"].values():
            assert "error" not in r, r.get("error")
            e = r["eager"]
            assert e["median_ms"] > 0 and e["p20_ms"] <= e["median_ms"] <= e["p80_ms"] and e["n_repeat"] >= 1


@pytest.mark.skipif(HAS_GPU, reason="the CPU bench path needs a machine without a GPU (or --backend cpu)")
def test_bench_subprocess_cpu(tmp_path):
    out = tmp_path / "out.json"
    r = _run("bench", "--m", "64", "--kind", "uniform,token_skew", "--d", "128", "--n", "512", "--json", str(out),
             "--budget", "0.05")
    assert r.returncode == 0, r.stderr
    assert "median ms" in r.stdout and "uniform/29" in r.stdout and "token_skew/29" in r.stdout
    assert "dense_numpy" in r.stdout
    res = json.loads(out.read_text())
    _check_results(res, 2)
    assert res["meta"]["backend"] == "cpu" and res["meta"]["device"] is None
    assert [c["kind"] for c in res["cases"]] == ["uniform", "token_skew"]
    for case in res["cases"]:
        assert case["m"] == 64 and case["d"] == 128 and case["n"] == 512
        dn = case["impls"]["dense_numpy"]
        assert dn["speedup"] == pytest.approx(1.0)
        assert dn["graph"] is None
        assert case["dense"]["best"] == "dense_numpy"
    # the reference runs when twell.reference.gated_ffn exists, else a note says why not
    assert "reference" in res["cases"][0]["impls"] or any("reference" in s for s in res["notes"])


def test_bench_in_process_check_and_registry(tmp_path, capsys):
    def fake(problem):
        x, wg, wu, wd = (a.astype(np.float32) for a in problem.arrays())
        return (np.maximum(x @ wg.T, 0) * (x @ wu.T)) @ wd

    def wrong(problem):
        return np.zeros((problem.m, problem.d), np.float32)

    def broken(problem):
        raise RuntimeError("kaputt")

    bench_impls.register_sparse("fake_sparse", fake, backend="numpy")
    bench_impls.register_sparse("wrong_sparse", wrong, backend="numpy")
    bench_impls.register_sparse("broken_sparse", broken, backend="numpy")
    try:
        out = tmp_path / "r.json"
        rc = main(["bench", "--backend", "cpu", "--m", "32", "--kind", "neuron_skew", "--mean", "16,40", "--check",
                   "--check-rows", "16", "--json", str(out), *SMALL])
        text = capsys.readouterr()
        assert rc == 1  # wrong_sparse fails the check, broken_sparse errors
        assert "CHECK FAILED" in text.err and "wrong_sparse" in text.err
        res = json.loads(out.read_text())
        assert len(res["cases"]) == 2
        for case in res["cases"]:
            assert case["check"]["rows"] == 16
            assert case["impls"]["fake_sparse"]["check_ok"] is True
            assert case["impls"]["fake_sparse"]["rel_err"] < 1e-5
            assert case["impls"]["dense_numpy"]["check_ok"] is True
            assert case["impls"]["wrong_sparse"]["check_ok"] is False
            assert case["impls"]["wrong_sparse"]["rel_err"] == pytest.approx(1.0)
            assert "kaputt" in case["impls"]["broken_sparse"]["error"]
            assert case["impls"]["fake_sparse"]["speedup"] > 0
            assert case["dense"]["best"] == "dense_numpy"
        assert "ERROR: RuntimeError: kaputt" in text.out
        assert "FAIL" in text.out
    finally:
        for name in ("fake_sparse", "wrong_sparse", "broken_sparse"):
            bench_impls.unregister(name)
    assert "fake_sparse" not in bench_impls.IMPLS


def test_bench_sweep_cpu(tmp_path, capsys):
    out = tmp_path / "s.json"
    rc = main(["bench", "--backend", "cpu", "--sweep", "--sweep-m", "16", "--impl", "dense_numpy", "--json", str(out),
               "--quiet", *SMALL])
    text = capsys.readouterr()
    assert rc == 0, text.err
    res = json.loads(out.read_text())
    means = [c["mean_active_target"] for c in res["cases"]]
    assert config.SWEEP_MEANS == (8, 29, 64, 128, 256, 512, 1500, 5632)
    assert means == [m for m in config.SWEEP_MEANS if m <= 512]       # uniform: mean n (all active) runs
    assert all(c["sweep"] and c["m"] == 16 and c["kind"] == "uniform" for c in res["cases"])
    for skipped in (1500, 5632):  # not in (0, n = 512]: a note each
        assert sum(f"sweep mean {skipped} skipped" in note for note in res["notes"]) == 1
    assert list(res["cases"][0]["impls"]) == ["dense_numpy"]
    assert "median ms" in text.out  # --quiet prints the final table


def test_format_table_handles_errors_and_missing_values():
    res = {"cases": [
        {"name": "uniform/29", "m": 8, "error": "ValueError: boom"},
        {"name": "uniform/29", "m": 8, "realised": {"token": {"mean": 1.0, "p99": 2.0, "max": 3}},
         "dense": {"best": "a"},
         "impls": {"a": {"eager": {"median_ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.1}, "graph": None,
                         "speedup": 1.0, "speedup_graph": None, "rel_err": float("inf"), "check_ok": False},
                   "b": {"error": "RuntimeError: x"}}},
    ]}
    text = report.format_table(res)
    assert "ERROR: ValueError: boom" in text and "a*" in text and "FAIL" in text and "ERROR: RuntimeError: x" in text


def test_queued_speedup_uses_the_fastest_dense_queued_or_graph_time():
    t = lambda ms: {"median_ms": ms, "p20_ms": ms, "p80_ms": ms}  # noqa: E731
    impls = {
        "dense_a": {"dense": True, "backend": "cupy", "eager": t(2.0), "graph": t(1.6), "queued": t(1.9)},
        "dense_b": {"dense": True, "backend": "cupy", "eager": t(1.8), "graph": None, "queued": t(1.7)},
        "sparse": {"dense": False, "backend": "twell", "eager": t(1.2), "graph": None, "queued": t(0.8)},
    }
    dense = runners.summarise_dense(impls)
    assert dense["best_ms"] == 1.8 and dense["best_graph_ms"] == 1.6
    assert (dense["best_queued"], dense["best_queued_ms"]) == ("dense_a", 1.6)   # the graph replay is faster
    runners.add_speedups(impls, dense)
    assert impls["sparse"]["speedup"] == pytest.approx(1.5)
    assert impls["sparse"]["speedup_queued"] == pytest.approx(2.0)
    assert impls["sparse"]["speedup_graph"] is None
    impls["dense_b"]["check_ok"] = False                                       # failed --check: not a baseline
    impls["dense_a"]["graph"] = None
    dense = runners.summarise_dense(impls)
    assert (dense["best_queued"], dense["best_queued_ms"]) == ("dense_a", 1.9)


def test_write_json_is_strict(tmp_path):
    p = tmp_path / "x.json"
    report.write_json({"a": float("nan"), "b": np.float32(1.5), "c": np.int64(3), "d": (1, 2), "e": np.bool_(True)}, p)
    assert json.loads(p.read_text()) == {"a": None, "b": 1.5, "c": 3, "d": [1, 2], "e": True}


def test_time_cpu_statistics():
    t = timing.time_cpu(lambda: sum(range(1000)), budget_s=0.01).to_dict()
    assert t["n_repeat"] >= 3 and t["p20_ms"] <= t["median_ms"] <= t["p80_ms"]
    slow = timing.time_cpu(lambda: __import__("time").sleep(0.03), budget_s=0.01).to_dict()
    assert slow["n_repeat"] == 1


def test_time_interleaved_rotates_and_times_every_function():
    import time as _time
    calls = []

    def f(name, seconds):
        def run():
            calls.append(name)
            _time.sleep(seconds)
        return run
    res = timing.time_interleaved({"a": f("a", 0.001), "b": f("b", 0.003)}, budget_s=0.02, warmup=1, gpu=False)
    a, b = res["a"].to_dict(), res["b"].to_dict()
    assert a["n_repeat"] == b["n_repeat"] >= timing.MIN_REPEAT
    assert b["median_ms"] > a["median_ms"] + 1.0
    timed = calls[2:]                                   # after one warm-up call each
    assert timed[:4] == ["a", "b", "b", "a"]            # one call each per round, the order rotating
    assert timing.time_interleaved({}, budget_s=0.01, warmup=1, gpu=False) == {}


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_bench_interleave_cpu(mode, tmp_path, capsys):
    """--interleave adds eager_interleaved to every implementation and the speedups against the fastest
    dense one of that timing."""
    out = tmp_path / "i.json"
    impls = "dense_numpy,reference" if mode == "infer" else "dense_numpy_train,reference_train"
    rc = main(["bench", "--backend", "cpu", "--mode", mode, "--m", "16", "--interleave", "--impl", impls,
               "--json", str(out), *SMALL])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "spd inter" in text.out
    res = json.loads(out.read_text())
    cases = res["cases"] if mode == "infer" else res["train"]["cases"]
    for case in cases:
        dense = case["dense"]
        assert dense["best_interleaved"] == impls.split(",")[0]
        for name in impls.split(","):
            r = case["impls"][name]
            assert r["eager_interleaved"]["n_repeat"] >= timing.MIN_REPEAT
            assert r["speedup_interleaved"] == pytest.approx(
                dense["best_interleaved_ms"] / r["eager_interleaved"]["median_ms"])


# ---------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("args,word", [
    (["bench", "--m", "0"], "--m"),
    (["bench", "--m", "12,x"], "--m"),
    (["bench", "--kind", "uniform,foo"], "--kind"),
    (["bench", "--mean", "600", "--n", "512"], "--mean"),
    (["bench", "--mean", "-3"], "--mean"),
    (["bench", "--dtype", "int8"], "--dtype"),
    (["bench", "--impl", "nope"], "--impl"),
    (["bench", "--d", "1"], "--d"),
    (["bench", "--budget", "0"], "--budget"),
    (["bench", "--sweep", "--m", "8"], "--sweep"),
    (["bench", "--dead-fraction", "1.5"], "--dead-fraction"),
    (["bench", "--json", "/nonexistent-dir-twell/x.json"], "--json"),
    (["bench", "--mode", "training"], "--mode"),
    (["bench", "--train"], "--train"),
    (["bench", "--mode", "train", "--l1-weight", "-1"], "--l1-weight"),
    (["bench", "--mode", "train", "--l1-weight", "nan"], "--l1-weight"),
    (["bench", "--mode", "train", "--impl", "dense_numpy"], "--impl"),
    (["bench", "--mode", "both", "--impl", "dense_numpy_train"], "--impl"),
    (["bench", "--mode", "train", "--sweep", "--m", "8"], "--sweep"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
])
def test_bad_cli_arguments(args, word, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert word in capsys.readouterr().err


def test_bad_arguments_subprocess():
    r = _run("bench", "--m", "-4")
    assert r.returncode == 2 and "--m" in r.stderr
    r = _run("bench", "--kind", "sideways")
    assert r.returncode == 2 and "kind" in r.stderr
    r = _run("bench", "--mode", "train", "--m", "0")
    assert r.returncode == 2 and "--m" in r.stderr
    r = _run("bench", "--mode", "sideways")
    assert r.returncode == 2 and "--mode" in r.stderr


def test_help_documents_training():
    r = _run("bench", "--help")
    assert r.returncode == 0, r.stderr
    for word in ("--mode", "{infer,train,both}", "--l1-weight", "dense_cupy_train", "torch_autograd", "twell_train",
                 "peak MiB", "saved MiB"):
        assert word in r.stdout, word


@pytest.mark.skipif(HAS_GPU, reason="a GPU is available")
def test_backend_gpu_without_gpu(capsys):
    rc = main(["bench", "--backend", "gpu", "--m", "8", *SMALL])
    assert rc == 1
    assert "gpu" in capsys.readouterr().err.lower()


# ---------------------------------------------------------------------------- the twell.bench package
BENCH_DIR = ROOT / "twell" / "bench"
#: what the bench may import from twell besides its own modules: the public API, the cuBLAS binding, the loader.
ALLOWED_TWELL_MODULES = {"twell", "twell._backend", "twell.synthetic", "twell.reference", "twell.runtime.blas",
                         "twell.runtime.loader"}
#: module globals of the library that the bench must neither read nor write.
LIBRARY_SWITCHES = {"FUSED_FORWARD", "WGMMA_CLUSTER", "WGMMA_CLUSTERS", "TRAINING_AUTO_FUSED",
                    "READBACK_SIDE_STREAM"}


def _bench_sources():
    return sorted(BENCH_DIR.glob("*.py"))


def _bench_imports(path):
    """``(module, name)`` of every import statement of a bench module (nested ones too), relative imports
    resolved; ``name`` is None for ``import module`` and the imported name for ``from module import name``."""
    import ast
    pkg = ["twell", "bench"]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(pkg[:len(pkg) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            out += [(module, a.name) for a in node.names]
    return out


def _bench_module_of(module, name):
    """The twell.bench module an import refers to (``from . import x`` names the submodule x), else None."""
    if name is not None and module == "twell.bench" and (BENCH_DIR / f"{name}.py").exists():
        return f"twell.bench.{name}"
    return module if module.startswith("twell.bench") else None


def test_bench_is_a_package_of_small_modules():
    assert not (ROOT / "twell" / "bench.py").exists()
    sizes = {p.name: len(p.read_text().splitlines()) for p in _bench_sources()}
    assert {"__init__.py", "env.py", "timing.py", "impls.py", "cases.py", "report.py", "cli.py"} <= set(sizes)
    assert {name: n for name, n in sizes.items() if n > 500} == {}


def test_bench_does_not_import_twell_kernels():
    """Statically: only public twell API, twell.runtime.blas / loader and the bench's own modules (no private
    names across modules, no library switches); at run time: importing every bench module and building the
    command line leaves twell.kernels unimported."""
    import ast

    import twell
    public = set(twell.__all__) | {"synthetic", "reference", "_backend", "runtime"}
    for path in _bench_sources():
        for module, name in _bench_imports(path):
            where = f"{path.name}: from {module} import {name}" if name else f"{path.name}: import {module}"
            assert not module.startswith("twell.kernels") and not (module == "twell" and name == "kernels"), where
            if _bench_module_of(module, name) is not None:
                assert name is None or not name.startswith("_"), where
            elif module == "twell" or module.startswith("twell."):
                full = f"{module}.{name}" if name and f"{module}.{name}" in ALLOWED_TWELL_MODULES else module
                assert full in ALLOWED_TWELL_MODULES, where
                assert module != "twell" or name is None or name in public, where
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                assert node.attr not in LIBRARY_SWITCHES, f"{path.name}:{node.lineno}: {node.attr}"
                if isinstance(node.value, ast.Name) and node.value.id == "twell":
                    assert node.attr in public, f"{path.name}:{node.lineno}: twell.{node.attr}"
            if isinstance(node, ast.Name):
                assert node.id not in LIBRARY_SWITCHES, f"{path.name}:{node.lineno}: {node.id}"
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "import_module", "__import__"):
                args = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                assert not any(a.startswith("twell") for a in args), f"{path.name}:{node.lineno}: {args}"
    assert "twell_fused_forward" not in bench_impls.IMPLS
    code = ("import sys, pkgutil, importlib, twell.bench as b\n"
            "for m in pkgutil.iter_modules(b.__path__): importlib.import_module('twell.bench.' + m.name)\n"
            "from twell.__main__ import build_parser\n"
            "build_parser().parse_args(['bench'])\n"
            "b.environment_info()\n"
            "print(sorted(m for m in sys.modules if m.startswith('twell.kernels')))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_bench_import_graph_is_acyclic():
    graph = {}
    for path in _bench_sources():
        me = "twell.bench" if path.name == "__init__.py" else f"twell.bench.{path.stem}"
        deps = {_bench_module_of(m, n) for m, n in _bench_imports(path)} - {None, me}
        graph[me] = deps
    assert graph["twell.bench"] == set()  # the package's names are imported lazily, on first access
    done, stack = set(), []

    def visit(mod):
        assert mod not in stack, f"import cycle: {' -> '.join([*stack[stack.index(mod):], mod])}"
        if mod in done:
            return
        stack.append(mod)
        for dep in sorted(graph.get(mod, ())):
            visit(dep)
        stack.pop()
        done.add(mod)
    for mod in sorted(graph):
        visit(mod)


def test_timing_imports_alone():
    code = ("import sys\n"
            "from twell.bench.timing import L2Flusher, capture_cupy_graph, capture_torch_graph, time_cpu, time_gpu\n"
            "assert time_cpu(lambda: None, budget_s=0.001).to_dict()['n_repeat'] >= 1\n"
            "print(sorted(m for m in sys.modules if m.startswith('twell.bench')))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['twell.bench', 'twell.bench.timing']"


def test_bench_package_attributes():
    import twell.bench as b
    assert b.time_gpu is timing.time_gpu and b.L2Flusher is timing.L2Flusher
    assert b.IMPLS is bench_impls.IMPLS and b.TrainProblem is cases.TrainProblem and b.make_dy is cases.make_dy
    assert b.format_table is report.format_table and b.environment_info is env.environment_info
    assert {"time_gpu", "bench_main", "register_sparse"} <= set(dir(b)) and set(b.__all__) <= set(dir(b))
    with pytest.raises(AttributeError):
        b.CublasGemm  # noqa: B018 - the bench's own cuBLAS binding is gone (twell.runtime.blas)


@pytest.mark.parametrize("mode", ["infer", "train", "both"])
def test_bench_sweep_per_kind_every_mode_cpu(mode, tmp_path, capsys):
    """--sweep with two kinds: one sweep per kind and task, all in the JSON, one plot line per impl, mode and kind."""
    out = tmp_path / "k.json"
    names = {"infer": "dense_numpy", "train": "dense_numpy_train"}
    tasks = config.MODE_TASKS[mode]
    rc = main(["bench", "--backend", "cpu", "--mode", mode, "--sweep", "--sweep-m", "32", "--sweep-means", "8,29",
               "--kind", "uniform,token_skew", "--impl", ",".join(names[t] for t in tasks), "--json", str(out),
               "--quiet", *SMALL])
    text = capsys.readouterr()
    assert rc == 0, text.err
    res = json.loads(out.read_text())
    for task in config.TASKS:
        got = [(c["kind"], c["mean_active_target"]) for t, c in report.all_cases(res) if t == task]
        assert got == ([(k, m) for k in ("uniform", "token_skew") for m in (8, 29)] if task in tasks else [])
    assert ("train" in res) == ("train" in tasks)
    assert all(c["sweep"] and c["m"] == 32 and "error" not in c for _, c in report.all_cases(res))
    series = report.plot_series(res)
    label = {"infer": "eager", "train": "train eager"}
    assert set(series) == {(names[t], label[t], k, 32) for t in tasks for k in ("uniform", "token_skew")}
    for pts in series.values():
        assert len(pts) == 2 and pts[0][0] < pts[1][0]
    if HAS_MPL:
        assert report.plot_results(str(out), tmp_path / "k.png").stat().st_size > 0


# ---------------------------------------------------------------------------- plot
def test_plot_errors(tmp_path, capsys):
    rc = main(["plot", str(tmp_path / "missing.json"), str(tmp_path / "o.png")])
    assert rc == 1 and "cannot read" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    rc = main(["plot", str(bad), str(tmp_path / "o.png")])
    assert rc == 1 and "not valid JSON" in capsys.readouterr().err


@pytest.mark.skipif(HAS_MPL, reason="matplotlib is installed")
def test_plot_without_matplotlib(tmp_path, capsys):
    res = tmp_path / "r.json"
    report.write_json({"cases": []}, res)
    rc = main(["plot", str(res), str(tmp_path / "o.png")])
    assert rc == 1 and "matplotlib" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--plot", str(tmp_path / "o.png")])
    assert exc.value.code == 2 and "matplotlib" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed")
def test_plot_from_sweep(tmp_path, capsys):
    res = tmp_path / "s.json"
    png = tmp_path / "s.png"
    rc = main(["bench", "--backend", "cpu", "--sweep", "--sweep-m", "16", "--sweep-means", "8,29,64",
               "--json", str(res), "--plot", str(png), "--quiet", *SMALL])
    assert rc == 0, capsys.readouterr().err
    assert png.stat().st_size > 0
    png2 = tmp_path / "s2.png"
    assert main(["plot", str(res), str(png2)]) == 0 and png2.stat().st_size > 0


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_bench_gpu_small(tmp_path, capsys):
    out = tmp_path / "g.json"
    rc = main(["bench", "--backend", "gpu", "--m", "8,512", "--kind", "uniform,token_skew", "--d", "256", "--n", "1024",
               "--check", "--check-rows", "64", "--budget", "0.05", "--warmup", "2", "--interleave",
               "--impl", "dense_cupy,dense_cupy_cat,torch_eager", "--json", str(out)])
    text = capsys.readouterr()
    assert rc == 0, text.err
    res = json.loads(out.read_text())
    assert res["meta"]["backend"] == "gpu" and res["meta"]["device"]["sm_count"] > 0
    assert len(res["cases"]) == 4
    for case in res["cases"]:
        assert "error" not in case, case.get("error")
        assert case["flush_l2"] is True  # auto: M <= 4096
        for name in ("dense_cupy", "dense_cupy_cat"):
            r = case["impls"][name]
            assert "error" not in r, r.get("error")
            assert r["check_ok"] is True and r["rel_err"] < 1e-2
            assert r["eager"]["median_ms"] > 0
            assert r["graph"] is not None, r.get("graph_error")
            assert r["graph_rel_err"] == pytest.approx(r["rel_err"], rel=1e-6, abs=1e-12)
            assert r["eager_interleaved"]["median_ms"] > 0, r.get("interleave_error")
        assert case["dense"]["cupy_best"] in ("dense_cupy", "dense_cupy_cat")
        assert case["dense"]["best_interleaved"] in ("dense_cupy", "dense_cupy_cat", "torch_eager")
        if "torch_eager" in case["impls"]:
            t = case["impls"]["torch_eager"]
            assert "error" not in t, t.get("error")
            assert t["check_ok"] is True


# ---------------------------------------------------------------------------- training benchmark (CPU)
TRAIN_IMPL_KEYS = {"backend", "dense", "eager", "graph", "forward", "peak_bytes", "peak_mib", "rel_err", "check_ok",
                   "speedup", "speedup_graph", "speedup_forward"}


def _check_train_results(res, n_cases, impls=("dense_numpy_train", "reference_train")):
    assert res["schema"] == config.JSON_SCHEMA
    for key in ("date", "command", "git_revision", "backend", "device", "environment", "timer"):
        assert key in res["meta"]
    train = res["train"]
    assert set(train) >= {"l1_weight", "method", "impls", "cases"}
    assert set(train["method"]) >= {"step", "timer", "peak_memory", "check", "speedup"}
    assert list(train["impls"]) == list(impls)
    assert len(train["cases"]) == n_cases
    for case in train["cases"]:
        assert "error" not in case, case.get("error")
        for key in ("name", "kind", "m", "d", "n", "dtype", "mean_active_target", "realised", "impls", "dense",
                    "problem", "l1_weight", "dy"):
            assert key in case
        assert list(case["impls"]) == list(impls)
        assert case["dense"]["best"] == "dense_numpy_train" and case["dense"]["best_forward"] == "dense_numpy_train"
        for name, r in case["impls"].items():
            assert "error" not in r, r.get("error")
            assert TRAIN_IMPL_KEYS <= set(r), name
            for timing in ("eager", "forward"):
                t = r[timing]
                assert t["median_ms"] > 0 and t["p20_ms"] <= t["median_ms"] <= t["p80_ms"]
            assert r["graph"] is None and r["graph_error"] == "no GPU"
            assert r["peak_bytes"] is None  # not measured on the CPU
            assert r["speedup"] > 0 and r["speedup_forward"] > 0
        ref = case["impls"].get("reference_train")
        if ref is not None:
            assert ref["saved_bytes"] > 0 and ref["saved_mib"] == pytest.approx(ref["saved_bytes"] / 2**20)
            assert ref["stats"]["l0"] == pytest.approx(case["realised"]["token"]["mean"], rel=1e-6)
            assert ref["stats"]["nnz"] > 0 and ref["stats"]["n_backup_rows"] >= 0


@pytest.mark.skipif(HAS_GPU, reason="the CPU bench path needs a machine without a GPU (or --backend cpu)")
def test_bench_train_subprocess_cpu(tmp_path):
    out = tmp_path / "out.json"
    r = _run("bench", "--mode", "train", "--m", "64", "--d", "64", "--n", "256", "--json", str(out),
             "--budget", "0.02")
    assert r.returncode == 0, r.stderr
    assert "training: one fwd+bwd step" in r.stdout and "step ms" in r.stdout and "peak MiB" in r.stdout
    assert "dense_numpy_train*" in r.stdout and "reference_train" in r.stdout
    assert "median ms" not in r.stdout  # no inference table
    res = json.loads(out.read_text())
    assert res["meta"]["backend"] == "cpu" and res["config"]["mode"] == "train"
    assert res["cases"] == [] and res["impls"] == {}
    _check_train_results(res, 1)
    case = res["train"]["cases"][0]
    assert (case["m"], case["d"], case["n"], case["kind"]) == (64, 64, 256, "uniform")
    assert case["impls"]["dense_numpy_train"]["speedup"] == pytest.approx(1.0)
    assert case["impls"]["dense_numpy_train"]["rel_err"] is None  # no --check


def test_bench_train_check_and_registry(tmp_path, capsys):
    def good(tp):
        arrays = [np.asarray(a, np.float32) for a in (*tp.arrays(), tp.dy)]
        return lambda: dense_host.dense_train_math(*arrays, tp.l1_weight)

    def wrong(tp):
        def run():
            outs = good(tp)()
            return (outs[0], outs[1], outs[2], outs[3], np.zeros_like(outs[4]))  # dw_down missing
        return run

    def broken(tp):
        raise RuntimeError("kaputt")

    bench_impls.register_train("good_train", good, backend="numpy")
    bench_impls.register_train("wrong_train", wrong, backend="numpy")
    bench_impls.register_train("broken_train", broken, backend="numpy")
    try:
        out = tmp_path / "t.json"
        rc = main(["bench", "--backend", "cpu", "--mode", "train", "--m", "48", "--kind", "token_skew,neuron_skew",
                   "--mean", "20", "--l1-weight", "0.05", "--check", "--json", str(out), *SMALL])
        text = capsys.readouterr()
        assert rc == 1  # wrong_train fails the check, broken_train errors
        assert "CHECK FAILED" in text.err and "wrong_train" in text.err and "kaputt" in text.err
        res = json.loads(out.read_text())
        train = res["train"]
        assert train["l1_weight"] == 0.05 and len(train["cases"]) == 2
        for case in train["cases"]:
            assert case["check"]["outputs"] == list(checks.TRAIN_OUTPUTS) and case["check"]["rows"] == 48
            impls = case["impls"]
            for name in ("dense_numpy_train", "reference_train", "good_train"):
                r = impls[name]
                assert r["check_ok"] is True, (name, r["rel_err"])
                assert set(r["rel_err"]) == set(checks.TRAIN_OUTPUTS)
                assert r["max_rel_err"] < 1e-5 and r["err_vs_dense"] < 2.5
            # the float64 reference rounds once at the end: at least as accurate as float32 dense
            assert impls["reference_train"]["max_rel_err"] <= impls["dense_numpy_train"]["max_rel_err"]
            w = impls["wrong_train"]
            assert w["check_ok"] is False and w["rel_err"]["dw_down"] == pytest.approx(1.0)
            assert w["rel_err"]["y"] < 1e-5 and w["check_limit"]["y"] > w["rel_err"]["y"]
            assert "kaputt" in impls["broken_train"]["error"]
            assert case["dense"]["best"] == "dense_numpy_train"
        assert "ERROR: RuntimeError: kaputt" in text.out and "FAIL" in text.out
    finally:
        for name in ("good_train", "wrong_train", "broken_train"):
            bench_impls.unregister(name)


def test_bench_mode_both_sweep_cpu(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = main(["bench", "--backend", "cpu", "--mode", "both", "--sweep", "--sweep-m", "32", "--sweep-means", "8,29",
               "--impl", "dense_numpy,dense_numpy_train", "--json", str(out), "--quiet", *SMALL])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "median ms" in text.out and "step ms" in text.out  # --quiet prints both final tables
    res = json.loads(out.read_text())
    assert [c["mean_active_target"] for c in res["cases"]] == [8, 29]
    assert [c["mean_active_target"] for c in res["train"]["cases"]] == [8, 29]
    assert all(c["sweep"] and c["m"] == 32 for _, c in report.all_cases(res))
    assert list(res["impls"]) == ["dense_numpy"] and list(res["train"]["impls"]) == ["dense_numpy_train"]
    assert list(res["train"]["cases"][0]["impls"]) == ["dense_numpy_train"]


def test_train_default_m_and_dy():
    cfg = config.BenchConfig(mode="train")
    assert [c.m for c in cases.plan_cases(cfg, gpu=True, task="train")[0]] == list(config.GPU_DEFAULT_TRAIN_M)
    assert [c.m for c in cases.plan_cases(cfg, gpu=False, task="train")[0]] == list(config.CPU_DEFAULT_TRAIN_M)
    assert [c.m for c in cases.plan_cases(cfg, gpu=False)[0]] == list(config.CPU_DEFAULT_M)
    from twell import synthetic
    p = synthetic.make_problem(16, 8, 32, mean_active=4)
    dy = cases.make_dy(p, 3)
    assert dy.shape == (16, 8) and dy.dtype == p.dtype
    assert np.array_equal(dy.view(np.uint16), cases.make_dy(p, 3).view(np.uint16))
    assert not np.array_equal(dy.view(np.uint16), cases.make_dy(p, 4).view(np.uint16))


@pytest.mark.parametrize("l1_weight", [0.0, 0.3])
def test_dense_train_math_matches_reference(l1_weight):
    from twell import reference
    rng = np.random.default_rng(5)
    m, d, n = 40, 12, 30
    x, wg, wu, wd, dy = (rng.standard_normal(s) for s in ((m, d), (n, d), (n, d), (n, d), (m, d)))
    outs = dense_host.dense_train_math(x, wg, wu, wd, dy, l1_weight)
    y, saved, _ = reference.gated_ffn_forward(x, wg, wu, wd, l1_weight=l1_weight)
    ref = (y, *reference.gated_ffn_backward(saved, dy))
    for name, a, b in zip(checks.TRAIN_OUTPUTS, outs, ref):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=name)
    y_only = dense_host.dense_train_math(x, wg, wu, wd, dy, l1_weight, forward_only=True)
    np.testing.assert_allclose(y_only, y, rtol=1e-12)


def test_train_check_rule():
    res = {"d": {"dense": True, "rel_err": dict.fromkeys(checks.TRAIN_OUTPUTS, 1e-3)},
           "bad_dense": {"dense": True, "rel_err": dict.fromkeys(checks.TRAIN_OUTPUTS, 0.5)},
           "ok": {"dense": False, "rel_err": dict.fromkeys(checks.TRAIN_OUTPUTS, 2e-3)},
           "no": {"dense": False, "rel_err": dict(dict.fromkeys(checks.TRAIN_OUTPUTS, 1e-3), dx=5e-3)},
           "skip": {"dense": False, "rel_err": None}}
    checks.apply_train_check(res, "bfloat16")
    assert res["d"]["check_ok"] and not res["bad_dense"]["check_ok"]
    assert res["ok"]["check_ok"] and res["ok"]["err_vs_dense"] == pytest.approx(2.0)
    assert res["no"]["check_ok"] is False and res["no"]["check_limit"]["dx"] == pytest.approx(2e-3 + 2**-9)
    assert "check_ok" not in res["skip"]


def test_format_table_train():
    res = {"train": {"cases": [
        {"name": "uniform/29", "m": 8, "error": "ValueError: boom"},
        {"name": "uniform/29", "m": 8, "realised": {"token": {"mean": 1.0, "p99": 2.0, "max": 3}},
         "dense": {"best": "a"},
         "impls": {"a": {"eager": {"median_ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.1}, "graph": None,
                         "forward": {"median_ms": 0.4}, "speedup": 1.0, "peak_mib": 900.0,
                         "max_rel_err": 1e-3, "check_ok": True, "err_vs_dense": 1.0},
                   "t": {"eager": {"median_ms": 0.5}, "stats": {"l0": 29.0, "n_backup_rows": 2}, "saved_mib": 4.5,
                         "max_rel_err": float("inf"), "check_ok": False},
                   "b": {"error": "RuntimeError: x"}}},
    ]}}
    text = report.format_table(res)
    assert "training" in text and "step ms" in text and "median ms" not in text
    assert "ERROR: ValueError: boom" in text and "a*" in text and "FAIL" in text and "ERROR: RuntimeError: x" in text
    assert "900" in text and "29.0" in text and "4.5" in text
    both = report.format_table({"cases": [], "train": {"cases": []}})
    assert "step ms" in both and "median ms" not in both  # no inference cases: only the training header
    rows = report.format_table(res, header=False)
    assert "step ms" not in rows and len(rows.splitlines()) == 4


class _FakeDev:
    """A host array dressed as a device array (``.data.ptr``) for the cuBLAS argument test."""

    def __init__(self, a):
        self.a = np.ascontiguousarray(a)
        self.shape, self.dtype, self.flags = self.a.shape, self.a.dtype, self.a.flags
        self.data = type("P", (), {"ptr": self.a.ctypes.data})()


class _FakeCublas:
    """cublasGemmEx in column-major float64 on host memory (pointers resolved through ``arrays``)."""

    def __init__(self, arrays):
        self.arrays = {a.data.ptr: a.a for a in arrays}

    def cublasGemmEx(self, handle, transa, transb, m, n, k, alpha, A, at, lda, Bp, bt, ldb, beta, C, ct, ldc, comp,
                     algo):
        import ctypes

        def colmajor(ptr, rows, cols, ld):
            flat = self.arrays[ptr.value].reshape(-1)
            return flat[: cols * ld].reshape(cols, ld)[:, :rows].T

        def scalar(p):
            return ctypes.cast(p, ctypes.POINTER(ctypes.c_float)).contents.value
        a = colmajor(A, *((m, k) if transa == 0 else (k, m)), lda)
        b = colmajor(Bp, *((k, n) if transb == 0 else (n, k)), ldb)
        a = a if transa == 0 else a.T
        b = b if transb == 0 else b.T
        c = colmajor(C, m, n, ldc)
        res = scalar(alpha) * (a.astype(np.float64) @ b.astype(np.float64)) + scalar(beta) * c
        out = self.arrays[C.value].reshape(-1)
        out[: n * ldc].reshape(n, ldc)[:, :m] = res.T
        return 0


@pytest.mark.parametrize("trans_a,trans_b,beta", [(False, False, 0.0), (False, True, 0.0), (True, False, 0.0),
                                                  (True, True, 0.0), (False, False, 1.0), (True, False, 1.0)])
def test_blas_gemm_row_major_mapping(trans_a, trans_b, beta, monkeypatch):
    """The column-major argument mapping of twell.runtime.blas.gemm (the dense baselines' GEMMs), against a host
    emulation of cublasGemmEx (the handle and CuPy's current stream stubbed out)."""
    import ctypes
    import types

    from twell.runtime import blas
    rng = np.random.default_rng(0)
    r, k, c = 5, 7, 3
    a = rng.standard_normal((k, r) if trans_a else (r, k)).astype(np.float32)
    b = rng.standard_normal((c, k) if trans_b else (k, c)).astype(np.float32)
    out0 = rng.standard_normal((r, c)).astype(np.float32)
    da, db, dout = _FakeDev(a), _FakeDev(b), _FakeDev(out0.copy())
    handle = types.SimpleNamespace(lib=_FakeCublas([da, db, dout]), handle=None, bind=lambda cp, stream: None,
                                   scalar=lambda v, f64: (ctypes.c_double if f64 else ctypes.c_float)(float(v)))
    stream = types.SimpleNamespace(ptr=0)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(
        cuda=types.SimpleNamespace(get_current_stream=lambda: stream)))
    monkeypatch.setattr(blas, "_handle", lambda cp: handle)
    assert blas.gemm(da, db, dout, trans_a=trans_a, trans_b=trans_b, beta=beta) is dout
    want = (a.T if trans_a else a) @ (b.T if trans_b else b) + beta * out0
    np.testing.assert_allclose(dout.a, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="shapes"):
        blas.gemm(da, db, _FakeDev(np.zeros((r + 1, c), np.float32)), trans_a=trans_a, trans_b=trans_b)
    if not trans_a and beta == 0.0:  # as dense_cupy calls it: out = a @ (w.T if transposed else w)
        dout.a[...] = 0
        blas.gemm(da, db, dout, trans_b=trans_b)
        np.testing.assert_allclose(dout.a, a @ (b.T if trans_b else b), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_bench_train_gpu_small(tmp_path, capsys):
    out = tmp_path / "tg.json"
    rc = main(["bench", "--backend", "gpu", "--mode", "train", "--m", "512", "--kind", "uniform,token_skew",
               "--d", "256", "--n", "1024", "--l1-weight", "0.01", "--check", "--budget", "0.05", "--warmup", "2",
               "--json", str(out)])
    text = capsys.readouterr()
    res = json.loads(out.read_text())
    assert rc == 0, text.err
    assert res["meta"]["backend"] == "gpu" and len(res["train"]["cases"]) == 2
    assert "peak_memory" in res["train"]["method"]
    for case in res["train"]["cases"]:
        assert "error" not in case, case.get("error")
        impls = case["impls"]
        d = impls["dense_cupy_train"]
        assert "error" not in d, d.get("error")
        assert d["check_ok"] is True and d["max_rel_err"] < 1e-2
        assert d["graph"] is not None, d.get("graph_error")
        assert d["graph_max_rel_err"] == pytest.approx(d["max_rel_err"], rel=1e-6, abs=1e-12)
        assert d["forward"]["median_ms"] > 0
        # z, u, h, dh (M, n), y, dx (M, d), three (n, d) weight gradients, bfloat16, 512-byte rounding
        m, dd, n = 512, 256, 1024
        assert d["peak_bytes"] == pytest.approx(2 * (4 * m * n + 2 * m * dd + 3 * n * dd), rel=0.01)
        if "twell_train" in impls:
            t = impls["twell_train"]
            assert "error" not in t, t.get("error")
            assert t["graph"] is None and "not capturable" in t["graph_error"]
            assert t["check_ok"] is True, t["rel_err"]
            assert t["saved_mib"] > 0 and t["stats"]["l0"] > 0 and t["peak_bytes"] > 0
        if "torch_autograd" in impls:
            a = impls["torch_autograd"]
            assert "error" not in a, a.get("error")
            assert a["check_ok"] is True and a["peak_bytes"] > 0


# ---------------------------------------------------------------------------- bench elementwise kernels, no GPU
def _ew_kernel(name, op, ins, outs, scalar=""):
    """A CuPy-ElementwiseKernel-like loop body (const references to inputs, references to outputs)."""
    params = ([f"const {t}* _raw_{n}" for t, n in ins] + ([scalar] if scalar else [])
              + [f"{t}* _raw_{n}" for t, n in outs])
    decl = [f"const {t} &{n} = _raw_{n}[i];" for t, n in ins] + [f"{t} &{n} = _raw_{n}[i];" for t, n in outs]
    return (f'extern "C" __global__ void {name}({", ".join(params)}, long long size) {{\n'
            f"for (long long i = blockIdx.x * blockDim.x + threadIdx.x; i < size; i += blockDim.x * gridDim.x) {{\n"
            + "\n".join(decl) + "\n" + op + "\n}\n}\n")


U64 = "unsigned long long"


def test_bench_elementwise_kernels_compile_with_nvrtc():
    """The dense baselines' fused kernels (forward and training backward) compile for sm_90a."""
    pytest.importorskip("cupy")
    core = pytest.importorskip("cupy._core.core")
    from cupy.cuda import compiler
    if not hasattr(core, "assemble_cupy_compiler_options") or not hasattr(compiler, "_NVRTCProgram"):
        pytest.skip("CuPy's private NVRTC helpers are missing")
    sources = [elementwise.BF16X4_BWD_PREAMBLE
               + _ew_kernel("bwd4", elementwise.RELU_MUL_BWD_BF16X4_OP, [(U64, "dh"), (U64, "z"), (U64, "u")],
                            [(U64, "du"), (U64, "dz")], "float s")
               + _ew_kernel("fwd4", elementwise.RELU_MUL_BF16X4_OP, [(U64, "z"), (U64, "u")], [(U64, "h")])]
    for t in ("float", "double", "__half"):
        sources.append(f"#include <cuda_fp16.h>\ntypedef {t} T;\n" + elementwise.ACC_PREAMBLE
                       + _ew_kernel("bwd", elementwise.RELU_MUL_BWD_OP, [("T", "dh"), ("T", "z"), ("T", "u")],
                                    [("T", "du"), ("T", "dz")], "double s"))
    for i, src in enumerate(sources):
        options = core.assemble_cupy_compiler_options(("-arch=sm_90a", "-ftz=true"))
        try:
            compiler._NVRTCProgram(src, f"bench_ew{i}.cu", method="cubin").compile(options)
        except Exception as exc:  # no NVRTC wheel on this machine
            if "nvrtc" in str(exc).lower() and ("load" in str(exc).lower() or "found" in str(exc).lower()):
                pytest.skip(f"NVRTC unavailable: {exc}")
            raise


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="needs a host C++ compiler")
def test_bf16x4_backward_kernel_bitwise_on_host(tmp_path):
    """The bf16x4 backward kernel's body, compiled for the host, against a NumPy model (in place, with L1)."""
    import ctypes

    import ml_dtypes
    src = (
        "#include <cstring>\n#define __device__\n#define __forceinline__ inline\n"
        "static inline unsigned int __float_as_uint(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }\n"
        "static inline float __uint_as_float(unsigned int u) { float f; memcpy(&f, &u, 4); return f; }\n"
        + elementwise.BF16X4_BWD_PREAMBLE
        + f'extern "C" void bwd(const {U64}* _raw_dh, const {U64}* _raw_z, const {U64}* _raw_u, float s, '
          f"{U64}* _raw_du, {U64}* _raw_dz, long n) {{\nfor (long i = 0; i < n; ++i) {{\n"
          f"const {U64} &dh = _raw_dh[i]; const {U64} &z = _raw_z[i]; const {U64} &u = _raw_u[i];\n"
          f"{U64} &du = _raw_du[i]; {U64} &dz = _raw_dz[i];\n" + elementwise.RELU_MUL_BWD_BF16X4_OP + "}\n}\n")
    (tmp_path / "k.cpp").write_text(src)
    cxx = shutil.which("g++") or shutil.which("c++")
    subprocess.run([cxx, "-O2", "-shared", "-fPIC", "-o", str(tmp_path / "k.so"), str(tmp_path / "k.cpp")],
                   check=True, capture_output=True)
    lib = ctypes.CDLL(str(tmp_path / "k.so"))
    bf = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(1)
    n = 4096
    dh, z, u = (rng.standard_normal(n).astype(np.float32).astype(bf) for _ in range(3))
    z[::5] = 0
    f32 = [a.astype(np.float32) for a in (dh, z, u)]
    for s in (0.0, 0.37):
        on = f32[1] > 0
        dt = f32[0] + np.float32(s) * np.sign(f32[1] * f32[2]) * on
        want_du = np.where(on, dt * f32[1], np.float32(0)).astype(bf)
        want_dz = np.where(on, dt * f32[2], np.float32(0)).astype(bf)
        a_dh, a_z = dh.copy(), z.copy()  # in place: du over dh, dz over z, as dense_cupy_train runs it

        def ptr(a):
            return a.view(np.uint64).ctypes.data_as(ctypes.c_void_p)
        lib.bwd(ptr(a_dh), ptr(a_z), ptr(u), ctypes.c_float(s), ptr(a_dh), ptr(a_z), ctypes.c_long(n // 4))
        assert np.array_equal(a_dh.view(np.uint16), want_du.view(np.uint16)), s
        assert np.array_equal(a_z.view(np.uint16), want_dz.view(np.uint16)), s
