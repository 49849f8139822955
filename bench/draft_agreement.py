"""Which split and exit verified mode should draft from: agreement, edge and cloud cost, and the time bound.

Verified mode's output is the full model's whatever the draft, so its plan may split later than
collaborative's: an exit after layer 16 or 17 agrees with the full model more often, for one or two
more layers of edge time. Three parts, each printing and writing JSON:

  agreement  teacher-forced, on held-out continuations (build/make_continuations.py): for each exit layer
             and each head (identity = no adapter: final norm + shortlist + a zero "other" logit; or a
             trained heads file), how often the exit's argmax is the full model's token, by confidence;
             the shortlist's coverage of the full model's tokens; the agreement with the runtime's prompt
             lookup where the exit is less confident than 0.2-0.7; and, simulated on the same sequences,
             tokens per verification round for each gamma (guesses are kept while they equal the full
             model's token: greedy verified mode's rule, run on the real runs of agreement).
  timing     one core, the PyTorch layer loop, one decoded row after --context positions: the edge step
             (layers [0, k) + a shortlist head) per split k, the cloud's pass (layers [k, N) over r rows +
             the full LM head, log-softmax, top-8) per split and row count, the whole model on one row
             (cloud-only's pass), and one core's streaming bandwidth (the edge step's floor).
  bound      from both JSON files: per split and gamma, expected time per token, against cloud-only's
             (RTT + whole-model pass). Two estimates: the issue's bound max(edge step, (RTT + cloud pass)
             / tokens per round), and a pipelined round (the edge drafts the next request's g + 1 steps
             during the flight; after a rejection it drafts them after the reply).

    .venv/bin/python -m bench.draft_agreement agreement --plan models/gemma-3-270m-exits/partition_plan.json \\
        --continuations runs/gemma-exits/heldout_continuations.json --layers 15,16,17 \\
        --heads identity models/gemma-3-270m-exits/exit_heads.safetensors --out runs/verified/agreement.json
        (the card, models/gemma-3-270m-exits/README.md, gives the commands behind its tables)
    taskset -c 0 .venv/bin/python -m bench.draft_agreement timing \\
        --plan models/gemma-3-270m-exits/partition_plan.json --splits 15,16,17 --out runs/verified/timing.json
    .venv/bin/python -m bench.draft_agreement bound --agreement runs/verified/agreement.json \\
        --timing runs/verified/timing.json --rtt-ms 20 --out runs/verified/bound.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)
LOOKUP_BELOW = (0.2, 0.3, 0.5, 0.7)  # edge_runtime.verified.lookup where the exit's confidence is below


# ------------------------------------------------------------------------------------------------
# agreement
# ------------------------------------------------------------------------------------------------


def _states(model, records, layers):
    """Per continuation: ({layer: RMS-normalised hidden [n, D]}, full model's argmax [n], the context's token set
    per position, the runtime's prompt lookup at each position or None) at the positions that predict a new token
    (teacher-forced over the model's own continuation)."""
    from edge_runtime.verified import lookup
    from plugin.model.decoder import rms_normalize
    from plugin.training.exit_heads import layer_states

    out = []
    n_layers = model.cfg.num_layers
    with torch.inference_mode():
        for r in records:
            ids = r.ids
            first, last = len(r.prompt_ids) - 1, len(ids) - 1  # predictions of ids[first + 1 .. last]
            if last <= first:
                continue
            hidden = layer_states(model, torch.tensor([ids]), tuple(layers) + (n_layers,))
            final = model.final_norm(hidden.pop(n_layers)[0, first:last]).float()
            top = model.lm_head(final.to(model.dtype)).float().argmax(-1)
            states = {e: rms_normalize(hidden[e][0, first:last].float()) for e in layers}
            context = [torch.tensor(sorted(set(ids[:first + 1 + j]))) for j in range(last - first)]
            out.append((states, top, context, [lookup(ids[:first + 1 + j]) for j in range(last - first)]))
    return out


def simulate_rounds(bits: list[np.ndarray], gamma: int) -> dict[str, float]:
    """Greedy verified mode over sequences of kept (1) / not kept (0) guesses: each round sends g + 1 guesses,
    keeps them while they hold, and adds the correction where one fails."""
    rounds = tokens = all_kept = 0
    for b in bits:
        i = 0
        while i < len(b):
            window = b[i:i + gamma + 1]
            k = int(np.argmin(window)) if not window.all() else len(window)
            got = k + 1 if k < len(window) else len(window)
            rounds += 1
            tokens += got
            all_kept += k == len(window)
            i += got
    return {"tokens_per_round": tokens / rounds, "all_kept": all_kept / rounds, "rounds": rounds,
            "rows_per_token": (gamma + 1) * rounds / tokens}


def agreement(args) -> dict:
    from safetensors.torch import load_file

    from plugin.model.checkpoint import load_model
    from plugin.model.decoder import exit_decision
    from plugin.model.files import SHORTLIST_IDS
    from plugin.split.plan import PartitionPlan
    from plugin.training import continuations as cont
    from plugin.training.exit_heads import ExitHeads

    torch.set_num_threads(args.threads)
    plan = PartitionPlan.load(args.plan)
    layers = tuple(int(x) for x in args.layers.split(","))
    model = load_model(plan.checkpoint).eval()
    records = cont.load(args.continuations)
    t0 = time.time()
    data = _states(model, records, layers)
    top = torch.cat([d[1] for d in data])
    out = {"continuations": str(args.continuations), "sequences": len(data), "scored_tokens": int(len(top)),
           "states_s": round(time.time() - t0, 1), "heads": {}, "coverage": {}}
    shortlists = {}
    for spec in args.heads:
        if spec == "identity":
            continue
        shortlists[spec] = load_file(spec)[SHORTLIST_IDS]
    if args.counts:  # the training positions' argmax counts: shortlists of other sizes
        from plugin.training.exit_cache import top_tokens

        counts = torch.bincount(torch.from_numpy(np.load(Path(args.counts) / "top.npy")).long(),
                                minlength=model.cfg.vocab_size)
        for s in (4096, 8192, 16384, 32768):
            ids = top_tokens(counts, s)
            out["coverage"][f"train-cache top {s}"] = float(torch.isin(top, ids).float().mean())
            shortlists.setdefault(f"counts:{s}", ids)
    for name, ids in shortlists.items():
        out["coverage"][name] = float(torch.isin(top, ids).float().mean())
        inside = [bool(torch.isin(t[j], ids) or torch.isin(t[j], ctx[j])) for _, t, c, _ in data
                  for j, ctx in ((j, c) for j in range(len(t)))]
        out["coverage"][name + " + context tokens"] = float(np.mean(inside))
    for spec in args.heads:
        runs = [(spec, shortlists[spec])] if spec != "identity" else [
            (f"identity ({len(ids)} rows, {name})", ids) for name, ids in shortlists.items()]
        for label, ids in runs:
            tensors = load_file(spec) if spec != "identity" else {}
            rank = next((v.shape[0] for k, v in tensors.items() if k.endswith(".down.weight")), 1)
            heads = ExitHeads(model, layers, rank, shortlist=ids, normalize_input=True).eval()
            heads.load_adapters(tensors)
            trained = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("exit.")} & set(layers))
            per_layer = {}
            for e in layers:
                confs, agree, bits, aug, looked = [], [], [], [], {}
                with torch.inference_mode():
                    for states, t, context, looked_up in data:
                        conf, token = exit_decision(heads.logits(states[e], e), heads.token_ids)
                        ok = (token == t)
                        confs.append(conf)
                        agree.append(ok)
                        for below in LOOKUP_BELOW:  # the runtime's prompt lookup where the exit is less sure
                            looked.setdefault(below, []).extend(
                                int(found if c < below and found is not None else d) == int(want)
                                for c, d, want, found in zip(conf.tolist(), token.tolist(), t.tolist(), looked_up))
                        bits.append(ok.numpy().astype(np.int8))
                        # the shortlist plus the tokens already in the context, argmax over both (no "other")
                        normed = heads._norm(heads.adapters[str(e)](states[e]))
                        short = heads._head(normed)  # [n, S]
                        s_best, s_idx = short.max(-1)
                        for j, ctx in enumerate(context):
                            c_logits = model.lm_head.weight[ctx] @ normed[j]
                            c_best = int(c_logits.argmax())
                            best = int(ctx[c_best]) if c_logits[c_best] > s_best[j] else int(heads.token_ids[s_idx[j]])
                            aug.append(best == int(t[j]))
                conf, ok = torch.cat(confs), torch.cat(agree).float()
                row = {"trained": e in trained, "agreement": float(ok.mean()),
                       "agreement_shortlist_plus_context": float(np.mean(aug)),
                       "agreement_with_lookup_below": {str(b): float(np.mean(v)) for b, v in looked.items()},
                       "by_threshold": {str(t): {"share": float((conf >= t).float().mean()),
                                                 "agreement": float(ok[conf >= t].mean()) if (conf >= t).any()
                                                 else None} for t in THRESHOLDS},
                       "below_0.5_agreement": float(ok[conf < 0.5].mean()) if (conf < 0.5).any() else None,
                       "rounds": {str(g): simulate_rounds(bits, g) for g in range(0, args.max_gamma + 1)}}
                per_layer[str(e)] = row
                print(f"{label} exit {e}{' (trained)' if e in trained else ''}: agreement {row['agreement']:.1%}, "
                      f"shortlist + context tokens {row['agreement_shortlist_plus_context']:.1%}, with lookups below "
                      f"0.5 {row['agreement_with_lookup_below']['0.5']:.1%}",
                      file=sys.stderr)
            out["heads"][label] = per_layer
    return out


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------


