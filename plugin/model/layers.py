"""The transformer layer loop the project owns: one block, its parts chosen by the config's features.

Attention is split into `project` (q/k/v with rotary) and `attend` (over keys the caller
gathered), so the same weights serve the KV-store path here and the past/present-tensor path
of the ONNX export. The modules read only `ModelConfig`'s features (architectures.py says which
family sets which); the forward pass is one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from plugin.model.config import ModelConfig, Rope


class RMSNorm(nn.Module):
    """RMS normalisation, weighed where each family's transformers code weighs it, as it was trained."""

    def __init__(self, dim: int, eps: float, offset: float, weight_in_float: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset, self.weight_in_float = eps, offset, weight_in_float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in at least fp32: fp16 squares overflow.
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_in_float:  # Gemma (offset 1), OLMo 2: weighed in the normalisation's precision
            return (xf * (self.offset + self.weight.to(xf.dtype))).to(x.dtype)
        return self.weight * xf.to(x.dtype)  # Llama, Qwen: weighed after the cast back


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """A norm over `dim` features (default: the hidden size): block, q/k and final norms alike."""
    dim = dim or cfg.hidden_size
    if cfg.norm == "layer":
        return nn.LayerNorm(dim, eps=cfg.norm_eps)
    return RMSNorm(dim, cfg.norm_eps, cfg.norm_offset, cfg.norm_weight_in_float)


def rope_inv_freq(rope: Rope, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [Dh/2] in fp32, computed as transformers computes them (same operations, same order)."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
    if rope.scaling == "linear":
        return inv / rope.factor
    if rope.scaling == "llama3":
        low_wavelen = rope.original_max_positions / rope.low_freq_factor
        high_wavelen = rope.original_max_positions / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (rope.original_max_positions / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


class Rotary(nn.Module):
    """Rotary position embedding, half-rotation convention of Llama/Qwen2/Gemma checkpoints."""

    def __init__(self, head_dim: int, rope: Rope):
        super().__init__()
        self.head_dim, self.rope = head_dim, rope

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [B, H, T, Dh], positions: [B, T]; angles in fp32 as the checkpoints were trained
        inv_freq = rope_inv_freq(self.rope, self.head_dim).to(x.device)  # [Dh/2]
        freqs = positions.to(torch.float32)[..., None] * inv_freq  # [B, T, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, Dh]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.bias_qkv)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.bias_qkv)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.bias_qkv)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.bias_out)
        rope = cfg.attention[layer].rope
        self.rotary = Rotary(cfg.head_dim, rope) if rope is not None else None
        self.scale = cfg.attn_scale
        # q/k norms, before the rotation: over each head's Dh ("head") or over all heads at once ("width")
        self.qk_norm = cfg.qk_norm
        q_heads, k_heads = (1, 1) if cfg.qk_norm == "head" else (cfg.num_heads, cfg.num_kv_heads)  # one norm's span
        self.q_norm = make_norm(cfg, q_heads * cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, k_heads * cfg.head_dim) if cfg.qk_norm else None

    def project(self, x: torch.Tensor, positions: torch.Tensor):
        """Queries, keys and values of the new rows; keys already rotated."""
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, H * Dh], [B, T, Hkv * Dh] (2x)
        if self.qk_norm == "width":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, Dh]
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, Dh]
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        return q, k, v

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # q: [B, H, T, Dh]; keys/values: [B, Hkv, L, Dh]; mask: [B, 1, T, L], True (or 0.0) = may attend
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            keys = keys.repeat_interleave(groups, dim=1)
            values = values.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)  # [B, H, T, Dh]
        B, _, T, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATION_FUNCTIONS = {"silu": F.silu, "gelu_tanh": gelu_tanh}  # config.ACTIVATIONS


class MLP(nn.Module):
    """Gated: down(act(gate(x)) * up(x)) (SwiGLU in Llama, tanh-GELU in Gemma 3); plain: down(act(up(x))) (GPT-2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden, inner, bias = cfg.hidden_size, cfg.intermediate_size, cfg.bias_mlp
        self.gate_proj = nn.Linear(hidden, inner, bias=bias) if cfg.mlp_gated else None
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self.act = ACTIVATION_FUNCTIONS[cfg.mlp_activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            return self.down_proj(self.act(self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """x + post_attn_norm(attn(norm1(x))), then x + post_mlp_norm(mlp(norm2(x))).

    norm1 / norm2 exist with the pre_norms feature, post_attn_norm / post_mlp_norm with post_norms
    (Gemma 3 has both, OLMo 2 only the latter); an absent norm is the identity.
    """

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.norm1 = make_norm(cfg) if cfg.pre_norms else nn.Identity()
        self.attn = Attention(cfg, layer)
        self.post_attn_norm = make_norm(cfg) if cfg.post_norms else nn.Identity()
        self.norm2 = make_norm(cfg) if cfg.pre_norms else nn.Identity()
        self.mlp = MLP(cfg)
        self.post_mlp_norm = make_norm(cfg) if cfg.post_norms else nn.Identity()

    def forward(self, x: torch.Tensor, positions: torch.Tensor, gather_kv) -> torch.Tensor:
        """gather_kv(k_new, v_new) stores the new rows and returns (keys, values, mask) to attend."""
        q, k, v = self.attn.project(self.norm1(x), positions)
        keys, values, mask = gather_kv(k, v)
        x = x + self.post_attn_norm(self.attn.attend(q, keys, values, mask))
        return x + self.post_mlp_norm(self.mlp(self.norm2(x)))


def causal_mask(positions: torch.Tensor, key_positions: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """The key at position j is visible to a query at position p iff j <= p and, on a local layer, p - j < window."""
    # positions: [B, T]; key_positions: [B or 1, L] -> mask [B, 1, T, L]
    distance = positions[:, :, None] - key_positions[:, None, :]  # [B, T, L]
    visible = distance >= 0
    if window is not None:
        visible = visible & (distance < window)
    return visible[:, None]
