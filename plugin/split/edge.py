"""The edge partition: layers [0, k) run segment by segment, with an exit decision at each exit.

The segment loop (pending rows carried across each boundary, the exit decision, rows left waiting
when a token exits, the rows that reach the split) lives here once. What computes a segment is a
`SegmentRunner`: the PyTorch layer loop, ONNX Runtime or TensorRT (`edge_runtime/runners.py`). Rows, logits
and token ids cross that seam as numpy arrays, so this loop runs on an edge without PyTorch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol

import numpy as np

from plugin.model.rows import BoundaryRows, KVMark, PendingRows, position_mark
from plugin.model.sampling import Sampler
from plugin.split.plan import PartitionPlan


class SequenceState(Protocol):
    """One sequence's runner state: its KV (in whatever form the runner keeps it) and its pending rows."""

    pending: BoundaryRows

    def length(self, layer: int) -> int:
        """Positions the KV cache of `layer` holds: the next block entering it must start there."""

    def mark(self) -> KVMark: ...

    def keep_rewindable(self, position: int) -> None:
        """From now on a rewind may come back to `position`: keep what a block starting there needs."""

    def rewind(self, mark: KVMark) -> None:
        """Undo every step since `mark` (a speculative step whose guessed token was wrong)."""


@dataclass
class ExitOutput:
    """What the exit head after a segment says about the segment's last row."""

    logits: np.ndarray  # [C] float32 over the head's candidate tokens: [V], or a shortlist's [S]
    confidence: float  # the head's probability of `token` (a shortlist head's "other" mass counted)
    token: int  # its best candidate (a vocabulary id)
    token_ids: np.ndarray | None = None  # [C] int64 vocabulary ids of the candidates; None: every id in order

    def pick(self, sampler: Sampler) -> int:
        """The sampler's choice among the head's candidates, as a vocabulary id (greedy: among equal logits the
        lowest id, as over the whole vocabulary)."""
        return sampler.pick(self.logits, self.token_ids)


@dataclass
class SegmentOutput:
    hidden: np.ndarray  # [T, D] float32 rows leaving the segment
    exit: ExitOutput | None  # set when the segment ends at an exit


class SegmentRunner(Protocol):
    """Computes a segment of layers and, where one ends a segment, its exit head; knows nothing about
    thresholds or pending rows."""

    hidden_size: int
    num_layers: int  # depth of the whole model (the plan's split must leave the cloud a layer)
    layers: range  # the layers this runner can run

    def new_sequence(self) -> SequenceState: ...

    def run(self, first_layer: int, last_layer: int, x: np.ndarray, start_pos: int, state: SequenceState,
            exit_layer: int | None) -> SegmentOutput:
        """Layers [first_layer, last_layer) over one block of rows at positions [start_pos, start_pos + T),
        then the exit head after `exit_layer` (== last_layer, or None for no exit) on the last row.

        x: token ids [T] (int64) when first_layer == 0, else hidden rows [T, D] float32.
        The block must start at the cached length of first_layer (`PositionError` otherwise).
        """

    def exit_logits(self, hidden_row: np.ndarray, layer: int) -> np.ndarray:
        """Logits of the exit after `layer` layers for any one hidden row [D] (the exit head alone):
        [V], or a shortlist head's [S + 1] (`DecoderModel.exit_logits`)."""


@dataclass(frozen=True)
class ExitPolicy:
    """Exit when confident; a threshold of 1.0 never exits (a saturated softmax rounds to 1.0)."""

    threshold: float
    local_only: bool = False  # standalone: the last edge exit emits even when not confident

    def exits(self, conf: float, is_last_exit: bool) -> bool:
        if is_last_exit and self.local_only:
            return True
        return self.threshold < 1.0 and conf >= self.threshold


