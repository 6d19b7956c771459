"""Stage-after-stage input factors from one resumable forward pass (layer-wise pruning at O(depth)).

Reads: an annotated graph (``annotate_groups``), calibration token windows and stages of layers
(lists of node names, e.g. from :func:`surgeon_fx.passes.sparsity.layer_stages`). Writes: nothing on
the graph; :func:`staged_inputs` yields one :class:`~surgeon_fx.passes.curvature.Curvature` per stage
whose ``a`` holds that stage's input factors ``A = E[x x^T]``, measured after the caller has changed
the weights of every earlier stage (SparseGPT and Wanda prune layer after layer this way).

How: the graph runs node by node under a small interpreter. Before stage ``s`` is measured, the
values live across a cut (computed by nodes before it, read by nodes after it) are kept for every
batch of windows; the next run starts at that cut instead of at the input ids. A cut may only lie
before every node whose value depends on the weights of a stage not yet frozen, so values kept
there stay exact after the caller changes those weights (a parameter read itself does not count:
weights change in place, and the read returns the same tensor). A whole pruning run thus costs
about one forward pass over the calibration windows instead of one per stage.

Invariant: the factors equal those of ``collect_inputs`` run afresh before each stage (tested).
Memory: the live values at one cut for all windows (in a decoder, about the residual stream: N x L x
hidden), twice while a run moves the cut; ``offload=True`` keeps them on the CPU between runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import fx
from tqdm.auto import tqdm

from surgeon_fx.launch import rank_and_world

from .curvature import (
    MAX_DENSE,
    PRECISIONS,
    Curvature,
    _all_reduce_,
    _check_windows,
    _layer_names,
    _my_batches,
    _sdpa_bf16,
    _Sweep,
    find_layers,
    sweep_precision,
)
from .groups import get_groups

__all__ = ["staged_inputs", "stage_cuts"]

aten = torch.ops.aten


def _fetch(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def stage_cuts(gm: fx.GraphModule, stages: Sequence[Sequence[str]]) -> list[int]:
    """Node index where each stage's run may start (0 for the first): the earliest node whose value
    depends on the parameters of that stage's predecessor or of any later stage.

    Raises:
        ValueError: a stage's layer is not among :func:`find_layers`.
    """
    found = find_layers(gm)
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    by_id: dict[int, list[fx.Node]] = {}
    for n in nodes:
        if n.op == "get_attr":
            by_id.setdefault(id(_fetch(gm, n.target)), []).append(n)
    params = dict(gm.named_parameters(remove_duplicate=False))
    targets = get_groups(gm).param_targets
    first: list[int] = []  # earliest node depending on each stage's parameters
    for stage in stages:
        names = _layer_names(found, stage)
        seeds = []
        for k in names:
            lay = found[k][0]
            for fqn in (lay.weight, lay.bias):
                if fqn is not None:
                    seeds += by_id.get(id(params[targets[fqn]]), [])
        reached, todo = set(), [u for s in seeds for u in s.users]
        while todo:
            n = todo.pop()
            if n not in reached and n.op != "get_attr":
                reached.add(n)
                todo.extend(n.users)
        first.append(min((index[n] for n in reached), default=len(nodes)))
    cuts = [0]
    for s in range(1, len(stages)):
        cuts.append(min(first[s - 1 :]))
    return cuts


class _Run:
    """Runs a span of the graph's nodes on an environment of node values, freeing dead values."""

    def __init__(self, gm: fx.GraphModule, precision: str):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.last_use = {n: max((self.index[u] for u in n.users), default=self.index[n]) for n in self.nodes}
        self.dies_at: dict[int, list[fx.Node]] = {}
        for n, i in self.last_use.items():
            self.dies_at.setdefault(i, []).append(n)
        self.mixed = precision == "mixed"

    def attrs_live_at(self, cut: int) -> list[fx.Node]:
        """Parameter reads before ``cut`` whose value is used at or after it (fetched afresh on resume)."""
        return [n for n in self.nodes[:cut] if n.op == "get_attr" and self.last_use[n] >= cut]

    def step(self, env: dict, i: int) -> None:
        n = self.nodes[i]
        args = fx.node.map_arg(n.args, env.__getitem__)
        kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
        if n.op == "get_attr":
            env[n] = _fetch(self.gm, n.target)
        elif n.op == "call_function":
            target = n.target
            if self.mixed and getattr(target, "overloadpacket", None) is aten.scaled_dot_product_attention:
                target = _sdpa_bf16
            env[n] = target(*args, **kwargs)
        elif n.op == "call_method":
            env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
        elif n.op == "call_module":
            env[n] = self.gm.get_submodule(n.target)(*args, **kwargs)
        elif n.op not in ("output", "placeholder"):
            raise ValueError(f"staged_inputs: unexpected node {n.format_node()}")
        for dead in self.dies_at.get(i, ()):
            env.pop(dead, None)


