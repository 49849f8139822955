"""What each Triton python model does, as plain classes: tensors in, tensors (or an error) out.

`triton_adapter.py` wraps these for the python backend; tests drive them directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from plugin.model.checkpoint import load_model, read_config
from plugin.protocol.errors import ProtocolError
from plugin.protocol.wire import block_from_inputs, block_outputs, reply_outputs, request_from_inputs, Tensors
from plugin.split.cloud import CloudPartition, token_block
from plugin.split.context import ContextManager
from plugin.split.limits import Limits

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class RequestData:
    inputs: Tensors
    sequence_id: int | str  # str: a string sequence id, which request_from_inputs refuses
    start: bool
    end: bool


Result = Tensors | Exception


def limits_from(params: dict[str, str]) -> Limits:
    base = Limits()
    return Limits(
        max_sessions=int(params.get("max_sessions", base.max_sessions)),
        max_context=int(params.get("max_context", base.max_context)),
        max_block_rows=int(params.get("max_block_rows", base.max_block_rows)),
        ttl_s=float(params.get("ttl_s", base.ttl_s)),
        max_request_bytes=int(params.get("max_request_bytes", base.max_request_bytes)),
        max_requests_per_s=float(params.get("max_requests_per_s", base.max_requests_per_s)),
    )


def checkpoint_path(params: dict[str, str], repository_root: Path) -> Path:
    """The `checkpoint` parameter is relative to the model repository's root folder."""
    if "checkpoint" not in params:
        raise ValueError("config.pbtxt needs parameters { key: \"checkpoint\" ... } naming the HF checkpoint folder")
    return (repository_root / params["checkpoint"]).resolve()


class ContextManagerService:
    def __init__(self, params: dict[str, str], repository_root: Path):
        cfg = read_config(checkpoint_path(params, repository_root))
        self.limits = limits_from(params)
        self.manager = ContextManager(cfg.hidden_size, cfg.num_layers, self.limits)

    def execute(self, batch: list[RequestData]) -> list[Result]:
        results: list[Result] = []
        for r in batch:
            try:
                req = request_from_inputs(r.inputs, r.sequence_id, r.start, r.end)
                results.append(block_outputs(self.manager.handle(req)))
            except ProtocolError as e:
                results.append(e)
        return results

    def sweep(self) -> list[int]:
        """Expire idle sessions now; the adapter calls it periodically, between requests."""
        return self.manager.expire()

    def metrics(self) -> dict[str, float]:
        return {"sessions_live": len(self.manager.sessions), "rows_uploaded_total": self.manager.rows_uploaded,
                "pending_bytes": self.manager.pending_bytes}


class CloudService:
    """The cloud partition (blocks from the context manager) or, with `token_input`, the cloud-only
    baseline (token ids straight from the client, full model)."""

    def __init__(self, params: dict[str, str], repository_root: Path, device: str, token_input: bool):
        checkpoint = checkpoint_path(params, repository_root)
        num_layers = read_config(checkpoint).num_layers
        first = 0 if token_input else int(params.get("min_split_layer", 1))
        model = load_model(checkpoint, range(first, num_layers), DTYPES[params.get("dtype", "float32")], device)
        self.limits = limits_from(params)
        self.partition = CloudPartition(model, self.limits)
        self.token_input = token_input

    def _block(self, r: RequestData):
        if self.token_input:
            req = request_from_inputs(r.inputs, r.sequence_id, r.start, r.end)
            return token_block(req, self.partition.model.cfg.vocab_size, self.partition.limits)
        return block_from_inputs(r.inputs, r.sequence_id, r.start, r.end)

    def execute(self, batch: list[RequestData]) -> list[Result]:
        results: list[Result] = [ProtocolError("not computed")] * len(batch)
        blocks, where = [], []
        for i, r in enumerate(batch):
            try:
                blocks.append(self._block(r))
                where.append(i)
            except ProtocolError as e:
                results[i] = e
        for i, reply in zip(where, self.partition.step(blocks)):
            results[i] = reply if isinstance(reply, Exception) else reply_outputs(reply, self.partition.top_k)
        return results

    def sweep(self) -> list[int]:
        return self.partition.expire()

    def metrics(self) -> dict[str, float]:
        p = self.partition
        return {"sessions_live": len(p.sequences), "tokens_served_total": p.tokens_served,
                "layer_rows_computed_total": p.rows_computed, "kv_bytes": p.kv_bytes}

