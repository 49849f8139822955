"""N tritonserver replicas behind one nginx front on one machine: `ce-collm serve --replicas N`.

For a developer laptop, the tests and the replica benchmark. The replicas listen on free 127.0.0.1
ports and only the front listens where edges connect. In production each replica is a GPU node of
its own and the front a Kubernetes Deployment (deploy/k8s/, docs/scaling.md); the nginx
configuration is the same one, written by plugin/serving/front.py.

Each replica heals as one server does (a Python stub that died is reloaded: TritonServer's heal_stubs). A replica
whose tritonserver died is reaped within WATCH_PERIOD_S (its stubs killed, its shared memory freed), marked down
and said so on stderr; nginx already sends its sessions to the next replica on the ring, where they re-sync once.
It is not restarted: a restarted replica would take those sessions back (a second re-sync each), and a server that
keeps dying would need a crash-loop policy. The fleet serves on while one replica runs and exits when none is left,
for whoever runs `ce-collm serve` (systemd, a pod) to restart, as it restarts one server.
"""
from __future__ import annotations

import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping

from plugin.serving.front import FrontConfig, NginxFront
from plugin.serving.server import TritonServer, free_ports

WATCH_PERIOD_S = 0.5  # how often the fleet looks for a replica whose tritonserver died


def _to_stderr(message: str) -> None:
    print(f"ce-collm fleet: {message}", file=sys.stderr, flush=True)


class Fleet:
    """Replicas and front, started and stopped together; usable as a context manager."""

    def __init__(self, model_repository: Path | str, replicas: int, *, host: str = "127.0.0.1", grpc_port: int = 0,
                 state_dir: Path | str | None = None, front_options: Mapping[str, Any] | None = None,
                 heal_stubs: bool = True, log: Callable[[str], None] = _to_stderr, **server_options: Any) -> None:
        """server_options go to every TritonServer (extra_args, load_models, backend_dir, ...); front_options to
        FrontConfig (TLS, limits). heal_stubs: every replica reloads a model whose Python stub died (model-control
        mode explicit), as `ce-collm serve` does. log: where a replica going down is told. Replica i logs to
        <state_dir>/replica-<i>.log."""
        if replicas < 1:
            raise ValueError(f"a fleet needs at least one replica, got {replicas}")
        self.state_dir = Path(state_dir) if state_dir is not None else Path(tempfile.mkdtemp(prefix="ce-collm-fleet-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.replicas = [TritonServer(model_repository, log_file=self.state_dir / f"replica-{i}.log",
                                      heal_stubs=heal_stubs, **server_options) for i in range(replicas)]
        port = grpc_port or free_ports(1, host="127.0.0.1" if host in ("", "0.0.0.0") else host)[0]  # picked once
        self.front = NginxFront(FrontConfig(tuple(r.grpc_url for r in self.replicas), self.state_dir / "front",
                                            listen=f"{host}:{port}", **dict(front_options or {})))
        self.log = log
        self.down: set[int] = set()  # replicas whose tritonserver died, reaped
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def grpc_url(self) -> str:
        """What edges connect to: the front."""
        return self.front.url

    def start(self, timeout_s: float = 300.0) -> "Fleet":
        """Start every replica (in parallel) and, once all are ready, the front; then watch the replicas.

        The front's port is checked first: taken, nothing starts."""
        self.front.check_port()
        try:
            with ThreadPoolExecutor(len(self.replicas)) as pool:
                for future in [pool.submit(r.start, timeout_s) for r in self.replicas]:
                    future.result()
            self.front.start()
        except BaseException:
            self.stop()
            raise
        self._stopping.clear()
        self._watcher = threading.Thread(target=self._watch, name="fleet-watcher", daemon=True)
        self._watcher.start()
        return self

    def _watch(self) -> None:
        while not self._stopping.wait(WATCH_PERIOD_S):
            try:
                self.reap()
            except Exception as e:  # never let the watcher die silently
                self.log(f"watcher: {type(e).__name__}: {e}")

    def reap(self) -> list[int]:
        """Reap every replica whose tritonserver died since the last look, and mark it down; returns their indexes.

        Stopping a dead server collects its exit status (until then its stubs see a parent alive), kills the stubs
        it left and removes its shared memory (TritonServer._finish)."""
        died = [i for i, r in enumerate(self.replicas)
                if i not in self.down and r.pid is not None and not r.is_running()]
        for i in died:
            replica = self.replicas[i]
            replica.stop()
            self.down.add(i)
            self.log(f"replica {i} ({replica.grpc_url}, pid {replica.pid}) exited with code {replica.returncode}: "
                     f"reaped and marked down; its sessions re-sync on the other replicas "
                     f"({len(self.replicas) - len(self.down)} of {len(self.replicas)} up)")
        return died

    def is_running(self) -> bool:
        """The front serves and at least one replica is up (the others' sessions move to it)."""
        return self.front.is_running() and any(r.is_running() for r in self.replicas)

    @property
    def returncode(self) -> int | None:
        """The front's exit code if it stopped, else the last replica's."""
        return self.front.returncode if not self.front.is_running() else self.replicas[-1].returncode

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join([f"--- front ---\n{self.front.log_tail(lines)}"]
                         + [f"--- replica {i} ---\n{r.log_tail(lines)}" for i, r in enumerate(self.replicas)])

    def stop(self) -> None:
        """The watcher, the front (no new requests), then every replica."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join(timeout=60)
        self.front.stop()
        with ThreadPoolExecutor(len(self.replicas)) as pool:
            list(pool.map(lambda r: r.stop(), self.replicas))

    def describe(self) -> str:
        """The endpoints, for people."""
        lines = [f"  grpc     {self.grpc_url}   (nginx front, pid {self.front.pid}; sessions sticky by "
                 f"consistent hash; config {self.front.conf_path})"]
        for i, r in enumerate(self.replicas):
            state = f"pid {r.pid}" if r.is_running() else f"exited {r.returncode}"
            lines.append(f"  replica {i}  grpc {r.grpc_url}  http {r.http_endpoint}  metrics {r.metrics_url}  "
                         f"({state})")
        lines.append(f"  logs     {self.state_dir}")
        return "\n".join(lines)

    def __enter__(self) -> "Fleet":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
