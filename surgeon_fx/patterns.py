"""Sparsity patterns: parsing, exact mask selection, N:M validity checks and semi-structured export.

Reads: cost (score) matrices, weights or models. Writes: nothing, except :func:`to_semi_structured_`,
which replaces linear weights of a model in place. Invariant: masks are boolean tensors in the
weight's *own* layout, True = removed; an N:M group is ``m`` consecutive indices of the weight's
input axis (``weight[:, i*m:(i+1)*m]`` of an ``nn.Linear``), never shifted by dead or bias columns;
selection is exact (ties broken by position), so the requested count is always reached.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "parse_sparsity",
    "select_smallest",
    "nm_eligible",
    "nm_quota",
    "check_nm",
    "nm_violations",
    "sparsity_of",
    "to_semi_structured_",
]


def parse_sparsity(sparsity: str | None) -> None | str | tuple[int, int]:
    """``None``, ``"unstructured"`` or an ``"N:M"`` string (keep at most N of every M) as ``(n, m)``.

    Raises:
        ValueError: anything else, or N:M with ``not 0 <= N < M``.
    """
    if sparsity is None or sparsity == "unstructured":
        return sparsity
    if isinstance(sparsity, str) and sparsity.count(":") == 1:
        a, b = sparsity.split(":")
        if a.strip().isdigit() and b.strip().isdigit():
            n, m = int(a), int(b)
            if 0 <= n < m:
                return n, m
    raise ValueError(f"sparsity must be None, 'unstructured' or 'N:M' with 0 <= N < M (e.g. '2:4'), got {sparsity!r}")


def select_smallest(costs: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` smallest entries of ``costs`` (ties: lowest flat index first).

    ``-inf`` entries (forced) come first; ``+inf`` entries (not allowed) are only taken when ``k``
    exceeds the finite ones, which callers avoid.
    """
    flat = costs.reshape(-1)
    k = max(0, min(int(k), flat.numel()))
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    if k == 0:
        return mask.view(costs.shape)
    thr = torch.kthvalue(flat, k).values
    below = flat < thr
    mask |= below
    need = k - int(below.sum())
    if need > 0:
        ties = torch.nonzero(flat == thr).squeeze(1)[:need]
        mask[ties] = True
    return mask.view(costs.shape)


def _groups(x: torch.Tensor, m: int) -> torch.Tensor:
    """(R, C) -> (R, ceil(C/m), m), padding the last group with +inf (never selected)."""
    r, c = x.shape
    pad = (-c) % m
    if pad:
        x = torch.cat([x, torch.full((r, pad), float("inf"), dtype=x.dtype, device=x.device)], 1)
    return x.view(r, -1, m)


def nm_quota(cols: int, n: int, m: int) -> int:
    """Elements a row of ``cols`` inputs must lose to be N:M (a trailing partial group keeps up to ``n``)."""
    full, rest = divmod(cols, m)
    return full * (m - n) + max(0, rest - n)


def nm_eligible(cost: torch.Tensor, n: int, m: int, prior: torch.Tensor | None = None) -> torch.Tensor:
    """Costs adjusted so that *any* global threshold on them keeps every group N:M-valid.

    In every group of ``m`` consecutive inputs, previously removed entries (``prior``) become
    ``-inf`` (they stay removed) and the cheapest other entries keep their cost while the group has
    room (``m - n`` removals in all); the rest become ``+inf``. A threshold therefore takes a prefix
    of each group's ranking, never more than the group may lose; taking every finite entry makes
    the row exactly N:M.

    Args:
        cost: (R, C) float costs of removing each entry of the weight (bias excluded).
        n, m: keep at most ``n`` of every ``m``.
        prior: (R, C) bool, entries removed by earlier shots.

    Returns:
        (R, C) float64 costs with ``-inf`` / ``+inf`` as described.
    """
    r, c = cost.shape
    g = _groups(cost.double(), m)  # (R, G, m)
    pri = _groups(prior.double(), m) > 0 if prior is not None else torch.zeros_like(g, dtype=torch.bool)
    pri &= torch.isfinite(g)
    size = _groups(torch.zeros_like(cost, dtype=torch.float64), m).isfinite().sum(-1, keepdim=True)
    room = (size - n).clamp_min(0) - pri.sum(-1, keepdim=True)  # removals left per group (partial last group)
    ranked = torch.where(pri, torch.inf, g)
    order = ranked.argsort(dim=-1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(m, device=g.device).expand_as(order))
    out = torch.where(rank < room, g, torch.inf)
    out = torch.where(pri, -torch.inf, out)
    return out.reshape(r, -1)[:, :c]


