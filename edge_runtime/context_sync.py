"""What the cloud holds of one sequence, and how the edge keeps it up to date.

Every layer-k row the edge computes is kept (`RowLog`): it is the context to re-send with START
when the cloud lost the sequence (restart, idle timeout). Requests of one sequence go one at a time
and in position order (the lock); blocks longer than the cloud's max_block_rows go in chunks. Rows of
drafts the full model rejected are forgotten (`rewind`); when the cloud holds some of them, the next
request carries ROLLBACK_TO, so the cloud drops them in the same request that brings the new rows.
Uploads can run in a background thread; a token request sends whatever is still unsent and waits
only for itself. A background upload that fails leaves its rows unsent and its error is raised by
the next request of the session, as the same failure would have been in the foreground.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Callable

import numpy as np

from edge_runtime.generation import end_sequence, SessionStats
from edge_runtime.link import CloudLink, CloudUnreachable
from plugin.protocol.codec import encode
from plugin.protocol.errors import ErrorCode, ProtocolError, SequenceNeedsStart
from plugin.protocol.messages import CloudReply, CloudRequest, Drafts, new_session_key
from plugin.split.limits import Limits


class RowLog:
    """Rows [0, length) in one growing buffer, so taking the unsent tail costs no concatenation."""

    def __init__(self, hidden_size: int = 0):
        self._rows = np.empty((0, hidden_size), np.float32)
        self.length = 0

    def append(self, rows: np.ndarray) -> None:
        # rows: [n, D]
        end = self.length + rows.shape[0]
        if end > self._rows.shape[0] or self._rows.shape[1] != rows.shape[1]:
            grown = np.empty((max(end, 2 * self._rows.shape[0], 64), rows.shape[1]), np.float32)
            grown[: self.length] = self._rows[: self.length]
            self._rows = grown
        self._rows[self.length: end] = rows
        self.length = end

    def truncate(self, length: int) -> None:
        """Forget rows [length, ...)."""
        assert 0 <= length <= self.length, (length, self.length)
        self.length = length

    def rows(self, first: int, stop: int) -> np.ndarray:
        return self._rows[first:stop]


@dataclasses.dataclass(frozen=True)
class CloudSequence:
    """What every request of one sequence says the same way: its id, the layer, codec and width of its rows, and
    how many rows the cloud takes in one request (Limits.max_block_rows)."""

    sequence_id: int
    split_layer: int
    codec: str
    hidden_size: int
    max_block_rows: int = Limits.max_block_rows


class ContextSync:
    """The edge's side of one cloud sequence: the rows kept, the rows sent, START/END and re-sync.

    on_unreachable: called instead of raising when an upload finds the cloud unreachable (latency-
    aware mode: the rows stay unsent and the next request carries them); None raises.
    """

    def __init__(self, link: CloudLink, sequence: CloudSequence, stats: SessionStats, background: bool = False,
                 on_unreachable: Callable[[], None] | None = None):
        self.link, self.sequence_id, self.split_layer, self.codec = (link, sequence.sequence_id, sequence.split_layer,
                                                                     sequence.codec)
        self.session_key = new_session_key()  # binds the cloud's session to this edge (SESSION_KEY)
        self.stats = stats
        self.max_block_rows = sequence.max_block_rows
        self.on_unreachable = on_unreachable
        self.log = RowLog(sequence.hidden_size)  # every row that reached the split: the context to re-sync
        self.sent = 0  # positions the cloud holds (once a pending rollback is applied)
        self.rollback_to: int | None = None  # the cloud holds rows from here on that the edge dropped
        self.started = False  # the cloud holds this sequence
        self.lock = threading.Lock()  # one request at a time per sequence, in position order
        self.failure: Exception | None = None  # a background upload's error, raised by every later request
        self._uploader = BackgroundUploader(self._upload_in_background) if background else None

    def append(self, rows: np.ndarray) -> None:
        # rows: [n, D] at positions [log.length, log.length + n)
        self.log.append(rows)

    # -- what the session asks for ------------------------------------------------------------------
    def request_token(self, drafts: Drafts | None = None) -> CloudReply:
        """Send every unsent row and ask for the next token; with `drafts`, also for the full model's top-k after
        each of the last len(drafts) rows (reply.rows)."""
        with self.lock:
            self._raise_failure()
            return self._send_rows(want_token=True, drafts=drafts)

    def rewind(self, position: int) -> None:
        """Forget the rows from `position` on (drafts the full model rejected); if the cloud holds some of them,
        the next request rolls it back to `position` first."""
        with self.lock:
            self.log.truncate(min(position, self.log.length))
            if position < self.sent:
                self.sent = self.rollback_to = position

    def upload_soon(self) -> None:
        """Send the unsent rows: now, or in the background (a failure there surfaces at the next call)."""
        if self._uploader is None:
            with self.lock:
                self._upload()
            return
        self._raise_failure()
        self._uploader.kick()

    def wait_uploads(self, timeout_s: float = 30.0) -> bool:
        """Wait until no background upload is queued or running; False on timeout."""
        return self._uploader is None or self._uploader.wait_idle(timeout_s)

    def close(self, error: BaseException | None = None) -> None:
        """Stop the uploader and END the sequence, carrying the rows the cloud has not seen.

        `error` ended the generation (None: it finished); END's failure never replaces it. A background
        failure not yet raised is raised here, after END was attempted."""
        if self._uploader is not None:
            self._uploader.close()
        failure = error or self.failure
        end_sequence(self._end, failure)
        if failure is not None and failure is not error:
            raise failure

    # -- sending (the caller holds the lock) ----------------------------------------------------------
    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    def _upload(self) -> None:
        """Send every row the cloud has not seen, as upload-only requests."""
        if self.sent == self.log.length:
            return
        try:
            self._send_rows(want_token=False)
        except CloudUnreachable:
            if self.on_unreachable is None:
                raise
            self.on_unreachable()  # the rows stay unsent

    def _upload_in_background(self) -> None:
        with self.lock:
            if self.failure is not None:
                return
            try:
                self._upload()
            except Exception as e:  # kept under the lock: the next request cannot miss it
                self.failure = e

    def _end(self) -> None:
        with self.lock:
            if not self.started:
                return
            try:
                self._send_rows(want_token=False, end=True)
            except CloudUnreachable:
                self.started = False  # the server's TTL reclaims the sequence

    def _send_rows(self, want_token: bool, end: bool = False, stop: int | None = None,
                   drafts: Drafts | None = None) -> CloudReply:
        """Send the rows from the first the cloud has not seen up to `stop` (default: all), in chunks
        of at most max_block_rows: upload-only chunks first, then the last one with want_token / END / drafts."""
        stop = self.log.length if stop is None else stop
        while stop - self.sent > self.max_block_rows:
            self._send(self._rows_request(False, self.sent, self.sent + self.max_block_rows))
        return self._send(self._rows_request(want_token, self.sent, stop, end, drafts))

    def _rows_request(self, want_token: bool, first: int, stop: int, end: bool = False,
                      drafts: Drafts | None = None) -> CloudRequest:
        start = first == 0 and not self.started
        return CloudRequest(self.sequence_id, first, want_token, rows=encode(self.log.rows(first, stop), self.codec),
                            split_layer=self.split_layer, start=start, end=end, session_key=self.session_key,
                            drafts=drafts, rollback_to=None if start else self.rollback_to,
                            context_rows=self.log.length if start else None)

    def _send(self, req: CloudRequest) -> CloudReply:
        """When Triton freed the sequence's slot (idle), resume it: the same request with START. When the cloud
        lost the sequence (restart, TTL), re-send the whole context with START up to the end of this request,
        then finish it as it was meant."""
        try:
            reply = send_resuming(self.link, req, self.stats)
        except SequenceNeedsStart:
            if req.start:  # the re-sync itself failed
                raise
            self.stats.resyncs += 1
            self.started, self.sent, self.rollback_to = False, 0, None  # a new context holds nothing to roll back
            return self._send_rows(req.want_token, req.end, stop=req.start_pos + req.num_rows, drafts=req.drafts)
        self.started = not req.end
        self.sent = req.start_pos + req.num_rows
        self.rollback_to = None
        self.stats.count(req, reply)
        return reply


def send_resuming(link: CloudLink, req: CloudRequest, stats: SessionStats) -> CloudReply:
    """`req`, and when Triton answers SLOT_EXPIRED, `req` again with START: the models kept the session, so it
    resumes where it stands (plugin/split/context.py `resumes`). SequenceNeedsStart when that is refused too
    (the cloud lost the session): the caller re-sends the whole context."""
    try:
        return link.send(req)
    except SequenceNeedsStart as e:
        if e.code is not ErrorCode.SLOT_EXPIRED or req.start or req.rollback_to is not None:
            raise
    try:
        reply = link.send(dataclasses.replace(req, start=True))
    except ProtocolError as e:
        raise SequenceNeedsStart(f"sequence {req.sequence_id} could not resume after its slot expired ({e})") from None
    stats.resumes += 1
    return reply


class BackgroundUploader:
    """A thread that runs `flush` whenever kicked (kicks coalesce); decoding never waits on it."""

    def __init__(self, flush: Callable[[], None]):
        self._flush = flush
        self._state = threading.Condition()
        self._queued = self._running = self._closed = False
        self._thread = threading.Thread(target=self._run, name="ce-collm-uploader", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        with self._state:
            self._queued = True
            self._state.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        with self._state:
            return self._state.wait_for(lambda: not (self._queued or self._running), timeout_s)

    def _run(self) -> None:
        while True:
            with self._state:
                self._state.wait_for(lambda: self._queued or self._closed)
                if self._closed:
                    return
                self._queued, self._running = False, True
            try:
                self._flush()
            finally:
                with self._state:
                    self._running = False
                    self._state.notify_all()

    def close(self) -> None:
        with self._state:
            self._closed = True
            self._state.notify_all()
        self._thread.join(timeout=30)
