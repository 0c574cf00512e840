"""End-to-end lifecycle: verified-and-paid tasks/s, per-hop latencies, CPU per task.

    python bench/lifecycle.py [--tasks 300] [--nodes 4] [--slots 8] [--light-tasks 60]
                              [--light-rate 10] [--raw-records 300000] [--quick]
                              [--timestamps broker|catalogue]

Starts its own Kafka broker and Postgres, the whole network as processes (ledger
processor and projector, the allocator and verifier worker, node runners), then
submits the smallest workload (heat2d 8x8, 1 step: 1 compute unit, a private
seed so every input is encrypted and granted) with 3 replicas, quorum 2, every
check on (signed submissions, escrow, signed commits and reveals checked against
registered keys, commit-reveal, settlement). Prints:

* full load (every task submitted at once): verified-and-paid tasks/s, from the
  first submission's append to the last settlement entry's append;
* the per-hop p50 / p99 of a task's life, TaskSubmitted -> escrow entry ->
  TaskAssigned -> DataKeyGranted -> ResultCommitted -> RevealOpened ->
  ResultRevealed -> TaskVerified -> settle entry, each hop between the records'
  Kafka timestamps (each hop ends at the task's last record of its kind), and
  the same per replica;
* CPU seconds per task of every process the bench runs (psutil, end minus start
  of the full-load run): the ledger processor, the projector, the processors
  worker, each node runner, this process (the submitting client, which also
  grants the data keys) and the broker's JVM, and Postgres;
* light load (``--light-rate`` tasks/s, paced): the same hop table and
  submit -> verified, i.e. the latency without queueing for slots;
* the broker's raw ceiling (Kafka's ProducerPerformance, ``bench/backbone.py``)
  against the records/s the lifecycle wrote;
* each processors unit's top functions by own time (cProfile of the unit's thread).

Timestamps: by default every topic a hop reads is created with
``message.timestamp.type=LogAppendTime`` (``--timestamps broker``), so every hop is
measured on the broker's clock; ``--timestamps catalogue`` keeps the catalogue's
settings (only ``results.commits`` and ``results.reveals`` are broker-stamped;
the others carry the producer's CreateTime, the moment ``produce()`` was called),
and the table says which ends are CreateTime. An entry of a ledger transaction
is stamped when it is appended, not when its transaction commits: a
``read_committed`` reader sees it only after the commit.

Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil
from confluent_kafka import TIMESTAMP_LOG_APPEND_TIME

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.backbone import raw_ceiling  # noqa: E402
from destra.client import Client, Watch  # noqa: E402
from destra.errors import DestraError  # noqa: E402
from destra.network import LocalNetwork  # noqa: E402
from destra.settings import Settings  # noqa: E402
from infra.kafka import KafkaCluster, ensure_jars, new_security  # noqa: E402
from infra.postgres import start_embedded, stop_embedded  # noqa: E402
from ledger.processor import wait_for_transactions  # noqa: E402
from schemas import decode  # noqa: E402
from schemas.events import now_ms  # noqa: E402
from streams import security  # noqa: E402
from streams.admin import ensure_topics  # noqa: E402
from streams.reading import read_all  # noqa: E402
from streams.topics import TOPICS, topic_for  # noqa: E402

SMALLEST = ("heat2d", {"grid": "8", "steps": "1", "seed": "7"})
"""1 compute unit; the seed is a private parameter, so every task is encrypted and granted."""

STAGES = ("TaskSubmitted", "escrow", "TaskAssigned", "DataKeyGranted", "ResultCommitted",
          "RevealOpened", "ResultRevealed", "TaskVerified", "settle")
"""A task's life, in order; ``escrow``/``settle`` are LedgerEntryPosted of those transactions."""

REPLICA_STAGES = ("TaskAssigned", "DataKeyGranted", "ResultCommitted", "RevealOpened",
                  "ResultRevealed")
"""The stages that happen once per replica (task, node, attempt)."""

