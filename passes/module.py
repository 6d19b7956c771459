"""Rewrite the eager model the way ``apply_plan`` rewrote its graph, so ``generate()`` keeps working.

Reads: a plan, the graph before and after ``apply_plan`` (for the shape constants that changed and
the modules that own them). Writes: the eager module, in place (hence the trailing underscore).
Invariant: after the rewrite the eager model computes what the rewritten graph computes; this is
checked by running both, and the rewrite fails loudly otherwise.

Integer attributes that a module's ``forward`` turns into shape constants (OPT's ``num_heads``,
GPT-2's ``split_size`` and ``Conv1D.nf``) are found generically: every shape constant that changed
is traced to its owning module through ``nn_module_stack``; an integer attribute of that module
holding the old value takes the new one. Values that are ambiguous (one old value, several new ones,
or an unchanged constant with the same value) are resolved by running the model.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import fx, nn

from surgeon_fx.ir import Plan
from surgeon_fx.keys import SOURCE, SurgeonError
from surgeon_fx.tracing import LogitsWrapper

from .groups import param_aliases
from .rewrite import ARG_RULES

__all__ = ["apply_plan_to_module_", "changed_constants"]


def changed_constants(old: fx.GraphModule, new: fx.GraphModule):
    """Integer shape constants per owning module: ``{module path: (changed {old: {new}}, unchanged set)}``."""
    prefix = old.meta[SOURCE].prefix.rstrip(".") if SOURCE in old.meta else ""
    new_nodes = {n.name: n for n in new.graph.nodes}
    changed: dict[str, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    unchanged: dict[str, set[int]] = defaultdict(set)
    for n in old.graph.nodes:
        if n.op != "call_function" or getattr(n.target, "overloadpacket", None) not in ARG_RULES:
            continue
        m = new_nodes.get(n.name)
        if m is None:
            continue
        stack = n.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        if path == prefix:
            path = ""
        elif prefix and path.startswith(prefix + "."):
            path = path[len(prefix) + 1 :]
        olds = [a for a in _ints(n.args)]
        news = [a for a in _ints(m.args)]
        if len(olds) != len(news):
            continue
        for a, b in zip(olds, news):
            if a != b:
                changed[path][a].add(b)
            else:
                unchanged[path].add(a)
    return {p: (dict(changed[p]), unchanged[p]) for p in set(changed) | set(unchanged)}


def _ints(args):
    for a in args:
        if isinstance(a, bool):
            continue
        if isinstance(a, int):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (x for x in a if isinstance(x, int) and not isinstance(x, bool))


def _slice_params_(model: nn.Module, plan: Plan, aliases: dict[str, tuple[str, ...]]) -> set[str]:
    owners = set()
    for p, axes in plan.keep.items():
        w = model.get_parameter(p)
        t = w.detach()
        for ax, kept in sorted(axes.items()):
            t = t.index_select(ax, torch.as_tensor(kept, dtype=torch.long, device=t.device))
        neww = nn.Parameter(t.contiguous(), requires_grad=w.requires_grad)
        for name in aliases.get(p, (p,)):
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, neww)
            owners.add(owner)
    return owners


def _fix_torch_layers_(model: nn.Module, owners: set[str]) -> None:
    """Keep the size attributes of torch's own layers in step with their sliced weights."""
    for path in owners:
        m = model.get_submodule(path) if path else model
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.Embedding):
            m.num_embeddings, m.embedding_dim = m.weight.shape
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            m.normalized_shape = tuple(m.weight.shape)


def apply_plan_to_module_(
    model: nn.Module, plan: Plan, *, old: fx.GraphModule, new: fx.GraphModule, atol: float | None = None
) -> nn.Module:
    """Slice ``model``'s parameters by ``plan`` and update the integer attributes its graph depends on.

    Args:
        model: the eager model ``old`` was traced from (modified in place).
        plan: the plan ``new`` was produced with.
        old, new: the graph before and after :func:`~surgeon_fx.passes.apply_plan`.
        atol: tolerance of the eager-vs-graph check, relative to the largest logit; default
            ``max(1e-4, 8 * eps)`` of the parameters' dtype (bfloat16: 0.0625, where eager and graph
            kernels round differently; a wrong shape attribute gives errors of order one).

    Returns:
        ``model``, for chaining.

    Raises:
        SurgeonError: the eager model does not match the rewritten graph after the update.
    """
    if plan.is_empty:
        return model
    if atol is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        atol = max(1e-4, 8 * torch.finfo(dtype).eps)
    aliases = param_aliases(old)
    owners = _slice_params_(model, plan, aliases)
    _fix_torch_layers_(model, owners)
    ambiguous: list[tuple[nn.Module, str, int, list[int]]] = []
    for path, (changed, unchanged) in changed_constants(old, new).items():
        try:
            mod = model.get_submodule(path) if path else model
        except AttributeError:
            continue
        for attr, val in list(vars(mod).items()):
            if isinstance(val, bool) or not isinstance(val, int) or val not in changed:
                continue
            options = sorted(changed[val])
            if len(options) == 1 and val not in unchanged:
                setattr(mod, attr, options[0])
            else:
                ambiguous.append((mod, attr, val, options))
    err = _mismatch(model, new)
    if err is None:
        err = _debug_(model, new, ambiguous)
    if err is None or err > atol:
        err = _resolve_(model, new, ambiguous, atol, err)
    if err is None or err > atol:
        raise SurgeonError(
            f"the rewritten eager {type(model).__name__} does not match the rewritten graph "
            f"(max abs difference {err}); a module attribute that feeds a shape may need a dependency rule"
        )
    return model


