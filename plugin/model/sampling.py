"""Decoding strategies, kept apart from the layer loop: greedy, and temperature/top-p with a seed."""
from __future__ import annotations

from typing import Protocol

import torch


class Sampler(Protocol):
    def pick(self, logits: torch.Tensor) -> int:
        """Choose a token from full logits [V] (an edge exit)."""

    def pick_from(self, ids: list[int], logprobs: list[float]) -> int:
        """Choose among the cloud's top-k tokens, best first."""

    def verify(self, draft: int, ids: list[int], logprobs: list[float]) -> int:
        """The token to emit where the edge drafted `draft` and the cloud's top-k is (ids, logprobs): `draft`
        itself when kept, else a correction. Distributed exactly as pick_from(ids, logprobs)."""


class Greedy:
    def pick(self, logits: torch.Tensor) -> int:
        return int(logits.argmax())

    def pick_from(self, ids: list[int], logprobs: list[float]) -> int:
        return ids[0]

    def verify(self, draft: int, ids: list[int], logprobs: list[float]) -> int:
        return ids[0]  # the draft is kept exactly when it is the full model's greedy token


class TopP:
    """Nucleus sampling; the cloud's reply holds only its top-k, so cloud tokens sample from those."""

    def __init__(self, temperature: float = 1.0, top_p: float = 0.9, seed: int = 0):
        if temperature <= 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature > 0 and top_p in (0, 1], got {temperature}, {top_p}")
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator().manual_seed(seed)

    def pick(self, logits: torch.Tensor) -> int:
        return self._draw(*self._nucleus(torch.arange(logits.shape[-1]), logits.detach().float().cpu()))

    def pick_from(self, ids: list[int], logprobs: list[float]) -> int:
        return self._draw(*self._nucleus(torch.tensor(ids), torch.tensor(logprobs)))

    def verify(self, draft: int, ids: list[int], logprobs: list[float]) -> int:
        """Speculative sampling with a one-hot draft (the edge drafts its argmax): keep `draft` with probability
        p(draft) under the distribution pick_from samples, else draw from p with `draft` taken out. Then
        P(x) = [x = draft] p(draft) + (1 - p(draft)) p(x) / (1 - p(draft)) [x != draft] = p(x)."""
        kept_ids, probs = self._nucleus(torch.tensor(ids), torch.tensor(logprobs))
        is_draft = kept_ids == draft
        if torch.rand((), generator=self.generator) < probs[is_draft].sum():
            return draft
        return self._draw(kept_ids, probs.masked_fill(is_draft, 0.0))

    def _nucleus(self, ids: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ids, most likely first, and their probabilities after temperature and the nucleus cut (0 outside
        it; sum 1)."""
        probs = torch.softmax(scores / self.temperature, dim=-1)
        order = probs.argsort(descending=True)
        sorted_probs = probs[order]
        keep = sorted_probs.cumsum(0) - sorted_probs < self.top_p  # always keeps the best token
        kept = sorted_probs * keep
        return ids[order], kept / kept.sum()

    def _draw(self, ids: torch.Tensor, weights: torch.Tensor) -> int:
        return int(ids[torch.multinomial(weights, 1, generator=self.generator)])
