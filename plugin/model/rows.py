"""Rows waiting at the boundaries of one sequence, and where a sequence stood (a mark to rewind to).

Array-agnostic and free of torch: the edge's runners all hand rows over as numpy arrays, so an edge
without PyTorch (ONNX Runtime, TensorRT) keeps them with the same code as the PyTorch runner.
The rules they keep are kv.py's (docs/design.md, "Exactness of the catch-up").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


class PositionError(ValueError):
    """A block that would leave a gap or overwrite positions in a cache."""


@dataclass
class PendingRows:
    start: int  # position of the first row
    hidden: np.ndarray  # [n, D] hidden states entering the boundary layer

    @property
    def end(self) -> int:
        return self.start + self.hidden.shape[0]


class BoundaryRows:
    """The rows waiting at each boundary (the pending rows), in position order, for one sequence.

    Both kinds of sequence state hold one: `SequenceKV` (PyTorch caches) and the graph runners' state.
    """

    def __init__(self, rows: dict[int, PendingRows] | None = None):
        self._rows: dict[int, PendingRows] = dict(rows or {})

    def add(self, boundary: int, start: int, hidden: np.ndarray) -> None:
        """Rows that stopped at `boundary` wait there, after any rows already waiting."""
        held = self._rows.get(boundary)
        if held is None:
            self._rows[boundary] = PendingRows(start, hidden)
            return
        if start != held.end:
            raise PositionError(f"pending rows at layer {boundary} end at {held.end}, new rows start at {start}")
        self._rows[boundary] = PendingRows(held.start, np.concatenate([held.hidden, hidden]))

    def take(self, boundary: int) -> PendingRows | None:
        """The rows waiting at `boundary`, which then wait no more (the caller carries them on)."""
        return self._rows.pop(boundary, None)

    def __getitem__(self, boundary: int) -> PendingRows:
        return self._rows[boundary]

    def __len__(self) -> int:
        return len(self._rows)

    def copy(self) -> "BoundaryRows":
        return BoundaryRows(self._rows)

    @property
    def nbytes(self) -> int:
        return sum(p.hidden.nbytes for p in self._rows.values())


@dataclass(frozen=True)
class KVMark:
    """Where a sequence stood: the cached length of every layer and the rows pending at each boundary."""

    lengths: dict[int, int]
    pending: BoundaryRows


def position_mark(layers, position: int) -> KVMark:
    """The state in which every one of `layers` holds exactly positions [0, position) and no row waits at a
    boundary: where to rewind a sequence whose rows before `position` all passed every layer (they were carried
    to the split) when everything from `position` on is dropped (drafts the full model rejected)."""
    return KVMark({layer: position for layer in layers}, BoundaryRows())


def checked_rewind(mark: KVMark, length_of: Callable[[int], int]) -> list[tuple[int, int]]:
    """(layer, length) pairs to truncate to; refuses a mark that lies ahead of what a layer holds."""
    for layer, length in mark.lengths.items():
        if not 0 <= length <= length_of(layer):
            raise PositionError(f"cannot rewind layer {layer} from {length_of(layer)} positions to {length}")
    return list(mark.lengths.items())
