"""Read models of tasks and nodes in Postgres, folded from the lifecycle events.

``task_view``, ``task_replica_view`` and ``node_view`` (migration
``0003_views.sql``) answer "where is my task?" and "what has this node done
and earned?" without replaying topics. Like the ledger projection they are
exactly-once by construction: a batch's changes and the next offset of every
partition it came from are written in one Postgres transaction, and a
delivery below the stored offset is skipped inside that transaction.

Events come from nine topics, so their relative order is not the order they
happened in (an assignment can be read before its submission). Every write is
therefore an upsert that never loses what another event already filled in:
rows are created on first sight with NULLs for what is not known yet, a task's
status only moves forward (``task_status_rank``; verified and failed are
final), and each counter counts a natural key once (the first commit of a
replica, not every ``ResultCommitted`` that names it).

Times are the events' envelope ``occurred_at`` (ms since the epoch). Money is
integer micro-tokens, from ``LedgerEntryPosted`` only: the views show what the
ledger moved, not what a penalty or a verdict asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, LiteralString

from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from destra.errors import DestraError
from destra.settings import Settings
from ledger.projection import OffsetProjection
from schemas import Event
from streams.consumer import Delivery
from streams.topics import topic_for

PROJECTION = "views"
"""The projection's name in ``projection_offsets``."""

VIEW_EVENTS: tuple[str, ...] = (
    "TaskSubmitted", "LedgerEntryPosted", "TaskAssigned", "ResultCommitted", "RevealOpened",
    "ResultRevealed", "TaskVerified", "TaskFailed", "NodeRegistered", "NodeHeartbeat",
    "NodePenalized",
)
"""The event types the views fold; any other type on their topics is skipped."""

TASK_STATUSES: tuple[str, ...] = (
    "submitted", "escrowed", "assigned", "committing", "revealing", "verified", "failed",
)
"""Every status a task can show, in the order it moves through them."""

BATCH = 500

_TASK_COLUMNS = sql.SQL(
    "task_id, submitter_id, workload, params, replicas, quorum, compute_units, price_micro,"
    " tier, status, submitted_at, assigned_at, verified_at, digest, failure_reason,"
    " failure_detail, assignments, commits, reveals, paid_micro, refunded_micro"
)
_REPLICA_COLUMNS = sql.SQL(
    "node_id, attempt, replica_index, assigned_at, committed_at, revealed_at, agreed,"
    " runtime_ms, penalized_reason"
)
_NODE_COLUMNS = sql.SQL(
    "node_id, operator_id, region, device_name, device_class, tier, tflops_milli, memory_mb,"
    " slots, stake_micro, registered_at, last_heartbeat_at, load_permille, free_slots,"
    " tasks_assigned, tasks_agreed, tasks_dissented, penalties, earned_micro, slashed_micro"
)


class ViewError(DestraError):
    """A view query was given an argument it cannot answer (an unknown status)."""


def view_topics(settings: Settings) -> list[str]:
    """The full names of the topics the views read, each once, in catalogue order."""
    names: list[str] = []
    for event in VIEW_EVENTS:
        name = topic_for(event).name(settings.topic_prefix)
        if name not in names:
            names.append(name)
    return names


