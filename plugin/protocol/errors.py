"""Errors of the wire protocol, raised by the cloud side and recognised by the edge."""
from __future__ import annotations


class ProtocolError(ValueError):
    """A request that breaks the protocol; the session's stored context is left as it was."""


class SequenceNeedsStart(ProtocolError):
    """The cloud holds no context for this sequence: the edge must re-send it with START."""
