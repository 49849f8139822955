"""Verified mode: the edge's exits draft, the full model checks the drafts in one request, and the output
is the full model's (speculative decoding across the network, with the edge's own layers as the draft).

Positions: the edge step whose input token sits at position q computes the layer-k row of q and
guesses the token of q + 1 (the first confident exit's argmax, else the last exit's). A request
carries the rows the cloud has not seen and the guesses of its last m + 1 rows: the m drafts d_1..d_m
after the last accepted token, and d_{m+1}, the guess of the token the cloud adds after them. One
round (`VerifiedSession._round`):

  1. while the request is out, the edge drafts ahead as if every guess were kept;
  2. `accept`: each guess while the full model keeps it, then its correction (greedy: its argmax;
     sampling: speculative sampling, `Sampler.verify`);
  3. all kept: the steps drafted ahead are the next request's. Else the edge cuts its caches back to
     the correction's position (`Drafter.cut`) and forgets the rows from there (`ContextSync.rewind`),
     so the next request rolls the cloud back (ROLLBACK_TO) in passing;
  4. the next request leaves at once, with gamma + 1 guesses (`DraftLength`: the gamma with the most tokens per
     second from the measured acceptance, link, edge step and cost of the cloud's pass, which each reply reports).

Rows of drafts that exited early wait at their exit; they are carried to the split before a request
leaves (`EdgePartition.carry_to_split`). In a mode that falls back (verified-latency-aware), drafts
become the output, marked unverified, while the cloud is unreachable or over the latency budget;
their rows reach the cloud with the next request.
"""
from __future__ import annotations

import time
from bisect import bisect_right
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import accumulate
from operator import mul
from typing import Callable, Sequence

from edge_runtime.generation import exit_name, SessionStats, TokenRecord
from edge_runtime.link import CloudLink, CloudUnreachable
from edge_runtime.parts import EdgeSession, SessionOptions
from edge_runtime.policy import ExitDecider, Mode, moving_average
from plugin.model.rows import PendingRows
from plugin.model.sampling import Greedy, Sampler
from plugin.protocol.messages import CloudReply, Drafts, LOOKUP_EXIT, RowVerdict
from plugin.split.edge import EdgePartition, ExitPolicy, SequenceState


Source = tuple[int, int]  # where a guess came from: its exit (LOOKUP_EXIT for a lookup) and its confidence's bin
CONFIDENCE_EDGES = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)  # the bins' edges


def accept(drafts: list[int], rows: list[RowVerdict], sampler: Sampler) -> list[int]:
    """The tokens one verification gives: each draft while the full model keeps it, then the full model's own
    token where it first does not. With every draft kept the tokens are the drafts."""
    tokens = []
    for draft, row in zip(drafts, rows, strict=True):
        tokens.append(sampler.verify(draft, row.ids, row.logprobs))
        if tokens[-1] != draft:
            break
    return tokens


def lookup(tokens: list[int], n: int = 2) -> int | None:
    """The token that followed the latest earlier occurrence of the last n tokens (prompt lookup), or None.

    Gemma 3 270M's exit after layer 17 agrees with the full model on 84.2% of 2,222 held-out greedy tokens
    (teacher-forced); taking this lookup instead wherever the exit's confidence is below 0.5 gives 89.6% (n = 1:
    86.6%, n = 3: 89.0%). Its misses are largely tokens outside its shortlist that the sequence already holds."""
    if len(tokens) <= n:
        return None
    tail = tokens[-n:]
    for i in range(len(tokens) - n - 1, -1, -1):
        if tokens[i:i + n] == tail:
            return tokens[i + n]
    return None


@dataclass
class PassCost:
    """What one cloud pass costs, in seconds, for the rows it computes: cost(rows) = c0 + c1 rows, least squares
    over the replies' (rows, pass time), each reply weighing `decay` times the next one (the server's load
    changes). A slope needs two row counts: with one seen the cost is flat (c1 = 0), and before any reply 0.
    Neither coefficient goes below 0."""

    decay: float = 0.9
    weight: float = 0.0  # decayed sums over the replies: of their weights,
    rows: float = 0.0  # ... rows,
    seconds: float = 0.0  # ... pass times,
    rows_squared: float = 0.0  # ... rows^2
    rows_seconds: float = 0.0  # ... and rows x pass time

    def observe(self, rows: int, seconds: float) -> None:
        d = self.decay
        self.weight, self.rows, self.seconds = d * self.weight + 1, d * self.rows + rows, d * self.seconds + seconds
        self.rows_squared = d * self.rows_squared + rows * rows
        self.rows_seconds = d * self.rows_seconds + rows * seconds

    @property
    def slope(self) -> float:
        """c1: seconds per row; 0 while the rows seen do not vary."""
        spread = self.weight * self.rows_squared - self.rows ** 2  # weight^2 x the variance of the rows seen
        if spread <= 1e-6 * self.weight ** 2:
            return 0.0
        return max(0.0, (self.weight * self.rows_seconds - self.rows * self.seconds) / spread)

    def __call__(self, rows: int) -> float:
        if not self.weight:
            return 0.0
        c1 = self.slope
        c0 = max(0.0, (self.seconds - c1 * self.rows) / self.weight)
        return c0 + c1 * rows


