"""twell: activation-sparse transformer FFN kernels (TwELL / hybrid formats).

NumPy inputs run the float64-capable reference (:mod:`twell.reference`); CuPy or
other ``__dlpack__`` CUDA arrays run raw CUDA kernels compiled at run time with
NVRTC.  ``import twell`` never imports CuPy, PyTorch or JAX (:mod:`twell.torch`
and :mod:`twell.jax` are the framework adapters, imported when used).
"""

from .conversions import (
    hybrid_from_scipy,
    hybrid_to_scipy,
    pack_hybrid,
    pack_twell,
    transpose_pattern,
    twell_from_scipy,
    twell_to_scipy,
    unpack_hybrid,
    unpack_twell,
)
from .dispatch import DensityTracker
from .format import Hybrid, NeuronMajorPattern, TwELL
from .ops import down_projection, ffn, gated_ffn, gated_ffn_backward, gated_ffn_forward, gated_up_down
from .results import FFNStats, SavedForBackward

__version__ = "0.2.0"

__all__ = [
    "TwELL", "Hybrid", "NeuronMajorPattern", "FFNStats", "SavedForBackward", "DensityTracker",
    "pack_twell", "unpack_twell", "twell_to_scipy", "twell_from_scipy",
    "pack_hybrid", "unpack_hybrid", "hybrid_to_scipy", "hybrid_from_scipy", "transpose_pattern",
    "gated_ffn", "ffn", "gated_up_down", "down_projection", "gated_ffn_forward", "gated_ffn_backward",
    "__version__",
]
