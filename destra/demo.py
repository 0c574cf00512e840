"""`destra demo`: bring up the local network and show events of every type flowing.

The full task lifecycle (submit, allocate, run, verify, pay) replaces the
sample events here once those services exist; the backbone it shows is the
one they will use.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

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
        # A fresh prefix per run so the demo shows its own events, not earlier runs'.
        run = settings.with_(topic_prefix=f"{settings.topic_prefix}demo{uuid.uuid4().hex[:6]}.",
                             kafka_bootstrap=state.kafka_bootstrap)
        from streams.admin import ensure_topics

        ensure_topics(state.kafka_bootstrap, run.topic_prefix,
                      replication_factor=run.replication_factor,
                      min_insync_replicas=run.min_insync_replicas)
        names = sorted(default_catalog().names)
        echo(f"2. producing one event of each of the {len(names)} types "
             "(Avro single-object encoded, idempotent producer, acks=all)")
        with EventProducer(run, state.kafka_bootstrap) as producer:
            events = [sample_event(n) for n in names]
            for event in events:
                producer.send(event)
            echo("3. producing a corrupt record onto the heartbeat topic")
            bad = encode(events[0])[:12]
            producer.send_raw(run.topic_prefix + "nodes.heartbeats", b"demo", bad)

        echo("4. consuming every topic from offset 0:")
        topics = [t.name(run.topic_prefix) for t in TOPICS if t.suffix != "deadletter"]
        with EventConsumer(run, state.kafka_bootstrap, f"demo-{uuid.uuid4()}", topics) as consumer:
            seen = 0
            for d in consumer.stream(idle_timeout_s=5):
                seen += 1
                echo(f"   {d.topic.removeprefix(run.topic_prefix):<20} "
                     f"p{d.partition}@{d.offset:<3} {d.event.name}")
                if seen == len(events) and consumer.dead_lettered:
                    break
        echo(f"   {seen} events decoded, {consumer.dead_lettered} record dead-lettered")

        with EventConsumer(run, state.kafka_bootstrap, f"demo-{uuid.uuid4()}",
                           [dead_letter_topic(run)]) as dlq:
            for d in dlq.stream(idle_timeout_s=5):
                f = d.event.fields
                echo(f"5. dead letter: from {f['source_topic']}@{f['source_offset']} "
                     f"({len(f['value'])} original bytes kept): {f['error']}: {f['reason']}")
                break
        ok = seen == len(events)
        echo("demo: OK, every event type round-tripped" if ok else "demo: events missing")
    finally:
        if keep:
            echo("services left running; stop them with `destra infra down`")
        else:
            echo("6. stopping services ...")
            for line in services.down(settings):
                echo(f"   stopped {line}")
