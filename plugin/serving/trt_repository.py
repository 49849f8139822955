"""The tensorrt_plan variant of the model repository: `cloud_partition` as a TensorRT engine whose
KV cache is Triton implicit state, beside the python-backend repository of `repository.py`.

  ce_collm         ensemble: context_manager -> cloud_partition (max_batch_size 1: see below)
  context_manager  python, as in the python repository (keeps the uploaded layer-k rows), but hands them on
                   decoded (PENDING_HIDDEN, float32): the engine's hidden_in is a float input
  cloud_partition  tensorrt_plan: the cloud graph of build/export_onnx.py, built by
                   build/build_engines.py --target cloud; past_key_LL/past_value_LL are
                   `sequence_batching { state [...] }` pairs fed back from present_key_LL/present_value_LL,
                   empty (zero rows) when a sequence STARTs
  cloud_only       python, as in the python repository (the baseline)

The engine serves exactly the plan's split layer, so its context manager admits STARTs at that layer
only (parameter max_split_layer). Its implicit-state KV differs in length from one
sequence to the next, so one sequence runs per execution (max_batch_size 1; scale with instances).
An upload-only request reaches the engine as a block of 0 rows and leaves the KV as it was (the
graph returns TOKEN_ID -1). The graph computes the head on the last row only and its implicit-state
KV cannot be cut back, so this variant serves no verified mode: its ensemble declares none of the
verification tensors (DRAFT_*, ROLLBACK_TO, ROW_TOPK_*) and Triton refuses them. Nor does it declare PASS_MS:
an engine cannot time its own pass (edges ask for every output a model declares and read PASS_MS when it is
there; without it they learn nothing of the pass's cost, edge_runtime/verified.py). Only the NGC Triton
container serves it (the pip wheel has no TensorRT backend); here the configs are generated and
validated against the ONNX graph.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from plugin.export.manifest import graph_path, GraphSpec, Manifest
from plugin.model.checkpoint import read_config
from plugin.paths import MODEL_REPOSITORY
from plugin.protocol.tensors import (
    CLOUD_PARTITION, CONTEXT_MANAGER, inputs_of, OUTPUTS, PENDING_HIDDEN, PENDING_START)
from plugin.serving.repository import (
    block, config_tensor, ensemble_step, maps, render_configs, render_ensemble, ServeOptions, with_verification)
from plugin.split.plan import PartitionPlan

ENGINE_FILE = "model.plan"
ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 7: "TYPE_INT64", 6: "TYPE_INT32", 9: "TYPE_BOOL", 3: "TYPE_INT8"}
# cloud graph output -> the ensemble output it becomes (the wire protocol's names)
GRAPH_OUTPUTS = dict(zip(("token_id", "confidence", "topk_ids", "topk_logprobs", "catchup_rows"), OUTPUTS))
# cloud graph input -> the context manager's output that feeds it
GRAPH_INPUTS = {"hidden_in": PENDING_HIDDEN, "start_pos": PENDING_START}
PYTHON_MODELS = ("context_manager", "cloud_only")


@dataclass(frozen=True)
class TrtServeOptions:
    """The engine's sequence slots (each holds its implicit state on the GPU) and idle timeout are the
    python models' limits: max_sessions and ttl_s."""

    instances: int = 1  # engine instances
    precision: str = "fp16"  # which exported graph the engine is built from (its KV dtype)
    python: ServeOptions = ServeOptions(instance_kind="KIND_GPU", dtype="float16")  # context_manager, cloud_only


@dataclass(frozen=True)
class GraphIO:
    name: str
    data_type: str  # Triton TYPE_*
    shape: tuple[int | str, ...]  # ints, or the name of a dynamic axis