HOP_EVENTS = ("TaskSubmitted", "LedgerEntryPosted", "TaskAssigned", "DataKeyGranted",
              "ResultCommitted", "RevealOpened", "ResultRevealed", "TaskVerified")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


# -- the records' timestamps -----------------------------------------------------------------


@dataclass
class Timeline:
    """Every task's records by stage, with their Kafka timestamps and timestamp types."""

    task: dict[str, dict[str, int]] = field(default_factory=dict)
    """stage -> task -> timestamp of the task's last record of that stage."""
    replica: dict[str, dict[tuple[str, str, int], int]] = field(default_factory=dict)
    """stage -> (task, node, attempt) -> timestamp (the first such record)."""
    broker_stamped: dict[str, bool] = field(default_factory=dict)
    """stage -> every record of it carried the broker's LogAppendTime."""
    records: list[int] = field(default_factory=list)
    """Timestamps of every record on every catalogue topic (for records/s)."""
    sizes: list[int] = field(default_factory=list)

    def mark(self, stage: str, task: str, at: int, log_append: bool,
             replica: tuple[str, str, int] | None) -> None:
        stamps = self.task.setdefault(stage, {})
        stamps[task] = max(stamps.get(task, 0), at)  # the hop ends at the task's last
        self.broker_stamped[stage] = self.broker_stamped.get(stage, True) and log_append
        if replica is not None:
            self.replica.setdefault(stage, {}).setdefault(replica, at)


def read_timeline(bootstrap: str, prefix: str) -> Timeline:
    """Read every catalogue topic once and index the lifecycle records' timestamps."""
    tl = Timeline()
    for spec in TOPICS:
        for m in read_all(bootstrap, spec.name(prefix)):
            kind, at = m.timestamp()
            tl.records.append(at)
            tl.sizes.append(len(m.value() or b""))
            try:
                e = decode(m.value() or b"")
            except DestraError:
                continue
            if e.name not in HOP_EVENTS:
                continue
            task = e.fields.get("task_id")
            if task is None:
                continue
            stage = e.name
            if stage == "LedgerEntryPosted":
                stage = e.fields["transaction_id"].split("/")[0]
                if stage not in ("escrow", "settle"):
                    continue
            replica = ((task, e.fields["node_id"], e.fields["attempt"])
                       if stage in REPLICA_STAGES else None)
            tl.mark(stage, task, at, kind == TIMESTAMP_LOG_APPEND_TIME, replica)
    return tl


def _row(label: str, gaps: list[float]) -> str:
    return (f"  {label:<40} n {len(gaps):5d}  p50 {_pct(gaps, 0.5):8.0f} ms  "
            f"p99 {_pct(gaps, 0.99):8.0f} ms")


def print_hops(tl: Timeline, ids: Iterable[str], title: str) -> None:
    """Per-hop p50/p99 for the tasks ``ids``: task-level (last record of each stage), then
    per replica. ``[C]`` marks a stage stamped with the producer's CreateTime."""
    wanted = set(ids)

    def name(stage: str) -> str:
        return stage + ("" if tl.broker_stamped.get(stage, False) else "[C]")

    print(f"{title}: per-hop latency (task level: each hop ends at the task's last record "
          "of its stage)")
    for a, b in zip(STAGES, STAGES[1:], strict=False):
        ta, tb = tl.task.get(a, {}), tl.task.get(b, {})
        gaps = [float(tb[t] - ta[t]) for t in wanted if t in ta and t in tb]
        if gaps:
            print(_row(f"{name(a)} -> {name(b)}", gaps))
    first, last = tl.task.get(STAGES[0], {}), tl.task.get(STAGES[-1], {})
    total = [float(last[t] - first[t]) for t in wanted if t in first and t in last]
    if total:
        print(_row(f"{name(STAGES[0])} -> {name(STAGES[-1])} (whole)", total))
    print(f"{title}: per replica (same task, node and attempt)")
    for a, b in zip(REPLICA_STAGES, REPLICA_STAGES[1:], strict=False):
        ra, rb = tl.replica.get(a, {}), tl.replica.get(b, {})
        gaps = [float(rb[r] - ra[r]) for r in ra if r[0] in wanted and r in rb]
        if gaps:
            print(_row(f"{name(a)} -> {name(b)}", gaps))
    created = sorted(s for s in STAGES if not tl.broker_stamped.get(s, False))
    if created:
        print("  [C]: CreateTime (the producer's clock when it called produce), not "
              "LogAppendTime: " + ", ".join(created))
    else:
        print("  every stage stamped with the broker's LogAppendTime")


