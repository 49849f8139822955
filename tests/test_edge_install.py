"""The edge's own install: `make edge-venv` (requirements-edge.lock, then the project's wheel with --no-deps) runs
`ce-collm-edge generate --runner onnx` on the demo model against a real tritonserver in collaborative, verified
and standalone mode, with the full environment's tokens, importing neither torch nor transformers, in at most
250 MB; the TensorRT engine builder's dry run needs only numpy (deploy/jetson/). The locked packages are cached in
.venv-edge/ between runs; the project is reinstalled every run.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from bench.edge_footprint import venv_mb
from plugin.paths import DEMO_PLAN, MODEL_REPOSITORY
from plugin.split.plan import PartitionPlan

REPO = Path(__file__).resolve().parents[1]
FULL_VENV, EDGE_VENV = REPO / ".venv", REPO / ".venv-edge"
HEAVY_MODULES = ("torch", "transformers", "pytriton")
HEAVY_DISTS = ("torch", "transformers", "nvidia-pytriton")
MODES = ("collaborative", "verified", "standalone")
MAX_MB = 250
PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"
# runs the CLI as its console script does and reports, at exit, which heavy modules the process holds
WRAPPER = ("import atexit, json, sys\n"
           f"atexit.register(lambda: print('HEAVY=' + json.dumps([m for m in {HEAVY_MODULES!r} if m in sys.modules]),"
           " file=sys.stderr))\n"
           "from edge_runtime.cli import main\n"
           "sys.exit(main())\n")


def _name(requirement: str) -> str:
    """The canonical distribution name of `name[extras]==version`."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\[=<>~ ;]", requirement, maxsplit=1)[0]).lower()