@dataclass
class DraftLength:
    """gamma: drafts per request, beyond the guess of the cloud's own token, chosen by time before each request.

    A request with g drafts makes the cloud compute g + 1 rows in one pass and yields E(g) = 1 + a + ... + a^g
    tokens, a = the chance that a draft is kept when the ones before it were (counts of kept and rejected drafts,
    decayed by `decay` per round, from a prior of `prior` over 2 drafts). It takes T(g) = link + cost(g + 1) +
    (1 - a^(g+1)) (g + 1) step_s: the round trip less the pass (moving average of each reply's), the pass
    (`PassCost`, fitted to the replies' PASS_MS and rows), and, when a guess fails, g + 1 edge steps before the
    next request can leave. Guesses already drafted count at their own chance instead of a (`chance`: the record of
    drafts from the same exit at about the same confidence), so a request grows past confident drafts and stops
    short after an unsure one. gamma = the g <= max_gamma (and < the tokens still wanted) with the most tokens per
    second, E(g) / T(g), among those whose cloud compute per token, cost(g + 1) / E(g), is at most cost(1): never
    more than checking one row per request costs, which is itself below cloud-only's compute per token (it runs
    every layer for each token, the edge's too). At least min_gamma (min_gamma = max_gamma fixes it).

    What bounds gamma is what a pass costs, not how many rows it has: a pass reads the weights of its layers and
    LM head once for all its rows, so a row costs far less than a pass (by how much, the fit says). Where rows
    cost in proportion (a compute-bound server), the budget holds gamma near 0.

    Before any reply nothing is known of the link or the pass: the first request carries the prompt's guess alone
    (gamma 0, or a fixed gamma), so the first token comes a round trip after the prompt, as cloud-only's does,
    and the edge drafts ahead meanwhile up to max_gamma + 1 steps. Drafting gamma + 1 steps first cost Gemma
    3 270M 595 ms to its first token against cloud-only's 155 (4 prompts, 20 ms RTT). Each reply's measures
    choose from there.
    """

    max_gamma: int = 8
    min_gamma: int = 0
    decay: float = 0.8
    prior: float = 0.8
    kept: float = 0.0
    rejected: float = 0.0
    link_s: float | None = None  # moving estimates, weight `alpha` on the newest
    step_s: float | None = None
    alpha: float = 0.3
    source_weight: float = 2.0  # drafts' worth of `acceptance` that a source's record starts from
    cost: PassCost = field(default_factory=PassCost, init=False)  # each session's own (not copied by `replace`)
    sources: dict[Source, list[float]] = field(default_factory=dict, init=False)  # [kept, checked] per source

    def __post_init__(self) -> None:
        if not 0 <= self.min_gamma <= self.max_gamma:
            raise ValueError(f"need 0 <= gamma <= max gamma, got {self.min_gamma} and {self.max_gamma}")

    @property
    def acceptance(self) -> float:
        return (self.kept + 2 * self.prior) / (self.kept + self.rejected + 2)

    def observe(self, checked: list[Source], rejected: bool) -> None:
        """One reply: the sources of the guesses it checked, in order, all kept but the last when `rejected`."""
        self.kept = self.decay * self.kept + len(checked) - rejected
        self.rejected = self.decay * self.rejected + rejected
        for i, source in enumerate(checked):
            record = self.sources.setdefault(source, [0.0, 0.0])
            record[0] += not (rejected and i == len(checked) - 1)
            record[1] += 1

    def chance(self, source: Source) -> float:
        """The chance that a guess from `source` is kept when the ones before it were: its source's record, starting
        from `source_weight` drafts at `acceptance`. Gemma 3 270M's exit after layer 17 keeps 40% of its guesses
        below 0.5 confidence and 99.7% above 0.9."""
        kept, checked = self.sources.get(source, (0.0, 0.0))
        return (kept + self.source_weight * self.acceptance) / (checked + self.source_weight)

    def time_reply(self, round_trip_s: float, rows: int, pass_s: float) -> None:
        """One reply: its round trip, the rows the cloud computed for it, and the time of the pass that computed
        them as the server said (at most the round trip; 0 or not a number: not said, the round trip is all link)."""
        pass_s = min(pass_s, round_trip_s) if pass_s > 0 else 0.0  # also false for NaN
        if pass_s:
            self.cost.observe(rows, pass_s)
        self.link_s = moving_average(self.link_s, round_trip_s - pass_s, self.alpha)

    def time_step(self, seconds: float) -> None:
        self.step_s = moving_average(self.step_s, seconds, self.alpha)

    def choose(self, tokens_left: int, drafted: Sequence[Source] = ()) -> int:
        """gamma for a request that may yield at most `tokens_left` tokens (>= 1), the sources of its guesses drafted
        so far given."""
        fixed = min(self.min_gamma, tokens_left - 1)
        if self.link_s is None:  # no reply yet
            return fixed
        link, known = self.link_s, [self.chance(source) for source in drafted]
        # all_kept[i]: the chance that guesses 1..i are all kept
        all_kept = list(accumulate(known + [self.acceptance] * (self.max_gamma + 1 - len(known)), mul, initial=1.0))

        def tokens(g: int) -> float:
            return sum(all_kept[:g + 1])

        def seconds(g: int) -> float:
            return link + self.cost(g + 1) + (1 - all_kept[g + 1]) * (g + 1) * (self.step_s or 0.0)

        within = [g for g in range(min(self.max_gamma, tokens_left - 1) + 1)
                  if self.cost(g + 1) / tokens(g) <= self.cost(1)]  # g = 0 always is
        best = min(within, key=lambda g: seconds(g) / tokens(g))  # the fewest seconds per token; ties: fewer drafts
        return max(best, fixed)

    def ahead(self, tokens_left: int) -> int:
        """Edge steps to draft ahead while a request is out, as if it kept every guess: the next request's, or
        before any reply, max_gamma + 1 (its reply ends the drafting in any case)."""
        return min(self.choose(tokens_left) if self.link_s is not None else self.max_gamma, tokens_left - 1) + 1

    @classmethod
    def fixed(cls, gamma: int) -> "DraftLength":
        return cls(max_gamma=gamma, min_gamma=gamma)


