"""Metadata keys shared by every pass, and the accessor that reads them.

Reads: nothing. Writes: nothing. Invariant: every whole-graph fact a pass stores lives in
``gm.meta[KEY]`` under one of the constants below, as a frozen dataclass (or a tuple of them).
"""

from __future__ import annotations

from typing import Any

from torch import fx

__all__ = [
    "SOURCE",
    "GROUPS",
    "CURVATURE",
    "SCORES",
    "PLAN",
    "MASKS",
    "require",
    "SurgeonError",
    "UnsupportedGraphError",
]

SOURCE = "surgeon_fx.source"
"""How the graph was traced (:class:`surgeon_fx.ir.TraceInfo`); written by :func:`surgeon_fx.trace`."""
GROUPS = "surgeon_fx.groups"
"""The dependency analysis (:class:`surgeon_fx.ir.Analysis`); written by ``annotate_groups``."""
CURVATURE = "surgeon_fx.curvature"
"""K-FAC factors of every layer the groups touch (:class:`surgeon_fx.passes.curvature.Curvature`);
written by ``annotate_curvature``."""
SCORES = "surgeon_fx.scores"
"""Per-atom removal scores (:class:`surgeon_fx.ir.Scores`); written by ``annotate_scores``."""
PLAN = "surgeon_fx.plan"
"""What to remove (:class:`surgeon_fx.ir.Plan`); written by ``annotate_plan``."""
MASKS = "surgeon_fx.masks"
"""Which weights are zero by sparsity (:class:`surgeon_fx.passes.sparsity.Masks`); written by
``annotate_masks`` and by ``apply_sparsegpt_``."""


class SurgeonError(RuntimeError):
    """Base class of the errors this package raises for graphs it cannot handle."""


class UnsupportedGraphError(SurgeonError):
    """The graph holds an op or a pattern the dependency analysis has no rule for."""


def require(gm: fx.GraphModule, key: str, *, producer: str) -> Any:
    """Return ``gm.meta[key]`` or fail with a message naming the pass that writes it.

    Raises:
        KeyError: the key is missing; the message says which pass to run first.
    """
    meta = getattr(gm, "meta", None) or {}
    if key not in meta:
        raise KeyError(f"{key!r} is not on this graph module; run `{producer}` on it first")
    return meta[key]
