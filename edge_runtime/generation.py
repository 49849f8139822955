"""What a generation yields (one TokenRecord per token, SessionStats, the Generation), and the token
loop every session runs: one step per token, stop at EOS, END the cloud sequence at the end."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from plugin.protocol.messages import CloudReply, CloudRequest


@dataclass
class TokenRecord:
    token_id: int
    exit: str  # "edge:<layer>" or "cloud"
    confidences: list[tuple[int, float]]  # (exit layer, confidence) seen on the edge
    rows_by_layer: dict[int, int]  # edge rows computed per layer for this token
    cloud_rows: int = 0  # rows the cloud computed for this token (catch-up included)
    fallback: bool = False  # latency-aware: the cloud was wanted but the edge answered


@dataclass
class SessionStats:
    cloud_requests: int = 0
    uploads: int = 0
    resyncs: int = 0
    fallbacks: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    speculated: int = 0  # edge steps computed on a guessed token while a cloud request was out
    speculation_hits: int = 0  # ... whose guess was the cloud's token (the step was kept)
    edge_s: float = 0.0  # edge compute between tokens (speculative steps not included)
    speculation_s: float = 0.0  # edge compute overlapped with cloud requests
    cloud_wait_s: float = 0.0
    wall_s: float = 0.0

    def count(self, req: CloudRequest, reply: CloudReply) -> None:
        """One request the cloud answered: a token request, or an upload (END included)."""
        self.bytes_up += req.nbytes
        self.bytes_down += reply.nbytes
        self.cloud_requests += int(req.want_token)
        self.uploads += int(not req.want_token)


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    records: list[TokenRecord] = field(default_factory=list)
    stats: SessionStats = field(default_factory=SessionStats)

    def exits(self) -> list[str]:
        return [r.exit for r in self.records]


class TokenLoop:
    """The loop shared by the edge's decoding session and the cloud-only baseline.

    Subclasses give `step` (one token from the block at [pos, pos + len(block))) and `close`
    (END the cloud sequence; `error` is what ended the generation, or None).
    """

    stats: SessionStats
    eos: set[int]

    def step(self, block: list[int], pos: int) -> TokenRecord:
        raise NotImplementedError

    def close(self, error: BaseException | None = None) -> None:
        raise NotImplementedError

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> Generation:
        out = Generation(list(prompt_ids), stats=self.stats)
        for record in self.stream(prompt_ids, max_new_tokens):
            out.token_ids.append(record.token_id)
            out.records.append(record)
        return out

    def stream(self, prompt_ids: list[int], max_new_tokens: int) -> Iterator[TokenRecord]:
        """Yield one TokenRecord per token as soon as it is known; END the cloud sequence at the end,
        also when the generation fails (then END's own error never replaces the one that ended it)."""
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        t0 = time.perf_counter()
        block, pos, error = list(prompt_ids), 0, None
        try:
            for _ in range(max_new_tokens):
                record = self.step(block, pos)
                pos += len(block)
                block = [record.token_id]
                yield record
                if record.token_id in self.eos:
                    break
        except GeneratorExit:  # the caller stopped reading: a normal end
            raise
        except BaseException as e:
            error = e
            raise
        finally:
            try:
                self.close(error)
            finally:
                self.stats.wall_s = time.perf_counter() - t0


def end_sequence(send_end: Callable[[], None], error: BaseException | None) -> None:
    """Send END with `send_end`. When `error` already ended the generation, END is still attempted
    (it frees the cloud's context now rather than at its TTL), but END's own failure becomes a note
    on `error` instead of replacing it."""
    try:
        send_end()
    except Exception as end_error:
        if error is None:
            raise
        error.add_note(f"ending the cloud sequence failed too: {type(end_error).__name__}: {end_error}")
