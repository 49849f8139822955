"""Tiny random checkpoints the tests build and save themselves (never the trained demo model)."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 96
LAYERS = 6


def save_tiny(kind: str, path: Path, seed: int = 0, identity_from: int | None = None):
    """Save a tiny random `llama`, `qwen2` or `gpt2` checkpoint; a wider init gives peaked logits.

    identity_from (llama, qwen2): layers from this one on add nothing to the residual stream (their output
    projections are zero), so the full model's logits are those of the final norm and head on the hidden state
    entering that layer: an edge split there, with an exit at the split, guesses every token of the full model."""
    torch.manual_seed(seed)
    if kind in ("llama", "qwen2"):
        config, causal_lm = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
        cfg = config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256,
                     tie_word_embeddings=True, initializer_range=0.08, bos_token_id=None, eos_token_id=None)
        model = causal_lm(cfg)
        with torch.no_grad():
            for layer in model.model.layers[identity_from or LAYERS:]:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=LAYERS, n_head=4, n_positions=256,
                         initializer_range=0.08, bos_token_id=None, eos_token_id=None)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    return model.eval()
