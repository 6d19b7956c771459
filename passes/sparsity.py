"""Sparsity passes: choose which weights of the decoder linear layers become zero, then zero them.

Reads: ``gm.meta[GROUPS]`` (which parameters are decoder linear weights) and, for every method but
magnitude, ``gm.meta[CURVATURE]`` (K-FAC factors). ``annotate_masks`` writes ``gm.meta[MASKS]``
and leaves parameters and ``gm.code`` unchanged; ``apply_masks_`` and ``apply_sparsegpt_`` change
parameter values in place, never shapes. Invariant: only weights in ``Analysis.linear_params`` are
sparsified (never embeddings, the LM head or biases); entries of an earlier mask stay removed; an
N:M group is ``m`` consecutive indices of the weight's own input axis.

Methods: ``"surgeon"`` (element costs ``1/2 W_rc^2 / ([G^-1]_rr [A^-1]_cc)``, one global threshold
over all layers, correlated OBS update under ``F = G (x) A`` in row chunks), ``"magnitude"`` (per
layer), ``"wanda"`` (``|W| * ||x||`` per output row), ``"sparsegpt"`` (per layer, OBS with ``H ~ A``;
with calibration windows, each stage of layers is measured after the earlier ones are pruned).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx

from surgeon_fx import kfac
from surgeon_fx.keys import MASKS, require
from surgeon_fx.patterns import nm_eligible, nm_quota, select_smallest
from surgeon_fx.sparse_baselines import magnitude_mask, nm_mask, row_mask, sparsegpt_prune, wanda_scores

from .curvature import Curvature, Layer, find_layers, get_curvature, single_use
from .groups import get_groups
from .obs import _Inverses, _write_back_, layer_matrix
from .staged import staged_inputs

__all__ = [
    "Masks",
    "SPARSE_METHODS",
    "ROWS",
    "sparse_layers",
    "annotate_masks",
    "apply_masks_",
    "apply_sparsegpt_",
    "apply_wanda_",
    "layer_stages",
    "get_masks",
]

SPARSE_METHODS = ("surgeon", "magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True, eq=False)
class Masks:
    """Removed entries per weight FQN (bool tensors in the weight's own layout, True = zero)."""

    masks: dict[str, torch.Tensor]
    method: str
    pattern: str | tuple[int, int]
    target: float

    @property
    def removed(self) -> int:
        return sum(int(m.sum()) for m in self.masks.values())

    @property
    def total(self) -> int:
        return sum(m.numel() for m in self.masks.values())


def get_masks(gm: fx.GraphModule) -> Masks:
    return require(gm, MASKS, producer="annotate_masks")


def sparse_layers(gm: fx.GraphModule, curv: Curvature | None = None) -> list[Layer]:
    """The layers to sparsify: ``linear``/``addmm``/``mm`` ops whose weight is a decoder linear weight used once.

    With ``curv``, its :class:`Layer` objects (which carry the factors) are returned.
    """
    analysis = get_groups(gm)
    found = list(curv.layers.values()) if curv is not None else [lay for lay, _ in find_layers(gm).values()]
    return [lay for lay in single_use(found) if lay.layout != "embedding" and lay.weight in analysis.linear_params]


def _to_matrix(t: torch.Tensor, lay: Layer) -> torch.Tensor:
    return t if lay.layout == "out_in" else t.T


def _weight_matrix(gm, lay: Layer) -> torch.Tensor:
    """The (R, C) weight without the bias column."""
    w = gm.get_parameter(get_groups(gm).param_targets[lay.weight]).detach()
    return _to_matrix(w, lay)


def _priors(layers, prior: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor | None]:
    out = {}
    for lay in layers:
        p = (prior or {}).get(lay.weight)
        out[lay.node] = None if p is None else _to_matrix(p, lay).to(torch.bool)
    return out


def _check(method: str, pattern, ratio: float, fraction: float) -> None:
    if method not in SPARSE_METHODS:
        raise ValueError(f"unknown sparsity method {method!r}; choose one of {SPARSE_METHODS}")
    if pattern != "unstructured" and not (isinstance(pattern, tuple) and len(pattern) == 2):
        raise ValueError(f"pattern must be 'unstructured' or (n, m), got {pattern!r}")
    if pattern == "unstructured" and not 0.0 <= ratio < 1.0:
        raise ValueError(f"unstructured sparsity ratio must be in [0, 1), got {ratio!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction (the share of the schedule reached by this shot) must be in (0, 1], got {fraction}")


def annotate_masks(
    gm: fx.GraphModule,
    pattern: str | tuple[int, int] = "unstructured",
    *,
    ratio: float = 0.5,
    fraction: float = 1.0,
    method: str = "surgeon",
    prior: dict[str, torch.Tensor] | None = None,
    damping: float = 0.01,
    update: bool = True,
    scope: str = "global",
    rows: str = "coupled",
    band: float | None = None,
) -> None:
    """Choose the weights to zero and store them in ``gm.meta[MASKS]`` (a :class:`Masks`).

    Args:
        gm: a graph with groups (and curvature for every method but magnitude).
        pattern: ``"unstructured"`` or ``(n, m)`` (keep at most n of every m consecutive inputs).
        ratio: unstructured: fraction of the decoder linear weights to zero (ignored for N:M).
        fraction: share of the linear schedule this shot reaches (shot t of T: ``t / T``); N:M
            groups reach their full quota at 1.0 (surgeon: a global count; other methods: per group).
        method: one of :data:`SPARSE_METHODS` except ``"sparsegpt"`` (see :func:`apply_sparsegpt_`).
        prior: masks of earlier shots by weight FQN; they stay removed.
        damping: relative damping of both K-FAC factors (surgeon).
        update: surgeon: costs assume the correlated OBS update (else the other weights stay fixed:
            ``1/2 W_rc^2 G_rr A_cc``).
        scope: surgeon: ``"global"`` (one threshold over all layers, as the paper) or ``"layer"``
            (every layer reaches the same sparsity; costs rank weights within a layer).
        rows: surgeon: ``"coupled"`` (``F = G (x) A``) or ``"independent"`` (``F = diag(G) (x) A``:
            costs ``1/2 W_rc^2 (G_rr + d) / [A^-1]_cc`` and a per-row update that uses ``A`` only,
            as SparseGPT's; see :data:`ROWS`). Pass the same value to :func:`apply_masks_`.
        band: surgeon, unstructured, ``scope="global"``: every layer's share of zeros stays within
            ``[ratio - band, ratio + band]`` of the shot's schedule (``fraction`` times each bound,
            clipped to [0, 1]); within those bounds one cost threshold still allocates the zeros
            across layers (water-filling). ``None`` (default): no bounds, as the paper.

    Raises:
        ValueError: bad options; ``method="sparsegpt"`` (its masks come with its update).
        KeyError: groups or curvature missing.
    """
    _check(method, pattern, ratio, fraction)
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    _check_rows(rows)
    if band is not None:
        if isinstance(band, bool) or not isinstance(band, (int, float)) or not 0 <= band <= 1:
            raise ValueError(f"band must be a float in [0, 1] or None, got {band!r}")
        if method != "surgeon" or scope != "global" or pattern != "unstructured":
            raise ValueError(
                "band bounds the global surgeon's unstructured allocation; it needs "
                f"method='surgeon', scope='global', pattern='unstructured' (got {method!r}, {scope!r}, {pattern!r})"
            )
    if method == "sparsegpt":
        raise ValueError("SparseGPT chooses its mask while updating the weights: use apply_sparsegpt_")
    curv = get_curvature(gm) if method != "magnitude" else None
    layers = sparse_layers(gm, curv)
    priors = _priors(layers, prior)
    inv = _Inverses(curv, damping) if method == "surgeon" else None
    masks: dict[str, torch.Tensor] = {}
    nm = pattern if isinstance(pattern, tuple) else None
    if method == "surgeon":
        costs, quotas = [], []
        for lay in layers:
            w = _weight_matrix(gm, lay)
            r, c = w.shape
            if update:
                cost = kfac.element_costs(w, _g_inv(inv, lay, rows), _diag(inv.a_inv(lay))[:c])
            else:
                cost = (
                    0.5
                    * w.double() ** 2
                    * _diag(lay.g).double()[:, None]
                    * _diag(curv.factor_a(lay)).double()[None, :c]
                )
            pri = priors[lay.node]
            if nm is not None:
                cost = nm_eligible(cost, *nm, pri)
            elif pri is not None:
                cost = torch.where(pri, -torch.inf, cost.double())
            costs.append(cost.float().reshape(-1))
            quotas.append(r * nm_quota(c, *nm) if nm is not None else ratio * r * c)
        if band is not None and costs:
            sizes = [c.numel() for c in costs]
            lo = [math.ceil(max(0.0, ratio - band) * fraction * n) for n in sizes]
            hi = [math.floor(min(1.0, ratio + band) * fraction * n) for n in sizes]
            chosen = torch.cat(_choose_banded(costs, sum(quotas) * fraction, lo, hi))
        elif costs:
            parts = [(costs, quotas)] if scope == "global" else [([c], [q]) for c, q in zip(costs, quotas)]
            chosen = torch.cat([_choose(torch.cat(cs), sum(qs) * fraction) for cs, qs in parts])
        else:
            chosen = None
        start = 0
        for lay in layers:
            r, c = _weight_matrix(gm, lay).shape
            masks[lay.weight] = _to_matrix(chosen[start : start + r * c].view(r, c), lay).clone()
            start += r * c
    else:
        for lay in layers:
            a = curv.factor_a(lay) if method == "wanda" else None
            masks[lay.weight] = _baseline_mask(gm, lay, method, a, pattern, ratio, fraction, priors[lay.node])
    gm.meta[MASKS] = Masks(masks, method, pattern, _target(pattern, ratio))


def _target(pattern, ratio: float) -> float:
    """The fraction of zeros a run aims at: ``ratio`` when unstructured, ``1 - N/M`` for N:M."""
    return ratio if pattern == "unstructured" else 1 - pattern[0] / pattern[1]


def _baseline_mask(gm, lay: Layer, method: str, a, pattern, ratio: float, fraction: float, pri) -> torch.Tensor:
    """Magnitude's or Wanda's mask of one layer (Wanda: ``a`` is its input factor, dense or diagonal)."""
    w = _weight_matrix(gm, lay)
    score = w.abs() if method == "magnitude" else wanda_scores(w, a)
    if isinstance(pattern, tuple):
        mask = nm_mask(score, pattern[1] - round((pattern[1] - pattern[0]) * fraction), pattern[1], pri)
    elif method == "magnitude":
        mask = magnitude_mask(w, ratio * fraction, pri)
    else:
        mask = row_mask(score, ratio * fraction, pri)
    return _to_matrix(mask, lay).clone()


@torch.no_grad()
def apply_wanda_(
    gm: fx.GraphModule,
    pattern: str | tuple[int, int] = "unstructured",
    *,
    windows: torch.Tensor,
    ratio: float = 0.5,
    fraction: float = 1.0,
    prior: dict[str, torch.Tensor] | None = None,
    batch_size: int = 1,
    precision: str = "fp32",
    progress: bool = True,
) -> None:
    """Wanda layer after layer, as its reference code runs it, in place; masks go to ``gm.meta[MASKS]``.

    Each stage of :func:`layer_stages` is scored by ``|W_ij| * ||X_j||`` on inputs ``X`` measured
    with every earlier stage already pruned (:func:`~surgeon_fx.passes.staged.staged_inputs`, input
    norms only), compared within each output row (N:M: within each group), and zeroed before the
    next stage is measured. ``annotate_masks(method="wanda")`` instead scores every layer from one
    earlier curvature sweep of the unpruned model.

    Args:
        windows: (N, L) calibration token ids.
        pattern, ratio, fraction, prior: as in :func:`annotate_masks`.
        batch_size, precision, progress: of its forward passes (as in ``annotate_curvature``).
    """
    from tqdm.auto import tqdm

    _check("wanda", pattern, ratio, fraction)
    analysis = get_groups(gm)
    stages = layer_stages(gm, sparse_layers(gm))
    priors = _priors([lay for st in stages for lay in st], prior)
    names = [[lay.node for lay in st] for st in stages]
    factors = staged_inputs(gm, windows, names, batch_size=batch_size, precision=precision, max_dense=0, progress=False)
    masks = {}
    for stage, curv in zip(tqdm(stages, desc="wanda stages", disable=not progress, leave=False), factors):
        for lay in stage:
            mask = _baseline_mask(gm, lay, "wanda", curv.factor_a(lay), pattern, ratio, fraction, priors[lay.node])
            gm.get_parameter(analysis.param_targets[lay.weight]).masked_fill_(mask, 0.0)
            masks[lay.weight] = mask
    gm.meta[MASKS] = Masks(masks, "wanda", pattern, _target(pattern, ratio))


ROWS = ("coupled", "independent")
"""How the surgeon's element costs and update treat the rows of a layer: through the full output
factor ``G`` (the paper's ``F = G (x) A``), or independently (``diag(G)``). Measured on CPU
(``benchmarks/results/sparse_ablation_cpu.md``): the effective rank of ``G`` of the q/k/v
projections is about 5-13, and there the coupled update moves weights along directions that the
quadratic model prices as free."""


def _check_rows(rows: str) -> None:
    if rows not in ROWS:
        raise ValueError(f"rows must be one of {ROWS}, got {rows!r}")


def _g_inv(inv, lay: Layer, rows: str) -> torch.Tensor:
    return inv.g_inv(lay) if rows == "coupled" else inv.g_inv_diagonal(lay)


def _choose(flat: torch.Tensor, goal: float) -> torch.Tensor:
    """The ``round(goal)`` cheapest entries, at least every forced (-inf) one, never a barred (+inf) one."""
    forced = int((flat == -torch.inf).sum())
    k = min(max(round(goal), forced), int((flat < torch.inf).sum()))
    return select_smallest(flat, k)


def _choose_banded(costs: list[torch.Tensor], goal: float, lo: list[int], hi: list[int]) -> list[torch.Tensor]:
    """One threshold over every layer's costs, each layer's count clipped to ``[lo, hi]``.

    Layer ``l`` takes its ``n_l`` cheapest entries, ``n_l = clip(#{costs_l <= t}, lo_l, hi_l)``, at the
    smallest threshold ``t`` where the counts reach ``round(goal)`` (clipped to what the bounds
    allow); entries tied at ``t`` fill the remainder in layer order. Forced (-inf) entries are always
    taken (they raise both bounds of their layer), barred (+inf) never.
    """
    ranked = [c.sort().values for c in costs]
    forced = [int((r == -torch.inf).sum()) for r in ranked]
    finite = [int((r < torch.inf).sum()) for r in ranked]
    lo_t = torch.tensor([min(max(a, f), n) for a, f, n in zip(lo, forced, finite)])
    hi_t = torch.tensor([min(max(b, f), n) for b, f, n in zip(hi, forced, finite)])
    hi_t = torch.maximum(hi_t, lo_t)
    k = min(max(round(goal), int(lo_t.sum())), int(hi_t.sum()))

    def counts(t: torch.Tensor, right: bool) -> torch.Tensor:
        raw = torch.tensor([int(torch.searchsorted(r, t, right=right)) for r in ranked])
        return torch.minimum(torch.maximum(raw, lo_t), hi_t)

    values = torch.cat([r[f:n] for r, f, n in zip(ranked, forced, finite)]).sort().values
    if k <= int(lo_t.sum()) or values.numel() == 0:
        take = lo_t
    else:
        first, last = 0, values.numel() - 1  # the smallest index whose threshold reaches k
        while first < last:
            mid = (first + last) // 2
            if int(counts(values[mid], True).sum()) >= k:
                last = mid
            else:
                first = mid + 1
        t = values[first]
        take = counts(t, False)
        more = counts(t, True) - take
        for i in range(len(ranked)):  # the entries tied at t, in layer order, up to k
            add = min(k - int(take.sum()), int(more[i]))
            take[i] += add
    return [select_smallest(c, int(n)) for c, n in zip(costs, take)]


def _diag(f: torch.Tensor) -> torch.Tensor:
    return f if f.dim() == 1 else torch.diagonal(f)


@torch.no_grad()
def apply_masks_(
    gm: fx.GraphModule,
    masks: Masks | None = None,
    *,
    update: bool = True,
    damping: float = 0.01,
    chunk_size: int = 1024,
    rows: str = "coupled",
) -> int:
    """Zero every masked weight in place; with ``update``, first apply the correlated OBS update.

    The update (:func:`surgeon_fx.kfac.element_update_chunked`) removes a layer's masked elements
    in chunks of rows of at most ``chunk_size`` elements, biases included in the compensation; the
    masked entries end exactly zero.

    Args:
        gm: the graph whose parameters change (shared with the eager model when traced by ``compress``).
        masks: default ``gm.meta[MASKS]``.
        update: apply the OBS update (needs ``gm.meta[CURVATURE]``); otherwise only zero.
        damping: relative damping of both K-FAC factors.
        chunk_size: masked elements solved jointly.
        rows: ``"coupled"`` (``G^-1`` couples the rows) or ``"independent"`` (each row's masked
            elements are removed by the OBS update under ``A`` alone); see :data:`ROWS`.

    Returns:
        The number of layers changed.
    """
    _check_rows(rows)
    masks = masks or get_masks(gm)
    analysis = get_groups(gm)
    curv = get_curvature(gm) if update else None
    inv = _Inverses(curv, damping) if update else None
    n = 0
    for lay in sparse_layers(gm, curv):
        mask = masks.masks.get(lay.weight)
        if mask is None or not mask.any():
            continue
        if update:
            m = layer_matrix(gm, curv, lay).double()
            mm = _to_matrix(mask, lay)
            if lay.bias is not None:
                mm = torch.cat([mm, torch.zeros_like(mm[:, :1])], 1)
            g_inv = _g_inv(inv, lay, rows)
            new = kfac.element_update_chunked(m, g_inv, inv.a_inv(lay), mm, chunk_size=chunk_size)
            _write_back_(gm, analysis, lay, new)
        else:
            w = gm.get_parameter(analysis.param_targets[lay.weight])
            w.masked_fill_(mask.to(w.device), 0.0)
        n += 1
    return n


@torch.no_grad()
def apply_sparsegpt_(
    gm: fx.GraphModule,
    pattern: str | tuple[int, int] = "unstructured",
    *,
    ratio: float = 0.5,
    fraction: float = 1.0,
    prior: dict[str, torch.Tensor] | None = None,
    damp: float = 0.01,
    block: int = 128,
    windows: torch.Tensor | None = None,
    batch_size: int = 1,
    precision: str = "fp32",
    progress: bool = True,
) -> None:
    """SparseGPT on every decoder linear layer, in place; the masks go to ``gm.meta[MASKS]``.

    With ``windows`` (calibration token ids), as its paper runs it: layer after layer, each measured
    on the outputs of the layers before it as already pruned. The layers are taken in the stages of
    :func:`layer_stages`; each stage's input Hessians ``E[x x^T]`` come from forward passes over
    ``windows`` on the model with every earlier stage already pruned and updated, resumed from the
    values kept at the previous stage (:func:`~surgeon_fx.passes.staged.staged_inputs`: about one
    forward pass in all); no curvature sweep is needed.

    Without ``windows``, every layer's Hessian is its K-FAC input factor ``A`` from an earlier
    ``annotate_curvature``, all measured on the model as it was then (one sweep, not re-measured
    between layers).

    Args:
        pattern, ratio, fraction, prior: as in :func:`annotate_masks`.
        damp: SparseGPT's relative damping (1%). block: lazy-update block width (128).
        windows: (N, L) calibration token ids for the layer-after-layer form.
        batch_size, precision, progress: of its forward passes (as in ``annotate_curvature``).
    """
    from tqdm.auto import tqdm

    _check("sparsegpt", pattern, ratio, fraction)
    if windows is None:
        curv = get_curvature(gm)
        stages = [sparse_layers(gm, curv)]
    else:
        stages = layer_stages(gm, sparse_layers(gm))
    priors = _priors([lay for st in stages for lay in st], prior)
    masks = {}
    if windows is None:
        factors = iter([curv])
    else:
        names = [[lay.node for lay in st] for st in stages]
        factors = staged_inputs(gm, windows, names, batch_size=batch_size, precision=precision, progress=False)
    bar = tqdm(stages, desc="sparsegpt stages", disable=not progress or windows is None, leave=False)
    for stage, curv in zip(bar, factors):
        for lay in stage:
            a = curv.factor_a(lay)
            masks[lay.weight] = _sparsegpt_layer_(gm, lay, a, pattern, ratio * fraction, fraction, priors, damp, block)
    gm.meta[MASKS] = Masks(masks, "sparsegpt", pattern, _target(pattern, ratio))


def _sparsegpt_layer_(gm, lay: Layer, a: torch.Tensor, pattern, ratio: float, fraction: float, priors, damp, block):
    """SparseGPT on one layer with the input factor ``a`` (bias column dropped); returns its mask."""
    analysis = get_groups(gm)
    w = _weight_matrix(gm, lay)
    c = w.shape[1]
    h = a[:c] if a.dim() == 1 else a[:c, :c]
    if isinstance(pattern, tuple):
        nm = (pattern[1] - round((pattern[1] - pattern[0]) * fraction), pattern[1])
        new, mask = sparsegpt_prune(w, h, nm=nm, prior=priors[lay.node], block=block, damp=damp)
    else:
        new, mask = sparsegpt_prune(w, h, ratio=ratio, prior=priors[lay.node], block=block, damp=damp)
    target = gm.get_parameter(analysis.param_targets[lay.weight])
    target.copy_(_to_matrix(new, lay).to(target.dtype))
    return _to_matrix(mask, lay).clone()


def layer_stages(gm: fx.GraphModule, layers) -> list[list[Layer]]:
    """``layers`` grouped by depth: a layer's stage is the most layers of ``layers`` on any path of the
    graph to its input. No layer's input depends on a layer of the same or a later stage, so a stage
    can be measured and changed at once, after every earlier stage (in a decoder block, for example:
    q/k/v, then the attention output, then gate/up, then down; found from the graph alone)."""
    found = find_layers(gm)
    names = {lay.node for lay in layers}
    level: dict[fx.Node, int] = {}
    for n in gm.graph.nodes:
        lv = max((level[a] for a in n.all_input_nodes), default=0)
        level[n] = lv + (1 if n.name in names else 0)
    stages: dict[int, list[Layer]] = {}
    for lay in layers:
        stages.setdefault(level[found[lay.node][1]], []).append(lay)
    return [stages[k] for k in sorted(stages)]
