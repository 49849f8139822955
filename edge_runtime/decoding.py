"""The edge's decoding loop: edge runner + cloud link + exit policy + sampler, with per-token records.

Modes (DESIGN.md): collaborative (exit when confident, else ask the cloud), standalone (never
waits on the network), latency-aware (collaborative, but exits locally while the measured cloud
round trip breaks the per-token budget or the cloud is unreachable), cloud-only (the baseline).
Uploads of layer-k rows can run in a background thread; a token request sends whatever is still
unsent and waits only for itself.

While a token request is on the wire, collaborative and latency-aware modes compute the next position on the edge
with the last exit's best guess for the cloud's token (greedy decoding only). When the cloud agrees,
that step is already done: the next token exits or goes to the cloud at once. When it does not,
the edge's caches are rewound and the step is computed again, so the tokens never change.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from edge_runtime.link import CloudLink, CloudUnreachable
from plugin.model.kv import KVMark
from plugin.model.sampling import Greedy, Sampler
from plugin.protocol.codec import encode
from plugin.protocol.errors import SequenceNeedsStart
from plugin.protocol.messages import CloudReply, CloudRequest, new_session_key
from plugin.split.edge import EdgePartition, EdgeStep, ExitPolicy


MODES = ("collaborative", "standalone", "latency-aware", "cloud-only")


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


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    records: list[TokenRecord] = field(default_factory=list)
    stats: SessionStats = field(default_factory=SessionStats)

    def exits(self) -> list[str]:
        return [r.exit for r in self.records]


@dataclass
class LatencyPolicy:
    """When latency-aware mode stops asking the cloud."""

    budget_s: float = 0.25  # per-token budget for a cloud round trip
    retry_after_s: float = 2.0  # after an unreachable cloud, stay local this long
    probe_every: int = 16  # while over budget, still ask every N-th token to refresh the estimate
    alpha: float = 0.3  # weight of the newest round trip in the moving estimate


@dataclass
class _Speculation:
    """An edge step computed on a guessed token; `mark` is where the edge stood before it."""

    pos: int
    token_id: int
    mark: KVMark
    step: EdgeStep


class Generator:
    """One generation session against one cloud sequence id."""

    def __init__(self, edge: EdgePartition | None, link: CloudLink | None, mode: str = "collaborative",
                 threshold: float | None = None, codec: str | None = None, sampler: Sampler | None = None,
                 eos_token_ids: tuple[int, ...] = (), sequence_id: int = 1, async_uploads: bool = False,
                 latency: LatencyPolicy | None = None, max_block_rows: int = 1024, speculate: bool = True):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "standalone" and link is None:
            raise ValueError(f"{mode} mode needs a cloud link (--url)")
        if mode != "cloud-only" and edge is None:
            raise ValueError(f"{mode} mode needs an edge runner")
        self.edge, self.link, self.mode = edge, link, mode
        plan = edge.plan if edge else None
        self.threshold = threshold if threshold is not None else (plan.threshold if plan else 1.0)
        self.codec = codec or (plan.codec if plan else "fp16")
        self.sampler = sampler or Greedy()
        self.eos = set(eos_token_ids)
        self.sequence_id = sequence_id
        self.session_key = new_session_key()  # binds the cloud's session to this generator
        self.latency = latency or LatencyPolicy()
        self.max_block_rows = max_block_rows  # the cloud's rows-per-request limit (Limits.max_block_rows)
        self.seq = edge.new_sequence() if edge else None
        self.split_log = RowLog(edge.hidden_size if edge else 0)  # every row that reached the split: the context to re-sync
        self.stats = SessionStats()
        self._sent = 0  # positions the cloud has been sent
        self._started = False  # the cloud holds this sequence
        self._lock = threading.Lock()  # one request at a time per sequence, in position order
        self._rtt: float | None = None
        self._down_until = 0.0
        self._asked = 0
        self._uploader = _Uploader(self._upload_pending) if async_uploads and mode != "standalone" else None
        # guesses are checked against the cloud's token, so only greedy decoding can keep them
        self.speculate = speculate and mode in ("collaborative", "latency-aware") and isinstance(self.sampler, Greedy)
        self._spec: _Speculation | None = None
        self._requests = ThreadPoolExecutor(1, thread_name_prefix="ce-collm-request") if self.speculate else None

    # -- the loop ----------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> Generation:
        out = Generation(list(prompt_ids), stats=self.stats)
        for record in self.stream(prompt_ids, max_new_tokens):
            out.token_ids.append(record.token_id)
            out.records.append(record)
        return out

    def stream(self, prompt_ids: list[int], max_new_tokens: int) -> Iterator[TokenRecord]:
        """Yield one TokenRecord per token as soon as it is known; END the cloud sequence at the end."""
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        t0 = time.perf_counter()
        block, pos = list(prompt_ids), 0
        try:
            for _ in range(max_new_tokens):
                record = self.step(block, pos)
                pos += len(block)
                block = [record.token_id]
                yield record
                if record.token_id in self.eos:
                    break
        finally:
            self.close()
            self.stats.wall_s = time.perf_counter() - t0

    def step(self, block: list[int], pos: int) -> TokenRecord:
        """Decode one token: `block` holds the tokens at positions [pos, pos + len(block))."""
        if self.mode == "cloud-only":
            req = CloudRequest(self.sequence_id, pos, True, token_ids=np.asarray(block, dtype=np.int64),
                               start=not self._started, session_key=self.session_key)
            with self._lock:
                reply = self._send(req)
            return TokenRecord(self.sampler.pick_from(reply.topk_ids, reply.topk_logprobs), "cloud", [], {},
                               reply.catchup_rows)
        t0 = time.perf_counter()
        policy = ExitPolicy(self.threshold, local_only=not self._cloud_wanted())
        step = self._speculated_step(block, pos, policy)
        if step is None:
            step = self.edge.step(self.seq, block, pos, policy, self.sampler)
        self.stats.edge_s += time.perf_counter() - t0
        if step.split_rows is not None:
            self.split_log.append(step.split_rows.hidden)
        record = TokenRecord(-1, "", step.confidences, step.rows_by_layer)
        if step.token_id is not None:
            record.token_id, record.exit = step.token_id, f"edge:{step.exit_layer}"
            if step.split_rows is not None and self.mode != "standalone":
                self._upload_soon()
            return record
        try:
            reply = self._request_token(step, pos + len(block))
        except CloudUnreachable:
            if self.mode != "latency-aware":
                raise
            self._down_until = time.monotonic() + self.latency.retry_after_s
            record.token_id = self.sampler.pick(step.last_exit_logits)
            record.exit, record.fallback = f"edge:{self.edge.plan.exit_layers[-1]}", True
            self.stats.fallbacks += 1
            return record
        record.token_id = self.sampler.pick_from(reply.topk_ids, reply.topk_logprobs)
        record.exit, record.cloud_rows = "cloud", reply.catchup_rows
        return record

    def _cloud_wanted(self) -> bool:
        """Latency-aware: ask the cloud unless it is down or too slow (probing now and then)."""
        if self.mode == "standalone":
            return False
        if self.mode != "latency-aware":
            return True
        if time.monotonic() < self._down_until:
            return False
        self._asked += 1
        over_budget = self._rtt is not None and self._rtt > self.latency.budget_s
        return not over_budget or self._asked % self.latency.probe_every == 0

    # -- speculation -------------------------------------------------------------------------------
    def _speculate(self, token_id: int, pos: int) -> None:
        """Compute the edge step for `token_id` at `pos` now; `_speculated_step` keeps or undoes it."""
        t0, mark = time.perf_counter(), self.seq.mark()
        try:
            step = self.edge.step(self.seq, [token_id], pos, ExitPolicy(self.threshold), self.sampler)
        except BaseException:
            self.seq.rewind(mark)
            raise
        self._spec = _Speculation(pos, token_id, mark, step)
        self.stats.speculated += 1
        self.stats.speculation_s += time.perf_counter() - t0

    def _speculated_step(self, block: list[int], pos: int, policy: ExitPolicy) -> EdgeStep | None:
        """The speculative step if it guessed this block under this policy, else None (and the edge rewound)."""
        spec = self._spec
        if spec is not None and spec.pos == pos and block == [spec.token_id] and not policy.local_only:
            self._spec = None
            self.stats.speculation_hits += 1
            return spec.step
        self.drop_speculation()
        return None

    def drop_speculation(self) -> None:
        """Undo the step computed ahead, if any: the edge then holds exactly the positions decoded."""
        spec, self._spec = self._spec, None
        if spec is not None:
            self.seq.rewind(spec.mark)

    # -- requests ----------------------------------------------------------------------------------
    def _request_token(self, step: EdgeStep, next_pos: int) -> CloudReply:
        """Ask the cloud for the next token; meanwhile, speculate on the last exit's best guess."""
        t0 = time.perf_counter()
        if self._requests is None:
            reply = self._send_token_request()
        else:
            pending = self._requests.submit(self._send_token_request)
            try:
                self._speculate(int(step.last_exit_logits.argmax()), next_pos)
            finally:
                error = pending.exception()  # waits for the reply
            if error is not None:
                self.drop_speculation()
                raise error
            reply = pending.result()
        rtt = time.perf_counter() - t0
        self.stats.cloud_wait_s += rtt
        self._rtt = rtt if self._rtt is None else (1 - self.latency.alpha) * self._rtt + self.latency.alpha * rtt
        return reply

    def _send_token_request(self) -> CloudReply:
        with self._lock:
            return self._send_rows(want_token=True)

    def _upload_soon(self) -> None:
        if self._uploader is not None:
            self._uploader.kick()
        else:
            self._upload_pending()

    def _upload_pending(self) -> None:
        """Send every row at the split the cloud has not seen, as one upload-only request."""
        with self._lock:
            if self._sent == self.split_log.length:
                return
            try:
                self._send_rows(want_token=False)
            except CloudUnreachable:
                if self.mode != "latency-aware":
                    raise
                self._down_until = time.monotonic() + self.latency.retry_after_s  # the rows stay unsent

    def _send_rows(self, want_token: bool, end: bool = False, stop: int | None = None) -> CloudReply:
        """Send the rows at the split from the first the cloud has not seen up to `stop` (default: all),
        in chunks of at most max_block_rows: upload-only chunks first, then the last one with
        want_token / END. Caller holds the lock."""
        stop = self.split_log.length if stop is None else stop
        while stop - self._sent > self.max_block_rows:
            self._send(self._rows_request(False, self._sent, self._sent + self.max_block_rows))
        return self._send(self._rows_request(want_token, self._sent, stop, end))

    def _rows_request(self, want_token: bool, first: int, stop: int, end: bool = False) -> CloudRequest:
        return CloudRequest(self.sequence_id, first, want_token, rows=encode(self.split_log.rows(first, stop), self.codec),
                            split_layer=self.edge.plan.split_layer, start=first == 0 and not self._started, end=end,
                            session_key=self.session_key)

    def _send(self, req: CloudRequest) -> CloudReply:
        """Caller holds the lock. When the cloud lost the sequence (restart, TTL), re-send the whole
        context with START up to the end of this request, then finish it as it was meant."""
        try:
            reply = self.link.send(req)
        except SequenceNeedsStart:
            if self.edge is None or req.start:  # nothing to re-sync from, or the re-sync itself failed
                raise
            self.stats.resyncs += 1
            self._started, self._sent = False, 0
            return self._send_rows(req.want_token, req.end, stop=req.start_pos + req.num_rows)
        self._started = not req.end
        self._sent = req.start_pos + req.num_rows
        self.stats.bytes_up += req.nbytes
        self.stats.bytes_down += reply.nbytes
        self.stats.cloud_requests += int(req.want_token)
        self.stats.uploads += int(not req.want_token)
        return reply

    def close(self) -> None:
        """Stop the uploader and END the cloud sequence (with any rows it has not seen)."""
        if self._uploader is not None:
            self._uploader.close()
        if self._requests is not None:
            self._requests.shutdown()
        self.drop_speculation()
        with self._lock:
            if not self._started:
                return
            try:
                if self.mode == "cloud-only":  # END rides on an empty block of token ids
                    self._send(CloudRequest(self.sequence_id, self._sent, False, token_ids=np.zeros(0, np.int64), end=True,
                                            session_key=self.session_key))
                else:
                    self._send_rows(want_token=False, end=True)
            except CloudUnreachable:
                self._started = False  # the server's TTL reclaims the sequence


