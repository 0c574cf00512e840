"""Chaos on a real broker and Postgres: 500 tasks while every kind of process is SIGKILLed.

During the run, the processors worker (allocator + verifier), the ledger processor, the
projector and one node runner are each SIGKILLed twice at seeded-random moments and
restarted (the node with its own name, so it reuses its keystore). Afterwards: every task
has exactly one verdict (verified, or failed and refunded), nothing is stuck, no replica
is paid twice, no ledger entry or transaction is posted twice, the books are what the
verdicts and penalties say, the ledger check passes and the replay from offset 0 matches.

Run with ``-s`` to see each kill and the outcome counts. ``DESTRA_CHAOS_SEED`` picks
another schedule (the default one is fixed so a failure can be rerun).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from destra.client import Client, Progress
from destra.errors import DestraError
from destra.network import LocalNetwork
from destra.settings import Settings
from infra.postgres import create_database
from ledger.book import TREASURY, escrow, stake, user
from ledger.decider import node_wallet
from ledger.processor import wait_for_transactions
from ledger.projection import LedgerProjection
from ledger.service import project_to_now, replay
from schemas import Event, decode
from schemas.events import now_ms
from streams.params import DEFAULTS
from streams.reading import read_all
from streams.topics import topic_for
from tests.support import TEARDOWN_GRACE_S

pytestmark = pytest.mark.integration

TASKS = 500
NODES = [f"c{i}" for i in range(5)]
SLOTS = 3
STAKE = 50_000_000  # 50 dissents or 200 missed reveals: no slash is ever capped here
FUNDS = 10**12
SUBMIT_S = 35.0
"""Submissions are spread over this long, and the kills land within it."""
SEED = int(os.environ.get("DESTRA_CHAOS_SEED", "20261210"))


def _stamped(net: LocalNetwork, *names: str) -> list[tuple[int, Event]]:
    """Every committed event of these types, with its broker timestamp."""
    topics = sorted({topic_for(n).name(net.settings.topic_prefix) for n in names})
    out = []
    for t in topics:
        for m in read_all(net.bootstrap, t):
            e = decode(m.value())
            if e.name in names:
                out.append((m.timestamp()[1], e))
    return out


def _events(net: LocalNetwork, *names: str) -> list[Event]:
    return [e for _, e in _stamped(net, *names)]


def _timeline(net: LocalNetwork, start_ms: int, tasks: set[str], step_s: int = 10) -> str:
    """Per ``step_s`` of the run: tasks submitted, escrowed, first placed, given a verdict."""
    firsts: dict[str, dict[str, int]] = defaultdict(dict)
    stages = {"TaskSubmitted": "submitted", "TaskAssigned": "placed",
              "TaskVerified": "verdict", "TaskFailed": "verdict"}
    for ts, e in _stamped(net, *stages, "LedgerEntryPosted"):
        task = e.fields.get("task_id")
        stage = ("escrowed" if e.name == "LedgerEntryPosted" and
                 e.fields["transaction_id"] == f"escrow/{task}" else stages.get(e.name))
        if task in tasks and stage is not None:
            firsts[stage][task] = min(ts, firsts[stage].get(task, ts))
    names = ["submitted", "escrowed", "placed", "verdict"]
    end = max(ts for stage in firsts.values() for ts in stage.values())
    lines = ["  from  " + "".join(f"{n:>11}" for n in names)]
    for lo in range(0, (end - start_ms) // 1000 + 1, step_s):
        counts = [sum(lo * 1000 <= ts - start_ms < (lo + step_s) * 1000
                      for ts in firsts[n].values()) for n in names]
        lines.append(f"  {lo:4d}s " + "".join(f"{c:>11}" for c in counts))
    return "\n".join(lines)


@pytest.fixture
def net(network: Settings, kafka: str, pg_dsn: str, tmp_path: Path) -> Iterator[LocalNetwork]:
    settings = network.with_(home=tmp_path / "home")
    local = LocalNetwork(settings, kafka, create_database(pg_dsn), tmp_path / "logs", env_extra={
        # Short windows: a killed node's replicas are judged and reissued within seconds.
        "DESTRA_COMMIT_WINDOW_MS": "6000", "DESTRA_REVEAL_WINDOW_MS": "5000",
        "DESTRA_REISSUE_GRACE_MS": "10000",
        # A killed processors worker's units are free for its successor 3 s after.
        "DESTRA_LEASE_SESSION_MS": "3000"})
    yield local
    local.stop(timeout_s=TEARDOWN_GRACE_S)


def _task(i: int) -> tuple[str, dict[str, str]]:
    """Small, real work; every task has its own (sealed) seed or range."""
    if i % 2:
        return "sha256-search", {"start": str(i * 500), "count": "500"}
    return "heat2d", {"grid": "8", "steps": "1", "seed": str(i)}


def _schedule(rng: random.Random, names: list[str]) -> list[tuple[float, str]]:
    """Two kill times per process within the submission phase, at least 12 s apart so the
    restarted process is up and working when it dies again."""
    out = []
    for name in names:
        first = rng.uniform(8.0, SUBMIT_S / 2)
        out += [(first, name), (rng.uniform(first + 12.0, SUBMIT_S), name)]
    return sorted(out)


def _expected(verdicts: list[Event], prices: dict[str, int], units: dict[str, int],
              penalties: list[Event]) -> dict[str, int]:
    """The books by hand: mint, stakes, escrow, pay agreeing replicas by compute with the
    fee, refund the rest (all of it for a failed task), slash each penalty."""
    out: dict[str, int] = defaultdict(int)
    out["mint"] -= FUNDS * (1 + len(NODES))
    out[user("alice")] += FUNDS
    for node in NODES:
        out[user(f"op-{node}")] += FUNDS - STAKE
        out[stake(node)] += STAKE
    for v in verdicts:
        if v.name != "TaskVerified":
            continue  # refunded whole: alice is where she was
        task = v.fields["task_id"]
        budget = units[task] * 3
        paid = 0
        for c in v.fields["contributions"]:
            if c["agreed"]:
                gross = prices[task] * c["compute_units"] // budget
                fee = gross * DEFAULTS["fee_bps"] // 10_000
                out[node_wallet(c["node_id"])] += gross - fee
                out[TREASURY] += fee
                paid += gross
        out[user("alice")] -= paid
    for p in penalties:
        out[stake(p.fields["node_id"])] -= p.fields["slash_micro"]
        out[TREASURY] += p.fields["slash_micro"]
    return {a: b for a, b in out.items() if b != 0}


@pytest.mark.timeout(900)
def test_five_hundred_tasks_survive_sigkills_of_every_process(net: LocalNetwork) -> None:
    began = time.monotonic()
    rng = random.Random(SEED)
    net.mint("alice", *(f"op-{n}" for n in NODES), amount_micro=FUNDS)
    net.start_services()
    for n in NODES:
        net.start_node(n, operator=f"op-{n}", stake_micro=STAKE, slots=SLOTS)
    net.wait_registered(NODES)
    victim = rng.choice(NODES)
    restart: dict[str, Callable[[], None]] = {
        "processors": lambda: net.spawn("processors", "-m", "destra.processors"),
        "ledger-processor": lambda: net.spawn("ledger-processor", "-m", "ledger.processor"),
        "projector": lambda: net.spawn("projector", "-m", "ledger.service"),
        f"node-{victim}": lambda: net.start_node(victim, operator=f"op-{victim}",
                                                 stake_micro=STAKE, slots=SLOTS),
    }
    kills = _schedule(rng, list(restart))
    print(f"\nchaos seed {SEED}: {TASKS} tasks over {SUBMIT_S:.0f}s on {len(NODES)} nodes x "
          f"{SLOTS} slots; node runner under fire: {victim}; setup "
          f"{time.monotonic() - began:.1f}s", flush=True)

    client = Client(net.settings, net.bootstrap, "alice", net.passphrase)
    watch = client.watch()
    prices: dict[str, int] = {}
    units: dict[str, int] = {}
    tasks: list[str] = []
    revivals: list[tuple[float, str]] = []
    start, start_ms = time.monotonic(), now_ms()
    # One loop does it all, so the watch keeps granting data keys while tasks go in and
    # processes die: submit what is due, kill and restart what is due, poll the watch.
    while len(tasks) < TASKS or kills or revivals:
        now = time.monotonic() - start
        due = min(TASKS, int(now / SUBMIT_S * TASKS) + 1)
        while len(tasks) < due:
            q = client.quote(*_task(len(tasks)))
            task_id = client.submit(q, flush=False)
            tasks.append(task_id)
            prices[task_id], units[task_id] = q.quote.price_micro, q.quote.compute_units
        client.flush()
        while kills and kills[0][0] <= now:
            _, name = kills.pop(0)
            net.kill(name, signal.SIGKILL)
            pause = rng.uniform(0.2, 3.0)
            revivals.append((now + pause, name))
            revivals.sort()
            print(f"  t={now:6.1f}s  SIGKILL {name:<16} ({len(tasks)} submitted, "
                  f"{sum(p.verdict is not None for p in watch.progress.values())} verdicts); "
                  f"restart in {pause:.1f}s", flush=True)
        while revivals and revivals[0][0] <= now:
            _, name = revivals.pop(0)
            restart[name]()
            print(f"  t={now:6.1f}s  restarted {name}", flush=True)
        watch.poll(0.1)
    submitted_s = time.monotonic() - start

    try:
        done = client.wait(tasks, watch=watch, timeout_s=240)
    except DestraError as err:
        stuck = {t: watch.progress.get(t, Progress(t)).as_dict() for t in tasks
                 if watch.progress.get(t) is None or watch.progress[t].verdict is None}
        raise AssertionError(f"{len(stuck)} tasks stuck: {err}; "
                             f"{list(stuck.values())[:10]}; logs in {net.workdir}") from err
    run_s = time.monotonic() - start
    watch.close()
    client.close()
    net.check_alive()

    verdicts = _events(net, "TaskVerified", "TaskFailed")
    penalties = _events(net, "NodePenalized")
    states = Counter(p.state for p in done.values())
    failed = Counter(p.verdict.fields["reason"] for p in done.values()
                     if p.verdict is not None and p.verdict.name == "TaskFailed")
    print(f"outcome after {run_s:.1f}s ({submitted_s:.1f}s submitting; "
          f"{TASKS / run_s:.1f} tasks/s): verified {states['verified']}, failed "
          f"{states['failed']} {dict(failed)}; penalties "
          f"{dict(Counter((p.fields['reason'], p.fields['node_id']) for p in penalties))}; "
          f"reissues {len(_events(net, 'ReissueRequested'))}", flush=True)

    print(_timeline(net, start_ms, set(tasks)), flush=True)
    # Not invariants of the issue, but what the kills cost honest parties: assignments
    # appended after their own commit deadline (no node could have made it), and
    # penalties of nodes that were never killed.
    assigned = _stamped(net, "TaskAssigned")
    late = sum(ts > e.fields["commit_deadline"] for ts, e in assigned)
    innocent = Counter((p.fields["node_id"], p.fields["reason"]) for p in penalties
                       if p.fields["node_id"] != victim)
    print(f"assignments appended past their commit deadline: {late} of {len(assigned)}; "
          f"penalties of nodes never killed: {dict(innocent)}", flush=True)
    for p in done.values():
        if p.verdict is not None and p.verdict.name == "TaskFailed":
            print(f"  failed {p.task_id}: {p.verdict.fields['reason']}: "
                  f"{p.verdict.fields['detail']}", flush=True)

    # Every task has exactly one verdict, and no other task got one.
    counts = Counter(v.fields["task_id"] for v in verdicts)
    assert counts == Counter(dict.fromkeys(tasks, 1)), [
        (v.name, v.signer, v.fields["task_id"], v.fields.get("reason"), v.fields.get("detail"),
         v.occurred_at) for v in verdicts if counts[v.fields["task_id"]] > 1]
    # No replica placed twice, no replica paid twice (one agreeing contribution per node).
    placed = Counter((e.fields["task_id"], e.fields["replica_index"], e.fields["attempt"])
                     for e in _events(net, "TaskAssigned"))
    assert max(placed.values()) == 1, [r for r, c in placed.items() if c > 1][:5]
    for v in verdicts:
        if v.name == "TaskVerified":
            agreed = Counter(c["node_id"] for c in v.fields["contributions"] if c["agreed"])
            assert max(agreed.values()) == 1, v.fields

    # The ledger: each settlement or refund once per task, each slash once per penalty,
    # no entry twice, and no transaction posted twice (its entries are one posting each).
    closing = [f"{'settle' if v.name == 'TaskVerified' else 'refund'}/{v.fields['task_id']}"
               for v in verdicts]
    wait_for_transactions(net.settings, net.bootstrap,
                          closing + [f"slash/{p.event_id}" for p in penalties], timeout_s=180)
    entries = _events(net, "LedgerEntryPosted")
    ids = Counter(e.fields["entry_id"] for e in entries)
    assert max(ids.values()) == 1, [i for i, c in ids.items() if c > 1][:5]
    per_tx: dict[str, list[str]] = defaultdict(list)
    for e in entries:
        per_tx[e.fields["transaction_id"]].append(e.fields["entry_id"])
    for tx, entry_ids in per_tx.items():
        assert sorted(entry_ids) == sorted(f"{tx}/{i}" for i in range(len(entry_ids))), tx
    closed_by = Counter(tx.split("/", 1)[1] for tx in per_tx
                        if tx.startswith(("settle/", "refund/")))
    assert closed_by == Counter(dict.fromkeys(tasks, 1))
    payouts = Counter((e.fields["task_id"], e.fields["account"]) for e in entries
                      if e.fields["kind"] == "payout" and e.fields["account"].startswith("node:"))
    assert not payouts or max(payouts.values()) == 1

    projection = LedgerProjection(net.pg_dsn, "public")
    try:
        project_to_now(net.settings, net.bootstrap, projection)
        projection.check()  # what `destra ledger check` runs
        balances = dict(projection.balances())
    finally:
        projection.close()
    assert all(balances.get(escrow(t), 0) == 0 for t in tasks)
    assert balances == _expected(verdicts, prices, units, penalties)
    report = replay(net.settings, net.bootstrap, net.pg_dsn)
    assert report.matches, report
    print(f"ledger: {len(entries)} entries in {len(per_tx)} transactions, check passed, "
          f"replay {report.replay_hash[:16]} == live; test {time.monotonic() - began:.1f}s",
          flush=True)
