"""The edge's decoding session: edge partition + exit decider + context sync + lookahead + sampler.

Modes (docs/design.md, `edge_runtime.policy.Mode`): collaborative (exit when confident, else ask the
cloud), standalone (never waits on the network), latency-aware (collaborative, but exits locally
while the measured cloud round trip breaks the per-token budget or the cloud is unreachable). The
cloud-only baseline is `edge_runtime.cloud_only.CloudOnlySession`.

Each token: the decider gives the ExitPolicy, the edge steps (or the step computed ahead is taken),
a token that exits is emitted and its layer-k rows uploaded, any other token is asked of the cloud
while the lookahead computes the next position on the edge's guess. With `fidelity`, each token
request also names the edge's tokens since the last cloud token and its guess of the cloud's (live
exit fidelity: SessionStats.exit_agreement()).

Verified decoding (`verify`, the "verified" modes) replaces that per-token path by the Verifier
(edge_runtime/verified.py): the exits draft, the cloud checks, and the output is the full model's.
"""
from __future__ import annotations

import time

from edge_runtime.context_sync import ContextSync
from edge_runtime.generation import SessionStats, TokenLoop, TokenRecord
from edge_runtime.link import CloudLink, CloudUnreachable
from edge_runtime.lookahead import Lookahead
from edge_runtime.policy import ExitDecider, LatencyPolicy, Mode
from edge_runtime.verified import DraftLength, Verifier
from plugin.model.sampling import Greedy, Sampler
from plugin.protocol.messages import CloudReply, Drafts
from plugin.split.edge import EdgePartition, EdgeStep


class DecodingSession(TokenLoop):
    """One generation on the edge, against one cloud sequence id in the modes that use the cloud."""

    def __init__(self, edge: EdgePartition, link: CloudLink | None, mode: Mode | str = Mode.COLLABORATIVE,
                 threshold: float | None = None, codec: str | None = None, sampler: Sampler | None = None,
                 eos_token_ids: tuple[int, ...] = (), sequence_id: int = 1, async_uploads: bool = False,
                 latency: LatencyPolicy | None = None, max_block_rows: int = 1024, speculate: bool = True,
                 verify: bool = False, fidelity: bool = False, draft_length: DraftLength | None = None):
        """verify: verified decoding (drafts checked by the cloud, output the full model's); fidelity: token
        requests also check the edge's own tokens (per-exit agreement; verified decoding always does)."""
        mode = Mode.parse(mode)
        if not mode.uses_edge:
            raise ValueError(f"{mode.value} mode runs nothing on the edge: use CloudOnlySession")
        if mode.uses_cloud and link is None:
            raise ValueError(f"{mode.value} mode needs a cloud link (--url)")
        if (verify or fidelity) and not mode.splits:
            raise ValueError(f"{mode.value} mode never asks the cloud: it can neither verify nor check exits")
        self.edge, self.mode, self.sequence_id = edge, mode, sequence_id
        self.codec = codec or edge.plan.codec
        self.sampler = sampler or Greedy()
        self.eos = set(eos_token_ids)
        self.stats = SessionStats()
        self.decider = ExitDecider(mode, edge.plan.threshold if threshold is None else threshold, latency)
        self.seq = edge.new_sequence()
        self.sync = None
        if mode.uses_cloud:
            self.sync = ContextSync(link, sequence_id, edge.plan.split_layer, self.codec, edge.hidden_size, self.stats,
                                    max_block_rows, background=async_uploads,
                                    on_unreachable=self.decider.cloud_unreachable if mode.falls_back else None)
        self.verify, self.fidelity = verify, fidelity
        self.unchecked: list[tuple[int, int]] = []  # (token, exit layer) the edge emitted since the last cloud token
        self.verifier = None
        if verify:
            self.verifier = Verifier(edge, self.seq, self.sync, self.sampler, self.decider, self.stats,
                                     lambda: self.tokens_left, mode.falls_back, draft_length, self.eos)
        # guesses are checked against the cloud's token, so only greedy decoding can keep them
        self.lookahead = None
        if speculate and mode.splits and not verify and isinstance(self.sampler, Greedy):
            self.lookahead = Lookahead(edge, self.seq, self.sampler, self.stats)

    @property
    def threshold(self) -> float:
        return self.decider.threshold

    def step(self, block: list[int], pos: int) -> TokenRecord:
        """Decode one token: `block` holds the tokens at positions [pos, pos + len(block))."""
        if self.verifier is not None:
            return self.verifier.next_record(block, pos)
        t0 = time.perf_counter()
        policy = self.decider.next_policy()
        step = self.lookahead.take(block, pos, policy) if self.lookahead else None
        if step is None:
            step = self.edge.step(self.seq, block, pos, policy, self.sampler)
        self.stats.edge_s += time.perf_counter() - t0
        if step.split_rows is not None and self.sync is not None:
            self.sync.append(step.split_rows.hidden)
        record = TokenRecord(-1, "", step.confidences, step.rows_by_layer)
        if step.token_id is not None:
            record.token_id, record.exit = step.token_id, f"edge:{step.exit_layer}"
            self._unchecked(record.token_id, step.exit_layer)
            if step.split_rows is not None and self.sync is not None:
                self.sync.upload_soon()
            return record
        try:
            reply = self._request_token(step, pos + len(block))
        except CloudUnreachable:
            if not self.mode.falls_back:
                raise
            self.decider.cloud_unreachable()
            last_exit = self.edge.plan.exit_layers[-1]
            record.token_id = step.last_exit.pick(self.sampler)
            record.exit, record.fallback = f"edge:{last_exit}", True
            self._unchecked(record.token_id, last_exit)
            self.stats.fallbacks += 1
            return record
        record.token_id = self.sampler.pick_from(reply.topk_ids, reply.topk_logprobs)
        record.exit, record.cloud_rows = "cloud", reply.catchup_rows
        return record

    def _unchecked(self, token: int, exit_layer: int) -> None:
        """An edge token the next token request names for the full model to check (with `fidelity`)."""
        if self.fidelity:
            self.unchecked.append((token, exit_layer))

    def _request_token(self, step: EdgeStep, next_pos: int) -> CloudReply:
        """Ask the cloud for the next token; meanwhile, the lookahead computes `next_pos` on a guess."""
        t0 = time.perf_counter()
        drafts = None
        if self.fidelity:  # the edge's tokens since the last cloud token, and its guess of this one
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
        """Drop the step computed ahead and END the cloud sequence (with any rows it has not seen).
        `error` ended the generation (None: it finished); END's own failure never replaces it."""
        if self.lookahead is not None:
            self.lookahead.close()
        if self.verifier is not None:
            self.verifier.close()
        if self.sync is not None:
            self.sync.close(error)
