#!/usr/bin/env python3
"""Add or retrain exit adapters for a checkpoint, backbone frozen.

The partition plan names the checkpoint (a local Hugging Face directory: Llama/Qwen2/Mistral-style
or GPT-2-style, with a tokenizer.json) and its exit layers. For every exit, a small residual
bottleneck adapter (rank R) learns, on a text file you name, to match the final layer's
distribution (KL(final || exit)) and the next token (cross-entropy). The backbone is loaded once,
frozen and in eval mode, and runs without gradients; only the adapters train.

The adapters are saved beside the checkpoint (default CHECKPOINT/exit_adapters.safetensors) in the
format `plugin.model.checkpoint.load_model(..., exit_adapters=...)` reads; --update-plan writes the
`exit_adapters` key into the plan so the edge, the exports and the calibration find them.

Examples (from the repository root)::

    .venv/bin/python build/train_exit_adapters.py --plan path/to/tinyllama/partition_plan.json \\
        --text my_corpus.txt --steps 500 --dtype bfloat16 --update-plan
    .venv/bin/python build/calibrate_exits.py --plan path/to/tinyllama/partition_plan.json --text my_heldout.txt
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `plugin` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train early-exit adapters for the checkpoint of a partition plan (backbone frozen; "
                    "loss = KL(final layer || exit) + cross-entropy at every exit) on a text file, and save "
                    "them beside the checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("what to train")
    g.add_argument("--plan", required=True,
                   help="partition plan (JSON/YAML); its `checkpoint` is the model, its `exit_layers` get adapters")
    g.add_argument("--text", nargs="+", metavar="FILE", default=[],
                   help="UTF-8 text file(s) to train on, tokenized with the checkpoint's tokenizer.json; each "
                        "file is one document (documents are joined with eos). Keep your evaluation text out")
    g.add_argument("--continuations", nargs="+", metavar="FILE", default=[],
                   help="the model's own continuations (JSON of token ids, build/make_continuations.py) to train "
                        "on; needs --cache")
    g.add_argument("--exit-layers", default=None,
                   help="comma-separated exit layers to train (default: the plan's), e.g. to compare layers "
                        "before choosing a plan")
    g.add_argument("--rank", type=int, default=32, help="adapter bottleneck width (hidden -> rank -> hidden)")
    g.add_argument("--init", metavar="FILE", default=None,
                   help="continue from these saved adapters (same rank) instead of starting at identity")

    g = p.add_argument_group("cached training (large vocabularies: shortlist heads)")
    g.add_argument("--cache", default=None, metavar="DIR",
                   help="run the frozen backbone once over the training sequences, keep what the heads need in DIR "
                        "(reused when it holds the same sequences and layers), and train from it. The heads read "
                        "h / RMS(h) and are saved with adapter_input 'rms'")
    g.add_argument("--cache-layers", default=None,
                   help="comma-separated layers to keep in a new cache (default: the exit layers)")
    g.add_argument("--text-tokens", type=int, default=32768,
                   help="with --cache: tokens of --text, as evenly spaced windows of --seq-len")
    g.add_argument("--shortlist", type=int, default=0,
                   help="with --cache: score only the S tokens the final layer chooses most often over the cached "
                        "positions, plus one 'other' logit per exit; 0: the whole vocabulary")
    g.add_argument("--tokens-per-step", type=int, default=256, help="with --cache: positions per optimizer step")

    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=300, help="optimizer steps")
    g.add_argument("--lr", type=float, default=2e-3,
                   help="peak AdamW learning rate (linear warmup over 10%% of the steps, cosine decay to 10%%)")
    g.add_argument("--seq-len", type=int, default=256,
                   help="tokens per training window (bos + text from a random offset); capped by the "
                        "model's max positions")
    g.add_argument("--batch-size", type=int, default=8, help="windows per step")
    g.add_argument("--kl-weight", type=float, default=1.0, help="weight of KL(final || exit) at each exit")
    g.add_argument("--ce-weight", type=float, default=1.0, help="weight of the next-token cross-entropy at each exit")
    g.add_argument("--seed", type=int, default=0, help="seed of the adapters' init and of the batch offsets")
    g.add_argument("--max-minutes", type=float, default=0.0,
                   help="wall-clock budget of the training loop; when reached, training stops and the adapters "
                        "are saved as they are. <=0: no limit")
    g.add_argument("--val-tokens", type=int, default=16384,
                   help="the last tokens of the text are held back (never trained on) to report KL, perplexity "
                        "and agreement before and after training; 0 disables (used only if the text is at least "
                        "4x longer)")

    g = p.add_argument_group("machine")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype of the frozen backbone (bfloat16 halves the memory of a 7B checkpoint); the "
                        "adapters, final norm and LM head always train in float32")
    g.add_argument("--device", default="cpu", help="torch device of the backbone and adapters, e.g. cuda")
    g.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 keeps torch's default")

    g = p.add_argument_group("output")
    g.add_argument("--out", default=None,
                   help="adapters file (safetensors); default CHECKPOINT/exit_adapters.safetensors")
    g.add_argument("--update-plan", action="store_true",
                   help="write the `exit_adapters` key (path relative to the plan) into the plan file")
    args = p.parse_args(argv)
    if not args.text and not args.continuations:
        p.error("give --text and/or --continuations to train on")
    if args.continuations and not args.cache:
        p.error("--continuations needs --cache")
    if args.shortlist < 0 or args.tokens_per_step < 1:
        p.error("--shortlist must be >= 0 and --tokens-per-step >= 1")
    if args.rank < 1 or args.steps < 1 or args.batch_size < 1 or args.seq_len < 2:
        p.error("--rank, --steps, --batch-size must be >= 1 and --seq-len >= 2")
    if args.kl_weight < 0 or args.ce_weight < 0 or args.kl_weight + args.ce_weight == 0:
        p.error("--kl-weight and --ce-weight must be >= 0 and not both 0")
    return args


def _fmt(per_exit: dict[int, dict[str, float]]) -> str:
    return "  ".join(f"exit {e}: KL {r['kl']:.3f} ppl {r['ppl']:.2f} agree {r['agreement']:.1%}"
                     for e, r in per_exit.items())


def _layers(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",")) if text else tuple(default)


class TextData:
    """Windows of --text at random offsets; the backbone runs on every step (small checkpoints)."""

    def __init__(self, args, tokenizer, model, log):
        from plugin.training.exit_heads import read_documents, spaced_windows

        self.args, self.model, self.tokenizer = args, model, tokenizer
        self.seq_len = min(args.seq_len, model.cfg.max_positions)
        docs = read_documents(args.text)
        self.stream = tokenizer.encode_documents(docs)
        self.val_windows = None
        if args.val_tokens > 0 and len(self.stream) >= 4 * max(args.val_tokens, self.seq_len):
            val_stream, self.stream = self.stream[-args.val_tokens:], self.stream[:-args.val_tokens]
            self.val_windows = spaced_windows(val_stream, args.val_tokens, self.seq_len, tokenizer.bos_id)
        log(f"text: {len(docs)} file(s), {len(self.stream):,} training tokens"
            + (f", {self.val_windows.shape[0]} validation windows from the last {args.val_tokens:,} tokens"
               if self.val_windows is not None else " (too short to hold back validation tokens)"))
        self.shortlist = None
        self.metadata = {"format": "ce-collm exit adapters v1", "seq_len": self.seq_len,
                         "batch_size": args.batch_size, "text_sha256": _sha256(docs)}

    def train_step(self, heads, optimizer, step: int):
        from plugin.training.exit_heads import random_windows, train_step

        a = self.args
        ids = random_windows(self.stream, a.batch_size, self.seq_len, self.tokenizer.bos_id, a.seed, step)
        return train_step(self.model, heads, optimizer, ids, a.kl_weight, a.ce_weight)

    def evaluate(self, heads):
        from plugin.training.exit_heads import evaluate_heads

        if self.val_windows is None:
            return None
        return evaluate_heads(self.model, heads, self.val_windows, self.args.batch_size)


class CachedData:
    """The backbone's outputs over --continuations and --text, computed once into --cache."""

    def __init__(self, args, tokenizer, model, exit_layers, log):
        import torch
        from tqdm import tqdm

        from plugin.training import continuations as cont
        from plugin.training.exit_cache import build_cache, cache_key, ExitCache, shortlist_coverage, top_tokens
        from plugin.training.exit_heads import read_documents, spaced_windows

        self.args = args
        sequences = [r.ids for f in args.continuations for r in cont.load(f)]
        n_cont = len(sequences)
        docs = read_documents(args.text) if args.text else []
        if docs:
            seq_len = min(args.seq_len, model.cfg.max_positions)
            windows = spaced_windows(tokenizer.encode_documents(docs), args.text_tokens, seq_len, tokenizer.bos_id)
            sequences += windows.tolist()
        layers = tuple(sorted(set(_layers(args.cache_layers, exit_layers)) | set(exit_layers)))
        key = cache_key(model, sequences, layers)
        try:
            cache = ExitCache(args.cache, key)
            log(f"cache {args.cache}: {cache.tokens:,} positions, layers {list(cache.layers)} (reused)")
        except (FileNotFoundError, ValueError) as e:
            log(f"building the cache ({e}): {n_cont} continuations + {len(sequences) - n_cont} text windows, "
                f"layers {list(layers)}")
            total = sum(len(s) - 1 for s in sequences)
            with tqdm(total=total, desc="cache", unit="tok", file=sys.stderr, mininterval=5) as bar:
                build_cache(model, sequences, layers, args.cache, key, bar.update)
            cache = ExitCache(args.cache, key)
        self.cache, self.exit_layers = cache, tuple(exit_layers)
        self.val_positions, self.train_positions = cache.split_positions(args.val_tokens, args.seed)
        counts = cache.top_counts(self.train_positions)
        self.shortlist = top_tokens(counts, args.shortlist) if args.shortlist else None
        sizes = sorted({1024, 4096, 8192, 16384, 32768, args.shortlist} - {0})
        coverage = {s: shortlist_coverage(counts, cache.top[torch.from_numpy(self.val_positions)], s) for s in sizes}
        log("shortlist coverage of the final layer's argmax on held-back positions: "
            + ", ".join(f"{s}: {c:.2%}" for s, c in coverage.items()))
        self.metadata = {"format": "ce-collm exit heads v2", "cache": str(args.cache), "cache_tokens": cache.tokens,
                         "continuations": [str(f) for f in args.continuations], "text_tokens": args.text_tokens,
                         "text_sha256": _sha256(docs), "tokens_per_step": args.tokens_per_step,
                         "shortlist": args.shortlist, "shortlist_coverage": {str(s): c for s, c in coverage.items()}}

    def train_step(self, heads, optimizer, step: int):
        from plugin.training.exit_cache import cached_train_step

        a = self.args
        rng = np.random.default_rng(a.seed * 1_000_003 + step)
        positions = rng.choice(self.train_positions, size=min(a.tokens_per_step, len(self.train_positions)),
                               replace=False)
        batch = self.cache.batch(positions, self.exit_layers)
        return cached_train_step(heads, optimizer, batch, a.kl_weight, a.ce_weight)

    def evaluate(self, heads):
        from plugin.training.exit_cache import evaluate_cached

        if len(self.val_positions) == 0:
            return None
        return evaluate_cached(heads, self.cache, self.val_positions, self.args.kl_weight, self.args.ce_weight)


