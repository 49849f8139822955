"""The per-token loops: standalone, collaborative and latency-aware (docs/design.md, "Decoding modes").
Verified decoding is edge_runtime/verified.py; the cloud-only baseline is edge_runtime/cloud_only.py.

Each token: the decider gives the ExitPolicy, the edge steps (or the step computed ahead is taken), a
token that exits is emitted and its layer-k rows uploaded, any other token is asked of the cloud while
the lookahead computes the next position on the edge's guess. With `fidelity`, each token request also
names the edge's tokens since the last cloud token and its guess of the cloud's (live exit fidelity:
SessionStats.exit_agreement()).
"""
from __future__ import annotations

import time

from edge_runtime.generation import TokenRecord
from edge_runtime.link import CloudLink, CloudUnreachable
from edge_runtime.lookahead import Lookahead
from edge_runtime.parts import edge_record, EdgeSession, SessionOptions
from edge_runtime.policy import Mode
from plugin.model.sampling import Greedy
from plugin.protocol.messages import CloudReply, Drafts
from plugin.split.edge import EdgePartition, EdgeStep


class StandaloneSession(EdgeSession):
    """Standalone: the edge alone; the first confident exit answers, else the last exit. No link."""

    mode = Mode.STANDALONE

    def step(self, block: list[int], pos: int) -> TokenRecord:
        t0 = time.perf_counter()
        step = self.edge.step(self.seq, block, pos, self.decider.next_policy(), self.sampler)
        self.stats.edge_s += time.perf_counter() - t0
        return edge_record(step)


class CollaborativeSession(EdgeSession):
    """Collaborative: the first confident exit answers (its rows wait at that exit, or are uploaded when it is the
    split); otherwise a token request carries every unsent row and the cloud answers, while the edge computes
    the next position on its last exit's argmax (kept only if the cloud agrees)."""

    mode = Mode.COLLABORATIVE

    def __init__(self, edge: EdgePartition, link: CloudLink | None, options: SessionOptions):
        super().__init__(edge, link, options)
        self.unchecked: list[tuple[int, int]] = []  # (token, exit layer) the edge emitted since the last cloud token
        # guesses are checked against the cloud's token, so only greedy decoding can keep them
        self.lookahead = None
        if options.speculate and isinstance(self.sampler, Greedy):
            self.lookahead = Lookahead(edge, self.seq, self.sampler, self.stats)

    def step(self, block: list[int], pos: int) -> TokenRecord:
        """Decode one token: `block` holds the tokens at positions [pos, pos + len(block))."""
        t0 = time.perf_counter()
        policy = self.decider.next_policy()
        step = self.lookahead.take(block, pos, policy) if self.lookahead else None
        if step is None:
            step = self.edge.step(self.seq, block, pos, policy, self.sampler)
        self.stats.edge_s += time.perf_counter() - t0
        if step.split_rows is not None:
            self.sync.append(step.split_rows.hidden)
        if step.token_id is None:
            return self.ask_cloud(step, pos + len(block))
        self._unchecked(step.token_id, step.exit_layer)
        if step.split_rows is not None:
            self.sync.upload_soon()
        return edge_record(step)

    def ask_cloud(self, step: EdgeStep, next_pos: int) -> TokenRecord:
        """The cloud's token after the rows sent (no exit was confident)."""
        reply = self._request_token(step, next_pos)
        token = self.sampler.pick_from(reply.topk_ids, reply.topk_logprobs)
        return TokenRecord(token, "cloud", step.confidences, step.rows_by_layer, cloud_rows=reply.catchup_rows)

    def _unchecked(self, token: int, exit_layer: int) -> None:
        """An edge token the next token request names for the full model to check (with `fidelity`)."""
        if self.options.fidelity:
            self.unchecked.append((token, exit_layer))

    def _request_token(self, step: EdgeStep, next_pos: int) -> CloudReply:
        """Ask the cloud for the next token; meanwhile, the lookahead computes `next_pos` on a guess."""
        t0 = time.perf_counter()
        drafts = None
        if self.options.fidelity:  # the edge's tokens since the last cloud token, and its guess of this one
            guess = (step.last_exit.token, self.edge.plan.exit_layers[-1])
            drafts = Drafts.of(self.unchecked + [guess])
        request = lambda: self.sync.request_token(drafts)  # noqa: E731
        if self.lookahead is None:
            reply = request()
        else:
            reply = self.lookahead.while_waiting(request, step, next_pos, self.decider.ahead_policy())
        self.unchecked = []
        rtt = time.perf_counter() - t0
        self.stats.cloud_wait_s += rtt
        self.decider.round_trip(rtt)
        return reply

    def drop_lookahead(self) -> None:
        """Undo the step computed ahead, if any: the edge then holds exactly the positions decoded."""
        if self.lookahead is not None:
            self.lookahead.drop()

    def close(self, error: BaseException | None = None) -> None:
        """Drop the step computed ahead, then END the cloud sequence."""
        if self.lookahead is not None:
            self.lookahead.close()
        super().close(error)


class LatencyAwareSession(CollaborativeSession):
    """Latency-aware: collaborative, but the edge answers (`local_only`) while the cloud was unreachable in the
    last retry_after_s or its round trip is over the budget (ExitDecider); a request that finds the cloud
    unreachable is answered by the last exit, and its rows go with the next request."""

    mode = Mode.LATENCY_AWARE

    def ask_cloud(self, step: EdgeStep, next_pos: int) -> TokenRecord:
        try:
            return super().ask_cloud(step, next_pos)
        except CloudUnreachable:
            self.decider.cloud_unreachable()
        last_exit = self.edge.plan.exit_layers[-1]
        token = step.last_exit.pick(self.sampler)
        self._unchecked(token, last_exit)
        self.stats.fallbacks += 1
        return TokenRecord(token, f"edge:{last_exit}", step.confidences, step.rows_by_layer, fallback=True)
