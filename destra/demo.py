"""`destra demo`: the whole network on this machine, a mix of real tasks, and the books.

Brings up Kafka (KRaft) and Postgres, the ledger processor and projector, a
processors worker (the allocator and the verifier's shards) and five node runners, one of which
returns wrong results and one of which turns on long training runs later; mints tokens,
submits a mix of every workload and a few bad submissions, follows the tasks to their
verdicts; then adaptive trust: nodes that earned trust run tasks alone, spot checks
drawn at random, and a check that catches the turncoat, settled by bisecting the two
runs' checkpoints and re-executing one epoch; shows a result decrypted by its
submitter (private parameters and results travel encrypted) and prints a summary:
tasks verified, earnings per node, the dishonest nodes penalized, the ledger summing
to zero, the replay matching. Then it stops everything; with ``--keep`` it leaves the
network, Kafka and Postgres up and prints how to watch it with ``destra dashboard``.
Each run uses its own topic prefix and database, so runs never mix.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from destra.errors import DestraError
from destra.settings import Settings

NODES = [("n0", "eu-west"), ("n1", "eu-central"), ("n2", "us-east"), ("n3", "us-west"),
         ("n4", "ap-east")]
DISHONEST = "n4"
TURNCOAT = "n3"
"""Honest, but for long training runs (``--fault diverge``): caught in step 5."""
DEMO_FEE_BPS = 300
BURST = 24
VOTING_MS = 15_000
DEPOSIT = 1_000_000
TRUSTED_AFTER = 5
"""Agreements before a node runs tasks alone (the network's default is 10; the demo's
first rounds give each honest node about 11)."""
ADAPTIVE = [
    ("heat2d", {"grid": "64", "steps": "50"}),
    ("matmul", {"n": "128", "repeats": "2"}),
    ("nbody", {"n": "64", "steps": "50"}),
    ("heat2d", {"grid": "32", "steps": "100"}),
    ("matmul", {"n": "96", "repeats": "3"}),
    ("nbody", {"n": "32", "steps": "80"}),
]
LONG_RUN = ("mlp-digits", {"epochs": "8", "hidden": "16"})
"""8 segments of one epoch: the turncoat's checkpoints diverge from the 5th."""
LONG_RUN_TRIES = 16
"""The turncoat is in a task's pair with a chance of about 1/3 (the trusted node is the
fastest, its checker drawn among the 3 other staked nodes): 16 tries miss it about once
in 600 demos."""
STAKE = 5_000_000
FUNDS = 1_000_000_000
TASKS = [
    ("mlp-digits", {"epochs": "2", "hidden": "16"}),
    ("nbody", {"n": "64", "steps": "50"}),
    ("heat2d", {"grid": "64", "steps": "50"}),
    ("matmul", {"n": "128", "repeats": "2"}),
    ("sha256-search", {"count": "5000", "difficulty": "8",
                       "prefix": b"alice's secret message".hex()}),
    ("sweep", {"lrs": "0.01,0.03", "hidden_sizes": "16", "epochs": "1"}),
]


