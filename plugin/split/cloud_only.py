"""The cloud-only baseline: token ids from the client into the whole model, no context manager in front."""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

import numpy as np
import torch

from plugin.model.decoder import DecoderModel
from plugin.protocol.errors import ErrorCode, ProtocolError
from plugin.protocol.messages import CloudReply, CloudRequest
from plugin.protocol.tensors import TOP_K
from plugin.split.cloud import CloudPartition
from plugin.split.limits import check_request, Limits


class TokenIds:
    """Cloud-only's blocks: token ids, embedded at their positions. A block out of step with its KV is the
    client's mistake (no context manager keeps it in step)."""

    from_client = True

    def __init__(self, model: DecoderModel):
        self.model = model

    def rows(self, block: CloudRequest, positions: torch.Tensor) -> torch.Tensor:
        ids = torch.from_numpy(block.token_ids).to(self.model.device)
        return self.model.embed_tokens(ids[None], positions[None])[0]


class CloudOnly:
    """Its own sessions (KV, key), in a cloud partition over every layer fed token ids: the partition's
    batched compute and the admission of plugin/split/limits.py, without a branch for it in either."""

    def __init__(self, model: DecoderModel, limits: Limits | None = None, top_k: int = TOP_K,
                 clock: Callable[[], float] = time.monotonic):
        self.partition = CloudPartition(model, limits, top_k, clock, inputs=TokenIds(model))

    def block(self, req: CloudRequest) -> CloudRequest:
        """The request, checked as only cloud-only needs (the partition checks the rest), entering layer 0."""
        limits, ids = self.partition.limits, req.token_ids
        if ids is None or ids.ndim != 1 or ids.dtype != np.int64:
            raise ProtocolError(ErrorCode.MALFORMED, "TOKEN_IDS must be int64 of shape [1, n]")
        check_request(limits, req.nbytes, ids.size)
        vocab_size = self.partition.model.cfg.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ProtocolError(ErrorCode.MALFORMED, f"token ids must lie in [0, {vocab_size})")
        if ids.size and not req.want_token:  # nothing would keep them
            raise ProtocolError(ErrorCode.MALFORMED,
                                "cloud_only keeps no pending tokens: send TOKEN_IDS with WANT_TOKEN true")
        if req.drafts is not None or req.rollback_to is not None:
            raise ProtocolError(ErrorCode.MALFORMED, "cloud_only checks no drafts and rolls nothing back: send those "
                                                     "to the ce_collm ensemble")
        return replace(req, split_layer=0)

    def step(self, blocks: list[CloudRequest]) -> list[CloudReply | ProtocolError]:
        """Blocks from `block`: one reply (or the error for that request alone) per block, in order."""
        return self.partition.step(blocks)
