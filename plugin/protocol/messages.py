"""The messages of the wire protocol between the edge and the `ce_collm` ensemble, for both sides.

Every request carries the session's sequence id with START on the first request and END on the
last (Triton's sequence batcher turns them into the CORRID/START/END control inputs of both
stateful models). The tensors that carry these messages are the table in tensors.py; wire.py
converts between the two.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import numpy as np
import torch

from plugin.protocol.codec import EncodedRows
from plugin.protocol.tensors import TOP_K


def new_session_key() -> int:
    """A session's SESSION_KEY: random in [1, 2^63), so that it cannot be derived from the sequence id or guessed."""
    return 1 + secrets.randbelow(2**63 - 1)


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
    session_key: int = 0  # the session's key (new_session_key), on every request; 0: none sent

    @property
    def num_rows(self) -> int:
        if self.rows is not None:
            return self.rows.data.shape[0]
        return 0 if self.token_ids is None else int(self.token_ids.shape[0])

    @property
    def nbytes(self) -> int:
        """Tensor payload on the wire: rows (or ids) + START_POS + WANT_TOKEN (+ SPLIT_LAYER) (+ SESSION_KEY)."""
        body = self.rows.nbytes if self.rows is not None else (0 if self.token_ids is None else self.token_ids.nbytes)
        return body + 8 + 1 + (4 if self.split_layer is not None else 0) + (8 if self.session_key else 0)


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
    session_key: int = 0  # cloud-only blocks carry the client's key; the ensemble's context manager checked it

    @property
    def num_rows(self) -> int:
        return self.hidden.shape[0] if self.token_ids is None else self.token_ids.shape[0]
