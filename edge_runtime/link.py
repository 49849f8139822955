"""What the decoding loop needs of a cloud link (TritonLink, ReconnectingLink, LocalCloud)."""
from __future__ import annotations

from typing import Protocol

from plugin.protocol.messages import CloudReply, CloudRequest


class CloudUnreachable(ConnectionError):
    """The cloud did not answer (server down, link cut, deadline passed)."""


class CloudLink(Protocol):
    def send(self, req: CloudRequest) -> CloudReply:
        """Deliver one request through the ensemble; raise the cloud's error or CloudUnreachable."""
