"""The cloud context manager: per-session layer-k rows the edge uploaded, kept until a token needs them."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from plugin.protocol.codec import check, concat, EncodedRows
from plugin.protocol.errors import ErrorCode, position_error, ProtocolError, SequenceNeedsStart
from plugin.protocol.messages import CloudRequest, Drafts, LOOKUP_EXIT, PendingBlock
from plugin.split.limits import (
    Admission, check_context, check_request, drop_idle, Limits, MemoryBudget, RateLimiter)


@dataclass(frozen=True)
class _Context:
    """What a session holds: positions [0, next_position) arrived; rows [first_pending, next_position) wait
    for a token request, as they arrived (fp16/int8 stay fp16/int8), all in the session's codec."""

    next_position: int = 0
    first_pending: int = 0
    pending: tuple[EncodedRows, ...] = ()
    # where ROLLBACK_TO may point in the next request: the drafted rows of the last request, if it had drafts
    rollback_window: range = range(0)

    @property
    def pending_rows(self) -> int:
        return self.next_position - self.first_pending


@dataclass
class _Session:
    split_layer: int
    key: int  # SESSION_KEY of its START: every later request must carry it
    requests: RateLimiter  # this session's request rate; kept across a re-START
    # the codec of its START: its pending rows are handed on as one block of it, as they arrived
    codec: str
    client: str = ""  # who started it (the front's CLIENT_HEADER): sessions and bytes are shared per client
    # False until a request after its START arrives: a START the cloud partition refused after this manager took
    # it is followed by none, and such a session is dropped after limits.slot_idle_s, not the TTL
    confirmed: bool = False
    context: _Context = _Context()
    # A request that starts where the last one started is that request sent again: its reply was an error,
    # or was lost, and the context manager cannot tell whether the cloud partition behind it applied it.
    # An upload never reaches the partition, so it is replaced (`before_last` is the context before it); a
    # token request may have been computed there, so its retry is answered NEEDS_START and the edge re-syncs
    # both steps. A request with ROLLBACK_TO sent again is refused ROLLBACK_REFUSED (the window it used is
    # closed), which the edge's ReconnectingLink also turns into a re-sync. Either way the two steps of the
    # ensemble never drift apart.
    before_last: _Context | None = None  # the context before the last request, if that request only uploaded
    last_start: int = -1
    last_seen: float = 0.0

    @property
    def next_position(self) -> int:
        return self.context.next_position

    @property
    def pending(self) -> tuple[EncodedRows, ...]:
        """The rows waiting for a token request."""
        return self.context.pending

    @property
    def nbytes(self) -> int:
        """Bytes of the rows it holds (`before_last` holds a prefix of them)."""
        return _held_bytes(self.context)


def _held_bytes(context: _Context) -> int:
    return sum(rows.nbytes for rows in context.pending)


