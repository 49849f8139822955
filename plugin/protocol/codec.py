"""Hidden-state codec for the edge-to-cloud link.

  fp32    lossless
  fp16    half the bytes; rows beyond fp16's range (65,504) are refused (they would arrive as inf)
  fp16s   fp16 rows divided by a per-row power-of-two scale: fp16's precision at any magnitude
          (Gemma 3's residual stream reaches 98,538 on the bos row)
  int8    a quarter of the bytes, per-row absmax scale: one outlier channel sets the step of the row
  int8g   int8 with one absmax scale per group of GROUP channels: an outlier channel costs precision
          in its own group only (Gemma 3's layer-12 rows: one channel near 10,000, median |x| near 50)
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from plugin.protocol.errors import ErrorCode, ProtocolError

CODEC_DTYPES = {"fp32": np.float32, "fp16": np.float16, "fp16s": np.float16, "int8": np.int8, "int8g": np.int8}
GROUP = 16  # channels per scale of int8g: on Gemma 3 270M (split 12) 16 kept 99.05% of the cloud's tokens,
# 32 kept 98.74% (bench/codec_fidelity.py, README "Exits on Gemma 3 270M")
FP16_MAX = float(np.finfo(np.float16).max)  # 65,504
FP16_HEADROOM = 2.0 ** 15  # fp16s: each row is scaled so that its absmax stays below this


def _scale_group(codec: str, hidden_size: int) -> int | None:
    """Channels sharing one scale (None: the codec sends no scale)."""
    if codec in ("int8", "fp16s"):
        return hidden_size
    return GROUP if codec == "int8g" else None


def scale_columns(codec: str, hidden_size: int) -> int | None:
    """Columns of a codec's float32 scale per row (None: the codec sends no scale)."""
    group = _scale_group(codec, hidden_size)
    return None if group is None else -(-hidden_size // group)


class CodecError(ProtocolError):
    """Rows that cannot be decoded: wrong dtype or shape, missing scale, NaN/Inf (a MALFORMED request)."""

    def __init__(self, message: str):
        super().__init__(ErrorCode.MALFORMED, message)


@dataclass
class EncodedRows:
    codec: str
    data: np.ndarray  # [n, D] of CODEC_DTYPES[codec]
    scale: np.ndarray | None = None  # [n, scale_columns] float32 for the codecs that scale

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + (self.scale.nbytes if self.scale is not None else 0)


def concat(codec: str, hidden_size: int, blocks: Sequence[EncodedRows]) -> EncodedRows:
    """Blocks of one codec as one block of their rows in order (0 rows for none), values untouched: a session's
    pending rows cross the ensemble's hop as they arrived. One block is handed on as it is (no copy)."""
    if len(blocks) == 1:
        return blocks[0]
    columns = scale_columns(codec, hidden_size)
    data = np.concatenate([np.empty((0, hidden_size), CODEC_DTYPES[codec]), *(b.data for b in blocks)])
    if columns is None:
        return EncodedRows(codec, data)
    return EncodedRows(codec, data, np.concatenate([np.empty((0, columns), np.float32), *(b.scale for b in blocks)]))


def encode(hidden: np.ndarray, codec: str) -> EncodedRows:
    """hidden: [n, D] (any array numpy can read as float32, a CPU torch tensor too) -> wire arrays."""
    if codec not in CODEC_DTYPES:
        raise CodecError(f"unknown codec {codec!r}; choose one of {sorted(CODEC_DTYPES)}")
    x = np.asarray(hidden, dtype=np.float32)
    if codec == "fp16" and x.size and np.abs(x).max() > FP16_MAX:
        raise CodecError(f"a hidden row reaches {np.abs(x).max():.6g}, beyond fp16's range ({FP16_MAX:g}): "
                         "use the fp16s codec (fp16 with a per-row scale)")
    if codec in ("fp32", "fp16"):
        return EncodedRows(codec, x.astype(CODEC_DTYPES[codec]))
    if codec == "fp16s":
        absmax = np.abs(x).max(axis=1, keepdims=True)  # [n, 1]
        exponent = np.ceil(np.log2(np.maximum(absmax, 1e-30) / FP16_HEADROOM))
        scale = np.exp2(np.maximum(exponent, 0)).astype(np.float32)  # a power of two >= 1: dividing is exact
        return EncodedRows(codec, (x / scale).astype(np.float16), scale)
    return _int8(x, _scale_group(codec, x.shape[1]), codec)


def _int8(x: np.ndarray, group: int, codec: str) -> EncodedRows:
    """Symmetric int8 with one absmax scale per `group` channels of each row (the last group may be short)."""
    absmax = _group_absmax(x, group)  # [n, G]
    scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / _per_channel(scale, group, x.shape[1])), -127, 127).astype(np.int8)
    return EncodedRows(codec, q, scale)


def check(rows: EncodedRows, hidden_size: int) -> None:
    """Every check that protects the stored context, without widening the block (a context manager keeps
    the rows as they arrived): dtype, shape [n, hidden_size], scales, finite values once decoded."""
    data = rows.data
    expected = CODEC_DTYPES.get(rows.codec)
    if expected is None:
        raise CodecError(f"unknown codec {rows.codec!r}")
    if data.dtype != expected:
        raise CodecError(f"codec {rows.codec} expects {np.dtype(expected).name} rows, got {data.dtype.name}")
    if data.ndim != 2 or data.shape[1] != hidden_size:
        raise CodecError(f"hidden rows must have shape [n, {hidden_size}], got {list(data.shape)}")
    finite = data.dtype == np.int8 or bool(np.isfinite(data).all())
    columns = scale_columns(rows.codec, hidden_size)
    if columns is not None:
        scale = rows.scale
        if scale is None or scale.shape != (data.shape[0], columns) or scale.dtype != np.float32:
            raise CodecError(f"{rows.codec} rows need a float32 scale of shape [{data.shape[0]}, {columns}]")
        if not np.isfinite(scale).all() or (scale <= 0).any():
            raise CodecError(f"{rows.codec} scales must be finite and positive")
        if finite:
            with np.errstate(over="ignore"):  # an overflow is what this looks for
                finite = bool(np.isfinite(_group_absmax(data, _scale_group(rows.codec, hidden_size)) * scale).all())
    if not finite:
        raise CodecError("hidden rows contain NaN or Inf")


def _per_channel(scale: np.ndarray, group: int, hidden_size: int) -> np.ndarray:
    """Each group's scale repeated over its channels: [n, G] -> [n, hidden_size]."""
    return np.repeat(scale, group, axis=1)[:, :hidden_size]


def _group_absmax(data: np.ndarray, group: int) -> np.ndarray:
    """The largest magnitude of each group of `group` channels of each row, without widening the block:
    [n, D] -> [n, ceil(D / group)] float32."""
    starts = np.arange(0, data.shape[1], group)
    top = np.maximum.reduceat(data, starts, axis=1).astype(np.float32)
    return np.maximum(top, -np.minimum.reduceat(data, starts, axis=1).astype(np.float32))


def to_array(rows: EncodedRows) -> np.ndarray:
    """Checked wire arrays -> [n, D] float32 (the cloud moves them to its device and dtype)."""
    x = rows.data.astype(np.float32)
    group = _scale_group(rows.codec, x.shape[1])
    if group is not None:
        x *= _per_channel(rows.scale, group, x.shape[1])
    return x


def decode(rows: EncodedRows, hidden_size: int) -> np.ndarray:
    """Wire arrays -> [n, D] float32, refusing anything `check` refuses."""
    check(rows, hidden_size)
    return to_array(rows)