def _weight(obj) -> torch.Tensor:
    return obj.weight if isinstance(obj, nn.Module) else obj


def nm_violations(weight: torch.Tensor, n: int, m: int, *, axis: int = 1) -> int:
    """Groups of ``m`` consecutive entries along ``axis`` (the input axis) with more than ``n`` nonzeros."""
    w = weight.detach()
    w = w if axis == 1 else w.transpose(0, 1)
    nz = _groups((w != 0).to(torch.float32), m)  # padding is +inf: count only real entries
    nz = torch.where(torch.isfinite(nz), nz, 0.0)
    return int((nz.sum(-1) > n).sum())


def check_nm(model_or_weight, n: int = 2, m: int = 4, *, params=None) -> dict[str, int]:
    """Check N:M sparsity; return ``{name: groups violating it}`` for every tensor checked.

    Args:
        model_or_weight: an (R, C) weight tensor (input axis 1, as ``nn.Linear``), an ``nn.Linear``,
            or a model: then every ``nn.Linear`` weight except the input embedding's tied copy (or
            only ``params``, FQNs of 2-D weights in (out, in) layout) is checked.
        n, m: keep at most ``n`` nonzeros in every ``m`` consecutive inputs.
        params: with a model, the weight FQNs to check (e.g. a compressed model's
            ``surgeon_fx_sparsity.params``); GPT-2 ``Conv1D`` weights are (in, out) and are checked
            along axis 0 when named here.

    Returns:
        Violations per tensor (all zero means valid); ``{"weight": k}`` for a bare tensor.
    """
    if isinstance(model_or_weight, torch.Tensor):
        return {"weight": nm_violations(model_or_weight, n, m)}
    if isinstance(model_or_weight, nn.Linear):
        return {"weight": nm_violations(model_or_weight.weight, n, m)}
    if not isinstance(model_or_weight, nn.Module):
        raise TypeError(f"check_nm expects a tensor or an nn.Module, got {type(model_or_weight).__name__}")
    model = model_or_weight
    if params is None:
        skip = {id(model.get_input_embeddings().weight)} if hasattr(model, "get_input_embeddings") else set()
        names = [f"{k}.weight" for k, mod in model.named_modules() if isinstance(mod, nn.Linear)]
        names = [p for p in names if id(model.get_parameter(p)) not in skip]
        return {p: nm_violations(model.get_parameter(p), n, m) for p in names}
    out = {}
    for p in params:
        owner = model.get_submodule(p.rpartition(".")[0])
        axis = 0 if type(owner).__name__ == "Conv1D" else 1  # (in, out) weight of GPT-2's Conv1D
        out[p] = nm_violations(model.get_parameter(p), n, m, axis=axis)
    return out


def sparsity_of(model: nn.Module, params) -> float:
    """Fraction of exactly-zero entries over the parameters named in ``params``."""
    zeros = total = 0
    for p in params:
        w = model.get_parameter(p)
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else 0.0


def to_semi_structured_(model: nn.Module, params=None, *, contiguous: str = "auto") -> list[str]:
    """Swap 2:4-sparse ``nn.Linear`` weights for ``torch.sparse.to_sparse_semi_structured`` ones, in place.

    PyTorch's semi-structured kernels (cuSPARSELt / CUTLASS) need a CUDA GPU of compute capability
    8.0 or newer, fp16 or bf16 weights, and weight shapes that are multiples of 64 (rows >= 32);
    layers that do not fit, or are not exactly 2:4, are left dense. The product ``x W^T`` is
    computed as ``(W x^T)^T``, which the sparse kernel writes column-major; a forward hook copies a
    converted layer's output to a contiguous one where the layout matters (attention kernels need a
    unit stride on the head dimension). Run the model under ``torch.no_grad()``; the result is for
    inference only.

    Args:
        model: a model on a CUDA device in fp16/bf16.
        params: weight FQNs to consider (default: every ``nn.Linear`` weight).
        contiguous: ``"auto"`` (default): the model is traced and a layer's output is left as the
            kernel wrote it when every path from it runs through elementwise ops only into the input
            of another converted layer (an MLP's gate/up projections), which takes any layout; all
            other converted layers get the copy (all of them if the model cannot be traced). ``"all"``:
            every converted layer gets the copy. ``"none"``: no copies.

    Returns:
        The FQNs of the converted weights.

    Raises:
        RuntimeError: not on CUDA, or the GPU is older than sm80.
        ValueError: the weights are not fp16/bf16, or an unknown ``contiguous``.
    """
    from torch.sparse import to_sparse_semi_structured

    if contiguous not in ("auto", "all", "none"):
        raise ValueError(f"contiguous must be 'auto', 'all' or 'none', got {contiguous!r}")
    names = params or [f"{k}.weight" for k, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    todo = []
    for p in names:
        owner_name, _, attr = p.rpartition(".")
        owner = model.get_submodule(owner_name)
        w = getattr(owner, attr)
        if not isinstance(owner, nn.Linear) or w.dim() != 2:
            continue
        if w.device.type != "cuda" or torch.cuda.get_device_capability(w.device)[0] < 8:
            raise RuntimeError(f"{p}: semi-structured sparse kernels need a CUDA GPU of sm80+, weight is on {w.device}")
        if w.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"{p}: semi-structured sparse kernels need fp16/bf16 weights, got {w.dtype}")
        r, c = w.shape
        if r % 64 or c % 64 or nm_violations(w, 2, 4):
            continue
        todo.append((p, owner, attr, w))
    free: set[str] = set()
    if contiguous == "none":
        free = {p for p, *_ in todo}
    elif contiguous == "auto" and todo:
        free = _layout_free_outputs(model, {p for p, *_ in todo})
    for p, owner, attr, w in todo:
        setattr(owner, attr, nn.Parameter(to_sparse_semi_structured(w.detach()), requires_grad=False))
        if p not in free:
            owner.register_forward_hook(_contiguous_output)
    return [p for p, *_ in todo]


