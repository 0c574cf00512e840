"""A user program through the whole network against bare torch on the same machine.

    python bench/program_network.py [--repeats 5] [--quick] [--only TEXT] [--threads 1]

Starts its own Kafka broker (TLS) and Postgres, the network's services and one node
runner on as many torch threads as this process (``--threads``), and funds an account.
For each case (the examples at sizes that run 2 s or more), alternately:

* **bare**: a fresh Python process with torch's defaults: ``torch.export.load`` of the
  program's file and ``safetensors.torch.load_file`` of its input's (the very files
  submitted), then the step loop (the carried outputs fed back) under
  ``torch.no_grad``; timed from the load to the outputs in hand, not counting Python's
  start and the imports the node's forkserver also makes before any task
  (``program_sandbox.PRELOAD``). What a researcher would run by hand.
* **the node's child alone**: the same program in the node's sandbox (a forkserver
  child with the task's limits, the allocator settings the node gives it, the same
  segments), no network: network / child is what the protocol itself costs.
* **network**: the quoted task (1 replica, quorum 1, fixed trust) from ``submit`` to
  the decrypted, digest-checked output in hand (``Client.result``): the submission, the
  escrow, the allocator, the data key's grant, the node's fetch and decryption of the
  sealed program and input, its checks, the child, the same loop, the output's digest,
  sealing and storing the result, commit, reveal, the verdict, and the client's fetch
  and decryption.

The ratio network / bare is printed per case, of the medians of ``--repeats`` runs and
of the best of each (the machine is shared; the best run is the least disturbed), with
the network's time split by its events (producer clocks: one machine) and the
client's steps. The quote (the client checks and prices the program: the estimate runs
it on fake tensors) happens before submitting and is printed on its own. Writes
bench/results/program-network.txt. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import safetensors.torch
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import cnn_infer  # noqa: E402
import mlp_train  # noqa: E402
import wave2d  # noqa: E402
from example_common import Example  # noqa: E402

from bench.lifecycle import _free_port as free_port  # noqa: E402
from destra.client import Client  # noqa: E402
from destra.network import LocalNetwork  # noqa: E402
from destra.settings import Settings  # noqa: E402
from infra.kafka import KafkaCluster, ensure_jars, new_security  # noqa: E402
from infra.postgres import start_embedded, stop_embedded  # noqa: E402
from streams import security  # noqa: E402
from streams.admin import ensure_topics  # noqa: E402
from workloads.program import (  # noqa: E402
    PROGRAM,
    RECORDED_STATE_BYTES,
    read_outputs,
    save_inputs,
    save_program,
)
from workloads.program_run import Job, run_job  # noqa: E402
from workloads.program_sandbox import PRELOAD, run_in_child, warm_up  # noqa: E402
from workloads.program_tensors import numbered, write_tensors  # noqa: E402

CASES: dict[str, Callable[[], Example]] = {
    "wave2d 1024x1024 float64, 400 steps": lambda: wave2d.build(grid=1024, steps=400),
    "mlp_train n 4096, 256-512-10, 150 steps": lambda: mlp_train.build(
        n=4096, n_in=256, hidden=512, classes=10, steps=150),
    "cnn_infer batch 4096, width 32": lambda: cnn_infer.build(batch=4096, width=32),
    "wave2d 1024x1024 float64, 1200 steps": lambda: wave2d.build(grid=1024, steps=1200),
}
CHILD = ("    the child's load and checks", "    the child's step loop",
         "    the child's writing of states", "    the child's page faults (count)")
QUICK = ("wave2d 1024x1024 float64, 400 steps",)
HOPS = (("TaskSubmitted", "TaskAssigned", "submitted -> assigned (escrow, allocator)"),
        ("TaskAssigned", "ResultCommitted", "assigned -> committed (the node's work)"),
        ("ResultCommitted", "ResultRevealed", "committed -> revealed"),
        ("ResultRevealed", "TaskVerified", "revealed -> verified"))


def cpu_seconds(groups: dict[str, tuple[list[int], bool]]) -> dict[str, float]:
    """user+system CPU seconds of each group's processes, with their descendants where
    the group says so (the node's forkserver and program children; Postgres' backends),
    counting the children they have reaped (a finished program child; the bench's bare
    torch processes)."""
    out: dict[str, float] = {}
    for label, (pids, descendants) in groups.items():
        total = 0.0
        for pid in pids:
            try:
                root = psutil.Process(pid)
                for proc in (root, *(root.children(recursive=True) if descendants else ())):
                    t = proc.cpu_times()
                    total += t.user + t.system + t.children_user + t.children_system
            except psutil.NoSuchProcess:
                continue
        out[label] = total
    return out


def cpu_line(before: dict[str, float], after: dict[str, float]) -> str:
    """The CPU seconds each group spent between two ``cpu_seconds``."""
    return ", ".join(f"{label} {after[label] - before[label]:.2f}" for label in after)


def bare(files: tuple[Path, Path], ex: Example, threads: int
         ) -> tuple[float, list[torch.Tensor]]:
    """Seconds a fresh Python process (``bare_main``) takes to load the program and its
    input from ``files`` (as saved for the network) and run its steps; the outputs.

    A fresh process each run, as a researcher's ``python run.py`` is: where its tensors'
    pages land differs from one process to the next (the 1024^2 wave ran 10-15 ms a step
    by that alone), and five runs in one long-lived process draw it once for all five."""
    out = files[0].parent / "bare-outputs.safetensors"
    done = subprocess.run([sys.executable, __file__, "--bare", str(files[0]), str(files[1]),
                           str(ex.steps), str(ex.carry), str(threads), str(out)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench: bare torch failed ({done.returncode}):\n{done.stderr}")
    seconds = float(done.stdout.split()[-1])
    return seconds, read_outputs(out.read_bytes())


def bare_main(program: str, inputs: str, steps: str, carry: str, threads: str, out: str
              ) -> None:
    """What ``bare`` runs: torch's defaults, the program, the steps; prints the seconds
    from loading to the last step's outputs in hand, and writes them to ``out``."""
    torch.set_num_threads(int(threads))
    for name in PRELOAD:  # imported before any task by the node's forkserver too (the
        importlib.import_module(name)  # first torch.export.load imports 1.1 s of them)
    started = time.perf_counter()
    module = torch.export.load(program).module()
    loaded = safetensors.torch.load_file(inputs)
    args = [loaded[f"in{i}"] for i in range(len(loaded))]
    outs: list[torch.Tensor] = []
    with torch.no_grad():
        for _ in range(int(steps)):
            result = module(*args)
            outs = list(result) if isinstance(result, tuple | list) else [result]
            args = outs[:int(carry)] + args[int(carry):]
    seconds = time.perf_counter() - started
    Path(out).write_bytes(write_tensors(numbered("out", outs)))
    print(seconds)


