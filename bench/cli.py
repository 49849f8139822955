"""`ce-collm bench`: registered as an entry point (pyproject.toml, group `ce_collm.commands`)."""
from __future__ import annotations

import argparse

from bench.args import add_arguments
from plugin.cli import Command


def _bench(args: argparse.Namespace) -> int:
    """Run the benchmark harness (bench/run.py) and print the targets' verdicts."""
    from bench.run import run_from_args

    return run_from_args(args)


COMMAND = Command(
    summary="benchmark CE-CoLLM against cloud-only, naive split and standalone edge (tables + plots)",
    add_arguments=add_arguments,
    run=_bench,
    description=(
        "Start tritonserver on a repository generated from the partition plan (plus the bench-only "
        "naive_split model), put a link emulator (delay, bandwidth) between edge and server, and run "
        "cloud-only, naive split, standalone edge and collaborative (per threshold and codec) on held-out "
        "prompts at each link, then N concurrent edge sessions. Writes results.json, report.md and PNG "
        "plots to --out. --quick is a small run."
    ),
)
