"""deploy/jetson/ cannot be built here (no arm64, no Docker, no GPU), so what can be checked without them is:
every Dockerfile under deploy/ parses with Docker's own parser (the `dockerfile` package) and copies files that
exist; the Jetson one builds on L4T TensorRT, installs only versions the locks pin and the project's files that
`make edge-venv` tests; every command in its README parses with the real arguments of the program it runs.
"""
from __future__ import annotations

import importlib.util
import re
import shlex
import tomllib
from pathlib import Path

import dockerfile
import pytest

from edge_runtime.cli import build_parser as edge_parser
from tests.test_edge_install import _name, _pins, HEAVY_DISTS

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
JETSON = DEPLOY / "jetson"
DOCKERFILES = sorted(DEPLOY.rglob("Dockerfile"))


def _instructions(path: Path) -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(path)))


def _copies(commands: list[dockerfile.Command]) -> list[str]:
    """Sources of COPY and ADD from the build context (not from another stage)."""
    return [src for c in commands if c.cmd.upper() in ("COPY", "ADD") and not any(f.startswith("--from") for f in c.flags)
            for src in c.value[:-1]]


def _pip_installs(commands: list[dockerfile.Command]) -> list[list[str]]:
    """The arguments after `pip install` of every RUN, one list per shell command."""
    runs = [c.value[0] for c in commands if c.cmd.upper() == "RUN"]
    return [words[words.index("install") + 1:] for run in runs for part in re.split(r"&&|;|\|\|", run)
            if "install" in (words := shlex.split(part)) and any(Path(w).name in ("pip", "pip3") for w in words)]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_dockerfile_parses_and_copies_files_that_exist(path):
    commands = _instructions(path)
    assert [c.cmd.upper() for c in commands if c.cmd.upper() != "ARG"][0] == "FROM"
    for src in _copies(commands):  # the build context is the repository root (docker build -f deploy/... .)
        assert list(REPO.glob(src)), f"{path.relative_to(REPO)} copies {src}, which is not in the repository"


def test_jetson_image_is_l4t_tensorrt():
    [base] = [c.value[0] for c in _instructions(JETSON / "Dockerfile") if c.cmd.upper() == "FROM"]
    assert re.fullmatch(r"nvcr\.io/nvidia/l4t-tensorrt:r\d+\.\d+\.\d+-(runtime|devel)", base), base


def test_jetson_image_installs_only_locked_versions_and_the_edge_lock():
    locked = _pins(REPO / "requirements.lock") | _pins(REPO / "requirements-edge.lock")
    makefile = (REPO / "Makefile").read_text()
    locked |= dict(re.findall(r"\b(pip|setuptools)==(\S+)", makefile))  # the venv's installer, as `make venv` pins it
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installs = _pip_installs(_instructions(JETSON / "Dockerfile"))
    assert ["--no-cache-dir", "-r", "requirements-edge.lock"] in installs
    for args in installs:
        requirements = [a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] != "-r")]
        for req in requirements:
            if req.startswith("."):  # the project: its dependencies are the lock's, and an extra must exist
                assert "--no-deps" in args, args
                assert all(extra in extras for extra in re.findall(r"\w+", req.partition("[")[2])), req
            else:
                assert "==" in req and locked.get(_name(req)) == req.split("==", 1)[1], f"{req} is not what the locks pin"
            assert _name(req) not in HEAVY_DISTS, req
    assert any("." in args for args in installs), "the image does not install the project"


def test_jetson_image_installs_the_files_make_edge_venv_tests():
    commands = _instructions(JETSON / "Dockerfile")
    project = next(i for i, c in enumerate(commands) if c.cmd.upper() == "RUN" and "--no-deps" in c.value[0])
    copied = set(_copies(commands[:project])) - {"requirements-edge.lock"}
    sources = re.search(r"^EDGE_SOURCES := (.*)$", (REPO / "Makefile").read_text(), re.M)
    assert sources and copied == set(sources.group(1).split())


def _readme_commands() -> list[list[str]]:
    """Every command of the README's bash blocks, as argv."""
    blocks = re.findall(r"```bash\n(.*?)```", (JETSON / "README.md").read_text(), re.S)
    return [shlex.split(line) for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def _script_parser(name: str):
    """parse_args of build/<name>: the scripts' own argument parsing."""
    spec = importlib.util.spec_from_file_location(f"_deploy_check_{name[:-3]}", REPO / "build" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args


def test_readme_commands_use_real_programs_and_flags():
    ran = set()
    for argv in _readme_commands():
        for i, word in enumerate(argv):
            try:
                if word == "ce-collm-edge" or word.endswith("/ce-collm-edge"):
                    edge_parser().parse_args(argv[i + 1:])
                    ran.add("ce-collm-edge")
                elif m := re.fullmatch(r"(?:.*/)?build/(\w+\.py)", word):
                    assert (REPO / "build" / m.group(1)).is_file(), word
                    _script_parser(m.group(1))(argv[i + 1:])
                    ran.add(m.group(1))
                elif argv[:2] == ["docker", "build"] and word == "-f":
                    assert (REPO / argv[i + 1]).is_file(), argv[i + 1]
                    ran.add("docker build")
            except SystemExit as e:  # argparse refused the flags
                pytest.fail(f"{shlex.join(argv)}: {word} refuses its arguments (exit {e.code})")
    assert ran == {"ce-collm-edge", "build_engines.py", "export_onnx.py", "docker build"}


def test_scripts_and_modules_named_exist():
    text = (JETSON / "README.md").read_text() + (JETSON / "Dockerfile").read_text()
    for script in set(re.findall(r"\bbuild/\w+\.py", text)):
        assert (REPO / script).is_file(), script
    for module in set(re.findall(r"python3?(?:\.\d+)? -m ([\w.]+)", text)):
        assert importlib.util.find_spec(module), module
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    [cmd] = [c for c in _instructions(JETSON / "Dockerfile") if c.cmd.upper() == "CMD"]
    assert cmd.value[0] in scripts