def run_demo(settings: Settings, *, keep: bool, echo: Callable[[str], None],
             rounds: int = 3) -> None:
    """Run the demo end to end; raises ``DestraError`` if any check fails."""
    from destra.client import Client
    from destra.network import LocalNetwork
    from infra import services
    from infra.postgres import create_database
    from ledger.processor import wait_for_transactions
    from ledger.projection import LedgerProjection
    from ledger.service import project, replay
    from schemas import decode
    from streams import security
    from streams.admin import ensure_topics
    from streams.reading import read_all
    from streams.security import INSECURE_WARNING
    from streams.topics import topic_for

    echo("1. starting Kafka (KRaft) and Postgres ...")
    t0 = time.monotonic()
    state = services.up(settings)
    echo(f"   kafka {state.kafka_bootstrap}, postgres {state.pg_dsn}  "
         f"[{time.monotonic() - t0:.1f}s]")
    bootstrap = state.kafka_bootstrap
    if services.insecure(settings, state):
        echo("   " + INSECURE_WARNING)
    security.use(services.admin_access(settings, state))  # the operator, in this process
    prefix = f"demo{uuid.uuid4().hex[:6]}."
    home = Path(tempfile.mkdtemp(prefix="destra-demo-"))
    run = settings.with_(kafka_bootstrap=bootstrap, topic_prefix=prefix, home=home,
                         producer_id="demo", kafka_insecure=services.insecure(settings, state))
    ensure_topics(bootstrap, prefix, replication_factor=settings.replication_factor,
                  min_insync_replicas=settings.min_insync_replicas)
    net = LocalNetwork(run, bootstrap, create_database(state.pg_dsn, "demo"), home / "logs",
                       env_extra={"DESTRA_COMMIT_WINDOW_MS": "60000",
                                  "DESTRA_PARAM_TRUSTED_AFTER": str(TRUSTED_AFTER),
                                  # Prices may move every 2 s; a ballot is open 15 s.
                                  "DESTRA_PRICE_INTERVAL_MS": "2000",
                                  "DESTRA_PRICE_TARGET_WAIT_MS": "2000",
                                  "DESTRA_PARAM_GOV_VOTING_MS": str(VOTING_MS),
                                  "DESTRA_PARAM_GOV_DEPOSIT_MICRO": str(DEPOSIT)})
    try:
        echo(f"2. network {prefix.rstrip('.')}: ledger processor, projector, allocator and "
             f"verifier shards (one processors worker), 5 node runners ({DISHONEST} returns "
             f"wrong results, {TURNCOAT} turns on long training runs)")
        # Each account registered (its keys, signed), then funded once the ledger bound it.
        net.mint("alice", *(f"op-{n}" for n, _ in NODES), amount_micro=FUNDS)
        net.start_services()
        for name, region in NODES:
            net.start_node(name, operator=f"op-{name}", region=region, stake_micro=STAKE,
                           slots=2, fault={DISHONEST: "wrong-result",
                                           TURNCOAT: "diverge"}.get(name))
        net.wait_registered([n for n, _ in NODES], timeout_s=180)
        echo(f"   minted {FUNDS} micro-tokens to alice and each operator; "
             f"each node staked {STAKE}")

        client = Client(run, bootstrap, "alice", net.passphrase)
        echo("3. bad submissions are refused with a reason:")
        for workload, params in [("no-such-workload", {}), ("nbody", {"n": "1"})]:
            try:
                client.quote(workload, params)
            except DestraError as e:
                echo(f"   {workload} {params}: {e}")
        watch = client.watch()
        broke = Client(run, bootstrap, "bob-has-no-tokens", net.passphrase)
        poor = broke.submit(broke.quote("matmul", {"n": "64"}))
        fresh = client.quote("matmul", {"n": "64"})
        # The same quote as if a minute had passed since it lapsed.
        stale_quote = replace(fresh, quote=replace(fresh.quote,
                                                   expires_at=fresh.quote.expires_at - 120_000))
        try:
            client.submit(stale_quote)
        except DestraError as e:
            echo(f"   expired quote: {e}")

        echo(f"4. {rounds} rounds of {len(TASKS)} tasks, 3 replicas each, quorum 2; the "
             "allocator learns runtimes from each round's verified results:")
        submitted: dict[str, str] = {}
        round_of: dict[str, int] = {}
        started = time.monotonic()
        shown: set[str] = set()

        def progress(p: object) -> None:
            from destra.client import Progress

            assert isinstance(p, Progress)
            if p.verdict is not None and p.task_id not in shown:
                shown.add(p.task_id)
                what = submitted.get(p.task_id, "bad submission")
                detail = (p.verdict.fields["digest"].hex()[:16] if p.state == "verified"
                          else f"{p.verdict.fields['reason']}: {p.verdict.fields['detail']}")
                echo(f"   [{time.monotonic() - started:5.1f}s] {p.task_id} {what:<14} "
                     f"{p.state}: {detail}")

        done = {}
        for r in range(rounds):
            echo(f"   round {r + 1}: submitted")
            batch = []
            for workload, params in TASKS:
                q = client.quote(workload, {**params, **_seed(workload, r)})
                task_id = client.submit(q)
                submitted[task_id], round_of[task_id] = workload, r + 1
                batch.append(task_id)
                echo(f"   {task_id} {workload:<14} {q.quote.compute_units:>6} units x 3 = "
                     f"{q.quote.price_micro} micro-tokens")
            echo(f"   round {r + 1}: verdicts as they arrive")
            done.update(client.wait(batch + ([poor] if r == 0 else []), watch=watch,
                                    timeout_s=900, on_progress=progress))
        adaptive, turncoat_caught = _adaptive_trust(client, watch, bootstrap, prefix, echo)
        watch.close()
        broke.close()
        problems = _economy(net, client, echo)

        echo("6. confidentiality: what the network saw of alice's hash search, and her result")
        search = next(t for t, w in submitted.items() if w == "sha256-search"
                      and done[t].state == "verified")
        sub = next(decode(m.value()) for m in read_all(bootstrap,
                                                       topic_for("TaskSubmitted").name(prefix))
                   if m.key() == search.encode())
        sealed = sub.fields["payload"] or b""
        echo(f"   on the topic: params {dict(sub.fields['params'])} in the clear (they set the "
             f"price); the prefix, start and difficulty sealed: {len(sealed)} bytes "
             f"{sealed[:12].hex()}...")
        grants = [e for e in (decode(m.value()) for m in read_all(
            bootstrap, topic_for("DataKeyGranted").name(prefix))) if e.name == "DataKeyGranted"]
        echo(f"   data key granted, wrapped to each assigned node's X25519 key: "
             f"{sorted(g.fields['node_id'] for g in grants if g.fields['task_id'] == search)}")
        result = client.result(search)
        echo(f"   destra result {search}: {len(result.output)} bytes from {result.node_id}, "
             f"SHA-256 = the verified digest {result.digest.hex()[:16]}...")
        echo(f"   {result.output[:400].decode(errors='replace')}")
        if b"alice's secret message".hex().encode() not in result.output:
            problems.append("the decrypted result does not echo the private prefix")
        client.close()

        echo("7. summary")
        verified = [p for t, p in done.items() if t in submitted and p.state == "verified"]
        echo(f"   tasks verified: {len(verified)} of {len(submitted)}; bad submission "
             f"{poor}: {done[poor].state} ({done[poor].as_dict().get('reason')})")
        dissent = Counter(c["node_id"] for p in [*verified, *adaptive.values()]
                          if p.verdict is not None and p.state == "verified"
                          for c in p.verdict.fields["contributions"] if not c["agreed"])
        # The ledger processor posts the settlements, and each slash while stake is left
        # (every node staked STAKE; penalties of one node are in order on their topic).
        left = {name: STAKE for name, _ in NODES}
        slashes = []
        for m in read_all(bootstrap, topic_for("NodePenalized").name(prefix)):
            penalty = decode(m.value())
            if left[penalty.fields["node_id"]] > 0:
                left[penalty.fields["node_id"]] -= penalty.fields["slash_micro"]
                slashes.append(f"slash/{penalty.event_id}")
        wait_for_transactions(run, bootstrap,
                              [f"settle/{p.task_id}" for p in verified] + slashes
                              + [f"settle/{t}" for t, p in adaptive.items()
                                 if p.state == "verified"])
        projection = LedgerProjection(net.pg_dsn)
        try:
            project(run, bootstrap, projection, idle_exit_s=3)
            entries = projection.check()
            balances = dict(projection.balances())
        finally:
            projection.close()
        for name, _ in NODES:
            echo(f"   {name}: earned {balances.get(f'node:{name}', 0):>9} micro-tokens, "
                 f"stake {balances.get(f'stake:{name}', 0):>8} (of {STAKE}), "
                 f"dissented {dissent.get(name, 0)}x")
        echo(f"   treasury (fees and slashes): {balances.get('treasury', 0)}; alice: "
             f"{balances.get('user:alice', 0)}")
        echo(f"   ledger: {entries} entries sum to zero, balances match")
        _runtimes(bootstrap, prefix, round_of, submitted, echo)
        report = replay(run, bootstrap, net.pg_dsn)
        echo(f"   replay from offset 0: {'matches' if report.matches else 'DIFFERS'} "
             f"({report.live_hash[:16]})")
        if len(verified) != len(submitted):
            problems.append(f"{len(submitted) - len(verified)} tasks not verified")
        if balances.get(f"node:{DISHONEST}", 0) != 0:
            problems.append(f"{DISHONEST} was paid")
        not_verified = [t for t, p in adaptive.items() if p.state != "verified"]
        if not_verified:
            problems.append(f"adaptive tasks not verified: {not_verified}")
        if turncoat_caught and balances.get(f"stake:{TURNCOAT}", 0) >= STAKE:
            problems.append(f"{TURNCOAT} was caught but not slashed")
        if not report.matches:
            problems.append("replay differs")
        if problems:
            raise DestraError("demo failed: " + "; ".join(problems) + f" (logs in {home})")
        echo("demo: OK")
    finally:
        if keep:
            _leave_up(settings, run, net, echo)
        else:
            codes = net.stop()
            echo(f"8. stopped the network ({sum(c == 0 for c in codes.values())} of "
                 f"{len(codes)} processes exited cleanly)")
            for line in services.down(settings):
                echo(f"   stopped {line}")


