"""Progress in the terminal (``destra.progress``): plain lines off a terminal, bars and
spinners on one, nothing but the JSON on stdout with ``--json``."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

import destra.cli
import destra.client
import governance.keys
from destra.cli import cli
from destra.client import Progress
from destra.progress import LiveReporter, Reporter, Step, task_line
from infra import services


def _verified(p: Progress) -> Progress:
    p.verdict = SimpleNamespace(  # type: ignore[assignment]
        name="TaskVerified", fields={"digest": bytes(32), "contributions": []})
    return p


def _moves(task_id: str = "task-1") -> list[Progress]:
    """A task's progress as ``Watch.until_done`` reports it: each move, one object."""
    p = Progress(task_id)
    moves = []
    for change in ({}, {"assigned": 1}, {"assigned": 2}, {"assigned": 3}, {"committed": 1},
                   {"committed": 3}, {"revealed": 2}, {"revealed": 3}):
        for k, v in change.items():
            setattr(p, k, v)
        moves.append(Progress(**{**vars(p)}))
    moves.append(_verified(Progress(**{**vars(p)})))
    moves.insert(2, Progress(**{**vars(moves[1])}))  # a move that changes no count
    return moves


def test_off_a_terminal_a_task_prints_one_plain_line_per_change() -> None:
    out = io.StringIO()
    with Reporter.for_stream(out) as progress:
        progress.expect("task-1", replicas=3)  # no line
        for p in _moves():
            progress.task(p, replicas=3)
    assert type(progress) is Reporter
    assert out.getvalue() == (
        "  queued: 0 assigned, 0 granted, 0 committed, 0 revealed\n"
        "  running: 1 assigned, 0 granted, 0 committed, 0 revealed\n"
        "  running: 2 assigned, 0 granted, 0 committed, 0 revealed\n"
        "  running: 3 assigned, 0 granted, 0 committed, 0 revealed\n"
        "  running: 3 assigned, 0 granted, 1 committed, 0 revealed\n"
        "  running: 3 assigned, 0 granted, 3 committed, 0 revealed\n"
        "  revealing: 3 assigned, 0 granted, 3 committed, 2 revealed\n"
        "  revealing: 3 assigned, 0 granted, 3 committed, 3 revealed\n"
        "  verified: 3 assigned, 0 granted, 3 committed, 3 revealed\n")
    assert task_line(_moves()[-1]) == "  verified: 3 assigned, 0 granted, 3 committed, 3 revealed"


def test_off_a_terminal_each_note_is_a_line_and_steps_too() -> None:
    out = io.StringIO()
    with Reporter.for_stream(out) as progress:
        progress.step(Step("Kafka: starting 1 broker"))
        progress.step("the broker certificate did not name h: reissued")
        progress.step(Step("Postgres migrations"))
    assert out.getvalue() == ("Kafka: starting 1 broker\n"
                              "the broker certificate did not name h: reissued\n"
                              "Postgres migrations\n")


def test_disabled_it_prints_only_the_notes_that_are_not_steps() -> None:
    out = io.StringIO()
    with Reporter.for_stream(out, enabled=False, force_terminal=True) as progress:
        for p in _moves():
            progress.task(p, replicas=3)
        progress.step(Step("topics"))
        progress.step("a warning")
    assert out.getvalue() == "a warning\n"


