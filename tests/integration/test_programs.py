"""User programs ("bring your own model", issue 15) on a real broker, a real Postgres and
real node runner processes: the three examples verified and equal to a local run; bad
programs refused by every node, the task failed ``refused`` and refunded, nobody
penalized; a node that tampers with a program's bytes caught by the hash and penalized.

One network for the module (starting one costs more than most tests here). Each test
pays from its own account, so each can check its own refund. The tampering node joins
in the last test and stays: a test after it could be placed on it.
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from destra.client import Client, Progress
from destra.errors import DestraError
from destra.network import LocalNetwork
from ledger.book import escrow, stake, user
from ledger.processor import wait_for_transactions
from tests.support import network_balances, network_settings, running_network
from workloads.program import (
    estimate,
    local_output,
    read_outputs,
    save_inputs,
    save_program,
)
from workloads.program_check import MAX_PROGRAM_BYTES, check_archive, sha256_hex

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))
import cnn_infer  # noqa: E402
import mlp_train  # noqa: E402
import wave2d  # noqa: E402

pytestmark = pytest.mark.integration

FUNDS = 10**12
HONEST = ("p0", "p1", "p2")
TAMPERER = "pt"
STAKE = 10_000_000
ACCOUNTS = ("examples", "script", "disallowed", "pickler", "oversized", "misshapen",
            "runaway", "tamper")
TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def net(kafka: str, pg_dsn: str, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[LocalNetwork]:
    """Services and three honest nodes of distinct operators; every account funded.
    30 s commit windows: a node's first program task starts its forkserver (imports
    torch) on a 2-core machine that may run another worker's network too."""
    base = tmp_path_factory.mktemp("programs")
    settings = network_settings(kafka, "test_programs", base / "genesis").with_(
        home=base / "home")
    with running_network(settings, kafka, pg_dsn, base, {
            "DESTRA_COMMIT_WINDOW_MS": "30000", "DESTRA_REVEAL_WINDOW_MS": "10000"}) as local:
        local.mint(*ACCOUNTS, f"op-{TAMPERER}", amount_micro=FUNDS)
        local.start_services()
        for name in HONEST:
            local.start_node(name, operator=f"op-{name}")
        local.wait_registered(list(HONEST))
        yield local


@contextmanager
def client_of(net: LocalNetwork, account: str) -> Iterator[Client]:
    client = Client(net.settings, net.bootstrap, account, net.passphrase)
    try:
        yield client
    finally:
        client.close()


def one_thread_output(program: bytes, inputs: bytes, **how: int) -> bytes:
    """``local_output`` on one torch thread, as a node runs its tasks (``--threads 1``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return local_output(program, inputs, **how)
    finally:
        torch.set_num_threads(threads)


def hand_built(program: bytes, inputs: bytes, *, units: int = 100, memory_mb: int = 64,
               steps: int = 1, carry: int = 0) -> dict[str, str]:
    """A program task's parameters made without the client's checks (which would refuse
    these programs before sending them): the hashes and base64 done here."""
    return {"program_sha256": sha256_hex(program), "input_sha256": sha256_hex(inputs),
            "units": str(units), "memory_mb": str(memory_mb), "steps": str(steps),
            "carry": str(carry), "mantissa_bits": "0", "max_runtime_ms": "0",
            "program": base64.b64encode(program).decode("ascii"),
            "input": base64.b64encode(inputs).decode("ascii")}


def unchecked_archive(ep: torch.export.ExportedProgram) -> bytes:
    """``save_program`` without its check: what a client that skipped it would send."""
    ep._example_inputs = None
    buffer = io.BytesIO()
    torch.export.save(ep, buffer)
    return buffer.getvalue()


def refused_end_to_end(net: LocalNetwork, account: str, params: dict[str, str],
                       code: str) -> str:
    """Submit ``params`` as ``account``; assert that the task failed ``refused`` with
    ``code`` on every replica, that nobody was penalized and that the submitter got every
    micro-token back. Returns the refusal's detail, as sealed to the submitter."""
    with client_of(net, account) as client:
        watch = client.watch()  # grants the data key: the program is a private input
        try:
            task = client.submit(client.quote("program", params))
            progress = client.wait([task], watch=watch, timeout_s=TIMEOUT_S)[task]
        finally:
            watch.close()
        assert progress.state == "failed", progress.as_dict()
        verdict = progress.verdict.fields  # type: ignore[union-attr]
        assert verdict["reason"] == "refused", verdict
        assert verdict["detail"].split(":")[0] == code, verdict
        with pytest.raises(DestraError, match=f"refused: {code}"):
            client.result(task)
        refusal = client.refusal(task)
    assert refusal is not None and refusal["refused"] == code, refusal
    reveals = [e for e in net.events("ResultRevealed") if e.fields["task_id"] == task]
    assert len(reveals) == 3 and {e.fields["refusal"] for e in reveals} == {code}
    assert [p.fields for p in net.events("NodePenalized") if p.fields["task_id"] == task] == []
    wait_for_transactions(net.settings, net.bootstrap, [f"refund/{task}"])
    balances = network_balances(net)
    assert balances[user(account)] == FUNDS
    assert balances.get(escrow(task), 0) == 0
    return str(refusal["detail"])


