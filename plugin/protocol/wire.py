"""Protocol tensors <-> plugin dataclasses, for both sides of the wire.

model.py files and the edge's Triton client call these with plain dicts of numpy arrays, so
every shape and dtype rule is unit-tested without a server.
"""
from __future__ import annotations

import numpy as np
import torch

from plugin.protocol.codec import EncodedRows
from plugin.protocol.errors import ProtocolError
from plugin.protocol.messages import CloudReply, CloudRequest, PendingBlock
from plugin.protocol.tensors import (
    HIDDEN_INPUTS, HIDDEN_SCALE, PENDING_HIDDEN, PENDING_SPLIT, PENDING_START, PENDING_WANT, SPLIT_LAYER, START_POS,
    TOKEN_IDS, TOP_K, WANT_TOKEN)


Tensors = dict[str, np.ndarray]


def request_inputs(req: CloudRequest) -> Tensors:
    """Edge side: one request as the ensemble's input tensors (batch dimension 1)."""
    out: Tensors = {
        START_POS: np.array([[req.start_pos]], np.int64),
        WANT_TOKEN: np.array([[req.want_token]], np.bool_),
    }
    if req.rows is not None:
        out[HIDDEN_INPUTS[req.rows.codec]] = req.rows.data[None]
        if req.rows.scale is not None:
            out[HIDDEN_SCALE] = req.rows.scale[None]
    if req.token_ids is not None:
        out[TOKEN_IDS] = req.token_ids[None]
    if req.split_layer is not None:
        out[SPLIT_LAYER] = np.array([[req.split_layer]], np.int32)
    return out


def _scalar(inputs: Tensors, name: str, dtype, required: bool = True):
    value = inputs.get(name)
    if value is None:
        if required:
            raise ProtocolError(f"input {name} is required")
        return None
    if value.shape != (1, 1) or value.dtype != dtype:
        raise ProtocolError(f"{name} must be {np.dtype(dtype).name} of shape [1, 1], got {value.dtype.name} {list(value.shape)}")
    return value[0, 0].item()


def _unbatched(value: np.ndarray, name: str, ndim: int) -> np.ndarray:
    if value.ndim != ndim or value.shape[0] != 1:
        raise ProtocolError(f"{name} must have {ndim} dimensions with batch size 1, got shape {list(value.shape)}")
    return value[0]


def request_from_inputs(inputs: Tensors, sequence_id: int | str, start: bool, end: bool) -> CloudRequest:
    """Cloud side: the ensemble's input tensors of one request as a CloudRequest."""
    if not isinstance(sequence_id, int) or sequence_id <= 0:
        raise ProtocolError(f"requests need a non-zero sequence_id, an integer (one per generation session), "
                            f"got {sequence_id!r}; string sequence ids are not supported")
    hidden = [(codec, name) for codec, name in HIDDEN_INPUTS.items() if name in inputs]
    if len(hidden) + (TOKEN_IDS in inputs) != 1:
        raise ProtocolError(f"send exactly one of {sorted(HIDDEN_INPUTS.values())} or {TOKEN_IDS}")
    start_pos = _scalar(inputs, START_POS, np.int64)
    if start_pos < 0:
        raise ProtocolError(f"START_POS must be >= 0, got {start_pos}")
    req = CloudRequest(sequence_id, start_pos, bool(_scalar(inputs, WANT_TOKEN, np.bool_)),
                       split_layer=_scalar(inputs, SPLIT_LAYER, np.int32, required=False), start=start, end=end)
    if hidden:
        codec, name = hidden[0]
        scale = inputs.get(HIDDEN_SCALE)
        req.rows = EncodedRows(codec, _unbatched(inputs[name], name, 3),
                               _unbatched(scale, HIDDEN_SCALE, 3) if scale is not None else None)
    else:
        req.token_ids = _unbatched(inputs[TOKEN_IDS], TOKEN_IDS, 2)
    return req


def block_outputs(block: PendingBlock) -> Tensors:
    """context_manager -> cloud_partition: the pending block of one request."""
    return {
        PENDING_HIDDEN: block.hidden.numpy()[None].astype(np.float32, copy=False),
        PENDING_START: np.array([[block.start_pos]], np.int64),
        PENDING_SPLIT: np.array([[block.split_layer]], np.int32),
        PENDING_WANT: np.array([[block.want_token]], np.bool_),
    }


def block_from_inputs(inputs: Tensors, sequence_id: int, start: bool, end: bool) -> PendingBlock:
    hidden = inputs[PENDING_HIDDEN][0]  # [n, D]; the context manager already validated it
    return PendingBlock(sequence_id, int(inputs[PENDING_SPLIT][0, 0]), int(inputs[PENDING_START][0, 0]),
                        torch.from_numpy(np.ascontiguousarray(hidden)), bool(inputs[PENDING_WANT][0, 0]),
                        start, end)


def reply_outputs(reply: CloudReply, top_k: int = TOP_K) -> Tensors:
    """Upload-only replies carry TOKEN_ID -1 and padded top-k (-1 ids, -inf log-probs)."""
    ids = np.full((1, top_k), -1, np.int64)
    logprobs = np.full((1, top_k), -np.inf, np.float32)
    ids[0, : len(reply.topk_ids)] = reply.topk_ids
    logprobs[0, : len(reply.topk_logprobs)] = reply.topk_logprobs
    return {
        "TOKEN_ID": np.array([[reply.token_id]], np.int64),
        "CONFIDENCE": np.array([[reply.confidence]], np.float32),
        "TOPK_IDS": ids,
        "TOPK_LOGPROBS": logprobs,
        "CATCHUP_ROWS": np.array([[reply.catchup_rows]], np.int32),
    }


def reply_from_outputs(outputs: Tensors) -> CloudReply:
    ids, logprobs = outputs["TOPK_IDS"][0], outputs["TOPK_LOGPROBS"][0]
    valid = ids >= 0
    return CloudReply(int(outputs["TOKEN_ID"][0, 0]), float(outputs["CONFIDENCE"][0, 0]), ids[valid].tolist(),
                      logprobs[valid].tolist(), int(outputs["CATCHUP_ROWS"][0, 0]))