@dataclass
class Draft:
    """One edge step: the position of its input token (its row) and its guess of the next token."""

    position: int
    token: int
    exit_layer: int
    confidences: list[tuple[int, float]]
    rows_by_layer: dict[int, int]

    @property
    def source(self) -> Source:
        """Its exit, and the bin of the last exit's confidence (the exit that answered, or was passed over for a
        lookup)."""
        return self.exit_layer, bisect_right(CONFIDENCE_EDGES, self.confidences[-1][1])

    def record(self, token: int) -> TokenRecord:
        """The record of the token emitted after this step's row: this step's draft (named by its exit), or the
        cloud's correction."""
        source = exit_name(self.exit_layer) if token == self.token else "cloud"
        return TokenRecord(token, source, self.confidences, self.rows_by_layer)


class Drafter:
    """The edge's side of verified decoding: steps on its own guesses, the rows they bring to the split, and
    the cut back to a correction. All it sees of the session: the sequence, the exit threshold, the stats.

    A guess whose exit is less confident than `lookup_below` becomes the sequence's own continuation where it has
    one (`lookup`, exit LOOKUP_EXIT): the full model checks it as any draft, so the output is unchanged."""

    def __init__(self, edge: EdgePartition, seq: SequenceState, decider: ExitDecider, lengths: DraftLength,
                 stats: SessionStats, lookup_below: float):
        self.edge, self.seq, self.decider, self.lengths, self.stats = edge, seq, decider, lengths, stats
        self.lookup_below = lookup_below
        self.tokens: list[int] = []  # the sequence's tokens by position, up to the last step's input
        self.drafts: list[Draft] = []  # steps since the last request left (or since the cut), in order
        self.rows: list[PendingRows] = []  # rows they brought to the split, not yet in the sync's log
        self.next_input: tuple[list[int], int] | None = None  # (tokens, position) of the next edge step

    def draft_until(self, steps: Callable[[], int]) -> list[Draft]:
        """Draft until `steps()` steps are waiting to be checked (asked again after each step: the step time it
        depends on is measured as drafting goes); returns them."""
        while len(self.drafts) < steps():
            t0 = time.perf_counter()
            self.draft()
            self.stats.edge_s += time.perf_counter() - t0
        return list(self.drafts)

    def draft(self) -> Draft:
        """One edge step on the next input; the first confident exit answers, else the last one."""
        block, pos = self.next_input
        t0 = time.perf_counter()
        step = self.edge.step(self.seq, block, pos, ExitPolicy(self.decider.threshold, local_only=True), Greedy())
        if len(block) == 1:  # a prompt's step says nothing about a draft's
            self.lengths.time_step(time.perf_counter() - t0)
        if step.split_rows is not None:
            self.rows.append(step.split_rows)
        self.tokens[pos:] = block
        token, exit_layer = step.token_id, step.exit_layer
        if step.confidences[-1][1] < self.lookup_below and (found := lookup(self.tokens)) is not None:
            token, exit_layer = found, LOOKUP_EXIT
        draft = Draft(pos + len(block) - 1, token, exit_layer, step.confidences, step.rows_by_layer)
        self.drafts.append(draft)
        self.next_input = ([draft.token], draft.position + 1)
        return draft

    def hand_over(self) -> list[PendingRows]:
        """The rows of the drafts waiting, carried to the split, for the request that checks them."""
        t0 = time.perf_counter()
        carried = self.edge.carry_to_split(self.seq)
        self.stats.edge_s += time.perf_counter() - t0
        rows = self.rows + ([carried] if carried is not None else [])
        self.drafts, self.rows = [], []
        return rows

    def cut(self, position: int, token: int) -> None:
        """Drop every edge row from `position` on; the next step runs `token`, the full model's correction."""
        self.edge.rewind_to(self.seq, position)
        self.drafts, self.rows = [], []
        self.next_input = ([token], position)