def verified(progress: Progress) -> dict[str, Any]:
    assert progress.state == "verified", progress.as_dict()
    return progress.verdict.fields  # type: ignore[union-attr]


# ------------------------------------------------------------------ verified


def test_the_three_examples_are_verified_and_equal_a_local_run(
        net: LocalNetwork, tmp_path: Path) -> None:
    # wave2d as a user runs it: the example script with --submit, which quotes, submits,
    # follows the task to its verdict and writes the verified outputs.
    script = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "wave2d.py"), str(tmp_path), "--submit",
         "--account", "script", "--timeout", str(TIMEOUT_S)],
        env=net.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The other two through the client, as a program would submit them.
        built = [cnn_infer.build(), mlp_train.build(steps=20)]
        with client_of(net, "examples") as client:
            watch = client.watch()
            tasks = {}
            try:
                for example in built:
                    program, inputs = save_program(example.ep), save_inputs(example.inputs)
                    quote = client.quote_program(program, inputs, steps=example.steps,
                                                 carry=example.carry,
                                                 mantissa_bits=example.mantissa_bits)
                    # Priced from the graph: the units the estimate measured.
                    est = estimate(program, inputs, example.steps, example.carry)
                    assert quote.quote.compute_units == est.units
                    assert quote.params["memory_mb"] == str(est.memory_mb)
                    tasks[client.submit(quote)] = (example, program, inputs)
                done = client.wait(list(tasks), watch=watch, timeout_s=TIMEOUT_S)
            finally:
                watch.close()
            for task, (example, program, inputs) in tasks.items():
                verified(done[task])
                got = client.result(task, progress=done[task])  # what its watch saw
                assert got.workload == "program"
                assert got.output == one_thread_output(
                    program, inputs, steps=example.steps, carry=example.carry,
                    mantissa_bits=example.mantissa_bits), task
                outs = read_outputs(got.output)
                assert len(outs) == (1 if example.carry == 0 else example.carry + 1)
        out, err = script.communicate(timeout=TIMEOUT_S + 60)
    finally:
        if script.poll() is None:
            script.kill()
            script.wait(10)
    assert script.returncode == 0, f"{out}\n{err}"
    task = next(line.split()[1] for line in out.splitlines() if line.startswith("submitted:"))
    written = (tmp_path / "wave2d.out.safetensors").read_bytes()
    example = wave2d.build()
    expected = one_thread_output((tmp_path / "wave2d.pt2").read_bytes(),
                                 (tmp_path / "wave2d.safetensors").read_bytes(),
                                 steps=example.steps, carry=example.carry)
    assert written == expected  # exact: float64, mantissa_bits 0, one device class
    loaded = safetensors.torch.load(written)
    assert sorted(loaded) == ["out0", "out1"] and loaded["out0"].shape == (64, 64)
    with client_of(net, "script") as client:
        assert client.result(task).output == written
    assert net.events("NodePenalized") == []


# ------------------------------------------------------------------ refused and refunded


class Noisy(torch.nn.Module):
    """Dropout in training mode: random, so not on the allowlist."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(x, 0.5, training=True)


class Runaway(torch.nn.Module):
    """A heavy step: eight 256^3 matmuls."""

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        for _ in range(8):
            a = torch.tanh(a @ a)
        return a


class Scaled(torch.nn.Module):
    """``x * w`` with a weight of ``n`` floats: a program as large as its weight."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def with_comment(archive: bytes, length: int) -> bytes:
    """``archive`` rewritten with a zip comment of ``length`` bytes (at most 65535)."""
    assert 0 <= length <= 65_535, length
    buffer = io.BytesIO(archive)
    with zipfile.ZipFile(buffer, "a") as z:
        z.comment = b"#" * length
    return buffer.getvalue()


def small_wave() -> tuple[bytes, tuple[torch.Tensor, ...]]:
    example = wave2d.build(grid=16, steps=4)
    return save_program(example.ep), example.inputs


def test_a_program_calling_a_disallowed_op_is_refused_and_refunded(net: LocalNetwork) -> None:
    x = torch.ones(4)
    program = unchecked_archive(torch.export.export(Noisy(), (x,)))
    detail = refused_end_to_end(net, "disallowed", hand_built(program, save_inputs((x,))),
                                "disallowed-op")
    assert "dropout" in detail


