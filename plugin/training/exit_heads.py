"""Exit adapters for any checkpoint: data, the frozen-backbone forward, the loss, save and load.

An exit adapter (`decoder.ExitAdapter`) is a small residual bottleneck applied to the hidden state
after `e` layers, before the model's own final norm and LM head. Training keeps the backbone frozen
and in eval mode: one no-grad forward through the project's layer loop gives each exit's hidden
state and the final layer's distribution, and only the adapters learn, with

    loss = sum over exits e of  kl_weight * KL(p_final || p_e) + ce_weight * CE(p_e, next token)

so an exit learns to say what the whole model would say (agreement, what early exit needs) and
what the text says. Adapters are saved as `exit.<layer>.down.weight` / `exit.<layer>.up.weight`
(the format `checkpoint._load_exit_adapters` reads).
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

from plugin.model.decoder import DecoderModel, ExitAdapter

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
def exit_forward(model: DecoderModel, ids: torch.Tensor, exit_layers: tuple[int, ...]):
    """Run the whole model over full windows; returns ({e: hidden [B, T, D]}, final logits [B, T, V] fp32).

    Uses the project's own layer loop with a fresh SequenceKV per row, so what the adapters see is
    exactly what the edge computes (the KV catch-up makes decode-time hidden states equal these).
    """
    n_layers = model.cfg.num_layers
    if model.layer_range != range(n_layers):
        raise ValueError(f"exit_forward needs every layer loaded, the model holds {model.layer_range}")
    if any(not 0 < e < n_layers for e in exit_layers):
        raise ValueError(f"exit layers {list(exit_layers)} must lie in [1, {n_layers - 1}]")
    ids = ids.to(model.device)
    B, T = ids.shape
    positions = torch.arange(T, device=model.device).expand(B, T)  # [B, T]
    sequences = [model.new_sequence(0, n_layers) for _ in range(B)]
    h = model.embed_tokens(ids, positions)  # [B, T, D]
    hidden, first = {}, 0
    for e in exit_layers:
        h = model.run_layers(h, positions, first, e, sequences)
        hidden[e], first = h, e
    h = model.run_layers(h, positions, first, n_layers, sequences)
    return hidden, model.exit_logits(h, n_layers).float()


class ExitHeads(nn.Module):
    """The trainable adapters plus float32 views of the frozen final norm and LM head."""

    def __init__(self, model: DecoderModel, exit_layers: tuple[int, ...], rank: int):
        super().__init__()
        hidden = model.cfg.hidden_size
        self.exit_layers = tuple(exit_layers)
        self.adapters = nn.ModuleDict({str(e): ExitAdapter(hidden, rank) for e in exit_layers})
        # A float32 copy of the head only when the backbone is not float32 (bf16/fp16 backbones).
        same = model.dtype == torch.float32
        self._norm = model.final_norm if same else copy.deepcopy(model.final_norm).float()
        self._head = model.lm_head if same else copy.deepcopy(model.lm_head).float()
        for p in list(self._norm.parameters()) + list(self._head.parameters()):
            p.requires_grad_(False)
        self.to(model.device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.adapters.parameters())

    def logits(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        # h: [..., D] -> [..., V] float32; same computation as DecoderModel.exit_logits
        return self._head(self._norm(self.adapters[str(layer)](h.float())))

    def load_adapters(self, tensors: dict[str, torch.Tensor]) -> None:
        """Start from saved adapters (same rank); layers missing from the file start at identity."""
        for e in self.exit_layers:
            down, up = tensors.get(f"exit.{e}.down.weight"), tensors.get(f"exit.{e}.up.weight")
            if down is None or up is None:
                continue
            self.adapters[str(e)].load_state_dict({"down.weight": down, "up.weight": up})

    def state_for_file(self) -> dict[str, torch.Tensor]:
        return {f"exit.{e}.{part}.weight": getattr(self.adapters[str(e)], part).weight.detach().float().cpu()
                .contiguous() for e in self.exit_layers for part in ("down", "up")}


@dataclass
class ExitLosses:
    total: torch.Tensor  # weighted sum over exits, the training objective
    kl: dict[int, float]  # KL(final || exit) per exit, nats/token
    ce: dict[int, float]  # cross-entropy to the next token per exit, nats/token
    agreement: dict[int, float]  # share of positions whose exit argmax equals the final argmax


def exit_losses(heads: ExitHeads, hidden: dict[int, torch.Tensor], final_logits: torch.Tensor,
                ids: torch.Tensor, kl_weight: float = 1.0, ce_weight: float = 1.0) -> ExitLosses:
    """KL(final || exit) + CE at every exit, over the positions that have a next token."""
    # final_logits: [B, T, V]; ids: [B, T]; predictions at positions [0, T-1) of tokens [1, T)
    V = final_logits.shape[-1]
    log_p = F.log_softmax(final_logits[:, :-1].reshape(-1, V), dim=-1)  # [N, V] target, no grad
    final_top = log_p.argmax(dim=-1)
    targets = ids[:, 1:].reshape(-1).to(log_p.device)  # [N]
    total = final_logits.new_zeros(())
    kl, ce, agree = {}, {}, {}
    for e in heads.exit_layers:
        h = hidden[e][:, :-1].reshape(-1, hidden[e].shape[-1])  # [N, D]
        log_q = F.log_softmax(heads.logits(h, e), dim=-1)  # [N, V]
        kl_e = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
        ce_e = F.nll_loss(log_q, targets)
        total = total + kl_weight * kl_e + ce_weight * ce_e
        kl[e], ce[e] = kl_e.item(), ce_e.item()
        agree[e] = (log_q.argmax(dim=-1) == final_top).float().mean().item()
    return ExitLosses(total, kl, ce, agree)


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
    """Write `exit.<layer>.down.weight` / `exit.<layer>.up.weight` (float32) with string metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
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
