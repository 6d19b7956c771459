"""The low-rank first-order correction: LoRA math against an eager oracle, its place in the shots, bad input."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from families import ids, tiny_model
from surgeon_fx.passes import annotate_groups
from surgeon_fx.passes.lora import apply_low_rank_correction_
from surgeon_fx.passes.sparsity import sparse_layers

import surgeon_fx as sf

CALIB = ids(6, 12, seed=3)


def _eager_lora(
    model, names, *, steps, rank, lr, batch_size, seed, keep_zeros=False, teacher=None, norms=False, cosine=False
):
    """Oracle: LoRA on the eager model through forward hooks ``y + B (A x)``, Adam, then merged; with
    ``keep_zeros`` the hook adds ``(M * (B A)) x`` with ``M`` the non-zero entries of the weight; with
    a ``teacher`` the loss is sum_v p_t (log p_t - log p) averaged over every position; with ``norms``
    the same Adam also trains every 1-D parameter itself (under ``keep_zeros`` with the gradients of
    its zero entries masked); with ``cosine`` step ``t``'s rate is ``lr (1 + cos(pi t / steps)) / 2``."""
    gen = torch.Generator().manual_seed(seed)
    mods = {n: model.get_submodule(n.rsplit(".", 1)[0]) for n in names}
    ab = {}
    for n, m in mods.items():
        rows, cols = m.weight.shape
        a = ((torch.rand(rank, cols, generator=gen) * 2 - 1) / math.sqrt(cols)).requires_grad_(True)
        ab[n] = (a, torch.zeros(rows, rank, requires_grad=True))
    keep = {n: (m.weight != 0).float() for n, m in mods.items()}

    def hook(m, i, o, n):
        if keep_zeros:
            return o + F.linear(i[0], (ab[n][1] @ ab[n][0]) * keep[n])
        return o + F.linear(F.linear(i[0], ab[n][0]), ab[n][1])

    hooks = [m.register_forward_hook(lambda m, i, o, n=n: hook(m, i, o, n)) for n, m in mods.items()]
    for p in model.parameters():
        p.requires_grad_(False)
    vectors = [p.requires_grad_(True) for _, p in sorted(model.named_parameters()) if norms and p.ndim == 1]
    zero = [p.detach() == 0 for p in vectors]
    opt = torch.optim.Adam([t for pair in ab.values() for t in pair] + vectors, lr=lr)
    order: list[int] = []
    for t in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * (1 + math.cos(math.pi * t / steps)) / 2 if cosine else lr
        if len(order) < batch_size:
            order += torch.randperm(len(CALIB), generator=gen).tolist()
        pick, order = order[:batch_size], order[batch_size:]
        x = CALIB[pick]
        logits = model(input_ids=x, use_cache=False).logits
        if teacher is None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        else:
            with torch.no_grad():
                p_t = teacher(input_ids=x, use_cache=False).logits.softmax(-1)
            loss = (p_t * (p_t.log() - logits.log_softmax(-1))).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        if keep_zeros:
            for v, z in zip(vectors, zero):
                v.grad.masked_fill_(z, 0)
        opt.step()
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for n, m in mods.items():
            m.weight.add_((ab[n][1] @ ab[n][0]) * (keep[n] if keep_zeros else 1))
    return model


def test_correction_is_lora_trained_and_merged():
    """On the traced graph (functional_call with W + B A) it equals LoRA trained on the eager model with
    hooks and merged; it lowers the calibration loss; only the decoder linear weights change."""
    model = tiny_model("llama")
    gm = sf.trace(model)
    annotate_groups(gm)
    targets = gm.meta["surgeon_fx.groups"].param_targets
    fqns = sorted({lay.weight for lay in sparse_layers(gm)})
    assert sorted(targets[f] for f in fqns) == [targets[f] for f in fqns]  # same draw order as the pass
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(steps=6, rank=3, lr=3e-3, batch_size=2, seed=5)
    losses = apply_low_rank_correction_(gm, CALIB, progress=False, **kw).losses
    assert len(losses) == 6
    ref = _eager_lora(tiny_model("llama"), fqns, **kw)
    after = model.state_dict()
    for k, v in before.items():
        if k in fqns:
            torch.testing.assert_close(after[k], ref.state_dict()[k], rtol=1e-4, atol=1e-5)
            assert not torch.equal(after[k], v)
        else:
            assert torch.equal(after[k], v), k

    def loss(m):
        with torch.no_grad():
            lg = m(input_ids=CALIB, use_cache=False).logits
        return F.cross_entropy(lg[:, :-1].flatten(0, 1), CALIB[:, 1:].flatten()).item()

    assert loss(model) < loss(tiny_model("llama"))


def test_distilled_correction_matches_the_eager_oracle_and_starts_at_zero_loss():
    """With a teacher the pass trains on KL(p_teacher || p): equal to hook-LoRA trained on that loss
    on the eager model; against the model itself the first loss is 0 (it predicts as the teacher)."""
    teacher = tiny_model("llama", seed=11).eval()  # another random model: a non-trivial target
    model = tiny_model("llama")
    gm = sf.trace(model)
    annotate_groups(gm)
    fqns = sorted({lay.weight for lay in sparse_layers(gm)})
    kw = dict(steps=4, rank=3, lr=3e-3, batch_size=2, seed=5)
    losses = apply_low_rank_correction_(gm, CALIB, teacher=teacher, progress=False, **kw).losses
    ref = _eager_lora(tiny_model("llama"), fqns, teacher=teacher, **kw)
    for k in fqns:
        torch.testing.assert_close(model.state_dict()[k], ref.state_dict()[k], rtol=1e-4, atol=1e-5)
    assert losses[-1] < losses[0]
    gm = sf.trace(tiny_model("llama"))
    annotate_groups(gm)
    first = apply_low_rank_correction_(gm, CALIB, steps=1, teacher=tiny_model("llama").eval(), progress=False)
    assert abs(first.losses[0]) < 1e-5
    with pytest.raises(TypeError, match="teacher"):
        apply_low_rank_correction_(gm, CALIB, steps=1, teacher=lambda x: x)


