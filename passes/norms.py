"""Keep root-mean-square statistics unchanged when channels leave the axis they are taken over.

Reads: ``gm.meta[GROUPS]`` and a plan. Writes: the values of the scale parameters of RMS-style
normalisations (in place, hence the underscore); shapes and ``gm.code`` are unchanged.
Invariant: after :func:`~surgeon_fx.passes.apply_plan`, each such normalisation computes what the
unpruned one computes with the removed channels set to zero (up to its epsilon), instead of
dividing by a mean over fewer channels.

Why: an RMS normalisation divides by ``sqrt(mean(x^2) + eps)``. Removing ``k`` of ``n`` channels
turns the mean's divisor from ``n`` into ``n - k``, so every normalised activation shrinks by about
``sqrt((n - k) / n)`` (11% at ``k = n / 5``), in every layer at once; nothing in the removal costs
models that. Multiplying the normalisation's scale by ``sqrt(n / (n - k))`` undoes it exactly:
``w s x / sqrt(sum_kept x^2 / (n - k) + eps) = w x / sqrt(sum_kept x^2 / n + eps (n - k) / n)``.

The pattern is found in the graph, not by module type: a ``mean`` over a pruned axis whose result
reaches an ``rsqrt`` through elementwise ops, and a ``mul`` by a parameter of that same axis after
the ``rsqrt``. Layer norms exported as one op (``native_layer_norm``) subtract a mean as well and are
left alone.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from surgeon_fx.ir import Plan

from .groups import get_groups
from .rewrite import kept_indices, removed_labels

__all__ = ["rescale_norms_"]

aten = torch.ops.aten
_PASS = {aten.add, aten.mul, aten.sub, aten.div, aten._to_copy, aten.to, aten.type_as, aten.clone, aten.expand}


def _packet(n: fx.Node):
    return getattr(n.target, "overloadpacket", None) if n.op == "call_function" else None


def _forward(start: fx.Node, stop, depth: int) -> list[fx.Node]:
    """Nodes reachable from ``start`` through pass-through ops, up to ``depth`` steps, that satisfy ``stop``."""
    found, frontier, seen = [], [start], {start}
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                if stop(u):
                    found.append(u)
                elif _packet(u) in _PASS:
                    nxt.append(u)
        frontier = nxt
    return found


@torch.no_grad()
def rescale_norms_(gm: fx.GraphModule, plan: Plan) -> list[tuple[str, float]]:
    """Scale RMS-normalisation weights by ``sqrt(n / (n - k))`` for the channels ``plan`` removes.

    Call it after any OBS update and before :func:`~surgeon_fx.passes.apply_plan` (it changes the
    current, unsliced parameters, which the eager model shares).

    Returns:
        ``[(parameter FQN, factor)]`` for every scale parameter changed.
    """
    analysis = get_groups(gm)
    gone = removed_labels(gm, analysis, plan)
    if not gone.any():
        return []
    fqn_of = {t: f for f, t in analysis.param_targets.items()}
    params = {n: n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target in fqn_of}
    done: dict[str, float] = {}
    for node in gm.graph.nodes:
        if _packet(node) is not aten.mean:
            continue
        x = node.args[0]
        r = len(x.meta["val"].shape)
        dims = node.args[1] if len(node.args) > 1 else list(range(r))
        dims = [d % r for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if len(dims) != 1:
            continue
        kept = kept_indices(analysis, x.name, dims[0], gone)
        n = int(x.meta["val"].shape[dims[0]])
        if kept is None or len(kept) in (0, n):
            continue
        factor = math.sqrt(n / len(kept))
        for rs in _forward(node, lambda u: _packet(u) is aten.rsqrt, 3):
            for mul in _forward(rs, lambda u: _packet(u) is aten.mul and any(a in params for a in u.args), 4):
                for a in mul.args:
                    if a not in params or fqn_of[params[a]] in done:
                        continue
                    w = gm.get_parameter(params[a])
                    if w.dim() != 1 or w.shape[0] != n:
                        continue
                    mine = kept_indices(analysis, a.name, 0, gone)
                    if mine is None or len(mine) != len(kept) or (mine != kept).any():
                        continue  # a parameter of another axis that happens to have the same size
                    w.mul_(factor)
                    done[fqn_of[params[a]]] = factor
    return sorted(done.items())
