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
stop at EOS), so all systems decode the same number of tokens.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import platform
import random
import secrets
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch

from bench.link_emulator import LinkEmulator
from bench.naive_split import MODEL_NAME as NAIVE_MODEL, NaiveSplitSession, write_bench_repository
from edge_runtime.cloud_only import CloudOnlySession
from edge_runtime.generation import SessionStats, TokenRecord, total_stats
from edge_runtime.runners import load_runner
from edge_runtime.session import DecodingSession
from edge_runtime.triton_link import TritonLink
from edge_runtime.verified import DraftLength
from plugin.export.manifest import ExportError
from plugin.export.onnx import export_plan
from plugin.model.checkpoint import load_model, read_config
from plugin.model.decoder import DecoderModel
from plugin.protocol.messages import CloudReply, CloudRequest
from plugin.serving.repository import ServeOptions
from plugin.serving.server import TritonServer
from plugin.split.edge import EdgePartition
from plugin.split.limits import Limits
from plugin.split.plan import PartitionPlan
from bench.args import DEFAULT_LINKS, DEFAULT_OUT, DEFAULT_PLAN, REPO_ROOT, add_arguments  # noqa: F401 (re-exported)


CE_MODELS = ("context_manager", "cloud_partition")  # what the ce_collm ensemble runs


# -- what is compared ---------------------------------------------------------------------------
@dataclass(frozen=True)
class LinkSpec:
    rtt_ms: float
    bandwidth_mbit: float | None
    jitter_ms: float = 0.0

    @property
    def name(self) -> str:
        bw = "unlimited" if self.bandwidth_mbit is None else f"{self.bandwidth_mbit:g} Mbit/s"
        jitter = f" +-{self.jitter_ms:g} ms" if self.jitter_ms else ""
        return f"{self.rtt_ms:g} ms RTT / {bw}{jitter}"

    @property
    def delay_ms(self) -> float:
        return self.rtt_ms / 2  # one way, each direction

    @classmethod
    def parse(cls, text: str) -> "LinkSpec":
        """'RTT_MS/MBIT[/JITTER_MS]', e.g. '20/100'; MBIT may be 'inf'."""
        parts = text.strip().split("/")
        if not 2 <= len(parts) <= 3:
            raise ValueError(f"link {text!r}: write RTT_MS/MBIT[/JITTER_MS], e.g. 20/100")
        mbit = None if parts[1].lower() in ("inf", "none", "unlimited") else float(parts[1])
        return cls(float(parts[0]), mbit, float(parts[2]) if len(parts) == 3 else 0.0)


@dataclass(frozen=True)
class System:
    kind: str  # cloud-only | naive-split | standalone | collaborative | verified
    threshold: float | None = None
    codec: str | None = None

    @property
    def key(self) -> str:
        if self.kind in ("collaborative", "verified"):
            return f"{self.kind}@{self.threshold:g}/{self.codec}"
        if self.kind == "standalone":
            return f"standalone@{self.threshold:g}"
        if self.kind == "naive-split":
            return f"naive-split/{self.codec}"
        return self.kind

    @property
    def server_models(self) -> tuple[str, ...]:
        return {"cloud-only": ("cloud_only",), "naive-split": (NAIVE_MODEL,), "standalone": (),
                "collaborative": CE_MODELS, "verified": CE_MODELS}[self.kind]


def systems_for(thresholds: Sequence[float], codecs: Sequence[str], standalone_threshold: float,
                verified_thresholds: Sequence[float] = ()) -> list[System]:
    out = [System("cloud-only"), System("naive-split", codec=codecs[0]), System("standalone", standalone_threshold)]
    out += [System("collaborative", t, c) for t in thresholds for c in codecs]
    out += [System("verified", t, codecs[0]) for t in verified_thresholds]
    return out


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
    server_threads: int | None = 1  # OMP/MKL threads of each python-backend process (None: torch's default)
    serve_options: ServeOptions = ServeOptions(limits=Limits(max_sessions=512))
    tokenizer: object | None = None  # tokenizers.Tokenizer, for sample texts in the report
    progress: bool = True
    command: str = ""


