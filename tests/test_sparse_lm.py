"""CPU tests of docs/examples/sparse_lm.py: the data loader, the model, the L1 controller, bits per byte, the
synthetic fit, and a tiny end-to-end run of the whole script (dense and twell-sparse) on CPU tensors."""

from __future__ import annotations

import importlib.util
import json
import math
import platform
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "examples" / "sparse_lm.py"


@pytest.fixture(scope="module")
def lm():
    spec = importlib.util.spec_from_file_location("sparse_lm_example", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _has_twell_torch() -> bool:
    try:
        import twell.torch  # noqa: F401, PLC0415
    except Exception:  # noqa: BLE001
        return False
    return True


TWELL_TORCH = _has_twell_torch()
needs_twell_torch = pytest.mark.skipif(not TWELL_TORCH, reason="twell.torch is not importable")


def _tree(root: Path, n_files: int = 120):
    """A small source tree with the directories the loader must skip."""
    files = {}
    for i in range(n_files):
        rel = f"pkg{i % 3}/mod_{i:03d}.py"
        files[rel] = (f"# module {i}\n" + "def f(x):\n    return x * %d\n" % i * (1 + i % 4)).encode()
    files["top.py"] = b"import os\nprint(os.sep)\n"
    files["importlib/metadata/__init__.py"] = b"# a real package named metadata\n"
    skipped = {"site-packages/x.py": b"x = 1\n", "pkg0/__pycache__/c.py": b"c = 1\n",
               "test/data/bad.py": b"\xff\xfe bad\n", "test/tokenizedata/t.py": b"t\n", "pydoc_data/topics.py": b"#\n",
               "test/test_importlib/data01/r.py": b"r\n"}
    for rel, data in {**files, **skipped, "notes.txt": b"not python\n"}.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files, skipped


# --------------------------------------------------------------------------- data


def test_source_files_sorted_and_filtered(lm, tmp_path):
    files, skipped = _tree(tmp_path)
    found = lm.source_files(tmp_path)
    assert found == sorted(files)
    assert not set(found) & set(skipped)
    assert "importlib/metadata/__init__.py" in found


def test_corpus_split_by_file_deterministic(lm, tmp_path):
    files, _ = _tree(tmp_path)
    a = lm.load_corpus(tmp_path, val_fraction=0.2)
    b = lm.load_corpus(tmp_path, val_fraction=0.2)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert a.train_files == b.train_files and a.val_files == b.val_files
    assert not set(a.train_files) & set(a.val_files)
    assert sorted(a.train_files + a.val_files) == sorted(files)
    assert 0 < len(a.val_files) < len(a.train_files)
    assert a.train_files == sorted(a.train_files) and a.val_files == sorted(a.val_files)
    # byte tokens: the files' bytes in order, each followed by the separator
    sep = bytes([lm.SEPARATOR])
    assert a.train.dtype == np.uint8
    assert a.train.tobytes() == b"".join(files[f] + sep for f in a.train_files)
    assert a.val.tobytes() == b"".join(files[f] + sep for f in a.val_files)
    info = a.info
    assert info["files_train"] == len(a.train_files) and info["files_val"] == len(a.val_files)
    assert info["bytes_train"] == a.train.size and info["bytes_val"] == a.val.size
    assert info["python_version"] == platform.python_version()
    # the split of a file depends on its path only: a subset of the tree splits the same way
    for rel in list(files)[::2]:
        (tmp_path / rel).unlink()
    c = lm.load_corpus(tmp_path, val_fraction=0.2)
    assert set(c.val_files) == set(a.val_files) & set(c.val_files + c.train_files)


def test_is_validation_is_a_stable_hash(lm):
    picks = [lm.is_validation(f"pkg/m{i}.py", 0.05) for i in range(4000)]
    assert picks == [lm.is_validation(f"pkg/m{i}.py", 0.05) for i in range(4000)]
    assert 0.03 < np.mean(picks) < 0.07
    assert not any(lm.is_validation(f"pkg/m{i}.py", 0.0) for i in range(100))
    assert all(lm.is_validation(f"pkg/m{i}.py", 1.0) for i in range(100))


def test_stdlib_corpus(lm):
    c = lm.load_corpus()
    assert c.info["root"] == str(lm.stdlib_root())
    assert c.info["files_val"] > 0 and c.info["files_train"] > 10 * c.info["files_val"]
    assert not set(c.train_files) & set(c.val_files)
    assert not any("site-packages" in f or "__pycache__" in f for f in c.train_files + c.val_files)
    share = c.info["bytes_val"] / (c.info["bytes_val"] + c.info["bytes_train"])
    assert 0.01 < share < 0.15
    assert "argparse.py" in c.train_files + c.val_files


def test_batch_stream_is_deterministic(lm):
    tokens = np.arange(1000, dtype=np.int64).astype(np.uint8)
    a = lm.BatchStream(tokens, context=16, batch=4, seed=3, device="cpu")
    b = lm.BatchStream(tokens, context=16, batch=4, seed=3, device="cpu")
    b.prepare(40)
    for step in range(40):
        xa, ya = a.batch(step)
        xb, yb = b.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (4, 16) and xa.dtype == torch.int64
        assert torch.equal(xa[:, 1:], ya[:, :-1])
        starts = torch.from_numpy(a.starts(step))
        assert torch.equal(xa[:, 0], torch.from_numpy(tokens)[starts].long())
    # one epoch visits every window once
    epoch = np.concatenate([a.starts(s) for s in range(a.per_epoch)])
    assert len(set(epoch.tolist())) == a.per_epoch * 4
    c = lm.BatchStream(tokens, context=16, batch=4, seed=4, device="cpu")
    assert not np.array_equal(a.starts(0), c.starts(0))


def test_validation_batches_fixed(lm):
    tokens = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint8)
    v1 = lm.validation_batches(tokens, 32, 4, 3, "cpu")
    v2 = lm.validation_batches(tokens, 32, 4, 3, "cpu")
    assert len(v1) == 3
    for (x1, y1), (x2, y2) in zip(v1, v2):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert x1.shape == (4, 32) and torch.equal(x1[:, 1:], y1[:, :-1])


