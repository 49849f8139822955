"""A user-space TCP proxy that emulates the edge's network link: delay, jitter, bandwidth, cuts.

`tc qdisc ... netem` is not available on the machines this project runs on, so benchmarks and
fault tests put this proxy between the edge (tritonclient gRPC) and tritonserver:

    with LinkEmulator("127.0.0.1", server.grpc_port, delay_ms=10, bandwidth_mbit=100) as link:
        client = grpcclient.InferenceServerClient(link.address)   # 20 ms RTT, 100 Mbit/s each way
        link.update(delay_ms=30)      # live: applies to bytes read from now on
        link.cut()                    # reset every connection and refuse new ones
        link.restore()                # accept again
        link.counters()               # bytes each way since the last reset_counters()

The model of one direction of the link (client->server is "up", server->client is "down"):
bytes read from the sender pass a token bucket (the bottleneck's serialisation, `bandwidth_mbit`,
burst `burst_bytes`), then wait a one-way propagation delay (`delay_ms` + uniform jitter in
[-jitter_ms, +jitter_ms]) and are written to the receiver. Release times never go backwards, so
jitter never reorders bytes (TCP would hide reordering anyway). The proxy forwards bytes, not
messages, so HTTP/2 (gRPC) and anything else over TCP pass through unchanged. Each direction of
each connection has its own FIFO; the bandwidth bucket of a direction is shared by every
connection through the emulator, as a link is.

Everything runs on one asyncio loop in a daemon thread; the public methods are thread-safe.
"""
from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, replace

_CHUNK = 64 * 1024  # bytes read from a socket at once


@dataclass(frozen=True)
class LinkSettings:
    delay_ms: float = 0.0  # one-way delay, each direction
    jitter_ms: float = 0.0  # +- uniform, added to each chunk's delay (never reorders)
    bandwidth_mbit: float | None = None  # per direction; None: unlimited
    burst_bytes: int | None = None  # token-bucket depth; default max(16 KiB, 2 ms at the rate)

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise ValueError(f"delay and jitter must be >= 0, got {self.delay_ms}, {self.jitter_ms}")
        if self.bandwidth_mbit is not None and self.bandwidth_mbit <= 0:
            raise ValueError(f"bandwidth_mbit must be > 0 (or None for unlimited), got {self.bandwidth_mbit}")

    @property
    def rate_bytes_s(self) -> float | None:
        return None if self.bandwidth_mbit is None else self.bandwidth_mbit * 1e6 / 8

    @property
    def burst(self) -> int:
        rate = self.rate_bytes_s
        if self.burst_bytes is not None:
            return self.burst_bytes
        return 16 * 1024 if rate is None else max(16 * 1024, int(rate * 0.002))


@dataclass(frozen=True)
class LinkCounters:
    bytes_up: int = 0  # client -> server, as handed to the server's connection
    bytes_down: int = 0  # server -> client, as handed to the client's connection
    connections: int = 0  # connections accepted and forwarded
    refused: int = 0  # connections reset because the link was cut


class _TokenBucket:
    """Bytes per second with a burst depth; `take` waits until n bytes may pass."""

    def __init__(self) -> None:
        self.tokens = 0.0
        self.stamp = time.monotonic()
        self.full = True

    async def take(self, n: int, settings: LinkSettings) -> None:
        rate = settings.rate_bytes_s
        if rate is None:
            self.full = True
            return
        burst = settings.burst
        while n > 0:
            piece = min(n, burst)
            now = time.monotonic()
            if self.full:
                self.tokens, self.full = float(burst), False
            self.tokens = min(float(burst), self.tokens + (now - self.stamp) * rate)
            self.stamp = now
            if self.tokens < piece:
                await asyncio.sleep((piece - self.tokens) / rate)
                continue
            self.tokens -= piece
            n -= piece


class _Direction:
    """One direction of one connection: read -> bucket -> delay queue -> write, in order."""

    def __init__(self, emulator: "LinkEmulator", reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 bucket: _TokenBucket, counter: str):
        self.emulator, self.reader, self.writer, self.bucket, self.counter = emulator, reader, writer, bucket, counter
        self.queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        self.last_release = 0.0

    async def pump_in(self) -> None:
        try:
            while True:
                data = await self.reader.read(_CHUNK)
                if not data:
                    break
                await self.emulator._flowing.wait()  # a silent cut stalls the link here
                settings = self.emulator.settings
                await self.bucket.take(len(data), settings)
                delay = settings.delay_ms
                if settings.jitter_ms:
                    delay = max(0.0, delay + self.emulator._random.uniform(-settings.jitter_ms, settings.jitter_ms))
                release = max(self.last_release, time.monotonic() + delay / 1000.0)
                self.last_release = release
                await self.queue.put((release, data))
        finally:
            await self.queue.put((self.last_release, b""))  # EOF travels with the same delay

    async def pump_out(self) -> None:
        while True:
            release, data = await self.queue.get()
            wait = release - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self.emulator._flowing.wait()
            if not data:
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return
            self.emulator._count(self.counter, len(data))  # before the write: a peer never holds uncounted bytes
            self.writer.write(data)
            await self.writer.drain()