# -- Triton's statistics API ----------------------------------------------------------------------
def server_busy_ns(http_url: str) -> dict[str, dict[str, int]]:
    """Per model: busy ns (compute input + infer + output, once per executed batch), queue ns, executions."""
    with urllib.request.urlopen(f"http://{http_url}/v2/models/stats", timeout=10) as resp:
        stats = json.loads(resp.read())
    out = {}
    for m in stats.get("model_stats", []):
        batches = m.get("batch_stats") or []
        busy = sum(b[k]["ns"] for b in batches for k in ("compute_input", "compute_infer", "compute_output"))
        if not batches:  # no batch statistics reported: per-request sums (an upper bound under batching)
            inf = m["inference_stats"]
            busy = sum(inf[k]["ns"] for k in ("compute_input", "compute_infer", "compute_output"))
        out[m["name"]] = {"busy_ns": int(busy), "queue_ns": int(m["inference_stats"]["queue"]["ns"]),
                          "executions": int(m.get("execution_count", 0)), "requests": int(m.get("inference_count", 0))}
    return out


def _busy_delta(before: dict, after: dict, models: Iterable[str]) -> dict[str, float]:
    d = {"busy_s": 0.0, "queue_s": 0.0, "executions": 0, "requests": 0}
    for m in models:
        a, b = after.get(m, {}), before.get(m, {})
        d["busy_s"] += (a.get("busy_ns", 0) - b.get("busy_ns", 0)) / 1e9
        d["queue_s"] += (a.get("queue_ns", 0) - b.get("queue_ns", 0)) / 1e9
        d["executions"] += a.get("executions", 0) - b.get("executions", 0)
        d["requests"] += a.get("requests", 0) - b.get("requests", 0)
    return d


# -- one generation, timed ------------------------------------------------------------------------
@dataclass
class PromptRun:
    tokens: list[int]
    exits: list[str]
    cloud_rows: list[int]  # rows the cloud computed per token (catch-up included)
    token_times_s: list[float]  # first: time to first token; then time between tokens
    stats: dict
    prompt_tokens: int = 0


class _SequenceIds:
    """Unique non-zero sequence ids for this process's sessions."""

    def __init__(self) -> None:
        self._next, self._lock = (secrets.randbits(40) << 16) | 1, threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            self._next += 1
            return self._next


def open_links(url: str) -> dict[str, TritonLink]:
    """One gRPC client per served model, connected (first RPC made) before anything is timed."""
    links = {model: TritonLink(url, model) for model in ("ce_collm", "cloud_only", NAIVE_MODEL)}
    for link in links.values():
        link.client.is_server_live()  # opens the HTTP/2 connection through the link
    return links


def _stream(system: System, edge: EdgePartition, links: dict[str, TritonLink], prompt: list[int], n: int,
            sequence_id: int, max_gamma: int = 8) -> tuple[Iterator[TokenRecord], Callable[[], SessionStats]]:
    if system.kind == "naive-split":
        gen = NaiveSplitSession(edge, links[NAIVE_MODEL], system.codec or "fp16")
        stream = gen.stream(prompt, n)
        return stream, lambda: gen.generation.stats
    if system.kind == "cloud-only":
        g = CloudOnlySession(links["cloud_only"], sequence_id=sequence_id)
    elif system.kind == "standalone":
        g = DecodingSession(edge, None, "standalone", threshold=system.threshold)
    elif system.kind == "verified":
        g = DecodingSession(edge, links["ce_collm"], "collaborative", threshold=system.threshold, codec=system.codec,
                            sequence_id=sequence_id, verify=True, draft_length=DraftLength(max_gamma=max_gamma))
    else:
        g = DecodingSession(edge, links["ce_collm"], "collaborative", threshold=system.threshold, codec=system.codec,
                            sequence_id=sequence_id, async_uploads=True)
    return g.stream(prompt, n), lambda: g.stats


