"""The decoding session's pieces, each tested alone (no server): the exit decider, the context sync,
the step computed ahead, and how a failed generation ends."""
from __future__ import annotations

import pytest
import torch

from edge_runtime.context_sync import CloudSequence, ContextSync
from edge_runtime.generation import SessionStats
from edge_runtime.lookahead import Lookahead
from edge_runtime.policy import ExitDecider, LatencyPolicy, Mode
from edge_runtime.torch_runner import TorchRunner
from edge_runtime.session import DecodingSession
from plugin.model.checkpoint import load_model
from plugin.model.sampling import Greedy
from plugin.protocol.errors import ErrorCode, ProtocolError, SequenceNeedsStart
from plugin.protocol.messages import CloudReply, CloudRequest
from plugin.split.edge import EdgePartition, ExitPolicy
from plugin.split.limits import Limits
from plugin.split.local import LocalCloud
from plugin.split.plan import PartitionPlan
from tests.tiny_models import LAYERS, save_tiny

SPLIT, EXITS = 4, (1, 3, 4)
PROMPT = [5, 17, 33, 2, 71, 8]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- the exit decider: pure logic --------------------------------------------------------------------
def test_modes_resolve_once_and_refuse_unknown_names():
    assert Mode.parse("latency-aware") is Mode.LATENCY_AWARE and Mode.parse(Mode.STANDALONE) is Mode.STANDALONE
    assert [m.splits for m in Mode] == [True, False, True, False]
    with pytest.raises(ValueError, match="mode must be one of"):
        Mode.parse("hybrid")
    with pytest.raises(ValueError, match="runs no edge exits"):
        ExitDecider(Mode.CLOUD_ONLY, 0.8)


def test_collaborative_always_asks_and_standalone_never_does():
    for mode, local_only in ((Mode.COLLABORATIVE, False), (Mode.STANDALONE, True)):
        decider = ExitDecider(mode, 0.7)
        decider.cloud_unreachable()
        decider.round_trip(99.0)
        assert [decider.next_policy() for _ in range(3)] == [ExitPolicy(0.7, local_only)] * 3
        assert decider.ahead_policy() == ExitPolicy(0.7)


def test_latency_aware_stays_local_while_over_budget_probing_every_nth_token():
    clock = Clock()
    decider = ExitDecider(Mode.LATENCY_AWARE, 0.8, LatencyPolicy(budget_s=0.1, probe_every=4, alpha=0.5), clock)
    assert not decider.next_policy().local_only  # no estimate yet: ask
    decider.round_trip(0.3)
    assert decider.rtt == pytest.approx(0.3)
    asks = [not decider.next_policy().local_only for _ in range(8)]
    assert asks == [False, False, True, False, False, False, True, False]  # tokens 2..9: every 4th asks
    decider.round_trip(0.02)  # the probe came back fast: the estimate falls to 0.16, still over
    assert decider.rtt == pytest.approx(0.16)
    decider.round_trip(0.02)  # 0.09: within budget, every token asks again
    assert all(not decider.next_policy().local_only for _ in range(5))


def test_latency_aware_stays_local_after_an_unreachable_cloud_until_retry_time():
    clock = Clock()
    decider = ExitDecider(Mode.LATENCY_AWARE, 0.8, LatencyPolicy(retry_after_s=2.0), clock)
    decider.cloud_unreachable()
    assert decider.next_policy() == ExitPolicy(0.8, local_only=True)
    clock.now += 1.9
    assert decider.next_policy().local_only
    clock.now += 0.2
    assert decider.next_policy() == ExitPolicy(0.8, local_only=False)


# -- pieces against an in-process cloud --------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt")
    save_tiny("llama", ckpt)
    plan = PartitionPlan(ckpt, SPLIT, EXITS, threshold=1.0, codec="fp32")
    return EdgePartition(TorchRunner(load_model(ckpt, range(0, SPLIT))), plan), ckpt


def _cloud(ckpt, limits: Limits | None = None) -> LocalCloud:
    return LocalCloud(load_model(ckpt, range(SPLIT, LAYERS)), limits)


