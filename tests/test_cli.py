"""`ce-collm` as a user runs it (subprocesses): a failing subcommand says why in one line on stderr and
exits non-zero; `ce-collm --debug` shows the traceback instead."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from plugin.cli import main
from plugin.serving.repository import write_repository
from plugin.serving.server import free_ports
from plugin.split.plan import PartitionPlan
from tests.tiny_models import save_tiny

REPO_ROOT = Path(__file__).resolve().parents[1]


def _ce_collm(*args: str, tmp_path: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), XDG_CACHE_HOME=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-m", "plugin.cli", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _one_clear_line(done: subprocess.CompletedProcess, command: str, reason: str) -> None:
    assert done.returncode != 0
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"ce-collm {command}: ") and reason in lines[0], lines[0]


@pytest.fixture()
def unsupported(tmp_path: Path) -> Path:
    """A plan whose checkpoint is an architecture the layer loop does not implement."""
    save_tiny("llama", tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(dict(config, model_type="mamba")))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"checkpoint": "ckpt", "split_layer": 4, "exit_layers": [1, 4]}))
    return plan


def test_an_unsupported_checkpoint_fails_in_one_line_and_debug_shows_the_traceback(tmp_path, unsupported) -> None:
    out = str(tmp_path / "out")
    _one_clear_line(_ce_collm("configs", "--plan", str(unsupported), "--out", out, tmp_path=tmp_path), "configs",
                    "model_type 'mamba' is not supported")
    debug = _ce_collm("--debug", "configs", "--plan", str(unsupported), "--out", out, tmp_path=tmp_path)
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr
    assert "CheckpointError: model_type 'mamba' is not supported" in debug.stderr


def test_every_failure_is_one_line(tmp_path: Path, unsupported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same main() as above, in this process: bad plans, missing files, missing graphs."""
    bad_plan = tmp_path / "bad.json"
    bad_plan.write_text(json.dumps({"checkpoint": "ckpt", "split_layer": 4, "exit_layers": [1, 4], "spilt": 3}))
    save_tiny("llama", tmp_path / "llama")
    capsys.readouterr()  # its progress bar is no failure's output
    bool_plan = tmp_path / "bool.json"  # configs once wrote min_split_layer "True" from it
    bool_plan.write_text(json.dumps({"checkpoint": "llama", "split_layer": True, "exit_layers": [1]}))
    out = str(tmp_path / "out")
    cases = [
        (["configs", "--plan", str(bad_plan), "--out", out], "spilt"),
        (["configs", "--plan", str(bool_plan), "--out", out], "split_layer must be a positive integer, got True"),
        (["configs", "--plan", str(tmp_path / "none.json"), "--out", out], "none.json"),
        (["trt-configs", "--plan", str(unsupported), "--onnx-dir", str(tmp_path / "none"), "--out", out],
         "export the graphs first"),
        (["trt-configs", "--plan", str(bad_plan), "--out", out, "--check"], "spilt"),
    ]
    for argv, reason in cases:
        code = main(argv)
        captured = capsys.readouterr()
        _one_clear_line(subprocess.CompletedProcess(argv, code, captured.out, captured.err), argv[0], reason)


@pytest.mark.server
def test_serve_on_an_unsupported_checkpoint_fails_in_one_line(tmp_path: Path) -> None:
    save_tiny("llama", tmp_path / "ckpt")
    write_repository(PartitionPlan(tmp_path / "ckpt", 4, (1, 4)), tmp_path / "repo")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(dict(config, model_type="mamba")))
    grpc_port, http_port, metrics_port = free_ports(3)
    done = _ce_collm("serve", "--model-repository", str(tmp_path / "repo"), "--grpc-port", str(grpc_port),
                     "--http-port", str(http_port), "--metrics-port", str(metrics_port),
                     "--triton-arg=--exit-timeout-secs=3", tmp_path=tmp_path, timeout=300)
    lines = [line for line in done.stderr.splitlines() if not line.startswith("ce-collm serve: starting")]
    _one_clear_line(subprocess.CompletedProcess(done.args, done.returncode, done.stdout, "\n".join(lines)), "serve",
                    "model_type 'mamba' is not supported")