def test_mixed_precision_correction_runs_attention_in_bf16_on_a_copy():
    """precision="mixed" trains through a copy of the graph whose attention is bfloat16: its losses
    are those of the float32 run to bf16 accuracy but not bit-equal (the bf16 path ran), and the
    caller's graph keeps its float32 attention."""
    runs = {}
    for precision in ("fp32", "mixed"):
        gm = sf.trace(tiny_model("llama"))
        annotate_groups(gm)
        targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        kw = dict(steps=3, rank=3, lr=3e-3, batch_size=2, seed=5, progress=False)
        runs[precision] = apply_low_rank_correction_(gm, CALIB, precision=precision, **kw).losses
        assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == targets
    fp32, mixed = torch.tensor(runs["fp32"]), torch.tensor(runs["mixed"])
    torch.testing.assert_close(mixed, fp32, rtol=2e-2, atol=0)
    assert not torch.equal(mixed, fp32)
    with pytest.raises(ValueError, match="precision"):
        apply_low_rank_correction_(gm, CALIB, steps=1, precision="bf16")


def test_compress_runs_the_correction_after_each_structured_shot(caplog):
    """compress(lora_steps=k) is the plain shot followed by the pass (seed + shot number), with its
    training loss in the log; the caller's model is untouched and the result is reproducible."""
    model = tiny_model("llama")
    orig = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(calibration=CALIB, method="surgeon", shots=1, progress=False)
    with caplog.at_level("INFO", logger="surgeon_fx"):
        got = sf.compress(model, 0.2, lora_steps=3, lora_lr=1e-3, seed=2, **kw)
    assert "shot 1 correction: 3 steps, training loss" in caplog.text
    again = sf.compress(model, 0.2, lora_steps=3, lora_lr=1e-3, seed=2, **kw)
    plain = sf.compress(model, 0.2, seed=2, **kw)
    gm = sf.trace(plain)
    annotate_groups(gm)
    apply_low_rank_correction_(gm, CALIB, steps=3, rank=8, lr=1e-3, seed=3, progress=False)
    for k, v in got.state_dict().items():
        torch.testing.assert_close(v, plain.state_dict()[k], rtol=1e-5, atol=1e-6)
        assert torch.equal(v, again.state_dict()[k])
    for k, v in model.state_dict().items():
        assert torch.equal(v, orig[k])


def test_sparse_shots_get_the_masked_correction():
    """After sparsity shots the update is ``M * (B A)``: it equals masked LoRA on the eager model, every
    zero of the plain 2:4 result stays zero (the pattern holds), and the other weights move."""
    model = tiny_model("llama")
    kw = dict(calibration=CALIB, sparsity="2:4", method="magnitude", shots=1, progress=False)
    got = sf.compress(model, 0.0, lora_steps=3, seed=4, **kw)
    plain = sf.compress(model, 0.0, seed=4, **kw)
    params = got.surgeon_fx_sparsity.params
    assert sum(sf.check_nm(got, 2, 4, params=params).values()) == 0
    before = {p: plain.get_parameter(p).detach().clone() for p in params}
    ref = _eager_lora(plain, list(params), steps=3, rank=8, lr=3e-4, batch_size=1, seed=5, keep_zeros=True)
    for p in params:
        w = got.get_parameter(p)
        torch.testing.assert_close(w, ref.get_parameter(p), rtol=1e-4, atol=1e-5)
        assert torch.equal(w == 0, before[p] == 0), p
    assert all(not torch.equal(got.get_parameter(p), before[p]) for p in params)


@pytest.mark.parametrize("distill", [False, True])
def test_micro_batches_train_as_one_pass(distill):
    """Gradient accumulation: 4 windows per step in passes of 3 + 1 windows give the losses and the
    merged weights of 4 windows in one pass (next-token and distilled losses)."""
    teacher = tiny_model("llama", seed=11).eval() if distill else None
    results = []
    for micro in (None, 3):
        model = tiny_model("llama")
        gm = sf.trace(model)
        annotate_groups(gm)
        kw = dict(steps=3, rank=2, lr=3e-3, batch_size=4, micro_batch_size=micro, seed=2, teacher=teacher)
        losses = apply_low_rank_correction_(gm, CALIB, progress=False, **kw).losses
        results.append((losses, model.state_dict()))
    (one, w_one), (acc, w_acc) = results
    assert one == pytest.approx(acc, rel=1e-5)
    for k, v in w_one.items():
        torch.testing.assert_close(w_acc[k], v, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(v, tiny_model("llama").state_dict()[k]) for k, v in w_one.items())


def test_steps_larger_than_the_windows():
    """A step of more windows than there are (8 of 3) takes each window at least twice, in passes of
    micro-batches like any step: the losses equal a run on those windows repeated (an exact oracle,
    the step's mean over 8 windows of 3 distinct ones, up to the order)."""
    few = ids(3, 12, seed=4)
    model = tiny_model("llama")
    gm = sf.trace(model)
    annotate_groups(gm)
    kw = dict(steps=2, rank="full", lr=1e-4, seed=2, progress=False)  # full rank: the seed only orders windows
    losses = apply_low_rank_correction_(gm, few, batch_size=8, micro_batch_size=3, **kw).losses
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    gen = torch.Generator().manual_seed(2)
    order = []
    while len(order) < 8:
        order += torch.randperm(3, generator=gen).tolist()
    first = order[:8]
    want = sum(_mean_ce(tiny_model("llama"), few[i : i + 1]) for i in first) / 8  # step 1: before any update
    assert losses[0] == pytest.approx(want, rel=1e-5)


def _mean_ce(model, windows):
    with torch.no_grad():
        lg = model(input_ids=windows, use_cache=False).logits
    return F.cross_entropy(lg[:, :-1].flatten(0, 1), windows[:, 1:].flatten()).item()


