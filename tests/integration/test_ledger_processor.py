"""The ledger processor on a real broker: killed mid-stream, it still decides exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest

from destra.settings import Settings
from ledger.decider import LedgerDecider
from ledger.processor import read_past
from ledger.projection import LedgerProjection
from ledger.service import project_to_now
from schemas import decode, new_event
from schemas.samples import sample_event, with_fields
from streams.authority import Genesis
from streams.producer import EventProducer
from streams.reading import end_offsets, read_all
from streams.topics import topic_for
from tests.support import (
    genesis_env,
    registration,
    service_signed,
    service_signer,
    signed_submission,
)

pytestmark = pytest.mark.integration

N = 1500
ESCROWED = N - N // 10  # every tenth comes from a submitter with no funds


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; killed at teardown whatever the test's outcome."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _processor(spawned: list[subprocess.Popen[bytes]], network: Settings, kafka: str,
               *args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, DESTRA_KAFKA_BOOTSTRAP=kafka, DESTRA_TOPIC_PREFIX=network.topic_prefix,
               DESTRA_PRODUCER_ID="ledger",
               # A checkpoint nearly every batch: each restart rebuilds from one.
               DESTRA_LEDGER_CHECKPOINT_S="0.2", **genesis_env(network))
    proc = subprocess.Popen([sys.executable, "-m", "ledger.processor", *args], env=env)
    spawned.append(proc)
    return proc


def _committed(network: Settings, kafka: str, name: str) -> list:  # type: ignore[type-arg]
    topic = network.topic_prefix + ("ledger.entries" if name == "LedgerEntryPosted"
                                    else "tasks.verdicts")
    events = [decode(m.value()) for m in read_all(kafka, topic)]
    return [e for e in events if e.name == name]


def _wait_for(check, proc=None, timeout: float = 180.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        assert proc is None or proc.poll() is None, "processor exited"
        time.sleep(0.05)


def test_a_processor_killed_mid_stream_escrows_and_pays_exactly_once(
    network: Settings, kafka: str, pg_dsn: str, spawned: list[subprocess.Popen[bytes]]
) -> None:
    rich = [f"rich-{i}" for i in range(4)]
    mints = [service_signed(network, new_event("TokensMinted", "faucet", account=a,
                                               amount_micro=10**12, reason="test"))
             for a in rich]
    template = sample_event("TaskSubmitted")
    submissions = [signed_submission(
        with_fields(template, task_id=f"task-{i}", submitter_id=rich[i % 4] if i % 10 else "poor",
                    quoted_price_micro=15_000 + i, max_price_micro=10**9,
                    quote_expires_at=2**62, compute_units=50, replicas=3, quorum=2))
        for i in range(N)
    ]
    verifier = service_signer(network, "verifier")
    verdicts = [verifier.sign(
        with_fields(sample_event("TaskVerified"), task_id=s.fields["task_id"], contributions=[
            {"node_id": f"node-{(i + k) % 5}", "compute_units": 50, "agreed": k < 2}
            for k in range(3)]))
        for i, s in enumerate(submissions)
    ]
    accounts = [registration(a) for a in [*rich, "poor"]]
    producer = EventProducer(network, kafka)
    # A first run binds the accounts and posts the mints (in however many batches).
    processor = _processor(spawned, network, kafka)
    for e in accounts:
        producer.send(e)
    producer.flush()
    ends = end_offsets(kafka, topic_for("AccountRegistered").name(network.topic_prefix))
    ledger_key = Genesis.load(network.genesis_path).keys["ledger"]
    _wait_for(lambda: read_past(network, kafka, ledger_key, ends), processor)
    for e in mints:
        producer.send(e)
    producer.flush()
    _wait_for(lambda: len(_committed(network, kafka, "LedgerEntryPosted")) >= 8, processor)
    processor.send_signal(signal.SIGTERM)
    processor.wait(60)
    # The next run dies (SIGKILL) in its 3rd batch of the submissions, events sent,
    # transaction open: it dies while escrowing them.
    processor = _processor(spawned, network, kafka, "--crash-before-commit", "3")
    for e in submissions:
        producer.send(e)
    producer.flush()
    assert processor.wait(120) == -signal.SIGKILL
    mid = len(_committed(network, kafka, "LedgerEntryPosted"))
    assert 8 < mid < 8 + 2 * ESCROWED, "the kill must land mid-stream"

    # Restarted, it rebuilds its state and carries on; then the verdicts come.
    processor = _processor(spawned, network, kafka)
    _wait_for(lambda: len(_committed(network, kafka, "LedgerEntryPosted")) >= 8 + 2 * ESCROWED,
              processor)
    for e in verdicts:
        producer.send(e)
    producer.flush()
    processor.send_signal(signal.SIGTERM)
    processor.wait(60)
    processor = _processor(spawned, network, kafka, "--idle-exit", "8")
    assert processor.wait(300) == 0

    # The same events through the pure decider, once each, give the expected books.
    expected = LedgerDecider("ledger")
    for e in [*accounts, *mints, *submissions, *verdicts]:
        expected.decide(e)

    entries = _committed(network, kafka, "LedgerEntryPosted")
    ids = Counter(e.fields["entry_id"] for e in entries)
    assert max(ids.values()) == 1, "an entry was committed twice"
    rejected = _committed(network, kafka, "TaskFailed")
    assert sorted(e.fields["task_id"] for e in rejected) == sorted(
        s.fields["task_id"] for s in submissions if s.fields["submitter_id"] == "poor")
    assert {e.fields["reason"] for e in rejected} == {"insufficient-funds"}

    # The Postgres projection of those entries: exact balances, entries sum to zero.
    projection = LedgerProjection(pg_dsn, f"proc_{uuid.uuid4().hex[:8]}")
    try:
        project_to_now(network, kafka, projection)
        assert projection.check() == len(entries)
        assert projection.balances() == expected.book.snapshot()
    finally:
        projection.close()
