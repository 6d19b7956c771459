"""Presets: named option sets that fill only what the caller did not give."""

from __future__ import annotations

import pytest
import torch
from families import ids, tiny_model

import surgeon_fx as sf
from surgeon_fx.cli import build_parser
from surgeon_fx.options import check_compress_args, config_fields
from surgeon_fx.presets import preset_options


def test_quality_preset_values():
    """The measured settings per granularity; structured shots remove 2.5% each."""
    s = preset_options("quality", 0.5)
    assert s == dict(
        adapt_steps=32,
        lora_loss="distill",
        lora_batch_size=8,
        shots=20,
        lora_synthetic=256,
        lora_steps=32,
        lora_rank="full",
        lora_lr=1e-4,
    )
    assert [preset_options("quality", r)["shots"] for r in (0.3, 0.2, 0.1, 0.01, 0.51)] == [12, 8, 4, 1, 21]
    u = preset_options("quality", 0.0, "unstructured")
    assert (u["shots"], u["lora_steps"], u["lora_rank"], u["lora_lr"], u["lora_synthetic"]) == (
        4,
        64,
        "full",
        1e-4,
        256,
    )
    nm = preset_options("quality", 0.0, "2:4")
    assert (nm["shots"], nm["lora_steps"], nm["lora_rank"], nm["lora_lr"], nm["adapt_steps"]) == (2, 384, 32, 2e-3, 32)
    assert nm["lora_synthetic"] == 512
    for ratio, sparsity in ((0.5, None), (0.0, "unstructured"), (0.0, "2:4"), (0.2, "2:4")):
        opts = preset_options("quality", ratio, sparsity)
        sf.CompressConfig(ratio=ratio, method="surgeon", sparsity=sparsity, **opts)  # every set is valid
    with pytest.raises(ValueError, match="unknown preset 'best'; choose one of quality"):
        preset_options("best", 0.5)
    with pytest.raises(ValueError, match="sparsity must be None, 'unstructured' or 'N:M'"):
        preset_options("quality", 0.0, "Unstructured")  # what compress rejects gets no N:M settings


class _Stop(Exception):
    pass


def _config_of(monkeypatch, **kw):
    """The CompressConfig compress() builds (stopped at the adaptation, before any work)."""
    import surgeon_fx.shots as shots

    def stop(work, calibration, cfg, **k):
        raise _Stop(cfg)

    monkeypatch.setattr(shots, "adapt_", stop)
    with pytest.raises(_Stop) as e:
        sf.compress(tiny_model("llama"), kw.pop("ratio", 0.2), calibration=ids(4, 20), progress=False, **kw)
    return e.value.args[0]


def test_compress_preset_fills_only_what_is_not_given(monkeypatch):
    cfg = _config_of(monkeypatch, preset="quality")
    assert (cfg.method, cfg.shots, cfg.adapt_steps, cfg.lora_synthetic, cfg.lora_rank) == (
        "surgeon",
        8,
        32,
        256,
        "full",
    )
    assert (cfg.lora_steps, cfg.lora_lr, cfg.lora_loss, cfg.lora_batch_size) == (32, 1e-4, "distill", 8)
    cfg = _config_of(monkeypatch, preset="quality", lora_rank=32, lora_lr=1e-3, shots=3)
    assert (cfg.lora_rank, cfg.lora_lr, cfg.shots, cfg.lora_steps) == (32, 1e-3, 3, 32)
    cfg = _config_of(monkeypatch, preset="quality", ratio=0.0, sparsity="2:4")
    assert (cfg.shots, cfg.lora_steps, cfg.lora_lr, cfg.lora_synthetic) == (2, 384, 2e-3, 512)


def test_compress_preset_bad_input():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="unknown preset"):
        sf.compress(model, 0.2, calibration=ids(4, 20), preset="fast", progress=False)
    with pytest.raises(ValueError, match="pass preset or config, not both"):
        sf.compress(model, 0.2, calibration=ids(4, 20), preset="quality", config=sf.CompressConfig(ratio=0.2))
    with pytest.raises(ValueError, match="needs calibration windows"):
        sf.compress(model, 0.2, preset="quality", method="magnitude")
    with pytest.raises(ValueError, match=r"ratio must be a number in \[0, 1\)"):
        sf.compress(model, 1.5, calibration=ids(4, 20), preset="quality")


def test_cli_preset_fills_only_flags_not_given():
    """--preset quality sets the preset's options the command line did not give, even when a given
    value equals the option's default (--lora-rank 8)."""
    parse = build_parser().parse_args
    args = parse(["compress", "--out", "x", "--ratio", "0.5", "--preset", "quality"])
    check_compress_args(args)
    cfg = sf.CompressConfig(**config_fields(args))
    assert (cfg.shots, cfg.adapt_steps, cfg.lora_synthetic, cfg.lora_rank, cfg.lora_lr) == (20, 32, 256, "full", 1e-4)
    assert (cfg.lora_steps, cfg.lora_loss, cfg.lora_batch_size) == (32, "distill", 8)
    args = parse(["compress", "--out", "x", "--preset", "quality", "--lora-rank", "8", "--shots", "5"])
    check_compress_args(args)
    cfg = sf.CompressConfig(**config_fields(args))
    assert (cfg.ratio, cfg.lora_rank, cfg.shots, cfg.lora_lr) == (0.3, 8, 5, 1e-4)
    assert args.given == ["lora_rank", "shots"]
    args = parse(["compress", "--out", "x", "--preset", "quality", "--sparsity", "unstructured"])
    check_compress_args(args)
    cfg = sf.CompressConfig(**config_fields(args))
    assert (cfg.ratio, cfg.shots, cfg.lora_steps, cfg.lora_rank, cfg.lora_lr) == (0.0, 4, 64, "full", 1e-4)
    plain = parse(["compress", "--out", "x"])
    check_compress_args(plain)
    assert sf.CompressConfig(**config_fields(plain)).lora_steps == 0  # no preset: the defaults
    with pytest.raises(SystemExit):
        parse(["compress", "--out", "x", "--preset", "best"])


def test_tiny_quality_run_is_deterministic():
    """The preset end to end on a tiny model (fewer synthetic windows and steps to stay quick): the
    same result twice, the caller's model untouched."""
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(calibration=ids(6, 20, seed=1), preset="quality", lora_synthetic=4, lora_steps=2, adapt_steps=2)
    a = sf.compress(model, 0.1, progress=False, **kw)
    b = sf.compress(model, 0.1, progress=False, **kw)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert sum(v.numel() for v in sa.values()) < sum(v.numel() for v in before.values())
