"""plugin.serving.server and `ce-collm serve` against a real tritonserver on 127.0.0.1."""
from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from plugin import cli
from plugin.serving.server import (
    find_tritonserver, free_ports, port_is_free, prepare_backend_dir, TritonServer, TritonServerError)
from tests.identity_model import write_identity_repository
from tests.soak import descendant_pids

REPO_ROOT = Path(__file__).resolve().parents[1]

CONFIG = """\
backend: "python"
max_batch_size: 0
input [ { name: "X", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [
  { name: "Y", data_type: TYPE_FP32, dims: [ -1 ] },
  { name: "TORCH_VERSION", data_type: TYPE_STRING, dims: [ 1 ] },
  { name: "PLUGIN_DIR", data_type: TYPE_STRING, dims: [ 1 ] }
]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""

# Imports numpy, torch and plugin: proves the stub runs this venv's Python with the repo on the path.
TORCH_MODEL = """\
import numpy as np
import torch
import triton_python_backend_utils as pb_utils

import plugin.serving.server


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = torch.from_numpy(pb_utils.get_input_tensor_by_name(request, "X").as_numpy())
            y = torch.cumsum(torch.sin(x) * 2.0, dim=0) + 1.0
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("Y", y.numpy().astype(np.float32)),
                pb_utils.Tensor("TORCH_VERSION", np.array([torch.__version__.encode()], dtype=np.object_)),
                pb_utils.Tensor("PLUGIN_DIR", np.array([plugin.paths.REPO_ROOT.as_posix().encode()],
                                                       dtype=np.object_)),
            ]))
        return responses
"""

BROKEN_MODEL = """\
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("ce-collm-test: deliberately broken model")

    def execute(self, requests):
        return []
"""


def write_model(repo: Path, name: str, model_py: str, config: str = CONFIG) -> Path:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(config)
    (repo / name / "1" / "model.py").write_text(textwrap.dedent(model_py))
    return repo


def expected(x: np.ndarray) -> np.ndarray:
    return (torch.cumsum(torch.sin(torch.from_numpy(x)) * 2.0, dim=0) + 1.0).numpy()


def infer(grpc_url: str, x: np.ndarray, model: str = "torch_sin") -> dict[str, np.ndarray]:
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(url=grpc_url) as client:
        inp = grpcclient.InferInput("X", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        outputs = [grpcclient.InferRequestedOutput(n) for n in ("Y", "TORCH_VERSION", "PLUGIN_DIR")]
        result = client.infer(model, [inp], outputs=outputs, client_timeout=30)
        return {n: result.as_numpy(n) for n in ("Y", "TORCH_VERSION", "PLUGIN_DIR")}


@pytest.fixture(scope="module")
def torch_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("repo"), "torch_sin", TORCH_MODEL)


@pytest.fixture(scope="module")
def torch_server(start_server, torch_repo: Path):
    server = start_server(torch_repo)
    yield server
    server.stop()


# -- without a server ----------------------------------------------------------------------------
def test_prepare_backend_dir_adds_the_stub_and_is_idempotent(tmp_path: Path) -> None:
    install = find_tritonserver()
    assert install.binary.is_file() and os.access(install.binary, os.X_OK)
    backends = prepare_backend_dir(tmp_path / "b", install)
    if not install.from_wheel:
        pytest.skip("tritonserver from PATH: its backends are used in place")
    stub = backends / "python" / "triton_python_backend_stub"
    assert stub.is_file() and os.access(stub, os.X_OK)
    assert (backends / "python" / "libtriton_python.so").is_file()
    before = {p: p.stat().st_ino for p in backends.rglob("*") if p.is_file()}
    assert prepare_backend_dir(tmp_path / "b", install) == backends
    assert {p: p.stat().st_ino for p in backends.rglob("*") if p.is_file()} == before  # nothing rewritten


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5
    assert all(port_is_free(p) for p in ports)


def test_missing_repository_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TritonServerError, match="not a directory"):
        TritonServer(tmp_path / "nope")


def test_serve_help_lists_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model-repository", "--host", "--grpc-port", "--http-port", "--metrics-port",
                   "--log-file", "--verbose"):
        assert option in out


# -- with a real server --------------------------------------------------------------------------
@pytest.mark.server
def test_grpc_inference_runs_torch_from_this_venv(torch_server: TritonServer) -> None:
    rng = np.random.default_rng(1234)
    for n in (1, 7, 300):
        x = rng.standard_normal(n).astype(np.float32)
        out = infer(torch_server.grpc_url, x)
        np.testing.assert_allclose(out["Y"], expected(x), rtol=1e-5, atol=1e-5)
    assert out["TORCH_VERSION"][0].decode() == torch.__version__
    assert out["PLUGIN_DIR"][0].decode() == REPO_ROOT.as_posix()


@pytest.mark.server
def test_endpoints_answer(torch_server: TritonServer) -> None:
    assert torch_server.grpc_url.startswith("127.0.0.1:")
    assert torch_server.server_ready()
    assert [(m["name"], m["state"]) for m in torch_server.repository_index()] == [("torch_sin", "READY")]
    assert torch_server.metadata()["version"] == "2.51.0"
    with urllib.request.urlopen(torch_server.metrics_url, timeout=10) as resp:
        assert b"nv_inference_count" in resp.read()


def _accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.server
def test_stop_frees_the_ports(start_server, torch_repo: Path) -> None:
    # Triton's default exit timeout: the suite's 3 s is too short for a clean unload on a loaded 2-core machine
    server = start_server(torch_repo, extra_args=["--exit-timeout-secs=30"])
    pid = server.pid
    # every endpoint listens (metrics may bind a moment after the models report ready)
    deadline = time.monotonic() + 10
    while not all(_accepts(p) for p in server.ports()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_accepts(p) for p in server.ports())
    assert server.stop() == 0
    assert not server.is_running()
    assert all(port_is_free(p) for p in server.ports())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.server
def test_cpus_pin_the_server_and_its_stubs(start_server, tmp_path: Path) -> None:
    """The server's cores are set before exec, so its Python-backend stubs (its children) inherit them."""
    cpus = frozenset({max(os.sched_getaffinity(0))})
    server = start_server(write_identity_repository(tmp_path / "repo"), cpus=cpus)
    tree = descendant_pids(server.pid)
    assert len(tree) >= 2  # the server and the identity model's stub
    assert {pid: os.sched_getaffinity(pid) for pid in tree} == dict.fromkeys(tree, cpus)
    assert os.sched_getaffinity(0) != cpus or os.cpu_count() == 1  # the launcher keeps its own cores
    server.stop()


