"""The cloud side served by a real tritonserver: ensemble, context manager, cloud partition.

One server per module, started on free 127.0.0.1 ports from a repository generated from the
partition plan of a tiny random checkpoint that this module builds.
"""
from __future__ import annotations

import concurrent.futures as cf
import re
import time
import urllib.request

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from edge_runtime.cloud_only import CloudOnlySession
from edge_runtime.session import DecodingSession
from edge_runtime.torch_runner import TorchRunner
from edge_runtime.triton_link import TritonLink
from plugin.model.checkpoint import load_model
from plugin.protocol.codec import encode, EncodedRows
from plugin.protocol.errors import error_code, ErrorCode, ProtocolError, Recovery, SequenceNeedsStart
from plugin.protocol.messages import CloudRequest, Drafts
from plugin.protocol.tensors import CLOUD_ONLY, ENSEMBLE
from plugin.serving.repository import ServeOptions, write_repository
from plugin.split.edge import EdgePartition
from plugin.split.limits import Limits
from plugin.split.local import LocalCloud
from plugin.split.plan import PartitionPlan
from tests.broken_service import add_broken_model, BUG
from tests.tiny_models import LAYERS, save_tiny

pytestmark = pytest.mark.server
SPLIT, EXITS = 4, (1, 3, 4)
PROMPTS = [[5, 17, 33, 2, 71], [90, 4, 4, 12, 61, 8, 30, 55, 1], [42, 7], [3, 3, 3, 9]]
LIMITS = Limits(max_sessions=64, max_context=256, max_block_rows=64, ttl_s=600)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, start_server):
    ckpt = tmp_path_factory.mktemp("ckpt")
    save_tiny("llama", ckpt)
    plan = PartitionPlan(ckpt, SPLIT, EXITS, threshold=0.1, codec="fp16")
    repo = tmp_path_factory.mktemp("repo")
    write_repository(plan, repo, ServeOptions(limits=LIMITS))
    add_broken_model(repo)  # a service with a bug, behind the same adapter
    server = start_server(repo)
    edge = EdgePartition(TorchRunner(load_model(ckpt, range(0, SPLIT))), plan)
    reference = LocalCloud(load_model(ckpt, range(SPLIT, LAYERS)), LIMITS)
    return plan, edge, reference, server, load_model(ckpt)


def _generate(edge, link, codec, sid, prompt, threshold=0.1, n=24, mode="collaborative"):
    return DecodingSession(edge, link, mode, threshold=threshold, codec=codec, sequence_id=sid).generate(prompt, n)


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_ensemble_matches_in_process_reference(setup, codec):
    plan, edge, reference, server, _ = setup
    link = TritonLink(server.grpc_url)
    exits = []
    for sid, prompt in enumerate(PROMPTS, start=100):
        served = _generate(edge, link, codec, sid, prompt)
        local = _generate(edge, reference, codec, sid, prompt)
        assert served.token_ids == local.token_ids
        assert served.exits() == local.exits()
        assert served.stats.bytes_up == local.stats.bytes_up
        exits += served.exits()
    assert "cloud" in exits and any(e.startswith("edge") for e in exits)  # both paths exercised


def test_cloud_only_model_matches_full_model(setup):
    plan, edge, reference, server, full = setup
    served = CloudOnlySession(TritonLink(server.grpc_url, "cloud_only"), sequence_id=7).generate(PROMPTS[0], 16)
    local = CloudOnlySession(LocalCloud(full), sequence_id=7).generate(PROMPTS[0], 16)
    exact = _generate(edge, TritonLink(server.grpc_url), "fp32", 8, PROMPTS[0], threshold=1.0, n=16)
    assert served.token_ids == local.token_ids == exact.token_ids


def test_interleaved_and_concurrent_sessions_never_mix(setup):
    plan, edge, reference, server, _ = setup
    alone = [_generate(edge, TritonLink(server.grpc_url), "fp16", 200 + i, p).token_ids for i, p in enumerate(PROMPTS)]
    # step two sessions alternately on one link
    link = TritonLink(server.grpc_url)
    gens = [DecodingSession(edge, link, "collaborative", threshold=0.1, codec="fp16", sequence_id=300 + i) for i in range(2)]
    streams = [g.stream(PROMPTS[i], 24) for i, g in enumerate(gens)]
    interleaved = [[], []]
    for _ in range(24):
        for i in range(2):
            interleaved[i].append(next(streams[i]).token_id)
    for s in streams:
        s.close()
    assert interleaved == alone[:2]
    # 8 sessions at once: the sequence batcher hands the cloud partition ragged batches
    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_generate, edge, TritonLink(server.grpc_url), "fp16", 400 + i, PROMPTS[i % 4])
                   for i in range(8)]
        concurrent = [f.result(timeout=120).token_ids for f in futures]
    assert concurrent == [alone[i % 4] for i in range(8)]


