"""The dashboard's pages from a snapshot, without a server or a browser: every part
renders, text from the network is escaped, and the frame carries the parts."""

from __future__ import annotations

from click.testing import CliRunner

from destra.cli import cli
from destra.dashboard import pages
from destra.dashboard.hub import Snapshot


def _snapshot() -> Snapshot:
    task = {"task_id": "t<1>", "submitter_id": "alice", "workload": "matmul",
            "params": {"n": "64"}, "replicas": 2, "quorum": 2, "compute_units": 2,
            "price_micro": 216, "tier": "consumer", "status": "verified",
            "submitted_at": 1_000, "assigned_at": 1_500, "verified_at": 3_000,
            "digest": "ab" * 32, "failure_reason": None, "failure_detail": None,
            "assignments": 2, "commits": 2, "reveals": 2, "paid_micro": 200,
            "refunded_micro": 0,
            "replica_rows": [{"task_id": "t<1>", "node_id": "d0", "attempt": 0,
                              "replica_index": 0, "assigned_at": 1_500,
                              "committed_at": 2_000, "revealed_at": 2_500, "agreed": True,
                              "runtime_ms": 40, "penalized_reason": None}]}
    node = {"node_id": "d0", "operator_id": "op", "region": "eu-west", "device_name": "cpu",
            "device_class": "cpu", "tier": "consumer", "tflops_milli": 80, "memory_mb": 1024,
            "slots": 2, "stake_micro": 0, "registered_at": 1, "last_heartbeat_at": 2_900,
            "load_permille": 500, "free_slots": 1, "tasks_assigned": 1, "tasks_agreed": 1,
            "tasks_dissented": 0, "penalties": 0, "earned_micro": 100, "slashed_micro": 0}
    snap = Snapshot(version=1, views={
        "now": 3_100, "status_counts": {"verified": 1}, "failures": {}, "penalties": {},
        "nodes": [node], "verdicts": [[0, 1]], "earnings": [["node:d0", 0, 100]],
        "hops": {"submission to assignment": 500.0, "submission to verdict": 2000.0}},
        tasks={"t<1>": task}, recent=["t<1>"])
    snap.prices = [(1_000, "consumer", 100), (2_000, "consumer", 110)]
    snap.dead = [{"at": 1, "topic": "x", "partition": 0, "offset": 3, "error": "CorruptEvent",
                  "reason": "<script>"}]
    snap.proposals = [{"proposal_id": "p1", "title": "Lower", "parameter": "fee_bps",
                       "value": "300", "proposer": "op", "state": "passed",
                       "ballots_sent": 4, "yes_micro": 10, "no_micro": 1,
                       "abstain_micro": 0, "bonded_micro": 20, "deposit": "returned",
                       "detail": "ok", "submitted_at": 1}]
    return snap


def test_every_part_renders_and_escapes_what_the_network_wrote() -> None:
    parts = pages.render(_snapshot(), ["t<1>", "unknown"])
    assert set(parts) == {"tasks", "operators", "network", "governance", "task:t<1>"}
    assert "t&lt;1&gt;" in parts["tasks"]["html"]["tasks-table"]
    assert "<script>" not in parts["network"]["html"]["dead-table"]
    assert "destra result t&lt;1&gt; --account alice" in parts["task:t<1>"]["html"][
        "task-result"]
    assert parts["operators"]["plots"]["plot-map"]["data"][0]["type"] == "scattergeo"
    assert parts["network"]["plots"]["plot-prices"]["data"][0]["y"] == [100, 110]
    assert "passed" in parts["governance"]["html"]["proposals-table"]


def test_the_frame_carries_its_parts_and_the_plots_for_the_script() -> None:
    parts = pages.render(_snapshot(), [])
    html = pages.page("operators", "operators", parts["operators"], plots=True)
    assert "<section id='nodes-table'><div class='scroll'" in html
    assert "/static/plotly.min.js" in html and "scattergeo" in html
    assert "data-part='operators'" in html and "aria-current=page" in html


def test_the_command_is_registered() -> None:
    result = CliRunner().invoke(cli, ["dashboard", "--help"])
    assert result.exit_code == 0 and "--port" in result.output
