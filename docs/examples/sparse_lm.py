"""Train and serve a small byte-level Llama-style LM twice, dense and L1-sparse (twell), and write the paper's
Table 1 at small scale.

    python docs/examples/sparse_lm.py --out runs/lm                          # the full run (H200: < 10 min)
    python docs/examples/sparse_lm.py --out runs/cal --steps 200 --layers 2  # a short calibration run

What one run does (docs/model.md is the product page):

1. Data: the Python standard library's own ``*.py`` files (``sysconfig.get_paths()["stdlib"]``; no network),
   split by file into train / validation with a stable hash of each relative path, byte-level tokens (vocab
   256), files joined with a separator byte.
2. Model: token embedding, L x [RMSNorm -> causal attention with rotary embeddings (scaled_dot_product_attention)
   -> residual -> RMSNorm -> gated FFN with a ReLU gate -> residual], final RMSNorm, untied LM head.  The dense
   model's FFN is plain PyTorch (F.linear, relu, mul); the sparse model's is ``twell.torch.SparseGatedFFN``.
   Both start from the same weights and see the same batches; the part of a block both share (norms,
   attention, residual) is one function compiled once for both (``--compile``).  The sparse model trains with an L1 penalty whose
   weight λ a controller adapts per layer so that the mean active neurons per token follows a target schedule
   (d_ff down to 0.7 % of d_ff by half of the steps, then held).
3. Measurements (JSON + plots in --out): validation bits per byte, active neurons per layer, training
   throughput, peak training memory, energy per token (NVML), whole-model prefill throughput, decode step time
   at batch 1 / 8 / 64 (CUDA graphs), the FFN's share of the time, per-layer activation statistics of the
   trained model and the ``twell.synthetic`` generator parameters that match them best, and a GPU timeline of
   a prefill and a training step (busy and idle GPU time, inside and outside the FFNs).

Every phase prints its progress with the time since the start.  ``--minutes`` caps each model's training
(wall clock); the sparse model then trains for the number of steps the dense one reached.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 256
#: Byte written after every file of the corpus.
SEPARATOR = 0
LN2 = math.log(2.0)
#: Directories never read: installed packages, byte-code caches.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
#: Test-data directories (``test/data``, ``tokenizedata``, ``pydoc_data``, ``data01``, ...), but not
#: ``importlib/metadata`` (a real package).
_DATA_DIR = re.compile(r"(?!meta)\w*data\d*")

#: The paper's whole-model figures (arXiv 2603.23198, Table 1; 0.5-2B parameters, H100 PCIe, λ = 2e-5),
#: shown beside ours: relative change of sparse vs dense.
PAPER = {
    "prefill_throughput": "+17.0 ... +20.5 %",
    "train_throughput": "-1.5 ... +21.9 %",
    "energy_per_token": "-11.8 ... -17.0 %",
    "peak_memory": "-19 ... -28 %",
    "sparsity": "99.3 ... 99.6 % (24-39 active of 5,632)",
}

#: Step-time model used only to print an estimate before training (H200, bf16, 16,384 tokens per step, the
#: paper's layer shape): ms per layer for a training step (forward + backward).
EST_MS = {"ffn_dense": 5.2, "ffn_sparse": 2.6, "attn_proj": 2.3, "sdpa": 0.8, "misc": 1.0, "opt_per_mparam": 0.007}


# ============================================================================ progress


class Progress:
    """Prints ``[elapsed] message`` lines (flushed) and keeps the duration of each named phase."""

    def __init__(self, quiet: bool = False):
        self.t0 = time.perf_counter()
        self.quiet = quiet
        self.phases: dict[str, float] = {}

    def __call__(self, msg: str):
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:7.1f} s] {msg}", flush=True)

    def phase(self, name: str):
        progress = self

        class _Phase:
            def __enter__(self):
                progress(f"== {name}")
                self.t = time.perf_counter()
                return self

            def __exit__(self, *exc):
                dt = time.perf_counter() - self.t
                progress.phases[name] = round(dt, 3)
                progress(f"== {name}: {dt:.1f} s" + (" (failed)" if exc[0] is not None else ""))
                return False

        return _Phase()


# ============================================================================ data


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded(name: str) -> bool:
    return name in EXCLUDED_DIRS or bool(_DATA_DIR.fullmatch(name))


def source_files(root) -> list[str]:
    """Relative POSIX paths of every ``*.py`` file under ``root``, sorted, without the excluded directories."""
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _excluded(d))
        rel_dir = Path(dirpath).relative_to(root)
        for f in filenames:
            if f.endswith(".py"):
                found.append((rel_dir / f).as_posix())
    return sorted(found)


def is_validation(relpath: str, fraction: float) -> bool:
    """Stable split by file: the first 8 bytes of sha256(relative path) as an integer, modulo 10,000."""
    h = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "little")
    return (h % 10_000) < round(fraction * 10_000)


@dataclass
class Corpus:
    train: np.ndarray           # uint8 tokens
    val: np.ndarray
    train_files: list
    val_files: list
    info: dict


def load_corpus(root=None, val_fraction: float = 0.05) -> Corpus:
    """Read every source file (sorted by relative path) as bytes; ``content + SEPARATOR`` per file."""
    root = stdlib_root() if root is None else Path(root)
    files = source_files(root)
    train_parts, val_parts, train_files, val_files = [], [], [], []
    for rel in files:
        data = (root / rel).read_bytes()
        if is_validation(rel, val_fraction):
            val_parts.append(data)
            val_files.append(rel)
        else:
            train_parts.append(data)
            train_files.append(rel)
    sep = bytes([SEPARATOR])
    train = b"".join(p + sep for p in train_parts)
    val = b"".join(p + sep for p in val_parts)
    info = {
        "source": "Python standard library *.py files",
        "root": str(root),
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "excluded_dirs": sorted(EXCLUDED_DIRS) + ["test-data directories: names matching " + _DATA_DIR.pattern],
        "separator_byte": SEPARATOR,
        "val_fraction_target": val_fraction,
        "split": "sha256(relative path)[:8] little-endian mod 10000 < fraction * 10000",
        "files_total": len(files),
        "files_train": len(train_files),
        "files_val": len(val_files),
        "bytes_train": len(train),
        "bytes_val": len(val),
        "sha256_train": hashlib.sha256(train).hexdigest(),
        "sha256_val": hashlib.sha256(val).hexdigest(),
    }
    return Corpus(np.frombuffer(train, dtype=np.uint8), np.frombuffer(val, dtype=np.uint8), train_files,
                  val_files, info)


class BatchStream:
    """Deterministic training batches: the token stream cut into non-overlapping windows of ``context + 1``
    bytes (stride ``context``), shuffled per epoch with ``numpy.random.default_rng([seed, epoch])``.  The
    window starts of every step are put on the device once (:meth:`prepare`): no host-device copy per step."""

    def __init__(self, tokens: np.ndarray, context: int, batch: int, seed: int, device):
        self.context, self.batch_size, self.seed = int(context), int(batch), int(seed)
        self.n_windows = (len(tokens) - 1) // self.context
        if self.n_windows < self.batch_size:
            raise ValueError(f"the training stream has {self.n_windows} windows of {context + 1} bytes, fewer than "
                             f"one batch of {batch}")
        self.per_epoch = self.n_windows // self.batch_size
        self.device = torch.device(device)
        self.tokens = torch.from_numpy(np.array(tokens, dtype=np.uint8)).to(self.device)
        self.offsets = torch.arange(self.context + 1, device=self.device)
        self._perms: dict[int, np.ndarray] = {}
        self._starts = None

    def starts(self, step: int) -> np.ndarray:
        """Start offsets (batch,) of a step's windows."""
        epoch, i = divmod(int(step), self.per_epoch)
        perm = self._perms.get(epoch)
        if perm is None:
            perm = self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        return perm[i * self.batch_size:(i + 1) * self.batch_size].astype(np.int64) * self.context

    def prepare(self, steps: int):
        self._starts = torch.from_numpy(np.stack([self.starts(s) for s in range(steps)])).to(self.device)

    def epochs(self, steps: int) -> float:
        return steps / self.per_epoch

    def batch(self, step: int):
        """(inputs, targets), int64 (batch, context) on the device."""
        if self._starts is not None and step < self._starts.shape[0]:
            s = self._starts[step]
        else:
            s = torch.from_numpy(self.starts(step)).to(self.device)
        w = self.tokens[s[:, None] + self.offsets].long()
        return w[:, :-1], w[:, 1:]


def validation_batches(tokens: np.ndarray, context: int, batch: int, n_batches: int, device) -> list:
    """A fixed set of validation batches: windows at stride ``context``, ``batch * n_batches`` of them evenly
    spaced over the validation stream (all of them when there are fewer)."""
    n_windows = (len(tokens) - 1) // context
    if n_windows < 1:
        raise ValueError(f"the validation stream ({len(tokens)} bytes) is shorter than one window of {context + 1}")
    want = min(n_windows, batch * n_batches)
    idx = np.unique(np.linspace(0, n_windows - 1, want).round().astype(np.int64))
    t = torch.from_numpy(np.array(tokens, dtype=np.uint8)).to(device)
    offs = torch.arange(context + 1, device=device)
    out = []
    for i in range(0, len(idx), batch):
        starts = torch.from_numpy(idx[i:i + batch] * context).to(device)
        w = t[starts[:, None] + offs].long()
        out.append((w[:, :-1], w[:, 1:]))
    return out


def bits_per_byte(nats_sum: float, n_bytes: int) -> float:
    """Cross-entropy summed over ``n_bytes`` byte tokens (nats) as bits per byte."""
    return float(nats_sum) / max(int(n_bytes), 1) / LN2


# ============================================================================ model


@dataclass
class ModelConfig:
    d_model: int = 2048
    d_ff: int = 5632
    n_layers: int = 4
    n_heads: int = 16
    context: int = 1024
    vocab: int = VOCAB
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    rope_length: int = 1024          # positions with rotary tables (>= context and the decode cache)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def check(self):
        if self.d_model % self.n_heads or self.head_dim % 2:
            raise ValueError(f"d_model {self.d_model} must split into {self.n_heads} heads of an even size")


