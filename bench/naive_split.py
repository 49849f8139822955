"""The naive split baseline: a plain split model with no context manager and no early exits.

The edge runs layers [0, k) for every token and sends, with every token request, the layer-k hidden
states of the WHOLE context; the server recomputes layers [k, N) from scratch for all of them
(no stored KV, no session) and returns the next token. This is what splitting a model across the
network costs without CE-CoLLM's context manager: bytes up grow with the context on every token,
and so does the cloud's work.

It is served by a bench-only python model, `naive_split`, that `write_bench_repository` adds to a
repository generated from the partition plan (the deployable `model_repository/` does not carry
it). Its tensors are the ensemble's edge inputs and token outputs (plugin/protocol/messages.py).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from edge_runtime.generation import Generation, TokenRecord
from edge_runtime.link import CloudLink
from plugin.model.checkpoint import load_model, read_config
from plugin.protocol.codec import decode, encode
from plugin.protocol.errors import ErrorCode, ProtocolError
from plugin.protocol.messages import CloudRequest, PendingBlock
from plugin.protocol.wire import reply_outputs, request_from_inputs, Tensors
from plugin.serving.repository import block, edge_inputs, parameters, ServeOptions, token_outputs, write_repository
from plugin.serving.services import checkpoint_path, DTYPES, limits_from, one_by_one, RequestData, Result
from plugin.split.cloud import CloudPartition
from plugin.split.edge import EdgePartition
from plugin.split.plan import PartitionPlan

MODEL_NAME = "naive_split"
_SCRATCH_ID = 1  # every request is its own one-shot sequence in the partition
_SCRATCH_KEY = 1  # ... and the partition binds a sequence to a key

# served through the same adapter as the deployable models
MODEL_PY = '''"""naive_split (bench only): layers [k, N) from scratch for the whole context (bench/naive_split.py)."""
from bench.naive_split import NaiveSplitService
from plugin.serving.triton_adapter import model_class

TritonPythonModel = model_class(NaiveSplitService)
'''


class NaiveSplitService:
    """Tensors in, tensors out: the whole context's layer-k rows -> the next token (stateless)."""

    def __init__(self, params: dict[str, str], repository_root: Path, device: str = "cpu"):
        checkpoint = checkpoint_path(params, repository_root)
        cfg = read_config(checkpoint)
        self.split_layer = int(params["split_layer"])
        model = load_model(checkpoint, range(self.split_layer, cfg.num_layers), DTYPES[params.get("dtype", "float32")],
                           device)
        self.limits = limits_from(params)
        self.partition = CloudPartition(model, self.limits)

    def answer(self, inputs: Tensors) -> Tensors:
        """One request: the next token after the whole context."""
        req = request_from_inputs(inputs, _SCRATCH_ID, start=True, end=True)
        if req.rows is None or req.start_pos != 0 or not req.want_token:
            raise ProtocolError(ErrorCode.MALFORMED,
                                "naive_split wants the whole context's hidden rows from position 0 and WANT_TOKEN true")
        if req.split_layer is not None and req.split_layer != self.split_layer:
            raise ProtocolError(ErrorCode.SPLIT_LAYER,
                                f"this naive_split model resumes at layer {self.split_layer}, not {req.split_layer}")
        hidden = torch.from_numpy(decode(req.rows, self.partition.model.cfg.hidden_size))  # [n, D]
        if hidden.shape[0] == 0:
            raise ProtocolError(ErrorCode.MALFORMED, "no rows: the naive split needs the whole context")
        # start=True and end=True: a fresh KV store for this request alone, dropped after it
        pending = PendingBlock(_SCRATCH_ID, self.split_layer, 0, hidden, True, start=True, end=True,
                               session_key=_SCRATCH_KEY)
        reply = self.partition.step([pending])[0]
        if isinstance(reply, ProtocolError):
            raise reply
        return reply_outputs(reply, self.partition.top_k)

    def execute(self, batch: list[RequestData]) -> list[Result]:
        """One request after the other: they would share the scratch sequence."""
        return one_by_one(batch, lambda r: self.answer(r.inputs))

    def sweep(self) -> list[int]:
        return self.partition.expire()

    def metrics(self) -> dict[str, float]:
        return {"tokens_served_total": self.partition.tokens_served,
                "layer_rows_computed_total": self.partition.rows_computed}


