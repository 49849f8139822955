"""End to end on the committed demo model: `ce-collm-edge generate` against the committed
model_repository/ served by a real tritonserver, as a user runs them."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from dataclasses import replace

import pytest

from edge_runtime.app import EdgeApp
from edge_runtime.parts import SessionOptions
from bench.demo import repository_for
from edge_runtime.triton_link import TritonLink
from plugin.model.checkpoint import load_model
from plugin.paths import DEMO_PLAN, MODEL_REPOSITORY
from plugin.serving.repository import check_repository
from plugin.split.local import LocalCloud

pytestmark = pytest.mark.server
PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"


@pytest.fixture(scope="module")
def app():
    return EdgeApp.load(DEMO_PLAN)


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(MODEL_REPOSITORY)


def _cli(*args: str, timeout: float = 180) -> dict:
    cmd = [sys.executable, "-m", "edge_runtime.cli", "generate", "--json", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_committed_configs_match_the_demo_plan(app):
    assert check_repository(app.plan, MODEL_REPOSITORY) == []


def test_exact_collaborative_equals_cloud_only_and_in_process(app, server):
    n = "24"
    collab = _cli("--url", server.grpc_url, "--prompt", PROMPT, "--max-new-tokens", n, "--threshold", "1.0",
                  "--codec", "fp32")
    cloud_only = _cli("--url", server.grpc_url, "--prompt", PROMPT, "--max-new-tokens", n, "--mode", "cloud-only")
    options = SessionOptions(threshold=1.0, codec="fp32", async_uploads=True)
    reference = app.session("collaborative", LocalCloud(load_model(app.plan.checkpoint)),
                            options).generate(app.encode(PROMPT), int(n))
    plain = _cli("--url", server.grpc_url, "--prompt", PROMPT, "--max-new-tokens", n, "--threshold", "1.0",
                 "--codec", "fp32", "--no-speculate")
    assert collab["token_ids"] == cloud_only["token_ids"] == reference.token_ids == plain["token_ids"]
    assert set(collab["exits"]) == {"cloud"} and collab["cloud_requests"] == int(n)
    assert collab["speculated"] == int(n) and plain["speculated"] == 0
    assert collab["speculation_s"] > 0 and plain["speculation_s"] == 0
    assert collab["text"] == app.tokenizer.decode(reference.token_ids, skip_special_tokens=True)


def test_standalone_needs_no_server(app):
    out = _cli("--prompt", PROMPT, "--max-new-tokens", "16", "--mode", "standalone")
    assert len(out["token_ids"]) == 16 and out["bytes_up"] == 0 and out["cloud_requests"] == 0
    assert all(e.startswith("edge:") for e in out["exits"])


def test_streamed_text_and_statistics(server):
    cmd = [sys.executable, "-m", "edge_runtime.cli", "generate", "--url", server.grpc_url, "--prompt", PROMPT,
           "--max-new-tokens", "12"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(PROMPT) and len(done.stdout) > len(PROMPT)
    assert "12 tokens in" in done.stderr and "cloud requests" in done.stderr and "guesses kept" in done.stderr


def test_missing_url_is_a_clear_error():
    done = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "generate", "--prompt", "x"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--url HOST:PORT is needed" in done.stderr


def test_int8_agrees_with_fp16_on_the_demo_prompts(app, server):
    prompts = [line.replace("\\n", "\n") for line in (app.plan.checkpoint / "heldout_prompts.txt").read_text().splitlines()][:8]
    link = TritonLink(server.grpc_url)
    same = total = 0
    for prompt in prompts:
        ids = app.encode(prompt)
        fp16, int8 = (app.session("collaborative", link, SessionOptions(codec=codec, async_uploads=True))
                      .generate(ids, 32).token_ids for codec in ("fp16", "int8"))
        same += sum(a == b for a, b in zip(fp16, int8))
        total += max(len(fp16), len(int8))
    assert same / total >= 0.99, f"int8 agrees with fp16 on {same}/{total} tokens"


def _failing_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "edge_runtime.cli", "generate", "--prompt", "ROMEO:", "--max-new-tokens", "4", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def _assert_one_line_error(done: subprocess.CompletedProcess, code: int, *words: str) -> None:
    """No traceback; the error is the last line of stderr, the only one saying `error:`."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], done.stderr[-2000:]
    assert all(w in lines[-1] for w in words), lines[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plan_file(path, text: str):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case", ["missing plan", "bad json", "bad plan", "missing checkpoint", "missing onnx export",
                                  "missing tensorrt", "unreachable server"])
