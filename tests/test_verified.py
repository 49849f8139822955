"""Verified mode: the edge's exits draft, the full model checks, and the output is cloud-only's token for token.

Unit tests first (no server): the accept rule, speculative sampling's distribution, the draft-length rule,
the cloud's state after accepts and rejections against a fresh run, and every refusal of a bad rollback or
bad drafts by the context manager and the cloud partition. Then one tritonserver for the module serving
five checkpoints side by side (the demo model, tiny Llama, GPT-2 and Qwen2, and a tiny Llama whose layers
after the split add nothing, so its last exit guesses every token of the full model): verified output
against cloud-only with draft lengths 1..8, drafts all accepted and all rejected, refusals through the
ensemble, live exit fidelity and its metrics, and the link cut in the latency-aware flavour. The server
restart in the middle of a verification has its own small server. Cloud-only's tokens come from the
in-process reference (`LocalCloud` over the whole model: the code the `cloud_only` model serves, checked
against it in test_triton_cloud.py).
"""
from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from bench.link_emulator import LinkEmulator
from bench.perf_inputs import input_data, record_sessions
from edge_runtime.cloud_only import CloudOnlySession
from edge_runtime.policy import LatencyPolicy
from edge_runtime.reconnect import ReconnectingLink
from edge_runtime.torch_runner import TorchRunner
from edge_runtime.parts import SessionOptions
from edge_runtime.session import session_for
from edge_runtime.triton_link import TritonLink
from edge_runtime.verified import accept, DraftLength, lookup, PassCost
from plugin.model.checkpoint import load_model
from plugin.model.rows import PositionError
from plugin.model.sampling import Greedy, TopP
from plugin.paths import DEMO_PLAN, MODEL_REPOSITORY
from plugin.protocol.codec import encode
from plugin.protocol.errors import error_code, ErrorCode, ProtocolError, SequenceNeedsStart
from plugin.protocol.messages import CloudReply, CloudRequest, Drafts, PendingBlock, RowVerdict
from plugin.protocol.tensors import CLOUD_PARTITION, CONTEXT_MANAGER, ENSEMBLE, OUTPUTS
from plugin.protocol.wire import request_inputs
from plugin.serving.repository import render_configs, ServeOptions, write_repository
from plugin.split.edge import EdgePartition, ExitOutput, ExitPolicy, SegmentOutput
from plugin.split.limits import Limits
from plugin.split.local import LocalCloud
from plugin.split.plan import PartitionPlan
from tests.test_reliability import stream_across_a_cut
from tests.tiny_models import LAYERS, save_tiny

SPLIT, EXITS = 4, (1, 3, 4)
PROMPTS = [[5, 17, 33, 2, 71, 8], [90, 4, 4, 12, 61, 8, 30, 55, 1]]
LIMITS = Limits(max_sessions=64, max_context=256, max_block_rows=64)
# gemma3: local (sliding-window) layers on both sides of the split; identity: a llama whose layers from the split
# on add nothing
TINY = ("llama", "gpt2", "qwen2", "gemma3", "identity")
SEQUENCE_IDS = itertools.count(1000)  # every generation on the shared server under its own id
KEY = 0x7E21F1ED  # the SESSION_KEY of the raw requests below


class ShiftedExits:
    """A segment runner whose exit heads guess the token after their argmax (logits rolled by one): on the
    identity-tail checkpoint, where the last exit's argmax is the full model's token, every guess is wrong."""

    def __init__(self, runner: TorchRunner):
        self.runner = runner
        self.hidden_size, self.num_layers, self.layers = runner.hidden_size, runner.num_layers, runner.layers

    def new_sequence(self):
        return self.runner.new_sequence()

    def run(self, first_layer, last_layer, x, start_pos, state, exit_layer) -> SegmentOutput:
        out = self.runner.run(first_layer, last_layer, x, start_pos, state, exit_layer)
        if out.exit is None:
            return out
        logits = np.roll(out.exit.logits, 1)
        return SegmentOutput(out.hidden, ExitOutput(logits, out.exit.confidence, int(logits.argmax())))

    def exit_logits(self, hidden_row, layer):
        return np.roll(self.runner.exit_logits(hidden_row, layer), 1)


def _tiny_checkpoint(kind: str, path: Path) -> Path:
    if kind == "identity":
        save_tiny("llama", path, seed=1, identity_from=SPLIT)
    else:
        save_tiny(kind, path)
    return path


def _edge(plan: PartitionPlan, shifted: bool = False) -> EdgePartition:
    runner = TorchRunner(load_model(plan.checkpoint, range(0, plan.split_layer)))
    return EdgePartition(ShiftedExits(runner) if shifted else runner, plan)


def _cloud_only_tokens(checkpoint: Path, prompt: list[int], n: int) -> list[int]:
    return CloudOnlySession(LocalCloud(load_model(checkpoint)), sequence_id=1).generate(prompt, n).token_ids


