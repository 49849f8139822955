"""Export the partition plan's graphs to ONNX and check them against the PyTorch layer loop.

One graph per edge segment (layers between two boundaries, plus the exit head at its end), one
per exit head alone (for a row the runner did not just compute), and one for the cloud partition
(layers [k, N) + final norm + LM head + top-k). Every graph takes one block of rows:

  inputs                         dtype          shape
  input_ids | hidden_in          int64 | fp32   [B, T] | [B, T, D]   token ids only for the first segment
  start_pos                      int64          [B, 1]               position of the block's first row
  past_key_LL, past_value_LL     fp32 | fp16    [B, Hkv, P, Dh]      one pair per layer LL, P = start_pos
  outputs
  hidden_out                     fp32           [B, T, D]            edge segments
  exit_logits                    fp32           [B, V]               edge segments ending at an exit: last row
  exit_confidence, exit_token    fp32, int64    [B, 1]               max softmax probability and its token
  token_id, confidence           int64, fp32    [B, 1]               cloud: -1 and 0 for a block of 0 rows
  topk_ids, topk_logprobs        int64, fp32    [B, K]               cloud: -1 and -inf for a block of 0 rows
  catchup_rows                   int32          [B, 1]               cloud: T
  present_key_LL, present_value_LL  as past     [B, Hkv, P + T, Dh]

B, T and P are dynamic, so one graph serves prefill, catch-up blocks and single-token decode. The
block's positions are start_pos + [0, T): blocks are contiguous and start at the cached length
(kv_store.py), which is also what Triton's START_POS / PENDING_START carry. Hidden states and
logits cross graph boundaries in fp32 whatever the graph's precision (the wire and the
context manager speak fp32); the KV cache is in the graph's precision. Layer numbers in tensor
names are zero-padded to one width so that no state name extends another (Triton matches
implicit-state names by prefix in places).

Exporter: torch 2.13's `torch.onnx.export` defaults to `dynamo=True`, which needs `onnxscript`
and emits opset 18 or newer. We use the TorchScript exporter (`dynamo=False`) at opset 17: it
takes `dynamic_axes` directly, needs no extra package, and opset 17 is what the ONNX parser of
JetPack 5's TensorRT 8.5 reads (JetPack 6 and the NGC containers read it too). The graphs trace
the project's own `DecoderLayer` (`Attention.project`, `Attention.attend`, `causal_mask`); only the
KV gathering differs: past tensor + new rows concatenated, instead of a `LayerKV`.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import load_model, read_config
from .decoder import DecoderModel, confidence
from .layers import ModelConfig, causal_mask
from .plan import PartitionPlan
from .protocol import TOP_K

OPSET = 17
MANIFEST = "manifest.json"
FORMAT = "ce-collm-onnx/1"
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
NP_DTYPES = {"fp32": np.float32, "fp16": np.float16}
# Parity tolerances: pass when max |onnx - torch| <= atol + rtol * max |torch| for each output.
TOLERANCES = {"fp32": (1e-4, 1e-5), "fp16": (1e-2, 1e-2)}


class ExportError(RuntimeError):
    """ONNX files missing, stale, or not made from this plan."""


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


# -- the exported computations ---------------------------------------------------------------------
class SegmentGraph(nn.Module):
    """Layers [first, last) over one block, with past/present K/V tensors, and the graph's head."""

    def __init__(self, model: DecoderModel, spec: GraphSpec, top_k: int = TOP_K):
        super().__init__()
        self.model, self.spec, self.top_k = model, spec, top_k

    def forward(self, x: torch.Tensor, start_pos: torch.Tensor, *past: torch.Tensor):
        # x: input_ids [B, T] or hidden_in [B, T, D] fp32; start_pos: [B, 1]; past: 2 per layer, [B, Hkv, P, Dh]
        model, spec = self.model, self.spec
        steps = torch.ones_like(x[:, :, 0] if x.dim() == 3 else x, dtype=torch.long).cumsum(1) - 1  # [B, T]: 0..T-1
        positions = start_pos + steps  # [B, T]
        h = model.embed_tokens(x, positions) if spec.first_layer == 0 else x.to(model.dtype)  # [B, T, D]
        presents: list[torch.Tensor] = []
        for n, i in enumerate(spec.layers):
            h = model.layers[str(i)](h, positions, _concat_past(past[2 * n], past[2 * n + 1], positions, presents))
        if spec.kind == "cloud":
            return (*self._cloud_head(h), *presents)
        outputs = [h.float()]
        if spec.exit_layer is not None:
            outputs += _exit_head(model, h[:, -1], spec.exit_layer)
        return (*outputs, *presents)

    def _cloud_head(self, h: torch.Tensor):
        # A block of 0 rows (an upload-only request) leaves the KV as it was and returns no token.
        model = self.model
        rows = torch.ones_like(h[:, :, 0], dtype=torch.int32).sum(1, keepdim=True).to(torch.int32)  # [B, 1] = T
        padded = torch.cat([h.new_zeros((h.shape[0], 1, h.shape[2])), h], dim=1)  # [B, 1 + T, D]
        logits = model.exit_logits(padded[:, -1], model.cfg.num_layers).float()  # [B, V]
        logprobs = torch.log_softmax(logits, dim=-1)
        top = logprobs.topk(self.top_k, dim=-1)  # [B, K]
        has_rows = rows > 0  # [B, 1]
        token = torch.where(has_rows, top.indices[:, :1], torch.full_like(top.indices[:, :1], -1))
        conf = torch.where(has_rows, top.values[:, :1].exp(), torch.zeros_like(top.values[:, :1]))
        ids = torch.where(has_rows, top.indices, torch.full_like(top.indices, -1))
        values = torch.where(has_rows, top.values, torch.full_like(top.values, float("-inf")))
        return token, conf, ids, values, rows


