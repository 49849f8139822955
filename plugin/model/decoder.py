"""A decoder-only model as the project runs it: embeddings, a range of layers, and exit heads."""
from __future__ import annotations

import torch
from torch import nn

from plugin.model.config import ModelConfig
from plugin.model.kv import kv_gatherer, SequenceKV
from plugin.model.layers import DecoderLayer, make_norm


class ExitAdapter(nn.Module):
    """Small residual bottleneck before an exit's norm; zero-initialised `up` starts as identity."""

    def __init__(self, hidden: int, rank: int):
        super().__init__()
        self.down = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(rank, hidden, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(nn.functional.silu(self.down(h)))


class DecoderModel(nn.Module):
    """Holds only the layers one partition needs (`layer_range`); the others stay None."""

    def __init__(self, cfg: ModelConfig, layer_range: range):
        super().__init__()
        self.cfg = cfg
        self.layer_range = layer_range
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_embed = nn.Embedding(cfg.max_positions, cfg.hidden_size) if cfg.arch == "gpt2" else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i) for i in layer_range})
        self.final_norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.exit_adapters = nn.ModuleDict()

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def new_sequence(self, first_layer: int, last_layer: int) -> SequenceKV:
        cfg = self.cfg
        windows = {i: cfg.window(i) for i in range(first_layer, last_layer)}
        return SequenceKV(first_layer, last_layer, cfg.num_kv_heads, cfg.head_dim, self.dtype, self.device, windows)

    def embed_tokens(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # token_ids, positions: [B, T] -> [B, T, D]
        h = self.embed(token_ids)
        if self.cfg.embed_scale is not None:  # Gemma: the scale rounded to the weights' dtype, as trained
            h = h * torch.tensor(self.cfg.embed_scale, dtype=h.dtype)
        if self.pos_embed is not None:
            h = h + self.pos_embed(positions)
        return h

    def run_layers(self, h: torch.Tensor, positions: torch.Tensor, first: int, last: int,
                   sequences: list[SequenceKV], lengths: list[int] | None = None) -> torch.Tensor:
        """Run layers [first, last) over a padded batch; each sequence's K/V lands in its store."""
        # h: [B, T, D]; positions: [B, T]; lengths: valid rows per sequence (default all T)
        lengths = lengths or [h.shape[1]] * h.shape[0]
        for i in range(first, last):
            caches = [seq.layers[i] for seq in sequences]
            assert caches[0].window == self.cfg.window(i), f"layer {i}: cache window {caches[0].window}"
            h = self.layers[str(i)](h, positions, kv_gatherer(caches, positions, lengths))
        return h

    def exit_logits(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Logits of the exit after `layer` layers; the last layer is the model's own head."""
        adapter = self.exit_adapters[str(layer)] if str(layer) in self.exit_adapters else None
        if adapter is not None:
            h = adapter(h)
        return self.lm_head(self.final_norm(h))


def confidence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max softmax probability and its token: the exit criterion of CE-CoLLM."""
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    conf, token = probs.max(dim=-1)
    return conf, token
