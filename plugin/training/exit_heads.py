"""Exit adapters for any checkpoint: data, the frozen-backbone forward, the loss, save and load.

An exit adapter (`decoder.ExitAdapter`) is a small residual bottleneck applied to the hidden state
after `e` layers, before the model's own final norm and LM head. Training keeps the backbone frozen
and in eval mode: one no-grad forward through the project's layer loop gives each exit's hidden
state and the final layer's distribution, and only the adapters learn, with

    loss = sum over exits e of  kl_weight * KL(p_final || p_e) + ce_weight * CE(p_e, next token)

so an exit learns to say what the whole model would say (agreement, what early exit needs) and
what the text says. Adapters are saved as `exit.<layer>.down.weight` / `exit.<layer>.up.weight`
(the format `checkpoint._load_exit_adapters` reads).

On a large vocabulary an exit head scores a shortlist (`decoder.Shortlist`): the S tokens the model
itself writes most, plus one "other" logit per exit for every token outside. Its targets are the
final distribution folded onto those S + 1 classes (`folded_log_probs`), and training reads the
backbone's outputs from a cache on disk (`exit_cache.py`) instead of running the backbone per step.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from plugin.model.checkpoint import SHORTLIST_IDS
from plugin.model.decoder import DecoderModel, exit_head, ExitAdapter

# ----------------------------------------------------------------------------------------------
# text -> token windows (the checkpoint's own tokenizer.json)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextTokenizer:
    """The checkpoint's `tokenizers.Tokenizer` and the special ids windows are built with."""

    tokenizer: object  # tokenizers.Tokenizer
    bos_id: int | None  # prepended to every window when the model has one
    eos_id: int | None  # separates documents in the token stream

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path) -> "TextTokenizer":
        from tokenizers import Tokenizer

        checkpoint = Path(checkpoint)
        path = checkpoint / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: exit adapters are trained on text tokenized with the "
                                    "checkpoint's own tokenizer.json (Hugging Face `tokenizers` format)")
        tok = Tokenizer.from_file(str(path))
        config = _read_json(checkpoint / "config.json")
        tok_config = _read_json(checkpoint / "tokenizer_config.json")

        def special(name: str) -> int | None:
            value = config.get(f"{name}_token_id")
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int) and value < tok.get_vocab_size(with_added_tokens=True):
                return value
            token = tok_config.get(f"{name}_token")
            if isinstance(token, dict):
                token = token.get("content")
            return tok.token_to_id(token) if isinstance(token, str) else None

        return cls(tok, special("bos"), special("eos"))

    def encode_documents(self, texts: list[str]) -> torch.Tensor:
        """All documents as one stream of ids [N]: each document's tokens, then eos (if any)."""
        ids: list[int] = []
        for text in texts:
            ids.extend(self.tokenizer.encode(text, add_special_tokens=False).ids)
            if self.eos_id is not None:
                ids.append(self.eos_id)
        return torch.tensor(ids, dtype=torch.long)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def read_documents(paths: list[str | Path]) -> list[str]:
    """Each file is one document: UTF-8, line endings normalised, trailing blanks stripped."""
    docs = []
    for p in paths:
        raw = Path(p).read_text(encoding="utf-8").replace("\r\n", "\n")
        docs.append("\n".join(line.rstrip() for line in raw.split("\n")).strip() + "\n")
    return docs


def _with_bos(rows: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    # rows: [B, n] -> [B, n + 1] with bos in front, or unchanged when the model has no bos
    if bos_id is None:
        return rows
    return torch.cat([torch.full((rows.shape[0], 1), bos_id, dtype=rows.dtype), rows], dim=1)


def window_body(seq_len: int, bos_id: int | None) -> int:
    """Corpus tokens per window: a window is [bos] + body, seq_len tokens in all."""
    return seq_len - (1 if bos_id is not None else 0)


def random_windows(stream: torch.Tensor, batch_size: int, seq_len: int, bos_id: int | None,
                   seed: int, step: int) -> torch.Tensor:
    """Training batch [B, seq_len] as a pure function of (seed, step): windows at random offsets."""
    n = window_body(seq_len, bos_id)
    if len(stream) <= n:
        raise ValueError(f"the text has {len(stream)} tokens, fewer than one window of {seq_len}: "
                         "give more text or a smaller --seq-len")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - n, (batch_size,), generator=g)
    return _with_bos(torch.stack([stream[s: s + n] for s in starts.tolist()]), bos_id)


