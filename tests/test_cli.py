"""The ``surgeon-fx`` command line: the output folder, exit codes, overwrite refusal, interruption and resume."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from families import ids, logits, tiny_model
from test_checkpoint import tiny_tokenizer

from surgeon_fx import api, check_nm, export
from surgeon_fx.api import CompressConfig
from surgeon_fx.checkpoint import load_pretrained
from surgeon_fx.cli import EXIT_EXISTS, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, build_parser, main
from surgeon_fx.options import check_compress_args, config_fields
from surgeon_fx.patterns import nm_quota


def make_source(folder: Path) -> Path:
    """Write a tiny Llama folder with a tokenizer, and 50 rows of text in its vocabulary (text.jsonl)."""
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    r = random.Random(0)
    rows = [json.dumps({"text": " ".join(f"w{r.randrange(128)}" for _ in range(40))}) for _ in range(50)]
    (folder / "text.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A tiny Llama folder with a tokenizer, and 50 rows of text in its vocabulary."""
    return make_source(tmp_path_factory.mktemp("src"))


def compress_args(src: Path, out: Path, *extra: str) -> list[str]:
    text = ["--wikitext", str(src / "text.jsonl"), "--windows", "2", "--seq-len", "16"]
    return ["compress", "--model", str(src), "--out", str(out), *text, *extra]


def digest(folder: Path) -> dict[str, str]:
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def test_every_option_is_explained(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"compress", "eval", "export", "inspect", "demo"} <= set(commands)
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings} has no help"
    assert main(["compress", "--help"]) == EXIT_OK
    text = capsys.readouterr().out
    assert all(m in text for m in api.METHODS) and "exit codes" in text and ".partial" in text


def test_compress_writes_a_complete_folder(src, tmp_path):
    """Weights, config, tokenizer, ONNX, report with plots; the checkpoint loads back and matches ONNX."""
    out = tmp_path / "out"
    assert main(compress_args(src, out, "--ratio", "0.3", "--export", "onnx")) == EXIT_OK
    names = {f.name for f in out.iterdir()}
    expected = {"config.json", "model.safetensors", "tokenizer.json", "model.onnx", "report.md", "report.json"}
    assert expected | {"widths.png", "perplexity.png"} <= names
    assert not (tmp_path / "out.partial").exists()
    report = (out / "report.md").read_text()
    assert (
        "surgeon-fx compress --model" in report
        and "perplexity" in report
        and "![Kept width per layer](widths.png)" in report
    )
    record = json.loads((out / "report.json").read_text())
    assert record["compressed"]["parameters"] < record["dense"]["parameters"]
    assert record["dense"]["perplexity"] > 1 and [p["label"] for p in record["points"]] == ["dense", "shot 1"]
    model = load_pretrained(out)
    assert torch.equal(logits(model, ids()), logits(load_pretrained(out), ids()))
    assert (
        main(["eval", "--model", str(out), "--wikitext", str(src / "text.jsonl"), "--windows", "1", "--seq-len", "8"])
        == 0
    )
    assert main(["export", "--model", str(out), "--format", "pt2", "-o", str(tmp_path / "m.pt2")]) == EXIT_OK
    assert main(["export", "--model", str(out), "--format", "pt2", "-o", str(tmp_path / "m.pt2")]) == EXIT_EXISTS


