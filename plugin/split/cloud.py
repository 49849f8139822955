"""The cloud partition: layers [k, N) + norm + LM head, with a KV store per session."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from plugin.model.decoder import DecoderModel
from plugin.model.kv import PositionError, SequenceKV
from plugin.protocol.errors import ErrorCode, ProtocolError, SequenceNeedsStart
from plugin.protocol.messages import CloudReply, CloudRequest, PendingBlock
from plugin.protocol.tensors import TOP_K
from plugin.split.limits import Admission, Limits


@dataclass
class _Sequence:
    split_layer: int
    kv: SequenceKV
    last_seen: float


class CloudPartition:
    """Resumes each session at its split layer; batches the blocks of many sessions in one pass.

    A block with split layer 0 holds token ids (the cloud-only baseline); otherwise it holds the
    layer-k hidden states that the context manager handed over.
    """

    def __init__(self, model: DecoderModel, limits: Limits | None = None, top_k: int = TOP_K,
                 clock: Callable[[], float] = time.monotonic):
        self.model, self.limits, self.top_k, self.clock = model, limits or Limits(), top_k, clock
        # the context manager in front admits sessions by the same rule, with this partition's first layer
        self.admission = Admission(self.limits, model.cfg.num_layers, model.layer_range.start)
        self.sequences: dict[int, _Sequence] = {}
        self.rows_computed = 0
        self.tokens_served = 0

    @torch.inference_mode()
    def step(self, blocks: list[PendingBlock]) -> list[CloudReply | ProtocolError]:
        """One reply (or the error for that request alone) per block, in order."""
        now = self.clock()
        self.expire(now)
        replies: list[CloudReply | ProtocolError] = [CloudReply() for _ in blocks]
        ready: dict[int, list[int]] = {}  # split layer -> indices of blocks to compute
        for i, block in enumerate(blocks):
            try:
                seq = self._sequence_for(block, now)
            except ProtocolError as e:
                replies[i] = e
                continue
            if block.want_token:
                ready.setdefault(seq.split_layer, []).append(i)
        for split, indices in ready.items():
            for i, reply in zip(indices, self._run(split, [blocks[i] for i in indices])):
                replies[i] = reply
        for block in blocks:
            if block.end:
                self.sequences.pop(block.sequence_id, None)
        return replies

    def _sequence_for(self, block: PendingBlock, now: float) -> _Sequence:
        if block.start:
            self.admission.check_start(block.sequence_id, block.split_layer, self.sequences)
            kv = self.model.new_sequence(block.split_layer, self.model.cfg.num_layers)
            self.sequences[block.sequence_id] = _Sequence(block.split_layer, kv, now)
        seq = self.sequences.get(block.sequence_id)
        if seq is None:
            raise SequenceNeedsStart(f"sequence {block.sequence_id} has no cloud state: re-send its context with START")
        held = seq.kv.length(seq.split_layer)
        if block.want_token and block.start_pos != held:
            raise ProtocolError(ErrorCode.STATE_MISMATCH, f"sequence {block.sequence_id}: block starts at "
                                                          f"{block.start_pos}, cloud state holds {held} positions; "
                                                          "re-send with START")
        if block.want_token and held + block.num_rows > self.limits.max_context:
            raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"context of {held + block.num_rows} positions exceeds "
                                                          f"the limit of {self.limits.max_context}")
        seq.last_seen = now
        return seq

    def _run(self, split: int, blocks: list[PendingBlock]) -> list[CloudReply | ProtocolError]:
        model = self.model
        lengths = [b.num_rows for b in blocks]
        width = max(lengths)
        positions = torch.empty(len(blocks), width, dtype=torch.long)
        for b, block in enumerate(blocks):
            # padding rows repeat the last position: they see only real keys and are dropped after
            row_pos = torch.arange(block.start_pos, block.start_pos + width).clamp(max=block.start_pos + lengths[b] - 1)
            positions[b] = row_pos
        positions = positions.to(model.device)
        if split == 0:
            ids = torch.zeros(len(blocks), width, dtype=torch.long)
            for b, block in enumerate(blocks):
                ids[b, : lengths[b]] = block.token_ids
            h = model.embed_tokens(ids.to(model.device), positions)
        else:
            h = torch.zeros(len(blocks), width, model.cfg.hidden_size, dtype=model.dtype, device=model.device)
            for b, block in enumerate(blocks):
                h[b, : lengths[b]] = block.hidden.to(model.device, model.dtype)
        kvs = [self.sequences[block.sequence_id].kv for block in blocks]
        try:
            h = model.run_layers(h, positions, split, model.cfg.num_layers, kvs, lengths)
        except PositionError as e:  # cannot happen after the checks above; reported, never half-applied silently
            return [ProtocolError(ErrorCode.STATE_MISMATCH, str(e)) for _ in blocks]
        last = h[torch.arange(len(blocks)), torch.tensor(lengths) - 1]  # [B, D]
        logprobs = torch.log_softmax(model.exit_logits(last, model.cfg.num_layers).float(), dim=-1)
        finite = torch.isfinite(logprobs).all(dim=-1)  # [B]; rows are per sequence, so one bad block spoils no other
        top = logprobs.topk(self.top_k, dim=-1)
        self.rows_computed += sum(lengths) * (model.cfg.num_layers - split)
        self.tokens_served += int(finite.sum())
        return [
            CloudReply(
                token_id=int(top.indices[b, 0]), confidence=float(top.values[b, 0].exp()),
                topk_ids=top.indices[b].tolist(), topk_logprobs=top.values[b].tolist(), catchup_rows=lengths[b],
            ) if finite[b] else ProtocolError(
                ErrorCode.NOT_FINITE, f"sequence {blocks[b].sequence_id}: the cloud's logits are not finite; its hidden rows are out of range"
            )
            for b in range(len(blocks))
        ]

    def expire(self, now: float | None = None) -> list[int]:
        """Drop sequences idle longer than the TTL (called on every step and by a periodic sweep)."""
        now = self.clock() if now is None else now
        idle = [s for s, seq in self.sequences.items() if now - seq.last_seen > self.limits.ttl_s]
        for sid in idle:
            del self.sequences[sid]
        return idle

    @property
    def kv_bytes(self) -> int:
        return sum(seq.kv.nbytes for seq in self.sequences.values())


def token_block(req: CloudRequest, vocab_size: int, limits: Limits | None = None) -> PendingBlock:
    """A cloud-only request: token ids for the whole model (split layer 0)."""
    limits = limits or Limits()
    ids = req.token_ids
    if ids is None or ids.ndim != 1 or ids.dtype != np.int64:
        raise ProtocolError(ErrorCode.MALFORMED, "TOKEN_IDS must be int64 of shape [1, n]")
    if req.nbytes > limits.max_request_bytes:
        raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"request payload of {req.nbytes} bytes exceeds the limit of "
                                                      f"{limits.max_request_bytes} bytes per request")
    if ids.size > limits.max_block_rows:
        raise ProtocolError(ErrorCode.LIMIT_EXCEEDED,
                            f"block of {ids.size} rows exceeds the limit of {limits.max_block_rows} rows per request")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ProtocolError(ErrorCode.MALFORMED, f"token ids must lie in [0, {vocab_size})")
    if ids.size and not req.want_token:  # no context manager in front of cloud_only: nothing would keep them
        raise ProtocolError(ErrorCode.MALFORMED, "cloud_only keeps no pending tokens: send TOKEN_IDS with WANT_TOKEN true")
    return PendingBlock(req.sequence_id, 0, req.start_pos, torch.empty(0, 0), req.want_token, req.start, req.end,
                        token_ids=torch.from_numpy(ids.copy()))


