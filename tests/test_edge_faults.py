"""The edge survives the network: a killed server, a restarted one, background uploads.

Each test owns its tritonserver (it kills or restarts it), on free 127.0.0.1 ports.
"""
from __future__ import annotations

import time

import pytest

from edge_runtime.policy import LatencyPolicy
from edge_runtime.session import DecodingSession
from edge_runtime.torch_runner import TorchRunner
from edge_runtime.triton_link import TritonLink
from plugin.model.checkpoint import load_model
from plugin.serving.repository import write_repository
from plugin.split.edge import EdgePartition
from plugin.split.local import LocalCloud
from plugin.split.plan import PartitionPlan
from tests.tiny_models import LAYERS, save_tiny

pytestmark = pytest.mark.server
SPLIT, EXITS = 4, (1, 3, 4)
PROMPT = [5, 17, 33, 2, 71, 8]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt")
    save_tiny("llama", ckpt)
    plan = PartitionPlan(ckpt, SPLIT, EXITS, threshold=1.0, codec="fp16")
    repo = tmp_path_factory.mktemp("repo")
    write_repository(plan, repo)
    return plan, repo, EdgePartition(TorchRunner(load_model(ckpt, range(0, SPLIT))), plan), ckpt


def _reference(plan, edge, ckpt, n, threshold=1.0):
    cloud = LocalCloud(load_model(ckpt, range(SPLIT, LAYERS)))
    return DecodingSession(edge, cloud, "collaborative", threshold=threshold, sequence_id=1).generate(PROMPT, n).token_ids


def test_standalone_needs_no_server(tiny):
    plan, repo, edge, ckpt = tiny
    gen = DecodingSession(edge, None, "standalone", threshold=0.5).generate(PROMPT, 20)
    assert len(gen.token_ids) == 20 and gen.stats.bytes_up == 0
    assert all(e.startswith("edge:") for e in gen.exits())


def test_restart_between_tokens_resyncs_and_changes_nothing(tiny, start_server):
    """Collaborative at 1.0: a server restart mid-generation costs a re-sync, not a token."""
    plan, repo, edge, ckpt = tiny
    server = start_server(repo)
    gen = DecodingSession(edge, TritonLink(server.grpc_url), "collaborative", threshold=1.0, sequence_id=11)
    stream = gen.stream(PROMPT, 24)
    tokens = [next(stream).token_id for _ in range(10)]
    server.restart()  # the new server holds no sequences: the next request must be re-sent with START
    tokens += [r.token_id for r in stream]
    assert gen.stats.resyncs == 1
    assert tokens == _reference(plan, edge, ckpt, 24)


def test_server_killed_mid_generation_in_latency_aware_mode(tiny, start_server):
    plan, repo, edge, ckpt = tiny
    server = start_server(repo)
    policy = LatencyPolicy(budget_s=30.0, retry_after_s=0.2)
    gen = DecodingSession(edge, TritonLink(server.grpc_url, timeout_s=10), "latency-aware", threshold=1.0,
                          sequence_id=12, latency=policy)
    stream = gen.stream(PROMPT, 40)
    before = [next(stream) for _ in range(8)]
    assert all(r.exit == "cloud" for r in before)
    assert [r.token_id for r in before] == _reference(plan, edge, ckpt, 8)
    server.kill()
    during = [next(stream) for _ in range(8)]
    assert all(r.exit == f"edge:{EXITS[-1]}" for r in during)  # the edge answers while the cloud is gone
    assert during[0].fallback  # the first found the cloud gone; later ones stayed local until the retry
    server.restart()
    link = TritonLink(server.grpc_url)
    assert any(link.ready() or time.sleep(0.2) for _ in range(50))  # the edge's probe sees it back
    time.sleep(policy.retry_after_s)
    after = list(stream)
    records = before + during + after
    assert len(records) == 40  # nothing lost, nothing duplicated: one record per position
    assert any(r.exit == "cloud" for r in after) and gen.stats.resyncs >= 1
    assert gen.stats.fallbacks == sum(r.fallback for r in records)


def test_background_uploads_match_foreground(tiny, start_server):
    plan, repo, edge, ckpt = tiny
    server = start_server(repo)
    runs = []
    for sid, background in ((21, False), (22, True)):
        gen = DecodingSession(edge, TritonLink(server.grpc_url), "collaborative", threshold=0.1, sequence_id=sid,
                              async_uploads=background)
        runs.append(gen.generate(PROMPT, 32))
    foreground, background = runs
    assert background.token_ids == foreground.token_ids == _reference(plan, edge, ckpt, 32, threshold=0.1)
    assert background.stats.uploads >= 1 and foreground.stats.uploads >= 1
    # every row reached the cloud once: uploads may coalesce in the background, bytes may not grow
    assert background.stats.bytes_up <= foreground.stats.bytes_up


def test_long_contexts_travel_in_chunks_within_the_block_limit(tiny, start_server, tmp_path):
    """A prompt and a re-sync longer than max_block_rows go as several requests, nothing refused."""
    from plugin.split.limits import Limits
    from plugin.serving.repository import ServeOptions

    plan, _, edge, ckpt = tiny
    repo = tmp_path / "repo"
    write_repository(plan, repo, ServeOptions(limits=Limits(max_block_rows=8)))
    server = start_server(repo)
    prompt = (PROMPT * 4)[:22]  # 22 rows: chunks of 8 + 8 + 6
    gen = DecodingSession(edge, TritonLink(server.grpc_url), "collaborative", threshold=1.0, sequence_id=31,
                          max_block_rows=8)
    stream = gen.stream(prompt, 12)
    tokens = [next(stream).token_id for _ in range(6)]
    server.restart()  # the re-sync re-sends 27 rows: 8 + 8 + 8 + 3
    tokens += [r.token_id for r in stream]
    assert gen.stats.resyncs == 1 and gen.stats.uploads >= 5
    cloud = LocalCloud(load_model(ckpt, range(SPLIT, LAYERS)))
    assert tokens == DecodingSession(edge, cloud, "collaborative", threshold=1.0).generate(prompt, 12).token_ids
