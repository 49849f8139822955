"""How long a legitimate edge waits while one client tries to lock everybody out (docs/security.md).

    python -m bench.lockout                       # every attack against one tritonserver, the demo model
    python -m bench.lockout --slot-idle 600 --slots-per-session 4   # the sequence slots as they were before
    python -m bench.lockout --front               # through the nginx front of `ce-collm serve --replicas 1`

Three attacks, each for --seconds, while alice opens a new session (START + token + END) every
--probe-every seconds and her wait is recorded:
  keyless   --threads clients send STARTs without a SESSION_KEY as fast as they can: each is refused,
            yet holds a Triton sequence slot until the slot idle time;
  sessions  mallory opens valid sessions until she is refused, then keeps every one alive;
  bytes     mallory fills the byte budget (--max-state-bytes) with uploaded rows, and keeps them alive.
The attacker and alice are told apart by the client header a front sets (CLIENT_HEADER). Without --front
this bench sets it itself, as the front would; with --front the front sets it from the client's address,
and the attacker connects from 127.0.0.2 (through the link emulator, at no delay), a device of its own;
the front also limits each client's request rate. Every loop is bounded in time; only 127.0.0.0/8 is
contacted.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from bench.link_emulator import LinkEmulator
from plugin.model.checkpoint import read_config
from plugin.paths import DEMO_PLAN, REPO_ROOT
from plugin.protocol.codec import encode
from plugin.protocol.errors import error_code
from plugin.protocol.messages import CloudRequest, new_session_key
from plugin.protocol.tensors import CLIENT_HEADER, ENSEMBLE, TENSORS
from plugin.protocol.wire import request_inputs
from plugin.serving.fleet import Fleet
from plugin.serving.front import split_address
from plugin.serving.repository import ServeOptions, write_repository
from plugin.serving.server import TritonServer
from plugin.split.limits import Limits
from plugin.split.plan import PartitionPlan

ATTACKS = ("keyless", "sessions", "bytes")


def _infer(client: grpcclient.InferenceServerClient, req: CloudRequest, who: str, timeout_s: float) -> str:
    """One request; "ok" or its error code."""
    inputs = []
    for name, value in request_inputs(req).items():
        tensor = grpcclient.InferInput(name, list(value.shape), TENSORS[name].triton_dtype)
        tensor.set_data_from_numpy(np.ascontiguousarray(value))
        inputs.append(tensor)
    try:
        client.infer(ENSEMBLE, inputs, sequence_id=req.sequence_id, sequence_start=req.start, sequence_end=req.end,
                     client_timeout=timeout_s, headers={CLIENT_HEADER: who})
    except InferenceServerException as e:
        return error_code(e.message() or str(e), str(e.status())).name
    return "ok"


class Attack:
    """One attacker's loop, stopped by `stop`; counts what it sent and how it was answered."""

    def __init__(self, kind: str, url: str, hidden: int, split: int, rows: int, stop: threading.Event):
        self.kind, self.url, self.hidden, self.split, self.rows, self.stop = kind, url, hidden, split, rows, stop
        self.answers: dict[str, int] = {}
        self._ids = itertools.count(1 << 40)
        self._lock = threading.Lock()

    def _count(self, answer: str) -> None:
        with self._lock:
            self.answers[answer] = self.answers.get(answer, 0) + 1

    def keyless(self) -> None:
        client = grpcclient.InferenceServerClient(self.url)
        while not self.stop.is_set():
            sid = next(self._ids)
            self._count(_infer(client, CloudRequest(sid, 0, True, rows=encode(torch.zeros(1, self.hidden), "fp16"),
                                                    split_layer=self.split, start=True), "mallory", 30))

    def hog(self) -> None:
        """Open sessions of `rows` uploaded rows until refused, then keep them alive (an empty upload each)."""
        client = grpcclient.InferenceServerClient(self.url)
        held: list[tuple[int, int]] = []  # (sequence id, key)
        while not self.stop.is_set():
            sid, key = next(self._ids), new_session_key()
            answer = _infer(client, CloudRequest(sid, 0, False, rows=encode(torch.randn(self.rows, self.hidden), "fp16"),
                                                 split_layer=self.split, start=True, session_key=key), "mallory", 30)
            self._count(answer)
            if answer == "ok":
                held.append((sid, key))
                continue
            for sid, key in held:  # keep-alives: every session stays recently used
                if self.stop.is_set():
                    break
                _infer(client, CloudRequest(sid, self.rows, False, rows=encode(torch.zeros(0, self.hidden), "fp16"),
                                            session_key=key), "mallory", 30)
            self.stop.wait(0.2)


