"""What each Triton python model does, as plain classes: tensors in, tensors (or an error) out.

`triton_adapter.py` wraps these for the python backend (each model.py names its service class);
tests drive them directly.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from plugin.model.checkpoint import load_model, read_config
from plugin.model.decoder import DecoderModel
from plugin.protocol.errors import ErrorCode, ProtocolError
from plugin.protocol.messages import CloudRequest, LOOKUP_EXIT
from plugin.protocol.wire import block_from_inputs, block_outputs, reply_outputs, request_from_inputs, Tensors
from plugin.split.cloud import Block, CloudPartition
from plugin.split.cloud_only import CloudOnly
from plugin.split.context import ContextManager
from plugin.split.limits import Limits, MemoryBudget

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class RequestData:
    inputs: Tensors
    sequence_id: int | str  # str: a string sequence id, which request_from_inputs refuses
    start: bool
    end: bool
    client: str = ""  # the front's CLIENT_HEADER, which Triton forwards as a request parameter; "" without a front

    def request(self) -> CloudRequest:
        """The edge-facing request it carries."""
        req = request_from_inputs(self.inputs, self.sequence_id, self.start, self.end)
        req.client = self.client
        return req


Result = Tensors | ProtocolError


class Service(Protocol):
    """What the adapter needs of a model's service, built as `cls(params, repository_root, device)` from
    the config.pbtxt parameters, the model repository's parent folder and "cpu" or "cuda:N"."""

    limits: Limits  # its TTL sets how often the adapter sweeps

    def execute(self, batch: list[RequestData]) -> list[Result]:
        """One result per request, in order: output tensors, or the ProtocolError refusing that request."""

    def sweep(self) -> list[int]:
        """Expire idle sessions now; the adapter calls it periodically, between requests."""

    def metrics(self) -> dict[str, float | dict[int, float]]:
        """Counters (names ending in _total) and gauges, reported after every execute(); a dict holds one value
        per value of the metric's label (triton_adapter.METRIC_LABELS)."""


def error_answer(error: Exception, where: str = "") -> ProtocolError:
    """What a request that raised `error` is answered, kept without the traceback (which would keep every frame
    it passed through alive, request arrays included): a refusal as it is; anything else, a bug, INTERNAL with
    its traceback as text for the server log."""
    if isinstance(error, ProtocolError):
        return error.detached()
    return ProtocolError(ErrorCode.INTERNAL, f"{where}internal error: {type(error).__name__}: {error}",
                         "".join(traceback.format_exception(error)))


def one_by_one(batch: list[RequestData], answer: Callable[[RequestData], Tensors]) -> list[Result]:
    """Each request answered on its own; a refused or failing one fails alone."""
    results: list[Result] = []
    for r in batch:
        try:
            results.append(answer(r))
        except Exception as e:  # refused, or a bug met by this request alone
            results.append(error_answer(e))
    return results


def budget_metrics(budget: MemoryBudget) -> dict[str, float]:
    return {"state_budget_bytes": budget.limit_bytes, "memory_refusals_total": budget.refusals}


def limits_from(params: dict[str, str]) -> Limits:
    return Limits.from_params(params)


def min_split_layer(params: dict[str, str]) -> int:
    """The first layer the cloud partition holds (written for context_manager and cloud_partition alike)."""
    return int(params.get("min_split_layer", 1))


def max_split_layer(params: dict[str, str]) -> int | None:
    """The last split the cloud partition resumes at, when it is not every layer it holds (an engine's)."""
    return int(params["max_split_layer"]) if "max_split_layer" in params else None


def checkpoint_path(params: dict[str, str], repository_root: Path) -> Path:
    """The `checkpoint` parameter is relative to the model repository's root folder."""
    if "checkpoint" not in params:
        raise ValueError("config.pbtxt needs parameters { key: \"checkpoint\" ... } naming the HF checkpoint folder")
    return (repository_root / params["checkpoint"]).resolve()


