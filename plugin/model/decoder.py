"""A decoder-only model as the project runs it: embeddings, a range of layers, and exit heads."""
from __future__ import annotations

import torch
from torch import nn

from plugin.model.config import ModelConfig
from plugin.model.kv import kv_gatherer, SequenceKV
from plugin.model.layers import DecoderLayer, make_norm


def rms_normalize(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """h / RMS(h) over the last dim, computed in at least fp32 (fp16 squares overflow)."""
    hf = h.to(torch.promote_types(h.dtype, torch.float32))
    return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


class ExitAdapter(nn.Module):
    """Small residual bottleneck before an exit's norm; zero-initialised `up` starts as identity.

    normalize_input: the bottleneck reads h / RMS(h) instead of h. The final norm after it is
    scale-invariant, so the identity start is kept, and the adapter sees the same scale at every
    position (Gemma's residual stream spans five orders of magnitude between positions).
    """

    def __init__(self, hidden: int, rank: int, normalize_input: bool = False):
        super().__init__()
        self.down = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(rank, hidden, bias=False)
        self.normalize_input = normalize_input
        nn.init.zeros_(self.up.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.normalize_input:
            h = rms_normalize(h)
        return h + self.up(nn.functional.silu(self.down(h)))


class Shortlist(nn.Module):
    """The S tokens a shortlist exit head scores: their ids and a copy of their LM-head rows.

    Scoring S of V rows is what makes an exit cheap on a large vocabulary (Gemma 3: 262,144 rows
    cost more than its 18 layers together). Each shortlist exit adds one "other" logit standing for
    every token outside the shortlist (`DecoderModel.exit_other`).
    """

    def __init__(self, token_ids: torch.Tensor, rows: torch.Tensor):
        super().__init__()
        # token_ids: [S] int64; rows: [S, D]
        self.register_buffer("token_ids", token_ids.long())
        self.weight = nn.Parameter(rows)

    def forward(self, normed: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(normed, self.weight)  # [..., S]


def exit_head(h: torch.Tensor, adapter: nn.Module | None, norm: nn.Module, head: nn.Module,
              other: nn.Module | None) -> torch.Tensor:
    """An exit's logits: [adapter ->] final norm -> head (the LM head or a shortlist's rows) [, other logit].

    The one definition `DecoderModel.exit_logits` serves and `training.exit_heads.ExitHeads` trains.
    """
    normed = norm(h if adapter is None else adapter(h))
    if other is None:
        return head(normed)
    return torch.cat([head(normed), other(normed)], dim=-1)


class VocabHead(nn.Linear):
    """The LM head. On a CPU, up to 8 rows go through `W @ x.T`, 1 and 3 rows padded to 2 and 4. Median ms of 9
    passes of Gemma 3's [262144, 640] fp32 head, torch 2.13, one thread of this machine's EPYC core:

        rows        1    2    3    4    5    6    8
        linear     58  132  197  113  122  124  124
        W @ x.T    35   34   54   55   61   75   91   (1 and 3 rows: padded)

    A verification pass heads every draft, and every cloud token heads one row: the head is most of both."""

    FEW_ROWS = 8
    PADDED = {1: 2, 3: 4}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        n = len(rows)
        if x.device.type != "cpu" or n > self.FEW_ROWS or torch.onnx.is_in_onnx_export():
            return super().forward(x)
        if n in self.PADDED:  # a contiguous copy: an expanded view takes another, far slower kernel
            rows = torch.cat([rows, rows[-1:].expand(self.PADDED[n] - n, -1)])
        return torch.mm(self.weight, rows.T)[:, :n].T.reshape(*x.shape[:-1], self.out_features)


class DecoderModel(nn.Module):
    """Holds only the layers one partition needs (`layer_range`); the others stay None."""

    def __init__(self, cfg: ModelConfig, layer_range: range):
        super().__init__()
        self.cfg = cfg
        self.layer_range = layer_range
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_embed = nn.Embedding(cfg.max_positions, cfg.hidden_size) if cfg.learned_positions else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i) for i in layer_range})
        self.final_norm = make_norm(cfg)
        self.lm_head = VocabHead(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.exit_adapters = nn.ModuleDict()
        self.shortlist: Shortlist | None = None  # set when the exit heads score a shortlist
        self.exit_other = nn.ModuleDict()  # exit layer -> Linear(D, 1): its "other" logit (shortlist heads)

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
            if positions.numel() and int(positions.max()) >= self.cfg.max_positions:
                raise ValueError(f"position {int(positions.max())} is past the model's {self.cfg.max_positions} learned "
                                 "positions (n_positions): shorten the prompt or the generation")
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
        """Logits of the exit after `layer` layers; the last layer is the model's own head.

        A full head gives [..., V]; a shortlist head [..., S + 1]: the shortlisted tokens
        (`exit_token_ids`), then the "other" logit.
        """
        adapter = self.exit_adapters[str(layer)] if str(layer) in self.exit_adapters else None
        other = self.exit_other[str(layer)] if str(layer) in self.exit_other else None
        return exit_head(h, adapter, self.final_norm, self.lm_head if other is None else self.shortlist, other)

    def exit_token_ids(self, layer: int) -> torch.Tensor | None:
        """The vocabulary ids [S] a shortlist exit scores, or None for a full head."""
        return self.shortlist.token_ids if str(layer) in self.exit_other else None


def confidence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max softmax probability and its token: the exit criterion of CE-CoLLM."""
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    conf, token = probs.max(dim=-1)
    return conf, token


def exit_decision(logits: torch.Tensor, token_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, token id) of an exit head's logits; `token_ids` None for a full head.

    A shortlist head's last logit stands for every token outside the shortlist: it takes part in
    the softmax, so the mass the head gives outside lowers each shortlisted token's probability,
    but it is never chosen. The confidence is the best shortlisted token's probability, so at a
    threshold >= 0.5 an exit still emits only a token more likely than all others together.
    """
    if token_ids is None:
        return confidence(logits)
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # [..., S + 1]
    conf, index = probs[..., :-1].max(dim=-1)
    return conf, token_ids[index]


def top_k_ids(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [H, k] of the k highest of each row of `scores` [H, V], best first; equal scores lowest index first,
    so column 0 is torch.argmax's choice. torch.topk orders equal scores as it likes (torch 2.13 on CPU: a row of
    96 zeros with 5.0 at 3 and 7 came back [7, 3, ...]); this ranks every index scoring at least the k-th."""
    kth = scores.topk(k, dim=-1).values[:, -1:]  # [H, 1]
    ranked = []
    for row, least in zip(scores, kth):
        candidates = (row >= least).nonzero()[:, 0]  # in index order
        if len(candidates) < k:  # NaN compares false: a row that holds one has no order (the cloud refuses it)
            ranked.append(row.topk(k).indices)
            continue
        best_first = row[candidates].sort(descending=True, stable=True).indices[:k]  # stable: ties keep index order
        ranked.append(candidates[best_first])
    return torch.stack(ranked)
