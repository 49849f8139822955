"""Hostile input: property-based fuzzing of the `ce_collm` ensemble through tritonclient, and the limits.

One tritonserver for the module (127.0.0.1, free ports) with small limits. Hypothesis builds
requests that are each wrong in one to three ways (dtypes, shapes, hidden sizes, NaN/Inf, huge or
negative positions, empty and oversize blocks, random sequence ids and flags, missing, extra or
doubled tensors, bad int8 scales, batch sizes, split layers), sent with random 64-bit or string
sequence ids or with the id of a live session (the victim). Every one must get an error response;
the server must stay up; the victim and a normal session must be exactly as if nothing happened;
and no request may leave state behind.
"""
from __future__ import annotations

import collections
import time

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from edge_runtime.session import DecodingSession
from edge_runtime.torch_runner import TorchRunner
from edge_runtime.triton_link import TritonLink
from plugin.model.checkpoint import load_model
from plugin.protocol.codec import encode
from plugin.protocol.errors import error_code, ErrorCode, ProtocolError
from plugin.protocol.messages import CloudRequest
from plugin.protocol.tensors import OUTPUTS
from plugin.serving.repository import ServeOptions, write_repository
from plugin.split.edge import EdgePartition
from plugin.split.limits import Limits
from plugin.split.local import LocalCloud
from plugin.split.plan import PartitionPlan
from tests.soak import gauges, wait_for_gauges
from tests.tiny_models import LAYERS, save_tiny

pytestmark = pytest.mark.server
SPLIT, EXITS = 4, (1, 3, 4)
PROMPT = [5, 17, 33, 2, 71, 8]
# fp16 rows of hidden 64 are 128 bytes: 16 rows (2 KiB) pass, 12 fp32 rows (3 KiB + 17) break the byte limit
LIMITS = Limits(max_sessions=8, max_context=64, max_block_rows=16, ttl_s=600, max_request_bytes=3072,
                max_requests_per_s=40)
VICTIM = 0x0DDBA11_0001
VICTIM_KEY = 0x0DDBA11_5EC2E7  # the victim's SESSION_KEY: requests aimed at it carry it, unless "bad_key"
NORMAL = 0x0DDBA11_0002
KEY = 0x5E55_10_4E7  # the SESSION_KEY of the other sessions these tests open by hand
TRIED: collections.Counter = collections.Counter()


@pytest.fixture(scope="module")
def fz(tmp_path_factory, start_server):
    ckpt = tmp_path_factory.mktemp("ckpt")
    save_tiny("llama", ckpt)
    plan = PartitionPlan(ckpt, SPLIT, EXITS, threshold=1.0, codec="fp16")
    repo = tmp_path_factory.mktemp("repo")
    # every refused START holds a Triton sequence slot until the idle timeout: room for the fuzz's
    write_repository(plan, repo, ServeOptions(limits=LIMITS, sequence_slots=512))
    server = start_server(repo)
    edge = EdgePartition(TorchRunner(load_model(ckpt, range(0, SPLIT))), plan)
    return server, edge, ckpt


def _infer(client, inputs: dict[str, np.ndarray], sequence_id, start=False, end=False):
    tensors = []
    for name, value in inputs.items():
        t = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        t.set_data_from_numpy(value)
        tensors.append(t)
    return client.infer("ce_collm", tensors, outputs=[grpcclient.InferRequestedOutput(n) for n in OUTPUTS],
                        sequence_id=sequence_id, sequence_start=start, sequence_end=end, client_timeout=30)


# -- requests wrong in one to three ways -----------------------------------------------------------
FRESH_ONLY = ("no_start", "missing_split", "sid_zero", "sid_string", "empty_want")
MUTATIONS = ("no_start", "bad_split", "missing_split", "huge_pos", "negative_pos", "bad_dtype", "bad_hidden",
             "nonfinite", "too_many_rows", "too_many_bytes", "empty_want", "sid_zero", "sid_string",
             "missing_input", "unknown_input", "two_hidden", "batch", "int8_scale", "wrong_rank", "bad_key")
HIDDEN = 64


