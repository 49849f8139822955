"""Many edge clients through the nginx front: 1 replica against 2 (`python -m bench.replicas`).

The demo model's collaborative sessions (threshold 0.8, fp16) are recorded once in-process; N
concurrent clients then replay them (bench/run.py's replay: the edge's compute between tokens is
slept, since it runs on the device) through a link emulator (20 ms RTT by default) into an nginx
front over one replica, and into a front over two, alternating, several rounds. Reported per client
count: tokens/s and p50/p99 time per token (medians over rounds), the replicas' busy time, and how
the sessions spread over the replicas.

Both replicas run on this machine: on the 2-core development machine they share the same 2 cores,
so a second replica adds no compute and the ratio shows what routing and a second set of model
processes cost or gain there, not what a second GPU node adds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from bench.args import DEFAULT_OUT, DEFAULT_PLAN, write_json
from bench.link_emulator import LinkEmulator
from bench.clients import clients_sweep, record_trace, replay_session
from bench.measures import busy_delta, server_busy_ns
from bench.systems import CE_MODELS, LinkSpec, load_prompts, SequenceIds, System
from edge_runtime.runners import load_runner
from edge_runtime.triton_link import TritonLink
from plugin.serving.fleet import Fleet
from plugin.serving.front import FrontConfig, NginxFront
from plugin.serving.repository import ServeOptions, write_repository
from plugin.serving.server import free_ports
from plugin.split.edge import EdgePartition
from plugin.split.limits import Limits
from plugin.split.plan import PartitionPlan

UNLIMITED = dict(rate_per_client=100_000, burst_per_client=100_000)  # every bench client is 127.0.0.1


def record_traces(plan: PartitionPlan, prompts: list[list[int]], tokens: int, url: str, new_id) -> list:
    """One collaborative session per prompt against one replica, the edge on 1 torch thread as in
    `ce-collm bench` (the edge time between requests is what the replay sleeps)."""
    torch.set_num_threads(1)
    edge = EdgePartition(load_runner("torch", plan), plan)
    system = System("collaborative", plan.threshold, plan.codec)
    link = TritonLink(url)
    record_trace(system, edge, link, prompts[0], tokens, new_id())  # warm-up: a cold layer loop would be replayed
    traces = [record_trace(system, edge, link, p, tokens, new_id()) for p in prompts]
    link.close()
    return traces


def warm_up(fleet: Fleet, traces: list, new_id) -> None:
    """Every trace once on every replica, straight (lazy initialisation, allocator, first batches)."""
    for replica in fleet.replicas:
        links: dict = {}
        for trace in traces:
            replay_session(trace, replica.grpc_url, new_id(), links)
        for link in links.values():
            link.close()


def measure(fronts: dict[int, NginxFront], fleet: Fleet, traces: list, clients: Sequence[int], rounds: int,
            sessions_per_client: int, link: LinkSpec, new_id) -> list[dict]:
    """Every (replicas, clients) cell `rounds` times, the two fronts alternating within each round."""
    raw: dict[tuple[int, int], list[dict]] = {}
    for r in range(rounds):
        for n in clients:
            for replicas in (sorted(fronts) if r % 2 == 0 else sorted(fronts, reverse=True)):
                front = fronts[replicas]
                before = [server_busy_ns(s.http_url) for s in fleet.replicas]
                routed = len(front.access_log())
                with LinkEmulator("127.0.0.1", int(front.url.rsplit(":", 1)[1]), delay_ms=link.delay_ms,
                                  bandwidth_mbit=link.bandwidth_mbit) as em:
                    [row] = clients_sweep({"ce": traces}, em.address, fleet.replicas[0].http_url, [n],
                                          sessions_per_client, new_id, {"ce": CE_MODELS})
                after = [server_busy_ns(s.http_url) for s in fleet.replicas]
                busy = [busy_delta(b, a, CE_MODELS)["busy_s"] for b, a in zip(before, after)]
                served = [rec["upstream"] for rec in front.access_log()[routed:]]
                raw.setdefault((replicas, n), []).append({
                    "throughput_tok_s": row["throughput_tok_s"], "p50_ms": row["p50_ms"], "p99_ms": row["p99_ms"],
                    "wall_s": row["wall_s"], "tokens": row["tokens"], "busy_s": busy,
                    "requests_per_replica": [served.count(s.grpc_url) for s in fleet.replicas]})
                print(f"bench.replicas: round {r + 1}/{rounds}, {n} clients, {replicas} replica(s): "
                      f"{row['throughput_tok_s']:.0f} tok/s, p99 {row['p99_ms']:.1f} ms", file=sys.stderr, flush=True)
    rows = []
    for (replicas, n), runs in sorted(raw.items()):
        med = lambda key: statistics.median(run[key] for run in runs)  # noqa: E731
        rows.append({"replicas": replicas, "clients": n, "throughput_tok_s": med("throughput_tok_s"),
                     "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"), "rounds": runs})
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    by = {(r["replicas"], r["clients"]): r for r in rows}
    return [{"clients": n, "throughput_ratio": by[(2, n)]["throughput_tok_s"] / by[(1, n)]["throughput_tok_s"],
             "p99_ratio": by[(2, n)]["p99_ms"] / by[(1, n)]["p99_ms"]}
            for (replicas, n) in sorted(by) if replicas == 1 and (2, n) in by]


def markdown(rows: list[dict], cmp: list[dict]) -> str:
    """One line per client count: medians over rounds (min-max in brackets), 2 replicas against 1."""
    by = {(r["replicas"], r["clients"]): r for r in rows}

    def cell(row: dict, key: str) -> str:
        values = [run[key] for run in row["rounds"]]
        return f"{row[key]:.0f} ({min(values):.0f}-{max(values):.0f})"

    out = ["| clients | tokens/s, 1 replica | tokens/s, 2 replicas | ratio | p99 ms, 1 replica | p99 ms, 2 replicas "
           "| ratio | requests per replica, 2 replicas (last round) |",
           "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for c in cmp:
        one, two = by[(1, c["clients"])], by[(2, c["clients"])]
        out.append(f"| {c['clients']} | {cell(one, 'throughput_tok_s')} | {cell(two, 'throughput_tok_s')} | "
                   f"{c['throughput_ratio']:.2f}x | {cell(one, 'p99_ms')} | {cell(two, 'p99_ms')} | {c['p99_ratio']:.2f}x | "
                   f"{' / '.join(map(str, two['rounds'][-1]['requests_per_replica']))} |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", type=Path, default=DEFAULT_PLAN, metavar="FILE", help="(default: %(default)s)")
    p.add_argument("--clients", default="8,16,32,64", metavar="N,N", help="concurrent clients (default: %(default)s)")
    p.add_argument("--sessions-per-client", type=int, default=2, metavar="N", help="(default: %(default)s)")
    p.add_argument("--tokens", type=int, default=16, metavar="N", help="tokens per session (default: %(default)s)")
    p.add_argument("--prompts", type=int, default=8, metavar="N", help="held-out prompts replayed (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, metavar="N", help="repetitions of every cell (default: %(default)s)")
    p.add_argument("--link", default="20/100", metavar="RTT_MS/MBIT", help="edge link (default: %(default)s)")
    p.add_argument("--server-threads", type=int, default=1, metavar="N",
                   help="OMP/MKL threads of each python-backend model process (default: %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT / "replicas.json", metavar="FILE",
                   help="figures as JSON (default: %(default)s)")
    args = p.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    link = LinkSpec.parse(args.link)
    plan = PartitionPlan.load(args.plan)
    prompts, _, _ = load_prompts(plan, args.prompts)
    new_id = SequenceIds()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # the model processes inherit it
        os.environ[var] = str(args.server_threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ce-collm-bench-replicas-") as tmp:
        repo = Path(tmp) / "repo"
        write_repository(plan, repo, ServeOptions(limits=Limits(max_sessions=512)))
        with Fleet(repo, 2, state_dir=Path(tmp) / "fleet", front_options=UNLIMITED, model_control_mode="explicit",
                   load_models=("ce_collm",), extra_args=["--exit-timeout-secs=5"]) as fleet:
            one = FrontConfig((fleet.replicas[0].grpc_url,), Path(tmp) / "front-1", listen=f"127.0.0.1:{free_ports(1)[0]}",
                              **UNLIMITED)
            with NginxFront(one) as single:
                traces = record_traces(plan, prompts, args.tokens, fleet.replicas[0].grpc_url, new_id)
                warm_up(fleet, traces, new_id)
                load_before = os.getloadavg()
                rows = measure({1: single, 2: fleet.front}, fleet, traces, clients, args.rounds,
                               args.sessions_per_client, link, new_id)
    cmp = ratios(rows)
    result = {"command": " ".join(["python -m bench.replicas", *(sys.argv[1:] if argv is None else argv)]),
              "plan": str(args.plan), "link": link.name, "tokens_per_session": args.tokens,
              "sessions_per_client": args.sessions_per_client, "cores": os.cpu_count(), "rows": rows,
              "ratios": cmp, "wall_s": time.perf_counter() - t0,
              "load_average_before_after": [load_before, os.getloadavg()]}
    write_json(args.out, result)
    print(markdown(rows, cmp))
    print(f"bench.replicas: {os.cpu_count()} cores shared by both replicas (1-min load average {load_before[0]:.1f} "
          f"before, {result['load_average_before_after'][1][0]:.1f} after); {result['wall_s']:.0f} s; -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
