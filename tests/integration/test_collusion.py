"""Colluding nodes on a real broker and Postgres: caught, slashed, and their lie refused.

Two colluders (``tests/colluder.py``, each its own process, node identity, keys, Kafka
principal and staked operator account) run the real node runner's protocol but never
compute: for every replica they are assigned they commit to and reveal the same wrong
digest, ``sha256(b"collude:" + task_id)``, agreed on without a word between them. Honest
nodes of other operators run the real ``destra node run``.

Afterwards: every verdict carries the digest the workload really produces (computed here
on the CPU), every colluder placed on a task is penalized ``dissent`` and its stake is
slashed in the ledger by exactly its penalties, no honest node is penalized or slashed,
and every submitted task has its verdict: verified and settled, or failed and refunded.

Run with ``-s`` to see where each task was placed and how it ended.
"""

from __future__ import annotations

import random
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from destra.client import Client
from destra.network import LocalNetwork
from destra.settings import Settings
from infra.postgres import create_database
from ledger.book import escrow, stake
from ledger.processor import wait_for_transactions
from ledger.projection import LedgerProjection
from ledger.service import project_to_now
from schemas import Event
from tests.colluder import collusion_digest
from tests.support import TEARDOWN_GRACE_S, eventually
from workloads import get_workload
from workloads.canonical import sha256

pytestmark = pytest.mark.integration

HONEST = [f"h{i}" for i in range(4)]
COLLUDERS = ["x0", "x1"]
STAKE = 20_000_000  # 20 dissents: no slash here is capped by an empty stake
FUNDS = 10**12
TASKS = 12
SLOTS = 2


def _operator(node: str) -> str:
    return f"op-{node}"


def _params(i: int) -> dict[str, str]:
    return {"start": str(i * 1000), "count": "1000", "prefix": f"{i:04x}"}


def _honest_digest(params: dict[str, str]) -> bytes:
    """What the workload really outputs, computed here."""
    workload = get_workload("sha256-search")
    return sha256(workload.run(workload.validate(params), torch.device("cpu")).output)


@pytest.fixture
def net(network: Settings, kafka: str, pg_dsn: str, tmp_path: Path) -> Iterator[LocalNetwork]:
    settings = network.with_(home=tmp_path / "home")
    local = LocalNetwork(settings, kafka, create_database(pg_dsn), tmp_path / "logs", env_extra={
        # Roomy windows: on two shared cores an honest node must never miss one.
        "DESTRA_COMMIT_WINDOW_MS": "20000", "DESTRA_REVEAL_WINDOW_MS": "15000"})
    yield local
    local.stop(timeout_s=TEARDOWN_GRACE_S)


def start_colluder(net: LocalNetwork, name: str, operator: str, stake_micro: int,
                   slots: int) -> None:
    """A colluder, joined as `destra node join` does (its inbox, principal and ACLs), its
    stake consented to by its operator's keystore, run as its own process."""
    net.account_keys(operator)
    net.join_node(name)
    net.spawn(f"node-{name}", "-m", "tests.colluder", "--name", name, "--operator", operator,
              "--stake", str(stake_micro), "--slots", str(slots), producer_id=name)


def _balances(net: LocalNetwork) -> dict[str, int]:
    projection = LedgerProjection(net.pg_dsn, f"col{random.randrange(1 << 30):x}")
    try:
        project_to_now(net.settings, net.bootstrap, projection)
        projection.check()
        return dict(projection.balances())
    finally:
        projection.close()


def _by_task(events: list[Event]) -> dict[str, list[Event]]:
    out: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        out[e.fields["task_id"]].append(e)
    return out


