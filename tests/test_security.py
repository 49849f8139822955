"""Attacks of a hostile client on a default server, each refused (docs/security.md).

Every test here is an attack that worked before the fix it names: a client loading its own Python into
the server, a client calling an internal model with a live sequence id but not its key, a client
filling the session table or Triton's sequence slots so that nobody else gets in.
"""
from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from edge_runtime.cloud_only import CloudOnlySession
from edge_runtime.torch_runner import TorchRunner
from edge_runtime.session import DecodingSession
from edge_runtime.triton_link import TritonLink
from plugin.model.checkpoint import load_model
from plugin.protocol.codec import encode
from plugin.protocol.errors import error_code, ErrorCode
from plugin.protocol.messages import CloudRequest, Drafts, new_session_key, PendingBlock
from plugin.protocol.tensors import CLIENT_HEADER, CLOUD_PARTITION, CONTEXT_MANAGER, ENSEMBLE, TENSORS
from plugin.protocol.wire import block_outputs, request_inputs, Tensors
from plugin.serving.repository import ServeOptions, write_repository
from plugin.serving.server import admin_headers
from plugin.split.edge import EdgePartition
from plugin.split.limits import Limits
from plugin.split.local import LocalCloud
from plugin.split.plan import PartitionPlan
from tests.identity_model import write_identity_repository
from tests.soak import metric
from tests.tiny_models import LAYERS, save_tiny

pytestmark = pytest.mark.server
SPLIT, HIDDEN = 4, 64
PROMPT = [5, 17, 33, 2, 71, 8]
KV_BYTES_PER_POSITION = 2 * 2 * 2 * 16 * 4  # 2 cloud layers x (K, V) x 2 KV heads x head_dim 16 x float32
FILL = 1000  # positions of a session that fills the byte budget but for less than a prompt's KV
LIMITS = Limits(max_sessions=8, max_state_bytes=KV_BYTES_PER_POSITION * FILL + 2000, slot_idle_s=3)

EVIL_MODEL = """import pathlib
pathlib.Path({marker!r}).write_text("client code ran in the server")


class TritonPythonModel:
    def execute(self, requests):
        return []
"""
EVIL_CONFIG = json.dumps({"name": "evil", "backend": "python", "max_batch_size": 0,
                          "input": [{"name": "IN", "data_type": "TYPE_FP32", "dims": [1]}],
                          "output": [{"name": "OUT", "data_type": "TYPE_FP32", "dims": [1]}]})


@pytest.fixture(scope="module")
def healing_server(tmp_path_factory, start_server):
    """What `ce-collm serve` runs by default: the healer on, so Triton is in model-control mode explicit."""
    repo = write_identity_repository(tmp_path_factory.mktemp("identity-repo"))
    return start_server(repo, heal_stubs=True)


def test_no_client_loads_its_own_code_or_unloads_a_model(healing_server, tmp_path):
    server = healing_server
    marker = tmp_path / "pwned"
    files = {"file:1/model.py": EVIL_MODEL.format(marker=str(marker)).encode()}
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    http = httpclient.InferenceServerClient(server.http_url)
    for client in (grpc, http):
        with pytest.raises(InferenceServerException, match="restricted"):
            client.load_model("evil", config=EVIL_CONFIG, files=files)
        with pytest.raises(InferenceServerException, match="restricted"):
            client.unload_model("identity")
        with pytest.raises(InferenceServerException, match="restricted"):
            client.register_system_shared_memory("peek", "/ce_collm_anything", 64)
    assert not marker.exists()
    assert grpc.is_model_ready("identity") and not grpc.is_model_ready("evil")
    # the launcher, with its secret, still reaches the API (its healer uses it)
    assert {m["name"] for m in server.repository_index()} == {"identity"}


def test_admin_apis_need_the_launchers_secret_not_any(healing_server):
    url = f"http://{healing_server.http_url}/v2/repository/index"
    for headers in ({}, admin_headers("guessed"), {"triton-grpc-protocol-ce-collm-admin": healing_server.admin_secret}):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url, data=b"{}", headers=headers), timeout=10)
        assert refused.value.code == 403
    grpc = grpcclient.InferenceServerClient(healing_server.grpc_url)
    with pytest.raises(InferenceServerException, match="restricted"):
        grpc.get_model_repository_index(headers=admin_headers(healing_server.admin_secret))  # the HTTP spelling
    assert grpc.get_model_repository_index(headers=admin_headers(healing_server.admin_secret, grpc=True)) is not None
    assert healing_server.admin_secret not in " ".join(healing_server.command(shown=True))


