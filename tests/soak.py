"""Soak: many concurrent edge sessions against one tritonserver; nothing lost, nothing mixed, memory flat.

    make soak                                   # 32 sessions x 200 tokens, the figures in the README
    .venv/bin/python -m tests.soak --sessions 8 --tokens 40 --rounds 1

Each session is a real edge (its own gRPC channel, background uploads of layer-k rows, token
requests when no exit is confident) on a tiny random checkpoint served by a real tritonserver on
127.0.0.1. The same sessions run one at a time first; every concurrent round must give identical
tokens, with no error and no re-sync. Server memory is the resident set (VmRSS) of the tritonserver
process and its Python-backend stubs, taken after a warm-up round and after every round; the
context manager's and the cloud partition's gauges (live sessions, pending bytes, KV bytes) must be
back at zero once every session has sent END. The tests import the pieces (`run_sessions`,
`server_rss_kib`, `gauges`) for a shortened version in `make test`.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import random
import re
import secrets
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from edge_runtime.generation import Generation  # noqa: E402
from edge_runtime.session import DecodingSession  # noqa: E402
from edge_runtime.triton_link import TritonLink  # noqa: E402
from plugin.split.edge import EdgePartition  # noqa: E402
from edge_runtime.torch_runner import TorchRunner

GAUGES = (("ce_collm_sessions_live", "context_manager"), ("ce_collm_sessions_live", "cloud_partition"),
          ("ce_collm_pending_bytes", "context_manager"), ("ce_collm_kv_bytes", "cloud_partition"))


# -- what the server holds ------------------------------------------------------------------------
def descendant_pids(pid: int) -> list[int]:
    """pid and every process below it (tritonserver's Python-backend stubs are its children)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone meanwhile
            continue
        fields = text[text.rindex(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def server_rss_kib(pid: int) -> int:
    """VmRSS of the server and all its descendants, in KiB."""
    total = 0
    for p in descendant_pids(pid):
        try:
            m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{p}/status").read_text(), re.M)
        except OSError:
            continue
        total += int(m.group(1)) if m else 0
    return total


def metric(metrics_url: str, name: str, model: str) -> float | None:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    m = re.search(rf'^{name}{{model="{model}"}} ([0-9.e+-]+)$', text, re.M)
    return float(m.group(1)) if m else None


def gauges(metrics_url: str) -> dict[str, float]:
    """The four gauges that say how much session state the server holds (0 when it holds none)."""
    return {f"{name}{{{model}}}": metric(metrics_url, name, model) or 0.0 for name, model in GAUGES}


def wait_for_gauges(metrics_url: str, expected: dict[str, float], timeout_s: float = 15.0) -> dict[str, float]:
    """Poll until the gauges equal `expected` (metrics are reported after each execute); return the last seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = gauges(metrics_url)
        if seen == expected or time.monotonic() > deadline:
            return seen
        time.sleep(0.2)


# -- sessions -------------------------------------------------------------------------------------
def prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(3, 12))] for _ in range(count)]


@dataclass
class SessionsRun:
    token_ids: list[list[int] | None]  # None where the session failed
    errors: list[str] = field(default_factory=list)
    resyncs: int = 0
    uploads: int = 0
    cloud_requests: int = 0
    edge_exits: int = 0
    wall_s: float = 0.0


def run_sessions(edge: EdgePartition, url: str, session_prompts: list[list[int]], tokens: int, *,
                 concurrent: bool, threshold: float = 0.08, codec: str = "fp16", timeout_s: float = 600) -> SessionsRun:
    """One edge per prompt, each with its own gRPC channel, random 63-bit sequence id and background uploads."""
    def one(prompt: list[int]) -> Generation:
        link = TritonLink(url, timeout_s=60)
        try:
            gen = DecodingSession(edge, link, "collaborative", threshold=threshold, codec=codec,
                                  sequence_id=secrets.randbits(63) | 1, async_uploads=True)
            return gen.generate(prompt, tokens)
        finally:
            link.close()

    t0 = time.perf_counter()
    outcomes: list[Generation | Exception] = []
    if concurrent:
        with cf.ThreadPoolExecutor(len(session_prompts)) as pool:
            futures = [pool.submit(one, p) for p in session_prompts]
            for f in futures:
                try:
                    outcomes.append(f.result(timeout=timeout_s))
                except Exception as e:  # noqa: BLE001 - reported, and the caller fails on it
                    outcomes.append(e)
    else:
        for p in session_prompts:
            try:
                outcomes.append(one(p))
            except Exception as e:  # noqa: BLE001
                outcomes.append(e)
    run = SessionsRun(token_ids=[], wall_s=time.perf_counter() - t0)
    for out in outcomes:
        if isinstance(out, Exception):
            run.token_ids.append(None)
            run.errors.append(f"{type(out).__name__}: {out}")
            continue
        run.token_ids.append(out.token_ids)
        run.resyncs += out.stats.resyncs
        run.uploads += out.stats.uploads
        run.cloud_requests += out.stats.cloud_requests
        run.edge_exits += sum(e.startswith("edge") for e in out.exits())
    return run


# -- the soak -------------------------------------------------------------------------------------
@dataclass
class SoakReport:
    sessions: int
    tokens_per_session: int
    rounds: int
    tokens_generated: int = 0
    tokens_lost: int = 0  # positions missing or differing from the one-at-a-time run
    errors: list[str] = field(default_factory=list)
    resyncs: int = 0
    uploads: int = 0
    cloud_requests: int = 0
    edge_exits: int = 0
    sequential_s: float = 0.0
    concurrent_s: list[float] = field(default_factory=list)
    rss_kib_before: int = 0  # after the warm-up round
    rss_kib_after: list[int] = field(default_factory=list)  # after each concurrent round
    gauges_before: dict[str, float] = field(default_factory=dict)
    gauges_after: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors and self.tokens_lost == 0 and self.gauges_after == self.gauges_before


def soak(edge: EdgePartition, url: str, metrics_url: str, server_pid: int, sessions: int, tokens: int,
         rounds: int = 2, vocab: int = 96, threshold: float = 0.08, log=print) -> SoakReport:
    report = SoakReport(sessions, tokens, rounds)
    session_prompts = prompts(sessions, vocab)
    log(f"warm-up: {min(4, sessions)} sessions x {min(20, tokens)} tokens")
    warm = run_sessions(edge, url, session_prompts[:4], min(20, tokens), concurrent=True, threshold=threshold)
    report.errors += warm.errors
    report.gauges_before = wait_for_gauges(metrics_url, {k: 0.0 for k in gauges(metrics_url)})
    report.rss_kib_before = server_rss_kib(server_pid)
    log(f"one at a time: {sessions} sessions x {tokens} tokens")
    alone = run_sessions(edge, url, session_prompts, tokens, concurrent=False, threshold=threshold)
    report.sequential_s = alone.wall_s
    report.errors += alone.errors
    for r in range(rounds):
        together = run_sessions(edge, url, session_prompts, tokens, concurrent=True, threshold=threshold)
        report.concurrent_s.append(together.wall_s)
        report.errors += together.errors
        for mine, reference in zip(together.token_ids, alone.token_ids):
            got, want = mine or [], reference or []
            report.tokens_generated += len(got)
            report.tokens_lost += sum(a != b for a, b in zip(got, want)) + abs(len(got) - len(want))
        for key in ("resyncs", "uploads", "cloud_requests", "edge_exits"):
            setattr(report, key, getattr(report, key) + getattr(together, key))
        report.gauges_after = wait_for_gauges(metrics_url, report.gauges_before)
        report.rss_kib_after.append(server_rss_kib(server_pid))
        log(f"round {r + 1}/{rounds}: {sessions} concurrent sessions in {together.wall_s:.1f} s, "
            f"{len(together.errors)} errors, {report.tokens_lost} tokens lost so far, "
            f"server RSS {report.rss_kib_after[-1] / 1024:.0f} MiB, gauges {report.gauges_after}")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=32, help="concurrent edge sessions (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=200, help="tokens per session (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="concurrent rounds after the one-at-a-time run (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=0.08,
                   help="edge exit threshold; at 0.08 about one token in twenty exits on the edge and its row is uploaded")
    p.add_argument("--json", type=Path, default=REPO_ROOT / "runs" / "soak" / "summary.json",
                   help="where to write the figures (default: %(default)s)")
    args = p.parse_args(argv)

    from plugin.model.checkpoint import load_model
    from plugin.split.limits import Limits
    from plugin.split.plan import PartitionPlan
    from plugin.serving.repository import ServeOptions, write_repository
    from plugin.serving.server import TritonServer
    from tests.tiny_models import VOCAB, save_tiny

    with tempfile.TemporaryDirectory(prefix="ce-collm-soak-") as tmp:
        ckpt, repo = Path(tmp) / "ckpt", Path(tmp) / "repo"
        save_tiny("llama", ckpt)
        plan = PartitionPlan(ckpt, 4, (4,), threshold=args.threshold, codec="fp16")  # every edge exit uploads
        limits = Limits(max_sessions=max(64, 2 * args.sessions), max_context=max(256, args.tokens + 64),
                        max_block_rows=max(256, args.tokens + 64), ttl_s=120)
        write_repository(plan, repo, ServeOptions(limits=limits))
        edge = EdgePartition(TorchRunner(load_model(ckpt, range(0, plan.split_layer))), plan)
        with TritonServer(repo, log_file=Path(tmp) / "server.log", extra_args=["--exit-timeout-secs=5"]) as server:
            t0 = time.perf_counter()
            report = soak(edge, server.grpc_url, server.metrics_url, server.pid, args.sessions, args.tokens,
                          args.rounds, VOCAB, args.threshold, log=lambda m: print(f"soak: {m}", flush=True))
            alive = server.is_running()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dict(asdict(report), ok=report.ok, server_alive=alive,
                                         wall_s=time.perf_counter() - t0), indent=2) + "\n")
    growth = (report.rss_kib_after[-1] - report.rss_kib_before) / 1024 if report.rss_kib_after else float("nan")
    print(f"soak: {'PASS' if report.ok and alive else 'FAIL'}: {args.sessions} sessions x {args.tokens} tokens x "
          f"{args.rounds} rounds, {report.tokens_generated} tokens, {report.tokens_lost} lost, "
          f"{len(report.errors)} errors, {report.resyncs} re-syncs, {report.uploads} uploads, "
          f"{report.cloud_requests} token requests; server RSS {report.rss_kib_before / 1024:.0f} MiB before, "
          f"{' / '.join(f'{r / 1024:.0f}' for r in report.rss_kib_after)} MiB after each round "
          f"({growth:+.1f} MiB); gauges after {report.gauges_after}; figures in {args.json}")
    for e in report.errors[:5]:
        print(f"  error: {e}")
    return 0 if report.ok and alive else 1


if __name__ == "__main__":
    sys.exit(main())
