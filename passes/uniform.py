"""Uniform plans: every layer keeps the same widths, so a stock ``from_pretrained`` can rebuild the model.

Reads: an :class:`~surgeon_fx.ir.Analysis` (from ``annotate_groups``) and :class:`~surgeon_fx.ir.Scores`.
Writes: nothing (returns a :class:`~surgeon_fx.ir.Plan`). Invariant: groups of the same kind and the same
atom count form a *class* (e.g. the KV groups of every layer, or the MLP units of every layer); every group
of a class keeps the same number of atoms, a multiple of ``multiple`` where the class allows one; inside a
group the atoms with the lowest scores go first; the plan removes at least ``ratio`` of the basis and
overshoots it by less than one step.

A *step* removes one more level from every group of one class at once (one atom per group, or down to the
next multiple of ``multiple``). Steps are taken greedily in order of their summed score (the sum of the
scores of the atoms they remove, the same cost ``make_plan`` compares atom by atom), until the target is
reached. A class whose atom count has no multiple of ``multiple`` between ``min_atoms`` and its size (e.g.
3 KV groups with ``multiple=8``) falls back to steps of one atom.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict

import numpy as np

from surgeon_fx.ir import KINDS, Analysis, Group, Plan, Scores

from .plan import plan_from_removed

__all__ = ["make_uniform_plan", "uniform_classes", "kept_levels"]


def uniform_classes(analysis: Analysis, kinds: tuple[str, ...] = KINDS) -> dict[tuple[str, int], list[Group]]:
    """Groups that must keep the same number of atoms: ``{(kind, atom count): [groups]}`` in graph order.

    Args:
        analysis: from ``annotate_groups``.
        kinds: structure kinds to include.

    Returns:
        The classes; groups with no atoms are left out.
    """
    out: dict[tuple[str, int], list[Group]] = defaultdict(list)
    for g in analysis.groups:
        if g.kind in kinds and g.n_atoms > 0:
            out[(g.kind, g.n_atoms)].append(g)
    return dict(out)


def kept_levels(n_atoms: int, *, multiple: int = 1, min_atoms: int = 1) -> list[int]:
    """The kept atom counts a class may step down to, largest first (``n_atoms`` itself excluded).

    Args:
        n_atoms: atoms of every group of the class.
        multiple: round kept counts to multiples of this; when no multiple lies in
            ``[min_atoms, n_atoms)``, every count is allowed (steps of one atom).
        min_atoms: atoms every group keeps.

    Returns:
        E.g. ``kept_levels(20, multiple=8)`` -> ``[16, 8]``; ``kept_levels(3, multiple=8)`` -> ``[2, 1]``.
    """
    lo = max(min_atoms, 0)
    levels = [k for k in range(n_atoms - 1, lo - 1, -1) if k % multiple == 0]
    if not levels:
        levels = list(range(n_atoms - 1, lo - 1, -1))
    return levels


class _Sizes:
    """Exact parameter counts (whole model and decoder linear) while atoms are removed in batches.

    Atoms of different groups may share parameter elements (a head and a residual channel meet in
    ``q_proj``); removed indices are kept per (parameter, axis) so nothing is counted twice.
    """

    def __init__(self, analysis: Analysis):
        self.kept = {p: list(s) for p, s in analysis.param_shapes.items()}
        self.gone: dict[tuple[str, int], set[int]] = defaultdict(set)
        self.linear = analysis.linear_params
        self.total = sum(analysis.param_numel.values())
        self.linear_total = sum(analysis.param_numel[p] for p in analysis.linear_params)

    def _new(self, atoms: list[tuple[Group, int]]):
        add: dict[tuple[str, int], set[int]] = defaultdict(set)
        for g, a in atoms:
            for m in g.members:
                seen = self.gone[(m.param, m.axis)]
                add[(m.param, m.axis)].update(i for i in m.indices[a] if i not in seen)
        shapes: dict[str, list[int]] = {}
        for (p, ax), new in add.items():
            shapes.setdefault(p, list(self.kept[p]))[ax] -= len(new)
        return add, shapes

    def delta(self, atoms: list[tuple[Group, int]]) -> tuple[int, int]:
        """Parameters (whole model, decoder linear) that removing ``atoms`` would remove."""
        _, shapes = self._new(atoms)
        d = {p: math.prod(self.kept[p]) - math.prod(s) for p, s in shapes.items()}
        return sum(d.values()), sum(v for p, v in d.items() if p in self.linear)

    def remove(self, atoms: list[tuple[Group, int]]) -> None:
        d_total, d_linear = self.delta(atoms)
        add, shapes = self._new(atoms)
        for key, new in add.items():
            self.gone[key].update(new)
        self.kept.update(shapes)
        self.total -= d_total
        self.linear_total -= d_linear


def _ordered_atoms(analysis: Analysis, scores: Scores, groups: list[Group]) -> dict[str, list[int]]:
    """Atom ids of every group, cheapest first (ties by atom id)."""
    out = {}
    for g in groups:
        vals = scores.values.get(g.name)
        if vals is None:
            raise ValueError(f"no scores for group {g.name}; re-run annotate_scores after annotate_groups")
        if len(vals) != g.n_atoms:
            raise ValueError(f"group {g.name} has {g.n_atoms} atoms but {len(vals)} scores; re-run annotate_scores")
        for a, v in enumerate(vals):
            if not np.isfinite(v):
                raise ValueError(f"score of atom {a} of group {g.name} is {v}; scores must be finite")
        out[g.name] = sorted(range(g.n_atoms), key=lambda a, v=vals: (float(v[a]), a))
    return out


def make_uniform_plan(
    analysis: Analysis,
    scores: Scores,
    ratio: float,
    *,
    basis: str = "model",
    kinds: tuple[str, ...] = KINDS,
    multiple: int = 1,
    min_atoms: int = 1,
) -> Plan:
    """Remove ``ratio`` of the parameters keeping the same widths in every group of a class.

    Before/after, for two layers with 4 MLP units each and scores ``[3, 1, 2, 9]`` / ``[5, 6, 0, 1]``:
    one step removes unit 1 of the first layer and unit 2 of the second (step score 1 + 0); both keep 3.

    Args:
        analysis: from ``annotate_groups``.
        scores: from ``annotate_scores`` (lower = removed first).
        ratio: fraction of the ``basis`` parameters to remove, in [0, 1).
        basis: ``"model"`` (all parameters) or ``"linear"`` (decoder linear layers, biases included).
        kinds: structure kinds that may be removed.
        multiple: kept atom counts are multiples of this where the class allows (see :func:`kept_levels`).
        min_atoms: atoms every group keeps.

    Returns:
        A plan listing every group of the chosen kinds in ``removed`` (an empty tuple where nothing goes),
        removing at least ``ratio`` of the basis and overshooting by less than the last step taken.

    Raises:
        ValueError: bad arguments, missing or non-finite scores, or a target the allowed kinds cannot reach.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r} (0.3 removes 30% of the parameters)")
    if basis not in ("model", "linear"):
        raise ValueError(f"basis must be 'model' or 'linear', got {basis!r}")
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if not kinds or set(kinds) - set(KINDS):
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be an int >= 1, got {multiple!r}")
    if isinstance(min_atoms, bool) or not isinstance(min_atoms, int) or min_atoms < 0:
        raise ValueError(f"min_atoms must be an int >= 0, got {min_atoms!r}")

    classes = uniform_classes(analysis, kinds)
    order = _ordered_atoms(analysis, scores, [g for gs in classes.values() for g in gs])
    sizes = _Sizes(analysis)
    start = sizes.total if basis == "model" else sizes.linear_total
    goal = float(ratio) * start
    removed: dict[str, list[int]] = {g.name: [] for gs in classes.values() for g in gs}
    levels = {key: kept_levels(key[1], multiple=multiple, min_atoms=min_atoms) for key in classes}
    kept = {key: key[1] for key in classes}

    def step(key) -> list[tuple[Group, int]] | None:
        if not levels[key]:
            return None
        lo, hi = key[1] - kept[key], key[1] - levels[key][0]
        return [(g, a) for g in classes[key] for a in order[g.name][lo:hi]]

    def step_score(key, atoms) -> float:
        return sum(float(scores.values[g.name][a]) for g, a in atoms)

    def step_size(atoms) -> int:
        d_total, d_linear = sizes.delta(atoms)
        return d_total if basis == "model" else d_linear

    heap = []
    for i, key in enumerate(sorted(classes)):
        atoms = step(key)
        if atoms:
            heapq.heappush(heap, (step_score(key, atoms), i, key))
    gone, closed = 0, []
    while gone < goal and (heap or closed):
        if heap:
            _, i, key = heapq.heappop(heap)
        else:  # only over-large steps are left: the smallest of them reaches the goal
            i, key = min(closed, key=lambda c: step_size(step(c[1])))
        atoms = step(key)
        size = step_size(atoms)
        if heap and gone + size > goal and size > min(step_size(step(k)) for _, _, k in heap):
            closed.append((i, key))  # a big step would overshoot; smaller steps of other classes fill the rest
            continue
        closed = [c for c in closed if c[1] != key]
        sizes.remove(atoms)
        for g, a in atoms:
            removed[g.name].append(a)
        kept[key] = levels[key].pop(0)
        gone = start - (sizes.total if basis == "model" else sizes.linear_total)
        nxt = step(key)
        if nxt:
            heapq.heappush(heap, (step_score(key, nxt), i, key))
    if gone < goal:
        raise ValueError(
            f"cannot remove {ratio:.3f} of the {basis} parameters uniformly with kinds={kinds}, "
            f"multiple={multiple} and min_atoms={min_atoms}: at most {gone / start:.3f} is removable; allow "
            "more kinds, a smaller multiple or min_atoms, or lower the ratio"
        )
    return plan_from_removed(analysis, removed, target=float(ratio), basis=basis, method=scores.method)
