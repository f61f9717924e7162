"""The layer :class:`SparseGatedFFN`: an ``nn.Module`` holding the three weights in twell's neuron-major layout,
with its own density tracker and statistics."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from twell.dispatch import DensityTracker
from twell.format import DEFAULT_COMPRESSION, DEFAULT_TILE_WIDTH

from .functional import check_options, run_gated
from .registry import new_stats_slot, tracker_id
from .stats import TorchFFNStats


class SparseGatedFFN(nn.Module):
    """Gated FFN ``y = (relu(x W_gateᵀ) ⊙ (x W_upᵀ)) W_down`` with twell's sparse kernels.

    Parameters ``w_gate``, ``w_up``, ``w_down`` all have shape ``(n, d)`` (neuron-major; ``w_down`` is the
    transpose of ``nn.Linear(n, d).weight``), initialised like ``nn.Linear`` (uniform in ±1/sqrt(fan_in):
    fan_in d for gate and up, n for down).

    Parameters
    ----------
    d, n : int
        Model width and hidden width (d_ff).
    l1_weight : float
        λ of the L1 penalty on the hidden activations (gradient added in the backward).
    dense_row_threshold : int or None
        Rows with more active neurons go to the dense backup (default 128).
    path : {"auto", "sparse", "dense"}
        "auto": the module's :attr:`density_tracker` picks sparse or dense from the last call's density;
        set ``module.path = "dense"`` to force the dense computation.
    gate_kernel : str
        As in :func:`twell.gated_ffn`.
    collect_stats : bool
        Keep each call's statistics in :attr:`last_stats` (costs a count kernel; inference batches of at
        most 4 rows then skip the fused decode kernels: set False for decoding).
    torch_memory : bool
        As in :func:`~twell.torch.gated_ffn`: True (default) allocates twell's device memory of training
        calls and of inference batches of more than 512 rows from PyTorch's caching allocator, False from
        CuPy's pool.  Also an attribute (``module.torch_memory = False``).
    dtype, device
        Of the parameters.

    Attributes
    ----------
    last_stats : TorchFFNStats or None
        The last call's statistics (None before the first call, when ``collect_stats`` is False, and after
        a call captured in a CUDA graph).
    density_tracker : twell.DensityTracker
        This layer's density memory (``path="auto"``).
    """

    def __init__(self, d: int, n: int, *, l1_weight: float = 0.0, dense_row_threshold: int | None = 128,
                 path: str = "auto", gate_kernel: str = "auto", collect_stats: bool = True,
                 torch_memory: bool = True, dtype=None, device=None):
        super().__init__()
        for name, v in (("d", d), ("n", n)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        self.d, self.n = d, n
        factory = {"dtype": dtype, "device": device}
        self.w_gate = nn.Parameter(torch.empty(n, d, **factory))
        self.w_up = nn.Parameter(torch.empty(n, d, **factory))
        self.w_down = nn.Parameter(torch.empty(n, d, **factory))
        self.l1_weight, threshold = check_options(l1_weight, dense_row_threshold, DEFAULT_TILE_WIDTH,
                                                  DEFAULT_COMPRESSION, gate_kernel, path)
        self.dense_row_threshold = threshold
        self.path = path
        self.gate_kernel = gate_kernel
        self.collect_stats = bool(collect_stats)
        self.torch_memory = bool(torch_memory)
        self._init_state()
        self.reset_parameters()

    def _init_state(self):
        threshold = self.dense_row_threshold
        self.density_tracker = DensityTracker(128 if threshold is None else threshold)
        self._stats_slot, self._stats_id = new_stats_slot()

    @property
    def density_tracker(self) -> DensityTracker:
        return self._density_tracker

    @density_tracker.setter
    def density_tracker(self, tracker: DensityTracker):
        if not isinstance(tracker, DensityTracker):
            raise TypeError(f"density_tracker must be a twell.DensityTracker, got {type(tracker).__name__}")
        self._density_tracker = tracker
        self._tracker_id = tracker_id(tracker)

    @property
    def last_stats(self) -> TorchFFNStats | None:
        return self._stats_slot.stats

    def reset_parameters(self):
        with torch.no_grad():
            bound_in = 1.0 / math.sqrt(self.d)
            self.w_gate.uniform_(-bound_in, bound_in)
            self.w_up.uniform_(-bound_in, bound_in)
            bound_down = 1.0 / math.sqrt(self.n)
            self.w_down.uniform_(-bound_down, bound_down)

    def forward(self, x: Tensor) -> Tensor:
        check_options(self.l1_weight, self.dense_row_threshold, DEFAULT_TILE_WIDTH, DEFAULT_COMPRESSION,
                      self.gate_kernel, self.path)
        return run_gated(x, self.w_gate, self.w_up, self.w_down, l1_weight=float(self.l1_weight), return_l1=False,
                         tile_width=DEFAULT_TILE_WIDTH, compression=DEFAULT_COMPRESSION,
                         dense_row_threshold=self.dense_row_threshold, gate_kernel=self.gate_kernel, path=self.path,
                         tracker_id=self._tracker_id, slot_id=self._stats_id if self.collect_stats else -1,
                         torch_memory=bool(self.torch_memory))

    @classmethod
    def from_linear(cls, gate: nn.Linear, up: nn.Linear, down: nn.Linear, **kwargs) -> SparseGatedFFN:
        """A module computing ``down(relu(gate(x)) * up(x))`` from three bias-free ``nn.Linear`` (weights
        copied; ``down.weight`` (d, n) is stored transposed).  ``kwargs`` as in the constructor."""
        for name, lin in (("gate", gate), ("up", up), ("down", down)):
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"{name} must be an nn.Linear, got {type(lin).__name__}")
            if lin.bias is not None:
                raise ValueError(f"{name} has a bias: SparseGatedFFN has none (build the nn.Linear with bias=False)")
        n, d = gate.weight.shape
        if tuple(up.weight.shape) != (n, d):
            raise ValueError(f"up.weight must have gate.weight's shape (n, d) = {(n, d)}, got {tuple(up.weight.shape)}")
        if tuple(down.weight.shape) != (d, n):
            raise ValueError(f"down.weight must have shape (d, n) = {(d, n)} (nn.Linear(n, d)), got "
                             f"{tuple(down.weight.shape)}")
        w = gate.weight
        for name, lin in (("up", up), ("down", down)):
            if lin.weight.dtype != w.dtype or lin.weight.device != w.device:
                raise ValueError(f"{name}.weight is {lin.weight.dtype} on {lin.weight.device} but gate.weight is "
                                 f"{w.dtype} on {w.device}")
        module = cls(d, n, dtype=w.dtype, device=w.device, **kwargs)
        with torch.no_grad():
            module.w_gate.copy_(gate.weight)
            module.w_up.copy_(up.weight)
            module.w_down.copy_(down.weight.mT)
        return module

    def to_linear(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        """``(gate, up, down)`` bias-free ``nn.Linear`` modules with copies of the weights."""
        factory = {"dtype": self.w_gate.dtype, "device": self.w_gate.device}
        gate = nn.Linear(self.d, self.n, bias=False, **factory)
        up = nn.Linear(self.d, self.n, bias=False, **factory)
        down = nn.Linear(self.n, self.d, bias=False, **factory)
        with torch.no_grad():
            gate.weight.copy_(self.w_gate)
            up.weight.copy_(self.w_up)
            down.weight.copy_(self.w_down.mT)
        return gate, up, down

    def extra_repr(self) -> str:
        return (f"d={self.d}, n={self.n}, l1_weight={self.l1_weight}, dense_row_threshold={self.dense_row_threshold}, "
                f"path={self.path!r}")

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in ("_density_tracker", "_tracker_id", "_stats_slot", "_stats_id"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("torch_memory", True)      # pickled before the option existed
        self._init_state()
