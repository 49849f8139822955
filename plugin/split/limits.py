"""What one session, and one request, may hold or ask of the cloud; who may START a session; how many
bytes of session state one model may hold."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Mapping, Protocol

from plugin.protocol.errors import ErrorCode, ProtocolError, SequenceNeedsStart


def _limit(default: float, metavar: str, help_text: str, flag: str = "") -> object:
    """A Limits field: its default, and how `ce-collm configs` offers it (flag: --name-with-dashes unless given)."""
    return field(default=default, metadata={"metavar": metavar, "help": help_text, "flag": flag})


@dataclass(frozen=True)
class Limits:
    """Every field is also a config.pbtxt parameter of the python models (same name, see params) and a
    `ce-collm configs` flag (its metadata): adding a field here adds both."""

    max_sessions: int = _limit(256, "N", "live sessions per model")
    max_context: int = _limit(4096, "N", "positions per session")
    max_block_rows: int = _limit(1024, "N", "rows in one request")
    # idle sessions are dropped: Triton frees idle slots without telling the models
    ttl_s: float = _limit(600.0, "S", "drop sessions idle this long", flag="--ttl")
    # Triton holds a sequence slot until END or this idle time, even for a START the model refused, and the slot
    # count is fixed: a short idle time is what keeps a flood of refused STARTs from holding every slot
    slot_idle_s: float = _limit(10.0, "S", "Triton's sequence-slot idle timeout (capped by --ttl): an edge idle "
                                           "longer resumes its session with START (SLOT_EXPIRED); a session whose "
                                           "START gets no follow-up request within it is dropped (a START refused downstream)")
    # tensor payload of one request (1024 fp32 rows of hidden 8192 = 32 MiB)
    max_request_bytes: int = _limit(64 << 20, "N", "tensor payload bytes per request")
    max_requests_per_s: float = _limit(1000.0, "R", "requests per second per session, a token bucket one second "
                                                    "deep; 0 turns it off")
    # what one model's sessions may hold together: its KV caches and pending rows
    max_state_bytes: int = _limit(0, "N", "bytes of session state (KV caches + pending rows) per model; 0: a fifth "
                                          "of the memory of the model's device (RAM, or the GPU's)")

    @property
    def slot_idle_us(self) -> int:
        """max_sequence_idle_microseconds of the sequence batchers."""
        return int(min(self.slot_idle_s, self.ttl_s) * 1_000_000)

    def within(self, positions: int | None) -> "Limits":
        """These limits with max_context no larger than the positions the model can compute (None: no such bound),
        so a longer context is refused (LIMIT_EXCEEDED, naming the limit) rather than failing inside the model."""
        return self if positions is None or self.max_context <= positions else replace(self, max_context=positions)

    def params(self) -> dict[str, str]:
        """The fields as config.pbtxt parameters (strings that read back to the same values)."""
        return {f.name: _text(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> Limits:
        """The fields found in config.pbtxt parameters; defaults for those left out."""
        return cls(**{f.name: type(f.default)(params[f.name]) for f in fields(cls) if f.name in params})


def _text(value: float) -> str:
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


@dataclass(frozen=True)
class Admission:
    """Who may START a session: one rule for the context manager and the cloud partition, checked before
    either stores anything, so that neither keeps a session the other refused."""

    limits: Limits
    num_layers: int
    min_split_layer: int  # the first layer the cloud partition holds: edges must run every layer before it
    max_split_layer: int | None = None  # the last split it serves (None: any it holds; an engine: its own only)

    def session_for(self, live: Mapping[int, "Keyed"], sequence_id: int, start: bool, start_pos: int,
                    rollback_to: int | None, key: int, split_layer: int | None, client: str = "",
                    keep: frozenset[int] = frozenset()) -> tuple["Keyed | None", list[int]]:
        """The live session a request applies to, or None for a START that begins one (a new session, or a
        re-START replacing a live one), with the sessions it takes the place of in a full table; only with the
        session's key. The one rule of the context manager, the cloud partition and cloud-only."""
        session = live.get(sequence_id)
        if start:
            require_session_key(key)
            if session is not None:
                check_session_key(sequence_id, key, session.key)
                if resumes(start_pos, rollback_to):
                    return _same_split(sequence_id, session, split_layer), []
            victim = self.check_start(sequence_id, split_layer, live, client, keep)
            return None, [] if victim is None else [victim]
        if session is None:
            raise SequenceNeedsStart(f"sequence {sequence_id} is unknown here (never started, ended or expired): "
                                     "re-send its context with START")
        check_session_key(sequence_id, key, session.key)
        return _same_split(sequence_id, session, split_layer), []

    def check_start(self, sequence_id: int, split_layer: int | None, live: Mapping[int, "Owned"],
                    client: str = "", keep: frozenset[int] = frozenset()) -> int | None:
        """Raise unless a START of `sequence_id` by `client` at `split_layer` may begin (or restart) with `live`
        sessions held; the session it takes the place of when the table is full (session_to_evict; never one of
        `keep`), else None."""
        last = self.num_layers - 1 if self.max_split_layer is None else self.max_split_layer
        if split_layer is None or not self.min_split_layer <= split_layer <= last:
            resumes = "" if self.max_split_layer is None else f", resuming at layer {last} at the latest"
            raise ProtocolError(ErrorCode.SPLIT_LAYER,
                                f"START needs SPLIT_LAYER in [{self.min_split_layer}, {last}] "
                                f"(this cloud serves layers {self.min_split_layer} to {self.num_layers - 1} of "
                                f"{self.num_layers}{resumes}), got {split_layer}")
        if sequence_id in live or len(live) < self.limits.max_sessions:
            return None
        victim = session_to_evict(live, client, keep)
        if victim is None:
            raise ProtocolError(ErrorCode.TOO_MANY_SESSIONS,
                                f"too many live sessions ({self.limits.max_sessions}), and client {client or '(none)'} "
                                f"holds its share of them; retry later")
        return victim


