"""CUDA kernel launchers, one module per kernel family in ``cuda_src/``.

Importing this package registers every family with :mod:`twell._kernels`; it
needs no GPU and does not import CuPy (launchers import it when called).
"""

from . import pack  # noqa: F401
from . import ffn_forward  # noqa: F401
from . import ffn_backward  # noqa: F401
from . import gate_gemm  # noqa: F401
