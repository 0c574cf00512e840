"""Event backbone throughput: encoded Destra events through a real broker, against
the broker's raw ceiling measured in the same run by Kafka's own producer tool, and
the cost of TLS + SASL/SCRAM against plaintext on the same broker.

    python bench/backbone.py [--events 100000] [--rounds 2] [--bootstrap HOST:PORT]

Prints produce, consume and produce+consume events/s for Avro-encoded,
validated events (idempotent producer, acks=all; consumer decodes and
validates every record), then ``org.apache.kafka.tools.ProducerPerformance``
with the same record size and producer settings, and the ratios. The broker is
started as ``destra infra up`` starts it (a SASL_SSL listener, ACLs) with one extra
PLAINTEXT listener; each round measures both listeners, alternately, and the
secured/plaintext ratios are printed (the mean of the rounds).
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
from infra.kafka import KAFKA_VERSION, KafkaCluster, ensure_jars, new_security  # noqa: E402
from schemas import encode  # noqa: E402
from schemas.samples import sample_event  # noqa: E402
from streams import security  # noqa: E402
from streams.admin import delete_topics, ensure_topics  # noqa: E402
from streams.consumer import EventConsumer  # noqa: E402
from streams.producer import EventProducer  # noqa: E402
from streams.security import KafkaAccess  # noqa: E402
from streams.topics import topic_for  # noqa: E402

PARTITIONS_EVENT = "TaskSubmitted"


def _free_port() -> int:
    import socket

    for base in range(21000, 39000, 137):
        try:
            for port in (base, base + 100, base + 200):
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


def raw_ceiling(libs: Path, bootstrap: str, topic: str, n: int, record_size: int,
                secured: tuple[KafkaAccess, Path] | None = None) -> float:
    """Records/s of Kafka's ProducerPerformance with the same producer settings; over
    SASL_SSL as ``secured``'s principal (its CA written to the given file) when given."""
    java = shutil.which("java") or "java"
    cmd = [
        java, "-Xmx512m", "-cp", f"{libs}/*", "org.apache.kafka.tools.ProducerPerformance",
        "--topic", topic, "--num-records", str(n), "--record-size", str(record_size),
        "--throughput", "-1", "--producer-props", f"bootstrap.servers={bootstrap}",
        "acks=all", "enable.idempotence=true", "linger.ms=5", "compression.type=lz4",
    ]
    if secured is not None:
        # In a file: --producer-props splits each pair at '=', which the JAAS line holds.
        access, ca = secured
        ca.write_text(access.ca_pem)
        props = ca.with_name("producer.properties")
        props.write_text(
            f"security.protocol=SASL_SSL\nsasl.mechanism={security.SCRAM_MECHANISM}\n"
            "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule "
            f'required username="{access.username}" password="{access.password}";\n'
            f"ssl.truststore.type=PEM\nssl.truststore.location={ca}\n")
        props.chmod(0o600)
        cmd += ["--producer.config", str(props)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    match = re.findall(r"(\d+) records sent, ([\d.]+) records/sec", out)
    if not match:
        raise RuntimeError(f"could not parse ProducerPerformance output:\n{out}")
    return float(match[-1][1])


def _mean(rows: list[dict[str, float]], key: str) -> float:
    return statistics.mean(r[key] for r in rows)


def main() -> None:
    """Run the measurements on one broker and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of (plaintext, secured) destra measurements")
    parser.add_argument("--raw-events", type=int, default=300_000,
                        help="records for ProducerPerformance (enough to get past JVM warm-up)")
    parser.add_argument("--bootstrap", default=None,
                        help="use a running broker (DESTRA_KAFKA_CREDENTIALS or "
                             "DESTRA_KAFKA_INSECURE say how); no secured/plaintext comparison")
    args = parser.parse_args()

    settings = Settings.from_env()
    libs = ensure_jars(settings.cache_dir)
    cluster = None
    tmp = Path(tempfile.mkdtemp(prefix="destra-bench-"))
    # (label, bootstrap, access) of each listener measured.
    listeners: list[tuple[str, str, KafkaAccess]] = []
    if args.bootstrap is None:
        port = _free_port()
        cluster = KafkaCluster(tmp / "kafka", libs, brokers=1, port=port,
                               security=new_security(tmp / "tls", plaintext_port=port + 200))
        cluster.start()
        listeners = [("plaintext", f"127.0.0.1:{port + 200}", KafkaAccess.plaintext()),
                     ("tls-scram", cluster.bootstrap, cluster.access)]
    else:
        listeners = [("given", args.bootstrap, security.current())]
    admin_bootstrap, admin = listeners[-1][1], listeners[-1][2]
    security.use(admin)
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    spec = topic_for(PARTITIONS_EVENT)
    raws = [f"{prefix}raw-{label}" for label, _, _ in listeners]
    results: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in listeners}
    made: list[str] = []
    try:
        ensure_topics(admin_bootstrap, prefix, replication_factor=1, min_insync_replicas=1,
                      specs=[replace(spec, suffix=r[len(prefix):]) for r in raws])
        for i in range(args.rounds):
            for label, bootstrap, access in listeners:
                # A fresh topic per measurement, made by the super user.
                run = Settings(kafka_bootstrap=bootstrap, topic_prefix=f"{prefix}{label}{i}.",
                               producer_id="bench")
                ensure_topics(admin_bootstrap, run.topic_prefix, replication_factor=1,
                              min_insync_replicas=1, specs=[spec], access=admin)
                made.append(spec.name(run.topic_prefix))
                security.use(access)
                results[label].append(destra_throughput(run, bootstrap, args.events))
        size = round(_mean(next(iter(results.values())), "record_bytes"))
        raw = {label: raw_ceiling(libs, bootstrap, topic, args.raw_events, size,
                                  (access, tmp / "ca.pem") if access.secure else None)
               for (label, bootstrap, access), topic in zip(listeners, raws, strict=True)}
        print(f"broker: Kafka {KAFKA_VERSION} KRaft single node; {args.events} events of "
              f"{size} bytes ({PARTITIONS_EVENT}), {spec.partitions} partitions, "
              f"{args.rounds} round(s) per listener, means")
        for label, rows in results.items():
            print(f"[{label}]")
            print(f"  destra produce (encode+validate, idempotent, acks=all): "
                  f"{_mean(rows, 'produce_eps'):>10,.0f} events/s")
            print(f"  destra consume (decode+validate, store offset):          "
                  f"{_mean(rows, 'consume_eps'):>10,.0f} events/s  "
                  f"(after a {_mean(rows, 'group_join_s'):.2f}s group join)")
            print(f"  destra produce+consume:                                  "
                  f"{_mean(rows, 'produce_consume_eps'):>10,.0f} events/s")
            print(f"  raw ceiling, Kafka ProducerPerformance (same settings):  "
                  f"{raw[label]:>10,.0f} records/s")
            print(f"  ratio destra produce / raw ceiling:          "
                  f"{_mean(rows, 'produce_eps') / raw[label]:.3f}")
            print(f"  ratio destra produce+consume / raw ceiling:  "
                  f"{_mean(rows, 'produce_consume_eps') / raw[label]:.3f}")
        if len(listeners) == 2:
            plain, tls = results["plaintext"], results["tls-scram"]
            print("cost of TLS + SASL/SCRAM-SHA-512 (secured / plaintext, same broker, same run):")
            for key, what in (("produce_eps", "destra produce"),
                              ("consume_eps", "destra consume"),
                              ("produce_consume_eps", "destra produce+consume")):
                print(f"  {what:<24} {_mean(tls, key) / _mean(plain, key):.3f}")
            print(f"  {'raw ProducerPerformance':<24} {raw['tls-scram'] / raw['plaintext']:.3f}")
    finally:
        try:
            delete_topics(admin_bootstrap, [*made, *raws], access=admin)
        finally:
            # Never leave a broker behind, whatever failed above.
            if cluster is not None:
                cluster.stop()
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