class ContextManagerService:
    def __init__(self, params: dict[str, str], repository_root: Path, device: str = "cpu"):
        cfg = read_config(checkpoint_path(params, repository_root))
        self.limits = limits_from(params).within(cfg.position_limit)
        self.manager = ContextManager(cfg.hidden_size, cfg.num_layers, self.limits,
                                      min_split_layer=min_split_layer(params), vocab_size=cfg.vocab_size,
                                      max_split_layer=max_split_layer(params))  # rows stay in RAM
        # a TensorRT engine behind it takes the rows decoded (trt_repository.py); the python partition, encoded
        self.decoded_hop = params.get("decoded_hop") == "true"

    def execute(self, batch: list[RequestData]) -> list[Result]:
        return one_by_one(batch, self._answer)

    def _answer(self, r: RequestData) -> Tensors:
        return block_outputs(self.manager.handle(r.request()), self.decoded_hop)

    def sweep(self) -> list[int]:
        return self.manager.expire()

    def metrics(self) -> dict[str, float]:
        m = self.manager
        return {"sessions_live": len(m.sessions), "rows_uploaded_total": m.rows_uploaded,
                "pending_bytes": m.pending_bytes, **budget_metrics(m.budget)}


class CloudPartitionService:
    """The cloud partition: layers [min_split_layer, N) over the blocks the context manager hands it."""

    row_outputs = True  # its config declares ROW_TOPK_* (the verdicts on drafts)

    def __init__(self, params: dict[str, str], repository_root: Path, device: str = "cpu"):
        checkpoint = checkpoint_path(params, repository_root)
        num_layers = read_config(checkpoint).num_layers
        layers = range(self._first_layer(params), num_layers)
        model = load_model(checkpoint, layers, DTYPES[params.get("dtype", "float32")], device)
        self.limits = limits_from(params)
        self.partition = self._partition(model)
        # the plan's exits: the per-exit agreement metrics count drafts from these alone, so a client that names
        # other exits cannot add series of its own (theirs are counted under "other")
        self.exits = {int(e) for e in params["exit_layers"].split(",")} if params.get("exit_layers") else None

    def _first_layer(self, params: dict[str, str]) -> int:
        return min_split_layer(params)

    def _partition(self, model: DecoderModel) -> CloudPartition:
        """The partition this model computes with: over the context manager's blocks here."""
        return CloudPartition(model, self.limits)

    def _block(self, r: RequestData) -> Block:
        block = block_from_inputs(r.inputs, r.sequence_id, r.start, r.end)
        block.client = r.client
        return block

    def execute(self, batch: list[RequestData]) -> list[Result]:
        results: list[Result | None] = [None] * len(batch)  # every entry is filled below
        blocks, where = [], []
        for i, r in enumerate(batch):
            try:
                blocks.append(self._block(r))
                where.append(i)
            except Exception as e:  # refused, or a bug met by this request alone
                results[i] = error_answer(e)
        for i, reply in zip(where, self.partition.step(blocks)):
            results[i] = reply if isinstance(reply, ProtocolError) else reply_outputs(reply, self.partition.top_k,
                                                                                      self.row_outputs)
        return results

    def sweep(self) -> list[int]:
        return self.partition.expire()

    def metrics(self) -> dict[str, float | dict[int, float]]:
        p = self.partition
        return {"sessions_live": len(p.sequences), "tokens_served_total": p.tokens_served,
                "layer_rows_computed_total": p.rows_computed, "kv_bytes": p.kv_bytes, **budget_metrics(p.budget),
                "verified_rows_total": self._by_exit(p.drafts_checked),
                "draft_agreements_total": self._by_exit(p.drafts_agreed)}

    def _by_exit(self, counts: dict[int, int]) -> dict[int | str, float]:
        """Per plan exit, drafts looked up in the sequence's tokens under "lookup", every other exit a client named
        together under "other"."""
        if self.exits is None:
            return dict(counts)
        out: dict[int | str, float] = {e: counts.get(e, 0) for e in sorted(self.exits)}
        out["lookup"] = counts.get(LOOKUP_EXIT, 0)
        out["other"] = sum(n for e, n in counts.items() if e not in self.exits and e != LOOKUP_EXIT)
        return out


class CloudOnlyService(CloudPartitionService):
    """The cloud-only baseline: token ids straight from the client into the whole model (no context manager)."""

    row_outputs = False

    def _first_layer(self, params: dict[str, str]) -> int:
        return 0

    def _partition(self, model: DecoderModel) -> CloudPartition:
        """Cloud-only's own, fed token ids; the CloudOnly is kept for its request checks."""
        self.cloud_only = CloudOnly(model, self.limits)
        return self.cloud_only.partition

    def _block(self, r: RequestData) -> Block:
        return self.cloud_only.block(r.request())
