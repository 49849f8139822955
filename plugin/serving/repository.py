"""Generate (and check) the Triton model repository from the partition plan and the checkpoint.

The repository serves four models:
  ce_collm         platform ensemble: context_manager -> cloud_partition (what edges call)
  context_manager  python, stateful: keeps each session's uploaded layer-k rows
  cloud_partition  python, stateful: layers [k, N) + head with per-session KV
  cloud_only       python, stateful: the baseline, token ids into the whole model
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from plugin.model.checkpoint import read_config
from plugin.paths import MODEL_REPOSITORY
from plugin.protocol.tensors import (
    CLOUD_ONLY, CLOUD_PARTITION, CONTEXT_MANAGER, ENSEMBLE, inputs_of, outputs_of, TensorSpec)
from plugin.split.limits import Limits
from plugin.split.plan import PartitionPlan

MODEL_DIRS = (CONTEXT_MANAGER, CLOUD_PARTITION, CLOUD_ONLY)  # python models with a model.py
SLOTS_PER_SESSION = 128  # Triton sequence slots per allowed session (ServeOptions.slots)


@dataclass(frozen=True)
class ServeOptions:
    max_batch_size: int = 8
    instance_kind: str = "KIND_CPU"  # KIND_GPU runs the same models on the GPU
    instances: int = 1
    dtype: str = "float32"  # cloud weights: what plugin.model.ranges.serving_dtype chose
    limits: Limits = Limits()
    sequence_slots: int = 0  # Triton's max_candidate_sequences; 0: SLOTS_PER_SESSION x limits.max_sessions

    def slots(self) -> int:
        """Sequence slots of each stateful model: many more than max_sessions. A START the models refuse still
        holds its slot until limits.slot_idle_s (a model cannot end a sequence), and a new sequence that finds
        every slot taken waits in Triton's queue: measured here, 1,024 slots held 10 s were filled by one client
        in 2 s (a legitimate START then waited 8 s); with 16,384, 8 threads flooding at 1,564/s nearly filled them
        (a START waited up to 1.03 s); with 32,768 (these defaults) at most 0.04 s. Each slot costs tritonserver
        about 1 KiB per model (RSS 81 MiB with 16,384 slots, 116 MiB with 32,768)."""
        return self.sequence_slots or SLOTS_PER_SESSION * self.limits.max_sessions


def config_tensor(name: str, dtype: str, dims: list[int], optional: bool = False, ragged: bool = False) -> str:
    extra = (" optional: true" if optional else "") + (" allow_ragged_batch: true" if ragged else "")
    return f'  {{ name: "{name}" data_type: {dtype} dims: {dims}{extra} }}'


def tensor_rows(specs: list[TensorSpec], hidden_size: int, as_input: bool) -> list[str]:
    """config.pbtxt entries of protocol tensors (optional and ragged apply to inputs only)."""
    return [config_tensor(t.name, f"TYPE_{t.triton_dtype}", t.config_dims(hidden_size), t.optional and as_input,
                          t.ragged and as_input) for t in specs]


def edge_inputs(hidden_size: int, verification: bool = True) -> list[str]:
    """What an edge sends: the ensemble's inputs (verification=False: without drafts and rollbacks)."""
    return tensor_rows(with_verification(inputs_of(ENSEMBLE), verification), hidden_size, as_input=True)


def token_outputs(hidden_size: int, verification: bool = True, timing: bool = True) -> list[str]:
    """What an edge gets back: the ensemble's outputs (verification=False: without the verdicts on drafts;
    timing=False: without the pass time, which a TensorRT engine cannot report)."""
    specs = [t for t in with_verification(outputs_of(ENSEMBLE), verification) if timing or not t.timing]
    return tensor_rows(specs, hidden_size, as_input=False)


def with_verification(specs: list[TensorSpec], verification: bool) -> list[TensorSpec]:
    """`specs`, less those of verified mode unless `verification` (a model that cannot check drafts declares none,
    so Triton itself refuses them)."""
    return [t for t in specs if verification or not t.verification]


def maps(kind: str, names: list[str], internal: bool = False) -> str:
    """Ensemble step maps; tensors passed between steps get lower-case internal names."""
    return "\n".join(f'      {kind} {{ key: "{n}" value: "{n.lower() if internal else n}" }}' for n in names)


def block(title: str, rows: list[str]) -> str:
    return f"{title} [\n" + ",\n".join(rows) + "\n]\n"


def parameters(params: dict[str, str]) -> str:
    rows = [f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items()]
    return block("parameters", rows)