def _median_ms(samples):
    return round(1000 * statistics.median(samples), 3)


def stream_gbps(mib: int = 1024, repeats: int = 5) -> float:
    """One core's read bandwidth: the best of `repeats` sums over a float32 array of `mib` MiB."""
    x = torch.ones(mib * 2 ** 20 // 4)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def timing(args) -> dict:
    from plugin.model.checkpoint import load_model
    from plugin.model.decoder import exit_decision
    from plugin.protocol.tensors import TOP_K
    from plugin.split.plan import PartitionPlan

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    plan = PartitionPlan.load(args.plan)
    model = load_model(plan.checkpoint).eval()
    cfg, n = model.cfg, model.cfg.num_layers
    splits = [int(s) for s in args.splits.split(",")]
    rows = [int(r) for r in args.rows.split(",")]
    shortlists = [int(s) for s in args.shortlists.split(",")]
    ctx = args.context
    seq = model.new_sequence(0, n)
    ids = torch.randint(0, cfg.vocab_size, (1, ctx + max(rows)))
    with torch.inference_mode():
        pos = torch.arange(ctx)[None]
        model.run_layers(model.embed_tokens(ids[:, :ctx], pos), pos, 0, n, [seq])
    mark = seq.mark()
    heads = {s: (model.lm_head.weight.detach()[:s].clone(), torch.nn.Linear(cfg.hidden_size, 1)) for s in shortlists}
    hidden_rows = {}

    @torch.inference_mode()
    def layers(first: int, last: int, r: int) -> torch.Tensor:
        seq.rewind(mark)
        p = torch.arange(ctx, ctx + r)[None]
        h = hidden_rows[r] if first else model.embed_tokens(ids[:, ctx:ctx + r], p)
        if first:  # the cloud's KV of layers [first, N) covers the context; rows [ctx, ctx + r) are new
            return model.run_layers(h, p, first, last, [seq])
        return model.run_layers(h, p, 0, last, [seq])

    @torch.inference_mode()
    def shortlist_head(h: torch.Tensor, s: int):
        rows_, other = heads[s]
        normed = model.final_norm(h)
        logits = torch.cat([normed @ rows_.T, other(normed)], -1)
        return exit_decision(logits, torch.arange(s))

    @torch.inference_mode()
    def full_head(h: torch.Tensor):
        logprobs = torch.log_softmax(model.lm_head(model.final_norm(h)).float(), -1)
        return logprobs.topk(TOP_K, -1)

    with torch.inference_mode():
        for r in rows:
            seq.rewind(mark)
            p = torch.arange(ctx, ctx + r)[None]
            hidden_rows[r] = model.embed_tokens(ids[:, ctx:ctx + r], p)  # a stand-in row at the split: same cost

    paths = {}
    for k in splits:
        for s in shortlists:
            paths[f"edge_{k}_shortlist_{s}"] = lambda k=k, s=s: shortlist_head(layers(0, k, 1)[0, -1], s)
        paths[f"edge_{k}_layers"] = lambda k=k: layers(0, k, 1)
        for r in rows:
            paths[f"cloud_{k}_rows_{r}"] = lambda k=k, r=r: full_head(layers(k, n, r)[0])
    for s in shortlists:
        row = torch.randn(cfg.hidden_size)
        paths[f"shortlist_{s}"] = lambda s=s, row=row: shortlist_head(row, s)
    paths["whole_model_1_row"] = lambda: full_head(layers(0, n, 1)[0])
    for r in rows:
        paths[f"full_head_rows_{r}"] = lambda r=r: full_head(torch.randn(r, cfg.hidden_size))
    for run in paths.values():
        run()
    samples = {name: [] for name in paths}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, run in paths.items():
            t0 = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - t0)
    ms = {name: _median_ms(s) for name, s in samples.items()}
    gbps = stream_gbps()
    layer_bytes = sum(p.numel() * p.element_size() for p in next(iter(model.layers.values())).parameters())
    floors = {}
    for k in splits:
        for s in shortlists:
            nbytes = k * layer_bytes + s * cfg.hidden_size * 4
            floors[f"edge_{k}_shortlist_{s}"] = {"bytes": nbytes, "floor_ms": round(1000 * nbytes / (gbps * 1e9), 2)}
    return {"plan": str(args.plan), "threads": args.threads, "context": ctx, "repeats": args.repeats,
            "load_average_before": load_before, "load_average_after": os.getloadavg()[0], "ms": ms,
            "stream_gbps": round(gbps, 2), "layer_bytes": layer_bytes, "floors": floors}


