"""Shared checks for the core tests: analyse a model, zero atoms, compare logits."""

from __future__ import annotations

import torch
from surgeon_fx.passes import annotate_groups, get_groups

import surgeon_fx as sf


def analyse(model: torch.nn.Module, **kw):
    gm = sf.trace(model)
    annotate_groups(gm, **kw)
    return gm, get_groups(gm)


def zero_atoms_(model: torch.nn.Module, analysis, removed: dict[str, list[int]]) -> None:
    """Zero every member slice of the given atoms in ``model`` (in place)."""
    with torch.no_grad():
        for name, atoms in removed.items():
            g = analysis.group(name)
            for m in g.members:
                w = model.get_parameter(m.param)
                idx = torch.tensor([i for a in atoms for i in m.indices[a]])
                w.index_fill_(m.axis, idx, 0.0)


def pick_atoms(analysis, kinds=("heads", "mlp"), per_group: int = 1, stride: int = 3) -> dict[str, list[int]]:
    """A deterministic choice of atoms in every group of the given kinds (never all of a group)."""
    out = {}
    for g in analysis.groups:
        if g.kind in kinds:
            k = min(per_group, g.n_atoms - 1)
            out[g.name] = sorted({(1 + stride * i) % g.n_atoms for i in range(k)})
    return out


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
