"""The gRPC front of several tritonserver replicas: nginx, routing every session to one replica.

Each replica holds the context of its own sessions, so every request of a session must reach the
same replica. The edge sends its sequence id in the SESSION_HEADER metadata on every request, and
nginx hashes it onto a ring of the replicas (`hash $http_ce_collm_session consistent`: ketama, 160
points per server, placed by the server's name as written in the configuration). Therefore:
  - a session always reaches the same replica, through any nginx instance with the same list;
  - a replica that refuses connections is skipped (`max_fails`): its sessions go on to the next
    replica on the ring, which answers "needs START", and the edge re-syncs there;
  - removing a replica from the list moves only its own sessions; adding one moves about 1/N of all;
  - a request without the header (a health check) is balanced round-robin.

`render` writes the nginx.conf (`ce-collm front-config`); `NginxFront` runs nginx on it with its
own pid, temp and log paths under a state folder and `daemon off` (no root, no system files),
reloads it with a new replica list (SIGHUP: new workers take the new list, the old ones finish
their requests) and stops it. The front also tells the replicas who sent each request: it sets the
CLIENT_HEADER to the identity it authenticated (the client certificate's subject, else the client
address), replacing whatever the client sent, and Triton hands that header to the models.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from plugin.protocol.tensors import CLIENT_HEADER, SESSION_HEADER
from plugin.serving.server import port_is_free, spawn_dying_with_parent

NGINX_HINT = ("install Debian's nginx (apt-get install nginx; `make sysdeps` does it when run as root) "
              "or put an nginx built with the http_v2 and ssl modules on PATH")
# What edges call through the front; everything else (repository, shared memory, statistics, trace,
# logging) stays behind it. ServerLive/ServerReady serve load-balancer health checks.
EDGE_METHODS = ("ModelInfer", "ModelReady", "ServerLive", "ServerReady")
UPSTREAM = "triton"
FAIL_TIMEOUT_S = 10  # a replica that failed a connection is skipped this long, then tried again
HEADER_VARIABLE = "$http_" + SESSION_HEADER.replace("-", "_")  # how nginx names the header


class FrontError(RuntimeError):
    """nginx is missing, refused the configuration, or did not come up."""


@dataclass(frozen=True)
class FrontConfig:
    """Everything the generated nginx.conf depends on; validated on construction."""

    replicas: tuple[str, ...]  # host:port of each tritonserver's gRPC endpoint; the names place them on the ring
    state_dir: Path  # pid file and temp folders; must be writable by nginx
    listen: str = "127.0.0.1:8001"  # address:port the front listens on
    access_log: str = ""  # a path or /dev/stdout; "" = <state_dir>/access.log (JSON lines)
    error_log: str = ""  # a path or stderr; "" = <state_dir>/error.log
    tls_cert: Path | None = None  # with tls_key: terminate TLS at the front
    tls_key: Path | None = None
    client_ca: Path | None = None  # clients must present a certificate signed by this CA (needs TLS)
    max_body_bytes: int = 16 << 20  # gRPC request size cap: a longer request is cut off there (413)
    rate_per_client: int = 500  # requests per second per client (address, or certificate subject with client_ca)
    burst_per_client: int = 1000  # requests above the rate accepted at once before 429 (gRPC UNAVAILABLE)
    workers: str = "1"  # worker processes: "auto" on a dedicated machine
    resolver: str = ""  # DNS server: re-resolve replica names every 5 s (Kubernetes; needs nginx >= 1.27.3)

    def __post_init__(self) -> None:
        object.__setattr__(self, "replicas", tuple(self.replicas))
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        if not self.replicas:
            raise ValueError("a front needs at least one replica")
        for address in (*self.replicas, self.listen):
            split_address(address)
        for value in (self.state_dir, self.access_log, self.error_log, self.tls_cert, self.tls_key, self.client_ca,
                      self.resolver):
            _plain(str(value or ""))
        if len(set(self.replicas)) != len(self.replicas):
            raise ValueError(f"replicas listed twice: {sorted({r for r in self.replicas if self.replicas.count(r) > 1})}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key")
        if self.client_ca is not None and self.tls_cert is None:
            raise ValueError("client_ca (client certificates) needs TLS: give tls_cert and tls_key")
        for name in ("max_body_bytes", "rate_per_client", "burst_per_client"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not (self.workers == "auto" or self.workers.isdigit() and int(self.workers) > 0):
            raise ValueError(f"workers must be a positive number or 'auto', got {self.workers!r}")

    @property
    def access_log_path(self) -> str:
        return self.access_log or str(self.state_dir / "access.log")

    @property
    def error_log_path(self) -> str:
        return self.error_log or str(self.state_dir / "error.log")


def _plain(value: str) -> str:
    """A value written into nginx.conf as it is: nothing that would end or quote a directive."""
    if any(c.isspace() or c in ";{}#'\"$\\" for c in value):
        raise ValueError(f"{value!r}: spaces, quotes and ; {{ }} # $ \\ cannot go into nginx.conf")
    return value


def split_address(address: str) -> tuple[str, int]:
    """'host:port' (or '[v6]:port') -> (host, port); a clear error for anything else."""
    host, sep, port = _plain(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {address!r}")
    return host, int(port)


def render(cfg: FrontConfig) -> str:
    """The nginx.conf of a front over cfg.replicas (nginx >= 1.22; `resolver` needs >= 1.27.3)."""
    state = cfg.state_dir
    tls = cfg.tls_cert is not None
    client_key = "$ssl_client_s_dn" if cfg.client_ca is not None else "$binary_remote_addr"
    client_id = "$ssl_client_s_dn" if cfg.client_ca is not None else "$remote_addr"  # what the front authenticated
    resolve = " resolve" if cfg.resolver else ""
    servers = "\n".join(f"        server {r} max_fails=1 fail_timeout={FAIL_TIMEOUT_S}s{resolve};"
                        for r in cfg.replicas)
    lines = [
        f"# Written by `ce-collm front-config`: a gRPC front for {len(cfg.replicas)} tritonserver replica(s),",
        f"# each session sticky to one replica by a consistent hash of the {SESSION_HEADER} header",
        "# (docs/scaling.md). Regenerate it rather than editing it.",
        f"worker_processes {cfg.workers};",
        f"pid {state / 'nginx.pid'};",
        f"error_log {cfg.error_log_path} notice;",
        "worker_shutdown_timeout 10s;  # after a reload, connections still on old workers close by then",
        "events { worker_connections 4096; }",
        "http {",
        f"    client_body_temp_path {state / 'client_body'};",
        *(f"    {kind}_temp_path {state / kind};" for kind in ("proxy", "fastcgi", "uwsgi", "scgi")),
        "    log_format ce_collm escape=json '{\"time\":\"$msec\",\"client\":\"$remote_addr\","
        f"\"session\":\"{HEADER_VARIABLE}\",\"uri\":\"$uri\",\"status\":\"$status\","
        "\"grpc_status\":\"$sent_http_grpc_status$sent_trailer_grpc_status\",\"upstream\":\"$upstream_addr\","
        "\"upstream_status\":\"$upstream_status\",\"request_s\":\"$request_time\",\"bytes_in\":\"$request_length\"}';",
        f"    access_log {cfg.access_log_path} ce_collm;",
        f"    limit_req_zone {client_key} zone=per_client:10m rate={cfg.rate_per_client}r/s;",
        "    limit_req_status 429;  # gRPC clients read 429 as UNAVAILABLE: retry later",
        *([f"    resolver {cfg.resolver} valid=5s;"] if cfg.resolver else []),
        f"    upstream {UPSTREAM} {{",
        "        zone triton 64k;",
        f"        hash {HEADER_VARIABLE} consistent;",
        servers,
        "        keepalive 64;",
        "    }",
        "    server {",
        f"        listen {cfg.listen}{' ssl' if tls else ''} http2;",
        *([f"        ssl_certificate {cfg.tls_cert};", f"        ssl_certificate_key {cfg.tls_key};",
           "        ssl_protocols TLSv1.2 TLSv1.3;"] if tls else []),
        *([f"        ssl_client_certificate {cfg.client_ca};", "        ssl_verify_client on;"]
          if cfg.client_ca is not None else []),
        f"        client_max_body_size {cfg.max_body_bytes};",
        f"        limit_req zone=per_client burst={cfg.burst_per_client} nodelay;",
        "        grpc_connect_timeout 2s;",
        "        grpc_next_upstream error timeout;  # not yet sent: try the next replica on the ring",
        f"        location ~ ^/inference\\.GRPCInferenceService/({'|'.join(EDGE_METHODS)})$ {{",
        f"            grpc_set_header {CLIENT_HEADER} {client_id};  # replaces any {CLIENT_HEADER} the client sent",
        f"            grpc_pass grpc://{UPSTREAM};",
        "        }",
        "        location / { return 403; }  # gRPC PERMISSION_DENIED",
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


# -- running nginx ----------------------------------------------------------------------------------
def find_nginx() -> Path:
    """nginx on PATH, or in /usr/sbin (not on a normal user's PATH on Debian)."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise FrontError(f"nginx not found: {NGINX_HINT}")
    return Path(found)


def check_config(conf: Path, binary: Path | None = None) -> None:
    """`nginx -t` on conf; FrontError with nginx's own words when it refuses."""
    binary = binary or find_nginx()
    result = subprocess.run([str(binary), "-t", "-q", "-c", str(conf), "-p", str(conf.parent)],
                            capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise FrontError(f"nginx refused {conf}:\n{result.stderr.strip()}")


def _children(pid: int) -> set[int]:
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone meanwhile
            continue
        if int(text[text.rindex(")") + 2:].split()[1]) == pid:
            kids.add(int(stat.parent.name))
    return kids


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class NginxFront:
    """One nginx master (and its workers) serving a FrontConfig; usable as a context manager."""

    def __init__(self, config: FrontConfig, binary: Path | None = None) -> None:
        self.config = config
        self.binary = binary or find_nginx()
        self.conf_path = config.state_dir / "nginx.conf"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """host:port, as tritonclient.grpc.InferenceServerClient(url=...) wants it."""
        host, port = split_address(self.config.listen)
        return f"{'127.0.0.1' if host in ('0.0.0.0', '*') else host}:{port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def _write(self, config: FrontConfig) -> None:
        """Write and check the configuration; the file changes only if nginx accepts it."""
        config.state_dir.mkdir(parents=True, exist_ok=True)
        candidate = self.conf_path.with_name("nginx.conf.new")
        candidate.write_text(render(config))
        check_config(candidate, self.binary)
        os.replace(candidate, self.conf_path)
        self.config = config

    def check_port(self) -> None:
        """FrontError, in one line, if another process listens where this front would (a front left running): nginx
        would fail to bind after its retries, while a readiness probe reached the other process."""
        host, port = split_address(self.config.listen)
        if not port_is_free(port, "0.0.0.0" if host == "*" else host):
            raise FrontError(f"port {port} on {host} is in use by another process (another front still running?): "
                             "stop it or listen on another port")

    def _bound(self) -> bool:
        """Our nginx holds its listening sockets: it writes its pid file only after opening them all."""
        try:
            return int((self.config.state_dir / "nginx.pid").read_text()) == self.pid
        except (OSError, ValueError):
            return False

    def start(self, timeout_s: float = 15.0) -> "NginxFront":
        """Start nginx in the foreground (`daemon off`) and return once it bound its port and accepts connections.

        nginx gets SIGTERM when this process dies, however it dies (the parent-death signal): its master then stops
        its workers, so a launcher killed without warning leaves nothing holding the port."""
        if self.is_running():
            raise FrontError(f"nginx already running (pid {self.pid})")
        self.check_port()
        self._write(self.config)
        log = open(self.config.state_dir / "nginx.out", "ab")
        self._proc = spawn_dying_with_parent(
            [str(self.binary), "-c", str(self.conf_path), "-p", str(self.config.state_dir), "-g", "daemon off;"],
            death_signal=signal.SIGTERM, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        log.close()
        host, port = split_address(self.url)
        deadline = time.monotonic() + timeout_s
        while not (self._bound() and _accepts(host, port)):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise FrontError(f"nginx did not come up on {self.url}:\n{self.log_tail()}")
            time.sleep(0.05)
        return self

    def reload(self, replicas: Sequence[str], timeout_s: float = 30.0) -> None:
        """Serve a new replica list: new workers take it, old ones finish their requests and exit.

        Returns once only new workers run (old ones close each client connection when its requests are
        done, at most worker_shutdown_timeout later), so from then on every request sees the new list.
        Sessions whose replica is still listed stay where they are.
        """
        if not self.is_running():
            raise FrontError("nginx is not running")
        assert self._proc is not None
        old = _children(self._proc.pid)
        self._write(replace(self.config, replicas=tuple(replicas)))
        self._proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout_s
        while True:
            workers = _children(self._proc.pid)
            if workers and not workers & old:
                return
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise FrontError(f"nginx still runs old workers {sorted(workers & old)} {timeout_s:.0f} s after a "
                                 f"reload:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGQUIT (graceful: requests in flight finish), then SIGKILL after timeout_s."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def access_log(self) -> list[dict[str, str]]:
        """The requests served so far, one dict per request (the `ce_collm` log format)."""
        path = Path(self.config.access_log_path)
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def log_tail(self, lines: int = 30) -> str:
        text = ""
        for path in (self.config.state_dir / "nginx.out", Path(self.config.error_log_path)):
            if path.is_file():
                text += "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
        return text

    def __enter__(self) -> "NginxFront":
        if not self.is_running():
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- `ce-collm front-config` ----------------------------------------------------------------------
def render_configmap(cfg: FrontConfig, name: str, namespace: str) -> str:
    """A Kubernetes ConfigMap holding the nginx.conf under the key nginx.conf."""
    body = "".join(f"    {line}\n" for line in render(cfg).splitlines())
    return ("# Written by `ce-collm front-config --configmap ...` (deploy/README.md has the command); do not edit.\n"
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n"
            f"  name: {name}\n  namespace: {namespace}\n"
            "  labels:\n    app.kubernetes.io/name: ce-collm-front\n    app.kubernetes.io/part-of: ce-collm\n"
            f"data:\n  nginx.conf: |\n{body}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = FrontConfig(("h:1",), Path("."))  # the defaults, for the help text
    p.add_argument("--replica", action="append", required=True, metavar="HOST:PORT",
                   help="a tritonserver's gRPC endpoint, repeatable; the names place replicas on the hash ring, "
                        "so every front must list the same names")
    p.add_argument("--listen", default=d.listen, metavar="ADDR:PORT", help="where edges connect (default: %(default)s)")
    p.add_argument("--state-dir", type=Path, default=Path("/tmp/ce-collm-front"), metavar="DIR",
                   help="pid file and temp folders, writable by nginx (default: %(default)s)")
    p.add_argument("--access-log", default="", metavar="F",
                   help="JSON lines, one per request, or /dev/stdout (default: <state-dir>/access.log)")
    p.add_argument("--error-log", default="", metavar="F", help="a file or stderr (default: <state-dir>/error.log)")
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="terminate TLS with this certificate (with --tls-key)")
    p.add_argument("--tls-key", type=Path, metavar="PEM")
    p.add_argument("--client-ca", type=Path, metavar="PEM",
                   help="require client certificates signed by this CA; rate limits then count per certificate")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, metavar="N",
                   help="largest request accepted (default: %(default)s)")
    p.add_argument("--rate-per-client", type=int, default=d.rate_per_client, metavar="R",
                   help="requests/s per client; more get 429, which gRPC clients read as UNAVAILABLE (default: %(default)s)")
    p.add_argument("--burst-per-client", type=int, default=d.burst_per_client, metavar="N",
                   help="requests above the rate accepted at once (default: %(default)s)")
    p.add_argument("--workers", default=d.workers, metavar="N", help="nginx worker processes or auto (default: %(default)s)")
    p.add_argument("--resolver", default="", metavar="ADDR",
                   help="DNS server to re-resolve replica names every 5 s, e.g. kube-dns.kube-system.svc.cluster.local "
                        "(needs nginx >= 1.27.3; default: resolve once at start)")
    p.add_argument("--configmap", metavar="NAME", help="write a Kubernetes ConfigMap NAME holding the config")
    p.add_argument("--namespace", default="default", metavar="NS", help="the ConfigMap's namespace (default: %(default)s)")
    p.add_argument("--out", type=Path, metavar="FILE", help="write here (default: standard output)")


def config_from_args(args: argparse.Namespace) -> FrontConfig:
    return FrontConfig(tuple(args.replica), args.state_dir, listen=args.listen, access_log=args.access_log,
                       error_log=args.error_log, tls_cert=args.tls_cert, tls_key=args.tls_key, client_ca=args.client_ca,
                       max_body_bytes=args.max_body_bytes, rate_per_client=args.rate_per_client,
                       burst_per_client=args.burst_per_client, workers=args.workers, resolver=args.resolver)


def run(args: argparse.Namespace) -> int:
    """Write the front's nginx.conf, or a ConfigMap holding it."""
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"ce-collm front-config: {e}", file=sys.stderr)
        return 2
    text = render(cfg) if args.configmap is None else render_configmap(cfg, args.configmap, args.namespace)
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
