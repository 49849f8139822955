"""How much each hidden-state codec changes the cloud's tokens, and what it costs on the wire.

    .venv/bin/python -m bench.codec_fidelity --plan models/gemma-3-270m-exits/partition_plan.json \\
        --continuations runs/gemma-exits/heldout_continuations.json

For each held-out greedy continuation (the full model's own tokens, --tokens of them): one fp32 pass
gives the layer-k rows and the full model's token at every generated position; each codec then
encodes and decodes those rows, the cloud's layers [k, N) run over them, and its tokens are compared
with the full model's (teacher-forced: the same context for every codec, so a flip is the codec's).
Up to the first flip a free-running collaborative generation is the same computation, so the first
flip is also where a collaborative generation with that codec would first leave the cloud-only text.
Prints one JSON object and writes it to --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from bench.args import write_json
from plugin.model.checkpoint import load_model
from plugin.protocol.codec import CODEC_DTYPES, decode, encode
from plugin.paths import REPO_ROOT
from plugin.split.plan import PartitionPlan
from plugin.training import continuations as cont
from plugin.training.exit_heads import layer_states

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "codec_fidelity.json"


@torch.inference_mode()
def fidelity(model, records: list[cont.Continuation], split: int, codecs: list[str], tokens: int) -> dict:
    n_layers, D = model.cfg.num_layers, model.cfg.hidden_size
    per = {c: {"agree": 0, "total": 0, "first_flips": [], "rel_err": []} for c in codecs}
    for r in records:
        new = r.new_ids[:tokens]
        ids = torch.tensor([r.prompt_ids + new])  # [1, T]
        first = len(r.prompt_ids) - 1  # the position that predicts the first generated token
        states = layer_states(model, ids, (split, n_layers))
        reference = model.exit_logits(states[n_layers][0, first:-1], n_layers).argmax(-1)  # [n]
        rows = states[split][0]  # [T, D]
        positions = torch.arange(ids.shape[1])[None]
        for c in codecs:
            got = torch.from_numpy(decode(encode(rows, c), D)).to(model.dtype)
            h = model.run_layers(got[None], positions, split, n_layers, [model.new_sequence(split, n_layers)])
            tokens_c = model.exit_logits(h[0, first:-1], n_layers).argmax(-1)
            same = tokens_c == reference
            per[c]["agree"] += int(same.sum())
            per[c]["total"] += len(same)
            per[c]["first_flips"].append(int((~same).nonzero()[0]) if not same.all() else None)
            per[c]["rel_err"].append(float(((got - rows).norm(dim=1) / rows.norm(dim=1))[1:].mean()))
    out = {}
    for c, s in per.items():
        flips = [f for f in s["first_flips"] if f is not None]
        nbytes = encode(torch.zeros(1, D), c).nbytes
        out[c] = {"token_agreement": s["agree"] / s["total"], "tokens": s["total"],
                  "generations_with_a_flip": len(flips), "generations": len(records),
                  "median_first_flip": statistics.median(flips) if flips else None,
                  "bytes_per_row": nbytes, "relative_error_mean": statistics.mean(s["rel_err"])}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", type=Path, required=True)
    p.add_argument("--continuations", type=Path, required=True, help="held-out continuations (greedy ones are used)")
    p.add_argument("--tokens", type=int, default=96, help="generated tokens per continuation (default: %(default)s)")
    p.add_argument("--codecs", default=",".join(CODEC_DTYPES), help="(default: %(default)s)")
    p.add_argument("--split", type=int, default=None, help="split layer (default: the plan's)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="(default: %(default)s)")
    args = p.parse_args(argv)
    plan = PartitionPlan.load(args.plan)
    split = args.split or plan.split_layer
    model = load_model(plan.checkpoint)
    records = [r for r in cont.load(args.continuations) if r.how == "greedy"]
    codecs = args.codecs.split(",")
    skipped = {}
    for c in list(codecs):  # a codec that cannot carry these rows at all (fp16 beyond its range) is reported
        try:
            encode(layer_states(model, torch.tensor([records[0].prompt_ids]), (split,))[split][0], c)
        except ValueError as e:
            skipped[c] = str(e)
            codecs.remove(c)
    out = {"plan": plan.to_dict(REPO_ROOT), "split_layer": split, "tokens_per_generation": args.tokens,
           "codecs": fidelity(model, records, split, codecs, args.tokens), "refused": skipped}
    write_json(args.out, out)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