def _leave_up(settings: Settings, run: Settings, net: Any,
              echo: Callable[[str], None]) -> None:
    """``--keep``: the network's processes stay up, with Kafka and Postgres; says how to
    watch it (``destra dashboard``) and how to stop it."""
    import shlex

    pids = {name: proc.pid for name, proc in net.procs.items() if proc.poll() is None}
    pid_file = run.home / "network.pids"
    pid_file.write_text("".join(f"{pid} {name}\n" for name, pid in pids.items()))
    env = {"DESTRA_HOME": str(settings.home), "DESTRA_TOPIC_PREFIX": run.topic_prefix,
           "DESTRA_PG_DSN": net.pg_dsn, "DESTRA_GENESIS": str(run.genesis_path)}
    if settings.kafka_bootstrap:
        env["DESTRA_KAFKA_BOOTSTRAP"] = settings.kafka_bootstrap
    command = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    echo(f"8. the network is left up: {len(pids)} processes (pids in {pid_file}, logs in "
         f"{net.workdir}), Kafka and Postgres")
    echo(f"   watch it:  {command} destra dashboard --port 8050 "
         f"--metrics-home {shlex.quote(str(run.home))}   (http://127.0.0.1:8050/)")
    echo(f"   stop it:   kill {' '.join(str(p) for p in pids.values())} && destra infra down")


