"""The task and node views on real Kafka and Postgres: any arrival order, each event once.

A task's events are produced in three rounds, each folded by ``project_views``
before the next is sent, so the views see them out of order on purpose:
assignments and commits before the submission, a verdict before a reveal and
before one of the assignments it judges.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

import psycopg
import pytest

from destra.settings import Settings
from ledger.book import (
    Share,
    escrow_tx,
    mint_tx,
    refund_tx,
    settle_tx,
    slash_tx,
    stake_tx,
    user,
)
from ledger.decider import node_wallet
from ledger.events import entry_events
from ledger.projection import LedgerProjection
from ledger.service import project_to_now
from ledger.views import ViewProjection, view_topics
from schemas import Event
from schemas.samples import SAMPLE_TIME_MS, sample_event
from streams.consumer import EventConsumer
from streams.producer import EventProducer
from tests.support import genesis_env, service_signed

pytestmark = pytest.mark.integration

T0 = SAMPLE_TIME_MS
FEE_BPS = 500
DIGEST = bytes.fromhex("ab" * 32)


def ev(name: str, at: int, **fields: Any) -> Event:
    """A valid event of ``name`` at time ``at`` with some fields changed."""
    return sample_event(name, producer_id="test-views", occurred_at=at).replace(**fields)


def send(network: Settings, kafka: str, events: list[Event]) -> None:
    with EventProducer(network, kafka) as producer:
        for e in events:
            producer.send(service_signed(network, e))


def fold(network: Settings, kafka: str, views: ViewProjection) -> int:
    return project_to_now(network, kafka, views, topics=view_topics(network))


def snapshot(pg_dsn: str, schema: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the three views, in a stable order."""
    with psycopg.connect(pg_dsn) as conn:
        return {table: conn.execute(
            f"SELECT * FROM {schema}.{table} ORDER BY 1, 2, 3").fetchall()
            for table in ("task_view", "task_replica_view", "node_view")}


def payouts(tx: Any) -> dict[str, int]:
    """Payout amounts to node wallets in a settlement, by node id."""
    return {p.account.removeprefix("node:"): p.amount_micro for p in tx.postings
            if p.kind == "payout" and p.account.startswith("node:")}