@pytest.mark.parametrize("norms", [False, True])
def test_holdout_guard_merges_the_best_checked_update(norms):
    """holdout: early stopping. Checked after steps 2, 4 and 6, it merges the update of the check
    with the lowest held-out loss, which is the unguarded run of that many steps (Adam's first k
    steps do not depend on the total): the held-out losses are the eager model's mean
    cross-entropy before and after, and the weights equal that run's. An update that only raises
    the held-out loss (a far too high rate) leaves every weight as it was. With ``norms`` the 1-D
    parameters' update is saved, restored and merged (or not) with the weights'."""
    held = ids(3, 12, seed=9)
    kw = dict(rank=3, lr=3e-3, batch_size=2, seed=5, norms=norms, progress=False)
    runs = {}
    for k in (2, 4, 6):  # oracle: the unguarded runs of 2, 4 and 6 steps
        model = tiny_model("llama")
        gm = sf.trace(model)
        annotate_groups(gm)
        apply_low_rank_correction_(gm, CALIB, steps=k, **kw)
        runs[k] = (_mean_ce(model, held), model.state_dict())
    model = tiny_model("llama")
    before = _mean_ce(model, held)
    gm = sf.trace(model)
    annotate_groups(gm)
    done = apply_low_rank_correction_(gm, CALIB, steps=6, holdout=held, holdout_checks=3, micro_batch_size=1, **kw)
    best = min(runs, key=lambda k: runs[k][0])
    assert runs[best][0] < before and done.kept_step == best == (2 if norms else 4)  # an intermediate check wins
    assert done.holdout_before == pytest.approx(before, rel=1e-5)
    assert done.holdout_after == pytest.approx(runs[best][0], rel=1e-5)
    assert done.holdout_after == pytest.approx(_mean_ce(model, held), rel=1e-5)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, runs[best][1][k], rtol=1e-5, atol=1e-7)
    assert len(done.losses) == 6
    if norms:  # the merged update moved the norms too
        fresh = tiny_model("llama")
        assert all(not torch.equal(model.get_parameter(n), fresh.get_parameter(n)) for n in _vectors(model))

    model = tiny_model("llama")
    orig = {k: v.clone() for k, v in model.state_dict().items()}
    gm = sf.trace(model)
    annotate_groups(gm)
    done = apply_low_rank_correction_(gm, CALIB, steps=4, holdout=held, **(kw | dict(lr=5.0 if norms else 0.5)))
    assert not done.kept and done.kept_step == 0 and done.holdout_after == done.holdout_before
    assert all(torch.equal(v, orig[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="holdout_checks"):
        apply_low_rank_correction_(gm, CALIB, steps=1, holdout=held, holdout_checks=0)


def test_compress_holds_out_the_last_windows(monkeypatch, caplog):
    """lora_holdout=k: each shot's correction trains on all but the last k calibration windows and is
    guarded by those k; the log line shows the held-out loss; k >= the number of windows is refused."""
    import surgeon_fx.passes.lora as lora

    calls = []
    real = lora.apply_low_rank_correction_

    def spy(gm, windows, **kw):
        calls.append((windows, kw["holdout"]))
        return real(gm, windows, **kw)

    monkeypatch.setattr(lora, "apply_low_rank_correction_", spy)
    kw = dict(calibration=CALIB, method="surgeon", shots=2, lora_steps=2, progress=False)
    with caplog.at_level("INFO", logger="surgeon_fx"):
        sf.compress(tiny_model("llama"), 0.2, lora_holdout=2, **kw)
    assert len(calls) == 2
    for train, held in calls:
        assert torch.equal(train, CALIB[:-2]) and torch.equal(held, CALIB[-2:])
    assert caplog.text.count("held-out loss") == 2
    with pytest.raises(ValueError, match="lora_holdout"):
        sf.compress(tiny_model("llama"), 0.2, lora_holdout=len(CALIB), **kw)


def test_full_rank_correction_is_masked_fine_tuning():
    """rank="full" with keep_zeros equals Adam on the eager model's decoder weights themselves with
    the gradients of the zero entries masked: the zeros stay exactly zero, the rest move."""
    model = tiny_model("llama")
    gm = sf.trace(model)
    annotate_groups(gm)
    fqns = sorted({lay.weight for lay in sparse_layers(gm)})
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for f in fqns:  # half of every decoder weight zeroed at random, as after unstructured shots
            model.get_parameter(f).mul_(torch.rand(model.get_parameter(f).shape, generator=gen) < 0.5)
    ref = tiny_model("llama")
    ref.load_state_dict(model.state_dict())
    zeros = {f: model.get_parameter(f).detach() == 0 for f in fqns}
    losses = apply_low_rank_correction_(
        gm, CALIB, steps=4, rank="full", lr=1e-3, batch_size=2, seed=5, keep_zeros=True, progress=False
    )
    assert len(losses.losses) == 4 and losses.kept

    # oracle: the same window order (the pass draws no adapter initialisation for "full")
    gen = torch.Generator().manual_seed(5)
    for p in ref.parameters():
        p.requires_grad_(False)
    weights = [ref.get_parameter(f).requires_grad_(True) for f in fqns]
    opt = torch.optim.Adam(weights, lr=1e-3)
    order: list[int] = []
    for _ in range(4):
        if len(order) < 2:
            order += torch.randperm(len(CALIB), generator=gen).tolist()
        pick, order = order[:2], order[2:]
        x = CALIB[pick]
        logits = ref(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        for f, w in zip(fqns, weights):
            w.grad.mul_(~zeros[f])
        opt.step()
    for f in fqns:
        w = model.get_parameter(f)
        torch.testing.assert_close(w, ref.get_parameter(f), rtol=1e-4, atol=1e-5)
        assert torch.equal(w == 0, zeros[f]), f
    assert all(not torch.equal(model.get_parameter(f), tiny_model("llama").get_parameter(f)) for f in fqns)


def _vectors(model) -> list[str]:
    """The 1-D parameters of ``model`` (norm scales, biases): what ``norms=True`` trains."""
    return sorted(n for n, p in model.named_parameters() if p.ndim == 1 and p.is_floating_point())


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_norms_train_the_1d_parameters_in_full(family):
    """norms=True: the 1-D parameters (RMSNorm scales; with OPT also LayerNorm scales and biases and
    the linear layers' biases) are trained whole by the adapters' Adam: the result equals the eager
    oracle that trains them directly, every one of them moves and the training loss stays finite.
    norms=False leaves every one of them bitwise as it was; the embeddings never change. OPT's key
    biases are left out of the comparison: their gradient is zero in exact arithmetic (the softmax
    ignores a shift shared by a row's scores), so Adam's steps on them follow rounding noise."""
    orig = tiny_model(family).state_dict()
    vectors = _vectors(tiny_model(family))
    noise = [k for k in vectors if k.endswith("k_proj.bias")]
    assert vectors and len(noise) == (2 if family == "opt" else 0)
    kw = dict(steps=4, rank=3, lr=3e-3, batch_size=2, seed=5)
    for norms in (False, True):
        model = tiny_model(family)
        gm = sf.trace(model)
        annotate_groups(gm)
        targets = gm.meta["surgeon_fx.groups"].param_targets
        fqns = sorted({lay.weight for lay in sparse_layers(gm)}, key=lambda f: targets[f])  # the pass's draw order
        done = apply_low_rank_correction_(gm, CALIB, norms=norms, progress=False, **kw)
        assert len(done.losses) == 4 and all(math.isfinite(x) for x in done.losses) and done.kept
        after = model.state_dict()
        for k in vectors:
            assert torch.equal(after[k], orig[k]) != norms or (norms and k in noise), (norms, k)
        for k, v in orig.items():
            if k not in fqns and k not in vectors:
                assert torch.equal(after[k], v), k
    ref = _eager_lora(tiny_model(family), fqns, norms=True, **kw).state_dict()
    for k in [*fqns, *vectors]:
        if k not in noise:
            torch.testing.assert_close(after[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)
    with pytest.raises(ValueError, match="norms"):
        apply_low_rank_correction_(gm, CALIB, steps=1, norms=1)


def test_norms_keep_their_zeros():
    """keep_zeros with norms=True: norm entries that are exactly zero beforehand stay exactly zero (the
    oracle masks their gradients), the other entries of those norms move."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight[:5] = 0
        model.model.layers[0].input_layernorm.weight[3] = 0
    ref = tiny_model("llama")
    ref.load_state_dict(model.state_dict())
    before = {n: model.get_parameter(n).detach().clone() for n in _vectors(model)}
    zeros = {n: v == 0 for n, v in before.items()}
    assert sum(int(z.sum()) for z in zeros.values()) == 6
    gm = sf.trace(model)
    annotate_groups(gm)
    fqns = sorted({lay.weight for lay in sparse_layers(gm)})
    kw = dict(steps=4, rank=3, lr=3e-3, batch_size=2, seed=5, keep_zeros=True)
    apply_low_rank_correction_(gm, CALIB, norms=True, progress=False, **kw)
    _eager_lora(ref, fqns, norms=True, **kw)
    for n, z in zeros.items():
        v = model.get_parameter(n)
        assert torch.equal(v == 0, z), n
        assert (v[~z] != before[n][~z]).all(), n
        torch.testing.assert_close(v, ref.get_parameter(n), rtol=1e-4, atol=1e-5)


def test_compress_lora_norms_reaches_the_correction(monkeypatch):
    """lora_norms=True: every shot's correction trains the 1-D parameters too (structured and sparse
    shots): the result's norms differ from the plain run's, while without it they are the plain run's
    bitwise; the training loss is finite, the caller's model untouched and a 2:4 pattern holds."""
    import surgeon_fx.passes.lora as lora

    seen = []
    real = lora.apply_low_rank_correction_

    def spy(gm, windows, **kw):
        done = real(gm, windows, **kw)
        seen.append((kw["norms"], kw["keep_zeros"], done.losses))
        return done

    monkeypatch.setattr(lora, "apply_low_rank_correction_", spy)
    model = tiny_model("llama")
    orig = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(calibration=CALIB, method="surgeon", shots=1, seed=2, progress=False)
    plain = sf.compress(model, 0.2, **kw)
    without = sf.compress(model, 0.2, lora_steps=2, **kw)
    got = sf.compress(model, 0.2, lora_steps=2, lora_norms=True, **kw)
    kw = dict(calibration=CALIB, sparsity="2:4", method="magnitude", shots=1, seed=4, progress=False)
    sparse_plain = sf.compress(model, 0.0, **kw)
    sparse = sf.compress(model, 0.0, lora_steps=2, lora_norms=True, **kw)
    assert [(n, z) for n, z, _ in seen] == [(False, False), (True, False), (True, True)]
    assert all(len(losses) == 2 and all(math.isfinite(x) for x in losses) for *_, losses in seen)
    vectors = _vectors(plain)
    assert vectors
    for n in vectors:
        assert torch.equal(without.get_parameter(n), plain.get_parameter(n)), n
        assert not torch.equal(got.get_parameter(n), plain.get_parameter(n)), n
        assert not torch.equal(sparse.get_parameter(n), sparse_plain.get_parameter(n)), n
    params = sparse.surgeon_fx_sparsity.params
    assert sum(sf.check_nm(sparse, 2, 4, params=params).values()) == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, orig[k]), k


def test_cosine_schedule_matches_the_eager_oracle():
    """schedule="cosine": step t trains at lr (1 + cos(pi t / steps)) / 2 (the oracle sets each step's
    rate by that formula); the result differs from the constant rate's, and a bad name is refused."""
    fqns = None
    kw = dict(steps=5, rank=3, lr=3e-3, batch_size=2, seed=5)
    got = {}
    for schedule in ("constant", "cosine"):
        model = tiny_model("llama")
        gm = sf.trace(model)
        annotate_groups(gm)
        fqns = sorted({lay.weight for lay in sparse_layers(gm)})
        apply_low_rank_correction_(gm, CALIB, schedule=schedule, progress=False, **kw)
        got[schedule] = model.state_dict()
    ref = _eager_lora(tiny_model("llama"), fqns, cosine=True, **kw).state_dict()
    for k in fqns:
        torch.testing.assert_close(got["cosine"][k], ref[k], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got["cosine"][k], got["constant"][k], rtol=1e-4, atol=1e-5), k
    gm = sf.trace(tiny_model("llama"))
    annotate_groups(gm)
    with pytest.raises(ValueError, match="schedule must be one of"):
        apply_low_rank_correction_(gm, CALIB, steps=1, schedule="linear")


def test_compress_passes_the_schedule_to_every_shot(monkeypatch):
    """lora_schedule reaches every shot's correction, structured and sparse; the caller's model is untouched."""
    import surgeon_fx.passes.lora as lora

    seen = []
    real = lora.apply_low_rank_correction_

    def spy(gm, windows, **kw):
        seen.append(kw["schedule"])
        return real(gm, windows, **kw)

    monkeypatch.setattr(lora, "apply_low_rank_correction_", spy)
    model = tiny_model("llama")
    orig = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(calibration=CALIB, method="surgeon", seed=2, progress=False, lora_steps=2)
    sf.compress(model, 0.2, shots=2, **kw)
    sf.compress(model, 0.2, shots=2, lora_schedule="cosine", **kw)
    sf.compress(model, 0.0, shots=1, sparsity="2:4", lora_schedule="cosine", **kw)
    assert seen == ["constant"] * 2 + ["cosine"] * 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, orig[k]), k


@pytest.mark.parametrize(
    "loss,given,weight",
    [
        ("distill", None, 0.0),
        ("distill", 0.25, 0.0),
        ("distill+next_token", None, 0.5),
        ("distill+next_token", 0.25, 0.25),
    ],
)
def test_distilled_compress_learns_from_the_untouched_original(monkeypatch, loss, given, weight):
    """lora_loss="distill" (or "distill+next_token", by default half of it the next-token loss, else
    lora_next_token_weight, which pure distillation ignores): every shot's correction gets the same
    teacher, equal to the caller's model before compress, even after structures were removed and
    with inplace=True."""
    import surgeon_fx.passes.lora as lora

    model = tiny_model("llama")
    orig = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    real = lora.apply_low_rank_correction_

    def spy(gm, windows, **kw):
        seen.append(kw["teacher"])
        assert kw["next_token_weight"] == weight
        teacher = {k.removeprefix("inner."): v for k, v in kw["teacher"].state_dict().items()}
        assert teacher.keys() == orig.keys() and all(torch.equal(v, orig[k]) for k, v in teacher.items())
        return real(gm, windows, **kw)

    monkeypatch.setattr(lora, "apply_low_rank_correction_", spy)
    kw = dict(calibration=CALIB, method="surgeon", shots=2, lora_steps=2, lora_loss=loss, progress=False)
    if given is not None:
        kw["lora_next_token_weight"] = given
    sf.compress(model, 0.2, inplace=True, **kw)
    assert len(seen) == 2 and seen[0] is seen[1]
    assert sum(p.numel() for p in model.parameters()) < sum(v.numel() for v in orig.values())


@pytest.mark.parametrize("sparsity", [None, "unstructured"])
def test_next_token_share_goes_in_a_straight_line_over_the_shots(monkeypatch, caplog, sparsity):
    """lora_next_token_weight_end: shot t of T gets w + (w_end - w) (t - 1) / (T - 1); lora_lr_end: the
    rate lr (lr_end / lr) ** ((t - 1) / (T - 1)); for structured and sparsity shots alike, through
    compress (the oracle: those formulas written out for T = 5)."""
    import surgeon_fx.passes.lora as lora

    from surgeon_fx.shots import correction_rate, next_token_share

    seen = []
    real = lora.apply_low_rank_correction_

    def spy(gm, windows, **kw):
        seen.append((kw["next_token_weight"], kw["lr"]))
        return real(gm, windows, **kw)

    monkeypatch.setattr(lora, "apply_low_rank_correction_", spy)
    kw = dict(
        calibration=CALIB, method="surgeon", shots=5, lora_steps=1, lora_loss="distill+next_token", progress=False
    )
    kw |= dict(lora_next_token_weight=0.6, lora_next_token_weight_end=0.0, lora_lr=1e-4, lora_lr_end=1e-2)
    ratio = 0.2
    if sparsity is not None:
        kw |= dict(sparsity=sparsity, sparsity_ratio=0.3)
        ratio = 0.0
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level("INFO", logger="surgeon_fx"):
        sf.compress(model, ratio, **kw)
    assert "shot 2 correction:" in caplog.text and "lr 0.000316, next-token share 0.450" in caplog.text
    assert [w for w, _ in seen] == pytest.approx([0.6, 0.45, 0.3, 0.15, 0.0])
    assert [lr for _, lr in seen] == pytest.approx([1e-4 * 100 ** (k / 4) for k in range(5)])  # geometric
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the caller's model unchanged
    cfg = sf.CompressConfig(
        ratio=0.2, method="surgeon", shots=1, lora_loss="distill+next_token", lora_next_token_weight_end=0.0
    )
    assert next_token_share(cfg, 1) == 0.5  # one shot: the start weight
    assert correction_rate(dataclasses.replace(cfg, lora_lr_end=1.0), 1) == cfg.lora_lr  # and the start rate
    cfg = sf.CompressConfig(ratio=0.2, method="surgeon", shots=3, lora_loss="distill")
    assert next_token_share(cfg, 2) == 0.0  # pure distillation: no next-token share


@pytest.mark.parametrize("sparsity", [None, "unstructured"])
def test_adaptation_runs_before_the_first_shot_and_becomes_the_teacher(monkeypatch, caplog, sparsity):
    """adapt_steps: the unpruned copy first gets that many next-token correction steps (rank adapt_rank,
    rate adapt_lr, the correction's batch and seed, no teacher); the distilled shots then start from it
    and distil from it. Oracle: the same pass run by hand on a fresh model gives the teacher's weights."""
    import surgeon_fx.passes.lora as lora

    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = tiny_model("llama")
    gm = sf.trace(adapted)
    annotate_groups(gm)
    apply_low_rank_correction_(gm, CALIB, steps=3, rank=4, lr=1e-2, batch_size=2, micro_batch_size=2, progress=False)
    want = {k.removeprefix("inner."): v for k, v in gm.state_dict().items()}
    assert any(not torch.equal(v, before[k]) for k, v in want.items())  # the adaptation changed something

    calls = []
    real = lora.apply_low_rank_correction_

    def spy(gm, windows, **kw):
        teacher = kw.get("teacher")
        teacher_sd = (
            None if teacher is None else {k.removeprefix("inner."): v.clone() for k, v in teacher.state_dict().items()}
        )
        calls.append((kw["steps"], kw["rank"], kw["lr"], teacher_sd, kw.get("next_token_weight", 0.0)))
        return real(gm, windows, **kw)

    monkeypatch.setattr(lora, "apply_low_rank_correction_", spy)
    kw = dict(calibration=CALIB, method="surgeon", shots=1, batch_size=2, lora_steps=1, lora_loss="distill")
    kw |= dict(adapt_steps=3, adapt_rank=4, adapt_lr=1e-2, progress=False)
    ratio = 0.2
    if sparsity is not None:
        kw |= dict(sparsity=sparsity, sparsity_ratio=0.3)
        ratio = 0.0
    scored = []
    with caplog.at_level("INFO", logger="surgeon_fx"):
        sf.compress(
            model, ratio, on_adapt=lambda m: scored.append({k: v.clone() for k, v in m.state_dict().items()}), **kw
        )
    assert len(scored) == 1 and scored[0].keys() == want.keys()  # on_adapt sees the adapted dense model, once
    assert all(torch.equal(scored[0][k], v) for k, v in want.items())
    assert "adaptation of the unpruned model (next-token loss): 3 steps, training loss" in caplog.text
    assert [c[:3] for c in calls] == [(3, 4, 1e-2), (1, 8, 3e-4)]  # the adaptation, then the shot's correction
    assert calls[0][3] is None and calls[0][4] == 0.0  # the adaptation: next-token loss, no teacher
    teacher = calls[1][3]
    assert teacher.keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(teacher[k], v, rtol=0, atol=0, msg=k)  # the teacher is the adapted model
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the caller's model unchanged


def test_mixed_loss_is_the_weighted_sum_of_both():
    """next_token_weight w: the loss (value and gradient) is (1 - w) KL + w CE, each from its direct
    formula; at w = 1 it is the next-token loss alone and the teacher is never run."""
    from surgeon_fx.passes import lora

    torch.manual_seed(1)
    windows, length, vocab = 2, 6, 40
    ids_ = torch.randint(vocab, (windows, length))
    teacher_logits = torch.randn(windows, length, vocab)
    teacher = type("T", (torch.nn.Module,), {"forward": lambda self, x: teacher_logits})()
    logits = torch.randn(windows, length, vocab).requires_grad_(True)
    kl = F.kl_div(F.log_softmax(logits, -1), F.softmax(teacher_logits, -1), reduction="sum") / (windows * length)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids_[:, 1:].flatten())
    for w in (0.25, 0.5):
        want = (1 - w) * kl + w * ce
        got = lora._loss(logits, ids_, teacher, False, w)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(
            torch.autograd.grad(got, logits)[0], torch.autograd.grad(want, logits, retain_graph=True)[0]
        )

    def never(self, x):
        raise AssertionError("the teacher ran at next_token_weight=1")

    unused = type("U", (torch.nn.Module,), {"forward": never})()
    torch.testing.assert_close(lora._loss(logits, ids_, unused, False, 1.0), ce)