# -- internal models: no session without its key ---------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory, start_server):
    ckpt = tmp_path_factory.mktemp("ckpt")
    save_tiny("llama", ckpt)
    plan = PartitionPlan(ckpt, SPLIT, (2, SPLIT), threshold=1.0, codec="fp16")
    repo = tmp_path_factory.mktemp("repo")
    write_repository(plan, repo, ServeOptions(limits=LIMITS))
    edge = EdgePartition(TorchRunner(load_model(ckpt, range(0, SPLIT))), plan)
    return start_server(repo), edge, ckpt


def _send(url: str, model: str, tensors: Tensors, sequence_id: int, start: bool = False, end: bool = False,
          headers: dict[str, str] | None = None) -> ErrorCode | None:
    """One raw request; the code it was refused with, None if it was answered."""
    inputs = []
    for name, value in tensors.items():
        t = grpcclient.InferInput(name, list(value.shape), TENSORS[name].triton_dtype)
        t.set_data_from_numpy(np.ascontiguousarray(value))
        inputs.append(t)
    client = grpcclient.InferenceServerClient(url)
    try:
        client.infer(model, inputs, sequence_id=sequence_id, sequence_start=start, sequence_end=end,
                     client_timeout=60, headers=headers)
    except InferenceServerException as e:
        return error_code(e.message(), str(e.status()))
    finally:
        client.close()
    return None


ATTACKS = ("read", "append", "rollback", "start-over", "end")  # END last: Triton frees the slot it ends


def _attack(model: str, what: str, sid: int, pos: int, key: int) -> tuple[Tensors, bool, bool]:
    """A request that would read, extend, roll back, restart or end session `sid` (at its next position `pos`),
    with `key` (0: none); as the edge-facing inputs, or as cloud_partition's own (what the context manager hands)."""
    rows = torch.randn(1 if what != "start-over" else 3, HIDDEN) * 1e4  # garbage a victim would be computed over
    start, end = what == "start-over", what == "end"
    want = what in ("read", "rollback", "start-over")
    n = 0 if end else rows.shape[0]
    first = 0 if start else pos
    rollback = pos if what == "rollback" else None
    if model == CLOUD_PARTITION:
        block = PendingBlock(sid, SPLIT, first, rows[:n], want, start, end, session_key=key, rollback_to=rollback,
                             drafts=Drafts.of([(1, SPLIT)]) if want else None)
        return block_outputs(block), start, end
    req = CloudRequest(sid, first, want, rows=encode(rows[:n], "fp32"), split_layer=SPLIT if start else None,
                       start=start, end=end, session_key=key, rollback_to=rollback)
    return request_inputs(req), start, end


@pytest.mark.parametrize("model", [CLOUD_PARTITION, CONTEXT_MANAGER, ENSEMBLE])
def test_no_model_touches_a_session_without_its_key(tiny_server, model):
    """A client that knows a live sequence id, but not its key, reads, appends, rolls back, restarts and ends
    it through each model it can name: each is refused SESSION_KEY, and the victim's tokens are an undisturbed
    run's (an END costs it one re-sync at most: Triton frees the sequence slot on END even when the model
    refuses it)."""
    server, edge, ckpt = tiny_server
    reference = DecodingSession(edge, LocalCloud(load_model(ckpt, range(SPLIT, LAYERS))), "collaborative",
                                sequence_id=1).generate(PROMPT, 12).token_ids
    sid = 0x5EC0_0000 + len(model)
    link = TritonLink(server.grpc_url, timeout_s=60)
    victim = DecodingSession(edge, link, "collaborative", sequence_id=sid)
    tokens, refusals = [], {}
    for record in victim.stream(PROMPT, 12):
        tokens.append(record.token_id)
        if len(tokens) == 5:
            pos = len(PROMPT) + len(tokens) - 1
            for what in ATTACKS:
                for key in (0, new_session_key()) if what != "end" else (new_session_key(),):
                    tensors, start, end = _attack(model, what, sid, pos, key)
                    refusals[(what, key > 0)] = _send(server.grpc_url, model, tensors, sid, start, end)
    link.close()
    assert refusals == {attack: ErrorCode.SESSION_KEY for attack in refusals}, refusals
    assert tokens == reference
    assert victim.stats.resyncs <= 1


