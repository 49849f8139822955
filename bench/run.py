"""`ce-collm bench`: CE-CoLLM against its baselines, side by side, on one server, in one run.

On a fixed prompt set from the held-out corpus, with one tritonserver (started here on free
127.0.0.1 ports, on a repository generated from the partition plan plus the bench-only
`naive_split` model) and a user-space link emulator between the edge and the server:

  systems   cloud-only (token ids to the whole model), naive split (whole context's layer-k rows
            with every token, server recomputes from scratch), standalone edge, and CE-CoLLM
            collaborative at each threshold x codec
  links     e.g. 0 ms / 1 Gbit, 20 ms RTT / 100 Mbit, 60 ms RTT / 20 Mbit
  clients   N concurrent edge sessions replayed against the server (CE-CoLLM and cloud-only)

Writes results.json, report.md and PNG plots to --out (default bench/results/), raw per-token data
to --out/raw/ (git-ignored). Every generation is greedy and exactly --max-new-tokens long (no
stop at EOS), so all systems decode the same number of tokens. With at least 2 CPU cores, the edge (this
process) runs on one core and the server with its Python-backend stubs on another (--no-pin: both share
every core): two devices, the edge one core and the cloud one core; not a GPU server shared by many edges.
"""
from __future__ import annotations
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from bench.args import DEFAULT_LINKS, DEFAULT_OUT, DEFAULT_PLAN, REPO_ROOT, add_arguments  # noqa: F401 (re-exported)
from bench.clients import capacities, capacity, clients_sweep, record_trace, traces_summary
from bench.cores import pinned, Pinning
from bench.link_emulator import LinkEmulator
from bench.measures import (add_comparisons, busy_delta, evaluate_targets, evaluate_verified_targets, Scorer,
                            server_busy_ns, summarize_run)
from bench.naive_split import write_bench_repository
from bench.systems import (CE_MODELS, Edges, LinkSpec, load_prompts, NAIVE_SPLIT, open_links, SequenceIds, System,
                           systems_for, timed_generation)
from edge_runtime.runners import exported, load_runner
from edge_runtime.triton_link import TritonLink
from plugin.export.onnx import export_plan
from plugin.model.checkpoint import load_model, read_config
from plugin.serving.repository import ServeOptions
from plugin.serving.server import TritonServer
from plugin.split.edge import EdgePartition
from plugin.split.limits import Limits
from plugin.split.plan import PartitionPlan


@dataclass
class BenchConfig:
    plan: PartitionPlan
    prompts: list[list[int]]  # token ids, fixed set
    prompt_texts: list[str] | None = None
    max_new_tokens: int = 96  # a short reply; the naive split's bytes grow with it, collaborative's do not
    thresholds: tuple[float, ...] = (0.8, 0.9, 1.0)
    codecs: tuple[str, ...] = ("fp16", "int8")
    verified_thresholds: tuple[float, ...] = ()  # verified mode, drafting at each exit threshold (first codec)
    max_gamma: int = 8  # verified mode: drafts per request at most
    links: tuple[LinkSpec, ...] = tuple(LinkSpec.parse(s) for s in DEFAULT_LINKS.split(","))
    clients: tuple[int, ...] = (1, 4, 16, 32)
    client_tokens: int = 16  # tokens per session in the many-clients sweep
    long_tokens: int = 256  # bytes up of naive split vs collaborative on longer generations (0: skip)
    sessions_per_client: int = 2
    clients_link: LinkSpec | None = None  # default: the link whose RTT is closest to 20 ms, no bandwidth cap
    p99_slo_ms: float | None = None  # default: 2 x the worst single-client p99 of the two systems
    out: Path = DEFAULT_OUT
    edge_threads: int = 1
    edge_runner: str = "onnx"  # onnx (graphs exported into out/raw/onnx) or torch
    verified_plan: PartitionPlan | None = None  # the verified systems' plan (default: plan), split >= plan's
    verified_time_targets: tuple[tuple[float, float], ...] = ()  # (RTT ms, time per token over cloud-only's)
    server_threads: int | None = 1  # OMP/MKL threads of each python-backend process (None: torch's default)
    pin: bool = True  # the edge and its own server on separate CPU cores (bench/cores.py), with at least 2
    serve_options: ServeOptions = ServeOptions(limits=Limits(max_sessions=512))
    tokenizer: object | None = None  # tokenizers.Tokenizer, for sample texts in the report
    progress: bool = True
    command: str = ""


