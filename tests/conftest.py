"""Shared fixtures. Integration tests get real tritonservers from `start_server`."""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) from anywhere still imports plugin
    sys.path.insert(0, str(REPO_ROOT))

from plugin.serving.server import TritonServer, find_tritonserver, prepare_backend_dir  # noqa: E402

StartServer = Callable[..., TritonServer]


@pytest.fixture(scope="session")
def triton_backend_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One backend folder per test session, so tests never write outside the pytest tmp dir.

    A missing tritonserver fails (with its install hint) rather than skips: `make test` installs
    it, so its absence is a broken install, not a reason to run fewer tests.
    """
    return prepare_backend_dir(tmp_path_factory.mktemp("triton-backends"), find_tritonserver())


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory, triton_backend_dir: Path) -> Iterator[StartServer]:
    """start_server(model_repository, timeout_s=120, **TritonServer kwargs) -> a started server.

    Logs go to <pytest tmp>/triton-logs*/; every server is stopped at the end of the session
    (a test may also use the server as a context manager, or stop it itself).
    """
    logs = tmp_path_factory.mktemp("triton-logs")
    servers: list[TritonServer] = []

    def start(model_repository: Path, *, timeout_s: float = 120.0, **kwargs: Any) -> TritonServer:
        kwargs.setdefault("log_file", logs / f"{len(servers):02d}-{Path(model_repository).name}.log")
        # live test sequences would otherwise hold every stop/restart for Triton's default 30 s
        kwargs["extra_args"] = ["--exit-timeout-secs=3", *kwargs.get("extra_args", ())]
        server = TritonServer(model_repository, backend_dir=triton_backend_dir, **kwargs)
        servers.append(server)
        return server.start(timeout_s)

    yield start
    with ThreadPoolExecutor(max(1, len(servers))) as pool:  # each may wait out its exit timeout: wait once
        list(pool.map(lambda server: server.stop(timeout_s=30), servers))