KEY = 0x5E55_10_4E7  # the SESSION_KEY of every session these tests open by hand


def _raw(link, sid, pos, rows, want=False, start=False, end=False, split=None, key=KEY):
    return link.send(CloudRequest(sid, pos, want, rows=rows, split_layer=split, start=start, end=end, session_key=key))


def test_replies_carry_the_time_of_their_pass(setup):
    """A verified request's reply (its drafts checked) and cloud-only's say how long the pass that computed them took:
    more than 0 and less than the round trip the edge measured; a session sums them."""
    _, _, _, server, full = setup
    rows = encode(torch.randn(6, full.cfg.hidden_size), "fp32")
    verified = CloudRequest(31, 0, True, rows=rows, split_layer=SPLIT, start=True, end=True, session_key=KEY,
                            drafts=Drafts.of([(5, 4), (9, 4), (2, 4)]))
    cloud_only = CloudRequest(32, 0, True, token_ids=np.array(PROMPTS[1], np.int64), start=True, end=True,
                              session_key=KEY)
    for model, req in ((ENSEMBLE, verified), (CLOUD_ONLY, cloud_only)):
        t0 = time.perf_counter()
        reply = TritonLink(server.grpc_url, model).send(req)
        assert 0 < reply.pass_s < time.perf_counter() - t0, model
    stats = CloudOnlySession(TritonLink(server.grpc_url, CLOUD_ONLY), sequence_id=33).generate(PROMPTS[0], 4).stats
    assert 0 < stats.cloud_pass_s < stats.wall_s


def test_bad_requests_get_errors_and_leave_context_intact(setup):
    plan, edge, reference, server, _ = setup
    link = TritonLink(server.grpc_url)
    hidden = edge.runner.model.cfg.hidden_size
    rows = lambda n: encode(torch.randn(n, hidden), "fp16")  # noqa: E731
    sid = 900
    _raw(link, sid, 0, rows(3), start=True, split=SPLIT)
    bad = [
        (dict(sid=sid, pos=5, rows=rows(1)), "position gap"),
        (dict(sid=sid, pos=1, rows=rows(1)), "position overlap"),
        (dict(sid=sid, pos=3, rows=EncodedRows("fp16", np.zeros((1, hidden + 2), np.float16))), "shape"),
        (dict(sid=sid, pos=3, rows=EncodedRows("fp16", np.full((1, hidden), np.nan, np.float16))), "NaN"),
        (dict(sid=sid, pos=3, rows=rows(65)), "rows per request"),
        (dict(sid=sid, pos=3, rows=rows(1), split=SPLIT + 1), "split layer"),
        (dict(sid=901, pos=0, rows=rows(1), start=True, split=LAYERS), "SPLIT_LAYER"),
        (dict(sid=902, pos=0, rows=rows(1)), "START"),
    ]
    for kwargs, message in bad:
        with pytest.raises((ProtocolError, SequenceNeedsStart), match=message):
            _raw(link, **kwargs)
    reply = _raw(link, sid, 3, rows(1), want=True)
    assert reply.catchup_rows == 4 and reply.token_id >= 0  # all 3 stored rows + the new one
    _raw(link, sid, 4, rows(0), end=True)
    assert server.is_running()


def test_unknown_sequence_is_reported_as_needing_start(setup):
    plan, edge, reference, server, _ = setup
    link = TritonLink(server.grpc_url)
    with pytest.raises(SequenceNeedsStart):
        _raw(link, 950, 0, encode(torch.randn(1, edge.runner.model.cfg.hidden_size), "fp16"), want=True)


