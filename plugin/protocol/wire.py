"""Protocol tensors <-> plugin dataclasses, for both sides of the wire.

model.py files and the edge's Triton client call these with plain dicts of numpy arrays, so
every shape and dtype rule is unit-tested without a server.
"""
from __future__ import annotations

import numpy as np

from plugin.protocol.codec import CODEC_DTYPES, EncodedRows, to_array
from plugin.protocol.errors import ErrorCode, ProtocolError
from plugin.protocol.messages import CloudReply, CloudRequest, Drafts, PendingBlock, RowVerdict
from plugin.protocol.tensors import (
    CATCHUP_ROWS, CONFIDENCE, CONTEXT_ROWS, DRAFT_EXITS, DRAFT_TOKENS, HIDDEN_ROWS, PASS_MS, PENDING_DRAFT_EXITS,
    PENDING_DRAFTS, PENDING_HIDDEN, PENDING_KEY, PENDING_ROLLBACK, PENDING_ROWS, PENDING_SPLIT, PENDING_START,
    PENDING_WANT, ROLLBACK_TO, ROW_TOPK_IDS, ROW_TOPK_LOGPROBS, RowTensors, SESSION_KEY, SPLIT_LAYER, START_POS, TENSORS,
    TOKEN_ID, TOKEN_IDS, TOP_K, TOPK_IDS, TOPK_LOGPROBS, WANT_TOKEN)


Tensors = dict[str, np.ndarray]


def _one(name: str, value) -> np.ndarray:
    """A one-value tensor of the table's dtype: [1, 1] (batch of one)."""
    return np.array([[value]], TENSORS[name].np_dtype)


def request_inputs(req: CloudRequest) -> Tensors:
    """Edge side: one request as the ensemble's input tensors (batch dimension 1)."""
    out: Tensors = {START_POS: _one(START_POS, req.start_pos), WANT_TOKEN: _one(WANT_TOKEN, req.want_token)}
    if req.rows is not None:
        out.update(_rows_tensors(req.rows, HIDDEN_ROWS))
    if req.token_ids is not None:
        out[TOKEN_IDS] = req.token_ids[None]
    if req.split_layer is not None:
        out[SPLIT_LAYER] = _one(SPLIT_LAYER, req.split_layer)
    if req.session_key:
        out[SESSION_KEY] = _one(SESSION_KEY, req.session_key)
    if req.context_rows is not None:
        out[CONTEXT_ROWS] = _one(CONTEXT_ROWS, req.context_rows)
    if req.drafts is not None:
        out[DRAFT_TOKENS], out[DRAFT_EXITS] = req.drafts.tokens[None], req.drafts.exits[None]
    if req.rollback_to is not None:
        out[ROLLBACK_TO] = _one(ROLLBACK_TO, req.rollback_to)
    return out


def _rows_tensors(rows: EncodedRows, tensors: RowTensors) -> Tensors:
    """The rows' data and scale (if their codec has one) under `tensors`' names, batch of one."""
    out = {tensors.data(rows.codec): rows.data[None]}
    if rows.scale is not None:
        out[tensors.scale(rows.codec)] = rows.scale[None]
    return out