# -- fair sharing: one client cannot lock others out ----------------------------------------------------
def _as(client: str) -> dict[str, str]:
    """The header a front sets to the client it authenticated (tests/test_replicas.py: through nginx)."""
    return {CLIENT_HEADER: client}


def _open(url: str, client: str, sid: int, rows: int = 1, want: bool = False) -> ErrorCode | None:
    """A valid START of `rows` rows (want: and a token, so the cloud partition holds their KV), with a key of its
    own: what a flooding client sends."""
    req = CloudRequest(sid, 0, want, rows=encode(torch.randn(rows, HIDDEN), "fp32"), split_layer=SPLIT, start=True,
                       session_key=sid)
    return _send(url, ENSEMBLE, request_inputs(req), sid, start=True, headers=_as(client))


def _close(url: str, client: str, sid: int, pos: int) -> None:
    """END a session _open started (whatever is left of it), so the next test finds the tables as they were."""
    req = CloudRequest(sid, pos, False, rows=encode(torch.zeros(0, HIDDEN), "fp32"), end=True, session_key=sid)
    _send(url, ENSEMBLE, request_inputs(req), sid, end=True, headers=_as(client))


def _victim_run(server, edge, ckpt, sid: int, attack=lambda: None) -> tuple[list[int], list[int], DecodingSession]:
    """alice's edge streams 12 tokens at threshold 1.0 and calls `attack()` after the 4th; her tokens, the
    undisturbed run's, and her session."""
    reference = DecodingSession(edge, LocalCloud(load_model(ckpt, range(SPLIT, LAYERS))), "collaborative",
                                sequence_id=1).generate(PROMPT, 12).token_ids
    link = TritonLink(server.grpc_url, timeout_s=60, headers=_as("alice"))
    alice = DecodingSession(edge, link, "collaborative", sequence_id=sid)
    tokens = []
    for record in alice.stream(PROMPT, 12):
        tokens.append(record.token_id)
        if len(tokens) == 4:
            attack()
    link.close()
    return tokens, reference, alice


def test_a_client_filling_the_session_table_evicts_its_own_not_a_newcomer(tiny_server):
    """mallory opens more sessions than the table holds while alice generates; mallory's STARTs past the
    table are refused, and bob, a newcomer, starts at once in the place of mallory's least recent session."""
    server, edge, ckpt = tiny_server
    outcome = {}

    def flood():
        outcome["mallory"] = [_open(server.grpc_url, "mallory", 0x3A11_0000 + i) for i in range(2 * LIMITS.max_sessions)]
        t0 = time.perf_counter()
        outcome["bob"] = _open(server.grpc_url, "bob", 0x3A11_B0B0)
        outcome["bob_s"] = time.perf_counter() - t0

    tokens, reference, alice = _victim_run(server, edge, ckpt, 0x3A11_A11C, flood)
    assert tokens == reference and alice.stats.resyncs == 0  # the running edge never noticed
    taken = LIMITS.max_sessions - 1  # all but alice's
    assert outcome["mallory"] == [None] * taken + [ErrorCode.TOO_MANY_SESSIONS] * (2 * LIMITS.max_sessions - taken)
    assert outcome["bob"] is None and outcome["bob_s"] < 1.0
    for sid, client in [(0x3A11_0000 + i, "mallory") for i in range(taken)] + [(0x3A11_B0B0, "bob")]:
        _close(server.grpc_url, client, sid, 1)
    print(f"bob started in {outcome['bob_s'] * 1000:.0f} ms with the table full of mallory's sessions")


def test_a_client_filling_the_byte_budget_makes_room_for_others(tiny_server):
    """eve fills the cloud partition's byte budget with one session's KV; alice then needs bytes for her prompt's
    KV and gets them in the place of eve's session, not a MEMORY_BUDGET refusal; eve cannot do the same to her."""
    server, edge, ckpt = tiny_server
    assert _open(server.grpc_url, "eve", 0x3A11_0F00, rows=FILL, want=True) is None
    again = []
    tokens, reference, alice = _victim_run(
        server, edge, ckpt, 0x3A11_A11D, lambda: again.append(_open(server.grpc_url, "eve", 0x3A11_0F01, FILL, True)))
    assert tokens == reference and alice.stats.resyncs == 0
    assert again == [ErrorCode.MEMORY_BUDGET]
    for sid in (0x3A11_0F00, 0x3A11_0F01):  # the second a ghost: the context manager took its START, the partition not
        _close(server.grpc_url, "eve", sid, FILL)