def graph_io(onnx_path: Path) -> tuple[dict[str, GraphIO], dict[str, GraphIO]]:
    """Inputs and outputs of an ONNX graph (names, Triton dtypes, shapes), without loading weights."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)

    def io(values) -> dict[str, GraphIO]:
        out = {}
        for v in values:
            t = v.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
            out[v.name] = GraphIO(v.name, ONNX_TO_TRITON.get(t.elem_type, f"onnx:{t.elem_type}"), dims)
        return out

    return io(model.graph.input), io(model.graph.output)


def _dims(shape: tuple[int | str, ...]) -> list[int]:
    """Triton dims of a graph tensor without its batch axis; dynamic axes become -1."""
    return [d if isinstance(d, int) else -1 for d in shape[1:]]


def cloud_spec(manifest: Manifest) -> GraphSpec:
    return next(s for s in manifest.specs() if s.kind == "cloud")


def render_cloud_partition(plan: PartitionPlan, onnx_path: Path, spec: GraphSpec, opts: TrtServeOptions) -> str:
    inputs, outputs = graph_io(onnx_path)
    rows = [config_tensor(n, inputs[n].data_type, _dims(inputs[n].shape)) for n in GRAPH_INPUTS]
    outs = [config_tensor(n, outputs[n].data_type, _dims(outputs[n].shape)) for n in GRAPH_OUTPUTS]
    states = []
    for past in (n for n in spec.inputs if n.startswith("past_")):
        present = "present" + past[len("past"):]
        kv = inputs[past]
        dims, empty = _dims(kv.shape), [0 if d == -1 else d for d in _dims(kv.shape)]
        states.append(
            f'    {{ input_name: "{past}" output_name: "{present}" data_type: {kv.data_type} dims: {dims}\n'
            f'      initial_state {{ data_type: {kv.data_type} dims: {empty} zero_data: true name: "empty_{past}" }} }}'
        )
    limits = opts.python.limits
    return (
        f"# Generated by `ce-collm trt-configs` from the partition plan and {onnx_path.parent.name}/{onnx_path.name}: "
        f"split layer {plan.split_layer}, KV as implicit state. Do not edit by hand.\n"
        f'name: "cloud_partition"\nplatform: "tensorrt_plan"\nmax_batch_size: 1\n'
        f'default_model_filename: "{ENGINE_FILE}"\n'
        + block("input", rows) + block("output", outs)
        + f'instance_group [ {{ count: {opts.instances} kind: KIND_GPU profile: [ "0", "1" ] }} ]\n'
        + "sequence_batching {\n"
        + f"  max_sequence_idle_microseconds: {limits.slot_idle_us}\n"
        + f"  oldest {{ max_candidate_sequences: {limits.max_sessions} max_queue_delay_microseconds: 0 }}\n"
        + "  state [\n" + ",\n".join(states) + "\n  ]\n}\n"
    )


def render_trt_ensemble(plan: PartitionPlan, hidden_size: int) -> str:
    """ce_collm for the variant: the same edge-facing inputs and outputs, wired to the engine's names."""
    pending = {graph: name.lower() for graph, name in GRAPH_INPUTS.items()}
    step_in = "\n".join(f'      input_map {{ key: "{k}" value: "{v}" }}' for k, v in pending.items())
    step_out = "\n".join(f'      output_map {{ key: "{k}" value: "{v}" }}' for k, v in GRAPH_OUTPUTS.items())
    header = (f"# Generated by `ce-collm trt-configs`: split layer {plan.split_layer}, hidden {hidden_size}, "
              "cloud_partition on TensorRT. Do not edit by hand.\n")
    edge_facing = with_verification(inputs_of(CONTEXT_MANAGER), verification=False)
    return header + render_ensemble(hidden_size, 1, [
        ensemble_step(CONTEXT_MANAGER, maps("input_map", [t.name for t in edge_facing]),
                      maps("output_map", list(GRAPH_INPUTS.values()), internal=True)),
        ensemble_step(CLOUD_PARTITION, step_in, step_out),
    ], verification=False, timing=False)