# -- CPU per process ---------------------------------------------------------------------------


def _tree(pid: int, children: bool) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)] if children else [root]
    except psutil.NoSuchProcess:
        return []


def cpu_snapshot(groups: dict[str, list[int]]) -> dict[str, dict[int, float]]:
    """user+system CPU seconds of each process of each group (a group named ``postgres``
    also counts the postmaster's children, its backends)."""
    out: dict[str, dict[int, float]] = {}
    for label, pids in groups.items():
        seen: dict[int, float] = {}
        for pid in pids:
            for p in _tree(pid, children=label == "postgres"):
                try:
                    t = p.cpu_times()
                except psutil.NoSuchProcess:
                    continue
                seen[p.pid] = t.user + t.system
        out[label] = seen
    return out


def thread_snapshot(pid: int) -> dict[str, float]:
    """CPU seconds of a process's threads, by kind: its main thread, each librdkafka
    thread (``rdk:...``), the JVM's named threads, and the other threads together."""
    out: dict[str, float] = {}
    try:
        threads = psutil.Process(pid).threads()
    except psutil.NoSuchProcess:
        return out
    for t in threads:
        try:
            comm = Path(f"/proc/{pid}/task/{t.id}/comm").read_text().strip()
        except OSError:
            comm = "?"
        kind = ("main" if t.id == pid else comm
                if comm.startswith(("rdk:", "allocator", "verifier")) else "other threads")
        out[kind] = out.get(kind, 0.0) + t.user_time + t.system_time
    return out


def print_threads(label: str, before: dict[str, float], after: dict[str, float],
                  tasks: int) -> None:
    """The threads of one process that spent CPU in the run, most first."""
    spent = sorted(((after[k] - before.get(k, 0.0), k) for k in after), reverse=True)
    shown = ", ".join(f"{k} {1000 * s / max(1, tasks):.1f}" for s, k in spent if s >= 0.05)
    print(f"    {label} by thread, ms/task: {shown}")


def print_cpu(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]],
              tasks: int, wall_s: float) -> None:
    """CPU seconds per task by process: end minus start, over the tasks paid."""
    print(f"CPU per verified-and-paid task, by process ({tasks} tasks, {wall_s:.1f} s wall, "
          f"{psutil.cpu_count()} CPUs):")
    total = 0.0
    for label in after:
        spent = sum(t - before.get(label, {}).get(pid, 0.0) for pid, t in after[label].items())
        total += spent
        print(f"  {label:<22} {spent:8.2f} s  {1000 * spent / max(1, tasks):8.2f} ms/task  "
              f"({100 * spent / max(0.001, wall_s):5.1f} % of one CPU)")
    print(f"  {'total':<22} {total:8.2f} s  {1000 * total / max(1, tasks):8.2f} ms/task  "
          f"({100 * total / max(0.001, wall_s):5.1f} % of one CPU)")


GOAL_TASKS_S = 200
"""The processors issue's goal: verified-and-paid tasks per second on this machine."""


