"""The model configuration the layer loop runs, read from a checkpoint's config.json (architectures.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ARCHS = ("llama", "gemma3", "gpt2")  # block layouts of layers.py


@dataclass(frozen=True)
class Rope:
    """Rotary position embedding: base theta and Hugging Face's frequency scaling (`rope_type`)."""

    theta: float
    scaling: str = "default"  # "default", "linear" or "llama3"
    factor: float = 1.0  # linear: every frequency / factor; llama3: the low ones
    low_freq_factor: float = 1.0  # llama3 only: the band between the two is interpolated
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        """Inverse frequencies [Dh/2] in fp32, computed as transformers computes them (same operations, same order)."""
        inv = 1.0 / (self.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
        if self.scaling == "linear":
            return inv / self.factor
        if self.scaling == "llama3":
            low_wavelen = self.original_max_positions / self.low_freq_factor
            high_wavelen = self.original_max_positions / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (self.original_max_positions / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
            return torch.where(medium, smoothed, scaled)
        return inv


@dataclass(frozen=True)
class LayerAttention:
    """What differs between the attention of two layers: positions and how far back a query sees."""

    rope: Rope | None  # None: learned absolute positions (GPT-2)
    window: int | None = None  # local layer: a query at p sees keys (p - window, p]; None: all keys <= p


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # one of ARCHS: "llama" (also Qwen2, Mistral), "gemma3" or "gpt2"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    max_positions: int
    attention: tuple[LayerAttention, ...]  # one per layer
    eos_token_ids: tuple[int, ...] = ()
    tie_embeddings: bool = True  # the LM head is the embedding matrix
    bias_qkv: bool = False
    bias_out: bool = False
    bias_mlp: bool = False
    attn_scale: float | None = None  # scores * attn_scale; None: 1/sqrt(head_dim)
    embed_scale: float | None = None  # Gemma: embeddings * sqrt(hidden), in the weights' dtype

    def __post_init__(self) -> None:
        assert self.arch in ARCHS, self.arch
        assert len(self.attention) == self.num_layers, (len(self.attention), self.num_layers)

    def window(self, layer: int) -> int | None:
        return self.attention[layer].window
