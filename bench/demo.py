"""`make demo`: Gemma 3 270M (or any plan) through a real tritonserver and an emulated edge link.

Starts tritonserver on free 127.0.0.1 ports with the plan's repository (model_repository/ when its
committed configs match the plan, else one generated from the plan in a temporary directory: the
source tree is never written), puts the link emulator between the edge and the server (20 ms round
trip and 100 Mbit/s unless told otherwise), runs each held-out prompt in collaborative (streamed, with
live exit fidelity), verified, standalone and cloud-only mode, and the control (collaborative at
threshold 1.0: no exit taken, cloud-only's tokens, so it shows what the split alone costs or buys),
prints the texts and a summary table, and stops the server.

With at least 2 CPU cores, the edge runs pinned to one core and the server with its Python models to
another (--no-pin: both share every core): two devices, the edge one core and the cloud one core. The
times show the shape of a deployment (which tokens cross the link, what each crossing costs), not a
Jetson's or a GPU server's figures: the cloud here is one CPU core, not a GPU server shared by many edges.
The edge runs ONNX Runtime, the fast path, over the plan's graphs, exported into <checkpoint>/onnx/<plan> on the first
run (Gemma 3 270M: about 40 s and 1.8 GB). The toy model: --plan models/shakespeare-llama/partition_plan.json
--rtt-ms 0.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.cores import pinned, Pinning
from bench.link_emulator import LinkEmulator
from bench.run import exported_graphs, limit_server_threads
from bench.systems import heldout_texts
from edge_runtime.app import EdgeApp, load_plan, ModelMissing
from edge_runtime.generation import Generation, total_stats
from edge_runtime.display import summary_table, TokenPrinter
from edge_runtime.parts import SessionOptions
from edge_runtime.triton_link import TritonLink
from plugin.export.manifest import default_onnx_dir
from plugin.paths import GEMMA_PLAN, MODEL_REPOSITORY
from plugin.serving.repository import check_repository, write_repository
from plugin.serving.server import TritonServer
from plugin.split.plan import PartitionPlan


CONTROL = "control: collaborative @1.0"  # no exit ever taken: cloud-only's tokens through the split
VERIFIED_PLAN = "verified_plan.json"  # beside a plan: the one verified mode drafts with


def _merge(gens: list[Generation]) -> Generation:
    """Sum of several runs of one mode, for the summary table."""
    total = Generation([], stats=total_stats(g.stats for g in gens))
    for g in gens:
        total.token_ids += g.token_ids
        total.records += g.records
    return total


def _agreement(runs: list[Generation], reference: list[Generation]) -> tuple[int, int]:
    """Positions where each run chose the reference run's token, and positions compared."""
    agree = sum(a == b for g, c in zip(runs, reference) for a, b in zip(g.token_ids, c.token_ids))
    return agree, sum(min(len(g.token_ids), len(c.token_ids)) for g, c in zip(runs, reference))


