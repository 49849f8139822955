"""What a session holds and who may change it, without a server (issue 18): per-request isolation in a
batch, the ensemble's two steps kept in step, session keys, the byte budget, memory freed at once.

The same rules through a real tritonserver: tests/test_isolation.py and tests/test_healing.py.
"""
from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from tritonclient.utils import InferenceServerException

from edge_runtime.cloud_only import CloudOnlySession
from edge_runtime.link import CloudUnreachable
from edge_runtime.torch_runner import TorchRunner
from edge_runtime.session import DecodingSession
from edge_runtime.triton_link import _translate
from plugin.model.checkpoint import load_model
from plugin.protocol.codec import check, CodecError, encode, EncodedRows
from plugin.protocol.errors import ErrorCode, ProtocolError, Recovery, SequenceNeedsStart
from plugin.protocol.messages import CloudRequest, new_session_key, PendingBlock
from plugin.protocol.wire import request_from_inputs, request_inputs
from plugin.serving.services import CloudOnlyService, ContextManagerService, RequestData
from plugin.split.cloud import CloudPartition
from plugin.split.context import ContextManager
from plugin.split.edge import EdgePartition
from plugin.split.limits import device_memory_bytes, Limits, MemoryBudget, STATE_SHARE
from plugin.split.local import LocalCloud
from plugin.split.plan import PartitionPlan
from tests.tiny_models import LAYERS, save_tiny

SPLIT, D = 4, 64
KEY = 0x5E55_10_4E7
PROMPT = [5, 17, 33, 2, 71, 8]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ckpt")
    save_tiny("llama", ckpt)
    return ckpt


def _rows(n: int, seed: int = 0, codec: str = "fp16") -> EncodedRows:
    return encode(torch.randn(n, D, generator=torch.Generator().manual_seed(seed)), codec)


def _req(sid, pos, n, want=False, start=False, end=False, key=KEY, seed=0, codec="fp16"):
    return CloudRequest(sid, pos, want, rows=_rows(n, seed + pos, codec), split_layer=SPLIT if start else None,
                        start=start, end=end, session_key=key)


def _block(sid, pos, n, start=False, seed=0):
    return PendingBlock(sid, SPLIT, pos, torch.randn(n, D, generator=torch.Generator().manual_seed(seed + pos)), True,
                        start=start, session_key=KEY)


# -- one request of a batch fails alone ------------------------------------------------------------------
def test_a_refused_or_failing_block_leaves_the_rest_of_its_batch_as_if_it_were_not_there(tiny):
    part, alone = (CloudPartition(load_model(tiny, range(SPLIT, LAYERS))) for _ in range(2))
    for sid in (1, 2, 3, 4):
        part.step([_block(sid, 0, 3, start=True, seed=sid)])
        alone.step([_block(sid, 0, 3, start=True, seed=sid)])
    run_layers = part.model.run_layers
    doomed = part.sequences[3].kv

    def fails_on_sequence_3(h, positions, first, last, sequences, lengths=None):
        if any(kv is doomed for kv in sequences):
            raise RuntimeError("a fault in the layers, met by sequence 3")
        return run_layers(h, positions, first, last, sequences, lengths)

    part.model.run_layers = fails_on_sequence_3
    batch = [_block(1, 3, 2, seed=1), PendingBlock(2, SPLIT, 3, torch.empty(0, D), True, session_key=KEY),  # no rows to compute
             _block(3, 3, 1, seed=3), _block(4, 5, 1, seed=4)]  # 3 fails in the layers; 4 is out of step
    replies = part.step(batch)
    expected = [alone.step([block])[0] for block in (batch[0],)]
    assert replies[0] == expected[0]  # computed as if the others had not been there
    assert replies[1].code is ErrorCode.MALFORMED and 2 in part.sequences
    assert isinstance(replies[2], SequenceNeedsStart) and "RuntimeError" in str(replies[2])
    assert "Traceback" in replies[2].details and 3 not in part.sequences  # dropped: the edge re-syncs it
    assert isinstance(replies[3], SequenceNeedsStart) and 4 not in part.sequences  # out of step: dropped too
    assert part.sequences[1].kv.length(SPLIT) == 5 and part.sequences[2].kv.length(SPLIT) == 3  # rewound once
    assert all(r.__traceback__ is None for r in replies[1:])  # kept errors keep no frames
    del part.model.run_layers
    assert part.step([_block(1, 5, 1, seed=1)]) == alone.step([_block(1, 5, 1, seed=1)])


