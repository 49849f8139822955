"""The layout's one-way dependency rule (README, "Layout"), checked on every import statement."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# what each part of plugin may import from plugin (itself included)
ALLOWED = {
    "model": {"model", "paths"},
    "protocol": {"protocol", "paths"},
    "split": {"model", "protocol", "split", "paths"},
    "export": {"model", "protocol", "split", "export", "paths"},
    "training": {"model", "protocol", "split", "training", "paths"},
    "serving": {"model", "protocol", "split", "export", "serving", "paths"},
    "paths": {"paths"},
    "cli": {"model", "protocol", "split", "export", "training", "serving", "paths", "cli"},
}


def _imports(path: Path) -> list[str]:
    """Every module a file imports, at any depth (lazy imports inside functions too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; the project imports absolutely"
            names.append(node.module or "")
    return names


def _part(path: Path) -> str:
    rel = path.relative_to(REPO / "plugin")
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


PLUGIN_FILES = sorted(p for p in (REPO / "plugin").rglob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", PLUGIN_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_plugin_imports_run_one_way(path: Path) -> None:
    part = _part(path)
    for name in _imports(path):
        top = name.split(".")[0]
        assert top not in ("edge_runtime", "bench", "tests"), f"{path}: plugin must not import {name}"
        if top == "plugin":
            target = name.split(".")[1]
            assert target in ALLOWED[part], f"{path} ({part}) imports {name}: {part} may use {sorted(ALLOWED[part])}"


def test_only_the_adapter_imports_triton() -> None:
    importers = {p.relative_to(REPO).as_posix() for p in [*REPO.glob("plugin/**/*.py"), *REPO.glob("edge_runtime/*.py")]
                 if "triton_python_backend_utils" in _imports(p)}
    assert importers == {"plugin/serving/triton_adapter.py"}


def test_edge_runtime_builds_on_plugin_only() -> None:
    for path in (REPO / "edge_runtime").glob("*.py"):
        for name in _imports(path):
            assert name.split(".")[0] not in ("bench", "tests"), f"{path} imports {name}"
