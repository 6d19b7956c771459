"""Curvature pass and OBS updates on graphs: factors against brute force, the update's guarantees."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from families import ids, logits, tiny_model
from surgeon_fx.passes import annotate_groups, get_groups, plan_from_removed
from surgeon_fx.passes.curvature import annotate_curvature, get_curvature
from surgeon_fx.passes.obs import annotate_costs, apply_obs_updates_

import surgeon_fx as sf
from surgeon_fx import kfac


def _brute_factors(model, module, windows):
    """Sum of a a^T over inputs and g g^T over output gradients of one eager module, per token."""
    acts, grads = [], []
    h1 = module.register_forward_hook(lambda m, i, o: acts.append(i[0].detach().reshape(-1, i[0].shape[-1])))
    h2 = module.register_full_backward_hook(lambda m, gi, go: grads.append(go[0].detach().reshape(-1, go[0].shape[-1])))
    for p in model.parameters():
        p.requires_grad_(True)
    for w in windows:
        x = w[None]
        out = model(input_ids=x, use_cache=False).logits
        F.cross_entropy(out[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum").backward()
    h1.remove()
    h2.remove()
    a = torch.cat(acts).double()
    g = torch.cat(grads).double()
    n = a.shape[0]
    return a.T @ a / n, g.T @ g / n


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_factors_match_brute_force(family):
    m = tiny_model(family)
    windows = ids(3, 12, seed=4)
    gm = sf.trace(m)
    annotate_groups(gm)
    annotate_curvature(gm, windows, progress=False)
    curv = get_curvature(gm)
    if family == "llama":
        fqn, module = "model.layers.0.mlp.down_proj.weight", m.model.layers[0].mlp.down_proj
    else:
        fqn, module = "transformer.h.1.mlp.c_fc.weight", m.transformer.h[1].mlp.c_fc
    lay = next(lay for lay in curv.layers.values() if lay.weight == fqn)
    a_ref, g_ref = _brute_factors(m, module, windows)
    a = curv.factor_a(lay).double()
    if lay.bias is not None:
        a = a[:-1, :-1]  # the bias column is an extra input of activation 1
    torch.testing.assert_close(a, a_ref, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(lay.g.double(), g_ref, rtol=1e-4, atol=1e-9)
    assert curv.tokens == 36


def test_mixed_precision_rewrites_attention_to_bf16_and_keeps_factors_close(monkeypatch):
    """precision="mixed" swaps every attention op of the sweep's graph copy for a bfloat16 one
    (counted through a spy), leaves the model's own graph alone, and the factors stay within
    bfloat16 rounding of the float32 sweep."""
    from surgeon_fx.passes import curvature as cv

    m = tiny_model("llama")
    windows = ids(2, 16, seed=3)
    gm = sf.trace(m)
    annotate_groups(gm)
    code = gm.code
    annotate_curvature(gm, windows, progress=False)
    ref = get_curvature(gm)
    ref_a = {k: v.clone() for k, v in ref.a.items()}
    ref_g = {k: lay.g.clone() for k, lay in ref.layers.items()}
    calls = []
    real = cv._sdpa_bf16

    def spy(q, *args, **kwargs):
        calls.append(q.dtype)
        out = real(q, *args, **kwargs)
        assert out.dtype == q.dtype
        return out

    monkeypatch.setattr(cv, "_sdpa_bf16", spy)
    annotate_curvature(gm, windows, progress=False, precision="mixed")
    n_attn = sum(n.target is torch.ops.aten.scaled_dot_product_attention.default for n in gm.graph.nodes)
    assert n_attn == m.config.num_hidden_layers
    assert calls == [torch.float32] * (len(windows) * n_attn)  # one batch per window
    assert gm.code == code
    curv = get_curvature(gm)
    for k, a in ref_a.items():
        torch.testing.assert_close(curv.a[k], a, rtol=0.05, atol=0.05 * float(a.abs().max()))
    for k, g in ref_g.items():
        torch.testing.assert_close(curv.layers[k].g, g, rtol=0.05, atol=0.05 * float(g.abs().max()))
    with pytest.raises(ValueError, match="precision"):
        annotate_curvature(gm, windows, progress=False, precision="bf16")


def test_analysis_only_passes_leave_code_and_weights_unchanged():
    m = tiny_model("qwen2")
    gm = sf.trace(m)
    annotate_groups(gm)
    code = gm.code
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    annotate_curvature(gm, ids(2, 10), progress=False)
    annotate_costs(gm)
    assert gm.code == code
    assert all(torch.equal(v, before[k]) for k, v in gm.state_dict().items())


@pytest.mark.parametrize("sides", ["all", "consumers"])
def test_costs_are_sums_of_member_obs_costs(sides):
    """An MLP unit's cost is gate-row + up-row + down-column OBS costs (``sides="all"``), or the
    down-column cost alone (``"consumers"``: the unit's output is what the loss sees), divided by
    its parameter count."""
    m = tiny_model("llama")
    gm = sf.trace(m)
    annotate_groups(gm)
    annotate_curvature(gm, ids(4, 16), progress=False)
    annotate_costs(gm, damping=0.01, update="both", sides=sides)
    a, curv = get_groups(gm), get_curvature(gm)
    g = a.group("model.layers.1.mlp/mlp")
    j = 7
    total = 0.0
    for lay in curv.layers.values():
        w = gm.get_parameter(a.param_targets[lay.weight]).detach().double()
        producer = lay.weight.endswith(("gate_proj.weight", "up_proj.weight")) and ".1." in lay.weight
        if producer and sides == "all":
            total += float(kfac.row_costs(w, curv.factor_a(lay), kfac.damped_inverse(lay.g, 0.01), [[j]])[0])
        if lay.weight.endswith("down_proj.weight") and ".1." in lay.weight:
            total += float(kfac.col_costs(w, lay.g, kfac.damped_inverse(curv.factor_a(lay), 0.01), [[j]])[0])
    assert gm.meta[sf.SCORES].values[g.name][j] == pytest.approx(total / g.atom_numel, rel=1e-6)


def test_obs_update_zeroes_removed_slices_and_keeps_shapes():
    m = tiny_model("llama")
    gm = sf.trace(m)
    annotate_groups(gm)
    annotate_curvature(gm, ids(4, 16), progress=False)
    a = get_groups(gm)
    plan = plan_from_removed(a, {"model.layers.0.mlp/mlp": [3, 9], "model.layers.1.self_attn/heads": [0]})
    shapes = {k: v.shape for k, v in gm.state_dict().items()}
    n = apply_obs_updates_(gm, plan)
    assert n == 7  # gate, up, down of layer 0; q, k, v, o of layer 1
    assert {k: v.shape for k, v in gm.state_dict().items()} == shapes
    down = m.model.layers[0].mlp.down_proj.weight
    up = m.model.layers[0].mlp.up_proj.weight
    assert down[:, [3, 9]].abs().max() < 1e-6 and up[[3, 9]].abs().max() < 1e-6
    assert m.model.layers[1].self_attn.o_proj.weight[:, :32].abs().max() < 1e-6
    assert down[:, [0, 1]].abs().max() > 1e-3  # the others carry the compensation


def test_surgeon_compress_runs_multi_shot_and_resumes(tmp_path):
    """Two shots with checkpoints; a resumed run from the checkpoint gives the same model."""
    m = tiny_model("llama")
    calib = ids(4, 16, seed=5)
    ck = tmp_path / "ck"
    out = sf.compress(m, 0.3, calibration=calib, shots=2, checkpoint_dir=str(ck), progress=False)
    assert out.surgeon_fx_plan.method == "surgeon" and (ck / "state.json").exists()
    (ck / "state.json").write_text("{}")  # the weights' metadata is the commit point, not this copy
    again = sf.compress(m, 0.3, calibration=calib, shots=2, checkpoint_dir=str(ck), progress=False)
    x = ids(2, 9)
    torch.testing.assert_close(logits(again, x), logits(out, x))
    assert sum(p.numel() for p in out.parameters()) == out.surgeon_fx_plan.params_after
    with pytest.raises(ValueError, match=r"another run \(it differs in \['damping', 'ratio'\]"):
        sf.compress(m, 0.4, calibration=calib, shots=2, damping=0.1, checkpoint_dir=str(ck), progress=False)


def test_adapted_distilled_run_resumes_to_the_same_model(tmp_path):
    """With adapt_steps the teacher is the adapted model: a run stopped after shot 1 and resumed from its
    checkpoint (the adaptation run again for the teacher) ends where an uninterrupted run does; a
    checkpoint of another adaptation is refused."""
    m = tiny_model("llama")
    calib = ids(4, 16, seed=5)
    ck = tmp_path / "ck"
    kw = dict(calibration=calib, shots=2, lora_steps=1, lora_loss="distill", progress=False)
    kw |= dict(adapt_steps=2, adapt_rank=2, adapt_lr=1e-2, lora_lr=1e-2)
    whole = sf.compress(m, 0.3, **kw)

    def stop(shot, model, plan):
        if shot == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sf.compress(m, 0.3, checkpoint_dir=str(ck), on_shot=stop, **kw)
    again = sf.compress(m, 0.3, checkpoint_dir=str(ck), **kw)
    x = ids(2, 9)
    torch.testing.assert_close(logits(again, x), logits(whole, x))
    plain = sf.compress(m, 0.3, **(kw | dict(adapt_steps=0)))
    assert not torch.allclose(logits(plain, x), logits(whole, x))  # the adaptation made a difference
    with pytest.raises(ValueError, match=r"differs in \['adapt_steps'\]"):
        sf.compress(m, 0.3, checkpoint_dir=str(ck), **(kw | dict(adapt_steps=3)))


def test_checkpoints_without_later_options_resume_as_their_defaults(tmp_path):
    """A checkpoint written before an option existed (its key missing) matches a run that keeps the
    option at the value that reproduces the old behaviour, and is refused otherwise."""
    from surgeon_fx.shots import ADDED_LATER, refuse_other_run

    assert ADDED_LATER == {
        "lora_holdout": 0,
        "lora_norms": False,
        "lora_schedule": "constant",
        "lora_next_token_weight": 0.5,
        "lora_next_token_weight_end": None,
        "lora_lr_end": None,
        "adapt_steps": 0,
        "adapt_lr": 3e-4,
        "adapt_rank": 32,
        "lora_synthetic": 0,
        "lora_synthetic_batch_size": None,
    }
    old = {"ratio": 0.3, "lora_steps": 4}  # saved before lora_holdout / lora_norms / lora_schedule were recorded
    later = dict(ADDED_LATER)
    refuse_other_run("checkpoint", tmp_path, old, {**old, **later})
    with pytest.raises(ValueError, match=r"differs in \['lora_norms'\].*'lora_norms': False.*'lora_norms': True"):
        refuse_other_run("checkpoint", tmp_path, old, {**old, **later, "lora_norms": True})
    with pytest.raises(ValueError, match=r"differs in \['lora_schedule'\]"):
        refuse_other_run("checkpoint", tmp_path, old, {**old, **later, "lora_schedule": "cosine"})
    with pytest.raises(ValueError, match=r"differs in \['damping'\]"):  # other options still must be there
        refuse_other_run("checkpoint", tmp_path, old, {**old, "damping": 0.01})


def test_options_that_change_nothing_may_differ_on_resume(tmp_path):
    """The correction's options without correction steps, and the adaptation's without adaptation
    steps, do not make a checkpoint another run's; once their steps are on they must match."""
    from surgeon_fx.shots import refuse_other_run

    base = {"ratio": 0.3, "lora_steps": 0, "lora_lr": 3e-4, "lora_rank": 32, "lora_batch_size": 8}
    base |= {"adapt_steps": 0, "adapt_lr": 3e-4, "adapt_rank": 32}
    refuse_other_run("checkpoint", tmp_path, base, {**base, "lora_lr": 1e-3, "lora_rank": "full"})
    refuse_other_run("checkpoint", tmp_path, base, {**base, "adapt_lr": 1e-3, "adapt_rank": "full"})
    with pytest.raises(ValueError, match=r"differs in \['lora_lr'\]"):
        on = {**base, "lora_steps": 4}
        refuse_other_run("checkpoint", tmp_path, on, {**on, "lora_lr": 1e-3})
    with pytest.raises(ValueError, match=r"differs in \['adapt_rank'\]"):
        on = {**base, "adapt_steps": 2}
        refuse_other_run("checkpoint", tmp_path, on, {**on, "adapt_rank": "full"})
    with pytest.raises(ValueError, match=r"differs in \['lora_batch_size'\]"):  # the adaptation's batch
        on = {**base, "adapt_steps": 2}
        refuse_other_run("checkpoint", tmp_path, on, {**on, "lora_batch_size": 4})
    with pytest.raises(ValueError, match=r"differs in \['adapt_lr', 'adapt_steps'\]"):
        refuse_other_run("checkpoint", tmp_path, base, {**base, "adapt_steps": 2, "adapt_lr": 1e-3})


def test_calibration_errors_are_clear():
    m = tiny_model("llama")
    with pytest.raises(ValueError, match="needs calibration"):
        sf.compress(m, 0.2, method="surgeon")
    with pytest.raises(ValueError, match="empty or too short"):
        sf.compress(m, 0.2, calibration=torch.zeros(0, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="empty or too short"):
        sf.compress(m, 0.2, calibration=torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        sf.compress(m, 0.2, calibration=torch.full((2, 8), 10_000, dtype=torch.long))
    with pytest.raises(ValueError, match="2-D int64"):
        sf.compress(m, 0.2, calibration=torch.zeros(2, 8))


def _smallest_budget(gm) -> tuple[int, list]:
    """The least max_memory (bytes) ``curvature_blocks`` accepts for ``gm``, and its blocks."""
    from surgeon_fx.shots import curvature_blocks

    lo, hi = 1, 1 << 34
    assert len(curvature_blocks(gm, hi)[0]) == 1
    while hi - lo > 1:  # bisection on feasibility
        mid = (lo + hi) // 2
        try:
            curvature_blocks(gm, mid)
            hi = mid
        except ValueError:
            lo = mid
    return hi, curvature_blocks(gm, hi)[0]


@pytest.mark.parametrize("method", ["surgeon", "kobd"])
def test_max_memory_blocks_give_the_same_plan_and_weights(method):
    """Curvature swept block by block under max_memory (several sweeps, G freed per block, no
    inverse cache) equals the one-sweep run: K-FAC is block-diagonal across layers."""
    from surgeon_fx.shots import curvature_blocks

    m = tiny_model("llama")
    gm = sf.trace(m)
    annotate_groups(gm)
    budget, blocks = _smallest_budget(gm)
    assert len(blocks) >= 3
    assert [n for b in blocks for n in b] == list(curvature_blocks(gm, None)[0][0])  # contiguous, all layers
    calib = ids(3, 16, seed=6)
    kw = dict(calibration=calib, method=method, shots=2, progress=False)
    ref = sf.compress(m, 0.3, **kw)
    got = sf.compress(m, 0.3, max_memory=budget, **kw)
    assert got.surgeon_fx_plan.keep == ref.surgeon_fx_plan.keep
    for (n, p), q in zip(ref.named_parameters(), got.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=n)
    with pytest.raises(ValueError, match="max_memory"):
        sf.compress(m, 0.3, max_memory=1000, **kw)
    with pytest.raises(ValueError, match="max_memory"):
        sf.compress(m, 0.3, max_memory="12 parsecs", **kw)


def test_inverse_cache_respects_its_bound():
    """With cache_bytes=0 no inverse is kept, yet costs equal the cached computation."""
    m = tiny_model("llama")
    gm = sf.trace(m)
    annotate_groups(gm)
    annotate_curvature(gm, ids(2, 12, seed=1), progress=False)
    annotate_costs(gm, update="columns")
    ref = gm.meta["surgeon_fx.scores"].values
    curv = get_curvature(gm)
    assert curv.inverses  # unbounded: cached
    curv.inverses.clear()
    curv.cache_bytes = 0
    annotate_costs(gm, update="columns")
    assert not curv.inverses
    assert gm.meta["surgeon_fx.scores"].values == ref