class DenseGatedFFN(nn.Module):
    """``y = (relu(x w_gateᵀ) ⊙ (x w_upᵀ)) w_down`` with plain PyTorch ops (cuBLAS GEMMs, torch elementwise).

    Parameters in twell's neuron-major layout, all (n, d) (``w_down`` is the transpose of
    ``nn.Linear(n, d).weight``), so a state dict moves unchanged between this and ``SparseGatedFFN``."""

    def __init__(self, d: int, n: int, *, dtype=None, device=None):
        super().__init__()
        factory = {"dtype": dtype, "device": device}
        self.d, self.n = d, n
        self.w_gate = nn.Parameter(torch.empty(n, d, **factory))
        self.w_up = nn.Parameter(torch.empty(n, d, **factory))
        self.w_down = nn.Parameter(torch.empty(n, d, **factory))
        for w in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(w, std=0.02)

    def forward(self, x):
        h = F.relu(F.linear(x, self.w_gate)) * F.linear(x, self.w_up)
        return h @ self.w_down


def rotary(x, cos, sin):
    """Rotary embedding on the last dimension (halves rotated); ``cos`` / ``sin`` broadcast to x[..., :Dh/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    """Causal multi-head attention's weights (QKV and output projections, no biases) and its decode step."""

    def __init__(self, cfg: ModelConfig, dtype=None, device=None):
        super().__init__()
        self.h, self.dh, self.d = cfg.n_heads, cfg.head_dim, cfg.d_model
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False, dtype=dtype, device=device)
        self.o = nn.Linear(cfg.d_model, cfg.d_model, bias=False, dtype=dtype, device=device)

    # the forward over a whole sequence is attention_half (below), shared with the norms

    def step(self, x, cos, sin, pos, cache, mask):
        """One decode position: x (B, 1, d); K / V written into the static cache at ``pos`` (a (1,) tensor)."""
        b = x.shape[0]
        q, k, v = self.qkv(x).view(b, 1, 3, self.h, self.dh).unbind(2)
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        ck, cv = cache
        ck.index_copy_(2, pos, k.transpose(1, 2))
        cv.index_copy_(2, pos, v.transpose(1, 2))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), ck, cv, attn_mask=mask)
        return self.o(y.transpose(1, 2).reshape(b, 1, self.d))


def attention_half(x, cos, sin, w_attn_norm, w_qkv, w_o, w_ffn_norm, eps: float, n_heads: int):
    """The part of a block both models share: ``x + attention(rms_norm(x))`` and the FFN's input (its RMSNorm).
    The ops of :meth:`Attention.step` over a whole causal sequence, and ``nn.RMSNorm``'s, as one function of
    the weights, so that one ``torch.compile`` of it serves every layer of both models (``--compile``)."""
    b, t, d = x.shape
    hn = F.rms_norm(x, (d,), w_attn_norm, eps)
    q, k, v = F.linear(hn, w_qkv).view(b, t, 3, n_heads, d // n_heads).unbind(2)
    q, k = rotary(q, cos, sin), rotary(k, cos, sin)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    x = x + F.linear(y.transpose(1, 2).reshape(b, t, d), w_o)
    return x, F.rms_norm(x, (d,), w_ffn_norm, eps)


_COMPILED = {}


def shared_half(compiled: bool):
    """:func:`attention_half`, compiled once per process by ``torch.compile`` when ``compiled``."""
    if not compiled:
        return attention_half
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(attention_half, dynamic=False)
    return _COMPILED["fn"]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn: nn.Module, dtype=None, device=None, compiled: bool = False):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype, device=device)
        self.attn = Attention(cfg, dtype, device)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype, device=device)
        self.ffn = ffn
        self.half = shared_half(compiled)

    def forward(self, x, cos, sin):
        x, h = self.half(x, cos, sin, self.attn_norm.weight, self.attn.qkv.weight, self.attn.o.weight,
                         self.ffn_norm.weight, self.attn_norm.eps, self.attn.h)
        return x + self.ffn(h)

    def step(self, x, cos, sin, pos, cache, mask):
        x = x + self.attn.step(self.attn_norm(x), cos, sin, pos, cache, mask)
        return x + self.ffn(self.ffn_norm(x))


class LM(nn.Module):
    """Byte-level decoder; ``ffn_kind`` "dense" (PyTorch) or "sparse" (``twell.torch.SparseGatedFFN``)."""

    def __init__(self, cfg: ModelConfig, ffn_kind: str = "dense", *, dtype=None, device=None,
                 dense_row_threshold: int | None = 128, compiled: bool = False):
        super().__init__()
        cfg.check()
        self.cfg, self.ffn_kind = cfg, ffn_kind
        if ffn_kind == "dense":
            make = lambda: DenseGatedFFN(cfg.d_model, cfg.d_ff, dtype=dtype, device=device)  # noqa: E731
        elif ffn_kind == "sparse":
            import twell.torch as tt  # noqa: PLC0415
            # torch_memory=True: twell's training allocations come from PyTorch's caching allocator, so
            # torch.cuda.max_memory_allocated() covers them
            make = lambda: tt.SparseGatedFFN(cfg.d_model, cfg.d_ff, l1_weight=0.0,  # noqa: E731
                                             dense_row_threshold=dense_row_threshold, path="auto",
                                             torch_memory=True, dtype=dtype, device=device)
        else:
            raise ValueError(f"ffn_kind must be 'dense' or 'sparse', got {ffn_kind!r}")
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model, dtype=dtype, device=device)
        self.blocks = nn.ModuleList(Block(cfg, make(), dtype, device, compiled) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dtype, device=device)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False, dtype=dtype, device=device)
        half = cfg.head_dim // 2
        inv = cfg.rope_theta ** (-torch.arange(half, dtype=torch.float64) / half)
        ang = torch.arange(cfg.rope_length, dtype=torch.float64)[:, None] * inv[None, :]
        dt = dtype if dtype is not None else torch.get_default_dtype()
        self.register_buffer("cos", ang.cos().to(device=device, dtype=dt), persistent=False)
        self.register_buffer("sin", ang.sin().to(device=device, dtype=dt), persistent=False)

    @property
    def ffns(self) -> list:
        return [b.ffn for b in self.blocks]

    def forward(self, tokens):
        t = tokens.shape[1]
        cos, sin = self.cos[:t, None, :], self.sin[:t, None, :]                    # (T, 1, Dh/2)
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        return self.head(self.norm(x))

    def new_cache(self, batch: int, length: int) -> list:
        c = self.cfg
        p = self.head.weight
        return [tuple(torch.zeros(batch, c.n_heads, length, c.head_dim, dtype=p.dtype, device=p.device)
                      for _ in range(2)) for _ in range(c.n_layers)]

    def decode_step(self, tokens, pos, cache, positions):
        """Logits (B, 1, V) of one position.  ``tokens`` (B, 1), ``pos`` a (1,) int64 tensor, ``positions``
        ``arange(cache length)`` on the device: every shape is static (CUDA-graph capturable)."""
        cos = self.cos.index_select(0, pos).view(1, 1, -1)
        sin = self.sin.index_select(0, pos).view(1, 1, -1)
        mask = (positions <= pos).view(1, 1, 1, -1)
        x = self.embed(tokens)
        for blk, kv in zip(self.blocks, cache):
            x = blk.step(x, cos, sin, pos, kv, mask)
        return self.head(self.norm(x))


def init_state(cfg: ModelConfig, seed: int) -> dict:
    """The initial weights both models load (CPU float32): normal(0, 0.02); the residual output projections
    (attention ``o``, FFN ``w_down``) normal(0, 0.02 / sqrt(2 L)); norms 1."""
    g = torch.Generator().manual_seed(seed)
    shapes = LM(cfg, "dense", dtype=torch.float32, device="meta")          # names and shapes only
    out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    state = {}
    for name, p in shapes.named_parameters():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(p.shape)
        else:
            std = out_std if name.endswith(("attn.o.weight", "ffn.w_down")) else 0.02
            state[name] = torch.empty(p.shape).normal_(0.0, std, generator=g)
    return state


def build_model(cfg, kind, state, *, dtype, device, dense_row_threshold=128, compiled=False) -> LM:
    model = LM(cfg, kind, dtype=dtype, device=device, dense_row_threshold=dense_row_threshold, compiled=compiled)
    model.load_state_dict(state, strict=True)
    return model


# ============================================================================ L1 controller


@dataclass
class L1Controller:
    """Per-layer λ so that the mean active neurons per token follows a target schedule.

    Target: ``initial`` at ``start`` (λ = 0 before it: the dense warm-up), geometric interpolation down to
    ``final`` at ``ramp_end`` (a step), then held.  Every ``every`` steps from ``start`` on, each layer's mean
    active count over the last ``every`` steps, ``l0``, is projected ``horizon`` updates ahead along its
    falling trend, ``p = l0 · min(1, l0 / l0_previous) ** horizon`` (the model answers a change of λ tens of
    steps later: without the projection λ keeps growing while l0 is already falling, and overshoots), and
    compared with the target ``T`` at that later step.  λ (one per layer; ``shared=True``: one for all, driven
    by the densest layer) is multiplied by

    * ``min(max_up, (p / T) ** gain_up)`` when ``p > T`` (fast, bounded increase);
    * ``max(1 / max_down, (p / (low_band T)) ** gain_down)`` when ``p < low_band · T`` (slow, bounded decrease:
      a model pushed too sparse recovers slowly, and dead neurons do not come back by themselves);
    * 1 in between;

    then clipped to [``lo``, ``hi``].  At ``start`` λ jumps from 0 to ``init``: the multiplicative increases
    make a geometric warm-up from there.
    """

    n_layers: int
    start: int
    ramp_end: int
    initial: float
    final: float
    every: int = 10
    init: float = 1e-5
    gain_up: float = 0.5
    max_up: float = 1.5
    gain_down: float = 0.25
    max_down: float = 1.1
    low_band: float = 0.7
    horizon: float = 6.0
    lo: float = 1e-9
    hi: float = 10.0
    shared: bool = False
    lam: list = field(default_factory=list)
    previous: list = field(default_factory=list)
    updates: int = 0

    def __post_init__(self):
        if not self.lam:
            self.lam = [float(self.init)] * self.n_layers
        if self.every < 1 or self.ramp_end < self.start or self.final <= 0 or self.initial < self.final:
            raise ValueError("L1Controller: need every >= 1, ramp_end >= start, initial >= final > 0")

    def target(self, step: int) -> float:
        if step <= self.start:
            return float(self.initial)
        if step >= self.ramp_end:
            return float(self.final)
        f = (step - self.start) / (self.ramp_end - self.start)
        return float(math.exp((1 - f) * math.log(self.initial) + f * math.log(self.final)))

    def lambdas(self, step: int) -> list:
        """λ of each layer for the training step ``step`` (0-based)."""
        return [0.0] * self.n_layers if step < self.start else list(self.lam)

    def factor(self, l0: float, target: float) -> float:
        """The multiplicative change of λ for a (projected) active count ``l0`` against ``target``."""
        if not math.isfinite(l0) or target <= 0:
            return 1.0
        r = l0 / target
        if r > 1.0:
            return min(self.max_up, r ** self.gain_up)
        if r < self.low_band:
            return max(1.0 / self.max_down, (max(r, 1e-12) / self.low_band) ** self.gain_down)
        return 1.0

    def projected(self, l0: float, previous) -> float:
        """``l0`` extrapolated ``horizon`` updates along a falling trend (a rising one is not extrapolated)."""
        if previous is None or not previous > 0 or not l0 > 0 or not math.isfinite(l0):
            return l0
        return l0 * min(1.0, l0 / previous) ** self.horizon

    def due(self, steps_done: int) -> bool:
        return steps_done >= self.start + self.every and (steps_done - self.start) % self.every == 0

    def update(self, steps_done: int, l0_per_layer) -> list:
        """Update after ``steps_done`` steps from each layer's mean active count over the last ``every`` steps;
        returns the new λ list."""
        t = self.target(steps_done + round(self.horizon * self.every))
        l0 = [float(v) for v in l0_per_layer]
        prev = self.previous if len(self.previous) == len(l0) else [None] * len(l0)
        proj = [self.projected(a, p) for a, p in zip(l0, prev)]
        if self.shared:
            f = self.factor(max(proj), t)
            self.lam = [min(self.hi, max(self.lo, self.lam[0] * f))] * self.n_layers
        else:
            self.lam = [min(self.hi, max(self.lo, lam * self.factor(p, t))) for lam, p in zip(self.lam, proj)]
        self.previous = l0
        self.updates += 1
        return list(self.lam)


