"""Rewrite: physically remove what a plan says, from the graph and its parameters.

Reads: ``gm.meta[GROUPS]`` (slot bookkeeping) and a :class:`~surgeon_fx.ir.Plan`.
Writes: a new ``GraphModule`` with sliced parameters, retargeted shape constants and fresh
``meta['val']``; the input graph is left untouched. Invariant: the new graph computes what the old
one computes with the removed structures deleted (exactly so when they were zero, up to the
normalisation statistics recorded as approximations).

Before/after for one attention block that loses one of its four heads::

    linear = aten.linear(x, q_proj.weight)                  # q_proj.weight: (64, 64) -> (48, 64)
    view   = aten.view(linear, [b, s, -1, 16])              # (b, s, 4, 16) -> (b, s, 3, 16)
    expand = aten.expand(k, [b, 2, 2, s, 16])               # GQA: [b, 2, 2, ...] -> [b, 1, 2, ...] when a KV group goes
"""

from __future__ import annotations

import copy
import operator
import warnings

import numpy as np
import torch
from torch import fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from surgeon_fx.ir import Analysis, Plan
from surgeon_fx.keys import CURVATURE, GROUPS, MASKS, PLAN, SCORES, SurgeonError

from .groups import get_groups

__all__ = ["apply_plan", "removed_labels", "kept_indices", "ARG_RULES"]

aten = torch.ops.aten


def removed_labels(gm: fx.GraphModule, analysis: Analysis, plan: Plan) -> np.ndarray:
    """Boolean mask over components: which ones the plan removes. Checks the plan against the coupling.

    Raises:
        KeyError: the plan names a parameter the graph does not hold.
        ValueError: the plan removes a frozen index, or keeps part of a coupled structure it removes.
    """
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "get_attr"}
    gone: set[int] = set()
    for p, axes in plan.keep.items():
        if p not in analysis.param_targets:
            raise KeyError(f"the plan names parameter {p!r}, which this graph does not hold")
        node = nodes[analysis.param_targets[p]]
        for ax, kept in axes.items():
            sp = analysis.spaces[node.name][ax]
            if sp is None:
                raise ValueError(f"{p} axis {ax} cannot be pruned (symbolic or of size 1)")
            mask = np.ones(sp[1], bool)
            mask[list(kept)] = False
            labs = set(int(x) for x in np.unique(analysis.label[sp[0] : sp[0] + sp[1]][mask]))
            frozen = labs & analysis.frozen.keys()
            if frozen:
                raise ValueError(
                    f"the plan removes indices of {p} axis {ax} that may not be removed: {analysis.frozen[min(frozen)]}"
                )
            gone |= labs
    mask = np.zeros(int(analysis.label.max()) + 1 if len(analysis.label) else 0, bool)
    mask[list(gone)] = True
    # every parameter slot of a removed component must be removed by the plan
    for p, target in analysis.param_targets.items():
        node = nodes[target]
        for ax, sp in enumerate(analysis.spaces.get(node.name, ())):
            if sp is None:
                continue
            hit = mask[analysis.label[sp[0] : sp[0] + sp[1]]]
            if not hit.any():
                continue
            kept = np.zeros(sp[1], bool)
            kept[list(plan.keep.get(p, {}).get(ax, range(sp[1])))] = True
            bad = np.nonzero(hit & kept)[0]
            if len(bad):
                raise ValueError(
                    f"the plan keeps index {bad[0]} of {p} axis {ax}, but it is coupled to indices the plan "
                    "removes; build plans with make_plan/plan_from_removed on the same model"
                )
    return mask


def kept_indices(analysis: Analysis, node_name: str, axis: int, gone: np.ndarray) -> np.ndarray | None:
    """Indices of ``node_name``'s axis that survive (``gone``: mask of removed components), or
    ``None`` for an axis without slots."""
    sp = analysis.spaces.get(node_name, ())[axis] if node_name in analysis.spaces else None
    if sp is None:
        return None
    return np.nonzero(~gone[analysis.label[sp[0] : sp[0] + sp[1]]])[0]


# -- shape-constant retargeting, one rule per op that carries sizes in its arguments -------------------
def _new_shape(a: Analysis, node: fx.Node, gone: np.ndarray) -> list:
    shape = list(node.meta["val"].shape)
    for ax in range(len(shape)):
        k = kept_indices(a, node.name, ax, gone)
        if k is not None:
            shape[ax] = len(k)
    return shape


