"""Two devices on one machine: the edge on one CPU core, the server with its Python-backend stubs on another, so
that neither side's computing slows the other's, as on separate devices (`make demo`, `ce-collm bench`)."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


@dataclass(frozen=True)
class Pinning:
    edge: int
    server: int

    @property
    def server_cpus(self) -> frozenset[int]:
        """TritonServer(cpus=...)."""
        return frozenset({self.server})

    def note(self) -> str:
        """What the pinning stands for, and what it does not (the demo's note, the bench report)."""
        return (f"the edge ran pinned to CPU core {self.edge}, the server and its Python-backend stubs to core "
                f"{self.server}: two devices, the edge one core and the cloud one core, neither slowing the other; "
                "the cloud here is one CPU core, not a GPU server shared by many edges")


def _pin_threads(cpus: set[int]) -> None:
    """Every thread of this process; sched_setaffinity(0) would pin the calling thread only."""
    for task in Path("/proc/self/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except ProcessLookupError:  # the thread ended meanwhile
            continue


@contextlib.contextmanager
def pinned(enabled: bool) -> Iterator[Pinning | None]:
    """When enabled and this process may run on at least 2 cores: this process (the edge; the runner threads it
    starts inside inherit the core) on its lowest core, and the next core for the server (Pinning.server_cpus);
    its cores back on exit. None: both sides share every core."""
    cores = os.sched_getaffinity(0)
    if not enabled or len(cores) < 2:
        yield None
        return
    edge, server = sorted(cores)[:2]
    _pin_threads({edge})
    try:
        yield Pinning(edge, server)
    finally:
        _pin_threads(cores)