def _same_split(sequence_id: int, session: "Keyed", split_layer: int | None) -> "Keyed":
    """A request to a live session (a resumed START too) may name its split layer, not another."""
    if split_layer is not None and split_layer != session.split_layer:
        raise ProtocolError(ErrorCode.SPLIT_LAYER, f"sequence {sequence_id} started with split layer "
                                                   f"{session.split_layer}, not {split_layer}")
    return session


def resumes(start_pos: int, rollback_to: int | None) -> bool:
    """Whether a START of a live session (its key checked) resumes it rather than replacing its context: a
    START past position 0 is the edge's answer to SLOT_EXPIRED (Triton freed the sequence's slot, the models
    kept the session), and it must then start where the session stands (checked like any request)."""
    return start_pos > 0 and rollback_to is None


def check_request(limits: Limits, nbytes: int, rows: int) -> None:
    """The per-request limits: tensor payload bytes, then rows."""
    if nbytes > limits.max_request_bytes:
        raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"request payload of {nbytes} bytes exceeds the limit of "
                                                      f"{limits.max_request_bytes} bytes per request")
    if rows > limits.max_block_rows:
        raise ProtocolError(ErrorCode.LIMIT_EXCEEDED,
                            f"block of {rows} rows exceeds the limit of {limits.max_block_rows} rows per request")


def check_context(limits: Limits, positions: int) -> None:
    """A session's context may hold max_context positions."""
    if positions > limits.max_context:
        raise ProtocolError(ErrorCode.LIMIT_EXCEEDED, f"context of {positions} positions exceeds the limit of "
                                                      f"{limits.max_context}")


def require_session_key(given: int) -> None:
    """A START must carry the SESSION_KEY its session will be bound to."""
    if not given:
        raise ProtocolError(ErrorCode.SESSION_KEY, "START needs a SESSION_KEY: a random key the client keeps and "
                                                   "sends with every request of the session")


def check_session_key(sequence_id: int, given: int, held: int) -> None:
    """Raise unless `given` is the key the live session of `sequence_id` started with (`held`)."""
    if given != held:
        raise ProtocolError(ErrorCode.SESSION_KEY,
                            f"sequence {sequence_id} belongs to another session key: "
                            + ("this request carries none" if not given else "not this request's")
                            + " (two clients on one sequence id, a guessed id, or an earlier session with this id "
                              "still live on this server: one that ended on another replica, after the front's "
                              "replica list changed, lives here until its TTL; start with a new sequence id); "
                              "nothing changed")


class _Idle(Protocol):
    last_seen: float


class Owned(Protocol):
    """A session as fair sharing sees it: whose it is (the front's client identity), when it was last used, and
    the bytes it holds."""

    client: str
    last_seen: float

    @property
    def nbytes(self) -> int: ...


class Keyed(Owned, Protocol):
    """A session bound to the SESSION_KEY its START carried, at the split layer it named."""

    key: int
    split_layer: int


def _by_client(held: Mapping[int, Owned]) -> dict[str, list[int]]:
    owners: dict[str, list[int]] = {}
    for sid, session in held.items():
        owners.setdefault(session.client, []).append(sid)
    return owners


