"""Faults and load against a real tritonserver: a vanished edge, a cut link, a slow cloud, many sessions.

One server per module on free 127.0.0.1 ports, with a 2 s TTL (context manager, cloud partition and
Triton's sequence batcher alike). The link emulator (bench/link_emulator.py) stands between the
edge and the server where the network misbehaves. Every generation must complete with one token
per position, equal to a fault-free run where the mode makes that comparable; where the edge
answered some tokens itself (latency-aware), every token the cloud chose is checked against the
full model on the text actually produced, so a lost or duplicated row would show. The restart of
the server mid-generation is tested in test_edge_faults.py; bad requests in test_triton_cloud.py
and test_fuzz.py. Run with -s to see the figures each test prints.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from bench.link_emulator import LinkEmulator
from edge_runtime.generation import TokenRecord
from edge_runtime.policy import LatencyPolicy
from edge_runtime.session import DecodingSession
from edge_runtime.reconnect import ReconnectingLink
from edge_runtime.torch_runner import TorchRunner
from edge_runtime.triton_link import TritonLink
from plugin.model.checkpoint import load_model
from plugin.protocol.codec import encode
from plugin.protocol.errors import ProtocolError, SequenceNeedsStart
from plugin.protocol.messages import CloudRequest
from plugin.serving.repository import ServeOptions, write_repository
from plugin.serving.server import TritonServer
from plugin.split.edge import EdgePartition
from plugin.split.limits import Limits
from plugin.split.local import LocalCloud
from plugin.split.plan import PartitionPlan
from tests.soak import gauges, prompts, run_sessions, server_rss_kib, wait_for_gauges
from tests.tiny_models import LAYERS, VOCAB, save_tiny

pytestmark = pytest.mark.server
SPLIT, EXITS = 4, (1, 3, 4)
PROMPT = [5, 17, 33, 2, 71, 8]
MIXED = 0.08  # edge exit threshold at which about half the tiny model's tokens exit on the edge
TTL_S = 2.0
LIMITS = Limits(max_sessions=32, max_context=256, max_block_rows=256, ttl_s=TTL_S)
KEY = 0x5E55_10_4E7  # the SESSION_KEY of the sessions these tests open by hand


@pytest.fixture(scope="module")
def rel(tmp_path_factory, start_server):
    ckpt = tmp_path_factory.mktemp("ckpt")
    hf = save_tiny("llama", ckpt)
    plan = PartitionPlan(ckpt, SPLIT, EXITS, threshold=1.0, codec="fp16")
    repo = tmp_path_factory.mktemp("repo")
    write_repository(plan, repo, ServeOptions(limits=LIMITS))
    server = start_server(repo)
    edge = EdgePartition(TorchRunner(load_model(ckpt, range(0, SPLIT))), plan)
    return server, edge, ckpt, hf


def _reference(rel, prompt, n, threshold):
    _, edge, ckpt, _ = rel
    cloud = LocalCloud(load_model(ckpt, range(SPLIT, LAYERS)))
    return DecodingSession(edge, cloud, "collaborative", threshold=threshold, sequence_id=1).generate(prompt, n).token_ids


def _check_cloud_tokens(hf, prompt, records):
    """Every token the cloud chose is the full model's greedy choice on the text produced so far."""
    ids = prompt + [r.token_id for r in records]
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0]  # [T, V]
    cloud = [i for i, r in enumerate(records) if r.exit == "cloud"]
    for i in cloud:
        row = logits[len(prompt) - 1 + i]
        assert row[records[i].token_id] >= row.max() - 1e-3, f"token {i} is not the full model's choice"
    return len(cloud)


