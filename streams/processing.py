"""The processing contract every processor of the network follows, whatever runs it.

A processor (ledger decider, allocator, verifier, a node's task logic) is a
pure handler::

    handle(event, ctx) -> Outcome     # one input event
    tick(ctx) -> Outcome              # time passed

``Outcome`` holds the events to emit, the inputs refused (with the reason the
runner dead-letters them under) and the work to run outside the handler (a
node's computation). ``Context`` brings the clock and the randomness: a handler
never reads ``time.time()`` nor the network, so the same inputs at the same
times give the same outputs, under the Kafka runner in production, under the
in-memory runner with a virtual clock in tests, and under ``destra audit``.

Each processor declares how its state comes back after a crash
(``Recovery``) and, for ``SNAPSHOT``, gives ``snapshot()`` / ``restore()``:
plain data the runner stores with the outputs and input positions of the
same transaction, so a restarted processor resumes exactly where the last
committed batch left it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from schemas import Event


@dataclass(frozen=True)
class Origin:
    """Where a consumed record was: for the dead letter that refuses it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None


@dataclass(frozen=True)
class Context:
    """What a handler may know beyond the event: the time, randomness, the record's origin."""

    now_ms: int
    """The broker's append time of the event being handled, or the runner's clock at a tick
    (the virtual clock in tests). Never the handler's own reading of a clock."""
    rng: random.Random = field(default_factory=random.SystemRandom)
    """The only source of randomness a handler may use (salts, random placement): the
    operating system's in production, a seeded one in tests."""
    origin: Origin | None = None
    wall_ms: int | None = None
    """The runner's clock when it handles the event (processing time), when that can be
    later than ``now_ms`` (a worker catching up on a backlog). A deadline a handler sets
    from now must start here, or work placed late is due before it is sent."""

    @property
    def processing_ms(self) -> int:
        """The later of the event's time and the runner's clock."""
        return max(self.now_ms, self.wall_ms or 0)


@dataclass(frozen=True)
class Rejection:
    """An input a handler refused; the runner dead-letters it with ``reason``."""

    event: Event
    reason: str
    origin: Origin | None = None


@dataclass(frozen=True)
class Work:
    """Computation a handler asks for and cannot do itself (it takes time): the runner
    runs ``key``'s work, then calls the processor's ``finished(key, result, ctx)``."""

    key: Any
    run: Callable[[], Any]
    not_before_ms: int | None = None
    """The runner hands the result back no earlier than this (a late node's commit)."""


@dataclass
class Outcome:
    """What handling one event (or a tick) decided."""

    emit: list[Event] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    work: list[Work] = field(default_factory=list)

    def __iadd__(self, other: Outcome) -> Outcome:
        self.emit += other.emit
        self.rejected += other.rejected
        self.work += other.work
        return self

    def __bool__(self) -> bool:
        return bool(self.emit or self.rejected or self.work)

    @classmethod
    def of(cls, events: Iterable[Event]) -> Outcome:
        """An outcome that only emits ``events``."""
        return cls(emit=list(events))

    @classmethod
    def refuse(cls, event: Event, reason: str, origin: Origin | None = None) -> Outcome:
        """An outcome that only refuses ``event``."""
        return cls(rejected=[Rejection(event, reason, origin)])


class Recovery(StrEnum):
    """How a processor's state comes back after SIGKILL."""

    SNAPSHOT = "snapshot"
    """Its state is stored (``snapshot()``) in the same transaction as its outputs and
    input positions; a restart restores the last one and resumes from those positions."""
    REPLAY = "replay"
    """Its state is a fold of topics (its inputs and its own outputs): a restart replays
    them with output suppressed."""
    NONE = "none"
    """It keeps nothing worth restoring (work in progress is re-done or timed out)."""


@runtime_checkable
class Processor(Protocol):
    """The contract: a name, the event types it reads, pure handlers, and its recovery."""

    name: str
    inputs: frozenset[str]
    recovery: Recovery

    def handle(self, event: Event, ctx: Context) -> Outcome:
        """React to one input event."""

    def tick(self, ctx: Context) -> Outcome:
        """React to time passing (deadlines)."""


class Selective(Protocol):
    """A processor that acts on only some events of a type it reads."""

    def wants(self, event: Event) -> bool:
        """Whether ``handle`` would act on ``event``: a cheap look at its fields, before any
        signature is checked (the runner skips what no processor wants)."""


class Snapshotting(Protocol):
    """A processor whose ``recovery`` is ``SNAPSHOT``."""

    def snapshot(self) -> Any:
        """Its whole state as plain data (dicts, lists, ints, str, bytes)."""

    def restore(self, state: Any) -> None:
        """Replace its state with one ``snapshot`` returned."""


class Finishing(Protocol):
    """A processor that asks for ``Work``."""

    def finished(self, key: Any, result: Any, ctx: Context) -> Outcome:
        """React to the end of the work named ``key`` (``result`` is what it returned,
        or the exception it raised)."""


LegacyHandler = Callable[[Event, int, Any], list[Event]]
"""The older service signature: (event, time in ms, origin) -> events to emit."""


def dispatch(handlers: Mapping[str, LegacyHandler], rejected: list[tuple[Event, Any, str]],
             event: Event, ctx: Context) -> Outcome:
    """Run one of a service's named handlers and collect what it refused into the outcome.

    The allocator and the verifier record refusals while they handle an event;
    this turns that into the contract's ``Outcome`` so no caller ever reads a
    service's internals.
    """
    handler = handlers.get(event.name)
    if handler is None:
        return Outcome()
    emitted = handler(event, ctx.now_ms, ctx.origin)
    return Outcome(emit=list(emitted), rejected=drain(rejected))


def drain(rejected: list[tuple[Event, Any, str]]) -> list[Rejection]:
    """Empty a service's refusal buffer into ``Rejection`` values."""
    out = [Rejection(event, reason, where if isinstance(where, Origin) else None)
           for event, where, reason in rejected]
    rejected.clear()
    return out
