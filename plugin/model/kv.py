"""Per-sequence K/V caches of the PyTorch layer loop (the pending rows at each boundary: rows.py).

The rules that keep early exit exact (docs/design.md, "Exactness of the catch-up"):
- a layer's cache is filled for positions [0, length), in order;
- a block entering a layer starts exactly at that layer's length (no gaps, no overlaps);
- rows that stopped at a boundary wait there as one contiguous block ("pending rows") and are
  carried, in front of the next block that passes the boundary, through the layers they skipped;
- a local (sliding-window) layer forgets the keys no later query can see: a block starting at s
  needs nothing before s - window + 1, so the layer can be rewound to s but not before; a sequence
  that may be rewound further back (verified drafts) says so with `keep_rewindable`.
"""
from __future__ import annotations

import torch

from plugin.model.layers import causal_mask
from plugin.model.rows import BoundaryRows, checked_rewind, KVMark, PositionError


class LayerKV:
    """Keys and values of one layer for one sequence: positions [0, length) were filled, [start, length) are held.

    A global layer holds every position (start stays 0). A local layer with a sliding `window` drops the
    positions that no query from here on can see; its buffer slot i holds position base + i.
    """

    def __init__(self, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str,
                 window: int | None = None):
        self._k = torch.empty(num_kv_heads, 16, head_dim, dtype=dtype, device=device)  # [Hkv, cap, Dh]
        self._v = torch.empty_like(self._k)
        self.window = window
        self.length = 0
        self.start = 0  # first position held; earlier ones were forgotten (local layers only)
        self._base = 0  # position held in buffer slot 0
        self.keep_from: int | None = None  # a rewind may come back to this position: keep what a block there needs

    def append(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v: [Hkv, T, Dh]
        if start_pos != self.length:
            raise PositionError(f"block starts at position {start_pos} but this layer holds {self.length} positions")
        if self.window is not None:  # the block's first query (or a block at keep_from) sees no further back
            first_query = start_pos if self.keep_from is None else min(start_pos, self.keep_from)
            self._forget_before(first_query - self.window + 1)
        end = start_pos + k.shape[1]
        if end - self._base > self._k.shape[1]:
            cap = _capacity(self._k.shape[1], end - self._base)
            self._k = _grown(self._k, cap)
            self._v = _grown(self._v, cap)
        self._k[:, start_pos - self._base:end - self._base] = k
        self._v[:, start_pos - self._base:end - self._base] = v
        self.length = end

    def _forget_before(self, position: int) -> None:
        if position <= self.start:
            return
        self.start = position
        dead, kept = self.start - self._base, self.length - self.start
        if dead >= max(kept, 16):  # compact once the dead slots outnumber the held ones: O(1) copying per row
            self._k[:, :kept] = self._k[:, dead:dead + kept]  # dead >= kept: the slices do not overlap
            self._v[:, :kept] = self._v[:, dead:dead + kept]
            self._base = self.start

    def check_truncate(self, length: int) -> None:
        """A local layer refuses to go back where a block at `length` would miss keys it forgot."""
        oldest_needed = max(length - self.window + 1, 0) if self.window is not None else 0
        if oldest_needed < self.start:
            raise PositionError(f"cannot go back to {length} positions: this sliding-window layer forgot the "
                                f"positions before {self.start}")

    def truncate(self, length: int) -> None:
        """Forget positions [length, ...)."""
        self.check_truncate(length)
        self.length = length

    @property
    def positions(self) -> torch.Tensor:
        return torch.arange(self.start, self.length, device=self._k.device)  # [held]

    @property
    def keys(self) -> torch.Tensor:
        return self._k[:, self.start - self._base:self.length - self._base]  # [Hkv, held, Dh]

    @property
    def values(self) -> torch.Tensor:
        return self._v[:, self.start - self._base:self.length - self._base]

    @property
    def nbytes(self) -> int:
        return 2 * self._k.element_size() * self._k.numel()

    def nbytes_after(self, length: int) -> int:
        """What nbytes will be once the layer holds `length` positions (appending grows the capacity)."""
        per_position = 2 * self._k.element_size() * self._k.shape[0] * self._k.shape[2]
        return per_position * _capacity(self._k.shape[1], length - self._base)


def _capacity(capacity: int, end: int) -> int:
    """The capacity that holds `end` slots: at least doubled whenever it must grow."""
    return capacity if end <= capacity else max(end, 2 * capacity)


def _grown(t: torch.Tensor, cap: int) -> torch.Tensor:
    out = torch.empty(t.shape[0], cap, t.shape[2], dtype=t.dtype, device=t.device)
    out[:, : t.shape[1]] = t
    return out


class SequenceKV:
    """One sequence's caches for layers [first_layer, last_layer) and its pending rows."""

    def __init__(self, first_layer: int, last_layer: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, windows: dict[int, int | None] | None = None):
        windows = windows or {}  # layer -> sliding window, for local layers
        self.layers = {i: LayerKV(num_kv_heads, head_dim, dtype, device, windows.get(i))
                       for i in range(first_layer, last_layer)}
        self.pending = BoundaryRows()

    def length(self, layer: int) -> int:
        return self.layers[layer].length

    def mark(self) -> KVMark:
        return KVMark({i: self.length(i) for i in self.layers}, self.pending.copy())

    def keep_rewindable(self, position: int) -> None:
        """From now on a rewind may come back to `position` (no further): local layers keep the keys a block
        starting there needs, however far later blocks go."""
        for layer in self.layers.values():
            layer.keep_from = position

    def rewind(self, mark: KVMark) -> None:
        """Back to `mark`: positions cached since are dropped, the pending rows are those held then.
        Every layer is checked before any changes: a refused rewind leaves the sequence as it was."""
        target = checked_rewind(mark, self.length)
        for layer, length in target:
            self.layers[layer].check_truncate(length)
        for layer, length in target:
            self.layers[layer].truncate(length)
        self.pending = mark.pending.copy()

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers.values()) + self.pending.nbytes

    def nbytes_after(self, rows: int) -> int:
        """What nbytes will be once every layer holds `rows` more positions."""
        return sum(layer.nbytes_after(layer.length + rows) for layer in self.layers.values()) + self.pending.nbytes


_NO_POSITION = torch.iinfo(torch.int64).max  # a key position past every query: padding is never seen


def kv_gatherer(caches: list[LayerKV], positions: torch.Tensor, lengths: list[int]):
    """Store each sequence's new rows in its cache, then gather padded keys/values and the mask.

    positions: [B, T] (rows past lengths[b] are padding); returns a function for DecoderLayer.
    """

    def gather(k: torch.Tensor, v: torch.Tensor):
        # k, v: [B, Hkv, T, Dh]
        for b, cache in enumerate(caches):
            cache.append(int(positions[b, 0]), k[b, :, : lengths[b]], v[b, :, : lengths[b]])
        if len(caches) == 1:
            keys, values, key_pos = caches[0].keys[None], caches[0].values[None], caches[0].positions[None]
        else:
            held = max(c.length - c.start for c in caches)
            keys = k.new_zeros(len(caches), k.shape[1], held, k.shape[3])  # [B, Hkv, L, Dh]
            values = torch.zeros_like(keys)
            key_pos = torch.full((len(caches), held), _NO_POSITION, device=k.device)  # [B, L]
            for b, cache in enumerate(caches):
                n = cache.length - cache.start
                keys[b, :, :n], values[b, :, :n], key_pos[b, :n] = cache.keys, cache.values, cache.positions
        return keys, values, causal_mask(positions, key_pos, caches[0].window)

    return gather