def _stateful(name: str, opts: ServeOptions, hidden_size: int, decoded_hop: bool = False) -> str:
    """Header, instances, the sequence batcher and the protocol tensors of one of the three python models
    (decoded_hop: the context manager hands the rows on decoded, to a TensorRT engine)."""
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {opts.max_batch_size}\n'
        f"instance_group [ {{ count: {opts.instances} kind: {opts.instance_kind} }} ]\n"
        "sequence_batching {\n"
        f"  max_sequence_idle_microseconds: {opts.limits.slot_idle_us}\n"
        f"  oldest {{ max_candidate_sequences: {opts.slots()} max_queue_delay_microseconds: 0 }}\n"
        "  control_input [\n"
        '    { name: "START" control [ { kind: CONTROL_SEQUENCE_START bool_false_true: [ false, true ] } ] },\n'
        '    { name: "END" control [ { kind: CONTROL_SEQUENCE_END bool_false_true: [ false, true ] } ] },\n'
        '    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }\n'
        "  ]\n}\n"
        + block("input", tensor_rows(inputs_of(name), hidden_size, as_input=True))
        + block("output", tensor_rows(outputs_of(name, decoded_hop), hidden_size, as_input=False))
    )


def ensemble_step(model: str, input_map: str, output_map: str) -> str:
    return f'    {{\n      model_name: "{model}"\n      model_version: -1\n{input_map}\n{output_map}\n    }}'


def render_ensemble(hidden_size: int, max_batch_size: int, steps: list[str], verification: bool = True,
                    timing: bool = True) -> str:
    """ce_collm: the edge-facing inputs and outputs, and its steps."""
    return (
        f'name: "{ENSEMBLE}"\nplatform: "ensemble"\nmax_batch_size: {max_batch_size}\n'
        + block("input", edge_inputs(hidden_size, verification))
        + block("output", token_outputs(hidden_size, verification, timing))
        + "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n"
    )


def render_configs(plan: PartitionPlan, repository_dir: Path, opts: ServeOptions = ServeOptions(),
                   engine: bool = False) -> dict[str, str]:
    """config.pbtxt text per model; the checkpoint path is written relative to repository_dir.
    engine: the cloud partition is a TensorRT engine, which resumes at the plan's split layer only and takes the
    pending rows decoded (PENDING_HIDDEN)."""
    cfg = read_config(plan.checkpoint)
    plan.check_depth(cfg.num_layers)
    params = {"checkpoint": os.path.relpath(plan.checkpoint, repository_dir), **opts.limits.params()}
    # both steps of the ensemble admit a session by one rule, which needs the first layer the cloud holds
    min_split = {"min_split_layer": str(plan.split_layer)}
    admitted = {**min_split, **({"max_split_layer": str(plan.split_layer), "decoded_hop": "true"} if engine else {})}
    pending = [t.name for t in outputs_of(CONTEXT_MANAGER)]
    ensemble = render_ensemble(cfg.hidden_size, opts.max_batch_size, [
        ensemble_step(CONTEXT_MANAGER, maps("input_map", [t.name for t in inputs_of(CONTEXT_MANAGER)]),
                      maps("output_map", pending, internal=True)),
        ensemble_step(CLOUD_PARTITION, maps("input_map", pending, internal=True),
                      maps("output_map", [t.name for t in outputs_of(CLOUD_PARTITION)])),
    ])
    header = f"# Generated by `ce-collm configs` from the partition plan: split layer {plan.split_layer}, " \
             f"hidden {cfg.hidden_size}, {cfg.num_layers} layers. Do not edit by hand.\n"
    stateful = {name: header + _stateful(name, opts, cfg.hidden_size, engine and name == CONTEXT_MANAGER)
                for name in MODEL_DIRS}
    return {
        ENSEMBLE: header + ensemble,
        CONTEXT_MANAGER: stateful[CONTEXT_MANAGER] + parameters({**params, **admitted}),
        CLOUD_PARTITION: stateful[CLOUD_PARTITION] + parameters({**params, "dtype": opts.dtype, **min_split,
                                                                 "exit_layers": ",".join(map(str, plan.exit_layers))}),
        CLOUD_ONLY: stateful[CLOUD_ONLY] + parameters({**params, "dtype": opts.dtype}),
    }


def write_repository(plan: PartitionPlan, out_dir: Path, opts: ServeOptions = ServeOptions()) -> list[Path]:
    """Write every config.pbtxt (and copy the thin model.py files when out_dir is elsewhere)."""
    out_dir = Path(out_dir).resolve()
    written = []
    for name, text in render_configs(plan, out_dir, opts).items():
        (out_dir / name / "1").mkdir(parents=True, exist_ok=True)
        (out_dir / name / "config.pbtxt").write_text(text)
        written.append(out_dir / name / "config.pbtxt")
        source = MODEL_REPOSITORY / name / "1" / "model.py"
        if name in MODEL_DIRS and out_dir != MODEL_REPOSITORY:
            shutil.copyfile(source, out_dir / name / "1" / "model.py")
    return written


def check_repository(plan: PartitionPlan, repository_dir: Path, opts: ServeOptions = ServeOptions()) -> list[str]:
    """Names of the models whose config.pbtxt differs from what the plan generates."""
    repository_dir = Path(repository_dir).resolve()
    stale = []
    for name, text in render_configs(plan, repository_dir, opts).items():
        path = repository_dir / name / "config.pbtxt"
        if not path.is_file() or path.read_text() != text:
            stale.append(name)
    return stale
