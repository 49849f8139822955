"""Parity of exported graphs: ONNX Runtime against the PyTorch layer loop, per output and precision."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from plugin.export.manifest import NP_DTYPES, ExportError, graph_path, kv_names, Manifest
from plugin.export.onnx import load_full_model
from plugin.model.decoder import DecoderModel, exit_decision
from plugin.split.plan import PartitionPlan


# Parity tolerances: pass when max |onnx - torch| <= atol + rtol * max |torch| for each output.
TOLERANCES = {"fp32": (1e-4, 1e-5), "fp16": (1e-2, 1e-2)}


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
    ref_steps = []  # per block: (start, {layer: hidden [B, T, D]}, {layer: K/V held after the block})
    start = 0
    with torch.inference_mode():
        for t in blocks:
            positions = torch.arange(start, start + t)[None].expand(batch, t)
            h = model.embed_tokens(ids[:, start:start + t], positions)
            hidden = {0: h}
            for i in range(cfg.num_layers):
                h = model.run_layers(h, positions, i, i + 1, seqs)
                hidden[i + 1] = h
            ref_steps.append((start, hidden, {i: _held_kv(seqs, i) for i in range(cfg.num_layers)}))
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
                steps.append((total, None, ref_steps[-1][2]))  # a block of 0 rows
            for start, hidden, ref_kv in steps:
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
                for layer in spec.layers:
                    # a local layer's reference forgot the positions before `first`; the graph passes
                    # them from past to present unchanged, and they were compared in an earlier step
                    key, value = kv_names("present", range(layer, layer + 1), cfg.num_layers)
                    first, keys, values = ref_kv[layer]
                    _expect(diffs, key, got[key][:, :, first:], keys)
                    _expect(diffs, value, got[value][:, :, first:], values)
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


def _held_kv(seqs: list, layer: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(first position held, keys, values [B, Hkv, held, Dh]) of one layer of the reference sequences."""
    caches = [s.layers[layer] for s in seqs]
    assert len({c.start for c in caches}) == 1  # same blocks, same positions forgotten
    return caches[0].start, torch.stack([c.keys for c in caches]), torch.stack([c.values for c in caches])


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
        logits = model.exit_logits(row, layer).float()  # [B, V], or [B, S + 1] for a shortlist head
    token_ids = model.exit_token_ids(layer)
    conf, token = exit_decision(logits, token_ids)
    _expect(diffs, "exit_logits", got["exit_logits"], logits)
    _expect(diffs, "exit_confidence", got["exit_confidence"], conf[:, None])
    candidates = logits if token_ids is None else logits[:, :-1]  # "other" is never a token
    bad = _token_mismatches(got["exit_token"], candidates, token,
                            2 * float(np.abs(got["exit_logits"] - logits.numpy()).max()))
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