# -- the whole run ----------------------------------------------------------------------------------
def _progress(total: int, enabled: bool, desc: str, unit: str = "run"):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a pinned dependency; keep working without it anyway
        tqdm = None
    if tqdm is None or not enabled:
        class _Null:
            def update(self, n=1): pass
            def set_postfix_str(self, s): pass
            def close(self): pass
        return _Null()
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)


def bench_edge(plan: PartitionPlan, runner: str, onnx_dir: Path, threads: int) -> EdgePartition:
    """The edge as a device runs it: ONNX Runtime over fp32 graphs exported into onnx_dir (kept while
    the plan and weights are unchanged), or the PyTorch layer loop."""
    if runner == "onnx":
        exported_graphs(plan, onnx_dir)
    return EdgePartition(load_runner(runner, plan, onnx_dir=onnx_dir, threads=threads), plan)


def exported_graphs(plan: PartitionPlan, onnx_dir: Path) -> Path:
    """onnx_dir, holding the plan's fp32 graphs: exported unless they are there for this plan and these weights
    (Gemma 3 270M: about 40 s and 1.8 GB, once)."""
    if not exported(plan, onnx_dir):
        print(f"exporting the edge's ONNX graphs into {onnx_dir} (once for this plan and these weights) ...",
              file=sys.stderr, flush=True)
        export_plan(plan, onnx_dir, ("fp32",))
    return onnx_dir


def _warm_up(systems: list[System], edges: Edges, url: str, prompt: list[int], new_id) -> None:
    """One short generation per kind of system on a direct connection (lazy state, allocator, pools)."""
    links = open_links(url)
    for system in {s.kind: s for s in systems}.values():
        timed_generation(system, edges.of(system), links, prompt, 4, new_id())
    for link in links.values():
        link.close()


def limit_server_threads(threads: int | None) -> None:
    """OMP/MKL threads of each python-backend process a server started after this call runs (the stubs
    inherit the environment): several torch processes on a few cores must not oversubscribe them.
    None keeps torch's default."""
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)


def run_benchmark(cfg: BenchConfig, server: TritonServer | None = None) -> dict:
    """Run everything; returns the results dict (also written to cfg.out/results.json with the report). With
    cfg.pin and no server given, the edge (this process) and the server it starts run on separate cores."""
    with pinned(cfg.pin and server is None) as pinning:
        return _run_benchmark(cfg, server, pinning)


