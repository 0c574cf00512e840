"""Restart cost of each processor against the length of history (issue 10).

    python bench/restart.py [--tasks 100000] [--quick] [--rate 1.5] [--real-compute]
                            [--plain] [--out PATH]

Drives ``--tasks`` tasks through the production handlers (ledger decider,
allocator, verifier, node task logic) on the in-memory runner
(``streams.memory``), on a virtual clock: one submitter (heat2d 8x8, 1 step,
3 replicas, quorum 2; a private seed, so every input is sealed and its data
key granted to each node, unless ``--plain``), five nodes of which one
returns wrong results (dissent, slashing) and one never shows up (reissues
after the 30 s commit window), and, every 100 tasks, one submission whose
declared compute is wrong (the allocator fails it, the ledger refunds) and
one from an account without funds (the ledger rejects it). Submissions come
at ``--rate`` tasks per virtual second, slow enough that at the first
checkpoint (1,000 tasks) the verifier's closed tallies (kept
``forget_after_ms`` = 10 min) and the allocator's learning window are
already in their steady state: the state then has to stay flat.

At each checkpoint (1k, 10k, 100k tasks; a tenth of that with ``--quick``)
it prints, per processor:

* allocator and verifier (``Recovery.SNAPSHOT``): the sealed snapshot's size
  (``streams.kafka_runner.seal_snapshot``, a throwaway key), the time to seal
  it, and the time to open and restore it into a fresh instance (medians);
* ledger (``Recovery.REPLAY``): the time its restart takes without a
  checkpoint, a fresh ``LedgerDecider`` rebuilt from every ``LedgerEntryPosted``
  it emitted so far and every submission (decode, ``restore`` per entry, ``remember`` per
  submission, as ``ledger.processor.rebuild`` does, without the Kafka
  reads), checked against the live decider's balances; and the size and
  seal/open time of its checkpoint (``checkpoint_state``, taken every 30
  virtual s here as by the processor), whose ids expire by broker time;
* per snapshot field, its pickled size and entry count (what grows).

Then ratios last/first checkpoint (and last/first checkpoint past
``STEADY_MS``, once every window is full), and the in-memory network's speed: tasks
per second of wall time, CPU ms per task, and per processor the CPU ms per
task its handlers took (``time.thread_time``, so time another process takes
on these shared cores is not counted).

The nodes' computation: real workloads by default are run once per distinct
input and the output reused for identical inputs (``--real-compute`` runs
every replica for real); the output says which. Figures are printed, never
asserted.
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from allocator.policies import RandomPolicy  # noqa: E402
from allocator.service import Allocator, Windows  # noqa: E402
from destra.crypto import KeyPair  # noqa: E402
from destra.sim import (  # noqa: E402
    HEARTBEAT_MS,
    Compute,
    Heartbeats,
    OnVirtualClock,
    Submitter,
    account_registration,
    node,
    registration,
)
from ledger.decider import MAX_AUTHORITY_AGE_MS, LedgerDecider  # noqa: E402
from node_runner.logic import Fault  # noqa: E402
from schemas import Event, decode, encode, new_event, signatures  # noqa: E402
from streams.journal import full_state  # noqa: E402
from streams.kafka_runner import open_snapshot, seal_snapshot  # noqa: E402
from streams.memory import MemoryRunner  # noqa: E402
from streams.processing import Context, Outcome, Work  # noqa: E402
from verifier.service import Verifier  # noqa: E402

CPU = torch.device("cpu")
TICK_MS = 1_000
"""The runner's tick: every deadline here is tens of seconds, a second is fine enough."""
WORKLOAD = "heat2d"
PUBLIC = {"grid": "8", "steps": "1"}
PRIVATE = {"seed": "7"}
REPEATS = 5
CHECKPOINT_MS = 30_000
"""The ledger processor's checkpoint interval: ``checkpoint_taken`` this often (virtual)."""
STEADY_MS = MAX_AUTHORITY_AGE_MS + 60_000
"""Past this much virtual time every window (the verifier's closed tallies, the ledger's
ids: 10 min) is full: the ratios are also given from the first checkpoint after it."""


