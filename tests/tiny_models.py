"""Tiny random checkpoints the tests build and save themselves (never the trained demo model)."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 96
LAYERS = 6


def save_tiny(kind: str, path: Path, seed: int = 0):
    """Save a tiny random `llama` or `gpt2` checkpoint; a wider init gives peaked logits."""
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256,
                          tie_word_embeddings=True, initializer_range=0.08, bos_token_id=None, eos_token_id=None)
        model = LlamaForCausalLM(cfg)
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