def timed_generation(system: System, edge: EdgePartition, links: dict[str, TritonLink], prompt: list[int], n: int,
                     sequence_id: int, max_gamma: int = 8) -> PromptRun:
    stream, stats = _stream(system, edge, links, prompt, n, sequence_id, max_gamma)
    records, times = [], []
    last = time.perf_counter()
    for record in stream:
        now = time.perf_counter()
        times.append(now - last)
        records.append(record)
        last = now
    return PromptRun([r.token_id for r in records], [r.exit for r in records], [r.cloud_rows for r in records],
                     times, asdict(stats()), len(prompt))


# -- quality --------------------------------------------------------------------------------------
def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: Sequence[int], reference: Sequence[int]) -> float:
    """ROUGE-L F1 over tokens (LCS-based)."""
    if not candidate or not reference:
        return float(candidate == reference)
    lcs = lcs_length(candidate, reference)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(candidate), lcs / len(reference)
    return 2 * p * r / (p + r)


def token_agreement(candidate: Sequence[int], reference: Sequence[int]) -> float:
    """Share of positions where both chose the same token (after a divergence contexts differ)."""
    n = max(len(candidate), len(reference))
    return sum(a == b for a, b in zip(candidate, reference)) / n if n else 1.0


class Scorer:
    """Negative log-likelihood of chosen tokens under the full model (cached per sequence)."""

    def __init__(self, full: DecoderModel):
        self.full, self._cache = full, {}

    @torch.inference_mode()
    def nll(self, prompt: list[int], tokens: list[int]) -> list[float]:
        key = (tuple(prompt), tuple(tokens))
        if key not in self._cache:
            model, n_layers = self.full, self.full.cfg.num_layers
            ids = torch.tensor([prompt + tokens])  # [1, L]
            positions = torch.arange(ids.shape[1])[None]
            h = model.run_layers(model.embed_tokens(ids, positions), positions, 0, n_layers,
                                 [model.new_sequence(0, n_layers)])
            logp = torch.log_softmax(model.exit_logits(h[0], n_layers).float(), dim=-1)  # [L, V]
            rows = torch.arange(len(prompt) - 1, ids.shape[1] - 1)
            self._cache[key] = (-logp[rows, torch.tensor(tokens)]).tolist()
        return self._cache[key]