def test_next_token_weight_one_trains_as_without_a_teacher():
    """The pass with a teacher at next_token_weight=1 trains exactly as with no teacher; at 0.5 against
    the model itself (KL 0 at the start) the first loss is half the next-token loss; bad weights are refused."""
    kw = dict(steps=3, rank=3, lr=3e-3, batch_size=2, seed=5, progress=False)
    runs = []
    for extra in ({}, dict(teacher=tiny_model("llama", seed=11).eval(), next_token_weight=1.0)):
        model = tiny_model("llama")
        gm = sf.trace(model)
        annotate_groups(gm)
        runs.append((apply_low_rank_correction_(gm, CALIB, **kw, **extra).losses, model.state_dict()))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-6)
    for k, v in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][k], v)
    gm = sf.trace(tiny_model("llama"))
    annotate_groups(gm)
    half = apply_low_rank_correction_(
        gm, CALIB, **(kw | dict(steps=1)), teacher=tiny_model("llama").eval(), next_token_weight=0.5
    )
    assert half.losses[0] == pytest.approx(0.5 * runs[0][0][0], rel=1e-5)
    with pytest.raises(ValueError, match="next_token_weight"):
        apply_low_rank_correction_(gm, CALIB, steps=1, teacher=tiny_model("llama"), next_token_weight=1.5)
    with pytest.raises(ValueError, match="needs a teacher"):
        apply_low_rank_correction_(gm, CALIB, steps=1, next_token_weight=0.5)


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(lora_steps=-1), "lora_steps"),
        (dict(lora_steps=2, lora_rank=0), "lora_rank"),
        (dict(lora_steps=2, lora_rank="half"), "lora_rank"),
        (dict(lora_steps=2, lora_batch_size=0), "lora_batch_size"),
        (dict(lora_steps=2, lora_holdout=-1), "lora_holdout"),
        (dict(lora_steps=2, lora_lr=0.0), "lora_lr"),
        (dict(lora_steps=2, method="published"), "published"),
        (dict(lora_steps=2, method="magnitude", calibration=None), "lora_steps needs calibration"),
        (dict(lora_steps=2, lora_loss="kl"), "lora_loss"),
        (dict(lora_steps=2, lora_norms="yes"), "lora_norms"),
        (dict(lora_steps=2, lora_schedule="linear"), "lora_schedule"),
        (dict(lora_steps=2, lora_next_token_weight=0.0), "lora_next_token_weight"),
        (dict(lora_steps=2, lora_next_token_weight=1.0), "lora_next_token_weight"),
        (dict(lora_steps=2, lora_next_token_weight=True), "lora_next_token_weight"),
        (dict(lora_steps=2, lora_next_token_weight="half"), "lora_next_token_weight"),
        (dict(lora_steps=2, lora_loss="distill+next_token", lora_next_token_weight_end=1.0), "_end"),
        (dict(lora_steps=2, lora_loss="distill+next_token", lora_next_token_weight_end=-0.1), "_end"),
        (dict(lora_steps=2, lora_loss="distill+next_token", lora_next_token_weight_end=False), "_end"),
        (dict(lora_steps=2, lora_loss="distill", lora_next_token_weight_end=0.0), "no effect with lora_loss='distill'"),
        (dict(lora_steps=2, lora_lr_end=0.0), "lora_lr_end"),
        (dict(lora_steps=2, lora_lr_end="1e-3"), "lora_lr_end"),
        (dict(lora_steps=2, lora_lr_end=True), "lora_lr_end"),
        (dict(adapt_steps=-1), "adapt_steps"),
        (dict(adapt_steps=1.5), "adapt_steps"),
        (dict(adapt_steps=2, adapt_lr=0.0), "adapt_lr"),
        (dict(adapt_steps=2, adapt_rank=0), "adapt_rank"),
        (
            dict(adapt_steps=2, method="magnitude", calibration=None),
            "adapt_steps needs calibration.*leave adapt_steps at 0",
        ),
        (dict(adapt_steps=2, lora_holdout=len(CALIB)), "lora_holdout"),
    ],
)
def test_bad_correction_options_are_refused(options, match):
    kw = dict(calibration=CALIB, method="surgeon", progress=False) | options
    with pytest.raises(ValueError, match=match):
        sf.compress(tiny_model("llama"), 0.2, **kw)


