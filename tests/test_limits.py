"""Limits with clear errors, checked before any state changes; the TTL sweep; the reconnecting link.

No server here: the context manager, the cloud partition and the link wrapper are plain classes.
The same limits reach a client through a real tritonserver in test_fuzz.py.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from edge_runtime.policy import LatencyPolicy
from edge_runtime.session import DecodingSession
from edge_runtime.link import CloudUnreachable
from edge_runtime.reconnect import ReconnectingLink
from edge_runtime.torch_runner import TorchRunner
from plugin.model.checkpoint import load_model
from plugin.protocol.codec import encode
from plugin.protocol.errors import ErrorCode, ProtocolError
from plugin.protocol.messages import CloudRequest, PendingBlock
from plugin.serving.repository import render_configs
from plugin.serving.services import limits_from
from plugin.split.cloud import CloudPartition
from plugin.split.cloud_only import CloudOnly
from plugin.split.context import ContextManager
from plugin.split.edge import EdgePartition
from plugin.split.limits import Limits, RateLimiter
from plugin.split.local import LocalCloud
from plugin.split.plan import PartitionPlan
from tests.tiny_models import LAYERS, save_tiny

D = 16
KEY = 0x5E55_10_4E7  # every session of these tests is bound to this SESSION_KEY


def _req(sid, pos, n, want=False, start=False, end=False, codec="fp16"):
    rows = encode(torch.arange(pos, pos + n, dtype=torch.float32)[:, None].expand(n, D), codec)
    return CloudRequest(sid, pos, want, rows=rows, split_layer=3 if start else None, start=start, end=end,
                        session_key=KEY)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, s):
        self.now += s


def test_token_bucket_allows_a_burst_then_the_rate():
    bucket = RateLimiter(rate=4, now=0.0)
    assert [bucket.allow(0.0) for _ in range(5)] == [True] * 4 + [False]
    assert bucket.allow(0.25) and not bucket.allow(0.25)  # a quarter second refills one
    assert sum(bucket.allow(10.0) for _ in range(10)) == 4  # never more than one second's worth
    assert all(RateLimiter(0, 0.0).allow(0.0) for _ in range(1000))  # 0 turns it off


def test_rate_limit_is_per_session_and_loses_nothing():
    clock = Clock()
    cm = ContextManager(D, 6, Limits(max_requests_per_s=5), clock=clock)
    cm.handle(_req(1, 0, 1, start=True))
    cm.handle(_req(2, 0, 1, start=True))
    for pos in range(1, 5):
        cm.handle(_req(1, pos, 1))
    with pytest.raises(ProtocolError, match=r"rate limit: 5 requests/s per session"):
        cm.handle(_req(1, 5, 1))
    cm.handle(_req(2, 1, 1))  # the other session has its own budget
    with pytest.raises(ProtocolError, match="rate limit"):  # a re-START does not refill the budget
        cm.handle(_req(1, 0, 1, start=True))
    clock.now = 0.2
    block = cm.handle(_req(1, 5, 1, want=True))  # refused requests changed nothing
    assert block.rows.data[:, 0].tolist() == [0, 1, 2, 3, 4, 5]


def test_payload_bytes_limit_is_checked_before_decoding():
    cm = ContextManager(D, 6, Limits(max_request_bytes=1000))
    cm.handle(_req(1, 0, 4, start=True))  # 4 x 16 x 2 = 128 bytes of rows
    with pytest.raises(ProtocolError, match=r"payload of 1041 bytes exceeds the limit of 1000 bytes per request"):
        cm.handle(_req(1, 4, 16, codec="fp32"))  # 1024 bytes of rows + START_POS + WANT_TOKEN + SESSION_KEY
    cm.handle(_req(1, 4, 16, codec="fp16"))  # the same rows in fp16 fit
    assert cm.handle(_req(1, 20, 1, want=True)).rows.data.shape == (21, D)


def test_every_limit_has_a_clear_error():
    cm = ContextManager(D, 6, Limits(max_sessions=1, max_context=8, max_block_rows=4, max_request_bytes=4096,
                                     max_requests_per_s=100))
    cm.handle(_req(1, 0, 4, start=True))
    cases = [
        (_req(2, 0, 1, start=True), r"too many live sessions \(1\)"),
        (_req(1, 4, 5), r"block of 5 rows exceeds the limit of 4 rows per request"),
        (_req(1, 4, 4), None),  # 128 bytes: fine
        (_req(1, 8, 1), r"context of 9 positions exceeds the limit of 8"),
    ]
    for req, message in cases:
        if message is None:
            cm.handle(req)
        else:
            with pytest.raises(ProtocolError, match=message):
                cm.handle(req)


def test_generated_configs_carry_every_limit(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_tiny("llama", ckpt)
    limits = Limits(max_sessions=7, max_context=99, max_block_rows=33, ttl_s=2.5, max_request_bytes=12345,
                    max_requests_per_s=12.5)
    from plugin.serving.repository import ServeOptions
    configs = render_configs(PartitionPlan(ckpt, 4, (1, 4)), tmp_path / "repo", ServeOptions(limits=limits))
    for name in ("context_manager", "cloud_partition", "cloud_only"):
        params = dict(re.findall(r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}', configs[name]))
        assert limits_from(params) == limits, name
    assert "max_sequence_idle_microseconds: 2500000" in configs["context_manager"]


def test_ttl_sweep_runs_without_a_request():
    clock = Clock()
    cm = ContextManager(D, 6, Limits(ttl_s=2), clock=clock)
    cm.handle(_req(1, 0, 3, start=True))
    clock.now = 1.5
    assert cm.expire() == [] and cm.pending_bytes > 0
    clock.now = 2.5
    assert cm.expire() == [1] and cm.pending_bytes == 0 and not cm.sessions


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt")
    save_tiny("llama", ckpt)
    return ckpt


def test_cloud_partition_refuses_non_finite_results_per_session(tiny):
    clock = Clock()
    part = CloudPartition(load_model(tiny, range(4, LAYERS)), Limits(ttl_s=2), clock=clock)
    hidden = part.model.cfg.hidden_size
    good = PendingBlock(1, 4, 0, torch.randn(3, hidden), True, start=True, session_key=1)
    bad = PendingBlock(2, 4, 0, torch.full((3, hidden), float("inf")), True, start=True, session_key=2)
    replies = part.step([good, bad])  # one batch: the bad rows spoil only their own reply
    assert replies[0].token_id >= 0
    assert isinstance(replies[1], ProtocolError) and "not finite" in str(replies[1])
    assert replies[1].code is ErrorCode.NOT_FINITE
    clock.now = 3
    assert sorted(part.expire()) == [1, 2] and part.kv_bytes == 0


def test_one_admission_rule_for_the_context_manager_and_the_cloud_partition(tiny):
    """The context manager refuses, storing nothing, every START the cloud partition would refuse."""
    cloud = LocalCloud(load_model(tiny, range(4, LAYERS)), Limits(max_sessions=1))
    assert cloud.context.admission == cloud.partition.admission
    rows = encode(torch.randn(2, cloud.partition.model.cfg.hidden_size), "fp16")
    for split in (None, 0, 3, LAYERS):  # missing, below the layers the partition holds, past the model
        with pytest.raises(ProtocolError) as err:
            cloud.send(CloudRequest(1, 0, True, rows=rows, split_layer=split, start=True, session_key=KEY))
        assert err.value.code is ErrorCode.SPLIT_LAYER
        assert not cloud.context.sessions and not cloud.partition.sequences
    cloud.send(CloudRequest(1, 0, True, rows=rows, split_layer=5, start=True, session_key=KEY))  # deeper than the partition's first
    with pytest.raises(ProtocolError) as err:
        cloud.send(CloudRequest(2, 0, True, rows=rows, split_layer=4, start=True, session_key=KEY))
    assert err.value.code is ErrorCode.TOO_MANY_SESSIONS
    assert list(cloud.context.sessions) == list(cloud.partition.sequences) == [1]


def test_limits_are_config_parameters_and_back():
    limits = Limits(max_sessions=3, ttl_s=0.1, max_requests_per_s=1e-7, max_request_bytes=2**40)
    assert Limits.from_params(limits.params()) == limits
    assert Limits().params()["ttl_s"] == "600" and Limits.from_params({}) == Limits()


def test_cloud_only_token_blocks_have_limits_too(tiny):
    model, limits = load_model(tiny), Limits(max_block_rows=4, max_request_bytes=64)
    ids = lambda n: np.arange(n, dtype=np.int64)  # noqa: E731
    with pytest.raises(ProtocolError, match="rows per request"):
        CloudOnly(model, Limits(max_block_rows=4)).block(CloudRequest(1, 0, True, token_ids=ids(5)))
    with pytest.raises(ProtocolError, match="bytes per request"):
        CloudOnly(model, Limits(max_request_bytes=64)).block(CloudRequest(1, 0, True, token_ids=ids(7)))
    with pytest.raises(ProtocolError, match="WANT_TOKEN true"):  # nothing would keep them: refused, not dropped
        CloudOnly(model, limits).block(CloudRequest(1, 0, False, token_ids=ids(2)))
    assert CloudOnly(model, limits).block(CloudRequest(1, 2, False, token_ids=ids(0), end=True)).num_rows == 0


# -- the reconnecting link -----------------------------------------------------------------------------
class FlakyLink:
    """Fails chosen calls: 'before' (the request never left), 'after' (it was applied, the reply lost)
    or 'busy' (refused by the rate limit, nothing changed)."""

    def __init__(self, inner, faults: dict[int, str]):
        self.inner, self.faults, self.calls = inner, faults, 0

    def send(self, req):
        fault = self.faults.get(self.calls)
        self.calls += 1
        if fault == "before":
            raise CloudUnreachable("link cut before the request left")
        if fault == "busy":
            raise ProtocolError(ErrorCode.RATE_LIMITED, "rate limit: 5 requests/s per session (sequence 2); slow down and retry")
        reply = self.inner.send(req)
        if fault == "after":
            raise CloudUnreachable("link cut before the reply came back")
        return reply


PROMPT = [5, 17, 33, 2, 71, 8]


def _edge_and_cloud(ckpt):
    plan = PartitionPlan(ckpt, 4, (1, 3, 4), threshold=0.08)
    return EdgePartition(TorchRunner(load_model(ckpt, range(0, 4))), plan), LocalCloud(load_model(ckpt, range(4, LAYERS)))


def test_reconnecting_link_loses_and_repeats_nothing(tiny):
    edge, cloud = _edge_and_cloud(tiny)
    expected = DecodingSession(edge, cloud, "collaborative", threshold=0.08, sequence_id=1).generate(PROMPT, 30)
    clock = Clock()
    # calls 5 and 9 are uploads: a retry replaces the lost one (no re-sync); 14, 17, 20 token requests: a re-sync each
    faults = {2: "before", 3: "before", 5: "after", 9: "after", 10: "before", 14: "after", 17: "after", 20: "after",
              24: "busy", 25: "busy"}
    link = ReconnectingLink(FlakyLink(cloud, faults), patience_s=5, retry_every_s=0.1, clock=clock, sleep=clock.sleep)
    got = DecodingSession(edge, link, "collaborative", threshold=0.08, sequence_id=2).generate(PROMPT, 30)
    assert got.token_ids == expected.token_ids
    assert got.stats.resyncs >= 3 and link.unreachable == len(faults) - 2  # each lost reply cost a re-sync
    assert link.retries == len(faults)  # the refusals for busy were retried too
    assert not cloud.context.sessions and not cloud.partition.sequences  # END reached the cloud


def test_reconnecting_link_gives_up_after_its_patience(tiny):
    edge, cloud = _edge_and_cloud(tiny)
    clock = Clock()
    link = ReconnectingLink(FlakyLink(cloud, {i: "before" for i in range(100)}), patience_s=2, retry_every_s=0.5,
                            clock=clock, sleep=clock.sleep)
    with pytest.raises(CloudUnreachable):
        DecodingSession(edge, link, "collaborative", threshold=1.0, sequence_id=3).generate(PROMPT, 4)
    assert 1.5 <= clock.now <= 2.0 and link.retries == 4


def test_latency_aware_recovers_from_a_lost_reply(tiny):
    """The reply is lost, the edge answers alone; the next request finds the rows already there: re-sync."""
    edge, cloud = _edge_and_cloud(tiny)
    link = ReconnectingLink(FlakyLink(cloud, {4: "after"}), patience_s=0)
    gen = DecodingSession(edge, link, "latency-aware", threshold=1.0, sequence_id=4,
                          latency=LatencyPolicy(budget_s=30, retry_after_s=0))
    out = gen.generate(PROMPT, 12)
    assert len(out.token_ids) == 12 and out.stats.fallbacks == 1 and out.stats.resyncs == 1
    assert out.exits().count("cloud") == 11
