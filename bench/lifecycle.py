"""End-to-end lifecycle throughput: verified-and-paid tasks per second, and latencies.

    python bench/lifecycle.py [--tasks 300] [--nodes 4] [--slots 8]

Starts its own Kafka broker and Postgres, the whole network as processes (ledger
processor and projector, the Faust allocator and verifier, node runners), then
submits the smallest workload (heat2d 8x8, 1 step: 1 compute unit) with 3
replicas, quorum 2, every check on (signed submissions, escrow, signed commits
and reveals checked against registered keys, commit-reveal, settlement). Prints:

* verified-and-paid tasks/s, from the first submission to the last settlement
  entry, by the events' own timestamps;
* p50 / p95 / p99 of submit -> first assignment and submit -> verdict;
* the allocator-and-verifier worker's top functions by own time (cProfile),
  the place to look for the bottleneck.
"""

from __future__ import annotations

import argparse
import io
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from destra.client import Client  # noqa: E402
from destra.network import LocalNetwork  # noqa: E402
from destra.settings import Settings  # noqa: E402
from infra.kafka import KafkaCluster, ensure_jars  # noqa: E402
from infra.postgres import start_embedded, stop_embedded  # noqa: E402
from ledger.processor import read_all, wait_for_transactions  # noqa: E402
from schemas import decode, new_event  # noqa: E402
from streams.admin import ensure_topics  # noqa: E402
from streams.producer import EventProducer  # noqa: E402
from streams.topics import topic_for  # noqa: E402

SMALLEST = ("heat2d", {"grid": "8", "steps": "1", "seed": "7"})
"""1 compute unit; the seed is a private parameter, so every task is encrypted and granted."""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


def _times(bootstrap: str, prefix: str, name: str, key: str = "task_id",
           first: bool = True) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in read_all(bootstrap, topic_for(name).name(prefix)):
        e = decode(m.value())
        if e.name != name:
            continue
        k = e.fields[key]
        if k is None:
            continue
        if k not in out or (not first and e.occurred_at > out[k]):
            out[k] = e.occurred_at
    return out


def _hops(bootstrap: str, prefix: str, ids: list[str]) -> None:
    """Median time of each hop of a task's life (event timestamps): where the time goes."""
    marks: dict[str, dict[str, int]] = {}

    def mark(label: str, task: str, at: int) -> None:
        marks.setdefault(label, {})
        marks[label][task] = max(marks[label].get(task, 0), at)  # the hop ends at the last

    for name in ("TaskSubmitted", "LedgerEntryPosted", "TaskAssigned", "ResultCommitted",
                 "RevealOpened", "ResultRevealed", "TaskVerified"):
        for m in read_all(bootstrap, topic_for(name).name(prefix)):
            e = decode(m.value())
            task = e.fields.get("task_id")
            if e.name != name or task is None:
                continue
            if name == "LedgerEntryPosted":
                kind = e.fields["transaction_id"].split("/")[0]
                if kind in ("escrow", "settle"):
                    mark(kind, task, e.occurred_at)
            else:
                mark(name, task, e.occurred_at)
    order = ["TaskSubmitted", "escrow", "TaskAssigned", "ResultCommitted", "RevealOpened",
             "ResultRevealed", "TaskVerified", "settle"]
    print("median hop times (each hop ends at its last event of the task):")
    for a, b in zip(order, order[1:], strict=False):
        gaps = [marks[b][t] - marks[a][t] for t in ids
                if t in marks.get(a, {}) and t in marks.get(b, {})]
        if gaps:
            print(f"  {a:>15} -> {b:<15} p50 {statistics.median(gaps):7.0f} ms")


