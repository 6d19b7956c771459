"""Checkpoints of compressed models: uneven widths through this package, uniform widths through stock transformers.

Reads: a compressed Hugging Face model (``model.surgeon_fx_plan`` when it came from ``compress``) or a folder
written by :func:`save_pretrained`. Writes: a Hugging Face folder: ``config.json`` (with the pruning metadata
under ``"surgeon_fx"``), safetensors weights, ``generation_config.json``, the tokenizer's files, the plan
(``surgeon_fx_plan.json``) and the non-persistent buffers (``surgeon_fx_buffers.safetensors``).
Invariant: :func:`load_pretrained` gives back a model with bit-identical weights and outputs, built on the
meta device (no random initialisation, no ``ignore_mismatched_sizes``); a ``"stock"`` folder also loads
with plain ``AutoModelForCausalLM.from_pretrained`` and needs nothing from this package.

Two layouts. ``"stock"``: every layer has the same widths (``compress(..., uniform=True)``), so the config's
own size fields describe the model; they are rewritten (heads, KV heads, MLP width, hidden width, and an
explicit ``head_dim``, which stays the original one) and checked by building the config's model on the meta
device and comparing every parameter shape. ``"uneven"``: the config keeps the original sizes; the loader
builds that model on the meta device, gives every parameter its saved shape, and restores the integer
attributes that differ from a freshly built model (recorded at save time, e.g. GPT-2's ``split_size``).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

from .ir import Plan
from .keys import SurgeonError

__all__ = ["save_pretrained", "load_pretrained", "stock_config", "read_metadata", "METADATA_KEY", "FORMAT"]

METADATA_KEY = "surgeon_fx"
FORMAT = "surgeon_fx.checkpoint/1"
PLAN_FILE = "surgeon_fx_plan.json"
BUFFERS_FILE = "surgeon_fx_buffers.safetensors"
# Config-class field names of the MLP width (the hidden width and head counts resolve through
# ``config.attribute_map``, e.g. GPT-2's n_embd / n_head): Llama-likes, OPT, GPT-2.
_MLP_FIELDS = ("intermediate_size", "ffn_dim", "n_inner")


def _meta_model(config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _kind(group: str) -> str:
    return group.rsplit("/", 1)[-1].split("#")[0]


def _is_size(v) -> bool:
    return type(v) is int or (type(v) is tuple and bool(v) and all(type(x) is int for x in v))


def _int_attrs(module: nn.Module) -> dict[str, object]:
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and _is_size(v)}


def _attribute_diff(model: nn.Module, reference: nn.Module) -> dict[str, dict[str, object]]:
    """Integer attributes of ``model``'s submodules that differ from ``reference`` (same class, other sizes)."""
    ref = dict(reference.named_modules())
    diff = {}
    for path, mod in model.named_modules():
        theirs = _int_attrs(ref[path]) if path in ref else {}
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in _int_attrs(mod).items() if theirs.get(k, v) != v}
        if d:
            diff[path] = d
    return diff


def _shape_mismatches(model: nn.Module, reference: nn.Module) -> list[str]:
    ref = {n: tuple(p.shape) for n, p in reference.named_parameters(remove_duplicate=False)}
    out = []
    for n, p in model.named_parameters(remove_duplicate=False):
        if ref.get(n) != tuple(p.shape):
            out.append(f"{n}: model {tuple(p.shape)}, config builds {ref.get(n)}")
    return out


