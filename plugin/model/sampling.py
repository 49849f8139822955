"""Decoding strategies, kept apart from the layer loop: greedy, and temperature/top-p with a seed.

The edge's side of decoding, on numpy arrays (an edge without PyTorch runs it). A greedy choice breaks exact ties
as torch.argmax does, lowest index first, which is what Hugging Face's greedy decoding takes (an argmax over
float32 logits): the cloud ranks its top-k that way (`plugin.model.decoder.top_k_ids`), and an edge exit picks the
lowest vocabulary id among its equal maxima (`Greedy.pick`; a shortlist is not in id order). TopP keeps equal
probabilities in the order it is given them when it cuts the nucleus."""
from __future__ import annotations

from typing import Protocol

import numpy as np


class Sampler(Protocol):
    def pick(self, logits: np.ndarray, token_ids: np.ndarray | None = None) -> int:
        """Choose a token from an edge exit's logits [C]: over the vocabulary (token_ids None), or over the
        vocabulary ids token_ids [C] (a shortlist head's candidates, in no particular order)."""

    def pick_from(self, ids: list[int], logprobs: list[float]) -> int:
        """Choose among the cloud's top-k tokens, best first."""

    def verify(self, draft: int, ids: list[int], logprobs: list[float]) -> int:
        """The token to emit where the edge drafted `draft` and the cloud's top-k is (ids, logprobs): `draft`
        itself when kept, else a correction. Distributed exactly as pick_from(ids, logprobs)."""


class Greedy:
    def pick(self, logits: np.ndarray, token_ids: np.ndarray | None = None) -> int:
        best = int(logits.argmax())  # the lowest index among equal maxima
        if token_ids is None:
            return best
        tied = logits == logits[best]  # among equal maxima the lowest vocabulary id, as over the whole vocabulary
        tied[best] = True  # a NaN maximum equals nothing, itself included
        return int(token_ids[tied].min())

    def pick_from(self, ids: list[int], logprobs: list[float]) -> int:
        return ids[0]  # the cloud ranks equal logits lowest id first (top_k_ids): its argmax

    def verify(self, draft: int, ids: list[int], logprobs: list[float]) -> int:
        return ids[0]  # the draft is kept exactly when it is the full model's greedy token


class TopP:
    """Nucleus sampling; the cloud's reply holds only its top-k, so cloud tokens sample from those."""

    def __init__(self, temperature: float = 1.0, top_p: float = 0.9, seed: int = 0):
        if temperature <= 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature > 0 and top_p in (0, 1], got {temperature}, {top_p}")
        self.temperature, self.top_p = temperature, top_p
        self.rng = np.random.default_rng(seed)

    def pick(self, logits: np.ndarray, token_ids: np.ndarray | None = None) -> int:
        ids = np.arange(logits.shape[-1]) if token_ids is None else token_ids
        return self._draw(*self._nucleus(ids, logits))

    def pick_from(self, ids: list[int], logprobs: list[float]) -> int:
        return self._draw(*self._nucleus(np.array(ids, np.int64), np.array(logprobs, np.float32)))

    def verify(self, draft: int, ids: list[int], logprobs: list[float]) -> int:
        """Speculative sampling with a one-hot draft (the edge drafts its argmax): keep `draft` with probability
        p(draft) under the distribution pick_from samples, else draw from p with `draft` taken out. Then
        P(x) = [x = draft] p(draft) + (1 - p(draft)) p(x) / (1 - p(draft)) [x != draft] = p(x)."""
        kept_ids, probs = self._nucleus(np.array(ids, np.int64), np.array(logprobs, np.float32))
        is_draft = kept_ids == draft
        if self.rng.random() < probs[is_draft].sum():
            return draft
        return self._draw(kept_ids, np.where(is_draft, 0.0, probs))

    def _nucleus(self, ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ids, most likely first, and their probabilities (float64) after temperature and the nucleus cut
        (0 outside it; sum 1)."""
        z = scores.astype(np.float64) / self.temperature
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")  # equal probabilities in the order given
        sorted_probs = probs[order]
        keep = np.cumsum(sorted_probs) - sorted_probs < self.top_p  # always keeps the best token
        kept = sorted_probs * keep
        return ids[order], kept / kept.sum()

    def _draw(self, ids: np.ndarray, weights: np.ndarray) -> int:
        return int(ids[self.rng.choice(len(ids), p=weights / weights.sum())])