def test_an_empty_cloud_only_token_request_is_refused_alone(tiny):
    """The attack of issue 18: TOKEN_IDS of shape [1, 0] with WANT_TOKEN gave "internal error: IndexError"."""
    cloud = LocalCloud(load_model(tiny))
    with pytest.raises(ProtocolError, match="token request with no rows") as err:
        cloud.send(CloudRequest(9, 0, True, token_ids=np.zeros(0, np.int64), start=True, session_key=KEY))
    assert err.value.code is ErrorCode.MALFORMED and not cloud.partition.sequences


# -- the two steps of the ensemble agree -----------------------------------------------------------------
def test_a_request_sent_again_never_overlaps_and_both_steps_stay_in_step(tiny):
    """The last request sent again (its reply was an error, or lost): an upload replaces the last one; a
    token request, which the partition may have computed, is answered "needs START", never "position
    overlap". Here the partition refuses a token request the context manager had applied (its byte
    budget); the edge's re-sync, once memory is free, gives the reference's token."""
    cloud, reference = (LocalCloud(load_model(tiny, range(SPLIT, LAYERS))) for _ in range(2))
    per_position = 2 * 2 * 16 * 4 * (LAYERS - SPLIT)  # K and V, 2 KV heads of 16, fp32, 2 layers: 512 bytes
    cloud.partition.budget = MemoryBudget(Limits(max_state_bytes=(60 + 16 + 8) * per_position))
    cloud.send(_req(1, 0, 60, want=True, start=True))  # a cache of 60 positions
    for c in (cloud, reference):
        c.send(_req(2, 0, 10, want=True, start=True, seed=2))  # a cache of 16 positions (the smallest)
    cloud.send(_req(2, 10, 3, seed=99))  # an upload whose reply was lost ...
    for c in (cloud, reference):
        c.send(_req(2, 10, 3, seed=2))  # ... sent again: it replaces the first
    again = _req(2, 13, 7, want=True, seed=2)  # 20 positions: the cache doubles to 32, past the budget
    with pytest.raises(ProtocolError, match="memory budget") as err:
        cloud.send(again)
    assert err.value.code is ErrorCode.MEMORY_BUDGET and err.value.code.recovery is Recovery.RETRY
    with pytest.raises(SequenceNeedsStart, match="may have computed already"):
        cloud.send(again)
    cloud.send(_req(1, 60, 0, end=True))  # another session ends: memory is free
    context = np.concatenate([_rows(10, 2).data, _rows(3, 12).data, _rows(7, 15).data])  # what _req sent
    resync = cloud.send(CloudRequest(2, 0, True, rows=EncodedRows("fp16", context), split_layer=SPLIT, start=True,
                                     session_key=KEY))
    expected = reference.send(again)
    assert (resync.token_id, resync.topk_ids) == (expected.token_id, expected.topk_ids)
    assert resync.topk_logprobs == pytest.approx(expected.topk_logprobs, abs=1e-4)
    with pytest.raises(ProtocolError, match="position overlap"):  # anything else behind the next position
        cloud.send(_req(2, 13, 7, want=True, seed=2))


def _edge_cloud_and_expected(tiny, threshold: float, n: int):
    """An edge, an in-process cloud, and the tokens of an undisturbed run of PROMPT on another cloud."""
    plan = PartitionPlan(tiny, SPLIT, (1, 3, 4), threshold)
    edge = EdgePartition(TorchRunner(load_model(tiny, range(0, SPLIT))), plan)
    cloud, reference = (LocalCloud(load_model(tiny, range(SPLIT, LAYERS))) for _ in range(2))
    return edge, cloud, DecodingSession(edge, reference, "collaborative", sequence_id=1).generate(PROMPT, n).token_ids