@st.composite
def bad_requests(draw, victim_position: int):
    """(inputs, sequence_id, start, end, mutations, victim?)"""
    victim = draw(st.integers(0, 3)) == 0
    allowed = [m for m in MUTATIONS if not (victim and m in FRESH_ONLY)]
    mutations = draw(st.sets(st.sampled_from(allowed), min_size=1, max_size=3))
    if victim:  # a continuation of a live session: position and split as the victim's next request would be
        sid, start, end, pos = VICTIM, draw(st.booleans()) and "bad_split" in mutations, False, victim_position
    else:
        sid = draw(st.integers(1, 2**63 - 1).filter(lambda s: s not in (VICTIM, NORMAL)))  # gRPC carries int64
        start, end, pos = True, draw(st.booleans()), 0
    n = draw(st.integers(1, 8))
    want = draw(st.booleans())
    codec = draw(st.sampled_from(["fp16", "fp32"]))
    if "too_many_rows" in mutations:
        n, codec = draw(st.integers(LIMITS.max_block_rows + 1, 3 * LIMITS.max_block_rows)), "fp16"
    elif "too_many_bytes" in mutations:
        n, codec = draw(st.integers(12, LIMITS.max_block_rows)), "fp32"
    elif "empty_want" in mutations:
        n, want = 0, True
    values = draw(st.sampled_from([0.0, 1.0, -3.5, 1e3]))
    rows = np.full((1, n, HIDDEN), values, np.float32)
    if n:
        rows[0, :, 0] = np.linspace(-1, 1, n)
    if "nonfinite" in mutations and n:
        r, c = draw(st.integers(0, n - 1)), draw(st.integers(0, HIDDEN - 1))
        rows[0, r, c] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    hidden_name = {"fp16": "HIDDEN_FP16", "fp32": "HIDDEN_FP32"}[codec]
    inputs = {hidden_name: rows.astype(np.float16 if codec == "fp16" else np.float32),
              "START_POS": np.array([[pos]], np.int64), "WANT_TOKEN": np.array([[want]], np.bool_),
              "SESSION_KEY": np.array([[VICTIM_KEY if victim else draw(st.integers(1, 2**63 - 1))]], np.int64)}
    if start:
        inputs["SPLIT_LAYER"] = np.array([[SPLIT]], np.int32)
    if "bad_split" in mutations:
        bad = [SPLIT - 1, SPLIT + 1] if victim and not start else [-1, 0, LAYERS, LAYERS + 1, 2**31 - 1, -2**31]
        inputs["SPLIT_LAYER"] = np.array([[draw(st.sampled_from(bad))]], np.int32)
    if "missing_split" in mutations:
        inputs.pop("SPLIT_LAYER", None)
    if "no_start" in mutations:
        start = False
    if "huge_pos" in mutations:
        inputs["START_POS"] = np.array([[draw(st.integers(pos + 1, 2**63 - 1))]], np.int64)
    if "negative_pos" in mutations:
        inputs["START_POS"] = np.array([[draw(st.integers(-2**63, -1))]], np.int64)
    if "bad_hidden" in mutations:
        width = draw(st.sampled_from([0, 1, HIDDEN - 1, HIDDEN + 1, 2 * HIDDEN, 1000]))
        inputs[hidden_name] = np.zeros((1, n, width), inputs[hidden_name].dtype)
    if "bad_dtype" in mutations:
        dtype = draw(st.sampled_from([np.float64, np.int32, np.int64, np.uint8, np.int8, np.bool_, np.object_]))
        value = inputs[hidden_name]
        inputs[hidden_name] = (np.full(value.shape, b"x", np.object_) if dtype is np.object_
                               else np.nan_to_num(value).astype(dtype))
    if "two_hidden" in mutations:  # a second block beside the first, in another codec
        other, dtype = ("HIDDEN_FP16", np.float16) if codec == "fp32" else ("HIDDEN_FP32", np.float32)
        inputs[other] = np.zeros((1, max(n, 1), HIDDEN), dtype)
    if "int8_scale" in mutations:
        data = np.ones((1, max(n, 1), HIDDEN), np.int8)
        inputs.pop(hidden_name)
        inputs["HIDDEN_INT8"] = data
        scale = draw(st.sampled_from(["missing", "zero", "negative", "nan", "shape"]))
        if scale != "missing":
            value = {"zero": 0.0, "negative": -1.0, "nan": np.nan, "shape": 1.0}[scale]
            rows_ = data.shape[1] + (1 if scale == "shape" else 0)
            inputs["HIDDEN_SCALE"] = np.full((1, rows_, 1), value, np.float32)
    if "missing_input" in mutations:
        inputs.pop(draw(st.sampled_from(["START_POS", "WANT_TOKEN"])))
    if "unknown_input" in mutations:
        inputs[draw(st.sampled_from(["EVIL", "PENDING_HIDDEN", "hidden_fp16", "CORRID"]))] = np.zeros((1, 1), np.int64)
    if "wrong_rank" in mutations:
        name = draw(st.sampled_from(["START_POS", "WANT_TOKEN", "SPLIT_LAYER"]))
        if name in inputs:
            inputs[name] = np.repeat(inputs[name][..., None], 2, axis=-1)  # [1, 1, 2]
        else:
            inputs["START_POS"] = np.zeros((1, 2), np.int64)
    if "batch" in mutations:
        b = draw(st.sampled_from([0, 2, 9]))
        inputs = {k: np.repeat(v[:1], b, axis=0) for k, v in inputs.items()}
    if "bad_key" in mutations:  # missing, out of range, or (aimed at the victim) another session's
        bad = draw(st.sampled_from([None, 0, -1, -2**63] + ([VICTIM_KEY + 1, VICTIM_KEY ^ 1 << 40] if victim else [])))
        inputs.pop("SESSION_KEY") if bad is None else inputs.update(SESSION_KEY=np.array([[bad]], np.int64))
    if "sid_zero" in mutations:
        sid = 0
    if "sid_string" in mutations:
        sid = draw(st.sampled_from(["fuzz", "fuzzy", "0", str(VICTIM), "x" * 200]))
    return inputs, sid, start, end, tuple(sorted(mutations)), victim


