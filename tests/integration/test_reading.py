"""Whole-topic reads on a real broker end at the topic's end as it was, however fast it grows."""

from __future__ import annotations

import threading
import time

import pytest

from destra.settings import Settings
from schemas import decode
from schemas.samples import sample_event, with_fields
from streams.producer import EventProducer
from streams.reading import end_offsets, read_all
from streams.topics import topic_for

pytestmark = pytest.mark.integration


def test_read_all_ends_while_the_topic_keeps_growing(network: Settings, kafka: str) -> None:
    # Found by the chaos test: a restarted ledger processor read submissions forever while
    # they kept arriving faster than its poll timeout, and never escrowed again.
    topic = topic_for("ProposalSubmitted").name(network.topic_prefix)
    stop = threading.Event()
    written = [0]

    def write() -> None:
        with EventProducer(network, kafka) as producer:
            while not stop.is_set():
                producer.send(with_fields(sample_event("ProposalSubmitted"),
                                          proposal_id=f"p{written[0]}"))
                producer.flush()
                written[0] += 1
                time.sleep(0.01)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        time.sleep(2)
        ends = end_offsets(kafka, topic)
        started = time.monotonic()
        records = read_all(kafka, topic)
        took = time.monotonic() - started
        after = sum(end_offsets(kafka, topic).values())
        # The topic goes on growing past what the read could have seen.
        deadline = time.monotonic() + 10
        while written[0] <= after + 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        writer.join()
    assert took < 20, f"read_all took {took:.1f}s"
    assert written[0] > after + 3
    assert all(decode(m.value()).name == "ProposalSubmitted" for m in records)
    # Everything up to the ends seen at the start, nothing past the end once it returned.
    assert sum(ends.values()) <= len(records) <= after
