"""Run a real tritonserver from Python: for `ce-collm serve`, for tests and for benchmarks.

Two installs are supported. In the NGC container `tritonserver` is on PATH and its backends
(python, tensorrt, onnxruntime) live beside it in /opt/tritonserver/backends. Elsewhere the PyPI
wheel nvidia-pytriton==0.7.0 ships the same server (2.51.0) with only the python backend; its
backend folder has to be copied somewhere writable with the Python stub for this interpreter.
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import ctypes.util
import functools
import hashlib
import importlib.util
import json
import os
import queue
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Sequence

from plugin.paths import REPO_ROOT
from plugin.protocol.tensors import CLIENT_HEADER
from plugin.serving.healer import STUB_NAME, StubHealer, stubs_with_region_prefix

INSTALL_HINT = (
    "install the Python wheel that ships it (pip install nvidia-pytriton==0.7.0, "
    "tritonserver 2.51.0 with the python backend) or run inside the NGC Triton container "
    "(nvcr.io/nvidia/tritonserver), where tritonserver is on PATH"
)


class TritonServerError(RuntimeError):
    """tritonserver is missing, died, or did not get every model ready in time."""

    def __init__(self, message: str, summary: str = ""):
        super().__init__(message)
        self.summary = summary or message  # one line for a command line; the message may quote the log


@dataclass(frozen=True)
class TritonInstall:
    binary: Path  # the tritonserver executable
    backends: Path  # folder of backends/<name>/; read-only inside the wheel
    lib_dirs: tuple[Path, ...]  # go on LD_LIBRARY_PATH (the wheel's bundled libraries)
    stub: Path | None  # wheel only: Python-backend stub built for this interpreter's X.Y
    cache_dir: Path | None  # folder of response-cache implementations, if shipped

    @property
    def from_wheel(self) -> bool:
        return self.stub is not None


def _pytriton_dir() -> Path | None:
    """Where the nvidia-pytriton wheel is installed, without importing it (that is slow)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _wheel_lib_dirs(pytriton_dir: Path) -> tuple[Path, ...]:
    candidates = (pytriton_dir.parent / "nvidia_pytriton.libs", pytriton_dir / "tritonserver/external_libs")
    return tuple(d for d in candidates if d.is_dir())


def find_tritonserver() -> TritonInstall:
    """Locate tritonserver: the one on PATH (NGC container) first, else the nvidia-pytriton wheel's."""
    on_path = shutil.which("tritonserver")
    if on_path:
        binary = Path(on_path).resolve()
        for backends in (binary.parent.parent / "backends", Path("/opt/tritonserver/backends")):
            if backends.is_dir():
                caches = backends.parent / "caches"
                return TritonInstall(binary, backends, (), None, caches if caches.is_dir() else None)
        raise TritonServerError(f"found {binary} on PATH but no backends folder beside it")

    pytriton_dir = _pytriton_dir()
    if pytriton_dir is None:
        raise TritonServerError(f"no tritonserver on PATH and nvidia-pytriton is not installed: {INSTALL_HINT}")
    root = pytriton_dir / "tritonserver"
    binary = root / "bin" / "tritonserver"
    if not binary.is_file():
        raise TritonServerError(f"nvidia-pytriton at {pytriton_dir} has no {binary}: {INSTALL_HINT}")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / STUB_NAME
    if not stub.is_file():
        shipped = sorted(p.name for p in (root / "python_backend_stubs").glob("*"))
        raise TritonServerError(
            f"nvidia-pytriton ships Python-backend stubs for {shipped}, not for Python {version}: "
            "use one of those Python versions"
        )
    caches = root / "caches"
    return TritonInstall(binary, root / "backends", _wheel_lib_dirs(pytriton_dir), stub,
                         caches if caches.is_dir() else None)