def _randn(seed: int, n: int, hidden: int):
    return encode(torch.randn(n, hidden, generator=torch.Generator().manual_seed(seed)), "fp16")


def _open_victim(link, edge):
    """The long-lived session: 6 rows uploaded, one token asked, 2 rows left pending."""
    rows = [_randn(i, k, edge.hidden_size) for i, k in enumerate((6, 1, 2))]
    reqs = [CloudRequest(VICTIM, 0, False, rows=rows[0], split_layer=SPLIT, start=True, session_key=VICTIM_KEY),
            CloudRequest(VICTIM, 6, True, rows=rows[1], session_key=VICTIM_KEY),
            CloudRequest(VICTIM, 7, False, rows=rows[2], session_key=VICTIM_KEY)]
    return reqs, [link.send(r) for r in reqs]


def test_fuzzed_requests_get_errors_and_change_nothing(fz):
    server, edge, ckpt = fz
    link = TritonLink(server.grpc_url)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    reference_cloud = lambda: LocalCloud(load_model(ckpt, range(SPLIT, LAYERS)), LIMITS)  # noqa: E731
    normal_before = DecodingSession(edge, link, "collaborative", threshold=1.0, sequence_id=NORMAL).generate(PROMPT, 16)
    idle = wait_for_gauges(server.metrics_url, gauges(server.metrics_url))
    victim_reqs, victim_replies = _open_victim(link, edge)
    with_victim = gauges(server.metrics_url)
    TRIED.clear()
    t0 = time.monotonic()

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    @given(bad_requests(victim_position=9))
    def fuzz(case):
        inputs, sid, start, end, mutations, victim = case
        try:
            _infer(client, inputs, sid, start, end)
        except InferenceServerException as e:
            assert e.message() and "internal error" not in e.message(), e.message()  # a clear refusal, not a bug
            assert error_code(e.message(), e.status()) is not ErrorCode.INTERNAL, e.message()
            TRIED["aimed at a live session" if victim else "random sequence id"] += 1
            TRIED.update(mutations)
            return
        raise AssertionError(f"accepted a bad request: {mutations} sid={sid!r} start={start} end={end} "
                             f"{ {k: (v.dtype.name, v.shape) for k, v in inputs.items()} }")

    fuzz()
    fuzz_s = time.monotonic() - t0
    assert server.is_running() and link.ready()
    assert gauges(server.metrics_url) == with_victim  # no bad request left state behind
    time.sleep(1.0)  # refused requests aimed at the victim spent its request budget (40/s); it refills
    # the victim carries on as if nothing happened: its next token equals an undisturbed replay's
    reference = reference_cloud()
    expected = [reference.send(r) for r in victim_reqs]
    assert [r.token_id for r in victim_replies] == [r.token_id for r in expected]
    last = CloudRequest(VICTIM, 9, True, rows=_randn(9, 1, edge.hidden_size), end=True, session_key=VICTIM_KEY)
    served = link.send(last)
    local = reference.send(last)
    assert (served.token_id, served.catchup_rows) == (local.token_id, local.catchup_rows) and served.catchup_rows == 3
    normal_after = DecodingSession(edge, link, "collaborative", threshold=1.0, sequence_id=NORMAL).generate(PROMPT, 16)
    assert normal_after.token_ids == normal_before.token_ids
    assert wait_for_gauges(server.metrics_url, idle) == idle
    total = TRIED["aimed at a live session"] + TRIED["random sequence id"]
    print(f"\nfuzz: {total} bad requests, all refused in {fuzz_s:.1f} s; server up, victim and normal sessions "
          f"unchanged; {dict(TRIED.most_common())}")


