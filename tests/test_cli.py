"""``python -m twell {info,bench,plot}`` on the CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from twell import _backend, bench
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
    assert bench.arch_for((9, 0)) == "sm_90a"
    assert bench.arch_for((8, 0)) == "sm_80"
    assert bench.arch_for((10, 0)) == "sm_100"


# ---------------------------------------------------------------------------- bench (CPU)
def _check_results(res, n_cases):
    assert res["schema"] == bench.JSON_SCHEMA
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

    bench.register_sparse("fake_sparse", fake, backend="numpy")
    bench.register_sparse("wrong_sparse", wrong, backend="numpy")
    bench.register_sparse("broken_sparse", broken, backend="numpy")
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
            bench.unregister(name)
    assert "fake_sparse" not in bench.IMPLS


def test_bench_sweep_cpu(tmp_path, capsys):
    out = tmp_path / "s.json"
    rc = main(["bench", "--backend", "cpu", "--sweep", "--sweep-m", "16", "--impl", "dense_numpy", "--json", str(out),
               "--quiet", *SMALL])
    text = capsys.readouterr()
    assert rc == 0, text.err
    res = json.loads(out.read_text())
    means = [c["mean_active_target"] for c in res["cases"]]
    assert means == [m for m in bench.SWEEP_MEANS if m < 512]
    assert all(c["sweep"] and c["m"] == 16 and c["kind"] == "uniform" for c in res["cases"])
    assert any("600" in note for note in res["notes"])
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
    text = bench.format_table(res)
    assert "ERROR: ValueError: boom" in text and "a*" in text and "FAIL" in text and "ERROR: RuntimeError: x" in text


def test_write_json_is_strict(tmp_path):
    p = tmp_path / "x.json"
    bench.write_json({"a": float("nan"), "b": np.float32(1.5), "c": np.int64(3), "d": (1, 2), "e": np.bool_(True)}, p)
    assert json.loads(p.read_text()) == {"a": None, "b": 1.5, "c": 3, "d": [1, 2], "e": True}


def test_time_cpu_statistics():
    t = bench.time_cpu(lambda: sum(range(1000)), budget_s=0.01).to_dict()
    assert t["n_repeat"] >= 3 and t["p20_ms"] <= t["median_ms"] <= t["p80_ms"]
    slow = bench.time_cpu(lambda: __import__("time").sleep(0.03), budget_s=0.01).to_dict()
    assert slow["n_repeat"] == 1


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


@pytest.mark.skipif(HAS_GPU, reason="a GPU is available")
def test_backend_gpu_without_gpu(capsys):
    rc = main(["bench", "--backend", "gpu", "--m", "8", *SMALL])
    assert rc == 1
    assert "gpu" in capsys.readouterr().err.lower()


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
    bench.write_json({"cases": []}, res)
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
               "--check", "--check-rows", "64", "--budget", "0.05", "--warmup", "2",
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
        assert case["dense"]["cupy_best"] in ("dense_cupy", "dense_cupy_cat")
        if "torch_eager" in case["impls"]:
            t = case["impls"]["torch_eager"]
            assert "error" not in t, t.get("error")
            assert t["check_ok"] is True
