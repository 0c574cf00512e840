"""The Avro codec plugged into Faust: an agent reads and writes Destra events."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from destra.settings import Settings
from schemas import encode
from schemas.samples import sample_event
from streams.admin import ensure_topics
from streams.consumer import EventConsumer, dead_letter_topic
from streams.producer import EventProducer
from streams.topics import topic_for

pytestmark = pytest.mark.integration

APP = Path(__file__).resolve().parents[1] / "faust_echo_app.py"


def test_a_faust_agent_decodes_and_encodes_events_with_the_codec(
    network: Settings, kafka: str, tmp_path: Path
) -> None:
    echo_spec = replace(topic_for("NodeHeartbeat"), suffix="echo")
    ensure_topics(kafka, network.topic_prefix, replication_factor=1, min_insync_replicas=1,
                  specs=[echo_spec])
    env = dict(os.environ, DESTRA_KAFKA_BOOTSTRAP=kafka, DESTRA_TOPIC_PREFIX=network.topic_prefix)
    if not network.kafka_insecure:  # the test's Faust app runs as the operator
        env["DESTRA_KAFKA_CREDENTIALS"] = str(network.service_keys / "admin.kafka.json")
    log = open(tmp_path / "faust.log", "w")  # noqa: SIM115
    worker = subprocess.Popen(
        [sys.executable, str(APP), "--datadir", str(tmp_path / "faust"),
         "worker", "--loglevel", "warn"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        sent = [sample_event("NodeHeartbeat") for _ in range(5)]
        corrupt = encode(sent[0])[:15]
        with EventProducer(network, kafka) as producer:
            for i, event in enumerate(sent):
                producer.send(event)
                if i == 1:  # a bad record mid-stream must not stop the agent
                    producer.send_raw(producer.topic_name(event), b"node-3f9c", corrupt)
        echoed = network.topic_prefix + "echo"
        with EventConsumer(network, kafka, f"g-{uuid.uuid4()}", [echoed]) as consumer:
            got = []
            deadline = time.monotonic() + 120
            # Stop early if the worker dies: its log then explains why.
            while len(got) < len(sent) and worker.poll() is None and time.monotonic() < deadline:
                d = consumer.poll(1.0)
                if d is not None:
                    got.append(d.event)
    finally:
        worker.terminate()
        worker.wait(30)
        log.close()
    by_id = sorted(got, key=lambda e: e.event_id)
    assert by_id == sorted(sent, key=lambda e: e.event_id), (tmp_path / "faust.log").read_text()
    # The agent dead-lettered the corrupt record with its reason and bytes.
    with EventConsumer(network, kafka, f"d-{uuid.uuid4()}", [dead_letter_topic(network)]) as dlq:
        letters = [d.event.fields for d in dlq.stream(idle_timeout_s=5)]
    assert [(x["error"], x["value"]) for x in letters] == [("CorruptEvent", corrupt)]
    assert "does not decode" in letters[0]["reason"]
