"""The hidden-state codec: bounded error, and refusal of anything that would corrupt the context."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from plugin.protocol.codec import CodecError, decode, encode, EncodedRows


def test_fp32_is_lossless_and_fp16_int8_are_bounded():
    x = torch.randn(5, 64) * torch.tensor([[0.1], [1.0], [10.0], [100.0], [0.0]])
    assert torch.equal(torch.from_numpy(decode(encode(x, "fp32"), 64)), x)
    fp16 = torch.from_numpy(decode(encode(x, "fp16"), 64))
    torch.testing.assert_close(fp16, x, rtol=1e-3, atol=1e-3)
    enc = encode(x, "int8")
    assert enc.data.dtype == np.int8 and enc.scale.shape == (5, 1)
    assert enc.nbytes == 5 * 64 + 5 * 4  # 4x smaller than fp32 plus one scale per row
    err = (torch.from_numpy(decode(enc, 64)) - x).abs()
    assert (err <= x.abs().amax(dim=1, keepdim=True) / 127 / 2 + 1e-6).all()  # half a step per row


@pytest.mark.parametrize("rows, message", [
    (EncodedRows("fp16", np.zeros((2, 64), np.float32)), "expects float16"),
    (EncodedRows("fp16", np.zeros((2, 63), np.float16)), r"shape \[n, 64\]"),
    (EncodedRows("fp16", np.zeros((1, 2, 64), np.float16)), r"shape \[n, 64\]"),
    (EncodedRows("fp32", np.full((2, 64), np.nan, np.float32)), "NaN or Inf"),
    (EncodedRows("fp16", np.full((2, 64), np.inf, np.float16)), "NaN or Inf"),
    (EncodedRows("int8", np.zeros((2, 64), np.int8)), "scale"),
    (EncodedRows("int8", np.zeros((2, 64), np.int8), np.zeros((2, 1), np.float32)), "positive"),
    (EncodedRows("bf16", np.zeros((2, 64), np.float16)), "unknown codec"),
    (EncodedRows("fp16s", np.full((2, 64), np.inf, np.float16), np.ones((2, 1), np.float32)), "NaN or Inf"),
    (EncodedRows("fp16s", np.zeros((2, 64), np.float16), np.ones((2, 2), np.float32)), r"scale of shape \[2, 1\]"),
    (EncodedRows("int8g", np.full((2, 64), 127, np.int8),  # 127 x 3e36 overflows float32 in the second group
                 np.array([[1.0, 3e36, 1.0, 1.0], [1.0] * 4], np.float32)), "NaN or Inf"),
])
def test_bad_rows_are_refused(rows, message):
    with pytest.raises(CodecError, match=message):
        decode(rows, 64)


def test_fp16s_keeps_fp16_precision_beyond_its_range():
    """Gemma 3's bos row reaches 98,538: fp16 refuses it at the edge, fp16s carries it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=g).clamp(-4, 4) * torch.tensor([[1.0], [100.0], [5e3], [0.0]])
    x[0, 3] = 98_538.0
    with pytest.raises(CodecError, match="fp16s"):
        encode(x, "fp16")
    enc = encode(x, "fp16s")
    assert enc.data.dtype == np.float16 and enc.scale.shape == (4, 1) and enc.nbytes == 4 * 64 * 2 + 4 * 4
    assert enc.scale[0, 0] == 4.0 and (enc.scale[1:] == 1.0).all()  # powers of two, 1 where fp16 suffices
    got = torch.from_numpy(decode(enc, 64))
    torch.testing.assert_close(got, x, rtol=1e-3, atol=1e-3 * 4)
    assert torch.equal(got[1:], x[1:].half().float())  # scale 1: plain fp16


def test_int8g_confines_an_outlier_channel_to_its_group():
    """One channel 200x the others: per-row absmax loses every other channel, groups of 16 keep them."""
    x = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))
    x[:, 5] = 200.0
    row_err = (torch.from_numpy(decode(encode(x, "int8"), 100)) - x).abs()
    enc = encode(x, "int8g")
    assert enc.scale.shape == (3, 7) and enc.nbytes == 3 * 100 + 3 * 7 * 4  # ceil(100 / 16) groups
    group_err = (torch.from_numpy(decode(enc, 100)) - x).abs()
    steps = x[:, :96].abs().reshape(3, 6, 16).amax(-1) / 127  # the six full groups
    assert (group_err[:, :96].reshape(3, 6, 16) <= steps[..., None] / 2 + 1e-6).all()  # half a step per group
    assert group_err[:, 16:].max() < row_err[:, 16:].max() / 10
    with pytest.raises(CodecError, match=r"scale of shape \[3, 7\]"):
        decode(EncodedRows("int8g", enc.data, enc.scale[:, :1]), 100)
