"""Tiny random models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import torch
import transformers as T

FAMILIES = ("opt", "llama", "gpt2", "qwen2", "mistral", "phi")
RMS_FAMILIES = ("llama", "qwen2", "mistral")
VOCAB = 128


def tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer, 64-wide model of ``family`` with 4 query heads (2 KV heads where it has GQA).

    ``overrides`` are extra config fields (e.g. ``rms_norm_eps``). Weights are perturbed after
    initialisation so that every structure carries signal.
    """
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
    )
    if family == "llama":
        m = T.LlamaForCausalLM(T.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True, **overrides))
    elif family == "mistral":
        m = T.MistralForCausalLM(T.MistralConfig(**common, num_key_value_heads=2, **overrides))
    elif family == "qwen2":
        m = T.Qwen2ForCausalLM(T.Qwen2Config(**common, num_key_value_heads=2, **overrides))
    elif family == "phi":
        m = T.PhiForCausalLM(T.PhiConfig(**common, num_key_value_heads=4, partial_rotary_factor=0.5, **overrides))
    elif family == "opt":
        cfg = T.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
            **overrides,
        )
        m = T.OPTForCausalLM(cfg)
    elif family == "gpt2":
        cfg = T.GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_inner=96,
            n_layer=2,
            n_head=4,
            n_positions=256,
            bos_token_id=0,
            eos_token_id=0,
            **overrides,
        )
        m = T.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.eval()


def ids(batch: int = 2, seq: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=x, use_cache=False) if hasattr(model, "config") else model(x)
    return out if isinstance(out, torch.Tensor) else out.logits
