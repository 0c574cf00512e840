"""Expiring logs: a processor's state that grows with its input rate, kept out of its snapshot.

A processor remembers some things for a fixed horizon after they happened: the
ids of the signed events it accepted (a copy within the validity window is a
replay), the tasks it closed (a late event about one is refused). Such state
holds rate x horizon entries: at 20 tasks/s, 10 minutes of closed tasks and 5
minutes of event ids are tens of thousands of entries, and a snapshot that
carries them costs megabytes on every transaction.

An ``ExpiringLog`` is that state as an insertion-ordered map whose entries each
carry the time they expire, pruned from the head. The Kafka runner
(``streams.kafka_runner``) writes only what a batch *added* to each log, to the
time-retained ``processors.journal`` topic in the batch's transaction, and
rebuilds the logs after a restart by reading that topic back over the logs'
horizon: the restart costs the horizon's entries, never the history, and the
snapshot of every transaction is bounded by the work in flight.

Entries are never changed in place (values are immutable), so an entry's whole
life is one ``add`` and one prune: ``rollback`` undoes both since the last
``commit``, for the runner's rewind after a handler failed mid-batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable, Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

Entry = tuple[Hashable, int, Any]
"""(key, expires at ms, value)."""


class ExpiringLog:
    """Keys with a value and an expiry time, in insertion order; see the module docstring."""

    def __init__(self, horizon_ms: int) -> None:
        self.horizon_ms = horizon_ms
        """The longest an entry lives after it is added (its expiry minus the time it was
        added): how far back a rebuild must read."""
        self._values: dict[Hashable, Any] = {}
        self._order: deque[tuple[int, Hashable]] = deque()
        """(expires at, key) in insertion order, which is nearly expiry order."""
        self._added: list[Entry] = []
        """Entries added since the last ``commit``: the journal record of this batch."""
        self._pruned: list[tuple[int, Hashable, Any]] = []
        """Entries pruned since the last ``commit``, in pruning order: ``rollback`` puts
        them back."""
        self._tracking = False
        """Only a log a runner journals keeps what changed (``track``): elsewhere (a node,
        the in-memory runner, an audit) nobody commits, and the lists would only grow."""

    def track(self) -> None:
        """Keep what changes from now on, for ``added``, ``commit`` and ``rollback``."""
        self._tracking = True

    # -- reading ------------------------------------------------------------------------------

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._values)

    def get(self, key: Hashable, default: Any = None) -> Any:
        return self._values.get(key, default)

    def entries(self) -> list[Entry]:
        """Every live entry, in insertion order."""
        return [(key, expires, self._values[key]) for expires, key in self._order]

    # -- changing -----------------------------------------------------------------------------

    def add(self, key: Hashable, expires_at: int, value: Any = None) -> bool:
        """Remember ``key`` until ``expires_at``; False (and no change) if it is already
        there: the first entry of a key stands until it expires."""
        if key in self._values:
            return False
        self._values[key] = value
        self._order.append((expires_at, key))
        if self._tracking:
            self._added.append((key, expires_at, value))
        return True

    def prune(self, now_ms: int) -> int:
        """Forget the entries that expired before ``now_ms``, from the head; stops at the
        first one still valid (one out of order lives a little longer). How many went."""
        gone = 0
        while self._order and self._order[0][0] < now_ms:
            expires, key = self._order.popleft()
            value = self._values.pop(key)
            if self._tracking:
                self._pruned.append((expires, key, value))
            gone += 1
        return gone

    # -- the runner's side --------------------------------------------------------------------

    def added(self) -> list[Entry]:
        """What was added since the last ``commit``: this batch's journal record."""
        return list(self._added)

    def commit(self) -> None:
        """The batch's transaction committed: its adds and prunes stand."""
        self._added.clear()
        self._pruned.clear()

    def rollback(self) -> None:
        """Undo every add and prune since the last ``commit`` (of a tracking log)."""
        for expires, key, value in reversed(self._pruned):
            self._order.appendleft((expires, key))
            self._values[key] = value
        for _ in self._added:
            _, key = self._order.pop()
            del self._values[key]
        self._added.clear()
        self._pruned.clear()

    def reset(self) -> None:
        """Empty, with nothing pending."""
        self._values.clear()
        self._order.clear()
        self._added.clear()
        self._pruned.clear()

    def load(self, entries: Iterable[Entry]) -> None:
        """Append entries read back from the journal (a rebuild): committed, not journaled
        again; a key already there keeps its first entry."""
        for key, expires, value in entries:
            if key not in self._values:
                self._values[key] = value
                self._order.append((expires, key))

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ExpiringLog) and self.horizon_ms == other.horizon_ms
                and self.entries() == other.entries())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ExpiringLog({len(self)} entries, horizon {self.horizon_ms} ms)"

    def __getstate__(self) -> dict[str, Any]:
        # Pickled whole (a test's or an audit's copy), never with a batch's pending
        # changes: those belong to the live instance's transaction.
        return {"horizon_ms": self.horizon_ms, "entries": self.entries()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["horizon_ms"])  # type: ignore[misc]
        self.load(state["entries"])


@runtime_checkable
class Journaled(Protocol):
    """A ``Recovery.SNAPSHOT`` processor whose ``snapshot()`` leaves out its expiring logs,
    which the runner journals instead (``streams.kafka_runner``)."""

    def journals(self) -> Mapping[str, ExpiringLog]:
        """The processor's live logs, by a name stable across versions."""
        ...


def full_state(processor: Any) -> tuple[Any, dict[str, list[Entry]]]:
    """A processor's whole state, its snapshot and its logs' entries: what a restart
    restores (tests and benches compare it; the runner stores the two parts apart)."""
    logs = processor.journals() if isinstance(processor, Journaled) else {}
    return processor.snapshot(), {name: log.entries() for name, log in logs.items()}


def restore_full(processor: Any, state: tuple[Any, Mapping[str, list[Entry]]]) -> None:
    """Take over a ``full_state``: the snapshot, then the logs' entries."""
    snapshot, entries = state
    processor.restore(snapshot)
    if isinstance(processor, Journaled):
        for name, log in processor.journals().items():
            log.reset()
            log.load(entries.get(name, ()))
