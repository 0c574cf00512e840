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

from dataclasses import dataclass, field

from schemas import Event
from streams.journal import ExpiringLog

MAX_EVENT_AGE_MS = 300_000
"""How long a signed event stays valid after it occurred (5 minutes)."""
MAX_CLOCK_SKEW_MS = 60_000
"""How far in the future a signer's clock may be before its events are refused."""


@dataclass
class Freshness:
    """The ids accepted within the validity window, and the window's rules."""

    max_age_ms: int = MAX_EVENT_AGE_MS
    max_skew_ms: int = MAX_CLOCK_SKEW_MS
    seen: ExpiringLog = field(default_factory=lambda: ExpiringLog(0))
    """Ids of accepted events that have not expired yet, each until its event expires: an
    expiring log (``streams.journal``), which a Kafka runner journals instead of carrying
    it in every snapshot."""

    def __post_init__(self) -> None:
        # An id lives from its acceptance until its event expires: at most max_age after
        # the event occurred, which may be max_skew after it is accepted.
        self.seen.horizon_ms = self.max_age_ms + self.max_skew_ms

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
        self.seen.add(event.event_id, event.occurred_at + self.max_age_ms)

    def prune(self, now_ms: int) -> None:
        """Forget ids whose events have expired (a copy would be refused as expired).

        Stops at the first id still valid: one out of order is kept a little longer.
        """
        self.seen.prune(now_ms)

    def take_over(self, old: object) -> None:
        """Adopt the ids of a ``Freshness`` restored from a snapshot written before its ids
        were journaled (a set and an expiry deque): added as new, so the next batch
        journals them."""
        pending = getattr(old, "_expiry", None)
        if pending is None and isinstance(getattr(old, "seen", None), ExpiringLog):
            pending = [(expires, key) for key, expires, _ in old.seen.entries()]  # type: ignore[attr-defined]
        for expires, event_id in pending or ():
            self.seen.add(event_id, expires)
