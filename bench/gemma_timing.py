"""Time per token on the imported Gemma 3 270M: Hugging Face's forward, the project's layer loop on the
whole model, the standalone edge, cloud-only through a real tritonserver; and the server's memory.

    .venv/bin/python -m bench.gemma_timing                 # after `ce-collm import-gguf`
    .venv/bin/python -m bench.gemma_timing --tokens 64 --plan models/gemma-3-270m/partition_plan.json

Decode time per token is (time for 1 + n tokens - time for 1 token) / n, so the prompt's prefill
drops out; each figure is the median of --repeats rounds, every round timing each path in turn.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from edge_runtime.parts import SessionOptions
from edge_runtime.session import session_for
from edge_runtime.runners import load_runner
from edge_runtime.triton_link import TritonLink
from plugin.model.checkpoint import load_model
from plugin.model.gguf_import import default_out_dir, PLAN
from plugin.serving.repository import write_repository
from plugin.serving.server import TritonServer
from plugin.split.edge import EdgePartition
from plugin.split.local import LocalCloud
from plugin.split.plan import PartitionPlan

PROMPT = "The history of the Roman Empire begins with"


def _decode_seconds(run, n: int) -> float:
    """Seconds per decoded token of run(k) (which generates k tokens), the prompt's prefill excluded."""
    t0 = time.perf_counter()
    run(1)
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(1 + n)
    return (time.perf_counter() - t0 - one) / n


def _interleaved(runs: dict, n: int, repeats: int) -> dict[str, float]:
    """Median seconds per token of each run, measured in turn in every round: on a shared machine the
    load changes from minute to minute, and each round sees about the same load for all of them."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            samples[name].append(_decode_seconds(run, n))
    return {f"{name}_s_per_token": statistics.median(s) for name, s in samples.items()}


def _hf_forward(hf, prompt: list[int]):
    """Greedy decoding with Hugging Face's forward and its KV cache (no generate() around it)."""
    @torch.inference_mode()
    def run(k: int) -> None:
        out = hf(torch.tensor([prompt]), use_cache=True)
        for _ in range(k - 1):
            token = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
            out = hf(token, past_key_values=out.past_key_values, use_cache=True)
    return run


def _generate(edge, link, mode: str, prompt: list[int]):
    ids = iter(range(1, 1 << 30))

    def run(k: int) -> None:
        options = SessionOptions(threshold=1.0, codec="fp32", sequence_id=next(ids))
        session_for(mode, edge, link, options).generate(prompt, k)
    return run


def _memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and Pss (shared pages split among their users) of a process and its descendants, KiB."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
    total = {"rss_kib": 0, "pss_kib": 0}
    for p in tree:
        total["rss_kib"] += int(re.search(r"^VmRSS:\s+(\d+)", Path(f"/proc/{p}/status").read_text(), re.M).group(1))
        total["pss_kib"] += int(re.search(r"^Pss:\s+(\d+)", Path(f"/proc/{p}/smaps_rollup").read_text(), re.M).group(1))
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", type=Path, default=default_out_dir() / PLAN, help="(default: %(default)s)")
    p.add_argument("--tokens", type=int, default=32, help="decoded tokens per run (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="(default: %(default)s)")
    args = p.parse_args(argv)
    plan = PartitionPlan.load(args.plan)
    prompt = Tokenizer.from_file(str(plan.checkpoint / "tokenizer.json")).encode(PROMPT).ids
    out = {"threads": torch.get_num_threads(), "tokens": args.tokens, "plan": plan.to_dict(plan.checkpoint)}
    hf = AutoModelForCausalLM.from_pretrained(plan.checkpoint, dtype=torch.float32).eval()
    local = LocalCloud(load_model(plan.checkpoint))
    edge = EdgePartition(load_runner("torch", plan), plan)
    one_exit = EdgePartition(edge.runner, replace(plan, exit_layers=(plan.split_layer,)))  # what 2 exit heads cost
    with tempfile.TemporaryDirectory() as repo:
        write_repository(plan, Path(repo))
        server = TritonServer(repo).start(timeout_s=600)
        try:
            out["server_loaded"] = _memory_kib(server.pid)
            runs = {"hf_forward": _hf_forward(hf, prompt),
                    "layer_loop_full_model": _generate(None, local, "cloud-only", prompt),
                    "standalone_edge": _generate(edge, None, "standalone", prompt),
                    "standalone_edge_one_exit": _generate(one_exit, None, "standalone", prompt),
                    "cloud_only_triton": _generate(None, TritonLink(server.grpc_url, "cloud_only"), "cloud-only",
                                                   prompt)}
            out["load_average_before"] = os.getloadavg()[0]
            out.update(_interleaved(runs, args.tokens, args.repeats))
            out["load_average_after"] = os.getloadavg()[0]
            out["server_after"] = _memory_kib(server.pid)
        finally:
            server.stop()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
