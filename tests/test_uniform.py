"""Uniform plans: every group of a class keeps the same atom count, chosen by score, rounded to multiples."""

from __future__ import annotations

import math

import pytest
from families import tiny_model
from helpers import analyse
from surgeon_fx.passes import annotate_scores
from surgeon_fx.passes.uniform import kept_levels, make_uniform_plan, uniform_classes

from surgeon_fx import SCORES, Analysis, Group, Member, Scores


def synthetic(spec: dict[str, tuple[str, int, int]]) -> Analysis:
    """One parameter ``<group>.w`` of shape (atoms, cols) per group; atom ``a`` owns row ``a``."""
    groups, shapes = [], {}
    for name, (kind, atoms, cols) in spec.items():
        p = f"{name}.w"
        shapes[p] = (atoms, cols)
        groups.append(Group(f"{name}/{kind}", kind, name, (Member(p, 0, tuple((a,) for a in range(atoms))),), cols))
    numel = {p: math.prod(s) for p, s in shapes.items()}
    return Analysis(tuple(groups), {}, None, {}, shapes, numel, frozenset(shapes))


def kept_counts(analysis: Analysis, plan) -> dict[tuple[str, int], set[int]]:
    out: dict[tuple[str, int], set[int]] = {}
    for key, groups in uniform_classes(analysis).items():
        out[key] = {g.n_atoms - len(plan.removed.get(g.name, ())) for g in groups}
    return out


def test_one_step_removes_the_cheapest_atom_of_every_group():
    """The docstring example: scores [3,1,2,9] and [5,6,0,1] -> atom 1 of the first, atom 2 of the second."""
    a = synthetic({"l0": ("mlp", 4, 10), "l1": ("mlp", 4, 10)})
    plan = make_uniform_plan(a, Scores("t", {"l0/mlp": (3, 1, 2, 9), "l1/mlp": (5, 6, 0, 1)}), 0.2)
    assert plan.removed == {"l0/mlp": (1,), "l1/mlp": (2,)}
    assert plan.params_after == 60 and plan.keep["l0.w"][0] == (0, 2, 3)


def test_classes_keep_equal_counts_and_overshoot_less_than_one_step():
    """Groups of one (kind, atom count) keep the same count; cheaper classes are stepped first."""
    a = synthetic({"h0": ("heads", 4, 30), "h1": ("heads", 4, 30), "m0": ("mlp", 16, 3), "m1": ("mlp", 16, 3)})
    scores = Scores(
        "t",
        {"h0/heads": (5, 6, 7, 8), "h1/heads": (5, 6, 7, 9), "m0/mlp": tuple(range(16)), "m1/mlp": tuple(range(16))},
    )
    total = 2 * 4 * 30 + 2 * 16 * 3
    for ratio in (0.05, 0.2, 0.45, 0.7):
        plan = make_uniform_plan(a, scores, ratio)
        assert all(len(c) == 1 for c in kept_counts(a, plan).values())
        removed = total - plan.params_after
        assert removed >= ratio * total and removed - ratio * total < 2 * 30  # < one heads step
        for g, atoms in plan.removed.items():  # the cheapest atoms of each group went first
            assert sorted(atoms) == sorted(
                sorted(range(len(scores.values[g])), key=scores.values[g].__getitem__)[: len(atoms)]
            )


def test_multiple_rounds_kept_counts_where_possible():
    """With multiple=8, 20-unit groups keep 16 or 8; 3-atom groups (no multiple of 8 fits) step by one."""
    assert kept_levels(20, multiple=8) == [16, 8]
    assert kept_levels(3, multiple=8) == [2, 1]
    assert kept_levels(16, multiple=8, min_atoms=0) == [8, 0]
    a = synthetic({"m0": ("mlp", 20, 4), "m1": ("mlp", 20, 4), "h0": ("heads", 3, 40), "h1": ("heads", 3, 40)})
    scores = Scores("t", {"m0/mlp": (1.0,) * 20, "m1/mlp": (1.0,) * 20, "h0/heads": (9, 9, 9), "h1/heads": (9, 9, 9)})
    plan = make_uniform_plan(a, scores, 0.3, multiple=8)
    counts = kept_counts(a, plan)
    assert counts[("mlp", 20)] <= {16, 8}
    plan = make_uniform_plan(
        a, Scores("t", {**scores.values, "h0/heads": (0, 0, 0), "h1/heads": (0, 0, 0)}), 0.2, multiple=8
    )
    assert kept_counts(a, plan)[("heads", 3)] == {2}


def test_ratio_zero_is_empty_and_errors_say_what_to_do():
    a = synthetic({"m0": ("mlp", 4, 4), "m1": ("mlp", 4, 4)})
    scores = Scores("t", {"m0/mlp": (1, 2, 3, 4), "m1/mlp": (1, 2, 3, 4)})
    plan = make_uniform_plan(a, scores, 0.0)
    assert plan.is_empty and plan.params_after == plan.params_before
    with pytest.raises(ValueError, match="at most 0.750 is removable"):
        make_uniform_plan(a, scores, 0.9)
    with pytest.raises(ValueError, match="multiple must be an int >= 1"):
        make_uniform_plan(a, scores, 0.3, multiple=0)
    with pytest.raises(ValueError, match="no scores for group m1/mlp"):
        make_uniform_plan(a, Scores("t", {"m0/mlp": (1, 2, 3, 4)}), 0.3)
    with pytest.raises(ValueError, match="kinds must be"):
        make_uniform_plan(a, scores, 0.3, kinds=("conv",))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_uniform_plan_on_real_groups(family):
    """GQA heads with tied embeddings, fused QKV: equal counts per class, target reached (every family goes
    through compress(uniform=True) in test_checkpoint)."""
    gm, a = analyse(tiny_model(family))
    annotate_scores(gm, method="magnitude")
    plan = make_uniform_plan(a, gm.meta[SCORES], 0.3, multiple=8)
    assert all(len(c) == 1 for c in kept_counts(a, plan).values())
    assert 0.3 <= plan.ratio < 0.45
    for (kind, n), counts in kept_counts(a, plan).items():
        kept = counts.pop()
        assert kept == n or kept % 8 == 0 or not any(k % 8 == 0 for k in range(1, n)), (kind, n, kept)