def print_budget(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]],
                 tasks: int) -> None:
    """Whether this machine's CPUs can reach the goal at the CPU each task costs."""
    cpus = psutil.cpu_count() or 1
    spent = {label: sum(t - before.get(label, {}).get(pid, 0.0) for pid, t in pids.items())
             for label, pids in after.items()}
    per_task = {label: 1000 * s / max(1, tasks) for label, s in spent.items()}
    total = sum(per_task.values())
    budget = 1000 * cpus / GOAL_TASKS_S
    broker = sum(v for k, v in per_task.items() if k.startswith("kafka broker"))
    ours = total - broker
    print(f"CPU budget: {GOAL_TASKS_S} tasks/s on {cpus} CPUs allows {budget:.1f} ms of CPU "
          f"per task, all processes together; measured {total:.1f} ms/task (x{total / budget:.1f}"
          f" the budget), so these CPUs cap the network at {1000 * cpus / total:.1f} tasks/s")
    print(f"  the broker alone: {broker:.1f} ms/task (x{broker / budget:.1f} the budget; cap "
          f"{1000 * cpus / max(broker, 0.001):.1f} tasks/s even if nothing else ran); the "
          f"network's own processes: {ours:.1f} ms/task (cap {1000 * cpus / max(ours, 0.001):.1f}"
          f" tasks/s with a free broker)")


# -- the run ---------------------------------------------------------------------------------


def _paid(settings: Settings, bootstrap: str, done: dict[str, object]) -> list[str]:
    verified = [t for t, p in done.items() if p.state == "verified"]  # type: ignore[attr-defined]
    # Paid: the settlement entries of every verified task are posted.
    wait_for_transactions(settings, bootstrap, [f"settle/{t}" for t in verified])
    return verified


PHASES = ("records", "state bytes", "append->fetch", "handle", "state record", "send", "commit")


def print_phases(timings: Path, windows: dict[str, tuple[int, int]]) -> None:
    """Per Kafka runner (processors units, ledger decider) and load, where a transaction's
    time goes: p50 / p99 of each phase over the transactions fetched in the window."""
    files = sorted(timings.glob("*.json"))
    if not files:
        print("no runner timings written (a runner did not exit cleanly)")
        return
    for label, (start, end) in windows.items():
        print(f"{label}: each runner's transactions, p50 / p99 per phase (ms; append->fetch: "
              "the batch's oldest record, broker append to this runner's fetch)")
        for path in files:
            data = json.loads(path.read_text())
            rows = [p for p in data["phases"] if start <= p[0] <= end]
            if not rows:
                continue
            cells = []
            for i, name in enumerate(PHASES, start=1):
                values = sorted(float(r[i]) for r in rows)
                cells.append(f"{name} {_pct(values, 0.5):.0f}/{_pct(values, 0.99):.0f}")
            print(f"  {data['group'][-28:]:<28} n {len(rows):>5}  " + "  ".join(cells))
            for topic, pairs in sorted(data.get("arrivals", {}).items()):
                lags = [float(lag) for at, lag in pairs if start <= at <= end]
                if lags:
                    print(f"    {'append->fetch ' + topic.split('.', 1)[-1]:<40} n {len(lags):5d}"
                          f"  p50 {_pct(lags, 0.5):6.0f} ms  p99 {_pct(lags, 0.99):6.0f} ms")


def light_load(client: Client, watch: Watch, count: int, rate: float) -> list[str]:
    """Submit ``count`` tasks at ``rate`` per second, granting keys between submissions."""
    quote = client.quote(*SMALLEST, ttl_ms=3_600_000)
    ids: list[str] = []
    started = time.monotonic()
    for i in range(count):
        due = started + i / rate
        while (left := due - time.monotonic()) > 0:
            watch.poll(left)
        ids.append(client.submit(quote, flush=False))
    client.flush()
    return ids


