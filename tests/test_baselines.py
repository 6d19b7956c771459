"""Torch-Pruning baseline: reaches the requested ratio, removes whole heads / MLP units, leaves the caller alone."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from families import ids, logits, tiny_model

from surgeon_fx import UnsupportedGraphError

pytest.importorskip("torch_pruning")
from surgeon_fx.baselines import torch_pruning_compress  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _gqa_llama() -> torch.nn.Module:
    """SmolLM2's head layout in small: 6 query heads over 2 KV heads (3 per group), head_dim 16."""
    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        vocab_size=128,
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    m = T.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.eval()


def _linear_numel(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.rsplit(".", 2)[-2] in LINEARS)


def _kept_rows(small: torch.Tensor, dense: torch.Tensor) -> list[int]:
    """Indices of the dense rows that survive in ``small`` (rows are copied, never changed)."""
    return [int((dense == row).all(1).nonzero()[0]) for row in small]


def test_gqa_heads_and_mlp_units_removed_as_zeroing_them():
    """On a GQA Llama at 30%: the target is met within 1%; the pruned model computes exactly what the dense
    one does with the removed query heads (o_proj columns) and MLP units (down_proj columns) zeroed; the
    config and attention modules carry the new head counts; the caller's model is unchanged."""
    m = _gqa_llama()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    small = torch_pruning_compress(m, 0.3, ids(4, 16, seed=3), importance="taylor", progress=False)
    rep = small.surgeon_fx_baseline
    assert abs(1 - _linear_numel(small) / _linear_numel(m) - 0.3) <= 0.01
    assert rep.basis_after == _linear_numel(small) and abs(rep.achieved - 0.3) <= 0.01
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert m.config.num_attention_heads == 6 and m.config.intermediate_size == 128
    zeroed = _gqa_llama()
    for i, (layer, dense) in enumerate(zip(small.model.layers, zeroed.model.layers)):
        attn, mlp = dense.self_attn, dense.mlp
        q_kept = _kept_rows(layer.self_attn.q_proj.weight, attn.q_proj.weight)[::16]
        heads = sorted(r // 16 for r in q_kept)
        assert len(heads) == rep.heads[f"model.layers.{i}.self_attn"] == small.config.num_attention_heads == 4
        assert layer.self_attn.num_key_value_groups == 2 and layer.self_attn.k_proj.out_features == 32
        units = _kept_rows(layer.mlp.gate_proj.weight, mlp.gate_proj.weight)
        assert len(units) == small.config.intermediate_size == layer.mlp.down_proj.in_features
        with torch.no_grad():
            for h in set(range(6)) - set(heads):
                attn.o_proj.weight[:, h * 16 : (h + 1) * 16] = 0
            mlp.down_proj.weight[:, sorted(set(range(128)) - set(units))] = 0
    x = ids(2, 11, seed=7)
    torch.testing.assert_close(logits(small, x), logits(zeroed, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_magnitude_without_calibration_on_other_families(family):
    """4 query heads over 2 KV groups: Torch-Pruning cannot drop a head there, so MLP units carry the ratio."""
    m = tiny_model(family)
    small = torch_pruning_compress(m, 0.2, importance="magnitude", progress=False)
    rep = small.surgeon_fx_baseline
    assert abs(rep.achieved - 0.2) <= 0.01 and rep.tp_head_ratio == 0.0
    assert abs(1 - _linear_numel(small) / _linear_numel(m) - rep.achieved) < 1e-9
    assert logits(small, ids(2, 9)).shape == (2, 9, 128)
    assert small.config.intermediate_size == small.model.layers[0].mlp.up_proj.out_features < 96


def test_ratio_zero_keeps_the_model():
    """Ratio 0 is the identity (a copy)."""
    m = tiny_model("llama")
    small = torch_pruning_compress(m, 0.0, importance="magnitude", progress=False)
    x = ids(2, 9)
    assert small is not m and small.surgeon_fx_baseline.achieved == 0.0
    torch.testing.assert_close(logits(small, x), logits(m, x))


def test_bad_input_is_a_clear_error():
    m = tiny_model("llama")
    with pytest.raises(ValueError, match="needs calibration"):
        torch_pruning_compress(m, 0.2, importance="taylor")
    with pytest.raises(ValueError, match="importance"):
        torch_pruning_compress(m, 0.2, importance="hessian")
    with pytest.raises(ValueError, match="ratio"):
        torch_pruning_compress(m, 1.0, importance="magnitude")
    with pytest.raises(ValueError, match="basis"):
        torch_pruning_compress(m, 0.2, importance="magnitude", basis="layers")
    with pytest.raises(ValueError, match="2-D int64"):
        torch_pruning_compress(m, 0.2, torch.zeros(2, 8))
    with pytest.raises(UnsupportedGraphError, match="Conv1D"):
        torch_pruning_compress(tiny_model("gpt2"), 0.2, importance="magnitude")
    with pytest.raises(UnsupportedGraphError, match="Hugging Face"):
        torch_pruning_compress(torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.Linear(4, 8)), 0.2)
