"""Kernel loader: CUDA sources -> one ``cupy.RawModule`` per kernel family and device.

* :func:`cuda_src_dir` finds the ``.cu``/``.cuh`` files (package data in a wheel,
  ``cuda_src/`` in a source checkout or editable install).
* :func:`family_source` inlines the family's local headers into one source
  string, because CuPy's on-disk cache key hashes the source text and options,
  not headers reached through ``-I``.
* :func:`get_kernel` builds (lazily, once per family and device) a
  ``RawModule`` with every name expression of the family, the family's options
  and an explicit architecture (``sm_90a`` on compute capability 9.0).
* :func:`nvrtc_compile` compiles the same source with the same options through
  NVRTC only (no GPU needed) and reports registers, stack and spills per kernel.

Each launcher module of :mod:`twell.kernels` declares its family (a :class:`KernelFamily`) and passes it
to :func:`get_kernel`; :data:`twell.kernels.FAMILIES` lists them all.  Nothing here imports the
launchers, and importing this module needs no GPU and never imports CuPy.
"""

from __future__ import annotations

import io
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CTYPE",
    "KernelFamily",
    "cuda_src_dir",
    "family_source",
    "device_arch",
    "get_module",
    "get_kernel",
    "nvrtc_compile",
    "KernelResources",
]

#: C++ type of each supported device dtype (by numpy dtype name).
CTYPE = {"bfloat16": "__nv_bfloat16", "float16": "__half", "float32": "float"}

BASE_OPTIONS = ("-std=c++17",)


@dataclass(frozen=True)
class KernelFamily:
    """One ``.cu`` file compiled into one ``RawModule``.

    Attributes
    ----------
    name : str
        Family name (the ``.cu`` file's stem).
    name_expressions : tuple of str
        Every kernel instantiation the launchers use (templates included).
    options : tuple of str
        Extra NVRTC options.
    requires_sm90a : bool
        The family uses Hopper-only instructions (wgmma, setmaxnreg).
    hot_kernels : tuple of str
        Regular expressions (``re.match``) of the name expressions on the hot
        path: the compile test fails if any of them spills to local memory.
    """

    name: str
    name_expressions: tuple
    options: tuple = ()
    requires_sm90a: bool = False
    hot_kernels: tuple = field(default=())  # regexes of name expressions that must not spill


_lock = threading.Lock()
_modules: dict = {}          # (family name, device id) -> compiled RawModule
_functions: dict = {}        # (family name, name expression, device id) -> RawKernel
_announced = threading.Event()

#: A compile that takes longer than this prints one line (a CuPy disk-cache hit takes ~0.1 s).
COMPILE_NOTICE_S = 1.0


def cuda_src_dir() -> Path:
    """Directory holding the CUDA sources.

    Looks for the ``twell/cuda_src`` package data of an installed wheel first,
    then the ``cuda_src/`` directory of a source checkout.
    """
    here = Path(__file__).resolve().parent.parent
    candidates = [here / "cuda_src", here.parent / "cuda_src"]
    try:
        from importlib import resources  # noqa: PLC0415
        res = resources.files("twell.cuda_src")
        candidates.insert(0, Path(str(res)))
    except Exception:
        pass
    for c in candidates:
        if c.is_dir() and any(c.glob("*.cu")):
            return c
    raise FileNotFoundError(
        "twell could not find its CUDA sources (cuda_src/*.cu); looked in: " + ", ".join(map(str, candidates))
    )


_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.MULTILINE)


def _inline(text: str, directory: Path, seen: set) -> str:
    def repl(m):
        name = m.group(1)
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"local header {name!r} not found in {directory}")
        if name in seen:
            return f"// (already inlined: {name})"
        seen.add(name)
        body = _inline(path.read_text(), directory, seen)
        return f"// ---- begin {name}\n{body}\n// ---- end {name}"

    return _INCLUDE.sub(repl, text)


def family_source(family: KernelFamily) -> str:
    """Source of a family with every local ``#include "x.cuh"`` inlined."""
    d = cuda_src_dir()
    path = d / f"{family.name}.cu"
    if not path.is_file():
        raise FileNotFoundError(f"no CUDA source for kernel family {family.name!r}: {path}")
    return _inline(path.read_text(), d, set())


def arch_for_capability(cc: str) -> str:
    """``sm_90a`` for compute capability 9.0 (Hopper-only instructions), else ``sm_XY``."""
    return "sm_90a" if cc == "90" else f"sm_{cc}"