def render_config(plan: PartitionPlan, repository_dir: Path, opts: ServeOptions) -> str:
    cfg = read_config(plan.checkpoint)
    params = {"checkpoint": os.path.relpath(plan.checkpoint, repository_dir), "split_layer": str(plan.split_layer),
              "dtype": opts.dtype, **opts.limits.params()}
    return (
        f"# Generated by bench/naive_split.py (bench only): split layer {plan.split_layer}, hidden {cfg.hidden_size}.\n"
        f'name: "{MODEL_NAME}"\nbackend: "python"\nmax_batch_size: {opts.max_batch_size}\n'
        f"instance_group [ {{ count: {opts.instances} kind: {opts.instance_kind} }} ]\n"
        + block("input", edge_inputs(cfg.hidden_size, verification=False))
        + block("output", token_outputs(cfg.hidden_size, verification=False))
        + parameters(params)
    )


def write_bench_repository(plan: PartitionPlan, out_dir: Path, opts: ServeOptions = ServeOptions()) -> list[Path]:
    """The deployable repository (ce_collm, context_manager, cloud_partition, cloud_only) + naive_split."""
    out_dir = Path(out_dir).resolve()
    written = write_repository(plan, out_dir, opts)
    (out_dir / MODEL_NAME / "1").mkdir(parents=True, exist_ok=True)
    (out_dir / MODEL_NAME / "config.pbtxt").write_text(render_config(plan, out_dir, opts))
    (out_dir / MODEL_NAME / "1" / "model.py").write_text(MODEL_PY)
    return written + [out_dir / MODEL_NAME / "config.pbtxt"]


class NaiveSplitSession:
    """The edge side of the naive split: layers [0, k) for every token, then the whole context up.

    Streams TokenRecords like the sessions of `edge_runtime.session.session_for`, with the same SessionStats.
    """

    def __init__(self, edge: EdgePartition, link: CloudLink, codec: str = "fp16"):
        self.edge, self.link, self.codec = edge, link, codec
        self.generation: Generation | None = None

    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> Generation:
        out = Generation(list(prompt_ids))
        for record in self.stream(prompt_ids, max_new_tokens, out):
            out.token_ids.append(record.token_id)
            out.records.append(record)
        return out

    def stream(self, prompt_ids: list[int], max_new_tokens: int, out: Generation | None = None) -> Iterator[TokenRecord]:
        out = out or Generation(list(prompt_ids))
        self.generation = out
        stats, runner, split = out.stats, self.edge.runner, self.edge.plan.split_layer
        state = runner.new_sequence()
        context: list[np.ndarray] = []  # layer-k rows of every position so far, [n_i, D] each
        block, pos = list(prompt_ids), 0
        t_start = time.perf_counter()
        try:
            for _ in range(max_new_tokens):
                t0 = time.perf_counter()
                h, first = np.array(block, np.int64), 0
                for boundary in self.edge.plan.boundaries:  # the runner's segments; no exit heads
                    h, first = runner.run(first, boundary, h, pos, state, None).hidden, boundary  # [T, D]
                context.append(h)
                stats.edge_s += time.perf_counter() - t0
                rows = encode(np.concatenate(context), self.codec)  # the whole context, every time
                req = CloudRequest(0, 0, True, rows=rows, split_layer=split)  # sequence id 0: stateless
                t1 = time.perf_counter()
                reply = self.link.send(req)
                stats.cloud_wait_s += time.perf_counter() - t1
                stats.bytes_up += req.nbytes
                stats.bytes_down += reply.nbytes
                stats.cloud_requests += 1
                record = TokenRecord(reply.topk_ids[0], "cloud", [], {i: h.shape[0] for i in range(split)},
                                     reply.catchup_rows)
                pos += len(block)
                block = [record.token_id]
                yield record
        finally:
            stats.wall_s = time.perf_counter() - t_start
