"""Which hidden-state codecs keep threshold 1.0 exact, measured end to end in one process.

    .venv/bin/python -m bench.codec_exactness    # tiny checkpoints, the demo model, Gemma 3 270M if imported
    .venv/bin/python -m bench.codec_exactness --plan models/gemma-3-270m-exits/partition_plan.json --tokens 48

Collaborative decoding at threshold 1.0 (no token exits, every token is the cloud's) through the edge partition
and LocalCloud (context manager -> cloud partition), once per codec, against cloud-only on the same checkpoint (the
whole model through the same layer loop, greedy): positions equal, generations identical, the first position
that differs. The tiny random checkpoints are those of tests/tiny_models.py, split after layer 4 of 6 with exits
after 2 and 4, on fixed random prompts; a plan's checkpoint runs at its own split on its held-out prompts. All in
float32. Prints a markdown table; --out writes the figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from bench.run import load_prompts
from edge_runtime.cloud_only import CloudOnlySession
from edge_runtime.torch_runner import TorchRunner
from edge_runtime.session import DecodingSession
from plugin.model.checkpoint import load_model, read_config
from plugin.paths import DEMO_PLAN, REPO_ROOT
from plugin.protocol.codec import CODEC_DTYPES, CodecError
from plugin.split.edge import EdgePartition
from plugin.split.local import LocalCloud
from plugin.split.plan import PartitionPlan

GEMMA_PLAN = REPO_ROOT / "models" / "gemma-3-270m-exits" / "partition_plan.json"
TINY_KINDS = ("llama", "gpt2", "gemma3", "llama3", "mistral", "qwen2")


def compare(plan: PartitionPlan, prompts: list[list[int]], tokens: int, codecs: list[str]) -> dict:
    """Per codec: positions equal to cloud-only's, generations identical, first differing positions."""
    depth = read_config(plan.checkpoint).num_layers
    full = LocalCloud(load_model(plan.checkpoint))
    reference = [CloudOnlySession(full, sequence_id=i + 1).generate(p, tokens).token_ids for i, p in enumerate(prompts)]
    edge = EdgePartition(TorchRunner(load_model(plan.checkpoint, range(0, plan.split_layer),
                                                exit_adapters=plan.exit_adapters)), plan)
    cloud = LocalCloud(load_model(plan.checkpoint, range(plan.split_layer, depth)))
    out = {}
    for codec in codecs:
        equal, identical, first = 0, 0, []
        try:
            for i, (prompt, ref) in enumerate(zip(prompts, reference)):
                got = DecodingSession(edge, cloud, "collaborative", threshold=1.0, codec=codec,
                                      sequence_id=100 + i).generate(prompt, tokens).token_ids
                same = [a == b for a, b in zip(got, ref)]
                equal += sum(same)
                identical += all(same)
                first += [] if all(same) else [same.index(False)]
        except CodecError as e:  # fp16 refuses rows beyond its range
            out[codec] = {"refused": str(e)}
            continue
        out[codec] = {"positions_equal": equal, "positions": tokens * len(prompts), "identical": identical,
                      "generations": len(prompts), "first_differences": first}
    return out


def tiny_prompts(count: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (3 + 3 * i,), generator=g).tolist() for i in range(count)]


def table(results: dict[str, dict]) -> str:
    lines = ["| checkpoint | codec | positions equal to cloud-only's | generations identical | first difference at |",
             "| --- | --- | ---: | ---: | --- |"]
    for name, per_codec in results.items():
        for codec, r in per_codec.items():
            if "refused" in r:
                lines.append(f"| {name} | {codec} | refused: {r['refused'].split(':')[0]} | | |")
                continue
            share = f"{r['positions_equal']} of {r['positions']}"
            lines.append(f"| {name} | {codec} | {share} | {r['identical']} of {r['generations']} | "
                         f"{', '.join(map(str, r['first_differences'])) or '-'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", type=Path, action="append", default=None,
                   help="a plan to measure (repeatable; default: the demo plan, and Gemma's when imported)")
    p.add_argument("--tiny", default=",".join(TINY_KINDS), help="tiny checkpoint kinds, '' for none "
                                                                "(default: %(default)s)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per checkpoint (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=48, help="tokens per generation (default: %(default)s)")
    p.add_argument("--codecs", default=",".join(CODEC_DTYPES), help="(default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    codecs = args.codecs.split(",")
    plans = args.plan
    if plans is None:
        gemma_imported = (PartitionPlan.load(GEMMA_PLAN).checkpoint / "config.json").is_file()
        plans = [DEMO_PLAN] + ([GEMMA_PLAN] if gemma_imported else [])
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in filter(None, args.tiny.split(",")):
            from tests.tiny_models import save_tiny, VOCAB  # the tests' checkpoints; only this part needs them

            path = Path(tmp) / kind
            save_tiny(kind, path)
            plan = PartitionPlan(path, 4, (2, 4), threshold=1.0, codec="fp32")
            results[f"tiny {kind}"] = compare(plan, tiny_prompts(args.prompts, VOCAB), args.tokens, codecs)
            print(f"tiny {kind} measured", file=sys.stderr, flush=True)
    for plan_path in plans:
        plan = PartitionPlan.load(plan_path)
        results[plan.checkpoint.name] = compare(plan, load_prompts(plan, args.prompts)[0], args.tokens, codecs)
        print(f"{plan.checkpoint.name} measured", file=sys.stderr, flush=True)
    print(table(results))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