def render_trt_repository(plan: PartitionPlan, onnx_dir: Path, repository_dir: Path,
                          opts: TrtServeOptions = TrtServeOptions()) -> dict[str, str]:
    """config.pbtxt text per model of the variant."""
    manifest = Manifest.load(onnx_dir)
    manifest.check_plan(plan)
    cfg = read_config(plan.checkpoint)
    spec = cloud_spec(manifest)
    python = render_configs(plan, repository_dir, opts.python, engine=True)  # the engine's split only, rows decoded
    return {
        "ce_collm": render_trt_ensemble(plan, cfg.hidden_size),
        "context_manager": python["context_manager"],
        "cloud_partition": render_cloud_partition(plan, graph_path(onnx_dir, spec, opts.precision), spec, opts),
        "cloud_only": python["cloud_only"],
    }


def write_trt_repository(plan: PartitionPlan, onnx_dir: Path, out_dir: Path, opts: TrtServeOptions = TrtServeOptions(),
                         engine: Path | None = None) -> list[Path]:
    """Write the variant (python model.py files copied; the engine copied in when given), then validate it."""
    out_dir = Path(out_dir).resolve()
    written = []
    for name, text in render_trt_repository(plan, onnx_dir, out_dir, opts).items():
        (out_dir / name / "1").mkdir(parents=True, exist_ok=True)
        (out_dir / name / "config.pbtxt").write_text(text)
        written.append(out_dir / name / "config.pbtxt")
        if name in PYTHON_MODELS:
            shutil.copyfile(MODEL_REPOSITORY / name / "1" / "model.py", out_dir / name / "1" / "model.py")
    if engine is not None:
        shutil.copyfile(engine, out_dir / "cloud_partition" / "1" / ENGINE_FILE)
        written.append(out_dir / "cloud_partition" / "1" / ENGINE_FILE)
    problems = validate_trt_repository(out_dir, onnx_dir, opts.precision)
    if problems:
        raise ValueError("the generated repository does not validate:\n  " + "\n  ".join(problems))
    return written


# -- validation -------------------------------------------------------------------------------------
def parse_config(path: Path):
    """A config.pbtxt parsed into Triton's ModelConfig protobuf (raises ParseError on bad text)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())


def validate_trt_repository(repository_dir: Path, onnx_dir: Path, precision: str = "fp16") -> list[str]:
    """Problems found: configs that do not parse, a cloud_partition that does not match the ONNX graph,
    implicit state Triton would refuse, or an ensemble whose tensors do not connect."""
    from google.protobuf.text_format import ParseError

    repository_dir = Path(repository_dir)
    configs, problems = {}, []
    for name in ("ce_collm", "context_manager", "cloud_partition", "cloud_only"):
        path = repository_dir / name / "config.pbtxt"
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        try:
            configs[name] = parse_config(path)
        except ParseError as e:
            problems.append(f"{path} does not parse as a Triton ModelConfig: {e}")
    if "cloud_partition" in configs:
        manifest = Manifest.load(onnx_dir)
        spec = cloud_spec(manifest)
        problems += check_against_graph(configs["cloud_partition"], graph_path(onnx_dir, spec, precision))
    if len(configs) == 4:
        problems += check_ensemble(configs["ce_collm"], configs)
    return problems


def check_against_graph(config, onnx_path: Path) -> list[str]:
    """Names, data types and ranks of the config's inputs, outputs and states against the graph."""
    from tritonclient.grpc import model_config_pb2 as pb

    inputs, outputs = graph_io(onnx_path)
    problems = []
    if config.platform != "tensorrt_plan":
        problems.append(f"cloud_partition platform is {config.platform!r}, not 'tensorrt_plan'")
    batch = 1 if config.max_batch_size > 0 else 0

    def match(kind: str, name: str, data_type: int, dims, graph: dict[str, GraphIO]) -> None:
        g = graph.get(name)
        dtype = pb.DataType.Name(data_type)
        if g is None:
            problems.append(f"{kind} {name!r} is not a {kind} of {onnx_path.name} (it has {sorted(graph)})")
            return
        if dtype != g.data_type:
            problems.append(f"{kind} {name!r}: config says {dtype}, the graph {g.data_type}")
        if len(dims) + batch != len(g.shape):
            problems.append(f"{kind} {name!r}: config rank {len(dims)} (+{batch} batch), graph rank {len(g.shape)}")
            return
        for c, d in zip(dims, g.shape[batch:]):
            if isinstance(d, int) and c != d:
                problems.append(f"{kind} {name!r}: config dims {list(dims)}, graph shape {list(g.shape)}")
                break

    for t in config.input:
        match("input", t.name, t.data_type, t.dims, inputs)
    for t in config.output:
        match("output", t.name, t.data_type, t.dims, outputs)
    states = config.sequence_batching.state
    for s in states:
        match("input", s.input_name, s.data_type, s.dims, inputs)
        match("output", s.output_name, s.data_type, s.dims, outputs)
        if len(s.initial_state) != 1:
            problems.append(f"state {s.input_name!r} needs exactly one initial_state (the empty cache), has {len(s.initial_state)}")
            continue
        init = s.initial_state[0]
        if not init.name:
            problems.append(f"state {s.input_name!r}: initial_state needs a name")
        if init.data_type != s.data_type:
            problems.append(f"state {s.input_name!r}: initial_state data type differs from the state's")
        if len(init.dims) != len(s.dims) or any(d == -1 for d in init.dims) \
                or any(sd != -1 and sd != d for sd, d in zip(s.dims, init.dims)):
            problems.append(f"state {s.input_name!r}: initial_state dims {list(init.dims)} do not fit state dims {list(s.dims)}")
    names = [s.input_name for s in states] + [s.output_name for s in states]
    for a in names:
        for b in names:
            if a != b and b.startswith(a):
                problems.append(f"state name {b!r} extends {a!r}: Triton can confuse them")
    declared = {t.name for t in config.input} | {s.input_name for s in states}
    for name in inputs:
        if name not in declared:
            problems.append(f"graph input {name!r} is neither a config input nor a state")
    return problems


