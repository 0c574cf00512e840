"""User programs (workload ``program``): checked, bounded, run in a child, digested."""

from __future__ import annotations

import base64
import hashlib
import io
import math
import mmap
import os
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import safetensors.torch
import torch

import workloads.program as program_module
from destra.errors import InvalidParams
from workloads import get_workload
from workloads.base import WorkRefused
from workloads.checkpoints import run_recorded, run_segment, state_leaf
from workloads.program import (
    RECORDED_STATE_BYTES,
    estimate,
    local_output,
    program_params,
    read_outputs,
    save_inputs,
    save_program,
)
from workloads.program_check import MAX_PROGRAM_BYTES, check_archive, load_program
from workloads.program_run import Job, local_run, run_job
from workloads.program_sandbox import Reply, run_in_child, warm_up
from workloads.program_tensors import read_tensors, write_tensors

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import cnn_infer  # noqa: E402
import mlp_train  # noqa: E402
import wave2d  # noqa: E402
from example_common import Example  # noqa: E402

CPU = torch.device("cpu")
PROGRAM = get_workload("program")

EXAMPLES: dict[str, Callable[[], Example]] = {
    "cnn_infer": lambda: cnn_infer.build(batch=2, width=4, size=16),
    "mlp_train": lambda: mlp_train.build(n=32, n_in=8, hidden=16, steps=12),
    "wave2d": lambda: wave2d.build(grid=16, steps=20),
}


def files(example: Example) -> tuple[bytes, bytes]:
    return save_program(example.ep), save_inputs(example.inputs)


def params_of(example: Example, **overrides: str) -> dict[str, Any]:
    program, inputs = files(example)
    raw = program_params(program, inputs, steps=example.steps, carry=example.carry,
                         mantissa_bits=example.mantissa_bits)
    return PROGRAM.validate({**raw, **overrides})


def with_program(params: dict[str, Any], program: bytes) -> dict[str, Any]:
    """The params with another program, its hash updated (the submitter signed it)."""
    return {**params, "program": base64.b64encode(program).decode(),
            "program_sha256": hashlib.sha256(program).hexdigest()}


def refused(code: str, fn: Callable[[], object]) -> WorkRefused:
    with pytest.raises(WorkRefused) as e:
        fn()
    assert e.value.code == code, e.value
    return e.value


class Runaway(torch.nn.Module):
    """A heavy step: 256^3 matmuls, repeated."""

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        for _ in range(8):
            a = torch.tanh(a @ a)
        return a


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_each_example_runs_in_a_child_with_a_stable_digest_equal_to_a_local_run(
        name: str) -> None:
    example = EXAMPLES[name]()
    params = params_of(example)
    est = estimate(*files(example), example.steps, example.carry)
    assert est.units == params["units"] >= 1 and est.memory_mb == params["memory_mb"]
    one, two = PROGRAM.run(params, CPU), PROGRAM.run(params, CPU)
    assert one.digest == two.digest == hashlib.sha256(one.output).digest()
    local = local_run(*files(example), steps=example.steps, carry=example.carry)
    assert one.output == local_output(*files(example), steps=example.steps,
                                      carry=example.carry, mantissa_bits=example.mantissa_bits)
    outs = read_outputs(one.output)
    assert len(outs) == len(local)
    for got, want in zip(outs, local, strict=True):
        if example.mantissa_bits == 0:
            assert torch.equal(got, want)
        else:
            assert torch.allclose(got, want, rtol=2.0 ** -example.mantissa_bits)


def test_the_output_file_is_safetensors_that_the_library_reads() -> None:
    example = EXAMPLES["wave2d"]()
    result = PROGRAM.run(params_of(example), CPU)
    loaded = safetensors.torch.load(result.output)
    assert sorted(loaded) == ["out0", "out1"]
    assert torch.equal(loaded["out0"], read_outputs(result.output)[0])


def test_training_lowers_the_loss() -> None:
    example = mlp_train.build(n=32, n_in=8, hidden=16, steps=1)
    program, inputs = files(example)
    first = local_run(program, inputs, steps=1, carry=8)[-1]
    later = local_run(program, inputs, steps=30, carry=8)[-1]
    assert float(later) < 0.5 * float(first)


