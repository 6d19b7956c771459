"""The benchmark scripts' own helpers (the scripts themselves run on the GPU machine)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _env():
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("_env")
    finally:
        sys.path.remove(str(BENCH))


def test_result_files_of_outs_with_dots_do_not_collide(tmp_path):
    artefact = _env().artefact
    outs = [tmp_path / "sparse_band0.1_l64", tmp_path / "sparse_band0.1_l128", tmp_path / "sparse_band0.05"]
    for ext in (".json", ".md", ".log"):
        paths = [artefact(o, ext) for o in outs]
        assert len(set(paths)) == len(outs)
        assert all(p.name == o.name + ext and p.parent == tmp_path for p, o in zip(paths, outs))
    # an --out that already names a result file keeps its stem
    assert artefact(tmp_path / "quality.json", ".md") == tmp_path / "quality.md"
    assert artefact(tmp_path / "quality.json", ".json") == tmp_path / "quality.json"


def test_correction_variants_map_to_compress_options():
    """Every correction option of a method variant reaches ``compress`` under its own name, and every
    option it returns is a real ``CompressConfig`` field."""
    import dataclasses

    from surgeon_fx.api import CompressConfig

    variant = _env().correction_variant
    cases = {
        "l16": {"lora_steps": 16},
        "r32": {"lora_rank": 32},
        "rfull": {"lora_rank": "full"},
        "lr1e-3": {"lora_lr": 1e-3},
        "lb8": {"lora_batch_size": 8},
        "h8": {"lora_holdout": 8},
        "distill": {"lora_loss": "distill"},
        "distillnt": {"lora_loss": "distill+next_token"},
        "norms": {"lora_norms": True},
        "cos": {"lora_schedule": "cosine"},
        "ntw0.25": {"lora_loss": "distill+next_token", "lora_next_token_weight": 0.25},
        "ntwe0": {"lora_loss": "distill+next_token", "lora_next_token_weight_end": 0.0},
        "lre1e-3": {"lora_lr_end": 1e-3},
        "ad32": {"adapt_steps": 32},
        "adlr1e-3": {"adapt_lr": 1e-3},
        "syn256": {"lora_synthetic": 256},
        "synb256": {"lora_synthetic_batch_size": 256},
        "s8": {},
        "band0.1": {},
    }
    fields = {f.name for f in dataclasses.fields(CompressConfig)}
    for option, want in cases.items():
        assert variant(option) == want, option
        assert set(want) <= fields, option
        needs = {"lora_steps": 4, "lora_loss": "distill"} if "lora_synthetic" in want else {}
        CompressConfig(ratio=0.2, method="surgeon", **needs, **want)  # every value is one the config accepts


def test_quality_method_names_accept_every_correction_variant():
    """bench_quality.py refuses a misspelt option before loading a model: every correction variant the
    runs use passes its check, unknown or malformed options do not."""
    sys.path.insert(0, str(BENCH))
    try:
        problem = importlib.import_module("bench_quality").method_problem
    finally:
        sys.path.remove(str(BENCH))
    ok = "surgeon:s4:l32:lb8:r32:lr5e-4:distillnt", "surgeon:s4:l32:lb8:ntw0.25:cos", "surgeon:s8:l16:h8:norms:rfull"
    ok += ("surgeon:s4:l32:lb8:r32:lr5e-4:ntw0.5:ntwe0.1", "surgeon:s4:l32:lr3e-4:lre1e-3:distillnt:ntwe0")
    for method in ok:
        assert problem(method) is None, method
    for method in (
        "surgeon:ntw",
        "surgeon:ntwx",
        "surgeon:ntwe",
        "surgeon:lre",
        "surgeon:lrx",
        "surgeon:l16x",
        "surgeon:d",
        "surgeon:cosine",
        "surgeon:s4:distil",
    ):
        assert "unknown option" in problem(method), method


def test_synthetic_cache_shares_windows_between_runs_with_one_teacher(tmp_path):
    """--synthetic-cache: the first run with a teacher saves its windows (on_synthetic), a later run with
    the same teacher, sampling options, calibration and model reads them; any of those differing, or no
    synthetic windows, does not."""
    import torch

    cache = _env().synthetic_cache
    calib = torch.randint(0, 50, (6, 20))
    opts = dict(method="surgeon", shots=2, lora_steps=4, lora_loss="distill", lora_synthetic=3, adapt_steps=2)
    quiet = dict(say=lambda msg: None)
    first = cache(str(tmp_path), "m", calib, 0.2, opts, **quiet)
    assert set(first) == {"on_synthetic"}
    windows = torch.randint(0, 50, (3, 20))
    first["on_synthetic"](windows)
    assert len(list(tmp_path.glob("synthetic_3_*.pt"))) == 1 and not list(tmp_path.glob("*.tmp*"))
    again = cache(str(tmp_path), "m", calib, 0.5, opts | {"shots": 4, "lora_rank": 32}, **quiet)  # student options
    assert set(again) == {"synthetic"} and torch.equal(again["synthetic"], windows)
    for other in (
        dict(opts=opts | {"adapt_steps": 4}),
        dict(opts=opts | {"seed": 1}),
        dict(opts=opts | {"lora_synthetic": 4}),
        dict(calib=calib[:5]),
        dict(model="other"),
    ):
        args = dict(model="m", calib=calib, opts=opts) | other
        got = cache(str(tmp_path), args["model"], args["calib"], 0.2, args["opts"], **quiet)
        assert set(got) == {"on_synthetic"}, other
    assert cache(None, "m", calib, 0.2, opts) == {} and cache(str(tmp_path), "m", calib, 0.2, {"shots": 2}) == {}
