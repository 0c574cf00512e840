"""The dashboard under a seeded network: page loads, live-update latency, Postgres load.

Seeds the real projection's tables (``task_view``, ``task_replica_view``,
``task_node_facts``, ``node_view``, ``ledger_entries``, ``projection_offsets``) of an
embedded Postgres with TASKS tasks (3 replicas each), NODES nodes and their payouts,
starts the dashboard in this process (uvicorn on a free port, no Kafka: the follower's
topics are not measured here), and prints:

- page load latency (p50/p99) of each page, sequential requests;
- the latency of a live update: a task's status changed in the views (with the
  projection's offsets, as the projector writes them) until the new status arrives on
  an open ``/events/tasks`` stream;
- Postgres statements per second while views change twice a second, with 1 and with 20
  open streams (the hub's counter at ``/api/stats``).

    python bench/dashboard.py [--tasks 10000] [--nodes 500]
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg  # noqa: E402

REGIONS = ["eu-west", "eu-central", "us-east", "us-west", "ap-east", "ap-south", "sa-east",
           "af-south"]


def seed(dsn: str, tasks: int, nodes: int) -> None:
    now = int(time.time() * 1000)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("""
INSERT INTO node_view (node_id, operator_id, region, device_name, device_class, tier,
  tflops_milli, memory_mb, slots, stake_micro, registered_at, last_heartbeat_at,
  load_permille, free_slots, tasks_assigned, tasks_agreed, tasks_dissented, penalties,
  earned_micro, slashed_micro)
SELECT 'n' || i, 'op-' || (i %% 50), (%(regions)s::text[])[1 + i %% 8], 'GPU model ' || (i %% 7),
  'gpu', CASE WHEN i %% 5 = 0 THEN 'datacenter' ELSE 'consumer' END, 5000 + (i * 37) %% 80000,
  8192 * (1 + i %% 10), 2 + i %% 4, 5000000, %(now)s - 3600000, %(now)s - (i %% 20) * 1000,
  (i * 13) %% 1000, i %% 3, 60, 58, 2, i %% 3, 100000 * (i %% 97), 0
FROM generate_series(0, %(nodes)s - 1) AS i""", {"regions": REGIONS, "now": now, "nodes": nodes})
        conn.execute("""
INSERT INTO task_view (task_id, submitter_id, workload, params, replicas, quorum,
  compute_units, price_micro, tier, status, submitted_at, assigned_at, verified_at, digest,
  assignments, commits, reveals, paid_micro, refunded_micro)
SELECT 'task-' || lpad(i::text, 6, '0'), 'user-' || (i %% 100),
  (ARRAY['matmul','nbody','heat2d','mlp-digits'])[1 + i %% 4], '{"n": "64"}'::jsonb, 3, 2,
  1000 + i %% 500, 300000, 'consumer',
  CASE WHEN i > %(tasks)s - 20 THEN 'assigned' WHEN i %% 50 = 0 THEN 'failed' ELSE 'verified' END,
  %(now)s - (%(tasks)s - i) * 60, %(now)s - (%(tasks)s - i) * 60 + 40,
  CASE WHEN i > %(tasks)s - 20 THEN NULL ELSE %(now)s - (%(tasks)s - i) * 60 + 900 END,
  CASE WHEN i %% 50 = 0 OR i > %(tasks)s - 20 THEN NULL ELSE sha256(i::text::bytea) END,
  3, 3, 3, CASE WHEN i %% 50 = 0 THEN 0 ELSE 290000 END,
  CASE WHEN i %% 50 = 0 THEN 300000 ELSE 0 END
FROM generate_series(1, %(tasks)s) AS i""", {"tasks": tasks, "now": now})
        conn.execute("""
INSERT INTO task_replica_view (task_id, node_id, attempt, replica_index, assigned_at,
  committed_at, revealed_at, agreed, runtime_ms)
SELECT t.task_id, 'n' || ((i * 3 + r) %% %(nodes)s), 0, r, t.assigned_at,
  t.assigned_at + 300 + r * 10, t.assigned_at + 700 + r * 10, r < 2, 250 + r * 20
FROM task_view t, generate_series(0, 2) AS r, LATERAL (SELECT substr(t.task_id, 6)::int) AS x(i)
""", {"nodes": nodes})
        conn.execute("""
INSERT INTO task_node_facts (task_id, node_id, agreed, compute_units)
SELECT task_id, node_id, agreed, 1000 FROM task_replica_view WHERE agreed IS NOT NULL""")
        conn.execute("""
INSERT INTO ledger_entries (entry_id, transaction_id, account, amount_micro, kind, task_id,
  topic, partition, "offset", occurred_at)
SELECT 'e' || t.task_id || r.node_id, 'settle/' || t.task_id, 'node:' || r.node_id, 145000,
  'payout', t.task_id, 'ledger.entries', 0, 0, t.verified_at
FROM task_view t JOIN task_replica_view r USING (task_id)
WHERE t.status = 'verified' AND r.agreed""")
        conn.execute("""
