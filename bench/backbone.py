"""Event backbone throughput: encoded Destra events through a real broker, against
the broker's raw ceiling measured in the same run by Kafka's own producer tool.

    python bench/backbone.py [--events 100000] [--bootstrap HOST:PORT]

Prints produce, consume and produce+consume events/s for Avro-encoded,
validated events (idempotent producer, acks=all; consumer decodes and
validates every record), then ``org.apache.kafka.tools.ProducerPerformance``
with the same record size and producer settings, and the ratios.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from destra.settings import Settings  # noqa: E402
from infra.kafka import KafkaCluster, ensure_jars  # noqa: E402
from schemas import encode  # noqa: E402
from schemas.samples import sample_event  # noqa: E402
from streams.admin import delete_topics, ensure_topics  # noqa: E402
from streams.consumer import EventConsumer  # noqa: E402
from streams.producer import EventProducer  # noqa: E402
from streams.topics import topic_for  # noqa: E402

PARTITIONS_EVENT = "TaskSubmitted"


def _free_port() -> int:
    import socket

    for base in range(21000, 39000, 137):
        try:
            for port in (base, base + 100):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port")


def _events(n: int) -> list:  # type: ignore[type-arg]
    template = sample_event(PARTITIONS_EVENT)
    events = []
    for i in range(n):
        fields = dict(template.fields)
        fields["task_id"] = f"task-{i:08d}"
        fields["envelope"] = dict(fields["envelope"], event_id=str(uuid.uuid4()))
        events.append(replace(template, fields=fields))
    return events


def destra_throughput(settings: Settings, bootstrap: str, n: int) -> dict[str, float]:
    """Produce n encoded events, then consume and decode them all."""
    events = _events(n)
    producer = EventProducer(settings, bootstrap)
    t0 = time.perf_counter()
    for event in events:
        producer.send(event)
    producer.flush()
    t_produce = time.perf_counter() - t0

    topic = topic_for(PARTITIONS_EVENT).name(settings.topic_prefix)
    seen = 0
    consumer = EventConsumer(settings, bootstrap, f"bench-{uuid.uuid4()}", [topic])
    t0 = time.perf_counter()
    first: float | None = None
    while seen < n:
        delivery = consumer.poll(10.0)
        if delivery is None:
            raise RuntimeError(f"consumer stalled after {seen} of {n} events")
        if first is None:
            first = time.perf_counter()
        consumer.store(delivery)
        seen += 1
    t_end = time.perf_counter()
    t_join = (first or t0) - t0
    t_consume = t_end - (first or t0)  # steady state: the group join is reported apart
    consumer.close()
    producer.close()
    return {
        "produce_eps": n / t_produce,
        "consume_eps": n / t_consume,
        "produce_consume_eps": n / (t_produce + t_consume),
        "record_bytes": statistics.mean(len(encode(e)) for e in events[:1000]),
        "group_join_s": t_join,
    }


def raw_ceiling(libs: Path, bootstrap: str, topic: str, n: int, record_size: int) -> float:
    """Records/s of Kafka's ProducerPerformance with the same producer settings."""
    java = shutil.which("java") or "java"
    cmd = [
        java, "-Xmx512m", "-cp", f"{libs}/*", "org.apache.kafka.tools.ProducerPerformance",
        "--topic", topic, "--num-records", str(n), "--record-size", str(record_size),
        "--throughput", "-1", "--producer-props", f"bootstrap.servers={bootstrap}",
        "acks=all", "enable.idempotence=true", "linger.ms=5", "compression.type=lz4",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    match = re.findall(r"(\d+) records sent, ([\d.]+) records/sec", out)
    if not match:
        raise RuntimeError(f"could not parse ProducerPerformance output:\n{out}")
    return float(match[-1][1])


def main() -> None:
    """Run both measurements on one broker and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--raw-events", type=int, default=300_000,
                        help="records for ProducerPerformance (enough to get past JVM warm-up)")
    parser.add_argument("--bootstrap", default=None, help="use a running broker")
    args = parser.parse_args()

    settings = Settings.from_env()
    libs = ensure_jars(settings.cache_dir)
    cluster = None
    tmp = Path(tempfile.mkdtemp(prefix="destra-bench-"))
    bootstrap = args.bootstrap
    if bootstrap is None:
        cluster = KafkaCluster(tmp / "kafka", libs, brokers=1, port=_free_port())
        cluster.start()
        bootstrap = cluster.bootstrap
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    settings = Settings(kafka_bootstrap=bootstrap, topic_prefix=prefix, producer_id="bench")
    spec = topic_for(PARTITIONS_EVENT)
    raw_topic = prefix + "raw"
    try:
        ensure_topics(bootstrap, prefix, replication_factor=1, min_insync_replicas=1, specs=[spec])
        ensure_topics(bootstrap, prefix, replication_factor=1, min_insync_replicas=1,
                      specs=[replace(spec, suffix="raw")])
        ours = destra_throughput(settings, bootstrap, args.events)
        size = round(ours["record_bytes"])
        raw = raw_ceiling(libs, bootstrap, raw_topic, args.raw_events, size)
        print(f"broker: Kafka KRaft single node at {bootstrap}; {args.events} events of "
              f"{size} bytes ({PARTITIONS_EVENT}), {spec.partitions} partitions")
        print(f"destra produce (encode+validate, idempotent, acks=all): "
              f"{ours['produce_eps']:>10,.0f} events/s")
        print(f"destra consume (decode+validate, store offset):          "
                    f"{ours['consume_eps']:>10,.0f} events/s  "
              f"(after a {ours['group_join_s']:.2f}s group join)")
        print(f"destra produce+consume:                                  "
              f"{ours['produce_consume_eps']:>10,.0f} events/s")
        print(f"raw ceiling, Kafka ProducerPerformance (same settings):  {raw:>10,.0f} records/s")
        print(f"ratio destra produce / raw ceiling:          {ours['produce_eps'] / raw:.3f}")
        both = ours["produce_consume_eps"] / raw
        print(f"ratio destra produce+consume / raw ceiling:  {both:.3f}")
    finally:
        try:
            delete_topics(bootstrap, [spec.name(prefix), raw_topic])
        finally:
            # Never leave a broker behind, whatever failed above.
            if cluster is not None:
                cluster.stop()
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
