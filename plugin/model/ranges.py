"""Which weight dtype a model can be served in: float16 only where its activations stay in float16's range.

Gemma 3's residual stream reaches about 98,500 (270M, on the <bos> row), beyond float16's 65,504: in float16
its rows turn into inf. bfloat16 has float32's range. The check runs the model once in float32 over a short
probe (the checkpoint's BOS token, then ordinary ids) and keeps a margin for contexts the probe never saw.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from plugin.model.checkpoint import load_model

FLOAT16_MAX = 65504.0
HEADROOM = 2.0  # float16 only when the probe's peak times this stays below FLOAT16_MAX
PROBE_TOKENS = 32
DTYPES = ("auto", "float32", "bfloat16", "float16")


@torch.inference_mode()
def residual_peak(checkpoint: str | Path) -> float:
    """The largest |value| of the residual stream (the embeddings and every layer's output) over the probe."""
    model = load_model(checkpoint)
    cfg = model.cfg
    bos = json.loads((Path(checkpoint) / "config.json").read_text()).get("bos_token_id")
    ids = ([bos] if isinstance(bos, int) else []) + list(range(min(cfg.vocab_size, 2 * PROBE_TOKENS)))[-PROBE_TOKENS:]
    positions = torch.arange(len(ids))[None]  # [1, T]
    h = model.embed_tokens(torch.tensor([ids]), positions)  # [1, T, D]
    kv = model.new_sequence(0, cfg.num_layers)
    peak = float(h.abs().max())
    for layer in range(cfg.num_layers):
        h = model.run_layers(h, positions, layer, layer + 1, [kv])
        peak = max(peak, float(h.abs().max()))
    return peak


def serving_dtype(checkpoint: str | Path, requested: str, gpu: bool) -> str:
    """The cloud's weight dtype: `requested`, or for "auto" float32 on CPU and, on a GPU, float16 where the model's
    activations fit it, else bfloat16. ValueError (one line) for float16 where they do not."""
    if requested not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {requested!r}")
    if requested in ("float32", "bfloat16") or (requested == "auto" and not gpu):
        return "float32" if requested == "auto" else requested
    peak = residual_peak(checkpoint)
    if peak * HEADROOM < FLOAT16_MAX:
        return "float16"
    if requested == "float16":
        raise ValueError(f"float16 cannot hold this model's activations: its residual stream reaches {peak:,.0f} "
                         f"(float16 stops at {FLOAT16_MAX:,.0f}, and {HEADROOM:g}x headroom is kept); serve it in "
                         "bfloat16 or float32 (--dtype)")
    return "bfloat16"
