"""Checkpoints: uneven models round-trip exactly; uniform ones load with stock transformers in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from families import FAMILIES, VOCAB, ids, logits, tiny_model
from helpers import analyse
from surgeon_fx.passes import plan_from_removed

import surgeon_fx as sf
from surgeon_fx.checkpoint import load_pretrained, read_metadata, save_pretrained, stock_config


def tiny_tokenizer():
    """A word-level tokenizer over the tiny models' 128 ids ('w0' ... 'w127'), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", bos_token="w1", eos_token="w2")


@pytest.mark.parametrize("family", FAMILIES)
def test_uneven_round_trip_is_exact(family, tmp_path):
    """save -> load gives identical logits, identical greedy generate(), the same plan and shapes."""
    small = sf.compress(tiny_model(family), 0.3, progress=False)
    save_pretrained(small, tmp_path, layout="uneven")
    again = load_pretrained(tmp_path)
    assert type(again) is type(small) and read_metadata(tmp_path)["layout"] == "uneven"
    x = ids(3, 9, seed=4)
    assert torch.equal(logits(small, x), logits(again, x))
    shapes = {n: p.shape for n, p in small.named_parameters()}
    assert shapes == {n: p.shape for n, p in again.named_parameters()}
    assert again.surgeon_fx_plan.to_json() == small.surgeon_fx_plan.to_json()
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(small.generate(x[:1, :4], **kw), again.generate(x[:1, :4], **kw))


def test_load_builds_on_meta_without_random_init(tmp_path, monkeypatch):
    """No real tensor is randomly initialised while loading (the patch does catch a CPU from_config)."""
    from transformers import AutoModelForCausalLM

    small = sf.compress(tiny_model("llama"), 0.3, progress=False)
    save_pretrained(small, tmp_path, layout="uneven")
    calls = []
    for name in ("normal_", "uniform_", "trunc_normal_"):
        if hasattr(torch.Tensor, name):
            orig = getattr(torch.Tensor, name)

            def spy(self, *a, _orig=orig, **k):
                if not self.is_meta:
                    calls.append(tuple(self.shape))
                return _orig(self, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, spy)
    load_pretrained(tmp_path)
    assert calls == []
    AutoModelForCausalLM.from_config(small.config)
    assert calls, "the spy did not see the random initialisation of a model built on the CPU"


def test_tokenizer_is_written_along(tmp_path):
    from transformers import AutoTokenizer

    tok = tiny_tokenizer()
    save_pretrained(sf.compress(tiny_model("llama"), 0.2, progress=False), tmp_path, tokenizer=tok)
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert again("w5 w7 w99")["input_ids"] == tok("w5 w7 w99")["input_ids"] == [5, 7, 99]


def test_stock_from_pretrained_refuses_uneven_checkpoint(tmp_path):
    """Uneven widths never load silently re-initialised: stock transformers raises on the size mismatch."""
    from transformers import AutoModelForCausalLM

    small = sf.compress(tiny_model("mistral"), 0.3, progress=False)
    save_pretrained(small, tmp_path, layout="uneven")
    with pytest.raises(RuntimeError, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path))


# Kinds per family for compress(uniform=True): every kind somewhere; heads and residual only where the config
# class reads head_dim (GPT-2 and OPT derive it from the hidden width, see the refusal test below).
UNIFORM_KINDS = {
    "opt": ("mlp",),
    "gpt2": ("mlp",),
    "llama": ("heads", "residual"),
    "qwen2": ("heads", "mlp", "residual"),
    "mistral": ("mlp", "residual"),
    "phi": ("heads", "residual"),
}


@pytest.fixture(scope="module")
def stock_dirs(tmp_path_factory):
    """Per family: compress(uniform=True, multiple=8) saved with layout='stock', plus its expected logits."""
    root = tmp_path_factory.mktemp("stock")
    out = {}
    for family, kinds in UNIFORM_KINDS.items():
        model = sf.compress(tiny_model(family), 0.2, uniform=True, multiple=8, kinds=kinds, progress=False)
        folder = root / family
        save_pretrained(model, folder, layout="stock", verify=False)  # the fresh process checks the logits
        torch.save(logits(model, ids(2, 7, seed=3)), folder / "expected.pt")
        out[family] = folder
    return out


FRESH = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
result = {}
for folder in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    x = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(input_ids=x, use_cache=False).logits
    gen = model.generate(x[:1, :3], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    result[folder] = [torch.equal(out, torch.load(folder + "/expected.pt")), list(gen.shape)]
result["imported"] = sorted(m for m in sys.modules if m.split(".")[0] == "surgeon_fx")
print(json.dumps(result))
"""


def test_uniform_checkpoints_load_with_stock_transformers_in_a_fresh_process(stock_dirs):
    """Every family: plain from_pretrained in a process without surgeon_fx, identical logits, generate()."""
    folders = [str(f) for f in stock_dirs.values()]
    run = subprocess.run([sys.executable, "-c", FRESH, *folders], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result.pop("imported") == []
    assert result == {f: [True, [1, 7]] for f in folders}
    changed = set()
    for family, folder in stock_dirs.items():  # the configs really shrank, head_dim kept
        cfg = json.loads((folder / "config.json").read_text())
        dense = tiny_model(family).config
        changed |= {
            k
            for k in ("num_attention_heads", "hidden_size", "intermediate_size")
            if cfg.get(k, 0) < getattr(dense, k, 0)
        }
        if cfg.get("num_attention_heads", 4) < 4 or cfg.get("hidden_size", 64) < 64:
            assert cfg["head_dim"] == 16
    assert changed == {"num_attention_heads", "hidden_size", "intermediate_size"}


def test_config_that_cannot_express_heads_is_refused_clearly(tmp_path):
    """GPT-2 derives head_dim from n_embd: 'stock' refuses dropped heads; 'auto' falls back to 'uneven'."""
    model = tiny_model("gpt2")
    _, a = analyse(model)
    small = sf.prune(model, plan_from_removed(a, {g.name: [0] for g in a.groups if g.kind == "heads"}))
    with pytest.raises(ValueError, match=r"GPT2Config .* cannot describe this model: GPT2LMHeadModel cannot be built"):
        stock_config(small)
    with pytest.raises(ValueError, match="layout='uneven'"):
        save_pretrained(small, tmp_path / "s", layout="stock")
    save_pretrained(small, tmp_path / "a")
    meta = read_metadata(tmp_path / "a")
    assert meta["layout"] == "uneven" and "head_dim" in meta["why_uneven"]
    assert torch.equal(logits(load_pretrained(tmp_path / "a"), ids()), logits(small, ids()))


def test_config_validation_is_respected(tmp_path):
    """LlamaConfig wants hidden_size % num_attention_heads == 0: 62 channels with 4 heads are not stock."""
    model = tiny_model("llama")
    _, a = analyse(model)
    small = sf.prune(model, plan_from_removed(a, {g.name: [3, 40] for g in a.groups if g.kind == "residual"}))
    with pytest.raises(ValueError, match="not a multiple of the number of attention heads"):
        stock_config(small)
    save_pretrained(small, tmp_path)
    assert "attention heads" in read_metadata(tmp_path)["why_uneven"]
    assert torch.equal(logits(load_pretrained(tmp_path), ids()), logits(small, ids()))


def test_bad_input():
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_pretrained("/nonexistent/folder")
    with pytest.raises(ValueError, match="layout must be"):
        save_pretrained(tiny_model("llama"), "/tmp/unused", layout="fast")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        save_pretrained(torch.nn.Linear(2, 2), "/tmp/unused")