def test_refuses_to_overwrite_and_survives_an_interruption(src, tmp_path, monkeypatch, capsys):
    """Exit 3 without --force; a failure mid-run leaves the old output intact; the rerun resumes."""
    out = tmp_path / "out"
    assert main(compress_args(src, out, "--ratio", "0.2", "--export")) == EXIT_OK
    before = digest(out)
    assert main(compress_args(src, out, "--ratio", "0.3", "--export")) == EXIT_EXISTS
    assert "--force" in capsys.readouterr().err and digest(out) == before

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "export_pt2", boom)
    args = compress_args(src, out, "--ratio", "0.3", "--export", "pt2", "--force")
    assert main(args) == EXIT_INTERRUPTED
    assert digest(out) == before  # the previous output is untouched
    state = json.loads((tmp_path / "out.partial" / "run.json").read_text())
    assert state["done"]["save"] is True and "export pt2" not in state["done"]

    monkeypatch.undo()
    calls = []
    real = api.compress
    monkeypatch.setattr(api, "compress", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main([*args, "--ratio", "0.25"]) == EXIT_EXISTS  # other settings: refused, partial kept
    assert "--restart" in capsys.readouterr().err
    assert main(args) == EXIT_OK
    assert calls == [] and "resuming" in capsys.readouterr().out  # resumed from the saved checkpoint
    assert not (tmp_path / "out.partial").exists() and (out / "model.pt2").is_file()
    assert json.loads((out / "report.json").read_text())["settings"]["ratio"] == 0.3


def _interrupt_third_evaluation(monkeypatch) -> list:
    """Ctrl-C at the third perplexity evaluation (dense, shot 1, shot 2 <- here); returns the call log."""
    from surgeon_fx import evaluate

    real, calls = evaluate.perplexity, []

    def counting(model, windows, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(model, windows, **kw)

    monkeypatch.setattr(evaluate, "perplexity", counting)
    return calls


def test_adaptation_is_scored_and_reported(src, tmp_path):
    """--adapt-steps: calibration is read even for magnitude, the adapted dense model is scored once and
    reported between the dense model and the shots, and report.md compares the result with it."""
    out = tmp_path / "out"
    extra = ["--method", "magnitude", "--adapt-steps", "2", "--adapt-lr", "1e-2", "--calib-windows", "4"]
    assert main(compress_args(src, out, "--ratio", "0.3", "--export", "--calib-seq-len", "16", *extra)) == EXIT_OK
    record = json.loads((out / "report.json").read_text())
    labels = [p["label"] for p in record["points"]]
    assert labels[:2] == ["dense", "adapted"] and labels[2:] == ["shot 1"]
    adapted, dense = record["adapted"], record["dense"]
    assert adapted["parameters"] == dense["parameters"] and adapted["perplexity"] > 1
    assert adapted["perplexity"] != dense["perplexity"]  # the adaptation changed the dense model
    assert record["settings"]["adapt_steps"] == 2
    want = record["compressed"]["perplexity"] / adapted["perplexity"]
    assert (
        f"perplexity {adapted['perplexity']:.3f}; the compressed model is x{want:.2f} of it"
        in (out / "report.md").read_text()
    )


def test_interrupted_multi_shot_run_resumes_from_its_last_shot(src, tmp_path, monkeypatch):
    """Ctrl-C while shot 2 is evaluated: the rerun continues with shot 3 from OUT.partial/shots/."""
    calls = _interrupt_third_evaluation(monkeypatch)
    args = compress_args(src, tmp_path / "out", "--ratio", "0.3", "--shots", "3", "--export")
    assert main(args) == EXIT_INTERRUPTED
    assert json.loads((tmp_path / "out.partial" / "shots" / "state.json").read_text())["shot"] == 2
    calls.clear()
    assert main(args) == EXIT_OK
    assert len(calls) == 1  # only shot 3 was compressed and evaluated again; dense and the final result reused
    record = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [p["label"] for p in record["points"]] == ["dense", "shot 1", "shot 2", "shot 3"]
    assert record["points"][2]["perplexity"] is None and record["compressed"]["perplexity"] > 1
    assert abs(record["compressed"]["parameters"] / record["dense"]["parameters"] - 0.7) < 0.02


def test_interrupted_sparsity_run_resumes_from_its_last_shot(src, tmp_path, monkeypatch):
    """--sparsity 2:4 in 3 shots, Ctrl-C while shot 2 is evaluated: the rerun continues with shot 3
    from OUT.partial/shots/sparsity/ and ends exactly 2:4."""
    calls = _interrupt_third_evaluation(monkeypatch)
    args = compress_args(src, tmp_path / "out", "--sparsity", "2:4", "--shots", "3")
    assert main(args) == EXIT_INTERRUPTED
    assert (tmp_path / "out.partial" / "shots" / "sparsity" / "masks-2.safetensors").is_file()
    calls.clear()
    assert main(args) == EXIT_OK
    assert len(calls) == 1  # only shot 3 was sparsified and evaluated again
    record = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [p["label"] for p in record["points"]] == ["dense", "2:4 shot 1", "2:4 shot 2", "2:4 shot 3"]
    assert record["sparsity"]["nm_valid"] is True and record["sparsity"]["reached"] >= 0.5


def test_restart_discards_partial_state(src, tmp_path, monkeypatch):
    """A failed run (exit 1) keeps OUT.partial; --restart starts over with other settings."""

    def fail(*a, **k):
        raise RuntimeError("disk full")

    out = tmp_path / "out"
    monkeypatch.setattr(api, "compress", fail)
    assert main(compress_args(src, out, "--export", "--no-eval")) == 1
    assert (tmp_path / "out.partial" / "run.json").is_file()
    monkeypatch.undo()
    assert main(compress_args(src, out, "--export", "--no-eval", "--ratio", "0.1", "--restart")) == EXIT_OK
    assert out.is_dir() and not (tmp_path / "out.partial").exists()


def test_bad_input_exit_codes(src, tmp_path, capsys):
    assert main(compress_args(src, tmp_path / "a", "--ratio", "1.5")) == EXIT_USAGE
    assert main(["compress", "--model", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "b")]) == EXIT_USAGE
    assert main(["compress", "--model", str(src), "--out", str(tmp_path / "c"), "--method", "nope"]) == EXIT_USAGE
    assert main(["inspect", "--model", str(src)]) == EXIT_OK and "groups" in capsys.readouterr().out


def decoder_linear_weights(model) -> dict[str, torch.Tensor]:
    """Weights of every ``nn.Linear`` inside the decoder layers (not the embedding or the LM head)."""
    return {
        f"{name}.weight": m.weight
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}."
    }


