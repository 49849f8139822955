"""What a generation yields (one TokenRecord per token, SessionStats, the Generation), and the token
loop every session runs: one step per token, stop at EOS, END the cloud sequence at the end."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable, Iterator

from plugin.protocol.messages import CloudReply, CloudRequest, LOOKUP_EXIT


def exit_name(layer: int) -> str:
    """A token's or draft's source: "edge:<layer>", or "edge:lookup" for a draft looked up in the sequence."""
    return "edge:lookup" if layer == LOOKUP_EXIT else f"edge:{layer}"


@dataclass
class TokenRecord:
    token_id: int
    exit: str  # exit_name(layer) or "cloud"
    confidences: list[tuple[int, float]]  # (exit layer, confidence) seen on the edge
    rows_by_layer: dict[int, int]  # edge rows computed per layer for this token
    cloud_rows: int = 0  # rows the cloud computed for this token (catch-up included)
    fallback: bool = False  # latency-aware: the cloud was wanted but the edge answered
    unverified: bool = False  # verified modes: an edge draft emitted without the full model's check


@dataclass
class SessionStats:
    cloud_requests: int = 0
    uploads: int = 0
    resyncs: int = 0
    resumes: int = 0  # requests sent again with START after Triton freed the idle sequence's slot (no re-sync)
    fallbacks: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    speculated: int = 0  # edge steps computed on a guessed token while a cloud request was out
    speculation_hits: int = 0  # ... whose guess was the cloud's token (the step was kept)
    edge_s: float = 0.0  # edge compute between tokens (speculative steps not included)
    speculation_s: float = 0.0  # edge compute overlapped with cloud requests
    cloud_wait_s: float = 0.0
    cloud_pass_s: float = 0.0  # the cloud's compute for this session: its passes' times as the replies said (PASS_MS)
    wall_s: float = 0.0
    drafts_sent: int = 0  # verified mode: the edge's guesses the cloud checked, one per row (catch-up excluded)
    drafts_accepted: int = 0  # ... kept: equal to the full model's choice, and every guess before it kept too
    unverified: int = 0  # verified modes: edge drafts emitted without the cloud (it was unreachable or slow)
    drafts_checked: dict[int, int] = field(default_factory=dict)  # edge exit layer -> guesses the full model checked
    drafts_agreed: dict[int, int] = field(default_factory=dict)  # ... that were its greedy token

    def count(self, req: CloudRequest, reply: CloudReply) -> None:
        """One request the cloud answered: a token request, or an upload (END included)."""
        self.bytes_up += req.nbytes
        self.bytes_down += reply.nbytes
        self.cloud_pass_s += reply.pass_s
        self.cloud_requests += int(req.want_token)
        self.uploads += int(not req.want_token)
        if req.drafts is not None:
            for token, exit_layer, verdict in zip(req.drafts.tokens.tolist(), req.drafts.exits.tolist(), reply.rows):
                self.drafts_checked[exit_layer] = self.drafts_checked.get(exit_layer, 0) + 1
                self.drafts_agreed[exit_layer] = self.drafts_agreed.get(exit_layer, 0) + int(token == verdict.token)

    def exit_agreement(self) -> dict[str, dict[str, float]]:
        """Per edge exit: guesses the full model checked, how many it agreed with, and the rate (live fidelity)."""
        return {exit_name(layer): {"checked": n, "agreed": self.drafts_agreed.get(layer, 0),
                                  "rate": self.drafts_agreed.get(layer, 0) / n}
                for layer, n in sorted(self.drafts_checked.items())}

    def verified_summary(self, tokens: int) -> dict[str, float]:
        """Verified mode: acceptance rate of drafts, tokens per verification round trip, mean drafts per request
        beyond the one guessing the cloud's own token (gamma)."""
        rounds = max(1, self.cloud_requests)
        return {"acceptance_rate": self.drafts_accepted / max(1, self.drafts_sent),
                "tokens_per_round_trip": (tokens - self.unverified) / rounds,
                "gamma": (self.drafts_sent - self.cloud_requests) / rounds}


def total_stats(runs: Iterable[SessionStats]) -> SessionStats:
    """The sum of several runs' statistics (per-exit counts added exit by exit)."""
    total = SessionStats()
    for stats in runs:
        for f in fields(stats):
            mine, theirs = getattr(total, f.name), getattr(stats, f.name)
            if isinstance(mine, dict):
                setattr(total, f.name, {k: mine.get(k, 0) + theirs.get(k, 0) for k in sorted({*mine, *theirs})})
            else:
                setattr(total, f.name, mine + theirs)
    return total


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
    tokens_left: int = 0  # while a generation runs: tokens it still wants, the one being decoded included

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
            for i in range(max_new_tokens):
                self.tokens_left = max_new_tokens - i
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
