"""The cloud partition: layers [k, N) + norm + LM head, with a KV store per session."""
from __future__ import annotations

import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch

from plugin.model.decoder import DecoderModel, top_k_ids
from plugin.model.kv import SequenceKV
from plugin.model.rows import position_mark
from plugin.protocol.codec import to_array
from plugin.protocol.errors import ErrorCode, position_error, ProtocolError, SequenceNeedsStart
from plugin.protocol.messages import CloudReply, Drafts, PendingBlock, RowVerdict
from plugin.protocol.tensors import TOP_K
from plugin.split.context import drafted_rows, window_text
from plugin.split.limits import Admission, check_context, drop_idle, Limits, MemoryBudget


@dataclass
class _Sequence:
    split_layer: int
    kv: SequenceKV
    last_seen: float
    key: int  # the SESSION_KEY its START carried: every later block must carry it
    client: str = ""  # who started it (the front's CLIENT_HEADER): sessions and bytes are shared per client
    rollback_window: range = field(default_factory=lambda: range(0))  # as the context manager keeps it

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes


class Block(Protocol):
    """What the partition computes for one request: a PendingBlock of the context manager, or a cloud-only
    request (plugin/split/cloud_only.py)."""

    sequence_id: int
    split_layer: int | None
    start_pos: int
    want_token: bool
    start: bool
    end: bool
    session_key: int
    drafts: Drafts | None
    rollback_to: int | None
    client: str

    @property
    def num_rows(self) -> int: ...


class Inputs(Protocol):
    """What a partition's blocks carry, turned into the rows entering their split layer, and whose mistake a block
    out of step with its sequence's KV is."""

    from_client: bool  # True: the client's (refused); False: the context manager's, whose state disagrees

    def rows(self, block: Block, positions: torch.Tensor) -> torch.Tensor:
        """[n, D] in the model's dtype, on its device; positions: the block's [n], on the device."""


