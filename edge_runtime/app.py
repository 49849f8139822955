"""An edge application's pieces, loaded once from a partition plan: runner, tokenizer, sessions."""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from edge_runtime.cloud_only import CloudOnlySession
from edge_runtime.policy import LatencyPolicy, Mode, session_mode
from edge_runtime.session import DecodingSession
from edge_runtime.verified import DraftLength
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

    def session(self, mode: Mode | str, link=None, threshold: float | None = None, codec: str | None = None,
                sampler: Sampler | None = None, sequence_id: int | None = None, async_uploads: bool = True,
                latency: LatencyPolicy | None = None, speculate: bool = True, fidelity: bool = False,
                draft_length: DraftLength | None = None) -> DecodingSession | CloudOnlySession:
        """A fresh session; sequence ids are random 63-bit numbers unless given (0 is reserved by Triton).
        mode: any of policy.SESSION_MODES ("verified" and "verified-latency-aware" check every token)."""
        sequence_id = sequence_id or secrets.randbits(63) | 1
        mode, verify = session_mode(mode)
        if mode is Mode.CLOUD_ONLY:
            return CloudOnlySession(link, sampler, self.eos_token_ids, sequence_id)
        return DecodingSession(self.edge, link, mode, threshold=threshold, codec=codec, sampler=sampler or Greedy(),
                               eos_token_ids=self.eos_token_ids, sequence_id=sequence_id,
                               async_uploads=async_uploads, latency=latency, speculate=speculate, verify=verify,
                               fidelity=fidelity, draft_length=draft_length)