class RowLog:
    """Rows [0, length) in one growing buffer, so taking the unsent tail costs no concatenation."""

    def __init__(self, hidden_size: int = 0):
        self._rows = torch.empty(0, hidden_size)
        self.length = 0

    def append(self, rows: torch.Tensor) -> None:
        # rows: [n, D]
        end = self.length + rows.shape[0]
        if end > self._rows.shape[0] or self._rows.shape[1] != rows.shape[1]:
            grown = torch.empty(max(end, 2 * self._rows.shape[0], 64), rows.shape[1], dtype=rows.dtype)
            grown[: self.length] = self._rows[: self.length]
            self._rows = grown
        self._rows[self.length: end] = rows
        self.length = end

    def rows(self, first: int, stop: int) -> torch.Tensor:
        return self._rows[first:stop]


class _Uploader:
    """A background thread that runs `flush` whenever kicked; decoding never waits on it."""

    def __init__(self, flush):
        self._flush, self._kick, self._closed = flush, threading.Event(), False
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name="ce-collm-uploader", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        self._kick.set()

    def _run(self) -> None:
        while True:
            self._kick.wait()
            self._kick.clear()
            if self._closed:
                return
            try:
                self._flush()
            except Exception as e:  # surfaced by the next token request, which re-sends the rows
                self.error = e

    def close(self) -> None:
        self._closed = True
        self._kick.set()
        self._thread.join(timeout=30)
