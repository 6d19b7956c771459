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


def _member_sq(w: torch.Tensor, axis: int, indices: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """Sum of squares of each atom's slice of ``w`` along ``axis``."""
    other = [a for a in range(w.dim()) if a != axis]
    per_index = w.detach().double().pow(2).sum(dim=other) if other else w.detach().double().pow(2)
    per_index = per_index.cpu().numpy()
    idx = np.asarray(indices)
    return per_index[idx].sum(axis=1)


def magnitude_scores(gm: fx.GraphModule, analysis: Analysis) -> dict[str, np.ndarray]:
    """Mean squared weight of each atom over all of its member slices."""
    params = dict(gm.named_parameters(remove_duplicate=False))
    out = {}
    for g in analysis.groups:
        total = np.zeros(g.n_atoms)
        for m in g.members:
            w = params[analysis.param_targets[m.param]]
            total += _member_sq(w, m.axis, m.indices)
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