def test_a_partition_out_of_step_answers_needs_start_and_the_edge_resyncs(tiny):
    edge, cloud, expected = _edge_cloud_and_expected(tiny, 0.08, 24)
    gen = DecodingSession(edge, cloud, "collaborative", sequence_id=2)
    stream = gen.stream(PROMPT, 24)
    tokens = [next(stream).token_id for _ in range(8)]
    kv = cloud.partition.sequences[2].kv
    kv.rewind(type(kv.mark())({layer: length - 1 for layer, length in kv.mark().lengths.items()}, kv.pending))
    tokens += [r.token_id for r in stream]  # the partition lost a position the context manager counts as done
    assert tokens == expected and gen.stats.resyncs == 1


# -- sessions bound to their edge -------------------------------------------------------------------------
def test_a_session_answers_only_to_its_key():
    cm = ContextManager(D, LAYERS, Limits(max_requests_per_s=4))
    with pytest.raises(ProtocolError, match="START needs a SESSION_KEY") as err:
        cm.handle(_req(1, 0, 2, start=True, key=0))
    assert err.value.code is ErrorCode.SESSION_KEY and not cm.sessions
    cm.handle(_req(1, 0, 2, start=True))
    for req in (_req(1, 0, 3, start=True, key=KEY + 1), _req(1, 2, 1, key=KEY + 1), _req(1, 2, 1, key=0),
                _req(1, 2, 0, end=True, key=KEY + 1)) * 3:  # 12 refusals: more than the 4 requests/s a key may send
        with pytest.raises(ProtocolError, match="belongs to another session key") as err:
            cm.handle(req)
        assert err.value.code is ErrorCode.SESSION_KEY
    block = cm.handle(_req(1, 2, 1, want=True))  # nothing changed, and the refusals did not spend its rate
    assert block.rows.data.shape == (3, D) and block.start_pos == 0
    cm.handle(_req(1, 0, 1, start=True))  # its own key may START it again (a re-sync)


def test_two_edges_on_one_id_get_one_error_and_no_wrong_token(tiny):
    edge, cloud, expected = _edge_cloud_and_expected(tiny, 1.0, 12)
    first = DecodingSession(edge, cloud, "collaborative", sequence_id=7).stream(PROMPT, 12)
    tokens = [next(first).token_id for _ in range(3)]
    with pytest.raises(ProtocolError, match="belongs to another session key") as err:
        DecodingSession(edge, cloud, "collaborative", sequence_id=7).generate([9, 9, 9], 12)
    assert err.value.code is ErrorCode.SESSION_KEY
    assert tokens + [r.token_id for r in first] == expected
    full = LocalCloud(load_model(tiny))
    only = CloudOnlySession(full, sequence_id=8).stream(PROMPT, 4)
    next(only)
    with pytest.raises(ProtocolError, match="belongs to another session key"):  # cloud_only binds its sessions too
        CloudOnlySession(full, sequence_id=8).generate(PROMPT, 4)
    only.close()


def test_session_keys_are_random_and_travel_as_a_tensor():
    keys = {new_session_key() for _ in range(1000)}
    assert len(keys) == 1000 and all(1 <= k < 2**63 for k in keys)
    req = _req(3, 0, 2, start=True)
    assert request_from_inputs(request_inputs(req), 3, True, False).session_key == KEY
    inputs = request_inputs(req)
    inputs["SESSION_KEY"] = np.array([[-5]], np.int64)
    with pytest.raises(ProtocolError, match=r"SESSION_KEY must be in \[1, 2\^63\)"):
        request_from_inputs(inputs, 3, True, False)


