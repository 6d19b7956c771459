"""The intermediate results the passes exchange: traced-model info, groups, scores and plans.

Reads: nothing. Writes: nothing. Invariant: every type here is a frozen dataclass that refers to
parameters by their fully-qualified name (FQN) in the *user's* model, never to FX nodes, so a
:class:`Plan` round-trips through JSON and applies to a re-traced graph or the eager module alike.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TraceInfo", "Member", "Group", "Analysis", "Scores", "Plan", "KINDS"]

KINDS = ("heads", "mlp", "residual")
"""Structure kinds the analysis names: ``heads`` (atoms that a reshape splits into (heads, head_dim):
attention heads, or KV groups with their query heads), ``residual`` (channels of the stream that
starts at the token embedding) and ``mlp`` (every other hidden unit, e.g. of a feed-forward block)."""


@dataclass(frozen=True)
class TraceInfo:
    """How :func:`surgeon_fx.trace` produced a graph.

    Attributes:
        prefix: prefix of every parameter target in the graph (the tracing wrapper's attribute).
        model_class: ``module.qualname`` of the traced model.
        is_hf: whether the model is a Hugging Face ``PreTrainedModel`` (traced as ``input_ids -> logits``).
        example_shape: (batch, sequence) of the example input used for tracing.
        vocab_size: largest token id + 1 the model accepts, if known.
    """

    prefix: str
    model_class: str
    is_hf: bool
    example_shape: tuple[int, int]
    vocab_size: int | None = None


@dataclass(frozen=True)
class Member:
    """One parameter axis touched by a group: ``indices[a]`` are the indices atom ``a`` owns."""

    param: str
    axis: int
    indices: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Group:
    """A set of interchangeable, independently removable atoms of one structure.

    Every atom couples the listed slices of every member parameter: removing atom ``a`` removes
    ``member.indices[a]`` along ``member.axis`` of every ``member.param`` at once.

    Attributes:
        name: ``"<module>/<kind>"``, unique within a model.
        kind: one of :data:`KINDS`.
        module: the longest module path shared by all member parameters ("" for the whole model).
        members: the coupled parameter slices.
        atom_numel: parameter elements removed with one atom (computed on the full model).
        approximations: why removing an atom is not exactly equivalent to zeroing it, if it is not
            (e.g. a normalisation statistic over the axis), one entry per cause.
    """

    name: str
    kind: str
    module: str
    members: tuple[Member, ...]
    atom_numel: int
    approximations: tuple[str, ...] = ()

    @property
    def n_atoms(self) -> int:
        return len(self.members[0].indices) if self.members else 0

    @property
    def atom_width(self) -> int:
        """Indices one atom owns along its widest member axis (e.g. query heads x head_dim)."""
        return max(len(m.indices[0]) for m in self.members)

    def describe(self) -> str:
        """A few lines a person can read: the structure, its size and every slice it touches."""
        lines = [f"{self.name}: {self.n_atoms} atoms of kind {self.kind!r}, {self.atom_numel} parameters each"]
        for m in self.members:
            lines.append(f"  {m.param}[axis {m.axis}]: {len(m.indices[0])} indices per atom")
        for a in self.approximations:
            lines.append(f"  approximate: {a}")
        return "\n".join(lines)


@dataclass(frozen=True, eq=False)
class Analysis:
    """Result of ``annotate_groups``: the groups plus the slot bookkeeping the rewrite needs.

    ``spaces`` maps a node name to, per axis of its output, ``(first slot, size)`` or ``None`` for
    axes that are symbolic or of size 1; ``label`` is the connected component of every slot;
    ``param_targets`` maps a parameter FQN (in the user's model) to the graph target holding it;
    ``frozen`` maps a frozen component to the reason it may not be removed; ``linear_params`` are
    the weights and biases of the decoder linear layers (both weight axes prunable).
    """

    groups: tuple[Group, ...]
    spaces: dict[str, tuple[tuple[int, int] | None, ...]]
    label: Any  # numpy int array: connected component of every slot
    param_targets: dict[str, str]
    param_shapes: dict[str, tuple[int, ...]]
    param_numel: dict[str, int]
    linear_params: frozenset[str]
    frozen: dict[int, str] = field(default_factory=dict)

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no group named {name!r}; known groups: {[g.name for g in self.groups]}")

    def summary(self) -> str:
        """A table with one row per group: module, kind, atoms, atom width, parameters per atom."""
        rows = [("group", "kind", "atoms", "width", "params/atom", "touches")]
        for g in self.groups:
            touched = sorted({m.param.rsplit(".", 1)[0] for m in g.members})
            short = ", ".join(t[len(g.module) :].lstrip(".") or t for t in touched[:4])
            if len(touched) > 4:
                short += f", ... ({len(touched)} modules)"
            rows.append((g.module or "<model>", g.kind, str(g.n_atoms), str(g.atom_width), str(g.atom_numel), short))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        out.insert(1, "  ".join("-" * w for w in widths))
        total = sum(self.param_numel.values())
        out.append(f"{len(self.groups)} groups; {total:,} parameters in the graph")
        return "\n".join(out)


@dataclass(frozen=True)
class Scores:
    """Removal cost of every atom, ``values[group name][a]``; lower means cheaper to remove."""

    method: str
    values: dict[str, tuple[float, ...]]


@dataclass(frozen=True)
class Plan:
    """What to remove, keyed by parameter FQN + axis + kept indices.

    Attributes:
        keep: ``{param FQN: {axis: kept indices}}`` for every parameter that shrinks.
        removed: ``{group name: removed atom ids}``.
        params_before / params_after: parameter count of the whole model.
        linear_before / linear_after: parameters of the decoder linear layers (biases included),
            the count published pruning tables use.
        target: the requested ratio and its basis (``"model"`` or ``"linear"``).
    """

    keep: dict[str, dict[int, tuple[int, ...]]]
    removed: dict[str, tuple[int, ...]]
    params_before: int
    params_after: int
    linear_before: int
    linear_after: int
    target: float = 0.0
    basis: str = "model"
    method: str = ""

    @property
    def ratio(self) -> float:
        """Fraction of the whole model's parameters removed."""
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def linear_ratio(self) -> float:
        """Fraction of the decoder linear layers' parameters removed."""
        return 1.0 - self.linear_after / self.linear_before if self.linear_before else 0.0

    @property
    def is_empty(self) -> bool:
        return not any(self.removed.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "surgeon_fx.plan/1",
            "keep": {p: {str(ax): list(ix) for ax, ix in axes.items()} for p, axes in self.keep.items()},
            "removed": {g: list(a) for g, a in self.removed.items()},
            "params_before": self.params_before,
            "params_after": self.params_after,
            "linear_before": self.linear_before,
            "linear_after": self.linear_after,
            "target": self.target,
            "basis": self.basis,
            "method": self.method,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        if d.get("format") != "surgeon_fx.plan/1":
            raise ValueError(f"not a surgeon_fx plan (format={d.get('format')!r})")
        return cls(
            keep={p: {int(ax): tuple(ix) for ax, ix in axes.items()} for p, axes in d["keep"].items()},
            removed={g: tuple(a) for g, a in d["removed"].items()},
            params_before=d["params_before"],
            params_after=d["params_after"],
            linear_before=d["linear_before"],
            linear_after=d["linear_after"],
            target=d.get("target", 0.0),
            basis=d.get("basis", "model"),
            method=d.get("method", ""),
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    def summary(self, per_group: bool = False) -> str:
        """Before/after parameter counts both ways, atoms removed per structure kind, and with
        ``per_group`` one row per group that loses atoms."""

        def pct(a: int, b: int) -> str:
            return f"{100.0 * (1 - a / b):.1f}%" if b else "-"

        lines = [
            f"plan ({self.method or 'custom'}): target {self.target:.3f} of {self.basis} parameters",
            f"  whole model:    {self.params_before:>12,} -> {self.params_after:>12,}"
            f"  ({pct(self.params_after, self.params_before)} removed)",
            f"  decoder linear: {self.linear_before:>12,} -> {self.linear_after:>12,}"
            f"  ({pct(self.linear_after, self.linear_before)} removed)",
        ]
        by_kind: dict[str, list[int]] = {}
        for g, atoms in self.removed.items():
            kind = g.rsplit("/", 1)[-1].split("#")[0]
            acc = by_kind.setdefault(kind, [0, 0])
            acc[0] += len(atoms)
            acc[1] += bool(atoms)
        for kind, (n, groups) in sorted(by_kind.items()):
            lines.append(f"  {kind}: {n} atom(s) removed from {groups} group(s)")
        if per_group:
            for g, atoms in sorted(self.removed.items()):
                if atoms:
                    lines.append(f"    {g}: remove {len(atoms)} atom(s)")
        return "\n".join(lines)


def _prod(xs) -> int:
    return math.prod(int(x) for x in xs)