def check_ensemble(ensemble, configs: dict) -> list[str]:
    """The checks Triton runs on an ensemble: every composing input mapped once with a matching
    type and shape, every mapped output used, every ensemble output written, batch sizes."""
    from tritonclient.grpc import model_config_pb2 as pb

    problems = []
    tensors = {t.name: (t.data_type, list(t.dims)) for t in ensemble.input}
    used = set()
    for step in ensemble.ensemble_scheduling.step:
        model = configs.get(step.model_name)
        if model is None:
            problems.append(f"ensemble step names unknown model {step.model_name!r}")
            continue
        if model.max_batch_size < ensemble.max_batch_size:
            problems.append(f"ensemble max_batch_size {ensemble.max_batch_size} exceeds {step.model_name}'s "
                            f"{model.max_batch_size}")
        model_inputs = {t.name: t for t in model.input}
        for key, value in step.input_map.items():
            if key not in model_inputs:
                problems.append(f"{step.model_name}: input_map names no input {key!r}")
            elif value not in tensors:
                problems.append(f"{step.model_name}: input {key!r} reads {value!r}, which nothing produced")
            else:
                t = model_inputs[key]
                if tensors[value] != (t.data_type, list(t.dims)):
                    dt, dims = tensors[value]
                    problems.append(f"{step.model_name}: input {key!r} is {pb.DataType.Name(t.data_type)} {list(t.dims)}, "
                                    f"tensor {value!r} is {pb.DataType.Name(dt)} {dims}")
                used.add(value)
        for t in model.input:
            if t.name not in step.input_map and not t.optional:
                problems.append(f"{step.model_name}: input {t.name!r} is not mapped")
        model_outputs = {t.name: t for t in model.output}
        for key, value in step.output_map.items():
            if key not in model_outputs:
                problems.append(f"{step.model_name}: output_map names no output {key!r}")
                continue
            tensors[value] = (model_outputs[key].data_type, list(model_outputs[key].dims))
    outputs = {t.name: (t.data_type, list(t.dims)) for t in ensemble.output}
    for name, expected in outputs.items():
        if name not in tensors:
            problems.append(f"ensemble output {name!r} is not written")
        elif tensors[name] != expected:
            problems.append(f"ensemble output {name!r}: declared {expected}, produced {tensors[name]}")
    for name in tensors:
        if name not in used and name not in outputs:
            problems.append(f"ensemble tensor {name!r} is unused")
    return problems
