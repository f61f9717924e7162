"""``python -m twell check`` on the CPU (NumPy path), and that it can fail."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from twell import check


def test_cpu_checks_pass():
    results = check.run_checks("cpu", ("float32", "float64"), seed=1)
    assert len(results) == 2 * len(check.SHAPES) * 10
    assert all(r.ok for r in results), check.format_results(results)


def test_a_wrong_op_fails(monkeypatch):
    real = check.gated_ffn
    monkeypatch.setattr(check, "gated_ffn", lambda *a, **k: real(*a, **k) * np.float32(1.001))
    results = check.run_checks("cpu", ("float32",), seed=2)
    failed = {r.op for r in results if not r.ok}
    assert "gated_ffn" in failed


def test_cli_check_runs():
    out = subprocess.run([sys.executable, "-m", "twell", "check", "--backend", "cpu", "--dtype", "float32"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "30 passed, 0 failed" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "twell", "check", "--backend", "cpu", "--dtype", "int8"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "dtype" in bad.stderr