@pytest.mark.parametrize("ratio", ["0", "0.2"])
def test_compress_with_2_4_sparsity(src, tmp_path, ratio):
    """--sparsity 2:4 (alone, and after removing 20% of the structures): every decoder linear weight of the
    saved checkpoint is exactly 2:4 with half its entries zero, and the report says so."""
    out = tmp_path / "out"
    args = compress_args(src, out, "--ratio", ratio, "--sparsity", "2:4", "--method", "magnitude", "--export")
    assert main(args) == EXIT_OK
    model = load_pretrained(out)
    weights = decoder_linear_weights(model)
    assert len(weights) == 14  # 7 projections in each of the 2 layers
    assert check_nm(model, 2, 4, params=list(weights)) == dict.fromkeys(weights, 0)
    zeros = {name: int((w == 0).sum()) for name, w in weights.items()}
    for name, w in weights.items():  # 2 of every 4 inputs; a trailing group of 2 or 3 (pruned widths) loses 0 or 1
        assert zeros[name] == w.shape[0] * nm_quota(w.shape[1], 2, 4), name
    assert int((model.lm_head.weight == 0).sum()) == 0
    record = json.loads((out / "report.json").read_text())
    sp = record["sparsity"]
    total = sum(w.numel() for w in weights.values())
    assert sp["nm_valid"] is True and sp["layers"] == 14
    assert (sp["zero_weights"], sp["weights"]) == (sum(zeros.values()), total)
    assert sp["reached"] == sum(zeros.values()) / total and (sp["reached"] == 0.5) == (ratio == "0")
    assert (record["compressed"]["parameters"] < record["dense"]["parameters"]) == (ratio != "0")
    assert [p["label"] for p in record["points"]] == ["dense", *(["shot 1"] if ratio != "0" else []), "2:4 shot 1"]
    report = (out / "report.md").read_text()
    assert f"**{100 * sp['reached']:.2f}%**" in report and "valid 2:4" in report


