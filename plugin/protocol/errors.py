"""Errors of the wire protocol: one stable code per kind, raised by the cloud side, mapped back by the edge.

Every error a python model answers carries its code as the token `[ce-collm:CODE]` in front of the
human sentence (`tagged`). Triton's ensemble puts its own words in front of a composing model's
message ("in ensemble 'ce_collm', [ce-collm:POSITION_GAP] position gap: ..."), so the edge looks for
the token anywhere in the message (CODE_TOKEN). The edge decides what to do from the code, never
from the sentence, which may be reworded freely.

A few errors never pass through our models and cannot carry a code: Triton's own refusals and the
transport's. Their wording is listed once, below (EXTERNAL_SIGNATURES), and read by `error_code`; a link
that is down is told by its gRPC status (UNREACHABLE_STATUSES), except where Triton's words say better.

An error kept after it was raised (a batch's answers are collected before they are sent) keeps its
traceback, and with it every frame it passed through and their locals (the request's arrays), in a
reference cycle that only the cyclic collector breaks: keep `detached()` errors.
"""
from __future__ import annotations

import re
from enum import Enum
from typing import NamedTuple


class Recovery(Enum):
    """What a client may do about an error."""

    RESYNC = "re-send the session's whole context with START"
    RETRY = "send the same request again later: nothing changed"
    WAIT = ("the cloud is not serving now: send the same request again once it is (latency-aware mode answers "
            "on the edge meanwhile); a re-sync follows if the cloud lost the sequence")
    NONE = "give up on this request: sending it again cannot help"


class ErrorCode(Enum):
    """Every kind of error an edge can get: (recovery, meaning)."""

    NEEDS_START = (Recovery.RESYNC, "the cloud holds no context for this sequence: never started, ended, expired "
                                    "(TTL), lost in a server restart or a crashed model, or dropped because the "
                                    "ensemble's two steps disagree about it")
    SLOT_EXPIRED = (Recovery.RESYNC, "Triton's own: the sequence's slot is gone (idle longer than slot_idle_s, or a "
                                     "server restart): re-send the request with START to resume the context the "
                                     "cloud still holds (a START at the session's next position, with its key), "
                                     "and the whole context if that fails")
    POSITION_GAP = (Recovery.RESYNC, "START_POS is past the next position the cloud expects: it holds an older copy "
                                     "of the session (a replica the session was moved back to while its old context "
                                     "lived on) or lost rows; nothing changed")
    POSITION_OVERLAP = (Recovery.NONE, "START_POS is before the next position the cloud expects (rows it already "
                                       "holds); right after a lost reply it means that request had landed")
    ROLLBACK_REFUSED = (Recovery.NONE, "ROLLBACK_TO does not lie within the rows the session's last request "
                                       "checked (stale, beyond what the cloud holds, no such request, a START), or "
                                       "START_POS differs from it; right after a lost reply it means that request had "
                                       "landed")
    SPLIT_LAYER = (Recovery.NONE, "SPLIT_LAYER missing with START, outside the layers this cloud serves, or not "
                                  "the split layer the session started with")
    SESSION_KEY = (Recovery.NONE, "SESSION_KEY missing, or not the key the session started with: another edge "
                                  "holds this sequence id (or the id was guessed); nothing changed")
    RATE_LIMITED = (Recovery.RETRY, "the session sent more requests per second than the cloud allows")
    TOO_MANY_SESSIONS = (Recovery.RETRY, "the cloud holds as many live sessions as it allows")
    MEMORY_BUDGET = (Recovery.RETRY, "the model's session state (KV caches + pending rows) would pass its byte "
                                     "budget (max_state_bytes); nothing changed")
    LIMIT_EXCEEDED = (Recovery.NONE, "the request or the session's context is larger than the cloud allows "
                                     "(rows per request, bytes per request, positions per session)")
    MALFORMED = (Recovery.NONE, "tensors missing or extra, of the wrong dtype or shape, values out of range "
                                "(NaN/Inf, scales, token ids, negative START_POS), a token request with no rows, "
                                "or a zero or string sequence id")
    NOT_FINITE = (Recovery.NONE, "the cloud's logits are not finite: the hidden rows are out of range")
    INTERNAL = (Recovery.NONE, "an unexpected exception in a model (a bug); its traceback is in the server log")
    RESTRICTED = (Recovery.NONE, "Triton's own: the endpoint is restricted to clients with a key "
                                 "(--grpc-restricted-protocol)")
    UNREACHABLE = (Recovery.WAIT, "the transport's own: the server is down or the link is cut "
                                  "(gRPC UNAVAILABLE, DEADLINE_EXCEEDED, or the connection closed mid-request)")
    MODEL_DOWN = (Recovery.WAIT, "Triton's own: a model of the ensemble is not serving (its stub died and the "
                                 "server's healer reloads it, or it is being reloaded)")
    SERVER = (Recovery.NONE, "Triton refused the request before a model saw it, without a ce-collm code "
                             "(inputs the model config does not declare, wrong dtypes or batch size, an unhealthy "
                             "model)")

    def __init__(self, recovery: Recovery, meaning: str):
        self.recovery, self.meaning = recovery, meaning