def _layout_free_outputs(model: nn.Module, converted: set[str]) -> set[str]:
    """The weights in ``converted`` whose ``linear`` output reaches, through elementwise ops only, nothing
    but the input of other ``converted`` linears (read from the traced graph; empty if tracing fails).

    Only layout, never values, depends on this: every op accepts any strides. H200, torch 2.11, 4 layers
    of Llama-2-7B shape at 16 x 2048 tokens under CUDA graphs: 154.3 ms with a copy after every 2:4
    layer, 140.3 ms without the copies of gate/up, dense 150.3 ms
    (``benchmarks/results/h200_session6/profile_2to4_hooks_h200.log``)."""
    import logging

    from .tracing import trace

    aten = torch.ops.aten
    try:
        gm = trace(model, dynamic=False)
    except Exception as e:  # any model `trace` cannot export: copy after every layer
        logging.getLogger("surgeon_fx").info("to_semi_structured_: no graph (%s); contiguous copies everywhere", e)
        return set()
    elementwise = {aten.silu, aten.gelu, aten.relu, aten.sigmoid, aten.tanh, aten.mul, aten.div, aten.add, aten.sub}
    elementwise |= {aten.pow, aten.neg, aten.exp, aten._to_copy, aten.clone}

    def fqn(node) -> str | None:
        t = node.target if node.op == "get_attr" else None
        return t.removeprefix("inner.") if isinstance(t, str) else None

    def packet(node):
        return getattr(node.target, "overloadpacket", None) if node.op == "call_function" else None

    free = set()
    for n in gm.graph.nodes:
        if packet(n) is not aten.linear or fqn(n.args[1]) not in converted:
            continue
        ok, todo, seen = True, [n], {n}
        while todo and ok:
            cur = todo.pop()
            for u in cur.users:
                if packet(u) is aten.linear and u.args[0] is cur and fqn(u.args[1]) in converted:
                    continue
                if packet(u) in elementwise:
                    if u not in seen:
                        seen.add(u)
                        todo.append(u)
                    continue
                ok = False
                break
        if ok:
            free.add(fqn(n.args[1]))
    return free


def _contiguous_output(module, args, out):
    """The semi-structured matmul returns its result transposed in memory (column-major). Attention
    kernels need a unit stride on the head dimension, so a projection's output in that layout sends
    ``scaled_dot_product_attention`` to its slow float32 math fallback (profiled on an H200,
    ``benchmarks/results/h200_session5/profile_2to4_h200.log``); one copy avoids it. The copies take 22%
    of the 2:4 model's GPU time (``h200_session6/profile_2to4_h200_contiguous.log``, torch 2.11). Asking
    cuSPARSELt for the transposed result instead (``fuse_transpose_cusparselt=True``) gives a contiguous,
    correct output but took 190-350 ms per call there instead of 0.6-5 ms
    (``h200_session6/profile_2to4_h200_fused.log``), so it is not done here. torch 2.13's own linear
    path asks for the transposed result itself (not yet measured on a GPU); the hook is then a no-op."""
    return out.contiguous()