class LinkEmulator:
    """TCP proxy listen_host:listen_port -> target_host:target_port with an emulated link."""

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1", listen_port: int = 0,
                 delay_ms: float = 0.0, jitter_ms: float = 0.0, bandwidth_mbit: float | None = None,
                 burst_bytes: int | None = None, seed: int | None = None, source_host: str | None = None):
        """source_host: the address the proxy connects to the target from (e.g. 127.0.0.2), so that a front that
        names clients by address sees a device of its own."""
        self.target_host, self.target_port, self.source_host = target_host, target_port, source_host
        self.listen_host, self.listen_port = listen_host, listen_port
        self.settings = LinkSettings(delay_ms, jitter_ms, bandwidth_mbit, burst_bytes)
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._counters = {"bytes_up": 0, "bytes_down": 0, "connections": 0, "refused": 0}
        self._cut = False  # connections are reset and new ones refused
        self._silent = False  # no byte moves (a black hole); connections stay open
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter, asyncio.Task]] = set()
        self._buckets = {"up": _TokenBucket(), "down": _TokenBucket()}
        self._flowing: asyncio.Event | None = None  # created on the loop; cleared while silent

    # -- endpoints -----------------------------------------------------------------------------
    @property
    def address(self) -> str:
        """host:port that clients connect to instead of the target (tritonclient url=...)."""
        return f"{self.listen_host}:{self.listen_port}"

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "LinkEmulator":
        if self._thread is not None:
            raise RuntimeError("link emulator already started")
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.call_soon(ready.set)
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name=f"link-emulator->{self.target_port}", daemon=True)
        self._thread.start()
        ready.wait()
        self._server = self._call(self._listen())
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        try:
            self._call(self._shutdown(), timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
            self._thread, self._loop, self._server = None, None, None

    def __enter__(self) -> "LinkEmulator":
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- live control --------------------------------------------------------------------------
    def update(self, **changes: object) -> LinkSettings:
        """Change delay_ms, jitter_ms, bandwidth_mbit or burst_bytes; applies to bytes read from now on."""
        self.settings = replace(self.settings, **changes)  # one atomic attribute swap
        return self.settings

    def cut(self, silent: bool = False) -> None:
        """Take the link down: reset every connection and refuse new ones until restore().

        silent=True emulates a black hole instead (a cable pulled out): connections stay open and
        new ones are accepted, but no byte moves; clients notice only through their deadlines.
        Bytes in flight wait (as TCP retransmits them) and flow again after restore().
        """
        self._cut, self._silent = not silent, silent
        self._call(self._set_flowing(not silent))
        if not silent:
            self._call(self._reset_all())

    def drop_connections(self) -> int:
        """Reset every open connection once (a glitch); new connections are accepted. Returns how many."""
        return self._call(self._reset_all())

    def restore(self) -> None:
        """Bring the link back up after cut(); connections made from now on are forwarded."""
        self._cut = self._silent = False
        self._call(self._set_flowing(True))

    @property
    def is_cut(self) -> bool:
        return self._cut or self._silent

    def counters(self) -> LinkCounters:
        with self._lock:
            return LinkCounters(**self._counters)

    def reset_counters(self) -> LinkCounters:
        """Zero the counters and return what they held."""
        with self._lock:
            before = LinkCounters(**self._counters)
            for key in self._counters:
                self._counters[key] = 0
        return before

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    # -- internals (run on the loop thread) ----------------------------------------------------
    def _call(self, coro, timeout: float = 30.0):
        if self._loop is None:
            coro.close()
            raise RuntimeError("link emulator is not running: call start() or use it as a context manager")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _count(self, key: str, n: int) -> None:
        with self._lock:
            self._counters[key] += n

    async def _listen(self) -> asyncio.AbstractServer:
        self._flowing = asyncio.Event()
        self._flowing.set()
        server = await asyncio.start_server(self._handle, self.listen_host, self.listen_port, reuse_address=True)
        self.listen_port = server.sockets[0].getsockname()[1]
        return server

    async def _set_flowing(self, flowing: bool) -> None:
        assert self._flowing is not None
        self._flowing.set() if flowing else self._flowing.clear()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self._reset_all()

    async def _reset_all(self) -> int:
        connections = list(self._connections)
        for client_w, server_w, task in connections:
            for w in (client_w, server_w):
                _reset(w)
            task.cancel()
        for _, _, task in connections:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        return len(connections)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self._cut:
            self._count("refused", 1)
            _reset(client_w)
            return
        try:
            server_r, server_w = await asyncio.open_connection(
                self.target_host, self.target_port, local_addr=(self.source_host, 0) if self.source_host else None)
        except OSError:
            _reset(client_w)  # the target is down: the client sees a reset, as without the proxy
            return
        self._count("connections", 1)
        task = asyncio.current_task()
        assert task is not None
        entry = (client_w, server_w, task)
        self._connections.add(entry)
        up = _Direction(self, client_r, server_w, self._buckets["up"], "bytes_up")
        down = _Direction(self, server_r, client_w, self._buckets["down"], "bytes_down")
        pumps = [asyncio.ensure_future(p) for p in (up.pump_in(), up.pump_out(), down.pump_in(), down.pump_out())]
        try:
            await _until_both_closed(pumps)
        except asyncio.CancelledError:
            pass
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for w in (client_w, server_w):
                if not w.is_closing():
                    w.close()
            self._connections.discard(entry)


async def _until_both_closed(pumps: list[asyncio.Future]) -> None:
    """Wait until both directions delivered their EOF, or one side failed (then both close)."""
    up_out, down_out = pumps[1], pumps[3]
    pending = set(pumps)
    while pending and not (up_out.done() and down_out.done()):
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if any(not t.cancelled() and t.exception() is not None for t in done):
            return


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), so the peer fails at once instead of waiting for a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()