class Recording:
    """Passes requests to a real cloud and keeps them, in order."""

    def __init__(self, cloud: LocalCloud) -> None:
        self.cloud, self.sent = cloud, []

    def send(self, req: CloudRequest) -> CloudReply:
        self.sent.append(req)
        return self.cloud.send(req)


def _rows(edge, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, edge.hidden_size, generator=torch.Generator().manual_seed(seed))  # [n, D]


def test_context_sync_sends_in_chunks_and_resyncs_a_restarted_cloud(tiny):
    edge, ckpt = tiny
    link = Recording(_cloud(ckpt))
    stats = SessionStats()
    sync = ContextSync(link, CloudSequence(9, SPLIT, "fp32", edge.hidden_size, max_block_rows=8), stats)
    sync.append(_rows(edge, 22))
    first = sync.request_token()
    assert [(r.start_pos, r.num_rows, r.start, r.want_token) for r in link.sent] == [
        (0, 8, True, False), (8, 8, False, False), (16, 6, False, True)]
    sync.append(_rows(edge, 3, seed=1))
    link.cloud = _cloud(ckpt)  # a restarted cloud holds no sequences: the request is answered "needs START"
    link.sent.clear()
    again = sync.request_token()
    assert stats.resyncs == 1 and sync.sent == 25
    assert [(r.start_pos, r.num_rows, r.start) for r in link.sent] == [
        (22, 3, False), (0, 8, True), (8, 8, False), (16, 8, False), (24, 1, False)]
    fresh = ContextSync(_cloud(ckpt), CloudSequence(9, SPLIT, "fp32", edge.hidden_size), SessionStats())
    fresh.append(sync.log.rows(0, 22))
    assert fresh.request_token().token_id == first.token_id
    fresh.append(sync.log.rows(22, 25))
    assert fresh.request_token().token_id == again.token_id  # the re-synced context is the same context


def test_a_background_upload_failure_is_raised_by_the_next_request(tiny):
    """The rows of a refused background upload stay unsent and its error is not lost: the next
    request raises it, even when that request itself would now be accepted; END still goes out."""
    edge, ckpt = tiny
    cloud, clock = _cloud(ckpt, Limits(max_requests_per_s=1)), Clock()
    cloud.context.clock = clock  # the rate limiter's clock: one request per second, none refilled yet
    sync = ContextSync(cloud, CloudSequence(3, SPLIT, "fp32", edge.hidden_size), SessionStats(), background=True)
    sync.append(_rows(edge, 6))
    sync.request_token()  # START: the bucket's one request
    sync.append(_rows(edge, 1, seed=1))
    sync.upload_soon()  # refused in the background: "rate limit"
    assert sync.wait_uploads() and sync.sent == 6
    clock.now += 10  # the cloud would take a request now
    with pytest.raises(ProtocolError, match="rate limit"):
        sync.request_token()
    assert sync.sent == 6 and cloud.context.sessions[3].next_position == 6  # nothing half-applied
    with pytest.raises(ProtocolError, match="rate limit"):
        sync.close()
    assert 3 not in cloud.context.sessions  # END carried the unsent row and freed the sequence


def test_end_failing_too_never_replaces_the_error_that_ended_the_generation(tiny):
    edge, ckpt = tiny
    cloud = _cloud(ckpt, Limits(max_context=len(PROMPT) + 3))
    session = DecodingSession(edge, cloud, "collaborative", threshold=1.0, sequence_id=5)
    with pytest.raises(ProtocolError, match="exceeds the limit of 9") as failed:
        session.generate(PROMPT, 8)  # the 5th token request would hold 10 positions
    notes = getattr(failed.value, "__notes__", [])
    assert len(notes) == 1 and notes[0].startswith("ending the cloud sequence failed too: ProtocolError")


