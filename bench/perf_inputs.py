"""perf_analyzer `--input-data` JSON for the `ce_collm` ensemble (and the `cloud_only` baseline).

perf_analyzer treats each stream of a JSON input file as one sequence of a stateful model: it sends
the stream's steps in order under one sequence id, START on the first and END on the last. So each
stream here is one real edge session, recorded in-process (the edge partition + `LocalCloud`, the
same replies the server gives): the prompt's layer-k rows, every upload-only request of tokens that
exited at the split, and every token request with its pending rows, as the edge sends them, with
positions that line up. A session's closing END-only request (no rows) is left out: perf_analyzer
puts END on the last step itself. Streams are cut to one length (see `input_data`). With --verified
the sessions run in verified mode: each request carries the drafts to check (DRAFT_TOKENS,
DRAFT_EXITS) and, after a rejection, ROLLBACK_TO; replayed in order, every rollback meets the same
window it met when recorded.

    .venv/bin/python -m bench.perf_inputs --sessions 8 --tokens 16 --out bench/results/raw/perf_inputs_ce_collm.json
    .venv/bin/python -m bench.perf_inputs --verified --out bench/results/raw/perf_inputs_ce_collm_verified.json
    perf_analyzer -m ce_collm -i grpc --input-data bench/results/raw/perf_inputs_ce_collm.json \
        --sequence-length <steps per stream, printed> --sequence-length-variation 0 --concurrency-range 1:4

Tensors go as {"b64": ..., "shape": [...]} (raw little-endian bytes; the shape leaves out the batch
dimension, which perf_analyzer adds with -b 1).
"""
from __future__ import annotations

import argparse
import base64
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from bench.args import DEFAULT_PLAN
from bench.clients import record_trace, Trace
from bench.systems import load_prompts, System
from edge_runtime.runners import load_runner
from plugin.model.checkpoint import load_model, read_config
from plugin.protocol.messages import CloudRequest
from plugin.protocol.wire import request_inputs
from plugin.split.edge import EdgePartition
from plugin.split.limits import Limits
from plugin.split.local import LocalCloud
from plugin.split.plan import PartitionPlan


def step_tensors(req: CloudRequest, split_layer: int | None = None) -> dict[str, dict]:
    """One request as perf_analyzer JSON tensors (SPLIT_LAYER on every step of an edge stream:
    the context manager requires it with START and accepts it when it matches afterwards)."""
    if split_layer is not None and req.token_ids is None and req.split_layer is None:
        req = replace(req, split_layer=split_layer)
    out = {}
    for name, value in request_inputs(req).items():
        value = np.ascontiguousarray(value)
        assert value.shape[0] == 1, f"{name}: batch dimension must be 1, got {value.shape}"
        out[name] = {"b64": base64.b64encode(value.astype(value.dtype.newbyteorder("<")).tobytes()).decode(),
                     "shape": list(value.shape[1:])}
    return out


def trace_stream(trace: Trace, split_layer: int | None) -> list[dict]:
    """The steps of one session, in order, for one perf_analyzer stream."""
    requests = [r for s in trace.steps for r in s.requests] + list(trace.final)
    while requests and not requests[-1].want_token and requests[-1].num_rows == 0:
        requests.pop()  # the END-only close: perf_analyzer flags END on the last step itself
    return [step_tensors(r, split_layer if trace.model == "ce_collm" else None) for r in requests]


def input_data(traces: Sequence[Trace], split_layer: int | None) -> dict:
    """All streams cut to the shortest one's length: perf_analyzer 2.51 picks the step of a request as
    (sequence length - remaining requests) % stream length with ONE sequence length for all streams,
    so streams of different lengths would start mid-stream. A cut session simply ends earlier (END
    on its last kept step); run perf_analyzer with --sequence-length equal to that length."""
    streams = [trace_stream(t, split_layer) for t in traces]
    length = min(len(s) for s in streams)
    return {"data": [s[:length] for s in streams]}


def record_sessions(plan: PartitionPlan, prompts: list[list[int]], tokens: int, model: str = "ce_collm",
                    threshold: float | None = None, codec: str | None = None, verified: bool = False) -> list[Trace]:
    """Real sessions against an in-process cloud (no server needed): what an edge would send (verified: in
    verified mode)."""
    limits = Limits(max_sessions=len(prompts) + 1)
    if model == "cloud_only":
        cloud = LocalCloud(load_model(plan.checkpoint), limits)
        system, edge = System("cloud-only"), None
    else:
        n_layers = read_config(plan.checkpoint).num_layers
        cloud = LocalCloud(load_model(plan.checkpoint, range(plan.split_layer, n_layers)), limits)
        edge = EdgePartition(load_runner("torch", plan), plan)
        system = System("verified" if verified else "collaborative", plan.threshold if threshold is None else threshold,
                        codec or plan.codec)
    return [record_trace(system, edge, cloud, p, tokens, sequence_id=i + 1) for i, p in enumerate(prompts)]


def write_input_data(path: Path, traces: Sequence[Trace], split_layer: int | None) -> dict:
    data = input_data(traces, split_layer)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    steps = [len(s) for s in data["data"]]
    wants = sum(step["WANT_TOKEN"]["b64"] == base64.b64encode(b"\x01").decode() for s in data["data"] for step in s)
    return {"path": str(path), "streams": len(steps), "steps_per_stream": steps[0] if steps else 0,
            "steps": sum(steps), "token_requests": wants, "uploads": sum(steps) - wants}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.perf_inputs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", type=Path, default=DEFAULT_PLAN, metavar="FILE", help="(default: %(default)s)")
    p.add_argument("--model", choices=["ce_collm", "cloud_only"], default="ce_collm", help="(default: %(default)s)")
    p.add_argument("--sessions", type=int, default=8, metavar="N", help="streams = held-out prompts (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=16, metavar="N", help="tokens per session (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=None, help="exit threshold (default: the plan's)")
    p.add_argument("--codec", choices=["fp32", "fp16", "int8"], default=None, help="(default: the plan's)")
    p.add_argument("--verified", action="store_true", help="ce_collm: sessions in verified mode (drafts, rollbacks)")
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="JSON file to write")
    args = p.parse_args(argv)
    plan = PartitionPlan.load(args.plan)
    prompts, _, _ = load_prompts(plan, args.sessions)
    if args.verified and args.model != "ce_collm":
        p.error("--verified records ce_collm sessions")
    traces = record_sessions(plan, prompts, args.tokens, args.model, args.threshold, args.codec, args.verified)
    info = write_input_data(args.out, traces, plan.split_layer)
    print(f"wrote {info['path']}: {info['streams']} streams of {info['steps_per_stream']} requests "
          f"({info['token_requests']} token requests, {info['uploads']} uploads in all); run perf_analyzer with "
          f"--sequence-length {info['steps_per_stream']} --sequence-length-variation 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