def device_arch(device_id: int | None = None) -> str:
    """Architecture string used for the current (or given) CUDA device."""
    import cupy  # noqa: PLC0415
    dev = cupy.cuda.Device(device_id)
    return arch_for_capability(dev.compute_capability)


def _options(fam: KernelFamily, arch: str) -> tuple:
    return BASE_OPTIONS + tuple(fam.options) + (f"-arch={arch}",)


def _announce_compile(family: KernelFamily, arch: str):
    if _announced.is_set():
        return
    _announced.set()
    sys.stderr.write(f"twell: compiling CUDA kernels for {arch} (first use on this machine, family "
                     f"{family.name!r}; later runs load them from CuPy's kernel cache; "
                     "'python -m twell warmup' compiles every family ahead of time)\n")
    sys.stderr.flush()


def get_module(family: KernelFamily, device_id: int | None = None):
    """The compiled ``cupy.RawModule`` of a family for a device (the current one by default), memoized.

    Compiling a family takes seconds to a minute on first use; a compile that has not finished after
    :data:`COMPILE_NOTICE_S` prints one line to stderr (once per process).  Compiling twice in two
    threads is avoided by a lock; the result is cached on disk by CuPy.
    """
    import cupy  # noqa: PLC0415

    dev = cupy.cuda.Device(device_id)
    key = (family.name, dev.id)
    mod = _modules.get(key)
    if mod is not None:
        return mod
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            arch = arch_for_capability(dev.compute_capability)
            if family.requires_sm90a and arch != "sm_90a":
                raise RuntimeError(f"kernel family {family.name!r} needs a Hopper GPU (sm_90a); this device is {arch}")
            with dev:
                mod = cupy.RawModule(code=family_source(family), options=_options(family, arch),
                                     name_expressions=list(family.name_expressions))
                timer = threading.Timer(COMPILE_NOTICE_S, _announce_compile, (family, arch))
                timer.daemon = True
                timer.start()
                try:
                    mod.compile()
                finally:
                    timer.cancel()
            _modules[key] = mod
    return mod


def get_kernel(family: KernelFamily, name_expression: str):
    """One kernel (``cupy.RawKernel``) of a family on the current device, by its name expression (memoized:
    the launchers call this on every op, so the hit path is one dict lookup)."""
    import cupy  # noqa: PLC0415

    key = (family.name, name_expression, cupy.cuda.runtime.getDevice())
    fn = _functions.get(key)
    if fn is None:
        if name_expression not in family.name_expressions:
            raise KeyError(f"{name_expression!r} is not a name expression of kernel family {family.name!r}")
        fn = _functions[key] = get_module(family).get_function(name_expression)
    return fn


def warmup(families, *, device_id: int | None = None, threads: int | None = None, progress=None) -> dict:
    """Compile (or load from CuPy's disk cache) every family of ``families`` for a device, families in
    parallel threads (NVRTC runs them concurrently).  ``progress(name, seconds)`` is called as each one is
    ready.  Returns ``{family name: seconds}``."""
    import concurrent.futures  # noqa: PLC0415
    import time  # noqa: PLC0415

    import cupy  # noqa: PLC0415
    dev = cupy.cuda.Device(device_id).id
    _announced.set()                       # the caller reports progress itself

    def one(family):
        t0 = time.perf_counter()
        with cupy.cuda.Device(dev):
            get_module(family, dev)
        return family.name, time.perf_counter() - t0

    done = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads or len(families)) as pool:
        for fut in concurrent.futures.as_completed([pool.submit(one, f) for f in families]):
            name, seconds = fut.result()
            done[name] = seconds
            if progress is not None:
                progress(name, seconds)
    return done


@dataclass
class KernelResources:
    """Resource usage of one compiled kernel (from ptxas ``-v``)."""

    name_expression: str
    mangled: str
    registers: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int


_RE_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_RE_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SMEM = re.compile(r"(\d+) bytes smem")


def _parse_ptxas(log: str, mapping: dict) -> list:
    demangled = {v: k for k, v in mapping.items()}
    out, cur = [], None
    for line in log.splitlines():
        m = _RE_ENTRY.search(line)
        if m:
            cur = {"mangled": m.group(1), "registers": 0, "stack": 0, "ss": 0, "sl": 0, "smem": 0}
            out.append(cur)
            continue
        if cur is None:
            continue
        m = _RE_PROPS.search(line)
        if m:
            cur["stack"], cur["ss"], cur["sl"] = map(int, m.groups())
        m = _RE_REGS.search(line)
        if m:
            cur["registers"] = int(m.group(1))
            s = _RE_SMEM.search(line)
            if s:
                cur["smem"] = int(s.group(1))
    return [
        KernelResources(demangled.get(c["mangled"], c["mangled"]), c["mangled"], c["registers"], c["stack"],
                        c["ss"], c["sl"], c["smem"])
        for c in out
    ]


