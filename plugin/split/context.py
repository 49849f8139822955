"""The cloud context manager: per-session layer-k rows the edge uploaded, kept until a token needs them."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from plugin.protocol.codec import decode
from plugin.protocol.errors import ErrorCode, ProtocolError, SequenceNeedsStart
from plugin.protocol.messages import CloudRequest, Drafts, PendingBlock
from plugin.split.limits import Admission, Limits, RateLimiter


@dataclass
class _Session:
    split_layer: int
    requests: RateLimiter  # this session's request rate; kept across a re-START
    next_position: int = 0  # the position the next uploaded row must have
    first_pending: int = 0
    pending: list[torch.Tensor] = field(default_factory=list)  # [n_i, D] blocks, contiguous
    last_seen: float = 0.0
    # where ROLLBACK_TO may point in the next request: the drafted rows of the last request, if it had drafts
    rollback_window: range = range(0)

    @property
    def pending_rows(self) -> int:
        return self.next_position - self.first_pending


class ContextManager:
    """Validates every upload before it touches stored state, so a bad request loses nothing."""

    def __init__(self, hidden_size: int, num_layers: int, limits: Limits | None = None,
                 clock: Callable[[], float] = time.monotonic, min_split_layer: int = 1, vocab_size: int | None = None):
        """min_split_layer: the first layer the cloud partition behind this manager holds; vocab_size bounds draft
        tokens (None: only >= 0 is checked)."""
        if min_split_layer < 1:  # the rows are layer-k hidden states; split 0 (token ids) is cloud_only's
            raise ValueError(f"the context manager keeps hidden rows: min_split_layer must be >= 1, "
                             f"got {min_split_layer}")
        self.hidden_size, self.num_layers, self.vocab_size = hidden_size, num_layers, vocab_size
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
        held = self._held_after_rollback(req, session)  # the next position once ROLLBACK_TO is applied
        if req.start_pos != held:
            gap = req.start_pos > held
            raise ProtocolError(
                ErrorCode.POSITION_GAP if gap else ErrorCode.POSITION_OVERLAP,
                f"position {'gap' if gap else 'overlap'}: sequence {req.sequence_id} expects its next row at position "
                f"{held}, the request starts at {req.start_pos}"
            )
        if held + n > self.limits.max_context:
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"context of {held + n} positions exceeds "
                                                          f"the limit of {self.limits.max_context}")
        pending_rows = held - min(session.first_pending, held)  # a rollback leaves none: its window has none
        if req.want_token and pending_rows + n == 0:
            raise ProtocolError(ErrorCode.MALFORMED,
                                "token request with no rows: the cloud has nothing to compute a token from")
        self._check_drafts(req, session, pending_rows + n)
        # Every check passed: only now does stored state change.
        if req.start:
            self.sessions[req.sequence_id] = session
        session.last_seen = now
        if req.rollback_to is not None:
            session.next_position = session.first_pending = req.rollback_to
        if n:
            session.pending.append(rows)
        session.next_position += n
        self.rows_uploaded += n
        block = PendingBlock(req.sequence_id, session.split_layer, session.first_pending,
                             rows[:0], req.want_token, req.start, req.end, drafts=req.drafts,
                             rollback_to=req.rollback_to)
        if req.want_token:
            block.hidden = torch.cat(session.pending) if len(session.pending) > 1 else session.pending[0]
            session.pending, session.first_pending = [], session.next_position
        session.rollback_window = drafted_rows(session.next_position, req.drafts)
        if req.end:
            self.sessions.pop(req.sequence_id, None)
        return block

    def _held_after_rollback(self, req: CloudRequest, session: _Session) -> int:
        """The session's next position once the request's ROLLBACK_TO is applied; a rollback outside the rows
        the previous request had checked (stale, beyond what is held, none checked, a START) or not at START_POS
        is refused here, before anything changes."""
        to = req.rollback_to
        if to is None:
            return session.next_position
        where = f"sequence {req.sequence_id}: ROLLBACK_TO {to}"
        if req.start:
            raise ProtocolError(ErrorCode.ROLLBACK_REFUSED, f"{where} with START: a new context holds nothing to roll back")
        if to not in session.rollback_window:
            raise ProtocolError(ErrorCode.ROLLBACK_REFUSED, f"{where} is stale or out of range: the last request's "
                                                            f"drafts allow {window_text(session.rollback_window)}")
        if req.start_pos != to:
            raise ProtocolError(ErrorCode.ROLLBACK_REFUSED, f"{where} but START_POS {req.start_pos}: the rows after a "
                                                            "rollback start where it cut")
        return to

    def _check_drafts(self, req: CloudRequest, session: _Session, computed: int) -> None:
        """Drafts name rows this request computes (the cloud has their final hidden states only then)."""
        drafts = req.drafts
        if drafts is None:
            return
        if not req.want_token:
            raise ProtocolError(ErrorCode.MALFORMED, "DRAFT_TOKENS need WANT_TOKEN: an upload computes nothing to "
                                                     "check them against")
        if not 1 <= len(drafts) <= computed:
            raise ProtocolError(ErrorCode.MALFORMED, f"{len(drafts)} drafts, but this request computes {computed} rows: "
                                                     f"send between 1 and {computed}")
        top = self.vocab_size if self.vocab_size is not None else np.iinfo(np.int64).max
        if drafts.tokens.min() < 0 or drafts.tokens.max() >= top:
            raise ProtocolError(ErrorCode.MALFORMED, f"DRAFT_TOKENS must lie in [0, {top})")
        if drafts.exits.min() < 1 or drafts.exits.max() > session.split_layer:
            raise ProtocolError(ErrorCode.MALFORMED, f"DRAFT_EXITS must lie in [1, {session.split_layer}] (edge exits "
                                                     "of the session's split)")

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


def window_text(window: range) -> str:
    return f"[{window.start}, {window.stop - 1}]" if window else "none (that request carried no drafts)"


def drafted_rows(next_position: int, drafts: Drafts | None) -> range:
    """Where the next request's ROLLBACK_TO may point once a block with `drafts` ends at `next_position`: after
    the first drafted row (its input was already accepted) up to the end (a no-op)."""
    if drafts is None:
        return range(0)
    return range(next_position - len(drafts) + 1, next_position + 1)