class ContextManager:
    """Checks every request before it touches stored state, so a refused request changes nothing."""

    def __init__(self, hidden_size: int, num_layers: int, limits: Limits | None = None,
                 clock: Callable[[], float] = time.monotonic, min_split_layer: int = 1, device: str = "cpu",
                 vocab_size: int | None = None, max_split_layer: int | None = None):
        """min_split_layer: the first layer the cloud partition behind this manager holds; max_split_layer: the
        last split it resumes at (None: any it holds; a TensorRT engine serves its own only); vocab_size bounds
        draft tokens (None: only >= 0 is checked)."""
        if min_split_layer < 1:  # the rows are layer-k hidden states; split 0 (token ids) is cloud_only's
            raise ValueError(f"the context manager keeps hidden rows: min_split_layer must be >= 1, "
                             f"got {min_split_layer}")
        self.hidden_size, self.num_layers, self.vocab_size = hidden_size, num_layers, vocab_size
        self.limits = limits or Limits()
        self.admission = Admission(self.limits, num_layers, min_split_layer, max_split_layer)
        self.budget = MemoryBudget(self.limits, device)
        self.clock = clock
        self.sessions: dict[int, _Session] = {}
        self.rows_uploaded = 0

    def handle(self, req: CloudRequest) -> PendingBlock:
        now = self.clock()
        self.expire(now)
        session, evict = self._session_for(req, now)
        if not session.requests.allow(now):  # every request with the session's key counts, refused ones too
            raise ProtocolError(ErrorCode.RATE_LIMITED,
                                f"rate limit: {self.limits.max_requests_per_s:g} requests/s per session "
                                f"(sequence {req.sequence_id}); slow down and retry")
        n = self._check_size(req)
        check(req.rows, self.hidden_size)  # dtype, shape, scales, NaN/Inf: CodecError is MALFORMED
        base = self._after_rollback(req, self._base(session, req))
        if req.start_pos != base.next_position:
            raise position_error(req.sequence_id, base.next_position, req.start_pos, "row")
        announced = req.context_rows if req.start and req.context_rows is not None else 0
        check_context(self.limits, max(base.next_position + n, announced))
        if req.rows.codec != session.codec:  # the pending block is handed on as one block of the session's codec
            raise ProtocolError(ErrorCode.MALFORMED, f"sequence {req.sequence_id} started with codec "
                                                     f"{session.codec}, not {req.rows.codec}: one codec per session "
                                                     "(START to change it)")
        if req.want_token and base.pending_rows + n == 0:
            raise ProtocolError(ErrorCode.MALFORMED,
                                "token request with no rows: the cloud has nothing to compute a token from")
        self._check_drafts(req, session, base.pending_rows + n)
        keep = n > 0 and not req.want_token  # rows stored; a token request hands them on at once
        live = self.sessions.get(req.sequence_id)
        evict += self.budget.check(self.pending_bytes, (0 if req.want_token else _held_bytes(base))
                                   + (req.rows.nbytes if keep else 0) - (live.nbytes if live is not None else 0),
                                   self.sessions, req.client)
        # Every check passed: only now does stored state change.
        for sid in evict:  # sessions of a client over its share (that edge re-sends its context with START)
            del self.sessions[sid]
        rows = (_owned(req.rows) if keep else req.rows,) if n else ()
        after = _Context(base.next_position + n, base.first_pending, base.pending + rows)
        handed: tuple[EncodedRows, ...] = ()
        if req.want_token:
            window = drafted_rows(after.next_position, req.drafts)
            handed, after = after.pending, _Context(after.next_position, after.next_position, rollback_window=window)
        if req.start:
            self.sessions[req.sequence_id] = session
        session.context, session.last_start = after, req.start_pos
        session.before_last = None if req.start or req.want_token else base
        session.last_seen, session.confirmed = now, not req.start or session is live
        self.rows_uploaded += n
        if req.end:
            self.sessions.pop(req.sequence_id, None)
        return PendingBlock(req.sequence_id, session.split_layer, base.first_pending,
                            concat(session.codec, self.hidden_size, handed), req.want_token,
                            req.start, req.end, session_key=session.key, drafts=req.drafts, rollback_to=req.rollback_to,
                            client=req.client)

    def _session_for(self, req: CloudRequest, now: float) -> tuple[_Session, list[int]]:
        """The session a request applies to: a new one for START (not stored yet), else the live one; both
        only with the session's key. And the session a START takes the place of in a full table (if any)."""
        live = self.sessions.get(req.sequence_id)
        session, evict = self.admission.session_for(self.sessions, req.sequence_id, req.start, req.start_pos,
                                                    req.rollback_to, req.session_key, req.split_layer, req.client)
        if session is None:
            # a re-START (re-sync) replaces the context once every check passes, not the rate budget
            requests = live.requests if live is not None else RateLimiter(self.limits.max_requests_per_s, now)
            codec = req.rows.codec if req.rows is not None else ""  # no rows: refused by _check_size
            return _Session(req.split_layer, req.session_key, requests, codec, req.client), evict
        return session, evict

    def _check_size(self, req: CloudRequest) -> int:
        """The request's row count, once it carries rows within the per-request limits."""
        if req.rows is None:
            raise ProtocolError(ErrorCode.MALFORMED,
                                "request carries no hidden rows (HIDDEN_FP32, HIDDEN_FP16 or HIDDEN_INT8)")
        n = req.rows.data.shape[0] if req.rows.data.ndim == 2 else -1
        check_request(self.limits, req.nbytes, n)
        return n

    @staticmethod
    def _base(session: _Session, req: CloudRequest) -> _Context:
        """The context the request applies to: the one before the last request when it sends that upload
        again; a token request sent again cannot be (see _Session)."""
        if req.start or req.rollback_to is not None or req.start_pos != session.last_start \
                or req.start_pos >= session.context.next_position:
            return session.context  # a rollback is never a replacement: sent again, it finds its window closed
        if session.before_last is None:
            raise SequenceNeedsStart(f"sequence {req.sequence_id}: this request starts where the last one started "
                                     f"(position {req.start_pos}), which asked for a token the cloud may have "
                                     "computed already: re-send the context with START")
        return session.before_last

    @staticmethod
    def _after_rollback(req: CloudRequest, base: _Context) -> _Context:
        """The context once the request's ROLLBACK_TO is applied (the rows of rejected drafts dropped; none were
        pending after a token request); a rollback outside the rows the previous request had checked (stale,
        beyond what is held, none checked, a START) or not at START_POS is refused here, before anything changes."""
        to = req.rollback_to
        if to is None:
            return base
        where = f"sequence {req.sequence_id}: ROLLBACK_TO {to}"
        if req.start:
            raise ProtocolError(ErrorCode.ROLLBACK_REFUSED, f"{where} with START: a new context holds nothing to roll back")
        if to not in base.rollback_window:
            raise ProtocolError(ErrorCode.ROLLBACK_REFUSED, f"{where} is stale or out of range: the last request's "
                                                            f"drafts allow {window_text(base.rollback_window)}")
        if req.start_pos != to:
            raise ProtocolError(ErrorCode.ROLLBACK_REFUSED, f"{where} but START_POS {req.start_pos}: the rows after a "
                                                            "rollback start where it cut")
        return _Context(to, to)

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
        if drafts.exits.min() < LOOKUP_EXIT or drafts.exits.max() > session.split_layer:
            raise ProtocolError(ErrorCode.MALFORMED, f"DRAFT_EXITS must lie in [{LOOKUP_EXIT}, {session.split_layer}] "
                                                     f"(edge exits of the session's split; {LOOKUP_EXIT}: a lookup)")

    def expire(self, now: float | None = None) -> list[int]:
        """Drop sessions idle longer than the TTL, and those whose START no request followed within the slot idle
        time (called on every request and by a periodic sweep)."""
        now = self.clock() if now is None else now
        unconfirmed = {sid: s for sid, s in self.sessions.items() if not s.confirmed}
        ghosts = drop_idle(unconfirmed, now, min(self.limits.slot_idle_s, self.limits.ttl_s))
        for sid in ghosts:
            del self.sessions[sid]
        return ghosts + drop_idle(self.sessions, now, self.limits.ttl_s)

    @property
    def pending_bytes(self) -> int:
        """Bytes of rows held for all sessions (the budget's measure)."""
        return sum(s.nbytes for s in self.sessions.values())


def _owned(rows: EncodedRows) -> EncodedRows:
    """The rows in arrays of their own, as they arrived: the request's arrays may live in a buffer that
    the server reuses once the request is answered."""
    scale = None if rows.scale is None else np.array(rows.scale, copy=True)
    return EncodedRows(rows.codec, np.array(rows.data, copy=True), scale)


def window_text(window: range) -> str:
    return f"[{window.start}, {window.stop - 1}]" if window else "none (that request carried no drafts)"


def drafted_rows(next_position: int, drafts: Drafts | None) -> range:
    """Where the next request's ROLLBACK_TO may point once a block with `drafts` ends at `next_position`: after
    the first drafted row (its input was already accepted) up to the end (a no-op)."""
    if drafts is None:
        return range(0)
    return range(next_position - len(drafts) + 1, next_position + 1)
