"""`destra demo`: bring up the local network and show events of every type flowing.

The full task lifecycle (submit, allocate, run, verify, pay) replaces the
sample events here once those services exist; the backbone it shows is the
one they will use.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from destra.errors import DestraError
from destra.settings import Settings


def run_demo(settings: Settings, *, keep: bool, echo: Callable[[str], None]) -> None:
    """Start services, produce and consume every event type and a bad record, stop."""
    from infra import services
    from schemas import default_catalog, encode
    from schemas.samples import sample_event
    from streams.consumer import EventConsumer, dead_letter_topic
    from streams.producer import EventProducer
    from streams.topics import TOPICS

    echo("1. starting Kafka (KRaft) and Postgres ...")
    t0 = time.monotonic()
    state = services.up(settings)
    echo(f"   kafka {state.kafka_bootstrap} (version {state.kafka_version}), "
         f"postgres {state.pg_dsn}  [{time.monotonic() - t0:.1f}s]")
    try:
        run = settings.with_(kafka_bootstrap=state.kafka_bootstrap)
        # DeadLettered is written by consumers themselves, as step 5 shows.
        names = sorted(n for n in default_catalog().names if n != "DeadLettered")
        echo(f"2. producing one event of each of the {len(names)} types "
             "(Avro single-object encoded, idempotent producer, acks=all)")
        events = [sample_event(n, producer_id=run.producer_id) for n in names]
        ours = {e.event_id for e in events}
        with EventProducer(run, state.kafka_bootstrap) as producer:
            for event in events:
                producer.send(event)
            echo("3. producing a corrupt record onto the heartbeat topic")
            bad = encode(events[0])[:12] + uuid.uuid4().bytes  # unique, so we can find it
            producer.send_raw(run.topic_prefix + "nodes.heartbeats", b"demo", bad)

        echo("4. consuming every topic from offset 0 (this run's events):")
        topics = [t.name(run.topic_prefix) for t in TOPICS if t.suffix != "deadletter"]
        seen = 0
        with EventConsumer(run, state.kafka_bootstrap, f"demo-{uuid.uuid4()}", topics) as consumer:
            for d in consumer.stream(idle_timeout_s=5):
                if d.event.event_id not in ours:
                    continue  # an earlier run's event: the topics keep everything
                seen += 1
                echo(f"   {d.topic.removeprefix(run.topic_prefix):<20} "
                     f"p{d.partition}@{d.offset:<4} {d.event.name}")
                if seen == len(events):
                    break
        echo(f"   {seen} of {len(events)} events decoded")

        with EventConsumer(run, state.kafka_bootstrap, f"demo-{uuid.uuid4()}",
                           [dead_letter_topic(run)]) as dlq:
            letter = next((d.event.fields for d in dlq.stream(idle_timeout_s=5)
                           if d.event.fields["value"] == bad), None)
        if letter is not None:
            echo(f"5. dead letter: from {letter['source_topic']}@{letter['source_offset']} "
                 f"({len(letter['value'])} original bytes kept): "
                 f"{letter['error']}: {letter['reason']}")
        if seen != len(events) or letter is None:
            raise DestraError(f"demo failed: {seen} of {len(events)} events came back, "
                              f"dead letter {'found' if letter else 'missing'}")
        echo("demo: OK, every event type round-tripped and the bad record was dead-lettered")
    finally:
        if keep:
            echo("services left running; stop them with `destra infra down`")
        else:
            echo("6. stopping services ...")
            for line in services.down(settings):
                echo(f"   stopped {line}")