def _run_benchmark(cfg: BenchConfig, server: TritonServer | None, pinning: Pinning | None) -> dict:
    t_start = time.perf_counter()
    torch.set_num_threads(cfg.edge_threads)
    out = Path(cfg.out)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    plan = cfg.plan
    edge = bench_edge(plan, cfg.edge_runner, raw / "onnx", cfg.edge_threads)
    verified = cfg.verified_plan
    edges = Edges(edge, bench_edge(verified, cfg.edge_runner, raw / "onnx-verified", cfg.edge_threads)
                  if verified is not None and verified != plan else None)
    cfg_model = read_config(plan.checkpoint)
    scorer = Scorer(load_model(plan.checkpoint))
    standalone_t = 0.8 if 0.8 in cfg.thresholds else min(cfg.thresholds)
    systems = systems_for(cfg.thresholds, cfg.codecs, standalone_t, cfg.verified_thresholds)
    new_id = SequenceIds()

    own_server = server is None
    tmp = None
    if own_server:
        tmp = tempfile.TemporaryDirectory(prefix="ce-collm-bench-repo-")
        repo = Path(tmp.name)
        write_bench_repository(plan, repo, cfg.serve_options)
        limit_server_threads(cfg.server_threads)
        server = TritonServer(repo, log_file=raw / "tritonserver.log", extra_args=["--exit-timeout-secs=5"],
                              cpus=pinning.server_cpus if pinning else None)
        if cfg.progress:
            print(f"bench: starting tritonserver on a generated repository ({repo}) ...", file=sys.stderr, flush=True)
        server.start(timeout_s=300)
    assert server is not None
    try:
        url = server.grpc_url
        _warm_up(systems, edges, url, cfg.prompts[0], new_id)
        rows, runs = [], {}
        bar = _progress(len(cfg.links) * len(cfg.prompts) * len(systems), cfg.progress, "bench generations", "gen")
        for link_spec in cfg.links:
            with LinkEmulator("127.0.0.1", server.grpc_port, delay_ms=link_spec.delay_ms, jitter_ms=link_spec.jitter_ms,
                              bandwidth_mbit=link_spec.bandwidth_mbit, seed=0) as link:
                clients = open_links(link.address)
                per_system = {s.key: {"runs": [], "busy": None, "wire": {"bytes_up": 0, "bytes_down": 0}, "wall": 0.0}
                              for s in systems}
                # Interleaved: each prompt runs every system in turn (rotating the order), so a burst of load
                # from elsewhere on the machine lands on all systems alike rather than on one system's run.
                for i, prompt in enumerate(cfg.prompts):
                    for system in systems[i % len(systems):] + systems[: i % len(systems)]:
                        bar.set_postfix_str(f"{system.key} @ {link_spec.name}")
                        acc = per_system[system.key]
                        link.reset_counters()
                        before = server_busy_ns(server.http_url)
                        t0 = time.perf_counter()
                        acc["runs"].append(timed_generation(system, edges.of(system), clients, prompt, cfg.max_new_tokens, new_id(),
                                                            cfg.max_gamma))
                        acc["wall"] += time.perf_counter() - t0
                        busy = busy_delta(before, server_busy_ns(server.http_url), system.server_models)
                        acc["busy"] = busy if acc["busy"] is None else {k: acc["busy"][k] + v for k, v in busy.items()}
                        wire = link.reset_counters()
                        acc["wire"]["bytes_up"] += wire.bytes_up
                        acc["wire"]["bytes_down"] += wire.bytes_down
                        bar.update()
                for system in systems:
                    acc = per_system[system.key]
                    runs[(system.key, link_spec.name)] = acc["runs"]
                    system_plan = edges.of(system).plan
                    rows.append(summarize_run(system, link_spec, acc["runs"], cfg_model.num_layers,
                                              system_plan.split_layer, system_plan.exit_layers, acc["busy"],
                                              acc["wire"], acc["wall"]))
                for c in clients.values():
                    c.close()
        bar.close()
        add_comparisons(rows, runs, cfg.prompts, scorer)
        _write_raw(raw / "runs.jsonl", runs)

        long_result = _run_long(cfg, edge, server, new_id, standalone_t) if cfg.long_tokens else None
        clients_result = None
        if cfg.clients:
            clients_result = _run_clients(cfg, edge, server, new_id, standalone_t)
        results = {
            "meta": _meta(cfg, server, cfg_model, time.perf_counter() - t_start, pinning),
            "links": [dict(asdict(l), name=l.name) for l in cfg.links],
            "runs": rows,
            "clients": clients_result,
            "long_context": long_result,
            "targets": evaluate_targets(rows, cfg.thresholds, cfg.codecs, long_result),
            "verified_targets": evaluate_verified_targets(rows, cfg.verified_time_targets),
            "samples": _samples(cfg, runs),
        }
    finally:
        if own_server:
            server.stop()
            if tmp is not None:
                tmp.cleanup()
    results["meta"]["wall_s"] = time.perf_counter() - t_start
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
    from bench.report import write_report

    write_report(results, out)
    return results


def _run_long(cfg: BenchConfig, edge: EdgePartition, server: TritonServer, new_id, threshold: float) -> dict:
    """Bytes up per token of naive split and collaborative over longer generations (loopback link):
    the naive split's requests grow with the context, collaborative's do not."""
    codec = "fp16" if "fp16" in cfg.codecs else cfg.codecs[0]
    systems = [System(NAIVE_SPLIT, codec=codec), System("collaborative", threshold, codec)]
    prompts = cfg.prompts[:2]
    out = {"tokens": cfg.long_tokens, "prompts": len(prompts), "rows": []}
    with LinkEmulator("127.0.0.1", server.grpc_port) as link:
        clients = open_links(link.address)
        for system in systems:
            link.reset_counters()
            prompt_runs = [timed_generation(system, edge, clients, p, cfg.long_tokens, new_id()) for p in prompts]
            wire = link.reset_counters()
            tokens = sum(len(r.tokens) for r in prompt_runs)
            out["rows"].append({"key": system.key, "tokens": tokens,
                                "bytes_up_per_token": sum(r.stats["bytes_up"] for r in prompt_runs) / tokens,
                                "wire_bytes_up_per_token": wire.bytes_up / tokens})
        for c in clients.values():
            c.close()
    naive, collab = out["rows"]
    out["ratio"] = naive["bytes_up_per_token"] / collab["bytes_up_per_token"]
    out["wire_ratio"] = naive["wire_bytes_up_per_token"] / collab["wire_bytes_up_per_token"]
    return out


