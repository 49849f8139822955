"""The transformer layer loop the project owns: Llama/Qwen2-style and GPT-2-style blocks.

Attention is split into `project` (q/k/v with rotary) and `attend` (over keys the caller
gathered), so the same weights serve the KV-store path here and the past/present-tensor path
of the ONNX export.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plugin.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in at least fp32: fp16 squares overflow.
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Rotary(nn.Module):
    """Rotary position embedding, half-rotation convention of Llama/Qwen2 checkpoints."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [B, H, T, Dh], positions: [B, T]; angles in fp32 as the checkpoints were trained
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=x.device) / self.head_dim
        inv_freq = 1.0 / (self.theta ** exponents)
        freqs = positions.to(torch.float32)[..., None] * inv_freq  # [B, T, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, Dh]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, bias_qkv: bool, bias_out: bool):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=bias_qkv)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias_qkv)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias_qkv)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=bias_out)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta) if cfg.rope_theta is not None else None

    def project(self, x: torch.Tensor, positions: torch.Tensor):
        """Queries, keys and values of the new rows; keys already rotated."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, Dh]
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, Dh]
        if self.rotary is not None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        return q, k, v

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # q: [B, H, T, Dh]; keys/values: [B, Hkv, L, Dh]; mask: [B, 1, T, L], True = may attend
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            keys = keys.repeat_interleave(groups, dim=1)
            values = values.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [B, H, T, Dh]
        B, _, T, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inner: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.fc = nn.Linear(hidden, inner)
        self.proj = nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: ModelConfig, bias_qkv: bool = False, bias_out: bool = False, bias_mlp: bool = False):
        super().__init__()
        if cfg.arch == "gpt2":
            self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
            self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
            self.mlp: nn.Module = GeluMLP(cfg.hidden_size, cfg.intermediate_size)
        else:
            self.norm1 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
            self.norm2 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias_mlp)
        self.attn = Attention(cfg, bias_qkv, bias_out)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, gather_kv) -> torch.Tensor:
        """gather_kv(k_new, v_new) stores the new rows and returns (keys, values, mask) to attend."""
        q, k, v = self.attn.project(self.norm1(x), positions)
        keys, values, mask = gather_kv(k, v)
        x = x + self.attn.attend(q, keys, values, mask)
        return x + self.mlp(self.norm2(x))


def causal_mask(positions: torch.Tensor, key_length: int) -> torch.Tensor:
    """Key j is visible to a query at position p iff j <= p (cache index == position)."""
    # positions: [B, T] -> mask [B, 1, T, L]
    keys = torch.arange(key_length, device=positions.device)
    return (keys[None, None, :] <= positions[:, :, None])[:, None]
