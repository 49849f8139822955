"""What the frozen backbone computes for exit-head training, computed once and kept on disk.

Training exit heads by self-distillation needs, per token, the hidden state at each exit and the
final layer's distribution. The backbone never changes, so one pass over the training sequences
stores, for every scored position (all but the bos row, whose residual stream is an outlier no exit
decides on):

    z.npy       [L, N, D] float16  hidden state after each cached layer, divided by its RMS
    final.npy   [N, D]    float32  the final norm's output (logits of any token = its LM-head row . final)
    lse.npy     [N]       float32  log-sum-exp of the final logits over the whole vocabulary
    top.npy     [N]       int32    the final layer's argmax (what the full model says)
    next.npy    [N]       int32    the actual next token, -1 at a sequence's last position
    meta.json                       layers, sizes, what the sequences were

The RMS division keeps values within +-sqrt(D) (Gemma's residual stream leaves fp16's range), and it
loses nothing an exit head needs: the heads normalise their input first (`ExitAdapter(normalize_input=True)`)
and the final norm is scale-invariant. Training then costs a matmul over the shortlist per step.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from plugin.model.decoder import DecoderModel, rms_normalize
from plugin.training.exit_heads import distill_losses, ExitHeads, ExitLosses, layer_states

FORMAT = "ce-collm exit cache v1"


@dataclass
class CachedBatch:
    hidden: dict[int, torch.Tensor]  # layer -> [N, D] float32, RMS-normalised
    final: torch.Tensor  # [N, D] float32, the final norm's output
    lse: torch.Tensor  # [N] float32
    top: torch.Tensor  # [N] int64
    next: torch.Tensor  # [N] int64, -1: no next token


def cache_key(model: DecoderModel, sequences: list[list[int]], layers: tuple[int, ...]) -> str:
    """What a cache was computed from: the sequences, the layers, and the model (config and a weight checksum)."""
    digest = hashlib.sha256(repr((model.cfg, tuple(layers))).encode())
    digest.update(repr(float(model.embed.weight[:64].double().sum()) + float(model.final_norm.weight.double().sum())
                       ).encode())
    for ids in sequences:
        digest.update(np.asarray(ids, np.int64).tobytes() + b"|")
    return digest.hexdigest()[:32]


def build_cache(model: DecoderModel, sequences: list[list[int]], layers: tuple[int, ...], out_dir: str | Path,
                key: str, progress: Callable[[int], None] | None = None) -> Path:
    """Run the frozen model over every sequence (one at a time) and write the cache into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = sum(len(s) - 1 for s in sequences)  # positions 1 .. T-1 of each
    D, L = model.cfg.hidden_size, len(layers)
    z = np.lib.format.open_memmap(out_dir / "z.npy", "w+", np.float16, (L, n, D))
    final = np.lib.format.open_memmap(out_dir / "final.npy", "w+", np.float32, (n, D))
    lse, top, nxt = (np.empty(n, np.float32), np.empty(n, np.int32), np.empty(n, np.int32))
    t0, at = time.time(), 0
    for ids in sequences:
        ids_t = torch.tensor(ids, dtype=torch.long)[None]  # [1, T]
        hidden, normed = _forward(model, ids_t, layers)
        k = len(ids) - 1
        for j, layer in enumerate(layers):
            z[j, at:at + k] = rms_normalize(hidden[layer][0, 1:].float()).numpy()
        final[at:at + k] = normed[0, 1:].numpy()
        logits = model.lm_head(normed[0, 1:].to(model.dtype)).float()  # [k, V]
        lse[at:at + k] = torch.logsumexp(logits, -1).numpy()
        top[at:at + k] = logits.argmax(-1).numpy()
        nxt[at:at + k] = ids[2:] + [-1]
        at += k
        if progress is not None:
            progress(k)
    for name, array in (("lse", lse), ("top", top), ("next", nxt)):
        np.save(out_dir / f"{name}.npy", array)
    z.flush()
    final.flush()
    info = {"format": FORMAT, "key": key, "layers": list(layers), "tokens": n, "hidden_size": D,
            "vocab_size": model.cfg.vocab_size, "sequences": len(sequences), "seconds": round(time.time() - t0, 1)}
    (out_dir / "meta.json").write_text(json.dumps(info, indent=2) + "\n")  # written last: the cache is complete
    return out_dir


@torch.no_grad()
def _forward(model: DecoderModel, ids: torch.Tensor, layers: tuple[int, ...]):
    """({layer: hidden [1, T, D]}, final norm output [1, T, D] float32) from one pass of the layer loop."""
    hidden = layer_states(model, ids, tuple(layers) + (model.cfg.num_layers,))
    last = hidden.pop(model.cfg.num_layers)
    return hidden, model.final_norm(last).float()