def _progress(model: nn.Module, gm: fx.GraphModule):
    """Run the eager model; return (error vs graph or None, modules finished, innermost failing module)."""
    stack: list[nn.Module] = []
    done = [0]
    hooks = []

    def enter(mod, args):
        stack.append(mod)

    def leave(mod, args, out):  # returns None: the module's output is left alone
        stack.pop()
        done[0] += 1

    for m in model.modules():
        hooks.append(m.register_forward_pre_hook(enter))
        hooks.append(m.register_forward_hook(leave))
    try:
        err = _mismatch(model, gm, raise_eager=True)
        return err, done[0], None
    except Exception:
        return None, done[0], list(stack)
    finally:
        for h in hooks:
            h.remove()


def _debug_(model, gm, ambiguous, max_steps: int = 256) -> float | None:
    """Resolve ambiguous attributes where the eager forward fails: try the candidates of the
    innermost failing module (then its ancestors) and keep the choice that lets the forward get
    furthest. Greedy, one module at a time, so it scales with depth."""
    from itertools import product

    by_mod: dict[int, list[tuple[nn.Module, str, int, list[int]]]] = defaultdict(list)
    for mod, attr, val, options in ambiguous:
        by_mod[id(mod)].append((mod, attr, val, options))
    err, done, stack = _progress(model, gm)
    for _ in range(max_steps):
        if stack is None:
            return err
        improved = False
        for mod in reversed(stack):
            cands = by_mod.get(id(mod), [])
            if not cands:
                continue
            current = tuple(getattr(m, a) for m, a, _, _ in cands)
            best = (done, current)
            for choice in product(*[[v, *opts] for _, _, v, opts in cands]):
                if choice == current:
                    continue
                for (m, a, _, _), v in zip(cands, choice):
                    setattr(m, a, v)
                e, d, st = _progress(model, gm)
                if st is None or d > best[0]:
                    best = (float("inf") if st is None else d, choice)
            for (m, a, _, _), v in zip(cands, best[1]):
                setattr(m, a, v)
            if best[1] != current:
                improved = True
                break
        if not improved:
            return None
        err, done, stack = _progress(model, gm)
    return err


def _resolve_(model, gm, ambiguous, atol: float, err: float | None, max_classes: int = 10) -> float | None:
    """Try ambiguous attribute updates, a class at a time: repeated layers share (type, attr, old, new).

    Subsets of classes are tried smallest first; the first that makes the eager model match wins.
    """
    from itertools import combinations

    classes: dict[tuple, list[tuple[nn.Module, str, int]]] = defaultdict(list)
    for mod, attr, val, options in ambiguous:
        for opt in options:
            classes[(type(mod).__qualname__, attr, val, opt)].append((mod, attr, val))
    keys = list(classes)[:max_classes]
    for k in range(1, len(keys) + 1):
        for subset in combinations(keys, k):
            if len({(c[0], c[1], c[2]) for c in subset}) < k:
                continue  # two new values for one attribute
            for c in subset:
                for mod, attr, _ in classes[c]:
                    setattr(mod, attr, c[3])
            e = _mismatch(model, gm)
            if e is not None and e <= atol:
                return e
            for c in subset:
                for mod, attr, val in classes[c]:
                    setattr(mod, attr, val)
    return err


def _mismatch(model: nn.Module, gm: fx.GraphModule, raise_eager: bool = False) -> float | None:
    info = gm.meta.get(SOURCE)
    vocab = (info.vocab_size if info else None) or 2
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    ids = torch.randint(0, vocab, (2, 5), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        ref = gm(ids)
        try:
            out = LogitsWrapper(model)(ids)
        except Exception:
            if raise_eager:
                raise
            return None
    # relative to the logits' scale: eager and graph kernels differ in the last bits on GPUs
    return float((ref.float() - out.float()).abs().max() / ref.float().abs().max().clamp_min(1.0))