def test_views_fold_a_lifecycle_in_any_order_exactly_once(
    network: Settings, kafka: str, pg_dsn: str
) -> None:
    sfx = uuid.uuid4().hex[:8]
    ok, bad, rejected = f"task-ok-{sfx}", f"task-bad-{sfx}", f"task-rej-{sfx}"
    n1, n2, n3 = f"n1-{sfx}", f"n2-{sfx}", f"n3-{sfx}"
    alice = f"alice-{sfx}"
    price = 3_600_000
    submitted = dict(submitter_id=alice, replicas=3, quorum=2, compute_units=1_200,
                     quoted_price_micro=price, workload="mlp-digits",
                     params={"epochs": "2", "seed": "7"})
    settle = settle_tx(f"settle/{ok}", ok, user(alice), price, 3_600,
                       [Share(node_wallet(n1), 1_200), Share(node_wallet(n2), 1_200)], FEE_BPS)
    slash = slash_tx(f"slash/{sfx}", n3, ok, 5_000_000, 250_000_000)
    refund = refund_tx(f"refund/{bad}", bad, user(alice), price)
    schema = f"views_{sfx}"
    views = ViewProjection(pg_dsn, schema)
    try:
        # Round 1: work on a task the views have not seen submitted, a penalty for a
        # node not yet assigned, node registrations and heartbeats (the older one last).
        send(network, kafka, [
            *(ev("NodeRegistered", T0, node_id=n, operator_id=f"op-{n}") for n in (n1, n2, n3)),
            ev("NodeHeartbeat", T0 + 5_000, node_id=n1, load_permille=300, free_slots=1),
            ev("NodeHeartbeat", T0 + 1_000, node_id=n1, load_permille=900, free_slots=0),
            ev("TaskAssigned", T0 + 2_000, task_id=ok, node_id=n1, replica_index=0),
            ev("TaskAssigned", T0 + 2_100, task_id=ok, node_id=n2, replica_index=1),
            ev("DataKeyGranted", T0 + 2_200, task_id=ok, node_id=n1),  # not folded
            ev("ResultCommitted", T0 + 3_000, task_id=ok, node_id=n1),
            ev("NodePenalized", T0 + 9_500, node_id=n3, task_id=ok, reason="dissent",
               slash_micro=5_000_000),
        ])
        assert fold(network, kafka, views) == 9  # DataKeyGranted is not folded
        task = views.task(ok)
        assert task is not None
        assert (task["status"], task["submitted_at"], task["assigned_at"]) == (
            "committing", None, T0 + 2_000)
        assert (task["assignments"], task["commits"], task["reveals"]) == (2, 1, 0)

        # Round 2: the submission arrives late (status must not fall back), then the
        # rest of the lifecycle; a second task fails and is refunded, a third is
        # rejected by the ledger before any escrow.
        send(network, kafka, [
            ev("TaskSubmitted", T0, task_id=ok, **submitted),
            *entry_events(escrow_tx(f"escrow/{ok}", ok, user(alice), price, 10**9), "t"),
            ev("RevealOpened", T0 + 4_000, task_id=ok, node_id=n1),
            ev("ResultCommitted", T0 + 3_500, task_id=ok, node_id=n2),
            ev("ResultRevealed", T0 + 5_000, task_id=ok, node_id=n1, runtime_ms=48_210),
            ev("TaskVerified", T0 + 9_000, task_id=ok, digest=DIGEST, contributions=[
                {"node_id": n1, "compute_units": 1_200, "agreed": True},
                {"node_id": n2, "compute_units": 1_200, "agreed": True},
                {"node_id": n3, "compute_units": 0, "agreed": False}]),
            *entry_events(settle, "t"),
            *entry_events(stake_tx(f"stake/{n3}", n3, user(f"op-{n3}"), 250_000_000,
                                   10**9), "t"),
            *entry_events(slash, "t"),
            ev("TaskSubmitted", T0 + 100, task_id=bad, **submitted),
            *entry_events(escrow_tx(f"escrow/{bad}", bad, user(alice), price, 10**9), "t"),
            ev("TaskAssigned", T0 + 200, task_id=bad, node_id=n1, replica_index=0),
            ev("TaskFailed", T0 + 700, task_id=bad, reason="no-quorum",
               detail="1 of 3 replicas revealed"),
            *entry_events(refund, "t"),
            ev("TaskSubmitted", T0 + 200, task_id=rejected, **submitted),
            ev("TaskFailed", T0 + 250, task_id=rejected, reason="insufficient-funds",
               detail="no tokens"),
        ])
        fold(network, kafka, views)

        # Round 3: a reveal after the verdict, an assignment the verdict already judged,
        # a repeated assignment and a resubmission of the same id (both ignored).
        send(network, kafka, [
            ev("ResultRevealed", T0 + 6_000, task_id=ok, node_id=n2, runtime_ms=50_000),
            ev("TaskAssigned", T0 + 2_050, task_id=ok, node_id=n3, replica_index=2),
            ev("TaskAssigned", T0 + 2_000, task_id=ok, node_id=n1, replica_index=0),
            ev("TaskSubmitted", T0 + 99_000, task_id=ok, **{**submitted,
                                                             "quoted_price_micro": 1}),
        ])
        assert fold(network, kafka, views) == 4

        task = views.task(ok)
        assert task is not None
        paid = payouts(settle)
        assert set(paid) == {n1, n2}
        assert {k: task[k] for k in (
            "status", "submitter_id", "workload", "params", "replicas", "quorum",
            "compute_units", "price_micro", "tier", "submitted_at", "assigned_at",
            "verified_at", "digest", "failure_reason", "assignments", "commits", "reveals",
            "paid_micro", "refunded_micro")} == {
            "status": "verified", "submitter_id": alice, "workload": "mlp-digits",
            "params": {"epochs": "2", "seed": "7"}, "replicas": 3, "quorum": 2,
            "compute_units": 1_200, "price_micro": price, "tier": "consumer",
            "submitted_at": T0, "assigned_at": T0 + 2_000, "verified_at": T0 + 9_000,
            "digest": DIGEST.hex(), "failure_reason": None, "assignments": 3, "commits": 2,
            "reveals": 2, "paid_micro": sum(paid.values()),
            # Gross pay is 2/3 of the escrow; the third replica's share goes back.
            "refunded_micro": price - price * 2_400 // 3_600,
        }
        replicas = {r["node_id"]: r for r in task["replica_rows"]}
        assert [r["node_id"] for r in task["replica_rows"]] == [n1, n2, n3]  # by index
        assert replicas[n1] == {
            "node_id": n1, "attempt": 0, "replica_index": 0, "assigned_at": T0 + 2_000,
            "committed_at": T0 + 3_000, "revealed_at": T0 + 5_000, "agreed": True,
            "runtime_ms": 48_210, "penalized_reason": None}
        assert (replicas[n2]["revealed_at"], replicas[n2]["agreed"]) == (T0 + 6_000, True)
        # Judged and penalized before its assignment was read: both kept.
        assert (replicas[n3]["agreed"], replicas[n3]["penalized_reason"],
                replicas[n3]["committed_at"]) == (False, "dissent", None)

        failed = views.task(bad)
        assert failed is not None
        assert (failed["status"], failed["failure_reason"], failed["failure_detail"],
                failed["verified_at"], failed["refunded_micro"], failed["paid_micro"]) == (
            "failed", "no-quorum", "1 of 3 replicas revealed", T0 + 700, price, 0)
        rejection = views.task(rejected)
        assert rejection is not None
        assert (rejection["status"], rejection["failure_reason"],
                rejection["refunded_micro"]) == ("failed", "insufficient-funds", 0)
        assert views.task(f"task-none-{sfx}") is None

        assert [t["task_id"] for t in views.tasks()] == [rejected, bad, ok]  # newest first
        assert [t["task_id"] for t in views.tasks(status="failed", limit=1)] == [rejected]
        assert views.tasks(status="escrowed") == []

        nodes = {n["node_id"]: n for n in views.nodes()}
        assert {n: (v["tasks_assigned"], v["tasks_agreed"], v["tasks_dissented"],
                    v["penalties"], v["earned_micro"], v["slashed_micro"])
                for n, v in nodes.items()} == {
            n1: (2, 1, 0, 0, paid[n1], 0),
            n2: (1, 1, 0, 0, paid[n2], 0),
            n3: (1, 0, 1, 1, 0, 5_000_000),
        }
        assert (nodes[n1]["operator_id"], nodes[n1]["device_name"], nodes[n1]["tier"],
                nodes[n1]["stake_micro"], nodes[n1]["registered_at"]) == (
            f"op-{n1}", "NVIDIA GeForce RTX 4090", "consumer", 250_000_000, T0)
        # The older heartbeat, read last, did not overwrite the newer one.
        assert (nodes[n1]["last_heartbeat_at"], nodes[n1]["load_permille"],
                nodes[n1]["free_slots"]) == (T0 + 5_000, 300, 1)

        # Nothing is applied twice: not by a restarted projector resuming from the
        # stored offsets, nor by the same records handed to apply() again.
        before = snapshot(pg_dsn, schema)
        assert fold(network, kafka, views) == 0
        with EventConsumer(network, kafka, f"g-{uuid.uuid4()}", view_topics(network)) as c:
            everything = list(c.stream(idle_timeout_s=3))
        assert len(everything) == 39  # 10 + 25 + 4 records, DataKeyGranted included
        assert views.apply(everything) == 0
        assert snapshot(pg_dsn, schema) == before

        # A fresh schema rebuilt from offset 0 in one go gives the same views.
        rebuilt = ViewProjection(pg_dsn, f"{schema}_replay")
        try:
            fold(network, kafka, rebuilt)
            assert snapshot(pg_dsn, f"{schema}_replay") == before
        finally:
            rebuilt.close()
    finally:
        views.close()

    # The CLI reads the same views.
    env = dict(os.environ, DESTRA_KAFKA_BOOTSTRAP=kafka, DESTRA_PG_DSN=pg_dsn,
               DESTRA_TOPIC_PREFIX=network.topic_prefix, **genesis_env(network))

    def destra(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "destra", *args, "--schema", schema],
                              env=env, text=True, capture_output=True, timeout=120,
                              check=False)

    shown = destra("status", ok, "--json")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert (status["status"], status["digest"], status["paid_micro"],
            len(status["replica_rows"])) == ("verified", DIGEST.hex(), sum(paid.values()), 3)
    text = destra("status", bad)
    assert text.returncode == 0, text.stderr
    assert "failed: no-quorum: 1 of 3 replicas revealed" in text.stdout
    missing = destra("status", f"task-none-{sfx}")
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: no task task-none-")
    listed = destra("tasks", "--json", "--status", "failed")
    assert [t["task_id"] for t in json.loads(listed.stdout)] == [rejected, bad]
    assert destra("tasks", "--status", "nonsense").returncode == 2
    shown_nodes = {n["node_id"]: n for n in json.loads(destra("nodes", "--json").stdout)}
    assert (shown_nodes[n3]["slashed_micro"], shown_nodes[n3]["penalties"],
            shown_nodes[n1]["earned_micro"]) == (5_000_000, 1, paid[n1])
    assert n1 in destra("nodes").stdout


