"""Load a local Hugging Face checkpoint into the project's own layer loop. Nothing is downloaded."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from plugin.model.architectures import CheckpointError, partition_weights
from plugin.model.decoder import DecoderModel, ExitAdapter, Shortlist
from plugin.model.files import read_config, SHORTLIST_IDS

__all__ = ["CheckpointError", "load_model", "read_config", "SHORTLIST_IDS"]


class _Tensors:
    """Lazy access to the tensors of one or many safetensors files, by name."""

    def __init__(self, checkpoint: Path):
        index = checkpoint / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {name: checkpoint / f for name, f in weight_map.items()}
        elif (checkpoint / "model.safetensors").is_file():
            with safe_open(checkpoint / "model.safetensors", "pt") as f:
                self._files = {name: checkpoint / "model.safetensors" for name in f.keys()}
        else:
            raise CheckpointError(f"no model.safetensors (or index) in {checkpoint}; convert the weights to safetensors")
        self._open: dict[Path, object] = {}

    def names(self) -> set[str]:
        return set(self._files)

    def get(self, name: str) -> torch.Tensor:
        path = self._files.get(name)
        if path is None:
            raise CheckpointError(f"tensor {name!r} missing from the checkpoint")
        if path not in self._open:
            self._open[path] = safe_open(path, "pt")
        return self._open[path].get_tensor(name)


def load_model(checkpoint: str | Path, layer_range: range | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", exit_adapters: str | Path | None = None) -> DecoderModel:
    """Build a DecoderModel holding `layer_range` (default: all layers) from a local checkpoint."""
    checkpoint = Path(checkpoint)
    cfg = read_config(checkpoint)
    layer_range = layer_range if layer_range is not None else range(cfg.num_layers)
    if layer_range.start < 0 or layer_range.stop > cfg.num_layers:
        raise CheckpointError(f"layers {layer_range} outside the checkpoint's {cfg.num_layers} layers")
    t = _Tensors(checkpoint)
    state = partition_weights(t, cfg, layer_range)
    state["lm_head.weight"] = state["embed.weight"] if cfg.tie_embeddings else t.get("lm_head.weight")
    with torch.device("meta"):
        model = DecoderModel(cfg, layer_range)
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:  # one parameter, so that a dtype change keeps one matrix (Gemma 3's: 262k x 640)
        model.lm_head.weight = model.embed.weight
    if exit_adapters is not None:
        _load_exit_adapters(model, Path(exit_adapters))
    model.to(device=device, dtype=dtype)
    return model.eval()


def _load_exit_adapters(model: DecoderModel, path: Path) -> None:
    """Exit heads saved by plugin/training/exit_heads.py: per exit layer L an adapter
    `exit.L.down.weight` / `exit.L.up.weight`, and for shortlist heads `exit.L.other.weight` / `.bias`
    with the shared `shortlist.token_ids` (their LM-head rows are taken from the checkpoint).
    The metadata key `adapter_input` says whether the adapters read h ("raw", the default) or h / RMS(h)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
        normalize = (f.metadata() or {}).get("adapter_input", "raw") == "rms"
    token_ids = tensors.pop(SHORTLIST_IDS, None)
    if token_ids is not None:
        if token_ids.ndim != 1 or token_ids.min() < 0 or token_ids.max() >= model.cfg.vocab_size:
            raise CheckpointError(f"{path}: {SHORTLIST_IDS} must be ids in [0, {model.cfg.vocab_size})")
        model.shortlist = Shortlist(token_ids, model.lm_head.weight.detach()[token_ids.long()].clone())
    layers = sorted({int(name.split(".")[1]) for name in tensors})
    for layer in layers:
        down = tensors[f"exit.{layer}.down.weight"]
        adapter = ExitAdapter(model.cfg.hidden_size, down.shape[0], normalize_input=normalize)
        adapter.load_state_dict({"down.weight": down, "up.weight": tensors[f"exit.{layer}.up.weight"]})
        model.exit_adapters[str(layer)] = adapter
        if f"exit.{layer}.other.weight" in tensors:
            if token_ids is None:
                raise CheckpointError(f"{path}: exit {layer} has an 'other' logit but the file has no {SHORTLIST_IDS}")
            other = nn.Linear(model.cfg.hidden_size, 1)
            other.load_state_dict({"weight": tensors[f"exit.{layer}.other.weight"],
                                   "bias": tensors[f"exit.{layer}.other.bias"]})
            model.exit_other[str(layer)] = other
