"""CUDA kernel launchers, one module per kernel family in ``cuda_src/`` (same op names as
:mod:`twell.reference` where an op has a reference).

Each module declares its family (a :class:`~twell.runtime.loader.KernelFamily`: the ``.cu`` file and every
kernel instantiation its launchers use) and launches on the current CuPy stream.  Importing this package
needs no GPU and does not import CuPy.
"""

from . import ffn_backward, ffn_forward, gate_gemm, pack

#: Every kernel family, for the compile test and ``python -m twell warmup``.
FAMILIES = (pack.FAMILY, gate_gemm.FAMILY, ffn_forward.FAMILY, ffn_backward.FAMILY)

__all__ = ["FAMILIES", "pack", "gate_gemm", "ffn_forward", "ffn_backward"]