# ============================================================================ device helpers


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, runs: int, device, warmup: int = 2) -> list:
    """Milliseconds of each of ``runs`` calls of ``fn`` (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    if device.type == "cuda":
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
        for a, b in ev:
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize(device)
        times = [a.elapsed_time(b) for a, b in ev]
    else:
        for _ in range(runs):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return times


class EnergyMeter:
    """NVML's total energy counter of the GPU (millijoules since the driver loaded); ``read()`` is None and
    ``reason`` says why when it cannot be read."""

    def __init__(self, device):
        self.handle = None
        self.reason = None
        self.nvml = None
        if device.type != "cuda":
            self.reason = "not a CUDA device"
            return
        try:
            import pynvml  # noqa: PLC0415
            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = self._handle(pynvml, device)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except Exception as exc:  # noqa: BLE001 - any failure means: no energy numbers
            self.handle = None
            self.reason = f"NVML unavailable: {type(exc).__name__}: {exc}"

    @staticmethod
    def _handle(pynvml, device):
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        bus = getattr(props, "pci_bus_id", None)
        if bus is not None:
            pci = f"{getattr(props, 'pci_domain_id', 0):08x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"
            try:
                return pynvml.nvmlDeviceGetHandleByPciBusId(pci.encode())
            except Exception:  # noqa: BLE001
                pass
        nvml_index = getattr(torch.cuda, "_get_nvml_device_index", None)
        return pynvml.nvmlDeviceGetHandleByIndex(nvml_index(idx) if nvml_index else idx)

    def read(self):
        if self.handle is None:
            return None
        try:
            return float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))
        except Exception:  # noqa: BLE001
            return None


# ============================================================================ activation statistics


def active_counts(x, w_gate):
    """Per-token and per-neuron counts of ``relu(x w_gateᵀ) > 0`` (x (..., d) flattened), int64 tensors."""
    act = (x.reshape(-1, x.shape[-1]) @ w_gate.mT) > 0
    return act.sum(1), act.sum(0)


def distribution_stats(tok: np.ndarray, neu: np.ndarray, n: int) -> dict:
    """Per-token count distribution and per-neuron popularity of one layer on ``len(tok)`` tokens."""
    tok = np.asarray(tok, dtype=np.int64)
    neu = np.asarray(neu, dtype=np.int64)
    mean = float(tok.mean())
    total = int(neu.sum())
    top = max(1, math.ceil(0.01 * n))
    return {
        "tokens": int(tok.size),
        "mean": mean,
        "std": float(tok.std()),
        "p50": float(np.percentile(tok, 50)),
        "p90": float(np.percentile(tok, 90)),
        "p99": float(np.percentile(tok, 99)),
        "max": int(tok.max()),
        "max_over_mean": float(tok.max() / mean) if mean > 0 else None,
        "frac_zero_rows": float((tok == 0).mean()),
        "sparsity": 1.0 - mean / n,
        "neuron": {
            "frac_dead": float((neu == 0).mean()),
            "cv": float(neu.std() / neu.mean()) if neu.mean() > 0 else None,
            "top1pct_share": float(np.sort(neu)[::-1][:top].sum() / total) if total else None,
            "max_rate": float(neu.max() / tok.size),
        },
    }


def _norm():
    from scipy.stats import norm  # noqa: PLC0415
    return norm


_HERMITE = {}


def _kappa_for_mean(rate: float, sigma: float) -> float:
    """κ with ``E_s[Φ̄(κ / s)] = rate`` for ``log s ~ N(0, σ²)`` (what twell.synthetic's token_skew uses with
    ``calibrate="mean"``; Gauss-Hermite quadrature)."""
    from scipy.optimize import brentq  # noqa: PLC0415
    from scipy.special import ndtr  # noqa: PLC0415
    if not _HERMITE:
        nodes, weights = np.polynomial.hermite_e.hermegauss(101)
        _HERMITE.update(nodes=nodes, weights=weights / math.sqrt(2 * math.pi))
    s = np.exp(sigma * _HERMITE["nodes"])
    w = _HERMITE["weights"]
    return float(brentq(lambda k: float(np.dot(w, ndtr(-k / s))) - rate, -60.0, 60.0, xtol=1e-10))


_FIT_QUANTILES = (0.5, 0.75, 0.9, 0.95, 0.99)


def fit_synthetic(tok: np.ndarray, neu: np.ndarray, n: int) -> dict:
    """Parameters of ``twell.synthetic.make_problem`` that best reproduce one layer's statistics.

    * ``uniform``: the mean.
    * ``token_skew`` (``calibrate="mean"``): σ of the per-token lognormal scale chosen on a grid so that the
      predicted quantiles ``n Φ̄(κ / exp(σ z_q))`` of the per-token count match the measured ones at
      q = 0.5 ... 0.99 (least squares in log(1 + count)); κ from the mean.
    * ``neuron_skew``: the share of neurons never active on these tokens (dead), σ = std of the log firing
      rates of the others, the mean.
    """
    tok = np.asarray(tok, dtype=np.float64)
    neu = np.asarray(neu, dtype=np.float64)
    m = tok.size
    mean = float(tok.mean())
    fits = {}
    if mean <= 0:
        return {"note": "no active neuron on these tokens: nothing to fit"}
    fits["uniform"] = {"kind": "uniform", "mean_active": mean}
    norm = _norm()
    real = np.quantile(tok, _FIT_QUANTILES)
    zq = norm.ppf(_FIT_QUANTILES)
    best = None
    for sigma in np.round(np.arange(0.0, 1.5001, 0.01), 4):
        try:
            k = _kappa_for_mean(mean / n, float(sigma))
        except ValueError:
            continue
        pred = n * norm.sf(k / np.exp(sigma * zq))
        err = float(np.sum((np.log1p(pred) - np.log1p(real)) ** 2))
        if best is None or err < best[0]:
            best = (err, float(sigma), pred)
    if best is not None:
        fits["token_skew"] = {"kind": "token_skew", "mean_active": mean, "skew_sigma": best[1], "calibrate": "mean",
                              "quantiles": list(_FIT_QUANTILES), "measured_quantiles": real.tolist(),
                              "predicted_quantiles": best[2].tolist(), "fit_error": best[0]}
    alive = neu > 0
    dead = float(1.0 - alive.mean())
    if alive.sum() >= 2:
        logr = np.log(neu[alive] / m)
        n_alive = n - int(round(dead * n))
        fits["neuron_skew"] = {"kind": "neuron_skew", "mean_active": mean, "skew_sigma": float(logr.std()),
                               "dead_fraction": dead,
                               "feasible": bool(mean < 0.9 * n_alive)}
    for f in fits.values():
        f["bench_args"] = _bench_args(f)
    return fits


def _bench_args(fit: dict) -> str:
    s = f"--kind {fit['kind']} --mean {fit['mean_active']:.2f}"
    if fit["kind"] == "token_skew":
        s += f" --skew-sigma {fit['skew_sigma']:.3f} --calibrate {fit['calibrate']}"
    elif fit["kind"] == "neuron_skew":
        s += f" --skew-sigma {fit['skew_sigma']:.3f} --dead-fraction {fit['dead_fraction']:.3f}"
    return s


def _score(real: dict, syn: dict) -> float:
    """Distance between two statistic dicts: mean |log ratio| of the per-token mean / p50 / p90 / p99 / max
    (in 1 + count) plus |log ratio| of the neuron-count CV (+0.05) plus the difference of the dead fractions."""
    keys = ("mean", "p50", "p90", "p99", "max")
    tok = sum(abs(math.log1p(real[k]) - math.log1p(syn[k])) for k in keys) / len(keys)
    cv_r, cv_s = real["neuron"]["cv"] or 0.0, syn["neuron"]["cv"] or 0.0
    return tok + abs(math.log((cv_r + 0.05) / (cv_s + 0.05))) + abs(real["neuron"]["frac_dead"]
                                                                      - syn["neuron"]["frac_dead"])


def check_fits(fits: dict, real_stats: dict, d: int, n: int, m: int, *, device, seed: int = 0) -> dict:
    """Generate each fitted problem with ``twell.synthetic.make_problem`` (on the GPU with CuPy when there is
    one), measure it with ``describe`` and score it against the real layer; returns per kind the generated
    statistics and the score, and ``best`` (lowest score)."""
    from twell import synthetic  # noqa: PLC0415
    xp = np
    dtype = "float32"
    if device.type == "cuda":
        try:
            import cupy  # noqa: PLC0415
            xp, dtype = cupy, "bfloat16"
        except ImportError:
            pass
    out = {}
    for kind, fit in fits.items():
        if not isinstance(fit, dict) or "kind" not in fit:
            continue
        kw = {"mean_active": min(float(fit["mean_active"]), float(n)), "kind": kind, "dtype": dtype, "seed": seed,
              "xp": xp}
        if kind == "token_skew":
            kw.update(skew_sigma=fit["skew_sigma"], calibrate=fit["calibrate"])
        elif kind == "neuron_skew":
            kw.update(skew_sigma=fit["skew_sigma"], dead_fraction=min(fit["dead_fraction"], 0.999))
        try:
            p = synthetic.make_problem(m, d, n, **kw)
            desc = synthetic.describe(p)
            tok, neu = desc["token"], desc["neuron"]
            syn = {"mean": tok["mean"], "p50": tok["p50"], "p90": tok["p90"], "p99": tok["p99"], "max": tok["max"],
                   "neuron": {"cv": neu["cv"], "frac_dead": neu["frac_dead"]}}
            out[kind] = {"generated": syn, "score": _score(real_stats, syn)}
            del p
        except Exception as exc:  # noqa: BLE001 - a kind that cannot express this layer
            out[kind] = {"error": f"{type(exc).__name__}: {exc}"}
    if xp is not np:
        xp.get_default_memory_pool().free_all_blocks()
    scored = [(v["score"], k) for k, v in out.items() if "score" in v]
    out["best"] = min(scored)[1] if scored else None
    return out


# ============================================================================ training


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio · peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    f = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * f)))


def make_optimizer(model, lr, weight_decay, device):
    decay, other = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.startswith("embed") else other).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    kw = {"lr": lr, "betas": (0.9, 0.95), "eps": 1e-8}
    if device.type == "cuda":
        try:
            return torch.optim.AdamW(groups, fused=True, **kw), "fused"
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(groups, foreach=True, **kw), "foreach"


@torch.no_grad()
def evaluate(model, batches, *, detail: bool = False) -> dict:
    """Validation bits per byte and the mean active neurons per token of each layer (counted with torch from
    the FFN's input: ``relu(x w_gateᵀ) > 0``; for twell modules also twell's own ``last_stats.l0``).
    ``detail``: also the per-token counts and per-neuron counts (NumPy) of every layer."""
    ffns = model.ffns
    n_layers = len(ffns)
    tok_sum = [0.0] * n_layers
    tok_n = [0] * n_layers
    per_tok = [[] for _ in range(n_layers)]
    per_neu = [None] * n_layers

    def hook(i):
        def fn(module, args):
            t, nc = active_counts(args[0], module.w_gate)
            tok_sum[i] += t.sum()
            tok_n[i] += t.numel()
            if detail:
                per_tok[i].append(t)
                per_neu[i] = nc if per_neu[i] is None else per_neu[i] + nc
        return fn

    handles = [f.register_forward_pre_hook(hook(i)) for i, f in enumerate(ffns)]
    sparse = model.ffn_kind == "sparse"
    nats = torch.zeros((), dtype=torch.float64, device=model.head.weight.device)
    n_bytes = 0
    twell_l0 = [0.0] * n_layers
    backup_rows = [0] * n_layers
    paths = None
    try:
        for x, y in batches:
            logits = model(x)
            nats += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1),
                                    reduction="sum").double()
            n_bytes += y.numel()
            if sparse:
                stats = [f.last_stats for f in ffns]
                for i, s in enumerate(stats):
                    if s is not None:
                        twell_l0[i] += s.l0.double() * s.n_rows
                        backup_rows[i] += s.n_backup_rows
                paths = [None if s is None else s.path for s in stats]
    finally:
        for h in handles:
            h.remove()
    res = {"bpb": bits_per_byte(float(nats), n_bytes), "bytes": n_bytes,
           "l0": [float(s) / max(c, 1) for s, c in zip(tok_sum, tok_n)]}
    if sparse:
        res["l0_twell"] = [float(v) / max(c, 1) for v, c in zip(twell_l0, tok_n)]
        res["backup_rows"] = backup_rows
        res["paths"] = paths
    if detail:
        res["per_token"] = [torch.cat(t).cpu().numpy() for t in per_tok]
        res["per_neuron"] = [None if c is None else c.cpu().numpy() for c in per_neu]
    return res


def _reinit_dead(model, opt, counts, gen) -> int:
    """Neurons with zero activity since the last call: gate / up rows redrawn (normal, std 0.02), down row
    zeroed (the layer's output is unchanged), their Adam moments cleared.  Returns how many."""
    total = 0
    for f, c in zip(model.ffns, counts):
        dead = (c == 0).nonzero().flatten()
        k = int(dead.numel())
        if not k:
            continue
        with torch.no_grad():
            for w in (f.w_gate, f.w_up):
                w[dead] = (torch.randn(k, w.shape[1], generator=gen, device="cpu") * 0.02).to(w.device, w.dtype)
            f.w_down[dead] = 0
        for w in (f.w_gate, f.w_up, f.w_down):
            st = opt.state.get(w, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    st[key][dead] = 0
        total += k
    return total


def train_model(label, model, data, val_batches, args, *, steps, planned, controller=None, meter=None,
                progress=print) -> dict:
    """Train ``steps`` steps (LR and λ schedules laid out for ``planned`` steps); stop early at the
    ``args.minutes`` wall-clock cap.  Returns the history and the measurements."""
    device = model.head.weight.device
    ffns = model.ffns
    sparse = controller is not None
    opt, opt_kind = make_optimizer(model, args.lr, args.weight_decay, device)
    params = [p for p in model.parameters()]
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, round(0.05 * planned))
    tokens_per_step = data.batch_size * data.context
    hist = {"step": [], "loss": [], "grad_norm": [], "lr": []}
    if sparse:
        hist.update({"l0": [], "l1": [], "lambda": [], "target": []})
    checkpoints = []        # per flush: step, layer paths and backup rows (sparse)
    evals = []
    intervals = []
    reinit = []
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    mem_start = torch.cuda.memory_allocated(device) if cuda else None
    peak_first = None
    half = max(1, steps // 2)

    def run_eval(step):
        e = evaluate(model, val_batches)
        e["step"] = step
        evals.append(e)
        extra = ""
        if sparse:
            extra = f"  l0(twell) {_fmt_list(e['l0_twell'])}"
        progress(f"{label} eval @ {step}: val {e['bpb']:.4f} bpb  l0 {_fmt_list(e['l0'])}{extra}")

    run_eval(0)
    pending = []
    dead_counts = None
    gen = torch.Generator().manual_seed(args.seed + 1)
    sync(device)
    t_begin = time.perf_counter()
    t0, e0, s0 = t_begin, meter.read() if meter else None, 0
    stopped_by_cap = False
    done = 0
    for step in range(steps):
        x, y = data.batch(step)
        lr = lr_at(step, planned, args.lr, warmup, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        if sparse:
            lams = controller.lambdas(step)
            for f, lam in zip(ffns, lams):
                f.l1_weight = lam
            hist["lambda"].append(lams)
            hist["target"].append(controller.target(step) if step >= controller.start else None)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rec = [loss.detach().double(), gn.detach().double().to(loss.device)]
        if sparse:
            stats = [f.last_stats for f in ffns]
            rec += [s.l0.double().to(loss.device) for s in stats] + [s.l1.double().to(loss.device) for s in stats]
            if args.reinit_dead_every and all(st.neuron_counts is not None for st in stats):
                c = torch.stack([s.neuron_counts.to(torch.int64).to(loss.device) for s in stats])
                dead_counts = c if dead_counts is None else dead_counts + c
        pending.append(torch.stack(rec))
        hist["step"].append(step)
        hist["lr"].append(lr)
        done = step + 1
        flush = done % args.log_every == 0 or done == steps or (sparse and controller.due(done))
        if flush:
            vals = torch.stack(pending).cpu().tolist()
            pending = []
            nl = len(ffns)
            for v in vals:
                hist["loss"].append(v[0])
                hist["grad_norm"].append(v[1])
                if sparse:
                    hist["l0"].append(v[2:2 + nl])
                    hist["l1"].append(v[2 + nl:2 + 2 * nl])
            if sparse:
                checkpoints.append({"step": done, "paths": [s.path for s in stats],
                                    "backup_rows": [s.n_backup_rows for s in stats]})
                if controller.due(done):
                    k = controller.every
                    recent = np.asarray(hist["l0"][-k:], dtype=np.float64)
                    controller.update(done, recent.mean(axis=0))
                if (args.reinit_dead_every and done % args.reinit_dead_every == 0 and done > controller.start
                        and dead_counts is not None):
                    k = _reinit_dead(model, opt, dead_counts, gen)
                    reinit.append({"step": done, "neurons": k})
                    dead_counts = None
        if done == half and cuda:
            peak_first = torch.cuda.max_memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        if done % args.log_every == 0 or done == steps:
            sync(device)
            t1 = time.perf_counter()
            e1 = meter.read() if meter else None
            n_steps = done - s0
            iv = {"step_start": s0, "step_end": done, "seconds": t1 - t0, "tokens": n_steps * tokens_per_step,
                  "tokens_per_s": n_steps * tokens_per_step / max(t1 - t0, 1e-9),
                  "energy_J": None if e0 is None or e1 is None else (e1 - e0) / 1e3}
            intervals.append(iv)
            recent_loss = statistics.fmean(hist["loss"][-n_steps:])
            line = (f"{label} step {done}/{steps}  train {recent_loss / LN2:.4f} bpb  lr {lr:.2e}  "
                    f"{iv['tokens_per_s'] / 1e3:.1f}k tok/s  ({iv['seconds'] * 1e3 / n_steps:.1f} ms/step)")
            if sparse:
                line += (f"  l0 {_fmt_list(hist['l0'][-1])}  target "
                         f"{controller.target(done):.0f}  λ {_fmt_list(controller.lam, '{:.2e}')}  paths "
                         f"{''.join((p or '?')[0] for p in checkpoints[-1]['paths'])}")
            progress(line)
            if args.eval_every and (done % args.eval_every == 0 or done == steps):
                run_eval(done)
            if time.perf_counter() - t_begin > args.minutes * 60 and done < steps:
                stopped_by_cap = True
                progress(f"{label}: --minutes {args.minutes} reached after {done} of {steps} steps: stopping")
                break
            sync(device)
            t0, e0, s0 = time.perf_counter(), meter.read() if meter else None, done
    if evals[-1]["step"] != done:
        run_eval(done)
    sync(device)
    wall = time.perf_counter() - t_begin
    peak_last = torch.cuda.max_memory_allocated(device) if cuda else None
    mem = None
    if cuda:
        peaks = [p for p in (peak_first, peak_last) if p is not None]
        mem = {"peak_allocated_bytes": max(peaks), "peak_second_half_bytes": peak_last if peak_first else None,
               "peak_first_half_bytes": peak_first, "allocated_at_start_bytes": mem_start,
               "reserved_peak_bytes": torch.cuda.max_memory_reserved(device)}
        try:
            import cupy  # noqa: PLC0415
            mem["cupy_pool_total_bytes"] = int(cupy.get_default_memory_pool().total_bytes())
        except Exception:  # noqa: BLE001
            mem["cupy_pool_total_bytes"] = None
    res = {
        "label": label, "steps_done": done, "steps_requested": steps, "steps_planned": planned,
        "stopped_by_minutes_cap": stopped_by_cap, "optimizer": opt_kind, "lr_warmup_steps": warmup,
        "wall_seconds": wall, "tokens_per_step": tokens_per_step, "epochs": data.epochs(done),
        "history": hist, "evals": [_strip_eval(e) for e in evals], "intervals": intervals,
        "throughput": _throughput(intervals, done), "memory": mem,
    }
    if sparse:
        res["l1_controller"] = {k: v for k, v in asdict(controller).items() if k not in ("lam", "previous")}
        res["l1_controller"]["final_lambda"] = list(controller.lam)
        res["l1_controller"]["final_lambda_paper_equivalent"] = [lam * len(ffns) for lam in controller.lam]
        res["path_checkpoints"] = checkpoints
        res["tracker_calls"] = [dict(f.density_tracker.calls) for f in ffns]
        res["dead_reinit"] = {"enabled": bool(args.reinit_dead_every), "every": args.reinit_dead_every,
                              "events": reinit}
    del opt
    for p in params:
        p.grad = None
    return res


def _strip_eval(e):
    return {k: v for k, v in e.items() if k not in ("per_token", "per_neuron")}


def _throughput(intervals, done) -> dict:
    """Tokens/s and J/token over all intervals and over the second half (intervals starting at or after
    half of the steps done)."""
    def agg(ivs):
        if not ivs:
            return None
        sec = sum(i["seconds"] for i in ivs)
        tok = sum(i["tokens"] for i in ivs)
        energy = [i["energy_J"] for i in ivs]
        e = None if any(v is None for v in energy) else sum(energy)
        return {"tokens": tok, "seconds": sec, "tokens_per_s": tok / max(sec, 1e-9),
                "energy_J": e, "energy_mJ_per_token": None if e is None else 1e3 * e / max(tok, 1),
                "mean_power_W": None if e is None else e / max(sec, 1e-9)}
    second = [i for i in intervals if i["step_start"] >= done // 2]
    return {"all": agg(intervals), "second_half": agg(second)}


def _fmt_list(v, fmt="{:.0f}"):
    return "[" + " ".join(fmt.format(float(a)) for a in v) + "]"


# ============================================================================ serving


@torch.inference_mode()
def measure_prefill(model, tokens, runs: int, seconds: float, meter, device) -> dict:
    """Forward of ``tokens`` (B, T) under inference_mode.  Latency: the median of ``runs`` timed calls.
    Throughput and energy per token: a loop of forwards for at least ``seconds`` (synchronised every 4 calls),
    the sustained rate a server sees once the GPU sits at its power limit -- a dense model's single calls
    run faster right after the GPU was idle than in a loop, so a median of a few calls says less about its
    throughput.  Without the loop (``seconds`` 0) the throughput comes from the median."""
    n_tok = tokens.numel()
    times = time_calls(lambda: model(tokens), runs, device)
    med = statistics.median(times)
    res = {"tokens": n_tok, "ms_median": med, "ms_min": min(times), "ms_all": times,
           "tokens_per_s_median": n_tok / (med / 1e3)}
    if seconds <= 0:
        res.update(tokens_per_s=res["tokens_per_s_median"], throughput_from="median of the timed calls",
                   sustained=None, energy=None, energy_reason="--prefill-seconds 0")
        return res
    has_meter = meter is not None and meter.handle is not None
    sync(device)
    e0, t0, k = (meter.read() if has_meter else None), time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds or k < 3:
        model(tokens)
        k += 1
        if k % 4 == 0:
            sync(device)
    sync(device)
    e1, t1 = (meter.read() if has_meter else None), time.perf_counter()
    res["sustained"] = {"calls": k, "seconds": t1 - t0, "ms_per_call": 1e3 * (t1 - t0) / k,
                        "tokens_per_s": k * n_tok / (t1 - t0)}
    res.update(tokens_per_s=res["sustained"]["tokens_per_s"], throughput_from=f"a loop of >= {seconds:g} s")
    if has_meter:
        res["energy"] = {"calls": k, "seconds": t1 - t0, "energy_J": (e1 - e0) / 1e3,
                         "mJ_per_token": (e1 - e0) / (k * n_tok), "mean_power_W": (e1 - e0) / 1e3 / (t1 - t0)}
    else:
        res["energy"] = None
        res["energy_reason"] = meter.reason if meter is not None else "no meter"
    return res


@torch.inference_mode()
def measure_decode(model, val_tokens, batch: int, cache_len: int, fill: int, replays: int, device) -> dict:
    """Decode step time at ``batch`` with a static KV cache of ``cache_len`` positions: the cache is filled
    eagerly with ``fill`` positions of validation text, then the step at position ``fill`` is captured in a
    CUDA graph (on a GPU) and replayed ``replays`` times (median).  Eager timing is recorded too."""
    fill = min(fill, cache_len - 1)
    cache = model.new_cache(batch, cache_len)
    positions = torch.arange(cache_len, device=device)
    pos = torch.zeros(1, dtype=torch.int64, device=device)
    n_win = max(1, (len(val_tokens) - fill - 1) // max(fill + 1, 1))
    rows = [val_tokens[(i % n_win) * (fill + 1):(i % n_win) * (fill + 1) + fill + 1] for i in range(batch)]
    text = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)              # (B, fill + 1)
    tok = torch.empty(batch, 1, dtype=torch.int64, device=device)
    for p in range(fill):
        pos.fill_(p)
        tok.copy_(text[:, p:p + 1])
        model.decode_step(tok, pos, cache, positions)
    pos.fill_(fill)
    tok.copy_(text[:, fill:fill + 1])
    step = lambda: model.decode_step(tok, pos, cache, positions)  # noqa: E731
    eager = time_calls(step, max(10, replays // 4), device, warmup=3)
    res = {"batch": batch, "cache_len": cache_len, "position": fill, "eager_ms_median": statistics.median(eager)}
    if device.type != "cuda":
        res.update(graph=False, graph_reason="not a CUDA device", ms_median=res["eager_ms_median"])
        return res
    try:
        ref = step().clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        graph.replay()
        torch.cuda.synchronize()
        diff = float((out.float() - ref.float()).abs().max())
        times = time_calls(graph.replay, replays, device, warmup=3)
        res.update(graph=True, ms_median=statistics.median(times), ms_p10=float(np.percentile(times, 10)),
                   ms_p90=float(np.percentile(times, 90)), graph_vs_eager_max_abs_diff=diff)
        del graph
    except Exception as exc:  # noqa: BLE001 - record why and keep the eager time
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001
            pass
        res.update(graph=False, graph_reason=f"{type(exc).__name__}: {exc}"[:500], ms_median=res["eager_ms_median"])
    return res


def measure_ffn_share(model, tokens, runs: int, device) -> dict:
    """The FFNs alone on their real inputs (captured from one forward of ``tokens``): inference (all layers,
    summed medians) and training (forward + backward with a fixed random output gradient)."""
    inputs = []
    handles = [f.register_forward_pre_hook(lambda mod, a: inputs.append(a[0].detach().clone())) for f in model.ffns]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for h in handles:
            h.remove()
    infer_ms, train_ms = [], []
    for f, x in zip(model.ffns, inputs):
        with torch.inference_mode():
            infer_ms.append(statistics.median(time_calls(lambda: f(x), runs, device)))
        xg = x.clone().requires_grad_(True)
        params = list(f.parameters())
        dy = torch.randn_like(x) * 1e-3

        def fwd_bwd():
            y = f(xg)
            torch.autograd.grad(y, [xg] + params, dy)

        train_ms.append(statistics.median(time_calls(fwd_bwd, runs, device)))
    return {"tokens": int(tokens.numel()), "infer_ms_per_layer": infer_ms, "train_ms_per_layer": train_ms,
            "infer_ms_total": sum(infer_ms), "train_ms_total": sum(train_ms)}


#: the kernel ``torch.cuda._sleep`` launches: a GPU-timeline marker around every FFN call of a profiled pass
MARKER_KERNEL = "spin_kernel"


def _merged_length(intervals) -> float:
    """Length of the union of (start, end) intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + (cur_e - cur_s if cur_e is not None else 0.0)


def timeline_summary(kernels, marker: str = MARKER_KERNEL, top: int = 6) -> dict:
    """GPU time of one profiled pass from its device activities ``(name, start_us, end_us)``.  Marker kernels
    open and close the FFN windows (one pair per FFN call: the forward's, and the backward's in a training
    step).  Returns, in ms: the span (first start to last end), the busy time (union of the activities), the
    idle time, each split into inside the FFN windows and outside, the FFN windows' spans, and the largest
    kernels of each region by total time."""
    acts = sorted(kernels, key=lambda k: k[1])
    marks = [k for k in acts if marker in k[0]]
    work = [k for k in acts if marker not in k[0]]
    if not work:
        return {"kernels": 0}
    windows = [(marks[i][2], marks[i + 1][1]) for i in range(0, len(marks) - 1, 2)]

    def inside(k):
        mid = 0.5 * (k[1] + k[2])
        return any(a <= mid <= b for a, b in windows)

    span = (min(k[1] for k in work), max(k[2] for k in work))
    regions = {"ffn": [k for k in work if inside(k)], "rest": [k for k in work if not inside(k)]}
    ffn_span = sum(b - a for a, b in windows)
    res = {"kernels": len(work), "ffn_windows": len(windows), "span_ms": (span[1] - span[0]) / 1e3,
           "busy_ms": _merged_length([(k[1], k[2]) for k in work]) / 1e3}
    res["idle_ms"] = res["span_ms"] - res["busy_ms"]
    gaps = [(b[1] - a_end, a[0], b[0], a_end) for a, b, a_end in
            zip(work, work[1:], np.maximum.accumulate([k[2] for k in work])[:-1]) if b[1] - a_end > 0]
    res["largest_gaps"] = [{"ms": float(g) / 1e3, "at_ms": float(t - span[0]) / 1e3, "after": a[:80], "before": b[:80]}
                           for g, a, b, t in sorted(gaps, key=lambda g: -g[0])[:top]]
    res["ffn_span_ms"] = ffn_span / 1e3
    res["ffn_window_ms"] = [(b - a) / 1e3 for a, b in windows]
    for name, ks in regions.items():
        busy = _merged_length([(k[1], k[2]) for k in ks]) / 1e3
        span_r = res["ffn_span_ms"] if name == "ffn" else res["span_ms"] - res["ffn_span_ms"]
        by = {}
        for k in ks:
            t, c = by.get(k[0], (0.0, 0))
            by[k[0]] = (t + (k[2] - k[1]) / 1e3, c + 1)
        best = sorted(by.items(), key=lambda kv: -kv[1][0])[:top]
        res[name] = {"span_ms": span_r, "busy_ms": busy, "idle_ms": span_r - busy, "kernels": len(ks),
                     "top": [{"name": n[:120], "ms": t, "count": c} for n, (t, c) in best]}
    return res


def _device_activities(prof) -> list:
    """(name, start_us, end_us) of every GPU activity (kernels, copies, sets) of a torch.profiler run."""
    out = []
    for e in prof.profiler.kineto_results.events():
        if e.device_type() == torch.autograd.DeviceType.CUDA:
            s = e.start_ns() / 1e3
            out.append((e.name(), s, s + e.duration_ns() / 1e3))
    return out


def measure_timeline(model, tokens, targets, device, runs: int = 3) -> dict:
    """Where a prefill and a training step (forward + backward, no optimizer) spend GPU time inside the model:
    one ``torch.profiler`` pass per call, a marker kernel before and after every FFN call (forward hooks;
    full backward hooks in the training step), summarised by :func:`timeline_summary` (the call whose span is
    the median of ``runs``).  The host time of each kind of call, without the profiler, is recorded beside it:
    a host slower than the GPU leaves the GPU idle."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    def marker(*_):
        torch.cuda._sleep(1)

    def prefill():
        with torch.inference_mode():
            model(tokens)

    def train_step():
        logits = model(tokens)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)).backward()

    res = {}
    _set_collect_stats(model, False)
    try:
        for kind, fn in (("prefill", prefill), ("train_step", train_step)):
            hooks = []
            for f in model.ffns:
                hooks += [f.register_forward_pre_hook(marker), f.register_forward_hook(marker)]
                if kind == "train_step":
                    hooks += [f.register_full_backward_pre_hook(marker), f.register_full_backward_hook(marker)]
            try:
                host = []
                for _ in range(runs + 2):
                    sync(device)
                    t = time.perf_counter()
                    fn()
                    host.append((time.perf_counter() - t) * 1e3)
                    sync(device)
                    model.zero_grad(set_to_none=True)
                passes = []
                for _ in range(runs):
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        fn()
                        sync(device)
                    model.zero_grad(set_to_none=True)
                    passes.append(timeline_summary(_device_activities(prof)))
            finally:
                for h in hooks:
                    h.remove()
            passes.sort(key=lambda r: r.get("span_ms", 0.0))
            res[kind] = dict(passes[len(passes) // 2], host_ms_median=statistics.median(host[2:]),
                             span_ms_all=[r.get("span_ms") for r in passes])
    finally:
        _set_collect_stats(model, True)
    return res


def warm_twell(cfg: ModelConfig, dtype, device, rows=(16384, 64, 8, 1)) -> dict:
    """Run a throw-away ``SparseGatedFFN`` of the model's shape once on every path the run will take
    (training forward + backward sparse and dense, inference at each batch size), on a synthetic batch with
    about 26 active neurons per token (``x[:, 0] = 1``, gate bias -2.6 row norms), so that loading kernels and
    other first-call costs fall outside the timed training.  Returns the seconds per call kind."""
    import twell.torch as tt  # noqa: PLC0415
    d, n = cfg.d_model, cfg.d_ff
    g = torch.Generator(device="cpu").manual_seed(12345)
    f = tt.SparseGatedFFN(d, n, dtype=dtype, device=device)
    with torch.no_grad():
        for w in (f.w_gate, f.w_up, f.w_down):
            w.copy_(torch.randn(n, d, generator=g) / math.sqrt(d))
        f.w_gate[:, 0] = -2.6 * f.w_gate[:, 1:].float().norm(dim=1).to(dtype)
    x = torch.randn(rows[0], d, generator=g)
    x[:, 0] = 1.0
    x = x.to(device=device, dtype=dtype)
    times = {}
    for path in ("sparse", "dense"):
        f.path = path
        t = time.perf_counter()
        xg = x.clone().requires_grad_(True)
        y = f(xg)
        torch.autograd.grad(y, [xg] + list(f.parameters()), torch.ones_like(y) * 1e-3)
        sync(device)
        times[f"train_{path}"] = time.perf_counter() - t
    f.path = "auto"
    with torch.inference_mode():
        for collect in (True, False):
            f.collect_stats = collect
            for m in rows:
                t = time.perf_counter()
                f(x[:m])
                sync(device)
                times[f"infer_{m}" + ("" if collect else "_nostats")] = time.perf_counter() - t
    del f, x
    return times


def warm_compile(cfg: ModelConfig, batch: int, dtype, device) -> float:
    """Compile the shared half of a block (:func:`shared_half`) before anything is timed: a throw-away dense
    model of one layer runs a training forward + backward, a ``no_grad`` forward (evaluation) and an
    ``inference_mode`` forward (prefill) at the run's shapes.  Returns the seconds it took."""
    t = time.perf_counter()
    one = ModelConfig(**dict(asdict(cfg), n_layers=1))
    model = LM(one, "dense", dtype=dtype, device=device, compiled=True)
    tokens = torch.zeros(batch, cfg.context, dtype=torch.int64, device=device)
    model(tokens).float().sum().backward()
    with torch.no_grad():
        model(tokens)
    with torch.inference_mode():
        model(tokens)
    sync(device)
    del model
    return time.perf_counter() - t


def _set_collect_stats(model, on: bool):
    for f in model.ffns:
        if hasattr(f, "collect_stats"):
            f.collect_stats = on


# ============================================================================ report


def relative(sparse, dense):
    if sparse is None or dense is None or dense == 0:
        return None
    return sparse / dense - 1.0


def _pct(v):
    return "n/a" if v is None else f"{100 * v:+.1f} %"


def build_table(res: dict) -> list:
    """The Table-1 rows: metric, dense, sparse, relative change (sparse / dense - 1), the paper's figure."""
    d, s = res["train"]["dense"], res["train"]["sparse"]
    rows = []

    def row(metric, unit, dv, sv, paper="", better="higher"):
        rows.append({"metric": metric, "unit": unit, "dense": dv, "sparse": sv, "relative": relative(sv, dv),
                     "better": better, "paper": paper})

    serve = res.get("serving") or {}
    pd, ps = (serve.get("prefill") or {}).get("dense"), (serve.get("prefill") or {}).get("sparse")
    if pd and ps:
        row("prefill (forward) throughput", "tokens/s", pd["tokens_per_s"], ps["tokens_per_s"],
            PAPER["prefill_throughput"])
        row(f"prefill latency, median of {len(pd['ms_all'])} calls", "ms", pd["ms_median"], ps["ms_median"], "",
            "lower")
    th_d, th_s = d["throughput"]["second_half"], s["throughput"]["second_half"]
    if th_d and th_s:
        row("training throughput, second half", "tokens/s", th_d["tokens_per_s"], th_s["tokens_per_s"],
            PAPER["train_throughput"])
    row("training throughput, whole run", "tokens/s", d["throughput"]["all"]["tokens_per_s"],
        s["throughput"]["all"]["tokens_per_s"], "")
    if th_d and th_s:
        row("training energy per token, second half", "mJ", th_d["energy_mJ_per_token"], th_s["energy_mJ_per_token"],
            PAPER["energy_per_token"], "lower")
    row("training energy per token, whole run", "mJ", d["throughput"]["all"]["energy_mJ_per_token"],
        s["throughput"]["all"]["energy_mJ_per_token"], "", "lower")
    if pd and ps:
        ed, es = pd.get("energy"), ps.get("energy")
        row("prefill energy per token", "mJ", ed and ed["mJ_per_token"], es and es["mJ_per_token"], "", "lower")
    md, ms = d["memory"], s["memory"]
    if md and ms:
        gib = 2.0 ** 30
        row("peak training memory, second half", "GiB",
            md["peak_second_half_bytes"] and md["peak_second_half_bytes"] / gib,
            ms["peak_second_half_bytes"] and ms["peak_second_half_bytes"] / gib, PAPER["peak_memory"], "lower")
        row("peak training memory, whole run", "GiB", md["peak_allocated_bytes"] / gib,
            ms["peak_allocated_bytes"] / gib, "", "lower")
    row("final validation loss", "bits/byte", d["evals"][-1]["bpb"], s["evals"][-1]["bpb"], "", "lower")
    for dec_d, dec_s in zip((serve.get("decode") or {}).get("dense", []), (serve.get("decode") or {}).get("sparse", [])):
        row(f"decode step, batch {dec_d['batch']}" + (" (CUDA graph)" if dec_d.get("graph") and dec_s.get("graph")
                                                      else " (eager)"),
            "ms", dec_d["ms_median"], dec_s["ms_median"], "", "lower")
    act = (res.get("analysis") or {}).get("sparse")
    if act:
        means = [a["mean"] for a in act["layers"]]
        n = res["config"]["model"]["d_ff"]
        dense_means = [a["mean"] for a in res["analysis"]["dense"]["layers"]]
        row("active neurons per token (mean over layers)", f"of {n}", statistics.fmean(dense_means),
            statistics.fmean(means), PAPER["sparsity"], "lower")
    return rows


def format_table(rows) -> str:
    def num(v):
        if v is None:
            return "n/a"
        if isinstance(v, float):
            a = abs(v)
            return f"{v:,.0f}" if a >= 1000 else (f"{v:.4g}")
        return str(v)
    lines = ["| metric | unit | dense | sparse | sparse vs dense | paper (0.5-2B, H100) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['metric']} | {r['unit']} | {num(r['dense'])} | {num(r['sparse'])} | "
                     f"{_pct(r['relative'])} | {r['paper']} |")
    return "\n".join(lines)


def make_plots(res: dict, out: Path, progress=print) -> list:
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as exc:
        progress(f"plots skipped: {exc}")
        return []
    d, s = res["train"]["dense"], res["train"]["sparse"]
    files = []

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r, name in ((d, "dense"), (s, "sparse (twell)")):
        ax.plot([e["step"] for e in r["evals"]], [e["bpb"] for e in r["evals"]], marker="o", ms=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("Validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    vals = [e["bpb"] for r in (d, s) for e in r["evals"][1:]]
    if vals:
        ax.set_ylim(min(vals) * 0.97, max(vals) * 1.03)
    files.append(_save(fig, out / "val_bpb.png", plt))

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    l0 = np.asarray(s["history"]["l0"], dtype=np.float64)
    steps = np.arange(1, len(l0) + 1)
    for i in range(l0.shape[1] if l0.ndim == 2 else 0):
        ax.plot(steps, l0[:, i], lw=0.8, label=f"sparse layer {i}")
    for i in range(len(d["evals"][0]["l0"])):
        ax.plot([e["step"] for e in d["evals"]], [e["l0"][i] for e in d["evals"]], ls="--", marker=".", lw=0.8,
                label=f"dense layer {i} (eval)")
    tgt = [(k, t) for k, t in enumerate(s["history"]["target"]) if t is not None]
    if tgt:
        ax.plot([k + 1 for k, _ in tgt], [t for _, t in tgt], color="k", lw=1.5, label="target")
    n = res["config"]["model"]["d_ff"]
    ax.axhline(0.015 * n, color="r", lw=0.8, ls=":", label="1.5 % of d_ff")
    ax.set_yscale("log")
    ax.set_ylabel("active neurons per token")
    ax.set_title("Active FFN neurons per token")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    lam = np.asarray(s["history"]["lambda"], dtype=np.float64)
    for i in range(lam.shape[1] if lam.ndim == 2 else 0):
        ax2.plot(np.arange(1, len(lam) + 1), np.where(lam[:, i] > 0, lam[:, i], np.nan), lw=0.8, label=f"layer {i}")
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("λ (per layer)")
    ax2.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=7)
    files.append(_save(fig, out / "active_neurons.png", plt))

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r, name in ((d, "dense"), (s, "sparse (twell)")):
        ax.plot([i["step_end"] for i in r["intervals"]], [i["tokens_per_s"] / 1e3 for i in r["intervals"]],
                label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training throughput (k tokens/s)")
    ax.set_title("Whole-model training throughput")
    ax.grid(alpha=0.3)
    ax.legend()
    files.append(_save(fig, out / "throughput.png", plt))
    return files


def _save(fig, path, plt):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def environment(device) -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "numpy": np.__version__}
    try:
        import twell  # noqa: PLC0415
        env["twell"] = twell.__version__
    except ImportError:
        env["twell"] = None
    try:
        import cupy  # noqa: PLC0415
        env["cupy"] = cupy.__version__
    except ImportError:
        env["cupy"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["device"] = p.name
        env["device_memory_bytes"] = p.total_memory
        env["compute_capability"] = f"{p.major}.{p.minor}"
    else:
        env["device"] = "cpu"
    try:
        root = Path(__file__).resolve().parents[2]
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        env["git_revision"] = rev.stdout.strip() or None
    except Exception:  # noqa: BLE001
        env["git_revision"] = None
    return env


def estimate_seconds(cfg: ModelConfig, tokens_per_step: int, steps: int, n_params: int) -> dict:
    """Training time from :data:`EST_MS` (H200 figures at the paper's layer shape), scaled by FLOPs."""
    scale = tokens_per_step / 16384
    ffn = cfg.d_model * cfg.d_ff / (2048 * 5632) * scale
    attn = cfg.d_model ** 2 / 2048 ** 2 * scale
    sdpa = cfg.d_model * cfg.context / (2048 * 1024) * scale
    misc = cfg.d_model / 2048 * scale
    per_layer_rest = EST_MS["attn_proj"] * attn + EST_MS["sdpa"] * sdpa + EST_MS["misc"] * misc
    opt = EST_MS["opt_per_mparam"] * n_params / 1e6
    dense_ms = cfg.n_layers * (EST_MS["ffn_dense"] * ffn + per_layer_rest) + opt
    sparse_ms = cfg.n_layers * (EST_MS["ffn_sparse"] * ffn + per_layer_rest) + opt
    # the sparse model runs dense FFNs until it is sparse (about 40 % of the steps)
    mixed_ms = 0.4 * dense_ms + 0.6 * sparse_ms
    return {"dense_step_ms": dense_ms, "sparse_step_ms_once_sparse": sparse_ms,
            "dense_s": dense_ms * steps / 1e3, "sparse_s": mixed_ms * steps / 1e3}


# ============================================================================ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (results.json, table.md, plots)")
    p.add_argument("--steps", type=int, default=3000, help="training steps per model")
    p.add_argument("--minutes", type=float, default=3.25,
                   help="wall-clock cap on each model's training; the sparse model then runs the dense one's steps")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--d-ff", type=int, default=5632)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16, help="sequences per step (16 x 1024 = 16,384 tokens)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, betas 0.9 / 0.95)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay floor, relative to --lr")
    p.add_argument("--warmup-steps", type=int, default=None, help="LR warm-up (default 5 %% of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32", "float64"),
                   help="parameters and activations (default bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="torch.compile the part of every block both models share (norms, attention, rotary "
                        "embeddings, residual); the FFNs stay as they are (auto: on for CUDA)")
    p.add_argument("--data-root", default=None, help="directory of *.py files (default: the stdlib)")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=150, help="steps between validation evaluations (0: ends only)")
    p.add_argument("--eval-batches", type=int, default=4, help="validation batches of --batch sequences")
    p.add_argument("--log-every", type=int, default=25, help="steps per timing / logging interval")
    g = p.add_argument_group("L1 controller (sparse model)")
    g.add_argument("--l1-start", type=int, default=None, help="first step with λ > 0 (default: the LR warm-up)")
    g.add_argument("--l1-ramp", type=float, default=0.5, help="fraction of --steps at which the target is reached")
    g.add_argument("--target-active", type=float, default=None,
                   help="final target of mean active neurons per token (default 0.7 %% of d_ff: 39 of 5,632, the "
                        "paper's 0.5B model)")
    g.add_argument("--l1-init", type=float, default=1e-5, help="λ at --l1-start (per layer)")
    g.add_argument("--l1-every", type=int, default=10, help="steps between λ updates")
    g.add_argument("--l1-max", type=float, default=10.0, help="upper bound of λ")
    g.add_argument("--l1-shared", action="store_true", help="one λ for all layers (driven by the densest layer)")
    g.add_argument("--dense-row-threshold", type=int, default=128,
                   help="rows with more active neurons take twell's dense backup")
    g.add_argument("--reinit-dead-every", type=int, default=0,
                   help="every N steps re-initialise neurons inactive since the last check (0: off)")
    s = p.add_argument_group("serving measurements")
    s.add_argument("--no-serving", action="store_true", help="skip prefill / decode / FFN-share measurements")
    s.add_argument("--prefill-runs", type=int, default=10)
    s.add_argument("--prefill-seconds", type=float, default=3.0,
                   help="length of each model's prefill loop, which measures its throughput and energy per token "
                        "(0: throughput from the median of --prefill-runs calls, no energy)")
    s.add_argument("--decode-batches", default="1,8,64")
    s.add_argument("--decode-cache", type=int, default=256, help="static KV-cache length (positions)")
    s.add_argument("--decode-fill", type=int, default=128, help="positions written before the timed step")
    s.add_argument("--decode-replays", type=int, default=200)
    s.add_argument("--no-compile-warmup", action="store_true",
                   help="do not run `python -m twell warmup` before training (kernels then compile on first use)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    script = sys.argv[0] if argv is None else str(Path(__file__))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    progress = Progress(args.quiet)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    compiled = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    decode_batches = [int(b) for b in args.decode_batches.split(",") if b.strip()]
    cfg = ModelConfig(d_model=args.d_model, d_ff=args.d_ff, n_layers=args.layers, n_heads=args.heads,
                      context=args.context, rope_length=max(args.context, args.decode_cache))
    cfg.check()
    res = {"command": [sys.executable, script] + argv,
           "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "config": {"model": asdict(cfg), "args": vars(args), "dtype": str(dtype), "compiled_shared_half": compiled,
                      "lm_head": "untied",
                      "ffn_activation": "relu gate", "bias": False}}
    res["command_line"] = " ".join(res["command"])
    res["environment"] = environment(device)
    progress(f"device {res['environment']['device']}, torch {torch.__version__}, twell {res['environment']['twell']}, "
             f"cupy {res['environment']['cupy']}, dtype {dtype}")
    torch.manual_seed(args.seed)

    with progress.phase("data"):
        corpus = load_corpus(args.data_root, args.val_fraction)
        data = BatchStream(corpus.train, args.context, args.batch, args.seed, device)
        data.prepare(args.steps)
        val = validation_batches(corpus.val, args.context, args.batch, args.eval_batches, device)
        res["data"] = dict(corpus.info, windows_train=data.n_windows, steps_per_epoch=data.per_epoch,
                           val_batches=len(val), val_tokens=sum(int(y.numel()) for _, y in val))
        progress(f"{corpus.info['files_train']} train files ({corpus.info['bytes_train'] / 1e6:.1f} MB), "
                 f"{corpus.info['files_val']} validation files ({corpus.info['bytes_val'] / 1e6:.2f} MB) from "
                 f"{corpus.info['root']} (Python {corpus.info['python_version']}); {data.per_epoch} steps per epoch")

    meter = EnergyMeter(device)
    res["energy_meter"] = {"available": meter.handle is not None, "reason": meter.reason}
    if meter.handle is None:
        progress(f"energy: not measured ({meter.reason})")

    with progress.phase("init"):
        state = init_state(cfg, args.seed)
        n_params = sum(v.numel() for v in state.values())
        n_ffn = sum(v.numel() for k, v in state.items() if ".ffn." in k)
        res["params"] = {"total": n_params, "ffn": n_ffn, "ffn_fraction": n_ffn / n_params}
        est = estimate_seconds(cfg, args.batch * args.context, args.steps, n_params)
        res["estimate"] = est
        progress(f"model: {n_params / 1e6:.1f} M parameters, FFN {100 * n_ffn / n_params:.0f} %; estimated training "
                 f"(H200) dense {est['dense_s']:.0f} s ({est['dense_step_ms']:.1f} ms/step), sparse "
                 f"{est['sparse_s']:.0f} s ({est['sparse_step_ms_once_sparse']:.1f} ms/step once sparse)")

    if device.type == "cuda" and not args.no_compile_warmup:
        with progress.phase("twell kernels (python -m twell warmup)"):
            r = subprocess.run([sys.executable, "-m", "twell", "warmup"], capture_output=True, text=True)
            res["twell_warmup"] = {"returncode": r.returncode, "tail": (r.stdout + r.stderr)[-2000:]}
            progress((r.stdout.strip().splitlines() or ["(no output)"])[-1])
            try:
                res["twell_first_calls_seconds"] = warm_twell(cfg, dtype, device)
                progress("twell first calls: " + ", ".join(f"{k} {v:.2f} s"
                                                           for k, v in res["twell_first_calls_seconds"].items()))
            except Exception as exc:  # noqa: BLE001 - the run goes on; first calls then happen while training
                res["twell_first_calls_seconds"] = f"{type(exc).__name__}: {exc}"
                progress(f"twell first calls failed: {exc}")
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if compiled:
        with progress.phase("torch.compile of the shared half of a block"):
            try:
                res["compile_seconds"] = warm_compile(cfg, args.batch, dtype, device)
                progress(f"compiled in {res['compile_seconds']:.1f} s")
            except Exception as exc:  # noqa: BLE001 - no compiler here: both models run eagerly, and say so
                compiled = False
                _COMPILED.clear()
                res["compile_error"] = f"{type(exc).__name__}: {exc}"[:1000]
                progress(f"WARNING: torch.compile failed, both models run eagerly: {res['compile_error'][:300]}")
            res["config"]["compiled_shared_half"] = compiled

    planned = args.steps
    res["train"] = {}
    with progress.phase("train dense"):
        dense = build_model(cfg, "dense", state, dtype=dtype, device=device, compiled=compiled)
        res["train"]["dense"] = train_model("dense", dense, data, val, args, steps=planned, planned=planned,
                                            meter=meter, progress=progress)
    steps = res["train"]["dense"]["steps_done"]
    if device.type == "cuda":
        dense.to("cpu")
        torch.cuda.empty_cache()

    with progress.phase("train sparse"):
        sparse = build_model(cfg, "sparse", state, dtype=dtype, device=device,
                             dense_row_threshold=args.dense_row_threshold, compiled=compiled)
        warm = args.warmup_steps if args.warmup_steps is not None else max(1, round(0.05 * planned))
        start = args.l1_start if args.l1_start is not None else warm
        target = args.target_active if args.target_active is not None else 0.007 * cfg.d_ff
        controller = L1Controller(n_layers=cfg.n_layers, start=start,
                                  ramp_end=max(start, round(args.l1_ramp * planned)), initial=float(cfg.d_ff),
                                  final=float(target), every=args.l1_every, init=args.l1_init, hi=args.l1_max,
                                  shared=args.l1_shared)
        res["train"]["sparse"] = train_model("sparse", sparse, data, val, args, steps=steps, planned=planned,
                                             controller=controller, meter=meter, progress=progress)
        res["train"]["sparse"]["twell_torch_memory"] = all(getattr(f, "torch_memory", False) for f in sparse.ffns)
    del state
    dense.to(device)
    per_step = sum(res["train"][k]["wall_seconds"] for k in ("dense", "sparse")) / max(steps, 1)
    res["budget"] = {"train_seconds_both": per_step * steps, "seconds_per_step_both_models": per_step,
                     "steps_fitting_7_minutes": int(420 / per_step) if per_step > 0 else None}
    progress(f"training took {per_step * steps:.0f} s for both models ({1e3 * per_step:.1f} ms per step of both); "
             f"with this configuration about {res['budget']['steps_fitting_7_minutes']} steps fit in 7 minutes")

    with progress.phase("activation statistics"):
        res["analysis"] = {}
        batch0 = val[:1]
        for name, model in (("dense", dense), ("sparse", sparse)):
            e = evaluate(model, batch0, detail=True)
            layers = []
            for i, (tok, neu) in enumerate(zip(e["per_token"], e["per_neuron"])):
                st = distribution_stats(tok, neu, cfg.d_ff)
                st["layer"] = i
                if name == "sparse":
                    st["l0_twell"] = e["l0_twell"][i]
                    st["backup_rows"] = e["backup_rows"][i]
                    st["path"] = e["paths"][i] if e["paths"] else None
                    st["goal_at_most_1.5pct"] = bool(st["mean"] <= 0.015 * cfg.d_ff)
                    st["synthetic_fit"] = fit_synthetic(tok, neu, cfg.d_ff)
                    st["synthetic_check"] = check_fits(st["synthetic_fit"], st, cfg.d_model, cfg.d_ff, len(tok),
                                                       device=device, seed=args.seed)
                layers.append(st)
            res["analysis"][name] = {"tokens": int(len(e["per_token"][0])), "layers": layers}
            progress(f"{name}: active per token by layer: mean {_fmt_list([a['mean'] for a in layers], '{:.1f}')}, "
                     f"p99 {_fmt_list([a['p99'] for a in layers])}, max {_fmt_list([a['max'] for a in layers])}, "
                     f"dead {_fmt_list([100 * a['neuron']['frac_dead'] for a in layers], '{:.0f}%')}")
        for a in res["analysis"]["sparse"]["layers"]:
            chk = a["synthetic_check"]
            fits = a["synthetic_fit"]
            msg = ", ".join(f"{k} {v['score']:.2f}" for k, v in chk.items() if isinstance(v, dict) and "score" in v)
            best = chk.get("best")
            progress(f"layer {a['layer']}: synthetic match ({msg}); best {best}"
                     + (f": python -m twell bench {fits[best]['bench_args']}" if best else ""))
        goal = all(a["goal_at_most_1.5pct"] for a in res["analysis"]["sparse"]["layers"])
        res["sparsity_goal_met"] = goal
        if not goal:
            progress("WARNING: a layer ends above 1.5 % of d_ff active: raise --l1-init / --steps, or lower "
                     "--target-active")

    if not args.no_serving:
        serve = {"prefill": {}, "decode": {"dense": [], "sparse": []}, "ffn_share": {}}
        res["serving"] = serve
        prefill_tokens = val[0][0]
        with progress.phase("prefill"):
            for name, model in (("dense", dense), ("sparse", sparse)):
                _set_collect_stats(model, False)
                serve["prefill"][name] = measure_prefill(model, prefill_tokens, args.prefill_runs, args.prefill_seconds,
                                                         meter, device)
                p = serve["prefill"][name]
                progress(f"{name} prefill {p['tokens']} tokens: {p['ms_median']:.2f} ms (median of "
                         f"{len(p['ms_all'])}), {p['tokens_per_s'] / 1e3:.0f}k tok/s ({p['throughput_from']})"
                         + (f", {p['energy']['mJ_per_token']:.4f} mJ/token" if p.get("energy") else ""))
            if device.type == "cuda":
                serve["prefill"]["sparse_paths"] = [getattr(f.density_tracker, "last_path", None) for f in sparse.ffns]
        with progress.phase("decode"):
            for b in decode_batches:
                for name, model in (("dense", dense), ("sparse", sparse)):
                    r = measure_decode(model, corpus.val, b, args.decode_cache, args.decode_fill,
                                       args.decode_replays, device)
                    serve["decode"][name].append(r)
                    progress(f"{name} decode batch {b}: {r['ms_median']:.4f} ms/step "
                             + ("(CUDA graph)" if r.get("graph") else f"(eager: {r.get('graph_reason')})"))
        with progress.phase("FFN share"):
            for name, model in (("dense", dense), ("sparse", sparse)):
                try:
                    serve["ffn_share"][name] = measure_ffn_share(model, prefill_tokens,
                                                                 max(3, args.prefill_runs // 2), device)
                except Exception as exc:  # noqa: BLE001 - keep every other result (the report is written below)
                    serve["ffn_share"][name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                    progress(f"{name} FFN share failed: {serve['ffn_share'][name]['error']}")
                    continue
                f = serve["ffn_share"][name]
                th = res["train"][name]["throughput"]
                step_ms = 1e3 * args.batch * args.context / (th["second_half"] or th["all"])["tokens_per_s"]
                f["train_step_ms_whole_model"] = step_ms
                f["train_ffn_fraction"] = f["train_ms_total"] / step_ms
                f["prefill_ffn_fraction"] = f["infer_ms_total"] / serve["prefill"][name]["ms_median"]
                progress(f"{name} FFNs alone: forward {f['infer_ms_total']:.2f} ms "
                         f"({100 * f['prefill_ffn_fraction']:.0f} % of prefill), fwd+bwd {f['train_ms_total']:.2f} ms "
                         f"({100 * f['train_ffn_fraction']:.0f} % of a training step)")
            for model in (dense, sparse):
                _set_collect_stats(model, True)
        if device.type == "cuda":
            with progress.phase("GPU timeline"):
                serve["timeline"] = {}
                for name, model in (("dense", dense), ("sparse", sparse)):
                    try:
                        t = serve["timeline"][name] = measure_timeline(model, prefill_tokens, val[0][1], device)
                    except Exception as exc:  # noqa: BLE001 - a profiler that cannot run leaves the rest intact
                        serve["timeline"][name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                        progress(f"{name} GPU timeline failed: {serve['timeline'][name]['error']}")
                        continue
                    for kind, r in t.items():
                        progress(f"{name} {kind}: GPU span {r['span_ms']:.2f} ms, idle {r['idle_ms']:.2f} ms; "
                                 f"FFN windows {r['ffn']['span_ms']:.2f} ms (idle {r['ffn']['idle_ms']:.2f}), "
                                 f"rest {r['rest']['span_ms']:.2f} ms (idle {r['rest']['idle_ms']:.2f}); "
                                 f"host {r['host_ms_median']:.2f} ms")

    with progress.phase("report"):
        rows = build_table(res)
        res["table"] = rows
        table = format_table(rows)
        res["phases_seconds"] = dict(progress.phases)
        res["total_seconds"] = time.perf_counter() - progress.t0
        res["plots"] = make_plots(res, out, progress)
        (out / "table.md").write_text(table + "\n")
        with open(out / "results.json", "w") as f:
            json.dump(res, f, indent=1, default=_json_default)
    print(table, flush=True)
    progress(f"wrote {out / 'results.json'}, {out / 'table.md'} and {len(res['plots'])} plots")
    return res


if __name__ == "__main__":
    main()