@pytest.mark.parametrize("distill", [False, True])
def test_chunked_loss_equals_the_whole_loss_and_keeps_only_the_logits(monkeypatch, distill):
    """The loss in checkpointed chunks of positions: value and gradient equal the direct formula (the
    oracle), and autograd keeps only the (bfloat16) logits, not float32 log-probabilities of every position."""
    from surgeon_fx.passes import lora

    torch.manual_seed(0)
    windows, length, vocab = 3, 7, 50
    ids_ = torch.randint(vocab, (windows, length))
    teacher_logits = torch.randn(windows, length, vocab).bfloat16()
    teacher = type("T", (torch.nn.Module,), {"forward": lambda self, x: teacher_logits})() if distill else None
    logits = torch.randn(windows, length, vocab).bfloat16().requires_grad_(True)
    if distill:
        p_t = F.softmax(teacher_logits.float(), -1)
        want = F.kl_div(F.log_softmax(logits.float(), -1), p_t, reduction="sum") / (windows * length)
    else:
        want = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids_[:, 1:].flatten())
    (want_grad,) = torch.autograd.grad(want, logits)
    monkeypatch.setattr(lora, "_CHUNK_ENTRIES", 4 * vocab)  # 4 positions per chunk: 6 chunks of 21 positions
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
        got = lora._loss(logits, ids_, teacher, False)
    (got_grad,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
    other = teacher_logits.nbytes if distill else ids_.nbytes
    assert sum(saved) <= logits.nbytes + other  # unchunked: float32 log-probabilities, twice the bytes
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
        lora._loss(logits.detach(), ids_, teacher, False)  # no gradient wanted: no checkpoint, nothing saved
    assert not saved


class _Plain(torch.nn.Module):
    """A transformers model behind a plain forward(ids) -> logits: sample_windows's loop path."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(input_ids=x, use_cache=False).logits


def test_sampled_windows_follow_the_model():
    """sample_windows continues every prompt by the model's own predictions. Oracle: with the output
    layer scaled up (every distribution one-hot) each sampled token is the argmax of a full forward
    of the window so far, through generate's key/value cache and through the loop of full forwards;
    at temperature 1 both paths draw the same tokens from the same seed, the prompts are kept, the
    seed sets the result and the caller's random state is left alone."""
    from surgeon_fx.data import sample_windows

    model = tiny_model("llama").eval()
    prompts = ids(5, 3, seed=7)
    peaked = tiny_model("llama").eval()
    with torch.no_grad():
        peaked.lm_head.weight.mul_(1e4)
    for m in (peaked, _Plain(peaked)):
        got = sample_windows(m, prompts, 12, seed=0, batch_size=2, progress=False)
        assert got.shape == (5, 12) and got.dtype == torch.long and torch.equal(got[:, :3], prompts)
        with torch.no_grad():
            for t in range(3, 12):  # brute force: the argmax after each prefix
                want = peaked(input_ids=got[:, :t], use_cache=False).logits[:, -1].argmax(-1)
                assert torch.equal(got[:, t], want), t
    state = torch.random.get_rng_state()
    a = sample_windows(model, prompts, 12, seed=1, batch_size=2, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random state untouched
    assert torch.equal(a, sample_windows(model, prompts, 12, seed=1, batch_size=2, progress=False))
    assert torch.equal(a, sample_windows(_Plain(model), prompts, 12, seed=1, batch_size=2, progress=False))
    assert not torch.equal(a, sample_windows(model, prompts, 12, seed=2, batch_size=2, progress=False))
    assert a[:, 3:].unique().numel() > 10  # sampled, not the argmax
    for bad, match in (
        (dict(prompts=prompts.float()), "prompts must be 2-D token ids"),
        (dict(prompts=prompts[0]), "prompts must be 2-D token ids"),
        (dict(length=3), "length must be an int above the prompt length 3"),
        (dict(batch_size=0), "batch_size must be an int >= 1"),
    ):
        with pytest.raises(ValueError, match=match):
            sample_windows(**(dict(model=model, prompts=prompts, length=12, progress=False) | bad))


@pytest.mark.parametrize("sparsity", [None, "2:4"])
def test_synthetic_windows_join_every_shot_correction(monkeypatch, caplog, sparsity):
    """lora_synthetic: the teacher (the adapted model here) writes that many windows once, each started
    by 16 tokens of a training calibration window, and every shot's distilled correction trains on
    the calibration windows followed by them (held-out windows neither prompt nor train). Oracle: the
    windows equal sample_windows run by hand on the adapted model with the run's seed and batch."""
    import surgeon_fx.passes.lora as lora

    from surgeon_fx.data import sample_windows
    from surgeon_fx.shots import adapt_

    calib = ids(6, 20, seed=3)
    kw = dict(method="surgeon", shots=2, batch_size=2, lora_steps=1, lora_loss="distill", lora_holdout=1, seed=4)
    kw |= dict(adapt_steps=2, adapt_lr=1e-2, lora_synthetic=7)
    ratio = 0.2
    if sparsity is not None:
        kw |= dict(sparsity=sparsity)
        ratio = 0.0
    cfg = sf.CompressConfig(ratio=ratio, **kw)
    adapted = tiny_model("llama").eval()
    adapt_(adapted, calib, cfg, progress=False)
    prompts = calib[:5][torch.arange(7) % 5, :16]
    want = sample_windows(adapted, prompts, 20, seed=4, batch_size=16, progress=False)

    seen = []
    real = lora.apply_low_rank_correction_

    def spy(gm, windows, **kw):
        seen.append((windows.clone(), kw.get("holdout"), kw.get("teacher") is not None))
        return real(gm, windows, **kw)

    monkeypatch.setattr(lora, "apply_low_rank_correction_", spy)
    with caplog.at_level("INFO", logger="surgeon_fx"):
        sf.compress(tiny_model("llama"), ratio, calibration=calib, progress=False, **kw)
    assert "synthetic windows: 7 of 20 tokens sampled from the teacher" in caplog.text
    adaptation, *shots = seen
    assert torch.equal(adaptation[0], calib[:5]) and not adaptation[2]  # the adaptation: calibration only
    assert len(shots) == 2
    for windows, holdout, distilled in shots:
        assert distilled and torch.equal(holdout, calib[5:])
        assert torch.equal(windows, torch.cat([calib[:5], want]))


def test_synthetic_windows_need_a_distilled_correction():
    for bad, match in (
        (dict(lora_synthetic=-1, lora_steps=2, lora_loss="distill"), "lora_synthetic must be an int >= 0"),
        (dict(lora_synthetic=True, lora_steps=2, lora_loss="distill"), "lora_synthetic must be an int >= 0"),
        (dict(lora_synthetic=4, lora_steps=0, lora_loss="distill"), "teacher's own text for a distilled correction"),
        (dict(lora_synthetic=4, lora_steps=2), "lora_loss='next_token'"),
        (dict(lora_synthetic_batch_size=0), "lora_synthetic_batch_size must be an int >= 1"),
        (dict(lora_synthetic_batch_size=2.0), "lora_synthetic_batch_size must be an int >= 1"),
    ):
        with pytest.raises(ValueError, match=match):
            sf.CompressConfig(ratio=0.2, method="surgeon", **bad)
    sf.CompressConfig(ratio=0.2, method="surgeon", lora_synthetic=4, lora_steps=2, lora_loss="distill+next_token")


def _synthetic_run(calib, **kw):
    """A tiny distilled run with an adaptation and synthetic windows; the windows it used and its weights."""
    got = []
    opts = dict(method="surgeon", shots=2, batch_size=2, lora_steps=1, lora_loss="distill", seed=4)
    opts |= dict(adapt_steps=2, adapt_lr=1e-2) | kw
    out = sf.compress(tiny_model("llama"), 0.2, calibration=calib, progress=False, on_synthetic=got.append, **opts)
    return got, out.state_dict()


def test_synthetic_windows_given_instead_of_sampled(monkeypatch):
    """compress(synthetic=W) with the windows an earlier run sampled (on_synthetic) samples nothing and
    gives exactly that run's model; lora_synthetic may be left at 0 or equal len(W)."""
    import surgeon_fx.shots as shots

    calib = ids(6, 20, seed=3)
    (windows,), want = _synthetic_run(calib, lora_synthetic=5)
    assert windows.shape == (5, 20) and windows.dtype == torch.long

    def refuse(*a, **k):
        raise AssertionError("sampled although the windows were given")

    monkeypatch.setattr(shots, "synthetic_windows", refuse)
    for extra in ({}, {"lora_synthetic": 5}):
        seen, got = _synthetic_run(calib, synthetic=windows.clone(), **extra)
        assert seen == []  # on_synthetic: only for sampled windows
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(AssertionError, match="sampled although"):
        _synthetic_run(calib, lora_synthetic=5)  # the spy works: without them it samples


def test_synthetic_windows_bad_input():
    calib = ids(6, 20, seed=3)
    good = ids(3, 20, seed=5)
    for bad, match in (
        (dict(synthetic=good.float()), "int64 token ids as long as the calibration windows"),
        (dict(synthetic=ids(3, 12, seed=5)), r"as long as the calibration windows \(L = 20\)"),
        (dict(synthetic=good[0]), r"synthetic must be a non-empty \(M, L\) tensor"),
        (dict(synthetic=good[:0]), r"synthetic must be a non-empty \(M, L\) tensor"),
        (dict(synthetic=good.tolist()), r"synthetic must be a non-empty \(M, L\) tensor"),
        (dict(synthetic=good, lora_synthetic=4), "lora_synthetic=4 but synthetic holds 3 windows"),
        (dict(synthetic=good + 10**6), r"synthetic holds token ids outside \[0, "),
        (dict(synthetic=good, lora_steps=0), "teacher's own text for a distilled correction"),
    ):
        with pytest.raises(ValueError, match=match):
            _synthetic_run(calib, **bad)


def test_synthetic_windows_kept_for_a_resumed_run(monkeypatch, caplog, tmp_path):
    """With checkpoint_dir the sampled windows are written there (synthetic.pt) and a rerun reads them
    back instead of sampling (same model as sampling); a run with other sampling options samples anew."""
    import surgeon_fx.shots as shots

    calib = ids(6, 20, seed=3)
    ckpt = tmp_path / "ckpt"
    (windows,), want = _synthetic_run(calib, lora_synthetic=5, checkpoint_dir=str(ckpt))
    saved = torch.load(ckpt / shots.SYNTHETIC_FILE, weights_only=True)
    assert torch.equal(saved["windows"], windows) and not list(ckpt.glob("*.tmp"))
    (fresh,), _ = _synthetic_run(calib, lora_synthetic=5)
    assert torch.equal(fresh, windows)  # the file changes nothing

    calls = []
    real = shots.synthetic_windows
    monkeypatch.setattr(shots, "synthetic_windows", lambda *a, **k: calls.append(1) or real(*a, **k))
    with caplog.at_level("INFO", logger="surgeon_fx"):
        (again,), got = _synthetic_run(calib, lora_synthetic=5, checkpoint_dir=str(ckpt))
    assert calls == [] and "synthetic windows: 5 of 20 tokens read from" in caplog.text
    assert torch.equal(again, windows) and all(torch.equal(want[k], got[k]) for k in want)
    cfg = sf.CompressConfig(ratio=0.2, method="surgeon", lora_steps=1, lora_loss="distill", lora_synthetic=5)
    for other in (dict(seed=5), dict(lora_synthetic=4), dict(lora_batch_size=2)):
        other_cfg = dataclasses.replace(cfg, checkpoint_dir=str(ckpt), **other)
        shots.teacher_windows(tiny_model("llama").eval(), calib, other_cfg, progress=False)
    assert len(calls) == 3  # every other option sampled anew
    last = tiny_model("llama").eval(), dataclasses.replace(cfg, checkpoint_dir=str(ckpt), lora_batch_size=2)
    shots.teacher_windows(last[0], calib, last[1], progress=False)
    assert len(calls) == 3  # the last options again: read back
    shots.teacher_windows(last[0], calib[:5], last[1], progress=False)
    assert len(calls) == 4  # other calibration windows: sampled anew


def test_synthetic_windows_batch_size(monkeypatch):
    """lora_synthetic_batch_size: the windows sampled that many at a time (default 8 x lora_batch_size),
    and other batches draw other windows (a checkpointed run then samples anew)."""
    import surgeon_fx.data as data
    import surgeon_fx.shots as shots

    calib = ids(6, 20, seed=3)
    seen = []
    real = data.sample_windows
    monkeypatch.setattr(data, "sample_windows", lambda *a, **k: seen.append(k["batch_size"]) or real(*a, **k))
    cfg = sf.CompressConfig(ratio=0.2, method="surgeon", lora_steps=1, lora_loss="distill", lora_synthetic=4)
    model = tiny_model("llama").eval()
    a = shots.synthetic_windows(model, calib, cfg, progress=False)
    b = shots.synthetic_windows(model, calib, dataclasses.replace(cfg, lora_batch_size=2), progress=False)
    c = shots.synthetic_windows(model, calib, dataclasses.replace(cfg, lora_synthetic_batch_size=3), progress=False)
    assert seen == [8, 16, 3]
    assert torch.equal(a, b) and not torch.equal(a, c)  # 8 and 16 both take the 4 windows at once
    key = shots.synthetic_key(calib, cfg)
    assert key != shots.synthetic_key(calib, dataclasses.replace(cfg, lora_synthetic_batch_size=3))