def test_errors_end_as_one_line_without_a_traceback(case, tmp_path):
    """Each error a user meets before or during a generation: one line saying what happened and what to do."""
    if case == "missing tensorrt" and importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt imports here: the missing-TensorRT path cannot be shown")
    standalone = ("--mode", "standalone")
    args, code, words = {
        "missing plan": ((*standalone, "--plan", str(tmp_path / "none.json")), 2, ["no partition plan at", "--plan"]),
        "bad json": ((*standalone, "--plan", _plan_file(tmp_path / "bad.json", "{split")), 2,
                     ["bad partition plan", "Expecting property name"]),
        "bad plan": ((*standalone, "--plan", _plan_file(tmp_path / "unknown.json", '{"checkpoint": ".", "split": 2}')), 2,
                     ["bad partition plan", "unknown keys"]),
        "missing checkpoint": ((*standalone, "--plan", _plan_file(
            tmp_path / "nowhere.json", '{"checkpoint": "nowhere", "split_layer": 2, "exit_layers": [1]}')), 2,
            ["no checkpoint at", "train_demo_model.py"]),
        "missing onnx export": ((*standalone, "--runner", "onnx", "--onnx-dir", str(tmp_path / "onnx")), 2,
                                ["no exported ONNX graphs", "Export them first"]),
        "missing tensorrt": ((*standalone, "--runner", "tensorrt"), 2, ["TensorRT is not installed", "--runner onnx"]),
        "unreachable server": (("--url", f"127.0.0.1:{_free_port()}", "--patience", "0"), 1,
                               ["after 0 tokens, the server at", "did not answer", "ce-collm serve"]),
    }[case]
    _assert_one_line_error(_failing_cli(*args), code, *words)


def test_a_server_refusal_is_one_line_and_debug_adds_the_traceback(app, server, tmp_path):
    """A plan the server was not configured for (split 4 on a repository made for split 6): the
    server's ProtocolError ends the generation; --debug shows where it came from."""
    plan = replace(app.plan, split_layer=4, exit_layers=(2, 4))
    plan.save(tmp_path / "plan.json")
    args = ("--url", server.grpc_url, "--plan", str(tmp_path / "plan.json"), "--threshold", "1.0")
    _assert_one_line_error(_failing_cli(*args), 1, "the server refused a request", "ce-collm configs --check")
    debug = _failing_cli(*args, "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ProtocolError" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("error: after 0 tokens, the server refused a request")


def test_demo_serves_a_stale_plan_from_a_temporary_repository(app, tmp_path):
    """`make demo` never writes into the source tree: configs that do not match the plan are
    generated elsewhere, with the thin model.py files beside them."""
    committed = {p: p.read_bytes() for p in MODEL_REPOSITORY.rglob("*") if p.is_file()}
    assert repository_for(app.plan, DEMO_PLAN, tmp_path) == MODEL_REPOSITORY
    stale = replace(app.plan, split_layer=4, exit_layers=(2, 4))
    repo = repository_for(stale, tmp_path / "plan.json", tmp_path)
    assert repo == tmp_path / "model_repository"
    assert check_repository(stale, repo) == [] and (repo / "cloud_partition" / "1" / "model.py").is_file()
    assert {p: p.read_bytes() for p in MODEL_REPOSITORY.rglob("*") if p.is_file()} == committed


def test_demo_runs_every_mode_through_an_emulated_link():
    """`make demo` on the toy plan (Gemma's is its default): its own server behind a 10 ms link, one prompt in the
    four modes and the control (collaborative at threshold 1.0: cloud-only's tokens), the table, the agreement with
    cloud-only, and the note on the edge and the server pinned to a core each."""
    cmd = [sys.executable, "-m", "bench.demo", "--plan", str(DEMO_PLAN), "--prompts", "1", "--max-new-tokens", "6",
           "--rtt-ms", "10"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "10 ms round trip" in out
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| ")}
    assert {"collaborative", "control: collaborative @1.0", "verified", "standalone", "cloud-only"} <= rows.keys()
    assert rows["standalone"][4].strip() == "0" and int(rows["cloud-only"][4].strip()) == 6  # cloud requests
    assert rows["control: collaborative @1.0"][3].strip() == "cloud 100%"  # no exit taken
    assert "control: collaborative @1.0 agrees with cloud-only on 6/6 tokens" in out
    assert "collaborative agrees with cloud-only on" in out
    if len(os.sched_getaffinity(0)) >= 2:
        assert "the edge ran pinned to CPU core" in out and "the edge one core and the cloud one core" in out
    else:
        assert "shared this machine's" in out
