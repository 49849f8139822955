"""The model configuration the layer loop runs, read from a checkpoint's config.json (architectures.py)."""
from __future__ import annotations

from dataclasses import dataclass

NORMS = ("rms", "layer")
QK_NORMS = (None, "head", "width")
ACTIVATIONS = ("silu", "gelu_tanh")


@dataclass(frozen=True)
class Rope:
    """Rotary position embedding: base theta and Hugging Face's frequency scaling (`rope_type`)."""

    theta: float
    scaling: str = "default"  # "default", "linear" or "llama3"
    factor: float = 1.0  # linear: every frequency / factor; llama3: the low ones
    low_freq_factor: float = 1.0  # llama3 only: the band between the two is interpolated
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192


@dataclass(frozen=True)
class LayerAttention:
    """What differs between the attention of two layers: positions and how far back a query sees."""

    rope: Rope | None  # None: learned absolute positions (GPT-2)
    window: int | None = None  # local layer: a query at p sees keys (p - window, p]; None: all keys <= p


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Sizes, per-layer attention and the block's features: everything the layer loop reads.

    Each family's reader (architectures.py) sets every feature; the loop and the loader read the
    features, never the family's name, so a family that combines known features adds only a reader
    and a weight map.
    """

    arch: str  # the family: its reader and weight map in architectures.py ("llama" also runs Qwen2 and Mistral)
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
    eos_token_ids: tuple[int, ...]
    tie_embeddings: bool  # the LM head is the embedding matrix
    # block features
    norm: str  # one of NORMS: RMSNorm, or LayerNorm with bias (GPT-2)
    norm_offset: float  # RMSNorm scales by (norm_offset + weight): 1.0 in Gemma, whose weights start at 0
    norm_weight_in_float: bool  # RMSNorm weighs before the cast back (Gemma, OLMo 2), not after (Llama, Qwen)
    pre_norms: bool  # norm1 before the attention, norm2 before the MLP (all but OLMo 2)
    post_norms: bool  # a norm on the attention's and the MLP's output, before the residual add (Gemma 3, OLMo 2)
    qk_norm: str | None  # one of QK_NORMS: each query and key head (Gemma 3, Qwen3), or all heads at once (OLMo 2)
    mlp_gated: bool  # down(act(gate(x)) * up(x)); False: down(act(up(x))) (GPT-2)
    mlp_activation: str  # one of ACTIVATIONS
    learned_positions: bool  # GPT-2: a learned position embedding, no rotary
    bias_qkv: bool
    bias_out: bool
    bias_mlp: bool
    attn_scale: float | None  # scores * attn_scale; None: 1/sqrt(head_dim)
    embed_scale: float | None  # Gemma: embeddings * sqrt(hidden), in the weights' dtype

    def __post_init__(self) -> None:
        assert len(self.attention) == self.num_layers, (len(self.attention), self.num_layers)
        features = (self.norm, self.qk_norm, self.mlp_activation)
        assert self.norm in NORMS and self.qk_norm in QK_NORMS and self.mlp_activation in ACTIVATIONS, features
        assert self.norm_offset == 0.0 or self.norm_weight_in_float, "RMSNorm's offset applies when weighing in float"
        assert all((a.rope is None) == self.learned_positions for a in self.attention), "rotary or learned positions"

    def window(self, layer: int) -> int | None:
        return self.attention[layer].window

    @property
    def position_limit(self) -> int | None:
        """The positions the model can compute at all: a learned position embedding ends at max_positions (GPT-2's
        n_positions); rotary positions do not end (past max_positions they are extrapolated, as in transformers)."""
        return self.max_positions if self.learned_positions else None
