"""One hop through the Kafka runner, alone: append of an input -> append of its output.

    python bench/runner_hop.py [--events 200] [--rate 20]

Starts its own broker, runs ``streams.kafka_runner.KafkaRunner`` with a trivial
processor (each TokensMinted in, one TaskFailed out) in a thread, produces
paced inputs and prints the p50/p99 of the hop measured between the two
records' broker LogAppendTime, for several producer settings of the runner's
transactions, and where a transaction's time goes (cProfile of the runner).
This is the floor every service hop pays, whatever its handler does.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

from destra.settings import Settings
from infra.kafka import KafkaCluster, ensure_jars, new_security
from schemas import Event, decode, new_event
from streams import security
from streams.admin import ensure_topics
from streams.authority import ensure_genesis, load_signer
from streams.kafka_runner import KafkaRunner
from streams.processing import Context, Outcome, Recovery
from streams.producer import EventProducer
from streams.reading import read_all
from streams.topics import TOPICS, topic_for


class Echo:
    """Each mint in, one refusal-shaped TaskFailed out: no work, just the hop."""

    name = "echo"
    inputs = frozenset({"TokensMinted"})
    recovery = Recovery.SNAPSHOT

    def __init__(self) -> None:
        self.seen = 0

    def handle(self, event: Event, ctx: Context) -> Outcome:
        self.seen += 1
        return Outcome.of([new_event("TaskFailed", "echo", task_id=event.fields["account"],
                                     reason="echo", detail="")])

    def tick(self, ctx: Context) -> Outcome:
        return Outcome()

    def snapshot(self) -> dict[str, int]:
        return {"seen": self.seen}

    def restore(self, state: dict[str, int]) -> None:
        self.seen = state["seen"]


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def one(settings: Settings, bootstrap: str, events: int, rate: float,
        overrides: dict[str, object], label: str) -> None:
    prefix = f"hop{uuid.uuid4().hex[:6]}."
    settings = replace(settings, topic_prefix=prefix)
    stamped = [replace(s, broker_time=True) for s in TOPICS]
    ensure_topics(bootstrap, prefix, replication_factor=1, min_insync_replicas=1,
                  specs=stamped)
    genesis = ensure_genesis(settings.genesis_path, settings.service_keys)
    treasury = load_signer(settings.service_keys, "treasury", genesis)
    ledger = load_signer(settings.service_keys, "ledger", genesis)
    runner = KafkaRunner(settings, bootstrap, [Echo()], group=f"{prefix}echo",
                         snapshot_keys=ledger.keys, sign=ledger.sign, check=genesis.check,
                         producer_overrides=overrides)
    stop = threading.Event()
    profile = cProfile.Profile()

    def serve() -> None:
        profile.enable()
        runner.run(lambda: not stop.is_set())
        profile.disable()

    thread = threading.Thread(target=serve)
    thread.start()
    producer = EventProducer(settings, bootstrap)
    if not runner.ready.wait(120):  # fenced, state restored, partitions assigned
        raise SystemExit("runner_hop: the runner did not start within 120 s")
    for i in range(events):
        producer.send(treasury.sign(new_event("TokensMinted", "treasury", account=f"a{i}",
                                              amount_micro=1, reason="bench")))
        producer.flush()
        time.sleep(1 / rate)
    time.sleep(2)
    stop.set()
    thread.join()
    ins = {decode(m.value()).fields["account"]: m.timestamp()[1]
           for m in read_all(bootstrap, topic_for("TokensMinted").name(prefix))}
    outs = {decode(m.value()).fields["task_id"]: m.timestamp()[1]
            for m in read_all(bootstrap, topic_for("TaskFailed").name(prefix))}
    hops = [outs[a] - ins[a] for a in ins if a in outs]
    print(f"{label:44s} n {len(hops):4d}/{events}  p50 {_pct(hops, 0.5):6.0f} ms  "
          f"p99 {_pct(hops, 0.99):6.0f} ms  transactions {runner.stats.batches}")
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    stats.sort_stats("tottime").print_stats(6)
    lines = [ln for ln in out.getvalue().splitlines() if "cimpl" in ln]
    for ln in lines[:5]:
        print("    " + ln.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        libs = ensure_jars(Settings.from_env().cache_dir)
        cluster = KafkaCluster(Path(tmp) / "kafka", libs, brokers=1, port=29_500,
                               security=new_security(Path(tmp) / "tls"))
        cluster.start()
        security.use(cluster.access)
        try:
            settings = Settings(kafka_bootstrap=cluster.bootstrap, home=Path(tmp) / "home",
                                producer_id="bench")
            print(f"one runner hop, {args.events} events at {args.rate}/s, broker LogAppendTime")
            for label, overrides in [
                ("runner (retry.backoff.ms 2, max 10)", {}),
                ("librdkafka's backoff (100 ms, max 1000)", {"retry.backoff.ms": 100,
                                                           "retry.backoff.max.ms": 1000}),
                ("retry.backoff.ms 10, max 1000", {"retry.backoff.ms": 10,
                                                   "retry.backoff.max.ms": 1000}),
            ]:
                one(settings, cluster.bootstrap, args.events, args.rate, overrides, label)
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
