"""Perplexity and size measurements of a (pruned or dense) causal language model.

Reads: a model mapping token ids ``(batch, seq)`` to logits (a Hugging Face causal LM, a traced
``GraphModule``, or any module returning a tensor or an object with ``.logits``) and int64 token windows.
Writes: nothing; the model's train/eval flags are restored module by module afterwards. Invariant:
perplexity follows the pruning papers' protocol (SparseGPT, Wanda, LLM Surgeon): each window predicts its
own tokens 1..L-1, the per-window mean cross-entropy is averaged over windows, PPL = exp(mean), computed in
float32 whatever the model's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .tracing import is_hf_model

__all__ = ["perplexity", "count_parameters", "state_dict_bytes"]


def _as_windows(windows) -> torch.Tensor:
    if isinstance(windows, Sequence) and not isinstance(windows, torch.Tensor):
        if len(windows) == 0:
            raise ValueError("windows is empty; pass an (n, seq_len) tensor of token ids, e.g. from eval_windows.")
        windows = torch.stack([torch.as_tensor(w) for w in windows])
    if not isinstance(windows, torch.Tensor) or windows.ndim != 2:
        raise ValueError(
            f"windows must be an (n, seq_len) tensor of token ids, got {type(windows).__name__} "
            f"{tuple(getattr(windows, 'shape', ()))}. Use eval_windows(...) to make one."
        )
    if windows.dtype.is_floating_point or windows.dtype.is_complex or windows.dtype == torch.bool:
        raise ValueError(f"windows must hold integer token ids, got dtype {windows.dtype}.")
    if windows.shape[0] == 0:
        raise ValueError("windows is empty (0 windows); pass at least one window of token ids.")
    if windows.shape[1] < 2:
        raise ValueError(f"Each window needs >= 2 tokens to predict a next token, got seq_len {windows.shape[1]}.")
    return windows.long()


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _logits(model: nn.Module, ids: torch.Tensor, hf: bool) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False) if hf else model(ids)
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3 or logits.shape[:2] != ids.shape:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"The model must map ids {tuple(ids.shape)} to logits (batch, seq, vocab) (a tensor or an object "
            f"with .logits); it returned {got}."
        )
    return logits


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> float:
    """Perplexity of ``model`` on token windows, by the pruning papers' protocol.

    For each window ``x`` of length ``L`` the loss is ``mean_{t=1..L-1} -log p(x_t | x_<t)``; the result is
    ``exp`` of the mean of those per-window losses. Runs under ``torch.no_grad`` in eval mode; each
    module's train/eval flag is restored afterwards. Logits are cast to float32 before the loss, so bf16
    models are scored in float32. Measured here: one 1x256 forward of SmolLM2-135M in fp32 takes ~0.6 s
    on 2 idle CPU cores once warm (0.9 s on one thread; 6-9 s with 2 threads while another process
    keeps a core busy).

    Args:
        model: Hugging Face causal LM (called as ``model(input_ids=..., use_cache=False).logits``) or any
            module mapping ids ``(B, L)`` to logits ``(B, L, V)`` or to an object with ``.logits``.
        windows: int tensor ``(n, seq_len)`` (e.g. from ``eval_windows``), or a sequence of 1-D windows of
            equal length.
        batch_size: windows per forward pass (the result does not depend on it).
        device: where to send the windows; ``None``: the device of the model's first parameter.
        progress: show a tqdm bar.

    Returns:
        The perplexity as a Python float.

    Raises:
        ValueError: empty or malformed windows, ``batch_size < 1``, or a model that does not return logits
            of shape ``(B, L, V)``.
    """
    ids = _as_windows(windows)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    dev = _model_device(model) if device is None else torch.device(device)
    hf = is_hf_model(model)
    modes = [(m, m.training) for m in model.modules()]
    for m, _ in modes:  # not model.eval(): torch.export's unlifted modules raise NotImplementedError on it
        m.training = False
    total = 0.0
    try:
        with torch.no_grad(), tqdm(total=ids.shape[0], desc="perplexity", unit="window", disable=not progress) as bar:
            for start in range(0, ids.shape[0], batch_size):
                batch = ids[start : start + batch_size].to(dev)  # (B, L)
                logits = _logits(model, batch, hf)[:, :-1].float()  # (B, L-1, V)
                targets = batch[:, 1:]  # (B, L-1)
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
                total += nll.view(targets.shape).mean(dim=1).double().sum().item()
                bar.update(batch.shape[0])
    finally:
        for m, training in modes:
            m.training = training
    return math.exp(total / ids.shape[0])


def _unique(tensors):
    """Tensors deduplicated by identity of their data (tied weights and aliases counted once)."""
    seen = set()
    for t in tensors:
        if t.device.type == "meta":
            key = ("meta", id(t))
        else:
            key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if key not in seen:
            seen.add(key)
            yield t


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements, each distinct tensor counted once (tied embeddings count once).

    Args:
        model: any module.

    Returns:
        Total ``numel`` of the distinct parameters (134,515,008 for SmolLM2-135M).
    """
    return sum(p.numel() for p in _unique(model.parameters()))


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the distinct tensors in ``model.state_dict()``: roughly the size of a safetensors file.

    Args:
        model: any module (non-persistent buffers are not in the state dict and are not counted).

    Returns:
        Sum of ``numel * element_size`` over distinct state-dict tensors (header bytes not included).
    """
    return sum(t.numel() * t.element_size() for t in _unique(model.state_dict().values()))