def _retarget_size_list(a, node, gone, pos: int):
    old = node.args[pos]
    if not isinstance(old, (list, tuple)):
        return
    new_shape = _new_shape(a, node, gone)
    new = list(old)
    for i, v in enumerate(old):
        if isinstance(v, int) and v != -1 and i < len(new_shape):
            new[i] = int(new_shape[i])
    if new != list(old):
        args = list(node.args)
        args[pos] = type(old)(new) if isinstance(old, tuple) else new
        node.args = tuple(args)


def _shape_arg(a, node, gone):
    _retarget_size_list(a, node, gone, 1)


def _creation(a, node, gone):
    if node.args and isinstance(node.args[0], (list, tuple)):
        _retarget_size_list(a, node, gone, 0)


def _new_creation(a, node, gone):
    if len(node.args) > 1:
        _retarget_size_list(a, node, gone, 1)


def _count_before(kept: np.ndarray, i: int) -> int:
    return int(np.searchsorted(kept, i))


def _slice(a, node, gone):
    x = node.args[0]
    r = len(x.meta["val"].shape)
    d = (node.args[1] if len(node.args) > 1 else 0) % r
    kept = kept_indices(a, x.name, d, gone)
    if kept is None:
        return
    size = int(x.meta["val"].shape[d])
    args = list(node.args) + [None] * (5 - len(node.args))
    start = args[2] if args[2] is not None else 0
    end = args[3] if args[3] is not None else size
    start = start + size if start < 0 else min(start, size)
    end = end + size if end < 0 else min(end, size)
    args[2], args[3] = _count_before(kept, start), _count_before(kept, end)
    node.args = tuple(args[: max(len(node.args), 4)])


def _split(a, node, gone):
    x = node.args[0]
    r = len(x.meta["val"].shape)
    d = (node.args[2] if len(node.args) > 2 else 0) % r
    kept = kept_indices(a, x.name, d, gone)
    if kept is None:
        return
    sizes, off = [], 0
    for v in node.meta["val"]:
        n = int(v.shape[d])
        sizes.append(_count_before(kept, off + n) - _count_before(kept, off))
        off += n
    if node.target is aten.split.Tensor and len(set(sizes[:-1])) <= 1 and sizes[-1] <= sizes[0]:
        node.args = (x, sizes[0], *node.args[2:]) if len(node.args) > 2 else (x, sizes[0])
    else:
        node.target = aten.split_with_sizes.default
        node.args = (x, sizes, d)


def _layer_norm(a, node, gone):
    shape = node.args[1]
    new_shape = _new_shape(a, node, gone)
    k = len(shape)
    args = list(node.args)
    args[1] = [int(s) for s in new_shape[-k:]]
    node.args = tuple(args)


ARG_RULES = {
    aten.view: _shape_arg,
    aten.reshape: _shape_arg,
    aten._unsafe_view: _shape_arg,
    aten.expand: _shape_arg,
    aten.broadcast_to: _shape_arg,
    aten.slice: _slice,
    aten.split: _split,
    aten.split_with_sizes: _split,
    aten.layer_norm: _layer_norm,
    aten.rms_norm: _layer_norm,
    aten.zeros: _creation,
    aten.ones: _creation,
    aten.empty: _creation,
    aten.full: _creation,
    aten.new_zeros: _new_creation,
    aten.new_ones: _new_creation,
    aten.new_empty: _new_creation,
    aten.new_full: _new_creation,
}
"""Ops whose arguments hold sizes of prunable axes -> rule that rewrites those arguments."""