def _run_clients(cfg: BenchConfig, edge: EdgePartition, server: TritonServer, new_id, threshold: float) -> dict:
    link_spec = cfg.clients_link or LinkSpec(min(cfg.links, key=lambda l: abs(l.rtt_ms - 20)).rtt_ms, None)
    codec = "fp16" if "fp16" in cfg.codecs else cfg.codecs[0]
    ce = System("collaborative", threshold, codec)
    prompts = cfg.prompts[: max(1, min(len(cfg.prompts), 8))]
    ce_link, cloud_link = TritonLink(server.grpc_url, "ce_collm"), TritonLink(server.grpc_url, "cloud_only")
    traces = {
        ce.key: [record_trace(ce, edge, ce_link, p, cfg.client_tokens, new_id()) for p in prompts],
        "cloud-only": [record_trace(System("cloud-only"), None, cloud_link, p, cfg.client_tokens, new_id())
                       for p in prompts],
    }
    ce_link.close()
    cloud_link.close()
    bar = _progress(len(traces) * len(cfg.clients), cfg.progress, "edge clients", "sweep")
    with LinkEmulator("127.0.0.1", server.grpc_port, delay_ms=link_spec.delay_ms, jitter_ms=link_spec.jitter_ms,
                      bandwidth_mbit=link_spec.bandwidth_mbit) as link:
        rows = clients_sweep(traces, link.address, server.http_url, cfg.clients, cfg.sessions_per_client, new_id,
                             {ce.key: CE_MODELS, "cloud-only": ("cloud_only",)}, on_done=bar.update)
    bar.close()
    single = [r["p99_ms"] for r in rows if r["clients"] == min(cfg.clients)]
    base = max(single) if single else float("inf")
    slo = cfg.p99_slo_ms or 2 * base
    return {"link": link_spec.name, "tokens_per_session": cfg.client_tokens,
            "sessions_per_client": cfg.sessions_per_client, "prompts": len(prompts), "rows": rows,
            "p99_slo_ms": slo, "slo_rule": "given" if cfg.p99_slo_ms else "2 x the worst single-client p99",
            "single_client_p99_ms": base, "capacity": capacity(rows, slo), "capacity_by_slo": capacities(rows, base),
            "traces": traces_summary(traces)}


def _samples(cfg: BenchConfig, runs: dict) -> list[dict]:
    """The first prompt's continuation per system at the first link (decoded when a tokenizer is there)."""
    if not cfg.links:
        return []
    link = cfg.links[0].name
    out = []
    for (key, link_name), prompt_runs in runs.items():
        if link_name != link:
            continue
        tokens = prompt_runs[0].tokens
        text = cfg.tokenizer.decode(tokens) if cfg.tokenizer is not None else None
        out.append({"key": key, "tokens": tokens, "text": text, "exits": prompt_runs[0].exits})
    return out


def _meta(cfg: BenchConfig, server: TritonServer, model_cfg, wall_s: float, pinning: Pinning | None) -> dict:
    try:
        version = server.metadata().get("version")
    except Exception:  # noqa: BLE001 - informational only
        version = None
    plan = cfg.plan
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": cfg.command,
        "checkpoint": str(plan.checkpoint.relative_to(REPO_ROOT)) if plan.checkpoint.is_relative_to(REPO_ROOT) else str(plan.checkpoint),
        "arch": model_cfg.arch, "num_layers": model_cfg.num_layers, "hidden_size": model_cfg.hidden_size,
        "vocab_size": model_cfg.vocab_size, "split_layer": plan.split_layer, "exit_layers": list(plan.exit_layers),
        "verified_plan": None if cfg.verified_plan is None else {
            "split_layer": cfg.verified_plan.split_layer, "exit_layers": list(cfg.verified_plan.exit_layers),
            "threshold": cfg.verified_plan.threshold, "exit_adapters": str(cfg.verified_plan.exit_adapters)},
        "prompts": len(cfg.prompts), "prompt_tokens": [len(p) for p in cfg.prompts],
        "max_new_tokens": cfg.max_new_tokens, "thresholds": list(cfg.thresholds), "codecs": list(cfg.codecs),
        "triton_version": version, "python": platform.python_version(), "torch": torch.__version__,
        "cpus": os.cpu_count(), "machine": platform.machine(), "edge_threads": cfg.edge_threads, "edge_runner": cfg.edge_runner,
        "server_threads": cfg.server_threads, "pinning": pinning.note() if pinning else None,
        "serve_options": {"max_batch_size": cfg.serve_options.max_batch_size, "instances": cfg.serve_options.instances,
                          "instance_kind": cfg.serve_options.instance_kind, "dtype": cfg.serve_options.dtype},
        "wall_s": wall_s,
    }


