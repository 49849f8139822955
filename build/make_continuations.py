#!/usr/bin/env python3
"""Write the model's own continuations of a prompt set (token ids, JSON): exit-head training data, or the
held-out set the calibration and the bench read.

    .venv/bin/python build/make_continuations.py --plan models/gemma-3-270m-exits/partition_plan.json \\
        --prompts models/gemma-3-270m-exits/train_prompts.json --out runs/gemma-exits/train_continuations.json \\
        --samples 1
    .venv/bin/python build/make_continuations.py --plan models/gemma-3-270m-exits/partition_plan.json \\
        --prompts models/gemma-3-270m-exits/heldout_prompts.json --out runs/gemma-exits/heldout.json --samples 0

Every prompt gets one greedy continuation and --samples sampled ones (temperature, top-k/top-p, seeded).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `plugin` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--plan", required=True, help="partition plan naming the checkpoint")
    p.add_argument("--prompts", required=True, help="JSON list of prompt strings")
    p.add_argument("--out", required=True, help="output JSON (token ids per continuation)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--samples", type=int, default=1, help="sampled continuations per prompt, besides the greedy one")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=1.0, help="1.0: off (on a 262k vocabulary its sort is slow)")
    p.add_argument("--top-k", type=int, default=64, help="0: off")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 keeps torch's default")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or args.samples < 0 or args.batch_size < 1:
        p.error("--max-new-tokens and --batch-size must be >= 1, --samples >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from plugin.model.checkpoint import read_config
    from plugin.split.plan import PartitionPlan
    from plugin.training import continuations as cont

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    plan = PartitionPlan.load(args.plan)
    prompts = cont.read_prompts(args.prompts)
    prompt_ids = cont.encode_prompts(plan.checkpoint, prompts)
    cfg = read_config(plan.checkpoint)
    pad_id = cfg.eos_token_ids[0] if cfg.eos_token_ids else 0
    hf = AutoModelForCausalLM.from_pretrained(plan.checkpoint, dtype=torch.float32).eval()
    pad_id = hf.generation_config.pad_token_id if hf.generation_config.pad_token_id is not None else pad_id
    runs = [("greedy", 0.0, args.seed)] + [
        (f"sample:t={args.temperature},top_k={args.top_k},top_p={args.top_p},seed={args.seed + s}", args.temperature,
         args.seed + s) for s in range(args.samples)]
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]))  # similar lengths pad less
    batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    records: list[cont.Continuation] = []
    t0 = time.time()
    with tqdm(total=len(runs) * len(prompts), desc="continuations", file=sys.stderr, mininterval=5) as bar:
        for how, temperature, seed in runs:
            for batch in batches:
                new = cont.generate(hf, [prompt_ids[i] for i in batch], args.max_new_tokens, pad_id,
                                    cfg.eos_token_ids, temperature, args.top_k, args.top_p, seed)
                records += [cont.Continuation(prompts[i], prompt_ids[i], n, how) for i, n in zip(batch, new)]
                bar.update(len(batch))
    cont.save(records, args.out)
    tokens = sum(len(r.new_ids) for r in records)
    print(f"{len(records)} continuations of {len(prompts)} prompts, {tokens:,} new tokens in "
          f"{time.time() - t0:.0f}s; saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
