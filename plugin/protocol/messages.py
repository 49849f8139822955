"""The wire protocol between the edge and the `ce_collm` ensemble, defined once for both sides.

Every request carries the session's sequence id with START on the first request and END on the
last (Triton's sequence batcher turns them into the CORRID/START/END control inputs of both
stateful models). Tensors (batch dimension first, one row of the batch per request):

  inputs                            dtype   shape          notes
  HIDDEN_FP32 | HIDDEN_FP16         fp32/16 [1, n, D]      layer-k hidden states of n rows
  HIDDEN_INT8 + HIDDEN_SCALE        int8    [1, n, D]      with fp32 per-row scale [1, n, 1]
  START_POS                         int64   [1, 1]         position of the first row
  WANT_TOKEN                        bool    [1, 1]         false: upload only, the cloud computes nothing
  SPLIT_LAYER                       int32   [1, 1]         required with START: the edge's split layer k

  outputs
  TOKEN_ID                          int64   [1, 1]         -1 for upload-only requests
  CONFIDENCE                        fp32    [1, 1]         max softmax probability of the token
  TOPK_IDS / TOPK_LOGPROBS          int64/fp32 [1, K]      the cloud's K best tokens
  CATCHUP_ROWS                      int32   [1, 1]         rows the cloud computed for this request

The cloud-only baseline model takes TOKEN_IDS int64 [1, n] instead of hidden states.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from plugin.protocol.codec import EncodedRows
from plugin.protocol.tensors import TOP_K


@dataclass
class CloudRequest:
    sequence_id: int
    start_pos: int  # position of the first row
    want_token: bool
    rows: EncodedRows | None = None  # layer-k hidden states (edge requests)
    token_ids: np.ndarray | None = None  # [n] int64 (cloud-only requests)
    split_layer: int | None = None  # required when start is set
    start: bool = False
    end: bool = False

    @property
    def num_rows(self) -> int:
        if self.rows is not None:
            return self.rows.data.shape[0]
        return 0 if self.token_ids is None else int(self.token_ids.shape[0])

    @property
    def nbytes(self) -> int:
        """Tensor payload on the wire: rows (or ids) + START_POS + WANT_TOKEN (+ SPLIT_LAYER)."""
        body = self.rows.nbytes if self.rows is not None else (0 if self.token_ids is None else self.token_ids.nbytes)
        return body + 8 + 1 + (4 if self.split_layer is not None else 0)


@dataclass
class CloudReply:
    token_id: int = -1  # -1: upload only
    confidence: float = 0.0
    topk_ids: list[int] = field(default_factory=list)
    topk_logprobs: list[float] = field(default_factory=list)
    catchup_rows: int = 0

    @property
    def nbytes(self) -> int:
        """TOKEN_ID + CONFIDENCE + TOPK_IDS + TOPK_LOGPROBS (always TOP_K wide) + CATCHUP_ROWS."""
        return 8 + 4 + 12 * TOP_K + 4


@dataclass
class PendingBlock:
    """What the context manager hands the cloud partition for one request."""

    sequence_id: int
    split_layer: int
    start_pos: int
    hidden: torch.Tensor  # [n, D]; n == 0 for upload-only requests
    want_token: bool
    start: bool = False
    end: bool = False
    token_ids: torch.Tensor | None = None  # [n] int64 instead of hidden, for the cloud-only baseline (split 0)

    @property
    def num_rows(self) -> int:
        return self.hidden.shape[0] if self.token_ids is None else self.token_ids.shape[0]