@pytest.mark.parametrize(
    "extra, option",
    [
        (["--sparsity", "3:2"], "--sparsity"),
        (["--sparsity", "2:4x"], "--sparsity"),
        (["--sparsity", "unstructured", "--sparsity-ratio", "1.5"], "--sparsity-ratio"),
        (["--sparsity", "2:4", "--sparsity-ratio", "0.3"], "--sparsity-ratio"),
        (["--sparsity", "2:4", "--method", "kobd"], "--method kobd"),
        (["--method", "wanda"], "--sparsity"),
        (["--sparsity", "2:4", "--method", "sparsegpt", "--ratio", "0.3"], "--ratio 0"),
        (["--sparsity-ratio", "0.5"], "--sparsity-ratio"),
        (["--sparsity", "2:4", "--sparsity-scope", "layer"], "--sparsity-scope"),
        (["--sparsity", "2:4", "--sparsity-rows", "coupled"], "--sparsity-rows"),
        (["--sparsity-rows", "independent"], "--sparsity-rows"),
        (["--sparsity-band", "0.1"], "--sparsity-band"),
        (["--sparsity", "2:4", "--method", "surgeon", "--sparsity-band", "0.1"], "--sparsity-band"),
        (["--sparsity", "unstructured", "--method", "wanda", "--sparsity-band", "0.1"], "--sparsity-band"),
        (["--sparsity", "unstructured", "--method", "surgeon", "--sparsity-band", "2"], "--sparsity-band"),
        (["--sparsity", "2:4", "--method", "surgeon", "--chunk-size", "0"], "--chunk-size"),
        (["--method", "published"], "--method published"),
        (["--method", "surgeon", "--max-memory", "12 parsecs"], "max_memory"),
        (["--max-memory", "40GB"], "max_memory"),
        (["--method", "surgeon", "--damping", "0"], "damping"),
        (["--method", "surgeon", "--batch-size", "0"], "--batch-size"),
    ],
)
def test_bad_sparsity_options(src, tmp_path, capsys, extra, option):
    """Bad values or combinations: exit 2, one line on stderr naming the option, nothing written."""
    assert main(compress_args(src, tmp_path / "out", *extra)) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert option in err and "\n" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_sparsity_defaults_to_ratio_zero():
    """--sparsity alone only sparsifies (--ratio 0); without it --ratio stays 0.3; scope and chunk get defaults."""
    parse = build_parser().parse_args
    sparse = parse(["compress", "--out", "x", "--sparsity", "unstructured", "--sparsity-ratio", "0.6"])
    check_compress_args(sparse)
    assert (sparse.ratio, sparse.sparsity_scope, sparse.chunk_size) == (0.0, "global", 1024)
    assert sparse.sparsity_rows == "auto" and sparse.sparsity_band is None
    banded = parse(
        ["compress", "--out", "x", "--sparsity", "unstructured", "--method", "surgeon", "--sparsity-band", "0.2"]
    )
    check_compress_args(banded)
    assert config_fields(banded)["sparsity_band"] == 0.2
    # not given: the config's default (0.1 for the global surgeon); "none": unbounded, as the paper
    assert CompressConfig(**(config_fields(sparse) | {"method": "surgeon"})).sparsity_band == 0.1
    unbounded = parse(
        ["compress", "--out", "x", "--sparsity", "unstructured", "--method", "surgeon", "--sparsity-band", "none"]
    )
    check_compress_args(unbounded)
    fields = config_fields(unbounded)
    assert "sparsity_band" in fields and CompressConfig(**(fields | {"method": "surgeon"})).sparsity_band is None
    dense = parse(["compress", "--out", "x"])
    check_compress_args(dense)
    assert (dense.ratio, dense.sparsity_scope, dense.chunk_size, dense.sparsity_rows) == (0.3, None, None, None)
    # "auto" resolves by pattern in the config; an explicit choice is kept
    fields = {"ratio": 0.0, "method": "surgeon"}
    assert CompressConfig(**fields, sparsity="unstructured").sparsity_rows == "independent"
    assert CompressConfig(**fields, sparsity="2:4").sparsity_rows == "coupled"
    assert CompressConfig(**fields, sparsity="2:4", sparsity_rows="independent").sparsity_rows == "independent"
    chosen = parse(
        ["compress", "--out", "x", "--sparsity", "2:4", "--method", "surgeon", "--sparsity-rows", "independent"]
    )
    check_compress_args(chosen)
    assert CompressConfig(**config_fields(chosen)).sparsity_rows == "independent"


