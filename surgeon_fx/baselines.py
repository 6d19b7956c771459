"""Torch-Pruning as an outside baseline: heads and MLP units removed through the ``torch-pruning`` API.

Reads: a Hugging Face causal LM with ``nn.Linear`` attention projections (one linear per query, key and
value, reading the same hidden state, plus one output linear), optional calibration windows for Taylor
importance. Writes: nothing on the caller's model; returns a pruned deep copy with a
:class:`TorchPruningReport` at ``result.surgeon_fx_baseline``. Invariant: the residual width, the
embeddings and the LM head are kept; Torch-Pruning's own ``BasePruner`` and importance criteria choose
what goes (local pruning, the same ratio in every layer); this module only supplies the structure
Torch-Pruning needs (heads per projection, ignored layers), searches its ratio to reach the requested
fraction of parameters, and writes the new head counts and widths back to the modules and the config.

Two workarounds for torch-pruning 1.6.1 with torch 2.13 / transformers 5, both measured here:
- its index mapping loops forever on rotary embeddings (``rotate_half`` slices and concatenates the head
  dimension, and the shifted indices never repeat); its dependency graph is therefore traced with the
  model's ``apply_rotary_pos_emb`` replaced by an elementwise stand-in (``q * cos``), which couples heads
  exactly as the real one does. Only whole heads are removed, so the rotary pairing is never split.
- with ``sdpa`` attention it treats the attention op as elementwise and mis-groups GQA heads, so the copy
  is traced with ``eager`` attention and the caller's attention implementation is restored afterwards.
Under GQA Torch-Pruning removes the same number of query heads from every KV group and keeps all KV heads.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .keys import UnsupportedGraphError

__all__ = ["torch_pruning_compress", "TorchPruningReport", "IMPORTANCES"]

IMPORTANCES = ("taylor", "magnitude")
_TOLERANCE = 0.01  # accepted |achieved - requested| fraction of the counted parameters
_STOP = 0.002  # the ratio search stops early once this close
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "num_key_value_heads", "num_key_value_groups")
_WIDTH_FIELDS = ("intermediate_size", "ffn_dim", "n_inner")


@dataclass(frozen=True)
class TorchPruningReport:
    """What the baseline did: the requested and reached fractions and the resulting widths.

    Attributes:
        importance: ``"taylor"`` or ``"magnitude"``.
        basis: ``"linear"`` (decoder linear layers, as papers count) or ``"model"``.
        target: requested fraction of the basis removed.
        achieved: fraction actually removed.
        tp_ratio: Torch-Pruning ``pruning_ratio`` (MLP units per layer) that reached it.
        tp_head_ratio: Torch-Pruning ``head_pruning_ratio`` (0 when heads were left alone).
        params_before, params_after: whole-model parameter counts (tied tensors once).
        basis_before, basis_after: counted parameters of the basis.
        heads: query heads per attention module after pruning (module FQN -> count).
        kv_heads: key/value heads per attention module after pruning.
        mlp_widths: hidden width of every MLP (FQN of its output linear -> width).
        trials: pruning runs the ratio search needed.
        seconds: wall time of the whole call.
    """

    importance: str
    basis: str
    target: float
    achieved: float
    tp_ratio: float
    tp_head_ratio: float
    params_before: int
    params_after: int
    basis_before: int
    basis_after: int
    heads: dict[str, int] = field(default_factory=dict)
    kv_heads: dict[str, int] = field(default_factory=dict)
    mlp_widths: dict[str, int] = field(default_factory=dict)
    trials: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        heads = sorted(set(self.heads.values()))
        widths = sorted(set(self.mlp_widths.values()))
        return (
            f"torch-pruning {self.importance}: removed {self.achieved:.2%} of {self.basis} parameters "
            f"(target {self.target:.2%}; {self.basis_before:,} -> {self.basis_after:,}); whole model "
            f"{self.params_before:,} -> {self.params_after:,}; query heads per layer {heads}, MLP widths {widths}; "
            f"TP pruning_ratio {self.tp_ratio:.4f}, head_pruning_ratio {self.tp_head_ratio:.4f}; "
            f"{self.trials} trials, {self.seconds:.1f}s"
        )


@dataclass(frozen=True)
class _Attention:
    """One attention module: its projections reading the hidden state and the linear writing its output."""

    name: str
    readers: tuple[str, ...]
    writer: str
    head_dim: int


def _linear_children(module: nn.Module) -> dict[str, nn.Linear]:
    return {n: c for n, c in module.named_children() if isinstance(c, nn.Linear)}


def _find_attention(model: nn.Module, ids: torch.Tensor) -> list[_Attention]:
    """Attention modules found by data flow in one forward: >= 3 linear children reading one tensor
    (query, key, value) and one linear child whose output is the module's output."""
    inputs: dict[nn.Module, torch.Tensor] = {}
    outputs: dict[nn.Module, torch.Tensor] = {}  # tensors kept alive, so identity comparisons are sound
    parents = {n: m for n, m in model.named_modules() if len(_linear_children(m)) >= 4}

    def hook(mod, args, out):
        inputs[mod] = args[0] if args else None
        outputs[mod] = out[0] if isinstance(out, tuple) else out

    kids = {id(c): c for p in parents.values() for c in _linear_children(p).values()}
    handles = [m.register_forward_hook(hook) for m in (*kids.values(), *parents.values())]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    cfg = model.config
    found = []
    for name, p in parents.items():
        lin = {n: c for n, c in _linear_children(p).items() if c in inputs}
        readers = max(([n for n in lin if inputs[lin[n]] is inputs[c]] for c in lin.values()), key=len, default=[])
        writers = [n for n, c in lin.items() if p in outputs and outputs[c] is outputs[p]]
        if len(readers) < 3 or len(writers) != 1:
            continue
        head_dim = getattr(p, "head_dim", None) or getattr(cfg, "head_dim", None)
        head_dim = head_dim or cfg.hidden_size // cfg.num_attention_heads
        if any(lin[r].out_features % head_dim for r in readers):
            raise UnsupportedGraphError(f"{name}: projection widths are not multiples of head_dim {head_dim}")
        found.append(_Attention(name, tuple(readers), writers[0], int(head_dim)))
    return found


