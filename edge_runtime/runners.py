"""Segment runners behind one interface (`plugin.split.edge.SegmentRunner`): PyTorch, ONNX Runtime, TensorRT.

`EdgePartition` owns the segment loop (pending rows, exit decisions, the split); a runner computes
layers [first, last) of one block and, when the segment ends at an exit, that exit's logits, confidence
and token for the last row (the exported graphs compute them in the same pass; nothing is computed
twice). All three give the same tokens at threshold
1.0 up to float noise (tests/test_onnx_export.py checks torch == onnx on tiny checkpoints).

    runner = load_runner("onnx", plan)              # or "torch", "tensorrt"
    edge = EdgePartition(runner, plan)
"""
from __future__ import annotations

from pathlib import Path
import numpy as np
import torch

from plugin.export.engines import ENGINE_MANIFEST, import_tensorrt, load_engine_manifest, TensorRTUnavailable
from plugin.export.manifest import NP_DTYPES, default_onnx_dir, ExportError, graph_path, GraphSpec, kv_names, Manifest
from plugin.model.checkpoint import load_model, read_exit_shortlists
from plugin.model.decoder import DecoderModel, exit_decision
from plugin.model.kv import BoundaryRows, checked_rewind, KVMark, PositionError, SequenceKV
from plugin.split.edge import ExitOutput, SegmentOutput
from plugin.split.plan import PartitionPlan

RUNNERS = ("torch", "onnx", "tensorrt")
EXPORT_COMMAND = ".venv/bin/python build/export_onnx.py --plan {plan} --out {out}"
__all__ = ["RUNNERS", "GraphSequenceKV", "OnnxRunner", "TensorRTRunner", "TorchRunner", "load_runner"]


class TorchRunner:
    """The reference runner: the project's own PyTorch layer loop (`DecoderModel`)."""

    def __init__(self, model: DecoderModel, layers: range | None = None):
        self.model = model
        self.layers = layers if layers is not None else model.layer_range
        if self.layers.start < model.layer_range.start or self.layers.stop > model.layer_range.stop:
            raise ValueError(f"runner layers {self.layers} outside the model's {model.layer_range}")
        self.hidden_size, self.num_layers = model.cfg.hidden_size, model.cfg.num_layers

    def new_sequence(self) -> SequenceKV:
        return self.model.new_sequence(self.layers.start, self.layers.stop)

    @torch.inference_mode()
    def run(self, first_layer: int, last_layer: int, x: torch.Tensor, start_pos: int, state: SequenceKV,
            exit_layer: int | None) -> SegmentOutput:
        model = self.model
        positions = torch.arange(start_pos, start_pos + x.shape[0], device=model.device)[None]  # [1, T]
        if first_layer == 0:
            h = model.embed_tokens(x.to(model.device)[None], positions)  # [1, T, D]
        else:
            h = x.to(model.device, model.dtype)[None]  # [1, T, D]
        h = model.run_layers(h, positions, first_layer, last_layer, [state])[0]  # [T, D]
        if exit_layer is None:
            return SegmentOutput(h, None)
        logits = model.exit_logits(h[-1], exit_layer).float()  # [V], or [S + 1] for a shortlist head
        return SegmentOutput(h, exit_output(logits, model.exit_token_ids(exit_layer)))

    @torch.inference_mode()
    def exit_logits(self, hidden_row: torch.Tensor, layer: int) -> torch.Tensor:
        return self.model.exit_logits(hidden_row, layer)


def exit_output(logits: torch.Tensor, token_ids: torch.Tensor | None) -> ExitOutput:
    """The seam's ExitOutput from an exit head's logits ([V], or a shortlist head's [S + 1])."""
    conf, token = exit_decision(logits, token_ids)
    return ExitOutput(logits if token_ids is None else logits[:-1], float(conf), int(token), token_ids)


