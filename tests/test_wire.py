"""Protocol tensors <-> dataclasses: every shape and dtype rule, without a server."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from plugin.protocol.codec import CODEC_DTYPES, encode, to_array
from plugin.protocol.errors import ProtocolError
from plugin.protocol.messages import CloudReply, CloudRequest, PendingBlock
from plugin.protocol.tensors import (
    HIDDEN_ROWS, PASS_MS, PENDING_HIDDEN, SESSION_KEY, SPLIT_LAYER, START_POS, WANT_TOKEN)
from plugin.protocol.wire import (
    block_from_inputs, block_outputs, reply_from_outputs, reply_outputs, request_from_inputs, request_inputs)


@pytest.mark.parametrize("codec", sorted(CODEC_DTYPES))
def test_request_round_trip(codec):
    req = CloudRequest(7, 12, True, rows=encode(torch.randn(3, 40), codec), split_layer=4, start=True)
    inputs = request_inputs(req)
    scale = HIDDEN_ROWS.scale(codec)
    assert set(inputs) - {START_POS, WANT_TOKEN, SPLIT_LAYER, SESSION_KEY} == {HIDDEN_ROWS.data(codec)} | (
        {scale} if scale else set())
    back = request_from_inputs(inputs, 7, True, False)
    assert (back.sequence_id, back.start_pos, back.want_token, back.split_layer) == (7, 12, True, 4)
    assert back.rows.codec == codec and np.array_equal(back.rows.data, req.rows.data)
    if scale:  # int8g: [3, ceil(40 / 16)] scales
        assert np.array_equal(back.rows.scale, req.rows.scale) and back.rows.scale.shape[1] in (1, 3)


def test_token_ids_round_trip():
    req = CloudRequest(3, 0, True, token_ids=np.array([5, 6, 7], np.int64))
    assert request_from_inputs(request_inputs(req), 3, True, False).token_ids.tolist() == [5, 6, 7]


def _inputs(**changes):
    inputs = request_inputs(CloudRequest(7, 2, False, rows=encode(torch.randn(2, 16), "fp16")))
    for name, value in changes.items():
        if value is None:
            inputs.pop(name)
        else:
            inputs[name] = value
    return inputs


@pytest.mark.parametrize("changes, sequence_id, message", [
    ({}, 0, "non-zero sequence_id"),
    ({"START_POS": None}, 7, "START_POS is required"),
    ({"START_POS": np.array([[-1]], np.int64)}, 7, "must be >= 0"),
    ({"START_POS": np.array([[1]], np.int32)}, 7, "START_POS must be int64"),
    ({"WANT_TOKEN": np.array([[1, 0]], np.bool_)}, 7, r"shape \[1, 1\]"),
    ({"HIDDEN_FP16": None}, 7, "exactly one of"),
    ({"HIDDEN_FP32": np.zeros((1, 2, 16), np.float32)}, 7, "exactly one of"),
    ({"TOKEN_IDS": np.zeros((1, 2), np.int64)}, 7, "exactly one of"),
    ({"HIDDEN_FP16": np.zeros((2, 2, 16), np.float16)}, 7, "batch size 1"),
    ({"HIDDEN_FP16": np.zeros((2, 16), np.float16)}, 7, "3 dimensions"),
])
def test_malformed_requests_are_refused(changes, sequence_id, message):
    with pytest.raises(ProtocolError, match=message):
        request_from_inputs(_inputs(**changes), sequence_id, False, False)


@pytest.mark.parametrize("codec", sorted(CODEC_DTYPES))
def test_block_and_reply_round_trip(codec):
    block = PendingBlock(9, 4, 10, encode(torch.randn(3, 40), codec), True)
    back = block_from_inputs(block_outputs(block), 9, False, True)
    assert (back.split_layer, back.start_pos, back.want_token, back.end) == (4, 10, True, True)
    assert back.rows.codec == codec and np.array_equal(back.rows.data, block.rows.data)
    assert (back.rows.scale is None) == (block.rows.scale is None)
    if block.rows.scale is not None:
        assert np.array_equal(back.rows.scale, block.rows.scale)
    decoded = block_outputs(block, decoded_hop=True)[PENDING_HIDDEN]  # the TensorRT variant's hop
    assert decoded.dtype == np.float32 and np.array_equal(decoded[0], to_array(block.rows))
    reply = CloudReply(42, 0.5, [42, 7], [-0.69, -1.2], 5)
    assert reply_from_outputs(reply_outputs(reply)) == CloudReply(42, 0.5, [42, 7], pytest.approx([-0.69, -1.2]), 5)
    upload_only = reply_from_outputs(reply_outputs(CloudReply()))
    assert upload_only.token_id == -1 and upload_only.topk_ids == [] and upload_only.pass_s == 0.0


def test_pass_time_travels_in_milliseconds_and_is_0_where_a_model_does_not_declare_it():
    outputs = reply_outputs(CloudReply(42, 0.5, [42, 7], [-0.69, -1.2], 5, pass_s=0.0125))
    assert outputs[PASS_MS].dtype == np.float32 and outputs[PASS_MS].shape == (1, 1)
    assert outputs[PASS_MS][0, 0] == pytest.approx(12.5)
    assert reply_from_outputs(outputs).pass_s == pytest.approx(0.0125)
    del outputs[PASS_MS]  # the TensorRT variant's ensemble: its engine cannot time its pass
    assert reply_from_outputs(outputs).pass_s == 0.0