def probe(url: str, hidden: int, split: int, stop: threading.Event, every_s: float, timeout_s: float) -> list[dict]:
    """alice opens a session (START + token + END) every `every_s` until `stop`: how long each took."""
    client = grpcclient.InferenceServerClient(url)
    waits = []
    for sid in itertools.count(1 << 50):
        if stop.wait(every_s):
            break
        req = CloudRequest(sid, 0, True, rows=encode(torch.randn(8, hidden), "fp16"), split_layer=split, start=True,
                           end=True, session_key=new_session_key())
        t0 = time.perf_counter()
        answer = _infer(client, req, "alice", timeout_s)
        waits.append({"answer": answer, "s": round(time.perf_counter() - t0, 4)})
    return waits


def run_attack(kind: str, attacker_url: str, alice_url: str, hidden: int, split: int, args: argparse.Namespace) -> dict:
    stop = threading.Event()
    attack = Attack(kind, attacker_url, hidden, split, args.rows if kind == "bytes" else 1, stop)
    loop = attack.keyless if kind == "keyless" else attack.hog
    threads = [threading.Thread(target=loop, daemon=True) for _ in range(args.threads if kind == "keyless" else 1)]
    for t in threads:
        t.start()
    result: dict = {}
    prober = threading.Thread(target=lambda: result.update(
        waits=probe(alice_url, hidden, split, stop, args.probe_every, args.timeout)))
    prober.start()
    time.sleep(args.seconds)
    stop.set()
    prober.join()
    for t in threads:
        t.join(timeout=args.timeout + 5)
    waits = [w["s"] for w in result["waits"] if w["answer"] == "ok"]
    failed = [w for w in result["waits"] if w["answer"] != "ok"]
    return {"attack": kind, "attacker_requests": attack.answers, "probes": len(result["waits"]), "failed": len(failed),
            "failures": sorted({w["answer"] for w in failed}), "wait_median_s": statistics.median(waits) if waits else None,
            "wait_max_s": max(waits) if waits else None}


@contextlib.contextmanager
def serving(repo: Path, front: bool) -> Iterator[tuple[str, str]]:
    """One tritonserver, or one behind the nginx front; the addresses the attacker and alice connect to."""
    if not front:
        with TritonServer(repo, extra_args=["--exit-timeout-secs=2"]) as server:
            yield server.grpc_url, server.grpc_url
        return
    with Fleet(repo, 1, extra_args=["--exit-timeout-secs=2"]) as fleet:
        host, port = split_address(fleet.grpc_url)
        with LinkEmulator(host, port, source_host="127.0.0.2") as attacker:
            yield attacker.address, fleet.grpc_url


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lockout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", type=Path, default=DEMO_PLAN, metavar="FILE", help="(default: %(default)s)")
    p.add_argument("--attacks", default=",".join(ATTACKS), metavar="A,A", help="(default: %(default)s)")
    p.add_argument("--seconds", type=float, default=15.0, metavar="S", help="each attack's length (default: %(default)s)")
    p.add_argument("--threads", type=int, default=8, metavar="N", help="keyless flooders (default: %(default)s)")
    p.add_argument("--rows", type=int, default=1024, metavar="N", help="rows per session of the bytes attack "
                                                                       "(default: %(default)s)")
    p.add_argument("--probe-every", type=float, default=0.5, metavar="S", help="(default: %(default)s)")
    p.add_argument("--timeout", type=float, default=20.0, metavar="S", help="alice's client timeout (default: %(default)s)")
    p.add_argument("--slot-idle", type=float, default=Limits.slot_idle_s, metavar="S", help="(default: %(default)s)")
    p.add_argument("--slots-per-session", type=int, default=0, metavar="N",
                   help="Triton sequence slots per allowed session; 0: the repository's default")
    p.add_argument("--max-state-bytes", type=int, default=16 << 20, metavar="N", help="(default: %(default)s)")
    p.add_argument("--front", action="store_true", help="through an nginx front that names clients by address")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "lockout.json", metavar="F")
    args = p.parse_args(argv)
    plan = PartitionPlan.load(args.plan)
    hidden = read_config(plan.checkpoint).hidden_size
    limits = Limits(slot_idle_s=args.slot_idle, max_state_bytes=args.max_state_bytes)
    opts = ServeOptions(limits=limits)
    if args.slots_per_session:
        opts = replace(opts, sequence_slots=args.slots_per_session * limits.max_sessions)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_repository(plan, Path(tmp), opts)
        for kind in args.attacks.split(","):
            with serving(Path(tmp), args.front) as (attacker_url, alice_url):  # a fresh server per attack
                row = {**run_attack(kind, attacker_url, alice_url, hidden, plan.split_layer, args), "slots": opts.slots(),
                       "slot_idle_s": args.slot_idle, "front": args.front}
            rows.append(row)
            print(f"{kind:9s} attacker {row['attacker_requests']}: alice {row['probes']} STARTs, {row['failed']} failed "
                  f"{row['failures']}, wait median {row['wait_median_s']} s, max {row['wait_max_s']} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