def test_checkpointed_segments_give_the_run_and_a_referee_reproduces_one() -> None:
    example = EXAMPLES["mlp_train"]()
    params = params_of(example)
    leaves, states, result = run_recorded(PROGRAM, params, CPU)
    assert len(leaves) == PROGRAM.segments(params) == 12
    assert result.digest == PROGRAM.run(params, CPU).digest
    pre_leaf, post_leaf, _ = run_segment(PROGRAM, params, 5, states[4], CPU,
                                         expected_pre_leaf=leaves[4])
    assert post_leaf == leaves[5] and state_leaf(PROGRAM, states[4]) == leaves[4]
    tampered, _, bad = run_recorded(PROGRAM, params, CPU, tamper_from=3)
    assert tampered[:3] == leaves[:3] and tampered[3] != leaves[3]
    assert bad.digest != result.digest


def test_states_too_large_to_referee_are_not_recorded_nor_sent_back_by_the_child() -> None:
    # 128 x 128 float64, two carried grids: 256 KiB a state, past RECORDED_STATE_BYTES.
    example = wave2d.build(grid=128, steps=8)
    params = params_of(example)
    program, inputs = files(example)
    leaves, states, result = run_recorded(PROGRAM, params, CPU)
    assert result.digest == PROGRAM.run(params, CPU).digest
    assert states == [b""] * 8 and len(set(leaves)) == 8  # one leaf per step, no values
    # Another program's states of the same sizes commit the same leaves: nothing in them
    # depends on the values, so no dispute can pick a segment on such a task.
    doubled = save_inputs((example.inputs[0] * 2, *example.inputs[1:]))
    other = PROGRAM.validate(program_params(program, doubled, steps=8, carry=2))
    other_leaves, _, other_result = run_recorded(PROGRAM, other, CPU)
    assert other_leaves == leaves and other_result.digest != result.digest
    # The child sends back the tensors of the last boundary only.
    reply = run_job(Job(program=program, inputs=inputs, device="cpu", carry=2, start_step=0,
                        start_state=None, boundaries=(2, 4, 8),
                        record_bytes=RECORDED_STATE_BYTES))
    assert set(reply.blobs) == {"s8"}
    assert reply.facts["sizes"] == {"s2": 2 * 128 * 128 * 8, "s4": 2 * 128 * 128 * 8,
                                    "s8": 2 * 128 * 128 * 8}
    # A small state is still recorded: its exact bytes kept, its leaf of its values.
    small = params_of(wave2d.build(grid=16, steps=8))
    small_leaves, small_states, _ = run_recorded(PROGRAM, small, CPU)
    assert all(small_states) and state_leaf(PROGRAM, small_states[3]) == small_leaves[3]


def test_the_initial_state_reads_the_carried_inputs_only_when_it_is_recorded() -> None:
    from workloads.program_tensors import check_tensors

    large = wave2d.build(grid=128, steps=8)  # two carried 128 KiB grids: unrecorded
    assert check_tensors(files(large)[1]) == {"in0": 128 * 128 * 8, "in1": 128 * 128 * 8,
                                              "in2": 8}
    state = PROGRAM.initial_state(params_of(large), CPU)
    assert (state.size, state.tensors, state.recorded) == (2 * 128 * 128 * 8, (), False)
    small = wave2d.build(grid=16, steps=8)
    state = PROGRAM.initial_state(params_of(small), CPU)
    assert state.recorded and [t.tolist() for t in state.tensors] == [
        t.tolist() for t in small.inputs[:2]]
    state = PROGRAM.initial_state(params_of(EXAMPLES["cnn_infer"]()), CPU)
    assert (state.size, state.tensors) == (0, ())  # carries nothing


