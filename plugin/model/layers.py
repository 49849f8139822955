"""The transformer layer loop the project owns: Llama/Qwen2/Mistral-style, Gemma 3 and GPT-2-style blocks.

Attention is split into `project` (q/k/v with rotary) and `attend` (over keys the caller
gathered), so the same weights serve the KV-store path here and the past/present-tensor path
of the ONNX export. What differs between the architectures is chosen in `DecoderLayer.__init__`
from the config (architectures.py says which config fields set what); the forward pass is one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plugin.model.config import ModelConfig, Rope


class RMSNorm(nn.Module):
    """RMS normalisation; Gemma scales by (1 + weight), in the normalisation's precision, as it was trained."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.unit_offset = eps, unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in at least fp32: fp16 squares overflow.
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (xf * (1.0 + self.weight.to(xf.dtype))).to(x.dtype)
        return self.weight * xf.to(x.dtype)


class Rotary(nn.Module):
    """Rotary position embedding, half-rotation convention of Llama/Qwen2/Gemma checkpoints."""

    def __init__(self, head_dim: int, rope: Rope):
        super().__init__()
        self.head_dim, self.rope = head_dim, rope

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [B, H, T, Dh], positions: [B, T]; angles in fp32 as the checkpoints were trained
        inv_freq = self.rope.inv_freq(self.head_dim).to(x.device)  # [Dh/2]
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
        # Gemma 3 normalises each query and key head before the rotation
        gemma = cfg.arch == "gemma3"
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, unit_offset=True) if gemma else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, unit_offset=True) if gemma else nn.Identity()

    def project(self, x: torch.Tensor, positions: torch.Tensor):
        """Queries, keys and values of the new rows; keys already rotated."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, Dh]
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, Dh]
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


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SiLU (SwiGLU) for Llama/Qwen2/Mistral, tanh-GELU for Gemma 3."""

    def __init__(self, hidden: int, inner: int, bias: bool, gelu: bool):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self.gelu = gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(gate * self.up_proj(x))


class GeluMLP(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.fc = nn.Linear(hidden, inner)
        self.proj = nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The norm of every block, and the final one before the LM head and the exit heads."""
    if cfg.arch == "gpt2":
        return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
    return RMSNorm(cfg.hidden_size, cfg.norm_eps, unit_offset=cfg.arch == "gemma3")


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + post_attn_norm(attn(norm1(x))), then x + post_mlp_norm(mlp(norm2(x))).

    post_attn_norm / post_mlp_norm are Gemma 3's post-attention and post-feed-forward norms,
    identities elsewhere.
    """

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.norm1, self.norm2 = make_norm(cfg), make_norm(cfg)
        self.attn = Attention(cfg, layer)
        if cfg.arch == "gpt2":
            self.mlp: nn.Module = GeluMLP(cfg.hidden_size, cfg.intermediate_size)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.bias_mlp, gelu=cfg.arch == "gemma3")
        sandwich = cfg.arch == "gemma3"
        self.post_attn_norm = make_norm(cfg) if sandwich else nn.Identity()
        self.post_mlp_norm = make_norm(cfg) if sandwich else nn.Identity()

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
