"""Bring back a python model whose backend stub died.

Triton 2.51 never restarts a dead Python-backend stub (SIGKILL, out of memory): every later request
to that model fails (Triton's words: the MODEL_DOWN signatures in plugin/protocol/errors.py) while
the server and the model still report READY (ENVIRONMENT.md). Measured here: a plain `load` of the
unchanged model is a no-op, while `unload` then `load` (model-control mode explicit) starts a fresh
stub and the model answers again. The healer watches the server's stub processes and does exactly
that for the model whose stub died. The sessions that model held are gone; the edge's next request
for them is answered "needs START" and it re-syncs, as after a server restart.
"""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

STUB_NAME = "triton_python_backend_stub"


@dataclass(frozen=True)
class Heal:
    model: str
    dead_pid: int
    seconds: float  # from noticing the dead stub to the model being ready again


def stub_processes(server_pid: int) -> dict[int, str]:
    """Live Python-backend stubs of one tritonserver: pid -> the model they serve (zombies excluded)."""
    stubs = {}
    for pid in _children(server_pid):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:  # it exited while we looked
            continue
        if state != "Z" and len(args) > 1 and args[0].decode().endswith(STUB_NAME):
            stubs[pid] = Path(args[1].decode()).parents[1].name  # <repository>/<model>/<version>/model.py
    return stubs


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

    def __init__(self, server_pid: int, http_url: str, headers: dict[str, str], period_s: float = 1.0,
                 timeout_s: float = 300.0, log: Callable[[str], None] = print):
        """headers: what opens the server's restricted model-repository API (server.admin_headers)."""
        self.server_pid, self.http_url, self.headers, self.period_s, self.timeout_s, self.log = (
            server_pid, http_url, headers, period_s, timeout_s, log)
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
            self._post(f"/v2/repository/models/{model}/unload", {"parameters": {"unload_dependents": False}})
            self._post(f"/v2/repository/models/{model}/load", {})
        except (urllib.error.URLError, OSError) as e:  # the server itself is going away
            self.log(f"could not reload {model!r}: {e}")
            return
        heal = Heal(model, dead_pid, time.monotonic() - t0)
        self.heals.append(heal)
        self.log(f"model {model!r} is back after {heal.seconds:.1f} s")

    def _post(self, path: str, body: dict) -> None:
        """Triton's repository API answers a load only once the model is ready (or failed)."""
        req = urllib.request.Request(f"http://{self.http_url}{path}", data=json.dumps(body).encode(), method="POST",
                                     headers=self.headers)
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            resp.read()
