"""K-FAC factors of the curvature pass against an independent implementation: curvlinops' ``KFACLinearOperator``.

The model is a small MLP language model (embedding -> linear + bias -> tanh -> linear -> logits), run once
through ``trace -> annotate_groups -> annotate_curvature`` and once through curvlinops (3.x) with the same
weights and windows. Normalisation, derived from the two definitions (N windows of T tokens):

- ours: ``A = sum_{n,t} a a^T / (N T)`` and ``G = sum_{n,t} g g^T / (N T)``, where ``g`` is the gradient of
  the *summed* next-token cross-entropy with respect to the layer output, and every token, the last one of
  each window included, counts in ``N T`` (its ``g`` is zero under the empirical Fisher: it predicts nothing).
- curvlinops, KFAC-expand, ``CrossEntropyLoss(reduction="sum")``: the input covariance is
  ``sum_{n,t} a a^T / (N_data * T)`` with ``N_data = N`` (divided by the weight-sharing size ``T``), and the
  gradient covariance is ``sum_{n,t} g g^T`` with no division (the ``"sum"`` correction is ``1 / mc_samples``
  = 1); ``separate_weight_and_bias=False`` appends a column of ones to ``a``, as we do for the bias.

Hence ``A_ours = A_curvlinops`` and ``G_ours = G_curvlinops / (N T)``: no scale is fitted from data.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import surgeon_fx as sf

curvlinops = pytest.importorskip("curvlinops")
from surgeon_fx.passes import annotate_groups  # noqa: E402
from surgeon_fx.passes.curvature import annotate_curvature, get_curvature  # noqa: E402

VOCAB, WIDTH, HIDDEN = 16, 8, 12


class MLPLM(nn.Module):
    """Token ids ``(B, T)`` -> logits ``(B, T, V)``: each position sees only its own token."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.fc1 = nn.Linear(WIDTH, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(self.embed(ids))))


class NextTokenLogits(nn.Module):
    """curvlinops' view of the model: class axis second, ``(B, V, T')``, as ``CrossEntropyLoss`` wants it.

    ``shift=True`` keeps the logits of positions ``0..T-2`` (they predict ``ids[:, 1:]``: the empirical
    Fisher's labels); ``shift=False`` keeps all ``T`` positions (the true Fisher samples a label at each).
    """

    def __init__(self, lm: nn.Module, shift: bool):
        super().__init__()
        self.lm = lm
        self.shift = shift

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.lm(ids)  # (B, T, V)
        if self.shift:
            logits = logits[:, :-1]
        return logits.transpose(1, 2)


def _model_and_windows(n: int = 6, t: int = 10):
    torch.manual_seed(0)
    model = MLPLM().eval()
    with torch.no_grad():  # larger weights than the default init: peaked, varied predictive distributions
        for p in model.parameters():
            p.mul_(3.0)
    windows = torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(1))
    return model, windows


def _ours(model, windows, **kw):
    gm = sf.trace(model)
    annotate_groups(gm)
    annotate_curvature(gm, windows, progress=False, **kw)
    curv = get_curvature(gm)
    return gm, {lay.weight.removesuffix(".weight"): (curv.factor_a(lay), lay.g) for lay in curv.layers.values()}


def _curvlinops(model, data, fisher_type):
    from curvlinops import KFACLinearOperator

    wrapped = NextTokenLogits(model, shift=fisher_type == "empirical")
    params = [p for m in (model.fc1, model.fc2) for p in m.parameters()]
    kfac = KFACLinearOperator(
        wrapped,
        nn.CrossEntropyLoss(reduction="sum"),
        params,
        data,
        fisher_type=fisher_type,
        kfac_approx="expand",
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    kfac.compute_kronecker_factors()
    state = kfac.state_dict()
    return {
        name.removeprefix("lm."): (state["input_covariances"][name], state["gradient_covariances"][name])
        for name in state["gradient_covariances"]
    }


def test_empirical_factors_match_curvlinops_kfac():
    """Empirical Fisher: A equal, G equal after dividing curvlinops' summed G by the token count N T."""
    model, windows = _model_and_windows()
    _, ours = _ours(model, windows, fisher="empirical", batch_size=2)
    data = [(w, w[:, 1:]) for w in windows.split(3)]  # labels: the next tokens
    ref = _curvlinops(model, data, "empirical")
    n_tokens = windows.numel()
    assert set(ref) == {"fc1", "fc2"}
    for name, (a_ref, g_ref) in ref.items():
        a, g = ours[name]
        assert a.shape == a_ref.shape and g.shape == g_ref.shape
        torch.testing.assert_close(a, a_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g, g_ref / n_tokens, rtol=1e-4, atol=1e-8)
    # the bias column of fc1 is the constant 1 on every token, in both
    assert ours["fc1"][0][-1, -1].item() == pytest.approx(1.0)


def test_true_fisher_g_is_unbiased_for_curvlinops_type2():
    """True Fisher: our G samples one label per token, so it equals curvlinops' exact type-2 G / (N T) only
    in expectation over the labels. Over K seeds, each entry's mean must lie within a Student-t bound of the
    type-2 value (standard error estimated from the K runs, Bonferroni over all entries, family-wise false
    alarm rate 1e-3), and so must the trace (a sum of many entries: catches scale errors of about 1%).
    A does not depend on the labels and matches exactly."""
    from scipy.stats import t as student_t

    model, windows = _model_and_windows(n=32, t=16)
    ref = _curvlinops(model, [(w, w) for w in windows.split(16)], "type-2")
    n_tokens = windows.numel()
    gm = sf.trace(model)
    annotate_groups(gm)
    k = 32
    runs = []
    for seed in range(k):
        annotate_curvature(gm, windows, fisher="true", batch_size=32, seed=seed, progress=False)
        curv = get_curvature(gm)
        runs.append({lay.weight.removesuffix(".weight"): (curv.factor_a(lay), lay.g) for lay in curv.layers.values()})
    entries = sum(g.numel() for _, g in ref.values())
    bound_entry = student_t.ppf(1 - 1e-3 / (2 * entries), k - 1)
    bound_trace = student_t.ppf(1 - 1e-3 / (2 * len(ref)), k - 1)
    for name, (a_ref, g_ref) in ref.items():
        torch.testing.assert_close(runs[0][name][0], a_ref, rtol=1e-5, atol=1e-6)
        gs = torch.stack([r[name][1] for r in runs]).double()  # (K, R, R)
        expected = g_ref.double() / n_tokens
        err, se = (gs.mean(0) - expected).abs(), gs.std(0) / k**0.5
        assert (err <= bound_entry * se + 1e-9).all(), f"{name}: max t = {float((err / (se + 1e-12)).max()):.1f}"
        tr = gs.diagonal(dim1=1, dim2=2).sum(1)  # (K,)
        t_tr = abs(float(tr.mean()) - float(expected.trace())) / (float(tr.std()) / k**0.5)
        assert t_tr <= bound_trace, f"{name}: trace t = {t_tr:.1f} > {bound_trace:.1f}"
