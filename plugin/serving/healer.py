"""Bring back a python model whose backend stub died.

Triton 2.51 never restarts a dead Python-backend stub (SIGKILL, out of memory): every later request
to that model fails (Triton's words: the MODEL_DOWN signatures in plugin/protocol/errors.py) while
the server and the model still report READY (docs/triton-facts.md). Measured here: a plain `load` of the
unchanged model is a no-op, while `unload` then `load` (model-control mode explicit) starts a fresh
stub and the model answers again. The healer watches the server's stub processes and does exactly
that for the model whose stub died. The sessions that model held are gone; the edge's next request
for them is answered "needs START" and it re-syncs, as after a server restart.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

STUB_NAME = "triton_python_backend_stub"


@dataclass(frozen=True)
class Heal:
    model: str
    dead_pid: int
    seconds: float  # from noticing the dead stub to the model being ready again


def _stub_args(pid: int) -> list[str] | None:
    """The command line of a live Python-backend stub (model.py, shared-memory region, ...); None for anything else.

    The stub runs as `triton_python_backend_stub <repository>/<model>/<version>/model.py <shm region> ...`."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        if not args[0].endswith(STUB_NAME) or len(args) < 3:
            return None
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:  # it exited while we looked
        return None
    return args if state != "Z" else None


def stub_processes(server_pid: int) -> dict[int, str]:
    """Live Python-backend stubs of one tritonserver: pid -> the model they serve (zombies excluded)."""
    return {pid: Path(args[1]).parents[1].name for pid in _children(server_pid) if (args := _stub_args(pid))}


def stubs_with_region_prefix(prefix: str) -> list[int]:
    """Live stubs whose shared-memory region name starts with `prefix` (one tritonserver's shm-region-prefix-name),
    wherever they are: the stubs of a server that died have been reparented and are no one's children any more."""
    pids = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    return [pid for pid in pids if (args := _stub_args(pid)) and args[2].startswith(prefix)]


def _children(pid: int) -> list[int]:
    """The child processes of `pid`, from the kernel's per-thread lists (no scan of every process)."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # the thread ended while we looked
            continue
    return children


class StubHealer:
    """A daemon thread that reloads (unload + load) a model as soon as one of its stubs is gone.

    Needs the server in model-control mode explicit (`TritonServer(..., heal_stubs=True)` sets it).
    """

    def __init__(self, server_pid: int, reload: Callable[[str], None], period_s: float = 1.0,
                 timeout_s: float = 300.0, log: Callable[[str], None] = print):
        """reload(model): unload and load it through the server's restricted repository API, over whichever endpoint
        the server has open (TritonServer.reload_model); it raises OSError when it cannot."""
        self.server_pid, self.reload, self.period_s, self.timeout_s, self.log = (
            server_pid, reload, period_s, timeout_s, log)
        self.heals: list[Heal] = []
        self._stubs = stub_processes(server_pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"stub-healer-{server_pid}", daemon=True)

    def start(self) -> "StubHealer":
        watched = ", ".join(f"{model} (pid {pid})" for pid, model in sorted(self._stubs.items(), key=lambda s: s[1]))
        self.log(f"stub healer watching {watched or 'no python stubs'}")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self._check()
            except Exception as e:  # never let the healer die silently
                self.log(f"stub healer: {type(e).__name__}: {e}")

    def _check(self) -> None:
        live = stub_processes(self.server_pid)
        for pid, model in self._stubs.items():
            if pid not in live and not self._stop.is_set():
                self._heal(model, pid)
        self._stubs = stub_processes(self.server_pid)

    def _heal(self, model: str, dead_pid: int) -> None:
        t0 = time.monotonic()
        self.log(f"stub {dead_pid} of model {model!r} died: reloading {model!r}")
        try:
            self.reload(model)
        except OSError as e:  # the server itself is going away
            self.log(f"could not reload {model!r}: {e}")
            return
        heal = Heal(model, dead_pid, time.monotonic() - t0)
        self.heals.append(heal)
        self.log(f"model {model!r} is back after {heal.seconds:.1f} s")