def apply_plan(
    gm: fx.GraphModule,
    plan: Plan | None = None,
    *,
    check: bool = True,
    propagate: str = "resize",
    share: bool = False,
) -> fx.GraphModule:
    """Return a smaller copy of ``gm`` with everything ``plan`` removes physically deleted.

    Args:
        gm: an annotated graph (``annotate_groups``); left unchanged.
        plan: what to remove; defaults to ``gm.meta[PLAN]`` (``annotate_plan``).
        check: run the new graph once on a small input to make sure it executes.
        propagate: how ``meta['val']`` is refreshed: ``"resize"`` (new shapes from the analysis,
            fast) or ``"fake"`` (re-run every op on fake tensors, ``FakeTensorProp``).
        share: the copy reuses the parameters the plan does not slice instead of cloning them
            (no second copy of a large model's untouched weights; the two graphs then alias them).

    Returns:
        A new ``GraphModule`` with sliced parameters, retargeted shape constants and fresh
        ``meta['val']``; its ``meta`` keeps the trace info (groups, curvature, scores, masks and plan
        are dropped since they describe the old graph).

    Raises:
        KeyError / ValueError: the plan does not fit the graph.
        SurgeonError: the rewritten graph fails to run.
    """
    analysis = get_groups(gm)
    if plan is None:
        plan = gm.meta.get(PLAN)
        if plan is None:
            raise KeyError("no plan given and none stored on the graph; run annotate_plan first")
    gone = removed_labels(gm, analysis, plan)
    # parameters about to be sliced are not cloned: the copy gets new tensors for them below
    memo = {id(p): p for p in gm.parameters()} if share else {}
    memo.update({id(gm.get_parameter(analysis.param_targets[p])): None for p in plan.keep})
    # the analyses describe the old graph and are dropped from the copy: never deep-copy them
    memo.update({id(gm.meta[k]): None for k in (GROUPS, SCORES, PLAN, CURVATURE, MASKS) if k in gm.meta})
    with warnings.catch_warnings():  # torch's pytree deprecation noise when copying export specs
        warnings.simplefilter("ignore", FutureWarning)
        new = _copy(gm, memo)
    for key in (GROUPS, SCORES, PLAN, CURVATURE, MASKS):
        new.meta.pop(key, None)
    if not gone.any():
        return new
    aliases: dict[int, list[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    for p, axes in plan.keep.items():
        target = analysis.param_targets[p]
        w = gm.get_parameter(target)
        t = w.detach()
        for ax, kept in sorted(axes.items()):
            t = t.index_select(ax, torch.as_tensor(kept, dtype=torch.long, device=t.device))
        neww = torch.nn.Parameter(t.contiguous(), requires_grad=w.requires_grad)
        for name in aliases[id(w)]:
            owner, _, attr = name.rpartition(".")
            setattr(new.get_submodule(owner) if owner else new, attr, neww)
    for node in new.graph.nodes:
        if node.op != "call_function":
            continue
        rule = ARG_RULES.get(getattr(node.target, "overloadpacket", None))
        if rule is not None:
            rule(analysis, node, gone)
    new.recompile()
    if propagate == "fake":
        _propagate(new, gm)
    else:
        _resize_meta(new, analysis, gone)
    if check:
        _smoke(new)
    return new


def _copy(gm: fx.GraphModule, skip: dict[int, None]) -> fx.GraphModule:
    """Deep copy of ``gm``; ``skip`` maps ids of objects not to copy to what the copy uses instead."""
    return copy.deepcopy(gm, dict(skip))


def _resize_meta(gm: fx.GraphModule, analysis: Analysis, gone: np.ndarray) -> None:
    """Give every node whose shape changed a fake value of the new shape (same symbols elsewhere).

    The new sizes follow from the slot analysis, so no op is re-run; ``_smoke`` then runs the graph.
    """
    changed = {}
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or node.name not in analysis.spaces:
            continue
        shape = _new_shape(analysis, node, gone)
        if list(shape) != list(val.shape):
            new_val = val.new_empty(shape)
            node.meta["val"] = new_val
            node.meta.pop("tensor_meta", None)
            changed[node.name] = new_val
    for node in gm.graph.nodes:  # multi-output ops: rebuild their list from the getitem users
        val = node.meta.get("val")
        if isinstance(val, (list, tuple)):
            items = list(val)
            for user in node.users:
                if user.target is operator.getitem and user.name in changed:
                    items[user.args[1]] = changed[user.name]
            node.meta["val"] = type(val)(items)


def _propagate(new: fx.GraphModule, old: fx.GraphModule) -> None:
    """Recompute ``meta['val']`` on the new graph by running it on fake inputs (slower, stricter)."""
    vals = [n.meta["val"] for n in old.graph.nodes if n.op == "placeholder"]
    mode = vals[0].fake_mode if vals and hasattr(vals[0], "fake_mode") else None
    try:
        FakeTensorProp(new, mode).propagate_dont_convert_inputs(*vals)
    except Exception as e:  # the rewrite produced an inconsistent graph: say where
        raise SurgeonError(f"the rewritten graph does not type-check: {type(e).__name__}: {e}") from e


def _smoke(gm: fx.GraphModule) -> None:
    from surgeon_fx.keys import SOURCE

    info = gm.meta.get(SOURCE)
    vocab = (info.vocab_size if info else None) or 2
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    ids = torch.randint(0, vocab, (1, 3), generator=torch.Generator().manual_seed(0)).to(device)
    try:
        with torch.no_grad():
            gm(ids)
    except Exception as e:
        raise SurgeonError(f"the rewritten graph fails to run: {type(e).__name__}: {e}") from e
