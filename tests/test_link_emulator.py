"""The user-space link emulator: delay, jitter without reordering, bandwidth, cuts; gRPC through it.

Plain TCP checks use an echo server in a thread; the gRPC checks use a real tritonserver serving a
numpy-only identity model (fast to load), reached through the proxy with tritonclient.
"""
from __future__ import annotations

import socket
import statistics
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from bench.link_emulator import LinkEmulator, LinkSettings
from tests.identity_model import write_identity_repository


# -- an echo server ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def echo_port():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(1 << 16):
                    conn.sendall(data)
            except OSError:  # the proxy reset the connection (cut)
                pass

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield srv.getsockname()[1]
    stop.set()
    srv.close()


def _connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            raise ConnectionError("closed early")
        got += chunk
    return bytes(got)


def _median_rtt_ms(address: str, pings: int = 7) -> float:
    with _connect(address) as s:
        times = []
        for i in range(pings):
            t0 = time.perf_counter()
            s.sendall(b"ping%03d" % i)
            assert _recv_exactly(s, 7) == b"ping%03d" % i
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def test_delay_adds_twice_the_one_way_delay_to_the_round_trip(echo_port):
    with LinkEmulator("127.0.0.1", echo_port) as link:
        base = _median_rtt_ms(link.address)
        link.update(delay_ms=20)  # live: the next connection and the next bytes see it
        delayed = _median_rtt_ms(link.address)
    assert 38 <= delayed - base <= 55, (base, delayed)


def test_jitter_never_reorders_bytes(echo_port):
    payload = bytes(range(256)) * 400  # 100 KiB with a pattern any reordering would break
    with LinkEmulator("127.0.0.1", echo_port, delay_ms=5, jitter_ms=5, seed=1) as link, _connect(link.address) as s:
        reader = threading.Thread(target=lambda: got.append(_recv_exactly(s, len(payload))))
        got: list[bytes] = []
        reader.start()
        for i in range(0, len(payload), 1000):  # many small writes, each delayed independently
            s.sendall(payload[i:i + 1000])
        reader.join(10)
        assert got == [payload]
        counters = link.counters()
    assert counters.bytes_up == counters.bytes_down == len(payload)


def test_bandwidth_cap_is_measured_roughly(echo_port):
    size, mbit = 300_000, 8.0  # 0.3 s at 8 Mbit/s
    with LinkEmulator("127.0.0.1", echo_port, bandwidth_mbit=mbit) as link, _connect(link.address) as s:
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(_recv_exactly(s, size)))
        t0 = time.perf_counter()
        reader.start()
        s.sendall(b"b" * size)
        reader.join(10)
        elapsed = time.perf_counter() - t0
    expected = size * 8 / (mbit * 1e6)  # both directions pipeline: one serialisation time
    assert got and 0.8 * expected <= elapsed <= 1.6 * expected + 0.05, (elapsed, expected)


def test_cut_resets_connections_and_refuses_new_ones_until_restore(echo_port):
    with LinkEmulator("127.0.0.1", echo_port) as link:
        s = _connect(link.address)
        s.sendall(b"hello")
        assert _recv_exactly(s, 5) == b"hello"
        link.cut()
        with pytest.raises(OSError):
            s.sendall(b"x")
            _recv_exactly(s, 1)
        s.close()
        with pytest.raises(OSError):
            _median_rtt_ms(link.address, pings=1)
        assert link.is_cut and link.counters().refused >= 1
        link.restore()
        assert _median_rtt_ms(link.address, pings=1) < 1000


def test_settings_are_validated():
    with pytest.raises(ValueError):
        LinkSettings(delay_ms=-1)
    with pytest.raises(ValueError):
        LinkSettings(bandwidth_mbit=0)


# -- gRPC (HTTP/2) through the proxy to a real tritonserver ---------------------------------------


@pytest.fixture(scope="module")
def identity_server(tmp_path_factory, start_server):
    return start_server(write_identity_repository(tmp_path_factory.mktemp("identity-repo")))


def _infer(client: grpcclient.InferenceServerClient, x: np.ndarray, timeout_s: float = 10.0) -> np.ndarray:
    inp = grpcclient.InferInput("IN", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("identity", [inp], client_timeout=timeout_s).as_numpy("OUT")


def _timed_infer_ms(client, x, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        _infer(client, x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


@pytest.mark.server
def test_grpc_through_the_proxy_gives_the_same_reply(identity_server):
    x = np.random.default_rng(0).standard_normal(300_000).astype(np.float32)  # 1.2 MB: many HTTP/2 frames
    direct = _infer(grpcclient.InferenceServerClient(identity_server.grpc_url), x, timeout_s=60)
    with LinkEmulator("127.0.0.1", identity_server.grpc_port, delay_ms=3, jitter_ms=2, seed=2) as link:
        proxied = _infer(grpcclient.InferenceServerClient(link.address), x, timeout_s=60)  # a loaded CI machine
        counters = link.counters()
    np.testing.assert_array_equal(direct, x)
    np.testing.assert_array_equal(proxied, x)
    assert counters.bytes_up > x.nbytes and counters.bytes_down > x.nbytes


@pytest.mark.server
def test_grpc_round_trip_grows_by_twice_the_delay(identity_server):
    x = np.ones(4, np.float32)
    with LinkEmulator("127.0.0.1", identity_server.grpc_port) as link:
        client = grpcclient.InferenceServerClient(link.address)
        _infer(client, x)  # connect and warm up
        base = _timed_infer_ms(client, x)
        link.update(delay_ms=15)
        delayed = _timed_infer_ms(client, x)
    # at least the 2 x 15 ms added (less 3 ms of timer slack); the upper bound only catches a doubled delay
    assert 27 <= delayed - base <= 90, (base, delayed)


def _status(e: InferenceServerException) -> str:
    return (e.status() or "").upper()


@pytest.mark.server
def test_cut_makes_tritonclient_fail_fast_and_restore_recovers(identity_server):
    x = np.arange(8, dtype=np.float32)
    with LinkEmulator("127.0.0.1", identity_server.grpc_port) as link:
        client = grpcclient.InferenceServerClient(link.address)
        np.testing.assert_array_equal(_infer(client, x), x)
        link.cut()
        t0 = time.perf_counter()
        with pytest.raises(InferenceServerException) as info:
            _infer(client, x, timeout_s=10)
        assert time.perf_counter() - t0 < 2.0
        assert "UNAVAILABLE" in _status(info.value)
        link.restore()
        deadline = time.monotonic() + 10  # gRPC's reconnect backoff starts at about 1 s
        while True:
            try:
                np.testing.assert_array_equal(_infer(client, x), x)
                break
            except InferenceServerException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


@pytest.mark.server
def test_silent_cut_is_a_black_hole_until_restore(identity_server):
    x = np.arange(8, dtype=np.float32)
    with LinkEmulator("127.0.0.1", identity_server.grpc_port) as link:
        client = grpcclient.InferenceServerClient(link.address)
        _infer(client, x)
        link.cut(silent=True)
        t0 = time.perf_counter()
        with pytest.raises(InferenceServerException) as info:
            _infer(client, x, timeout_s=0.5)
        assert "DEADLINE" in _status(info.value) and time.perf_counter() - t0 < 2.0
        link.restore()
        np.testing.assert_array_equal(_infer(client, x), x)  # the same connection carries on