@contextlib.contextmanager
def _elementwise_rotary(model: nn.Module, attention: list[_Attention]):
    """Replace ``apply_rotary_pos_emb`` in the attention classes' modules by ``q * cos, k * cos`` (see top)."""
    saved = []
    for a in attention:
        mod = sys.modules[type(model.get_submodule(a.name)).__module__]
        fn = getattr(mod, "apply_rotary_pos_emb", None)
        if fn is not None and all(m is not mod for m, _ in saved):
            saved.append((mod, fn))
            mod.apply_rotary_pos_emb = lambda q, k, cos, sin, *args, **kwargs: (q * cos, k * cos)
    try:
        yield
    finally:
        for mod, fn in saved:
            mod.apply_rotary_pos_emb = fn


def _taylor_grads(model: nn.Module, windows: torch.Tensor, progress: bool) -> dict[str, torch.Tensor]:
    """Gradients of the mean next-token cross-entropy over ``windows`` (each window weighs the same)."""
    device = next(model.parameters()).device
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    try:
        with torch.enable_grad():
            for w in tqdm(windows, desc="taylor gradients", disable=not progress, leave=False):
                ids = w[None].to(device)  # (1, L)
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # (1, L-1, V)
                loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) / len(windows)
                loss.backward()
        return {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
    finally:
        for n, p in params.items():
            p.grad = None
            p.requires_grad_(flags[n])


def _head_ratio_cap(model: nn.Module, a: _Attention) -> float:
    """Largest ``head_pruning_ratio`` Torch-Pruning 1.6.1 honours for this attention module.

    Locally it removes ``k = ceil(ceil(h * n_q) / n_kv)`` query heads from every KV group. It decides that
    the group is GQA (and so keeps the KV projections whole) after lowering the query-head count, so when
    ``k = rep - 1`` leaves as many query heads as KV heads it prunes the KV heads too, finds nothing left of
    them and silently skips the layer's heads. Hence ``k <= rep - 2``, i.e. ``h <= (rep - 2) / rep``; with
    plain multi-head attention (``rep = 1``) one head must stay.
    """
    n_q = model.get_submodule(f"{a.name}.{a.writer}").in_features // a.head_dim
    n_kv = min(model.get_submodule(f"{a.name}.{r}").out_features // a.head_dim for r in a.readers)
    rep = n_q // n_kv
    cap = (rep - 2) / rep if rep > 1 else (n_q - 1) / n_q
    return cap - 1e-9


def _prune_copy(base, attention, grads, ratio, head_ratio, importance, example, ignored_names):
    """One Torch-Pruning run on a deep copy of ``base``; returns the pruned copy."""
    import torch_pruning as tp

    model = copy.deepcopy(base)
    params = dict(model.named_parameters())
    for n, g in grads.items():
        params[n].grad = g.clone()
    num_heads = {}
    for a in attention:
        for r in a.readers:
            lin = model.get_submodule(f"{a.name}.{r}")
            num_heads[lin] = lin.out_features // a.head_dim
    imp = (
        tp.importance.GroupTaylorImportance() if importance == "taylor" else tp.importance.GroupMagnitudeImportance(p=2)
    )
    with warnings.catch_warnings(), _elementwise_rotary(model, attention), torch.enable_grad():
        warnings.filterwarnings("ignore", message=".*[Uu]nwrapped parameters.*")
        pruner = tp.pruner.BasePruner(
            model,
            example,
            importance=imp,
            pruning_ratio=ratio,
            head_pruning_ratio=head_ratio,
            num_heads=num_heads,
            prune_num_heads=head_ratio > 0,
            prune_head_dims=False,
            ignored_layers=[model.get_submodule(n) for n in ignored_names],
            forward_fn=lambda m, x: m(input_ids=x, use_cache=False).logits,
        )
        pruner.step()
    for p in model.parameters():
        p.grad = None
    return model


def _write_back(model: nn.Module, attention: list[_Attention], mlp_writers: list[str], old_width: int | None):
    """Set head counts on every attention module and, when uniform, the config's heads and MLP width."""
    heads, kv_heads = {}, {}
    for a in attention:
        m = model.get_submodule(a.name)
        nq = model.get_submodule(f"{a.name}.{a.writer}").in_features // a.head_dim
        nkv = min(model.get_submodule(f"{a.name}.{r}").out_features // a.head_dim for r in a.readers)
        values = {"num_heads": nq, "num_attention_heads": nq, "num_key_value_heads": nkv}
        values["num_key_value_groups"] = nq // nkv
        for attr in _HEAD_ATTRS:
            if isinstance(getattr(m, attr, None), int):
                setattr(m, attr, values[attr])
        heads[a.name], kv_heads[a.name] = nq, nkv
    widths = {n: model.get_submodule(n).in_features for n in mlp_writers}
    cfg = model.config
    if len(set(heads.values())) == 1 and len(set(kv_heads.values())) == 1:
        if (
            getattr(cfg, "head_dim", None) is not None
            or cfg.hidden_size // cfg.num_attention_heads != attention[0].head_dim
        ):
            cfg.head_dim = attention[0].head_dim  # hidden / heads no longer gives it
        cfg.num_attention_heads = next(iter(heads.values()))
        if getattr(cfg, "num_key_value_heads", None) is not None:
            cfg.num_key_value_heads = next(iter(kv_heads.values()))
    if len(set(widths.values())) == 1:
        for f in _WIDTH_FIELDS:
            if old_width is not None and getattr(cfg, f, None) == old_width:
                setattr(cfg, f, next(iter(widths.values())))
    return heads, kv_heads, widths


def _counted(model: nn.Module, names: frozenset[str] | None) -> int:
    from .evaluate import count_parameters

    if names is None:
        return count_parameters(model)
    return sum(p.numel() for n, p in model.named_parameters(remove_duplicate=False) if n in names)


def _check(model, ratio, importance, basis, calibration):
    from .api import check_calibration, check_model
    from .tracing import is_hf_model, vocab_size_of

    check_model(model)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be a fraction in [0, 1), got {ratio!r}")
    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
    if basis not in ("linear", "model"):
        raise ValueError(f"basis must be 'linear' or 'model', got {basis!r}")
    if not is_hf_model(model) or not hasattr(model.config, "num_attention_heads"):
        raise UnsupportedGraphError(
            f"the Torch-Pruning baseline needs a Hugging Face causal LM with a config giving num_attention_heads; "
            f"got {type(model).__name__}. Use surgeon_fx.compress for other modules."
        )
    if importance == "taylor" and calibration is None:
        raise ValueError(
            "importance='taylor' needs calibration windows for its gradients; pass calibration= "
            "(surgeon_fx.data.calibration_windows) or use importance='magnitude'"
        )
    return None if calibration is None else check_calibration(calibration, vocab_size_of(model))


def torch_pruning_compress(
    model: nn.Module,
    ratio: float,
    calibration: torch.Tensor | None = None,
    *,
    importance: str = "taylor",
    basis: str = "linear",
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Remove ``ratio`` of the parameters with Torch-Pruning's ``BasePruner`` (query heads and MLP units).

    Torch-Pruning's ``pruning_ratio`` (MLP units of every layer) and ``head_pruning_ratio`` (query heads of
    every layer) are set equal and searched by bisection until the removed fraction of ``basis`` is within
    0.2% of ``ratio`` (or as close as Torch-Pruning's rounding allows; heads go in whole KV groups' worth);
    if heads overshoot a small target, MLP units alone are tried too.

    Args:
        model: a Hugging Face causal LM with separate ``nn.Linear`` query/key/value/output projections
            (Llama, Mistral, Qwen2, ...); not modified.
        ratio: fraction of ``basis`` parameters to remove, in [0, 1).
        calibration: (N, L) int64 token windows; Taylor importance uses the gradients of their
            next-token loss (mean over tokens and windows). Ignored by magnitude.
        importance: ``"taylor"`` (``GroupTaylorImportance``, |w * dL/dw| summed over the group) or
            ``"magnitude"`` (``GroupMagnitudeImportance``, group L2 norm).
        basis: ``"linear"`` counts the decoder linear layers as ``surgeon_fx`` does
            (``Analysis.linear_params``); ``"model"`` counts every parameter (``count_parameters``).
        seed: seeds torch before pruning (Torch-Pruning's criteria here are deterministic).
        progress: progress bars for the gradients and the ratio search.

    Returns:
        A pruned deep copy of ``model`` (same class, caller's attention implementation) with the new
        head counts written to its attention modules and config; ``result.surgeon_fx_baseline`` is a
        :class:`TorchPruningReport`.

    Raises:
        ValueError: bad ratio, importance, basis or calibration, or Taylor without calibration.
        ImportError: ``torch-pruning`` is not installed.
        UnsupportedGraphError: no attention module Torch-Pruning can prune (fused or ``Conv1D``
            projections, e.g. GPT-2), the target is out of its reach, or the pruned model fails to run.
    """
    t0 = time.perf_counter()
    windows = _check(model, ratio, importance, basis, calibration)
    try:
        import torch_pruning  # noqa: F401
    except ImportError as err:
        raise ImportError("the Torch-Pruning baseline needs `pip install torch-pruning==1.6.1`") from err
    from . import trace
    from .passes import annotate_groups, get_groups

    torch.manual_seed(seed)
    device = next(model.parameters()).device
    example = torch.arange(8, device=device)[None] % max(2, min(model.config.vocab_size, 8))  # (1, 8)
    base = copy.deepcopy(model).eval()
    attn_impl = getattr(base.config, "_attn_implementation", None)
    if attn_impl not in (None, "eager"):
        base.set_attn_implementation("eager")
    attention = _find_attention(base, example)
    if not attention:
        raise UnsupportedGraphError(
            f"found no attention module with separate nn.Linear query/key/value/output projections in "
            f"{type(model).__name__}; Torch-Pruning's head pruning needs them (fused or Conv1D projections, "
            "as in GPT-2 and Phi, are not supported by this baseline)"
        )
    names = None
    if basis == "linear":
        gm = trace(model)
        annotate_groups(gm)
        names = get_groups(gm).linear_params
        del gm
    before, params_before = _counted(base, names), _counted(base, None)
    grads = _taylor_grads(base, windows, progress) if importance == "taylor" else {}
    emb, head = base.get_input_embeddings(), base.get_output_embeddings()
    names_of = {id(m): n for n, m in base.named_modules()}
    ignored = [names_of[id(m)] for m in (emb, head) if m is not None]
    hidden = emb.weight.shape[1]
    in_attention = {f"{a.name}.{c}" for a in attention for c in (*a.readers, a.writer)}
    mlp_writers = [
        n
        for n, m in base.named_modules()
        if isinstance(m, nn.Linear) and m.out_features == hidden and n not in in_attention and n not in ignored
    ]
    old_width = base.get_submodule(mlp_writers[0]).in_features if mlp_writers else None

    cap = min(_head_ratio_cap(base, a) for a in attention)

    def run(r, head_r):
        small = _prune_copy(base, attention, grads, r, head_r, importance, example, ignored)
        return small, 1.0 - _counted(small, names) / before

    best = (math.inf, None, 0.0, 0.0, 0.0)
    trials = 0
    bar = tqdm(desc="torch-pruning ratio search", disable=not progress, leave=False)
    for heads_on in (True, False) if cap > 0 and ratio > 0 else (False,):
        lo, f_lo, hi, f_hi = 0.0, 0.0, 0.99, None
        r, bisect = min(ratio, hi), False  # first guess: the requested fraction itself
        for _ in range(12):
            head_r = min(r, cap) if heads_on else 0.0
            small, got = run(r, head_r)
            trials += 1
            bar.update(1)
            if abs(got - ratio) < best[0]:
                best = (abs(got - ratio), small, got, r, head_r)
            if abs(got - ratio) <= _STOP:
                break
            lo, f_lo, hi, f_hi = (r, got, hi, f_hi) if got < ratio else (lo, f_lo, r, got)
            # the removed fraction grows about linearly with r, in steps: interpolate, bisect every other try
            if f_hi is None:
                r = r * ratio / got if got > 0 else (r + hi) / 2
            elif not bisect and f_hi > f_lo:
                r = lo + (hi - lo) * (ratio - f_lo) / (f_hi - f_lo)
            r, bisect = (r if lo < r < hi and not bisect else (lo + hi) / 2), not bisect
        if best[0] <= _TOLERANCE:
            break
    bar.close()
    err, small, got, r, head_r = best
    if err > _TOLERANCE:
        raise UnsupportedGraphError(
            f"Torch-Pruning could not reach {ratio:.2%} of the {basis} parameters within {_TOLERANCE:.0%} "
            f"(closest: {got:.2%} at pruning_ratio {r:.3f}); its per-layer rounding of heads and units is too coarse"
        )
    heads, kv_heads, widths = _write_back(small, attention, mlp_writers, old_width)
    if attn_impl not in (None, "eager"):
        small.set_attn_implementation(attn_impl)
    for p, flag in zip(small.parameters(), (p.requires_grad for p in model.parameters())):
        p.requires_grad_(flag)
    try:
        with torch.no_grad():
            small(input_ids=example, use_cache=False)
    except Exception as e:  # the write-back missed an attribute this model's forward reads
        raise UnsupportedGraphError(
            f"the model pruned by Torch-Pruning does not run ({type(e).__name__}: {e}); "
            f"its attention module may keep a head count in an attribute other than {_HEAD_ATTRS}"
        ) from e
    small.surgeon_fx_baseline = TorchPruningReport(
        importance=importance,
        basis=basis,
        target=float(ratio),
        achieved=got,
        tp_ratio=r,
        tp_head_ratio=head_r,
        params_before=params_before,
        params_after=_counted(small, None),
        basis_before=before,
        basis_after=_counted(small, names),
        heads=heads,
        kv_heads=kv_heads,
        mlp_widths=widths,
        trials=trials,
        seconds=time.perf_counter() - t0,
    )
    return small.eval()
