"""``destra audit`` (ledger.audit) on logs of whole in-memory networks (destra.sim).

The sim's log is turned into records as the topics would hold them, each
service event signed by its role's key of a test genesis; then the log is
audited as is (no discrepancy), and with events slipped in or taken out.
"""

from __future__ import annotations

from collections import Counter

import pytest

from destra.sim import Sim
from ledger.audit import AuditConfig, Record, audit
from node_runner.logic import Fault
from schemas import Event, new_event
from streams.authority import AUTHORITY, ROLES, Genesis, ServiceSigner
from streams.topics import topic_for
from tests.support import account_keys

SIGNERS = {role: ServiceSigner(role, account_keys(f"service {role}")) for role in ROLES}
GENESIS = Genesis({role: s.keys.signing_public for role, s in SIGNERS.items()})


def _signed(e: Event) -> Event:
    roles = AUTHORITY.get(e.name)
    if roles is None or e.signature is not None:
        return e
    if e.name == "TokensMinted" and "reason" not in e.fields:
        e = e.replace(reason="sim")  # the sim's mints leave out this required field
    return SIGNERS[e.producer_id if e.producer_id in roles else roles[0]].sign(e)


def records(sim: Sim) -> list[Record]:
    """The sim's log as topic records: one partition per topic, offsets in append order."""
    offsets: Counter[str] = Counter()
    out = []
    for entry in sim.runner.log:
        topic = topic_for(entry.event.name).suffix
        out.append(Record(_signed(entry.event), topic, 0, offsets[topic], entry.at_ms))
        offsets[topic] += 1
    return out


def _append(log: list[Record], event: Event, at_ms: int | None = None) -> Record:
    topic = topic_for(event.name).suffix
    offset = sum(r.topic == topic for r in log)
    r = Record(event, topic, 0, offset, at_ms if at_ms is not None else log[-1].timestamp)
    log.append(r)
    return r


def _run(faults: dict[str, Fault] | None = None, tasks: int = 3) -> Sim:
    sim = Sim(faults=faults)
    for i in range(tasks):
        sim.submit(f"t{i}")
    sim.runner.run_until(lambda: all(sim.verdict(f"t{i}") for i in range(tasks)),
                         max_ms=600_000)
    sim.runner.advance(5_000)  # let the ledger settle, the penalties post
    return sim


@pytest.fixture(scope="module")
def dissent() -> Sim:
    return _run({"n1": Fault.WRONG_RESULT})


def test_a_clean_run_with_a_dissenter_has_no_discrepancy(dissent: Sim) -> None:
    report = audit(records(dissent), GENESIS)
    assert report.ok, [str(d) for d in report.discrepancies]
    assert report.checked["verdicts"] == report.checked["verdicts_rederived"] == 3
    assert report.checked["penalties"] == report.checked["penalties_rederived"] > 0
    assert report.checked["ledger_entries"] == report.checked["ledger_entries_rederived"] > 0


@pytest.mark.parametrize("faults", [{"n0": Fault.NO_SHOW}, {"n2": Fault.LATE_REVEAL},
                                    {"n2": Fault.COPY}, {"n1": Fault.LATE}])
def test_runs_with_deadlines_reissues_and_copiers_have_no_discrepancy(
        faults: dict[str, Fault]) -> None:
    report = audit(records(_run(faults, tasks=2)), GENESIS)
    assert report.ok, [str(d) for d in report.discrepancies]


def test_a_task_nobody_grants_fails_no_data_key_without_discrepancy() -> None:
    sim = Sim(grants=False)
    sim.submit("t0", "sha256-search", {"count": "64", "prefix": "ab"})
    sim.runner.run_until(lambda: sim.verdict("t0") is not None, max_ms=120_000)
    sim.runner.advance(1_000)
    report = audit(records(sim), GENESIS)
    assert report.ok, [str(d) for d in report.discrepancies]


def test_a_verifier_signed_verdict_paying_a_dissenter_is_named(dissent: Sim) -> None:
    log = records(dissent)
    real = next(r.event for r in log if r.event.name == "TaskVerified"
                and not all(c["agreed"] for c in r.event.fields["contributions"]))
    units = max(c["compute_units"] for c in real.fields["contributions"])
    wrong = [{**c, "agreed": True, "compute_units": units} for c in real.fields["contributions"]]
    forged = SIGNERS["verifier"].sign(new_event(
        "TaskVerified", "verifier", task_id=real.fields["task_id"], digest=real.fields["digest"],
        quorum=real.fields["quorum"], result_ref=real.fields["result_ref"], contributions=wrong))
    slipped = _append(log, forged)
    report = audit(log, GENESIS)
    assert [(d.check, d.kind, d.event_id, d.where) for d in report.discrepancies] == [
        ("verifier", "unexpected", forged.event_id, slipped.where)], report.discrepancies
    dissenter = next(c["node_id"] for c in real.fields["contributions"] if not c["agreed"])
    assert dissenter in report.discrepancies[0].reason


def test_a_verdict_slipped_in_before_the_real_one_is_named_and_its_payout_too(
        dissent: Sim) -> None:
    log = records(dissent)
    real = next(r for r in log if r.event.name == "TaskVerified"
                and not all(c["agreed"] for c in r.event.fields["contributions"]))
    f = real.event.fields
    forged = SIGNERS["verifier"].sign(new_event(
        "TaskVerified", "verifier", task_id=f["task_id"], digest=f["digest"],
        quorum=f["quorum"], result_ref=f["result_ref"],
        contributions=[{**c, "agreed": True, "compute_units": 1} for c in f["contributions"]]))
    # The forgery comes first: the ledger settles by it and ignores the real verdict.
    log = [r for r in log if r is not real]
    _append(log, forged, real.timestamp)
    report = audit(log, GENESIS)
    named = {(d.check, d.kind, d.event_type) for d in report.discrepancies}
    assert ("verifier", "unexpected", "TaskVerified") in named
    assert any(d.event_id == forged.event_id and "the ledger moved money" in d.reason
               for d in report.discrepancies)


