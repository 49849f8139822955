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
  exit_logits                    fp32           [B, V] | [B, S + 1]  edge segments ending at an exit: last row
                                                                     (a shortlist head: S tokens, then "other")
  exit_confidence, exit_token    fp32, int64    [B, 1]               the best candidate's probability, its token id
  token_id, confidence           int64, fp32    [B, 1]               cloud: -1 and 0 for a block of 0 rows
  topk_ids, topk_logprobs        int64, fp32    [B, K]               cloud: -1 and -inf for a block of 0 rows
  catchup_rows                   int32          [B, 1]               cloud: T
  present_key_LL, present_value_LL  as past     [B, Hkv, P + T, Dh]

B, T and P are dynamic, so one graph serves prefill, catch-up blocks and single-token decode. The
block's positions are start_pos + [0, T): blocks are contiguous and start at the cached length
(plugin/model/kv.py), which is also what Triton's START_POS / PENDING_START carry. Hidden states and
logits cross graph boundaries in fp32 whatever the graph's precision (the wire and the
context manager speak fp32); the KV cache is in the graph's precision. Layer numbers in tensor
names are zero-padded to one width so that no state name extends another (Triton matches
implicit-state names by prefix in places).

Exporter: torch 2.13's `torch.onnx.export` defaults to `dynamo=True`, which needs `onnxscript`
and emits opset 18 or newer. We use the TorchScript exporter (`dynamo=False`) at opset 17: it
takes `dynamic_axes` directly, needs no extra package, and opset 17 is what the ONNX parser of
JetPack 5's TensorRT 8.5 reads (JetPack 6 and the NGC containers read it too). The graphs trace
the project's own `DecoderLayer` (`Attention.project`, `Attention.attend`, `causal_mask`); only the
KV gathering differs: past tensor + new rows concatenated, instead of a `LayerKV` (local layers of
Gemma 3 and Mistral keep every past position here, their mask applies the sliding window).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from plugin.export.manifest import (
    NP_DTYPES, OPSET, dynamic_axes, graph_path, GraphSpec, Manifest, new_manifest)
from plugin.model.checkpoint import load_model, read_config
from plugin.model.config import ModelConfig
from plugin.model.decoder import DecoderModel, exit_decision
from plugin.model.layers import causal_mask
from plugin.protocol.tensors import TOP_K
from plugin.split.plan import PartitionPlan

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}  # the graphs' float types (NP_DTYPES on the wire)


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
            gather = _concat_past(past[2 * n], past[2 * n + 1], positions, model.cfg.window(i), presents)
            h = model.layers[str(i)](h, positions, gather)
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
    # row: [B, D] -> logits [B, V] (a shortlist head: [B, S + 1]) fp32, confidence [B, 1] fp32, token [B, 1] int64
    logits = model.exit_logits(row, layer).float()
    conf, token = exit_decision(logits, model.exit_token_ids(layer))
    return [logits, conf[:, None], token[:, None]]


def _concat_past(past_k: torch.Tensor, past_v: torch.Tensor, positions: torch.Tensor, window: int | None,
                 presents: list):
    """The gather_kv of DecoderLayer for the graphs: present = past + new rows, cache index == position.

    A local layer's past holds every position too (P = start_pos); its mask hides what lies beyond the window.
    """

    def gather(k: torch.Tensor, v: torch.Tensor):
        # k, v: [B, Hkv, T, Dh]
        keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # [B, Hkv, P + T, Dh]
        presents.extend([keys, values])
        # An additive mask in the graph's dtype: the exporter turns a boolean mask into fp32
        # constants, which would promote fp16 attention (and everything after it) to fp32.
        key_positions = torch.arange(keys.shape[2], device=keys.device)[None]  # [1, P + T]
        visible = causal_mask(positions, key_positions, window)  # [B, 1, T, P + T]
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


