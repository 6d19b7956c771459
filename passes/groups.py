"""Dependency analysis: find every coupled, removable structure of a traced model.

Reads: a ``GraphModule`` from :func:`surgeon_fx.trace` (``meta['val']`` on every node).
Writes: ``gm.meta[GROUPS]``, an :class:`~surgeon_fx.ir.Analysis`. Leaves ``gm.code`` unchanged.
Invariant: coupling is derived from the graph alone through the per-op rules in
:mod:`surgeon_fx.passes.rules`; there are no model-name checks.

Every index of every concrete axis of every tensor is a *slot*; rules unite slots that must be
removed together; connected components of that relation that contain parameter indices and no
frozen slot are the *atoms* (one attention head or KV group, one MLP unit, one residual channel).
Atoms touching the same parameter axes with the same widths form a :class:`~surgeon_fx.ir.Group`.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import fx

from surgeon_fx.ir import Analysis, Group, Member
from surgeon_fx.keys import GROUPS, SOURCE, UnsupportedGraphError

from .rules import DEFAULT_RULES, SlotContext

__all__ = ["annotate_groups", "get_groups", "param_fqns", "param_aliases"]

aten = torch.ops.aten


def param_fqns(gm: fx.GraphModule) -> dict[str, str]:
    """Map each parameter FQN in the user's model to its ``get_attr`` target in ``gm``.

    Tied parameters (one tensor under several names) appear once, under the first name the graph
    reads them by; :func:`param_aliases` lists the other names.
    """
    prefix = gm.meta[SOURCE].prefix if SOURCE in getattr(gm, "meta", {}) else ""
    params = dict(gm.named_parameters(remove_duplicate=False))
    out: dict[str, str] = {}
    seen: set[int] = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target in params and id(params[n.target]) not in seen:
            seen.add(id(params[n.target]))
            fqn = n.target[len(prefix) :] if n.target.startswith(prefix) else n.target
            out[fqn] = n.target
    return out


def param_aliases(gm: fx.GraphModule) -> dict[str, tuple[str, ...]]:
    """Every name of every parameter tensor of ``gm`` (prefix stripped), keyed by the first name."""
    prefix = gm.meta[SOURCE].prefix if SOURCE in getattr(gm, "meta", {}) else ""
    by_id: dict[int, list[str]] = defaultdict(list)
    for name, p in gm.named_parameters(remove_duplicate=False):
        by_id[id(p)].append(name[len(prefix) :] if name.startswith(prefix) else name)
    return {names[0]: tuple(names) for names in by_id.values()}


def _lookup(rules: dict, node: fx.Node):
    rule = rules.get(node.target)
    if rule is None:
        rule = rules.get(getattr(node.target, "overloadpacket", None))
    return rule


def annotate_groups(gm: fx.GraphModule, *, rules: dict | None = None, on_unknown: str = "error") -> None:
    """Annotate ``gm`` with its groups of coupled, removable structures.

    Args:
        gm: a graph from :func:`surgeon_fx.trace` (any ``GraphModule`` whose nodes carry ``meta['val']``).
        rules: op -> rule table; defaults to :data:`surgeon_fx.passes.rules.DEFAULT_RULES`.
        on_unknown: ``"error"`` (default) raises on an op without a rule that touches a prunable
            axis; ``"freeze"`` keeps every index such an op touches and records why.

    Raises:
        UnsupportedGraphError: an op has no rule (naming the node), or a rule cannot handle a node.
        ValueError: ``on_unknown`` is not ``"error"`` or ``"freeze"``.
    """
    if on_unknown not in ("error", "freeze"):
        raise ValueError(f"on_unknown must be 'error' or 'freeze', got {on_unknown!r}")
    rules = DEFAULT_RULES if rules is None else rules
    ctx = SlotContext()
    nodes = list(gm.graph.nodes)
    for n in nodes:
        ctx.add_node(n)
    targets = param_fqns(gm)
    params = dict(gm.named_parameters(remove_duplicate=False))
    canonical = {id(params[t]): f for f, t in targets.items()}
    fqn_of = {t: canonical[id(p)] for t, p in params.items() if id(p) in canonical}
    param_nodes = [n for n in nodes if n.op == "get_attr" and n.target in fqn_of]
    first: dict[str, fx.Node] = {}
    for n in param_nodes:  # one tensor read by several get_attr nodes (tied weights): same slots
        key = fqn_of[n.target]
        if key in first:
            for ax in range(ctx.rank(n)):
                ctx.unite(first[key], ax, n, ax)
        first.setdefault(key, n)
    embedding_weights: set[str] = set()
    linear_weights: list[tuple[fx.Node, fx.Node | None]] = []
    for n in nodes:
        if n.op == "placeholder":
            ctx.freeze(n, None, f"{n.name}: graph input") if ctx.is_tensor(n) else None
        elif n.op == "get_attr":
            if ctx.is_tensor(n) and n.target not in fqn_of:
                ctx.freeze(n, None, f"{n.target}: buffer or constant (only parameters are sliced)")
        elif n.op == "output":
            for a in torch.utils._pytree.tree_leaves(n.args):
                if ctx.is_tensor(a):
                    ctx.freeze(a, None, f"{a.name}: reaches the graph output")
        else:  # call_function, or call_module such as the guard function export inserts
            rule = _lookup(rules, n) if n.op == "call_function" else None
            touches = ctx.is_tensor(n) and any(s is not None for s in ctx.spaces[n.name])
            touches = touches or any(
                ctx.is_tensor(a) and any(s is not None for s in ctx.spaces[a.name])
                for a in torch.utils._pytree.tree_leaves((n.args, n.kwargs))
            )
            if rule is None:
                if not touches:
                    continue
                if on_unknown == "error":
                    raise UnsupportedGraphError(
                        f"no dependency rule for op {n.target} at node `{n.format_node()}` "
                        f"(from: {_where(n)}). Pass on_unknown='freeze' to keep every index it "
                        "touches, or add a rule: annotate_groups(gm, rules={**DEFAULT_RULES, op: fn})."
                    )
                for a in [n, *torch.utils._pytree.tree_leaves((n.args, n.kwargs))]:
                    if ctx.is_tensor(a):
                        ctx.freeze(a, None, f"{n.name}: op {n.target} has no dependency rule")
                continue
            try:
                rule(ctx, n)
            except (NotImplementedError, ValueError, IndexError, TypeError) as e:
                raise UnsupportedGraphError(
                    f"dependency rule for {n.target} failed at node `{n.format_node()}` ({_where(n)}): {e}"
                ) from e
            packet = getattr(n.target, "overloadpacket", None)
            if packet is aten.embedding and isinstance(n.args[0], fx.Node) and n.args[0].target in fqn_of:
                embedding_weights.add(fqn_of[n.args[0].target])
            if packet is aten.linear:
                b = n.args[2] if len(n.args) > 2 else None
                linear_weights.append((n.args[1], b))
            elif packet is aten.addmm:
                linear_weights.append((n.args[2], n.args[0]))
            elif packet is aten.mm:
                linear_weights.append((n.args[1], None))

    u, v = ctx.edges()
    graph = coo_matrix((np.ones(len(u), np.int8), (u, v)), shape=(ctx.n, ctx.n))
    _, label = connected_components(graph, directed=False)
    frozen: dict[int, str] = {}
    for slots, reason in ctx.frozen:
        for lab in np.unique(label[slots]):
            frozen.setdefault(int(lab), reason)
    approx: dict[int, list[str]] = defaultdict(list)
    for slots, reason in ctx.approx:
        for lab in np.unique(label[slots]):
            if len(approx[int(lab)]) < 64:
                approx[int(lab)].append(reason)

    head_labels = {int(x) for sl in ctx.heads for x in np.unique(label[sl])}
    frozen_labels = np.fromiter(frozen, dtype=label.dtype, count=len(frozen))
    # atoms: component label -> [(param, axis, indices)]
    atoms: dict[int, list[tuple[str, int, tuple[int, ...]]]] = defaultdict(list)
    numel: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    order: dict[str, int] = {}
    for n in param_nodes:
        fqn = fqn_of[n.target]
        if fqn in numel:
            continue
        order[fqn] = len(order)
        shapes[fqn] = tuple(int(d) for d in n.meta["val"].shape)
        numel[fqn] = math.prod(shapes[fqn])
        for ax, sp in enumerate(ctx.spaces.get(n.name, ())):
            if sp is None:
                continue
            labs = label[sp[0] : sp[0] + sp[1]]
            pos = np.flatnonzero(~np.isin(labs, frozen_labels))  # frozen slots form no atoms
            srt = pos[np.argsort(labs[pos], kind="stable")]  # stable: indices ascend within a label
            uniq, starts = np.unique(labs[srt], return_index=True)
            flat, bounds = srt.tolist(), [*starts.tolist(), len(srt)]
            for k, lab in enumerate(uniq.tolist()):
                atoms[lab].append((fqn, ax, tuple(flat[bounds[k] : bounds[k + 1]])))

    by_sig: dict[tuple, list[int]] = defaultdict(list)
    for lab, mem in atoms.items():
        mem.sort(key=lambda m: (order[m[0]], m[1]))
        by_sig[tuple((p, ax, len(ix)) for p, ax, ix in mem)].append(lab)

    groups = []
    names: set[str] = set()
    for sig, labs in sorted(by_sig.items(), key=lambda kv: (order[kv[0][0][0]], kv[0][0][1])):
        labs.sort(key=lambda lab: atoms[lab][0][2][0])
        members = tuple(Member(p, ax, tuple(atoms[lab][k][2] for lab in labs)) for k, (p, ax, _) in enumerate(sig))
        if any(p in embedding_weights for p, _, _ in sig):
            kind = "residual"
        elif labs[0] in head_labels:
            kind = "heads"
        else:
            kind = "mlp"
        module = _common_module([p for p, _, _ in sig])
        name = f"{module}/{kind}"
        k = 2
        while name in names:
            name, k = f"{module}/{kind}#{k}", k + 1
        names.add(name)
        atom_numel = sum(w * numel[p] // shapes[p][ax] for p, ax, w in sig)
        reasons = sorted({r for lab in labs for r in approx.get(lab, ())})
        groups.append(Group(name, kind, module, members, atom_numel, tuple(reasons[:8])))

    linear = set()
    for w, b in linear_weights:
        if isinstance(w, fx.Node) and w.target in fqn_of:
            sp = ctx.spaces.get(w.name, ())
            if sp and all(s is not None and int(label[s[0]]) not in frozen for s in sp):
                linear.add(fqn_of[w.target])
                if isinstance(b, fx.Node) and b.target in fqn_of:
                    linear.add(fqn_of[b.target])

    gm.meta[GROUPS] = Analysis(
        groups=tuple(groups),
        spaces=dict(ctx.spaces),
        label=label,
        param_targets=targets,
        param_shapes=shapes,
        param_numel=numel,
        linear_params=frozenset(linear),
        frozen=frozen,
    )


def get_groups(gm: fx.GraphModule) -> Analysis:
    """The analysis ``annotate_groups`` stored on ``gm`` (raises ``KeyError`` saying to run it)."""
    from surgeon_fx.keys import require

    return require(gm, GROUPS, producer="annotate_groups")


def _common_module(params: list[str]) -> str:
    parts = [p.split(".")[:-1] for p in params]
    common = parts[0]
    for p in parts[1:]:
        k = 0
        while k < min(len(common), len(p)) and common[k] == p[k]:
            k += 1
        common = common[:k]
    return ".".join(common)


def _where(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    if stack:
        path, cls = list(stack.values())[-1]
        return f"module {path} ({cls})"
    return "top level"
