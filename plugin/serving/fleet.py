"""N tritonserver replicas behind one nginx front on one machine: `ce-collm serve --replicas N`.

For a developer laptop, the tests and the replica benchmark. The replicas listen on free 127.0.0.1
ports and only the front listens where edges connect. In production each replica is a GPU node of
its own and the front a Kubernetes Deployment (deploy/k8s/, docs/scaling.md); the nginx
configuration is the same one, written by plugin/serving/front.py.
"""
from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping

from plugin.serving.front import FrontConfig, NginxFront
from plugin.serving.server import TritonServer, free_ports


class Fleet:
    """Replicas and front, started and stopped together; usable as a context manager."""

    def __init__(self, model_repository: Path | str, replicas: int, *, host: str = "127.0.0.1", grpc_port: int = 0,
                 state_dir: Path | str | None = None, front_options: Mapping[str, Any] | None = None,
                 **server_options: Any) -> None:
        """server_options go to every TritonServer (extra_args, model_control_mode, backend_dir, ...);
        front_options to FrontConfig (TLS, limits). Replica i logs to <state_dir>/replica-<i>.log."""
        if replicas < 1:
            raise ValueError(f"a fleet needs at least one replica, got {replicas}")
        self.state_dir = Path(state_dir) if state_dir is not None else Path(tempfile.mkdtemp(prefix="ce-collm-fleet-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.replicas = [TritonServer(model_repository, log_file=self.state_dir / f"replica-{i}.log", **server_options)
                         for i in range(replicas)]
        port = grpc_port or free_ports(1, host="127.0.0.1" if host in ("", "0.0.0.0") else host)[0]  # picked once
        self.front = NginxFront(FrontConfig(tuple(r.grpc_url for r in self.replicas), self.state_dir / "front",
                                            listen=f"{host}:{port}", **dict(front_options or {})))

    @property
    def grpc_url(self) -> str:
        """What edges connect to: the front."""
        return self.front.url

    def start(self, timeout_s: float = 300.0) -> "Fleet":
        """Start every replica (in parallel) and, once all are ready, the front."""
        try:
            with ThreadPoolExecutor(len(self.replicas)) as pool:
                for future in [pool.submit(r.start, timeout_s) for r in self.replicas]:
                    future.result()
            self.front.start()
        except BaseException:
            self.stop()
            raise
        return self

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
        """The front first (no new requests), then every replica."""
        self.front.stop()
        with ThreadPoolExecutor(len(self.replicas)) as pool:
            list(pool.map(lambda r: r.stop(), self.replicas))

    def describe(self) -> str:
        """The endpoints, for people."""
        lines = [f"  grpc     {self.grpc_url}   (nginx front, pid {self.front.pid}; sessions sticky by "
                 f"consistent hash; config {self.front.conf_path})"]
        for i, r in enumerate(self.replicas):
            state = f"pid {r.pid}" if r.is_running() else f"exited {r.returncode}"
            lines.append(f"  replica {i}  grpc {r.grpc_url}  http http://{r.http_url}  metrics {r.metrics_url}  ({state})")
        lines.append(f"  logs     {self.state_dir}")
        return "\n".join(lines)

    def __enter__(self) -> "Fleet":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
