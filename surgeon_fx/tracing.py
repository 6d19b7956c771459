"""Trace a causal language model into an FX graph with ``torch.export``.

Reads: an ``nn.Module`` mapping token ids ``(batch, seq)`` to logits (a Hugging Face causal LM, or
any module returning a tensor or an object with ``.logits``). Writes: a ``GraphModule`` whose
parameters sit at ``"inner.<FQN in the user's model>"`` and whose ``gm.meta[SOURCE]`` says how it
was traced. Invariant: batch and sequence stay symbolic, so the graph runs at other sizes.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from .ir import TraceInfo
from .keys import SOURCE, UnsupportedGraphError

__all__ = ["trace", "LogitsWrapper", "PREFIX", "vocab_size_of", "is_hf_model"]

PREFIX = "inner."


class LogitsWrapper(nn.Module):
    """Calls the wrapped model as ``input_ids -> logits`` (no KV cache), the traced signature."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model
        self._hf = is_hf_model(model)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._hf:
            return self.inner(input_ids=input_ids, use_cache=False).logits
        out = self.inner(input_ids)
        return out if isinstance(out, torch.Tensor) else out.logits


def is_hf_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def vocab_size_of(model: nn.Module) -> int | None:
    """The number of token ids the model accepts: ``config.vocab_size`` or its first embedding."""
    cfg = getattr(model, "config", None)
    if cfg is not None:
        v = getattr(cfg, "vocab_size", None) or getattr(getattr(cfg, "text_config", None), "vocab_size", None)
        if v:
            return int(v)
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return int(m.num_embeddings)
    return None


def trace(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    *,
    batch: int = 2,
    seq: int = 16,
    dynamic: bool = True,
) -> fx.GraphModule:
    """Export ``model`` (token ids -> logits) to a runnable ``GraphModule``.

    The model is traced as it is (call ``.eval()`` first for inference graphs); it is not modified.

    Args:
        model: a Hugging Face causal LM or a module taking token ids.
        example_input: int64 token ids ``(batch, seq)``; random ids in the vocabulary by default.
        batch, seq: size of the default example input.
        dynamic: keep batch and sequence symbolic (default) or specialise to the example's sizes.

    Returns:
        A ``GraphModule`` holding the model's parameters at ``"inner.<FQN>"``, every node carrying
        ``meta['val']`` and ``meta['nn_module_stack']``; ``gm.meta[SOURCE]`` is a :class:`TraceInfo`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or the example input is not integer token ids.
        UnsupportedGraphError: ``torch.export`` cannot trace the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    vocab = vocab_size_of(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if example_input is None:
        g = torch.Generator().manual_seed(0)
        example_input = torch.randint(0, vocab or 2, (batch, seq), generator=g).to(device)
    if not isinstance(example_input, torch.Tensor) or example_input.dtype not in (torch.int64, torch.int32):
        raise TypeError("example_input must be an int64 tensor of token ids with shape (batch, seq)")
    if example_input.dim() != 2 or example_input.shape[1] < 2:
        raise ValueError(f"example_input must be (batch, seq) with seq >= 2, got {tuple(example_input.shape)}")
    wrapper = LogitsWrapper(model)
    dyn = None
    if dynamic:
        auto = torch.export.Dim.AUTO
        dyn = {"input_ids": {0: auto, 1: auto}}
    try:
        with torch.no_grad():
            ep = torch.export.export(wrapper, (example_input,), dynamic_shapes=dyn, strict=False)
    except Exception as e:  # torch.export raises many types; re-raise with what to do
        raise UnsupportedGraphError(
            f"torch.export could not trace {type(model).__name__} as input_ids -> logits: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. The model must be "
            "traceable by torch.export.export(strict=False) without data-dependent control flow."
        ) from e
    gm = ep.module()
    gm.meta[SOURCE] = TraceInfo(
        prefix=PREFIX,
        model_class=f"{type(model).__module__}.{type(model).__qualname__}",
        is_hf=wrapper._hf,
        example_shape=(int(example_input.shape[0]), int(example_input.shape[1])),
        vocab_size=vocab,
    )
    return gm