# -- the network's outside parties: destra.sim ------------------------------------------------


class Timed:
    """A processor whose handlers' (and work's) thread CPU time is counted."""

    def __init__(self, inner: Any, group: str) -> None:
        self.inner, self.group = inner, group
        self.name, self.inputs, self.recovery = inner.name, inner.inputs, inner.recovery
        self.ns = 0

    def _timed(self, call: Callable[[], Outcome]) -> Outcome:
        started = time.thread_time_ns()
        out = call()
        self.ns += time.thread_time_ns() - started
        if out.work:
            out.work = [Work(w.key, self._timed_run(w.run), w.not_before_ms) for w in out.work]
        return out

    def _timed_run(self, run: Callable[[], Any]) -> Callable[[], Any]:
        def timed() -> Any:
            started = time.thread_time_ns()
            try:
                return run()
            finally:
                self.ns += time.thread_time_ns() - started
        return timed

    def handle(self, event: Event, ctx: Context) -> Outcome:
        return self._timed(lambda: self.inner.handle(event, ctx))

    def tick(self, ctx: Context) -> Outcome:
        return self._timed(lambda: self.inner.tick(ctx))

    def finished(self, key: Any, result: Any, ctx: Context) -> Outcome:
        return self._timed(lambda: self.inner.finished(key, result, ctx))


# -- the network --------------------------------------------------------------------------------

