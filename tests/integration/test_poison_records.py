"""No poison pill, on a real broker and Postgres: the four records that used to kill a
service for good are dead-lettered with a reason, every process keeps running (and
restarts past them), and a task submitted afterwards is verified and paid.

Each poison record is produced straight to its topic with a plain confluent-kafka
producer, as an attacker with broker access (or a service's stolen key) would:

- a 5 MB record on ``tasks.verdicts``, which the broker takes (lz4 makes it small on the
  wire), far too large to copy into a dead letter: referenced instead;
- a ``TaskVerified`` signed with the verifier's key whose shares exceed what the task's
  escrow bought: the ledger cannot pay it;
- a ``TaskFailed`` signed with the verifier's key whose detail holds a NUL, which no
  PostgreSQL text column can store;
- a ``TaskAssigned`` signed with the allocator's key for a task whose quorum is not a
  majority of its replicas: no tally can judge it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import signal
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from typing import Any

import pytest
from confluent_kafka import Producer

from destra.client import Client
from destra.network import LocalNetwork
from ledger.processor import wait_for_transactions
from schemas import Event, decode, encode
from schemas.events import now_ms
from schemas.samples import sample_event, with_fields
from streams.metrics import registered
from streams.reading import read_all
from streams.security import client_config
from streams.topics import TASK_PARTITIONS, partition_for, topic_for
from tests.support import eventually, scrape, total

pytestmark = pytest.mark.integration

BIG = 5 * 1024 * 1024


@pytest.fixture
def net(three_operators: LocalNetwork) -> LocalNetwork:
    return three_operators


def _topic(net: LocalNetwork, event: str) -> str:
    return topic_for(event).name(net.settings.topic_prefix)


def _letters(net: LocalNetwork) -> list[Event]:
    return [decode(m.value()) for m in read_all(net.bootstrap, _topic(net, "DeadLettered"))]


def _wait_for(net: LocalNetwork, what: str, found: Any, timeout_s: float = 90.0) -> list[Event]:
    """The dead letters, once ``found(letters)`` holds; fails naming ``what`` after a while."""
    deadline = time.monotonic() + timeout_s
    while True:
        letters = _letters(net)
        if found(letters):
            return letters
        net.check_alive()
        assert time.monotonic() < deadline, (
            f"not dead-lettered: {what}; letters: "
            f"{[(x.fields['source_topic'], x.fields['reason'][:80]) for x in letters]}")
        time.sleep(0.5)


def _from(letters: list[Event], topic: str, reason: str) -> list[Mapping[str, Any]]:
    return [x.fields for x in letters
            if x.fields["source_topic"] == topic and reason in x.fields["reason"]]


def test_poison_records_are_dead_lettered_and_the_network_goes_on(net: LocalNetwork) -> None:
    net.start_services()
    client = Client(net.settings, net.bootstrap, "alice", net.passphrase)
    raw = Producer({**client_config(net.bootstrap), "compression.type": "lz4",
                    "message.max.bytes": 2 * BIG})
    verdicts = _topic(net, "TaskVerified")
    assignments = _topic(net, "TaskAssigned")

    # No node yet: the two tasks below wait in the allocator's queue, escrowed (once the
    # ledger has read alice's mint: it reads mints and submissions on separate topics).
    deadline = time.monotonic() + 60
    while "user:alice" not in {decode(m.value()).fields["account"] for m in
                               read_all(net.bootstrap, _topic(net, "LedgerEntryPosted"))}:
        net.check_alive()
        assert time.monotonic() < deadline, "alice's mint was not posted"
        time.sleep(0.2)
    paid_for = client.submit(client.quote("heat2d", {"grid": "8", "steps": "1"}))
    q = client.quote("heat2d", {"grid": "8", "steps": "1"})
    impossible = client.submit(dataclasses.replace(q, quorum=1))  # 1 of 3: not a majority
    wait_for_transactions(net.settings, net.bootstrap, [f"escrow/{paid_for}",
                                                        f"escrow/{impossible}"])

    # 1. 5 MB that the broker takes.
    big = b"\xc3\x01" + bytes(8) + bytes(BIG)
    raw.produce(verdicts, key=b"big", value=big, partition=0)

    # 2. An over-budget verdict for the escrowed task, signed with the verifier's key:
    #    4 agreeing replicas x 10**6 units against 3 x the quoted units.
    over = net.signer("verifier").sign(with_fields(
        sample_event("TaskVerified"), task_id=paid_for,
        contributions=[{"node_id": f"n{i}", "compute_units": 10**6, "agreed": True}
                       for i in range(4)]).with_envelope(occurred_at=now_ms()))
    raw.produce(verdicts, key=paid_for.encode(), value=encode(over),
                partition=partition_for(paid_for, TASK_PARTITIONS))

    # 3. A verdict whose text Postgres cannot store.
    nul_task = f"task-nul-{uuid.uuid4().hex[:8]}"
    nul = net.signer("verifier").sign(with_fields(
        sample_event("TaskFailed"), task_id=nul_task, reason="no_quorum",
        detail="before\x00after").with_envelope(occurred_at=now_ms()))
    raw.produce(verdicts, key=nul_task.encode(), value=encode(nul),
                partition=partition_for(nul_task, TASK_PARTITIONS))

    # 4. An assignment of the task whose quorum no tally can judge.
    ghost = "ghost-node"
    at = now_ms()
    assigned = net.signer("allocator").sign(with_fields(
        sample_event("TaskAssigned"), task_id=impossible, node_id=ghost, replica_index=0,
        attempt=0, commit_deadline=at + 20_000, reveal_deadline=at + 30_000,
        task_deadline=at + 600_000, payload=None, payload_ref=None,
    ).with_envelope(occurred_at=at))
    raw.produce(assignments, key=ghost.encode(), value=encode(assigned),
                partition=partition_for(ghost, topic_for("TaskAssigned").partitions))
    assert raw.flush(30) == 0

    # Each is dead-lettered with its reason, by every service that reads it.
    digest = hashlib.sha256(big).hexdigest()
    letters = _wait_for(net, "the 5 MB record, by the ledger, the projector and the processors",
                        lambda ls: {x.fields["envelope"]["producer_id"] for x in ls
                                    if x.fields["original_sha256"] == digest}
                        >= {"ledger-processor", "projector", "processors"})
    for x in [e.fields for e in letters if e.fields["original_sha256"] == digest]:
        assert (x["source_topic"], x["source_partition"]) == (verdicts, 0)
        assert x["original_size"] == len(big) + len(b"big")
        assert x["value"] == b"" and x["error"] == "UnknownSchema" and x["reason"]

    letters = _wait_for(net, "the over-budget verdict",
                        lambda ls: _from(ls, verdicts, "unpayable-verdict"))
    (x,) = _from(letters, verdicts, "unpayable-verdict")
    assert "exceed" in x["reason"] and decode(x["value"]).event_id == over.event_id

    letters = _wait_for(net, "the NUL text", lambda ls: _from(ls, verdicts, "NUL"))
    x = _from(letters, verdicts, "NUL")[0]
    assert x["error"] == "DataError" and decode(x["value"]).event_id == nul.event_id

    letters = _wait_for(net, "the impossible quorum",
                        lambda ls: _from(ls, assignments, "invalid-quorum"))
    (x,) = _from(letters, assignments, "invalid-quorum")
    assert "quorum 1 of 3" in x["reason"]
    assert decode(x["value"]).event_id == assigned.event_id
    # ... and its task failed, so its escrow comes back.
    wait_for_transactions(net.settings, net.bootstrap, [f"refund/{impossible}"])
    net.check_alive()

    # The runners counted each letter they wrote, by a short code (destra_dead_letters_total).
    urls = {e["name"]: e["url"] for e in registered(net.settings.home)}
    runners = ("ledger-processor", "processors")

    def counted() -> bool:
        written = Counter(x.fields["envelope"]["producer_id"] for x in _letters(net))
        return all(total(scrape(urls[name]), "destra_dead_letters_total") == written[name]
                   for name in runners)

    eventually(counted, timeout=30, interval=0.5)
    ledger, processors = (scrape(urls[name]) for name in runners)
    assert total(ledger, "destra_dead_letters_total", reason="undecodable") == 1  # 5 MB
    assert total(ledger, "destra_dead_letters_total", reason="unpayable-verdict") == 1
    assert total(processors, "destra_dead_letters_total", reason="invalid-quorum") == 1

    # A restart does not replay any of them into a crash, nor read them again.
    seen = Counter(_source(x) for x in _letters(net))
    for name, module in (("ledger-processor", "ledger.processor"),
                         ("projector", "ledger.service"), ("processors", "destra.processors")):
        net.kill(name, signal.SIGKILL)
        net.spawn(name, "-m", module)

    # A good task after them all is verified and paid.
    nodes = ["a", "b", "c"]
    for n in nodes:
        net.start_node(n, operator=f"op-{n}")
    net.wait_registered(nodes)
    watch = client.watch()
    good = client.submit(client.quote("heat2d", {"grid": "8", "steps": "1"}))
    done = client.wait([good], watch=watch, timeout_s=180)
    assert done[good].state == "verified", done[good].as_dict()
    wait_for_transactions(net.settings, net.bootstrap, [f"settle/{good}"])
    watch.close()
    client.close()
    net.check_alive()
    # The over-budget verdict paid nobody, then or after the restart.
    credited = {decode(m.value()).fields["account"]
                for m in read_all(net.bootstrap, _topic(net, "LedgerEntryPosted"))}
    assert not credited & {f"node:n{i}" for i in range(4)}
    again = Counter(_source(x) for x in _letters(net))
    assert {k: again[k] for k in seen} == dict(seen), "a restart read a poison record again"


def _source(letter: Event) -> tuple[str, str, int, int]:
    f = letter.fields
    return (f["envelope"]["producer_id"], f["source_topic"], f["source_partition"],
            f["source_offset"])
