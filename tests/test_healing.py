"""A dead Python-backend stub heals, and a killed launcher leaves no tritonserver behind (issue 18).

Triton 2.51 never restarts a stub that died (ENVIRONMENT.md); `TritonServer(heal_stubs=True)` (what
`ce-collm serve` runs) unloads and loads that model again. Each test kills a real stub process with
SIGKILL, as the out-of-memory killer would, and checks that the model answers again with the tokens
of an undisturbed run.
"""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_runtime.cloud_only import CloudOnlySession
from edge_runtime.session import DecodingSession
from edge_runtime.runners import TorchRunner
from edge_runtime.triton_link import TritonLink
from plugin.model.checkpoint import load_model
from plugin.paths import REPO_ROOT
from plugin.serving.healer import stub_processes
from plugin.serving.repository import write_repository
from plugin.serving.server import free_ports
from plugin.split.edge import EdgePartition
from plugin.split.local import LocalCloud
from plugin.split.plan import PartitionPlan
from tests.tiny_models import LAYERS, save_tiny

pytestmark = pytest.mark.server
SPLIT, EXITS = 4, (2, 4)
PROMPT = [5, 17, 33, 2, 71, 8]


@pytest.fixture(scope="module")
def healing(tmp_path_factory, start_server):
    ckpt = tmp_path_factory.mktemp("ckpt")
    save_tiny("llama", ckpt)
    plan = PartitionPlan(ckpt, SPLIT, EXITS, threshold=1.0)
    repo = tmp_path_factory.mktemp("repo")
    write_repository(plan, repo)
    server = start_server(repo, heal_stubs=True)
    edge = EdgePartition(TorchRunner(load_model(ckpt, range(0, SPLIT))), plan)
    reference = DecodingSession(edge, LocalCloud(load_model(ckpt, range(SPLIT, LAYERS))), "collaborative",
                          sequence_id=1).generate(PROMPT, 12).token_ids
    return server, edge, reference


def _tokens(server, edge, mode: str, sequence_id: int) -> list[int]:
    if mode == "cloud-only":
        gen = CloudOnlySession(TritonLink(server.grpc_url, "cloud_only"), sequence_id=sequence_id)
    else:
        gen = DecodingSession(edge, TritonLink(server.grpc_url), mode, sequence_id=sequence_id)
    return gen.generate(PROMPT, 12).token_ids


@pytest.mark.parametrize("model", ["context_manager", "cloud_partition", "cloud_only"])
def test_a_killed_stub_is_reloaded_and_its_model_serves_again(healing, model):
    server, edge, reference = healing
    mode = "cloud-only" if model == "cloud_only" else "collaborative"
    heals = len(server.healer.heals)
    victims = [pid for pid, name in stub_processes(server.pid).items() if name == model]
    assert len(victims) == 1, f"one stub per model expected, got {stub_processes(server.pid)}"
    os.kill(victims[0], signal.SIGKILL)
    deadline = time.monotonic() + 120
    while len(server.healer.heals) == heals:
        assert time.monotonic() < deadline, f"{model} not reloaded within 120 s:\n{server.log_tail()}"
        time.sleep(0.2)
    heal = server.healer.heals[-1]
    assert (heal.model, heal.dead_pid) == (model, victims[0])
    assert victims[0] not in stub_processes(server.pid) and model in stub_processes(server.pid).values()
    ref = reference if mode == "collaborative" else _tokens(server, edge, "collaborative", 50)
    assert _tokens(server, edge, mode, 100 + heals) == ref
    print(f"{model}: stub {victims[0]} killed, model back after {heal.seconds:.1f} s")


def _read_lines(stream, lines: "queue.Queue[str]") -> None:
    for line in iter(stream.readline, ""):
        lines.put(line)


def test_killing_ce_collm_serve_leaves_no_tritonserver(healing, tmp_path: Path) -> None:
    repo = healing[0].model_repository
    ports = free_ports(3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "plugin.cli", "serve", "--model-repository", str(repo), "--grpc-port", str(ports[0]),
         "--http-port", str(ports[1]), "--metrics-port", str(ports[2])],
        cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    server_pid, deadline = None, time.monotonic() + 180
    try:
        while server_pid is None:
            assert proc.poll() is None and time.monotonic() < deadline, "ce-collm serve did not get ready"
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if "(tritonserver " in line and "pid " in line:
                server_pid = int(line.split("pid ")[1].split(")")[0])
        proc.send_signal(signal.SIGKILL)  # no chance to stop its child
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _alive(server_pid):
            assert time.monotonic() < deadline, f"tritonserver {server_pid} outlived its launcher"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
        if server_pid is not None and _alive(server_pid):
            os.kill(server_pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
