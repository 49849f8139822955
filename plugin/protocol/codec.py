"""Hidden-state codec for the edge-to-cloud link: fp32 (lossless), fp16, int8 with per-row absmax."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from plugin.protocol.errors import ErrorCode, ProtocolError

CODEC_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}


class CodecError(ProtocolError):
    """Rows that cannot be decoded: wrong dtype or shape, missing scale, NaN/Inf (a MALFORMED request)."""

    def __init__(self, message: str):
        super().__init__(ErrorCode.MALFORMED, message)


@dataclass
class EncodedRows:
    codec: str
    data: np.ndarray  # [n, D] of CODEC_DTYPES[codec]
    scale: np.ndarray | None = None  # [n, 1] float32, int8 only

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + (self.scale.nbytes if self.scale is not None else 0)


def encode(hidden: torch.Tensor, codec: str) -> EncodedRows:
    """hidden: [n, D] -> wire arrays."""
    if codec not in CODEC_DTYPES:
        raise CodecError(f"unknown codec {codec!r}; choose one of {sorted(CODEC_DTYPES)}")
    x = hidden.detach().to("cpu", torch.float32).numpy()
    if codec != "int8":
        return EncodedRows(codec, x.astype(CODEC_DTYPES[codec]))
    absmax = np.abs(x).max(axis=1, keepdims=True)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)  # [n, 1]
    return EncodedRows(codec, np.clip(np.rint(x / scale), -127, 127).astype(np.int8), scale)


def check(rows: EncodedRows, hidden_size: int) -> None:
    """Every check that protects the stored context, without widening the block (a context manager keeps
    the rows as they arrived): dtype, shape [n, hidden_size], int8 scales, finite values once decoded."""
    data = rows.data
    expected = CODEC_DTYPES.get(rows.codec)
    if expected is None:
        raise CodecError(f"unknown codec {rows.codec!r}")
    if data.dtype != expected:
        raise CodecError(f"codec {rows.codec} expects {np.dtype(expected).name} rows, got {data.dtype.name}")
    if data.ndim != 2 or data.shape[1] != hidden_size:
        raise CodecError(f"hidden rows must have shape [n, {hidden_size}], got {list(data.shape)}")
    if rows.codec != "int8":
        finite = np.isfinite(data).all()
    else:
        scale = rows.scale
        if scale is None or scale.shape != (data.shape[0], 1) or scale.dtype != np.float32:
            raise CodecError(f"int8 rows need a float32 scale of shape [{data.shape[0]}, 1]")
        if not np.isfinite(scale).all() or (scale <= 0).any():
            raise CodecError("int8 scales must be finite and positive")
        # the largest decoded magnitude of each row, in float32 as decoding computes it: [n, 1]
        top = np.maximum(data.max(axis=1, initial=0), -data.min(axis=1, initial=0).astype(np.float32))[:, None]
        with np.errstate(over="ignore"):  # an overflow is what this looks for
            finite = np.isfinite(top * scale).all()
    if not finite:
        raise CodecError("hidden rows contain NaN or Inf")


def to_tensor(rows: EncodedRows, dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """Checked wire arrays -> [n, D] tensor."""
    x = rows.data.astype(np.float32)
    if rows.codec == "int8":
        x *= rows.scale
    return torch.from_numpy(x).to(device=device, dtype=dtype)


def decode(rows: EncodedRows, hidden_size: int, dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """Wire arrays -> [n, D] tensor, refusing anything `check` refuses."""
    check(rows, hidden_size)
    return to_tensor(rows, dtype, device)
