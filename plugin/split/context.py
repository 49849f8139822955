"""The cloud context manager: per-session layer-k rows the edge uploaded, kept until a token needs them."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from plugin.protocol.codec import decode
from plugin.protocol.errors import ErrorCode, ProtocolError, SequenceNeedsStart
from plugin.protocol.messages import CloudRequest, PendingBlock
from plugin.split.limits import Admission, Limits, RateLimiter


@dataclass
class _Session:
    split_layer: int
    requests: RateLimiter  # this session's request rate; kept across a re-START
    next_position: int = 0  # the position the next uploaded row must have
    first_pending: int = 0
    pending: list[torch.Tensor] = field(default_factory=list)  # [n_i, D] blocks, contiguous
    last_seen: float = 0.0

    @property
    def pending_rows(self) -> int:
        return self.next_position - self.first_pending


class ContextManager:
    """Validates every upload before it touches stored state, so a bad request loses nothing."""

    def __init__(self, hidden_size: int, num_layers: int, limits: Limits | None = None,
                 clock: Callable[[], float] = time.monotonic, min_split_layer: int = 1):
        """min_split_layer: the first layer the cloud partition behind this manager holds."""
        if min_split_layer < 1:  # the rows are layer-k hidden states; split 0 (token ids) is cloud_only's
            raise ValueError(f"the context manager keeps hidden rows: min_split_layer must be >= 1, "
                             f"got {min_split_layer}")
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.limits = limits or Limits()
        self.admission = Admission(self.limits, num_layers, min_split_layer)
        self.clock = clock
        self.sessions: dict[int, _Session] = {}
        self.rows_uploaded = 0

    def handle(self, req: CloudRequest) -> PendingBlock:
        now = self.clock()
        self.expire(now)
        session = self._session_for(req, now)
        if not session.requests.allow(now):  # every request counts, the ones refused below too
            raise ProtocolError(ErrorCode.RATE_LIMITED,
                                f"rate limit: {self.limits.max_requests_per_s:g} requests/s per session "
                                f"(sequence {req.sequence_id}); slow down and retry")
        if req.rows is None:
            raise ProtocolError(ErrorCode.MALFORMED,
                                "request carries no hidden rows (HIDDEN_FP32, HIDDEN_FP16 or HIDDEN_INT8)")
        if req.nbytes > self.limits.max_request_bytes:
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"request payload of {req.nbytes} bytes exceeds the limit "
                                                          f"of {self.limits.max_request_bytes} bytes per request")
        n = req.rows.data.shape[0] if req.rows.data.ndim == 2 else -1
        if n > self.limits.max_block_rows:
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED,
                                f"block of {n} rows exceeds the limit of {self.limits.max_block_rows} rows per request")
        rows = decode(req.rows, self.hidden_size, torch.float32, "cpu")  # [n, D]; CodecError is MALFORMED
        if req.start_pos != session.next_position:
            gap = req.start_pos > session.next_position
            raise ProtocolError(
                ErrorCode.POSITION_GAP if gap else ErrorCode.POSITION_OVERLAP,
                f"position {'gap' if gap else 'overlap'}: sequence {req.sequence_id} expects its next row at position "
                f"{session.next_position}, the request starts at {req.start_pos}"
            )
        if session.next_position + n > self.limits.max_context:
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"context of {session.next_position + n} positions exceeds "
                                                          f"the limit of {self.limits.max_context}")
        if req.want_token and session.pending_rows + n == 0:
            raise ProtocolError(ErrorCode.MALFORMED,
                                "token request with no rows: the cloud has nothing to compute a token from")
        # Every check passed: only now does stored state change.
        if req.start:
            self.sessions[req.sequence_id] = session
        session.last_seen = now
        if n:
            session.pending.append(rows)
        session.next_position += n
        self.rows_uploaded += n
        block = PendingBlock(req.sequence_id, session.split_layer, session.first_pending,
                             rows[:0], req.want_token, req.start, req.end)
        if req.want_token:
            block.hidden = torch.cat(session.pending) if len(session.pending) > 1 else session.pending[0]
            session.pending, session.first_pending = [], session.next_position
        if req.end:
            self.sessions.pop(req.sequence_id, None)
        return block

    def _session_for(self, req: CloudRequest, now: float) -> _Session:
        if req.start:
            self.admission.check_start(req.sequence_id, req.split_layer, self.sessions)
            live = self.sessions.get(req.sequence_id)
            # a re-START (re-sync) replaces the context once every check passes, not the rate budget
            requests = live.requests if live is not None else RateLimiter(self.limits.max_requests_per_s, now)
            return _Session(req.split_layer, requests)
        session = self.sessions.get(req.sequence_id)
        if session is None:
            raise SequenceNeedsStart(f"sequence {req.sequence_id} is unknown here (never started, ended or expired): "
                                     "re-send its context with START")
        if req.split_layer is not None and req.split_layer != session.split_layer:
            raise ProtocolError(ErrorCode.SPLIT_LAYER, f"sequence {req.sequence_id} started with split layer "
                                                       f"{session.split_layer}, not {req.split_layer}")
        return session

    def expire(self, now: float | None = None) -> list[int]:
        """Drop sessions idle longer than the TTL (called on every request and by a periodic sweep)."""
        now = self.clock() if now is None else now
        idle = [sid for sid, s in self.sessions.items() if now - s.last_seen > self.limits.ttl_s]
        for sid in idle:
            del self.sessions[sid]
        return idle

    @property
    def pending_bytes(self) -> int:
        return sum(t.element_size() * t.numel() for s in self.sessions.values() for t in s.pending)