@dataclass
class EdgeStep:
    token_id: int | None = None  # set when the token exited on the edge
    exit_layer: int | None = None
    confidences: list[tuple[int, float]] = field(default_factory=list)  # (exit layer, confidence) seen
    split_rows: PendingRows | None = None  # rows that reached the split in this step: the cloud's input
    rows_by_layer: dict[int, int] = field(default_factory=dict)  # rows computed per layer in this step
    last_exit: ExitOutput | None = None  # the last exit's head: the edge's answer if the cloud fails


class EdgePartition:
    """The plan's edge layers [0, k) on one `SegmentRunner`, with an exit decision at every exit."""

    def __init__(self, runner: SegmentRunner, plan: PartitionPlan):
        plan.check_depth(runner.num_layers)
        if runner.layers.start != 0 or runner.layers.stop < plan.split_layer:
            raise ValueError(f"the edge needs layers [0, {plan.split_layer}), the runner holds {runner.layers}")
        self.runner, self.plan = runner, plan

    @property
    def hidden_size(self) -> int:
        return self.runner.hidden_size

    def new_sequence(self) -> SequenceState:
        return self.runner.new_sequence()

    def step(self, seq: SequenceState, token_ids: list[int], start_pos: int, policy: ExitPolicy,
             sampler: Sampler) -> EdgeStep:
        """Run a block (a prompt, or one new token) from the embeddings up to where it stops.

        At every boundary the rows waiting there are put in front of the block, so the layers
        they skipped are filled before any later token attends to them.
        """
        out, last_exit = EdgeStep(), self.plan.exit_layers[-1]
        x = np.asarray(token_ids, np.int64)  # [T] token ids, then [T, D] hidden rows
        for layer, boundary, start, segment in self._segments(seq, x, start_pos, with_exits=True):
            h = segment.hidden  # [T, D]
            out.rows_by_layer.update({i: h.shape[0] for i in range(layer, boundary)})
            if boundary == self.plan.split_layer:
                out.split_rows = PendingRows(start, h)
            if segment.exit is None:
                continue
            if boundary == last_exit:
                out.last_exit = segment.exit
            out.confidences.append((boundary, segment.exit.confidence))
            if policy.exits(segment.exit.confidence, boundary == last_exit):
                out.token_id, out.exit_layer = segment.exit.pick(sampler), boundary
                if boundary != self.plan.split_layer:  # rows at the split belong to the cloud
                    seq.pending.add(boundary, start, h)
                return out
        return out

    def carry_to_split(self, seq: SequenceState) -> PendingRows | None:
        """Carry every row waiting at a boundary up to the split, with no new token (no exit heads run): the
        rows the cloud needs for positions whose drafts exited early. None when no row was waiting."""
        carried = None
        for _, boundary, start, segment in self._segments(seq, None, 0, with_exits=False):
            if boundary == self.plan.split_layer:
                carried = PendingRows(start, segment.hidden)
        return carried

    def rewind_to(self, seq: SequenceState, position: int) -> None:
        """Drop positions >= `position` from every edge layer, and every waiting row: valid once all rows before
        `position` reached the split (carry_to_split), as before a verification request leaves."""
        seq.rewind(position_mark(range(self.plan.split_layer), position))

    def _segments(self, seq: SequenceState, x: np.ndarray | None, start: int,
                  with_exits: bool) -> Iterator[tuple[int, int, int, SegmentOutput]]:
        """Run the segments in order, each with the rows waiting at its first layer in front of the block; yields
        (first layer, boundary, position of the first row, output). x None: start at the first waiting rows.
        The caller stops where the token exits (the later segments then do not run)."""
        layer = 0
        for boundary in self.plan.boundaries:
            waiting = seq.pending.take(layer)
            if waiting is not None:  # never at layer 0: no boundary lies there
                x, start = (waiting.hidden if x is None else np.concatenate([waiting.hidden, x])), waiting.start
            if x is not None:
                exit_layer = boundary if with_exits and boundary in self.plan.exit_layers else None
                segment = self.runner.run(layer, boundary, x, start, seq, exit_layer)
                yield layer, boundary, start, segment
                x = segment.hidden
            layer = boundary
