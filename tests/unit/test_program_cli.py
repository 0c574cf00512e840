"""The client and command line for user programs (issue 15): ``destra submit --program``,
``Client.quote_program``, ``destra result`` writing a program's safetensors output.

``workloads.program`` is built on another branch: the tests that need it skip without it.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

import destra.cli
import destra.client
from allocator.pricing import PriceBook
from destra.cli import cli
from destra.client import Client, TaskQuote, TaskResult

PROGRAM_PARAMS = {"program_sha256": "ab" * 32, "input_sha256": "cd" * 32, "units": "1200",
                  "memory_mb": "96", "steps": "2", "carry": "1", "mantissa_bits": "0",
                  "max_runtime_ms": "45000", "program": "UEsDBA==", "input": "e30="}


class _FakeClient:
    """Stands in for ``destra.client.Client``: records what the command asked for."""

    calls: list[tuple[str, Any]] = []
    output = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "

    def __init__(self, settings: Any, bootstrap: str, account: str,
                 passphrase: bytes | None = None) -> None:
        pass

    def _quote(self, params: dict[str, str]) -> Any:
        q = SimpleNamespace(quote_id="q-1", compute_units=1200, tier="consumer",
                            price_micro=3600, expires_at=1)
        public = {k: v for k, v in params.items() if k not in ("program", "input")}
        return SimpleNamespace(
            replicas=3, quote=q, params=params,
            as_dict=lambda private=True: {"params": params if private else public})

    def quote(self, workload: str, params: dict[str, str], **options: Any) -> Any:
        self.calls.append(("quote", (workload, params)))
        return self._quote(params)

    def quote_program(self, program: bytes, inputs: bytes, **options: Any) -> Any:
        self.calls.append(("quote_program", (program, inputs, options)))
        return self._quote(PROGRAM_PARAMS)

    def submit(self, q: Any, **options: Any) -> str:
        return "task-1"

    def data_key(self, task_id: str) -> bytes | None:
        return b"k"

    def result(self, task_id: str, say: Any = None) -> TaskResult:
        return TaskResult(task_id, self.output, bytes(32), "n1", "program")

    def close(self) -> None:
        pass


@pytest.fixture
def fake_client(monkeypatch: pytest.MonkeyPatch) -> type[_FakeClient]:
    _FakeClient.calls = []
    monkeypatch.setattr(destra.client, "Client", _FakeClient)
    monkeypatch.setattr(destra.cli, "kafka_address", lambda *a, **k: "localhost:1")
    monkeypatch.setattr(destra.cli, "_passphrase", lambda: None)
    return _FakeClient


def _files(tmp_path: Path) -> tuple[Path, Path]:
    program, inputs = tmp_path / "model.pt2", tmp_path / "x.safetensors"
    program.write_bytes(b"PK\x03\x04 a program")
    inputs.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    return program, inputs


def test_submit_program_shows_units_memory_and_the_runtime_bound_before_paying(
        fake_client: type[_FakeClient], tmp_path: Path) -> None:
    program, inputs = _files(tmp_path)
    run = CliRunner().invoke(cli, ["submit", "--program", str(program), "--input",
                                   str(inputs), "--steps", "2", "--carry", "1",
                                   "--home", str(tmp_path)])
    assert run.exit_code == 0, run.output
    lines = run.stdout.splitlines()
    assert lines[0] == ("program abababababababab on inputs cdcdcdcdcdcdcdcd: 1,200 compute "
                        "units, peak memory 96 MiB, runtime bound 45000 ms per replica "
                        "(2 step(s))")
    assert lines[1].startswith("quote q-1: 1200 units x 3 replicas")
    assert lines[2] == "submitted task-1"
    (name, (sent_program, sent_inputs, options)), = fake_client.calls
    assert name == "quote_program" and sent_program == program.read_bytes()
    assert sent_inputs == inputs.read_bytes()
    assert options["steps"] == 2 and options["carry"] == 1 and options["mantissa_bits"] == 0
    assert options["max_runtime_ms"] == 0  # the rule's bound unless stated


def test_submit_program_passes_a_stated_runtime_bound(
        fake_client: type[_FakeClient], tmp_path: Path) -> None:
    program, inputs = _files(tmp_path)
    run = CliRunner().invoke(cli, ["submit", "--program", str(program), "--input",
                                   str(inputs), "--max-runtime-ms", "1500",
                                   "--home", str(tmp_path)])
    assert run.exit_code == 0, run.output
    (_, (_, _, options)), = fake_client.calls
    assert options["max_runtime_ms"] == 1500


def test_submit_program_json_is_one_document_without_the_programs_bytes(
        fake_client: type[_FakeClient], tmp_path: Path) -> None:
    program, inputs = _files(tmp_path)
    run = CliRunner().invoke(cli, ["submit", "--program", str(program), "--input",
                                   str(inputs), "--json", "--home", str(tmp_path)])
    assert run.exit_code == 0, run.output
    doc = json.loads(run.stdout)
    assert doc["task_id"] == "task-1"
    assert doc["quote"]["params"]["max_runtime_ms"] == "45000"
    assert "program" not in doc["quote"]["params"] and "input" not in doc["quote"]["params"]


@pytest.mark.parametrize(("args", "why"), [
    (["nbody", "--program", "{p}", "--input", "{i}"], "no WORKLOAD"),
    (["--program", "{p}", "-p", "n=3", "--input", "{i}"], "no WORKLOAD"),
    (["--program", "{p}"], "--input FILE.safetensors"),
    (["nbody", "--input", "{i}"], "--input goes with --program"),
    ([], "give a WORKLOAD"),
])
def test_submit_takes_a_workload_or_a_program_never_both(
        fake_client: type[_FakeClient], tmp_path: Path, args: list[str], why: str) -> None:
    program, inputs = _files(tmp_path)
    args = [a.format(p=program, i=inputs) for a in args]
    run = CliRunner().invoke(cli, ["submit", *args, "--home", str(tmp_path)])
    assert run.exit_code == 2 and why in run.output, run.output
    assert fake_client.calls == []


def test_result_of_a_program_is_written_with_out_and_said_to_be_safetensors(
        fake_client: type[_FakeClient], tmp_path: Path) -> None:
    out = tmp_path / "y.safetensors"
    run = CliRunner().invoke(cli, ["result", "task-1", "--out", str(out),
                                   "--home", str(tmp_path)])
    assert run.exit_code == 0, run.output
    assert out.read_bytes() == fake_client.output
    assert "safetensors" in run.stderr and run.stdout == ""
    as_json = CliRunner().invoke(cli, ["result", "task-1", "--out", str(out), "--json",
                                       "--home", str(tmp_path)])
    assert json.loads(as_json.stdout)["format"] == "safetensors"
    # Not printed as text: binary on a terminal helps nobody.
    bare = CliRunner().invoke(cli, ["result", "task-1", "--home", str(tmp_path)])
    assert bare.exit_code != 0 and "--out" in bare.output


def test_a_quote_without_private_parameters_shows_only_the_public_ones() -> None:
    q = TaskQuote("sha256-search", {"count": "64", "prefix": "00ff"}, 3, 2,
                  PriceBook().quote("sha256-search", 1, 3, "consumer", 0, 60_000), False)
    assert q.as_dict()["params"] == {"count": "64", "prefix": "00ff"}
    assert q.as_dict(private=False)["params"] == {"count": "64"}


def test_quote_program_prices_the_program_workloads_params(
        monkeypatch: pytest.MonkeyPatch) -> None:
    program_module = pytest.importorskip("workloads.program")
    # The call this client makes fits the function the program workload defines ...
    signature = inspect.signature(program_module.program_params)
    assert {"steps", "carry", "mantissa_bits", "max_runtime_ms"} <= set(signature.parameters)
    seen: dict[str, Any] = {}

    def program_params(program: bytes, inputs: bytes, **kw: Any) -> dict[str, str]:
        seen.update(program=program, inputs=inputs, kw=kw)
        return dict(PROGRAM_PARAMS)

    # ... and its parameters are what is quoted, as the program workload.
    monkeypatch.setattr(program_module, "program_params", program_params)
    client = object.__new__(Client)  # no keystore nor broker: only quote is called

    def quote(workload: str, params: dict[str, str], **options: Any) -> str:
        seen.update(workload=workload, params=params, options=options)
        return "a quote"

    monkeypatch.setattr(client, "quote", quote)
    assert client.quote_program(b"pt2", b"st", steps=3, carry=1, mantissa_bits=10,
                                max_runtime_ms=2000, replicas=5, trust="adaptive") == "a quote"
    assert (seen["program"], seen["inputs"]) == (b"pt2", b"st")
    assert seen["kw"] == {"steps": 3, "carry": 1, "mantissa_bits": 10, "max_runtime_ms": 2000}
    assert seen["workload"] == "program" and seen["params"] == PROGRAM_PARAMS
    assert seen["options"]["replicas"] == 5 and seen["options"]["trust"] == "adaptive"