def _sha256(docs: list[str]) -> str:
    digest = hashlib.sha256()
    for d in docs:
        digest.update(d.encode())
    return digest.hexdigest()


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from safetensors.torch import load_file
    from tqdm import tqdm

    from plugin.model.checkpoint import load_model
    from plugin.training.exit_heads import ExitHeads, TextTokenizer, freeze, lr_at, save_adapters, update_plan
    from plugin.split.plan import PartitionPlan

    def log(msg: str) -> None:
        tqdm.write(msg, file=sys.stderr)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    plan = PartitionPlan.load(args.plan)
    exit_layers = _layers(args.exit_layers, plan.exit_layers)
    tokenizer = TextTokenizer.from_checkpoint(plan.checkpoint)
    out = Path(args.out) if args.out else plan.checkpoint / "exit_adapters.safetensors"

    t0 = time.time()
    model = freeze(load_model(plan.checkpoint, dtype=getattr(torch, DTYPES[args.dtype]), device=args.device))
    plan.check_depth(model.cfg.num_layers)
    log(f"loaded {plan.checkpoint} ({model.cfg.num_layers} layers, hidden {model.cfg.hidden_size}, "
        f"{args.dtype} on {args.device}) in {time.time() - t0:.1f}s; exits {list(exit_layers)}")
    data = (CachedData(args, tokenizer, model, exit_layers, log) if args.cache
            else TextData(args, tokenizer, model, log))

    torch.manual_seed(args.seed)
    heads = ExitHeads(model, exit_layers, args.rank, shortlist=data.shortlist, normalize_input=bool(args.cache))
    if args.init:
        heads.load_adapters(load_file(args.init))
        log(f"continuing from {args.init}")
    params = heads.trainable_parameters()
    log(f"exit heads: rank {args.rank}" + (f", shortlist of {args.shortlist}" if data.shortlist is not None else "")
        + f", {sum(p.numel() for p in params):,} trainable parameters "
        f"(backbone frozen: {sum(p.numel() for p in model.parameters()):,})")
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)

    before = data.evaluate(heads)
    if before:
        log(f"validation before: {_fmt(before)}")

    warmup = max(1, args.steps // 10)
    budget_s = args.max_minutes * 60 if args.max_minutes > 0 else float("inf")
    bar = tqdm(total=args.steps, desc="exit heads", dynamic_ncols=True, mininterval=2.0, file=sys.stderr)
    t_start, step, first_kl, last_kl = time.time(), 0, None, None
    ema: dict[int, float] = {}
    while step < args.steps:
        if time.time() - t_start >= budget_s:
            log(f"time budget of {args.max_minutes:g} min reached at step {step} of {args.steps}")
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup)
        losses = data.train_step(heads, optimizer, step)
        ema = {e: v if e not in ema else 0.9 * ema[e] + 0.1 * v for e, v in losses.kl.items()}
        first_kl = first_kl or dict(losses.kl)
        last_kl = ema
        step += 1
        bar.update(1)
        bar.set_postfix(kl="/".join(f"{v:.3f}" for v in ema.values()),
                        ce="/".join(f"{v:.2f}" for v in losses.ce.values()), refresh=False)
    bar.close()
    train_s = time.time() - t_start

    after = data.evaluate(heads)
    if after:
        log(f"validation after:  {_fmt(after)}")
    save_adapters(heads, out, {
        **data.metadata, "exit_layers": list(exit_layers), "rank": args.rank, "steps": step, "lr": args.lr,
        "kl_weight": args.kl_weight, "ce_weight": args.ce_weight, "seed": args.seed,
        "text_files": [str(t) for t in args.text], "train_minutes": round(train_s / 60, 1),
        "device": args.device, "threads": torch.get_num_threads(),
        "validation_before": before, "validation_after": after,
    })
    if args.update_plan:
        update_plan(args.plan, out)
        log(f"{args.plan}: exit_adapters -> {PartitionPlan.load(args.plan).exit_adapters}")

    summary = f"exit heads: rank {args.rank}, {step} steps in {train_s / 60:.1f} min"
    for e in exit_layers:
        summary += f"; exit {e}: train KL {first_kl[e]:.3f}->{last_kl[e]:.3f}" if first_kl else f"; exit {e}"
        if before and after:
            summary += (f", validation ppl {before[e]['ppl']:.2f}->{after[e]['ppl']:.2f}, agreement "
                        f"{before[e]['agreement']:.1%}->{after[e]['agreement']:.1%}")
    print(summary + f"; saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