def _move(env: dict, device: torch.device) -> dict:
    return {n: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for n, v in env.items()}


@torch.no_grad()
def staged_inputs(
    gm: fx.GraphModule,
    windows: torch.Tensor,
    stages: Sequence[Sequence[str]],
    *,
    batch_size: int = 1,
    precision: str = "fp32",
    max_dense: int = MAX_DENSE,
    offload: bool = False,
    progress: bool = True,
) -> Iterator[Curvature]:
    """Yield the input factors of each stage, measured after the caller changed the earlier ones.

    Use as ``for stage, curv in zip(stages, staged_inputs(gm, windows, stages)): ...``: change the
    weights of ``stage`` (in place) before asking for the next one. The factors equal those of
    :func:`~surgeon_fx.passes.curvature.collect_inputs` run on the graph as it is when the stage is
    reached, but the graph runs only once overall: each run resumes from values kept at a cut.
    Under ``torch.distributed`` every rank runs its block of batches and each stage's sums are
    all-reduced.

    Args:
        gm: an annotated graph called as ``gm(input_ids)``; only the caller changes it.
        windows: (N, L) token ids. stages: lists of layer node names (see :func:`find_layers`), in
            dependency order: no layer's input may depend on a layer of its own or a later stage.
        batch_size, precision, max_dense, progress: as in ``annotate_curvature``.
        offload: keep the values at the cut on the CPU between runs (less GPU memory, more copies).

    Raises:
        ValueError: bad windows, precision or stages; a graph with more than one input.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    _check_windows(windows)
    if not stages or any(not st for st in stages):
        raise ValueError("staged_inputs needs at least one stage, each with at least one layer name")
    found = find_layers(gm)
    cuts = stage_cuts(gm, stages)
    run = _Run(gm, precision)
    holders = [n for n in run.nodes if n.op == "placeholder"]
    if len(holders) != 1:
        raise ValueError(f"staged_inputs runs graphs of one input (token ids); this one has {len(holders)} inputs")
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    home = torch.device("cpu") if offload else device
    mine = _my_batches(len(windows), batch_size)
    kept: list[dict] = [{} for _ in mine]  # per batch: the live values at the current cut
    show = progress and rank_and_world()[0] == 0
    for s, stage in enumerate(tqdm(stages, desc="stages", disable=not show, leave=False)):
        names = list(stage)
        curv = Curvature({k: lay for k, (lay, _) in found.items()})
        curv.collected = set(names)
        sweep = _Sweep(curv, max_dense, precision, names)
        wanted = {found[k][1]: found[k][0] for k in names}  # input node -> a layer reading it
        stop = max(run.index[x] for x in wanted) + 1
        nxt = cuts[s + 1] if s + 1 < len(stages) else None
        end = max(stop, nxt or 0)
        start = cuts[s] if s else run.index[holders[0]] + 1
        attrs = {n: _fetch(gm, n.target) for n in run.attrs_live_at(start)}  # parameters: read afresh each stage
        for b, i in enumerate(mine):
            ids = windows[i : i + batch_size].to(device)
            env = _move(kept[b], device) if offload else dict(kept[b])
            env[holders[0]] = ids
            env.update(attrs)
            seen: set[str] = set()
            with sweep_precision(precision, device):
                for j in range(start, end + 1):
                    if j == nxt:
                        keep = {n: v for n, v in env.items() if n.op not in ("placeholder", "get_attr")}
                        kept[b] = _move(keep, home) if offload else keep
                    if j == end:
                        break
                    node = run.nodes[j]
                    run.step(env, j)
                    if node in wanted and wanted[node].a_key not in seen:
                        seen.add(wanted[node].a_key)
                        sweep._acc_a(wanted[node], env[node])
                for x, lay in wanted.items():  # inputs that are graph inputs or parameters
                    if lay.a_key not in seen:
                        seen.add(lay.a_key)
                        sweep._acc_a(lay, env[x] if x in env else _fetch(gm, x.target))
            if nxt is None:
                kept[b] = {}
            curv.tokens += ids.numel()
            del env
        if rank_and_world()[1] > 1:
            _all_reduce_(curv, max_dense, device, with_g=False)
        for k in curv.a:
            curv.a[k].div_(curv.tokens)
        yield curv