def child_alone(program: bytes, inputs: bytes, ex: Example, params: dict[str, str]
                ) -> float:
    """Seconds of the node's sandbox alone, no network: a forkserver child under the
    task's limits (``params``: the quote's), running the same segments a node runs
    (states over ``RECORDED_STATE_BYTES`` not sent back), the final state returned."""
    parsed = PROGRAM.validate(params)
    job = Job(program=program, inputs=inputs, device="cpu", carry=ex.carry, start_step=0,
              start_state=None, boundaries=PROGRAM.segment_ends(parsed),
              record_bytes=RECORDED_STATE_BYTES)
    started = time.perf_counter()
    run_in_child(run_job, job, device="cpu", memory_mb=parsed["memory_mb"],
                 bound_ms=3_600_000, threads=torch.get_num_threads())
    return time.perf_counter() - started


def through_network(client: Client, net: LocalNetwork, quote: object
                    ) -> tuple[float, dict[str, float], bytes]:
    """Seconds from submit to the checked output in hand; the split; the output.

    Marks are wall-clock (``time.time``), as the events' ``occurred_at`` are: one
    machine, one clock."""
    steps: list[tuple[float, str]] = []
    watch = client.watch()  # grants the data key: program and input are private
    try:
        started = time.time()
        task = client.submit(quote)  # type: ignore[arg-type]
        submitted = time.time()
        progress = client.wait([task], watch=watch, timeout_s=600)[task]
        waited = time.time()
        if progress.state != "verified":
            raise SystemExit(f"bench: task {task} ended {progress.state}; logs in "
                             f"{net.workdir}")
        result = client.result(task, progress=progress, say=lambda note: steps.append(
            (time.time(), str(note))))
        done = time.time()
    finally:
        watch.close()
    at: dict[str, float] = {}
    for name in ("TaskAssigned", "ResultCommitted", "ResultRevealed", "TaskVerified"):
        at[name] = min(e.occurred_at for e in net.events(name)
                       if e.fields["task_id"] == task) / 1000
    runtime = next(e.fields["runtime_ms"] for e in net.events("ResultRevealed")
                   if e.fields["task_id"] == task)
    split = {"the client's submit() (seal the input, store its blob, sign, send)":
             submitted - started,
             "submit() returned -> assigned (escrow, allocator)": at["TaskAssigned"] - submitted}
    split.update({label: at[b] - at[a] for a, b, label in HOPS[1:]})
    split["  of which the node's runtime_ms (child, checks, loop, digest)"] = runtime / 1000
    child: dict[str, float] = {}
    for line in net.log("node-n0").splitlines():  # the node's own timings of this task
        timed = re.search(r"program child, steps .*: checks ([0-9.]+) s, step loop ([0-9.]+) "
                          r"s, writing states ([0-9.]+) s, ([0-9]+) page faults", line)
        if timed:  # the compute thread's child, logged just before its "ran" line
            child = dict(zip(CHILD, map(float, timed.groups()), strict=True))
        found = re.search(r"(fetched and opened|ran) .* in ([0-9.]+) s", line)
        if task in line and found:
            label = ("  the node fetched and opened the sealed input"
                     if found.group(1) != "ran" else
                     "  the node's compute thread (input, checks, child, loop, digest)")
            split[label] = float(found.group(2))
            if found.group(1) == "ran":
                split.update(child)
    split["verified -> the client's watch saw it"] = waited - at["TaskVerified"]
    split["the client's result(): fetch, decrypt, check"] = done - waited
    marks = [(waited, "start")] + steps + [(done, "end")]
    for (t0, what), (t1, _) in zip(marks[1:], marks[2:], strict=False):
        key = "  " + what.split(" (")[0].split("'s ")[0].rstrip(".")
        split[key] = split.get(key, 0.0) + (t1 - t0)
    return done - started, split, result.output