def _least_recent(held: Mapping[int, Owned], sids: list[int]) -> int:
    return min(sids, key=lambda sid: held[sid].last_seen)


def session_to_evict(held: Mapping[int, Owned], client: str, keep: frozenset[int] = frozenset()) -> int | None:
    """When the session table is full, the session a START by `client` takes the place of: the least recently
    used one of the client holding the most, if that client holds at least two more than `client` (so shares
    even out and then stay put); None when no client is over `client`'s share (refuse the START). An evicted
    edge re-sends its context with START, and only to come back within its share. `keep`: never evicted."""
    owners = _by_client(held)
    mine = len(owners.get(client, ()))
    over = [[sid for sid in sids if sid not in keep] for owner, sids in owners.items()
            if owner != client and len(sids) > mine + 1]
    over = [sids for sids in over if sids]
    if not over:
        return None
    most = max(len(sids) for sids in over)
    return _least_recent(held, [sid for sids in over if len(sids) == most for sid in sids])


def sessions_to_evict_for_bytes(held: Mapping[int, Owned], client: str, need: int, free: int,
                                keep: frozenset[int] = frozenset()) -> list[int] | None:
    """When `need` bytes do not fit the `free` bytes of the budget, the sessions whose eviction makes room for
    `client`: least recently used first, each from the client holding the most bytes, while that client holds
    more than `client` will; None when they do not free enough (refuse). `keep`: sessions never evicted (those
    of the batch being admitted)."""
    by_client = _by_client(held)
    owners = {owner: [sid for sid in sids if sid not in keep] for owner, sids in by_client.items()}
    held_by = {owner: sum(held[sid].nbytes for sid in sids) for owner, sids in by_client.items()}
    mine = held_by.pop(client, 0) + need
    victims: list[int] = []
    while free < need:
        candidates = [owner for owner, total in held_by.items() if total > mine and owners[owner]]
        if not candidates:
            return None
        owner = max(candidates, key=held_by.__getitem__)
        sid = _least_recent(held, owners[owner])
        owners[owner].remove(sid)
        victims.append(sid)
        free += held[sid].nbytes
        held_by[owner] -= held[sid].nbytes
    return victims


def drop_idle(held: dict[int, _Idle], now: float, ttl_s: float) -> list[int]:
    """Forget the sessions of `held` idle longer than the TTL; their ids."""
    idle = [sid for sid, state in held.items() if now - state.last_seen > ttl_s]
    for sid in idle:
        del held[sid]
    return idle


class RateLimiter:
    """A token bucket: `rate` requests per second on average, bursts of up to one second's worth."""

    def __init__(self, rate: float, now: float):
        self.rate, self.burst = rate, max(1.0, rate)
        self.tokens, self.stamp = self.burst, now

    def allow(self, now: float) -> bool:
        if self.rate <= 0:
            return True
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


STATE_SHARE = 5  # the default byte budget is 1/STATE_SHARE of the device's memory, for each stateful model


def device_memory_bytes(device: str) -> int:
    """Total memory of `device`: the machine's RAM for "cpu", the GPU's own for "cuda:N"."""
    if device.startswith("cuda"):
        import torch  # only a model on a GPU needs it here

        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class MemoryBudget:
    """The byte budget of one model's session state: work that would take the state past it is refused
    before anything is stored (MEMORY_BUDGET, retried later by the edge), so the process never grows
    into the out-of-memory killer. Three stateful models share a machine, each with a fifth of it by
    default, leaving the rest to weights, Triton and the requests in flight."""

    def __init__(self, limits: Limits, device: str = "cpu"):
        self.limit_bytes = limits.max_state_bytes or device_memory_bytes(device) // STATE_SHARE
        self.refusals = 0

    def check(self, held: int, more: int, sessions: Mapping[int, Owned] | None = None, client: str = "",
              keep: frozenset[int] = frozenset()) -> list[int]:
        """Raise unless `more` bytes may be added to the `held` bytes of session state, if need be in the place of
        `sessions` of clients over `client`'s share (sessions_to_evict_for_bytes); the sessions to evict."""
        if held + more <= self.limit_bytes:
            return []
        victims = None if sessions is None else sessions_to_evict_for_bytes(
            sessions, client, more, self.limit_bytes - held, keep)
        if victims is None:
            self.refusals += 1
            raise ProtocolError(ErrorCode.MEMORY_BUDGET,
                                f"memory budget: this request needs {more} more bytes of session state, the model "
                                f"holds {held} of its {self.limit_bytes} (max_state_bytes), and client "
                                f"{client or '(none)'} holds its share of them; retry later")
        return victims