def test_a_step_computed_ahead_is_rewound_under_another_policy(tiny):
    edge, ckpt = tiny
    seq, stats = edge.new_sequence(), SessionStats()
    step = edge.step(seq, PROMPT, 0, ExitPolicy(1.0), Greedy())  # no exit: the token goes to the cloud
    lengths = {layer: seq.length(layer) for layer in range(SPLIT)}
    sync = ContextSync(_cloud(ckpt), CloudSequence(4, SPLIT, "fp32", edge.hidden_size), stats)
    sync.append(step.split_rows.hidden)
    ahead = Lookahead(edge, seq, Greedy(), stats)
    ahead.while_waiting(sync.request_token, step, len(PROMPT), ExitPolicy(0.0))  # computed ahead at threshold 0
    guess = step.last_exit.token
    assert stats.speculated == 1 and seq.length(0) == len(PROMPT) + 1
    assert ahead.take([guess], len(PROMPT), ExitPolicy(1.0)) is None  # same token and position, other policy
    assert {layer: seq.length(layer) for layer in range(SPLIT)} == lengths and not seq.pending
    assert stats.speculation_hits == 0
    ahead.close()


def test_threshold_changes_between_tokens_give_the_tokens_of_no_lookahead(tiny):
    """A token computed ahead at one threshold must not be emitted at another (exits and tokens
    equal a session that never computes ahead)."""
    edge, ckpt = tiny
    runs = {}
    for speculate in (False, True):
        session = DecodingSession(edge, _cloud(ckpt), "collaborative", threshold=1.0, sequence_id=40 + speculate,
                                  speculate=speculate)
        block, pos, records = list(PROMPT), 0, []
        for i in range(24):
            session.decider.threshold = 1.0 if i % 2 == 0 else 0.0  # cloud, then the first exit, in turn
            records.append(session.step(block, pos))
            pos, block = pos + len(block), [records[-1].token_id]
        session.close()
        runs[speculate] = records, session.stats
    (plain, _), (ahead, stats) = runs[False], runs[True]
    assert [(r.token_id, r.exit) for r in ahead] == [(r.token_id, r.exit) for r in plain]
    assert {r.exit for r in ahead[1::2]} == {"edge:1"} and {r.exit for r in ahead[::2]} == {"cloud"}
    assert stats.speculated == 12 and stats.speculation_hits == 0  # every guess was made at 1.0, used at 0.0


def test_a_context_over_the_clouds_limit_is_refused_at_its_first_block(tiny):
    """A prompt longer than max_context goes in several blocks; its START announces the whole context
    (CONTEXT_ROWS), so the cloud refuses it before the edge uploads the rest."""
    edge, ckpt = tiny
    cloud = LocalCloud(load_model(ckpt, range(SPLIT, LAYERS)), Limits(max_context=8, max_block_rows=4))
    link = Recording(cloud)
    sync = ContextSync(link, CloudSequence(1, SPLIT, "fp32", edge.hidden_size, max_block_rows=4), SessionStats())
    sync.append(_rows(edge, 12))
    with pytest.raises(ProtocolError) as refused:
        sync.request_token()
    assert refused.value.code.name == "LIMIT_EXCEEDED" and "12 positions" in str(refused.value)
    assert [r.num_rows for r in link.sent] == [4] and cloud.context.sessions == {}


def test_a_request_answered_slot_expired_resumes_without_a_resync(tiny):
    """The edge sends the request again with START; both halves keep their state, so the tokens are those of an
    undisturbed run and no context is re-sent."""
    edge, ckpt = tiny

    class SlotExpiresOnce(Recording):
        def send(self, req: CloudRequest) -> CloudReply:
            if len(self.sent) == 3 and not req.start:
                self.sent.append(req)
                raise SequenceNeedsStart("must specify the START flag", code=ErrorCode.SLOT_EXPIRED)
            return super().send(req)

    reference = DecodingSession(edge, _cloud(ckpt), "collaborative", sequence_id=1).generate(PROMPT, 8).token_ids
    link = SlotExpiresOnce(_cloud(ckpt))
    session = DecodingSession(edge, link, "collaborative", threshold=1.0, sequence_id=1)
    assert session.generate(PROMPT, 8).token_ids == reference
    assert (session.stats.resumes, session.stats.resyncs) == (1, 0)
    resumed = link.sent[4]
    assert resumed.start and resumed.start_pos == link.sent[3].start_pos > 0
