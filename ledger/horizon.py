"""Ids that expire by broker time: the ledger's memory of what it has seen, bounded.

The ledger refuses an input that moves money by id (a submission, a mint, a
penalty) once it is older than its freshness limit by the broker's clock
(``ledger.decider``). So it only has to remember such an id until the broker
time after which that input would be refused anyway: its *expiry*. An id is
forgotten once every partition of its topic has been read past its expiry
(plus ``margin_ms``, for a broker leader whose clock is a little behind): the
broker stamps each partition's records in append order, so every record still
to come on any partition is later, and a replay of the input is refused by age.

The watermark of a topic is the *minimum* over its partitions of the latest
record time read, not the maximum: the runner may read one partition far ahead
of another (a restart catching up reads whole fetched blocks per partition),
and a replay appended in time on a lagging partition must still find its id.
A partition never read yet holds the topic's pruning back. Records with no
partition (the in-memory runner, ``decide`` without a context) form one stream.

Everything here is a function of the records' times and partitions, never of a
wall clock, so a replay of the same records prunes the same ids.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field


@dataclass
class Horizon:
    """Expiring ids per topic (named by an event type), pruned by per-partition watermarks."""

    partitions: dict[str, int]
    """The catalogue's partition count of each topic, by the event type it carries."""
    margin_ms: int = 0
    """How far past an id's expiry a topic's watermark must be before it is forgotten."""
    seen: dict[str, dict[int | None, int]] = field(default_factory=dict)
    """Per topic, per partition (None: no partition given), the latest record time read."""
    expires: dict[str, tuple[str, int]] = field(default_factory=dict)
    """Each id kept: its topic and its expiry (broker ms)."""
    _heaps: dict[str, list[tuple[int, str]]] = field(default_factory=dict, repr=False,
                                                      compare=False)

    def __contains__(self, key: str) -> bool:
        return key in self.expires

    def __len__(self) -> int:
        return len(self.expires)

    def keep(self, key: str, topic: str, expires_at: int) -> None:
        """Remember ``key`` until ``topic``'s watermark passes ``expires_at`` (a later expiry
        given again for the same key wins)."""
        old = self.expires.get(key)
        if old is not None and old[1] >= expires_at:
            return
        self.expires[key] = (topic, expires_at)
        heapq.heappush(self._heaps.setdefault(topic, []), (expires_at, key))

    def watermark(self, topic: str) -> int | None:
        """The time every partition of ``topic`` has been read to, or None (one not read yet)."""
        parts = self.seen.get(topic)
        if not parts:
            return None
        numbered = [p for p in parts if p is not None]
        if not numbered:
            return parts[None]
        count = max(self.partitions.get(topic, 1), max(numbered) + 1)
        if len(numbered) < count:
            return None
        return min(parts[p] for p in range(count))

    def observe(self, topic: str, partition: int | None, at_ms: int) -> list[str]:
        """A record of ``topic`` read at broker time ``at_ms``: the ids it lets go, if any."""
        parts = self.seen.setdefault(topic, {})
        if at_ms <= parts.get(partition, at_ms - 1):
            return []
        parts[partition] = at_ms
        mark = self.watermark(topic)
        heap = self._heaps.get(topic)
        if mark is None or not heap:
            return []
        gone: list[str] = []
        while heap and heap[0][0] + self.margin_ms < mark:
            expires_at, key = heapq.heappop(heap)
            if self.expires.get(key) == (topic, expires_at):  # not kept longer since
                del self.expires[key]
                gone.append(key)
        return gone

    def state(self) -> dict[str, object]:
        """Plain data for a checkpoint (the heaps are rebuilt from ``expires``)."""
        return {"seen": {t: dict(p) for t, p in self.seen.items()},
                "expires": dict(self.expires)}

    def load(self, state: dict[str, object]) -> None:
        """Take over what ``state`` returned."""
        self.seen = {t: dict(p) for t, p in state["seen"].items()}  # type: ignore[attr-defined]
        self.expires = dict(state["expires"])  # type: ignore[call-overload]
        self._heaps = {}
        for key, (topic, expires_at) in self.expires.items():
            self._heaps.setdefault(topic, []).append((expires_at, key))
        for heap in self._heaps.values():
            heapq.heapify(heap)
