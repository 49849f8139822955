"""Many edge clients: sessions recorded once, replayed concurrently against the server, and the capacity
within a p99 time-per-token bound."""
from __future__ import annotations

import concurrent.futures as cf
import math
import statistics
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from bench.measures import busy_delta, percentile, server_busy_ns
from bench.systems import System
from edge_runtime.parts import SessionOptions
from edge_runtime.session import session_for
from edge_runtime.triton_link import TritonLink
from plugin.protocol.messages import CloudReply, CloudRequest
from plugin.split.edge import EdgePartition


@dataclass
class TraceStep:
    edge_s: float  # edge compute before this step's requests (emulated by sleeping on replay)
    requests: list[CloudRequest] = field(default_factory=list)


@dataclass
class Trace:
    model: str  # ce_collm | cloud_only
    steps: list[TraceStep]
    final: list[CloudRequest]  # sent after the last token (END)


class RecordingLink:
    """Passes requests through and keeps them, in order, for a Trace (and perf_analyzer inputs)."""

    def __init__(self, link) -> None:
        self.link, self.sent = link, []

    def send(self, req: CloudRequest) -> CloudReply:
        self.sent.append(req)
        return self.link.send(req)


def record_trace(system: System, edge: EdgePartition | None, link, prompt: list[int], n: int,
                 sequence_id: int) -> Trace:
    """One real session with synchronous uploads (or verified, by the system's kind); each request is kept with
    the edge time before it.

    `link` is any CloudLink: a TritonLink to the server, or an in-process LocalCloud (same replies).
    """
    rec = RecordingLink(link)
    options = SessionOptions(threshold=system.threshold, codec=system.codec, sequence_id=sequence_id)
    g = session_for(system.kind, edge, rec, options)
    steps, seen, edge_before = [], 0, 0.0
    for _ in g.stream(prompt, n):
        steps.append(TraceStep(g.stats.edge_s - edge_before, rec.sent[seen:]))
        seen, edge_before = len(rec.sent), g.stats.edge_s
    return Trace(system.model, steps, rec.sent[seen:])


def replay_session(trace: Trace, url: str, sequence_id: int, link_cache: dict) -> list[float]:
    """Replay one session: sleep the edge time, send its requests (uploads in the background, as
    the edge's uploader does). Returns the step times (the first is the time to first token)."""
    key = (threading.get_ident(), trace.model)  # one gRPC client per replaying thread
    if key not in link_cache:
        link_cache[key] = TritonLink(url, trace.model)
    link = link_cache[key]
    uploads = cf.ThreadPoolExecutor(1)
    pending: cf.Future | None = None
    times = []
    try:
        for step in trace.steps:
            t0 = time.perf_counter()
            if step.edge_s > 0:
                time.sleep(step.edge_s)
            for req in step.requests:
                req = replace(req, sequence_id=sequence_id)
                if pending is not None:
                    pending.result()
                    pending = None
                if req.want_token:
                    link.send(req)
                else:
                    pending = uploads.submit(link.send, req)
            times.append(time.perf_counter() - t0)
        if pending is not None:
            pending.result()
        for req in trace.final:
            link.send(replace(req, sequence_id=sequence_id))
    finally:
        uploads.shutdown(wait=True)
    return times


def clients_sweep(traces: dict[str, list[Trace]], url: str, http_url: str, clients: Sequence[int],
                  sessions_per_client: int, new_id: Callable[[], int], models: dict[str, tuple[str, ...]],
                  on_done: Callable[[], None] = lambda: None) -> list[dict]:
    rows = []
    for name, session_traces in traces.items():
        for n in clients:
            link_cache: dict = {}
            plan = [[session_traces[(c * sessions_per_client + j) % len(session_traces)] for j in range(sessions_per_client)]
                    for c in range(n)]

            def client(sessions: list[Trace]) -> list[list[float]]:
                return [replay_session(t, url, new_id(), link_cache) for t in sessions]

            before = server_busy_ns(http_url)
            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(n) as pool:
                results = list(pool.map(client, plan))
            wall = time.perf_counter() - t0
            busy = busy_delta(before, server_busy_ns(http_url), models[name])
            for link in link_cache.values():
                link.close()
            step_times = [s for sessions in results for times in sessions for s in times[1:]]
            ttft = [times[0] for sessions in results for times in sessions if times]
            tokens = sum(len(times) for sessions in results for times in sessions)
            rows.append({
                "system": name, "clients": n, "sessions": n * sessions_per_client, "tokens": tokens, "wall_s": wall,
                "throughput_tok_s": tokens / wall, "p50_ms": 1000 * percentile(step_times, 0.5),
                "p99_ms": 1000 * percentile(step_times, 0.99), "ttft_p50_ms": 1000 * percentile(ttft, 0.5),
                "server_busy_s": busy["busy_s"], "server_busy_share": busy["busy_s"] / wall,
                "server_queue_s": busy["queue_s"], "server_executions": busy["executions"],
                "server_requests": busy["requests"],
            })
            on_done()
    return rows


def capacity(rows: list[dict], slo_ms: float) -> dict[str, dict]:
    """Per system: the most clients measured before p99 time per token first exceeds slo_ms, and an
    estimate between the two measured points around the crossing (linear in log2 clients)."""
    out = {}
    for name in dict.fromkeys(r["system"] for r in rows):
        mine = sorted((r for r in rows if r["system"] == name), key=lambda r: r["clients"])
        best, estimate, prev = 0, None, None
        for r in mine:
            if r["p99_ms"] <= slo_ms:
                best, prev = r["clients"], r
                continue
            if prev is not None:
                f = (slo_ms - prev["p99_ms"]) / (r["p99_ms"] - prev["p99_ms"])
                lo, hi = math.log2(prev["clients"]), math.log2(r["clients"])
                estimate = round(2 ** (lo + f * (hi - lo)), 1)
            break
        out[name] = {"max_clients_within_slo": best, "all_measured_within_slo": bool(mine) and best == mine[-1]["clients"],
                     "interpolated_clients": estimate}
    return out


def capacities(rows: list[dict], base_ms: float, multiples: Sequence[float] = (1.5, 2.0, 3.0)) -> list[dict]:
    return [{"multiple": m, "p99_slo_ms": m * base_ms, "capacity": capacity(rows, m * base_ms)} for m in multiples]


def traces_summary(traces: dict[str, list[Trace]]) -> dict:
    out = {}
    for name, ts in traces.items():
        reqs = [r for t in ts for s in t.steps for r in s.requests]
        out[name] = {"sessions": len(ts), "token_requests": sum(r.want_token for r in reqs),
                     "uploads": sum(not r.want_token for r in reqs),
                     "steps": sum(len(t.steps) for t in ts),
                     "edge_s_per_step": statistics.fmean(s.edge_s for t in ts for s in t.steps)}
    return out
