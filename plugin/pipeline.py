"""The decoding loop: edge partition + cloud link + exit policy + sampler, with per-token records.

`LocalCloud` runs the ensemble's two steps (context manager, then cloud partition) in-process:
the reference that the Triton path must match token for token.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from .cloud import CloudPartition
from .codec import encode
from .context import ContextManager, Limits, PendingBlock
from .decoder import DecoderModel
from .edge import EdgePartition, ExitPolicy
from .protocol import CloudReply, CloudRequest, SequenceNeedsStart
from .sampling import Greedy, Sampler

MODES = ("collaborative", "standalone", "cloud-only")


class CloudLink(Protocol):
    def send(self, req: CloudRequest) -> CloudReply:
        """Deliver one request through the ensemble; raises the cloud's error."""


class LocalCloud:
    """Context manager -> cloud partition, as the `ce_collm` ensemble chains them, in one process."""

    def __init__(self, model: DecoderModel, limits: Limits | None = None):
        self.context = ContextManager(model.cfg.hidden_size, model.cfg.num_layers, limits)
        self.partition = CloudPartition(model, limits)

    def send(self, req: CloudRequest) -> CloudReply:
        if req.token_ids is not None:
            block = token_block(req, self.partition.model.cfg.vocab_size)
        else:
            block = self.context.handle(req)
        reply = self.partition.step([block])[0]
        if isinstance(reply, Exception):
            raise reply
        return reply


def token_block(req: CloudRequest, vocab_size: int) -> PendingBlock:
    """A cloud-only request: token ids for the full model (split layer 0)."""
    from .protocol import ProtocolError

    ids = req.token_ids
    if ids is None or ids.ndim != 1 or ids.dtype != np.int64:
        raise ProtocolError("TOKEN_IDS must be int64 of shape [1, n]")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ProtocolError(f"token ids must lie in [0, {vocab_size})")
    return PendingBlock(req.sequence_id, 0, req.start_pos, torch.empty(0, 0), req.want_token, req.start, req.end,
                        token_ids=torch.from_numpy(ids.copy()))


@dataclass
class TokenRecord:
    token_id: int
    exit: str  # "edge:<layer>" or "cloud"
    confidences: list[tuple[int, float]]  # (exit layer, confidence) seen on the edge
    rows_by_layer: dict[int, int]  # edge rows computed per layer for this token
    cloud_rows: int = 0  # rows the cloud computed for this token (catch-up included)


@dataclass
class SessionStats:
    cloud_requests: int = 0
    uploads: int = 0
    resyncs: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    edge_s: float = 0.0
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


class Generator:
    """One generation session. Modes: collaborative, standalone, cloud-only (the baseline)."""

    def __init__(self, edge: EdgePartition | None, link: CloudLink | None, mode: str = "collaborative",
                 threshold: float | None = None, codec: str | None = None, sampler: Sampler | None = None,
                 eos_token_ids: tuple[int, ...] = (), sequence_id: int = 1):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "standalone" and link is None:
            raise ValueError(f"{mode} mode needs a cloud link")
        if mode != "cloud-only" and edge is None:
            raise ValueError(f"{mode} mode needs an edge partition")
        self.edge, self.link, self.mode = edge, link, mode
        plan = edge.plan if edge else None
        self.threshold = threshold if threshold is not None else (plan.threshold if plan else 1.0)
        self.codec = codec or (plan.codec if plan else "fp16")
        self.sampler = sampler or Greedy()
        self.eos = set(eos_token_ids)
        self.sequence_id = sequence_id
        self.seq = edge.new_sequence() if edge else None
        self.sent = 0  # positions the cloud has been sent
        self.started = False  # the cloud holds this sequence
        self.split_log: list[torch.Tensor] = []  # every row that reached the split, kept to re-sync the cloud
        self.stats = SessionStats()

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> Generation:
        out = Generation(list(prompt_ids), stats=self.stats)
        for record in self.stream(prompt_ids, max_new_tokens):
            out.token_ids.append(record.token_id)
            out.records.append(record)
        return out

    def stream(self, prompt_ids: list[int], max_new_tokens: int):
        """Yield one TokenRecord per generated token, as soon as it is known."""
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
                               start=not self.started)
            reply = self._send(req)
            return TokenRecord(self.sampler.pick_from(reply.topk_ids, reply.topk_logprobs), "cloud", [], {},
                               reply.catchup_rows)
        t0 = time.perf_counter()
        policy = ExitPolicy(self.threshold, local_only=self.mode == "standalone")
        step = self.edge.step(self.seq, block, pos, policy, self.sampler)
        self.stats.edge_s += time.perf_counter() - t0
        if step.split_rows is not None:
            self.split_log.append(step.split_rows.hidden)
        record = TokenRecord(-1, "", step.confidences, step.rows_by_layer)
        if step.token_id is not None:
            record.token_id, record.exit = step.token_id, f"edge:{step.exit_layer}"
            if step.split_rows is not None and self.mode == "collaborative":
                self._send(self._rows_request(want_token=False))
            return record
        reply = self._send(self._rows_request(want_token=True))
        record.token_id = self.sampler.pick_from(reply.topk_ids, reply.topk_logprobs)
        record.exit, record.cloud_rows = "cloud", reply.catchup_rows
        return record

    def _rows_request(self, want_token: bool, end: bool = False) -> CloudRequest:
        """Everything at the split that the cloud has not been sent yet."""
        rows = _rows_from(self.split_log, self.sent)
        return CloudRequest(self.sequence_id, self.sent, want_token, rows=encode(rows, self.codec),
                            split_layer=self.edge.plan.split_layer, start=not self.started, end=end)

    def _send(self, req: CloudRequest) -> CloudReply:
        t0 = time.perf_counter()
        try:
            reply = self.link.send(req)
        except SequenceNeedsStart:
            if self.edge is None:
                raise
            # The cloud lost this sequence (restart, TTL): re-send the whole context with START.
            self.stats.resyncs += 1
            req = CloudRequest(self.sequence_id, 0, req.want_token, rows=encode(_rows_from(self.split_log, 0), self.codec),
                               split_layer=self.edge.plan.split_layer, start=True, end=req.end)
            reply = self.link.send(req)
        self.stats.cloud_wait_s += time.perf_counter() - t0
        self.started = not req.end
        self.sent = req.start_pos + req.num_rows
        self.stats.bytes_up += req.nbytes
        self.stats.bytes_down += reply.nbytes
        self.stats.cloud_requests += int(req.want_token)
        self.stats.uploads += int(not req.want_token)
        return reply

    def close(self) -> None:
        """End the cloud sequence (sending any rows it has not seen) so it frees its state."""
        if self.started:
            if self.mode == "cloud-only":
                # cloud-only holds positions up to the last token it returned; END rides on an empty block
                req = CloudRequest(self.sequence_id, self.sent, False, token_ids=np.zeros(0, np.int64), end=True)
            else:
                req = self._rows_request(want_token=False, end=True)
            self._send(req)


def _rows_from(split_log: list[torch.Tensor], first: int) -> torch.Tensor:
    rows = torch.cat(split_log) if split_log else torch.empty(0)
    return rows[first:]