def _rows_from(inputs: Tensors, tensors: RowTensors, codec: str) -> EncodedRows:
    """The rows of `codec` under `tensors`' names (their dtype, width and scale are the codec's to check)."""
    name, scale_name = tensors.data(codec), tensors.scale(codec)
    scale = inputs.get(scale_name) if scale_name else None
    return EncodedRows(codec, _unbatched(inputs[name], name), None if scale is None else _unbatched(scale, scale_name))


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
    hidden = [codec for codec in CODEC_DTYPES if HIDDEN_ROWS.data(codec) in inputs]
    if len(hidden) + (TOKEN_IDS in inputs) != 1:
        names = sorted(HIDDEN_ROWS.data(codec) for codec in CODEC_DTYPES)
        raise ProtocolError(ErrorCode.MALFORMED, f"send exactly one of {names} or {TOKEN_IDS}")
    start_pos = _scalar(inputs, START_POS)
    if start_pos < 0:
        raise ProtocolError(ErrorCode.MALFORMED, f"START_POS must be >= 0, got {start_pos}")
    key = _scalar(inputs, SESSION_KEY)
    if key is not None and key <= 0:
        raise ProtocolError(ErrorCode.MALFORMED, f"SESSION_KEY must be in [1, 2^63), got {key}")
    req = CloudRequest(sequence_id, start_pos, bool(_scalar(inputs, WANT_TOKEN)),
                       split_layer=_scalar(inputs, SPLIT_LAYER), start=start, end=end, session_key=key or 0)
    if hidden:
        req.rows = _rows_from(inputs, HIDDEN_ROWS, hidden[0])
    else:
        req.token_ids = _unbatched(inputs[TOKEN_IDS], TOKEN_IDS)
    req.drafts = _drafts(inputs)
    req.context_rows = _scalar(inputs, CONTEXT_ROWS)
    req.rollback_to = _scalar(inputs, ROLLBACK_TO)
    if req.rollback_to is not None and req.rollback_to < 0:
        raise ProtocolError(ErrorCode.MALFORMED, f"ROLLBACK_TO must be >= 0, got {req.rollback_to}")
    return req


def _drafts(inputs: Tensors) -> Drafts | None:
    """DRAFT_TOKENS and DRAFT_EXITS, both or neither, of one width and their table's dtypes."""
    given = [name for name in (DRAFT_TOKENS, DRAFT_EXITS) if name in inputs]
    if not given:
        return None
    if len(given) == 1:
        raise ProtocolError(ErrorCode.MALFORMED, f"send {DRAFT_TOKENS} and {DRAFT_EXITS} together, got only {given[0]}")
    tokens, exits = (_unbatched(inputs[name], name) for name in (DRAFT_TOKENS, DRAFT_EXITS))
    for name, value in ((DRAFT_TOKENS, tokens), (DRAFT_EXITS, exits)):
        if value.dtype != TENSORS[name].np_dtype:
            raise ProtocolError(ErrorCode.MALFORMED, f"{name} must be {TENSORS[name].dtype}, got {value.dtype.name}")
    if tokens.shape != exits.shape:
        raise ProtocolError(ErrorCode.MALFORMED, f"{DRAFT_TOKENS} has {tokens.shape[0]} drafts but {DRAFT_EXITS} "
                                                 f"{exits.shape[0]}: one exit per draft")
    return Drafts(tokens, exits)


def block_outputs(block: PendingBlock, decoded_hop: bool = False) -> Tensors:
    """context_manager -> cloud_partition: the pending block of one request, its rows as they arrived (decoded_hop:
    decoded to PENDING_HIDDEN, for the TensorRT variant's engine)."""
    rows = ({PENDING_HIDDEN: to_array(block.rows)[None]} if decoded_hop
            else _hop_rows(block.rows))
    return {
        **rows,
        PENDING_START: _one(PENDING_START, block.start_pos),
        PENDING_SPLIT: _one(PENDING_SPLIT, block.split_layer),
        PENDING_WANT: _one(PENDING_WANT, block.want_token),
        PENDING_KEY: _one(PENDING_KEY, block.session_key),
        **_pending_verification(block),
    }


def _hop_rows(rows: EncodedRows) -> Tensors:
    """Every encoded PENDING_* row tensor (the ensemble maps them all): the block's codec holds its rows, the
    others 0 rows."""
    own = _rows_tensors(rows, PENDING_ROWS)
    return {t.name: own.get(t.name, np.zeros((1, 0, *t.config_dims(rows.data.shape[1])[1:]), t.np_dtype))
            for t in TENSORS.values() if t.hop == "encoded"}


def _pending_verification(block: PendingBlock) -> Tensors:
    """The drafts (0 wide without) and the rollback (-1 without) of a pending block."""
    drafts = block.drafts or Drafts(np.zeros(0, np.int64), np.zeros(0, np.int32))
    rollback = -1 if block.rollback_to is None else block.rollback_to
    return {PENDING_DRAFTS: drafts.tokens[None], PENDING_DRAFT_EXITS: drafts.exits[None],
            PENDING_ROLLBACK: _one(PENDING_ROLLBACK, rollback)}