def test_mantissa_rounding_makes_tiny_float_noise_agree() -> None:
    example = EXAMPLES["cnn_infer"]()
    program, _ = files(example)
    noisy = example.inputs[0] * (1 + 1e-6)  # about 16 ulps: device-like noise
    base = {**params_of(example), "mantissa_bits": 10}
    exact = {**base, "mantissa_bits": 0}

    def digest(p: dict[str, Any], images: torch.Tensor) -> bytes:
        inputs = save_inputs((images,))
        p = {**p, "input": base64.b64encode(inputs).decode(),
             "input_sha256": hashlib.sha256(inputs).hexdigest()}
        return PROGRAM.run(p, CPU).digest

    assert digest(base, example.inputs[0]) == digest(base, noisy)
    assert digest(exact, example.inputs[0]) != digest(exact, noisy)


def test_precision_decides_homogeneity_and_cost_is_the_declared_one() -> None:
    params = params_of(EXAMPLES["wave2d"]())
    assert PROGRAM.homogeneous(params) and not PROGRAM.homogeneous(
        {**params, "mantissa_bits": 20})
    assert PROGRAM.compute_units(params) == params["units"]
    assert PROGRAM.memory_mb(params) == params["memory_mb"]
    assert {"program", "input"}.isdisjoint(PROGRAM.public_names())


def test_tensor_files_are_canonical_and_read_strictly() -> None:
    tensors = {"out0": torch.arange(6.0).reshape(2, 3), "out1": torch.tensor([True, False]),
               "out10": torch.zeros(0, dtype=torch.int64)}
    data = write_tensors(tensors)
    assert data == write_tensors(dict(reversed(list(tensors.items()))))
    assert {k: v.tolist() for k, v in read_tensors(data).items()} == {
        k: v.tolist() for k, v in tensors.items()}
    library = safetensors.torch.save({"in0": torch.ones(3)})
    assert torch.equal(read_tensors(library)["in0"], torch.ones(3))
    refused("bad-input", lambda: read_tensors(data + b"x"))
    refused("bad-input", lambda: read_tensors(b"\xff" * 16))


# ------------------------------------------------------------------ refusals


def test_a_wrong_hash_is_refused() -> None:
    params = params_of(EXAMPLES["wave2d"]())
    refused("bad-hash", lambda: PROGRAM.run({**params, "program_sha256": "0" * 64}, CPU))
    refused("bad-hash", lambda: PROGRAM.run({**params, "input_sha256": "1" * 64}, CPU))


