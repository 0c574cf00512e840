"""``destra status``, ``destra tasks`` and ``destra nodes``: the Postgres task and node views.

The views are folded by the projector process (``python -m ledger.service``);
these commands only read them. ``destra.cli`` registers them on the ``destra``
group; the helpers they share with it come from ``destra.cli_common``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

from destra.cli_common import emit, load_settings, service_addresses, settings_options
from destra.errors import DestraError
from ledger.views import TASK_STATUSES, ViewProjection

F = TypeVar("F", bound=Callable[..., Any])


def _view_options(f: F) -> F:
    """The settings flags, ``--schema`` and ``--json``."""
    f = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(f)
    f = click.option("--schema", default="public", show_default=True,
                     help="Postgres schema the projector writes the views to.")(f)
    return settings_options(f)


def _open(flags: dict[str, Any], schema: str) -> ViewProjection:
    _, dsn = service_addresses(load_settings(**flags))
    return ViewProjection(dsn, schema)


def _when(ms: int | None) -> str:
    """A time in ms since the epoch as UTC text, or '-' when not reached yet."""
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _or_dash(value: Any) -> str:
    return "-" if value is None else str(value)


def _status(task_id: str, schema: str, as_json: bool, **flags: Any) -> None:
    """TASK_ID's status, price, replicas, payouts and verdict (from the task view)."""
    views = _open(flags, schema)
    try:
        task = views.task(task_id)
    finally:
        views.close()
    if task is None:
        raise DestraError(f"no task {task_id} in the task view (schema {schema}); "
                          "is the projector (python -m ledger.service) running?")
    emit(task, as_json, _task_text)


# Built without decorator syntax and typed as click.Command (written so while this
# module and destra.cli imported each other; harmless now that they do not).
status: click.Command = click.command("status")(
    _view_options(click.argument("task_id")(_status)))


def _task_text(t: dict[str, Any]) -> str:
    lines = [
        f"task {t['task_id']}: {t['status']}",
        f"  submitter {_or_dash(t['submitter_id'])}  workload {_or_dash(t['workload'])}  "
        f"params {t['params'] or {}}",
        f"  replicas {_or_dash(t['replicas'])}  quorum {_or_dash(t['quorum'])}  "
        f"units {_or_dash(t['compute_units'])}  tier {_or_dash(t['tier'])}  "
        f"price {_or_dash(t['price_micro'])} micro-tokens",
        f"  submitted {_when(t['submitted_at'])}  assigned {_when(t['assigned_at'])}  "
        f"verdict {_when(t['verified_at'])}",
        f"  {t['assignments']} assigned, {t['commits']} committed, {t['reveals']} revealed",
        f"  paid {t['paid_micro']}  refunded {t['refunded_micro']} micro-tokens",
    ]
    if t["digest"]:
        lines.append(f"  digest {t['digest']}")
    if t["failure_reason"]:
        lines.append(f"  failed: {t['failure_reason']}: {t['failure_detail']}")
    for r in t["replica_rows"]:
        agreed = {True: "agreed", False: "dissented", None: "-"}[r["agreed"]]
        runtime = "-" if r["runtime_ms"] is None else f"{r['runtime_ms']} ms"
        line = (f"  replica {_or_dash(r['replica_index'])} on {r['node_id']} "
                f"(attempt {r['attempt']}): assigned {_when(r['assigned_at'])}  "
                f"committed {_when(r['committed_at'])}  revealed {_when(r['revealed_at'])}  "
                f"runtime {runtime}  {agreed}")
        if r["penalized_reason"]:
            line += f"  penalized: {r['penalized_reason']}"
        lines.append(line)
    return "\n".join(lines)


def _tasks(status_: str | None, limit: int, schema: str, as_json: bool, **flags: Any) -> None:
    """The newest tasks first, with their status and money (from the task view)."""
    views = _open(flags, schema)
    try:
        rows = views.tasks(limit=limit, status=status_)
    finally:
        views.close()
    emit(rows, as_json, lambda rs: "\n".join(
        f"{r['task_id']:<40} {r['status']:<10} {_or_dash(r['workload']):<14} "
        f"{r['assignments']}/{_or_dash(r['replicas'])} assigned  "
        f"price {_or_dash(r['price_micro'])}  paid {r['paid_micro']}  "
        f"refunded {r['refunded_micro']}"
        + (f"  ({r['failure_reason']})" if r["failure_reason"] else "")
        for r in rs) or "no tasks")


tasks: click.Command = click.command("tasks")(_view_options(
    click.option("--status", "status_", type=click.Choice(TASK_STATUSES), default=None,
                 help="Only tasks in this status.")(
        click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True,
                     help="At most this many tasks.")(_tasks))))


def _nodes(schema: str, as_json: bool, **flags: Any) -> None:
    """Every node: operator, tier, device, load, earnings, slashing (from the node view)."""
    views = _open(flags, schema)
    try:
        rows = views.nodes()
    finally:
        views.close()
    emit(rows, as_json, lambda rs: "\n".join(
        f"{r['node_id']:<24} operator {_or_dash(r['operator_id']):<16} "
        f"{_or_dash(r['tier']):<10} {_or_dash(r['device_name']):<28} "
        f"load {_or_dash(r['load_permille'])}‰  {r['tasks_assigned']} assigned "
        f"{r['tasks_agreed']} agreed {r['tasks_dissented']} dissented  "
        f"earned {r['earned_micro']}  slashed {r['slashed_micro']}  "
        f"penalties {r['penalties']}  heartbeat {_when(r['last_heartbeat_at'])}"
        for r in rs) or "no nodes")


nodes: click.Command = click.command("nodes")(_view_options(_nodes))
