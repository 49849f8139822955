"""The partition plan: the one small file that drives the split, exports, engines and configs."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from plugin.protocol.codec import CODEC_DTYPES

_KEYS = {"checkpoint", "split_layer", "exit_layers", "threshold", "codec", "exit_adapters", "lookup_below"}


class PlanError(ValueError):
    """A partition plan that cannot drive a split of the given checkpoint."""


def _is_int(value: object) -> bool:
    """An int that is not a bool: JSON's true and false load as True and False, which Python counts as ints."""
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: object) -> str:
    """A refused value as the message shows it, saying why when a boolean stands where a number should."""
    items = value if isinstance(value, (list, tuple)) else [value]
    return f"{value!r}" + (" (JSON booleans are not numbers)" if any(isinstance(v, bool) for v in items) else "")


def check_threshold(value: object, name: str = "threshold") -> float:
    """A confidence threshold as a float: a number in [0, 1] (as the exit threshold, 1.0 never exits). The plan's
    rule, and --threshold's."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PlanError(f"{name} must be a number in [0, 1], got {_shown(value)}")
    if not 0.0 <= value <= 1.0:  # nan fails it too
        raise PlanError(f"{name} must lie in [0, 1], got {value}")
    return float(value)


@dataclass(frozen=True)
class PartitionPlan:
    checkpoint: Path  # local Hugging Face checkpoint directory
    split_layer: int  # edge runs layers [0, split_layer), the cloud [split_layer, N)
    exit_layers: tuple[int, ...]  # exit after this many layers; sorted, each <= split_layer
    threshold: float = 0.8  # exit when max softmax prob >= threshold; 1.0 never exits
    codec: str = "fp16"  # how layer-k hidden states travel to the cloud
    exit_adapters: Path | None = None  # safetensors with trained exit adapters, optional
    # verified mode: a draft whose exit is less confident than this is looked up in the sequence's own tokens
    # (edge_runtime/verified.py, `lookup`); 0 never. Whether it pays depends on the model: measure it per plan.
    lookup_below: float = 0.0

    def __post_init__(self) -> None:
        if not _is_int(self.split_layer) or self.split_layer < 1:
            raise PlanError(f"split_layer must be a positive integer, got {_shown(self.split_layer)}")
        exits = tuple(self.exit_layers)
        if not exits:
            raise PlanError("exit_layers is empty: the edge needs at least one exit")
        if any(not _is_int(e) or e < 1 for e in exits):
            raise PlanError(f"exit_layers must be positive integers, got {_shown(list(exits))}")
        if list(exits) != sorted(set(exits)):
            raise PlanError(f"exit_layers must be strictly increasing, got {list(exits)}")
        if exits[-1] > self.split_layer:
            raise PlanError(
                f"exit layer {exits[-1]} is past the split layer {self.split_layer}: "
                "edge exits must lie on the edge (each exit <= split_layer)"
            )
        object.__setattr__(self, "threshold", check_threshold(self.threshold))
        object.__setattr__(self, "lookup_below", check_threshold(self.lookup_below, "lookup_below"))
        if self.codec not in CODEC_DTYPES:
            raise PlanError(f"codec must be one of {sorted(CODEC_DTYPES)}, got {self.codec!r}")
        object.__setattr__(self, "exit_layers", exits)

    @property
    def boundaries(self) -> tuple[int, ...]:
        """Layer indices where edge segments end: every exit and the split."""
        return tuple(sorted(set(self.exit_layers) | {self.split_layer}))

    def check_depth(self, num_layers: int) -> None:
        """Fail before any work when the plan does not fit the checkpoint's depth."""
        if self.split_layer >= num_layers:
            raise PlanError(
                f"split_layer {self.split_layer} is beyond the model's depth: the checkpoint has "
                f"{num_layers} layers, so split_layer must be in [1, {num_layers - 1}] "
                "to leave the cloud at least one layer"
            )

    @classmethod
    def load(cls, path: str | Path) -> "PartitionPlan":
        """Read a JSON or YAML plan; relative paths are relative to the plan file."""
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
        return cls.from_dict(raw, base_dir=path.parent)

    @classmethod
    def from_dict(cls, raw: dict, base_dir: Path = Path(".")) -> "PartitionPlan":
        if not isinstance(raw, dict):
            raise PlanError(f"a partition plan is a mapping, got {type(raw).__name__}")
        unknown = set(raw) - _KEYS
        if unknown:
            raise PlanError(f"unknown keys in partition plan: {sorted(unknown)}; allowed: {sorted(_KEYS)}")
        missing = {"checkpoint", "split_layer", "exit_layers"} - set(raw)
        if missing:
            raise PlanError(f"partition plan lacks required keys: {sorted(missing)}")
        if not isinstance(raw["exit_layers"], list):
            raise PlanError(f"exit_layers must be a list of positive integers, got {_shown(raw['exit_layers'])}")
        adapters = raw.get("exit_adapters")
        return cls(
            checkpoint=(base_dir / raw["checkpoint"]).resolve(),
            split_layer=raw["split_layer"],
            exit_layers=tuple(raw["exit_layers"]),
            threshold=raw.get("threshold", 0.8),
            codec=raw.get("codec", "fp16"),
            exit_adapters=(base_dir / adapters).resolve() if adapters else None,
            lookup_below=raw.get("lookup_below", 0.0),
        )

    def to_dict(self, base_dir: Path) -> dict:
        """Paths are written relative to base_dir so a plan travels with its checkpoint."""
        out = {
            "checkpoint": os.path.relpath(self.checkpoint, base_dir),
            "split_layer": self.split_layer,
            "exit_layers": list(self.exit_layers),
            "threshold": self.threshold,
            "codec": self.codec,
        }
        if self.exit_adapters is not None:
            out["exit_adapters"] = os.path.relpath(self.exit_adapters, base_dir)
        if self.lookup_below:
            out["lookup_below"] = self.lookup_below
        return out

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(base_dir=path.parent.resolve()), indent=2) + "\n")