def nvrtc_compile(family: KernelFamily, arch: str = "sm_90a", *, return_cubin: bool = False):
    """Compile a family with NVRTC only (no GPU needed) and return per-kernel :class:`KernelResources`.

    Uses the same source string, options and name expressions as
    :func:`get_module`, plus ``-Xptxas=-v`` for the resource report.  With
    ``return_cubin`` also returns the cubin (bytes), for a disassembly check.  Memoized per (family,
    arch, source text) within the process.  Relies on
    CuPy's private ``assemble_cupy_compiler_options`` and ``_NVRTCProgram``
    (present in CuPy 14.x, which ``pyproject.toml`` pins).
    """
    source = family_source(family)
    key = (family, arch, source)
    if key not in _compiled:
        _compiled[key] = _nvrtc_compile_uncached(family, arch, source)
    report, cubin = _compiled[key]
    return (report, cubin) if return_cubin else report


_compiled: dict = {}


def _nvrtc_compile_uncached(family: KernelFamily, arch: str, source: str):
    import cupy._core.core as core  # noqa: PLC0415
    from cupy.cuda import compiler  # noqa: PLC0415

    options = core.assemble_cupy_compiler_options(_options(family, arch) + ("-Xptxas=-v", "-ftz=true"))
    prog = compiler._NVRTCProgram(source, f"{family.name}.cu",
                                  name_expressions=list(family.name_expressions), method="cubin")
    log = io.StringIO()
    cubin, mapping = prog.compile(options, log_stream=log)
    return _parse_ptxas(log.getvalue(), mapping), cubin


# --------------------------------------------------------------------------- disassembly (CI check)


def cubin_text_sections(cubin: bytes) -> dict:
    """``{kernel mangled name: machine code}`` from the ``.text.<name>`` sections of an ELF64 cubin."""
    import struct  # noqa: PLC0415

    if cubin[:4] != b"\x7fELF" or cubin[4] != 2:
        raise ValueError("not an ELF64 cubin")
    shoff = struct.unpack_from("<Q", cubin, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    names_off = headers[shstrndx][4]

    def name_at(off):
        start = names_off + off
        return cubin[start:cubin.index(b"\0", start)].decode()

    out = {}
    for name_off, _type, _flags, _addr, offset, size in headers:
        name = name_at(name_off)
        if name.startswith(".text."):
            out[name[len(".text."):]] = cubin[offset:offset + size]
    return out


def find_nvdisasm() -> str | None:
    """``nvdisasm`` from PATH or from the NVIDIA wheels (``cuda-toolkit[nvdisasm]``), or None."""
    import shutil  # noqa: PLC0415

    exe = shutil.which("nvdisasm")
    if exe:
        return exe
    try:
        import nvidia  # noqa: PLC0415
    except ImportError:
        return None
    for root in getattr(nvidia, "__path__", []):
        hits = sorted(Path(root).glob("*/bin/nvdisasm"))
        if hits:
            return str(hits[0])
    return None


def disassemble(family: KernelFamily, arch: str = "sm_90a") -> dict:
    """SASS text of every kernel of a family: ``{name expression: sass}`` (NVRTC compile, then nvdisasm on
    each kernel's raw ``.text`` section: cuobjdump does not read NVRTC 13 cubins)."""
    import subprocess  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    exe = find_nvdisasm()
    if exe is None:
        raise RuntimeError("nvdisasm not found: pip install 'cuda-toolkit[nvdisasm]' (part of the cuda13 extra)")
    report, cubin = nvrtc_compile(family, arch, return_cubin=True)
    code = cubin_text_sections(cubin)
    sm = "SM" + arch[len("sm_"):]                          # nvdisasm's spelling: SM90a
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in report:
            blob = code.get(r.mangled)
            if blob is None:
                continue
            path = Path(tmp) / "k.bin"
            path.write_bytes(blob)
            res = subprocess.run([exe, "-b", sm, str(path)], capture_output=True, text=True, check=False)
            if res.returncode:
                raise RuntimeError(f"nvdisasm failed on {r.name_expression}: {res.stderr.strip()}")
            out[r.name_expression] = res.stdout
    return out