def run(args: argparse.Namespace, tmp: Path) -> list[str]:
    threads = torch.get_num_threads()
    libs = ensure_jars(Settings.from_env().cache_dir)
    cluster = KafkaCluster(tmp / "kafka", libs, brokers=1, port=free_port(),
                           security=new_security(tmp / "tls"))
    cluster.start()
    security.use(cluster.access)
    pg = start_embedded(tmp / "pg")
    settings = Settings(kafka_bootstrap=cluster.bootstrap, topic_prefix="prog.",
                        producer_id="bench", home=tmp / "home")
    net = LocalNetwork(settings, cluster.bootstrap, pg.dsn, tmp / "logs")
    lines = [f"bench/program_network.py: torch {torch.__version__}, {threads} threads for "
             f"bare torch and for the node (--threads {threads}); 1 replica, quorum 1; "
             f"{args.repeats} runs a case, bare and network alternating"]
    print(lines[0], flush=True)
    try:
        ensure_topics(cluster.bootstrap, "prog.", replication_factor=1,
                      min_insync_replicas=1)
        net.mint("bench", amount_micro=10**15)
        net.start_services()
        net.start_node("n0", operator="op-n0", threads=threads)
        net.wait_registered(["n0"], timeout_s=180)
        client = Client(settings, cluster.bootstrap, "bench", net.passphrase)
        groups = {"node": ([net.procs["node-n0"].pid], True),
                  "services": ([p.pid for name, p in net.procs.items() if name != "node-n0"],
                               False),
                  "broker": (list(cluster.pids.values()), False), "postgres": ([pg.pid], True),
                  "bench (bare torch in its own process, client)": ([os.getpid()], False)}
        # The node's first program task starts its forkserver (imports torch): not a cost
        # of any later task, so a small one pays it first.
        small = wave2d.build(grid=16, steps=2)
        warm = client.quote_program(save_program(small.ep), save_inputs(small.inputs),
                                    steps=2, carry=2, replicas=1, quorum=1)
        through_network(client, net, warm)
        warm_up()  # this process's forkserver, for the child alone
        cases = {k: v for k, v in CASES.items()
                 if (not args.quick or k in QUICK) and args.only in k}
        for name, build in cases.items():
            ex = build()
            program, inputs = save_program(ex.ep), save_inputs(ex.inputs)
            files = (tmp / "program.pt2", tmp / "input.safetensors")
            files[0].write_bytes(program)
            files[1].write_bytes(inputs)
            bares, alones, nets, splits, quotes, cpus = [], [], [], [], [], []
            for _ in range(args.repeats):
                before = cpu_seconds(groups)
                seconds, outs = bare(files, ex, threads)
                bares.append(seconds)
                cpus.append(("bare", cpu_line(before, cpu_seconds(groups))))
                started = time.perf_counter()
                quote = client.quote_program(program, inputs, steps=ex.steps,
                                             carry=ex.carry, mantissa_bits=ex.mantissa_bits,
                                             replicas=1, quorum=1)
                quotes.append(time.perf_counter() - started)
                alones.append(child_alone(program, inputs, ex, quote.params))
                before = cpu_seconds(groups)
                seconds, split, output = through_network(client, net, quote)
                cpus.append(("network", cpu_line(before, cpu_seconds(groups))))
                nets.append(seconds)
                splits.append(split)
                same = all(torch.equal(a, b) if ex.mantissa_bits == 0 else
                           torch.allclose(a, b, rtol=1e-4, atol=1e-6)
                           for a, b in zip(read_outputs(output), outs, strict=True))
                loop = split.get(CHILD[1], 0.0)
                print(f"  {name}: bare {bares[-1]:.3f} s, the node's child alone "
                      f"{alones[-1]:.3f} s, network {seconds:.3f} s (its child's step loop "
                      f"{loop:.3f} s)"
                      f"{'' if same else ' (OUTPUT DIFFERS FROM BARE)'}", flush=True)
            mb, mn = statistics.median(bares), statistics.median(nets)
            ma = statistics.median(alones)
            lines.append(f"{name}: {int(quote.params['units']):,} units; bare median {mb:.3f} s "
                         f"(best {min(bares):.3f}), network median {mn:.3f} s (best "
                         f"{min(nets):.3f}); network / bare {mn / mb:.3f} (medians), "
                         f"{min(nets) / min(bares):.3f} (bests); quote "
                         f"{statistics.median(quotes):.3f} s before submitting")
            lines.append(f"    the node's child alone (sandbox, no network) median {ma:.3f} s "
                         f"(best {min(alones):.3f}): child / bare {ma / mb:.3f}, network / "
                         f"child {mn / ma:.3f} (medians)")
            best = splits[nets.index(min(nets))]
            lines += [f"    {label}: {seconds:.0f}" if label.endswith("(count)") else
                      f"    {label}: {seconds * 1000:.0f} ms" for label, seconds in best.items()]
            lines += [f"    CPU seconds, {kind} run {i // 2 + 1}: {line}"
                      for i, (kind, line) in enumerate(cpus)]
            print("\n".join(lines[-2 - len(best) - len(cpus):]), flush=True)
        client.close()
    finally:
        net.stop()
        stop_embedded(tmp / "pg", pg.system_user)
        cluster.stop()
    return lines


def main() -> None:
    if sys.argv[1:2] == ["--bare"]:
        bare_main(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of bare torch and of the node (default 1: on a "
                        "2-core machine the other core runs the broker, the services and "
                        "the client, which a contributor's machine would not host)")
    parser.add_argument("--quick", action="store_true", help="one case, for a quick look")
    parser.add_argument("--only", default="", help="the cases whose name holds this text")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="destra-bench-"))
    try:
        lines = run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = ROOT / "bench" / "results" / ("program-network-quick.txt"
                                        if args.quick or args.only else "program-network.txt")
    out.write_text("\n".join(lines) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
