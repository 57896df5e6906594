"""What one replica takes on. Requests beyond `max_queued` are answered 429 at once,
with Retry-After, rather than waiting in a queue that grows with the load until memory
runs out; a request that takes longer than `request_timeout_s` is answered 504."""

from __future__ import annotations

from dataclasses import dataclass

RETRY_AFTER_S = 1


@dataclass(frozen=True)
class Limits:
    max_queued: int = 64  # requests a replica holds at once, generating or waiting
    request_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.max_queued < 1:
            raise ValueError(f"max_queued must be at least 1, not {self.max_queued}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be more than 0, not "
                             f"{self.request_timeout_s}")

    def serve_options(self) -> dict:
        """Serve's own bounds around the replica: Serve sends a replica up to twice
        `max_queued` requests, so that the replica sees (and refuses) those beyond it,
        and each proxy holds up to `max_queued` more, answering 503 beyond."""
        return {"max_ongoing_requests": 2 * self.max_queued,
                "max_queued_requests": self.max_queued}


DEFAULT_LIMITS = Limits()


class Admission:
    """Requests a replica holds; one beyond the limit is refused. Used on the replica's
    event loop only, so the count needs no lock."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0

    def admit(self) -> bool:
        if self.held >= self.limit:
            return False
        self.held += 1
        return True

    def release(self) -> None:
        self.held -= 1
