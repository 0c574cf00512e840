"""The in-memory runner: processors wired together in one process, on a virtual clock.

It runs the same handlers as the Kafka runner (``streams.processing``): every
event any processor emits, or a test publishes, is appended to one in-memory
log and delivered, in order, to each processor whose ``inputs`` name it, with
``Context.now_ms`` the virtual clock. ``advance`` moves the clock in steps,
calling each processor's ``tick``: a 30-second commit window then takes
microseconds, so deadline scenarios (reissue, no-show, ``no_data_key``, late
reveals, slashing) are unit tests. Work a handler asks for (a node's
computation) runs at once and its result is handed back at the next step not
earlier than its ``not_before_ms``. Refused events and events an authority
check refuses go to ``dead_letters`` with the reason.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from schemas import Event
from streams.processing import Context, Outcome, Processor, Work


@dataclass(frozen=True)
class Logged:
    """One event in the in-memory log: when it was appended, and by whom."""

    at_ms: int
    event: Event
    source: str


@dataclass
class MemoryRunner:
    """Drives processors on a virtual clock; see the module docstring."""

    processors: Sequence[Processor]
    now_ms: int = 1_800_000_000_000
    seed: int = 0
    tick_ms: int = 100
    check: Callable[[Event], str | None] | None = None
    """An authority check each event passes before delivery (None: all pass)."""
    log: list[Logged] = field(default_factory=list)
    dead_letters: list[tuple[Event, str]] = field(default_factory=list)
    _pending: deque[tuple[Event, str]] = field(default_factory=deque)
    _work: list[tuple[int, int, int, Work, Any]] = field(default_factory=list)
    _seq: int = 0

    def __post_init__(self) -> None:
        # Seeded, for repeatable tests; production runners use the OS's generator.
        self.rng = random.Random(self.seed)  # noqa: S311

    def _ctx(self) -> Context:
        return Context(self.now_ms, self.rng)

    def publish(self, *events: Event, source: str = "outside") -> None:
        """Append events from outside the processors (a submitter, a forger) and deliver."""
        for e in events:
            self._pending.append((e, source))
        self.settle()

    def settle(self) -> None:
        """Deliver every pending event and hand back every finished work, until quiet."""
        while self._pending or self._due():
            while self._pending:
                event, source = self._pending.popleft()
                self.log.append(Logged(self.now_ms, event, source))
                refusal = self.check(event) if self.check is not None else None
                if refusal is not None:
                    self.dead_letters.append((event, refusal))
                    continue
                for index, p in enumerate(self.processors):
                    if event.name in p.inputs:
                        self._apply(index, p.handle(event, self._ctx()))
            while self._due():
                _, _, index, work, result = heapq.heappop(self._work)
                p = self.processors[index]
                self._apply(index, p.finished(work.key, result, self._ctx()))  # type: ignore[attr-defined]

    def _due(self) -> bool:
        return bool(self._work) and self._work[0][0] <= self.now_ms

    def _apply(self, index: int, outcome: Outcome) -> None:
        name = self.processors[index].name
        for e in outcome.emit:
            self._pending.append((e, name))
        for r in outcome.rejected:
            self.dead_letters.append((r.event, r.reason))
        for w in outcome.work:
            try:
                result: Any = w.run()
            except Exception as err:  # handed back: the processor decides what it means
                result = err
            due = max(self.now_ms, w.not_before_ms or 0)
            self._seq += 1
            heapq.heappush(self._work, (due, self._seq, index, w, result))

    def advance(self, ms: int) -> None:
        """Move the clock ``ms`` forward in ``tick_ms`` steps, ticking every processor."""
        end = self.now_ms + ms
        while self.now_ms < end:
            self.now_ms = min(end, self.now_ms + self.tick_ms)
            for index, p in enumerate(self.processors):
                self._apply(index, p.tick(self._ctx()))
            self.settle()

    def run_until(self, done: Callable[[], bool], max_ms: int) -> int:
        """Advance until ``done()``; the virtual ms it took. ``AssertionError`` past ``max_ms``."""
        start = self.now_ms
        self.settle()
        while not done():
            if self.now_ms - start >= max_ms:
                raise AssertionError(f"not done after {max_ms} virtual ms")
            self.advance(self.tick_ms)
        return self.now_ms - start

    def events(self, *names: str) -> list[Event]:
        """Every logged event of the given types, in order."""
        return [entry.event for entry in self.log if entry.event.name in names]

    def by(self, source: str) -> Iterable[Event]:
        """Every logged event a processor (or ``outside``) emitted."""
        return (entry.event for entry in self.log if entry.source == source)