def _adaptive_trust(client: Any, watch: Any, bootstrap: str, prefix: str,
                    echo: Callable[[str], None]) -> tuple[dict[str, Any], bool]:
    """Step 5: adaptive trust on the nodes the first rounds made known. Returns every
    adaptive task's progress and whether the turncoat was caught."""
    from schemas import decode
    from streams.reading import read_all
    from streams.topics import topic_for

    def events(name: str) -> list[Any]:
        out = []
        for m in read_all(bootstrap, topic_for(name).name(prefix)):
            e = decode(m.value())
            if e.name == name:
                out.append(e)
        return out

    echo(f"5. adaptive trust (--trust adaptive: one replica's price + 30 %): a node that "
         f"agreed {TRUSTED_AFTER} times in a row, with stake, runs a task alone; a second "
         "node drawn at random checks it, at a rate that falls with its streak")
    done: dict[str, Any] = {}
    batch = []
    for i, (workload, params) in enumerate(ADAPTIVE):
        q = client.quote(workload, {**params, **_seed(workload, 10 + i)}, trust="adaptive")
        batch.append(client.submit(q))
    done.update(client.wait(batch, watch=watch, timeout_s=600))
    assigned = events("TaskAssigned")
    for task_id in batch:
        first = [e.fields["node_id"] for e in assigned
                 if e.fields["task_id"] == task_id and e.fields["round"] == 0]
        how = (f"alone on {first[0]} (trusted)" if len(first) == 1 else
               f"on {first[0]}, spot-checked by {first[1]}" if len(first) == 2 else
               f"on {', '.join(first)}")
        p = done[task_id]
        echo(f"   {task_id} {p.verdict.fields['digest'].hex()[:16] if p.verdict else '-'} "
             f"{p.state} {how}")
    echo(f"   long training runs ({LONG_RUN[0]} {LONG_RUN[1]}), with --replicas 2: each "
         f"checked by a second node drawn at random, until the check draws {TURNCOAT}")
    caught = False
    for i in range(LONG_RUN_TRIES):
        q = client.quote(LONG_RUN[0], {**LONG_RUN[1], **_seed(LONG_RUN[0], 20 + i)},
                         trust="adaptive", replicas=2)
        task_id = client.submit(q)
        done.update(client.wait([task_id], watch=watch, timeout_s=600))
        mine = [e for e in events("TaskAssigned") if e.fields["task_id"] == task_id]
        pair = [e.fields["node_id"] for e in mine if e.fields["round"] == 0]
        referee = [e for e in mine if e.fields["segment"] >= 0]
        penalties = [e for e in events("NodePenalized") if e.fields["task_id"] == task_id]
        p = done[task_id]
        echo(f"   {task_id} {p.state} on {' and '.join(pair)}"
             + ("" if referee or penalties else ": they agree"))
        if not referee and not penalties:
            continue
        reveals = [e for e in events("ResultRevealed") if e.fields["task_id"] == task_id]
        leaves = {e.fields["node_id"]: e.fields["checkpoints"] for e in reveals}
        if referee:
            r = referee[0].fields
            units = q.quote.compute_units
            segments = max((len(v) for v in leaves.values()), default=1)
            echo(f"     their results differ; bisecting their {segments} checkpoints finds "
                 f"the first divergence at segment {r['segment']}: referee {r['node_id']} "
                 f"re-ran that one epoch ({units // max(1, segments)} of {units} units, "
                 f"1/{segments} of a rerun)")
        for e in penalties:
            echo(f"     {e.fields['node_id']} penalized {e.fields['reason']}, slashed "
                 f"{e.fields['slash_micro']} micro-tokens")
        if p.verdict is not None and p.state == "verified":
            paid = [c["node_id"] for c in p.verdict.fields["contributions"] if c["agreed"]]
            echo(f"     verified {p.verdict.fields['digest'].hex()[:16]}; paid: "
                 f"{', '.join(paid)}")
        caught = any(e.fields["node_id"] == TURNCOAT for e in penalties)
        if caught:
            break
    if not caught:
        echo(f"   (the checks never drew {TURNCOAT} in {LONG_RUN_TRIES} tasks: about 1 chance "
             "in 600)")
    return done, caught


