"""Past one server: 2 tritonserver replicas behind the nginx front, sessions sticky by header.

One Fleet per module (plugin/serving/fleet.py: 2 replicas on free 127.0.0.1 ports, only ce_collm
and its two models loaded, nginx in front). Every edge request carries its sequence id in the
ce-collm-session header and nginx hashes it onto the replicas. nginx's access log (one JSON line per
request: session, upstream, status) shows which replica served each request, the replicas' metrics
show the work each did, and every session's tokens are compared with the same sessions run against
one server. The sessions of each test are drawn so that 4 land on each replica (routing probed
through the front before they start). Run with -s to see the figures each test prints.

The replicas also serve `whoami`, a python model that answers with the parameters its request arrived
with: the client header the front set among them. Also tested against real processes: a replica heals
a killed Python stub, a replica whose tritonserver died is reaped, a SIGKILLed `ce-collm serve
--replicas 2` takes its nginx along, and a launcher refuses a port another process holds.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import queue
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from edge_runtime.session import DecodingSession
from edge_runtime.link import CloudUnreachable
from edge_runtime.reconnect import ReconnectingLink
from edge_runtime.torch_runner import TorchRunner
from edge_runtime.triton_link import TritonLink
from plugin.cli import main as cli_main
from plugin.model.checkpoint import load_model
from plugin.paths import REPO_ROOT
from plugin.protocol.codec import encode
from plugin.protocol.errors import ProtocolError
from plugin.protocol.messages import CloudRequest, new_session_key
from plugin.protocol.tensors import CLIENT_HEADER, SESSION_HEADER
from plugin.serving.fleet import Fleet
from plugin.serving.front import FrontConfig, FrontError, NginxFront, find_nginx
from plugin.serving.healer import stub_processes
from plugin.serving.repository import ServeOptions, write_repository
from plugin.serving.server import free_ports, port_is_free
from plugin.split.edge import EdgePartition
from plugin.split.limits import Limits
from plugin.split.plan import PartitionPlan
from tests.identity_model import write_identity_repository
from tests.soak import descendant_pids, metric, prompts
from tests.test_healing import alive, kill_stub, wait_for_heal
from tests.test_tls import certs  # noqa: F401 (fixture: a CA, a server and a client certificate)
from tests.tiny_models import VOCAB, save_tiny

pytestmark = pytest.mark.server
SPLIT, EXITS = 4, (1, 3, 4)
MIXED = 0.08  # edge exit threshold at which some tokens exit on the edge (their rows upload in the background)
TOKENS = 40  # per session
PAUSE_AT = 8  # tokens each session has at least before the fault (a kill, a reload) comes
PER_REPLICA = 4  # sessions per replica in each test: 8 concurrent sessions
UNLIMITED = dict(rate_per_client=100_000, burst_per_client=100_000)  # every test client is 127.0.0.1
WHOAMI_CONFIG = """name: "whoami"
backend: "python"
max_batch_size: 0
input [ { name: "IN" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "PARAMS" data_type: TYPE_STRING dims: [ 1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""
WHOAMI_MODEL = """import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):  # the request's parameters as JSON: the headers Triton forwarded are among them
        return [pb_utils.InferenceResponse([pb_utils.Tensor("PARAMS", np.array([r.parameters()], dtype=object))])
                for r in requests]
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, triton_backend_dir):
    try:
        find_nginx()
    except FrontError as e:  # `make test` installs it (sysdeps): missing means a broken install, not a skip
        pytest.fail(str(e))
    ckpt = tmp_path_factory.mktemp("ckpt")
    save_tiny("llama", ckpt)
    plan = PartitionPlan(ckpt, SPLIT, EXITS, threshold=1.0, codec="fp16")
    repo = tmp_path_factory.mktemp("repo")
    write_repository(plan, repo, ServeOptions(limits=Limits(max_sessions=64, max_context=256, max_block_rows=256)))
    (repo / "whoami" / "1").mkdir(parents=True)
    (repo / "whoami" / "config.pbtxt").write_text(WHOAMI_CONFIG)
    (repo / "whoami" / "1" / "model.py").write_text(WHOAMI_MODEL)
    fleet = Fleet(repo, 2, state_dir=tmp_path_factory.mktemp("fleet"), front_options=UNLIMITED,  # replicas heal stubs
                  backend_dir=triton_backend_dir, load_models=("ce_collm", "whoami"),
                  extra_args=["--exit-timeout-secs=3"])
    fleet.start(timeout_s=240)
    fleet.edge = EdgePartition(TorchRunner(load_model(ckpt, range(0, SPLIT))), plan)
    yield fleet
    fleet.stop()


@pytest.fixture(scope="module")
def session_prompts():
    return prompts(2 * PER_REPLICA, VOCAB, seed=7)


@pytest.fixture(scope="module")
def one_server_tokens(fleet, session_prompts):
    """The same sessions, concurrently, straight to one replica: what every routed run must produce."""
    ids = [secrets.randbits(63) | 1 for _ in session_prompts]
    runs = run_sessions(fleet.edge, fleet.replicas[0].grpc_url, ids, session_prompts)
    assert all(r.resyncs == 0 for r in runs)
    return [r.tokens for r in runs]


# -- sessions -------------------------------------------------------------------------------------
@dataclass
class Run:
    sequence_id: int
    tokens: list[int] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)  # time.monotonic() of each token
    resyncs: int = 0
    unreachable: int = 0  # attempts that found the cloud unreachable (retried by ReconnectingLink)
    cloud_requests: int = 0


def run_sessions(edge, url, ids, session_prompts, pause: threading.Barrier | None = None) -> list[Run]:
    """One edge per id (own gRPC channel, background uploads, ReconnectingLink), all at once. With
    `pause`, each waits there at its first cloud token from the PAUSE_AT-th on, so that a fault comes
    while every session is open and its replica holds its context."""
    def one(sid: int, prompt: list[int]) -> Run:
        run, gate = Run(sid), pause
        link = ReconnectingLink(TritonLink(url, timeout_s=30), patience_s=30, retry_every_s=0.1)
        try:
            gen = DecodingSession(edge, link, "collaborative", threshold=MIXED, sequence_id=sid, async_uploads=True)
            for record in gen.stream(prompt, TOKENS):
                run.tokens.append(record.token_id)
                run.arrived.append(time.monotonic())
                if gate is not None and len(run.tokens) >= PAUSE_AT and record.exit == "cloud":
                    gate.wait(timeout=120)  # its replica holds its context now
                    gate = None
            if gate is not None:  # no cloud token late enough: the fault comes after this session ends
                gate.wait(timeout=120)
        except BaseException:
            if pause is not None:
                pause.abort()  # the test fails on this session's error, not on a timeout
            raise
        finally:
            link.close()
        run.resyncs, run.unreachable, run.cloud_requests = gen.stats.resyncs, link.unreachable, gen.stats.cloud_requests
        return run

    with cf.ThreadPoolExecutor(len(ids)) as pool:
        futures = [pool.submit(one, sid, p) for sid, p in zip(ids, session_prompts)]
        return [f.result(timeout=300) for f in futures]


def pick_ids(fleet: Fleet) -> tuple[list[int], dict[int, str]]:
    """Random ids until PER_REPLICA of them route to each replica, as nginx routes them (a probe
    request through the front carrying the header); returns them interleaved and where each goes."""
    client = grpcclient.InferenceServerClient(fleet.grpc_url)
    wanted = {r.grpc_url: [] for r in fleet.replicas}
    for _ in range(200):
        sid = secrets.randbits(63) | 1
        assert client.is_server_ready(headers={SESSION_HEADER: str(sid)})
        upstream = requests_of(fleet, [sid])[sid][-1]["upstream"]
        if len(wanted[upstream]) < PER_REPLICA:
            wanted[upstream].append(sid)
        if all(len(ids) == PER_REPLICA for ids in wanted.values()):
            client.close()
            ids = [sid for pair in zip(*wanted.values()) for sid in pair]
            return ids, {sid: url for url, sids in wanted.items() for sid in sids}
    raise AssertionError(f"200 random ids did not give {PER_REPLICA} per replica: {wanted}")


def settled_log(front: NginxFront) -> list[dict[str, str]]:
    """The access log once it has not grown for 0.3 s: nginx writes a line just after the reply has left."""
    log, size = Path(front.config.access_log_path), -1
    while log.stat().st_size != size:
        size = log.stat().st_size
        time.sleep(0.3)
    return front.access_log()


def requests_of(fleet: Fleet, ids) -> dict[int, list[dict[str, str]]]:
    """nginx's access log, per session id, in order."""
    by_id = defaultdict(list)
    wanted = {str(sid) for sid in ids}
    for record in settled_log(fleet.front):
        if record["session"] in wanted:
            by_id[int(record["session"])].append(record)
    return by_id


def replica_counters(fleet: Fleet) -> list[dict[str, float]]:
    return [{"tokens": metric(r.metrics_url, "ce_collm_tokens_served_total", "cloud_partition") or 0.0,
             "rows": metric(r.metrics_url, "ce_collm_rows_uploaded_total", "context_manager") or 0.0}
            for r in fleet.replicas]


def wait_reaped(fleet: Fleet, index: int, stubs: set[int], within_s: float = 10.0) -> float:
    """Seconds until the fleet marked replica `index` down, none of its `stubs` lives and no /dev/shm file of the
    replica is left."""
    t0, prefix = time.monotonic(), fleet.replicas[index]._shm_prefix

    def left() -> tuple[list[int], list[Path]]:
        return [p for p in stubs if alive(p)], sorted(Path("/dev/shm").glob(f"{prefix}*"))

    while index not in fleet.down or any(left()):
        assert time.monotonic() - t0 < within_s, f"replica {index} not reaped within {within_s} s: {left()}"
        time.sleep(0.05)
    return time.monotonic() - t0


# -- tests ----------------------------------------------------------------------------------------
def test_sessions_stick_to_one_replica_and_spread_over_both(fleet, session_prompts, one_server_tokens):
    ids, home = pick_ids(fleet)
    before = replica_counters(fleet)
    t0 = time.perf_counter()
    runs = run_sessions(fleet.edge, fleet.grpc_url, ids, session_prompts)
    wall = time.perf_counter() - t0
    after = replica_counters(fleet)
    served = requests_of(fleet, ids)
    assert [r.tokens for r in runs] == one_server_tokens
    assert all(r.resyncs == 0 and r.unreachable == 0 for r in runs)
    for run in runs:  # every request of a session reached the replica its id hashes to, and succeeded
        records = served[run.sequence_id]
        assert {rec["upstream"] for rec in records} == {home[run.sequence_id]}
        assert {(rec["status"], rec["grpc_status"]) for rec in records} == {("200", "0")}
    for i, replica in enumerate(fleet.replicas):  # the replicas' own counters: each computed its sessions' tokens
        mine = [r for r in runs if home[r.sequence_id] == replica.grpc_url]
        assert after[i]["tokens"] - before[i]["tokens"] == sum(r.cloud_requests for r in mine) > 0
        assert after[i]["rows"] > before[i]["rows"]
    print(f"\nsticky: {len(runs)} sessions x {TOKENS} tokens through nginx in {wall:.1f} s, "
          f"{sum(len(v) for v in served.values())} requests; per replica "
          + ", ".join(f"{r.grpc_url}: {after[i]['tokens'] - before[i]['tokens']:.0f} cloud tokens, "
                      f"{after[i]['rows'] - before[i]['rows']:.0f} rows uploaded" for i, r in enumerate(fleet.replicas))
          + "; 0 re-syncs, tokens equal to one server's")


def test_reload_with_a_replica_removed_moves_only_its_sessions(fleet, session_prompts, one_server_tokens):
    ids, home = pick_ids(fleet)
    kept, removed = (r.grpc_url for r in fleet.replicas)
    pause = threading.Barrier(len(ids) + 1)
    with cf.ThreadPoolExecutor(1) as pool:
        running = pool.submit(run_sessions, fleet.edge, fleet.grpc_url, ids, session_prompts, pause)
        pause.wait(timeout=120)  # every session holds a context on its replica and goes on now
        t0 = time.perf_counter()
        fleet.front.reload([kept])
        reload_s = time.perf_counter() - t0
        runs = running.result(timeout=300)
    served = requests_of(fleet, ids)
    fleet.front.reload([kept, removed])  # back to both for the next test
    assert [r.tokens for r in runs] == one_server_tokens
    moved, ended_before = [], 0
    for run in runs:
        upstreams = [rec["upstream"] for rec in served[run.sequence_id]]
        refused = [i for i, rec in enumerate(served[run.sequence_id]) if rec["grpc_status"] != "0"]
        if home[run.sequence_id] == kept or kept not in upstreams:
            # untouched: its replica stayed, or it ended before the reload (no cloud token late enough to wait
            # for it, see run_sessions): never re-synced, never left its replica, never refused
            assert run.resyncs == 0 and set(upstreams) == {home[run.sequence_id]} and refused == []
            ended_before += home[run.sequence_id] == removed
        else:  # its replica left the list: first there, then on the other for good, after one re-sync
            assert run.resyncs == 1 and run.unreachable == 0
            switch = upstreams.index(kept)
            assert set(upstreams[:switch]) == {removed} and set(upstreams[switch:]) == {kept} and switch >= 1
            # the first request there was answered SLOT_EXPIRED (no slot there), its resume POSITION_GAP (no
            # session there either); the re-sync followed
            assert refused == [switch, switch + 1]
            moved.append(switch)
    assert len(moved) + ended_before == PER_REPLICA and moved
    print(f"\nreload: old nginx workers drained {reload_s * 1000:.0f} ms after the new list came; {PER_REPLICA} sessions of the kept "
          f"replica: 0 re-syncs; {PER_REPLICA} of the removed one moved after {moved} requests there, 1 re-sync each; "
          f"all {len(runs)} x {TOKENS} tokens equal to one server's")


def test_a_session_routed_back_to_a_replica_holding_its_old_context_resyncs(fleet, session_prompts,
                                                                           one_server_tokens):
    """A replica leaves the list and comes back without restarting: it still holds the context a session had
    there before it moved. The session's next request there starts past that context (POSITION_GAP, whose
    recovery is a re-sync), so the edge re-syncs once more and loses nothing."""
    ids, home = pick_ids(fleet)
    kept, removed = (r.grpc_url for r in fleet.replicas)
    index, sid = next((i, sid) for i, sid in enumerate(ids) if home[sid] == removed)
    link = ReconnectingLink(TritonLink(fleet.grpc_url, timeout_s=30), patience_s=30, retry_every_s=0.1)
    session = DecodingSession(fleet.edge, link, "collaborative", threshold=MIXED, sequence_id=sid)
    stream = session.stream(session_prompts[index], TOKENS)
    try:
        tokens = [next(stream).token_id for _ in range(TOKENS // 3)]
        fleet.front.reload([kept])  # moves to `kept` and re-syncs there
        tokens += [next(stream).token_id for _ in range(TOKENS // 3)]
        fleet.front.reload([kept, removed])  # back home, where the first third's context still lives
        tokens += [record.token_id for record in stream]
    finally:
        fleet.front.reload([kept, removed])
        link.close()
    upstreams = [rec["upstream"] for rec in requests_of(fleet, [sid])[sid]]
    assert tokens == one_server_tokens[index]
    assert session.stats.resyncs == 2 and upstreams[0] == upstreams[-1] == removed and kept in upstreams


def test_a_replica_reloads_a_killed_stub_and_serves_its_sessions_again(fleet, session_prompts, one_server_tokens):
    """A replica's stub SIGKILLed, as the out-of-memory killer would: the replica reloads that model (replicas heal
    as one server does) and nginx, which never stopped routing there, gets the replica's sessions served again."""
    ids, home = pick_ids(fleet)
    replica = fleet.replicas[1]
    heals = len(replica.healer.heals)
    victim = kill_stub(replica, "cloud_partition")
    heal = wait_for_heal(replica, heals)
    assert (heal.model, heal.dead_pid) == ("cloud_partition", victim)
    mine = [i for i, sid in enumerate(ids) if home[sid] == replica.grpc_url]
    runs = run_sessions(fleet.edge, fleet.grpc_url, [ids[i] for i in mine], [session_prompts[i] for i in mine])
    served = requests_of(fleet, [r.sequence_id for r in runs])
    assert [r.tokens for r in runs] == [one_server_tokens[i] for i in mine]
    for run in runs:  # all of it on the healed replica, every request answered
        assert {(rec["upstream"], rec["status"], rec["grpc_status"]) for rec in served[run.sequence_id]} == {
            (replica.grpc_url, "200", "0")}
    print(f"\nheal: stub {victim} of cloud_partition on {replica.grpc_url} killed, model back after "
          f"{heal.seconds:.1f} s; {len(runs)} sessions routed there: all served by it, tokens equal to one server's")


def test_replica_killed_mid_generation_its_sessions_resync_on_the_survivor(fleet, session_prompts,
                                                                             one_server_tokens):
    """The victim's tritonserver alone SIGKILLed (a crash): its stubs outlive it until the fleet reaps it."""
    ids, home = pick_ids(fleet)
    survivor, victim = fleet.replicas
    stubs = stub_processes(victim.pid)
    assert sorted(stubs.values()) == ["cloud_partition", "context_manager", "whoami"]
    pause = threading.Barrier(len(ids) + 1)
    with cf.ThreadPoolExecutor(1) as pool:
        running = pool.submit(run_sessions, fleet.edge, fleet.grpc_url, ids, session_prompts, pause)
        pause.wait(timeout=120)
        time.sleep(0.02)  # requests are in flight
        killed_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        reaped_s = wait_reaped(fleet, 1, set(stubs))
        runs = running.result(timeout=300)
    served = requests_of(fleet, ids)
    assert [r.tokens for r in runs] == one_server_tokens  # 0 tokens lost, none changed
    gaps = defaultdict(list)
    for run in runs:
        records = served[run.sequence_id]
        if home[run.sequence_id] == survivor.grpc_url:  # never noticed: no retry, no re-sync, no other replica
            assert run.resyncs == 0 and run.unreachable == 0
            assert {(rec["upstream"], rec["status"]) for rec in records} == {(survivor.grpc_url, "200")}
        else:  # one re-sync on the survivor; what reached the dead replica failed as 502 (gRPC UNAVAILABLE)
            assert run.resyncs == 1
            after_kill = [rec for rec in records if rec["upstream"] != victim.grpc_url]
            assert after_kill and all(rec["upstream"].endswith(survivor.grpc_url) for rec in after_kill)
            assert {rec["status"] for rec in records if rec["status"] != "200"} <= {"502"}
        gaps[home[run.sequence_id]].append(max(b - a for a, b in zip(run.arrived, run.arrived[1:])
                                               if b > killed_at))
    retried = sum(r.unreachable for r in runs)
    failed = sum(rec["status"] == "502" for records in served.values() for rec in records)
    print(f"\nfailover: replica {victim.grpc_url} killed after {PAUSE_AT} tokens, reaped (its {len(stubs)} stubs "
          f"killed, its shared memory freed) {reaped_s:.2f} s later; its {PER_REPLICA} sessions re-synced on "
          f"{survivor.grpc_url} (1 re-sync each, {retried} retried requests, {failed} answered 502 by nginx), "
          f"longest wait for a token after the kill {max(gaps[victim.grpc_url]) * 1000:.0f} ms; the survivor's "
          f"{PER_REPLICA} sessions: 0 re-syncs, 0 retries, longest wait {max(gaps[survivor.grpc_url]) * 1000:.0f} ms; "
          f"all {len(runs)} x {TOKENS} tokens equal to undisturbed runs, 0 lost")


# -- the front's own limits -----------------------------------------------------------------------
def _rows(n: int) -> CloudRequest:
    return CloudRequest(secrets.randbits(63) | 1, 0, False, rows=encode(torch.zeros(n, 64), "fp16"),
                        split_layer=SPLIT, start=True, session_key=new_session_key())


def test_front_caps_request_size_and_passes_only_edge_methods(fleet, tmp_path):
    replica = fleet.replicas[0]
    rows = lambda: metric(replica.metrics_url, "ce_collm_rows_uploaded_total", "context_manager")  # noqa: E731
    with NginxFront(FrontConfig((replica.grpc_url,), tmp_path, listen=f"127.0.0.1:{free_ports(1)[0]}",
                                max_body_bytes=64 << 10, **UNLIMITED)) as front:
        link = TritonLink(front.url)
        before = rows()
        assert link.send(_rows(64)).token_id == -1  # 8 KiB of rows: an upload goes through
        with pytest.raises(ProtocolError, match="413"):
            link.send(_rows(1024))  # 128 KiB: cut off by nginx at 64 KiB, the replica never gets the message
        with pytest.raises(InferenceServerException, match="PERMISSION_DENIED"):
            grpcclient.InferenceServerClient(front.url).get_model_repository_index()
        statuses = [(rec["uri"].rsplit("/", 1)[1], rec["status"]) for rec in settled_log(front)]
    assert rows() == before + 64
    assert statuses == [("ModelInfer", "200"), ("ModelInfer", "413"), ("RepositoryIndex", "403")]


def test_front_limits_requests_per_client_and_the_edge_retries(fleet, tmp_path):
    replica = fleet.replicas[0].grpc_url
    with NginxFront(FrontConfig((replica,), tmp_path, listen=f"127.0.0.1:{free_ports(1)[0]}", rate_per_client=5,
                                burst_per_client=2)) as front:
        link = TritonLink(front.url)
        outcomes = []
        for _ in range(8):  # at once: 1 + burst 2 pass, the rest are refused with 429 (gRPC UNAVAILABLE)
            try:
                outcomes.append(link.send(_rows(1)).token_id)
            except CloudUnreachable as e:
                outcomes.append("429" if "429" in str(e) else str(e))
        assert outcomes.count(-1) == 3 and outcomes.count("429") == 5, outcomes
        patient = ReconnectingLink(link, patience_s=10, retry_every_s=0.25)
        assert patient.send(_rows(1)).token_id == -1 and patient.retries >= 1  # waits for the rate, gets through


def test_front_terminates_tls_and_requires_client_certificates(fleet, tmp_path, certs):  # noqa: F811
    replica = fleet.replicas[0].grpc_url
    with NginxFront(FrontConfig((replica,), tmp_path, listen=f"127.0.0.1:{free_ports(1)[0]}", tls_cert=certs / "server.pem",
                                tls_key=certs / "server.key", client_ca=certs / "ca.pem", **UNLIMITED)) as front:
        tls = dict(ssl=True, root_certificates=str(certs / "ca.pem"))
        edge = TritonLink(front.url, private_key=str(certs / "client.key"),
                          certificate_chain=str(certs / "client.pem"), **tls)
        assert edge.send(_rows(4)).token_id == -1
        with pytest.raises(ProtocolError, match="400"):  # TLS without a client certificate: nginx says 400
            TritonLink(front.url, **tls).send(_rows(4))
        with pytest.raises(CloudUnreachable):  # plaintext does not get in
            TritonLink(front.url, timeout_s=5).send(_rows(4))


def client_seen_by_the_model(url: str, sent: str, **tls) -> str:
    """The client header `whoami` got, for a request that carried `sent` in it."""
    client = grpcclient.InferenceServerClient(url, **tls)
    try:
        given = grpcclient.InferInput("IN", [1], "FP32")
        given.set_data_from_numpy(np.zeros(1, dtype=np.float32))
        answer = client.infer("whoami", [given], headers={CLIENT_HEADER: sent}, client_timeout=30)
        return json.loads(answer.as_numpy("PARAMS")[0])[CLIENT_HEADER]
    finally:
        client.close()


def test_the_front_sets_the_client_identity_and_a_client_cannot_forge_it(fleet, tmp_path, certs):  # noqa: F811
    forged = "CN=someone else"
    assert client_seen_by_the_model(fleet.replicas[0].grpc_url, forged) == forged  # a replica forwards what it gets
    assert client_seen_by_the_model(fleet.grpc_url, forged) == "127.0.0.1"  # the front: the address it saw
    with NginxFront(FrontConfig((fleet.replicas[0].grpc_url,), tmp_path, listen=f"127.0.0.1:{free_ports(1)[0]}",
                                tls_cert=certs / "server.pem", tls_key=certs / "server.key", client_ca=certs / "ca.pem",
                                **UNLIMITED)) as front:  # with client certificates: the certificate's subject
        tls = dict(ssl=True, root_certificates=str(certs / "ca.pem"), private_key=str(certs / "client.key"),
                   certificate_chain=str(certs / "client.pem"))
        assert client_seen_by_the_model(front.url, forged, **tls) == "CN=ce-collm client"


def _serve_replicas(port: int, repo: Path) -> tuple[subprocess.Popen[str], list[str]]:
    """`ce-collm serve --replicas 2` in a process of its own, once it printed that it is ready; and what it printed."""
    proc = subprocess.Popen([sys.executable, "-m", "plugin.cli", "serve", "--replicas", "2", "--grpc-port", str(port),
                             "--model-repository", str(repo)], cwd=REPO_ROOT,
                            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    printed, deadline = [], time.monotonic() + 120
    while not printed or not printed[-1].startswith("Press Ctrl-C"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"ce-collm serve --replicas 2 did not get ready: {printed}")
        try:
            printed.append(lines.get(timeout=1))
        except queue.Empty:
            continue
    return proc, printed


def test_a_killed_launcher_takes_its_front_along(tmp_path):
    """`ce-collm serve --replicas 2` SIGKILLed: its nginx, master and worker, goes with it (the parent-death signal)
    and leaves the port free. Its replicas run the stub healer, as `ce-collm serve` runs one server."""
    port = free_ports(1)[0]
    proc, printed = _serve_replicas(port, write_identity_repository(tmp_path / "repo"))
    family: list[int] = []
    try:
        nginx = int(re.search(r"nginx front, pid (\d+)", "".join(printed)).group(1))
        logs = Path(re.search(r"^  logs +(\S+)$", "".join(printed), re.M).group(1))
        family = descendant_pids(proc.pid)
        front = descendant_pids(nginx)
        assert len(front) >= 2 and not port_is_free(port)  # master and worker, holding the port
        for i in range(2):
            assert "stub healer watching identity" in (logs / f"replica-{i}.log").read_text()
        proc.kill()
        proc.wait(timeout=30)
        t0 = time.monotonic()
        while any(alive(p) for p in front) or not port_is_free(port):
            assert time.monotonic() - t0 < 10, f"nginx {[p for p in front if alive(p)]} outlived its launcher"
            time.sleep(0.05)
        print(f"\nlauncher SIGKILLed: its nginx (pids {front}) gone and port {port} free "
              f"{time.monotonic() - t0:.2f} s later")
    finally:
        proc.kill()
        for pid in family:  # the tritonservers went too; their stubs wait for someone to reap them
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_serve_replicas_refuses_a_port_another_process_holds(fleet, tmp_path, capsys):
    """Another front listens on the port: the launcher says so in one line and starts nothing (it once reported
    ready, its probe reaching the other nginx, then exited 1)."""
    port = free_ports(1)[0]
    with NginxFront(FrontConfig((fleet.replicas[0].grpc_url,), tmp_path, listen=f"127.0.0.1:{port}")) as other:
        t0 = time.monotonic()
        assert cli_main(["serve", "--replicas", "2", "--grpc-port", str(port),
                         "--model-repository", str(fleet.replicas[0].model_repository)]) == 1
        refused_s = time.monotonic() - t0
        assert other.is_running()
    out, err = capsys.readouterr()
    assert "ready" not in out and err.splitlines()[-1] == (
        f"ce-collm serve: port {port} on 127.0.0.1 is in use by another process (another front still running?): "
        "stop it or listen on another port")
    assert refused_s < 5  # before any replica started


def test_serve_replicas_refuses_fixed_replica_ports(capsys):
    assert cli_main(["serve", "--replicas", "2", "--metrics-port", "9102"]) == 1
    assert "drop --http-port/--metrics-port" in capsys.readouterr().err
