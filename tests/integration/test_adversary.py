"""The adversary suite: real attacker processes against one live network.

Each case runs ``python -m tests.adversary`` (``tests/adversary.py``) as its own process,
with its own keys and the Kafka credentials of a node (``mallory``, joined as `destra
node join` does) or an account (``eve``, made as `destra account create` does), and
writes straight to the broker. Each asserts that the broker refused the write (its
exact error code), or that the network's services dead-lettered it with the reason;
and that no balance, verdict, penalty or assignment changed.

One network for the module: its services, one honest node ``n1``, and one confidential
task of ``alice`` run to its verdict first, whose signed events the replays copy.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from destra import keystore
from destra.client import Client
from destra.network import LocalNetwork
from destra.settings import Settings
from infra.postgres import create_database
from infra.quotas import DEFAULT
from ledger.book import user
from ledger.decider import node_wallet
from ledger.projection import LedgerProjection
from ledger.service import project_to_now
from schemas import Event, decode
from streams import security
from streams.admin import ensure_topics
from streams.authority import ensure_genesis
from streams.consumer import dead_letter_topic
from streams.reading import read_all
from streams.topics import inbox_topic, partition_for, topic_for
from tests.support import TEARDOWN_GRACE_S, eventually

pytestmark = pytest.mark.integration

FUNDS = 10**12
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Live:
    """The shared network, its honest task, and where the attackers' credentials are."""

    net: LocalNetwork
    task: str
    mallory: Path
    eve: Path
    alice: Path
    n1: Path
    counter: int = 0

    @property
    def prefix(self) -> str:
        return self.net.settings.topic_prefix

    def topic(self, event: str) -> str:
        return topic_for(event).name(self.prefix)

    def attack(self, credentials: Path, case: str, **spec: Any) -> dict[str, Any]:
        """Run one attacker process; what it reports."""
        spec = {"case": case, "bootstrap": self.net.bootstrap, "prefix": self.prefix,
                "credentials": str(credentials), **spec}
        done = subprocess.run([sys.executable, "-m", "tests.adversary", json.dumps(spec)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={**self.net.env()})
        assert done.returncode == 0, done.stderr[-3000:]
        out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return out

    def inbox(self, node: str) -> str:
        """A node's inbox topic."""
        name = inbox_topic(self.prefix, node)
        assert name is not None
        return name

    def inbox_events(self, node: str) -> list[Event]:
        """What a node's inbox holds, read as the operator."""
        return [decode(m.value()) for m in read_all(self.net.bootstrap, self.inbox(node))]

    def copies(self, event: str, where: str | None = None) -> list[dict[str, Any]]:
        """The records of this network's ``event`` (of the honest task), as bytes to copy."""
        out = []
        for m in read_all(self.net.bootstrap, self.topic(event)):
            e = decode(m.value())
            if e.name == event and e.fields.get("task_id", self.task) == (where or self.task):
                out.append({"topic": m.topic(), "partition": m.partition(),
                            "key": (m.key() or b"").hex(), "value": m.value().hex()})
        assert out, event
        return out

    def genuine(self, event: str) -> set[str]:
        """Ids of the ``event``s on its topic that the network's own keys signed."""
        return {e.event_id for e in self.net.events(event) if self.net.genesis.check(e) is None}

    def balances(self) -> dict[str, int]:
        """Every balance, rebuilt from the ledger's entries (balanced, checked)."""
        self.counter += 1
        projection = LedgerProjection(self.net.pg_dsn, f"adv{random.randrange(1 << 30):x}")
        try:
            project_to_now(self.net.settings, self.net.bootstrap, projection)
            projection.check()
            return dict(projection.balances())
        finally:
            projection.close()

    def state(self) -> dict[str, Any]:
        """What no attacker may change: balances, verdicts, assignments, penalties."""
        return {"balances": self.balances(),
                "verdicts": self.genuine("TaskVerified") | self.genuine("TaskFailed"),
                "assignments": self.genuine("TaskAssigned"),
                "penalties": self.genuine("NodePenalized")}

    def letters(self) -> dict[tuple[str, int, int], dict[str, str]]:
        """Dead letters by the record they refer to: reader -> reason."""
        out: dict[tuple[str, int, int], dict[str, str]] = {}
        for m in read_all(self.net.bootstrap, dead_letter_topic(self.net.settings)):
            f = decode(m.value()).fields
            where = (f["source_topic"], f["source_partition"], f["source_offset"])
            out.setdefault(where, {})[decode(m.value()).producer_id] = f["reason"]
        return out

    def dead_lettered(self, results: list[dict[str, Any]], readers: set[str],
                      reason: str) -> None:
        """Until each written record is dead-lettered by every one of ``readers`` with a
        reason starting ``reason``."""
        assert all(r["error"] is None for r in results), results
        wanted = [(r["topic"], r["partition"], r["offset"]) for r in results]

        def done() -> bool:
            letters = self.letters()
            self.net.check_alive()
            return all(readers <= set(letters.get(w, {})) for w in wanted)

        try:
            eventually(done, timeout=30, interval=0.5)
        finally:
            letters = self.letters()
            print({w: letters.get(w) for w in wanted})
        for w in wanted:
            for reader in readers:
                assert letters[w][reader].startswith(reason), (w, reader, letters[w])


@pytest.fixture(scope="module")
def live(kafka: str, pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    admin = security.current()
    if not admin.secure:
        pytest.skip("the session broker is plaintext (DESTRA_KAFKA_INSECURE)")
    base = tmp_path_factory.mktemp("adversary")
    prefix = f"t{random.randint(0, 1 << 30):x}."
    settings = Settings(kafka_bootstrap=kafka, topic_prefix=prefix, producer_id="adversary",
                        genesis_file=base / "genesis.json", service_key_dir=base / "services",
                        home=base / "home")
    ensure_genesis(settings.genesis_path, settings.service_keys)
    ensure_topics(kafka, prefix, replication_factor=1, min_insync_replicas=1)
    net = LocalNetwork(settings, kafka, create_database(pg_dsn), base / "logs", env_extra={
        "DESTRA_COMMIT_WINDOW_MS": "15000", "DESTRA_REVEAL_WINDOW_MS": "10000"})
    try:
        net.mint("alice", "bob", "eve", amount_micro=FUNDS)
        net.join_node("mallory")  # the attacking node: credentials only, it runs nothing
        net.start_services()
        net.start_node("n1", slots=1)
        net.wait_registered(["n1"])
        # The honest task: confidential (a private prefix), one replica, to its verdict.
        client = Client(net.settings, net.bootstrap, "alice", net.passphrase)
        watch = client.watch()
        task = client.submit(client.quote("sha256-search", {
            "count": "200", "prefix": "00ff", "start": "1"}, replicas=1, quorum=1))
        done = client.wait([task], watch=watch, timeout_s=120)
        watch.close()
        client.close()
        assert done[task].state == "verified", done[task]
        live = Live(net, task, keystore.node_credentials(settings, "mallory"),
                    keystore.account_credentials(settings, "eve"),
                    keystore.account_credentials(settings, "alice"),
                    keystore.node_credentials(settings, "n1"))
        # The verdict has been paid before any attack, so every later balance compares.
        eventually(lambda: live.balances().get(node_wallet("n1"), 0) > 0, timeout=60,
                   interval=0.5)
        yield live
    finally:
        net.stop(timeout_s=TEARDOWN_GRACE_S)


@pytest.fixture
def unchanged(live: Live) -> Iterator[dict[str, Any]]:
    """The network's state before a case; after it, the same."""
    before = live.state()
    yield before
    live.net.check_alive()
    assert live.state() == before


def _codes(out: dict[str, Any]) -> list[str | None]:
    return [r["error"] for r in out["results"]]


# ------------------------------------------------------------------ refused by the broker

SERVICE_EVENTS: list[tuple[str, dict[str, Any], str]] = [
    ("TokensMinted", {"account": "mallory", "amount_micro": 10**12}, "treasury"),
    ("TaskVerified", {"task_id": "task-x", "contributions": [
        {"node_id": "mallory", "compute_units": 10**6, "agreed": True}]}, "verifier"),
    ("NodePenalized", {"node_id": "n1", "task_id": "task-x", "slash_micro": 10**6},
     "verifier"),
    ("LedgerEntryPosted", {"account": user("eve"), "amount_micro": 10**12, "kind": "mint",
                           "transaction_id": "mint/x"}, "ledger"),
    ("TaskFailed", {"task_id": "task-x"}, "verifier"),
]


@pytest.mark.parametrize("who", ["mallory", "eve"])
def test_minting_and_forged_verdicts_penalties_and_entries_are_refused_by_the_broker(
        live: Live, unchanged: dict[str, Any], who: str) -> None:
    credentials = live.mallory if who == "mallory" else live.eve
    out = live.attack(credentials, "forge", events=[
        {"event": name, "fields": fields, "sign_as": role}
        for name, fields, role in SERVICE_EVENTS])
    assert _codes(out) == ["TOPIC_AUTHORIZATION_FAILED"] * len(SERVICE_EVENTS)


def test_a_node_writes_no_assignment_grant_submission_or_dead_letter(
        live: Live, unchanged: dict[str, Any]) -> None:
    out = live.attack(live.mallory, "forge", events=[
        {"event": "TaskAssigned", "fields": {"task_id": live.task, "node_id": "mallory"},
         "sign_as": "allocator"},
        {"event": "DataKeyGranted", "fields": {"task_id": live.task, "node_id": "mallory"},
         "sign_as": "alice"},
        {"event": "TaskSubmitted", "fields": {"submitter_id": "mallory"},
         "signing_key_field": "signing_key", "sign_as": "mallory"},
        {"event": "DeadLettered", "fields": {"source_topic": live.topic("TaskVerified")}},
        {"event": "VoteCast", "sign_as": "mallory"},
        {"event": "PriceUpdated", "fields": {"price_per_unit_micro": 1}, "sign_as": "pricing"},
    ])
    assert _codes(out) == ["TOPIC_AUTHORIZATION_FAILED"] * 6
    # The services' state topic: a forged snapshot would be restored on a restart.
    replayed = live.attack(live.mallory, "replay", records=[
        {"topic": live.prefix + "processors.state", "partition": 0, "key": b"x".hex(),
         "value": b"forged".hex()}])
    assert _codes(replayed) == ["TOPIC_AUTHORIZATION_FAILED"]
    # Nor another node's inbox, nor its own: a forged or copied assignment never reaches
    # a node that way.
    assignment = live.copies("TaskAssigned")[0]
    replayed = live.attack(live.mallory, "replay", records=[
        {**assignment, "topic": live.inbox(node), "partition": 0}
        for node in ("n1", "mallory")])
    assert _codes(replayed) == ["TOPIC_AUTHORIZATION_FAILED"] * 2


def test_service_events_copied_byte_for_byte_are_refused_by_the_broker(
        live: Live, unchanged: dict[str, Any]) -> None:
    copies = live.copies("TaskVerified") + live.copies("LedgerEntryPosted")[:2]
    out = live.attack(live.eve, "replay", records=copies)
    assert _codes(out) == ["TOPIC_AUTHORIZATION_FAILED"] * len(copies)


def test_reading_what_its_principal_may_not_read_is_refused(live: Live) -> None:
    group = f"{live.prefix}node-mallory"
    for event in ("LedgerEntryPosted", "TaskSubmitted", "ResultRevealed"):
        out = live.attack(live.mallory, "read", topic=live.topic(event), group=group,
                          seconds=10)
        assert out["error"] == "TOPIC_AUTHORIZATION_FAILED", (event, out)
        assert out["records"] == 0
    # Another node's consumer group, on its own inbox.
    out = live.attack(live.mallory, "read", topic=live.inbox("mallory"),
                      group=f"{live.prefix}node-n1", seconds=10)
    assert out["error"] == "GROUP_AUTHORIZATION_FAILED", out


def test_another_nodes_grants_stay_sealed_to_it(live: Live) -> None:
    """A submitter reads the whole assignments topic (its client grants data keys to the
    nodes its tasks are assigned to); what it finds there of others' is of no use: each
    grant is sealed to its node's X25519 key."""
    out = live.attack(live.eve, "read", topic=live.topic("TaskAssigned"),
                      partition=partition_for("n1", topic_for("TaskAssigned").partitions),
                      group="watch-eve", seconds=5)
    assert out["error"] is None
    assert out["grants_sealed"] >= 1 and out["grants_opened"] == 0, out


def test_a_node_cannot_read_another_nodes_assignments(live: Live) -> None:
    """A node reads its own inbox topic only: neither the assignments topic, where every
    node's work is, nor another node's inbox (Kafka's ACLs are per topic)."""
    group = f"{live.prefix}node-mallory"
    for topic, partition in (
            (live.topic("TaskAssigned"),
             partition_for("n1", topic_for("TaskAssigned").partitions)),
            (live.topic("TaskAssigned"), None),
            (live.inbox("n1"), 0)):
        out = live.attack(live.mallory, "read", topic=topic, partition=partition,
                          group=group, seconds=5)
        assert out["error"] == "TOPIC_AUTHORIZATION_FAILED", (topic, out)
        assert out["records"] == 0
    # Its own inbox it may read (empty: it was never assigned anything).
    out = live.attack(live.mallory, "read", topic=live.inbox("mallory"), partition=0,
                      group=group, seconds=3)
    assert out["error"] is None and out["records"] == 0, out
    # n1's inbox holds what n1 was assigned, the same records as the assignments topic.
    assert {e.event_id for e in live.inbox_events("n1")} >= live.genuine("TaskAssigned")


def test_an_oversized_record_is_refused_by_the_broker(
        live: Live, unchanged: dict[str, Any]) -> None:
    out = live.attack(live.mallory, "oversized", topic=live.topic("NodeHeartbeat"),
                      size=2 * 1024 * 1024)
    assert _codes(out) == ["MSG_SIZE_TOO_LARGE"]


# ------------------------------------------------------------------ dead-lettered, with reason


def test_a_forged_assignment_on_a_topic_a_submitter_may_write_is_dead_lettered(
        live: Live, unchanged: dict[str, Any]) -> None:
    out = live.attack(live.eve, "forge", events=[
        {"event": "TaskAssigned", "fields": {"task_id": "task-forged", "node_id": "n1"},
         "sign_as": "allocator"}])
    live.dead_lettered(out["results"], {"processors", "projector"},
                       "bad-signature: TaskAssigned")


@pytest.mark.parametrize("who,events", [
    # The node's own signed commit and reveal, written again with its own credentials.
    ("n1", ("ResultCommitted", "ResultRevealed")),
    # The submitter's own grant, copied byte for byte.
    ("alice", ("DataKeyGranted",)),
    # The allocator's assignment, copied by a submitter (it may write that topic).
    ("eve", ("TaskAssigned",)),
])
def test_replayed_signed_events_are_dead_lettered(
        live: Live, unchanged: dict[str, Any], who: str, events: tuple[str, ...]) -> None:
    credentials = {"n1": live.n1, "alice": live.alice, "eve": live.eve}[who]
    out = live.attack(credentials, "replay",
                      records=[c for e in events for c in live.copies(e)])
    live.dead_lettered(out["results"], {"processors"}, "task_closed")


def test_a_grant_for_someone_elses_task_is_dead_lettered(
        live: Live, unchanged: dict[str, Any]) -> None:
    out = live.attack(live.eve, "forge", events=[
        {"event": "DataKeyGranted", "fields": {"task_id": live.task, "node_id": "mallory"},
         "sign_as": "eve"}])
    live.dead_lettered(out["results"], {"processors"}, "task_closed")


def _refused_submission(live: Live, account: str, task: str) -> Event:
    # A genuine quote (prices are public), so only the signer can be the reason.
    client = Client(live.net.settings, live.net.bootstrap, "alice", live.net.passphrase)
    try:
        q = client.quote("matmul", {"n": "16", "repeats": "1", "seed": "1"}, replicas=1,
                         quorum=1).quote
    finally:
        client.close()
    out = live.attack(live.eve, "forge", events=[
        {"event": "TaskSubmitted", "fields": {
            "task_id": task, "submitter_id": account, "workload": "matmul",
            "params": {"n": "16", "repeats": "1"}, "replicas": 1, "quorum": 1,
            "compute_units": q.compute_units, "quote_id": q.quote_id,
            "quoted_price_micro": q.price_micro, "max_price_micro": q.price_micro,
            "quote_expires_at": q.expires_at, "tier": str(q.tier), "payload": None},
         "signing_key_field": "signing_key", "sign_as": account}])
    assert _codes(out) == [None]
    failed: list[Event] = []

    def decided() -> bool:
        failed[:] = [e for e in live.net.events("TaskFailed") if e.fields["task_id"] == task]
        return bool(failed) or any(e.fields.get("task_id") == task
                                   for e in live.net.events("LedgerEntryPosted"))

    eventually(decided, timeout=60, interval=0.5)
    assert failed, f"{task} was escrowed"
    return failed[0]


def test_submitting_as_another_account_is_refused(live: Live) -> None:
    before = live.state()
    failed = _refused_submission(live, "alice", "task-as-alice")
    assert failed.fields["reason"] == "wrong-key", failed
    after = live.state()
    assert after["balances"] == before["balances"]
    assert after["assignments"] == before["assignments"]
    assert after["penalties"] == before["penalties"]


def test_submitting_as_an_account_that_never_submitted_is_refused(live: Live) -> None:
    # Bound by its signed registration (AccountRegistered), not by its first submitter.
    before = live.state()
    _refused_submission(live, "bob", "task-as-bob")
    assert live.state()["balances"] == before["balances"]


# ------------------------------------------------------------------ quotas


def test_a_flood_is_throttled_to_the_quota(live: Live) -> None:
    """A node writing as fast as it can to a topic it may write is held by the broker to
    the default producer quota (``infra.quotas.DEFAULT``). Kafka measures a rate over its
    quota window (11 samples of 1 s), so a client starting cold may spend up to a
    window's worth of quota in a burst before its responses are delayed: over ``T``
    seconds it gets at most about ``quota * (T + 11)`` bytes. Unthrottled, this client
    writes well over 100 MB in 4 s on loopback."""
    out = live.attack(live.mallory, "flood", topic=live.topic("NodeHeartbeat"),
                      size=600 * 1024, seconds=4.0)
    assert out["errors"] == [], out
    quota = DEFAULT.producer_byte_rate
    assert out["throttle_ms_max"] > 0, out  # the broker said it throttled this client
    assert out["acked_bytes"] < 1.25 * quota * (out["seconds"] + 11), (quota, out)
    assert out["acked_bytes"] > 0.25 * quota * out["seconds"], (quota, out)  # not refused