def _verified(edge, link, sid, prompt, n, gamma=None, threshold=None, codec="fp32", lookup_below=0.0):
    lengths = DraftLength() if gamma is None else DraftLength.fixed(gamma)
    options = SessionOptions(threshold=threshold, codec=codec, sequence_id=sid, draft_length=lengths,
                             lookup_below=lookup_below)
    return session_for("verified", edge, link, options).generate(prompt, n)


# -- unit: the accept rule, sampling, gamma ----------------------------------------------------------------
def _rows(*tokens: int) -> list[RowVerdict]:
    return [RowVerdict([t, (t + 1) % 50], [-0.1, -2.5]) for t in tokens]


def test_lookup_continues_the_latest_earlier_occurrence_of_the_last_tokens():
    assert lookup([1, 2, 3, 1, 2, 4, 1, 2]) == 4  # the latest of two earlier occurrences
    assert lookup([5, 5, 5]) == 5 and lookup([1, 2, 3, 2]) is None and lookup([7]) is None and lookup([]) is None
    assert lookup([1, 2, 3, 2], n=1) == 3


def test_accept_keeps_drafts_while_the_full_model_agrees_then_takes_its_token():
    greedy = Greedy()
    assert accept([3, 4, 5], _rows(3, 4, 5), greedy) == [3, 4, 5]  # all kept: the last is the cloud's own guess
    assert accept([3, 4, 5], _rows(7, 4, 5), greedy) == [7]  # the first rejected: the correction alone
    assert accept([3, 4, 5], _rows(3, 9, 5), greedy) == [3, 9]
    assert accept([3], _rows(3), greedy) == [3]
    with pytest.raises(ValueError):
        accept([3, 4], _rows(3), greedy)  # one verdict per draft, never fewer


