"""Shared test configuration: hypothesis profiles, the ``gpu`` marker, tolerances."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "gpu", max_examples=25, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev", max_examples=15, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
_profile = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
settings.load_profile(_profile)


def _gpu_available() -> bool:
    from twell import _backend
    return _backend.cupy_or_none() is not None


GPU = _gpu_available()


def pytest_collection_modifyitems(config, items):
    if GPU:
        return
    skip = pytest.mark.skip(reason="no CUDA device (CuPy with a GPU) available")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cp():
    """The cupy module (only for tests marked ``gpu``)."""
    import cupy
    return cupy


def rel_error(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64 on the host (NaN-safe: NaN anywhere -> inf)."""
    out = np.asarray(out.get() if hasattr(out, "get") and not isinstance(out, np.ndarray) else out, dtype=np.float64)
    ref = np.asarray(ref.get() if hasattr(ref, "get") and not isinstance(ref, np.ndarray) else ref, dtype=np.float64)
    if out.shape != ref.shape:
        raise AssertionError(f"shape {out.shape} != reference shape {ref.shape}")
    if not np.all(np.isfinite(out)):
        return float("inf")
    den = np.linalg.norm(ref)
    num = np.linalg.norm(out - ref)
    return float(num / den) if den > 0 else float(num)
