"""One client never harms another, the ensemble's steps stay in step, memory is bounded (issue 18).

One real tritonserver for the module (127.0.0.1, free ports), its `cloud_partition` served by the
test-only FailOnceService (tests/failing_service.py: the real partition, which a test can make fail
once), with a 1 MiB byte budget per model and a 16 MiB request limit. Each test is one attack from
the issue; the well-behaved edges beside it must finish with the tokens of an undisturbed run. Run
with -s to see the figures each test prints.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import re
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from edge_runtime.cloud_only import CloudOnlySession
from edge_runtime.torch_runner import TorchRunner
from edge_runtime.session import DecodingSession
from edge_runtime.triton_link import TritonLink
from plugin.model.checkpoint import load_model
from plugin.protocol.codec import encode, EncodedRows
from plugin.protocol.errors import error_code, ErrorCode, ProtocolError
from plugin.protocol.messages import CloudRequest, new_session_key
from plugin.protocol.tensors import OUTPUTS
from plugin.protocol.wire import request_inputs
from plugin.serving.healer import stub_processes
from plugin.serving.repository import ServeOptions, write_repository
from plugin.split.edge import EdgePartition
from plugin.split.limits import Limits
from plugin.split.local import LocalCloud
from plugin.split.plan import PartitionPlan
from tests.failing_service import arm, use_failing_partition
from tests.soak import metric
from tests.tiny_models import LAYERS, save_tiny

pytestmark = pytest.mark.server
SPLIT, EXITS, HIDDEN = 4, (1, 3, 4), 64
PROMPTS = [[5, 17, 33, 2, 71, 8], [90, 4, 4, 12, 61], [42, 7, 7], [3, 3, 3, 9, 1]]
BUDGET = 1 << 20
NEAR_LIMIT_ROWS = 1 << 16  # fp32 rows of 256 bytes: 16 MiB
LIMITS = Limits(max_sessions=32, max_context=16384, max_block_rows=NEAR_LIMIT_ROWS, ttl_s=600,
                max_request_bytes=(16 << 20) + 64, max_state_bytes=BUDGET)


@pytest.fixture(scope="module")
def iso(tmp_path_factory, start_server):
    ckpt = tmp_path_factory.mktemp("ckpt")
    save_tiny("llama", ckpt)
    plan = PartitionPlan(ckpt, SPLIT, EXITS, threshold=1.0, codec="fp16")
    repo = tmp_path_factory.mktemp("repo")
    write_repository(plan, repo, ServeOptions(limits=LIMITS))
    use_failing_partition(repo)
    server = start_server(repo)
    edge = EdgePartition(TorchRunner(load_model(ckpt, range(0, SPLIT))), plan)
    return server, edge, ckpt, repo


def _reference(ckpt, edge, prompt, n, threshold=1.0, mode="collaborative"):
    if mode == "cloud-only":
        return CloudOnlySession(LocalCloud(load_model(ckpt)), sequence_id=1).generate(prompt, n).token_ids
    cloud = LocalCloud(load_model(ckpt, range(SPLIT, LAYERS)))
    return DecodingSession(edge, cloud, mode, threshold=threshold, sequence_id=1).generate(prompt, n).token_ids


def _generate(server, edge, prompt, n, sid, mode="collaborative", threshold=1.0):
    model = "cloud_only" if mode == "cloud-only" else "ce_collm"
    link = TritonLink(server.grpc_url, model, timeout_s=120)
    try:
        gen = (CloudOnlySession(link, sequence_id=sid) if mode == "cloud-only"
               else DecodingSession(edge, link, mode, threshold=threshold, sequence_id=sid))
        return gen.generate(prompt, n)
    finally:
        link.close()


def _infer(client, model, req: CloudRequest):
    tensors = []
    for name, value in request_inputs(req).items():
        t = grpcclient.InferInput(name, list(value.shape), {"float16": "FP16", "float32": "FP32", "int64": "INT64",
                                                             "bool": "BOOL", "int32": "INT32"}[value.dtype.name])
        t.set_data_from_numpy(np.ascontiguousarray(value))
        tensors.append(t)
    return client.infer(model, tensors, outputs=[grpcclient.InferRequestedOutput(n) for n in OUTPUTS],
                        sequence_id=req.sequence_id, sequence_start=req.start, sequence_end=req.end, client_timeout=120)


def _batching(server, model) -> tuple[int, int]:
    """(requests, executions) of `model` so far, from Triton's statistics: more requests than executions
    means some executions computed batches of several requests."""
    url = f"http://{server.http_url}/v2/models/{model}/stats"
    stats = json.loads(urllib.request.urlopen(url, timeout=10).read())["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def test_a_bad_request_in_a_batch_of_good_ones_disturbs_none(iso):
    """Issue 18, item 1: empty token requests (and NaN rows, for the ensemble) sent while 4 cloud-only and
    4 collaborative edges run; every edge finishes with its undisturbed tokens."""
    server, edge, ckpt, _ = iso
    n = 24
    expected = {mode: [_reference(ckpt, edge, p, n, mode=mode) for p in PROMPTS]
                for mode in ("cloud-only", "collaborative")}
    before = {m: _batching(server, m) for m in ("cloud_only", "cloud_partition")}
    done, refusals = threading.Event(), []

    def attack():
        client = grpcclient.InferenceServerClient(server.grpc_url)
        sid = 0x0BAD_0000
        while not done.is_set():
            sid += 1
            nan = np.ones((3, HIDDEN), np.float16)
            nan[2, 5] = np.nan
            bad = [("cloud_only", CloudRequest(sid, 0, True, token_ids=np.zeros(0, np.int64), start=True,
                                               session_key=new_session_key())),
                   ("ce_collm", CloudRequest(sid, 0, True, rows=EncodedRows("fp16", nan), split_layer=SPLIT,
                                             start=True, session_key=new_session_key())),
                   ("ce_collm", CloudRequest(sid, 0, True, rows=EncodedRows("fp16", nan[:0]), split_layer=SPLIT,
                                             start=True, session_key=new_session_key()))]
            for model, req in bad:
                try:
                    _infer(client, model, req)
                    refusals.append("accepted")
                except InferenceServerException as e:
                    refusals.append(error_code(e.message(), e.status()).name)
        client.close()

    attacker = threading.Thread(target=attack, daemon=True)
    attacker.start()
    try:
        with cf.ThreadPoolExecutor(8) as pool:
            runs = {mode: [pool.submit(_generate, server, edge, p, n, 0x600D_0000 + 10 * i + (mode == "cloud-only"),
                                       mode) for i, p in enumerate(PROMPTS)] for mode in expected}
            got = {mode: [f.result(timeout=300).token_ids for f in futures] for mode, futures in runs.items()}
    finally:
        done.set()
        attacker.join(timeout=120)
    assert got == expected
    assert refusals and set(refusals) == {"MALFORMED"}, set(refusals)
    batched = {m: (_batching(server, m)[0] - before[m][0], _batching(server, m)[1] - before[m][1]) for m in before}
    print(f"\n{len(refusals)} bad requests refused ({sorted(set(refusals))}) while 8 edges x {n} tokens finished "
          f"unchanged; requests/executions: {batched}")


def test_two_edges_on_one_sequence_id_get_one_error_and_no_wrong_token(iso):
    """Issue 18, item 7: the second edge on a live id is refused at once; the first never notices."""
    server, edge, ckpt, _ = iso
    expected = _reference(ckpt, edge, PROMPTS[0], 20)
    sid = 0x7770_0001
    first_link = TritonLink(server.grpc_url)
    first = DecodingSession(edge, first_link, "collaborative", threshold=1.0, sequence_id=sid).stream(PROMPTS[0], 20)
    tokens = [next(first).token_id for _ in range(3)]
    with pytest.raises(ProtocolError, match="belongs to another session key") as err:
        _generate(server, edge, PROMPTS[1], 20, sid)
    assert err.value.code is ErrorCode.SESSION_KEY
    assert tokens + [r.token_id for r in first] == expected
    first_link.close()
    # both at once, 4 times: whichever STARTs second is refused; no edge ever gets a wrong token
    outcomes = []
    for trial in range(4):
        start = threading.Barrier(2)

        def one(prompt, sid=0x7770_0100 + trial):
            start.wait()
            try:
                return _generate(server, edge, prompt, 20, sid).token_ids
            except ProtocolError as e:
                return e.code

        with cf.ThreadPoolExecutor(2) as pool:
            outcomes.append(list(pool.map(one, PROMPTS[:2])))
    wanted = [expected, _reference(ckpt, edge, PROMPTS[1], 20)]
    for outcome in outcomes:
        assert all(o is ErrorCode.SESSION_KEY or o == wanted[i] for i, o in enumerate(outcome)), outcome
        assert sum(o is ErrorCode.SESSION_KEY for o in outcome) <= 1
    print(f"\nconcurrent trials, errors per trial: {[sum(o is ErrorCode.SESSION_KEY for o in t) for t in outcomes]}")


def test_a_partition_failure_after_the_context_manager_applied_the_request_costs_one_resync(iso):
    """Issue 18, item 3: the partition fails on a token request the context manager had applied; the edge
    is answered "needs START", re-syncs both steps and its output is exact."""
    server, edge, ckpt, repo = iso
    expected = _reference(ckpt, edge, PROMPTS[1], 24, threshold=0.08)
    link = TritonLink(server.grpc_url)
    gen = DecodingSession(edge, link, "collaborative", threshold=0.08, sequence_id=0x3A11_0001)
    stream = gen.stream(PROMPTS[1], 24)
    tokens = [next(stream).token_id for _ in range(6)]
    arm(repo)
    tokens += [r.token_id for r in stream]
    link.close()
    assert tokens == expected and gen.stats.resyncs == 1
    assert not (repo / "cloud_partition_fails_once").exists()  # it did fail
    assert "ce-collm-test: the cloud partition fails once" in server.log_tail(400)  # with its traceback


def _stub_memory_mib(server, model) -> dict[str, float]:
    pid = next(p for p, m in stub_processes(server.pid).items() if m == model)
    status = Path(f"/proc/{pid}/status").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", status, re.M).group(1)) / 1024
            for k in ("VmRSS", "RssAnon", "RssShmem")}


def test_refused_near_limit_requests_leave_no_memory_behind(iso):
    """Issue 18, item 5: 100 refused 16 MiB blocks (a position gap, NaN in the last row, another session's
    key); the context manager's stub is back within 50 MB of where it started."""
    server, edge, _, _ = iso
    link, sid, key = TritonLink(server.grpc_url), 0x4E40_0001, new_session_key()
    link.send(CloudRequest(sid, 0, False, rows=encode(torch.randn(2, HIDDEN), "fp16"), split_layer=SPLIT, start=True,
                           session_key=key))
    rows = np.ones((NEAR_LIMIT_ROWS, HIDDEN), np.float32)  # 16 MiB
    nan_rows = rows.copy()
    nan_rows[-1, -1] = np.nan
    attacks = [(CloudRequest(sid, 5, False, rows=EncodedRows("fp32", rows), session_key=key), ErrorCode.POSITION_GAP),
               (CloudRequest(sid, 2, False, rows=EncodedRows("fp32", nan_rows), session_key=key), ErrorCode.MALFORMED),
               (CloudRequest(sid, 2, False, rows=EncodedRows("fp32", rows), session_key=key + 1),
                ErrorCode.SESSION_KEY)]
    start = _stub_memory_mib(server, "context_manager")
    t0 = time.monotonic()
    for i in range(100):
        req, code = attacks[i % 3]
        with pytest.raises(ProtocolError) as err:
            link.send(req)
        assert err.value.code is code
    took = time.monotonic() - t0
    after = _stub_memory_mib(server, "context_manager")
    link.send(CloudRequest(sid, 2, True, rows=encode(torch.randn(1, HIDDEN), "fp16"), end=True, session_key=key))
    link.close()
    print(f"\ncontext_manager stub before / after 100 refused 16 MiB requests ({took:.1f} s): "
          + ", ".join(f"{k} {start[k]:.0f} / {after[k]:.0f} MiB" for k in start))
    assert after["VmRSS"] - start["VmRSS"] < 50, (start, after)


