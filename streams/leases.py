"""Units of work leased to the live processors workers: failover and sharing by consumer group.

The processors' work is cut into *units*, one per partition of the
``processors.leases`` topic (nothing is ever written to it):

* unit 0, the allocator. Its state is global (every node's slots), so it is
  one unit that reads every partition of its inputs;
* units 1..n-1, the verifier's task shards. Shard ``i`` of ``n-1`` judges the
  tasks whose id hashes (``partition_for`` over ``TASK_PARTITIONS``) to a
  partition ``p`` with ``p % (n-1) == i``. It reads only those partitions of
  the co-partitioned task topics, every partition of the rest (node keys), and
  keeps the events of its own tasks (``Shard.owns``).

Each unit runs as its own ``KafkaRunner`` with its own transactional id and
state record (``<prefix>processors/<unit>``). Workers join one consumer group
subscribed to the leases topic; the group's cooperative-sticky assignment is the
lease. A worker starts a runner thread for each partition it is given and stops
it (its last batch committed) when the partition is taken away. A worker that
dies stops heartbeating: after ``session.timeout.ms`` the group gives its
partitions to the others, whose new runner for each unit first fences the dead
one's producer (``init_transactions`` aborts its open transaction), then
restores the unit's last committed state record and reads on. The tasks in
flight on the dead worker finish on the live one. A paused worker that wakes up
after its units moved is fenced on its next commit and exits. It restarts
clean, since nothing it decided after its last commit was ever visible.

The number of units is a property of the network, fixed when its topics are
made, because a shard's tasks depend on it. Every worker reads it from the
topic's partition count.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import Consumer, ConsumerGroupState, KafkaError, KafkaException, TopicPartition

from streams.admin import admin_client
from streams.klog import KAFKA_LOG
from streams.security import client_config
from streams.topics import LEASES, TASK_PARTITIONS, TASK_TOPICS, partition_for

log = logging.getLogger(__name__)

ALLOCATOR_UNIT = 0
SESSION_MS = 6_000
"""How long a silent worker keeps its leases: the failover time after a SIGKILL."""


@dataclass(frozen=True)
class Shard:
    """One of ``count`` verifier shards: the tasks whose partition ``p`` has
    ``p % count == index``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 < self.count <= TASK_PARTITIONS or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index} of {self.count}: needs 0 <= index < count "
                             f"<= {TASK_PARTITIONS} (the task topics' partitions)")

    def owns(self, task_id: str) -> bool:
        """Whether this shard judges the task."""
        return partition_for(task_id, TASK_PARTITIONS) % self.count == self.index

    def partitions(self) -> list[int]:
        """The partitions of each task topic this shard reads."""
        return [p for p in range(TASK_PARTITIONS) if p % self.count == self.index]

    @property
    def name(self) -> str:
        return f"{self.index}of{self.count}"


def task_topics(prefix: str) -> frozenset[str]:
    """The full names of the co-partitioned task topics."""
    return frozenset(t.name(prefix) for t in TASK_TOPICS)


def unit_name(unit: int, units: int) -> str:
    """``allocator`` or ``verifier-<i>of<n>``; the runner's transactional id and state key
    are ``<prefix>processors/<name>``."""
    if unit == ALLOCATOR_UNIT:
        return "allocator"
    return f"verifier-{Shard(unit - 1, units - 1).name}"


class Runnable(Protocol):
    """What a unit runs: ``KafkaRunner`` (``run(running)`` until ``running()`` is false)."""

    def run(self, running: Callable[[], bool]) -> Any: ...


@dataclass
class _Unit:
    unit: int
    thread: threading.Thread
    stop: threading.Event
    error: BaseException | None = None