def default_backend_dir(install: TritonInstall) -> Path:
    """A per-user cache folder, one per (wheel location, Python X.Y), so venvs do not clash."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tag = hashlib.sha1(str(install.binary).encode()).hexdigest()[:10]
    return base / "ce-collm" / f"triton-backends-py{sys.version_info.major}.{sys.version_info.minor}-{tag}"


def _copy_if_changed(src: Path, dst: Path) -> bool:
    """Copy src to dst (atomically, keeping mtime and mode) unless dst already matches it."""
    s = src.stat()
    if dst.is_file():
        d = dst.stat()
        if d.st_size == s.st_size and d.st_mtime_ns == s.st_mtime_ns:
            return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)  # a server that is reading dst keeps its old inode
    return True


def prepare_backend_dir(dest: Path | str | None = None, install: TritonInstall | None = None) -> Path:
    """Return the folder to pass as --backend-directory.

    The wheel's backend folder is read-only in spirit (site-packages) and lacks the stub, so it is
    copied to `dest`, with the stub for this interpreter in backends/python/. Idempotent: files
    that already match (size, mtime) are left alone. An NGC install is used as it is.
    """
    install = install or find_tritonserver()
    if not install.from_wheel:
        return install.backends
    assert install.stub is not None
    backends = Path(dest) if dest is not None else default_backend_dir(install)
    for src in install.backends.rglob("*"):
        if src.is_file() and "__pycache__" not in src.parts:
            _copy_if_changed(src, backends / src.relative_to(install.backends))
    _copy_if_changed(install.stub, backends / "python" / STUB_NAME)
    return backends


def free_ports(count: int = 1, host: str = "127.0.0.1") -> list[int]:
    """Distinct free TCP ports on host; all sockets stay open until every port is picked."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on host:port now (host may be an IPv6 address, bracketed or not)."""
    host = host.strip("[]")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _prepend(paths: Iterable[str | Path], existing: str | None) -> str:
    parts = [str(p) for p in paths] + ([existing] if existing else [])
    seen: list[str] = []
    for part in ":".join(parts).split(":"):
        if part and part not in seen:
            seen.append(part)
    return ":".join(seen)


def _libpython_dirs() -> list[Path]:
    """This interpreter's libpython folder: the stub links libpython3.X.so and must get ours."""
    libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir and soname and (Path(libdir) / soname).exists():
        return [Path(libdir)]
    return []


