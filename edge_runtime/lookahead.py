"""The edge step computed ahead while a token request is on the wire.

While the cloud computes a token, the edge computes the next position with its last exit's best
guess for that token (greedy decoding only). The step is kept only when the next step is exactly
what was guessed: the same position, the cloud's token equal to the guess, and the same ExitPolicy
(threshold and local-only) it was computed under. Otherwise the edge's caches are rewound to where
they stood before it, so the tokens never change.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from edge_runtime.generation import SessionStats
from plugin.model.rows import KVMark
from plugin.model.sampling import Sampler
from plugin.protocol.messages import CloudReply
from plugin.split.edge import EdgePartition, EdgeStep, ExitPolicy, SequenceState


@dataclass(frozen=True)
class _Guess:
    """An edge step computed for `token_id` at `pos` under `policy`; `mark` is where the edge stood before it."""

    pos: int
    token_id: int
    policy: ExitPolicy
    mark: KVMark
    step: EdgeStep


class Lookahead:
    """Computes one step ahead on a guess while a request runs on its own thread; keeps or rewinds it."""

    def __init__(self, edge: EdgePartition, seq: SequenceState, sampler: Sampler, stats: SessionStats):
        self.edge, self.seq, self.sampler, self.stats = edge, seq, sampler, stats
        self._guess: _Guess | None = None
        self._requests = ThreadPoolExecutor(1, thread_name_prefix="ce-collm-request")

    def while_waiting(self, send: Callable[[], CloudReply], step: EdgeStep, next_pos: int,
                      policy: ExitPolicy) -> CloudReply:
        """Run `send` on the request thread; meanwhile compute `next_pos` on the last exit's argmax of
        `step` under `policy`. Returns the reply; a failed request rewinds the guess and raises."""
        pending = self._requests.submit(send)
        try:
            self._compute(step.last_exit.token, next_pos, policy)
        finally:
            error = pending.exception()  # waits for the reply
        if error is not None:
            self.drop()
            raise error
        return pending.result()

    def _compute(self, token_id: int, pos: int, policy: ExitPolicy) -> None:
        t0, mark = time.perf_counter(), self.seq.mark()
        try:
            step = self.edge.step(self.seq, [token_id], pos, policy, self.sampler)
        except BaseException:
            self.seq.rewind(mark)
            raise
        self._guess = _Guess(pos, token_id, policy, mark, step)
        self.stats.speculated += 1
        self.stats.speculation_s += time.perf_counter() - t0

    def take(self, block: list[int], pos: int, policy: ExitPolicy) -> EdgeStep | None:
        """The step computed ahead if it is exactly this block at `pos` under `policy`, else None
        (and the edge rewound)."""
        guess = self._guess
        if guess is not None and guess.pos == pos and block == [guess.token_id] and guess.policy == policy:
            self._guess = None
            self.stats.speculation_hits += 1
            return guess.step
        self.drop()
        return None

    def drop(self) -> None:
        """Undo the step computed ahead, if any: the edge then holds exactly the positions decoded."""
        guess, self._guess = self._guess, None
        if guess is not None:
            self.seq.rewind(guess.mark)

    def close(self) -> None:
        """Wait for a request still out, then drop the step computed ahead."""
        self._requests.shutdown()
        self.drop()
