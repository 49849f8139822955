"""What one session, and one request, may hold or ask of the cloud."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_sessions: int = 256
    max_context: int = 4096  # positions per session
    max_block_rows: int = 1024  # rows in one request
    ttl_s: float = 600.0  # idle sessions are dropped: Triton frees idle slots without telling us
    max_request_bytes: int = 64 << 20  # tensor payload of one request (1024 fp32 rows of hidden 8192 = 32 MiB)
    max_requests_per_s: float = 1000.0  # per session, token bucket one second deep; 0 turns it off


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
