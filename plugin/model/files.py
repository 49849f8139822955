"""What an edge reads from a checkpoint directory without PyTorch: config.json, and the shortlists of an exit
heads file (the graph runners map an exported shortlist head's outputs back to vocabulary ids with them)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open

from plugin.model.architectures import CheckpointError, config_from_dict
from plugin.model.config import ModelConfig

SHORTLIST_IDS = "shortlist.token_ids"  # in an exit heads file: the ids a shortlist head scores


def read_config(checkpoint: str | Path) -> ModelConfig:
    """The checkpoint's ModelConfig; refuses (CheckpointError, one line naming the field) what is not implemented."""
    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: pass a local Hugging Face checkpoint directory")
    return config_from_dict(json.loads(path.read_text()))


def read_exit_shortlists(path: str | Path | None) -> dict[int, np.ndarray]:
    """exit layer -> the token ids [S] (int64) its shortlist head scores, for every shortlist exit in an exit
    heads file."""
    if path is None:
        return {}
    with safe_open(path, "np") as f:
        names = set(f.keys())
        token_ids = f.get_tensor(SHORTLIST_IDS).astype(np.int64) if SHORTLIST_IDS in names else None
    layers = {int(name.split(".")[1]) for name in names if name.endswith(".other.weight")}
    return {layer: token_ids for layer in sorted(layers)} if token_ids is not None else {}
