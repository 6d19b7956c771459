"""Rewrite and compress: exactness oracles, ratios, shapes, generate(), the caller's model untouched."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from families import FAMILIES, RMS_FAMILIES, VOCAB, ids, logits, tiny_model
from helpers import analyse, param_count, pick_atoms, zero_atoms_
from surgeon_fx.passes import apply_plan, plan_from_removed
from test_core_groups import FusedGQA

import surgeon_fx as sf


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_is_identity(family):
    m = tiny_model(family)
    out = sf.compress(m, 0.0)
    x = ids(3, 9)
    assert torch.equal(logits(out, x), logits(m, x))
    assert param_count(out) == param_count(m)


@pytest.mark.parametrize("family", [*FAMILIES, "fused"])
def test_removing_zeroed_heads_and_units_is_exact(family):
    """Zero a set of heads and MLP units; a plan removing exactly those leaves the logits unchanged."""
    m = FusedGQA() if family == "fused" else tiny_model(family)
    gm, a = analyse(m)
    removed = pick_atoms(a, kinds=("heads", "mlp"), per_group=3)
    assert any(a.group(g).kind == "heads" for g in removed)
    zeroed = m  # zero in place on our own model
    zero_atoms_(zeroed, a, removed)
    plan = plan_from_removed(a, removed)
    out = sf.prune(zeroed, plan)
    x = ids(2, 11, seed=3) % (32 if family == "fused" else VOCAB)
    ref = logits(zeroed, x)
    torch.testing.assert_close(logits(out, x), ref, atol=1e-5, rtol=0)
    # the rewritten graph agrees too, and it is smaller by exactly the plan's count
    gm2 = sf.trace(zeroed)
    sf.passes.annotate_groups(gm2)
    new = apply_plan(gm2, plan)
    torch.testing.assert_close(new(x), ref, atol=1e-5, rtol=0)
    assert param_count(out) == plan.params_after < plan.params_before


@pytest.mark.parametrize("family", RMS_FAMILIES)
def test_removing_zeroed_residual_channels_rescales_rms_norms(family):
    """Dropping k zero channels of n changes each RMS statistic from sqrt(S/n) to sqrt(S/(n-k)).
    ``prune`` rescales the RMS weights by sqrt(n/(n-k)) so the result *is* the zeroed model; without
    it (``rescale_norms=False``) it is exactly the zeroed model with every RMSNorm weight multiplied by
    sqrt((n-k)/n) (eps set negligible so both identities are exact)."""
    m = tiny_model(family, rms_norm_eps=1e-12)
    _, a = analyse(m)
    res = next(g for g in a.groups if g.kind == "residual")
    removed = {res.name: [3, 17, 40, 41]}
    zero_atoms_(m, a, removed)
    x = ids(2, 8)
    out = sf.prune(m, plan_from_removed(a, removed))
    torch.testing.assert_close(logits(out, x), logits(m, x), atol=1e-5, rtol=1e-5)
    raw = sf.prune(m, plan_from_removed(a, removed), rescale_norms=False)
    n, k = 64, 4
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1 and "norm" in name:  # test-side oracle only
                p.mul_(math.sqrt((n - k) / n))
    torch.testing.assert_close(logits(raw, x), logits(m, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["opt", "gpt2", "phi"])
def test_removing_zeroed_residual_channels_layernorm_is_close(family):
    """LayerNorm's mean and variance are taken over fewer channels: close, not exact."""
    m = tiny_model(family)
    _, a = analyse(m)
    res = next(g for g in a.groups if g.kind == "residual")
    assert any("layer_norm" in r for r in res.approximations)
    removed = {res.name: [5, 6]}
    zero_atoms_(m, a, removed)
    out = sf.prune(m, plan_from_removed(a, removed))
    x = ids(2, 8)
    ref, got = logits(m, x), logits(out, x)
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert 0 < rel < 0.1


