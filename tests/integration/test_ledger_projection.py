"""The ledger projection on real Kafka and Postgres: exactly once, even when killed."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid

import psycopg
import pytest

from destra.settings import Settings
from ledger.book import Book, Share, escrow_tx, mint_tx, settle_tx, user
from ledger.events import entry_events
from ledger.projection import LedgerProjection
from ledger.service import replay
from streams.producer import EventProducer
from tests.support import genesis_env, service_signer

pytestmark = pytest.mark.integration


def _traffic(n_tasks: int, seed: int) -> tuple[Book, list]:  # type: ignore[type-arg]
    """Mints, escrows and settlements as a real network would post them."""
    rng = random.Random(seed)
    book, txs = Book(), []
    submitters = [user(f"sub-{i}") for i in range(5)]
    for s in submitters:
        txs.append(mint_tx(f"mint-{s}", s, 10**12))
    for t in range(n_tasks):
        payer = rng.choice(submitters)
        price = rng.randint(1_000, 5_000_000)
        txs.append(escrow_tx(f"esc-{t}", f"task-{t}", payer, price, 10**12))
        agreeing = rng.sample([user(f"op-{i}") for i in range(8)], rng.randint(2, 3))
        txs.append(settle_tx(f"set-{t}", f"task-{t}", payer, price, 300,
                             [Share(a, 100) for a in agreeing], fee_bps=500))
    for tx in txs:
        book.apply(tx)
    return book, txs


def _projector(network: Settings, kafka: str, pg_dsn: str, schema: str,
               *args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, DESTRA_KAFKA_BOOTSTRAP=kafka, DESTRA_PG_DSN=pg_dsn,
               DESTRA_TOPIC_PREFIX=network.topic_prefix, **genesis_env(network))
    return subprocess.Popen([sys.executable, "-m", "ledger.service", "--schema", schema, *args],
                            env=env)


def _count(pg_dsn: str, schema: str) -> int:
    try:
        with psycopg.connect(pg_dsn) as conn:
            row = conn.execute(f"SELECT count(*) FROM {schema}.ledger_entries").fetchone()
            return int(row[0]) if row else 0
    except psycopg.errors.UndefinedTable:
        return 0


def test_a_projector_killed_mid_stream_applies_every_entry_exactly_once(
    network: Settings, kafka: str, pg_dsn: str
) -> None:
    expected, txs = _traffic(n_tasks=2500, seed=11)
    events = [e for tx in txs for e in entry_events(tx, "test")]
    with EventProducer(network, kafka, signer=service_signer(network, "ledger")) as producer:
        for event in events:
            producer.send(event)
    schema = f"live_{uuid.uuid4().hex[:8]}"

    # Start the projector and SIGKILL it while it is part-way through.
    first = _projector(network, kafka, pg_dsn, schema)
    deadline = time.monotonic() + 120
    while _count(pg_dsn, schema) < len(events) // 5:
        assert time.monotonic() < deadline, "projector made no progress"
        assert first.poll() is None, "projector exited early"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    at_kill = _count(pg_dsn, schema)
    assert 0 < at_kill < len(events), "the kill must land mid-stream"

    # Restart: it resumes from the offsets stored with the entries.
    second = _projector(network, kafka, pg_dsn, schema, "--idle-exit", "3")
    assert second.wait(180) == 0

    projection = LedgerProjection(pg_dsn, schema)
    try:
        assert projection.check() == len(events)  # each entry once; entries sum to zero
        assert projection.balances() == expected.snapshot()  # to the micro-token
    finally:
        projection.close()

    # Replay from offset 0 into a fresh schema gives the same ledger.
    report = replay(network, kafka, pg_dsn, live_schema=schema)
    assert report.entries == len(events)
    assert report.matches, (report.live_hash, report.replay_hash)


def test_a_redelivered_batch_changes_nothing(network: Settings, kafka: str, pg_dsn: str) -> None:
    from streams.consumer import EventConsumer

    _, txs = _traffic(n_tasks=20, seed=3)
    with EventProducer(network, kafka, signer=service_signer(network, "ledger")) as producer:
        for tx in txs:
            for event in entry_events(tx, "test"):
                producer.send(event)
    topic = network.topic_prefix + "ledger.entries"
    with EventConsumer(network, kafka, f"g-{uuid.uuid4()}", [topic]) as consumer:
        batch = list(consumer.stream(idle_timeout_s=3))
    projection = LedgerProjection(pg_dsn, f"redeliver_{uuid.uuid4().hex[:8]}")
    try:
        assert projection.apply(batch) == len(batch)
        before = projection.content_hash()
        assert projection.apply(batch) == 0  # same offsets again: skipped
        assert projection.content_hash() == before
    finally:
        projection.close()