class ExitHeadGraph(nn.Module):
    """The exit head after `layer` layers for hidden rows [B, D] (fp32 in, like every graph)."""

    def __init__(self, model: DecoderModel, layer: int):
        super().__init__()
        self.model, self.layer = model, layer

    def forward(self, hidden: torch.Tensor):
        return tuple(_exit_head(self.model, hidden.to(self.model.dtype), self.layer))


def _exit_head(model: DecoderModel, row: torch.Tensor, layer: int) -> list[torch.Tensor]:
    # row: [B, D] -> logits [B, V] fp32, confidence [B, 1] fp32, token [B, 1] int64
    logits = model.exit_logits(row, layer).float()
    conf, token = confidence(logits)
    return [logits, conf[:, None], token[:, None]]


def _concat_past(past_k: torch.Tensor, past_v: torch.Tensor, positions: torch.Tensor, presents: list):
    """The gather_kv of DecoderLayer for the graphs: present = past + new rows, cache index == position."""

    def gather(k: torch.Tensor, v: torch.Tensor):
        # k, v: [B, Hkv, T, Dh]
        keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # [B, Hkv, P + T, Dh]
        presents.extend([keys, values])
        # An additive mask in the graph's dtype: the exporter turns a boolean mask into fp32
        # constants, which would promote fp16 attention (and everything after it) to fp32.
        visible = causal_mask(positions, keys.shape[2])  # [B, 1, T, P + T]
        mask = torch.zeros_like(visible, dtype=k.dtype).masked_fill(~visible, torch.finfo(k.dtype).min)
        return keys, values, mask

    return gather


