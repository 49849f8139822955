"""A cloud partition that fails once when a test arms it, served through the real adapter in place of
`cloud_partition` (tests/test_isolation.py): the failure comes after the context manager applied the
request, as a fault inside the layers would."""
from __future__ import annotations

from pathlib import Path

from plugin.protocol.tensors import PENDING_WANT
from plugin.serving.services import CloudPartitionService, RequestData, Result

ARMED = "cloud_partition_fails_once"  # a file in the model repository's folder: the next token batch fails
MODEL = """from plugin.serving.triton_adapter import model_class
from tests.failing_service import FailOnceService

TritonPythonModel = model_class(FailOnceService)
"""


class FailOnceService(CloudPartitionService):
    def __init__(self, params: dict[str, str], repository_root: Path, device: str = "cpu"):
        super().__init__(params, repository_root, device)
        self.armed = repository_root / ARMED

    def execute(self, batch: list[RequestData]) -> list[Result]:
        wants_token = any(bool(r.inputs[PENDING_WANT][0, 0]) for r in batch)
        if not (wants_token and self.armed.exists()):
            return super().execute(batch)
        self.armed.unlink()
        model = self.partition.model
        model.run_layers = _fault  # this batch only: every computation in it fails
        try:
            return super().execute(batch)
        finally:
            del model.run_layers


def _fault(*args, **kwargs):
    raise RuntimeError("ce-collm-test: the cloud partition fails once, after the context manager applied the request")


def use_failing_partition(repo: Path) -> None:
    """Serve `cloud_partition` of the repository at `repo` with FailOnceService."""
    (repo / "cloud_partition" / "1" / "model.py").write_text(MODEL)


def arm(repo: Path) -> None:
    (repo / ARMED).touch()
