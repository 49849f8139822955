"""Segment runners behind one interface (`plugin.split.edge.SegmentRunner`): PyTorch, ONNX Runtime, TensorRT.

This module and the ONNX Runtime runner import no PyTorch: an edge installed from requirements-edge.lock runs
`--runner onnx` with numpy, onnxruntime, tokenizers and tritonclient alone. The PyTorch runner
(torch_runner.py) and the TensorRT runner (tensorrt_runner.py) are imported when chosen.

`EdgePartition` owns the segment loop (pending rows, exit decisions, the split); a runner computes
layers [first, last) of one block and, when the segment ends at an exit, that exit's logits, confidence
and token for the last row (the exported graphs compute them in the same pass; nothing is computed
twice). All three give the same tokens at threshold
1.0 up to float noise (tests/test_onnx_export.py checks torch == onnx on tiny checkpoints).

    runner = load_runner("onnx", plan)              # or "torch", "tensorrt"
    edge = EdgePartition(runner, plan)
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from plugin.export.manifest import NP_DTYPES, default_onnx_dir, ExportError, graph_path, GraphSpec, kv_names, Manifest
from plugin.model.files import read_exit_shortlists
from plugin.model.rows import BoundaryRows, checked_rewind, KVMark, PositionError
from plugin.split.edge import ExitOutput, SegmentOutput
from plugin.split.plan import PartitionPlan

RUNNERS = ("auto", "torch", "onnx", "tensorrt")
EXPORT_COMMAND = ".venv/bin/python build/export_onnx.py --plan {plan} --out {out}"
__all__ = ["RUNNERS", "GraphSequenceKV", "OnnxRunner", "exported", "load_runner"]


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
        kv = sum(a.nbytes for pair in self.kv.values() for a in pair)  # numpy arrays or CUDA tensors
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

    def run(self, first_layer: int, last_layer: int, x: np.ndarray, start_pos: int, state: GraphSequenceKV,
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
            feeds["input_ids"] = x.astype(np.int64)[None]  # [1, T]
        else:
            feeds["hidden_in"] = x.astype(np.float32)[None]  # [1, T, D]
        past = kv_names("past", spec.layers, self.num_layers)
        for j, layer in enumerate(spec.layers):
            feeds[past[2 * j]], feeds[past[2 * j + 1]] = state.kv[layer]
        out = self._execute(spec, feeds)
        present = kv_names("present", spec.layers, self.num_layers)
        for j, layer in enumerate(spec.layers):
            state.kv[layer] = (out[present[2 * j]], out[present[2 * j + 1]])
        hidden = out["hidden_out"][0]  # [T, D] fp32
        if exit_layer is None:
            return SegmentOutput(hidden, None)
        logits = out["exit_logits"][0]
        token_ids = self.exit_token_ids.get(exit_layer)
        head = ExitOutput(logits if token_ids is None else logits[:-1], float(out["exit_confidence"][0, 0]),
                          int(out["exit_token"][0, 0]), token_ids)
        return SegmentOutput(hidden, head)

    def exit_logits(self, hidden_row: np.ndarray, layer: int) -> np.ndarray:
        spec = self.heads.get(layer)
        if spec is None:
            raise ValueError(f"no exit head exported for layer {layer}; exits: {sorted(self.heads)}")
        return self._execute(spec, {"hidden": hidden_row.astype(np.float32)[None]})["exit_logits"][0]

    def _execute(self, spec: GraphSpec, feeds: dict) -> dict:
        """{output name: array}: rows, logits and decisions as numpy arrays, present K/V as the runner keeps them."""
        raise NotImplementedError

    def _empty_kv(self):
        raise NotImplementedError


class OnnxRunner(_GraphRunner):
    """ONNX Runtime over the exported segment graphs; past K/V as numpy arrays per layer."""

    kind = "onnx"

    def __init__(self, plan: PartitionPlan, onnx_dir: str | Path | None = None, precision: str = "fp32",
                 providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        onnx_dir = _onnx_dir(plan, onnx_dir)
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


def _onnx_dir(plan: PartitionPlan, onnx_dir: str | Path | None) -> Path:
    """The folder given, else the plan's default (<checkpoint>/onnx/<plan>)."""
    return Path(onnx_dir) if onnx_dir is not None else default_onnx_dir(plan)


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


def load_runner(kind: str, plan: PartitionPlan, *, onnx_dir: str | Path | None = None,
                engine_dir: str | Path | None = None, precision: str = "fp32", device: str = "cpu",
                threads: int | None = None):
    """A SegmentRunner for the edge layers [0, plan.split_layer).

    kind "auto": ONNX Runtime when the plan's graphs are exported (the fast path: on Gemma 3 270M one core runs a
    step about twice as fast as the PyTorch loop), else the PyTorch layer loop; "torch": the PyTorch layer loop in
    fp32 on `device`; "onnx": ONNX Runtime over `onnx_dir` (default <checkpoint>/onnx/<plan>) in `precision` (fp32 or
    fp16 graphs); "tensorrt": engines in `engine_dir` (default <checkpoint>/engines/jetson) on `device` (default
    cuda). threads: the CPU runners' threads (default: the CPUs this process may run on, so an edge pinned to one
    core runs one). Only the chosen runner's libraries are imported.
    """
    if kind == "auto":
        kind = "onnx" if exported(plan, onnx_dir) else "torch"
    threads = threads or len(os.sched_getaffinity(0))
    if kind == "torch":
        return _torch_runner(plan, device, threads, onnx_dir)
    if kind == "onnx":
        return OnnxRunner(plan, onnx_dir, precision=precision, threads=threads)
    if kind == "tensorrt":
        from edge_runtime.tensorrt_runner import TensorRTRunner

        return TensorRTRunner(plan, engine_dir, device="cuda" if device == "cpu" else device)
    raise ValueError(f"runner must be one of {RUNNERS}, got {kind!r}")


def exported(plan: PartitionPlan, onnx_dir: str | Path | None = None) -> bool:
    """Whether `onnx_dir` (default <checkpoint>/onnx/<plan>) holds graphs exported for this plan and these weights."""
    try:
        Manifest.load(_onnx_dir(plan, onnx_dir)).check_plan(plan)
    except ExportError:
        return False
    return True


def _torch_runner(plan: PartitionPlan, device: str, threads: int, onnx_dir: str | Path | None):
    try:
        import torch
    except ImportError:  # an edge installed from requirements-edge.lock: graphs or nothing
        onnx_dir = _onnx_dir(plan, onnx_dir)
        raise ExportError(f"PyTorch is not installed here and {onnx_dir} holds no graphs for this plan: export them "
                          f"where it is (`{_export_command(plan, onnx_dir)}`) and copy them here") from None
    from edge_runtime.torch_runner import TorchRunner
    from plugin.model.checkpoint import load_model

    torch.set_num_threads(threads)
    return TorchRunner(load_model(plan.checkpoint, range(0, plan.split_layer), device=device,
                                  exit_adapters=plan.exit_adapters))
