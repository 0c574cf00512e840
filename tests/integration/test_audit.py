"""``destra audit`` on a real broker: a clean lifecycle with a dishonest node audits clean;
a verdict signed with the verifier's real key but paying the dishonest node is named."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from destra.client import Client
from destra.network import LocalNetwork
from destra.settings import Settings
from infra.postgres import create_database
from ledger.processor import wait_for_transactions
from schemas import new_event
from streams.authority import load_signer
from streams.producer import EventProducer
from streams.topics import topic_for
from tests.support import TEARDOWN_GRACE_S

pytestmark = pytest.mark.integration

NODES = {"a": None, "b": None, "c": "wrong-result"}
STAKE = 10_000_000  # five dissents of 1_000_000 each are all slashed



def _audit(net: LocalNetwork) -> tuple[int, dict[str, Any]]:
    done = subprocess.run([sys.executable, "-m", "destra", "audit", "--json"], env=net.env(),
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.stdout.strip(), done.stderr
    return done.returncode, json.loads(done.stdout)


@pytest.fixture
def net(network: Settings, kafka: str, pg_dsn: str, tmp_path: Path) -> Iterator[LocalNetwork]:
    settings = network.with_(home=tmp_path / "home")
    local = LocalNetwork(settings, kafka, create_database(pg_dsn), tmp_path / "logs", env_extra={
        "DESTRA_COMMIT_WINDOW_MS": "20000", "DESTRA_REVEAL_WINDOW_MS": "10000"})
    local.mint("alice", *(f"op-{n}" for n in NODES))
    yield local
    local.stop(timeout_s=TEARDOWN_GRACE_S)


def test_audit_of_a_clean_run_is_clean_and_names_a_wrong_payee_verdict(
        net: LocalNetwork) -> None:
    net.start_services()
    for name, fault in NODES.items():
        net.start_node(name, operator=f"op-{name}", stake_micro=STAKE, fault=fault)
    net.wait_registered(list(NODES))
    client = Client(net.settings, net.bootstrap, "alice", net.passphrase)
    watch = client.watch()
    tasks = [client.submit(client.quote("heat2d", {"grid": "8", "steps": "5", "seed": str(i)}))
             for i in range(5)]
    done = client.wait(tasks, watch=watch, timeout_s=240)
    watch.close()
    client.close()
    assert {t: p.state for t, p in done.items()} == dict.fromkeys(tasks, "verified")
    penalties = net.events("NodePenalized")
    assert {(p.fields["node_id"], p.fields["reason"]) for p in penalties} == {("c", "dissent")}
    wait_for_transactions(net.settings, net.bootstrap,
                          [f"settle/{t}" for t in tasks] + [f"slash/{p.event_id}"
                                                            for p in penalties])
    net.check_alive()
    net.stop()  # a quiet log: nothing in flight while it is audited

    code, report = _audit(net)
    assert (code, report["discrepancies"]) == (0, 0), report["findings"]
    assert report["checked"]["verdicts"] == report["checked"]["verdicts_rederived"] == 5
    assert report["checked"]["penalties"] == report["checked"]["penalties_rederived"] == 5

    # Signed with the verifier's own key, but paying the node that dissented.
    real = next(e for e in net.events("TaskVerified") if e.fields["task_id"] == tasks[0])
    units = max(c["compute_units"] for c in real.fields["contributions"])
    verifier = load_signer(net.settings.service_keys, "verifier", net.genesis)
    forged = verifier.sign(new_event(
        "TaskVerified", "verifier", task_id=tasks[0], digest=real.fields["digest"],
        quorum=real.fields["quorum"], result_ref=real.fields["result_ref"],
        contributions=[{**c, "agreed": True, "compute_units": units}
                       for c in real.fields["contributions"]]))
    with EventProducer(net.settings, net.bootstrap) as producer:
        producer.send(forged)

    code, report = _audit(net)
    assert code == 1
    assert [(f["check"], f["kind"], f["event_type"], f["event_id"])
            for f in report["findings"]] == [
        ("verifier", "unexpected", "TaskVerified", forged.event_id)], report["findings"]
    assert "'c'" in report["findings"][0]["reason"]
    assert report["findings"][0]["where"].startswith(
        topic_for("TaskVerified").name(net.settings.topic_prefix))