def _write_raw(path: Path, runs: dict) -> None:
    with open(path, "w") as f:
        for (key, link), prompt_runs in runs.items():
            for i, r in enumerate(prompt_runs):
                f.write(json.dumps({"key": key, "link": link, "prompt": i, **asdict(r)}) + "\n")


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and o != o:
        return None
    raise TypeError(f"cannot serialise {type(o).__name__}")


# -- command line -----------------------------------------------------------------------------------
def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    quick = args.quick
    pick = lambda value, full, small: value if value is not None else (small if quick else full)  # noqa: E731
    plan = PartitionPlan.load(args.plan)
    verified_plan = PartitionPlan.load(args.verified_plan) if args.verified_plan else None
    if verified_plan is not None and (verified_plan.checkpoint.resolve() != plan.checkpoint.resolve()
                                      or verified_plan.split_layer < plan.split_layer):
        raise ValueError(f"--verified-plan must name --plan's checkpoint and split at or after its layer "
                         f"{plan.split_layer} (the server holds the layers from there)")
    prompts, texts, tokenizer = load_prompts(plan, pick(args.prompts, 8, 3))
    links = pick(args.links, DEFAULT_LINKS, "0/1000,20/100")
    clients = pick(args.clients, "1,4,16,32", "1,4")
    return BenchConfig(
        plan=plan, prompts=prompts, prompt_texts=texts, tokenizer=tokenizer,
        max_new_tokens=pick(args.max_new_tokens, 96, 12),
        thresholds=_floats(pick(args.thresholds, "0.8,0.9,1.0", "0.8,1.0")),
        codecs=tuple(c.strip() for c in pick(args.codecs, "fp16,int8", "fp16").split(",") if c.strip()),
        verified_thresholds=_floats(args.verified_thresholds if args.verified_thresholds is not None else
                                    str((verified_plan or plan).threshold)),
        max_gamma=args.max_gamma, verified_time_targets=((20.0, args.verified_target),) if args.verified_target else (),
        links=tuple(LinkSpec.parse(s) for s in links.split(",") if s.strip()),
        clients=_ints(clients), client_tokens=pick(args.client_tokens, 16, 8),
        long_tokens=pick(args.long_tokens, 256, 32),
        sessions_per_client=args.sessions_per_client, p99_slo_ms=args.p99_slo_ms, out=args.out,
        edge_threads=args.edge_threads, edge_runner=args.edge_runner, verified_plan=verified_plan,
        server_threads=args.server_threads or None,
        pin=not args.no_pin, progress=not args.no_progress,
        command="ce-collm bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
    )


def run_from_args(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"ce-collm bench: {e}", file=sys.stderr)
        return 2
    results = run_benchmark(cfg)
    print(summary_lines(results, Path(cfg.out)))
    return 0


def summary_lines(results: dict, out: Path) -> str:
    lines = [f"ce-collm bench: {len(results['runs'])} runs in {results['meta']['wall_s']:.0f} s -> {out}/report.md"]
    if results["meta"].get("pinning"):
        lines.append(f"  {results['meta']['pinning']}")
    for t in results.get("targets", []) + results.get("verified_targets", []):
        lines.append(f"  {'met   ' if t['met'] else 'MISSED'} {t['name']}: {t['display']} (target {t['target']}, {t['link']})")
    cap = (results.get("clients") or {}).get("capacity")
    if cap:
        slo = results["clients"]["p99_slo_ms"]
        lines.append(f"  clients within p99 <= {slo:.0f} ms: " + ", ".join(
            f"{k} {v['max_clients_within_slo']}" + ("+" if v["all_measured_within_slo"] else "")
            + (f" (~{v['interpolated_clients']:g})" if v.get("interpolated_clients") else "") for k, v in cap.items()))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