@pytest.mark.timeout(400)
def test_colluders_are_caught_slashed_and_their_digest_refused(net: LocalNetwork) -> None:
    began = time.monotonic()
    nodes = HONEST + COLLUDERS
    net.mint("alice", *(_operator(n) for n in nodes), amount_micro=FUNDS)
    net.start_services()
    for n in HONEST:
        net.start_node(n, operator=_operator(n), stake_micro=STAKE, slots=SLOTS)
    for n in COLLUDERS:
        start_colluder(net, n, _operator(n), STAKE, SLOTS)
    net.wait_registered(nodes)
    # Every stake locked before any work: a slash is then measured against it.
    eventually(lambda: all(_balances(net).get(stake(n)) == STAKE for n in nodes),
               timeout=60, interval=0.5)
    print(f"\n{len(HONEST)} honest nodes, {len(COLLUDERS)} colluders up in "
          f"{time.monotonic() - began:.1f}s", flush=True)

    client = Client(net.settings, net.bootstrap, "alice", net.passphrase)
    watch = client.watch()
    honest: dict[str, bytes] = {}
    try:
        for i in range(TASKS):
            params = _params(i)
            task = client.submit(client.quote("sha256-search", params), flush=False)
            honest[task] = _honest_digest(params)
        client.flush()
        done = client.wait(list(honest), watch=watch, timeout_s=240)
    finally:
        watch.close()
        client.close()
    net.check_alive()

    assigned = _by_task(net.events("TaskAssigned"))
    verdicts = _by_task(net.events("TaskVerified") + net.events("TaskFailed"))
    penalties = net.events("NodePenalized")
    for task in honest:
        placed = [e.fields["node_id"] for e in assigned[task]]
        v = done[task].verdict
        assert v is not None
        how = ("verified " + ("honest" if v.fields["digest"] == honest[task] else "WRONG")
               if v.name == "TaskVerified" else f"failed {v.fields['reason']}")
        judged = [(p.fields["node_id"], p.fields["reason"]) for p in penalties
                  if p.fields["task_id"] == task]
        print(f"  {task}: placed on {placed}: {how}; penalized {judged}", flush=True)

    # Every task has exactly one verdict; a verified one the honest digest, never the lie.
    assert Counter({t: len(vs) for t, vs in verdicts.items() if t in honest}) == Counter(
        dict.fromkeys(honest, 1))
    for task, p in done.items():
        v = p.verdict
        assert v is not None
        if v.name == "TaskVerified":
            assert v.fields["digest"] == honest[task], (task, assigned[task], v.fields)
            assert v.fields["digest"] != collusion_digest(task)
            agreed = {c["node_id"] for c in v.fields["contributions"] if c["agreed"]}
            assert not agreed & set(COLLUDERS), (task, v.fields)
    # The colluders were placed, and each of them is penalized for dissent on every task
    # it was placed on that got a verdict; no honest node is penalized at all.
    placed_on = {n: {t for t, es in assigned.items() if t in honest
                     for e in es if e.fields["node_id"] == n} for n in nodes}
    assert all(placed_on[n] for n in COLLUDERS), placed_on
    judgements: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for p in penalties:
        judgements[p.fields["node_id"]].add((p.fields["task_id"], p.fields["reason"]))
    for n in COLLUDERS:
        verified_on = {t for t in placed_on[n] if done[t].state == "verified"}
        assert verified_on, (n, placed_on[n])
        assert {(t, "dissent") for t in verified_on} <= judgements[n], (n, judgements[n])
    assert not any(judgements[n] for n in HONEST), {n: judgements[n] for n in HONEST}

    # The books: each verdict settled or refunded, each penalty slashed; every escrow
    # empty; each colluder's stake short by exactly its slashes, each honest stake whole.
    closing = [f"{'settle' if p.state == 'verified' else 'refund'}/{t}" for t, p in done.items()]
    wait_for_transactions(net.settings, net.bootstrap,
                          closing + [f"slash/{p.event_id}" for p in penalties], timeout_s=120)
    balances = _balances(net)
    assert all(balances.get(escrow(t), 0) == 0 for t in honest)
    for n in COLLUDERS:
        slashed = sum(p.fields["slash_micro"] for p in penalties if p.fields["node_id"] == n)
        assert slashed >= 1, n
        assert balances.get(stake(n), 0) == STAKE - slashed, (n, balances.get(stake(n)))
    for n in HONEST:
        assert balances.get(stake(n), 0) == STAKE, n
    states = Counter(p.state for p in done.values())
    print(f"verdicts: {dict(states)}; penalties "
          f"{dict(Counter((p.fields['node_id'], p.fields['reason']) for p in penalties))}; "
          f"test {time.monotonic() - began:.1f}s", flush=True)