def _pins(lock: Path) -> dict[str, str]:
    lines = [line.strip() for line in lock.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return {_name(line): line.split("==", 1)[1] for line in lines}


def test_edge_lock_pins_what_the_main_lock_pins_and_no_heavy_package():
    edge, main = _pins(REPO / "requirements-edge.lock"), _pins(REPO / "requirements.lock")
    assert {name: (version, main.get(name)) for name, version in edge.items() if main.get(name) != version} == {}
    assert not set(edge) & set(HEAVY_DISTS)


def test_the_base_install_is_the_locks_top_level():
    """`pip install .` (and `.[edge]`, which adds nothing) is the edge: the lock's top level, no heavy package."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base, edge = project["dependencies"], _pins(REPO / "requirements-edge.lock")
    assert {_name(r) for r in base} == {"numpy", "onnxruntime", "tokenizers", "tritonclient", "safetensors"}
    assert all(r.split("==", 1)[1] == edge[_name(r)] for r in base), base
    assert project["optional-dependencies"]["edge"] == []
    assert {_name(r) for r in project["optional-dependencies"]["server"]} >= set(HEAVY_DISTS)


@pytest.fixture(scope="session")
def edge_build_s() -> float:
    """`make edge-venv` (seconds): the locked packages when the lock changed, the project's wheel every time."""
    t0 = time.perf_counter()
    done = subprocess.run(["make", "-C", str(REPO), "edge-venv"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return time.perf_counter() - t0


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory) -> Path:
    """The demo plan's fp32 graphs, exported by the full environment (a few seconds; models/*/onnx is not committed)."""
    from plugin.export.onnx import export_plan  # the exporter imports torch: only here, not when imported for helpers

    out = tmp_path_factory.mktemp("demo-onnx")
    export_plan(PartitionPlan.load(DEMO_PLAN), out, ("fp32",))
    return out


def _generate(venv: Path, mode: str, onnx_dir: Path, url: str, sequence_id: int, cwd: Path) -> tuple[dict, list]:
    """(--json result, heavy modules held at exit) of `ce-collm-edge generate --runner onnx` in venv's python.

    Isolated (-I) and from an empty folder: the venv's installed copy runs, never the repository's files."""
    cmd = [str(venv / "bin" / "python"), "-I", "-c", WRAPPER, "generate", "--runner", "onnx",
           "--onnx-dir", str(onnx_dir), "--plan", str(DEMO_PLAN), "--json", "--prompt", PROMPT,
           "--max-new-tokens", "16", "--mode", mode, "--sequence-id", str(sequence_id)]
    cmd += [] if mode == "standalone" else ["--url", url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    heavy = re.search(r"^HEAVY=(.*)$", done.stderr, re.M)
    assert heavy, done.stderr[-3000:]
    return json.loads(done.stdout), json.loads(heavy.group(1))


@pytest.fixture(scope="module")
def runs(edge_build_s, onnx_dir, start_server, tmp_path_factory) -> dict:
    """(env, mode) -> (result, heavy modules) for both environments and every mode, against one server."""
    server = start_server(MODEL_REPOSITORY)
    cwd = tmp_path_factory.mktemp("edge-cwd")
    out, sequence_id = {}, 7000
    for env, venv in (("edge", EDGE_VENV), ("full", FULL_VENV)):
        for mode in MODES:
            sequence_id += 1
            out[env, mode] = _generate(venv, mode, onnx_dir, server.grpc_url, sequence_id, cwd)
    return out


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_edge_venv_gives_the_full_environments_tokens(runs, mode):
    edge, full = runs["edge", mode][0], runs["full", mode][0]
    assert len(full["token_ids"]) == 16 and "error" not in full and "error" not in edge
    assert edge["token_ids"] == full["token_ids"] and edge["exits"] == full["exits"]
    if mode != "standalone":
        assert edge["cloud_requests"] > 0


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.parametrize("env", ("edge", "full"))
@pytest.mark.parametrize("mode", MODES)
def test_the_onnx_edge_imports_no_torch_nor_transformers(runs, env, mode):
    """In the full environment torch is installed: only there does this check the import path."""
    assert runs[env, mode][1] == []


@pytest.mark.server
@pytest.mark.slow
def test_edge_venv_holds_no_heavy_package_and_fits(runs, edge_build_s, record_property, capsys):
    python = str(EDGE_VENV / "bin" / "python")
    names = subprocess.run([python, "-I", "-c", "import importlib.metadata as m, json; "
                            "print(json.dumps([d.metadata['Name'] for d in m.distributions()]))"],
                           capture_output=True, text=True, check=True).stdout
    dists = {_name(n) for n in json.loads(names)}
    assert dists >= {"ce-collm-triton", "onnxruntime", "tokenizers", "tritonclient", "numpy"}
    assert not dists & set(HEAVY_DISTS)
    for module in HEAVY_MODULES:
        assert subprocess.run([python, "-I", "-c", f"import {module}"], capture_output=True).returncode != 0, module
    # a plain install, not the repository's files
    where = subprocess.run([python, "-I", "-c", "import edge_runtime; print(edge_runtime.__file__)"],
                           capture_output=True, text=True, check=True).stdout
    assert Path(where.strip()).is_relative_to(EDGE_VENV / "lib")
    size = venv_mb(EDGE_VENV)  # after the runs: any .pyc the edge wrote is counted
    record_property("edge_venv_mb", round(size, 1))
    with capsys.disabled():
        print(f"\n[edge venv] {size:.0f} MB ({len(dists)} distributions, limit {MAX_MB} MB); "
              f"make edge-venv took {edge_build_s:.0f} s")
    assert size <= MAX_MB


@pytest.mark.slow
@pytest.mark.parametrize("venv", (EDGE_VENV, FULL_VENV), ids=("edge", "full"))
def test_the_engine_builders_dry_run_imports_only_numpy(venv, edge_build_s, onnx_dir, tmp_path):
    """deploy/jetson/Dockerfile gives the image's python3 numpy and tqdm for build/build_engines.py: its dry run
    imports no other package (tqdm comes after it, TensorRT with the build), in the full environment neither."""
    code = ("import atexit, runpy, sys\n"
            "atexit.register(lambda: print('TOP=' + ' '.join({m.split('.')[0] for m in sys.modules}"
            " - set(sys.stdlib_module_names)), file=sys.stderr))\n"
            "sys.argv[0] = 'build_engines.py'\n"
            f"runpy.run_path({str(REPO / 'build' / 'build_engines.py')!r}, run_name='__main__')\n")
    done = subprocess.run([str(venv / "bin" / "python"), "-I", "-c", code, "--plan", str(DEMO_PLAN), "--target",
                           "jetson", "--onnx-dir", str(onnx_dir), "--fp32", "--dry-run"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and ".plan" in done.stdout, done.stdout + done.stderr
    top = set(re.search(r"^TOP=(.*)$", done.stderr, re.M).group(1).split())
    assert {m for m in top if not m.startswith("_")} <= {"numpy", "plugin", "cython_runtime", "sitecustomize"}


@pytest.mark.server
@pytest.mark.slow
def test_the_console_script_runs(runs, onnx_dir, tmp_path):
    """`pip install --no-deps` of the wheel made a working `ce-collm-edge`."""
    done = subprocess.run([str(EDGE_VENV / "bin" / "ce-collm-edge"), "generate", "--runner", "onnx", "--onnx-dir",
                           str(onnx_dir), "--plan", str(DEMO_PLAN), "--json", "--prompt", PROMPT,
                           "--max-new-tokens", "16", "--mode", "standalone"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["token_ids"] == runs["full", "standalone"][0]["token_ids"]