def run(args: argparse.Namespace, tmp: Path) -> None:
    """Run the benchmark and print its figures."""
    libs = ensure_jars(Settings.from_env().cache_dir)
    cluster = KafkaCluster(tmp / "kafka", libs, brokers=1, port=_free_port(),
                           security=new_security(tmp / "tls"))
    cluster.start()
    security.use(cluster.access)  # this process is the operator; the network's are its own
    pg = start_embedded(tmp / "pg")
    timings = tmp / "timings"
    timings.mkdir()
    windows: dict[str, tuple[int, int]] = {}
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    settings = Settings(kafka_bootstrap=cluster.bootstrap, topic_prefix=prefix,
                        producer_id="bench", home=tmp / "home")
    net = LocalNetwork(settings, cluster.bootstrap, pg.dsn, tmp / "logs", env_extra={
        "DESTRA_PROFILE": str(tmp / "processors.prof"), "DESTRA_COMMIT_WINDOW_MS": "120000",
        "DESTRA_TIMINGS": str(timings),
        "DESTRA_QUEUE_TIMEOUT_MS": "600000"})
    stamped = {topic_for(e).suffix for e in HOP_EVENTS}
    specs = [replace(s, broker_time=True) if args.timestamps == "broker" and s.suffix in stamped
             else s for s in TOPICS]
    tasks, nodes, slots = args.tasks, args.nodes, args.slots
    try:
        ensure_topics(cluster.bootstrap, prefix, replication_factor=1, min_insync_replicas=1,
                      specs=specs)
        net.mint("bench", amount_micro=10**15)  # registered, then minted at start_services
        net.start_services()
        names = [f"b{i}" for i in range(nodes)]
        for n in names:
            net.start_node(n, operator=f"op-{n}", slots=slots)
        net.wait_registered(names, timeout_s=180)
        client = Client(settings, cluster.bootstrap, "bench", net.passphrase)
        warm = [client.submit(client.quote(*SMALLEST)) for _ in range(10)]
        states = {p.state for p in client.wait(warm, timeout_s=300).values()}
        if states != {"verified"}:
            raise SystemExit(f"bench: the warm-up tasks did not verify ({states}); see {tmp}/logs")

        groups = {name: [proc.pid] for name, proc in net.procs.items()}
        groups["client (bench)"] = [os.getpid()]
        groups.update({f"kafka broker {n} (JVM)": [pid] for n, pid in cluster.pids.items()})
        groups["postgres"] = [pg.pid]
        threaded = {name: groups[name][0] for name in ("processors", "ledger-processor",
                                                        "node-b0", "client (bench)")
                    if name in groups}
        threads_before = {name: thread_snapshot(pid) for name, pid in threaded.items()}
        cpu_before = cpu_snapshot(groups)
        wall = time.monotonic()
        full_from = now_ms()

        # -- full load: every task at once ----------------------------------------------------
        watch = client.watch()
        quote = client.quote(*SMALLEST, ttl_ms=3_600_000)
        started = time.monotonic()
        ids = [client.submit(quote, flush=False) for _ in range(tasks)]
        client.flush()
        submit_s = time.monotonic() - started
        done = client.wait(ids, watch=watch, timeout_s=1800)
        paid = _paid(settings, cluster.bootstrap, done)
        cpu_after = cpu_snapshot(groups)
        threads_after = {name: thread_snapshot(pid) for name, pid in threaded.items()}
        wall = time.monotonic() - wall
        windows["full load"] = (full_from, now_ms())

        # -- light load: paced, no queueing for slots ------------------------------------------
        light_from = now_ms()
        light_ids = light_load(client, watch, args.light_tasks, args.light_rate)
        light_done = client.wait(light_ids, watch=watch, timeout_s=600)
        windows["light load"] = (light_from, now_ms())
        light_paid = _paid(settings, cluster.bootstrap, light_done)
        watch.close()

        tl = read_timeline(cluster.bootstrap, prefix)
        submitted, settled = tl.task["TaskSubmitted"], tl.task.get("settle", {})
        first = min(submitted[t] for t in ids)
        last = max(settled[t] for t in paid if t in settled) if paid else first
        window = [at for at in tl.records if first <= at <= last]
        throughput = len(paid) / max(0.001, (last - first) / 1000)
        print(f"timestamps: {args.timestamps} ("
              + ("LogAppendTime on " + ", ".join(sorted(stamped)) if args.timestamps == "broker"
                 else "the catalogue's: LogAppendTime on " + ", ".join(
                     sorted(s.suffix for s in TOPICS if s.broker_time))) + ")")
        print(f"== full load: {tasks} x {SMALLEST[0]} {SMALLEST[1]}, 3 replicas, quorum 2, "
              f"{nodes} nodes x {slots} slots; submitted in {submit_s:.2f}s")
        print(f"verified: {sum(p.state == 'verified' for p in done.values())}, "
              f"verified and paid: {len(paid)}")
        print(f"throughput: {throughput:.1f} verified-and-paid tasks/s (goal {GOAL_TASKS_S}), "
              f"first submission to last settlement entry {(last - first) / 1000:.1f} s")
        sub_ver = [float(tl.task["TaskVerified"][t] - submitted[t]) for t in paid
                   if t in tl.task.get("TaskVerified", {})]
        if sub_ver:
            print(_row("submit -> verified", sub_ver))
        print_hops(tl, ids, "full load")
        print_cpu(cpu_before, cpu_after, len(paid), wall)
        print_budget(cpu_before, cpu_after, len(paid))
        for name in threaded:
            print_threads(name, threads_before[name], threads_after[name], len(paid))

        print(f"== light load: {args.light_tasks} tasks paced at {args.light_rate:g}/s")
        print(f"verified and paid: {len(light_paid)}")
        light_ver = [float(tl.task["TaskVerified"][t] - submitted[t]) for t in light_paid
                     if t in tl.task.get("TaskVerified", {})]
        if light_ver:
            print(_row("submit -> verified", light_ver))
        light_set = [float(settled[t] - submitted[t]) for t in light_paid if t in settled]
        if light_set:
            print(_row("submit -> settle entry", light_set))
        print_hops(tl, light_ids, "light load")

        if args.raw_records > 0:
            size = round(statistics.mean(tl.sizes)) if tl.sizes else 1000
            ensure_topics(cluster.bootstrap, prefix, replication_factor=1,
                          min_insync_replicas=1,
                          specs=[replace(topic_for("TaskSubmitted"), suffix="raw")])
            raw = raw_ceiling(libs, cluster.bootstrap, prefix + "raw", args.raw_records, size,
                              (cluster.access, tmp / "ca.pem"))
            rate = len(window) / max(0.001, (last - first) / 1000)
            print(f"== broker: records appended during the full-load window: {len(window)} "
                  f"({len(window) / max(1, len(paid)):.1f} per task, mean {size} bytes): "
                  f"{rate:,.0f} records/s")
            print(f"raw ceiling, Kafka ProducerPerformance ({args.raw_records} records of "
                  f"{size} bytes, acks=all, idempotent, lz4, same broker): {raw:,.0f} records/s;"
                  f" lifecycle / raw = {rate / raw:.4f}")
        client.close()
    finally:
        net.stop()
        stop_embedded(tmp / "pg", pg.system_user)
        cluster.stop()
    print_phases(timings, windows)
    profiles = sorted(tmp.glob("processors.prof.*"))
    for profile in profiles:  # one per unit: the allocator and each verifier shard
        out = io.StringIO()
        stats = pstats.Stats(str(profile), stream=out)
        stats.sort_stats("tottime").print_stats(8)
        print(f"processors worker, unit {profile.suffix[1:]}: top functions by own time "
              "(cProfile of its thread; both runs and the warm-up):")
        print("\n".join(line for line in out.getvalue().splitlines()[6:] if line.strip()))
    if not profiles:
        print("no profile written (the processors worker did not exit cleanly)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--light-tasks", type=int, default=60)
    parser.add_argument("--light-rate", type=float, default=10.0, help="tasks/s (<= 20)")
    parser.add_argument("--raw-records", type=int, default=300_000,
                        help="ProducerPerformance records (0: skip the ceiling)")
    parser.add_argument("--timestamps", choices=("broker", "catalogue"), default="broker")
    parser.add_argument("--quick", action="store_true",
                        help="120 tasks, 30 light, 100000 raw records: a couple of minutes")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.light_tasks, args.raw_records = 120, 30, 100_000
    tmp = Path(tempfile.mkdtemp(prefix="destra-bench-"))
    try:
        run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