def _consumer_prices(net: Any) -> list[int]:
    return [e.fields["price_per_unit_micro"] for e in net.events("PriceUpdated")
            if e.fields["tier"] == "consumer"]


def _economy(net: Any, alice: Any, echo: Callable[[str], None]) -> list[str]:
    """Step 5b: the market under a burst of demand, and one governance round with secret
    ballots (the operators lower the fee). Returns the problems seen."""
    from destra.client import Client
    from destra.governance_client import proposals, propose, vote

    before = _consumer_prices(net)
    start = before[-1] if before else 100
    echo(f"5b. the market: the consumer price moved {len(before)} times in the rounds "
         f"({' -> '.join(map(str, [100, *before][-8:]))} micro-tokens a unit); now a burst "
         f"of {BURST} tasks x 3 replicas on 10 slots:")
    burst = [alice.submit(alice.quote("nbody", {"n": "256", "steps": "100",
                                                "seed": str(100 + i)}), flush=False)
             for i in range(BURST)]
    alice.flush()
    risen = time.monotonic() + 60
    while not any(p > start for p in _consumer_prices(net)[len(before):]):
        if time.monotonic() > risen:
            break
        time.sleep(1)
    done = alice.wait(burst, timeout_s=600)
    after = _consumer_prices(net)[len(before):]
    echo(f"   the price followed the queue: {' -> '.join(map(str, [start, *after]))} "
         f"({sum(p.state == 'verified' for p in done.values())} of {BURST} verified)")
    problems = [] if any(p > start for p in after) else ["the price did not rise in the burst"]
    echo(f"   governance: op-n0 proposes fee_bps 500 -> {DEMO_FEE_BPS}, escrowing "
         f"{DEPOSIT} micro-tokens; the operators vote by secret ballot, each weighed by "
         "its bonded stake")
    clients = {n: Client(net.settings, net.bootstrap, f"op-{n}", net.passphrase)
               for n, _ in NODES}
    try:
        pid = propose(clients["n0"], "fee_bps", str(DEMO_FEE_BPS), "Lower the fee",
                      deposit_micro=DEPOSIT)
        opened = time.monotonic() + 60
        while not any(e.fields["transaction_id"] == f"deposit/{pid}"
                      for e in net.events("LedgerEntryPosted")):
            if time.monotonic() > opened:
                return [*problems, f"proposal {pid} was never escrowed"]
            time.sleep(0.5)
        time.sleep(2)  # the governance processor reads the deposit entry, opening the ballot
        for n, choice in (("n0", "yes"), ("n1", "yes"), ("n2", "no"), ("n3", "abstain")):
            vote(clients[n], pid, choice)
        echo(f"   {pid}: 4 ballots sent (each a 2,885-byte Paillier ciphertext with its "
             "proof of one valid choice); only their weighted sum will be decrypted")
        deadline = time.monotonic() + VOTING_MS / 1000 + 60
        decided = None
        while decided is None or decided.get("state") == "open":
            if time.monotonic() > deadline:
                return [*problems, f"proposal {pid} was not decided"]
            time.sleep(1)
            decided = next((p for p in proposals(clients["n0"]) if p["proposal_id"] == pid),
                           None)
        echo(f"   {decided['state']}: yes {decided['yes_micro']}, no {decided['no_micro']}, "
             f"abstain {decided['abstain_micro']} of {decided['bonded_micro']} bonded; "
             f"deposit {decided['deposit']}; {decided['detail']}")
        changes = [e.fields for e in net.events("ParameterChanged")]
        if decided["state"] != "passed" or not changes:
            return [*problems, f"the fee proposal {pid} did not pass: {decided['detail']}"]
        echo(f"   ParameterChanged fee_bps = {changes[-1]['value']}, signed by governance: "
             "settlements from now on pay it")
        return problems
    finally:
        for c in clients.values():
            c.close()


