"""Choose which atoms to remove for a target ratio, from per-atom scores.

Reads: ``gm.meta[GROUPS]`` and ``gm.meta[SCORES]``. Writes: ``gm.meta[PLAN]``, a
:class:`~surgeon_fx.ir.Plan` keyed by parameter FQN + axis + kept indices. Leaves ``gm.code``
unchanged. Invariant: parameter counts are exact (a residual channel and a head that share
elements of one matrix are not counted twice), and no group loses all of its atoms unless asked.
"""

from __future__ import annotations

import math

import numpy as np
from torch import fx

from surgeon_fx.ir import KINDS, Analysis, Plan, Scores
from surgeon_fx.keys import PLAN, SCORES, require

from .groups import get_groups

__all__ = ["make_plan", "annotate_plan", "plan_from_removed"]


class _Counter:
    """Exact parameter counts while atoms are removed one by one."""

    def __init__(self, analysis: Analysis):
        self.a = analysis
        self.kept = {p: list(s) for p, s in analysis.param_shapes.items()}
        self.removed: dict[tuple[str, int], set[int]] = {}
        self.total = sum(analysis.param_numel.values())
        self.linear = sum(analysis.param_numel[p] for p in analysis.linear_params)

    def numel(self, p: str) -> int:
        return math.prod(self.kept[p])

    def remove(self, group, atom: int) -> None:
        touched = {m.param for m in group.members}
        before = {p: self.numel(p) for p in touched}
        for m in group.members:
            s = self.removed.setdefault((m.param, m.axis), set())
            new = [i for i in m.indices[atom] if i not in s]
            s.update(new)
            self.kept[m.param][m.axis] -= len(new)
        for p in touched:
            delta = before[p] - self.numel(p)
            self.total -= delta
            if p in self.a.linear_params:
                self.linear -= delta


def plan_from_removed(
    analysis: Analysis, removed: dict[str, list[int]], *, target: float = 0.0, basis: str = "model", method: str = ""
) -> Plan:
    """Build a :class:`Plan` that removes the given atoms (``{group name: atom ids}``).

    Raises:
        KeyError: a group name is unknown.
        ValueError: an atom id is out of range.
    """
    counter = _Counter(analysis)
    total0, linear0 = counter.total, counter.linear
    clean: dict[str, tuple[int, ...]] = {}
    for name, atoms in removed.items():
        g = analysis.group(name)
        atoms = sorted(set(int(a) for a in atoms))
        if atoms and (atoms[0] < 0 or atoms[-1] >= g.n_atoms):
            raise ValueError(f"group {name} has {g.n_atoms} atoms; cannot remove atom {atoms[-1]}")
        for a in atoms:
            counter.remove(g, a)
        clean[name] = tuple(atoms)
    keep = {}
    for (p, ax), gone in counter.removed.items():
        if gone:
            size = analysis.param_shapes[p][ax]
            keep.setdefault(p, {})[ax] = tuple(i for i in range(size) if i not in gone)
    return Plan(
        keep=keep,
        removed=clean,
        params_before=total0,
        params_after=counter.total,
        linear_before=linear0,
        linear_after=counter.linear,
        target=target,
        basis=basis,
        method=method,
    )


def make_plan(
    analysis: Analysis,
    scores: Scores,
    ratio: float,
    *,
    basis: str = "model",
    kinds: tuple[str, ...] = KINDS,
    min_atoms: int = 1,
) -> Plan:
    """Remove the cheapest atoms, globally across groups, until ``ratio`` of the parameters are gone.

    Args:
        analysis: from ``annotate_groups``.
        scores: from ``annotate_scores`` (lower = removed first).
        ratio: fraction of parameters to remove, in [0, 1).
        basis: ``"model"`` (all parameters) or ``"linear"`` (decoder linear layers with biases,
            as published pruning tables count).
        kinds: structure kinds that may be removed (subset of :data:`~surgeon_fx.ir.KINDS`).
        min_atoms: atoms every group keeps (``0`` lets a layer lose all of its heads or units).

    Returns:
        A plan that removes at least ``ratio`` of the chosen basis, overshooting by less than one atom.

    Raises:
        ValueError: bad ratio, basis or kinds, or the target cannot be reached with the allowed kinds.
    """
    _check_ratio(ratio)
    if basis not in ("model", "linear"):
        raise ValueError(f"basis must be 'model' or 'linear', got {basis!r}")
    bad = set(kinds) - set(KINDS)
    if bad:
        raise ValueError(f"unknown structure kinds {sorted(bad)}; choose from {KINDS}")
    counter = _Counter(analysis)
    start = counter.total if basis == "model" else counter.linear
    goal = ratio * start
    cands = []
    for g in analysis.groups:
        if g.kind not in kinds:
            continue
        vals = scores.values.get(g.name)
        if vals is None:
            raise ValueError(f"no scores for group {g.name}; re-run annotate_scores after annotate_groups")
        for a, v in enumerate(vals):
            if not np.isfinite(v):
                raise ValueError(f"score of atom {a} of group {g.name} is {v}; scores must be finite")
            cands.append((float(v), g.name, a))
    cands.sort()
    left = {g.name: g.n_atoms for g in analysis.groups}
    size = {g.name: g.atom_numel for g in analysis.groups}
    smallest = min((size[name] for _, name, _ in cands), default=0)
    removed: dict[str, list[int]] = {}
    gone = 0.0
    for _, name, a in cands:
        if gone >= goal:
            break
        if left[name] <= min_atoms:
            continue
        if gone + size[name] > goal + smallest and size[name] > smallest:
            continue  # a big atom would overshoot; cheaper-sized atoms fill the rest
        counter.remove(analysis.group(name), a)
        left[name] -= 1
        removed.setdefault(name, []).append(a)
        gone = start - (counter.total if basis == "model" else counter.linear)
    if gone < goal and ratio > 0:
        raise ValueError(
            f"cannot remove {ratio:.3f} of the {basis} parameters with kinds={tuple(kinds)} and "
            f"min_atoms={min_atoms}: at most {gone / start:.3f} is removable; allow more kinds or lower the ratio"
        )
    return plan_from_removed(analysis, removed, target=ratio, basis=basis, method=scores.method)


def annotate_plan(
    gm: fx.GraphModule, ratio: float, *, basis: str = "model", kinds: tuple[str, ...] = KINDS, min_atoms: int = 1
) -> None:
    """Run :func:`make_plan` on the groups and scores stored on ``gm``; store the plan in ``gm.meta[PLAN]``."""
    scores = require(gm, SCORES, producer="annotate_scores")
    gm.meta[PLAN] = make_plan(get_groups(gm), scores, ratio, basis=basis, kinds=kinds, min_atoms=min_atoms)


def _check_ratio(ratio) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0.0 <= float(ratio) < 1.0):
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r} (0.3 removes 30% of the parameters)")
