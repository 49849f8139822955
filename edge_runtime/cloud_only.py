"""The cloud-only baseline: token ids to the whole model on the server, nothing on the edge."""
from __future__ import annotations

import numpy as np

from edge_runtime.context_sync import send_resuming
from edge_runtime.generation import end_sequence, SessionStats, TokenLoop, TokenRecord
from edge_runtime.link import CloudLink, CloudUnreachable
from plugin.model.sampling import Greedy, Sampler
from plugin.protocol.messages import CloudReply, CloudRequest, new_session_key
from plugin.split.limits import Limits


class CloudOnlySession(TokenLoop):
    """One generation against the `cloud_only` model, under one sequence id (START first, END last).

    A block longer than the server's max_block_rows (a long prompt) goes as several requests. cloud_only keeps
    no pending tokens, so each asks for a token; the cloud computes every block's KV either way, so the last
    reply's token is the one a single request would have given, and the others are dropped."""

    def __init__(self, link: CloudLink, sampler: Sampler | None = None, eos_token_ids: tuple[int, ...] = (),
                 sequence_id: int = 1, max_block_rows: int = Limits.max_block_rows):
        if link is None:
            raise ValueError("cloud-only mode needs a cloud link (--url)")
        if max_block_rows < 1:
            raise ValueError(f"max_block_rows must be at least 1, got {max_block_rows}")
        self.link, self.sampler, self.sequence_id = link, sampler or Greedy(), sequence_id
        self.max_block_rows = max_block_rows  # the cloud's rows-per-request limit (Limits.max_block_rows)
        self.session_key = new_session_key()  # binds the cloud's session to this client (SESSION_KEY)
        self.eos = set(eos_token_ids)
        self.stats = SessionStats()
        self._sent = 0  # positions the cloud holds
        self._started = False  # the cloud holds this sequence

    def step(self, block: list[int], pos: int) -> TokenRecord:
        """One token: `block` holds the token ids at positions [pos, pos + len(block)), sent in chunks of at
        most max_block_rows; only the last chunk's reply is sampled (the sampler's state moves once per token)."""
        rows = 0
        for first in range(0, len(block), self.max_block_rows):
            chunk = np.asarray(block[first:first + self.max_block_rows], dtype=np.int64)
            reply = self._send(CloudRequest(self.sequence_id, pos + first, True, token_ids=chunk,
                                            start=not self._started, session_key=self.session_key))
            rows += reply.catchup_rows
        return TokenRecord(self.sampler.pick_from(reply.topk_ids, reply.topk_logprobs), "cloud", [], {}, rows)

    def close(self, error: BaseException | None = None) -> None:
        """END the sequence (on an empty block of token ids); END's failure never replaces `error`."""
        if self._started:
            end_sequence(self._end, error)

    def _end(self) -> None:
        try:
            self._send(CloudRequest(self.sequence_id, self._sent, False, token_ids=np.zeros(0, np.int64), end=True,
                                    session_key=self.session_key))
        except CloudUnreachable:
            self._started = False  # the server's TTL reclaims the sequence

    def _send(self, req: CloudRequest) -> CloudReply:
        reply = send_resuming(self.link, req, self.stats)
        self._started = not req.end
        self._sent = req.start_pos + req.num_rows
        self.stats.count(req, reply)
        return reply