class ViewProjection(OffsetProjection):
    """Folds lifecycle events into ``task_view``, ``task_replica_view`` and ``node_view``."""

    name = PROJECTION

    def __init__(self, dsn: str, schema: str = "public") -> None:
        super().__init__(dsn, schema)
        self._handlers: dict[str, Callable[[Event], None]] = {
            name: getattr(self, f"_on_{name}") for name in VIEW_EVENTS
        }

    def _fold(self, d: Delivery) -> int:
        handler = self._handlers.get(d.event.name)
        if handler is None:
            return 0
        handler(d.event)
        return 1

    def _x(self, query: LiteralString, params: tuple[Any, ...]) -> int:
        """Execute one statement; returns the rows it touched."""
        return self._conn.execute(query, params).rowcount

    def _ensure_task(self, task_id: str) -> None:
        self._x("INSERT INTO task_view (task_id) VALUES (%s) ON CONFLICT DO NOTHING", (task_id,))

    def _ensure_node(self, node_id: str) -> None:
        self._x("INSERT INTO node_view (node_id) VALUES (%s) ON CONFLICT DO NOTHING", (node_id,))

    def _advance(self, task_id: str, status: str) -> None:
        """Move a task's status forward to ``status``; never backward, never off a verdict."""
        self._ensure_task(task_id)
        self._x("UPDATE task_view SET status = %s WHERE task_id = %s"
                " AND task_status_rank(%s) > task_status_rank(status)",
                (status, task_id, status))

    def _ensure_replica(self, task_id: str, node_id: str, attempt: int) -> None:
        """Create a replica row, with whatever a verdict or penalty already said of it."""
        self._x(
            "INSERT INTO task_replica_view (task_id, node_id, attempt, agreed, penalized_reason)"
            " SELECT %s, %s, %s, f.agreed, f.penalized_reason"
            " FROM (VALUES (1)) AS one LEFT JOIN task_node_facts f"
            " ON f.task_id = %s AND f.node_id = %s"
            " ON CONFLICT (task_id, node_id, attempt) DO NOTHING",
            (task_id, node_id, attempt, task_id, node_id))

    def _on_TaskSubmitted(self, e: Event) -> None:  # noqa: N802 - named for the event
        f = e.fields
        # The first submission of an id stands (so does the ledger's escrow).
        self._x(
            "INSERT INTO task_view (task_id, submitter_id, workload, params, replicas, quorum,"
            " compute_units, price_micro, tier, submitted_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (task_id) DO UPDATE SET submitter_id = EXCLUDED.submitter_id,"
            " workload = EXCLUDED.workload, params = EXCLUDED.params,"
            " replicas = EXCLUDED.replicas, quorum = EXCLUDED.quorum,"
            " compute_units = EXCLUDED.compute_units, price_micro = EXCLUDED.price_micro,"
            " tier = EXCLUDED.tier, submitted_at = EXCLUDED.submitted_at"
            " WHERE task_view.submitted_at IS NULL",
            (f["task_id"], f["submitter_id"], f["workload"], Jsonb(dict(f["params"])),
             f["replicas"], f["quorum"], f["compute_units"], f["quoted_price_micro"], f["tier"],
             e.occurred_at))

    def _on_LedgerEntryPosted(self, e: Event) -> None:  # noqa: N802
        f = e.fields
        account, amount, kind = str(f["account"]), int(f["amount_micro"]), f["kind"]
        task_id: str | None = f["task_id"]
        owner = account.partition(":")[2]
        if account.startswith("escrow:") and amount > 0:
            if f["transaction_id"] == f"escrow/{owner}":
                self._advance(task_id or owner, "escrowed")
        elif kind == "payout" and account.startswith("node:") and amount > 0:
            self._ensure_node(owner)
            self._x("UPDATE node_view SET earned_micro = earned_micro + %s WHERE node_id = %s",
                    (amount, owner))
            if task_id:
                self._ensure_task(task_id)
                self._x("UPDATE task_view SET paid_micro = paid_micro + %s WHERE task_id = %s",
                        (amount, task_id))
        elif kind == "refund" and account.startswith("user:") and amount > 0 and task_id:
            self._ensure_task(task_id)
            self._x("UPDATE task_view SET refunded_micro = refunded_micro + %s"
                    " WHERE task_id = %s", (amount, task_id))
        elif kind == "slash" and account.startswith(("stake:", "unbonding:")) and amount < 0:
            self._ensure_node(owner)
            self._x("UPDATE node_view SET slashed_micro = slashed_micro + %s WHERE node_id = %s",
                    (-amount, owner))

    def _on_TaskAssigned(self, e: Event) -> None:  # noqa: N802
        f = e.fields
        task_id, node_id, at = f["task_id"], f["node_id"], e.occurred_at
        self._advance(task_id, "assigned")
        self._ensure_replica(task_id, node_id, f["attempt"])
        first = self._x(
            "UPDATE task_replica_view SET replica_index = %s, assigned_at = %s"
            " WHERE task_id = %s AND node_id = %s AND attempt = %s AND assigned_at IS NULL",
            (f["replica_index"], at, task_id, node_id, f["attempt"]))
        if not first:
            return  # this placement was counted already
        self._x("UPDATE task_view SET assignments = assignments + 1,"
                " assigned_at = LEAST(coalesce(assigned_at, %s), %s) WHERE task_id = %s",
                (at, at, task_id))
        self._ensure_node(node_id)
        self._x("UPDATE node_view SET tasks_assigned = tasks_assigned + 1 WHERE node_id = %s",
                (node_id,))

    def _on_ResultCommitted(self, e: Event) -> None:  # noqa: N802
        f = e.fields
        task_id = f["task_id"]
        self._advance(task_id, "committing")
        self._ensure_replica(task_id, f["node_id"], f["attempt"])
        if self._x("UPDATE task_replica_view SET committed_at = %s WHERE task_id = %s"
                   " AND node_id = %s AND attempt = %s AND committed_at IS NULL",
                   (e.occurred_at, task_id, f["node_id"], f["attempt"])):
            self._x("UPDATE task_view SET commits = commits + 1 WHERE task_id = %s", (task_id,))

    def _on_RevealOpened(self, e: Event) -> None:  # noqa: N802
        self._advance(e.fields["task_id"], "revealing")

    def _on_ResultRevealed(self, e: Event) -> None:  # noqa: N802
        f = e.fields
        task_id = f["task_id"]
        self._advance(task_id, "revealing")  # a reveal proves the reveal phase opened
        self._ensure_replica(task_id, f["node_id"], f["attempt"])
        if self._x("UPDATE task_replica_view SET revealed_at = %s, runtime_ms = %s"
                   " WHERE task_id = %s AND node_id = %s AND attempt = %s"
                   " AND revealed_at IS NULL",
                   (e.occurred_at, f["runtime_ms"], task_id, f["node_id"], f["attempt"])):
            self._x("UPDATE task_view SET reveals = reveals + 1 WHERE task_id = %s", (task_id,))

    def _on_TaskVerified(self, e: Event) -> None:  # noqa: N802
        f = e.fields
        task_id = f["task_id"]
        self._ensure_task(task_id)
        self._x("UPDATE task_view SET status = 'verified', digest = %s, verified_at = %s"
                " WHERE task_id = %s AND status NOT IN ('verified', 'failed')",
                (f["digest"], e.occurred_at, task_id))
        for c in f["contributions"]:
            node_id, agreed = c["node_id"], bool(c["agreed"])
            new = self._x(
                "INSERT INTO task_node_facts (task_id, node_id, agreed, compute_units)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (task_id, node_id) DO UPDATE"
                " SET agreed = EXCLUDED.agreed, compute_units = EXCLUDED.compute_units"
                " WHERE task_node_facts.agreed IS NULL",
                (task_id, node_id, agreed, c["compute_units"]))
            if not new:
                continue  # a repeated verdict: this node's part is counted already
            self._x("UPDATE task_replica_view SET agreed = %s WHERE task_id = %s"
                    " AND node_id = %s", (agreed, task_id, node_id))
            self._ensure_node(node_id)
            if agreed:
                self._x("UPDATE node_view SET tasks_agreed = tasks_agreed + 1"
                        " WHERE node_id = %s", (node_id,))
            else:
                self._x("UPDATE node_view SET tasks_dissented = tasks_dissented + 1"
                        " WHERE node_id = %s", (node_id,))

    def _on_TaskFailed(self, e: Event) -> None:  # noqa: N802
        f = e.fields
        self._ensure_task(f["task_id"])
        self._x("UPDATE task_view SET status = 'failed', failure_reason = %s,"
                " failure_detail = %s, verified_at = %s"
                " WHERE task_id = %s AND status NOT IN ('verified', 'failed')",
                (f["reason"], f["detail"], e.occurred_at, f["task_id"]))

    def _on_NodeRegistered(self, e: Event) -> None:  # noqa: N802
        f = e.fields
        # The latest registration's description wins; the counters are kept.
        self._x(
            "INSERT INTO node_view (node_id, operator_id, region, device_name, device_class,"
            " tier, tflops_milli, memory_mb, slots, stake_micro, registered_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (node_id) DO UPDATE SET operator_id = EXCLUDED.operator_id,"
            " region = EXCLUDED.region, device_name = EXCLUDED.device_name,"
            " device_class = EXCLUDED.device_class, tier = EXCLUDED.tier,"
            " tflops_milli = EXCLUDED.tflops_milli, memory_mb = EXCLUDED.memory_mb,"
            " slots = EXCLUDED.slots, stake_micro = EXCLUDED.stake_micro,"
            " registered_at = EXCLUDED.registered_at"
            " WHERE node_view.registered_at IS NULL"
            " OR node_view.registered_at <= EXCLUDED.registered_at",
            (f["node_id"], f["operator_id"], f["region"], f["device_name"], f["device_class"],
             f["tier"], f["tflops_milli"], f["memory_mb"], f["slots"], f["stake_micro"],
             e.occurred_at))

    def _on_NodeHeartbeat(self, e: Event) -> None:  # noqa: N802
        f = e.fields
        self._ensure_node(f["node_id"])
        self._x("UPDATE node_view SET last_heartbeat_at = %s, load_permille = %s,"
                " free_slots = %s WHERE node_id = %s"
                " AND (last_heartbeat_at IS NULL OR last_heartbeat_at <= %s)",
                (e.occurred_at, f["load_permille"], f["free_slots"], f["node_id"],
                 e.occurred_at))

    def _on_NodePenalized(self, e: Event) -> None:  # noqa: N802
        f = e.fields
        node_id, task_id = f["node_id"], f["task_id"]
        self._ensure_node(node_id)
        self._x("UPDATE node_view SET penalties = penalties + 1 WHERE node_id = %s", (node_id,))
        if task_id:
            self._x("INSERT INTO task_node_facts (task_id, node_id, penalized_reason)"
                    " VALUES (%s, %s, %s) ON CONFLICT (task_id, node_id)"
                    " DO UPDATE SET penalized_reason = EXCLUDED.penalized_reason",
                    (task_id, node_id, f["reason"]))
            self._x("UPDATE task_replica_view SET penalized_reason = %s"
                    " WHERE task_id = %s AND node_id = %s", (f["reason"], task_id, node_id))

    # -- queries -----------------------------------------------------------------

    def _rows(self, query: sql.Composed, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with self._conn.cursor(row_factory=dict_row) as cur:
            return [_plain(r) for r in cur.execute(query, params).fetchall()]

    def task(self, task_id: str) -> dict[str, Any] | None:
        """One task with its placements (``replica_rows``), or None if never seen.

        ``replicas`` is how many replicas were asked for; ``replica_rows`` one dict per
        (node, attempt) placed. The digest is hex text, ``params`` a dict, times are
        ms since the epoch.
        """
        rows = self._rows(sql.SQL("SELECT {} FROM task_view WHERE task_id = %s").format(
            _TASK_COLUMNS), (task_id,))
        if not rows:
            return None
        task = rows[0]
        task["replica_rows"] = self._rows(sql.SQL(
            "SELECT {} FROM task_replica_view WHERE task_id = %s"
            " ORDER BY replica_index NULLS LAST, attempt, node_id").format(_REPLICA_COLUMNS),
            (task_id,))
        return task

    def tasks(self, limit: int = 50, status: str | None = None) -> list[dict[str, Any]]:
        """The newest tasks first (by submission, else first assignment or verdict)."""
        if status is not None and status not in TASK_STATUSES:
            raise ViewError(f"unknown task status {status!r}; one of {', '.join(TASK_STATUSES)}")
        if limit < 1:
            raise ViewError(f"limit {limit} must be at least 1")
        return self._rows(sql.SQL(
            "SELECT {} FROM task_view WHERE (%s::text IS NULL OR status = %s)"
            " ORDER BY coalesce(submitted_at, assigned_at, verified_at) DESC NULLS LAST,"
            " task_id DESC LIMIT %s").format(_TASK_COLUMNS), (status, status, limit))

    def nodes(self) -> list[dict[str, Any]]:
        """Every node seen, by id."""
        return self._rows(sql.SQL("SELECT {} FROM node_view ORDER BY node_id").format(
            _NODE_COLUMNS))



def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """A row as JSON-ready values: bytes (digests) as hex text."""
    return {k: bytes(v).hex() if isinstance(v, bytes | memoryview) else v
            for k, v in row.items()}