class GraphSequenceKV:
    """A graph runner's sequence: past K/V per layer as the runner's arrays [1, Hkv, P, Dh], and pending rows."""

    def __init__(self, layers: range, empty_kv):
        self.kv = {i: (empty_kv(), empty_kv()) for i in layers}  # layer -> (keys, values)
        self.pending = BoundaryRows()

    def length(self, layer: int) -> int:
        return int(self.kv[layer][0].shape[2])

    def mark(self) -> KVMark:
        return KVMark({i: self.length(i) for i in self.kv}, self.pending.copy())

    def keep_rewindable(self, position: int) -> None:
        """Nothing to keep: the graphs hold the whole past and apply a sliding window in the mask."""

    def rewind(self, mark: KVMark) -> None:
        for layer, length in checked_rewind(mark, self.length):
            keys, values = self.kv[layer]
            self.kv[layer] = (keys[:, :, :length], values[:, :, :length])
        self.pending = mark.pending.copy()

    @property
    def nbytes(self) -> int:
        kv = sum(a.nbytes if isinstance(a, np.ndarray) else a.element_size() * a.numel()
                 for pair in self.kv.values() for a in pair)
        return kv + self.pending.nbytes


class _GraphRunner:
    """What the ONNX Runtime and TensorRT runners share: segment lookup, the position rule, exit heads.

    Subclasses provide `_execute(spec, feeds) -> {output name: array}` and `_empty_kv()`.
    """

    def __init__(self, manifest: Manifest, plan: PartitionPlan):
        manifest.check_plan(plan)
        self.manifest, self.plan = manifest, plan
        self.hidden_size, self.num_layers = manifest.hidden_size, manifest.num_layers
        self.layers = range(0, manifest.split_layer)
        specs = manifest.specs()
        self.segments = {(s.first_layer, s.last_layer): s for s in specs if s.kind == "edge"}
        self.heads = {s.exit_layer: s for s in specs if s.kind == "exit_head"}
        self.exit_token_ids = read_exit_shortlists(plan.exit_adapters)  # shortlist exits: layer -> ids [S]

    def new_sequence(self) -> GraphSequenceKV:
        return GraphSequenceKV(self.layers, self._empty_kv)

    def run(self, first_layer: int, last_layer: int, x: torch.Tensor, start_pos: int, state: GraphSequenceKV,
            exit_layer: int | None) -> SegmentOutput:
        spec = self.segments.get((first_layer, last_layer))
        if spec is None:
            raise ValueError(f"no exported segment for layers [{first_layer}, {last_layer}); the graphs cover "
                             f"{sorted(self.segments)}: re-export for this plan")
        if exit_layer is not None and spec.exit_layer != exit_layer:
            raise ValueError(f"the graph for layers [{first_layer}, {last_layer}) ends with exit {spec.exit_layer}, "
                             f"not {exit_layer}: re-export for this plan")
        held = state.length(first_layer)
        if start_pos != held:
            raise PositionError(f"block starts at position {start_pos} but layer {first_layer} holds {held} positions")
        feeds = {"start_pos": np.array([[start_pos]], np.int64)}
        if first_layer == 0:
            feeds["input_ids"] = x.detach().cpu().numpy().astype(np.int64)[None]  # [1, T]
        else:
            feeds["hidden_in"] = x.detach().cpu().float().numpy()[None]  # [1, T, D]
        past = kv_names("past", spec.layers, self.num_layers)
        for j, layer in enumerate(spec.layers):
            feeds[past[2 * j]], feeds[past[2 * j + 1]] = state.kv[layer]
        out = self._execute(spec, feeds)
        present = kv_names("present", spec.layers, self.num_layers)
        for j, layer in enumerate(spec.layers):
            state.kv[layer] = (out[present[2 * j]], out[present[2 * j + 1]])
        hidden = _cpu_tensor(out["hidden_out"])[0]  # [T, D] fp32
        if exit_layer is None:
            return SegmentOutput(hidden, None)
        logits = _cpu_tensor(out["exit_logits"])[0]
        token_ids = self.exit_token_ids.get(exit_layer)
        head = ExitOutput(logits if token_ids is None else logits[:-1], float(out["exit_confidence"][0, 0]),
                          int(out["exit_token"][0, 0]), token_ids)
        return SegmentOutput(hidden, head)

    def exit_logits(self, hidden_row: torch.Tensor, layer: int) -> torch.Tensor:
        row = hidden_row.detach().cpu().float()
        spec = self.heads.get(layer)
        if spec is None:
            raise ValueError(f"no exit head exported for layer {layer}; exits: {sorted(self.heads)}")
        return _cpu_tensor(self._execute(spec, {"hidden": row.numpy()[None]})["exit_logits"])[0]

    def _execute(self, spec: GraphSpec, feeds: dict) -> dict:
        raise NotImplementedError

    def _empty_kv(self):
        raise NotImplementedError