def stock_config(model: nn.Module):
    """The config whose stock model has exactly ``model``'s shapes, so ``from_pretrained`` needs no help.

    New sizes come from the plan's removed-atom counts per structure kind and the original config: kept KV
    groups x query heads per KV group, MLP units, residual channels; ``head_dim`` is set explicitly to the
    original one. The result is checked by building it on the meta device and comparing every parameter
    shape with ``model`` (integer attributes that ``forward`` reads show up in :func:`save_pretrained`'s
    logits check).

    Args:
        model: a Hugging Face causal LM, typically ``compress(..., uniform=True)``'s result.

    Returns:
        A new config (``model.config`` is not modified).

    Raises:
        TypeError: not a Hugging Face model.
        ValueError: the widths differ between layers, or the config class cannot express them (GPT-2 and OPT
            derive head_dim from the hidden width, so they cannot drop heads or residual channels; LlamaConfig
            requires hidden_size % num_attention_heads == 0); the message names what does not fit.
    """
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "save_pretrained"):
        raise TypeError(f"stock_config needs a Hugging Face PreTrainedModel, got {type(model).__name__}")
    cfg = copy.deepcopy(cfg)
    plan = getattr(model, "surgeon_fx_plan", None)
    counts: dict[str, list[int]] = {}
    for g, atoms in (plan.removed if plan is not None else {}).items():
        counts.setdefault(_kind(g), []).append(len(atoms))
    uneven = sorted(k for k, c in counts.items() if k != "residual" and len(set(c)) > 1)
    if uneven:
        raise ValueError(
            f"the {', '.join(uneven)} widths differ between layers; a stock config has one width per kind. "
            "Compress with uniform=True, or save with layout='uneven' and load with surgeon_fx.load_pretrained"
        )
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    changes: dict[str, int] = {}
    if max(counts.get("heads", [0])):
        kept = kv - counts["heads"][0]
        changes["num_attention_heads"] = kept * (heads // kv)  # atoms kept x query heads per atom
        if hasattr(cfg, "num_key_value_heads"):
            changes["num_key_value_heads"] = kept
    if max(counts.get("mlp", [0])):
        field = next((f for f in _MLP_FIELDS if hasattr(cfg, f)), None)
        if field is None:
            raise ValueError(f"{type(cfg).__name__} has none of the MLP width fields {_MLP_FIELDS}")
        width = getattr(cfg, field) or 4 * cfg.hidden_size  # GPT-2: n_inner=None means 4 x n_embd
        changes[field] = width - counts["mlp"][0]
    if sum(counts.get("residual", [0])):
        changes["hidden_size"] = cfg.hidden_size - sum(counts["residual"])
    if "num_attention_heads" in changes or "hidden_size" in changes:
        changes["head_dim"] = head_dim  # explicit: many configs derive it as hidden_size // num_attention_heads
    for k, v in changes.items():
        setattr(cfg, k, v)
    try:
        if callable(getattr(cfg, "validate", None)):
            cfg.validate()  # transformers 5 checks e.g. LlamaConfig's hidden_size % num_attention_heads on load
        bad = _shape_mismatches(model, _meta_model(cfg))
    except Exception as e:  # the config or model class rejects the sizes (e.g. GPT-2: n_embd % n_head != 0)
        bad = [f"{type(model).__name__} cannot be built from them ({type(e).__name__}: {' '.join(str(e).split())})"]
    if bad:
        shown = "; ".join(bad[:3]) + (f"; ... ({len(bad)} in all)" if len(bad) > 3 else "")
        raise ValueError(
            f"{type(cfg).__name__} with {changes or 'unchanged sizes'} cannot describe this model: {shown}. "
            "Stock transformers needs the same widths in every layer (compress with uniform=True), for heads or "
            "residual channels a config class that reads head_dim, and sizes its config accepts (Llama-likes: "
            "hidden_size a multiple of num_attention_heads; pick `multiple` accordingly or keep the residual "
            "width); otherwise save with layout='uneven' and load with surgeon_fx.load_pretrained"
        )
    return cfg


def save_pretrained(
    model: nn.Module, save_directory: str | os.PathLike, *, tokenizer=None, layout: str = "auto", verify: bool = True
) -> Path:
    """Write ``model`` (uneven or uniform widths) as a Hugging Face folder that loads back exactly.

    Args:
        model: a Hugging Face causal LM, e.g. from :func:`surgeon_fx.compress`; not modified.
        save_directory: the folder (created; files already there with the same names are replaced).
        tokenizer: written along (``tokenizer.save_pretrained``) when given.
        layout: ``"stock"`` (loadable by plain ``from_pretrained``; fails if the config cannot express the
            widths), ``"uneven"`` (needs :func:`load_pretrained`), or ``"auto"``: stock where possible.
        verify: load the folder back (with stock transformers for ``"stock"``) and compare logits.

    Returns:
        The folder's path.

    Raises:
        TypeError: not a Hugging Face model.
        ValueError: bad ``layout``, or ``layout="stock"`` for widths the config class cannot express.
        SurgeonError: the written folder does not reproduce the model's logits.
    """
    from safetensors.torch import save_file

    from . import __version__

    if layout not in ("auto", "stock", "uneven"):
        raise ValueError(f"layout must be 'auto', 'stock' or 'uneven', got {layout!r}")
    if getattr(model, "config", None) is None or not hasattr(model, "save_pretrained"):
        raise TypeError(f"save_pretrained needs a Hugging Face PreTrainedModel, got {type(model).__name__}")
    cfg, chosen, why = model.config, "uneven", None
    if layout != "uneven":
        try:
            cfg, chosen = stock_config(model), "stock"
        except ValueError as e:
            if layout == "stock":
                raise
            why = str(e)
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    cfg = copy.deepcopy(cfg)
    cfg.architectures = [type(model).__name__]
    plan = getattr(model, "surgeon_fx_plan", None)
    persistent = set(model.state_dict())
    buffers = {n: b.detach().contiguous().clone() for n, b in model.named_buffers() if n not in persistent}
    setattr(
        cfg,
        METADATA_KEY,
        {
            "format": FORMAT,
            "layout": chosen,
            "why_uneven": why,
            "version": __version__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "attributes": {} if chosen == "stock" else _attribute_diff(model, _meta_model(cfg)),
            "plan_file": PLAN_FILE if plan is not None else None,
            "buffers_file": BUFFERS_FILE if buffers else None,
        },
    )
    cfg.save_pretrained(str(out))
    if plan is not None:
        (out / PLAN_FILE).write_text(plan.to_json())
    if buffers:
        save_file(buffers, str(out / BUFFERS_FILE))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    if verify:
        from transformers import AutoModelForCausalLM

        dtype = next(model.parameters()).dtype
        stock = chosen == "stock"
        again = (
            AutoModelForCausalLM.from_pretrained(str(out), dtype=dtype) if stock else load_pretrained(out, verify=False)
        )
        _verify(model, out, again)
    return out


def _verify(model: nn.Module, folder: Path, again: nn.Module | None) -> None:
    """``again`` (reloaded) reproduces ``model``'s logits; with ``again=None``: ``model`` runs, finitely."""
    from .tracing import LogitsWrapper, vocab_size_of

    device = next(model.parameters()).device
    ids = torch.randint(0, vocab_size_of(model) or 2, (1, 8), generator=torch.Generator().manual_seed(0)).to(device)
    was = model.training
    try:
        with torch.no_grad():
            a = LogitsWrapper(model.eval())(ids)
            b = a if again is None else LogitsWrapper(again.to(device).eval())(ids)
    except Exception as e:
        raise SurgeonError(f"the model in {folder} does not run: {type(e).__name__}: {e}") from e
    finally:
        model.train(was)
    # not torch.equal: the reloaded model may pick another attention kernel (sdpa vs eager) than the caller's
    if not torch.isfinite(a).all() or (a - b).abs().max().item() > 1e-4 * max(1.0, a.abs().max().item()):
        raise SurgeonError(
            f"the checkpoint in {folder} does not reproduce the model (max abs logit difference "
            f"{(a - b).abs().max().item():.3g}, finite: {bool(torch.isfinite(a).all())}); please report this "
            "with the model's class"
        )


def read_metadata(directory: str | os.PathLike) -> dict | None:
    """The ``"surgeon_fx"`` entry of ``directory/config.json``, or ``None`` for a plain checkpoint.

    Raises:
        FileNotFoundError: no ``config.json`` in ``directory``.
    """
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a folder written by save_pretrained")
    return json.loads(path.read_text()).get(METADATA_KEY)


def _weights(folder: Path, device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    )
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if not (folder / f).is_file():
            raise FileNotFoundError(f"{folder / f} is missing; the checkpoint is incomplete")
        out.update(load_file(str(folder / f), device=str(device)))
    return out


def load_pretrained(
    directory: str | os.PathLike, *, dtype: torch.dtype | None = None, device="cpu", verify: bool = True
) -> nn.Module:
    """Load a folder written by :func:`save_pretrained` (any layout), without random initialisation.

    The model is built from ``config.json`` on the meta device; every parameter and buffer is replaced by
    the saved tensor (tied parameters stay tied), and the integer attributes recorded at save time are
    restored. Folders without surgeon_fx metadata are loaded with stock ``from_pretrained``.

    Args:
        directory: the folder.
        dtype: cast floating weights to this dtype (default: as saved).
        device: where to put the model.
        verify: run one short forward pass and check the logits are finite.

    Returns:
        The model in eval mode, with ``surgeon_fx_plan`` when the folder has a plan.

    Raises:
        FileNotFoundError: the folder, its ``config.json`` or a weight file is missing.
        ValueError: the weights do not fit the model the config builds (missing or unknown tensors).
        ValueError: also for a folder written by an unknown (newer) checkpoint format.
        SurgeonError: the loaded model does not run or gives non-finite logits.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    folder = Path(directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass a folder written by surgeon_fx.save_pretrained")
    meta = read_metadata(folder)
    if meta is None:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device).eval()
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{folder} was written as {meta.get('format')!r}; this surgeon_fx reads {FORMAT!r} (upgrade it)"
        )
    cfg = AutoConfig.from_pretrained(str(folder))
    delattr(cfg, METADATA_KEY)  # a re-save writes fresh metadata
    model = _meta_model(cfg)
    tensors = _weights(folder, device)
    if meta.get("buffers_file"):
        tensors.update(load_file(str(folder / meta["buffers_file"]), device=str(device)))
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    used = set()
    for names in aliases.values():
        found = [n for n in names if n in tensors]
        if not found:
            raise ValueError(f"{folder} holds no tensor for parameter {names[0]}; the checkpoint is incomplete")
        t = tensors[found[0]]
        t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        param = nn.Parameter(t, requires_grad=t.is_floating_point())
        for n in names:
            owner, _, attr = n.rpartition(".")
            setattr(model.get_submodule(owner), attr, param)
        used.update(found)
    for name, b in list(model.named_buffers()):
        owner, _, attr = name.rpartition(".")
        if name in tensors:
            model.get_submodule(owner)._buffers[attr] = tensors[name]
            used.add(name)
        elif b is not None and b.is_meta:
            raise ValueError(f"{folder} holds no value for buffer {name}; re-save it with surgeon_fx.save_pretrained")
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise ValueError(f"{folder} holds tensors {cfg.architectures} has no place for: {unknown[:5]}")
    for path, attrs in meta.get("attributes", {}).items():
        mod = model.get_submodule(path)
        for k, v in attrs.items():
            setattr(mod, k, tuple(v) if isinstance(v, list) else v)
    model.eval()
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    if meta.get("plan_file") and (folder / meta["plan_file"]).is_file():
        model.surgeon_fx_plan = Plan.from_json((folder / meta["plan_file"]).read_text())
    if verify:
        _verify(model, folder, None)
    return model
