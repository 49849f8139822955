"""The hidden-state codec: bounded error, and refusal of anything that would corrupt the context."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from plugin.protocol.codec import CodecError, decode, encode, EncodedRows


def test_fp32_is_lossless_and_fp16_int8_are_bounded():
    x = torch.randn(5, 64) * torch.tensor([[0.1], [1.0], [10.0], [100.0], [0.0]])
    assert torch.equal(decode(encode(x, "fp32"), 64, torch.float32, "cpu"), x)
    fp16 = decode(encode(x, "fp16"), 64, torch.float32, "cpu")
    torch.testing.assert_close(fp16, x, rtol=1e-3, atol=1e-3)
    enc = encode(x, "int8")
    assert enc.data.dtype == np.int8 and enc.scale.shape == (5, 1)
    assert enc.nbytes == 5 * 64 + 5 * 4  # 4x smaller than fp32 plus one scale per row
    err = (decode(enc, 64, torch.float32, "cpu") - x).abs()
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
])
def test_bad_rows_are_refused(rows, message):
    with pytest.raises(CodecError, match=message):
        decode(rows, 64, torch.float32, "cpu")
