"""The cloud's weight dtype keeps the model's range: float16 only where its activations fit (issue 24)."""
from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file

from plugin.model.ranges import FLOAT16_MAX, residual_peak, serving_dtype
from tests.tiny_models import save_tiny


def test_auto_serves_float16_on_a_gpu_only_where_the_activations_fit(tmp_path):
    small, large = tmp_path / "small", tmp_path / "large"
    save_tiny("llama", small)
    save_tiny("llama", large)
    weights = load_file(large / "model.safetensors")
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"] * 1e6  # a residual stream like Gemma's
    save_file(weights, large / "model.safetensors")
    assert residual_peak(small) < FLOAT16_MAX / 2 < FLOAT16_MAX < residual_peak(large)
    assert [serving_dtype(small, "auto", gpu) for gpu in (False, True)] == ["float32", "float16"]
    assert [serving_dtype(large, "auto", gpu) for gpu in (False, True)] == ["float32", "bfloat16"]
    assert serving_dtype(large, "float32", True) == "float32"
    with pytest.raises(ValueError, match="float16 cannot hold this model's activations"):
        serving_dtype(large, "float16", True)