def run(tasks: int, nodes: int, slots: int, tmp: Path) -> dict[str, float]:
    """Run the benchmark, print its figures; returns throughput and latencies."""
    figures: dict[str, float] = {}
    libs = ensure_jars(Settings.from_env().cache_dir)
    cluster = KafkaCluster(tmp / "kafka", libs, brokers=1, port=_free_port())
    cluster.start()
    pg = start_embedded(tmp / "pg")
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    settings = Settings(kafka_bootstrap=cluster.bootstrap, topic_prefix=prefix,
                        producer_id="bench", home=tmp / "home")
    net = LocalNetwork(settings, cluster.bootstrap, pg.dsn, tmp / "logs", env_extra={
        "DESTRA_PROFILE": str(tmp / "processors.prof"), "DESTRA_COMMIT_WINDOW_MS": "120000",
        "DESTRA_QUEUE_TIMEOUT_MS": "600000"})
    try:
        ensure_topics(cluster.bootstrap, prefix, replication_factor=1, min_insync_replicas=1)
        with EventProducer(settings, cluster.bootstrap) as producer:
            producer.send(new_event("TokensMinted", "faucet", account="bench",
                                    amount_micro=10**15, reason="bench"))
        net.start_services()
        names = [f"b{i}" for i in range(nodes)]
        for n in names:
            net.start_node(n, operator=f"op-{n}", slots=slots)
        net.wait_registered(names, timeout_s=180)
        client = Client(settings, cluster.bootstrap, "bench", net.passphrase)
        warm = [client.submit(client.quote(*SMALLEST)) for _ in range(10)]
        client.wait(warm, timeout_s=300)

        watch = client.watch()
        quote = client.quote(*SMALLEST, ttl_ms=3_600_000)
        started = time.monotonic()
        ids = [client.submit(quote, flush=False) for _ in range(tasks)]
        client.flush()
        submit_s = time.monotonic() - started
        done = client.wait(ids, watch=watch, timeout_s=1800)
        watch.close()
        verified = [t for t, p in done.items() if p.state == "verified"]
        # Paid: the settlement entries of every verified task are posted.
        wait_for_transactions(settings, cluster.bootstrap, [f"settle/{t}" for t in verified])
        settled = _times(cluster.bootstrap, prefix, "LedgerEntryPosted", first=False)
        submitted = _times(cluster.bootstrap, prefix, "TaskSubmitted")
        assigned = _times(cluster.bootstrap, prefix, "TaskAssigned")
        verdicts = _times(cluster.bootstrap, prefix, "TaskVerified")
        paid = [t for t in verified if t in settled]
        first = min(submitted[t] for t in ids)
        last = max(settled[t] for t in paid) if paid else first
        to_assigned = [assigned[t] - submitted[t] for t in ids if t in assigned]
        to_verified = [verdicts[t] - submitted[t] for t in verified if t in verdicts]
        print(f"tasks: {tasks} x {SMALLEST[0]} {SMALLEST[1]}, 3 replicas, quorum 2, "
              f"{nodes} nodes x {slots} slots; submitted in {submit_s:.2f}s")
        print(f"verified: {len(verified)}, verified and paid: {len(paid)}")
        figures["throughput"] = len(paid) / max(0.001, (last - first) / 1000)
        if to_verified:
            figures["mean_to_verified_ms"] = statistics.mean(to_verified)
        print(f"throughput: {figures['throughput']:.1f} verified-and-paid tasks/s (goal 1000)")
        for label, values in (("submit->assigned", to_assigned),
                              ("submit->verified", to_verified)):
            if values:
                print(f"{label:<17} p50 {_pct(values, 0.5):8.0f} ms  p95 "
                      f"{_pct(values, 0.95):8.0f} ms  p99 {_pct(values, 0.99):8.0f} ms  "
                      f"mean {statistics.mean(values):8.0f} ms")
        _hops(cluster.bootstrap, prefix, ids)
        client.close()
    finally:
        net.stop()
        stop_embedded(tmp / "pg", pg.system_user)
        cluster.stop()
    profile = tmp / "processors.prof"
    if profile.exists():
        out = io.StringIO()
        stats = pstats.Stats(str(profile), stream=out)
        stats.sort_stats("tottime").print_stats(15)
        print("allocator+verifier worker, top functions by own time (cProfile):")
        print("\n".join(line for line in out.getvalue().splitlines()[6:] if line.strip()))
    else:
        print("no profile written (the processors worker did not exit cleanly)")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--slots", type=int, default=8)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="destra-bench-"))
    try:
        run(args.tasks, args.nodes, args.slots, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