class ExitCache:
    """The cache on disk, memory-mapped; batches of random positions for training."""

    def __init__(self, cache_dir: str | Path, key: str | None = None):
        self.dir = Path(cache_dir)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: the cache in {self.dir} was never completed")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{self.dir}: cache format {self.meta.get('format')!r}, expected {FORMAT!r}")
        if key is not None and self.meta.get("key") != key:
            raise ValueError(f"{self.dir} was computed from other sequences, layers or weights")
        self.layers = tuple(self.meta["layers"])
        self.z = np.load(self.dir / "z.npy", mmap_mode="r")  # [L, N, D]
        self.final = np.load(self.dir / "final.npy", mmap_mode="r")  # [N, D]
        self.lse, self.top, self.next = (torch.from_numpy(np.load(self.dir / f"{n}.npy")).long() if n != "lse"
                                         else torch.from_numpy(np.load(self.dir / f"{n}.npy"))
                                         for n in ("lse", "top", "next"))
        self.tokens = int(self.meta["tokens"])

    def batch(self, positions: np.ndarray, layers: tuple[int, ...]) -> CachedBatch:
        """The cached values at `positions` (sorted for the memory map's sake) for the given layers."""
        missing = set(layers) - set(self.layers)
        if missing:
            raise ValueError(f"layers {sorted(missing)} are not in the cache (it holds {list(self.layers)})")
        pos = np.sort(positions)
        hidden = {e: torch.from_numpy(self.z[self.layers.index(e), pos].astype(np.float32)) for e in layers}
        idx = torch.from_numpy(pos)
        return CachedBatch(hidden, torch.from_numpy(np.ascontiguousarray(self.final[pos])), self.lse[idx],
                           self.top[idx], self.next[idx])

    def split_positions(self, held_back: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(validation, training) positions: `held_back` random positions are never trained on."""
        order = np.random.default_rng(seed).permutation(self.tokens)
        held_back = min(held_back, self.tokens // 4)
        return np.sort(order[:held_back]), np.sort(order[held_back:])

    def top_counts(self, positions: np.ndarray) -> torch.Tensor:
        """How often each token is the final layer's argmax at `positions`: [V] counts."""
        return torch.bincount(self.top[torch.from_numpy(positions)], minlength=int(self.meta["vocab_size"]))


def top_tokens(counts: torch.Tensor, size: int) -> torch.Tensor:
    """The `size` most frequent token ids (ties: the lower id first), most frequent first: [size] int64."""
    order = torch.argsort(-counts.double() + torch.arange(len(counts), dtype=torch.float64) / (2 * len(counts)))
    return order[:size].clone()


def shortlist_coverage(counts: torch.Tensor, tokens: torch.Tensor, size: int) -> float:
    """Share of `tokens` inside the shortlist of the `size` most frequent ids of `counts`."""
    inside = torch.zeros(len(counts), dtype=torch.bool)
    inside[top_tokens(counts, size)] = True
    return float(inside[tokens].float().mean()) if len(tokens) else 0.0


def _losses(heads: ExitHeads, batch: CachedBatch, kl_weight: float, ce_weight: float) -> ExitLosses:
    log_p = heads.target_from_final_norm(batch.final, batch.lse)  # [N, C], the frozen final layer
    return distill_losses(heads, batch.hidden, log_p, heads.classes(batch.next), heads.classes(batch.top),
                          kl_weight, ce_weight)


def cached_train_step(heads: ExitHeads, optimizer: torch.optim.Optimizer, batch: CachedBatch, kl_weight: float,
                      ce_weight: float, grad_clip: float = 1.0) -> ExitLosses:
    """One optimizer step on the heads from cached positions (the backbone does not run)."""
    losses = _losses(heads, batch, kl_weight, ce_weight)
    optimizer.zero_grad(set_to_none=True)
    losses.total.backward()
    torch.nn.utils.clip_grad_norm_(heads.trainable_parameters(), grad_clip)
    optimizer.step()
    return losses


@torch.no_grad()
def evaluate_cached(heads: ExitHeads, cache: ExitCache, positions: np.ndarray, kl_weight: float = 1.0,
                    ce_weight: float = 1.0, chunk: int = 1024) -> dict[int, dict[str, float]]:
    """Mean KL, CE (and perplexity over the head's classes) and agreement per exit at `positions`."""
    sums = {e: {"kl": 0.0, "ce": 0.0, "agreement": 0.0} for e in heads.exit_layers}
    for i in range(0, len(positions), chunk):
        part = positions[i:i + chunk]
        losses = _losses(heads, cache.batch(part, heads.exit_layers), kl_weight, ce_weight)
        for e in heads.exit_layers:
            for name in ("kl", "ce", "agreement"):
                sums[e][name] += getattr(losses, name)[e] * len(part)
    out = {}
    for e, s in sums.items():
        out[e] = {k: v / len(positions) for k, v in s.items()}
        out[e]["ppl"] = math.exp(out[e]["ce"])
    return out