# ------------------------------------------------------------------------------------------------
# bound
# ------------------------------------------------------------------------------------------------


def bound(args) -> dict:
    agree = json.loads(Path(args.agreement).read_text())
    tm = json.loads(Path(args.timing).read_text())
    ms = tm["ms"]
    rtt = args.rtt_ms
    cloud_only = rtt + ms["whole_model_1_row"]
    out = {"rtt_ms": rtt, "cloud_only_ms": round(cloud_only, 1), "shortlist": args.shortlist, "rows": {}}
    for head_label, per_layer in agree["heads"].items():
        if args.head and args.head not in head_label:
            continue
        for layer, row in per_layer.items():
            edge = ms.get(f"edge_{layer}_shortlist_{args.shortlist}")
            if edge is None:
                continue
            table = []
            for g_text, sim in row["rounds"].items():
                g = int(g_text)
                cloud = ms.get(f"cloud_{layer}_rows_{g + 1}")
                if cloud is None:
                    continue
                tokens, p_all = sim["tokens_per_round"], sim["all_kept"]
                flight = rtt + cloud
                issue = max(edge, flight / tokens)
                pipelined = (p_all * max((g + 1) * edge, flight) + (1 - p_all) * (flight + (g + 1) * edge)) / tokens
                table.append({"gamma": g, "tokens_per_round": round(tokens, 3), "rows_per_token":
                              round(sim["rows_per_token"], 3), "cloud_ms": cloud,
                              "issue_bound_ms": round(issue, 1), "issue_bound_x": round(issue / cloud_only, 3),
                              "pipelined_ms": round(pipelined, 1), "pipelined_x": round(pipelined / cloud_only, 3)})
            best = min(table, key=lambda t: t["pipelined_ms"])
            capped = [t for t in table if t["rows_per_token"] <= 1.3] or table[:1]
            best_capped = min(capped, key=lambda t: t["pipelined_ms"])
            out["rows"][f"{head_label} | exit {layer}"] = {
                "split": int(layer), "agreement": row["agreement"], "edge_ms": edge,
                "edge_floor_ms": tm["floors"].get(f"edge_{layer}_shortlist_{args.shortlist}", {}).get("floor_ms"),
                "best": best, "best_rows_le_1.3": best_capped, "by_gamma": table}
            print(f"{head_label} exit {layer}: agreement {row['agreement']:.1%}, edge {edge:.1f} ms; best gamma "
                  f"{best['gamma']}: {best['tokens_per_round']:.2f} tokens/round, pipelined "
                  f"{best['pipelined_ms']:.1f} ms ({best['pipelined_x']:.2f}x), issue bound "
                  f"{best['issue_bound_ms']:.1f} ms ({best['issue_bound_x']:.2f}x); "
                  f"rows <= 1.3: gamma {best_capped['gamma']} {best_capped['pipelined_x']:.2f}x",
                  file=sys.stderr)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.draft_agreement", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    a = sub.add_parser("agreement")
    a.add_argument("--plan", required=True)
    a.add_argument("--continuations", required=True)
    a.add_argument("--layers", default="15,16,17")
    a.add_argument("--heads", nargs="+", default=["identity"],
                   help="'identity' and/or heads files (safetensors with shortlist.token_ids)")
    a.add_argument("--counts", default=None, metavar="CACHE_DIR",
                   help="an exit cache whose top.npy gives shortlists of other sizes (coverage, identity heads)")
    a.add_argument("--max-gamma", type=int, default=8)
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--out", required=True)
    t = sub.add_parser("timing")
    t.add_argument("--plan", required=True)
    t.add_argument("--splits", default="15,16,17")
    t.add_argument("--rows", default="1,2,3,4,5,6,7,8,9")
    t.add_argument("--shortlists", default="16384,32768")
    t.add_argument("--context", type=int, default=128)
    t.add_argument("--repeats", type=int, default=9)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--out", required=True)
    b = sub.add_parser("bound")
    b.add_argument("--agreement", required=True)
    b.add_argument("--timing", required=True)
    b.add_argument("--rtt-ms", type=float, default=20.0)
    b.add_argument("--shortlist", type=int, default=16384)
    b.add_argument("--head", default=None, help="only heads whose label contains this")
    b.add_argument("--out", required=True)
    args = p.parse_args(argv)
    result = {"agreement": agreement, "timing": timing, "bound": bound}[args.part](args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.part == "timing":
        print(json.dumps({k: v for k, v in result.items() if k != "floors"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
