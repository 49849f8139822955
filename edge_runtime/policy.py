"""The exit policy with behaviour: which mode the session runs in, and per token whether the cloud
may be asked now (latency-aware: not while it is down or over the latency budget, probing now and
then). Pure logic with an injectable clock, so every decision is testable without a session."""
from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum
from typing import Callable

from plugin.split.edge import ExitPolicy


class Mode(Enum):
    """How a session treats the network (docs/design.md, "Decoding modes"), resolved once from their names; each
    session mode's loop (edge_runtime/session.py, LOOPS) runs under one of them."""

    COLLABORATIVE = "collaborative"  # exit when confident, else the cloud answers
    STANDALONE = "standalone"  # never waits on the network: the last edge exit answers
    LATENCY_AWARE = "latency-aware"  # collaborative, but the edge answers while the cloud is down or slow
    CLOUD_ONLY = "cloud-only"  # the baseline: token ids to the whole model

    @classmethod
    def parse(cls, name: "str | Mode") -> "Mode":
        if isinstance(name, Mode):
            return name
        try:
            return cls(name)
        except ValueError:
            raise ValueError(f"mode must be one of {MODES}, got {name!r}") from None

    @property
    def uses_edge(self) -> bool:
        return self is not Mode.CLOUD_ONLY

    @property
    def uses_cloud(self) -> bool:
        return self is not Mode.STANDALONE

    @property
    def splits(self) -> bool:
        """Edge and cloud share the model: tokens the edge is not sure of go to the cloud."""
        return self.uses_edge and self.uses_cloud

    @property
    def falls_back(self) -> bool:
        """An unreachable cloud is answered on the edge instead of ending the generation."""
        return self is Mode.LATENCY_AWARE


MODES = tuple(mode.value for mode in Mode)


def moving_average(estimate: float | None, sample: float, alpha: float) -> float:
    """A round trip's (or an edge step's) moving estimate: the newest sample weighs `alpha`, the first is taken
    as it is. One rule for the exit decider and the draft length, so both see the same link."""
    return sample if estimate is None else (1 - alpha) * estimate + alpha * sample


@dataclass
class LatencyPolicy:
    """When latency-aware mode stops asking the cloud."""

    budget_s: float = 0.25  # per-token budget for a cloud round trip
    retry_after_s: float = 2.0  # after an unreachable cloud, stay local this long
    probe_every: int = 16  # while over budget, still ask every N-th token to refresh the estimate
    alpha: float = 0.3  # weight of the newest round trip in the moving estimate


class ExitDecider:
    """Per token: the ExitPolicy to decode under. Holds the latency state latency-aware mode needs
    (moving round-trip estimate, down-until time, tokens asked); `threshold` may be changed between tokens."""

    def __init__(self, mode: Mode, threshold: float, latency: LatencyPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if mode is Mode.CLOUD_ONLY:
            raise ValueError("cloud-only mode runs no edge exits")
        self.mode, self.threshold = mode, threshold
        self.latency = latency or LatencyPolicy()
        self.clock = clock
        self.rtt: float | None = None  # moving estimate of a token request's round trip (s)
        self.down_until = 0.0  # clock time before which the cloud is not asked (it was unreachable)
        self._asked = 0

    def next_policy(self) -> ExitPolicy:
        """The policy for the next token (call once per token: probing counts the calls)."""
        return ExitPolicy(self.threshold, local_only=not self._cloud_wanted())

    def ahead_policy(self) -> ExitPolicy:
        """The policy a step computed ahead assumes: the cloud is wanted (it is kept only if that holds)."""
        return ExitPolicy(self.threshold)

    def _cloud_wanted(self) -> bool:
        if not self.mode.uses_cloud:
            return False
        if not self.mode.falls_back:
            return True
        if self.clock() < self.down_until:
            return False
        self._asked += 1
        over_budget = self.rtt is not None and self.rtt > self.latency.budget_s
        return not over_budget or self._asked % self.latency.probe_every == 0

    def round_trip(self, seconds: float) -> None:
        """A token request took `seconds`: update the moving estimate."""
        self.rtt = moving_average(self.rtt, seconds, self.latency.alpha)

    def cloud_unreachable(self) -> None:
        """The cloud did not answer: stay on the edge for retry_after_s."""
        self.down_until = self.clock() + self.latency.retry_after_s