def spaced_windows(stream: torch.Tensor, budget_tokens: int, seq_len: int, bos_id: int | None) -> torch.Tensor:
    """Evaluation windows [W, seq_len]: evenly spaced, non-overlapping, about budget_tokens in all.

    The same windows as the demo model's held-out evaluation (build/train_demo_model.py).
    """
    n = window_body(seq_len, bos_id)
    total = len(stream) // n
    if total == 0:
        raise ValueError(f"the text has {len(stream)} tokens, fewer than one window of {seq_len}")
    k = max(1, min(total, budget_tokens // seq_len))
    idx = torch.linspace(0, total - 1, k).round().long().unique()
    return _with_bos(torch.stack([stream[i * n:(i + 1) * n] for i in idx.tolist()]), bos_id)


# ----------------------------------------------------------------------------------------------
# the frozen backbone: one forward, the hidden state at every exit and the final distribution
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def layer_states(model: DecoderModel, ids: torch.Tensor, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """Hidden states [B, T, D] after each of `layers` (in [1, N]) from one pass over full windows [B, T].

    Uses the project's own layer loop with a fresh SequenceKV per row, so what the heads see is
    exactly what the edge computes (the KV catch-up makes decode-time hidden states equal these).
    """
    n_layers = model.cfg.num_layers
    if model.layer_range != range(n_layers):
        raise ValueError(f"training needs every layer loaded, the model holds {model.layer_range}")
    if any(not 0 < e <= n_layers for e in layers) or list(layers) != sorted(set(layers)):
        raise ValueError(f"layers {list(layers)} must be increasing and lie in [1, {n_layers}]")
    ids = ids.to(model.device)
    B, T = ids.shape
    positions = torch.arange(T, device=model.device).expand(B, T)  # [B, T]
    sequences = [model.new_sequence(0, n_layers) for _ in range(B)]
    h = model.embed_tokens(ids, positions)  # [B, T, D]
    states, first = {}, 0
    for e in layers:
        h = model.run_layers(h, positions, first, e, sequences)
        states[e], first = h, e
    return states


@torch.no_grad()
def exit_forward(model: DecoderModel, ids: torch.Tensor, exit_layers: tuple[int, ...]):
    """Run the whole model over full windows; returns ({e: hidden [B, T, D]}, final logits [B, T, V] fp32)."""
    n_layers = model.cfg.num_layers
    if any(not 0 < e < n_layers for e in exit_layers):
        raise ValueError(f"exit layers {list(exit_layers)} must lie in [1, {n_layers - 1}]")
    hidden = layer_states(model, ids, tuple(exit_layers) + (n_layers,))
    return hidden, model.exit_logits(hidden.pop(n_layers), n_layers).float()


class ExitHeads(nn.Module):
    """The trainable part of the exit heads, plus float32 views of the frozen final norm and LM head.

    Per exit an adapter, and with a shortlist (token ids [S]) an "other" logit per exit: the head then
    scores the S shortlisted tokens and "any other token" (`decoder.exit_head`), and learns the
    final layer's distribution folded onto those S + 1 classes.
    """

    def __init__(self, model: DecoderModel, exit_layers: tuple[int, ...], rank: int,
                 shortlist: torch.Tensor | None = None, normalize_input: bool = False):
        super().__init__()
        hidden = model.cfg.hidden_size
        self.exit_layers = tuple(exit_layers)
        self.normalize_input = normalize_input
        self.adapters = nn.ModuleDict({str(e): ExitAdapter(hidden, rank, normalize_input) for e in exit_layers})
        # A float32 copy of the norm only when the backbone is not float32 (bf16/fp16 backbones).
        same = model.dtype == torch.float32
        self._norm = model.final_norm if same else copy.deepcopy(model.final_norm).float()
        self.other = nn.ModuleDict()
        if shortlist is None:
            self._head = model.lm_head if same else copy.deepcopy(model.lm_head).float()
            self.register_buffer("token_ids", None)
            self.register_buffer("_class_of", None)
        else:
            self._head = nn.Linear(hidden, len(shortlist), bias=False)
            self._head.weight = nn.Parameter(model.lm_head.weight.detach()[shortlist].float().clone())
            self.other = nn.ModuleDict({str(e): nn.Linear(hidden, 1) for e in exit_layers})
            for other in self.other.values():
                nn.init.zeros_(other.weight)
                nn.init.zeros_(other.bias)
            self.register_buffer("token_ids", shortlist.long().clone())
            class_of = torch.full((model.cfg.vocab_size,), len(shortlist), dtype=torch.long)  # outside: "other"
            class_of[shortlist] = torch.arange(len(shortlist))
            self.register_buffer("_class_of", class_of)
        for p in list(self._norm.parameters()) + list(self._head.parameters()):
            p.requires_grad_(False)
        self.to(model.device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.adapters.parameters()) + list(self.other.parameters())

    def logits(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        # h: [..., D] -> [..., V] or [..., S + 1] float32
        other = self.other[str(layer)] if self.token_ids is not None else None
        return exit_head(h.float(), self.adapters[str(layer)], self._norm, self._head, other)

    def classes(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The head's class of each token id: itself, or its shortlist index (S for "other"); -1 stays -1."""
        if self._class_of is None:
            return token_ids
        return torch.where(token_ids < 0, token_ids, self._class_of[token_ids.clamp(min=0)])

    def target_log_probs(self, final_logits: torch.Tensor) -> torch.Tensor:
        """The final layer's log-distribution over the head's classes: [N, V] -> [N, V] or [N, S + 1]."""
        if self.token_ids is None:
            return F.log_softmax(final_logits, dim=-1)
        return folded_log_probs(final_logits[:, self.token_ids], torch.logsumexp(final_logits, dim=-1))

    def target_from_final_norm(self, final_normed: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """target_log_probs from the final norm's output [N, D] and the full log-sum-exp [N] (the cache's)."""
        if self.token_ids is None:
            return self._head(final_normed) - lse[:, None]
        return folded_log_probs(self._head(final_normed), lse)

    def load_adapters(self, tensors: dict[str, torch.Tensor]) -> None:
        """Start from saved heads (same rank and shortlist); layers missing from the file start at identity."""
        for e in self.exit_layers:
            down, up = tensors.get(f"exit.{e}.down.weight"), tensors.get(f"exit.{e}.up.weight")
            if down is None or up is None:
                continue
            self.adapters[str(e)].load_state_dict({"down.weight": down, "up.weight": up})
            if str(e) in self.other and f"exit.{e}.other.weight" in tensors:
                self.other[str(e)].load_state_dict({"weight": tensors[f"exit.{e}.other.weight"],
                                                    "bias": tensors[f"exit.{e}.other.bias"]})

    def state_for_file(self) -> dict[str, torch.Tensor]:
        out = {f"exit.{e}.{part}.weight": getattr(self.adapters[str(e)], part).weight.detach().float().cpu()
               .contiguous() for e in self.exit_layers for part in ("down", "up")}
        for e, other in self.other.items():
            out[f"exit.{e}.other.weight"] = other.weight.detach().float().cpu().contiguous()
            out[f"exit.{e}.other.bias"] = other.bias.detach().float().cpu().contiguous()
        if self.token_ids is not None:
            out[SHORTLIST_IDS] = self.token_ids.cpu().contiguous()
        return out


def folded_log_probs(shortlist_logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """log p over S + 1 classes: the S shortlisted tokens and the mass of every other token.

    shortlist_logits: [N, S] final-layer logits of the shortlisted tokens; lse: [N] log-sum-exp over the
    whole vocabulary.
    """
    log_p = shortlist_logits - lse[:, None]  # [N, S]
    inside = torch.logsumexp(log_p, dim=-1).clamp(max=-1e-7)  # log of the shortlist's mass, < 0
    other = torch.log(-torch.expm1(inside))  # log(1 - mass)
    return torch.cat([log_p, other[:, None]], dim=-1)


@dataclass
class ExitLosses:
    total: torch.Tensor  # weighted sum over exits, the training objective
    kl: dict[int, float]  # KL(final || exit) per exit, nats/token
    ce: dict[int, float]  # cross-entropy to the next token per exit, nats/token
    agreement: dict[int, float]  # share of positions whose exit token equals the final argmax


def distill_losses(heads: ExitHeads, hidden: dict[int, torch.Tensor], log_p: torch.Tensor, targets: torch.Tensor,
                   final_classes: torch.Tensor, kl_weight: float = 1.0, ce_weight: float = 1.0) -> ExitLosses:
    """KL(final || exit) + CE at every exit over N positions, in the head's classes.

    hidden: {e: [N, D]}; log_p: [N, C] the final layer's log-distribution (no grad); targets: [N] class of
    the next token (-1: none, left out of CE); final_classes: [N] class of the final layer's argmax.
    """
    total = log_p.new_zeros(())
    kl, ce, agree = {}, {}, {}
    has_next = targets >= 0
    other = heads.token_ids is not None  # a shortlist head's last class is never emitted
    for e in heads.exit_layers:
        log_q = F.log_softmax(heads.logits(hidden[e], e), dim=-1)  # [N, C]
        kl_e = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
        ce_e = F.nll_loss(log_q[has_next], targets[has_next]) if has_next.any() else log_q.new_zeros(())
        total = total + kl_weight * kl_e + ce_weight * ce_e
        kl[e], ce[e] = kl_e.item(), ce_e.item()
        chosen = (log_q[:, :-1] if other else log_q).argmax(dim=-1)
        agree[e] = (chosen == final_classes).float().mean().item()
    return ExitLosses(total, kl, ce, agree)


def exit_losses(heads: ExitHeads, hidden: dict[int, torch.Tensor], final_logits: torch.Tensor,
                ids: torch.Tensor, kl_weight: float = 1.0, ce_weight: float = 1.0) -> ExitLosses:
    """KL(final || exit) + CE at every exit, over the positions that have a next token."""
    # final_logits: [B, T, V]; ids: [B, T]; predictions at positions [0, T-1) of tokens [1, T)
    V = final_logits.shape[-1]
    final = final_logits[:, :-1].reshape(-1, V)  # [N, V]
    log_p = heads.target_log_probs(final)  # [N, C], no grad
    targets = heads.classes(ids[:, 1:].reshape(-1).to(log_p.device))  # [N]
    flat = {e: hidden[e][:, :-1].reshape(-1, hidden[e].shape[-1]) for e in heads.exit_layers}  # [N, D]
    return distill_losses(heads, flat, log_p, targets, heads.classes(final.argmax(dim=-1)), kl_weight, ce_weight)


@torch.no_grad()
def evaluate_heads(model: DecoderModel, heads: ExitHeads, windows: torch.Tensor, batch_size: int,
                   kl_weight: float = 1.0, ce_weight: float = 1.0) -> dict[int, dict[str, float]]:
    """Mean KL, CE (and perplexity) and agreement per exit over fixed windows."""
    sums: dict[int, dict[str, float]] = {e: {"kl": 0.0, "ce": 0.0, "agreement": 0.0} for e in heads.exit_layers}
    count = 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i:i + batch_size]
        hidden, final = exit_forward(model, ids, heads.exit_layers)
        losses = exit_losses(heads, hidden, final, ids, kl_weight, ce_weight)
        n = ids[:, 1:].numel()
        for e in heads.exit_layers:
            sums[e]["kl"] += losses.kl[e] * n
            sums[e]["ce"] += losses.ce[e] * n
            sums[e]["agreement"] += losses.agreement[e] * n
        count += n
    out = {}
    for e, s in sums.items():
        out[e] = {k: v / count for k, v in s.items()}
        out[e]["ppl"] = math.exp(out[e]["ce"])
    return out


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_step(model: DecoderModel, heads: ExitHeads, optimizer: torch.optim.Optimizer, ids: torch.Tensor,
               kl_weight: float, ce_weight: float, grad_clip: float = 1.0) -> ExitLosses:
    """One optimizer step on the adapters; the backbone runs under no_grad."""
    hidden, final = exit_forward(model, ids, heads.exit_layers)
    losses = exit_losses(heads, hidden, final, ids, kl_weight, ce_weight)
    optimizer.zero_grad(set_to_none=True)
    losses.total.backward()
    torch.nn.utils.clip_grad_norm_(heads.trainable_parameters(), grad_clip)
    optimizer.step()
    return losses


def freeze(model: DecoderModel) -> DecoderModel:
    """Backbone frozen and in eval mode: no parameter of it asks for a gradient."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# files: the adapters beside the checkpoint, the plan that names them
# ----------------------------------------------------------------------------------------------


def save_adapters(heads: ExitHeads, path: str | Path, metadata: dict[str, object] | None = None) -> Path:
    """Write the heads (`exit.<layer>.down.weight` / `.up.weight`, float32; shortlist heads add
    `exit.<layer>.other.weight` / `.bias` and `shortlist.token_ids`) with string metadata, which says
    what the adapters read (`adapter_input`: "raw" or "rms")."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"adapter_input": "rms" if heads.normalize_input else "raw", **(metadata or {})}
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(heads.state_for_file(), str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)  # safetensors writes 0600; the adapters travel with a shared checkpoint
    os.replace(tmp, path)
    return path


def update_plan(plan_path: str | Path, adapters_path: str | Path) -> dict:
    """Set the plan file's `exit_adapters` key (path relative to the plan); keeps its other keys."""
    from plugin.split.plan import PartitionPlan

    plan_path = Path(plan_path)
    yaml_plan = plan_path.suffix in (".yaml", ".yml")
    if yaml_plan:
        import yaml

        raw = yaml.safe_load(plan_path.read_text())
    else:
        raw = json.loads(plan_path.read_text())
    raw["exit_adapters"] = os.path.relpath(Path(adapters_path).resolve(), plan_path.parent.resolve())
    PartitionPlan.from_dict(raw, base_dir=plan_path.parent)  # refuse to write a plan that would not load
    if yaml_plan:
        plan_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    else:
        plan_path.write_text(json.dumps(raw, indent=2) + "\n")
    return raw