def test_a_full_byte_budget_refuses_clearly_while_others_keep_serving(iso):
    """Issue 18, item 6: one session uploads until the context manager's 1 MiB budget is full; it is refused
    with MEMORY_BUDGET, the metrics show it, two edges beside it finish unchanged, and END frees the room."""
    server, edge, ckpt, _ = iso
    expected = [_reference(ckpt, edge, p, 16) for p in PROMPTS[:2]]
    refused_before = metric(server.metrics_url, "ce_collm_memory_refusals_total", "context_manager") or 0
    link = TritonLink(server.grpc_url)
    hog, key = 0x8000_0001, new_session_key()

    def block(sid, pos, key):  # 128 KiB of rows
        return CloudRequest(sid, pos, False, rows=encode(torch.randn(1024, HIDDEN), "fp16"), split_layer=SPLIT,
                            start=pos == 0, session_key=key)

    pos = 0
    with pytest.raises(ProtocolError, match=r"memory budget: .* of its 1048576 \(max_state_bytes\)") as err:
        while pos < LIMITS.max_context:
            link.send(block(hog, pos, key))
            pos += 1024
    assert err.value.code is ErrorCode.MEMORY_BUDGET and pos == 8 * 1024  # 8 x 128 KiB fill it
    assert metric(server.metrics_url, "ce_collm_state_budget_bytes", "context_manager") == BUDGET
    assert metric(server.metrics_url, "ce_collm_memory_refusals_total", "context_manager") == refused_before + 1
    held = metric(server.metrics_url, "ce_collm_pending_bytes", "context_manager")
    with cf.ThreadPoolExecutor(2) as pool:  # the budget is full: edges that need no more of it keep serving
        runs = [pool.submit(_generate, server, edge, p, 16, 0x8000_0100 + i) for i, p in enumerate(PROMPTS[:2])]
        got = [f.result(timeout=300).token_ids for f in runs]
    assert got == expected
    link.send(CloudRequest(hog, pos, False, rows=encode(torch.randn(0, HIDDEN), "fp16"), end=True, session_key=key))
    other = new_session_key()
    link.send(block(0x8000_0002, 0, other))  # END gave the room back
    link.send(CloudRequest(0x8000_0002, 1024, False, rows=encode(torch.randn(0, HIDDEN), "fp16"), end=True,
                           session_key=other))
    link.close()
    print(f"\nbudget {BUDGET} bytes: refused after {pos // 1024} uploads of 128 KiB ({held:.0f} bytes held); "
          "2 edges beside it unchanged")