# -- memory ---------------------------------------------------------------------------------------------
def test_pending_rows_stay_as_they_arrived_and_the_budget_refuses_before_storing():
    rows_fp16, rows_int8 = 10 * D * 2, 10 * D + 10 * 4
    cm = ContextManager(D, LAYERS, Limits(max_state_bytes=2 * rows_fp16 + rows_int8))
    cm.handle(_req(1, 0, 10, start=True))
    cm.handle(_req(3, 0, 10, start=True, codec="int8"))
    assert cm.pending_bytes == rows_fp16 + rows_int8  # not widened to fp32
    cm.handle(_req(2, 0, 10, start=True))
    with pytest.raises(ProtocolError, match=r"memory budget: this request needs 1280 more bytes") as err:
        cm.handle(_req(2, 10, 10))
    assert err.value.code is ErrorCode.MEMORY_BUDGET and cm.budget.refusals == 1
    assert cm.pending_bytes == 2 * rows_fp16 + rows_int8  # nothing stored
    block = cm.handle(_req(2, 10, 1, want=True))  # a token request hands its rows on: it needs no more memory
    assert block.rows.data.shape == (11, D) and block.rows.codec == "fp16"  # handed on as they arrived
    reference = ContextManager(D, LAYERS).handle(_req(1, 0, 10, start=True, want=True))
    assert np.array_equal(cm.handle(_req(1, 10, 0, want=True)).rows.data, reference.rows.data)
    cm.handle(_req(1, 10, 0, end=True))
    cm.handle(_req(2, 11, 10))  # memory freed by END is there for others


def test_the_default_budget_is_sized_from_the_machine(tiny):
    assert MemoryBudget(Limits()).limit_bytes == device_memory_bytes("cpu") // STATE_SHARE > 0
    assert MemoryBudget(Limits(max_state_bytes=12345)).limit_bytes == 12345
    kv = load_model(tiny, range(SPLIT, LAYERS)).new_sequence(SPLIT, LAYERS)
    for rows in (0, 5, 11, 40, 1):  # the projection the partition's budget checks is what the cache then holds
        projected = kv.nbytes_after(rows)
        for layer in kv.layers.values():
            layer.append(layer.length, torch.zeros(2, rows, 16), torch.zeros(2, rows, 16))
        assert kv.nbytes == projected


def test_refused_requests_free_their_memory_at_once(tiny):
    """No kept exception holds a frame holding the request's arrays: with the cyclic collector off, the
    arrays of 20 refused requests are gone as soon as their answers are."""
    params = {"checkpoint": str(tiny), "min_split_layer": str(SPLIT)}
    services = (ContextManagerService(params, tiny.parent), CloudOnlyService(params, tiny.parent))
    big = lambda: np.ones((1, 4096, D), np.float16)  # noqa: E731
    gc.collect()
    gc.disable()
    try:
        for service in services:
            alive = []
            for i in range(20):
                inputs = (request_inputs(_req(77, 3, 1, key=KEY)) if service is services[0]
                          else request_inputs(CloudRequest(77, 3, True, token_ids=np.zeros(1, np.int64))))
                name = next(iter(inputs))
                inputs[name] = big() if service is services[0] else np.zeros((1, 4096), np.int64)
                alive.append(weakref.ref(inputs[name]))
                results = service.execute([RequestData(inputs, 77, False, False)])
                assert isinstance(results[0], ProtocolError) and results[0].__traceback__ is None
                del inputs, results
            assert not any(ref() is not None for ref in alive), type(service).__name__
    finally:
        gc.enable()


def test_int8_rows_that_would_overflow_are_refused_without_widening():
    data = np.full((2, D), 127, np.int8)
    check(EncodedRows("int8", data, np.ones((2, 1), np.float32)), D)
    with pytest.raises(CodecError, match="NaN or Inf"):
        check(EncodedRows("int8", data, np.full((2, 1), 3e37, np.float32)), D)  # 127 x 3e37 is inf in float32
    with pytest.raises(CodecError, match="NaN or Inf"):
        check(EncodedRows("int8", np.full((2, D), -128, np.int8), np.full((2, 1), 3e36, np.float32)), D)


# -- the edge: a model being healed is a wait, not a refusal ----------------------------------------------
@pytest.mark.parametrize("message, status", [
    ("in ensemble 'ce_collm', Stub process 'cloud_partition_0_0' is not healthy.", "StatusCode.INTERNAL"),
    ("Request for unknown model: 'ce_collm' has no available versions", "StatusCode.NOT_FOUND"),
    ("failed to connect to all addresses", "StatusCode.UNAVAILABLE"),
])
def test_a_model_being_healed_is_a_cloud_not_serving(message, status):
    assert isinstance(_translate(InferenceServerException(message, status=status)), CloudUnreachable)
    assert isinstance(_translate(InferenceServerException("Request for unknown model: 'x' is not found",
                                                          status="StatusCode.NOT_FOUND")), ProtocolError)