@pytest.mark.server
def test_kill_then_restart_on_the_same_ports(start_server, torch_repo: Path) -> None:
    server = start_server(torch_repo)
    ports = server.ports()
    server.kill()
    assert server.returncode == -signal.SIGKILL
    server.restart(timeout_s=120)
    assert server.ports() == ports
    x = np.linspace(-3, 3, 11, dtype=np.float32)
    np.testing.assert_allclose(infer(server.grpc_url, x)["Y"], expected(x), rtol=1e-5, atol=1e-5)
    server.stop()


@pytest.mark.server
def test_broken_model_fails_start_with_its_error(start_server, tmp_path: Path) -> None:
    repo = write_model(tmp_path / "repo", "broken", BROKEN_MODEL)
    t0 = time.monotonic()
    with pytest.raises(TritonServerError) as err:
        start_server(repo, timeout_s=120)
    assert time.monotonic() - t0 < 100  # the server exits on error; we do not wait for the timeout
    assert "exited with code" in str(err.value)
    assert "ce-collm-test: deliberately broken model" in str(err.value)


def _read_lines(stream, lines: "queue.Queue[str]") -> None:
    for line in iter(stream.readline, ""):
        lines.put(line)


@pytest.mark.server
def test_cli_serve_prints_endpoints_answers_grpc_and_exits_0_on_sigterm(torch_repo: Path, tmp_path: Path) -> None:
    grpc_port, http_port, metrics_port = free_ports(3)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "plugin.cli", "serve", "--model-repository", str(torch_repo),
         "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(metrics_port),
         "--log-file", str(tmp_path / "serve.log")],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    server_pid = None
    try:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
        printed: list[str] = []
        deadline = time.monotonic() + 120
        while not any(line.startswith("Press Ctrl-C") for line in printed):
            assert proc.poll() is None, f"serve exited early: {proc.stderr.read()}"
            assert time.monotonic() < deadline, f"serve not ready in 120 s; printed {printed}"
            try:
                printed.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        text = "".join(printed)
        server_pid = int(text.split("pid ")[1].split(")")[0])
        assert f"grpc     127.0.0.1:{grpc_port}" in text
        assert f"http     http://127.0.0.1:{http_port}" in text
        assert f"metrics  http://127.0.0.1:{metrics_port}/metrics" in text
        assert "torch_sin:1" in text

        x = np.random.default_rng(7).standard_normal(16).astype(np.float32)
        np.testing.assert_allclose(infer(f"127.0.0.1:{grpc_port}", x)["Y"], expected(x), rtol=1e-5, atol=1e-5)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert all(port_is_free(p) for p in (grpc_port, http_port, metrics_port))
        assert "Started GRPCInferenceService" in (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if server_pid is not None:  # serve runs tritonserver in its own session: never orphan it
            try:
                os.kill(server_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