def block_from_inputs(inputs: Tensors, sequence_id: int, start: bool, end: bool) -> PendingBlock:
    # the rows are the codec's that holds any (an upload's block holds none); the context manager checked them
    codec = next((c for c in CODEC_DTYPES if inputs[PENDING_ROWS.data(c)].shape[1]), "fp32")
    drafts = Drafts(inputs[PENDING_DRAFTS][0], inputs[PENDING_DRAFT_EXITS][0])
    rollback = int(inputs[PENDING_ROLLBACK][0, 0])
    return PendingBlock(sequence_id, int(inputs[PENDING_SPLIT][0, 0]), int(inputs[PENDING_START][0, 0]),
                        _rows_from(inputs, PENDING_ROWS, codec), bool(inputs[PENDING_WANT][0, 0]),
                        start, end, drafts=drafts if len(drafts) else None, rollback_to=None if rollback < 0 else rollback,
                        session_key=int(inputs[PENDING_KEY][0, 0]))


def _padded_topk(pairs: list[tuple[list[int], list[float]]], top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """[len(pairs), top_k] ids and log-probs, padded with -1 and -inf."""
    ids = np.full((len(pairs), top_k), -1, TENSORS[TOPK_IDS].np_dtype)
    logprobs = np.full((len(pairs), top_k), -np.inf, TENSORS[TOPK_LOGPROBS].np_dtype)
    for i, (row_ids, row_logprobs) in enumerate(pairs):
        ids[i, : len(row_ids)], logprobs[i, : len(row_logprobs)] = row_ids, row_logprobs
    return ids, logprobs


def reply_outputs(reply: CloudReply, top_k: int = TOP_K, rows: bool = True) -> Tensors:
    """Upload-only replies carry TOKEN_ID -1 and padded top-k (-1 ids, -inf log-probs). rows: also ROW_TOPK_*
    (one row per draft; the models that declare them)."""
    ids, logprobs = _padded_topk([(reply.topk_ids, reply.topk_logprobs)], top_k)
    out = {
        TOKEN_ID: _one(TOKEN_ID, reply.token_id),
        CONFIDENCE: _one(CONFIDENCE, reply.confidence),
        TOPK_IDS: ids,
        TOPK_LOGPROBS: logprobs,
        CATCHUP_ROWS: _one(CATCHUP_ROWS, reply.catchup_rows),
        PASS_MS: _one(PASS_MS, 1000 * reply.pass_s),
    }
    if rows:
        row_ids, row_logprobs = _padded_topk([(r.ids, r.logprobs) for r in reply.rows], top_k)
        out[ROW_TOPK_IDS], out[ROW_TOPK_LOGPROBS] = row_ids[None], row_logprobs[None]  # [1, r, K]
    return out


def _unpadded(ids: np.ndarray, logprobs: np.ndarray) -> tuple[list[int], list[float]]:
    valid = ids >= 0
    return ids[valid].tolist(), logprobs[valid].tolist()


def reply_from_outputs(outputs: Tensors) -> CloudReply:
    """ROW_TOPK_* are read when present (a request with drafts asked for them), and PASS_MS (the models that time
    their pass declare it)."""
    reply = CloudReply(int(outputs[TOKEN_ID][0, 0]), float(outputs[CONFIDENCE][0, 0]),
                       *_unpadded(outputs[TOPK_IDS][0], outputs[TOPK_LOGPROBS][0]), int(outputs[CATCHUP_ROWS][0, 0]))
    if PASS_MS in outputs:
        reply.pass_s = float(outputs[PASS_MS][0, 0]) / 1000
    if ROW_TOPK_IDS in outputs:
        reply.rows = [RowVerdict(*_unpadded(ids, logprobs))
                      for ids, logprobs in zip(outputs[ROW_TOPK_IDS][0], outputs[ROW_TOPK_LOGPROBS][0])]
    return reply