def test_server_binds_loopback_only(rel):
    """Safe default: all three endpoints listen on 127.0.0.1 unless told otherwise."""
    server = rel[0]
    assert TritonServer.__init__.__kwdefaults__["host"] == "127.0.0.1"
    listening = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port = local.rsplit(":", 1)
            if state == "0A":  # LISTEN
                listening.setdefault(int(port, 16), set()).add(address)
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1 and ::ffff:127.0.0.1 (gRPC's)
    for port in server.ports():
        assert listening.get(port) and listening[port] <= loopback, (port, listening.get(port))


def test_vanished_edge_is_reclaimed_by_ttl_and_comes_back_with_a_resync(rel):
    server, edge, _, _ = rel
    before = wait_for_gauges(server.metrics_url, gauges(server.metrics_url))
    rss_before = server_rss_kib(server.pid)
    gen = DecodingSession(edge, TritonLink(server.grpc_url), "collaborative", threshold=MIXED, sequence_id=0x5EED_0001)
    stream = gen.stream(PROMPT, 24)  # kept referenced: a collected generator would send END
    records = [next(stream)]
    while records[-1].exit != f"edge:{SPLIT}":  # stop after an exit at the split: its row waits in the cloud
        records.append(next(stream))
    held = gauges(server.metrics_url)
    assert held["ce_collm_sessions_live{context_manager}"] == before["ce_collm_sessions_live{context_manager}"] + 1
    assert held["ce_collm_sessions_live{cloud_partition}"] == before["ce_collm_sessions_live{cloud_partition}"] + 1
    assert held["ce_collm_pending_bytes{context_manager}"] > before["ce_collm_pending_bytes{context_manager}"]
    assert held["ce_collm_kv_bytes{cloud_partition}"] > before["ce_collm_kv_bytes{cloud_partition}"]
    # the edge goes silent: no END, no request from anyone; the periodic TTL sweep alone frees it
    t0 = time.monotonic()
    after = wait_for_gauges(server.metrics_url, before, timeout_s=TTL_S + 15)
    reclaimed_s = time.monotonic() - t0
    assert after == before, (held, after)
    rss_after = server_rss_kib(server.pid)
    # the edge comes back: the cloud lost the sequence, the edge re-sends its context, nothing is lost
    records += list(stream)
    assert gen.stats.resyncs == 1
    assert [r.token_id for r in records] == _reference(rel, PROMPT, 24, MIXED)
    print(f"\nTTL: held {held}, reclaimed {reclaimed_s:.1f} s after the edge vanished (TTL {TTL_S} s), gauges {after}; "
          f"server RSS {rss_before / 1024:.0f} MiB before, {rss_after / 1024:.0f} MiB after")


def _cut_for(link: LinkEmulator, after_s: float, for_s: float) -> threading.Thread:
    def run():
        time.sleep(after_s)
        link.cut()
        time.sleep(for_s)
        link.restore()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_collaborative_session_rides_out_link_cuts(rel):
    """Cuts between requests and cuts while a request is in flight: the session waits and re-syncs."""
    server, edge, _, _ = rel
    n = 40
    with LinkEmulator("127.0.0.1", server.grpc_port, delay_ms=20) as em:
        link = ReconnectingLink(TritonLink(em.address, timeout_s=10), patience_s=30, retry_every_s=0.1)
        gen = DecodingSession(edge, link, "collaborative", threshold=MIXED, sequence_id=0x5EED_0002)
        stream = gen.stream(PROMPT, n)
        records = [next(stream) for _ in range(6)]
        em.cut()  # down between two requests, for 0.8 s
        threading.Timer(0.8, em.restore).start()
        records += [next(stream) for _ in range(6)]
        for after_s in (0.03, 0.05, 0.07):  # down while a request or its reply is on the wire (20 ms each way)
            cutter = _cut_for(em, after_s, 0.4)
            records.append(next(stream))
            cutter.join()
            records += [next(stream) for _ in range(4)]
        records += list(stream)
        refused = em.counters().refused
    assert len(records) == n
    assert [r.token_id for r in records] == _reference(rel, PROMPT, n, MIXED)
    assert link.unreachable >= 1
    print(f"\nlink cuts (collaborative): {n} tokens, 0 lost; {link.unreachable} unreachable attempts, "
          f"{link.retries} retries, {gen.stats.resyncs} re-syncs, {refused} connections refused while cut")


def test_reply_lost_with_the_link_costs_a_resync_not_a_token(rel):
    """The cut comes after the cloud applied the request and before its reply arrived (100 ms each way)."""
    server, edge, _, _ = rel
    n = 12
    with LinkEmulator("127.0.0.1", server.grpc_port, delay_ms=100) as em:
        link = ReconnectingLink(TritonLink(em.address, timeout_s=10), patience_s=30, retry_every_s=0.1)
        gen = DecodingSession(edge, link, "collaborative", threshold=1.0, sequence_id=0x5EED_0006)  # a request per token
        stream = gen.stream(PROMPT, n)
        records = [next(stream) for _ in range(2)]
        for _ in range(3):
            cutter = _cut_for(em, 0.17, 0.5)  # the request reached the server at ~100 ms, its reply is due at ~200 ms
            records.append(next(stream))
            cutter.join()
            records.append(next(stream))
        records += list(stream)
    assert [r.token_id for r in records] == _reference(rel, PROMPT, n, 1.0)
    assert gen.stats.resyncs >= 1 and link.unreachable >= 3
    print(f"\nreplies lost with the link: {n} tokens, 0 lost; {link.unreachable} unreachable attempts, "
          f"{gen.stats.resyncs} re-syncs")


def stream_across_a_cut(em: LinkEmulator, stream: Iterator[TokenRecord], before: int, during: int,
                        policy: LatencyPolicy) -> tuple[list[TokenRecord], list[TokenRecord], list[TokenRecord]]:
    """The records of a latency-aware stream before a cut of the link, while it is cut, and after."""
    first = [next(stream) for _ in range(before)]
    em.cut()
    cut = [next(stream) for _ in range(during)]
    em.restore()
    time.sleep(policy.retry_after_s + 0.6)  # past the edge's retry time and gRPC's reconnect backoff
    return first, cut, list(stream)


def test_latency_aware_session_answers_locally_while_the_link_is_cut(rel):
    server, edge, _, hf = rel
    policy = LatencyPolicy(budget_s=30.0, retry_after_s=0.3)
    with LinkEmulator("127.0.0.1", server.grpc_port, delay_ms=5) as em:
        link = ReconnectingLink(TritonLink(em.address, timeout_s=10), patience_s=0)
        gen = DecodingSession(edge, link, "latency-aware", threshold=1.0, sequence_id=0x5EED_0003, latency=policy)
        before, during, after = stream_across_a_cut(em, gen.stream(PROMPT, 40), 8, 8, policy)
    records = before + during + after
    assert len(records) == 40
    assert all(r.exit == "cloud" for r in before) and all(r.exit.startswith("edge") for r in during)
    assert during[0].fallback and any(r.exit == "cloud" for r in after)
    assert gen.stats.speculated >= gen.stats.cloud_requests > 0  # guesses rewound at the cut did not leak
    checked = _check_cloud_tokens(hf, PROMPT, records)
    print(f"\nlink cut (latency-aware): 40 tokens, {len(during)} answered on the edge while cut, "
          f"{checked} cloud tokens equal to the full model's, {gen.stats.resyncs} re-syncs")


def test_slow_cloud_latency_aware_falls_back_and_collaborative_completes(rel):
    server, edge, _, hf = rel
    with LinkEmulator("127.0.0.1", server.grpc_port, delay_ms=150) as em:  # 300 ms round trip
        policy = LatencyPolicy(budget_s=0.1, probe_every=8)
        gen = DecodingSession(edge, TritonLink(em.address, timeout_s=10), "latency-aware", threshold=1.0,
                              sequence_id=0x5EED_0004, latency=policy, async_uploads=True)
        t0 = time.perf_counter()
        fast = gen.generate(PROMPT, 24)
        aware_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        slow = DecodingSession(edge, TritonLink(em.address, timeout_s=10), "collaborative", threshold=1.0,
                               sequence_id=0x5EED_0005).generate(PROMPT, 8)
        collab_s = time.perf_counter() - t0
    local = sum(r.exit.startswith("edge") for r in fast.records)
    assert len(fast.token_ids) == 24 and local >= 18  # over budget: the edge answers, probing now and then
    assert _check_cloud_tokens(hf, PROMPT, fast.records) >= 1  # the probes saw a complete context
    assert slow.token_ids == _reference(rel, PROMPT, 8, 1.0)
    assert collab_s >= 8 * 0.3
    print(f"\nslow cloud (300 ms RTT): latency-aware 24 tokens in {aware_s:.1f} s ({local} on the edge), "
          f"collaborative 8 tokens in {collab_s:.1f} s, identical to the fault-free run")


def _rows(seed, n, hidden):
    return encode(torch.randn(n, hidden, generator=torch.Generator().manual_seed(seed)), "fp32")


def test_sessions_never_see_each_others_context(rel):
    """Sequence ids are capabilities: a request only ever reads the rows of its own sequence id."""
    server, edge, ckpt, _ = rel
    hidden = edge.hidden_size
    link = TritonLink(server.grpc_url)
    reference = LocalCloud(load_model(ckpt, range(SPLIT, LAYERS)), LIMITS)
    a, b = 0x7A11_0001, 0x7A11_0002
    sent = {a: [], b: []}

    def both(sid, pos, rows, want, start=False):
        req = CloudRequest(sid, pos, want, rows=rows, split_layer=SPLIT if start else None, start=start,
                           session_key=KEY)
        served, local = link.send(req), reference.send(req)
        assert (served.token_id, served.catchup_rows) == (local.token_id, local.catchup_rows)
        sent[sid].append(served.token_id)
        return served

    # same positions, different rows, interleaved: each reply equals the one computed for that session alone
    both(a, 0, _rows(1, 5, hidden), False, start=True)
    both(b, 0, _rows(2, 5, hidden), False, start=True)
    for pos in range(5, 9):
        both(a, pos, _rows(10 + pos, 1, hidden), True)
        both(b, pos, _rows(20 + pos, 1, hidden), True)
    assert sent[a][1:] != sent[b][1:]  # the sessions really differ
    # a neighbouring id is not a way in: without START it is unknown, with bad input it changes nothing
    for sid in (a + 2, a - 1, b + 1):
        with pytest.raises(SequenceNeedsStart):
            link.send(CloudRequest(sid, 9, True, rows=_rows(3, 1, hidden), session_key=KEY))
    for bad in (CloudRequest(a, 0, True, rows=_rows(4, 1, hidden), split_layer=LAYERS, start=True,
                             session_key=KEY),  # re-START, bad split
                CloudRequest(a, 5, True, rows=_rows(4, 1, hidden), session_key=KEY),  # rewrite a stored position
                CloudRequest(a, 9, True, rows=encode(torch.full((1, hidden), float("nan")), "fp32"), session_key=KEY),
                CloudRequest(a, 9, True, rows=_rows(4, 1, hidden), session_key=KEY + 1)):  # another session's key
        with pytest.raises(ProtocolError):
            link.send(bad)
    both(a, 9, _rows(99, 1, hidden), True)  # a's context is whole: equal to the undisturbed reference
    both(b, 9, _rows(98, 1, hidden), True)
    for sid in (a, b):
        link.send(CloudRequest(sid, 10, False, rows=_rows(0, 0, hidden), end=True, session_key=KEY))


def test_short_soak_concurrent_equals_one_at_a_time(rel):
    """`make soak` runs 32 x 200 tokens; this is the same check at 8 x 40."""
    server, edge, ckpt, _ = rel
    edge = EdgePartition(edge.runner, PartitionPlan(ckpt, SPLIT, (SPLIT,)))  # every edge exit uploads its row
    session_prompts = prompts(8, VOCAB, seed=1)
    before = wait_for_gauges(server.metrics_url, gauges(server.metrics_url))
    alone = run_sessions(edge, server.grpc_url, session_prompts, 40, concurrent=False, threshold=MIXED)
    rss_before = server_rss_kib(server.pid)
    together = run_sessions(edge, server.grpc_url, session_prompts, 40, concurrent=True, threshold=MIXED)
    after = wait_for_gauges(server.metrics_url, before)
    rss_after = server_rss_kib(server.pid)
    assert alone.errors == [] and together.errors == []
    assert together.token_ids == alone.token_ids
    assert together.edge_exits >= 8 and together.uploads > 8 and together.cloud_requests > 8  # both kinds interleaved
    assert after == before
    print(f"\nshort soak: 8 sessions x 40 tokens, one at a time {alone.wall_s:.1f} s, together {together.wall_s:.1f} s, "
          f"{together.uploads} uploads, {together.cloud_requests} token requests, {together.resyncs} re-syncs; "
          f"server RSS {rss_before / 1024:.0f} -> {rss_after / 1024:.0f} MiB; gauges {after}")
