"""The model configuration the layer loop runs, read from a checkpoint's config.json (checkpoint.py)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" (also Qwen2/Mistral-style) or "gpt2"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    rope_theta: float | None  # None: learned absolute positions (GPT-2)
    max_positions: int
    eos_token_ids: tuple[int, ...] = ()
