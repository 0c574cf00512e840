"""Replay and expiry checks for events from untrusted parties.

Every signed event carries a unique ``event_id`` and the signer's
``occurred_at``, both covered by its signature. An event *expires*
``max_age_ms`` after it occurred: a receiver judging it later (by the broker's
append time, so a rebuild from the log judges it the same way) refuses it as
stale. Within that window a receiver remembers the ids it accepted and refuses
a second copy as a replay; after the window the id can be forgotten, because
the copy would be refused as expired anyway.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from schemas import Event

MAX_EVENT_AGE_MS = 300_000
"""How long a signed event stays valid after it occurred (5 minutes)."""
MAX_CLOCK_SKEW_MS = 60_000
"""How far in the future a signer's clock may be before its events are refused."""


@dataclass
class Freshness:
    """The ids accepted within the validity window, and the window's rules."""

    max_age_ms: int = MAX_EVENT_AGE_MS
    max_skew_ms: int = MAX_CLOCK_SKEW_MS
    seen: set[str] = field(default_factory=set)
    """Ids of accepted events that have not expired yet."""
    _expiry: deque[tuple[int, str]] = field(default_factory=deque)
    """(expires at, id) in acceptance order, which is nearly expiry order."""

    def refusal(self, event: Event, now_ms: int) -> str | None:
        """Why ``event`` must be refused at ``now_ms`` (a dead-letter reason), or None."""
        age = now_ms - event.occurred_at
        if age > self.max_age_ms:
            return (f"expired-event: {event.name} occurred {age} ms before it was read, "
                    f"more than the {self.max_age_ms} ms it is valid for")
        if -age > self.max_skew_ms:
            return (f"expired-event: {event.name} claims to occur {-age} ms in the future, "
                    f"beyond the {self.max_skew_ms} ms of clock skew allowed")
        if event.event_id in self.seen:
            return f"replayed-event: {event.name} {event.event_id} was already accepted"
        return None

    def accept(self, event: Event) -> None:
        """Remember ``event`` as accepted, so a copy of it is refused."""
        self.seen.add(event.event_id)
        self._expiry.append((event.occurred_at + self.max_age_ms, event.event_id))

    def prune(self, now_ms: int) -> None:
        """Forget ids whose events have expired (a copy would be refused as expired).

        Stops at the first id still valid: one out of order is kept a little longer.
        """
        while self._expiry and self._expiry[0][0] < now_ms:
            self.seen.discard(self._expiry.popleft()[1])