def _seed(workload: str, r: int) -> dict[str, str]:
    if workload == "sha256-search":
        return {"start": str(r * 5000)}
    return {"seed": str(r)}


def _runtimes(bootstrap: str, prefix: str, round_of: dict[str, int],
              submitted: dict[str, str], echo: Callable[[str], None]) -> None:
    """The allocator's predicted runtimes against those the nodes reported, per workload."""
    import statistics

    from schemas import decode
    from streams.reading import read_all
    from streams.topics import topic_for

    def events(name: str) -> list[Any]:
        return [e for e in (decode(m.value()) for m in read_all(
            bootstrap, topic_for(name).name(prefix))) if e.name == name]

    predicted = {(a.fields["task_id"], a.fields["node_id"], a.fields["attempt"]):
                 a.fields["predicted_runtime_ms"] for a in events("TaskAssigned")}
    pairs: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for r in events("ResultRevealed"):
        f = r.fields
        key = (f["task_id"], f["node_id"], f["attempt"])
        if key in predicted and f["task_id"] in submitted:
            pairs.setdefault((submitted[f["task_id"]], round_of[f["task_id"]]), []).append(
                (predicted[key], f["runtime_ms"]))
    echo("   the allocator's predicted runtime of each replica vs what its node reported "
         "(median ms). A node's first run of a workload pays one-time costs (imports, "
         "datasets, first kernels) and is not learned from; until the model has history "
         "(and has fitted it, in the background) placement uses compute / measured speed "
         "alone; later rounds use the model learned from earlier verified results:")
    for (workload, r), values in sorted(pairs.items()):
        errors = [abs(p - a) / a for p, a in values if a > 0]
        error = (f"{100 * statistics.median(errors):5.0f} %" if errors
                 else "    - (ran in under 1 ms)")
        echo(f"     {workload:<14} round {r}  predicted "
             f"{statistics.median(p for p, _ in values):7.0f}  actual "
             f"{statistics.median(a for _, a in values):7.0f}  median error {error}")
    for r in sorted({r for _, r in pairs}):
        errors = [abs(p - a) / a for (_, rr), v in pairs.items() if rr == r for p, a in v
                  if a > 0]
        if errors:
            echo(f"     round {r}, all workloads: median error "
                 f"{100 * statistics.median(errors):5.0f} %")