def test_bits_per_byte(lm):
    assert lm.bits_per_byte(100 * math.log(2), 100) == pytest.approx(1.0)
    logits = torch.zeros(10, 256)
    nats = torch.nn.functional.cross_entropy(logits, torch.arange(10), reduction="sum")
    assert lm.bits_per_byte(float(nats), 10) == pytest.approx(8.0)


def test_lr_schedule(lm):
    lr = [lm.lr_at(s, 100, 1e-3, 10, 0.1) for s in range(100)]
    assert lr[0] == pytest.approx(1e-4) and lr[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lr[9:], lr[10:]))
    assert lm.lr_at(100, 100, 1e-3, 10, 0.1) == pytest.approx(1e-4)


# --------------------------------------------------------------------------- model


def _cfg(lm, **kw):
    base = {"d_model": 64, "d_ff": 128, "n_layers": 2, "n_heads": 4, "context": 16, "rope_length": 32}
    base.update(kw)
    return lm.ModelConfig(**base)


def test_dense_model_shapes(lm):
    cfg = _cfg(lm)
    model = lm.build_model(cfg, "dense", lm.init_state(cfg, 0), dtype=torch.float32, device="cpu")
    tokens = torch.randint(0, 256, (3, 16))
    logits = model(tokens)
    assert logits.shape == (3, 16, 256) and logits.dtype == torch.float32
    assert all(tuple(f.w_down.shape) == (128, 64) for f in model.ffns)
    logits.float().logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_init_is_shared_and_seeded(lm):
    cfg = _cfg(lm)
    a, b, c = lm.init_state(cfg, 0), lm.init_state(cfg, 0), lm.init_state(cfg, 1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.ffn.w_gate"], c["blocks.0.ffn.w_gate"])
    assert float(a["blocks.0.ffn.w_down"].std()) < float(a["blocks.0.ffn.w_gate"].std())


def test_dense_ffn_formula(lm):
    g = torch.Generator().manual_seed(0)
    f = lm.DenseGatedFFN(8, 16, dtype=torch.float64)
    x = torch.randn(5, 8, generator=g, dtype=torch.float64)
    ref = (torch.relu(x @ f.w_gate.T) * (x @ f.w_up.T)) @ f.w_down
    torch.testing.assert_close(f(x), ref)


@pytest.mark.parametrize("kind", ["dense", pytest.param("sparse", marks=needs_twell_torch)])
def test_decode_matches_forward(lm, kind):
    """Decoding position by position through the static KV cache gives the full forward's logits."""
    cfg = _cfg(lm)
    model = lm.build_model(cfg, kind, lm.init_state(cfg, 0), dtype=torch.float64, device="cpu")
    tokens = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(2, 16)
        positions = torch.arange(16)
        pos = torch.zeros(1, dtype=torch.int64)
        for p in range(10):
            pos.fill_(p)
            step = model.decode_step(tokens[:, p:p + 1], pos, cache, positions)
            torch.testing.assert_close(step[:, 0], full[:, p], rtol=1e-9, atol=1e-9)


@needs_twell_torch
def test_sparse_model_matches_dense_model(lm):
    """Same weights: the twell model computes the dense model's function (CPU: twell's NumPy reference)."""
    cfg = _cfg(lm)
    state = lm.init_state(cfg, 0)
    dense = lm.build_model(cfg, "dense", state, dtype=torch.float64, device="cpu")
    sparse = lm.build_model(cfg, "sparse", state, dtype=torch.float64, device="cpu")
    assert dense.state_dict().keys() == sparse.state_dict().keys()
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(sparse(tokens), dense(tokens), rtol=1e-9, atol=1e-9)
    import twell.torch as tt  # noqa: PLC0415
    assert all(isinstance(f, tt.SparseGatedFFN) for f in sparse.ffns)


@needs_twell_torch
def test_l1_gradient_added_inside_backward(lm):
    """The module's l1_weight adds (λ/M) sign(h) to the FFN's gradients: a larger λ changes w_gate's gradient
    and pushes active pre-activations down."""
    cfg = _cfg(lm)
    state = lm.init_state(cfg, 0)
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    grads = []
    for lam in (0.0, 1.0):
        model = lm.build_model(cfg, "sparse", state, dtype=torch.float64, device="cpu")
        for f in model.ffns:
            f.l1_weight = lam
        torch.nn.functional.cross_entropy(model(tokens).reshape(-1, 256), tokens.reshape(-1)).backward()
        grads.append(model.ffns[0].w_gate.grad.clone())
        assert model.ffns[0].last_stats.l1 is not None
    assert not torch.allclose(grads[0], grads[1])


# --------------------------------------------------------------------------- L1 controller


def _ctrl(lm, **kw):
    base = {"n_layers": 2, "start": 10, "ramp_end": 110, "initial": 1000.0, "final": 10.0, "every": 5,
            "init": 1e-4}
    base.update(kw)
    return lm.L1Controller(**base)


def test_controller_schedule(lm):
    c = _ctrl(lm)
    assert c.lambdas(0) == [0.0, 0.0] and c.lambdas(9) == [0.0, 0.0]
    assert c.lambdas(10) == [1e-4, 1e-4]
    assert c.target(0) == 1000.0 and c.target(10) == 1000.0
    assert c.target(60) == pytest.approx(100.0)            # geometric: half-way in log space
    assert c.target(110) == pytest.approx(10.0) and c.target(10_000) == pytest.approx(10.0)
    t = [c.target(s) for s in range(0, 200)]
    assert all(a >= b for a, b in zip(t, t[1:]))
    assert not c.due(10) and c.due(15) and not c.due(16) and c.due(20)


def test_controller_update_rule(lm):
    c = _ctrl(lm, max_up=1.5, max_down=1.1, low_band=0.7, gain_up=0.5, gain_down=0.25, horizon=6)
    assert c.factor(100.0, 100.0) == 1.0
    assert c.factor(80.0, 100.0) == 1.0                      # inside the band: no change
    assert c.factor(121.0, 100.0) == pytest.approx(1.1)      # sqrt(1.21)
    assert c.factor(1e6, 100.0) == 1.5                       # bounded increase
    assert c.factor(60.0, 100.0) == pytest.approx((0.6 / 0.7) ** 0.25)   # below the band: slow decrease
    assert c.factor(35.0, 100.0) == pytest.approx(1 / 1.1)                # ... bounded
    assert c.factor(0.0, 100.0) == pytest.approx(1 / 1.1)
    assert c.factor(float("nan"), 100.0) == 1.0
    # the first update compares l0 itself with the target `horizon` updates ahead
    t = c.target(15 + 6 * 5)
    lam = c.update(15, [10 * t, 0.3 * t])
    assert lam[0] == pytest.approx(1.5e-4) and lam[1] == pytest.approx(1e-4 / 1.1)
    assert c.previous == [10 * t, 0.3 * t]


def test_controller_projects_a_falling_trend(lm):
    c = _ctrl(lm, horizon=6, start=0, ramp_end=0, initial=100.0, final=100.0)
    assert c.projected(200.0, None) == 200.0
    assert c.projected(200.0, 100.0) == 200.0                # rising: not extrapolated
    assert c.projected(80.0, 100.0) == pytest.approx(80.0 * 0.8 ** 6)
    c.update(10, [400.0, 400.0])                             # both far above the target: λ up
    assert c.lam == [pytest.approx(1.5e-4)] * 2
    lam = c.update(20, [300.0, 150.0])
    # layer 0 falls by 3/4 per update: projected 300 * 0.75^6 = 53 < 70 -> already decreasing λ; layer 1 is
    # projected far below the target too
    assert lam[0] < 1.5e-4 and lam[1] < 1.5e-4
    c2 = _ctrl(lm, horizon=0, start=0, ramp_end=0, initial=100.0, final=100.0)
    c2.update(10, [400.0, 400.0])
    assert c2.update(20, [300.0, 300.0])[0] > 1.5e-4         # without the projection: still increasing


def test_controller_bounds_and_shared(lm):
    t = _ctrl(lm).target(15 + 6 * 5)
    hi = _ctrl(lm, hi=2e-4)
    for _ in range(10):
        hi.update(15, [1e9, 1e9])
    assert hi.lam == [2e-4, 2e-4]
    lo = _ctrl(lm, lo=5e-5)
    for _ in range(50):
        lo.update(200, [0.0, 0.0])
    assert lo.lam == [5e-5, 5e-5]
    shared = _ctrl(lm, shared=True)
    shared.update(15, [10 * t, 0.1 * t])                    # the densest layer drives the one λ
    assert shared.lam[0] == shared.lam[1] == pytest.approx(1.5e-4)


@pytest.mark.parametrize("lag", [0.05, 0.01, 0.003])
def test_controller_closed_loop_reaches_target(lm, lag):
    """Toy layers whose active count relaxes (in log space, with time constant 1 / lag steps) towards
    n / (1 + (λ / λ0)²), with 5 % noise: the controller brings each under 1.5 % of n by the end without
    collapsing it far below the target, and λ stays bounded."""
    n, steps = 5632, 3000
    c = lm.L1Controller(n_layers=3, start=150, ramp_end=1500, initial=float(n), final=0.01 * n, every=10,
                        init=1e-6)
    lam0 = [1e-5, 1e-3, 1e-1]              # layers needing very different λ
    rng = np.random.default_rng(0)
    l0 = [n / 2] * 3
    hist = []
    for step in range(steps):
        lams = c.lambdas(step)
        l0 = [math.exp(math.log(a) + lag * (math.log(n / (1 + (lam / s) ** 2)) - math.log(a)))
              for a, lam, s in zip(l0, lams, lam0)]
        hist.append([a * (1 + 0.05 * rng.standard_normal()) for a in l0])
        done = step + 1
        if c.due(done):
            c.update(done, np.mean(hist[-10:], axis=0))
    h = np.asarray(hist)
    final = h[-100:].mean(axis=0)
    assert all(f <= 0.015 * n for f in final), final
    assert all(f >= 0.005 * n for f in final), final
    assert h[1500:].min() >= 0.3 * 0.01 * n, h[1500:].min(axis=0)
    assert all(1e-9 <= v <= 10.0 for v in c.lam)


# --------------------------------------------------------------------------- statistics and synthetic fit


def test_distribution_stats(lm):
    tok = np.array([0, 1, 2, 3, 100])
    neu = np.array([0, 0, 50, 56])
    s = lm.distribution_stats(tok, neu, 4)
    assert s["mean"] == pytest.approx(21.2) and s["max"] == 100 and s["frac_zero_rows"] == 0.2
    assert s["neuron"]["frac_dead"] == 0.5


@pytest.mark.parametrize("kind, kw", [("token_skew", {"skew_sigma": 0.2, "calibrate": "mean"}),
                                      ("neuron_skew", {"skew_sigma": 1.0, "dead_fraction": 0.3}),
                                      ("uniform", {})])
def test_synthetic_fit_recovers_the_generator(lm, kind, kw):
    from twell.synthetic import make_problem  # noqa: PLC0415
    n = 512
    p = make_problem(4096, 64, n, mean_active=20, kind=kind, dtype="float64", seed=1, **kw)
    act = (p.x @ p.w_gate.T) > 0
    tok, neu = act.sum(1), act.sum(0)
    fits = lm.fit_synthetic(tok, neu, n)
    assert set(fits) == {"uniform", "token_skew", "neuron_skew"}
    assert fits["uniform"]["mean_active"] == pytest.approx(tok.mean())
    check = lm.check_fits(fits, lm.distribution_stats(tok, neu, n), 64, n, 4096, device=torch.device("cpu"))
    assert check["best"] == kind
    if kind == "token_skew":
        assert 0.1 <= fits["token_skew"]["skew_sigma"] <= 0.35
    if kind == "neuron_skew":
        assert fits["neuron_skew"]["dead_fraction"] == pytest.approx(0.3, abs=0.05)
        assert fits["neuron_skew"]["skew_sigma"] == pytest.approx(1.0, abs=0.25)
    assert fits[kind]["bench_args"].startswith(f"--kind {kind} --mean ")


# --------------------------------------------------------------------------- end to end


TINY = ["--steps", "3", "--layers", "2", "--d-model", "64", "--d-ff", "128", "--heads", "4", "--context", "32",
        "--batch", "2", "--eval-every", "2", "--eval-batches", "1", "--log-every", "1", "--l1-start", "1",
        "--l1-every", "1", "--l1-init", "1e-3", "--prefill-runs", "2", "--decode-batches", "1,2",
        "--decode-cache", "16", "--decode-fill", "6", "--decode-replays", "3", "--prefill-seconds", "0.05",
        "--device", "cpu", "--dtype", "float32", "--quiet"]


@needs_twell_torch
def test_compiled_shared_half_matches_eager(lm):
    """--compile: the torch.compile'd shared half of every block gives the eager model's logits and gradients."""
    cfg = lm.ModelConfig(d_model=64, d_ff=256, n_layers=2, n_heads=4, context=32, rope_length=64)
    state = lm.init_state(cfg, 0)
    eager = lm.build_model(cfg, "dense", state, dtype=torch.float32, device="cpu")
    comp = lm.build_model(cfg, "dense", state, dtype=torch.float32, device="cpu", compiled=True)
    assert comp.blocks[0].half is not lm.attention_half and eager.blocks[0].half is lm.attention_half
    tok = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    ya, yb = eager(tok), comp(tok)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (name, p), q in zip(eager.named_parameters(), comp.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_timeline_summary(lm):
    """Busy / idle time and the FFN windows from device activities: the markers open and close the windows,
    overlapping activities count once, gaps are idle time."""
    mk = lm.MARKER_KERNEL
    acts = [("attn_gemm", 0.0, 100.0), ("norm", 90.0, 110.0),          # overlap: busy 0-110
            (mk, 120.0, 121.0), ("gate", 121.0, 300.0), ("up_down", 350.0, 450.0), (mk, 450.0, 451.0),
            ("attn_gemm", 500.0, 600.0),
            (mk, 600.0, 601.0), ("gate", 601.0, 700.0), (mk, 700.0, 701.0)]
    r = lm.timeline_summary(acts)
    assert r["kernels"] == 6 and r["ffn_windows"] == 2
    assert r["span_ms"] == pytest.approx(0.7)
    assert r["busy_ms"] == pytest.approx((110 + 179 + 100 + 100 + 99) / 1e3)
    assert r["idle_ms"] == pytest.approx(r["span_ms"] - r["busy_ms"])
    assert r["ffn_window_ms"] == pytest.approx([0.329, 0.099])
    assert r["ffn"]["busy_ms"] == pytest.approx((179 + 100 + 99) / 1e3)
    assert r["ffn"]["idle_ms"] == pytest.approx(0.050)                       # the gap between gate and up_down
    assert r["rest"]["busy_ms"] == pytest.approx(0.210)
    assert [t["name"] for t in r["ffn"]["top"]] == ["gate", "up_down"]
    assert r["ffn"]["top"][0]["count"] == 2 and r["ffn"]["top"][0]["ms"] == pytest.approx(0.278)
    assert [(g["ms"], g["after"], g["before"]) for g in r["largest_gaps"][:2]] == [
        (pytest.approx(0.050), "gate", "up_down"), (pytest.approx(0.050), "up_down", "attn_gemm")]
    assert r["largest_gaps"][0]["at_ms"] == pytest.approx(0.300)
    assert lm.timeline_summary([(mk, 0.0, 1.0)]) == {"kernels": 0}


def test_end_to_end_tiny_run(lm, tmp_path):
    _tree(tmp_path / "src", n_files=300)
    out = tmp_path / "out"
    res = lm.main(["--out", str(out), "--data-root", str(tmp_path / "src"), "--val-fraction", "0.1"] + TINY)
    saved = json.loads((out / "results.json").read_text())
    assert saved["train"]["dense"]["steps_done"] == saved["train"]["sparse"]["steps_done"] == 3
    for name in ("dense", "sparse"):
        r = saved["train"][name]
        assert len(r["history"]["loss"]) == 3 and all(math.isfinite(v) for v in r["history"]["loss"])
        assert [e["step"] for e in r["evals"]] == [0, 2, 3]
        assert all(0 < e["bpb"] < 20 for e in r["evals"])
        assert r["throughput"]["all"]["tokens_per_s"] > 0
        assert len(saved["analysis"][name]["layers"]) == 2
    # same init, same batches: the step-0 evaluation and the first loss are the same for both models
    d, s = saved["train"]["dense"], saved["train"]["sparse"]
    assert d["evals"][0]["bpb"] == pytest.approx(s["evals"][0]["bpb"], rel=1e-5)
    assert d["history"]["loss"][0] == pytest.approx(s["history"]["loss"][0], rel=1e-5)
    assert s["history"]["lambda"][0] == [0.0, 0.0] and s["history"]["lambda"][1] == [1e-3, 1e-3]
    assert len(s["history"]["l0"]) == 3 and len(s["history"]["l0"][0]) == 2
    assert s["l1_controller"]["updates"] >= 1
    assert s["evals"][-1]["l0"] == pytest.approx(s["evals"][-1]["l0_twell"], rel=1e-6)
    layer = saved["analysis"]["sparse"]["layers"][0]
    assert {"mean", "p99", "max", "neuron", "synthetic_fit", "synthetic_check"} <= set(layer)
    assert saved["data"]["files_val"] > 0 and saved["data"]["python_version"] == platform.python_version()
    assert saved["environment"]["torch"] == torch.__version__
    assert saved["energy_meter"]["available"] is False
    serve = saved["serving"]
    assert [r["batch"] for r in serve["decode"]["dense"]] == [1, 2]
    assert serve["decode"]["sparse"][0]["graph"] is False and serve["decode"]["sparse"][0]["graph_reason"]
    assert serve["prefill"]["dense"]["tokens"] == 64
    for name in ("dense", "sparse"):                    # throughput from the sustained loop, no energy on a CPU
        p = serve["prefill"][name]
        assert p["sustained"]["calls"] >= 3 and p["tokens_per_s"] == p["sustained"]["tokens_per_s"]
        assert p["energy"] is None and p["energy_reason"]
    metrics = [r["metric"] for r in saved["table"]]
    assert "prefill (forward) throughput" in metrics and "final validation loss" in metrics
    try:
        import matplotlib  # noqa: F401, PLC0415
    except ImportError:
        assert saved["plots"] == []
    else:
        for png in ("val_bpb.png", "active_neurons.png", "throughput.png"):
            assert (out / png).stat().st_size > 1000
    assert (out / "table.md").read_text().startswith("| metric |")
    assert res["table"] == saved["table"]