@dataclass
class LeasedWorker:
    """Runs the units this worker holds a lease on; see the module docstring."""

    prefix: str
    """The network's topic prefix."""
    member: str
    """This worker's name in the group (``holders``): the producer id it signs with."""
    bootstrap: str
    make: Callable[[int, int], Runnable]
    """Builds the runner of unit ``(unit, units)``."""
    session_ms: int = SESSION_MS
    profile: str | None = None
    """cProfile each unit's thread into ``<profile>.<unit name>`` (benches)."""
    running_units: dict[int, _Unit] = field(default_factory=dict)
    units: int = 0
    handovers: list[tuple[str, int]] = field(default_factory=list)
    """("start" | "stop", unit) in order: what this worker took and gave back."""

    def run(self, running: Callable[[], bool] = lambda: True) -> None:
        """Hold leases and run their units until ``running()`` is false; raises the error
        of a unit that failed (the process should exit: its units restart elsewhere)."""
        topic = LEASES.name(self.prefix)
        config: dict[str, Any] = {
            **client_config(self.bootstrap),
            "group.id": lease_group(self.prefix),
            "client.id": self.member,
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": self.session_ms,
            "heartbeat.interval.ms": max(100, self.session_ms // 6),
            "enable.auto.commit": False,
            "logger": KAFKA_LOG,
        }
        consumer = Consumer(config)
        try:
            self.units = _partitions(consumer, topic)
            consumer.subscribe([topic], on_assign=self._assigned, on_revoke=self._revoked,
                               on_lost=self._revoked)
            while running():
                consumer.poll(0.1)
                for held in list(self.running_units.values()):
                    if held.error is not None:
                        raise RuntimeError(f"unit {unit_name(held.unit, self.units)} failed: "
                                           f"{held.error!r}") from held.error
        finally:
            self._stop(list(self.running_units))
            consumer.close()  # leaves the group: the others take over at once

    # -- the group's callbacks (called from poll, on this thread) ----------------------------

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            if tp.partition not in self.running_units:
                self._start(tp.partition)

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._stop([tp.partition for tp in partitions])

    def _start(self, unit: int) -> None:
        name = unit_name(unit, self.units)
        stop = threading.Event()
        held = _Unit(unit, threading.Thread(name=f"unit-{name}", daemon=True,
                                            target=lambda: self._run_unit(held)), stop)
        self.running_units[unit] = held
        self.handovers.append(("start", unit))
        log.info("lease on %s: starting", name)
        held.thread.start()

    def _stop(self, units: list[int]) -> None:
        stopping = [self.running_units.pop(u) for u in units if u in self.running_units]
        for held in stopping:
            held.stop.set()
        for held in stopping:
            held.thread.join()
            self.handovers.append(("stop", held.unit))
            log.info("lease on %s: stopped", unit_name(held.unit, self.units))

    def _run_unit(self, held: _Unit) -> None:
        _name_thread(unit_name(held.unit, self.units))
        try:
            runner = self.make(held.unit, self.units)
            if self.profile:
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
                try:
                    runner.run(lambda: not held.stop.is_set())
                finally:
                    profiler.disable()
                    profiler.dump_stats(f"{self.profile}.{unit_name(held.unit, self.units)}")
            else:
                runner.run(lambda: not held.stop.is_set())
        except BaseException as err:  # noqa: BLE001 - handed to the worker's loop, which raises it
            log.exception("unit %s failed", unit_name(held.unit, self.units))
            held.error = err


def _name_thread(name: str) -> None:
    """Name this OS thread (``/proc/<pid>/task/<tid>/comm``, top -H, psutil), so a unit's
    CPU can be told apart (bench/lifecycle.py); Linux only, best effort."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _partitions(consumer: Consumer, topic: str, timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is not None and meta.error is None and meta.partitions:
            if len(meta.partitions) < 2:
                raise ValueError(f"{topic} needs at least 2 partitions (the allocator and one "
                                 f"verifier shard), has {len(meta.partitions)}")
            return len(meta.partitions)
        if time.monotonic() > deadline:
            raise RuntimeError(f"topic {topic} does not exist (run `destra infra up`)")
        time.sleep(0.2)


def lease_group(prefix: str) -> str:
    """The consumer group of a network's processors workers."""
    return f"{prefix}processors-leases"


def holders(bootstrap: str, prefix: str, timeout_s: float = 10.0) -> dict[str, list[str]]:
    """Who holds which unit now: per worker (its ``client.id``, the producer id it signs
    with), the names of its units; empty while the group is rebalancing or empty."""
    admin = admin_client(bootstrap)
    group = lease_group(prefix)
    (future,) = admin.describe_consumer_groups([group], request_timeout=timeout_s).values()
    try:
        described = future.result(timeout=timeout_s)
    except KafkaException as err:
        code = err.args[0].code() if err.args else None
        if code in _UNSETTLED or (err.args and err.args[0].retriable()):
            return {}  # no group yet, or its coordinator is moving or loading
        raise
    if described.state != ConsumerGroupState.STABLE:
        return {}
    units = _partitions_admin(admin, LEASES.name(prefix), timeout_s)
    out: dict[str, list[str]] = {}
    for member in described.members:
        out.setdefault(member.client_id, []).extend(
            unit_name(tp.partition, units) for tp in member.assignment.topic_partitions)
    return out


_UNSETTLED = {KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
              KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.GROUP_ID_NOT_FOUND}


def _partitions_admin(admin: Any, topic: str, timeout_s: float) -> int:
    meta = admin.list_topics(topic, timeout=timeout_s).topics.get(topic)
    return len(meta.partitions) if meta is not None and meta.partitions else 0