def server_env(install: TritonInstall, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment tritonserver and its Python stubs need.

    LD_LIBRARY_PATH: the wheel's bundled libraries and this interpreter's libpython.
    PATH: this interpreter's bin first; the stub embeds the Python it finds there, so model.py
    sees this venv's numpy and torch. PYTHONPATH: the repository root, so model.py can import plugin.
    """
    env = dict(os.environ if base is None else base)
    env["LD_LIBRARY_PATH"] = _prepend([*install.lib_dirs, *_libpython_dirs()], env.get("LD_LIBRARY_PATH"))
    env["PATH"] = _prepend([Path(sys.executable).parent], env.get("PATH"))  # not resolved: keep the venv
    env["PYTHONPATH"] = _prepend([REPO_ROOT], env.get("PYTHONPATH"))
    return env


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0") else ("[::1]" if host == "::" else host)


# Every API that changes what the server runs or reads (load/unload a model, which can carry a model.py; register
# shared memory; trace and log settings) answers only requests with this header and the launcher's secret.
# Triton's gRPC endpoint expects it as `triton-grpc-protocol-<key>`, its HTTP endpoint as `<key>`.
ADMIN_HEADER = "ce-collm-admin"
ADMIN_APIS = ("model-repository", "shared-memory", "trace", "logging")


def admin_headers(secret: str, grpc: bool = False) -> dict[str, str]:
    """The header that opens the restricted APIs (ADMIN_APIS) of a server started with `secret`."""
    return {f"triton-grpc-protocol-{ADMIN_HEADER}" if grpc else ADMIN_HEADER: secret}


def _triton_flag(args: Sequence[str], name: str) -> str | None:
    """The value of Triton's flag --name in args (`--name=value` or `--name value`; the last one wins), else None."""
    value = None
    for i, arg in enumerate(args):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(args):
            value = args[i + 1]
    return value


def _flag_is_true(value: str | None, default: bool) -> bool:
    """A boolean flag's value as Triton reads it (true/on/1, false/off/0, any case)."""
    return default if value is None else value.lower() in ("true", "on", "1")


def _certificate_name(pem: str) -> str | None:
    """The first DNS name (else the common name) of a PEM certificate file. The standard library decodes a certificate
    file only with this private helper (CPython's own tests use it); without it, None."""
    try:
        cert = ssl._ssl._test_decode_cert(pem)  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return None
    names = [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
    names += [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    return names[0] if names else None


# Harmless on a machine without a GPU; kept out of the "error lines" of failure messages.
_CPU_NOISE = ("NVML", "DCGM", "CudaDriverHelper", "CUDA driver", "pinned memory")


def _is_error_line(line: str) -> bool:
    """Triton's own error lines (E<date>), the stub's report of a model.py exception, fatal exits."""
    if any(noise in line for noise in _CPU_NOISE):
        return False
    return (line[:1] == "E" and line[1:5].isdigit()) or "Failed to initialize Python stub" in line \
        or line.startswith("error:")


_LIVE_SERVERS: "set[TritonServer]" = set()


class _Spawner:
    """The kernel's parent-death signal follows the THREAD that forked the child, so every tritonserver
    is forked by this one daemon thread: servers started from short-lived threads (a fleet starting its
    replicas in parallel, a test's timer) live on, all of them die with the process, and a daemon thread
    outlives the atexit handlers that stop servers gracefully."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], object], Future]] = queue.Queue()
        threading.Thread(target=self._run, name="tritonserver-spawner", daemon=True).start()

    def _run(self) -> None:
        while True:
            fn, future = self._jobs.get()
            try:
                future.set_result(fn())
            except BaseException as e:  # handed to the caller
                future.set_exception(e)

    def call(self, fn: Callable[[], object]) -> object:
        future: Future = Future()
        self._jobs.put((fn, future))
        return future.result()


_SPAWNER = _Spawner()


def _die_with_parent(death_signal: int, parent: int, cpus: frozenset[int] | None) -> None:
    """In the child before exec: the kernel sends it death_signal when our process dies, so a launcher
    killed without warning (SIGKILL) leaves no orphan holding the ports; pinned to cpus when given, which
    its own children (tritonserver's Python-backend stubs) inherit."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, death_signal)
    if os.getppid() != parent:  # the launcher died before prctl: no signal will come
        os.kill(os.getpid(), death_signal)
    if cpus is not None:
        os.sched_setaffinity(0, cpus)


def spawn_dying_with_parent(args: Sequence[str], death_signal: int = signal.SIGKILL,
                            cpus: frozenset[int] | None = None, **popen_kwargs: Any) -> subprocess.Popen[bytes]:
    """subprocess.Popen(args) forked by the spawner thread, the child getting death_signal when this process dies
    (tritonserver: SIGKILL; nginx: SIGTERM, which its master passes on to its workers, a SIGKILL would orphan them)
    and, when cpus is given, pinned to those CPU cores."""
    return _SPAWNER.call(lambda: subprocess.Popen(
        args, preexec_fn=functools.partial(_die_with_parent, death_signal, os.getpid(), cpus), **popen_kwargs))


@atexit.register
def _stop_live_servers() -> None:
    """Do not leave servers behind when the interpreter exits without stopping them."""
    for server in list(_LIVE_SERVERS):
        server.stop(timeout_s=10)


class TritonServer:
    """One tritonserver process on fixed ports, usable as a context manager.

    Ports given as 0 are picked once, at construction, so restart() comes back on the same ones.
    The server's stdout/stderr go through a reader thread to `log_file` (if given), to `echo`
    (if given) and into an in-memory tail used in error messages.
    """

    def __init__(
        self,
        model_repository: Path | str,
        *,
        host: str = "127.0.0.1",
        grpc_port: int = 0,
        http_port: int = 0,
        metrics_port: int = 0,
        log_file: Path | str | None = None,
        extra_args: Sequence[str] = (),
        model_control_mode: str = "none",
        load_models: Sequence[str] = (),
        backend_dir: Path | str | None = None,
        install: TritonInstall | None = None,
        echo: IO[str] | None = None,
        tail_lines: int = 400,
        heal_stubs: bool = False,
        admin_secret: str | None = None,
        cpus: frozenset[int] | None = None,
    ) -> None:
        """heal_stubs: reload a python model whose backend stub died (plugin/serving/healer.py); this runs
        the server in model-control mode explicit with every model loaded at start unless told otherwise.
        admin_secret: what opens the admin APIs (ADMIN_APIS, admin_headers); a random one by default, so that
        only this launcher (its readiness checks, its healer) can load or unload a model.
        cpus: the CPU cores the server and its Python-backend stubs run on (None: any), so that a benchmark on one
        machine can give the edge and the server separate cores, as two devices would have."""
        self.model_repository = Path(model_repository).resolve()
        if not self.model_repository.is_dir():
            raise TritonServerError(f"model repository {self.model_repository} is not a directory")
        self.install = install or find_tritonserver()
        self.backend_dir = prepare_backend_dir(backend_dir, self.install)
        self.host = host
        wanted = [grpc_port, http_port, metrics_port]
        picked = iter(free_ports(wanted.count(0), host=_connect_host(host)))
        self.grpc_port, self.http_port, self.metrics_port = (p or next(picked) for p in wanted)
        self.log_file = Path(log_file) if log_file is not None else None
        self.extra_args = list(extra_args)
        self.heal_stubs = heal_stubs
        self.model_control_mode = "explicit" if heal_stubs else model_control_mode
        self.load_models = list(load_models) or (["*"] if heal_stubs else [])
        self.echo = echo
        self.admin_secret = admin_secret or secrets.token_urlsafe(24)
        self.cpus = cpus
        self._shm_prefix = f"ce_collm_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        self._tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._errors: collections.deque[str] = collections.deque(maxlen=40)
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self.healer: StubHealer | None = None

    # -- endpoints ---------------------------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        """host:port, as tritonclient.grpc.InferenceServerClient(url=...) wants it."""
        return f"{_connect_host(self.host)}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """host:port, as tritonclient.http.InferenceServerClient(url=...) wants it."""
        return f"{_connect_host(self.host)}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        """Full URL of the Prometheus metrics page."""
        return f"http://{_connect_host(self.host)}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def http_enabled(self) -> bool:
        """False with --allow-http=false among the extra args: readiness and healing then go over gRPC."""
        return _flag_is_true(_triton_flag(self.extra_args, "allow-http"), default=True)

    @property
    def http_endpoint(self) -> str:
        """The HTTP endpoint as people read it, or that it is off."""
        return f"http://{self.http_url}" if self.http_enabled else "off (--allow-http=false)"

    def log_tail(self, lines: int = 40) -> str:
        return "".join(list(self._tail)[-lines:])

    # -- lifecycle ---------------------------------------------------------------------------
    def command(self, shown: bool = False) -> list[str]:
        """The tritonserver command line; shown: with the admin secret masked (for messages)."""
        secret = "***" if shown else self.admin_secret
        restricted = f"{','.join(ADMIN_APIS)}:{ADMIN_HEADER}={secret}"
        cmd = [
            str(self.install.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self.backend_dir}",
            f"--grpc-address={self.host}",
            f"--http-address={self.host}",
            f"--metrics-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-port={self.http_port}",
            f"--metrics-port={self.metrics_port}",
            f"--model-control-mode={self.model_control_mode}",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--grpc-restricted-protocol={restricted}",
            f"--http-restricted-api={restricted}",
            f"--grpc-header-forward-pattern=^{CLIENT_HEADER}$",
            f"--http-header-forward-pattern=^{CLIENT_HEADER}$",
            # a unique prefix keeps concurrent servers' /dev/shm regions apart and lets us clean up
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
        ]
        if self.install.cache_dir is not None:
            cmd.append(f"--cache-directory={self.install.cache_dir}")
        cmd += [f"--load-model={name}" for name in self.load_models]
        return cmd + self.extra_args

    def start(self, timeout_s: float = 120.0) -> "TritonServer":
        """Launch tritonserver and return once the server and every model in it is ready."""
        if self.is_running():
            raise TritonServerError(f"tritonserver already running (pid {self.pid})")
        self._tail.clear()
        self._errors.clear()
        self._proc = spawn_dying_with_parent(
            self.command(),
            cpus=self.cpus,
            env=server_env(self.install),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us only; we stop the server in order
        )
        _LIVE_SERVERS.add(self)
        self._reader = threading.Thread(target=self._read_output, args=(self._proc,), daemon=True,
                                        name=f"tritonserver-{self._proc.pid}-log")
        self._reader.start()
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop(timeout_s=15)
            raise
        if self.heal_stubs:
            self.healer = StubHealer(self._proc.pid, self.reload_model, log=self._note).start()
        return self

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, wait up to timeout_s (in-flight requests finish), then SIGKILL. Returns the exit code."""
        proc = self._proc
        if proc is None:
            return None
        self._stop_healer()  # stubs exit on shutdown: that is no reason to reload their models
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
            except ProcessLookupError:
                pass
        self._finish(proc)
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL without warning, as a crash would; for fault tests."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        self._stop_healer()
        proc.kill()
        proc.wait(timeout=30)
        self._finish(proc)

    def restart(self, timeout_s: float = 120.0) -> "TritonServer":
        """Stop (if running) and start again on the same ports."""
        self.stop()
        deadline = time.monotonic() + 30
        while not all(port_is_free(p, _connect_host(self.host)) for p in self.ports()):
            if time.monotonic() > deadline:
                raise TritonServerError(f"ports {self.ports()} still busy 30 s after the server stopped")
            time.sleep(0.2)
        return self.start(timeout_s)

    def ports(self) -> tuple[int, int, int]:
        return (self.grpc_port, self.http_port, self.metrics_port)

    def __enter__(self) -> "TritonServer":
        if not self.is_running():
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------------------------
    def _stop_healer(self) -> None:
        if self.healer is not None:
            self.healer.stop()
            self.healer = None

    def _note(self, message: str) -> None:
        """A line of our own in the server's log tail (and on `echo`): what the healer did."""
        line = f"ce-collm: {message}\n"
        self._tail.append(line)
        if self.log_file is not None:
            with open(self.log_file, "a", encoding="utf-8") as log:
                log.write(line)
        if self.echo is not None:
            self.echo.write(line)
            self.echo.flush()

    def _read_output(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        log = open(self.log_file, "a", encoding="utf-8") if self.log_file is not None else None
        try:
            for raw in iter(proc.stdout.readline, b""):
                line = raw.decode("utf-8", errors="replace")
                self._tail.append(line)
                if _is_error_line(line):
                    self._errors.append(line)
                if log is not None:
                    log.write(line)
                    log.flush()
                if self.echo is not None:
                    self.echo.write(line)
                    self.echo.flush()
        finally:
            if log is not None:
                log.close()

    def _finish(self, proc: subprocess.Popen[bytes]) -> None:
        """Once tritonserver has exited: kill the Python stubs it left (a server that died does not stop them; they
        are found by their shared-memory prefix, wherever they were reparented), then free its shared memory."""
        _LIVE_SERVERS.discard(self)
        for stub in stubs_with_region_prefix(self._shm_prefix):
            with contextlib.suppress(ProcessLookupError):
                os.kill(stub, signal.SIGKILL)
        if self._reader is not None:
            self._reader.join(timeout=5)  # stubs may hold the pipe a moment after a SIGKILL
        if proc.stdout is not None and (self._reader is None or not self._reader.is_alive()):
            proc.stdout.close()
        for leftover in Path("/dev/shm").glob(f"{self._shm_prefix}*"):
            leftover.unlink(missing_ok=True)

    def _failure(self, what: str) -> TritonServerError:
        errors = "".join(self._errors)
        # the first error line without Triton's E<date> prefix, quotes and the stub's escaped traceback
        first = self._errors[0].split("] ", 1)[-1].strip().strip('"').split("\\n")[0] if self._errors else ""
        return TritonServerError(
            f"{what}\ncommand: {' '.join(self.command(shown=True))}\n"
            + (f"--- error lines in the server log ---\n{errors}" if errors else "")
            + f"--- last lines of the server log ---\n{self.log_tail()}",
            summary=f"{what}: {first}" if first else what,
        )

    def _get_json(self, path: str, method: str = "GET", body: object = None, timeout_s: float = 5.0) -> object:
        """An HTTP call with the admin header; a POST sends `body` ({} by default) as JSON."""
        data = json.dumps({} if body is None else body).encode() if method == "POST" else None
        req = urllib.request.Request(f"http://{self.http_url}{path}", method=method, data=data,
                                     headers=admin_headers(self.admin_secret))
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            answer = resp.read()
        return json.loads(answer) if answer else None

    @contextlib.contextmanager
    def _grpc(self) -> Iterator[Any]:
        """A gRPC client of this server, for when HTTP is off; its errors arrive as ConnectionError (an OSError, as the
        HTTP calls' do). With TLS it trusts exactly the certificate the server presents (--grpc-server-cert), under
        the name written in it (the launcher dials its own server, on 127.0.0.1 for --host 0.0.0.0); with mutual TLS
        it presents that certificate and key as its own, which the server accepts when its --grpc-root-cert CA
        signed them."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        tls: dict[str, Any] = {}
        mutual = _flag_is_true(_triton_flag(self.extra_args, "grpc-use-ssl-mutual"), default=False)
        if mutual or _flag_is_true(_triton_flag(self.extra_args, "grpc-use-ssl"), default=False):
            cert = _triton_flag(self.extra_args, "grpc-server-cert")
            name = _certificate_name(cert) if cert else None
            tls = dict(ssl=True, root_certificates=cert,
                       channel_args=[("grpc.ssl_target_name_override", name)] if name else None)
            if mutual:
                tls.update(private_key=_triton_flag(self.extra_args, "grpc-server-key"), certificate_chain=cert)
        client = grpcclient.InferenceServerClient(self.grpc_url, **tls)
        try:
            yield client
        except InferenceServerException as e:
            raise ConnectionError(f"gRPC {self.grpc_url}: {e}") from e
        finally:
            client.close()

    def server_ready(self) -> bool:
        try:
            return self._server_ready()
        except OSError:
            return False

    def _server_ready(self) -> bool:
        """Live, with every loaded model ready (--strict-readiness): over HTTP, or over gRPC when HTTP is off."""
        if not self.http_enabled:
            with self._grpc() as client:
                return bool(client.is_server_ready(client_timeout=2))
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as resp:
                return resp.status == 200
        except urllib.error.HTTPError:  # 503: not ready yet
            return False

    def repository_index(self) -> list[dict[str, str]]:
        """Every model in the repository with its state, from the repository API (admin header)."""
        if not self.http_enabled:
            with self._grpc() as client:
                index = client.get_model_repository_index(headers=admin_headers(self.admin_secret, grpc=True),
                                                          as_json=True)
            return index.get("models", [])
        listed = self._get_json("/v2/repository/index", method="POST")
        assert isinstance(listed, list)
        return listed

    def metadata(self) -> dict[str, object]:
        if not self.http_enabled:
            with self._grpc() as client:
                return client.get_server_metadata(as_json=True)
        meta = self._get_json("/v2")
        assert isinstance(meta, dict)
        return meta

    def reload_model(self, model: str, timeout_s: float = 300.0) -> None:
        """Unload, then load `model` (model-control mode explicit): a fresh Python stub, what the healer needs. The
        load is answered once the model is ready (or failed)."""
        if not self.http_enabled:
            headers = admin_headers(self.admin_secret, grpc=True)
            with self._grpc() as client:
                client.unload_model(model, headers=headers, unload_dependents=False, client_timeout=timeout_s)
                client.load_model(model, headers=headers, client_timeout=timeout_s)
            return
        self._get_json(f"/v2/repository/models/{model}/unload", "POST", {"parameters": {"unload_dependents": False}},
                       timeout_s)
        self._get_json(f"/v2/repository/models/{model}/load", "POST", {}, timeout_s)

    def _models_to_wait_for(self, index: list[dict[str, str]]) -> set[str]:
        if self.model_control_mode == "explicit" and "*" not in self.load_models:
            return set(self.load_models)
        return {m["name"] for m in index}

    def _unready_reason(self) -> str:
        """"" once the server and every model it should serve are ready, else why not (quoted on a timeout)."""
        try:
            if not self._server_ready():
                return "server not ready"
            index = self.repository_index()
        except (OSError, ValueError) as e:
            return " ".join(str(e).split())
        missing = self._models_to_wait_for(index) - {m["name"] for m in index if m.get("state") == "READY"}
        return f"models not ready: {', '.join(sorted(missing))}" if missing else ""

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        proc = self._proc
        assert proc is not None
        while True:
            if proc.poll() is not None:
                if self._reader is not None:
                    self._reader.join(timeout=5)  # collect the last words before quoting them
                raise self._failure(f"tritonserver exited with code {proc.returncode} before it was ready")
            reason = self._unready_reason()
            if not reason:
                return
            if time.monotonic() > deadline:
                raise self._failure(f"tritonserver not ready after {timeout_s:.0f} s ({reason})")
            time.sleep(0.2)


# -- perf_analyzer -------------------------------------------------------------------------------
def find_perf_analyzer() -> Path:
    """perf_analyzer from tritonclient[all]==2.51.0 (newer tritonclient wheels do not ship it)."""
    beside = Path(sys.executable).parent / "perf_analyzer"
    found = beside if beside.is_file() else (Path(p) if (p := shutil.which("perf_analyzer")) else None)
    if found is None:
        raise FileNotFoundError("perf_analyzer not found: pip install 'tritonclient[all]==2.51.0'")
    return found


def _shim_lib(shim_dir: Path, soname: str, pattern: str) -> bool:
    """Link soname to the wheel's renamed copy (nvidia_pytriton.libs/<pattern>), if there is one."""
    pytriton_dir = _pytriton_dir()
    for libs in _wheel_lib_dirs(pytriton_dir) if pytriton_dir else ():
        for candidate in sorted(libs.glob(pattern)):
            shim_dir.mkdir(parents=True, exist_ok=True)
            link = shim_dir / soname
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(candidate)
            return True
    return False


def perf_analyzer_env(base: dict[str, str] | None = None, shim_dir: Path | str | None = None) -> dict[str, str]:
    """Environment in which perf_analyzer finds libcudart.so.12 and libb64.so.0d.

    libcudart.so.12 comes from the nvidia-cuda-runtime-cu12 wheel. libb64.so.0d is Debian's
    libb64-0d; without it, a link to the renamed copy in nvidia_pytriton.libs serves as well.
    """
    env = dict(os.environ if base is None else base)
    dirs: list[Path] = []
    spec = importlib.util.find_spec("nvidia.cuda_runtime") if importlib.util.find_spec("nvidia") else None
    if spec is not None and spec.submodule_search_locations:
        lib = Path(list(spec.submodule_search_locations)[0]) / "lib"
        if (lib / "libcudart.so.12").exists():
            dirs.append(lib)
    shim = Path(shim_dir) if shim_dir is not None else Path.home() / ".cache" / "ce-collm" / "perf-analyzer-libs"
    if not dirs and _shim_lib(shim, "libcudart.so.12", "libcudart-*.so.12*"):
        dirs.append(shim)
    if ctypes.util.find_library("b64") != "libb64.so.0d" and _shim_lib(shim, "libb64.so.0d", "libb64-*.so.0d"):
        dirs.append(shim)
    env["LD_LIBRARY_PATH"] = _prepend(dirs, env.get("LD_LIBRARY_PATH"))
    return env
