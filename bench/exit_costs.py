"""What an exit head costs on a large vocabulary, per decoded token, on PyTorch and ONNX Runtime.

    .venv/bin/python -m bench.exit_costs                    # Gemma 3 270M (after `ce-collm import-gguf`)
    .venv/bin/python -m bench.exit_costs --plan models/gemma-3-270m-exits/partition_plan.json --repeats 30

Designs compared for the plan's exits (the edge's worst case: every exit computed, the token goes
to the cloud), each timed on one decoded row after a prefilled context of --context positions:

  full        the model's norm + LM head over the whole vocabulary at every exit
  shortlist S norm + S rows of the LM head + one "other" logit at every exit (S = --shortlists)
  pruned C    the full head at the first exit, then the first exit's top-C candidates at the others
  layers      the edge's layers [0, k) alone, and the whole model (all layers + full head) on the
              same runner

The ONNX graphs are the project's own (`SegmentGraph`, `ExitHeadGraph`) exported into a temporary
folder; the pruned head is a small graph (rows gathered by id, then scored). Every path is timed in
turn in each round (the machine's load drifts) and reported as the median per round. Prints one JSON
object and writes it to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.args import write_json
from plugin.export.manifest import GraphSpec, kv_names
from plugin.export.onnx import ExitHeadGraph, SegmentGraph
from plugin.export.parity import ort_session
from plugin.model.checkpoint import load_model
from plugin.model.decoder import DecoderModel, exit_decision, Shortlist
from plugin.model.gguf_import import default_out_dir, PLAN
from plugin.paths import REPO_ROOT
from plugin.split.plan import PartitionPlan

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "exit_costs.json"


def layer_macs(model: DecoderModel, layers: int, context: int) -> int:
    """Multiply-adds of `layers` decoder layers for one row attending over `context` keys."""
    cfg = model.cfg
    proj = cfg.hidden_size * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + cfg.num_heads * cfg.head_dim * cfg.hidden_size
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    attention = 2 * cfg.num_heads * cfg.head_dim * context
    return layers * (proj + mlp + attention)


def shortlist_heads(model: DecoderModel, exits: tuple[int, ...], size: int) -> tuple[Shortlist, nn.ModuleDict]:
    """Untrained shortlist heads of `size` rows at `exits` (what they cost does not depend on training)."""
    ids = torch.arange(size)
    return (Shortlist(ids, model.lm_head.weight.detach()[ids].clone()),
            nn.ModuleDict({str(e): nn.Linear(model.cfg.hidden_size, 1) for e in exits}))


def use_heads(model: DecoderModel, heads: tuple[Shortlist, nn.ModuleDict] | None) -> DecoderModel:
    """Switch the model's exit heads: shortlist heads, or None for the full head (a swap of references)."""
    model.shortlist, model.exit_other = heads if heads is not None else (None, nn.ModuleDict())
    return model


