"""What an ONNX export holds: one graph per edge segment, exit head and cloud partition, and the manifest
that ties the files to the plan and weights they were made from (read by runners and the engine builder)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from plugin.model.config import ModelConfig
from plugin.split.plan import PartitionPlan
OPSET = 17
MANIFEST = "manifest.json"
FORMAT = "ce-collm-onnx/1"
NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}


class ExportError(RuntimeError):
    """ONNX files missing, stale, or not made from this plan."""


def read_manifest(path: Path, fmt: str, error: type[Exception], missing_hint: str, redo: str) -> dict:
    """A manifest's JSON, refused (`error`) when missing or of another format than `fmt`."""
    if not path.is_file():
        raise error(f"{path} not found{missing_hint}")
    raw = json.loads(path.read_text())
    if raw.get("format") != fmt:
        raise error(f"{path} has format {raw.get('format')!r}, expected {fmt!r}: {redo}")
    return raw


def layer_tag(layer: int, num_layers: int) -> str:
    return str(layer).zfill(max(2, len(str(num_layers - 1))))


def kv_names(kind: str, layers: range, num_layers: int) -> list[str]:
    """['<kind>_key_LL', '<kind>_value_LL', ...] for kind 'past' or 'present', in layer order."""
    return [f"{kind}_{part}_{layer_tag(i, num_layers)}" for i in layers for part in ("key", "value")]


@dataclass(frozen=True)
class GraphSpec:
    name: str  # file stem: edge_00_02, exit_02, cloud_06_08
    kind: str  # "edge" | "exit_head" | "cloud"
    first_layer: int
    last_layer: int
    exit_layer: int | None  # the exit head this graph ends with (edge segments at an exit, exit heads)
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.last_layer)


def graph_specs(plan: PartitionPlan, num_layers: int) -> list[GraphSpec]:
    """Every graph the plan needs, edge segments first, in layer order."""
    plan.check_depth(num_layers)
    n, specs, first = num_layers, [], 0
    for boundary in plan.boundaries:
        layers = range(first, boundary)
        exit_layer = boundary if boundary in plan.exit_layers else None
        head = ("exit_logits", "exit_confidence", "exit_token") if exit_layer else ()
        specs.append(GraphSpec(
            f"edge_{layer_tag(first, n)}_{layer_tag(boundary, n)}", "edge", first, boundary, exit_layer,
            ("input_ids" if first == 0 else "hidden_in", "start_pos", *kv_names("past", layers, n)),
            ("hidden_out", *head, *kv_names("present", layers, n)),
        ))
        first = boundary
    for e in plan.exit_layers:
        specs.append(GraphSpec(f"exit_{layer_tag(e, n)}", "exit_head", e, e, e, ("hidden",),
                               ("exit_logits", "exit_confidence", "exit_token")))
    cloud = range(plan.split_layer, n)
    specs.append(GraphSpec(
        f"cloud_{layer_tag(plan.split_layer, n)}_{layer_tag(n, n)}", "cloud", plan.split_layer, n, None,
        ("hidden_in", "start_pos", *kv_names("past", cloud, n)),
        ("token_id", "confidence", "topk_ids", "topk_logprobs", "catchup_rows", *kv_names("present", cloud, n)),
    ))
    return specs


def dynamic_axes(spec: GraphSpec) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for name in spec.inputs + spec.outputs:
        if name in ("input_ids", "hidden_in", "hidden_out"):
            axes[name] = {0: "batch", 1: "block"}
        elif name.startswith("past_"):
            axes[name] = {0: "batch", 2: "past"}
        elif name.startswith("present_"):
            axes[name] = {0: "batch", 2: "total"}
        else:
            axes[name] = {0: "batch"}
    return axes


def graph_path(out_dir: Path, spec: GraphSpec, precision: str) -> Path:
    return Path(out_dir) / precision / f"{spec.name}.onnx"


def checkpoint_fingerprint(plan: PartitionPlan, weights: bool = True) -> str:
    """sha256 of config.json, of the weight files' names and sizes (cheap for multi-GB checkpoints) and of the
    exit adapters: graphs exported before any of them changed are refused. weights=False: what an edge device
    holds of the checkpoint (config.json and the exit adapters; the weights are inside the graphs)."""
    ckpt = plan.checkpoint
    digest = hashlib.sha256((ckpt / "config.json").read_bytes())
    files = ([ckpt / w for w in _weight_files(ckpt)] if weights else []) + ([plan.exit_adapters] if plan.exit_adapters else [])
    for f in files:
        digest.update(f"{f.name}:{f.stat().st_size if f.is_file() else -1}".encode())
    return digest.hexdigest()[:16]


def _weight_files(checkpoint: Path) -> list[str]:
    index = checkpoint / "model.safetensors.index.json"
    return sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]


@dataclass
class Manifest:
    """What was exported, from which plan: the ONNX runner and the engine builder read it."""

    split_layer: int
    exit_layers: list[int]
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    precisions: list[str]
    fingerprint: str
    graphs: list[dict] = field(default_factory=list)  # GraphSpec fields
    device_fingerprint: str = ""  # checkpoint_fingerprint(weights=False); "" in exports that predate it
    format: str = FORMAT
    opset: int = OPSET

    def specs(self) -> list[GraphSpec]:
        return [GraphSpec(**{**g, "inputs": tuple(g["inputs"]), "outputs": tuple(g["outputs"])}) for g in self.graphs]

    def spec(self, name: str) -> GraphSpec:
        for s in self.specs():
            if s.name == name:
                return s
        raise ExportError(f"no graph named {name!r} in the manifest")

    def save(self, out_dir: Path) -> Path:
        path = Path(out_dir) / MANIFEST
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, onnx_dir: Path) -> "Manifest":
        return cls(**read_manifest(Path(onnx_dir) / MANIFEST, FORMAT, ExportError, "", "re-export"))

    def check_plan(self, plan: PartitionPlan) -> None:
        """Refuse files exported for another split, other exits or other weights."""
        if self.split_layer != plan.split_layer or tuple(self.exit_layers) != tuple(plan.exit_layers):
            raise ExportError(f"the ONNX files were exported for split {self.split_layer}, exits {self.exit_layers}; "
                              f"the plan says split {plan.split_layer}, exits {list(plan.exit_layers)}")
        if self.fingerprint == checkpoint_fingerprint(plan):
            return
        on_device = not any((plan.checkpoint / w).is_file() for w in _weight_files(plan.checkpoint))
        if not (on_device and self.device_fingerprint == checkpoint_fingerprint(plan, weights=False)):
            raise ExportError(f"the ONNX files were exported from other weights than {plan.checkpoint}")


def new_manifest(plan: PartitionPlan, cfg: ModelConfig, precisions: list[str]) -> Manifest:
    return Manifest(plan.split_layer, list(plan.exit_layers), cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads,
                    cfg.head_dim, cfg.vocab_size, cfg.max_positions, list(precisions), checkpoint_fingerprint(plan),
                    [asdict(s) for s in graph_specs(plan, cfg.num_layers)], device_fingerprint=checkpoint_fingerprint(plan, weights=False))


def default_onnx_dir(plan: PartitionPlan) -> Path:
    """<checkpoint>/onnx/<plan>: each plan of a checkpoint keeps its own graphs, e.g.
    onnx/split17-exits17-exit_heads (split, exit layers, exit heads file)."""
    exits = "-".join(map(str, plan.exit_layers))
    heads = f"-{Path(plan.exit_adapters).stem}" if plan.exit_adapters else ""
    return plan.checkpoint / "onnx" / f"split{plan.split_layer}-exits{exits}{heads}"
