"""Protocol tensors <-> plugin dataclasses, for both sides of the wire.

model.py files and the edge's Triton client call these with plain dicts of numpy arrays, so
every shape and dtype rule is unit-tested without a server.
"""
from __future__ import annotations

import numpy as np
import torch

from plugin.protocol.codec import EncodedRows
from plugin.protocol.errors import ErrorCode, ProtocolError
from plugin.protocol.messages import CloudReply, CloudRequest, PendingBlock
from plugin.protocol.tensors import (
    CATCHUP_ROWS, CONFIDENCE, HIDDEN_INPUTS, HIDDEN_SCALE, PENDING_HIDDEN, PENDING_SPLIT, PENDING_START, PENDING_WANT,
    SESSION_KEY, SPLIT_LAYER, START_POS, TENSORS, TOKEN_ID, TOKEN_IDS, TOP_K, TOPK_IDS, TOPK_LOGPROBS, WANT_TOKEN)


Tensors = dict[str, np.ndarray]


def _one(name: str, value) -> np.ndarray:
    """A one-value tensor of the table's dtype: [1, 1] (batch of one)."""
    return np.array([[value]], TENSORS[name].np_dtype)


def request_inputs(req: CloudRequest) -> Tensors:
    """Edge side: one request as the ensemble's input tensors (batch dimension 1)."""
    out: Tensors = {START_POS: _one(START_POS, req.start_pos), WANT_TOKEN: _one(WANT_TOKEN, req.want_token)}
    if req.rows is not None:
        out[HIDDEN_INPUTS[req.rows.codec]] = req.rows.data[None]
        if req.rows.scale is not None:
            out[HIDDEN_SCALE] = req.rows.scale[None]
    if req.token_ids is not None:
        out[TOKEN_IDS] = req.token_ids[None]
    if req.split_layer is not None:
        out[SPLIT_LAYER] = _one(SPLIT_LAYER, req.split_layer)
    if req.session_key:
        out[SESSION_KEY] = _one(SESSION_KEY, req.session_key)
    return out


def _scalar(inputs: Tensors, name: str):
    """The value of a one-value input; None for an optional input left out."""
    value, spec = inputs.get(name), TENSORS[name]
    if value is None:
        if not spec.optional:
            raise ProtocolError(ErrorCode.MALFORMED, f"input {name} is required")
        return None
    if value.shape != (1, 1) or value.dtype != spec.np_dtype:
        raise ProtocolError(ErrorCode.MALFORMED, f"{name} must be {spec.dtype} of shape [1, 1], "
                                                 f"got {value.dtype.name} {list(value.shape)}")
    return value[0, 0].item()


def _unbatched(value: np.ndarray, name: str) -> np.ndarray:
    """The one request of a batch of one; its dtype and row width are the codec's to check."""
    ndim = 1 + len(TENSORS[name].dims)
    if value.ndim != ndim or value.shape[0] != 1:
        raise ProtocolError(ErrorCode.MALFORMED, f"{name} must have {ndim} dimensions with batch size 1, "
                                                 f"got shape {list(value.shape)}")
    return value[0]


def request_from_inputs(inputs: Tensors, sequence_id: int | str, start: bool, end: bool) -> CloudRequest:
    """Cloud side: the ensemble's input tensors of one request as a CloudRequest."""
    if not isinstance(sequence_id, int) or sequence_id <= 0:
        raise ProtocolError(ErrorCode.MALFORMED, f"requests need a non-zero sequence_id, an integer (one per "
                                                 f"generation session), got {sequence_id!r}; string sequence ids "
                                                 "are not supported")
    hidden = [(codec, name) for codec, name in HIDDEN_INPUTS.items() if name in inputs]
    if len(hidden) + (TOKEN_IDS in inputs) != 1:
        raise ProtocolError(ErrorCode.MALFORMED, f"send exactly one of {sorted(HIDDEN_INPUTS.values())} or {TOKEN_IDS}")
    start_pos = _scalar(inputs, START_POS)
    if start_pos < 0:
        raise ProtocolError(ErrorCode.MALFORMED, f"START_POS must be >= 0, got {start_pos}")
    key = _scalar(inputs, SESSION_KEY)
    if key is not None and key <= 0:
        raise ProtocolError(ErrorCode.MALFORMED, f"SESSION_KEY must be in [1, 2^63), got {key}")
    req = CloudRequest(sequence_id, start_pos, bool(_scalar(inputs, WANT_TOKEN)),
                       split_layer=_scalar(inputs, SPLIT_LAYER), start=start, end=end, session_key=key or 0)
    if hidden:
        codec, name = hidden[0]
        scale = inputs.get(HIDDEN_SCALE)
        req.rows = EncodedRows(codec, _unbatched(inputs[name], name),
                               _unbatched(scale, HIDDEN_SCALE) if scale is not None else None)
    else:
        req.token_ids = _unbatched(inputs[TOKEN_IDS], TOKEN_IDS)
    return req


def block_outputs(block: PendingBlock) -> Tensors:
    """context_manager -> cloud_partition: the pending block of one request."""
    return {
        PENDING_HIDDEN: block.hidden.numpy()[None].astype(TENSORS[PENDING_HIDDEN].np_dtype, copy=False),
        PENDING_START: _one(PENDING_START, block.start_pos),
        PENDING_SPLIT: _one(PENDING_SPLIT, block.split_layer),
        PENDING_WANT: _one(PENDING_WANT, block.want_token),
    }


def block_from_inputs(inputs: Tensors, sequence_id: int, start: bool, end: bool) -> PendingBlock:
    hidden = inputs[PENDING_HIDDEN][0]  # [n, D]; the context manager already validated it
    return PendingBlock(sequence_id, int(inputs[PENDING_SPLIT][0, 0]), int(inputs[PENDING_START][0, 0]),
                        torch.from_numpy(np.ascontiguousarray(hidden)), bool(inputs[PENDING_WANT][0, 0]),
                        start, end)


def reply_outputs(reply: CloudReply, top_k: int = TOP_K) -> Tensors:
    """Upload-only replies carry TOKEN_ID -1 and padded top-k (-1 ids, -inf log-probs)."""
    ids = np.full((1, top_k), -1, TENSORS[TOPK_IDS].np_dtype)
    logprobs = np.full((1, top_k), -np.inf, TENSORS[TOPK_LOGPROBS].np_dtype)
    ids[0, : len(reply.topk_ids)] = reply.topk_ids
    logprobs[0, : len(reply.topk_logprobs)] = reply.topk_logprobs
    return {
        TOKEN_ID: _one(TOKEN_ID, reply.token_id),
        CONFIDENCE: _one(CONFIDENCE, reply.confidence),
        TOPK_IDS: ids,
        TOPK_LOGPROBS: logprobs,
        CATCHUP_ROWS: _one(CATCHUP_ROWS, reply.catchup_rows),
    }


def reply_from_outputs(outputs: Tensors) -> CloudReply:
    ids, logprobs = outputs[TOPK_IDS][0], outputs[TOPK_LOGPROBS][0]
    valid = ids >= 0
    return CloudReply(int(outputs[TOKEN_ID][0, 0]), float(outputs[CONFIDENCE][0, 0]), ids[valid].tolist(),
                      logprobs[valid].tolist(), int(outputs[CATCHUP_ROWS][0, 0]))