def _metric(server, name, model):
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    m = re.search(rf'^{name}{{model="{model}"}} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else None


def test_end_frees_sessions_and_metrics_show_it(setup):
    plan, edge, reference, server, _ = setup
    link = TritonLink(server.grpc_url)
    before = {m: _metric(server, "ce_collm_sessions_live", m) or 0 for m in ("cloud_partition", "context_manager")}
    gen = DecodingSession(edge, link, "collaborative", threshold=1.0, codec="fp16", sequence_id=1000)
    stream = gen.stream(PROMPTS[1], 8)
    for _ in range(4):
        next(stream)
    for model, live in before.items():
        assert _metric(server, "ce_collm_sessions_live", model) == live + 1
    stream.close()  # END
    for model, live in before.items():
        assert _metric(server, "ce_collm_sessions_live", model) == live
    assert _metric(server, "ce_collm_tokens_served_total", "cloud_partition") > 0
    assert _metric(server, "ce_collm_rows_uploaded_total", "context_manager") > 0


def test_every_error_kind_reaches_the_edge_by_its_code(setup):
    """Each refusal the cloud side answers comes back through the ensemble as its code's exception."""
    plan, edge, reference, server, _ = setup
    link = TritonLink(server.grpc_url)
    hidden = edge.runner.model.cfg.hidden_size
    rows = lambda n, codec="fp16": encode(torch.randn(n, hidden), codec)  # noqa: E731
    sid = 1100
    _raw(link, sid, 0, rows(3), start=True, split=SPLIT)
    cases = [
        (dict(sid=1101, pos=0, rows=rows(1), want=True), ErrorCode.SLOT_EXPIRED),  # Triton's own words
        (dict(sid=sid, pos=5, rows=rows(1)), ErrorCode.POSITION_GAP),
        (dict(sid=sid, pos=1, rows=rows(1)), ErrorCode.POSITION_OVERLAP),
        (dict(sid=sid, pos=3, rows=rows(1), split=SPLIT + 1), ErrorCode.SPLIT_LAYER),
        (dict(sid=1102, pos=0, rows=rows(1), start=True, split=LAYERS), ErrorCode.SPLIT_LAYER),
        (dict(sid=1103, pos=0, rows=rows(1), start=True, split=SPLIT - 1), ErrorCode.SPLIT_LAYER),  # below the cloud's
        (dict(sid=sid, pos=3, rows=rows(65)), ErrorCode.LIMIT_EXCEEDED),
        (dict(sid=sid, pos=3, rows=EncodedRows("fp32", np.full((1, hidden), np.inf, np.float32))), ErrorCode.MALFORMED),
        (dict(sid=sid, pos=3, rows=EncodedRows("fp16", np.zeros((1, hidden + 2), np.float16))), ErrorCode.SERVER),
    ]
    for kwargs, code in cases:
        with pytest.raises(ProtocolError) as err:
            _raw(link, **kwargs)
        assert err.value.code is code, (kwargs, str(err.value))
        assert isinstance(err.value, SequenceNeedsStart) == (code.recovery is Recovery.RESYNC)  # the edge re-syncs
    assert _raw(link, sid, 3, rows(1), want=True, end=True).catchup_rows == 4  # the refusals changed nothing


def test_a_bug_is_logged_with_its_traceback_and_answered_internal(setup):
    plan, edge, reference, server, _ = setup
    client = grpcclient.InferenceServerClient(server.grpc_url)
    x = grpcclient.InferInput("IN", [3], "FP32")
    x.set_data_from_numpy(np.ones(3, np.float32))
    with pytest.raises(InferenceServerException) as err:
        client.infer("broken", [x], client_timeout=30)
    assert error_code(err.value.message(), err.value.status()) is ErrorCode.INTERNAL
    assert BUG in err.value.message()
    deadline = time.monotonic() + 30  # the stub's log messages reach the server log a moment after the reply
    while f"RuntimeError: {BUG}" not in server.log_tail(400) and time.monotonic() < deadline:
        time.sleep(0.2)
    logged = [line for line in server.log_tail(400).splitlines() if f"RuntimeError: {BUG}" in line]
    assert len(logged) == 1 and "Traceback (most recent call last)" in logged[0]  # one record, the whole traceback


def test_a_refused_start_holds_no_session_in_either_model(setup):
    """One admission rule: the context manager refuses what the cloud partition would refuse (a split layer
    below the layers it holds, here), before it stores anything."""
    plan, edge, reference, server, _ = setup
    link = TritonLink(server.grpc_url)
    live = {m: _metric(server, "ce_collm_sessions_live", m) or 0 for m in ("cloud_partition", "context_manager")}
    rows = encode(torch.randn(2, edge.runner.model.cfg.hidden_size), "fp16")
    for want in (False, True):
        with pytest.raises(ProtocolError, match="SPLIT_LAYER") as err:
            _raw(link, 1200 + want, 0, rows, want=want, start=True, split=SPLIT - 1)
        assert err.value.code is ErrorCode.SPLIT_LAYER
    assert {m: _metric(server, "ce_collm_sessions_live", m) or 0 for m in live} == live
    # the attack of issue 18: more refused STARTs than the cloud has sessions, each followed by an upload
    for sid in range(1300, 1300 + LIMITS.max_sessions + 16):
        with pytest.raises(ProtocolError) as err:
            _raw(link, sid, 0, rows, start=True, split=SPLIT - 1)
        assert err.value.code is ErrorCode.SPLIT_LAYER
        with pytest.raises(SequenceNeedsStart):  # nothing was stored for it: uploads find no session
            _raw(link, sid, 2, rows)
    assert {m: _metric(server, "ce_collm_sessions_live", m) or 0 for m in live} == live
    assert _metric(server, "ce_collm_pending_bytes", "context_manager") == 0
    _raw(link, 1200, 0, rows, start=True, split=SPLIT)  # the id is free; a split the cloud holds is admitted
    assert _metric(server, "ce_collm_sessions_live", "context_manager") == live["context_manager"] + 1
    _raw(link, 1200, 2, rows, want=True, end=True)
    assert {m: _metric(server, "ce_collm_sessions_live", m) or 0 for m in live} == live