@pytest.mark.parametrize("family", FAMILIES)
def test_compress_magnitude_30_percent(family):
    m = tiny_model(family)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    params_before = [p for p in m.parameters()]
    out = sf.compress(m, 0.3, method="magnitude")
    plan = out.surgeon_fx_plan
    _, a = analyse(m)
    biggest = max(g.atom_numel for g in a.groups)
    n0, n1 = param_count(m), param_count(out)
    assert n1 == plan.params_after
    assert 0.3 * n0 <= n0 - n1 <= 0.3 * n0 + biggest
    assert type(out) is type(m)
    # other batch and sequence sizes than traced
    for b, s in [(1, 3), (4, 23)]:
        assert logits(out, ids(b, s)).shape == (b, s, VOCAB)
    gen = out.generate(ids(1, 4), max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert gen.shape == (1, 10)
    # the caller's model is untouched
    assert [p for p in m.parameters()] == params_before
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_compress_inplace_equals_copy():
    """inplace=True compresses the caller's model itself (the result is that object) to exactly the
    weights the copying call gives, surgeon shots included; a non-bool is refused."""
    calib = ids(2, 8, seed=3)
    copied = sf.compress(tiny_model("llama"), 0.3, calibration=calib, shots=2, progress=False)
    m = tiny_model("llama")
    out = sf.compress(m, 0.3, calibration=calib, shots=2, progress=False, inplace=True)
    assert out is m and out.surgeon_fx_plan.params_after == copied.surgeon_fx_plan.params_after
    want = copied.state_dict()
    assert set(want) == set(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(v, want[k]), k
    with pytest.raises(TypeError, match="inplace"):
        sf.compress(tiny_model("llama"), 0.3, inplace="yes")


@pytest.mark.parametrize("family", FAMILIES)
def test_compress_residual_width(family):
    """Removing residual channels reaches the embeddings, every block, the norms and the LM head."""
    m = tiny_model(family)
    out = sf.compress(m, 0.15, kinds=("residual",))
    plan = out.surgeon_fx_plan
    assert plan.ratio >= 0.15 and param_count(out) == plan.params_after
    emb = out.get_input_embeddings().weight
    assert emb.shape[1] < 64 and out.get_output_embeddings().weight.shape[1] == emb.shape[1]
    assert logits(out, ids(2, 5)).shape == (2, 5, VOCAB)
    assert out.generate(ids(1, 3), max_new_tokens=3, do_sample=False, min_new_tokens=3).shape == (1, 6)


def test_plan_round_trips_through_json():
    m = tiny_model("llama")
    out = sf.compress(m, 0.25)
    plan = out.surgeon_fx_plan
    again = sf.Plan.from_json(plan.to_json())
    assert again == plan
    x = ids(2, 6)
    torch.testing.assert_close(logits(sf.prune(m, again), x), logits(out, x), atol=0, rtol=0)


def test_same_seed_same_result():
    m = tiny_model("qwen2")
    a, b = sf.compress(m, 0.3), sf.compress(m, 0.3)
    assert a.surgeon_fx_plan == b.surgeon_fx_plan
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_compress_updates_module_attributes_generically():
    """OPT's attention reads self.num_heads in its view(): the rewrite must update it."""
    m = tiny_model("opt")
    _, a = analyse(m)
    heads = next(g for g in a.groups if g.kind == "heads")
    out = sf.prune(m, plan_from_removed(a, {heads.name: [0, 2]}))
    attn = out.get_submodule(heads.module)
    assert attn.num_heads == 2 and attn.q_proj.out_features == 32


def test_plain_module_compresses():
    torch.manual_seed(0)
    m = FusedGQA()
    out = sf.compress(m, 0.3)
    x = torch.randint(0, 32, (2, 5))
    assert out(x).shape == (2, 5, 32)
    assert param_count(out) == out.surgeon_fx_plan.params_after


def test_arithmetic_sizes_need_graph_output():
    """A forward computing slice bounds as hq * hd cannot be followed eagerly: clear error, graph works."""
    torch.manual_seed(0)
    m = FusedGQA(sizes_from_layers=False)
    _, a = analyse(m)
    heads = next(g for g in a.groups if g.kind == "heads")
    plan = plan_from_removed(a, {heads.name: [0]})
    with pytest.raises(sf.SurgeonError, match="output='graph'"):
        sf.prune(m, plan)
    gm = sf.prune(m, plan, output="graph")
    x = torch.randint(0, 32, (2, 5))
    assert gm(x).shape == (2, 5, 32) and param_count(gm) == plan.params_after


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "0.3", True])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        sf.compress(tiny_model("llama"), ratio)