# -- metrics of one (system, link) run --------------------------------------------------------------
def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize_run(system: System, link: LinkSpec, runs: list[PromptRun], num_layers: int, split_layer: int,
                  exit_layers: Sequence[int], busy: dict | None, wire: dict | None, wall_s: float) -> dict:
    tokens = sum(len(r.tokens) for r in runs)
    ttft = [r.token_times_s[0] for r in runs if r.token_times_s]
    tpt = [t for r in runs for t in r.token_times_s[1:]]
    by_resolver = {"edge": [t for r in runs for t, e in zip(r.token_times_s[1:], r.exits[1:]) if e.startswith("edge")],
                   "cloud": [t for r in runs for t, e in zip(r.token_times_s[1:], r.exits[1:]) if e == "cloud"]}
    exits = [e for r in runs for e in r.exits]
    share = {f"edge:{e}": exits.count(f"edge:{e}") / tokens for e in exit_layers}
    share["cloud"] = exits.count("cloud") / tokens
    cloud_layers = num_layers - (0 if system.kind == "cloud-only" else split_layer)
    total = total_stats(SessionStats(**r.stats) for r in runs)
    stats = asdict(total)
    out = {
        "key": system.key, "system": system.kind, "threshold": system.threshold, "codec": system.codec,
        "link": link.name, "rtt_ms": link.rtt_ms, "bandwidth_mbit": link.bandwidth_mbit,
        "prompts": len(runs), "tokens": tokens, "wall_s": wall_s,
        "time_per_token_ms": {"median": 1000 * _pct(tpt, 0.5), "p90": 1000 * _pct(tpt, 0.9), "mean": 1000 * statistics.fmean(tpt) if tpt else float("nan")},
        "ttft_ms": {"median": 1000 * _pct(ttft, 0.5), "p90": 1000 * _pct(ttft, 0.9)},
        "time_per_token_by_prompt_ms": [1000 * statistics.fmean(r.token_times_s[1:]) if len(r.token_times_s) > 1
                                        else float("nan") for r in runs],
        "time_per_token_by_resolver_ms": {k: (1000 * statistics.fmean(v) if v else None) for k, v in by_resolver.items()},
        "bytes_up_per_token": stats["bytes_up"] / tokens, "bytes_down_per_token": stats["bytes_down"] / tokens,
        "exit_share": share, "edge_share": 1 - share["cloud"], "cloud_share": share["cloud"],
        "cloud_requests_per_token": stats["cloud_requests"] / tokens, "uploads_per_token": stats["uploads"] / tokens,
        "cloud_layer_token_work": 0 if system.kind == "standalone" else sum(sum(r.cloud_rows) for r in runs) * cloud_layers,
        "edge_compute_s": stats["edge_s"], "cloud_wait_s": stats["cloud_wait_s"],
        "speculation_s": stats["speculation_s"],
        "resyncs": stats["resyncs"],
        "speculated": stats["speculated"], "speculation_hits": stats["speculation_hits"],
    }
    if system.kind != "standalone":  # rows the cloud computed per generated token, the prompt's rows left out
        out["cloud_rows_per_token"] = (sum(sum(r.cloud_rows) for r in runs) - sum(r.prompt_tokens for r in runs)) / tokens
    if system.kind == "verified":
        out["verified"] = {**total.verified_summary(tokens), "drafts_sent": total.drafts_sent,
                           "drafts_accepted": total.drafts_accepted, "unverified": total.unverified,
                           "exit_agreement": total.exit_agreement()}
    if wire is not None:
        out["wire_bytes_up_per_token"] = wire["bytes_up"] / tokens
        out["wire_bytes_down_per_token"] = wire["bytes_down"] / tokens
    else:
        out["wire_bytes_up_per_token"] = out["wire_bytes_down_per_token"] = 0.0
    out["server"] = busy or {"busy_s": 0.0, "queue_s": 0.0, "executions": 0, "requests": 0}
    return out


def add_comparisons(rows: list[dict], runs: dict[tuple[str, str], list[PromptRun]], prompts: list[list[int]],
                    scorer: Scorer | None) -> None:
    """Cloud work, server time and quality of every run relative to cloud-only on the same link."""
    by = {(r["key"], r["link"]): r for r in rows}
    for row in rows:
        ref = by.get(("cloud-only", row["link"]))
        ref_runs = runs.get(("cloud-only", row["link"]))
        mine = runs[(row["key"], row["link"])]
        if ref is not None:
            row["cloud_work_share"] = row["cloud_layer_token_work"] / ref["cloud_layer_token_work"] if ref["cloud_layer_token_work"] else None
            ref_busy = ref["server"]["busy_s"]
            row["server_time_share"] = row["server"]["busy_s"] / ref_busy if ref_busy > 0 else None
        if ref_runs is not None:
            pairs = list(zip(mine, ref_runs))
            row["token_agreement"] = statistics.fmean(token_agreement(a.tokens, b.tokens) for a, b in pairs)
            row["exact_match"] = statistics.fmean(float(a.tokens == b.tokens) for a, b in pairs)
            row["rouge_l"] = statistics.fmean(rouge_l(a.tokens, b.tokens) for a, b in pairs)
        if scorer is not None:
            nll = [x for p, r in zip(prompts, mine) for x in scorer.nll(p, r.tokens)]
            row["perplexity"] = float(torch.tensor(nll).mean().exp()) if nll else None