class PrunedHead(nn.Module):
    """Score only given candidates: norm, then their LM-head rows (gathered by the caller) in one small matmul."""

    def __init__(self, model: DecoderModel):
        super().__init__()
        self.model = model

    def forward(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        # hidden: [B, D]; rows: [C, D] -> probabilities [B, C]
        return torch.softmax(self.model.final_norm(hidden) @ rows.T, dim=-1)


def _median_ms(samples: list[float]) -> float:
    return round(1000 * statistics.median(samples), 3)


def torch_paths(model: DecoderModel, plan: PartitionPlan, context: int, shortlists: list[int], prune: int):
    """name -> callable computing one decoded row on the PyTorch layer loop."""
    n, k, exits = model.cfg.num_layers, plan.split_layer, plan.exit_layers
    seq = model.new_sequence(0, n)
    ids = torch.randint(0, model.cfg.vocab_size, (1, context + 1))
    with torch.inference_mode():
        positions = torch.arange(context)[None]
        model.run_layers(model.embed_tokens(ids[:, :context], positions), positions, 0, n, [seq])
    mark, row_pos = seq.mark(), torch.tensor([[context]])

    @torch.inference_mode()
    def layers(last: int) -> torch.Tensor:
        seq.rewind(mark)
        h = model.embed_tokens(ids[:, context:], row_pos)
        return model.run_layers(h, row_pos, 0, last, [seq])[0, -1]  # [D]

    row = layers(k)

    @torch.inference_mode()
    def heads(chosen: tuple[Shortlist, nn.ModuleDict] | None) -> None:
        use_heads(model, chosen)
        for e in exits:
            exit_decision(model.exit_logits(row, e), model.exit_token_ids(e))

    @torch.inference_mode()
    def pruned() -> None:
        use_heads(model, None)
        top = model.exit_logits(row, exits[0]).topk(prune).indices  # [C]
        for _ in exits[1:]:
            torch.softmax(model.final_norm(row) @ model.lm_head.weight[top].T, -1).max()

    @torch.inference_mode()
    def full_model() -> None:
        use_heads(model, None)
        model.exit_logits(layers(n), n).argmax()

    paths = {"edge_layers": lambda: layers(k), "full_model": full_model, "heads_full": lambda: heads(None),
             f"heads_pruned_{prune}": pruned}
    for size in shortlists:
        chosen = shortlist_heads(model, exits, size)
        paths[f"heads_shortlist_{size}"] = lambda c=chosen: heads(c)
    return paths


def onnx_paths(model: DecoderModel, plan: PartitionPlan, context: int, shortlists: list[int], prune: int,
               folder: Path, threads: int):
    """name -> callable computing one decoded row on ONNX Runtime over the project's exported graphs.

    Heads differ between exits only in their trained weights, so one graph per head kind runs once per exit."""
    cfg, n, k, exits = model.cfg, model.cfg.num_layers, plan.split_layer, plan.exit_layers
    head_outputs = ["exit_logits", "exit_confidence", "exit_token"]

    def export(module: nn.Module, inputs: tuple, names: list[str], outputs: list[str], name: str):
        path = folder / f"{name}.onnx"
        with torch.no_grad():
            torch.onnx.export(module.eval(), inputs, str(path), dynamo=False, opset_version=17, input_names=names,
                              output_names=outputs, do_constant_folding=True)
        return ort_session(path, threads)

    def segment(last: int, name: str):
        spec = GraphSpec(name, "edge", 0, last, None, ("input_ids", "start_pos", *kv_names("past", range(last), n)),
                         ("hidden_out", *kv_names("present", range(last), n)))
        rng = np.random.default_rng(0)
        feeds = {"input_ids": np.array([[5]], np.int64), "start_pos": np.array([[context]], np.int64)}
        for past in kv_names("past", range(last), n):
            feeds[past] = rng.standard_normal((1, cfg.num_kv_heads, context, cfg.head_dim)).astype(np.float32)
        session = export(SegmentGraph(model, spec), tuple(torch.from_numpy(feeds[i]) for i in spec.inputs),
                         list(spec.inputs), list(spec.outputs), name)
        return lambda: session.run(["hidden_out"], feeds)

    row = np.random.default_rng(1).standard_normal((1, cfg.hidden_size)).astype(np.float32)
    use_heads(model, None)
    full_head = export(ExitHeadGraph(model, exits[0]), (torch.from_numpy(row),), ["hidden"], head_outputs, "full_head")
    final = export(ExitHeadGraph(model, n), (torch.from_numpy(row),), ["hidden"], head_outputs, "final_head")
    embedding = model.lm_head.weight.detach().numpy()  # [V, D], the tied matrix the edge holds anyway
    pruned_rest = export(PrunedHead(model), (torch.from_numpy(row), torch.from_numpy(embedding[:prune])),
                         ["hidden", "rows"], ["probs"], "pruned_rest")

    def pruned() -> None:
        logits = full_head.run(["exit_logits"], {"hidden": row})[0][0]  # [V]
        top = np.argpartition(-logits, prune)[:prune]
        for _ in exits[1:]:
            pruned_rest.run(None, {"hidden": row, "rows": embedding[top]})

    edge, whole = segment(k, "edge_layers"), segment(n, "whole_layers")
    paths = {"edge_layers": edge, "full_model": lambda: (whole(), final.run(None, {"hidden": row})),
             "heads_full": lambda: [full_head.run(None, {"hidden": row}) for _ in exits],
             f"heads_pruned_{prune}": pruned}
    for size in shortlists:
        use_heads(model, shortlist_heads(model, exits, size))
        session = export(ExitHeadGraph(model, exits[0]), (torch.from_numpy(row),), ["hidden"], head_outputs,
                         f"shortlist_{size}")
        paths[f"heads_shortlist_{size}"] = lambda s=session: [s.run(None, {"hidden": row}) for _ in exits]
    use_heads(model, None)
    return paths


def interleaved(paths: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median milliseconds of each path, every path timed in turn in each round."""
    for run in paths.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, run in paths.items():
            t0 = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - t0)
    return {name: _median_ms(s) for name, s in samples.items()}


def designs(ms: dict[str, float], shortlists: list[int], prune: int) -> dict[str, float]:
    """Edge time per token of each design: the edge layers plus its heads (every exit computed)."""
    out = {"no exit heads": ms["edge_layers"], "full head at every exit": ms["edge_layers"] + ms["heads_full"],
           f"full head at the first exit, its top {prune} at the others":
               ms["edge_layers"] + ms[f"heads_pruned_{prune}"]}
    for size in shortlists:
        out[f"shortlist {size} + other at every exit"] = ms["edge_layers"] + ms[f"heads_shortlist_{size}"]
    out["whole model (all layers + full head)"] = ms["full_model"]
    return {k: round(v, 3) for k, v in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", type=Path, default=default_out_dir() / PLAN, help="(default: %(default)s)")
    p.add_argument("--context", type=int, default=128, help="positions already decoded (default: %(default)s)")
    p.add_argument("--shortlists", default="4096,8192,16384,32768", help="(default: %(default)s)")
    p.add_argument("--prune", type=int, default=64, help="candidates of the pruned design (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=20, help="(default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads (default: %(default)s)")
    p.add_argument("--runners", default="torch,onnx", help="(default: %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="(default: %(default)s)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    plan = PartitionPlan.load(args.plan)
    shortlists = [int(s) for s in args.shortlists.split(",")]
    model = load_model(plan.checkpoint)
    n = model.cfg.num_layers
    macs = {"edge_layers": layer_macs(model, plan.split_layer, args.context),
            "whole_model_layers": layer_macs(model, n, args.context),
            "full_head": model.cfg.hidden_size * model.cfg.vocab_size,
            **{f"shortlist_{s}": model.cfg.hidden_size * (s + 1) for s in shortlists},
            f"pruned_{args.prune}": model.cfg.hidden_size * args.prune}
    out = {"plan": plan.to_dict(REPO_ROOT), "context": args.context, "threads": args.threads,
           "repeats": args.repeats, "macs_per_token": macs, "load_average_before": os.getloadavg()[0]}
    runners = args.runners.split(",")
    if "torch" in runners:
        paths = torch_paths(model, plan, args.context, shortlists, args.prune)
        ms = interleaved(paths, args.repeats)
        out["torch_ms"], out["torch_designs_ms"] = ms, designs(ms, shortlists, args.prune)
    if "onnx" in runners:
        with tempfile.TemporaryDirectory(prefix="exit-costs-") as folder:
            paths = onnx_paths(model, plan, args.context, shortlists, args.prune, Path(folder), args.threads)
            ms = interleaved(paths, args.repeats)
        out["onnx_ms"], out["onnx_designs_ms"] = ms, designs(ms, shortlists, args.prune)
    out["load_average_after"] = os.getloadavg()[0]
    write_json(args.out, out)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