def test_the_hash_is_the_reason_for_bytes_not_signed_whatever_else_fails(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The hashes are checked beside the checks and the child, and win over their
    refusals: tampered bytes are refused alike on every honest replica."""
    example = EXAMPLES["wave2d"]()
    params = params_of(example)
    threads: list[str] = []
    real = program_module.check_hashes

    def watched(*args: Any) -> None:
        threads.append(threading.current_thread().name)
        real(*args)

    monkeypatch.setattr(program_module, "check_hashes", watched)
    wrong = save_inputs((torch.zeros(3, 3, dtype=torch.float64),) * 2 + (example.inputs[2],))
    signed = {**params, "input": base64.b64encode(wrong).decode(),
              "input_sha256": hashlib.sha256(wrong).hexdigest()}
    refused("shape-mismatch", lambda: PROGRAM.run(signed, CPU))  # the child's refusal
    refused("bad-hash", lambda: PROGRAM.run({**signed, "input_sha256": "2" * 64}, CPU))
    big = with_program(params, b"\0" * (MAX_PROGRAM_BYTES + 1))
    refused("program-too-large", lambda: PROGRAM.run(big, CPU))  # refused before the child
    refused("bad-hash", lambda: PROGRAM.run({**big, "program_sha256": "3" * 64}, CPU))
    misnamed = write_tensors({"x0": torch.zeros(2)})  # a header that parses, no in0..
    signed = {**params, "input": base64.b64encode(misnamed).decode(),
              "input_sha256": hashlib.sha256(misnamed).hexdigest()}
    refused("bad-input", lambda: PROGRAM.initial_state(signed, CPU))
    refused("bad-hash", lambda: PROGRAM.initial_state({**signed, "input_sha256": "4" * 64},
                                                      CPU))
    assert threads and all(name.startswith("program-hash") for name in threads), threads


def test_a_disallowed_op_is_refused_by_name() -> None:
    class Noisy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.dropout(x, 0.5, training=True)

    ep = torch.export.export(Noisy(), (torch.ones(4),))
    e = refused("disallowed-op", lambda: save_program(ep))
    assert "dropout" in e.detail


def test_a_pickle_member_is_refused_before_torch_reads_the_archive() -> None:
    program, _ = files(EXAMPLES["wave2d"]())
    src = zipfile.ZipFile(io.BytesIO(program))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("sample_inputs/model.pt"):
                data = b"\x80\x04\x95" + b"cos\nsystem\n"  # a pickle where inputs go
            z.writestr(info, data)
        z.writestr("archive/data/evil.pkl", b"\x80\x04N.")
    refused("pickle-in-program", lambda: check_archive(out.getvalue()))
    params = with_program(params_of(EXAMPLES["wave2d"]()), out.getvalue())
    refused("pickle-in-program", lambda: PROGRAM.run(params, CPU))


def test_a_pickled_weight_config_is_refused() -> None:
    program, _ = files(EXAMPLES["cnn_infer"]())
    src = zipfile.ZipFile(io.BytesIO(program))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("model_weights_config.json"):
                data = data.replace(b'"use_pickle": false', b'"use_pickle": true', 1)
            z.writestr(info, data)
    refused("pickle-in-program", lambda: check_archive(out.getvalue()))


def test_an_accepted_archive_loads_without_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    program, _ = files(EXAMPLES["cnn_infer"]())
    import pickle

    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("unpickled")

    monkeypatch.setattr(pickle, "Unpickler", boom)
    assert load_program(program).graph is not None


def test_an_oversized_program_is_refused() -> None:
    params = params_of(EXAMPLES["wave2d"]())
    big = b"\0" * (MAX_PROGRAM_BYTES + 1)
    refused("program-too-large", lambda: PROGRAM.run(with_program(params, big), CPU))


def test_inputs_of_the_wrong_shape_are_refused() -> None:
    example = EXAMPLES["wave2d"]()
    program, _ = files(example)
    wrong = save_inputs((torch.zeros(3, 3, dtype=torch.float64),) * 2 + (example.inputs[2],))
    e = refused("shape-mismatch", lambda: estimate(program, wrong, 1, 2))
    assert "in0" in e.detail
    refused("shape-mismatch", lambda: estimate(program, save_inputs(example.inputs), 1, 3))


def test_a_task_declaring_less_than_its_graph_costs_is_refused_by_the_node() -> None:
    example = mlp_train.build(n=1024, n_in=64, hidden=256, steps=12)
    params = params_of(example)
    assert params["units"] >= 20 and params["memory_mb"] >= 2
    e = refused("understated-cost",
                lambda: PROGRAM.run({**params, "units": params["units"] // 2}, CPU))
    assert f"costs {params['units']} units" in e.detail
    refused("understated-cost", lambda: PROGRAM.run({**params, "memory_mb": 1}, CPU))
    # Within the tolerance (another torch version may count a few percent more), it runs.
    near = {**params, "units": math.ceil(params["units"] / 1.05)}
    assert PROGRAM.run(near, CPU).digest == PROGRAM.run(params, CPU).digest


def test_a_runaway_program_is_stopped_at_its_stated_bound() -> None:
    a = torch.rand(256, 256) / 256
    program = save_program(torch.export.export(Runaway(), (a,)))
    raw = program_params(program, save_inputs((a,)), steps=1_000_000, max_runtime_ms=1500)
    params = PROGRAM.validate(raw)
    assert params["max_runtime_ms"] == 1500
    warm_up()  # the forkserver's one-time start (torch's import) is not the task's
    started = time.monotonic()
    refused("runtime-bound", lambda: PROGRAM.run(params, CPU))
    assert time.monotonic() - started < 5


def test_a_runaway_program_not_the_one_signed_is_stopped_when_the_hash_fails() -> None:
    """The child runs while the hashes are checked; bytes other than those signed stop
    it then, not at the task's bound (here a minute): the submitter who seals other
    bytes than it signed costs the nodes the hashing, not the bound."""
    a = torch.rand(256, 256) / 256
    program = save_program(torch.export.export(Runaway(), (a,)))
    raw = program_params(program, save_inputs((a,)), steps=1_000_000, max_runtime_ms=60_000)
    params = PROGRAM.validate({**raw, "program_sha256": "5" * 64})
    warm_up()
    started = time.monotonic()
    refused("bad-hash", lambda: PROGRAM.run(params, CPU))
    assert time.monotonic() - started < 20


def test_a_bound_looser_than_the_rule_is_invalid() -> None:
    example = EXAMPLES["wave2d"]()
    raw = {k: str(v) for k, v in params_of(example).items()}
    with pytest.raises(InvalidParams, match="max_runtime_ms"):
        PROGRAM.validate({**raw, "max_runtime_ms": str(10**9)})
    rule = int(raw["max_runtime_ms"])
    with pytest.raises(InvalidParams, match="max_runtime_ms"):
        program_params(*files(example), steps=example.steps, carry=example.carry,
                       max_runtime_ms=rule + 1)
    assert program_params(*files(example), steps=example.steps, carry=example.carry,
                          max_runtime_ms=rule)["max_runtime_ms"] == str(rule)


def child_threads(_job: object) -> Reply:
    """Run in a child: its torch thread count."""
    return Reply(facts={"threads": torch.get_num_threads()}, blobs={})


def test_a_program_runs_on_the_callers_torch_threads_not_every_core(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import workloads.program as program_module

    asked: list[int] = []

    def spy(fn: Callable[[Any], Reply], job: Any, **limits: Any) -> Reply:
        asked.append(limits["threads"])
        return run_in_child(fn, job, **limits)

    monkeypatch.setattr(program_module, "run_in_child", spy)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # as a node with --threads 1 runs its tasks
        PROGRAM.run(params_of(EXAMPLES["wave2d"]()), CPU)
        reply = run_in_child(child_threads, None, device="cpu", memory_mb=16, bound_ms=60_000,
                             threads=torch.get_num_threads())
    finally:
        torch.set_num_threads(threads)
    assert asked == [1]
    assert reply.facts == {"threads": 1}  # not the forkserver's default (every core)


def child_allocation(_job: object) -> Reply:
    """Run in a child: where an 8 MiB tensor starts, within its page."""
    return Reply(facts={"offset": torch.zeros(2**20, dtype=torch.float64).data_ptr() % 4096},
                 blobs={})


def test_a_childs_large_tensors_are_page_aligned_for_huge_pages_and_the_node_is_untouched(
        ) -> None:
    import os

    reply = run_in_child(child_allocation, None, device="cpu", memory_mb=64, bound_ms=60_000)
    # torch page-aligns them and asks for huge pages (madvise) when THP_MEM_ALLOC_ENABLE is
    # set, as for the forkserver's children; else 64-byte aligned after malloc's header.
    assert reply.facts == {"offset": 0}
    assert "THP_MEM_ALLOC_ENABLE" not in os.environ  # set for the launch only


def open_descriptors() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_children_replying_refusing_or_stopped_leave_no_descriptor_open() -> None:
    params = params_of(EXAMPLES["wave2d"]())
    warm_up()
    before = open_descriptors()
    assert PROGRAM.run(params, CPU).output
    refused("runtime-bound", lambda: run_in_child(spin, None, device="cpu", memory_mb=16,
                                                   bound_ms=300))
    refused("program-failed", lambda: run_in_child(fail, None, device="cpu", memory_mb=16,
                                                    bound_ms=60_000))
    deadline = time.monotonic() + 20  # children are reaped on a thread
    while open_descriptors() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_descriptors() == before


def test_a_child_stopped_before_replying_is_killed_at_once(tmp_path: Path) -> None:
    """At the bound, or when a check beside it fails (``abandon``), the child is killed
    then, not left to spin on (it was given 10 s more)."""
    from concurrent.futures import Future

    warm_up()
    for stop in ("bound", "abandon"):
        told = tmp_path / f"{stop}.pid"
        check: Future[None] = Future()
        if stop == "abandon":
            threading.Timer(0.5, lambda f=check: f.set_exception(
                WorkRefused("bad-hash", "not the bytes signed"))).start()
        started = time.monotonic()
        refused("runtime-bound" if stop == "bound" else "bad-hash",
                lambda told=told, check=check, stop=stop: run_in_child(
                    spin_telling_pid, str(told), device="cpu", memory_mb=16,
                    bound_ms=500 if stop == "bound" else 60_000, abandon=check))
        assert time.monotonic() - started < 10, stop
        pid = int(told.read_text())
        deadline = time.monotonic() + 5
        while psutil.pid_exists(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not psutil.pid_exists(pid), f"the child still runs after its {stop}"


def spin_telling_pid(job: str) -> Reply:
    """Run in a child: write the child's pid to the file ``job``, then never return."""
    Path(job).write_text(str(os.getpid()))
    while True:
        pass


def spin(_job: object) -> Reply:
    """Run in a child: never returns."""
    while True:
        pass


def fail(_job: object) -> Reply:
    raise RuntimeError("a kernel failed")


class Doubling(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_huge_pages_stay_on_in_a_child_whose_tensors_are_reused_and_larger_ones_come_from_the_heap(
        ) -> None:
    from workloads.program_cost import largest_tensor_bytes
    from workloads.program_sandbox import REUSED_BYTES, large_tensors_from_the_heap

    def child(n: int, steps: int) -> tuple[int, bool, int]:
        """The largest tensor, whether huge pages stayed on, the child's page faults."""
        x = torch.ones(n)
        ep = torch.export.export(Doubling(), (x,))
        job = Job(program=save_program(ep), inputs=save_inputs((x,)), device="cpu", carry=1,
                  start_step=0, start_state=None, boundaries=(steps,))
        reply = run_in_child(run_job, job, device="cpu", memory_mb=256, bound_ms=60_000)
        timing = reply.facts["timing"]
        return largest_tensor_bytes(ep), timing["huge_pages"], timing["minflt"]

    small, large = REUSED_BYTES // 4, REUSED_BYTES // 4 + 1  # float32 elements
    assert child(small, 2)[:2] == (REUSED_BYTES, True)
    assert child(large, 2)[:2] == (REUSED_BYTES + 4, False)
    # Each step makes a tensor over glibc's mapping threshold and frees the last one:
    # mapped afresh, each would fault in its 8,193 pages; from the heap, the next reuses
    # the freed one's.
    extra = child(large, 8)[2] - child(large, 2)[2]
    assert extra < (REUSED_BYTES + 4) // mmap.PAGESIZE, extra
    assert not large_tensors_from_the_heap(REUSED_BYTES + 4)  # not in a child: no-op


def child_input_views(job: Job) -> Reply:
    """Run in a child: how the job's input arrived, and whether its tensors are views."""
    import ctypes

    from workloads.program_tensors import read_tensors

    view = job.inputs
    if not isinstance(view, memoryview):
        return Reply(facts={"kind": type(view).__name__}, blobs={})
    start = ctypes.addressof(ctypes.c_char.from_buffer(view))
    inside = [start <= t.data_ptr() < start + len(view) for t in read_tensors(view).values()]
    return Reply(facts={"kind": "memoryview", "writable": not view.readonly,
                        "views": inside}, blobs={})


def test_a_childs_large_input_is_mapped_and_its_tensors_are_views_not_copies() -> None:
    from workloads.program_sandbox import MAPPED_BYTES

    def arrived(*tensors: torch.Tensor) -> dict[str, Any]:
        job = Job(program=b"", inputs=save_inputs(tensors), device="cpu", carry=0,
                  start_step=0, start_state=None, boundaries=(1,))
        return run_in_child(child_input_views, job, device="cpu", memory_mb=64,
                            bound_ms=60_000).facts

    big = torch.arange(MAPPED_BYTES // 8, dtype=torch.float64)
    assert arrived(big, big + 1) == {"kind": "memoryview", "writable": True,
                                     "views": [True, True]}
    # A tensor off its element alignment in the file is copied, not viewed.
    assert arrived(torch.ones(3, dtype=torch.uint8), big)["views"] == [True, False]
    assert arrived(torch.ones(4)) == {"kind": "bytes"}  # small: pickled as it is