class HandedRows:
    """The context manager's blocks: the layer-k rows as the edge encoded them, decoded here, once, in the
    model's dtype (the ensemble's hop carried them encoded)."""

    from_client = False

    def __init__(self, model: DecoderModel):
        self.model = model

    def rows(self, block: PendingBlock, positions: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(to_array(block.rows)).to(device=self.model.device, dtype=self.model.dtype)


class CloudPartition:
    """Resumes each session at its split layer; batches the blocks of many sessions in one pass.

    The blocks' rows come from `inputs`: the layer-k hidden states the context manager handed over
    (HandedRows), or token ids (cloud-only's TokenIds, which composes a partition over every layer).
    Each block is answered on its own: one that is refused or fails leaves the others of its batch as
    if it had not been there.
    """

    def __init__(self, model: DecoderModel, limits: Limits | None = None, top_k: int = TOP_K,
                 clock: Callable[[], float] = time.monotonic, inputs: Inputs | None = None):
        self.model, self.top_k, self.clock = model, top_k, clock
        self.inputs = inputs or HandedRows(model)
        self.limits = (limits or Limits()).within(model.cfg.position_limit)
        # the context manager in front admits sessions by the same rule, with this partition's first layer
        self.admission = Admission(self.limits, model.cfg.num_layers, model.layer_range.start)
        self.budget = MemoryBudget(self.limits, str(model.device))
        self.sequences: dict[int, _Sequence] = {}
        self.rows_computed = 0
        self.tokens_served = 0
        self.drafts_checked: Counter[int] = Counter()  # exit layer -> drafts the full model checked
        self.drafts_agreed: Counter[int] = Counter()  # exit layer -> ... that were its greedy token

    @torch.inference_mode()
    def step(self, blocks: list[Block]) -> list[CloudReply | ProtocolError]:
        """One reply (or the error for that request alone) per block, in order."""
        now = self.clock()
        self.expire(now)
        replies: list[CloudReply | ProtocolError] = [CloudReply() for _ in blocks]
        admitted: list[int] = []  # indices of the blocks whose sequence (and key) was admitted
        ready: dict[int, list[int]] = {}  # split layer -> indices of blocks to compute
        held = self.kv_bytes  # and what the blocks admitted so far will add
        batch = frozenset(block.sequence_id for block in blocks)  # never evicted to make room for each other
        for i, block in enumerate(blocks):
            try:
                seq, more = self._admit(block, now, held, batch)
            except ProtocolError as e:
                replies[i] = e.detached()
                continue
            except Exception as e:  # a bug: this sequence alone fails
                replies[i] = self._lost(block, e)
                continue
            held += more
            admitted.append(i)
            if block.want_token:
                ready.setdefault(seq.split_layer, []).append(i)
        for split, indices in ready.items():
            for i, reply in zip(indices, self._compute(split, [blocks[i] for i in indices])):
                replies[i] = reply
        for block, reply in zip(blocks, replies):
            if not isinstance(reply, ProtocolError):
                self.sequences[block.sequence_id].rollback_window = drafted_rows(block.start_pos + block.num_rows,
                                                                                 block.drafts)
        for i in admitted:  # an END that was refused (a wrong key) ends nothing
            if blocks[i].end:
                self.sequences.pop(blocks[i].sequence_id, None)
        return replies

    def _admit(self, block: Block, now: float, held: int, batch: frozenset[int]) -> tuple[_Sequence, int]:
        """The block's sequence once every check passed, and the bytes the state will grow by (less those of the
        sessions evicted to make room); nothing changes before, except a sequence found out of step with its
        context manager, which is dropped."""
        old = self.sequences.get(block.sequence_id)
        if block.want_token and block.num_rows == 0:
            raise ProtocolError(ErrorCode.MALFORMED, "token request with no rows: the cloud has nothing to compute "
                                                     "a token from")
        # a resumed START (SLOT_EXPIRED) finds its KV kept
        seq, evict = self.admission.session_for(self.sequences, block.sequence_id, block.start, block.start_pos,
                                                block.rollback_to, block.session_key, block.split_layer, block.client,
                                                batch)
        if seq is None:
            seq = _Sequence(block.split_layer, self.model.new_sequence(block.split_layer, self.model.cfg.num_layers),
                            now, block.session_key, block.client)
        positions = self._held_after_rollback(block, seq)
        if block.want_token and block.start_pos != positions:
            self._out_of_step(block, positions)
        if block.want_token:
            check_context(self.limits, positions + block.num_rows)
        more = seq.kv.nbytes_after(block.num_rows if block.want_token else 0) - (old.kv.nbytes if old else 0)
        evict += self.budget.check(held - sum(self.sequences[sid].nbytes for sid in evict), more, self.sequences,
                                   block.client, batch | set(evict))
        for sid in evict:  # sessions of a client over its share (that edge re-sends its context with START)
            more -= self.sequences.pop(sid).nbytes
        self.sequences[block.sequence_id] = seq
        seq.last_seen = now
        if block.rollback_to is not None:
            seq.kv.rewind(position_mark(seq.kv.layers, block.rollback_to))
        return seq, more

    def _out_of_step(self, block: Block, positions: int) -> None:
        """A block that does not start where the sequence's KV ends. From a cloud-only client it is the
        client's mistake, refused; from the context manager it means the two steps of the ensemble disagree
        (a step failed after the other had applied the request, a stub was reloaded): the sequence is
        dropped and the edge re-syncs both."""
        if self.inputs.from_client:
            raise position_error(block.sequence_id, positions, block.start_pos, "token")
        self.sequences.pop(block.sequence_id, None)  # not stored yet when a resumed START found no KV here
        raise SequenceNeedsStart(f"sequence {block.sequence_id}: the context manager's block starts at "
                                 f"{block.start_pos}, the cloud partition holds {positions} positions; state dropped, "
                                 "re-send the context with START")

    def _compute(self, split: int, blocks: list[Block]) -> list[CloudReply | ProtocolError]:
        """The blocks as one batch; when that fails, each alone (rewound first), so that one failing block
        fails alone and the others are computed as if it had not been there."""
        marks = [self.sequences[block.sequence_id].kv.mark() for block in blocks]
        try:
            return self._run(split, blocks)
        except Exception as e:
            for block, mark in zip(blocks, marks):
                self.sequences[block.sequence_id].kv.rewind(mark)
            if len(blocks) == 1:
                return [self._lost(blocks[0], e)]
        return [self._compute(split, [block])[0] for block in blocks]

    def _lost(self, block: Block, error: Exception) -> SequenceNeedsStart:
        """An unexpected failure on one sequence: its state cannot be vouched for, so it is dropped and the
        edge re-syncs it (a failure that repeats fails the re-sync too, and the edge gives up)."""
        self.sequences.pop(block.sequence_id, None)
        return SequenceNeedsStart(f"sequence {block.sequence_id}: the cloud partition failed on it "
                                  f"({type(error).__name__}: {error}) and dropped its state; re-send its context with "
                                  "START", details="".join(traceback.format_exception(error)))

    def _held_after_rollback(self, block: Block, seq: _Sequence) -> int:
        """Positions the KV holds once the block's rollback (checked by the context manager) is applied. A rollback
        this partition cannot apply means the two halves of the ensemble disagree: this sequence is dropped and the
        edge re-syncs both (needs START), rather than going on with a half-applied rollback."""
        held = seq.kv.length(seq.split_layer)
        if block.rollback_to is None:
            return held
        if block.rollback_to not in seq.rollback_window or block.rollback_to > held:
            self.sequences.pop(block.sequence_id, None)
            raise SequenceNeedsStart(f"sequence {block.sequence_id}: the cloud partition cannot roll back to "
                                     f"{block.rollback_to} (it holds {held} positions; its last drafts allow "
                                     f"{window_text(seq.rollback_window)}): re-send the context with START")
        return block.rollback_to

    def _run(self, split: int, blocks: list[Block]) -> list[CloudReply | ProtocolError]:
        """One pass over the blocks; each reply carries the pass's time (the compute its request waited for: the
        edge learns from it what a pass costs for its rows)."""
        model, t0 = self.model, self.clock()
        lengths = [b.num_rows for b in blocks]
        width = max(lengths)
        positions = torch.empty(len(blocks), width, dtype=torch.long)
        for b, block in enumerate(blocks):
            # padding rows repeat the last position: they see only real keys and are dropped after
            row_pos = torch.arange(block.start_pos, block.start_pos + width).clamp(max=block.start_pos + lengths[b] - 1)
            positions[b] = row_pos
        positions = positions.to(model.device)
        h = torch.zeros(len(blocks), width, model.cfg.hidden_size, dtype=model.dtype, device=model.device)
        for b, block in enumerate(blocks):
            h[b, : lengths[b]] = self.inputs.rows(block, positions[b, : lengths[b]])
        kvs = [self.sequences[block.sequence_id].kv for block in blocks]
        h = model.run_layers(h, positions, split, model.cfg.num_layers, kvs, lengths)
        # the head runs on each block's last row, or on every row its drafts name (the last row among them)
        heads = [len(b.drafts) if b.drafts is not None else 1 for b in blocks]
        owner = torch.repeat_interleave(torch.arange(len(blocks)), torch.tensor(heads))  # [H]
        row = torch.cat([torch.arange(n - r, n) for n, r in zip(lengths, heads)])  # [H]
        logits = model.exit_logits(h[owner, row], model.cfg.num_layers).float()  # [H, V]
        logprobs = torch.log_softmax(logits, dim=-1)  # [H, V]
        finite = torch.isfinite(logprobs).all(dim=-1)  # [H]; rows are per sequence, so one bad block spoils no other
        # ranked on the float32 logits, equal ones lowest id first: the first is the token Hugging Face's greedy
        # decoding takes (its argmax over float32 logits), even where log_softmax rounds two logits to one value
        top = top_k_ids(logits, self.top_k)  # [H, K]
        ids, values = top.tolist(), logprobs.gather(-1, top).tolist()  # waits for the device
        pass_s = self.clock() - t0
        self.rows_computed += sum(lengths) * (model.cfg.num_layers - split)
        replies: list[CloudReply | ProtocolError] = []
        for b, (block, end) in enumerate(zip(blocks, torch.tensor(heads).cumsum(0).tolist())):
            span = range(end - heads[b], end)
            if not bool(finite[span.start: span.stop].all()):
                replies.append(ProtocolError(ErrorCode.NOT_FINITE, f"sequence {block.sequence_id}: the cloud's logits "
                                                                   "are not finite; its hidden rows are out of range"))
                continue
            last = span.stop - 1
            reply = CloudReply(token_id=ids[last][0], confidence=float(np.exp(values[last][0])), topk_ids=ids[last],
                               topk_logprobs=values[last], catchup_rows=lengths[b], pass_s=pass_s)
            if block.drafts is not None:
                reply.rows = [RowVerdict(ids[i], values[i]) for i in span]
                self._count_agreement(block, reply.rows)
            self.tokens_served += 1
            replies.append(reply)
        return replies

    def _count_agreement(self, block: Block, rows: list[RowVerdict]) -> None:
        """Live exit fidelity: how often each edge exit's guess was the full model's greedy token."""
        for token, exit_layer, verdict in zip(block.drafts.tokens.tolist(), block.drafts.exits.tolist(), rows):
            self.drafts_checked[exit_layer] += 1
            self.drafts_agreed[exit_layer] += int(token == verdict.token)

    def expire(self, now: float | None = None) -> list[int]:
        """Drop sequences idle longer than the TTL (called on every step and by a periodic sweep)."""
        now = self.clock() if now is None else now
        return drop_idle(self.sequences, now, self.limits.ttl_s)

    @property
    def kv_bytes(self) -> int:
        return sum(seq.kv.nbytes for seq in self.sequences.values())

