"""Tiny random models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import torch
import transformers as T

FAMILIES = ("opt", "llama", "gpt2", "qwen2", "mistral", "phi")
VOCAB = 128


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A 2-layer model of ``family`` with 4 query heads (2 KV heads where the family has GQA)."""
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
        cfg = T.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True)
        m = T.LlamaForCausalLM(cfg)
    elif family == "mistral":
        m = T.MistralForCausalLM(T.MistralConfig(**common, num_key_value_heads=2))
    elif family == "qwen2":
        m = T.Qwen2ForCausalLM(T.Qwen2Config(**common, num_key_value_heads=2))
    elif family == "phi":
        m = T.PhiForCausalLM(T.PhiConfig(**common, num_key_value_heads=4, partial_rotary_factor=0.5))
    elif family == "opt":
        m = T.OPTForCausalLM(
            T.OPTConfig(
                vocab_size=VOCAB,
                hidden_size=64,
                ffn_dim=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=256,
                word_embed_proj_dim=64,
            )
        )
    elif family == "gpt2":
        m = T.GPT2LMHeadModel(
            T.GPT2Config(
                vocab_size=VOCAB,
                n_embd=64,
                n_inner=96,
                n_layer=2,
                n_head=4,
                n_positions=256,
                bos_token_id=0,
                eos_token_id=0,
            )
        )
    else:
        raise ValueError(family)
    # random configs initialise with tiny weights; spread them so every structure matters
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 1:
                p.add_(torch.randn_like(p) * 0.02)
    return m.eval()
