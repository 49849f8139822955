"""Tiny random checkpoints the tests build and save themselves (never the trained demo model)."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
    MistralForCausalLM, Olmo2Config, Olmo2ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

VOCAB = 96
LAYERS = 6
WINDOW = 4  # sliding window of the gemma3, mistral and qwen3 kinds: the tests' prompts + tokens cross it many times
KINDS = ("llama", "gpt2", "gemma3", "llama3", "mistral", "qwen3", "olmo2")
RANDOM_NORMS = ("gemma3", "llama3", "mistral", "qwen3", "olmo2")
_LLAMA = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256,
              initializer_range=0.08, bos_token_id=None, eos_token_id=None)


def save_tiny(kind: str, path: Path, seed: int = 0, identity_from: int | None = None):
    """Save a tiny random checkpoint of one of KINDS or `qwen2`; a wider init gives peaked logits.

    gemma3: local layers (window WINDOW) and global ones (1 in 3), linear rope scaling on the global
    ones, query_pre_attn_scalar != head_dim. llama3: Llama 3.1 rope scaling with every frequency band
    in use. qwen3: head_dim != hidden / heads, local layers (window WINDOW) from layer 3 on. olmo2: an untied
    LM head. RANDOM_NORMS get random norm weights, so that a norm mapped to the wrong place shows.
    identity_from (llama, qwen2): layers from this one on add nothing to the residual stream (their output
    projections are zero), so the full model's logits are those of the final norm and head on the hidden
    state entering that layer: an edge split there, with an exit at the split, guesses every token of it.
    """
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_LLAMA, tie_word_embeddings=True))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_LLAMA, tie_word_embeddings=True))
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=LAYERS, n_head=4, n_positions=256,
                         initializer_range=0.08, bos_token_id=None, eos_token_id=None)
        model = GPT2LMHeadModel(cfg)
    elif kind == "gemma3":
        cfg = Gemma3TextConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=1,
            head_dim=16, intermediate_size=96, max_position_embeddings=256, initializer_range=0.08,
            query_pre_attn_scalar=24, sliding_window=WINDOW,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"] * (LAYERS // 3),
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                             "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}},
            bos_token_id=None, eos_token_id=None, pad_token_id=0)
        model = Gemma3ForCausalLM(cfg)
    elif kind == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        model = LlamaForCausalLM(LlamaConfig(**_LLAMA, tie_word_embeddings=True, rope_parameters=rope))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**_LLAMA, sliding_window=WINDOW, tie_word_embeddings=True))
    elif kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**_LLAMA, head_dim=32, use_sliding_window=True, sliding_window=WINDOW,
                                             max_window_layers=3, tie_word_embeddings=True))
    elif kind == "olmo2":
        model = Olmo2ForCausalLM(Olmo2Config(**_LLAMA, tie_word_embeddings=False))
    else:
        raise ValueError(kind)
    if kind in RANDOM_NORMS:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.add_(torch.randn_like(param) * 0.2)
    if identity_from is not None:
        if kind not in ("llama", "qwen2"):
            raise ValueError(f"identity_from is for llama and qwen2, not {kind}")
        with torch.no_grad():
            for layer in model.model.layers[identity_from:]:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    return model.eval()
