"""Per-sequence K/V caches and the pending rows at every boundary.

The rules that keep early exit exact (DESIGN.md, "KV caches of skipped layers"):
- a layer's cache holds positions [0, length) in order: cache index == position;
- a block entering a layer starts exactly at that layer's length (no gaps, no overlaps);
- rows that stopped at a boundary wait there as one contiguous block ("pending rows") and are
  carried, in front of the next block that passes the boundary, through the layers they skipped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from plugin.model.layers import causal_mask


class PositionError(ValueError):
    """A block that would leave a gap or overwrite positions in a cache."""


class LayerKV:
    """Keys and values of one layer for one sequence, filled for positions [0, length)."""

    def __init__(self, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str):
        self._k = torch.empty(num_kv_heads, 16, head_dim, dtype=dtype, device=device)  # [Hkv, cap, Dh]
        self._v = torch.empty_like(self._k)
        self.length = 0

    def append(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v: [Hkv, T, Dh]
        if start_pos != self.length:
            raise PositionError(f"block starts at position {start_pos} but this layer holds {self.length} positions")
        end = start_pos + k.shape[1]
        if end > self._k.shape[1]:
            cap = max(end, 2 * self._k.shape[1])
            self._k = _grown(self._k, cap)
            self._v = _grown(self._v, cap)
        self._k[:, start_pos:end] = k
        self._v[:, start_pos:end] = v
        self.length = end

    def truncate(self, length: int) -> None:
        """Forget positions [length, ...) (`SequenceKV.rewind` checks the length)."""
        self.length = length

    @property
    def keys(self) -> torch.Tensor:
        return self._k[:, : self.length]  # [Hkv, length, Dh]

    @property
    def values(self) -> torch.Tensor:
        return self._v[:, : self.length]

    @property
    def nbytes(self) -> int:
        return 2 * self._k.element_size() * self._k.numel()


def _grown(t: torch.Tensor, cap: int) -> torch.Tensor:
    out = torch.empty(t.shape[0], cap, t.shape[2], dtype=t.dtype, device=t.device)
    out[:, : t.shape[1]] = t
    return out


@dataclass
class PendingRows:
    start: int  # position of the first row
    hidden: torch.Tensor  # [n, D] hidden states entering the boundary layer

    @property
    def end(self) -> int:
        return self.start + self.hidden.shape[0]


class BoundaryRows:
    """The rows waiting at each boundary (the pending rows), in position order, for one sequence.

    Both kinds of sequence state hold one: `SequenceKV` (PyTorch caches) and the graph runners' state.
    """

    def __init__(self, rows: dict[int, PendingRows] | None = None):
        self._rows: dict[int, PendingRows] = dict(rows or {})

    def add(self, boundary: int, start: int, hidden: torch.Tensor) -> None:
        """Rows that stopped at `boundary` wait there, after any rows already waiting."""
        held = self._rows.get(boundary)
        if held is None:
            self._rows[boundary] = PendingRows(start, hidden)
            return
        if start != held.end:
            raise PositionError(f"pending rows at layer {boundary} end at {held.end}, new rows start at {start}")
        self._rows[boundary] = PendingRows(held.start, torch.cat([held.hidden, hidden]))

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
        return sum(p.hidden.element_size() * p.hidden.numel() for p in self._rows.values())


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


class SequenceKV:
    """One sequence's caches for layers [first_layer, last_layer) and its pending rows."""

    def __init__(self, first_layer: int, last_layer: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.layers = {i: LayerKV(num_kv_heads, head_dim, dtype, device) for i in range(first_layer, last_layer)}
        self.pending = BoundaryRows()

    def length(self, layer: int) -> int:
        return self.layers[layer].length

    def mark(self) -> KVMark:
        return KVMark({i: self.length(i) for i in self.layers}, self.pending.copy())

    def rewind(self, mark: KVMark) -> None:
        """Back to `mark`: positions cached since are dropped, the pending rows are those held then."""
        for layer, length in checked_rewind(mark, self.length):
            self.layers[layer].truncate(length)
        self.pending = mark.pending.copy()

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers.values()) + self.pending.nbytes


def checked_rewind(mark: KVMark, length_of) -> list[tuple[int, int]]:
    """(layer, length) pairs to truncate to; refuses a mark that lies ahead of what a layer holds."""
    for layer, length in mark.lengths.items():
        if not 0 <= length <= length_of(layer):
            raise PositionError(f"cannot rewind layer {layer} from {length_of(layer)} positions to {length}")
    return list(mark.lengths.items())


def kv_gatherer(caches: list[LayerKV], positions: torch.Tensor, lengths: list[int]):
    """Store each sequence's new rows in its cache, then gather padded keys/values and the mask.

    positions: [B, T] (rows past lengths[b] are padding); returns a function for DecoderLayer.
    """

    def gather(k: torch.Tensor, v: torch.Tensor):
        # k, v: [B, Hkv, T, Dh]
        for b, cache in enumerate(caches):
            cache.append(int(positions[b, 0]), k[b, :, : lengths[b]], v[b, :, : lengths[b]])
        if len(caches) == 1:
            keys, values = caches[0].keys[None], caches[0].values[None]
        else:
            key_len = max(c.length for c in caches)
            keys = k.new_zeros(len(caches), k.shape[1], key_len, k.shape[3])
            values = torch.zeros_like(keys)
            for b, cache in enumerate(caches):
                keys[b, :, : cache.length] = cache.keys
                values[b, :, : cache.length] = cache.values
        return keys, values, causal_mask(positions, keys.shape[2])

    return gather
