"""What `ce-collm bench` compares, and one generation of it, timed: the links, the systems (each session mode
through `session_for`, plus the naive split), the held-out prompts and the per-token times of one prompt."""
from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

from bench.naive_split import MODEL_NAME as NAIVE_MODEL, NaiveSplitSession
from edge_runtime.generation import SessionStats, TokenRecord
from edge_runtime.parts import SessionOptions
from edge_runtime.session import LOOPS, network_mode, session_for
from edge_runtime.triton_link import TritonLink
from edge_runtime.verified import DraftLength, VerifiedSession
from plugin.split.edge import EdgePartition
from plugin.split.plan import PartitionPlan

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



NAIVE_SPLIT = "naive-split"  # the bench-only system; every other kind is a session mode (edge_runtime/session.py)


@dataclass(frozen=True)
class System:
    kind: str  # naive-split, or a session mode: cloud-only | standalone | collaborative | verified | ...
    threshold: float | None = None
    codec: str | None = None

    @property
    def key(self) -> str:
        threshold = "" if self.threshold is None else f"@{self.threshold:g}"
        return self.kind + threshold + ("" if self.codec is None else f"/{self.codec}")

    @property
    def model(self) -> str | None:
        """The served model its link names (None: it runs on the edge alone)."""
        if self.kind == NAIVE_SPLIT:
            return NAIVE_MODEL
        mode = network_mode(self.kind)
        return None if not mode.uses_cloud else "ce_collm" if mode.uses_edge else "cloud_only"

    @property
    def server_models(self) -> tuple[str, ...]:
        """The models that compute for it on the server."""
        return {None: (), "ce_collm": CE_MODELS}.get(self.model, (self.model,))

    @property
    def verifies(self) -> bool:
        return issubclass(LOOPS.get(self.kind, type(None)), VerifiedSession)


def systems_for(thresholds: Sequence[float], codecs: Sequence[str], standalone_threshold: float,
                verified_thresholds: Sequence[float] = ()) -> list[System]:
    out = [System("cloud-only"), System(NAIVE_SPLIT, codec=codecs[0]), System("standalone", standalone_threshold)]
    out += [System("collaborative", t, c) for t in thresholds for c in codecs]
    out += [System("verified", t, codecs[0]) for t in verified_thresholds]
    return out


@dataclass
class PromptRun:
    tokens: list[int]
    exits: list[str]
    cloud_rows: list[int]  # rows the cloud computed per token (catch-up included)
    token_times_s: list[float]  # first: time to first token; then time between tokens
    stats: dict
    prompt_tokens: int = 0



class SequenceIds:
    """Unique non-zero sequence ids for this process's sessions."""

    def __init__(self) -> None:
        self._next, self._lock = (secrets.randbits(40) << 16) | 1, threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            self._next += 1
            return self._next


@dataclass(frozen=True)
class Edges:
    """The edge each system runs on: the verified systems on the verified plan's edge when the bench has one
    (its split at or after the main plan's, so the same server holds the layers it resumes from)."""

    main: EdgePartition
    verified: EdgePartition | None = None

    def of(self, system: System) -> EdgePartition:
        return self.verified if system.verifies and self.verified is not None else self.main


def open_links(url: str) -> dict[str, TritonLink]:
    """One gRPC client per served model, connected (first RPC made) before anything is timed."""
    links = {model: TritonLink(url, model) for model in ("ce_collm", "cloud_only", NAIVE_MODEL)}
    for link in links.values():
        link.client.is_server_live()  # opens the HTTP/2 connection through the link
    return links


def _stream(system: System, edge: EdgePartition, links: dict[str, TritonLink], prompt: list[int], n: int,
            sequence_id: int, max_gamma: int = 8) -> tuple[Iterator[TokenRecord], Callable[[], SessionStats]]:
    if system.kind == NAIVE_SPLIT:
        gen = NaiveSplitSession(edge, links[NAIVE_MODEL], system.codec or "fp16")
        stream = gen.stream(prompt, n)
        return stream, lambda: gen.generation.stats
    options = SessionOptions(threshold=system.threshold, codec=system.codec, sequence_id=sequence_id,
                             async_uploads=True, draft_length=DraftLength(max_gamma=max_gamma))
    g = session_for(system.kind, edge, links.get(system.model), options)
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