def test_speculative_sampling_gives_the_distribution_cloud_only_samples():
    """TopP.verify with a one-hot draft gives each token with the probability pick_from gives it, for a draft
    inside the nucleus, outside it, and outside the cloud's top-k."""
    ids, logprobs = [5, 3, 9, 1, 7], torch.log_softmax(torch.tensor([2.0, 1.5, 0.3, -1.0, -3.0]), 0).tolist()
    sampler = TopP(temperature=0.8, top_p=0.9, seed=3)
    kept, probs = sampler._nucleus(np.array(ids), np.array(logprobs, np.float32))
    expected = {int(i): float(p) for i, p in zip(kept, probs) if p > 0}
    n = 3000  # 4 standard deviations: about 0.035 at p = 0.5; keeping every draft would be off by 0.4
    for draft in (5, 1, 42):
        counts = Counter(sampler.verify(draft, ids, logprobs) for _ in range(n))
        assert set(counts) <= set(expected)
        for token, p in expected.items():
            assert abs(counts[token] / n - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-3, (draft, token, counts)


def _lengths(acceptance: float, pass_s: Callable[[int], float], link_s: float = 0.02, step_s: float = 0.001,
             lengths: DraftLength | None = None) -> DraftLength:
    """`lengths` (default: DraftLength()) after drafts kept at `acceptance`, an edge step of step_s, and replies
    of 1 to 9 rows whose passes took pass_s(rows) over a link of link_s."""
    lengths = lengths or DraftLength()
    lengths.kept, lengths.rejected = 1e4 * acceptance, 1e4 * (1 - acceptance)
    for rows in range(1, 10):
        lengths.time_reply(link_s + pass_s(rows), rows, pass_s(rows))
    lengths.time_step(step_s)
    return lengths


def _flat(rows: int) -> float:
    return 0.03  # a memory-bound pass: the rows are nearly free


def _per_row(rows: int) -> float:
    return 0.01 * rows  # a pass that costs in proportion to its rows


def _compute_per_token(lengths: DraftLength, gamma: int) -> float:
    return lengths.cost(gamma + 1) / sum(lengths.acceptance ** i for i in range(gamma + 1))


def test_pass_cost_fits_the_replies_and_is_flat_until_two_row_counts_are_seen():
    cost = PassCost()
    assert cost(1) == cost(9) == 0.0  # before any reply
    cost.observe(4, 0.05)
    cost.observe(4, 0.07)
    assert cost.slope == 0.0 and cost(1) == cost(9) == pytest.approx(0.06, rel=0.05)
    cost = PassCost()
    for rows in (1, 3, 8, 2):
        cost.observe(rows, 0.01 + 0.002 * rows)
    assert cost.slope == pytest.approx(0.002) and cost(5) == pytest.approx(0.02)


def test_gamma_grows_with_acceptance_up_to_max_gamma_when_rows_are_nearly_free():
    """The rows rule this replaced (at most 1.3 cloud rows per token) allowed one draft at a = 0.5."""
    gammas = [_lengths(a, _flat).choose(100) for a in (0.3, 0.5, 0.7, 0.9, 0.99)]
    assert gammas == sorted(gammas) and gammas[1] > 1 and gammas[-1] == DraftLength().max_gamma


def test_a_cost_per_row_holds_gamma_to_the_compute_budget():
    """Never more cloud compute per token than checking one row per request: with a pass that costs in proportion
    to its rows, no draft pays for its row; with a small cost per row beside a long link, the budget caps gamma
    where time alone would not."""
    assert _lengths(0.95, _per_row).choose(100) == 0
    # 0.5 ms a pass + 2 ms a row, small beside a 50 ms link: time alone would take the most drafts
    steep = _lengths(0.9, lambda rows: 0.0005 + 0.002 * rows, link_s=0.05)
    gamma = steep.choose(100)
    assert 0 < gamma < steep.max_gamma
    assert _compute_per_token(steep, gamma) <= steep.cost(1) < _compute_per_token(steep, gamma + 1)


def test_a_slow_edge_step_means_fewer_drafts():
    """After a failed guess the edge drafts gamma + 1 steps before the next request can leave."""
    slow = _lengths(0.95, _flat, link_s=0.001, step_s=0.05)
    fast = _lengths(0.95, _flat, link_s=0.05, step_s=0.0005)
    assert slow.choose(100) < fast.choose(100) == fast.max_gamma


def test_drafted_guesses_count_at_their_sources_chance():
    """A request grows past confident guesses and stops short after an unsure one: each guess already drafted counts
    at the record of its source (exit and confidence bin), not at the average acceptance."""
    lengths = _lengths(0.8, _flat, link_s=0.05, step_s=0.01)
    sure, unsure = (17, 7), (17, 1)
    for _ in range(50):
        lengths.observe([sure, sure, unsure], rejected=True)  # sure guesses kept, the unsure one rejected
    assert lengths.chance(sure) > 0.95 and lengths.chance(unsure) < 0.05
    assert lengths.chance((17, 3)) == pytest.approx(lengths.acceptance)  # no record yet: the average
    blind = lengths.choose(100)
    assert lengths.choose(100, [sure] * 4) > blind > lengths.choose(100, [unsure]) == 0
    assert lengths.choose(100, [sure, sure, unsure]) == 2  # one unsure guess ends the request


def test_fixed_gamma_and_the_tokens_still_wanted_are_honoured():
    assert _lengths(0.9, _per_row, lengths=DraftLength.fixed(5)).choose(100) == 5  # over the budget: fixed wins
    assert DraftLength.fixed(5).choose(3) == 2
    high = _lengths(0.99, _flat)
    assert high.choose(3) == 2 and high.choose(1) == 0  # never more drafts than tokens still wanted
    assert DraftLength(max_gamma=3).choose(100) <= 3
    with pytest.raises(ValueError, match="gamma"):
        DraftLength.fixed(-1)


def test_before_any_reply_the_request_carries_the_prompts_guess_and_the_edge_drafts_ahead_to_max_gamma():
    """Nothing is known of the link or the pass yet: the first token comes a round trip after the prompt."""
    first = DraftLength()
    first.time_step(0.001)
    assert first.choose(100) == 0 and first.ahead(100) == first.max_gamma + 1 and first.ahead(3) == 3
    assert DraftLength.fixed(4).choose(100) == 4 and DraftLength.fixed(4).choose(2) == 1
    first.time_reply(0.05, 1, 0.03)  # one reply: a 20 ms link beside a 1 ms edge step, acceptance prior 0.8
    assert first.choose(100) > 1 and first.ahead(100) == first.choose(100) + 1
    blind = DraftLength()
    blind.time_reply(0.05, 3, 0.0)  # a server that does not time its pass: the round trip is all link
    blind.time_reply(0.05, 3, float("nan"))
    assert blind.cost.weight == 0 and blind.link_s == pytest.approx(0.05)
    blind.time_reply(0.05, 3, 0.2)  # a pass longer than its round trip is taken as the round trip
    assert blind.cost(3) == pytest.approx(0.05) and blind.link_s < 0.05


def test_each_session_learns_its_own_pass_cost():
    template = DraftLength()
    copy = replace(template)
    copy.time_reply(0.05, 3, 0.01)
    assert copy.cost.weight == 1 and template.cost.weight == 0


# -- unit: the cloud's state against a fresh run -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("verified-ckpts")
    return {kind: _tiny_checkpoint(kind, root / kind) for kind in TINY}


class KeepAtEnd:
    """Passes requests to an in-process cloud, but END goes without its END flag: the state stays to inspect."""

    def __init__(self, cloud: LocalCloud):
        self.cloud = cloud

    def send(self, req: CloudRequest) -> CloudReply:
        req.end = False
        return self.cloud.send(req)


@pytest.mark.parametrize("kind, threshold, gamma, shifted", [
    ("llama", 0.3, 3, False),  # early exits carried to the split, mixed accepts and rejects
    ("gpt2", 1.0, 6, False),
    ("gemma3", 1.0, 8, False),  # rollbacks past what a sliding window would have let the layers forget
    ("identity", 1.0, 4, True),  # every draft rejected: a rollback after every request
])
def test_cloud_and_edge_state_after_accepts_and_rejects_equal_a_fresh_run(tiny, kind, threshold, gamma, shifted):
    plan = PartitionPlan(tiny[kind], SPLIT, EXITS, threshold=threshold, codec="fp32")
    edge = _edge(plan, shifted)
    cloud = LocalCloud(load_model(plan.checkpoint, range(SPLIT, LAYERS)), LIMITS)
    session = session_for("verified", edge, KeepAtEnd(cloud),  # lookup drafts too, but where every guess must fail
                          SessionOptions(sequence_id=21, draft_length=DraftLength.fixed(gamma),
                                         lookup_below=0.0 if shifted else 1.0))
    out = session.generate(PROMPTS[1], 30)
    assert out.token_ids == _cloud_only_tokens(plan.checkpoint, PROMPTS[1], 30)
    stats = session.stats
    assert stats.drafts_accepted < stats.drafts_sent and (stats.drafts_accepted > 0) != shifted
    accepted = PROMPTS[1] + out.token_ids
    # the edge's rows of every accepted position, from a fresh edge that never drafted
    fresh_edge = _edge(plan)
    fresh_rows = fresh_edge.step(fresh_edge.new_sequence(), accepted[:-1], 0, ExitPolicy(1.0), Greedy()).split_rows
    assert session.sync.log.length == len(accepted) - 1 == session.sync.sent
    torch.testing.assert_close(session.sync.log.rows(0, len(accepted) - 1), fresh_rows.hidden, rtol=1e-5, atol=1e-5)
    # the cloud after every accept and rollback: what a fresh cloud computes from those rows in one request
    fresh = LocalCloud(load_model(plan.checkpoint, range(SPLIT, LAYERS)), LIMITS)
    fresh.send(CloudRequest(22, 0, True, rows=encode(fresh_rows.hidden, "fp32"), split_layer=SPLIT, start=True,
                            session_key=KEY))
    mine, ref = cloud.partition.sequences[21].kv, fresh.partition.sequences[22].kv
    for layer in range(SPLIT, LAYERS):
        a, b = mine.layers[layer], ref.layers[layer]
        assert a.length == b.length == len(accepted) - 1
        held = max(a.start, b.start)  # a sliding-window layer holds only the last positions: compare those
        torch.testing.assert_close(a.keys[:, held - a.start:], b.keys[:, held - b.start:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.values[:, held - a.start:], b.values[:, held - b.start:], rtol=1e-5, atol=1e-5)
    context = cloud.context.sessions[21]
    assert (context.next_position, context.context.pending_rows) == (fresh.context.sessions[22].next_position, 0)


# -- unit: refusals leave both halves as they were -------------------------------------------------------------
def _send(link, pos: int, n: int, want: bool = False, start: bool = False, sid: int = 5,
          drafts: Drafts | None = None, rollback: int | None = None, end: bool = False) -> CloudReply:
    """One raw request (to a LocalCloud or through the ensemble) with rows that depend only on (pos, n)."""
    rows = encode(torch.randn(n, 64, generator=torch.Generator().manual_seed(pos * 7 + n)), "fp32")
    return link.send(CloudRequest(sid, pos, want, rows=rows, split_layer=SPLIT if start else None, start=start,
                                  drafts=drafts, rollback_to=rollback, end=end, session_key=KEY))


def _state(cloud: LocalCloud, sid: int = 5) -> tuple:
    s, q = cloud.context.sessions[sid], cloud.partition.sequences[sid]
    return (s.next_position, s.context.first_pending, s.context.rollback_window, q.kv.length(SPLIT), q.rollback_window,
            q.kv.layers[SPLIT].keys.clone())


def _with_drafts(n: int, exit_layer: int = SPLIT) -> Drafts:
    return Drafts.of([(i + 1, exit_layer) for i in range(n)])


BAD = [  # (request after 6 rows with 3 drafts: rollback window [4, 6]), code, words
    (dict(pos=3, n=1, want=True, rollback=3), ErrorCode.ROLLBACK_REFUSED, "stale or out of range"),
    (dict(pos=7, n=1, want=True, rollback=7), ErrorCode.ROLLBACK_REFUSED, "stale or out of range"),
    (dict(pos=5, n=1, want=True, rollback=4), ErrorCode.ROLLBACK_REFUSED, "START_POS"),
    (dict(pos=0, n=1, want=True, rollback=4, start=True), ErrorCode.ROLLBACK_REFUSED, "START"),
    (dict(pos=4, n=1, want=True), ErrorCode.POSITION_OVERLAP, "overlap"),  # an accidental overlap stays an error
    (dict(pos=4, n=2, want=False, rollback=4, drafts=_with_drafts(1)), ErrorCode.MALFORMED, "WANT_TOKEN"),
    (dict(pos=4, n=2, want=True, rollback=4, drafts=_with_drafts(3)), ErrorCode.MALFORMED, "computes 2 rows"),
    (dict(pos=4, n=2, want=True, rollback=4, drafts=_with_drafts(1, exit_layer=SPLIT + 1)), ErrorCode.MALFORMED,
     "DRAFT_EXITS"),
    (dict(pos=4, n=2, want=True, rollback=4, drafts=Drafts.of([(96, SPLIT)])), ErrorCode.MALFORMED, "DRAFT_TOKENS"),
]


@pytest.mark.parametrize("bad, code, words", BAD, ids=[w for _, _, w in BAD])
def test_bad_rollbacks_and_drafts_are_refused_and_change_nothing(tiny, bad, code, words):
    cloud = LocalCloud(load_model(tiny["llama"], range(SPLIT, LAYERS)), LIMITS)
    first = _send(cloud, 0, 6, want=True, start=True, drafts=_with_drafts(3))
    assert len(first.rows) == 3 and first.rows[-1].ids == first.topk_ids  # the last drafted row is the last row
    before = _state(cloud)
    with pytest.raises(ProtocolError, match=words) as refused:
        _send(cloud, **bad)
    assert refused.value.code is code
    after = _state(cloud)
    assert after[:5] == before[:5] and torch.equal(after[5], before[5])
    # the valid rollback still applies, and gives what a session that never saw the refusal gets
    reply = _send(cloud, 5, 2, want=True, rollback=5, drafts=_with_drafts(2))
    clean = LocalCloud(load_model(tiny["llama"], range(SPLIT, LAYERS)), LIMITS)
    _send(clean, 0, 6, want=True, start=True, drafts=_with_drafts(3))
    assert reply == _send(clean, 5, 2, want=True, rollback=5, drafts=_with_drafts(2))
    assert _state(cloud)[3] == 7


def test_a_rollback_is_stale_after_any_later_request(tiny):
    cloud = LocalCloud(load_model(tiny["llama"], range(SPLIT, LAYERS)), LIMITS)
    _send(cloud, 0, 6, want=True, start=True, drafts=_with_drafts(3))
    _send(cloud, 5, 1, want=True, rollback=5, drafts=_with_drafts(1))  # applied: the window is now [6, 6]
    for stale in (5, 4):  # the last request sent again (5) finds its window closed too
        with pytest.raises(ProtocolError, match="stale") as refused:
            _send(cloud, stale, 1, want=True, rollback=stale)
        assert refused.value.code is ErrorCode.ROLLBACK_REFUSED
    _send(cloud, 6, 1)  # an upload closes the window
    with pytest.raises(ProtocolError, match="none"):
        _send(cloud, 6, 1, want=True, rollback=6)
    assert _send(cloud, 7, 1, want=True).catchup_rows == 2  # the upload and this row: nothing lost


def test_the_cloud_partition_refuses_a_rollback_it_cannot_apply_and_asks_for_start(tiny):
    """The partition re-checks its own KV; when the two halves disagree it drops the sequence (needs START)
    rather than half-apply the rollback."""
    cloud = LocalCloud(load_model(tiny["llama"], range(SPLIT, LAYERS)), LIMITS)
    _send(cloud, 0, 6, want=True, start=True, drafts=_with_drafts(3))
    hidden = torch.zeros(1, 64)
    for bad in (3, 7):
        block = PendingBlock(5, SPLIT, bad, hidden, True, rollback_to=bad, session_key=KEY)
        assert 5 in cloud.partition.sequences
        [refused] = cloud.partition.step([block])
        assert isinstance(refused, SequenceNeedsStart) and 5 not in cloud.partition.sequences
        _send(cloud, 0, 6, want=True, start=True, drafts=_with_drafts(3))  # the edge's re-sync
    edge = _edge(PartitionPlan(tiny["llama"], SPLIT, EXITS))
    with pytest.raises(PositionError):  # and the edge side: a rewind past what a layer holds
        edge.rewind_to(edge.new_sequence(), 3)


def test_perf_analyzer_streams_of_verified_sessions_line_up(tiny):
    """Each step starts where the cloud's context ends, after its ROLLBACK_TO when it carries one; every token
    request names its drafts."""
    plan = PartitionPlan(tiny["llama"], SPLIT, EXITS, threshold=1.0, codec="fp16")
    data = input_data(record_sessions(plan, PROMPTS, 12, verified=True), SPLIT)["data"]
    one = lambda step, name, dtype: int(np.frombuffer(base64.b64decode(step[name]["b64"]), dtype)[0])  # noqa: E731
    rollbacks = 0
    for stream in data:
        held = 0
        for step in stream:
            if "ROLLBACK_TO" in step:
                held, rollbacks = one(step, "ROLLBACK_TO", "<i8"), rollbacks + 1
            assert one(step, "START_POS", "<i8") == held
            held += step["HIDDEN_FP16"]["shape"][0]
            assert step["DRAFT_TOKENS"]["shape"] == step["DRAFT_EXITS"]["shape"]
            assert 1 <= step["DRAFT_TOKENS"]["shape"][0] <= step["HIDDEN_FP16"]["shape"][0]
    assert rollbacks > 0


# -- one server, five checkpoints ------------------------------------------------------------------------------
def _named(text: str, names: dict[str, str]) -> str:
    """A generated config with its models renamed (`name: "..."` and the ensemble's `model_name: "..."`)."""
    for old, new in names.items():
        text = re.sub(rf'\b(name|model_name): "{old}"', rf'\1: "{new}"', text)
    return text


def _write(repo: Path, name: str, text: str, source: str | None) -> None:
    (repo / name / "1").mkdir(parents=True, exist_ok=True)
    (repo / name / "config.pbtxt").write_text(text)
    if source is not None:
        shutil.copyfile(MODEL_REPOSITORY / source / "1" / "model.py", repo / name / "1" / "model.py")


def _multi_repository(repo: Path, demo: PartitionPlan, tiny_plans: dict[str, PartitionPlan]) -> None:
    """The demo model under the usual names (no cloud_only), and per tiny checkpoint an ensemble
    ce_collm_<kind> and a cloud_partition_<kind>, all tiny ones sharing one context manager (same hidden size,
    depth, vocabulary and split)."""
    opts = ServeOptions(limits=LIMITS)
    texts = render_configs(demo, repo, opts)
    for name in (ENSEMBLE, CONTEXT_MANAGER, CLOUD_PARTITION):
        _write(repo, name, texts[name], None if name == ENSEMBLE else name)
    for i, (kind, plan) in enumerate(tiny_plans.items()):
        texts = render_configs(plan, repo, opts)
        names = {ENSEMBLE: f"{ENSEMBLE}_{kind}", CLOUD_PARTITION: f"{CLOUD_PARTITION}_{kind}",
                 CONTEXT_MANAGER: f"{CONTEXT_MANAGER}_tiny"}
        _write(repo, names[ENSEMBLE], _named(texts[ENSEMBLE], names), None)
        _write(repo, names[CLOUD_PARTITION], _named(texts[CLOUD_PARTITION], names), CLOUD_PARTITION)
        if i == 0:
            _write(repo, names[CONTEXT_MANAGER], _named(texts[CONTEXT_MANAGER], names), CONTEXT_MANAGER)


@pytest.fixture(scope="module")
def served(tmp_path_factory, start_server, tiny):
    plans = {kind: PartitionPlan(path, SPLIT, EXITS, threshold=1.0, codec="fp32") for kind, path in tiny.items()}
    demo = PartitionPlan.load(DEMO_PLAN)
    repo = tmp_path_factory.mktemp("verified-repo")
    _multi_repository(repo, demo, plans)
    t0 = time.perf_counter()
    server = start_server(repo, timeout_s=300)
    print(f"\nverified: server with 5 checkpoints ready in {time.perf_counter() - t0:.1f} s")
    return server, demo, plans


def _link(server, kind: str | None) -> TritonLink:
    return TritonLink(server.grpc_url, ENSEMBLE if kind is None else f"{ENSEMBLE}_{kind}")


@pytest.mark.server
@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2", "gemma3"])
def test_verified_equals_cloud_only_through_triton_on_tiny_checkpoints(served, kind):
    server, _, plans = served
    plan, link = plans[kind], _link(server, kind)
    # drafts from the last exit with every draft length, then from early exits too (carried to the split), fp16
    for prompt, threshold, codec, gammas in ((PROMPTS[1], 1.0, "fp32", [*range(1, 9), None]),
                                             (PROMPTS[0], 0.3, "fp16", [3, None])):
        edge = _edge(PartitionPlan(plan.checkpoint, SPLIT, EXITS, threshold, codec))
        reference = _cloud_only_tokens(plan.checkpoint, prompt, 16)
        for gamma in gammas:
            out = _verified(edge, link, next(SEQUENCE_IDS), prompt, 16, gamma, codec=codec)
            assert out.token_ids == reference, (kind, threshold, gamma)
            assert not any(r.unverified for r in out.records) and out.stats.drafts_sent > 0
    # every guess looked up where the sequence has one (the prompt ends on a bigram it holds): DRAFT_EXITS 0
    prompt = [5, 17, 33, 5, 17]
    out = _verified(_edge(plan), link, next(SEQUENCE_IDS), prompt, 16, lookup_below=1.0)
    assert out.token_ids == _cloud_only_tokens(plan.checkpoint, prompt, 16)
    assert out.stats.exit_agreement()["edge:lookup"]["checked"] > 0


@pytest.mark.server
def test_verified_equals_cloud_only_through_triton_on_the_demo_model(served):
    server, demo, _ = served
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(demo.checkpoint / "tokenizer.json"))
    texts = [line.replace("\\n", "\n") for line in (demo.checkpoint / "heldout_prompts.txt").read_text().splitlines()
             if line.strip()][:2]
    edge, link = _edge(demo), _link(server, None)
    for text, gammas in zip(texts, ([1, 4, 8, None], [None])):  # every draft length on the tiny checkpoints
        prompt = tokenizer.encode(text).ids
        reference = _cloud_only_tokens(demo.checkpoint, prompt, 24)
        for gamma in gammas:
            out = _verified(edge, link, next(SEQUENCE_IDS), prompt, 24, gamma, codec=demo.codec)
            assert out.token_ids == reference, gamma
            summary = out.stats.verified_summary(24)
            assert out.stats.drafts_sent > 0 and summary["tokens_per_round_trip"] > 1


@pytest.mark.server
def test_drafts_all_accepted_and_all_rejected(served):
    server, _, plans = served
    plan, link = plans["identity"], _link(server, "identity")
    reference = _cloud_only_tokens(plan.checkpoint, PROMPTS[0], 16)
    for shifted in (False, True):
        edge = _edge(plan, shifted)
        for gamma in (1, 3, 8):
            out = _verified(edge, link, next(SEQUENCE_IDS), PROMPTS[0], 16, gamma)
            s = out.stats
            assert out.token_ids == reference, (shifted, gamma)
            if shifted:  # every request: the first guess wrong, a rollback of the rest
                assert s.drafts_accepted == 0 and s.cloud_requests == 16 and all(r.exit == "cloud" for r in out.records)
            else:  # every guess kept: gamma + 1 tokens per request
                assert s.drafts_accepted == s.drafts_sent and s.cloud_requests == -(-16 // (gamma + 1))


@pytest.mark.server
def test_bad_rollbacks_through_the_ensemble_are_refused_by_code(served):
    server, _, plans = served
    link = _link(server, "llama")
    first = _send(link, 0, 6, want=True, start=True, sid=4000, drafts=_with_drafts(3))
    for bad, code, words in BAD:
        with pytest.raises(ProtocolError, match=words) as refused:
            _send(link, sid=4000, **bad)
        assert refused.value.code is code
    client = grpcclient.InferenceServerClient(server.grpc_url)  # a rollback of the wrong dtype: Triton's own refusal
    inputs = request_inputs(CloudRequest(4000, 5, True, rows=encode(torch.zeros(1, 64), "fp32"), session_key=KEY))
    inputs["ROLLBACK_TO"] = np.array([[5]], np.int32)
    tensors = []
    for name, value in inputs.items():
        tensors.append(grpcclient.InferInput(name, list(value.shape), {np.float32: "FP32", np.int64: "INT64",
                                                                       np.bool_: "BOOL", np.int32: "INT32"}[value.dtype.type]))
        tensors[-1].set_data_from_numpy(value)
    with pytest.raises(InferenceServerException) as wrong:
        client.infer(f"{ENSEMBLE}_llama", tensors, outputs=[grpcclient.InferRequestedOutput(n) for n in OUTPUTS],
                     sequence_id=4000)
    assert error_code(wrong.value.message(), wrong.value.status()) is ErrorCode.SERVER
    reply = _send(link, 5, 2, want=True, sid=4000, rollback=5, drafts=_with_drafts(2))
    clean = LocalCloud(load_model(plans["llama"].checkpoint, range(SPLIT, LAYERS)), LIMITS)
    for served_reply, expected in ((first, _send(clean, 0, 6, want=True, start=True, sid=4000, drafts=_with_drafts(3))),
                                   (reply, _send(clean, 5, 2, want=True, sid=4000, rollback=5, drafts=_with_drafts(2)))):
        assert [r.ids for r in served_reply.rows] == [r.ids for r in expected.rows]
        np.testing.assert_allclose([r.logprobs for r in served_reply.rows], [r.logprobs for r in expected.rows],
                                   atol=1e-4)
    _send(link, 7, 0, sid=4000, end=True)


def _metric_series(server, name: str, model: str) -> dict[str, float]:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(rf'^{name}{{exit="(\d+)",model="{model}"}} ([0-9.e+]+)$', text, re.M)}


@pytest.mark.server
def test_exit_fidelity_in_collaborative_mode_is_counted_on_the_edge_and_in_triton(served):
    server, demo, _ = served
    from tokenizers import Tokenizer

    prompt = Tokenizer.from_file(str(demo.checkpoint / "tokenizer.json")).encode("ROMEO:\nI").ids
    before = {name: _metric_series(server, f"ce_collm_{name}_total", CLOUD_PARTITION)
              for name in ("verified_rows", "draft_agreements")}
    session = session_for("collaborative", _edge(demo), _link(server, None),
                          SessionOptions(sequence_id=5000, fidelity=True))
    out = session.generate(prompt, 32)
    assert out.token_ids == _cloud_only_tokens(demo.checkpoint, prompt, 32)  # fidelity changes no token
    checked, agreed = session.stats.drafts_checked, session.stats.drafts_agreed
    last_cloud = max(i for i, r in enumerate(out.records) if r.exit == "cloud")
    edge_tokens = sum(1 for r in out.records[:last_cloud] if r.exit.startswith("edge:"))
    assert sum(checked.values()) == edge_tokens + session.stats.cloud_requests  # each edge token, each guess
    after = {name: _metric_series(server, f"ce_collm_{name}_total", CLOUD_PARTITION)
             for name in ("verified_rows", "draft_agreements")}
    for name, counts in (("verified_rows", checked), ("draft_agreements", agreed)):
        delta = {e: after[name].get(e, 0) - before[name].get(e, 0) for e in after[name]}
        assert {int(e): v for e, v in delta.items() if v} == {e: v for e, v in counts.items() if v}
    rates = session.stats.exit_agreement()
    assert set(rates) <= {f"edge:{e}" for e in demo.exit_layers} and all(0 <= v["rate"] <= 1 for v in rates.values())
    print(f"\nexit fidelity (demo model, 32 tokens, collaborative at {demo.threshold}): {rates}")


@pytest.mark.server
def test_verified_latency_aware_emits_unverified_drafts_while_the_link_is_cut(served):
    """The edge's drafts become the output, marked, while the cloud is unreachable; once it is back the
    unverified tokens' rows reach it and every token it checks again is the full model's choice."""
    server, _, plans = served
    plan = plans["llama"]
    policy = LatencyPolicy(budget_s=30.0, retry_after_s=0.3)
    with LinkEmulator("127.0.0.1", server.grpc_port, delay_ms=5) as em:
        link = ReconnectingLink(TritonLink(em.address, f"{ENSEMBLE}_llama", timeout_s=10), patience_s=0)
        options = SessionOptions(sequence_id=6000, latency=policy, draft_length=DraftLength.fixed(2))
        session = session_for("verified-latency-aware", _edge(plan), link, options)
        before, during, after = stream_across_a_cut(em, session.stream(PROMPTS[0], 40), 8, 6, policy)
    records = before + during + after
    assert len(records) == 40 and not any(r.unverified for r in before)
    assert any(r.unverified and r.fallback for r in during)  # (the first may still be tokens verified before the cut)
    last_unverified = max(i for i, r in enumerate(records) if r.unverified)
    assert last_unverified < len(records) - 1 and not records[-1].unverified
    assert session.stats.unverified >= len(during) and session.stats.fallbacks > 0
    tokens = PROMPTS[0] + [r.token_id for r in records]
    full = load_model(plan.checkpoint)
    with torch.no_grad():
        positions = torch.arange(len(tokens))[None]
        h = full.run_layers(full.embed_tokens(torch.tensor([tokens]), positions), positions, 0, LAYERS,
                            [full.new_sequence(0, LAYERS)])
        choice = full.exit_logits(h[0], LAYERS).argmax(-1)  # [T]: the full model's token after each position
    for i, r in enumerate(records):
        if not r.unverified:
            assert r.token_id == int(choice[len(PROMPTS[0]) - 1 + i]), i
    print(f"\nlink cut (verified-latency-aware): 40 tokens, {session.stats.unverified} unverified, "
          f"{session.stats.resyncs} re-syncs")


@pytest.mark.server
def test_resync_after_a_server_restart_in_the_middle_of_a_verification(tmp_path_factory, start_server, tiny):
    """The server restarts between the edge sending a verification that rolls back rejected drafts and the
    server reading it: the request finds the sequence gone, the edge re-sends its context with START (the
    rollback moot) and the verification completes; the tokens are cloud-only's."""
    plan = PartitionPlan(tiny["llama"], SPLIT, EXITS, threshold=1.0, codec="fp32")
    repo = tmp_path_factory.mktemp("verified-restart-repo")
    write_repository(plan, repo, ServeOptions(limits=LIMITS))
    shutil.rmtree(repo / "cloud_only")
    server = start_server(repo)

    class RestartOnRollback:
        def __init__(self) -> None:
            self.link, self.restarted = TritonLink(server.grpc_url), None

        def send(self, req: CloudRequest) -> CloudReply:
            if req.rollback_to is not None and self.restarted is None:
                server.restart()
                self.restarted = req.rollback_to
            return self.link.send(req)

    link = RestartOnRollback()
    out = _verified(_edge(plan), ReconnectingLink(link, patience_s=60), next(SEQUENCE_IDS), PROMPTS[1], 30, gamma=4)
    assert link.restarted is not None and out.stats.resyncs == 1
    assert out.token_ids == _cloud_only_tokens(plan.checkpoint, PROMPTS[1], 30)


@pytest.mark.server
def test_edge_cli_verified_and_exit_fidelity(served):
    """`ce-collm-edge generate --mode verified --json` (a separate process, as a user runs it) gives cloud-only's
    tokens, its acceptance, tokens per round trip and gamma; --exit-fidelity adds per-exit agreement."""
    server, demo, _ = served
    from tokenizers import Tokenizer

    prompt = "ROMEO:\nBut soft, what light through yonder window breaks?\n"
    reference = _cloud_only_tokens(demo.checkpoint, Tokenizer.from_file(str(demo.checkpoint / "tokenizer.json"))
                                   .encode(prompt).ids, 20)
    runs = {}
    for mode, extra in (("verified", ["--gamma", "2"]), ("collaborative", ["--exit-fidelity"])):
        cmd = [sys.executable, "-m", "edge_runtime.cli", "generate", "--json", "--url", server.grpc_url,
               "--prompt", prompt, "--max-new-tokens", "20", "--mode", mode, *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[(mode, extra[0])] = json.loads(done.stdout)
    for (mode, option), out in runs.items():
        assert out["token_ids"] == reference and out["unverified"] == 0, (mode, option)
        assert out["exit_agreement"] and all(0 <= v["rate"] <= 1 for v in out["exit_agreement"].values())
    fixed = runs[("verified", "--gamma")]["verified"]
    assert fixed["gamma"] <= 2 and 1 < fixed["tokens_per_round_trip"] <= 3 and 0 <= fixed["acceptance_rate"] <= 1
    assert "verified" not in runs[("collaborative", "--exit-fidelity")]