def test_limits_reach_the_client_with_clear_errors(fz):
    server, edge, _ = fz
    link = TritonLink(server.grpc_url)
    rows = lambda n, codec="fp16": encode(torch.ones(n, edge.hidden_size), codec)  # noqa: E731
    idle = wait_for_gauges(server.metrics_url, gauges(server.metrics_url))
    live = [0x11_0000 + i for i in range(LIMITS.max_sessions)]
    for sid in live:
        link.send(CloudRequest(sid, 0, False, rows=rows(1), split_layer=SPLIT, start=True, session_key=KEY))
    checks = [
        (CloudRequest(0x11_FFFF, 0, False, rows=rows(1), split_layer=SPLIT, start=True, session_key=KEY),
         r"too many live sessions \(8\)", ErrorCode.TOO_MANY_SESSIONS),
        (CloudRequest(live[0], 1, False, rows=rows(17), session_key=KEY),
         r"block of 17 rows exceeds the limit of 16 rows per request", ErrorCode.LIMIT_EXCEEDED),
        (CloudRequest(live[0], 1, False, rows=rows(12, "fp32"), session_key=KEY),
         r"payload of 3089 bytes exceeds the limit of 3072 bytes", ErrorCode.LIMIT_EXCEEDED),
    ]
    for req, message, code in checks:
        with pytest.raises(ProtocolError, match=message) as err:
            link.send(req)
        assert err.value.code is code
    pos = 1
    while pos + 16 <= LIMITS.max_context:
        link.send(CloudRequest(live[1], pos, False, rows=rows(16), session_key=KEY))
        pos += 16
    with pytest.raises(ProtocolError, match=r"context of 65 positions exceeds the limit of 64") as err:
        link.send(CloudRequest(live[1], pos, False, rows=rows(16), session_key=KEY))
    assert err.value.code is ErrorCode.LIMIT_EXCEEDED
    # requests per second: empty uploads as fast as one client can send them, until the bucket runs dry
    sent, t0 = 0, time.monotonic()
    with pytest.raises(ProtocolError, match=r"rate limit: 40 requests/s per session") as err:
        while sent < 2000 and time.monotonic() - t0 < 30:
            link.send(CloudRequest(live[2], 1, False, rows=rows(0), session_key=KEY))
            sent += 1
    assert err.value.code is ErrorCode.RATE_LIMITED
    assert sent <= LIMITS.max_requests_per_s * (1 + time.monotonic() - t0) + 1
    time.sleep(0.2)
    # the limited session still works, context intact
    link.send(CloudRequest(live[2], 1, True, rows=rows(1), session_key=KEY))
    for sid in live:
        link.send(CloudRequest(sid, {live[1]: pos, live[2]: 2}.get(sid, 1), False, rows=rows(0), end=True,
                               session_key=KEY))
    assert wait_for_gauges(server.metrics_url, idle) == idle


def test_refused_end_for_a_live_session_costs_a_resume_not_data(fz):
    """Triton ends a sequence on END even when the model refuses that request: the stored context
    outlives the slot, the session's next request (no START) is answered SLOT_EXPIRED, and the same
    request with START resumes the context the models kept."""
    server, edge, ckpt = fz
    link = TritonLink(server.grpc_url)
    sid = 0x0DDBA11_0003
    gen = DecodingSession(edge, link, "collaborative", threshold=1.0, sequence_id=sid)
    stream = gen.stream(PROMPT, 12)
    records = [next(stream) for _ in range(4)]
    with pytest.raises(ProtocolError, match="position gap"):
        link.send(CloudRequest(sid, 999, False, rows=_randn(0, 1, edge.hidden_size), end=True,
                               session_key=gen.sync.session_key))
    records += list(stream)
    reference = DecodingSession(edge, LocalCloud(load_model(ckpt, range(SPLIT, LAYERS))), "collaborative", threshold=1.0,
                                sequence_id=1).generate(PROMPT, 12)
    assert [r.token_id for r in records] == reference.token_ids
    assert (gen.stats.resumes, gen.stats.resyncs) == (1, 0)  # Triton released the slot; nothing was re-sent