def test_a_forged_unsigned_ledger_entry_is_named(dissent: Sim) -> None:
    log = records(dissent)
    forged = new_event("LedgerEntryPosted", "ledger", entry_id="gift/0", transaction_id="gift",
                       account="user:mallory", amount_micro=10**9, kind="mint", task_id=None,
                       memo="")
    slipped = _append(log, forged)
    report = audit(log, GENESIS)
    assert [(d.check, d.kind, d.event_id, d.where) for d in report.discrepancies] == [
        ("authority", "unauthenticated", forged.event_id, slipped.where)]
    # Without a genesis (nothing trusted by signature) it is still money nobody decided.
    unsigned = [r if r.event.name not in AUTHORITY else
                Record(r.event.with_envelope(signature=None, signer=None), r.topic, r.partition,
                       r.offset, r.timestamp) for r in log]
    report = audit(unsigned, None)
    assert [(d.check, d.kind, d.event_id) for d in report.discrepancies] == [
        ("ledger", "unexpected", forged.event_id)], report.discrepancies


def test_a_ledger_signed_wrong_payout_is_named(dissent: Sim) -> None:
    log = records(dissent)
    settle = next(r for r in log if r.event.name == "LedgerEntryPosted"
                  and r.event.fields["transaction_id"].startswith("settle/")
                  and r.event.fields["account"].startswith("node:"))
    f = settle.event.fields
    changed = SIGNERS["ledger"].sign(settle.event.replace(account="node:n1").with_envelope(
        signature=None, signer=None))
    log = [r if r is not settle else Record(changed, r.topic, r.partition, r.offset,
                                            r.timestamp) for r in log]
    report = audit(log, GENESIS)
    kinds = {(d.check, d.kind, d.event_id) for d in report.discrepancies}
    assert ("ledger", "unexpected", changed.event_id) in kinds
    assert any(d.kind == "missing" and f["transaction_id"] in d.reason
               for d in report.discrepancies)


def test_a_deleted_penalty_for_a_real_dissent_is_reported_missing(dissent: Sim) -> None:
    log = records(dissent)
    penalty = next(r for r in log if r.event.name == "NodePenalized"
                   and r.event.fields["reason"] == "dissent")
    slash = [r for r in log if r.event.name == "LedgerEntryPosted"
             and r.event.fields["transaction_id"] == f"slash/{penalty.event.event_id}"]
    log = [r for r in log if r is not penalty and r not in slash]
    report = audit(log, GENESIS)
    assert [(d.check, d.kind, d.event_type, d.task_id) for d in report.discrepancies] == [
        ("verifier", "missing", "NodePenalized", penalty.event.fields["task_id"])]
    assert "dissent" in report.discrepancies[0].reason
    assert penalty.event.fields["node_id"] in report.discrepancies[0].reason


def test_a_penalty_for_a_fault_nobody_made_is_named(dissent: Sim) -> None:
    log = records(dissent)
    verified = next(r.event for r in log if r.event.name == "TaskVerified")
    honest = next(c["node_id"] for c in verified.fields["contributions"] if c["agreed"])
    # Made when it is appended (the log's clock): an older one the ledger refuses as stale.
    forged = SIGNERS["verifier"].sign(new_event(
        "NodePenalized", "verifier", occurred_at=log[-1].timestamp, node_id=honest,
        task_id=verified.fields["task_id"], reason="no_reveal", slash_micro=250_000,
        reputation_permille=950))
    _append(log, forged)
    report = audit(log, GENESIS)
    named = [(d.check, d.kind, d.event_id) for d in report.discrepancies]
    assert ("verifier", "unexpected", forged.event_id) in named
    # Slipped in after the fact, no ledger ever read it: the replay's slash is missing.
    assert {(d.check, d.kind, d.event_id) for d in report.discrepancies
            if d.check == "ledger"} == {("ledger", "missing", forged.event_id)}


def test_an_assignment_to_a_second_node_of_one_operator_is_named() -> None:
    sim = Sim()
    sim.submit("t0")
    sim.runner.run_until(lambda: sim.verdict("t0") is not None, max_ms=60_000)
    log = records(sim)
    first = next(r.event for r in log if r.event.name == "TaskAssigned")
    # A fourth replica of a 3-replica task, on a node that already runs one.
    extra = SIGNERS["allocator"].sign(first.replace(replica_index=3).with_envelope(
        event_id="00000000-0000-4000-8000-000000000001", signature=None, signer=None))
    _append(log, extra)
    report = audit(log, GENESIS)
    reasons = [d.reason for d in report.discrepancies if d.event_id == extra.event_id]
    assert any("outside the task's 3 replicas" in why for why in reasons), reasons
    assert any("already ran a replica" in why for why in reasons), reasons


def test_the_config_must_match_the_live_run() -> None:
    # Audited with fewer reissues allowed than the live verifier had, a reissue is unexpected.
    log = records(_run({"n0": Fault.NO_SHOW}, tasks=1))
    report = audit(log, GENESIS, AuditConfig(max_attempts=0))
    assert not report.ok
    assert any(d.event_type == "ReissueRequested" for d in report.discrepancies)
