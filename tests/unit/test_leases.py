"""Units and shards (``streams.leases``) and a sharded runner's routing, without a broker."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from destra.settings import Settings
from schemas import Event
from schemas.codec import encode
from schemas.samples import sample_event, with_fields
from schemas.signatures import KeyPair
from streams.kafka_runner import KafkaRunner
from streams.leases import Shard, unit_name
from streams.processing import Context, Outcome, Recovery
from streams.topics import TASK_PARTITIONS, partition_for, topic_for

IDS = [f"task-{random.Random(7).getrandbits(80) ^ i:020x}" for i in range(2000)]


@pytest.mark.parametrize("count", range(1, TASK_PARTITIONS + 1))
def test_the_shards_of_a_count_split_the_task_partitions_and_the_tasks(count: int) -> None:
    shards = [Shard(i, count) for i in range(count)]
    parts = [p for s in shards for p in s.partitions()]
    assert sorted(parts) == list(range(TASK_PARTITIONS))  # each partition read by one shard
    for task_id in IDS:
        owners = [s for s in shards if s.owns(task_id)]
        assert len(owners) == 1
        assert partition_for(task_id, TASK_PARTITIONS) in owners[0].partitions()
    if count > 1:  # and no shard is left without work
        assert all(sum(s.owns(t) for t in IDS) > len(IDS) / count / 2 for s in shards)


@pytest.mark.parametrize(("index", "count"), [(0, 0), (2, 2), (-1, 3), (0, TASK_PARTITIONS + 1)])
def test_an_impossible_shard_is_refused(index: int, count: int) -> None:
    with pytest.raises(ValueError, match="shard"):
        Shard(index, count)


def test_units_are_the_allocator_then_the_verifier_shards() -> None:
    assert [unit_name(u, 3) for u in range(3)] == ["allocator", "verifier-0of2", "verifier-1of2"]
    assert unit_name(4, 5) == "verifier-3of4"


@dataclass
class _Message:
    """What the runner reads of a confluent_kafka.Message."""

    _value: bytes
    _topic: str
    _partition: int
    _key: bytes | None = None

    def value(self) -> bytes:
        return self._value

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return 42

    def key(self) -> bytes | None:
        return self._key

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_764_300_000_000)

    def error(self) -> None:
        return None


@dataclass
class _Recorder:
    name: str = "recorder"
    inputs: frozenset[str] = frozenset({"TaskSubmitted", "TaskAssigned"})
    recovery: Recovery = Recovery.NONE
    seen: list[str] = field(default_factory=list)

    def handle(self, event: Event, ctx: Context) -> Outcome:
        self.seen.append(event.fields["task_id"])
        return Outcome()

    def tick(self, ctx: Context) -> Outcome:
        return Outcome()


def _runner(shard: Shard) -> tuple[KafkaRunner, _Recorder]:
    recorder = _Recorder()
    runner = KafkaRunner(Settings(topic_prefix="t."), "127.0.0.1:1", [recorder],
                         group="t.processors/x", snapshot_keys=KeyPair.generate(), shard=shard)
    return runner, recorder


def _read(runner: KafkaRunner, event: Event, partition: int) -> list[Any]:
    topic = topic_for(event.name).name("t.")
    letters: list[Event] = []
    runner._handle(_Message(encode(event), topic, partition), set(), letters)
    return letters


def test_a_shard_hands_on_its_own_tasks_and_dead_letters_a_misrouted_one() -> None:
    mine, theirs = Shard(0, 2), Shard(1, 2)
    own = next(t for t in IDS if mine.owns(t))
    other = next(t for t in IDS if theirs.owns(t))
    runner, recorder = _runner(mine)
    submitted = sample_event("TaskSubmitted")

    # Its own task, on the partition every producer puts it on: handled.
    right = partition_for(own, TASK_PARTITIONS)
    assert _read(runner, with_fields(submitted, task_id=own), right) == []
    assert recorder.seen == [own]

    # Another shard's task on one of this shard's partitions (a producer that did not
    # hash): nobody else reads it there, so it is dead-lettered with the reason.
    wrong = mine.partitions()[0]
    letters = _read(runner, with_fields(submitted, task_id=other), wrong)
    assert [letter.fields["source_partition"] for letter in letters] == [wrong]
    assert "misrouted" in letters[0].fields["reason"]
    assert recorder.seen == [own]

    # On a node-keyed topic every shard reads every partition: another shard's task is
    # that shard's business, not an error.
    assigned = sample_event("TaskAssigned")
    assert _read(runner, with_fields(assigned, task_id=other), 3) == []
    assert _read(runner, with_fields(assigned, task_id=own), 3) == []
    assert recorder.seen == [own, own]
