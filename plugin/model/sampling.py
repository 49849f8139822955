"""Decoding strategies, kept apart from the layer loop: greedy, and temperature/top-p with a seed."""
from __future__ import annotations

from typing import Protocol

import torch


class Sampler(Protocol):
    def pick(self, logits: torch.Tensor) -> int:
        """Choose a token from full logits [V] (an edge exit)."""

    def pick_from(self, ids: list[int], logprobs: list[float]) -> int:
        """Choose among the cloud's top-k tokens, best first."""


class Greedy:
    def pick(self, logits: torch.Tensor) -> int:
        return int(logits.argmax())

    def pick_from(self, ids: list[int], logprobs: list[float]) -> int:
        return ids[0]


class TopP:
    """Nucleus sampling; the cloud's reply holds only its top-k, so cloud tokens sample from those."""

    def __init__(self, temperature: float = 1.0, top_p: float = 0.9, seed: int = 0):
        if temperature <= 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature > 0 and top_p in (0, 1], got {temperature}, {top_p}")
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator().manual_seed(seed)

    def pick(self, logits: torch.Tensor) -> int:
        return self._sample(torch.arange(logits.shape[-1]), logits.detach().float().cpu())

    def pick_from(self, ids: list[int], logprobs: list[float]) -> int:
        return self._sample(torch.tensor(ids), torch.tensor(logprobs))

    def _sample(self, ids: torch.Tensor, scores: torch.Tensor) -> int:
        probs = torch.softmax(scores / self.temperature, dim=-1)
        order = probs.argsort(descending=True)
        sorted_probs = probs[order]
        keep = sorted_probs.cumsum(0) - sorted_probs < self.top_p  # always keeps the best token
        kept = sorted_probs * keep
        choice = torch.multinomial(kept / kept.sum(), 1, generator=self.generator)
        return int(ids[order[choice]])