def _cpu_tensor(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a.detach().cpu()


class OnnxRunner(_GraphRunner):
    """ONNX Runtime over the exported segment graphs; past K/V as numpy arrays per layer."""

    def __init__(self, plan: PartitionPlan, onnx_dir: str | Path | None = None, precision: str = "fp32",
                 providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        onnx_dir = Path(onnx_dir) if onnx_dir is not None else default_onnx_dir(plan)
        manifest = _manifest_or_hint(plan, onnx_dir)
        if precision not in manifest.precisions:
            raise ExportError(f"{onnx_dir} holds {manifest.precisions} graphs, not {precision}: "
                              f"re-run the export with --precision {precision}")
        super().__init__(manifest, plan)
        self.onnx_dir, self.precision = onnx_dir, precision
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:  # a fixed small pool that sleeps when idle: good neighbours on a shared CPU
            opts.intra_op_num_threads = threads
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = providers or ["CPUExecutionProvider"]
        self._sessions = {}
        for spec in [*self.segments.values(), *self.heads.values()]:
            path = graph_path(onnx_dir, spec, precision)
            if not path.is_file():
                raise ExportError(f"{path} is missing: run `{_export_command(plan, onnx_dir)}`")
            self._sessions[spec.name] = ort.InferenceSession(str(path), opts, providers=providers)
        self._kv_dtype = NP_DTYPES[precision]
        self._kv_shape = (1, manifest.num_kv_heads, 0, manifest.head_dim)  # an empty cache: P = 0

    def _empty_kv(self) -> np.ndarray:
        return np.zeros(self._kv_shape, self._kv_dtype)

    def _execute(self, spec: GraphSpec, feeds: dict) -> dict:
        return dict(zip(spec.outputs, self._sessions[spec.name].run(None, feeds)))


def _export_command(plan: PartitionPlan, onnx_dir: Path) -> str:
    plan_file = plan.checkpoint / "partition_plan.json"
    return EXPORT_COMMAND.format(plan=plan_file if plan_file.is_file() else "PLAN.json", out=onnx_dir)


def _manifest_or_hint(plan: PartitionPlan, onnx_dir: Path) -> Manifest:
    try:
        return Manifest.load(onnx_dir)
    except ExportError as e:
        raise ExportError(f"no exported ONNX graphs for this plan in {onnx_dir} ({e}). Export them first: "
                          f"`{_export_command(plan, onnx_dir)}`, or point --onnx-dir at the export") from None


TENSORRT_RUNNER_HINT = ("`--runner onnx` (ONNX Runtime over the exported graphs) and `--runner torch` work "
                        "without TensorRT.")


class TensorRTRunner(_GraphRunner):
    """TensorRT engines built by build/build_engines.py; past K/V as CUDA tensors per layer.

    Each engine has an optimization profile for single-token decode (profile 0) and one for
    prefill/catch-up blocks (profile 1); a context per profile. Not runnable on machines without
    TensorRT and a GPU (this project's CI): the constructor says so and names the runners that work.
    """

    def __init__(self, plan: PartitionPlan, engine_dir: str | Path | None = None, device: str = "cuda"):
        try:
            trt = import_tensorrt()
        except TensorRTUnavailable as e:
            raise TensorRTUnavailable(f"{e}\n{TENSORRT_RUNNER_HINT}") from None
        engine_dir = Path(engine_dir) if engine_dir is not None else plan.checkpoint / "engines" / "jetson"
        info = load_engine_manifest(engine_dir)
        super().__init__(Manifest(**info["onnx_manifest"]), plan)
        self.device = torch.device(device)
        self._stream = torch.cuda.Stream(self.device)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._trt, self._engines, self._contexts = trt, {}, {}
        for spec in [*self.segments.values(), *self.heads.values()]:
            entry = info["engines"].get(spec.name)
            if entry is None:
                raise FileNotFoundError(f"{engine_dir / ENGINE_MANIFEST} lists no engine for {spec.name}: rebuild")
            engine = runtime.deserialize_cuda_engine((engine_dir / entry["file"]).read_bytes())
            contexts = []
            for p in range(engine.num_optimization_profiles):
                ctx = engine.create_execution_context()
                ctx.set_optimization_profile_async(p, self._stream.cuda_stream)
                contexts.append(ctx)
            self._engines[spec.name], self._contexts[spec.name] = engine, contexts
        first = next(iter(self.segments.values()))
        name = kv_names("past", first.layers, self.num_layers)[0]
        self._kv_dtype = _torch_dtype(trt, self._engines[first.name].get_tensor_dtype(name))
        self._kv_shape = (1, self.manifest.num_kv_heads, 0, self.manifest.head_dim)

    def _empty_kv(self) -> torch.Tensor:
        return torch.empty(self._kv_shape, dtype=self._kv_dtype, device=self.device)

    def _execute(self, spec: GraphSpec, feeds: dict) -> dict:
        trt, engine = self._trt, self._engines[spec.name]
        contexts = self._contexts[spec.name]
        block = 1 if spec.kind == "exit_head" else feeds.get("input_ids", feeds.get("hidden_in")).shape[1]
        ctx = contexts[0] if block == 1 or len(contexts) == 1 else contexts[1]  # decode, else prefill/catch-up
        keep = []  # buffers alive until the stream is done
        for name, value in feeds.items():
            t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
            t = t.to(self.device, _torch_dtype(trt, engine.get_tensor_dtype(name))).contiguous()
            ctx.set_input_shape(name, tuple(t.shape))
            keep.append(t)
            ctx.set_tensor_address(name, _address(t, keep, self.device))
        out = {}
        for name in spec.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            t = torch.empty(shape, dtype=_torch_dtype(trt, engine.get_tensor_dtype(name)), device=self.device)
            ctx.set_tensor_address(name, _address(t, keep, self.device))
            out[name] = t
        if not ctx.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {spec.name} failed")
        self._stream.synchronize()
        return out


def _address(t: torch.Tensor, keep: list, device) -> int:
    """Empty tensors (a first block's past K/V) have no storage; give TensorRT a valid address anyway."""
    if t.numel():
        return t.data_ptr()
    dummy = torch.empty(1, dtype=t.dtype, device=device)
    keep.append(dummy)
    return dummy.data_ptr()


def _torch_dtype(trt, dtype) -> torch.dtype:
    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64,
            trt.int32: torch.int32, trt.bool: torch.bool}[dtype]


def load_runner(kind: str, plan: PartitionPlan, *, onnx_dir: str | Path | None = None,
                engine_dir: str | Path | None = None, precision: str = "fp32", dtype: torch.dtype = torch.float32,
                device: str = "cpu", threads: int | None = None):
    """A SegmentRunner for the edge layers [0, plan.split_layer).

    kind "torch": the PyTorch layer loop in `dtype` on `device`; "onnx": ONNX Runtime over
    `onnx_dir` (default <checkpoint>/onnx) in `precision` (fp32 or fp16 graphs); "tensorrt": engines
    in `engine_dir` (default <checkpoint>/engines/jetson) on `device` (default cuda).
    """
    if kind == "torch":
        model = load_model(plan.checkpoint, range(0, plan.split_layer), dtype=dtype, device=device,
                           exit_adapters=plan.exit_adapters)
        return TorchRunner(model)
    if kind == "onnx":
        return OnnxRunner(plan, onnx_dir, precision=precision, threads=threads)
    if kind == "tensorrt":
        return TensorRTRunner(plan, engine_dir, device="cuda" if device == "cpu" else device)
    raise ValueError(f"runner must be one of {RUNNERS}, got {kind!r}")
