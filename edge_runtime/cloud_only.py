"""The cloud-only baseline: token ids to the whole model on the server, nothing on the edge."""
from __future__ import annotations

import numpy as np

from edge_runtime.generation import end_sequence, SessionStats, TokenLoop, TokenRecord
from edge_runtime.link import CloudLink, CloudUnreachable
from plugin.model.sampling import Greedy, Sampler
from plugin.protocol.messages import CloudReply, CloudRequest, new_session_key


class CloudOnlySession(TokenLoop):
    """One generation against the `cloud_only` model, under one sequence id (START first, END last)."""

    def __init__(self, link: CloudLink, sampler: Sampler | None = None, eos_token_ids: tuple[int, ...] = (),
                 sequence_id: int = 1):
        if link is None:
            raise ValueError("cloud-only mode needs a cloud link (--url)")
        self.link, self.sampler, self.sequence_id = link, sampler or Greedy(), sequence_id
        self.session_key = new_session_key()  # binds the cloud's session to this client (SESSION_KEY)
        self.eos = set(eos_token_ids)
        self.stats = SessionStats()
        self._sent = 0  # positions the cloud holds
        self._started = False  # the cloud holds this sequence

    def step(self, block: list[int], pos: int) -> TokenRecord:
        """One token: `block` holds the token ids at positions [pos, pos + len(block))."""
        reply = self._send(CloudRequest(self.sequence_id, pos, True, token_ids=np.asarray(block, dtype=np.int64),
                                        start=not self._started, session_key=self.session_key))
        return TokenRecord(self.sampler.pick_from(reply.topk_ids, reply.topk_logprobs), "cloud", [], {},
                           reply.catchup_rows)

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
        reply = self.link.send(req)
        self._started = not req.end
        self._sent = req.start_pos + req.num_rows
        self.stats.count(req, reply)
        return reply
