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
    HIDDEN_INPUTS, HIDDEN_SCALE, OUTPUTS, PENDING_HIDDEN, PENDING_SPLIT, PENDING_START, PENDING_WANT, SPLIT_LAYER,
    START_POS, TOKEN_IDS, TOP_K, WANT_TOKEN)
from plugin.split.limits import Limits
from plugin.split.plan import PartitionPlan

MODEL_DIRS = ("context_manager", "cloud_partition", "cloud_only")  # python models with a model.py
_TRITON_TYPES = {"fp32": "TYPE_FP32", "fp16": "TYPE_FP16", "int8": "TYPE_INT8"}


@dataclass(frozen=True)
class ServeOptions:
    max_batch_size: int = 8
    instance_kind: str = "KIND_CPU"  # KIND_GPU runs the same models on the GPU
    instances: int = 1
    dtype: str = "float32"  # cloud weights; float16 on GPU
    limits: Limits = Limits()
    sequence_slots: int = 0  # Triton's max_candidate_sequences; 0: 4 x limits.max_sessions (see slots())

    def slots(self) -> int:
        """Sequence slots of each stateful model: more than max_sessions, so that the context manager's
        clear "too many live sessions" error answers before Triton queues a new sequence, and so that
        STARTs the context manager refuses (each holds its slot until the idle timeout: a model cannot
        end a sequence) leave room for real ones."""
        return self.sequence_slots or 4 * self.limits.max_sessions


def _tensor(name: str, dtype: str, dims: list[int], optional: bool = False, ragged: bool = False) -> str:
    extra = (" optional: true" if optional else "") + (" allow_ragged_batch: true" if ragged else "")
    return f'  {{ name: "{name}" data_type: {dtype} dims: {dims}{extra} }}'


def _edge_inputs(hidden: int) -> list[str]:
    rows = [_tensor(name, _TRITON_TYPES[codec], [-1, hidden], optional=True, ragged=True)
            for codec, name in HIDDEN_INPUTS.items()]
    return rows + [
        _tensor(HIDDEN_SCALE, "TYPE_FP32", [-1, 1], optional=True, ragged=True),
        _tensor(START_POS, "TYPE_INT64", [1]),
        _tensor(WANT_TOKEN, "TYPE_BOOL", [1]),
        _tensor(SPLIT_LAYER, "TYPE_INT32", [1], optional=True),
    ]


_TOKEN_OUTPUTS = [
    _tensor("TOKEN_ID", "TYPE_INT64", [1]),
    _tensor("CONFIDENCE", "TYPE_FP32", [1]),
    _tensor("TOPK_IDS", "TYPE_INT64", [TOP_K]),
    _tensor("TOPK_LOGPROBS", "TYPE_FP32", [TOP_K]),
    _tensor("CATCHUP_ROWS", "TYPE_INT32", [1]),
]


def _maps(kind: str, names: list[str], internal: bool = False) -> str:
    """Ensemble step maps; tensors passed between steps get lower-case internal names."""
    return "\n".join(f'      {kind} {{ key: "{n}" value: "{n.lower() if internal else n}" }}' for n in names)


def _block(title: str, rows: list[str]) -> str:
    return f"{title} [\n" + ",\n".join(rows) + "\n]\n"


def _parameters(params: dict[str, str]) -> str:
    rows = [f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items()]
    return _block("parameters", rows)


def _stateful(name: str, opts: ServeOptions) -> str:
    """Header, instances and the sequence batcher shared by the three python models."""
    ttl_us = int(opts.limits.ttl_s * 1_000_000)
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {opts.max_batch_size}\n'
        f"instance_group [ {{ count: {opts.instances} kind: {opts.instance_kind} }} ]\n"
        "sequence_batching {\n"
        f"  max_sequence_idle_microseconds: {ttl_us}\n"
        f"  oldest {{ max_candidate_sequences: {opts.slots()} max_queue_delay_microseconds: 0 }}\n"
        "  control_input [\n"
        '    { name: "START" control [ { kind: CONTROL_SEQUENCE_START bool_false_true: [ false, true ] } ] },\n'
        '    { name: "END" control [ { kind: CONTROL_SEQUENCE_END bool_false_true: [ false, true ] } ] },\n'
        '    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] }\n'
        "  ]\n}\n"
    )