def test_bad_options_and_models():
    m = tiny_model("llama")
    with pytest.raises(ValueError, match="method"):
        sf.compress(m, 0.2, method="nope")
    with pytest.raises(ValueError, match="kinds"):
        sf.compress(m, 0.2, kinds=("heads", "layers"))
    with pytest.raises(TypeError, match="nn.Module"):
        sf.compress("llama", 0.2)
    bad = tiny_model("llama")
    with torch.no_grad():
        bad.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="up_proj.weight.*NaN"):
        sf.compress(bad, 0.2)
    with pytest.raises(TypeError, match="floating-point"):
        sf.compress(_int_model(), 0.2)


def _int_model():
    m = torch.nn.Module()
    m.w = torch.nn.Parameter(torch.ones(3, dtype=torch.int32), requires_grad=False)
    return m


class _Untraceable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)

    def forward(self, ids):
        h = self.emb(ids)
        if h.sum() > 0:  # data-dependent control flow
            return h
        return -h


def test_untraceable_model_is_a_clear_error():
    with pytest.raises(sf.UnsupportedGraphError, match="torch.export could not trace"):
        sf.compress(_Untraceable(), 0.2)


def test_plan_that_splits_a_coupled_structure_is_rejected():
    m = tiny_model("llama")
    gm, a = analyse(m)
    plan = plan_from_removed(a, {next(g.name for g in a.groups if g.kind == "mlp"): [4]})
    p = next(iter(plan.keep))
    keep = dict(plan.keep)
    keep[p] = {ax: tuple(range(96)) for ax in keep[p]}  # keep the unit in one of its members only
    broken = sf.Plan(keep=keep, removed=plan.removed, params_before=1, params_after=1, linear_before=1, linear_after=1)
    with pytest.raises(ValueError, match="coupled"):
        apply_plan(gm, broken)
    with pytest.raises(ValueError, match="may not be removed"):
        apply_plan(
            gm,
            sf.Plan(
                keep={"model.embed_tokens.weight": {0: tuple(range(100))}},
                removed={},
                params_before=1,
                params_after=1,
                linear_before=1,
                linear_after=1,
            ),
        )


def test_rescaled_rms_norms_make_residual_removal_equal_zeroing():
    """With ``rescale_norms_`` the RMS normalisations divide by the same statistic as before, so
    removing residual channels equals zeroing them in the unpruned model (up to epsilon), and
    every RMS scale parameter of the stream is touched once by sqrt(n / (n - k))."""
    from surgeon_fx.passes import annotate_groups, apply_plan, get_groups, plan_from_removed
    from surgeon_fx.passes.norms import rescale_norms_

    model = tiny_model("llama", rms_norm_eps=1e-12).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    gm = sf.trace(copy.deepcopy(model))
    annotate_groups(gm)
    res = next(g for g in get_groups(gm).groups if g.kind == "residual")
    drop = [3, 10, 17, 40, 41]
    plan = plan_from_removed(get_groups(gm), {res.name: drop})
    changed = rescale_norms_(gm, plan)
    assert len(changed) == 2 * 2 + 1  # two norms per layer and the final norm
    assert all(abs(f - (64 / 59) ** 0.5) < 1e-12 for _, f in changed)
    small = apply_plan(gm, plan)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for m in res.members:
            p = zeroed.get_parameter(m.param)
            if "norm" not in m.param:
                p.index_fill_(m.axis, torch.tensor(drop), 0.0)
    want = zeroed(input_ids=ids).logits
    assert torch.allclose(small(ids), want, atol=1e-5, rtol=1e-4)