def test_a_program_carrying_a_pickle_is_refused_and_refunded(net: LocalNetwork) -> None:
    program, inputs = small_wave()
    src = zipfile.ZipFile(io.BytesIO(program))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            z.writestr(info, src.read(info))
        z.writestr("archive/data/evil.pkl", b"\x80\x04\x95" + b"cos\nsystem\n")
    refused_end_to_end(net, "pickler", hand_built(out.getvalue(), save_inputs(inputs),
                                                   steps=4, carry=2), "pickle-in-program")


def test_a_program_over_the_size_limit_is_refused_and_refunded(net: LocalNetwork) -> None:
    # A real archive of one model, otherwise acceptable, one byte over MAX_PROGRAM_BYTES:
    # a weight just short of the limit, then a zip comment to fill the rest. (Two bytes
    # more and its base64 would overrun the parameter's length bound, which the client
    # and the nodes check first: invalid-input.)
    x = torch.ones(1)
    small = save_program(torch.export.export(Scaled(16), (x,)))
    n = (MAX_PROGRAM_BYTES - len(small) - 32_768) // 4
    program = save_program(torch.export.export(Scaled(n), (x,)))
    # Python rewrites the central directory with the comment (no zip64 record, which
    # torch's writer adds): measure once, then pad to the byte.
    padded = with_comment(program, 0)
    program = with_comment(program, MAX_PROGRAM_BYTES + 1 - len(padded))
    assert len(program) == MAX_PROGRAM_BYTES + 1
    check_archive(program)  # its size is the only thing wrong with it
    detail = refused_end_to_end(net, "oversized", hand_built(program, save_inputs((x,))),
                                "program-too-large")
    assert str(MAX_PROGRAM_BYTES) in detail


def test_inputs_of_the_wrong_shape_are_refused_and_refunded(net: LocalNetwork) -> None:
    program, inputs = small_wave()
    wrong = save_inputs((torch.zeros(3, 3, dtype=torch.float64),) * 2 + (inputs[2],))
    detail = refused_end_to_end(net, "misshapen", hand_built(program, wrong, steps=4,
                                                             carry=2), "shape-mismatch")
    assert "in0" in detail


def test_a_program_running_past_its_stated_bound_is_stopped_and_refunded(
        net: LocalNetwork) -> None:
    # Honest units (the client measures them) but a stated bound of 1.5 s for what takes
    # minutes here: every node stops it at the bound.
    a = torch.rand(256, 256, generator=torch.Generator().manual_seed(0)) / 256
    program, inputs = save_program(torch.export.export(Runaway(), (a,))), save_inputs((a,))
    with client_of(net, "runaway") as client:
        quote = client.quote_program(program, inputs, steps=5_000, carry=1,
                                     max_runtime_ms=1_500)
    assert quote.params["max_runtime_ms"] == "1500"
    detail = refused_end_to_end(net, "runaway", quote.params, "runtime-bound")
    assert "1500 ms" in detail


# ------------------------------------------------------------------ caught


def test_a_node_that_tampers_with_the_program_is_caught_by_the_hash_and_penalized(
        net: LocalNetwork) -> None:
    # Last in the module: the tamperer stays in the network.
    net.start_node(TAMPERER, operator=f"op-{TAMPERER}", stake_micro=STAKE,
                   fault="tamper-input")
    net.wait_registered([TAMPERER])
    example = wave2d.build(grid=32, steps=10)
    program, inputs = save_program(example.ep), save_inputs(example.inputs)
    with client_of(net, "tamper") as client:
        watch = client.watch()
        try:
            # Four replicas on four operators: every node, the tamperer among them.
            task = client.submit(client.quote_program(
                program, inputs, steps=example.steps, carry=example.carry,
                replicas=4, quorum=3))
            progress = client.wait([task], watch=watch, timeout_s=TIMEOUT_S)[task]
        finally:
            watch.close()
        verdict = verified(progress)
        assert client.result(task).output == one_thread_output(
            program, inputs, steps=example.steps, carry=example.carry)
    agreed = {c["node_id"]: c["agreed"] for c in verdict["contributions"]}
    assert agreed == {**dict.fromkeys(HONEST, True), TAMPERER: False}, agreed
    reveals = {e.fields["node_id"]: e.fields["refusal"] for e in net.events("ResultRevealed")
               if e.fields["task_id"] == task}
    assert reveals == {**dict.fromkeys(HONEST, None), TAMPERER: "bad-hash"}, reveals
    penalties = [p for p in net.events("NodePenalized") if p.fields["task_id"] == task]
    assert [(p.fields["node_id"], p.fields["reason"]) for p in penalties] == [
        (TAMPERER, "dissent")]
    wait_for_transactions(net.settings, net.bootstrap,
                          [f"settle/{task}", f"slash/{penalties[0].event_id}"])
    balances = network_balances(net)
    assert balances[stake(TAMPERER)] < STAKE  # slashed