# -- example inputs and export ------------------------------------------------------------------------
def example_inputs(spec: GraphSpec, cfg: ModelConfig, precision: str, batch: int = 1, block: int = 3,
                   past: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the graph's names, dtypes and shapes (also what the parity check feeds)."""
    rng = np.random.default_rng(seed)
    kv_dtype = NP_DTYPES[precision]
    out: dict[str, np.ndarray] = {}
    for name in spec.inputs:
        if name == "input_ids":
            out[name] = rng.integers(0, cfg.vocab_size, (batch, block), dtype=np.int64)
        elif name == "hidden_in":
            out[name] = rng.standard_normal((batch, block, cfg.hidden_size), dtype=np.float32)
        elif name == "hidden":
            out[name] = rng.standard_normal((batch, cfg.hidden_size), dtype=np.float32)
        elif name == "start_pos":
            out[name] = np.full((batch, 1), past, np.int64)
        else:
            out[name] = rng.standard_normal((batch, cfg.num_kv_heads, past, cfg.head_dim)).astype(kv_dtype)
    return out


def export_graph(model: DecoderModel, spec: GraphSpec, precision: str, path: Path) -> Path:
    """Trace one graph of `model` (already in the precision's dtype) into `path`."""
    module: nn.Module = ExitHeadGraph(model, spec.first_layer) if spec.kind == "exit_head" else SegmentGraph(model, spec)
    feeds = example_inputs(spec, model.cfg, precision)
    args = tuple(torch.from_numpy(feeds[name]) for name in spec.inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about shape arithmetic that the dynamic axes cover
        torch.onnx.export(module.eval(), args, str(path), dynamo=False, opset_version=OPSET,
                          input_names=list(spec.inputs), output_names=list(spec.outputs),
                          dynamic_axes=dynamic_axes(spec), do_constant_folding=True)
    return path


def graph_path(out_dir: Path, spec: GraphSpec, precision: str) -> Path:
    return Path(out_dir) / precision / f"{spec.name}.onnx"


def checkpoint_fingerprint(plan: PartitionPlan) -> str:
    """sha256 of config.json and of the weight files' names and sizes (cheap for multi-GB checkpoints),
    exit adapters included: graphs exported before the adapters changed are refused."""
    ckpt = plan.checkpoint
    digest = hashlib.sha256((ckpt / "config.json").read_bytes())
    index = ckpt / "model.safetensors.index.json"
    weights = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    files = [ckpt / w for w in weights] + ([plan.exit_adapters] if plan.exit_adapters else [])
    for f in files:
        digest.update(f"{f.name}:{f.stat().st_size if f.is_file() else -1}".encode())
    return digest.hexdigest()[:16]


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
        path = Path(onnx_dir) / MANIFEST
        if not path.is_file():
            raise ExportError(f"{path} not found")
        raw = json.loads(path.read_text())
        if raw.get("format") != FORMAT:
            raise ExportError(f"{path} has format {raw.get('format')!r}, expected {FORMAT!r}: re-export")
        return cls(**raw)

    def check_plan(self, plan: PartitionPlan) -> None:
        """Refuse files exported for another split, other exits or other weights."""
        if self.split_layer != plan.split_layer or tuple(self.exit_layers) != tuple(plan.exit_layers):
            raise ExportError(f"the ONNX files were exported for split {self.split_layer}, exits {self.exit_layers}; "
                              f"the plan says split {plan.split_layer}, exits {list(plan.exit_layers)}")
        if self.fingerprint != checkpoint_fingerprint(plan):
            raise ExportError(f"the ONNX files were exported from other weights than {plan.checkpoint}")


def new_manifest(plan: PartitionPlan, cfg: ModelConfig, precisions: list[str]) -> Manifest:
    return Manifest(plan.split_layer, list(plan.exit_layers), cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads,
                    cfg.head_dim, cfg.vocab_size, cfg.max_positions, list(precisions), checkpoint_fingerprint(plan),
                    [asdict(s) for s in graph_specs(plan, cfg.num_layers)])


def load_full_model(plan: PartitionPlan, precision: str = "fp32") -> DecoderModel:
    return load_model(plan.checkpoint, dtype=PRECISIONS[precision], exit_adapters=plan.exit_adapters)


def export_plan(plan: PartitionPlan, out_dir: Path, precisions: tuple[str, ...] = ("fp32", "fp16"),
                progress=None) -> Manifest:
    """Export every graph in every precision into out_dir/<precision>/ and write the manifest.

    progress(spec, precision) is called after each graph (the script passes a tqdm update).
    """
    cfg = read_config(plan.checkpoint)
    manifest = new_manifest(plan, cfg, list(precisions))
    out_dir = Path(out_dir)
    for precision in precisions:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        model = load_full_model(plan, precision)
        for spec in manifest.specs():
            export_graph(model, spec, precision, graph_path(out_dir, spec, precision))
            if progress is not None:
                progress(spec, precision)
    manifest.save(out_dir)
    return manifest


def default_onnx_dir(plan: PartitionPlan) -> Path:
    return plan.checkpoint / "onnx"


# -- parity: ONNX Runtime against the PyTorch layer loop ------------------------------------------------
@dataclass
class OutputParity:
    graph: str
    precision: str
    output: str
    max_abs_diff: float
    ref_max_abs: float  # scale of the reference values
    limit: float  # atol + rtol * ref_max_abs
    mismatches: int = 0  # integer outputs (tokens): entries that differ, where the reference is not a near tie

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.limit and self.mismatches == 0


def ort_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:  # a fixed small pool that sleeps when idle: good neighbours on a shared CPU
        opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_parity(plan: PartitionPlan, onnx_dir: Path, precision: str = "fp32", reference: DecoderModel | None = None,
                 prefill: int = 7, catch_up: int = 3, batch: int = 2, seed: int = 0,
                 threads: int | None = None) -> list[OutputParity]:
    """Run every graph with ONNX Runtime and the PyTorch layer loop on the same inputs; report per output.

    Scenario per sequence (batch of `batch` random sequences): a prefill block of `prefill` rows
    from an empty cache, a catch-up block of `catch_up` rows, one single-token decode step, and for
    the cloud graph also a block of 0 rows (an upload-only request). ONNX Runtime carries its own
    present K/V forward as past; each graph gets the reference's inputs at its first layer, so every
    graph is measured alone. The reference is the fp32 model (fp16 graphs are measured against it).
    """
    manifest = Manifest.load(onnx_dir)
    manifest.check_plan(plan)
    model = reference if reference is not None else load_full_model(plan, "fp32")
    cfg = model.cfg
    atol, rtol = TOLERANCES[precision]
    blocks = [prefill, catch_up, 1]
    total = sum(blocks)
    torch.manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, total))
    # The reference: hidden states at every layer and the K/V of every layer, block by block.
    seqs = [model.new_sequence(0, cfg.num_layers) for _ in range(batch)]
    ref_steps = []  # per block: {layer: hidden [B, T, D]}
    start = 0
    with torch.inference_mode():
        for t in blocks:
            positions = torch.arange(start, start + t)[None].expand(batch, t)
            h = model.embed_tokens(ids[:, start:start + t], positions)
            hidden = {0: h}
            for i in range(cfg.num_layers):
                h = model.run_layers(h, positions, i, i + 1, seqs)
                hidden[i + 1] = h
            ref_steps.append((start, hidden))
            start += t
    results: list[OutputParity] = []
    for spec in manifest.specs():
        session = ort_session(graph_path(onnx_dir, spec, precision), threads)
        diffs: dict[str, list] = {}
        if spec.kind == "exit_head":
            h = ref_steps[0][1][spec.first_layer][:, -1]  # [B, D]
            got = dict(zip(spec.outputs, session.run(None, {"hidden": h.float().numpy()})))
            _compare_head(model, h, spec.exit_layer, got, diffs)
        else:
            past = {name: np.zeros((batch, cfg.num_kv_heads, 0, cfg.head_dim), NP_DTYPES[precision])
                    for name in spec.inputs if name.startswith("past_")}
            steps = list(ref_steps)
            if spec.kind == "cloud":
                steps.append((total, None))  # a block of 0 rows
            for start, hidden in steps:
                feeds = dict(past, start_pos=np.full((batch, 1), start, np.int64))
                if spec.first_layer == 0:
                    feeds["input_ids"] = ids[:, start:start + hidden[0].shape[1]].numpy()
                elif hidden is None:
                    feeds["hidden_in"] = np.zeros((batch, 0, cfg.hidden_size), np.float32)
                else:
                    feeds["hidden_in"] = hidden[spec.first_layer].float().numpy()
                got = dict(zip(spec.outputs, session.run(None, feeds)))
                if hidden is None:
                    _expect(diffs, "token_id", got["token_id"], np.full((batch, 1), -1))
                    _expect(diffs, "catchup_rows", got["catchup_rows"], np.zeros((batch, 1)))
                else:
                    if "hidden_out" in got:
                        _expect(diffs, "hidden_out", got["hidden_out"], hidden[spec.last_layer])
                    if spec.kind == "edge" and spec.exit_layer is not None:
                        _compare_head(model, hidden[spec.last_layer][:, -1], spec.exit_layer, got, diffs)
                    if spec.kind == "cloud":
                        _compare_cloud(model, hidden[spec.last_layer][:, -1], got, diffs, hidden[0].shape[1])
                for j, layer in enumerate(spec.layers):
                    key, value = kv_names("present", range(layer, layer + 1), cfg.num_layers)
                    length = start + (0 if hidden is None else hidden[0].shape[1])
                    _expect(diffs, key, got[key], torch.stack([s.layers[layer].keys[:, :length] for s in seqs]))
                    _expect(diffs, value, got[value], torch.stack([s.layers[layer].values[:, :length] for s in seqs]))
                past = {p: got["present" + p[len("past"):]] for p in past}
        for output in spec.outputs:
            if output not in diffs:
                continue
            d = np.array(diffs[output])  # rows: (max abs diff, ref max abs, mismatches, exact)
            ref_scale = float(d[:, 1].max())
            limit = 0.0 if d[:, 3].any() else atol + rtol * ref_scale  # integer outputs must match exactly
            results.append(OutputParity(spec.name, precision, output, float(d[:, 0].max()), ref_scale, limit,
                                        int(d[:, 2].sum())))
    return results


