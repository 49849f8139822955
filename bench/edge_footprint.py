"""The edge's footprint in each environment: venv size, import time, cold start and peak RSS of
`ce-collm-edge generate --runner onnx`: the full dev environment (.venv) running the code of the last commit
whose edge imported torch (the baseline) and today's code, beside the edge's own environment (.venv-edge,
`make edge-venv`).

    .venv/bin/python -m bench.edge_footprint                                  # the demo model
    .venv/bin/python -m bench.edge_footprint --plan models/gemma-3-270m-exits/partition_plan.json
    .venv/bin/python -m bench.edge_footprint --env full=.venv --env edge=.venv-edge   # no baseline

Cold start is the wall time of a new process that loads the plan, the tokenizer and the ONNX graphs and
generates one token in standalone mode (no server), exit included; import time is `import edge_runtime.cli`
alone; peak RSS is the generating process's maximum resident set (wait4's ru_maxrss). Each is the median of
--repeats runs after one untimed run (the page cache warm, as on a device that has run it before). An
environment NAME=VENV@REV runs commit REV's plugin/ and edge_runtime/ (git archive, first on PYTHONPATH) with
VENV's packages. Graphs missing in --onnx-dir are exported first, fp32, with this (the full) environment's
build/export_onnx.py. Writes --out (JSON) and prints a markdown table, each row against the first environment.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from plugin.paths import DEMO_PLAN, REPO_ROOT as REPO

PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"
BASELINE_REV = "1fc560b"  # the last commit whose `--runner onnx` edge imported torch: the "today"


@dataclass(frozen=True)
class Env:
    name: str
    venv: Path
    rev: str | None = None  # run this commit's code instead of the venv's installed copy


@dataclass(frozen=True)
class Footprint:
    plan: str
    env: str
    venv_mb: float
    import_s: float
    cold_start_s: float
    peak_rss_mb: float
    runs: int


def venv_mb(path: Path) -> float:
    """Disk usage of a folder in MiB, as `du -sm` counts it (allocated blocks, each hard link once)."""
    seen, blocks = set(), 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                blocks += st.st_blocks
    return blocks * 512 / 2**20


def _run(cmd: list[str], code: Path | None) -> tuple[float, float, str]:
    """(wall s, peak RSS MiB, stdout) of one child process; raises with its stderr when it fails.

    A cwd outside the repository and PYTHONPATH only `code`, so the code that runs is `code` or, without it,
    the environment's installed copy."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | ({"PYTHONPATH": str(code)} if code else {})
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryDirectory() as cwd:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=cwd, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not every child's so far
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {err.read().decode()[-2000:]}")
        return wall, usage.ru_maxrss / 1024, out.read().decode()


def ensure_onnx(plan: Path, onnx_dir: Path) -> None:
    """Export the plan's fp32 graphs into onnx_dir unless its manifest is there. In a child process: the exporter
    imports torch, and a child forked from a process holding it counts the parent's pages in its peak RSS."""
    if not (onnx_dir / "manifest.json").is_file():
        subprocess.run([sys.executable, str(REPO / "build" / "export_onnx.py"), "--plan", str(plan),
                        "--out", str(onnx_dir), "--precision", "fp32"], check=True)


def measure(env: Env, plan: Path, onnx_dir: Path, repeats: int, code: Path | None) -> Footprint:
    """Median import time, cold start and peak RSS of `repeats` runs in env's venv, after one untimed run."""
    python = str(env.venv / "bin" / "python")
    importing = [python, "-c", "import time; t = time.perf_counter(); import edge_runtime.cli; "
                               "print(time.perf_counter() - t)"]
    generating = [python, "-m", "edge_runtime.cli", "generate", "--runner", "onnx", "--onnx-dir", str(onnx_dir),
                  "--plan", str(plan), "--mode", "standalone", "--max-new-tokens", "1", "--json", "--prompt", PROMPT]
    _run(importing, code), _run(generating, code)
    imports = [float(_run(importing, code)[2]) for _ in range(repeats)]
    walls, rss = zip(*[_run(generating, code)[:2] for _ in range(repeats)])
    name = env.name + (f" ({env.rev})" if env.rev else "")
    return Footprint(str(plan.relative_to(REPO) if plan.is_relative_to(REPO) else plan), name,
                     round(venv_mb(env.venv), 1), round(statistics.median(imports), 3),
                     round(statistics.median(walls), 3), round(statistics.median(rss), 1), repeats)


def checkout(rev: str, into: Path) -> Path:
    """Commit rev's plugin/ and edge_runtime/ under `into` (git archive: the work tree is left alone)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "plugin", "edge_runtime"], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def table(rows: list[Footprint]) -> str:
    """Markdown, each edge row with its ratio to the first environment's row of the same plan."""
    lines = ["| plan | env | venv MB | import s | cold start s | vs first | peak RSS MB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    first: dict[str, Footprint] = {}
    for r in rows:
        base = first.setdefault(r.plan, r)
        lines.append(f"| {r.plan} | {r.env} | {r.venv_mb:.0f} | {r.import_s:.2f} | {r.cold_start_s:.2f} | "
                     f"{r.cold_start_s / base.cold_start_s:.2f}x | {r.peak_rss_mb:.0f} |")
    return "\n".join(lines)


def _env(text: str) -> Env:
    name, _, where = text.partition("=")
    venv, _, rev = where.partition("@")
    if not name or not venv:
        raise argparse.ArgumentTypeError(f"expected NAME=VENV_DIR or NAME=VENV_DIR@GIT_REV, got {text!r}")
    return Env(name, Path(venv).absolute(), rev or None)  # the children run in a scratch folder


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--plan", type=Path, action="append", metavar="FILE",
                   help="partition plan; repeatable (default: the demo model's)")
    p.add_argument("--onnx-dir", type=Path, action="append", metavar="DIR",
                   help="exported graphs of each --plan, in order (default: <checkpoint>/onnx/<plan>)")
    p.add_argument("--env", type=_env, action="append", metavar="NAME=VENV_DIR[@GIT_REV]",
                   help="environment to measure; repeatable, the first is the baseline "
                        f"(default: before=.venv@{BASELINE_REV} full=.venv edge=.venv-edge)")
    p.add_argument("--repeats", type=int, default=5, metavar="N", help="timed runs per measure (default: %(default)s)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "edge_footprint.json", metavar="FILE",
                   help="JSON results (default: bench/results/edge_footprint.json)")
    args = p.parse_args(argv)
    args.plan = args.plan or [DEMO_PLAN]
    if args.onnx_dir and len(args.onnx_dir) != len(args.plan):
        p.error("give one --onnx-dir per --plan, or none")
    args.env = args.env or [Env("before", REPO / ".venv", BASELINE_REV), Env("full", REPO / ".venv"),
                            Env("edge", REPO / ".venv-edge")]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from plugin.export.manifest import default_onnx_dir
    from plugin.split.plan import PartitionPlan

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        code = {env.rev: checkout(env.rev, Path(tmp) / env.rev) for env in args.env if env.rev}
        for i, plan in enumerate(args.plan):
            onnx_dir = args.onnx_dir[i] if args.onnx_dir else default_onnx_dir(PartitionPlan.load(plan))
            ensure_onnx(plan, onnx_dir)
            for env in args.env:
                rows.append(measure(env, plan.resolve(), onnx_dir.resolve(), args.repeats, code.get(env.rev)))
                print(rows[-1], file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