def test_a_stream_that_is_not_a_terminal_gets_plain_lines_even_when_term_is_set(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERM", "xterm-256color")
    assert type(Reporter.for_stream(io.StringIO())) is Reporter

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(Reporter.for_stream(Tty()), LiveReporter)
    monkeypatch.setenv("TERM", "dumb")
    assert type(Reporter.for_stream(Tty())) is Reporter


def test_on_a_terminal_a_task_bar_shows_its_state_counts_and_elapsed_time() -> None:
    out = io.StringIO()
    progress = Reporter.for_stream(out, force_terminal=True)
    assert isinstance(progress, LiveReporter)
    progress.console.width = 160
    moves = _moves()
    progress.expect("task-1", replicas=3)
    assert "task-1" in out.getvalue() and "queued" in out.getvalue()
    assert "0/3 assigned" in out.getvalue()
    progress.task(moves[4], replicas=3)
    mid = out.getvalue()
    assert "task-1" in mid and "running" in mid
    assert "3/3 assigned" in mid and "0/3 committed" in mid and "0/3 revealed" in mid
    assert "granted" not in mid  # an unencrypted task has no data key to grant
    assert "\x1b[" in mid  # drawn, not printed
    encrypted = Progress("task-2", assigned=3, encrypted=True, granted=2)
    progress.task(encrypted, replicas=3)
    assert "awaiting-key" in out.getvalue() and "2/3 granted" in out.getvalue()
    for p in moves[5:]:
        progress.task(p, replicas=3)
    progress.close()
    end = out.getvalue()
    assert "verified" in end and "3/3 revealed" in end and "✔" in end
    assert "s\x1b" in end or "s\n" in end  # the elapsed seconds column ("0.0s")
    assert "  running: 3 assigned" not in end  # no plain lines


def test_on_a_terminal_each_step_spins_then_gets_a_tick_and_notes_print_above() -> None:
    out = io.StringIO()
    progress = Reporter.for_stream(out, force_terminal=True)
    assert isinstance(progress, LiveReporter)
    progress.console.width = 120
    progress.step(Step("Kafka 4.4.0 jars (Maven, cached once per machine)"))
    progress.step(Step("Kafka: starting 1 broker"))
    progress.step("the broker certificate did not name h: reissued")
    progress.step(Step("Postgres migrations"))
    progress.close()
    end = out.getvalue()
    last = end[end.rindex("Kafka 4.4.0 jars") - 40:]  # the final picture
    assert last.count("✔") == 3 and "Postgres migrations" in last and "Kafka: starting" in last
    assert "the broker certificate did not name h: reissued" in end
    assert "0.0s" in last


def test_on_a_terminal_a_failed_step_gets_a_cross() -> None:
    out = io.StringIO()
    with pytest.raises(RuntimeError):
        with Reporter.for_stream(out, force_terminal=True) as progress:
            progress.step(Step("Postgres: starting"))
            raise RuntimeError("no")
    end = out.getvalue()
    assert "✘" in end[end.rindex("Postgres: starting") - 30:]


class _FakeClient:
    """Stands in for ``destra.client.Client``: a quote, a submission, a wait."""

    def __init__(self, settings: Any, bootstrap: str, account: str,
                 passphrase: bytes | None = None) -> None:
        self.closed = False

    def quote(self, workload: str, params: dict[str, str], **options: Any) -> Any:
        q = SimpleNamespace(quote_id="q-1", compute_units=5, tier="consumer", price_micro=15,
                            expires_at=1)
        return SimpleNamespace(replicas=3, quote=q,
                               as_dict=lambda: {"workload": workload, "price_micro": 15})

    def watch(self) -> Any:
        return SimpleNamespace(close=lambda: None)

    def submit(self, q: Any, **options: Any) -> str:
        return "task-1"

    def data_key(self, task_id: str) -> bytes | None:
        return None

    def wait(self, task_ids: list[str], *, watch: Any, timeout_s: float,
             on_progress: Any) -> dict[str, Progress]:
        moves = _moves(task_ids[0])
        for p in moves:
            on_progress(p)
        return {task_ids[0]: moves[-1]}

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(destra.client, "Client", _FakeClient)
    monkeypatch.setattr(destra.cli, "kafka_address", lambda *a, **k: "localhost:1")
    monkeypatch.setattr(destra.cli, "_passphrase", lambda: None)


@pytest.mark.usefixtures("fake_client")
def test_submit_wait_json_prints_one_json_document_and_no_progress(tmp_path: Path) -> None:
    run = CliRunner().invoke(cli, ["submit", "nbody", "--home", str(tmp_path), "--wait",
                                   "--json"])
    assert run.exit_code == 0, run.output
    doc = json.loads(run.stdout)
    assert doc["task_id"] == "task-1" and doc["state"] == "verified"
    assert doc["revealed"] == 3 and doc["quote"] == {"workload": "nbody", "price_micro": 15}
    assert run.stderr == ""


@pytest.mark.usefixtures("fake_client")
def test_submit_wait_off_a_terminal_prints_the_plain_lines_on_stderr(tmp_path: Path) -> None:
    run = CliRunner().invoke(cli, ["submit", "nbody", "--home", str(tmp_path), "--wait"])
    assert run.exit_code == 0, run.output
    assert run.stdout.splitlines() == [
        "quote q-1: 5 units x 3 replicas in consumer = 15 micro-tokens (valid until 1)",
        "submitted task-1", f"verified: digest {'00' * 32}"]
    lines = [task_line(p) for p in _moves()]
    assert run.stderr.splitlines() == [line for i, line in enumerate(lines)
                                       if i == 0 or lines[i - 1] != line]
    assert len(run.stderr.splitlines()) == 9


def test_infra_up_hands_its_steps_to_the_reporter(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    def up(settings: Any, say: Any) -> None:
        say(Step("topics"))
        say("a certificate note")
        say(Step("Postgres migrations"))

    monkeypatch.setattr(services, "up", up)
    monkeypatch.setattr(services, "status",
                        lambda settings: {"running": False, "state_file": "s"})
    monkeypatch.setattr(governance.keys, "ensure_tally_key", lambda *a: None)
    plain = CliRunner().invoke(cli, ["infra", "up", "--home", str(tmp_path)])
    assert plain.exit_code == 0, plain.output
    assert plain.stderr == "topics\na certificate note\nPostgres migrations\n"
    as_json = CliRunner().invoke(cli, ["infra", "up", "--home", str(tmp_path), "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout) == {"running": False, "state_file": "s"}
    assert as_json.stderr == "a certificate note\n"
