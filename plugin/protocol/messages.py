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

from plugin.protocol.codec import encode, EncodedRows
from plugin.protocol.tensors import TOP_K


def new_session_key() -> int:
    """A session's SESSION_KEY: random in [1, 2^63), so that it cannot be derived from the sequence id or guessed."""
    return 1 + secrets.randbelow(2**63 - 1)


LOOKUP_EXIT = 0  # DRAFT_EXITS of a draft looked up in the sequence's own tokens, not an exit's guess


@dataclass
class Drafts:
    """The edge's guess of the full model's next token after each of the last rows, and the exit it came from."""

    tokens: np.ndarray  # [r] int64
    exits: np.ndarray  # [r] int32

    def __post_init__(self) -> None:
        assert self.tokens.shape == self.exits.shape and self.tokens.ndim == 1, (self.tokens.shape, self.exits.shape)

    @classmethod
    def of(cls, pairs: list[tuple[int, int]]) -> "Drafts":
        """From (token, exit layer) pairs, oldest row first."""
        return cls(np.array([t for t, _ in pairs], np.int64), np.array([e for _, e in pairs], np.int32))

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def nbytes(self) -> int:
        return self.tokens.nbytes + self.exits.nbytes


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
    drafts: Drafts | None = None  # the edge's guesses after the last rows: the cloud checks them
    rollback_to: int | None = None  # drop positions >= this before the rows (rejected drafts)
    context_rows: int | None = None  # with START: positions of the whole context about to be sent (CONTEXT_ROWS)
    client: str = ""  # who sent it, as the front named it (CLIENT_HEADER; not a tensor): sessions are shared per client

    @property
    def num_rows(self) -> int:
        if self.rows is not None:
            return self.rows.data.shape[0]
        return 0 if self.token_ids is None else int(self.token_ids.shape[0])

    @property
    def nbytes(self) -> int:
        """Tensor payload on the wire: rows (or ids) + START_POS + WANT_TOKEN (+ SPLIT_LAYER, SESSION_KEY, drafts,
        ROLLBACK_TO)."""
        body = self.rows.nbytes if self.rows is not None else (0 if self.token_ids is None else self.token_ids.nbytes)
        extra = (4 if self.split_layer is not None else 0) + (8 if self.rollback_to is not None else 0)
        extra += (8 if self.session_key else 0) + (8 if self.context_rows is not None else 0)
        return body + 8 + 1 + extra + (self.drafts.nbytes if self.drafts is not None else 0)


@dataclass
class RowVerdict:
    """The full model's K best tokens after one drafted row, best first, with their log-probabilities."""

    ids: list[int]
    logprobs: list[float]

    @property
    def token(self) -> int:
        """The full model's greedy token."""
        return self.ids[0]


@dataclass
class CloudReply:
    token_id: int = -1  # -1: upload only
    confidence: float = 0.0
    topk_ids: list[int] = field(default_factory=list)
    topk_logprobs: list[float] = field(default_factory=list)
    catchup_rows: int = 0
    rows: list[RowVerdict] = field(default_factory=list)  # one per draft of the request, oldest first
    # seconds of the cloud's pass that computed this request (PASS_MS); 0: none (an upload, or a server that does
    # not time its pass: the TensorRT variant). A measure, not part of the answer: replies compare without it
    pass_s: float = field(default=0.0, compare=False)

    @property
    def nbytes(self) -> int:
        """TOKEN_ID + CONFIDENCE + TOPK_IDS + TOPK_LOGPROBS (always TOP_K wide) + CATCHUP_ROWS + PASS_MS +
        ROW_TOPK_*."""
        return 8 + 4 + 12 * TOP_K + 4 + 4 + 12 * TOP_K * len(self.rows)


@dataclass
class PendingBlock:
    """What the context manager hands the cloud partition for one request."""

    sequence_id: int
    split_layer: int
    start_pos: int
    rows: EncodedRows  # [n, D] as the edge encoded them (the partition decodes them); n == 0 for upload-only requests
    want_token: bool
    start: bool = False
    end: bool = False
    session_key: int = 0  # the client's key (from the context manager, which checked it)
    drafts: Drafts | None = None  # validated by the context manager: at most num_rows of them
    rollback_to: int | None = None  # validated by the context manager; the partition re-checks its own KV
    client: str = ""  # as in CloudRequest

    def __post_init__(self) -> None:
        if not isinstance(self.rows, EncodedRows):  # float rows given decoded (a naive split, a test): fp32, exact
            self.rows = encode(self.rows, "fp32")

    @property
    def num_rows(self) -> int:
        return self.rows.data.shape[0]