def test_the_projector_process_folds_the_ledger_and_the_views(
    network: Settings, kafka: str, pg_dsn: str
) -> None:
    sfx = uuid.uuid4().hex[:8]
    task_id, node = f"task-{sfx}", f"node-{sfx}"
    settle = settle_tx(f"settle/{task_id}", task_id, user("bob"), 900, 900,
                       [Share(node_wallet(node), 900)], FEE_BPS)
    send(network, kafka, [
        *entry_events(mint_tx(f"mint/{sfx}", user("bob"), 900), "t"),
        ev("TaskSubmitted", T0, task_id=task_id, submitter_id="bob", replicas=1, quorum=1,
           compute_units=900, quoted_price_micro=900),
        *entry_events(escrow_tx(f"escrow/{task_id}", task_id, user("bob"), 900, 900), "t"),
        ev("TaskVerified", T0 + 10, task_id=task_id, digest=DIGEST, quorum=1, contributions=[
            {"node_id": node, "compute_units": 900, "agreed": True}]),
        *entry_events(settle, "t"),
    ])
    schema = f"proc_{sfx}"
    env = dict(os.environ, DESTRA_KAFKA_BOOTSTRAP=kafka, DESTRA_PG_DSN=pg_dsn,
               DESTRA_TOPIC_PREFIX=network.topic_prefix, **genesis_env(network))
    done = subprocess.run(
        [sys.executable, "-m", "ledger.service", "--schema", schema, "--idle-exit", "3"],
        env=env, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr

    views, ledger = ViewProjection(pg_dsn, schema), LedgerProjection(pg_dsn, schema)
    try:
        task = views.task(task_id)
        assert task is not None
        earned = payouts(settle)[node]
        assert (task["status"], task["paid_micro"]) == ("verified", earned)
        assert [(n["node_id"], n["earned_micro"]) for n in views.nodes()] == [(node, earned)]
        assert ledger.balances()[node_wallet(node)] == earned
        assert ledger.check() == 2 + 2 + len(settle.postings)  # mint, escrow, settlement
    finally:
        views.close()
        ledger.close()
