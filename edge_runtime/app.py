"""An edge application's pieces, loaded once from a partition plan: runner, tokenizer, generators."""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from edge_runtime.decoding import Generator, LatencyPolicy
from plugin.model.checkpoint import read_config
from plugin.model.sampling import Greedy, Sampler
from plugin.paths import DEMO_PLAN
from plugin.split.edge import EdgePartition
from plugin.split.plan import PartitionPlan




class ModelMissing(FileNotFoundError):
    """The plan's checkpoint is not there: say how to make it."""


@dataclass
class EdgeApp:
    plan: PartitionPlan
    edge: EdgePartition
    tokenizer: Tokenizer
    eos_token_ids: tuple[int, ...]

    @classmethod
    def load(cls, plan_path: str | Path = DEMO_PLAN, runner: str = "torch", **runner_options) -> "EdgeApp":
        """runner: torch, onnx or tensorrt (options go to edge_runtime.runners.load_runner)."""
        from edge_runtime.runners import load_runner

        plan = PartitionPlan.load(plan_path)
        if not (plan.checkpoint / "config.json").is_file():
            raise ModelMissing(f"no checkpoint at {plan.checkpoint} (named by {plan_path}); for the demo model run "
                               "`.venv/bin/python build/train_demo_model.py`, or point --plan at your own plan")
        eos_token_ids = read_config(plan.checkpoint).eos_token_ids  # an unimplemented config field stops us here
        tokenizer = Tokenizer.from_file(str(plan.checkpoint / "tokenizer.json"))
        edge = EdgePartition(load_runner(runner, plan, **runner_options), plan)
        return cls(plan, edge, tokenizer, eos_token_ids)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def generator(self, mode: str, link=None, threshold: float | None = None, codec: str | None = None,
                  sampler: Sampler | None = None, sequence_id: int | None = None, async_uploads: bool = True,
                  latency: LatencyPolicy | None = None, speculate: bool = True) -> Generator:
        """A fresh session; sequence ids are random 63-bit numbers unless given (0 is reserved by Triton)."""
        return Generator(self.edge, link, mode, threshold=threshold, codec=codec, sampler=sampler or Greedy(),
                         eos_token_ids=self.eos_token_ids,
                         sequence_id=sequence_id or secrets.randbits(63) | 1, async_uploads=async_uploads,
                         latency=latency, speculate=speculate)
