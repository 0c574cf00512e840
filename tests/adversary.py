"""An attacker process: ``python -m tests.adversary '<json spec>'``.

It connects to the broker as the principal whose credentials file the spec names (a
node's from ``destra node join``, an account's from ``destra account create``), makes
its own Ed25519/X25519 keys, and does what the spec's ``case`` says straight to the
broker, with a plain Kafka client: it prints one JSON object of what the broker
answered. ``tests/integration/test_adversary.py`` runs it against a live network.

Cases:
- ``forge``: well-formed events of the spec's names and fields, signed with the
  attacker's own key as the role it pretends to be (or unsigned), each to its topic;
- ``replay``: records copied byte for byte (topic, partition, key, value);
- ``oversized``: one record of ``size`` bytes, the client's own size limit lifted so
  that the broker is the one to judge it;
- ``flood``: records of ``size`` bytes as fast as it can for ``seconds``;
- ``read``: read a topic (or one partition of it) as its principal, and try to open
  every data-key grant read with its own keys.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from destra.confidential import open_grant
from destra.crypto import KeyPair, sign_event
from schemas import decode, encode
from schemas.samples import sample_event
from streams.security import KafkaAccess, client_config
from streams.topics import topic_for


def _error(err: KafkaError | None) -> str | None:
    return None if err is None else err.name()


def _producer(spec: dict[str, Any], **extra: Any) -> Producer:
    access = KafkaAccess.load(Path(spec["credentials"]))
    return Producer({**client_config(spec["bootstrap"], access), "acks": "all",
                     "message.timeout.ms": 15_000, **extra})


def _send(producer: Producer, records: list[tuple[str, int | None, bytes, bytes]]
          ) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{} for _ in records]

    def done(i: int):  # type: ignore[no-untyped-def]
        def cb(err: KafkaError | None, msg: Message) -> None:
            out[i] = {"error": _error(err), "topic": msg.topic(),
                      "partition": msg.partition(), "offset": msg.offset()}
        return cb

    for i, (topic, partition, key, value) in enumerate(records):
        kwargs: dict[str, Any] = {"key": key, "on_delivery": done(i)}
        if partition is not None:
            kwargs["partition"] = partition
        producer.produce(topic, value, **kwargs)
    producer.flush(30)
    return out


def forge(spec: dict[str, Any], keys: KeyPair) -> dict[str, Any]:
    """Each ``{"event", "fields", "sign_as"}`` built, signed with the attacker's key."""
    records = []
    for item in spec["events"]:
        event = sample_event(item["event"]).replace(**item.get("fields", {}))
        if item.get("signing_key_field"):  # a submission carries the key that signed it
            event = event.replace(**{item["signing_key_field"]: keys.signing_public})
        if item.get("sign_as"):
            event = sign_event(event, keys, item["sign_as"])
        topic = topic_for(event.name)
        key = str(event.fields.get(topic.key, "k"))
        records.append((topic.name(spec["prefix"]), topic.partition_of(key), key.encode(),
                        encode(event)))
    return {"results": _send(_producer(spec), records)}


def replay(spec: dict[str, Any]) -> dict[str, Any]:
    """Each ``{"topic", "partition", "key", "value"}`` (hex bytes) written as it was."""
    records = [(r["topic"], r["partition"], bytes.fromhex(r["key"]), bytes.fromhex(r["value"]))
               for r in spec["records"]]
    return {"results": _send(_producer(spec), records)}


def oversized(spec: dict[str, Any]) -> dict[str, Any]:
    """One record of ``size`` bytes; the client lets it through, the broker decides."""
    producer = _producer(spec, **{"message.max.bytes": 64 * 1024 * 1024})
    return {"results": _send(producer, [(spec["topic"], None, b"attacker",
                                         b"\0" * spec["size"])])}


def flood(spec: dict[str, Any]) -> dict[str, Any]:
    """Records of ``size`` bytes for ``seconds``: the bytes the broker acknowledged, over
    how long, and the longest throttle it reported."""
    throttle_ms: list[int] = []

    def stats(text: str) -> None:
        for broker in json.loads(text).get("brokers", {}).values():
            throttle_ms.append(int(broker.get("throttle", {}).get("max", 0)))

    producer = _producer(spec, **{"linger.ms": 5, "acks": 1, "queue.buffering.max.kbytes":
                                  16 * 1024, "statistics.interval.ms": 200,
                                  "stats_cb": stats})
    acked: list[tuple[float, int]] = []
    errors: list[str] = []

    def done(err: KafkaError | None, msg: Message) -> None:
        if err is None:
            acked.append((time.monotonic(), len(msg.value() or b"")))
        else:
            errors.append(err.name())

    value = b"\1" * spec["size"]
    start = time.monotonic()
    sent = 0
    while time.monotonic() - start < spec["seconds"]:
        try:
            producer.produce(spec["topic"], value, key=b"flood", on_delivery=done)
            sent += 1
        except BufferError:
            producer.poll(0.01)
        producer.poll(0)
    end = time.monotonic()
    producer.flush(30)
    in_time = sum(n for at, n in acked if at <= end)
    return {"sent": sent, "acked_bytes": in_time, "seconds": end - start,
            "throttle_ms_max": max(throttle_ms, default=0), "errors": errors[:5]}


def read(spec: dict[str, Any], keys: KeyPair) -> dict[str, Any]:
    """Read ``topic`` (one ``partition`` of it, or subscribed) until ``seconds`` pass."""
    access = KafkaAccess.load(Path(spec["credentials"]))
    consumer = Consumer({**client_config(spec["bootstrap"], access), "group.id": spec["group"],
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    records, error, opened, sealed = 0, None, 0, 0
    try:
        if spec.get("partition") is not None:
            # An assigned partition of a topic the principal may not describe is never
            # fetched, and no error comes out of poll: ask the broker for its metadata,
            # which is where it refuses.
            meta = consumer.list_topics(spec["topic"], timeout=10).topics.get(spec["topic"])
            if meta is not None and meta.error is not None:
                error = _error(meta.error)
            consumer.assign([TopicPartition(spec["topic"], spec["partition"], 0)])
        else:
            consumer.subscribe([spec["topic"]])
        deadline = time.monotonic() + spec["seconds"]
        while time.monotonic() < deadline and error is None:
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error() is not None:
                error = _error(msg.error())
                continue
            records += 1
            event = decode(msg.value() or b"")
            if event.name == "DataKeyGranted":
                try:
                    open_grant(keys, event)
                    opened += 1
                except Exception:  # noqa: BLE001 - any failure to open is what is measured
                    sealed += 1
    finally:
        consumer.close()
    return {"records": records, "error": error, "grants_opened": opened,
            "grants_sealed": sealed}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    keys = KeyPair.generate()  # the attacker's own keys, never registered anywhere
    case = spec["case"]
    if case == "forge":
        out = forge(spec, keys)
    elif case == "replay":
        out = replay(spec)
    elif case == "oversized":
        out = oversized(spec)
    elif case == "flood":
        out = flood(spec)
    elif case == "read":
        out = read(spec, keys)
    else:
        raise SystemExit(f"unknown case {case}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
