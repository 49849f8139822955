"""A service with a bug, served through the real adapter: its traceback must reach the server log and
its requests must fail with the INTERNAL code (tests/test_triton_cloud.py)."""
from __future__ import annotations

from pathlib import Path

from plugin.split.limits import Limits

NAME = "broken"
BUG = "ce-collm-test: a deliberate bug in execute"
CONFIG = f"""name: "{NAME}"
backend: "python"
max_batch_size: 0
input [ {{ name: "IN" data_type: TYPE_FP32 dims: [ -1 ] }} ]
output [ {{ name: "OUT" data_type: TYPE_FP32 dims: [ -1 ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""
MODEL = """from plugin.serving.triton_adapter import model_class
from tests.broken_service import BrokenService

TritonPythonModel = model_class(BrokenService)
"""


class BrokenService:
    def __init__(self, params: dict[str, str], repository_root: Path, device: str = "cpu"):
        self.limits = Limits()

    def execute(self, batch):
        raise RuntimeError(BUG)

    def sweep(self) -> list[int]:
        return []

    def metrics(self) -> dict[str, float]:
        return {}


def add_broken_model(repo: Path) -> None:
    (repo / NAME / "1").mkdir(parents=True)
    (repo / NAME / "config.pbtxt").write_text(CONFIG)
    (repo / NAME / "1" / "model.py").write_text(MODEL)