def test_correction_options_reach_the_config():
    """--lora-* options land in CompressConfig; defaults: no correction, next-token loss, 1-D parameters untouched."""
    parse = build_parser().parse_args
    plain = parse(["compress", "--out", "x"])
    check_compress_args(plain)
    plain = CompressConfig(**config_fields(plain))
    assert (plain.lora_steps, plain.lora_rank, plain.lora_lr, plain.lora_loss) == (0, 8, 3e-4, "next_token")
    argv = ["compress", "--out", "x", "--lora-steps", "4", "--lora-rank", "2", "--lora-lr", "1e-3"]
    args = parse([*argv, "--lora-loss", "distill"])
    check_compress_args(args)
    cfg = CompressConfig(**config_fields(args))
    assert (cfg.lora_steps, cfg.lora_rank, cfg.lora_lr, cfg.lora_loss) == (4, 2, 1e-3, "distill")
    assert (plain.lora_batch_size, cfg.lora_batch_size) == (1, 1)  # default: --batch-size
    extra = ["--lora-batch-size", "8", "--lora-holdout", "4", "--lora-norms", "--lora-schedule", "cosine"]
    full = parse([*argv[:5], "--lora-rank", "full", "--batch-size", "2", *extra])
    check_compress_args(full)
    full = CompressConfig(**config_fields(full))
    assert (full.lora_rank, full.batch_size, full.lora_batch_size, full.lora_holdout) == ("full", 2, 8, 4)
    assert (plain.lora_holdout, plain.lora_norms, cfg.lora_norms, full.lora_norms) == (0, False, False, True)
    assert (plain.lora_schedule, full.lora_schedule) == ("constant", "cosine")
    mixed = parse([*argv, "--lora-loss", "distill+next_token", "--lora-next-token-weight", "0.25"])
    check_compress_args(mixed)
    mixed = CompressConfig(**config_fields(mixed))
    assert (plain.lora_next_token_weight, mixed.lora_loss, mixed.lora_next_token_weight) == (
        0.5,
        "distill+next_token",
        0.25,
    )
    assert mixed.lora_next_token_weight_end is None
    down = parse([*argv, "--lora-loss", "distill+next_token", "--lora-next-token-weight-end", "0"])
    check_compress_args(down)
    assert CompressConfig(**config_fields(down)).lora_next_token_weight_end == 0.0
    assert mixed.lora_lr_end is None
    rising = parse([*argv, "--lora-lr-end", "3e-3"])
    check_compress_args(rising)
    assert CompressConfig(**config_fields(rising)).lora_lr_end == 3e-3
    adapt = parse([*argv, "--adapt-steps", "16", "--adapt-lr", "1e-3"])
    check_compress_args(adapt)
    adapt = CompressConfig(**config_fields(adapt))
    assert (plain.adapt_steps, plain.adapt_lr, plain.adapt_rank) == (0, 3e-4, 32)
    assert (adapt.adapt_steps, adapt.adapt_lr, adapt.adapt_rank) == (16, 1e-3, 32)
    whole = parse([*argv, "--adapt-rank", "full"])
    check_compress_args(whole)
    assert CompressConfig(**config_fields(whole)).adapt_rank == "full"
    assert CompressConfig(**config_fields(plain)).lora_synthetic == 0
    syn = parse([*argv, "--lora-steps", "4", "--lora-loss", "distill", "--lora-synthetic", "64"])
    check_compress_args(syn)
    assert CompressConfig(**config_fields(syn)).lora_synthetic == 64
    assert CompressConfig(**config_fields(syn)).lora_synthetic_batch_size is None
    synb = parse(
        [
            *argv,
            "--lora-steps",
            "4",
            "--lora-loss",
            "distill",
            "--lora-synthetic",
            "64",
            *("--lora-synthetic-batch-size", "32"),
        ]
    )
    check_compress_args(synb)
    assert CompressConfig(**config_fields(synb)).lora_synthetic_batch_size == 32
    with pytest.raises(SystemExit):
        parse([*argv, "--lora-schedule", "linear"])
    for bad in ("0", "half"):
        with pytest.raises(SystemExit):
            parse([*argv[:5], "--lora-rank", bad])