def test_a_flood_of_refused_starts_holds_no_session_and_locks_nobody_out(tiny_server):
    """Keyless STARTs, each refused by the model, as fast as 4 threads send them: Triton keeps each one's
    sequence slot for slot_idle_s, so there are many more slots than sessions (ServeOptions.slots); alice then
    starts within a second, and the refused STARTs hold no session in either model."""
    server, edge, ckpt = tiny_server
    flood = ServeOptions(limits=LIMITS).slots() * 3 // 4
    live = {model: metric(server.metrics_url, "ce_collm_sessions_live", model) for model in (CONTEXT_MANAGER, CLOUD_PARTITION)}

    def refused_starts(first: int) -> list[ErrorCode | None]:
        rows = encode(torch.zeros(1, HIDDEN), "fp32")
        return [_send(server.grpc_url, ENSEMBLE, request_inputs(CloudRequest(sid, 0, True, rows=rows, split_layer=SPLIT,
                                                                              start=True)), sid, start=True)
                for sid in range(first, first + flood // 4)]

    with ThreadPoolExecutor(4) as pool:
        answers = [code for codes in pool.map(refused_starts, range(0x7100_0000, 0x7100_0000 + flood, flood // 4))
                   for code in codes]
    assert answers == [ErrorCode.SESSION_KEY] * len(answers)
    t0 = time.perf_counter()
    assert _open(server.grpc_url, "alice", 0x3A11_A11E, rows=len(PROMPT), want=True) is None
    waited = time.perf_counter() - t0
    _close(server.grpc_url, "alice", 0x3A11_A11E, len(PROMPT))
    assert waited < 1.0
    print(f"after {len(answers)} refused STARTs, a START got its token in {waited * 1000:.0f} ms")
    for model in (CONTEXT_MANAGER, CLOUD_PARTITION):
        assert metric(server.metrics_url, "ce_collm_sessions_live", model) == live[model]


def test_drafts_from_exits_outside_the_plan_add_no_metric_series(tiny_server):
    """A client naming any exit in [1, split] gets its drafts checked, but the per-exit agreement metrics keep
    one series per plan exit and "lookup": the rest count under exit="other"."""
    server, _, _ = tiny_server
    sid = 0x3A11_D0D0
    rows = encode(torch.randn(2, HIDDEN), "fp32")
    req = CloudRequest(sid, 0, True, rows=rows, split_layer=SPLIT, start=True, end=True, session_key=sid,
                       drafts=Drafts.of([(3, 1), (4, 3)]))
    assert _send(server.grpc_url, ENSEMBLE, request_inputs(req), sid, start=True, end=True) is None
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    series = set(re.findall(r'^ce_collm_verified_rows_total\{exit="([^"]+)",model="cloud_partition"\}', text, re.M))
    assert series == {"2", "4", "lookup", "other"}
    assert re.search(r'^ce_collm_verified_rows_total\{exit="other",model="cloud_partition"\} ([0-9]+)', text,
                     re.M).group(1) != "0"


def test_an_edge_idle_longer_than_the_slot_timeout_resumes_without_a_resync(tiny_server):
    """The short slot idle time that frees refused STARTs' slots also frees an idle edge's: its next request is
    answered SLOT_EXPIRED, and the same request with START resumes the session the models kept."""
    server, edge, ckpt = tiny_server
    tokens, reference, alice = _victim_run(server, edge, ckpt, 0x3A11_A11F, lambda: time.sleep(LIMITS.slot_idle_s + 1.5))
    assert tokens == reference
    assert (alice.stats.resumes, alice.stats.resyncs) == (1, 0)


def test_a_cloud_only_client_idle_longer_than_the_slot_timeout_resumes_too(tiny_server):
    server, _, ckpt = tiny_server
    reference = CloudOnlySession(LocalCloud(load_model(ckpt)), sequence_id=1).generate(PROMPT, 8).token_ids
    link = TritonLink(server.grpc_url, "cloud_only", timeout_s=60)
    session = CloudOnlySession(link, sequence_id=0x3A11_C0C0)
    tokens = []
    for record in session.stream(PROMPT, 8):
        tokens.append(record.token_id)
        if len(tokens) == 3:
            time.sleep(LIMITS.slot_idle_s + 1.5)
    link.close()
    assert tokens == reference and session.stats.resumes == 1