def repository_for(plan: PartitionPlan, plan_path: Path, scratch_dir: Path) -> Path:
    """model_repository/ when its committed configs match the plan; else the plan's repository generated
    into scratch_dir (the source tree is never written)."""
    stale = check_repository(plan, MODEL_REPOSITORY)
    if not stale:
        return MODEL_REPOSITORY
    repo = scratch_dir / "model_repository"
    write_repository(plan, repo)
    print(f"serving {plan_path} from configs generated into {repo} (model_repository/ holds another plan's)")
    return repo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", type=Path, default=GEMMA_PLAN, help="partition plan (default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=3, help="held-out prompts to run (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="(default: %(default)s)")
    parser.add_argument("--rtt-ms", type=float, default=20.0,
                        help="round trip the link emulator adds between edge and server; 0: loopback (default: %(default)s)")
    parser.add_argument("--bandwidth-mbit", type=float, default=100.0, help="link bandwidth (default: %(default)s)")
    parser.add_argument("--edge-threads", type=int, default=1, help="ONNX Runtime threads of the edge (default: %(default)s)")
    parser.add_argument("--server-threads", type=int, default=1,
                        help="torch threads of each of the server's Python models (default: %(default)s)")
    parser.add_argument("--verified-plan", type=Path,
                        help="the plan verified mode drafts with: the same checkpoint, split at or after --plan's "
                             "(default: verified_plan.json beside --plan when there is one, else --plan)")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin the edge and the server to separate CPU cores: both share every core")
    args = parser.parse_args(argv)
    limit_server_threads(args.server_threads)
    with pinned(not args.no_pin) as pinning:
        verified_plan = args.verified_plan or _beside(args.plan, VERIFIED_PLAN)
        try:
            app, verifier = (_onnx_app(path, args.edge_threads) for path in (args.plan, verified_plan))
        except ModelMissing as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory(prefix="ce-collm-demo-") as scratch:
            return _run(app, verifier, repository_for(app.plan, args.plan, Path(scratch)), args, pinning)


def _beside(plan: Path, name: str) -> Path:
    """`name` in the folder of `plan` when there is one, else `plan`."""
    other = plan.parent / name
    return other if other.is_file() else plan


def _onnx_app(plan_path: Path, threads: int) -> EdgeApp:
    """The edge on ONNX Runtime, the fast path; the plan's graphs exported on the first run."""
    plan = load_plan(plan_path)
    return EdgeApp.load(plan_path, "onnx", onnx_dir=exported_graphs(plan, default_onnx_dir(plan)), threads=threads)


def _run(app: EdgeApp, verifier: EdgeApp, repository: Path, args: argparse.Namespace, pinning: Pinning | None) -> int:
    print(f"starting tritonserver on {repository} ...", flush=True)
    t0 = time.perf_counter()
    runs: dict[str, list[Generation]] = {"collaborative": [], CONTROL: [], "verified": [], "standalone": [],
                                         "cloud-only": []}
    server = TritonServer(repository, cpus=pinning.server_cpus if pinning else None)
    with server, LinkEmulator("127.0.0.1", server.grpc_port, delay_ms=args.rtt_ms / 2,
                              bandwidth_mbit=args.bandwidth_mbit) as link:
        print(f"server ready in {time.perf_counter() - t0:.1f} s at grpc {server.grpc_url}; the edge reaches it "
              f"through {link.address} ({args.rtt_ms:g} ms round trip, {args.bandwidth_mbit:g} Mbit/s)\n")
        edge_link, cloud_link = TritonLink(link.address), TritonLink(link.address, "cloud_only")
        for i, prompt in enumerate(heldout_texts(app.plan)[:args.prompts], start=1):
            ids = app.encode(prompt)
            printer = TokenPrinter(app.tokenizer, app.plan.exit_layers)
            if i == 1 and printer.legend():
                print(printer.legend() + "\n")
            print(f"--- prompt {i}, collaborative (threshold {app.plan.threshold}) ---\n{prompt}", end="")
            session = app.session("collaborative", edge_link, SessionOptions(async_uploads=True, fidelity=True))
            records = []
            for record in session.stream(ids, args.max_new_tokens):
                printer.add(record)
                records.append(record)
            runs["collaborative"].append(Generation(ids, [r.token_id for r in records], records, session.stats))
            control = app.session("collaborative", edge_link, SessionOptions(threshold=1.0, async_uploads=True))
            runs[CONTROL].append(control.generate(ids, args.max_new_tokens))
            runs["verified"].append(verifier.session("verified", edge_link).generate(ids, args.max_new_tokens))
            runs["standalone"].append(app.session("standalone").generate(ids, args.max_new_tokens))
            runs["cloud-only"].append(app.session("cloud-only", cloud_link).generate(ids, args.max_new_tokens))
            for mode in (CONTROL, "verified", "standalone", "cloud-only"):
                text = app.tokenizer.decode(runs[mode][-1].token_ids, skip_special_tokens=True)
                print(f"\n--- {mode} ---\n{prompt}{text}")
            print()
    merged = dict((mode, _merge(gens)) for mode, gens in runs.items())
    print(summary_table(list(merged.items()), baseline="cloud-only"))
    for mode in ("collaborative", CONTROL, "verified"):
        agree, total = _agreement(runs[mode], runs["cloud-only"])
        print(f"{mode} agrees with cloud-only on {agree}/{total} tokens ({agree / max(1, total):.1%})")
    verified = merged["verified"]
    summary = verified.stats.verified_summary(len(verified.token_ids))
    vp = verifier.plan
    print(f"verified (split {vp.split_layer}, exit {list(vp.exit_layers)}, threshold {vp.threshold}): "
          f"{summary['acceptance_rate']:.0%} of drafts kept, {summary['tokens_per_round_trip']:.2f} tokens per round "
          f"trip, gamma {summary['gamma']:.1f}")
    sides = (pinning.note() if pinning else f"both sides shared this machine's {os.cpu_count()} CPU cores (--no-pin or "
             "a single core), each slowing the other")
    print(f"\nBehind a {args.rtt_ms:g} ms link, {sides} (edge: ONNX Runtime, {args.edge_threads} thread(s); server: "
          f"{args.server_threads} per Python model). On a deployment the cloud is a GPU server and the edge a Jetson; "
          "`make bench` measures more prompts, longer generations and other links.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