INSERT INTO projection_offsets (projection, topic, partition, next_offset)
VALUES ('views', 'tasks.verdicts', 0, %s), ('ledger', 'ledger.entries', 0, %s)""",
                     (tasks, tasks))


def change(dsn: str, task_id: str, status: str) -> None:
    """A view change as the projector makes it: rows and offsets in one transaction."""
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE task_view SET status = %s WHERE task_id = %s", (status, task_id))
        conn.execute("UPDATE projection_offsets SET next_offset = next_offset + 1"
                     " WHERE projection = 'views'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stream(threading.Thread):
    """One browser's ``/events/<part>``: records when each update arrived."""

    def __init__(self, port: int, part: str = "tasks") -> None:
        super().__init__(daemon=True)
        self.port, self.part = port, part
        self.updates: list[tuple[float, str]] = []
        self.ready = threading.Event()
        self.stop = False

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", f"/events/{self.part}")
        resp = conn.getresponse()
        self.ready.set()
        while not self.stop:
            line = resp.fp.readline()
            if not line:
                return
            if line.startswith(b"data: "):
                self.updates.append((time.monotonic(), line.decode()))
        conn.close()


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/stats") as r:
        return dict(json.load(r))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--loads", type=int, default=40, help="requests per page")
    args = parser.parse_args()

    import uvicorn

    from destra.dashboard import pages
    from destra.dashboard.app import create_app
    from destra.dashboard.hub import Hub
    from infra.postgres import create_database, start_embedded, stop_embedded
    from ledger.migrate import apply_migrations

    base = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    handle = start_embedded(base / "pg")
    server = None
    try:
        dsn = create_database(handle.dsn, "dash")
        apply_migrations(dsn)
        t0 = time.monotonic()
        seed(dsn, args.tasks, args.nodes)
        print(f"seeded {args.tasks} tasks (3 replicas each), {args.nodes} nodes and their "
              f"payouts in {time.monotonic() - t0:.1f}s")
        hub = Hub(dsn, render=pages.render)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(hub), host="127.0.0.1", port=port,
                                               log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        old = f"task-{1:06d}"
        newest = f"task-{args.tasks:06d}"
        print(f"\npage load latency ({args.loads} sequential loads each, ms):")
        for path in ["/tasks", f"/tasks/{newest}", "/operators", "/network", "/governance"]:
            times = []
            for _ in range(args.loads):
                t = time.monotonic()
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}") as r:
                    r.read()
                times.append(1000 * (time.monotonic() - t))
            print(f"  {path:<22} p50 {pct(times, 0.5):7.1f}  p99 {pct(times, 0.99):7.1f}")
        t = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/tasks/{old}") as r:
            r.read()
        print(f"  first view of an old task (not in memory: read at the next tick): "
              f"{1000 * (time.monotonic() - t):.0f} ms")

        st = stats(port)
        print(f"  the poller's statement when the views moved: {st['statement_ms']:.0f} ms; "
              f"rendering every page's parts: {st['render_ms']:.0f} ms (once per change, "
              "shared by every browser)")

        stream = Stream(port)
        stream.start()
        stream.ready.wait(10)
        time.sleep(1.5)
        latencies = []
        for i in range(15):
            task_id = f"task-{args.tasks - 1 - i:06d}"
            status = "revealing"
            seen = len(stream.updates)
            t = time.monotonic()
            change(dsn, task_id, status)
            deadline = t + 10
            while time.monotonic() < deadline:
                arrived = [at for at, data in stream.updates[seen:]
                           if f"{task_id}</a></td><td><span class='status s-{status}'" in data]
                if arrived:
                    latencies.append(1000 * (arrived[0] - t))
                    break
                time.sleep(0.005)
            time.sleep(0.3 + (i % 5) * 0.17)  # spread the changes over the tick
        print(f"\nlive update latency, a view change until it arrives on /events/tasks "
              f"({len(latencies)} of 15 seen), ms: p50 {pct(latencies, 0.5):.0f}  "
              f"p99 {pct(latencies, 0.99):.0f}  max {max(latencies):.0f} (tick 1 s)")
        stream.stop = True

        print("\nPostgres statements per second (views changing every 0.5 s, 10 s):")
        for clients in (1, 20):
            streams = [Stream(port, part) for part, _ in zip(
                ["tasks", "operators", "network", "governance"] * 5, range(clients),
                strict=False)]
            for s in streams:
                s.start()
            for s in streams:
                s.ready.wait(10)
            before, t = stats(port)["queries"], time.monotonic()
            for i in range(20):
                change(dsn, f"task-{args.tasks - 30 - i:06d}", "revealing")
                time.sleep(0.5)
            after, elapsed = stats(port)["queries"], time.monotonic() - t
            got = sum(len(s.updates) for s in streams)
            print(f"  {clients:>2} open streams: {(after - before) / elapsed:.2f} statements/s "
                  f"({after - before} in {elapsed:.1f}s); {got} updates delivered in all")
            for s in streams:
                s.stop = True
        idle_before, t = stats(port)["queries"], time.monotonic()
        time.sleep(5)
        idle = (stats(port)["queries"] - idle_before) / (time.monotonic() - t)
        print(f"  no change in the views: {idle:.2f} statements/s (each a look at the "
              "offsets; the rest of the statement is skipped)")
    finally:
        if server is not None:
            server.should_exit = True
            time.sleep(1.5)
        stop_embedded(base / "pg", handle.system_user)


if __name__ == "__main__":
    main()