class Network:
    """Ledger, allocator, verifier, five nodes (one wrong, one absent), submitters."""

    def __init__(self, reuse: bool, plain: bool, stake: int = 5_000_000) -> None:
        self.compute = Compute(reuse)
        self.plain = plain
        faults = {"n3": Fault.NO_SHOW, "n4": Fault.WRONG_RESULT}
        self.nodes = [node(f"n{i}", self.compute, faults.get(f"n{i}", Fault.NONE))
                      for i in range(5)]
        self.ledger = LedgerDecider("ledger")
        self.allocator = Allocator("allocator", policy=RandomPolicy(seed=1), windows=Windows())
        self.verifier = Verifier("verifier")
        self.alice, self.bob = Submitter("alice"), Submitter("bob")
        self.runner = MemoryRunner([], tick_ms=TICK_MS)
        self.heart = Heartbeats(self.nodes, self.runner.now_ms)
        self.timed = [Timed(self.ledger, "ledger"), Timed(self.allocator, "allocator"),
                      Timed(OnVirtualClock(self.verifier), "verifier"),
                      Timed(self.alice, "submitter"), Timed(self.bob, "submitter"),
                      *(Timed(n, "nodes (task logic + compute)") for n in self.nodes),
                      Timed(self.heart, "nodes' heartbeats")]
        self.runner.processors = self.timed
        # What a restart reads back: the ledger's entries and the submissions, encoded as
        # on the topics (the runner's log is emptied as it goes, to bound the bench's memory).
        self.entries: list[bytes] = []
        self.submissions: list[bytes] = []
        self.registrations: list[bytes] = []
        self.refusals: list[bytes] = []
        self.counts: Counter[str] = Counter()
        self.dead: Counter[str] = Counter()
        self.harvest_s = 0.0
        t = self.runner.now_ms
        for account in ("alice", "bob", *(f"op-{n.node_id}" for n in self.nodes)):
            self.runner.publish(account_registration(account, t))
        self.runner.publish(new_event("TokensMinted", "treasury", occurred_at=t,
                                      account="alice", amount_micro=10**13))
        for n in self.nodes:
            self.runner.publish(new_event("TokensMinted", "treasury", occurred_at=t,
                                          account=f"op-{n.node_id}", amount_micro=stake))
            self.runner.publish(registration(n, stake))
        self.runner.advance(HEARTBEAT_MS)
        self.harvest()

    def submit(self, index: int) -> None:
        now = self.runner.now_ms
        params = dict(PUBLIC) if self.plain else {**PUBLIC, **PRIVATE}
        if index % 100 == 37:  # declares the wrong compute: the allocator fails it
            event = self.alice.submission(f"t{index}", WORKLOAD, params, now, units_delta=1)
        elif index % 100 == 73:  # no funds: the ledger rejects it
            event = self.bob.submission(f"t{index}", WORKLOAD, params, now)
        else:
            event = self.alice.submission(f"t{index}", WORKLOAD, params, now)
        self.runner.publish(event, source="outside")

    def harvest(self) -> None:
        """Keep the encoded entries and submissions, count the rest, empty the log."""
        started = time.perf_counter()
        for logged in self.runner.log:
            e = logged.event
            if e.name == "LedgerEntryPosted" and logged.source == "ledger":
                self.entries.append(encode(e))
            elif e.name == "TaskSubmitted":
                self.submissions.append(encode(e))
            elif e.name == "AccountRegistered":
                self.registrations.append(encode(e))
            elif e.name == "TaskFailed":
                if logged.source == "ledger":
                    self.refusals.append(encode(e))
                self.counts[f"TaskFailed {e.fields['reason']}"] += 1
                continue
            self.counts[e.name] += 1
        for _, reason in self.runner.dead_letters:
            self.dead[reason.split(":")[0]] += 1
        self.runner.log.clear()
        self.runner.dead_letters.clear()
        self.harvest_s += time.perf_counter() - started

    def cpu_by_group(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for t in self.timed:
            out[t.group] = out.get(t.group, 0.0) + t.ns / 1e9
        return out


# -- measuring ----------------------------------------------------------------------------------

def median_s(run: Callable[[], Any], repeats: int = REPEATS) -> float:
    """Median CPU seconds of this thread: the cores are shared, and all of it is one
    thread's work (unpickling, Ed25519), so on an idle machine it is the wall time."""
    times = []
    for _ in range(repeats):
        started = time.thread_time()
        run()
        times.append(time.thread_time() - started)
    return statistics.median(times)


def pickled(value: Any) -> int:
    return len(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


def count(value: Any) -> str:
    for attr in ("seen", "_nodes", "balances"):
        inner = getattr(value, attr, None)
        if inner is not None:
            return str(len(inner))
    try:
        return str(len(value))
    except TypeError:
        return "-"


def ledger_fields(d: LedgerDecider) -> dict[str, Any]:
    return {"book.balances": d.book.balances, "book.applied": d.book.applied,
            "horizon": d.horizon.expires, "recent": d.recent,
            "tasks": d.tasks, "account_keys": d.account_keys, "prices": d.prices}


def measure(net: Network, tasks: int) -> dict[str, Any]:
    """One checkpoint: snapshot and replay figures per processor."""
    keys = KeyPair.generate()
    row: dict[str, Any] = {"tasks": tasks, "virtual_s": 0.0}
    fresh: dict[str, Callable[[], Any]] = {
        "allocator": lambda: Allocator("allocator", policy=RandomPolicy()),
        "verifier": lambda: Verifier("verifier")}
    for name, p in (("allocator", net.allocator), ("verifier", net.verifier)):
        # What every transaction writes: the snapshot, bounded by the work in flight. The
        # expiring logs are journaled instead (streams.journal): a batch writes what it
        # added, and a restart reads them back; here as one sealed record of the live
        # entries (the runner reads each batch's record over the horizon plus a margin).
        state = p.snapshot()
        sealed = seal_snapshot(state, keys)
        seal_s = median_s(lambda p=p: seal_snapshot(p.snapshot(), keys))  # type: ignore[misc]
        _, entries = full_state(p)
        journal = seal_snapshot({"logs": entries}, keys)

        def restart(make: Callable[[], Any] = fresh[name], sealed: bytes = sealed,
                    journal: bytes = journal) -> Any:
            instance = make()
            instance.restore(open_snapshot(sealed, keys.signing_public))
            for log_name, log in instance.journals().items():
                log.load(open_snapshot(journal, keys.signing_public)["logs"][log_name])
            return instance

        restore_s = median_s(restart)
        again = restart()
        same = (all(pickled(getattr(again, f)) == pickled(getattr(p, f))
                    for f in p._SNAPSHOT_FIELDS)
                and full_state(again)[1] == full_state(p)[1])
        fields = {f: (pickled(getattr(p, f)), count(getattr(p, f))) for f in p._SNAPSHOT_FIELDS}
        fields.update({f"{log_name} (journal)": (pickled(log), str(len(log)))
                       for log_name, log in p.journals().items()})
        row[name] = {"bytes": len(sealed), "journal_bytes": len(journal), "seal_s": seal_s,
                     "restore_s": restore_s, "same": same, "fields": fields}
    # The ledger's restart without a checkpoint: a replay of its own entries and the
    # submissions (its ids are then kept until new records move its watermarks).
    repeats = 3 if len(net.entries) < 100_000 else 1

    def replay() -> tuple[LedgerDecider, float, float]:
        # A restarted process starts with no cached signature checks: without this the
        # submissions of the last 16k tasks would be checked against this run's cache.
        getattr(signatures, "_VERIFIED", {}).clear()
        d = LedgerDecider("ledger")
        started = time.thread_time()
        for data in net.entries:
            e = decode(data)
            if e.name == "LedgerEntryPosted":
                d.restore(e)
        entries_s = time.thread_time() - started
        # As ledger.processor.rebuild: the registrations, its own refusals, the submissions.
        for data in net.registrations:
            d.register(decode(data))
        for data in net.refusals:
            d.refused(decode(data))
        for data in net.submissions:
            d.remember(decode(data))
        return d, entries_s, time.thread_time() - started - entries_s

    runs = [replay() for _ in range(repeats)]
    rebuilt = runs[0][0]
    matches = (rebuilt.book.balances == net.ledger.book.balances
               and rebuilt.book.applied == net.ledger.book.applied
               and rebuilt.tasks == net.ledger.tasks
               and rebuilt.account_keys == net.ledger.account_keys)
    state = ledger_fields(net.ledger)
    checkpoint = net.ledger.checkpoint_state()
    sealed = seal_snapshot(checkpoint, keys)

    def from_checkpoint() -> LedgerDecider:
        d = LedgerDecider("ledger")
        d.restore_state(open_snapshot(sealed, keys.signing_public))
        return d
    row["ledger"] = {
        "entries": len(net.entries), "submissions": len(net.submissions),
        "replay_s": statistics.median(r[1] + r[2] for r in runs),
        "entries_s": statistics.median(r[1] for r in runs),
        "submissions_s": statistics.median(r[2] for r in runs), "matches": matches,
        "bytes": len(sealed),
        "seal_s": median_s(lambda: seal_snapshot(net.ledger.checkpoint_state(), keys), 3),
        "restore_s": median_s(from_checkpoint, 3),
        "checkpoint_same": from_checkpoint().book.snapshot() == net.ledger.book.snapshot(),
        "fields": {f: (pickled(v), count(v)) for f, v in state.items()}}
    row["outside"] = {
        "node results (all nodes)": sum(len(n.results) for n in net.nodes),
        "node results pickled": sum(pickled(n.results) for n in net.nodes),
        "submitter data keys": len(net.alice.data_keys),
    }
    return row


# -- report -------------------------------------------------------------------------------------

def ms(s: float) -> str:
    return f"{s * 1000:9.2f}"


def report(rows: list[dict[str, Any]], net: Network, run_wall: float, run_cpu: float,
           tasks: int, virtual_ms: int, args: argparse.Namespace, say: Callable[[str], None]
           ) -> None:
    say("")
    say("Restart cost per processor, CPU ms of the restarting thread (sealed = DSNP2 + "
        "Ed25519 + pickle, lz4 left to the producer; restart = open + restore into a fresh "
        f"instance; medians of "
        f"{REPEATS}; the ledger's replay: decode + fold, without the Kafka reads)")
    say(f"{'tasks':>8} {'processor':<10} {'recovery':<9} {'bytes':>11} {'seal ms':>9} "
        f"{'restart ms':>10}  notes")
    for r in rows:
        for name in ("allocator", "verifier"):
            x = r[name]
            say(f"{r['tasks']:>8} {name:<10} {'snapshot':<9} {x['bytes']:>11,} {ms(x['seal_s'])} "
                f"{ms(x['restore_s']):>10}  per transaction; the restart also loads "
                f"{x['journal_bytes']:,} B of journaled logs; restored fields' sizes and "
                f"logs match: {x['same']}")
        x = r["ledger"]
        say(f"{r['tasks']:>8} {'ledger':<10} {'replay':<9} {'':>11} {'':>9} {ms(x['replay_s']):>10}"
            f"  {x['entries']:,} entries ({ms(x['entries_s']).strip()} ms) + "
            f"{x['submissions']:,} submissions ({ms(x['submissions_s']).strip()} ms); "
            f"rebuilt == live: {x['matches']}")
        say(f"{r['tasks']:>8} {'ledger':<10} {'checkpnt':<9} {x['bytes']:>11,} {ms(x['seal_s'])} "
            f"{ms(x['restore_s']):>10}  its checkpoint (written every 30 s), restored: "
            f"balances match: {x['checkpoint_same']}; a restart adds the entries since")
    first, last = rows[0], rows[-1]
    steady = next((r for r in rows if r["virtual_s"] * 1000 >= STEADY_MS), None)
    bases = [(first, "from the first checkpoint, its windows still filling")]
    if steady is not None and steady is not first and steady is not last:
        bases.append((steady, f"from the first past {STEADY_MS // 1000} virtual s, every "
                              "window full"))
    for base, why in bases if len(rows) > 1 else []:
        grow = last["tasks"] / base["tasks"]
        say("")
        say(f"Ratios {last['tasks']:,} / {base['tasks']:,} tasks (history x{grow:.0f}; "
            f"bounded by a snapshot: ~1; {why}):")
        for name in ("allocator", "verifier"):
            a, b = base[name], last[name]
            say(f"  {name:<10} snapshot bytes x{b['bytes'] / a['bytes']:.2f}   journal bytes "
                f"x{b['journal_bytes'] / a['journal_bytes']:.2f}   seal "
                f"x{b['seal_s'] / a['seal_s']:.2f}   "
                f"restart x{b['restore_s'] / a['restore_s']:.2f}")
        a, b = base["ledger"], last["ledger"]
        say(f"  {'ledger':<10} full replay x{b['replay_s'] / a['replay_s']:.2f}   checkpoint "
            f"bytes x{b['bytes'] / a['bytes']:.2f}   restore x"
            f"{b['restore_s'] / a['restore_s']:.2f}   (its ids expire by broker time; the "
            "replay without a checkpoint still reads all history)")
    say("")
    say(f"State by field at {last['tasks']:,} tasks (pickled bytes, entries), "
        f"and at {first['tasks']:,}:")
    for name in ("allocator", "verifier", "ledger"):
        for f, (size, n) in last[name]["fields"].items():
            size0, n0 = first[name]["fields"][f]
            say(f"  {name:<10} {f:<20} {size:>12,} B {n:>8}   ({size0:,} B, {n0})")
    say("")
    say("Outside the snapshots, held in memory by the task logic (Recovery.NONE):")
    for r in rows:
        o = r["outside"]
        say(f"  {r['tasks']:>8} tasks: NodeLogic.results {o['node results (all nodes)']:,} "
            f"entries, {o['node results pickled']:,} B pickled")
    say("")
    c = net.counts
    say(f"What happened: {tasks:,} tasks submitted over {virtual_ms / 1000:,.0f} virtual s "
        f"({args.rate} tasks/s); TaskVerified {c['TaskVerified']:,}, "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(c.items()) if k.startswith("TaskFailed"))
        + f"; TaskAssigned {c['TaskAssigned']:,}, ReissueRequested {c['ReissueRequested']:,}, "
        f"NodePenalized {c['NodePenalized']:,}, DataKeyGranted {c['DataKeyGranted']:,}, "
        f"LedgerEntryPosted {c['LedgerEntryPosted']:,}")
    say("Dead letters: " + (", ".join(f"{k} {v:,}" for k, v in net.dead.most_common())
                            or "none"))
    compute = net.compute
    how = ("real workload run once per distinct input, its output reused for identical inputs"
           if compute.reuse else "every replica ran the workload")
    say(f"Compute: {how} ({compute.runs:,} runs, {compute.reused:,} reused); "
        f"{'plain inputs' if args.plain else 'sealed inputs, data keys granted'}")
    say("")
    say("In-memory network speed (handlers only, no Kafka; checkpoints excluded):")
    say(f"  {tasks / run_wall:,.0f} tasks/s wall, {run_cpu / tasks * 1000:.2f} CPU ms per task "
        f"({run_wall:,.1f} s wall, {run_cpu:,.1f} s CPU, of which {net.harvest_s:,.1f} s "
        "encoding the log for the replay)")
    groups = net.cpu_by_group()
    for g, s in sorted(groups.items(), key=lambda kv: -kv[1]):
        say(f"  {g:<30} {s / tasks * 1000:7.3f} CPU ms per task")
    rest = run_cpu - sum(groups.values()) - net.harvest_s
    say(f"  {'runner, submissions, rest':<30} {rest / tasks * 1000:7.3f} CPU ms per task")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="10,000 tasks")
    parser.add_argument("--rate", type=float, default=1.5,
                        help="submissions per virtual second")
    parser.add_argument("--real-compute", action="store_true",
                        help="run every replica's workload (default: reuse identical outputs)")
    parser.add_argument("--plain", action="store_true", help="no private parameters, no grants")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    tasks = 10_000 if args.quick else args.tasks
    checkpoints = sorted({c for c in (tasks // 100, tasks // 10, tasks) if c > 0})
    torch.set_num_threads(1)
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    say(f"bench/restart.py: {tasks:,} tasks, checkpoints {checkpoints}, "
        f"{args.rate} tasks per virtual s, tick {TICK_MS} ms")
    net = Network(reuse=not args.real_compute, plain=args.plain)
    batch = 3
    interval_ms = round(batch / args.rate * 1000)
    start_ms = checkpointed_ms = net.runner.now_ms
    rows: list[dict[str, Any]] = []
    run_wall = run_cpu = 0.0
    submitted = 0
    while submitted < tasks:
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(min(batch, tasks - submitted)):
            net.submit(submitted)
            submitted += 1
        net.runner.advance(interval_ms)
        if net.runner.now_ms - checkpointed_ms >= CHECKPOINT_MS:
            net.ledger.checkpoint_taken()  # as ledger.processor.checkpoint does
            checkpointed_ms = net.runner.now_ms
        net.harvest()
        run_wall += time.perf_counter() - wall
        run_cpu += time.process_time() - cpu
        if checkpoints and submitted >= checkpoints[0]:
            checkpoints.pop(0)
            row = measure(net, submitted)
            row["virtual_s"] = (net.runner.now_ms - start_ms) / 1000
            rows.append(row)
            a, v, ld = row["allocator"], row["verifier"], row["ledger"]
            say(f"  {submitted:>8,} tasks ({row['virtual_s']:,.0f} virtual s, {run_wall:,.0f} s "
                f"wall): allocator {a['bytes']:,} B restart {ms(a['restore_s']).strip()} ms, "
                f"verifier {v['bytes']:,} B restart {ms(v['restore_s']).strip()} ms, ledger "
                f"replay {ms(ld['replay_s']).strip()} ms")
    # Let the last tasks finish before the totals are counted.
    net.runner.advance(120_000)
    net.harvest()
    report(rows, net, run_wall, run_cpu, tasks, net.runner.now_ms - start_ms, args, say)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
