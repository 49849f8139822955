"""A dead Python-backend stub heals, and a killed launcher leaves no tritonserver behind (issue 18).

Triton 2.51 never restarts a stub that died (docs/triton-facts.md); `TritonServer(heal_stubs=True)` (what
`ce-collm serve` runs) unloads and loads that model again. Each test kills a real stub process with
SIGKILL, as the out-of-memory killer would, and checks that the model answers again with the tokens
of an undisturbed run. An edge in the middle of a generation sees the dead stub and the reload as a
cloud that is not serving (MODEL_DOWN): collaborative mode waits within its patience, latency-aware
mode answers on the edge meanwhile, and both re-sync once the model is back.
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
import torch

from edge_runtime.cloud_only import CloudOnlySession
from edge_runtime.policy import LatencyPolicy
from edge_runtime.reconnect import ReconnectingLink
from edge_runtime.session import DecodingSession
from edge_runtime.torch_runner import TorchRunner
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
    hf = save_tiny("llama", ckpt)
    plan = PartitionPlan(ckpt, SPLIT, EXITS, threshold=1.0)
    repo = tmp_path_factory.mktemp("repo")
    write_repository(plan, repo)
    server = start_server(repo, heal_stubs=True)
    edge = EdgePartition(TorchRunner(load_model(ckpt, range(0, SPLIT))), plan)
    reference = DecodingSession(edge, LocalCloud(load_model(ckpt, range(SPLIT, LAYERS))), "collaborative",
                          sequence_id=1).generate(PROMPT, 12).token_ids
    return server, edge, reference, hf


def _tokens(server, edge, mode: str, sequence_id: int) -> list[int]:
    if mode == "cloud-only":
        gen = CloudOnlySession(TritonLink(server.grpc_url, "cloud_only"), sequence_id=sequence_id)
    else:
        gen = DecodingSession(edge, TritonLink(server.grpc_url), mode, sequence_id=sequence_id)
    return gen.generate(PROMPT, 12).token_ids


@pytest.mark.parametrize("model", ["context_manager", "cloud_partition", "cloud_only"])
def test_a_killed_stub_is_reloaded_and_its_model_serves_again(healing, model):
    server, edge, reference, _ = healing
    mode = "cloud-only" if model == "cloud_only" else "collaborative"
    heals = len(server.healer.heals)
    victim = kill_stub(server, model)
    heal = wait_for_heal(server, heals)
    assert (heal.model, heal.dead_pid) == (model, victim)
    assert victim not in stub_processes(server.pid) and model in stub_processes(server.pid).values()
    ref = reference if mode == "collaborative" else _tokens(server, edge, "collaborative", 50)
    assert _tokens(server, edge, mode, 100 + heals) == ref
    print(f"{model}: stub {victim} killed, model back after {heal.seconds:.1f} s")


def kill_stub(server, model: str) -> int:
    """SIGKILL the one Python stub of `model` in `server`, as the out-of-memory killer would; returns its pid."""
    victims = [pid for pid, name in stub_processes(server.pid).items() if name == model]
    assert len(victims) == 1, f"one stub per model expected, got {stub_processes(server.pid)}"
    os.kill(victims[0], signal.SIGKILL)
    return victims[0]


def wait_for_heal(server, heals: int):
    """The healer's next heal after the `heals` it had made (at most 120 s)."""
    deadline = time.monotonic() + 120
    while len(server.healer.heals) == heals:
        assert time.monotonic() < deadline, f"no model reloaded within 120 s:\n{server.log_tail()}"
        time.sleep(0.2)
    return server.healer.heals[-1]


@pytest.mark.parametrize("model", ["context_manager", "cloud_partition"])
def test_a_collaborative_edge_waits_out_a_stub_killed_mid_generation(healing, model):
    """The edge's next request finds the stub dead, then the model reloading: it waits (ReconnectingLink's
    patience), re-syncs once the model is back, and its tokens are an undisturbed run's."""
    server, edge, reference, _ = healing
    heals = len(server.healer.heals)
    link = ReconnectingLink(TritonLink(server.grpc_url), patience_s=180)
    gen = DecodingSession(edge, link, "collaborative", sequence_id=200 + heals)
    stream = gen.stream(PROMPT, len(reference))
    tokens = [next(stream).token_id for _ in range(4)]
    kill_stub(server, model)
    t0 = time.monotonic()
    tokens.append(next(stream).token_id)
    waited = time.monotonic() - t0
    tokens += [r.token_id for r in stream]
    assert tokens == reference
    assert len(server.healer.heals) == heals + 1 and gen.stats.resyncs == 1 and link.unreachable > 0
    print(f"{model} killed after 4 tokens: the 5th came {waited:.1f} s later ({link.unreachable} attempts found the "
          f"model down), 1 re-sync, {len(tokens)} tokens equal to an undisturbed run")


@pytest.mark.parametrize("model", ["context_manager", "cloud_partition"])
def test_a_latency_aware_edge_answers_locally_while_a_killed_stub_heals(healing, model):
    server, edge, reference, hf = healing
    heals = len(server.healer.heals)
    link = ReconnectingLink(TritonLink(server.grpc_url), patience_s=0)
    gen = DecodingSession(edge, link, "latency-aware", sequence_id=300 + heals,
                          latency=LatencyPolicy(budget_s=30, retry_after_s=0.2))
    stream = gen.stream(PROMPT, 24)
    records = [next(stream) for _ in range(4)]
    kill_stub(server, model)
    while not gen.stats.fallbacks:  # the edge answers on its own while the model is down
        records.append(next(stream))
    wait_for_heal(server, heals)  # (the edge is idle meanwhile: a generator runs only when asked)
    records += list(stream)
    assert len(records) == 24 and gen.stats.resyncs == 1
    assert all(r.exit == "cloud" or r.fallback for r in records)
    # every token the cloud chose is the full model's greedy choice on the text produced (a lost row would show)
    ids = PROMPT + [r.token_id for r in records]
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0]  # [T, V]
    cloud = [i for i, r in enumerate(records) if r.exit == "cloud"]
    assert cloud[-1] == 23 and len(cloud) == 24 - gen.stats.fallbacks
    for i in cloud:
        row = logits[len(PROMPT) - 1 + i]
        assert row[records[i].token_id] >= row.max() - 1e-3, f"token {i} is not the full model's choice"
    print(f"{model} killed after 4 tokens: {gen.stats.fallbacks} answered on the edge meanwhile, 1 re-sync, "
          f"{len(cloud)} cloud tokens all the full model's")


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
        while alive(server_pid):
            assert time.monotonic() < deadline, f"tritonserver {server_pid} outlived its launcher"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
        if server_pid is not None and alive(server_pid):
            os.kill(server_pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """The process exists and is no zombie (here nothing may reap an orphan's zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