STOCK_LOAD = r"""
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    out = model(input_ids=torch.arange(100, 116)[None], use_cache=False).logits
torch.save(out, sys.argv[2])
assert not any(m.split(".")[0] == "surgeon_fx" for m in sys.modules)
"""


@pytest.mark.slow
def test_compress_real_smollm2_end_to_end(tmp_path):
    """The installed console script on SmolLM2-135M (CPU, small evaluation), uniform heads and MLP widths: a
    complete folder that stock transformers loads in a fresh process, with surgeon_fx.load_pretrained's logits.
    (The residual width is kept: LlamaConfig needs hidden_size % num_attention_heads == 0, see test_checkpoint.)"""
    exe = shutil.which("surgeon-fx") or pytest.skip("the surgeon-fx console script is not installed")
    out = tmp_path / "smollm2-30"
    cmd = [exe, "compress", "--model", "smollm2-135m", "--out", str(out), "--ratio", "0.3", "--uniform"]
    cmd += ["--multiple", "8", "--kinds", "heads", "mlp", "--windows", "1", "--seq-len", "64"]
    cmd += ["--calib-windows", "2", "--calib-seq-len", "64"]  # small calibration (magnitude does not read it)
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    names = {f.name for f in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "model.onnx",
        "report.md",
        "widths.png",
        "perplexity.png",
    } <= names
    record = json.loads((out / "report.json").read_text())
    assert 0.30 <= 1 - record["compressed"]["parameters"] / record["dense"]["parameters"] < 0.31
    assert record["compressed"]["file_bytes"] < 0.75 * record["dense"]["file_bytes"]
    assert json.loads((out / "config.json").read_text())["surgeon_fx"]["layout"] == "stock"
    fresh = subprocess.run(
        [sys.executable, "-c", STOCK_LOAD, str(out), str(tmp_path / "stock.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    model = load_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == record["compressed"]["parameters"]
    with torch.no_grad():
        ours = model(input_ids=torch.arange(100, 116)[None], use_cache=False).logits
    assert torch.equal(ours, torch.load(tmp_path / "stock.pt"))


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path):
    """A file written through write_atomic is the old one or the new one: a writer that fails midway
    leaves the old file and no temporary file; unique names keep processes apart."""
    from surgeon_fx.rundir import write_atomic

    path = tmp_path / "state.json"
    assert write_atomic(path, lambda tmp: tmp.write_text("old")) == path
    assert path.read_text() == "old"

    def fails(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, fails)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    seen = []
    write_atomic(path, lambda tmp: seen.append(tmp.name) or tmp.write_text("new"), unique=True)
    assert path.read_text() == "new" and seen[0] == f"state.json.tmp{os.getpid()}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
