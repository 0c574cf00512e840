"""The Kafka runner's expiring logs on the real broker: journaled in each batch's transaction,
left out of the snapshot, and rebuilt by a restarted runner from ``processors.journal``."""

from __future__ import annotations

import threading
import time

from destra.settings import Settings
from schemas import new_event
from streams.authority import ensure_genesis, load_signer
from streams.kafka_runner import KafkaRunner, latest_record, open_snapshot
from streams.producer import EventProducer
from tests.unit.test_journal import _Remembers

EVENTS = 200


def _runner(settings: Settings, p: _Remembers) -> KafkaRunner:
    genesis = ensure_genesis(settings.genesis_path, settings.service_keys)
    keys = load_signer(settings.service_keys, "verifier", genesis).keys
    return KafkaRunner(settings, settings.kafka_bootstrap, [p],
                       group=f"{settings.topic_prefix}processors/remembers", snapshot_keys=keys)


def test_a_restarted_runner_rebuilds_its_logs_from_the_journal_not_the_snapshot(
        network: Settings) -> None:
    live = _Remembers()
    runner = _runner(network, live)
    stop = threading.Event()
    thread = threading.Thread(target=lambda: runner.run(lambda: not stop.is_set()))
    thread.start()
    try:
        assert runner.ready.wait(120)
        with EventProducer(network, network.kafka_bootstrap) as producer:
            for i in range(EVENTS):
                producer.send(new_event("TokensMinted", "faucet", account=f"a{i}",
                                        amount_micro=100 + i, reason="journal test"))
                if i % 50 == 49:
                    producer.flush()
            producer.flush()
        deadline = time.monotonic() + 60
        while runner.stats.records < EVENTS and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(60)
    assert runner.stats.records == EVENTS and live.count == EVENTS
    assert runner.stats.batches > 1, "several transactions, so several journal records"

    # The state record holds the count and the positions, not the 200 entries.
    record = latest_record(network.kafka_bootstrap, runner.state_topic, runner.group,
                           "journal-test-read")
    assert record is not None
    opened = open_snapshot(record, runner.snapshot_keys.signing_public)
    assert len(opened["states"]["remembers"]) < 64
    assert len(record) < 1024

    again = _Remembers()
    restarted = _runner(network, again)
    restarted.restore()
    assert again.count == EVENTS
    assert restarted.stats.journal_entries == EVENTS
    assert again.log.entries() == live.log.entries()
    assert again.log.added() == [], "what was read back is committed, not journaled again"