@dataclass
class _Flight:
    """A verification request on the wire: the drafts it checks, the reply to come, how long it took."""

    drafts: list[Draft]
    ahead_limit: int  # edge steps to draft ahead meanwhile
    reply: Future | None = None
    round_trip_s: list[float] = field(default_factory=list)  # filled by the request thread


class VerifiedSession(EdgeSession):
    """Verified: rounds of drafts checked by the cloud; the output is the full model's tokens."""

    mode = Mode.COLLABORATIVE

    def __init__(self, edge: EdgePartition, link: CloudLink | None, options: SessionOptions):
        super().__init__(edge, link, options)
        self.lengths = replace(options.draft_length) if options.draft_length is not None else DraftLength()
        lookup_below = edge.plan.lookup_below if options.lookup_below is None else options.lookup_below
        self.drafter = Drafter(edge, self.seq, self.decider, self.lengths, self.stats, lookup_below)
        self.queue: deque[TokenRecord] = deque()  # tokens known, not yet handed out
        self.flight: _Flight | None = None
        self._requests = ThreadPoolExecutor(1, thread_name_prefix="ce-collm-verify")

    def step(self, block: list[int], pos: int) -> TokenRecord:
        """The record of the token after `block` (at positions [pos, pos + len(block))), as the token loop asks."""
        if self.drafter.next_input is None:
            self.drafter.next_input = (list(block), pos)  # the prompt
            self.seq.keep_rewindable(pos + len(block) - 1)
        if not self.queue:
            self.queue.extend(self._round())
        return self.queue.popleft()

    def _round(self) -> list[TokenRecord]:
        left = self.tokens_left or self.lengths.max_gamma + 1
        if self.flight is None:
            if self.decider.next_policy().local_only:  # verified-latency-aware: the cloud is down or too slow
                drafts = self.drafter.draft_until(lambda: self._steps(left))
                self.drafter.drafts = []  # emitted unchecked: their rows go with the next request
                return self._unverified(drafts)
            self._send(left)
        flight, self.flight = self.flight, None
        reply = self._await(flight)
        if reply is None:  # unreachable mid-request: its drafts become the output, the steps ahead go on
            return self._unverified(flight.drafts, fallback=True)
        guesses = [d.token for d in flight.drafts]
        tokens = accept(guesses, reply.rows, self.sampler)
        kept_all = tokens == guesses
        self._count(flight, tokens, kept_all)
        last = flight.drafts[0].position + len(tokens)  # the position of the last token accepted
        if not kept_all:  # the correction's: every row from there was computed on a rejected token
            self.drafter.cut(last, tokens[-1])
            self.sync.rewind(last)
        self.seq.keep_rewindable(last)  # no later rejection goes back before it
        records = [d.record(t) for d, t in zip(flight.drafts, tokens)]
        records[0].cloud_rows = reply.catchup_rows
        wanted = left > len(records) and not self.eos.intersection(tokens)
        if wanted and not self.decider.next_policy().local_only:
            self._send(left - len(records))  # the next request leaves before these tokens are handed out
        return records

    def _send(self, left: int) -> None:
        """Draft up to gamma + 1 steps (keeping those drafted ahead), carry waiting rows to the split, and send
        every row the cloud has not seen with the guesses of these steps."""
        drafts = self.drafter.draft_until(lambda: self._steps(left))
        for rows in self.drafter.hand_over():
            assert rows.start == self.sync.log.length, (rows.start, self.sync.log.length)  # contiguous
            self.sync.append(rows.hidden)
        after = left - len(drafts)  # tokens still wanted if every guess is kept
        flight = _Flight(drafts, ahead_limit=self.lengths.ahead(after) if after > 0 else 0)
        guesses = Drafts.of([(d.token, d.exit_layer) for d in drafts])
        flight.reply = self._requests.submit(self._timed_request, guesses, flight.round_trip_s)
        self.flight = flight

    def _steps(self, left: int) -> int:
        """Edge steps a request checks while `left` tokens are still wanted: gamma drafts and the guess of the
        cloud's own token (none when no token is), gamma chosen again as each step's guess is known."""
        return min(self.lengths.choose(max(1, left), [d.source for d in self.drafter.drafts]) + 1, left)

    def _timed_request(self, guesses: Drafts, took: list[float]) -> CloudReply:
        t0 = time.perf_counter()
        reply = self.sync.request_token(guesses)
        took.append(time.perf_counter() - t0)
        return reply

    def _await(self, flight: _Flight) -> CloudReply | None:
        """The reply, drafting ahead (up to flight.ahead_limit steps) until it arrives; None when the cloud is
        unreachable and the mode falls back (VerifiedLatencyAwareSession)."""
        t0 = time.perf_counter()
        ahead = 0
        while not flight.reply.done() and ahead < flight.ahead_limit:
            self.drafter.draft()
            ahead += 1
        drafting = time.perf_counter() - t0
        self.stats.speculated += ahead
        self.stats.speculation_s += drafting
        error = flight.reply.exception()  # waits
        self.stats.cloud_wait_s += time.perf_counter() - t0 - drafting
        if error is not None:
            raise error
        reply = flight.reply.result()
        self.lengths.time_reply(flight.round_trip_s[0], reply.catchup_rows, reply.pass_s)
        self.decider.round_trip(flight.round_trip_s[0])
        return reply

    def _count(self, flight: _Flight, tokens: list[int], kept_all: bool) -> None:
        kept = len(tokens) if kept_all else len(tokens) - 1
        self.stats.drafts_sent += len(flight.drafts)
        self.stats.drafts_accepted += kept
        self.stats.speculation_hits += len(self.drafter.drafts) if kept_all else 0
        self.lengths.observe([d.source for d in flight.drafts[:len(tokens)]], rejected=not kept_all)

    def _unverified(self, drafts: list[Draft], fallback: bool = False) -> list[TokenRecord]:
        """The drafts as the output, unchecked (their rows reach the cloud with the next request); fallback:
        the cloud was asked and did not answer."""
        self.stats.unverified += len(drafts)
        self.stats.fallbacks += len(drafts) if fallback else 0
        self.seq.keep_rewindable(drafts[-1].position + 1)
        records = [d.record(d.token) for d in drafts]
        for record in records:
            record.unverified, record.fallback = True, fallback
        return records

    def close(self, error: BaseException | None = None) -> None:
        """Wait for a request still out (the generation no longer needs its tokens; its failure changes nothing
        here: END follows and says whether the cloud is there), then END the cloud sequence."""
        if self.flight is not None:
            self.flight.reply.exception()
            self.flight = None
        self._requests.shutdown()
        super().close(error)


class VerifiedLatencyAwareSession(VerifiedSession):
    """Verified-latency-aware: verified, but while the cloud is unreachable or over the latency budget
    (ExitDecider) the drafts are the output, marked unverified; their rows reach the cloud with the next request."""

    mode = Mode.LATENCY_AWARE

    def _await(self, flight: _Flight) -> CloudReply | None:
        try:
            return super()._await(flight)
        except CloudUnreachable:
            self.decider.cloud_unreachable()
            return None
