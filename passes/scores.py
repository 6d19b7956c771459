"""Removal scores for every atom of every group (the cheap baseline: weight magnitude).

Reads: ``gm.meta[GROUPS]`` and the parameters of ``gm``. Writes: ``gm.meta[SCORES]``, a
:class:`~surgeon_fx.ir.Scores`. Leaves ``gm.code`` unchanged. Invariant: one finite, non-negative
score per atom; lower means cheaper to remove. Curvature-based costs (K-FAC) write the same key.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import fx

from surgeon_fx.ir import Analysis, Scores
from surgeon_fx.keys import SCORES

from .groups import get_groups

__all__ = ["annotate_scores", "magnitude_scores", "SCORE_METHODS"]


def _per_index_sq(w: torch.Tensor) -> list[np.ndarray]:
    """For every axis of ``w``, the sum of squares over the other axes (one value per index)."""
    sq = w.detach().float().square()
    out = []
    for axis in range(w.dim()):
        other = [a for a in range(w.dim()) if a != axis]
        out.append((sq.sum(dim=other) if other else sq).double().cpu().numpy())
    return out


def magnitude_scores(gm: fx.GraphModule, analysis: Analysis) -> dict[str, np.ndarray]:
    """Mean squared weight of each atom over all of its member slices."""
    params = dict(gm.named_parameters(remove_duplicate=False))
    cache: dict[str, list[np.ndarray]] = {}
    out = {}
    for g in analysis.groups:
        total = np.zeros(g.n_atoms)
        for m in g.members:
            if m.param not in cache:
                cache[m.param] = _per_index_sq(params[analysis.param_targets[m.param]])
            total += cache[m.param][m.axis][np.asarray(m.indices)].sum(axis=1)
        out[g.name] = total / max(g.atom_numel, 1)
    return out


SCORE_METHODS = {"magnitude": magnitude_scores}


def annotate_scores(gm: fx.GraphModule, *, method: str = "magnitude") -> None:
    """Score every atom of every group found by ``annotate_groups``.

    Args:
        gm: an annotated graph (run ``annotate_groups`` first).
        method: ``"magnitude"`` (mean squared weight of the atom).

    Raises:
        KeyError: the groups are missing.
        ValueError: unknown method.
    """
    if method not in SCORE_METHODS:
        raise ValueError(f"unknown score method {method!r}; choose one of {sorted(SCORE_METHODS)}")
    analysis = get_groups(gm)
    values = SCORE_METHODS[method](gm, analysis)
    gm.meta[SCORES] = Scores(method, {k: tuple(float(x) for x in v) for k, v in values.items()})