# -- many edge clients: recorded sessions replayed concurrently ------------------------------------
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
    if system.kind == "cloud-only":
        g = CloudOnlySession(rec, sequence_id=sequence_id)
    else:
        g = DecodingSession(edge, rec, "collaborative", threshold=system.threshold, codec=system.codec,
                            sequence_id=sequence_id, async_uploads=False, verify=system.kind == "verified")
    steps, seen, edge_before = [], 0, 0.0
    for _ in g.stream(prompt, n):
        steps.append(TraceStep(g.stats.edge_s - edge_before, rec.sent[seen:]))
        seen, edge_before = len(rec.sent), g.stats.edge_s
    return Trace("cloud_only" if system.kind == "cloud-only" else "ce_collm", steps, rec.sent[seen:])


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
            busy = _busy_delta(before, server_busy_ns(http_url), models[name])
            for link in link_cache.values():
                link.close()
            step_times = [s for sessions in results for times in sessions for s in times[1:]]
            ttft = [times[0] for sessions in results for times in sessions if times]
            tokens = sum(len(times) for sessions in results for times in sessions)
            rows.append({
                "system": name, "clients": n, "sessions": n * sessions_per_client, "tokens": tokens, "wall_s": wall,
                "throughput_tok_s": tokens / wall, "p50_ms": 1000 * _pct(step_times, 0.5),
                "p99_ms": 1000 * _pct(step_times, 0.99), "ttft_p50_ms": 1000 * _pct(ttft, 0.5),
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


# -- targets ----------------------------------------------------------------------------------------
def _closest_link(rows: list[dict], rtt_ms: float) -> str | None:
    links = sorted({(abs(r["rtt_ms"] - rtt_ms), r["link"]) for r in rows})
    return links[0][1] if links else None


def paired_interval(mine_ms: Sequence[float], ref_ms: Sequence[float], resamples: int = 2000,
                    seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of 1 - mean(mine) / mean(ref) over prompts, resampled in pairs (each
    prompt ran on both systems): how much the reduction depends on which prompts were drawn."""
    pairs = [(m, r) for m, r in zip(mine_ms, ref_ms) if not (math.isnan(m) or math.isnan(r))]
    if len(pairs) < 2:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    draws = sorted(1 - sum(m for m, _ in s) / sum(r for _, r in s)
                   for s in ([rng.choice(pairs) for _ in pairs] for _ in range(resamples)))
    return draws[int(0.025 * resamples)], draws[int(0.975 * resamples) - 1]


def evaluate_targets(rows: list[dict], thresholds: Sequence[float], codecs: Sequence[str],
                     long_context: dict | None = None) -> list[dict]:
    """The issue's targets, with the measured ratios (collaborative at 0.8 vs cloud-only at ~20 ms RTT)."""
    link = _closest_link(rows, 20.0)
    by = {(r["key"], r["link"]): r for r in rows}
    threshold = 0.8 if 0.8 in thresholds else min(thresholds)
    codec = "fp16" if "fp16" in codecs else codecs[0]
    collab = by.get((f"collaborative@{threshold:g}/{codec}", link))
    cloud = by.get(("cloud-only", link))
    naive = next((r for r in rows if r["system"] == "naive-split" and r["link"] == link), None)
    if collab is None or cloud is None:
        return []
    out = []
    # The mean is the time per token a generation takes (its decode time / tokens). The distribution of a
    # collaborative run is bimodal (edge tokens: a few ms; cloud tokens: a round trip), so its median sits
    # on the cloud mode and says little about the whole; it is shown beside the mean.
    mine, ref = collab["time_per_token_ms"], cloud["time_per_token_ms"]
    reduction = 1 - mine["mean"] / ref["mean"]
    low, high = paired_interval(collab.get("time_per_token_by_prompt_ms", []),
                                cloud.get("time_per_token_by_prompt_ms", []))
    spread = f"; 95% interval over prompts {100 * low:.1f}-{100 * high:.1f}%" if not math.isnan(low) else ""
    out.append({"name": "time per token vs cloud-only", "target": ">= 20% less", "measured": reduction,
                "interval": [low, high],
                "display": f"{100 * reduction:.1f}% less (mean {mine['mean']:.1f} vs {ref['mean']:.1f} ms{spread}; "
                           f"median {mine['median']:.1f} vs {ref['median']:.1f} ms)", "met": reduction >= 0.20})
    work = collab.get("cloud_work_share")
    if work is not None:
        out.append({"name": "cloud layer-token work vs cloud-only", "target": "<= 25%", "measured": work,
                    "display": f"{100 * work:.1f}%", "met": work <= 0.25})
    agree = collab.get("token_agreement")
    if agree is not None:
        out.append({"name": "token agreement with cloud-only", "target": ">= 95%", "measured": agree,
                    "display": f"{100 * agree:.1f}%", "met": agree >= 0.95})
    if naive is not None and collab["bytes_up_per_token"] > 0:
        ratio = naive["bytes_up_per_token"] / collab["bytes_up_per_token"]
        wire = (naive["wire_bytes_up_per_token"] / collab["wire_bytes_up_per_token"]
                if collab["wire_bytes_up_per_token"] else None)
        display = f"{ratio:.1f}x less (tensor payload)" + (f", {wire:.1f}x on the wire" if wire else "")
        if long_context:
            display += (f"; over {long_context['tokens']}-token generations {long_context['ratio']:.1f}x "
                        f"({long_context['wire_ratio']:.1f}x on the wire)")
        out.append({"name": "bytes up vs naive split", "target": ">= 50x less", "measured": ratio,
                    "display": display, "met": ratio >= 50})
    for t in out:
        t.update(link=link, system=collab["key"])
    return out


# verified mode vs cloud-only: (RTT it is stated for, most time per token as a share of cloud-only's)
VERIFIED_TIME_TARGETS = ((20.0, 0.40), (60.0, 0.35))
VERIFIED_ROWS_TARGET = 1.3  # rows the cloud computes per generated token


def evaluate_verified_targets(rows: list[dict]) -> list[dict]:
    """Issue 16's targets for the first verified system: its time per token over cloud-only's on the same link
    (side by side in this run) at ~20 and ~60 ms RTT, identical tokens, and the rows the cloud computed."""
    verified_keys = [r["key"] for r in rows if r["system"] == "verified"]
    if not verified_keys:
        return []
    by = {(r["key"], r["link"]): r for r in rows}
    out = []
    for rtt, bound in VERIFIED_TIME_TARGETS:
        link = _closest_link(rows, rtt)
        mine, ref = by.get((verified_keys[0], link)), by.get(("cloud-only", link))
        if mine is None or ref is None or abs(mine["rtt_ms"] - rtt) > rtt / 2:
            continue
        ratio = mine["time_per_token_ms"]["mean"] / ref["time_per_token_ms"]["mean"]
        low, high = paired_interval(mine["time_per_token_by_prompt_ms"], ref["time_per_token_by_prompt_ms"])
        spread = f"; 95% interval over prompts {1 - high:.2f}-{1 - low:.2f}x" if not math.isnan(low) else ""
        v = mine["verified"]
        out.append({"name": f"time per token vs cloud-only at {mine['rtt_ms']:g} ms RTT", "target": f"<= {bound:g}x",
                    "measured": ratio, "interval": [1 - high, 1 - low], "link": link, "system": mine["key"],
                    "met": ratio <= bound,
                    "display": f"{ratio:.2f}x (mean {mine['time_per_token_ms']['mean']:.1f} vs "
                               f"{ref['time_per_token_ms']['mean']:.1f} ms{spread}; acceptance "
                               f"{100 * v['acceptance_rate']:.0f}%, {v['tokens_per_round_trip']:.2f} tokens per round "
                               f"trip, gamma {v['gamma']:.1f})"})
        out.append({"name": f"tokens identical to cloud-only at {mine['rtt_ms']:g} ms RTT", "target": "100%",
                    "measured": mine.get("exact_match"), "link": link, "system": mine["key"],
                    "met": mine.get("exact_match") == 1.0,
                    "display": f"{100 * (mine.get('token_agreement') or 0):.1f}% of positions, "
                               f"{100 * (mine.get('exact_match') or 0):.0f}% of generations"})
    link = _closest_link(rows, 20.0)
    mine = by.get((verified_keys[0], link))
    if mine is not None:
        ratio = mine["cloud_rows_per_token"]
        out.append({"name": "rows the cloud computed per generated token", "target": f"<= {VERIFIED_ROWS_TARGET:g}",
                    "measured": ratio, "link": link, "system": mine["key"], "met": ratio <= VERIFIED_ROWS_TARGET,
                    "display": f"{ratio:.2f} (cloud-only: {by[('cloud-only', link)]['cloud_rows_per_token']:.2f}; "
                               "the prompt's rows left out)"})
    return out


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
    if runner == "torch":
        return EdgePartition(load_runner("torch", plan), plan)
    try:
        graphs = load_runner(runner, plan, onnx_dir=onnx_dir, threads=threads)
    except ExportError:  # none yet, or exported from another plan or other weights
        export_plan(plan, onnx_dir, ("fp32",))
        graphs = load_runner(runner, plan, onnx_dir=onnx_dir, threads=threads)
    return EdgePartition(graphs, plan)


def _warm_up(systems: list[System], edge: EdgePartition, url: str, prompt: list[int], new_id) -> None:
    """One short generation per kind of system on a direct connection (lazy state, allocator, pools)."""
    links = open_links(url)
    for system in {s.kind: s for s in systems}.values():
        timed_generation(system, edge, links, prompt, 4, new_id())
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
    """Run everything; returns the results dict (also written to cfg.out/results.json with the report)."""
    t_start = time.perf_counter()
    torch.set_num_threads(cfg.edge_threads)
    out = Path(cfg.out)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    plan = cfg.plan
    edge = bench_edge(plan, cfg.edge_runner, raw / "onnx", cfg.edge_threads)
    cfg_model = read_config(plan.checkpoint)
    scorer = Scorer(load_model(plan.checkpoint))
    standalone_t = 0.8 if 0.8 in cfg.thresholds else min(cfg.thresholds)
    systems = systems_for(cfg.thresholds, cfg.codecs, standalone_t, cfg.verified_thresholds)
    new_id = _SequenceIds()

    own_server = server is None
    tmp = None
    if own_server:
        tmp = tempfile.TemporaryDirectory(prefix="ce-collm-bench-repo-")
        repo = Path(tmp.name)
        write_bench_repository(plan, repo, cfg.serve_options)
        limit_server_threads(cfg.server_threads)
        server = TritonServer(repo, log_file=raw / "tritonserver.log", extra_args=["--exit-timeout-secs=5"])
        if cfg.progress:
            print(f"bench: starting tritonserver on a generated repository ({repo}) ...", file=sys.stderr, flush=True)
        server.start(timeout_s=300)
    assert server is not None
    try:
        url = server.grpc_url
        _warm_up(systems, edge, url, cfg.prompts[0], new_id)
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
                        acc["runs"].append(timed_generation(system, edge, clients, prompt, cfg.max_new_tokens, new_id(),
                                                            cfg.max_gamma))
                        acc["wall"] += time.perf_counter() - t0
                        busy = _busy_delta(before, server_busy_ns(server.http_url), system.server_models)
                        acc["busy"] = busy if acc["busy"] is None else {k: acc["busy"][k] + v for k, v in busy.items()}
                        wire = link.reset_counters()
                        acc["wire"]["bytes_up"] += wire.bytes_up
                        acc["wire"]["bytes_down"] += wire.bytes_down
                        bar.update()
                for system in systems:
                    acc = per_system[system.key]
                    runs[(system.key, link_spec.name)] = acc["runs"]
                    rows.append(summarize_run(system, link_spec, acc["runs"], cfg_model.num_layers, plan.split_layer,
                                              plan.exit_layers, acc["busy"], acc["wire"], acc["wall"]))
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
            "meta": _meta(cfg, server, cfg_model, time.perf_counter() - t_start),
            "links": [dict(asdict(l), name=l.name) for l in cfg.links],
            "runs": rows,
            "clients": clients_result,
            "long_context": long_result,
            "targets": evaluate_targets(rows, cfg.thresholds, cfg.codecs, long_result),
            "verified_targets": evaluate_verified_targets(rows),
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
    systems = [System("naive-split", codec=codec), System("collaborative", threshold, codec)]
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


def traces_summary(traces: dict[str, list[Trace]]) -> dict:
    out = {}
    for name, ts in traces.items():
        reqs = [r for t in ts for s in t.steps for r in s.requests]
        out[name] = {"sessions": len(ts), "token_requests": sum(r.want_token for r in reqs),
                     "uploads": sum(not r.want_token for r in reqs),
                     "steps": sum(len(t.steps) for t in ts),
                     "edge_s_per_step": statistics.fmean(s.edge_s for t in ts for s in t.steps)}
    return out


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


def _meta(cfg: BenchConfig, server: TritonServer, model_cfg, wall_s: float) -> dict:
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
        "prompts": len(cfg.prompts), "prompt_tokens": [len(p) for p in cfg.prompts],
        "max_new_tokens": cfg.max_new_tokens, "thresholds": list(cfg.thresholds), "codecs": list(cfg.codecs),
        "triton_version": version, "python": platform.python_version(), "torch": torch.__version__,
        "cpus": os.cpu_count(), "machine": platform.machine(), "edge_threads": cfg.edge_threads, "edge_runner": cfg.edge_runner,
        "server_threads": cfg.server_threads,
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


# -- prompts ----------------------------------------------------------------------------------------
def load_prompts(plan: PartitionPlan, count: int) -> tuple[list[list[int]], list[str], object]:
    """The first `count` held-out prompts, tokenized with the checkpoint's tokenizer."""
    from tokenizers import Tokenizer

    texts = heldout_texts(plan)[:count]
    tokenizer = Tokenizer.from_file(str(plan.checkpoint / "tokenizer.json"))
    return [tokenizer.encode(t).ids for t in texts], texts, tokenizer


def heldout_texts(plan: PartitionPlan) -> list[str]:
    """The checkpoint's heldout_prompts.txt (the demo model's, one per line), else the heldout_prompts.json
    beside the plan's exit heads (Gemma's: texts its exit heads were not trained on)."""
    path = plan.checkpoint / "heldout_prompts.txt"
    if path.is_file():
        return [line.replace("\\n", "\n") for line in path.read_text().splitlines() if line.strip()]
    beside_heads = plan.exit_adapters.parent / "heldout_prompts.json" if plan.exit_adapters is not None else None
    if beside_heads is not None and beside_heads.is_file():
        return json.loads(beside_heads.read_text())
    raise FileNotFoundError(f"{path} not found, nor heldout_prompts.json beside the plan's exit heads: train the demo "
                            "model first (.venv/bin/python build/train_demo_model.py) or pass a plan that has one")


# -- command line -----------------------------------------------------------------------------------
def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    quick = args.quick
    pick = lambda value, full, small: value if value is not None else (small if quick else full)  # noqa: E731
    plan = PartitionPlan.load(args.plan)
    prompts, texts, tokenizer = load_prompts(plan, pick(args.prompts, 8, 3))
    links = pick(args.links, DEFAULT_LINKS, "0/1000,20/100")
    clients = pick(args.clients, "1,4,16,32", "1,4")
    return BenchConfig(
        plan=plan, prompts=prompts, prompt_texts=texts, tokenizer=tokenizer,
        max_new_tokens=pick(args.max_new_tokens, 96, 12),
        thresholds=_floats(pick(args.thresholds, "0.8,0.9,1.0", "0.8,1.0")),
        codecs=tuple(c.strip() for c in pick(args.codecs, "fp16,int8", "fp16").split(",") if c.strip()),
        verified_thresholds=_floats(args.verified_thresholds), max_gamma=args.max_gamma,
        links=tuple(LinkSpec.parse(s) for s in links.split(",") if s.strip()),
        clients=_ints(clients), client_tokens=pick(args.client_tokens, 16, 8),
        long_tokens=pick(args.long_tokens, 256, 32),
        sessions_per_client=args.sessions_per_client, p99_slo_ms=args.p99_slo_ms, out=args.out,
        edge_threads=args.edge_threads, edge_runner=args.edge_runner, server_threads=args.server_threads or None, progress=not args.no_progress,
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