def _expect(diffs: dict, name: str, got: np.ndarray, ref) -> None:
    exact = not np.issubdtype(got.dtype, np.floating)
    ref = ref.float().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    if got.shape != ref.shape:
        raise ExportError(f"output {name}: shape {got.shape} from ONNX Runtime, {ref.shape} from PyTorch")
    diff = float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max()) if got.size else 0.0
    scale = float(np.abs(ref.astype(np.float64)).max()) if ref.size else 0.0
    diffs.setdefault(name, []).append((diff, scale, 0, exact))


def _token_mismatches(got: np.ndarray, ref_logits: torch.Tensor, ref_tokens: torch.Tensor, limit: float) -> int:
    """Tokens that differ where the reference's best two logits are further apart than `limit`."""
    top2 = ref_logits.float().topk(2, dim=-1).values
    decisive = (top2[..., 0] - top2[..., 1]) > limit
    differs = torch.from_numpy(got.reshape(ref_tokens.shape)) != ref_tokens
    return int((differs & decisive).sum())


def _compare_head(model: DecoderModel, row: torch.Tensor, layer: int, got: dict, diffs: dict) -> None:
    with torch.inference_mode():
        logits = model.exit_logits(row, layer).float()  # [B, V]
    conf, token = confidence(logits)
    _expect(diffs, "exit_logits", got["exit_logits"], logits)
    _expect(diffs, "exit_confidence", got["exit_confidence"], conf[:, None])
    bad = _token_mismatches(got["exit_token"], logits, token, 2 * float(np.abs(got["exit_logits"] - logits.numpy()).max()))
    diffs.setdefault("exit_token", []).append((0.0, 0.0, bad, True))