def render_configs(plan: PartitionPlan, repository_dir: Path, opts: ServeOptions = ServeOptions()) -> dict[str, str]:
    """config.pbtxt text per model; the checkpoint path is written relative to repository_dir."""
    cfg = read_config(plan.checkpoint)
    plan.check_depth(cfg.num_layers)
    limits = opts.limits
    params = {
        "checkpoint": os.path.relpath(plan.checkpoint, repository_dir),
        "max_sessions": str(limits.max_sessions), "max_context": str(limits.max_context),
        "max_block_rows": str(limits.max_block_rows), "ttl_s": f"{limits.ttl_s:g}",
        "max_request_bytes": str(limits.max_request_bytes), "max_requests_per_s": f"{limits.max_requests_per_s:g}",
    }
    cloud_params = dict(params, dtype=opts.dtype, min_split_layer=str(plan.split_layer))
    def pending(as_input: bool) -> list[str]:
        return [
            _tensor(PENDING_HIDDEN, "TYPE_FP32", [-1, cfg.hidden_size], ragged=as_input),
            _tensor(PENDING_START, "TYPE_INT64", [1]),
            _tensor(PENDING_SPLIT, "TYPE_INT32", [1]),
            _tensor(PENDING_WANT, "TYPE_BOOL", [1]),
        ]

    edge_inputs = _edge_inputs(cfg.hidden_size)
    pending_names = [PENDING_HIDDEN, PENDING_START, PENDING_SPLIT, PENDING_WANT]
    in_map = _maps("input_map", [*HIDDEN_INPUTS.values(), HIDDEN_SCALE, START_POS, WANT_TOKEN, SPLIT_LAYER])
    pend_map = _maps("output_map", pending_names, internal=True)
    pend_in = _maps("input_map", pending_names, internal=True)
    out_map = _maps("output_map", list(OUTPUTS))
    ensemble = (
        f'name: "ce_collm"\nplatform: "ensemble"\nmax_batch_size: {opts.max_batch_size}\n'
        + _block("input", edge_inputs) + _block("output", _TOKEN_OUTPUTS)
        + "ensemble_scheduling {\n  step [\n"
        + f'    {{\n      model_name: "context_manager"\n      model_version: -1\n{in_map}\n{pend_map}\n    }},\n'
        + f'    {{\n      model_name: "cloud_partition"\n      model_version: -1\n{pend_in}\n{out_map}\n    }}\n'
        + "  ]\n}\n"
    )
    header = f"# Generated by `ce-collm configs` from the partition plan: split layer {plan.split_layer}, " \
             f"hidden {cfg.hidden_size}, {cfg.num_layers} layers. Do not edit by hand.\n"
    return {
        "ce_collm": header + ensemble,
        "context_manager": header + _stateful("context_manager", opts) + _block("input", edge_inputs)
        + _block("output", pending(as_input=False)) + _parameters(params),
        "cloud_partition": header + _stateful("cloud_partition", opts) + _block("input", pending(as_input=True))
        + _block("output", _TOKEN_OUTPUTS) + _parameters(cloud_params),
        "cloud_only": header + _stateful("cloud_only", opts) + _block("input", [
            _tensor(TOKEN_IDS, "TYPE_INT64", [-1], ragged=True), _tensor(START_POS, "TYPE_INT64", [1]),
            _tensor(WANT_TOKEN, "TYPE_BOOL", [1])]) + _block("output", _TOKEN_OUTPUTS)
        + _parameters(dict(params, dtype=opts.dtype)),
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
