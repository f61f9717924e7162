"""Environment and provenance: versions, CUDA / NVRTC, devices, git revision.

:func:`environment_info` (a JSON-able dict) and :func:`format_info` (``key : value`` lines) are what
``python -m twell info`` prints; the benchmark stores the same dict in ``results["meta"]["environment"]``.
Everything works without a GPU and without CuPy: missing pieces are reported, not raised.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

__all__ = ["arch_for", "git_revision", "environment_info", "format_info"]


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_version_str(v) -> str | None:
    """CUDA's integer versions (12040, 13020) as '12.4'; tuples as 'a.b'."""
    if v is None:
        return None
    if isinstance(v, tuple):
        return ".".join(str(int(p)) for p in v)
    v = int(v)
    if v <= 0:
        return None
    return f"{v // 1000}.{(v % 1000) // 10}"


def arch_for(cc: tuple[int, int]) -> str:
    """The NVRTC arch string twell compiles for: sm_90a on cc 9.0, else sm_XY."""
    major, minor = int(cc[0]), int(cc[1])
    return "sm_90a" if (major, minor) == (9, 0) else f"sm_{major}{minor}"


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]  # twell/bench/env.py -> the checkout (or site-packages)


def git_revision() -> str | None:
    """``git rev-parse HEAD`` of the source tree twell was imported from, with ``-dirty`` appended when its
    tracked sources (``twell/``, ``cuda_src/``, ``pyproject.toml``) differ from that commit; None outside
    a git checkout."""
    root = _repo_root()
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "twell", "cuda_src",
                                "pyproject.toml"], cwd=root, capture_output=True, text=True, timeout=10)
    except Exception:
        return None
    rev = out.stdout.strip()
    if out.returncode != 0 or not rev:
        return None
    return rev + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def environment_info(*, devices: bool = True) -> dict:
    """Versions, CUDA/NVRTC state and device properties, as a JSON-able dict.

    Works without a GPU (and without CuPy): missing pieces are reported, not raised.
    """
    import twell  # noqa: PLC0415

    info: dict = {
        "twell": getattr(twell, "__version__", None),
        "twell_path": str(Path(__file__).resolve().parents[1]),   # the twell package these sources are in
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "numpy": np.__version__,
        "scipy": _dist_version("scipy"),
        "ml_dtypes": _dist_version("ml_dtypes"),
        "cupy": "not installed",
        "torch": _dist_version("torch") or "not installed",
        "matplotlib": _dist_version("matplotlib") or "not installed",
        "cuda_available": False,
        "nvrtc_version": None,
        "cuda_runtime_version": None,
        "cuda_driver_version": None,
        "devices": [],
        "arch": None,
        "cupy_cache_dir": os.environ.get("CUPY_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cupy",
                                                                           "kernel_cache"),
        "cuda_src_dir": None,
    }
    errors: dict = {}
    try:
        import cupy  # noqa: PLC0415
    except ModuleNotFoundError:
        cupy = None
    except Exception as exc:  # pragma: no cover - broken installs
        cupy = None
        info["cupy"] = f"import failed: {type(exc).__name__}: {exc}"
    if cupy is not None:
        info["cupy"] = cupy.__version__
        try:
            info["cuda_available"] = bool(cupy.cuda.is_available())
        except Exception as exc:  # pragma: no cover
            errors["cuda_available"] = f"{type(exc).__name__}: {exc}"
        try:
            info["nvrtc_version"] = _cuda_version_str(tuple(cupy.cuda.nvrtc.getVersion()))
        except Exception as exc:
            errors["nvrtc_version"] = f"{type(exc).__name__}: {exc}"
        try:
            info["cuda_runtime_version"] = _cuda_version_str(cupy.cuda.runtime.runtimeGetVersion())
        except Exception as exc:
            errors["cuda_runtime_version"] = f"{type(exc).__name__}: {exc}"
        try:
            info["cuda_driver_version"] = _cuda_version_str(cupy.cuda.runtime.driverGetVersion())
        except Exception as exc:
            errors["cuda_driver_version"] = f"{type(exc).__name__}: {exc}"
        if devices and info["cuda_available"]:
            try:
                for i in range(cupy.cuda.runtime.getDeviceCount()):
                    p = cupy.cuda.runtime.getDeviceProperties(i)
                    name = p.get("name", b"")
                    name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
                    cc = (int(p.get("major", 0)), int(p.get("minor", 0)))
                    info["devices"].append({
                        "id": i,
                        "name": name,
                        "compute_capability": f"{cc[0]}.{cc[1]}",
                        "sm_count": int(p.get("multiProcessorCount", 0)),
                        "l2_bytes": int(p.get("l2CacheSize", 0)),
                        "total_memory_bytes": int(p.get("totalGlobalMem", 0)),
                        "shared_memory_per_block_optin": int(p.get("sharedMemPerBlockOptin", 0)),
                        "arch": arch_for(cc),
                    })
                if info["devices"]:
                    info["arch"] = info["devices"][0]["arch"]
            except Exception as exc:  # pragma: no cover - needs a GPU
                errors["devices"] = f"{type(exc).__name__}: {exc}"
    try:
        from twell.runtime import loader  # noqa: PLC0415

        info["cuda_src_dir"] = str(loader.cuda_src_dir())
    except Exception as exc:
        errors["cuda_src_dir"] = f"{type(exc).__name__}: {exc}"
    if errors:
        info["errors"] = errors
    return info


def format_info(info: dict) -> str:
    """Human-readable ``key: value`` lines of :func:`environment_info`."""
    lines = []
    order = ["twell", "python", "python_executable", "platform", "numpy", "scipy", "ml_dtypes", "cupy",
             "torch", "matplotlib", "cuda_available", "nvrtc_version", "cuda_runtime_version",
             "cuda_driver_version", "arch", "cupy_cache_dir", "cuda_src_dir"]
    width = max(len(k) for k in order)
    for k in order:
        v = info.get(k)
        lines.append(f"{k:<{width}} : {'-' if v is None else v}")
    devs = info.get("devices") or []
    if devs:
        for dv in devs:
            lines.append(f"{'device ' + str(dv['id']):<{width}} : {dv['name']}, cc {dv['compute_capability']}, "
                         f"{dv['sm_count']} SMs, L2 {dv['l2_bytes'] / 2**20:.1f} MiB, "
                         f"{dv['total_memory_bytes'] / 2**30:.1f} GiB, arch {dv['arch']}")
    else:
        lines.append(f"{'devices':<{width}} : none")
    for k, v in (info.get("errors") or {}).items():
        lines.append(f"{'error[' + k + ']':<{width}} : {v}")
    return "\n".join(lines)

