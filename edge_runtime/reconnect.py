"""A cloud link that rides out a cut link or a restarting server without losing or repeating context.

    link = ReconnectingLink(TritonLink(url), patience_s=30)     # collaborative: wait for the cloud
    link = ReconnectingLink(TritonLink(url), patience_s=0)      # latency-aware: fail fast, fall back

While the cloud is unreachable, or one of its models is down (a dead stub, a model being reloaded:
TritonLink raises CloudUnreachable for every error whose recovery is WAIT), `send` retries the same
request every `retry_every_s` until `patience_s` has passed, then raises CloudUnreachable
(latency-aware mode answers locally then).
Refusals whose code says RETRY (RATE_LIMITED, TOO_MANY_SESSIONS: plugin/protocol/errors.py) changed
nothing on the cloud, so they are retried the same way, and raised as they are once the patience is spent.

The one ambiguous case is a request that reached the server and was applied, but whose reply was
lost with the link. The context manager takes an upload sent again as a replacement of its last
request (plugin/split/context.py), so its retry is simply applied; a token request sent again may
have been computed by the cloud partition already, so it is answered NEEDS_START, and the
edge session re-sends the whole context with START (a re-sync), exactly as after a server
restart. Should the cloud still
answer POSITION_OVERLAP (or ROLLBACK_REFUSED for a retried rollback, whose window that request
closed) after an unreachable attempt for a sequence, that refusal is turned into SequenceNeedsStart
too. Rows are never sent twice into one context and never skipped.
"""
from __future__ import annotations

import time
from typing import Callable

from edge_runtime.link import CloudLink, CloudUnreachable
from plugin.protocol.errors import ErrorCode, ProtocolError, Recovery, SequenceNeedsStart
from plugin.protocol.messages import CloudReply, CloudRequest


LANDED_CODES = (ErrorCode.POSITION_OVERLAP, ErrorCode.ROLLBACK_REFUSED)  # after a lost reply: that request landed


class ReconnectingLink:
    """Wraps any CloudLink (TritonLink, LocalCloud); thread-safe as long as the inner link is."""

    def __init__(self, link: CloudLink, patience_s: float = 30.0, retry_every_s: float = 0.25,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.link, self.patience_s, self.retry_every_s = link, patience_s, retry_every_s
        self.clock, self.sleep = clock, sleep
        self.retries = 0  # attempts that found the cloud unreachable (or busy) and were tried again
        self.unreachable = 0  # attempts that found the cloud unreachable
        self._uncertain: set[int] = set()  # sequences whose last attempt may have landed unseen

    def send(self, req: CloudRequest) -> CloudReply:
        deadline = self.clock() + self.patience_s
        while True:
            try:
                reply = self.link.send(req)
            except CloudUnreachable:
                self.unreachable += 1
                self._uncertain.add(req.sequence_id)
                if self.clock() + self.retry_every_s > deadline:
                    raise
                self.retries += 1
                self.sleep(self.retry_every_s)
                continue
            except SequenceNeedsStart:
                self._uncertain.discard(req.sequence_id)  # the caller re-syncs from position 0 anyway
                raise
            except ProtocolError as e:
                if e.code.recovery is Recovery.RETRY and self.clock() + self.retry_every_s <= deadline:
                    self.retries += 1
                    self.sleep(self.retry_every_s)
                    continue
                if req.sequence_id in self._uncertain and e.code in LANDED_CODES:
                    self._uncertain.discard(req.sequence_id)
                    raise SequenceNeedsStart(f"an earlier request of sequence {req.sequence_id} reached the cloud "
                                             f"but its reply was lost: re-send its context with START ({e})") from None
                raise
            self._uncertain.discard(req.sequence_id)
            return reply

    def __getattr__(self, name: str):  # ready(), close(), url ... of the wrapped link
        return getattr(self.link, name)
