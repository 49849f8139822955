"""An edge application's pieces, loaded once from a partition plan: runner, tokenizer, sessions."""
from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from pathlib import Path

from tokenizers import Tokenizer

from edge_runtime.generation import TokenLoop
from edge_runtime.link import CloudLink
from edge_runtime.parts import SessionOptions
from edge_runtime.policy import Mode
from edge_runtime.session import session_for
from plugin.model.files import read_config
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
    def load(cls, plan_path: str | Path = DEMO_PLAN, runner: str = "auto", **runner_options) -> "EdgeApp":
        """runner: auto, torch, onnx or tensorrt (options go to edge_runtime.runners.load_runner)."""
        from edge_runtime.runners import load_runner

        plan = load_plan(plan_path)
        eos_token_ids = read_config(plan.checkpoint).eos_token_ids  # an unimplemented config field stops us here
        tokenizer = Tokenizer.from_file(str(plan.checkpoint / "tokenizer.json"))
        edge = EdgePartition(load_runner(runner, plan, **runner_options), plan)
        return cls(plan, edge, tokenizer, eos_token_ids)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def session(self, mode: Mode | str, link: CloudLink | None = None,
                options: SessionOptions = SessionOptions(async_uploads=True)) -> TokenLoop:
        """A fresh session (any of session.SESSION_MODES) stopping at the model's EOS tokens; the sequence id is a
        random 63-bit number unless the options give one (0 is reserved by Triton)."""
        options = replace(options, eos_token_ids=self.eos_token_ids,
                          sequence_id=options.sequence_id or secrets.randbits(63) | 1)
        return session_for(mode, self.edge, link, options)


def load_plan(plan_path: str | Path) -> PartitionPlan:
    """The plan, refused (ModelMissing, saying how to make it) when its checkpoint is not there."""
    plan = PartitionPlan.load(plan_path)
    if not (plan.checkpoint / "config.json").is_file():
        raise ModelMissing(f"no checkpoint at {plan.checkpoint} (named by {plan_path}); for the demo model run "
                           "`.venv/bin/python build/train_demo_model.py`, or point --plan at your own plan")
    return plan