def _compare_cloud(model: DecoderModel, row: torch.Tensor, got: dict, diffs: dict, rows: int) -> None:
    with torch.inference_mode():
        logprobs = torch.log_softmax(model.exit_logits(row, model.cfg.num_layers).float(), dim=-1)  # [B, V]
    top = logprobs.topk(got["topk_ids"].shape[1], dim=-1)
    _expect(diffs, "confidence", got["confidence"], top.values[:, :1].exp())
    _expect(diffs, "topk_logprobs", got["topk_logprobs"], top.values)
    margin = 2 * float(np.abs(got["topk_logprobs"] - top.values.numpy()).max())
    bad = _token_mismatches(got["token_id"], logprobs, top.indices[:, :1], margin)
    diffs.setdefault("token_id", []).append((0.0, 0.0, bad, True))
    _expect(diffs, "catchup_rows", got["catchup_rows"], np.full((row.shape[0], 1), rows))


def parity_table(results: list[OutputParity]) -> str:
    lines = [f"{'graph':<14} {'prec':<5} {'output':<20} {'max|diff|':>10} {'max|ref|':>10} {'limit':>9}  ok"]
    for r in results:
        extra = f" ({r.mismatches} token mismatches)" if r.mismatches else ""
        lines.append(f"{r.graph:<14} {r.precision:<5} {r.output:<20} {r.max_abs_diff:>10.3g} {r.ref_max_abs:>10.3g} "
                     f"{r.limit:>9.3g}  {'yes' if r.ok else 'NO'}{extra}")
    return "\n".join(lines)


def parity_summary(results: list[OutputParity]) -> tuple[bool, str]:
    """(all within tolerance, one line): the worst difference per precision and what failed."""
    parts = []
    for precision in dict.fromkeys(r.precision for r in results):
        rs = [r for r in results if r.precision == precision]
        worst = max(rs, key=lambda r: r.max_abs_diff / r.limit if r.limit else float(r.max_abs_diff > 0 or r.mismatches))
        parts.append(f"{precision}: max |diff| {max(r.max_abs_diff for r in rs):.3g} "
                     f"(worst {worst.graph}/{worst.output} at {worst.max_abs_diff:.3g} of {worst.limit:.3g})")
    failed = [r for r in results if not r.ok]
    head = f"parity: {len(results) - len(failed)}/{len(results)} outputs within tolerance"
    tail = "" if not failed else "; FAILED: " + ", ".join(f"{r.precision}/{r.graph}/{r.output}" for r in failed)
    return not failed, f"{head}; " + "; ".join(parts) + tail