CODE_TOKEN = re.compile(r"\[ce-collm:([A-Z_]+)\]")  # anywhere in the message: the ensemble prefixes its words


class Signature(NamedTuple):
    words: str  # as they appear in the error message
    code: ErrorCode
    whose: str  # who says them, and when


# Errors that our models never answer, so they carry no code: their words (Triton 2.51, grpcio, as measured).
EXTERNAL_SIGNATURES = (
    Signature("must specify the START flag", ErrorCode.SLOT_EXPIRED,
              "Triton's sequence batcher, for a request without START whose sequence it does not know (the idle "
              "timeout or a restart freed its slot); gRPC status INVALID_ARGUMENT, as for any bad request"),
    Signature("This protocol is restricted", ErrorCode.RESTRICTED,
              "Triton, for an API behind --grpc-restricted-protocol; gRPC status UNAVAILABLE, yet retrying "
              "cannot help"),
    Signature("Socket closed", ErrorCode.UNREACHABLE, "grpcio, when the connection drops under a call"),
    Signature("is not healthy", ErrorCode.MODEL_DOWN,
              "Triton, for a request to a model whose Python-backend stub died (\"Stub process 'cloud_partition_0_0' "
              "is not healthy.\"); gRPC status INTERNAL, and the model still reports READY"),
    Signature("has no available versions", ErrorCode.MODEL_DOWN,
              "Triton, for the ensemble while one of its steps is being unloaded and loaded again (\"Request for "
              "unknown model: 'ce_collm' has no available versions\"); gRPC status NOT_FOUND"),
)
UNREACHABLE_STATUSES = ("UNAVAILABLE", "DEADLINE_EXCEEDED")  # gRPC status codes of a link that is down


class ProtocolError(ValueError):
    """A request the cloud refused or failed, with the code that says why. A refusal leaves the session's
    stored context as it was; NOT_FINITE (computed, then refused) and INTERNAL are failures.

    details: what the server log should get beside the answer (the traceback of an unexpected exception)."""

    def __init__(self, code: ErrorCode, message: str, details: str = ""):
        super().__init__(message)
        self.code, self.details = code, details

    def detached(self) -> "ProtocolError":
        """This error without the traceback it was raised with (and the exception it was raised during), so
        that keeping it keeps no frame alive."""
        self.__traceback__ = self.__context__ = self.__cause__ = None
        return self


class SequenceNeedsStart(ProtocolError):
    """The cloud holds no usable context for this sequence (code: any whose recovery is RESYNC): the edge must
    re-send it with START."""

    def __init__(self, message: str, details: str = "", code: ErrorCode = ErrorCode.NEEDS_START):
        assert code.recovery is Recovery.RESYNC, code
        super().__init__(code, message, details)


def tagged(code: ErrorCode, message: str) -> str:
    """The error text a model answers: the code token, then the human sentence."""
    return f"[ce-collm:{code.name}] {message}"


def error_code(message: str, grpc_status: str = "") -> ErrorCode:
    """The kind of an error a client got: our code token, else the words of an external error, else the
    gRPC status (tritonclient spells it `StatusCode.UNAVAILABLE`); SERVER when none of them says."""
    found = CODE_TOKEN.search(message)
    if found and found.group(1) in ErrorCode.__members__:
        return ErrorCode[found.group(1)]
    for signature in EXTERNAL_SIGNATURES:
        if signature.words in message:
            return signature.code
    if grpc_status.rsplit(".", 1)[-1] in UNREACHABLE_STATUSES:
        return ErrorCode.UNREACHABLE
    return ErrorCode.SERVER


def error_for(code: ErrorCode, message: str) -> ProtocolError:
    """The exception an edge raises for a refusal: SequenceNeedsStart when the cure is a re-sync."""
    return SequenceNeedsStart(message, code=code) if code.recovery is Recovery.RESYNC else ProtocolError(code, message)


def position_error(sequence_id: int, expected: int, start_pos: int, unit: str) -> ProtocolError:
    """A request that does not start at the position the cloud expects next (of a row, or of a token id)."""
    gap = start_pos > expected
    return error_for(ErrorCode.POSITION_GAP if gap else ErrorCode.POSITION_OVERLAP,
                     f"position {'gap' if gap else 'overlap'}: sequence {sequence_id} expects its next {unit} at "
                     f"position {expected}, the request starts at {start_pos}")
