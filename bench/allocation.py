"""Placement policies on a simulated fleet: time to a verified result, against an oracle.

    python bench/allocation.py [--tasks 1500] [--nodes 240] [--seed 7] [--rate TASKS_PER_S]
                               [--target-load 0.65] [--lighter 0.5 ...] [--decisions 300]

A discrete-event simulation that runs the allocator's real placement code
(``NodeTable`` and each policy's ``place``) on a heterogeneous fleet whose true
speeds are hidden from every policy but the oracle. Prints:

1. the CPU profile of each workload, measured here (best of 2 runs at two sizes,
   one torch thread), fitted as ``runtime_ms = overhead + per_unit * compute_units``,
   and this CPU's matmul benchmark (the ``cpu`` class's tflops_milli);
2. the fleet (device classes, regions, slots, operators, effective tiers) and the
   hidden truth: the per-workload efficiency table, overhead and host-CPU
   factors, slow links, background load, noise;
3. the trace (one trace, one seed, for every policy);
4. the arrival rate, calibrated so that the oracle keeps ``--target-load`` of the
   slots busy while tasks arrive (busy slot-time over slots x arrival window;
   over the whole makespan the long tail of the last tasks dominates instead);
5. per policy (learned, oracle, random, round-robin, least-loaded, the old
   heuristic): mean and p95 time from submission to a verified result, makespan,
   utilisation (busy slot-time / (slots x makespan)) and load, absolute and as a
   ratio to the oracle; where the replicas ran, per class and per workload;
   "learned vs least-loaded", and the goals (learned within 1.10x of the oracle's
   mean; at least 1.5x better than least-loaded), met or not; then oracle,
   learned and least-loaded again at lighter load (``--lighter``);
6. the runtime model's prediction error (median absolute percentage error) on
   1,000 held-out observations after fitting on 100 and on 2,000, against the
   analytic estimate, and the live learned run's ``model.mdape()`` at its end;
7. ``LearnedPolicy.place`` latency (p50 / p99 ms) on tables of 1,000 and 10,000
   nodes, with the time of each step, against the 5 ms goal at 1,000.

The truth is what the runtime model cannot know a priori: a stencil is
memory-bound, a small MLP launch-bound, a hash search never touches the GPU, some
nodes sit behind slow links, every node carries background load. The oracle
knows the expected true runtime of every task on every node (not each run's
noise, which no scheduler can know; ``--oracle-knows-noise`` gives it that too)
and the true transfer times. The learned policy starts cold: its model learns
from the runtimes of verified replicas, its latency model from measured round
trips, during the run. Profiles are measured afresh each run, so figures move a
little from run to run and machine to machine.
"""

from __future__ import annotations

import argparse
import heapq
import math
import os
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# One OpenMP thread for scikit-learn (set before it loads): the simulation is single-threaded,
# and with two processes on a small machine OpenMP's spinning threads oversubscribe the cores
# (fits measured 50x slower with a second such process running).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from allocator.latency import LatencyModel  # noqa: E402
from allocator.placement import (  # noqa: E402
    REGIONS,
    ConstrainedPolicy,
    HeuristicPolicy,
    NodeTable,
    NodeView,
    PlacementRequest,
)
from allocator.policies import (  # noqa: E402
    LearnedPolicy,
    LeastLoadedPolicy,
    OraclePolicy,
    RandomPolicy,
    RoundRobinPolicy,
    node_shape,
    task_shape,
)
from allocator.pricing import DEFAULT_PRICES, Tier  # noqa: E402
from allocator.runtime_model import NodeShape, Observation, RuntimeModel, TaskShape  # noqa: E402
from destra.errors import NoCapacity  # noqa: E402
from workloads import WORKLOADS  # noqa: E402

# -- 1. CPU profiles -------------------------------------------------------------------------

PROFILE_SIZES: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "mlp-digits": ({"hidden": "32", "epochs": "1"}, {"hidden": "32", "epochs": "4"}),
    "nbody": ({"n": "64", "steps": "20"}, {"n": "64", "steps": "80"}),
    "heat2d": ({"grid": "64", "steps": "50"}, {"grid": "64", "steps": "400"}),
    "matmul": ({"n": "128", "repeats": "2"}, {"n": "256", "repeats": "2"}),
    "sha256-search": ({"count": "20000"}, {"count": "80000"}),
}
"""Two sizes per workload ("sweep" runs the others, so it has no profile of its own)."""
MIN_OVERHEAD_MS = 0.5


@dataclass(frozen=True)
class Profile:
    """A workload's runtime on this machine's CPU (one thread): overhead + per_unit * units."""

    workload: str
    points: tuple[tuple[int, float], ...]
    """(compute_units, best ms) at each measured size."""
    overhead_ms: float
    per_unit_ms: float

    def cpu_ms(self, units: int) -> float:
        return self.overhead_ms + self.per_unit_ms * units


def measure_profiles() -> tuple[dict[str, Profile], int]:
    """Each workload's CPU profile, and this CPU's benchmark (tflops_milli, as a node measures)."""
    import torch

    from node_runner.capability import matmul_tflops

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    profiles = {}
    for name, sizes in PROFILE_SIZES.items():
        workload = WORKLOADS[name]
        points = []
        for raw in sizes:
            params = workload.validate(raw)
            best = math.inf
            for _ in range(2):
                started = time.perf_counter()
                workload.run(params, cpu)
                best = min(best, (time.perf_counter() - started) * 1000)
            points.append((workload.compute_units(params), best))
        (u1, t1), (u2, t2) = points
        per_unit = max((t2 - t1) / (u2 - u1), 1e-6)
        overhead = max(MIN_OVERHEAD_MS, t1 - per_unit * u1)
        profiles[name] = Profile(name, tuple(points), overhead, per_unit)
    tflops_milli = max(1, round(matmul_tflops(cpu) * 1000))
    return profiles, tflops_milli


# -- 2. The fleet and its hidden truth ------------------------------------------------------

@dataclass(frozen=True)
class DeviceClass:
    label: str
    device_class: str
    """As a node runner names it (``cuda-sm<cc>``, ``cpu-<arch>``): homogeneity groups."""
    tflops_milli: int
    """Nominal fp32 matmul benchmark; 0 for the CPU: this machine's own benchmark."""
    memory_gib: int
    share: float
    """Fraction of the fleet's nodes."""
    declared: Tier
    """Declared tier (``effective_tier`` caps it by the benchmark)."""
    overhead_factor: float
    """Hidden: fixed per-run cost (set-up, host<->device copies, hashing) relative to the CPU."""
    host_cpu: float
    """Hidden: speed of the host CPU relative to the reference CPU (for sha256-search)."""


CLASSES: tuple[DeviceClass, ...] = (
    DeviceClass("cpu", "cpu-x86_64", 0, 32, 0.25, Tier.CONSUMER, 1.0, 1.0),
    DeviceClass("t4", "cuda-sm75", 8_000, 16, 0.12, Tier.CONSUMER, 2.5, 1.0),
    DeviceClass("rtx-3060", "cuda-sm86", 12_000, 12, 0.25, Tier.CONSUMER, 2.0, 1.3),
    DeviceClass("rtx-4090", "cuda-sm89", 80_000, 24, 0.20, Tier.PROSUMER, 1.5, 1.8),
    DeviceClass("a100", "cuda-sm80", 19_500, 80, 0.10, Tier.DATACENTER, 2.0, 1.2),
    DeviceClass("h100", "cuda-sm90", 51_000, 80, 0.08, Tier.DATACENTER, 1.8, 1.5),
)

def _per_class(*values: float) -> dict[str, float]:
    return dict(zip([c.label for c in CLASSES], values, strict=True))


EFFICIENCY: dict[str, dict[str, float]] = {
    #                        cpu    t4     rtx-3060 rtx-4090 a100   h100
    "matmul":     _per_class(1.0, 0.9,   0.9,     0.9,     0.9,   0.9),
    "nbody":      _per_class(1.0, 0.45,  0.40,    0.30,    0.50,  0.45),
    "heat2d":     _per_class(1.0, 0.10,  0.075,   0.03,    0.25,  0.16),
    "mlp-digits": _per_class(1.0, 0.005, 0.004,   0.001,   0.004, 0.0015),
}
"""Hidden: the fraction of (class benchmark / CPU benchmark) that a workload's per-unit work
gets on each class. The analytic model assumes 1.0 everywhere.

* matmul: GEMM at 0.9 of the benchmark's own GEMM;
* nbody: all-pairs forces with sqrt and division: about half the GEMM rate;
* heat2d: a 5-point stencil is bound by memory bandwidth, not FLOPs: efficiency is
  (GPU / CPU bandwidth) / (GPU / CPU FLOPs), so the HBM parts (A100, H100) do far
  better per FLOP than the GDDR consumer cards (the RTX 4090 has 80 TFLOP/s but 1 TB/s);
* mlp-digits: 8x8 inputs, batches of 32-256: launch-bound, a GPU is only 1.3-2.7x a CPU core;
* sha256-search is not in the table: a Python hash loop that never touches the GPU
  (``uses_accelerator = False``), so it runs at the host CPU's speed
  (``DeviceClass.host_cpu`` x the reference CPU) whatever the accelerator.
"""

REGION_WEIGHTS: dict[str, float] = {
    "us-east": 0.22, "us-west": 0.14, "eu-west": 0.14, "eu-central": 0.16,
    "ap-south": 0.10, "ap-east": 0.14, "sa-east": 0.10,
}
assert set(REGION_WEIGHTS) == set(REGIONS), "one weight per placement.REGIONS region"
SLOW_LINK_SHARE = 0.10
"""Hidden: the fraction of nodes behind a slow link (+50..300 ms round trip)."""
LOAD_STEP_MS = 30_000
LOAD_MAX = 0.8
LOAD_WALK_SIGMA = 0.08
NOISE_SIGMA = 0.15
STAKE_MICRO = 1_000_000
_NO_LATENCY = LatencyModel()


@dataclass(frozen=True)
class Node:
    node_id: str
    operator_id: str
    region: str
    cls: DeviceClass
    tflops_milli: int
    """The node's measured benchmark: the class's, within +-10 %."""
    slots: int
    extra_rtt_ms: float
    """Hidden: added round trip of a slow link (0 for most)."""


def build_fleet(n_nodes: int, cpu_tflops: int, rng: random.Random) -> list[Node]:
    """Operators own 1 node (most) or a small farm of 2-4 of one class in one region."""
    nodes: list[Node] = []
    regions, region_w = list(REGION_WEIGHTS), list(REGION_WEIGHTS.values())
    operator = 0
    while len(nodes) < n_nodes:
        operator += 1
        count = 1 if rng.random() < 0.8 else rng.randint(2, 4)
        count = min(count, n_nodes - len(nodes))
        cls = rng.choices(CLASSES, weights=[c.share for c in CLASSES])[0]
        region = rng.choices(regions, weights=region_w)[0]
        for _ in range(count):
            base = cls.tflops_milli or cpu_tflops
            slow = rng.random() < SLOW_LINK_SHARE
            nodes.append(Node(
                node_id=f"node-{len(nodes):05d}", operator_id=f"op-{operator:05d}",
                region=region, cls=cls, tflops_milli=max(1, round(base * rng.uniform(0.9, 1.1))),
                slots=rng.randint(1, 4), extra_rtt_ms=rng.uniform(50, 300) if slow else 0.0))
    return nodes


def register(table: NodeTable, nodes: list[Node], now_ms: int = 0) -> None:
    for n in nodes:
        table.on_registered(n.node_id, n.operator_id, n.region, n.cls.declared.value,
                            n.cls.device_class, n.tflops_milli, n.cls.memory_gib * 1024,
                            n.slots, STAKE_MICRO, now_ms)


class Truth:
    """The fleet's hidden truth: expected runtimes and transfer times."""

    def __init__(self, nodes: list[Node], profiles: dict[str, Profile], cpu_tflops: int) -> None:
        self.nodes = nodes
        self.index = {n.node_id: i for i, n in enumerate(nodes)}
        self.profiles = profiles
        self.cpu_tflops = cpu_tflops

    def runtime_ms(self, workload: str, units: int, node: Node, load: float) -> float:
        """Expected runtime, noise aside, with the node's background ``load`` (0..1)."""
        prof, cls = self.profiles[workload], node.cls
        if not getattr(WORKLOADS[workload], "uses_accelerator", True):
            base = prof.cpu_ms(units) / cls.host_cpu
        else:
            base = (prof.overhead_ms * cls.overhead_factor
                    + prof.per_unit_ms * units * self.cpu_tflops
                    / (node.tflops_milli * EFFICIENCY[workload][cls.label]))
        return base / (1 - load)

    def rtt_ms(self, region: str | None, view: NodeView) -> float:
        return (LatencyModel.prior_rtt_ms(region, view)
                + self.nodes[self.index[view.node_id]].extra_rtt_ms)

    def transfer_ms(self, request: PlacementRequest, view: NodeView) -> float:
        return (_NO_LATENCY.transfer_ms(request.submitter_region, view, request.payload_bytes)
                + self.nodes[self.index[view.node_id]].extra_rtt_ms)


class LoadWalk:
    """Background load per node, a random walk in [0, 0.8] stepped every 30 s (shared by runs)."""

    def __init__(self, n_nodes: int, seed: int) -> None:
        self.rng = np.random.default_rng([seed, 1])
        self.steps = [self.rng.uniform(0, LOAD_MAX, n_nodes)]

    def at(self, step: int) -> np.ndarray:
        while len(self.steps) <= step:
            prev = self.steps[-1]
            self.steps.append(np.clip(prev + self.rng.normal(0, LOAD_WALK_SIGMA, prev.size),
                                      0, LOAD_MAX))
        return self.steps[step]


# -- 3. The trace ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    index: int
    request: PlacementRequest
    gap: float
    """Exponential inter-arrival gap at rate 1 (scaled by the arrival rate)."""


def _log_int(rng: random.Random, lo: float, hi: float) -> int:
    return round(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def draw_params(workload: str, rng: random.Random) -> dict[str, str]:
    """Public parameters spanning orders of magnitude of compute."""
    if workload == "matmul":
        return {"n": str(_log_int(rng, 64, 8192)), "repeats": str(rng.randint(1, 10))}
    if workload == "heat2d":
        return {"grid": str(_log_int(rng, 16, 2048)), "steps": str(_log_int(rng, 10, 5000))}
    if workload == "nbody":
        return {"n": str(_log_int(rng, 16, 2048)), "steps": str(_log_int(rng, 10, 1000))}
    if workload == "mlp-digits":
        return {"hidden": str(_log_int(rng, 8, 512)), "epochs": str(_log_int(rng, 1, 100)),
                "batch_size": str(rng.choice((32, 64, 128, 256)))}
    if workload == "sha256-search":
        return {"count": str(_log_int(rng, 1_000, 10_000_000))}
    raise ValueError(workload)


def draw_task(rng: random.Random, index: int) -> Task:
    name = rng.choice(sorted(PROFILE_SIZES))
    workload = WORKLOADS[name]
    params = workload.validate(draw_params(name, rng))
    regions, weights = list(REGION_WEIGHTS), list(REGION_WEIGHTS.values())
    request = PlacementRequest(
        task_id=f"task-{index:05d}", replicas=3, memory_mb=workload.memory_mb(params),
        tier=Tier.CONSUMER.value, submitter_region=rng.choices(regions, weights=weights)[0],
        homogeneous=workload.homogeneous(params),
        workload=name, compute_units=workload.compute_units(params),
        payload_bytes=_log_int(rng, 1024, 50 * 2**20),
        max_unit_price_micro=DEFAULT_PRICES[Tier.PROSUMER] if rng.random() < 0.10 else None)
    return Task(index, request, rng.expovariate(1.0))


QUORUM = 2
"""Replicas 3, quorum 2: verification waits for every replica (commit) and a reveal round."""


# -- 4. The simulation ----------------------------------------------------------------------

@dataclass
class RunResult:
    name: str
    ttv_ms: list[float]
    """Time to verified of each task, in trace order."""
    makespan_ms: float
    utilisation: float
    """Busy slot-time over total slots x makespan."""
    load: float
    """Busy slot-time while tasks arrive, over total slots x the arrival window."""
    placed: Counter[tuple[str, str]]
    """Replicas per (workload, class label)."""
    place_calls: int
    wall_s: float
    mdape: float | None = None
    model_fits: int = 0
    predictions: int = 0
    """Replicas whose prediction was checked against their runtime (learned only)."""
    unpredicted: int = 0
    """Replicas placed with no entry in ``policy.last_runtime`` (learned only)."""


@dataclass
class _Running:
    arrival: float
    left: int
    max_rtt: float = 0.0
    last_finish: float = 0.0
    obs: list[tuple[TaskShape, Any, float, float | None]] = field(default_factory=list)


CALIBRATION_RUNS = 6
MAX_FAILED_PER_DRAIN = 8
"""Queued tasks that may fail to place in one pass before the pass stops (bounded work)."""
_ARRIVE, _TICK, _START, _DONE, _VERIFY = range(5)


def simulate(name: str, policy: ConstrainedPolicy, nodes: list[Node], tasks: list[Task],
             rate: float, truth: Truth, walk: LoadWalk, noise: np.ndarray) -> RunResult:
    """Run the trace through ``policy``; every policy sees the same arrivals, loads and noise.

    Events: arrival (queue, then drain), heartbeat tick every 30 s (new background
    load, reported with the node's free slots), replica start (the learned policy
    measures the round trip), replica done (release the slot, drain), verified (the
    last replica's end plus the slowest replica's round trip: the reveal round; the
    learned policy's model observes every replica's runtime).
    """
    wall = time.perf_counter()
    table = NodeTable(stale_after_ms=10**12)
    register(table, nodes)
    learned = policy if isinstance(policy, LearnedPolicy) else None
    index = truth.index
    n_nodes = len(nodes)
    free = [n.slots for n in nodes]
    total_slots = sum(free)
    # Free-operator bookkeeping (the live allocator's cheap "can it fit now" check).
    op_free: Counter[str] = Counter()
    class_op_free: Counter[tuple[str, str]] = Counter()
    for n in nodes:
        op_free[n.operator_id] += n.slots
        class_op_free[n.cls.device_class, n.operator_id] += n.slots
    free_ops = len(op_free)
    class_free_ops: Counter[str] = Counter(c for c, _ in class_op_free)
    load = walk.at(0)
    seq = 0
    for i, n in enumerate(nodes):
        table.on_heartbeat(n.node_id, int(load[i] * 1000), free[i], seq, 0)

    events: list[tuple[float, int, int, Any]] = []
    counter = 0

    def push(t: float, kind: int, data: Any) -> None:
        nonlocal counter
        counter += 1
        heapq.heappush(events, (t, counter, kind, data))

    arrival_at: list[float] = []
    t_arr = 0.0
    for task in tasks:
        t_arr += task.gap / rate * 1000
        arrival_at.append(t_arr)
        push(t_arr, _ARRIVE, task)
    window_end = t_arr
    push(LOAD_STEP_MS, _TICK, 1)

    queue: list[Task] = []
    running: dict[int, _Running] = {}
    ttv: list[float] = [math.nan] * len(tasks)
    verified = 0
    busy = 0.0
    busy_window = 0.0
    placed: Counter[tuple[str, str]] = Counter()
    place_calls = 0
    last_verified = 0.0
    predicted_count = unpredicted = 0

    def take(i: int, delta: int) -> None:
        nonlocal free_ops
        n = nodes[i]
        free[i] += delta
        before = op_free[n.operator_id]
        op_free[n.operator_id] = before + delta
        free_ops += (before + delta > 0) - (before > 0)
        key = (n.cls.device_class, n.operator_id)
        before = class_op_free[key]
        class_op_free[key] = before + delta
        class_free_ops[n.cls.device_class] += (before + delta > 0) - (before > 0)

    def fits_now(req: PlacementRequest) -> bool:
        """A necessary condition: enough operators with a free slot (of one class if needed)."""
        if req.homogeneous:
            return max(class_free_ops.values()) >= req.replicas
        return free_ops >= req.replicas

    def place(task: Task, t: float) -> bool:
        nonlocal busy, busy_window, place_calls, predicted_count, unpredicted
        req = task.request
        place_calls += 1
        try:
            chosen = policy.place(req, table, int(t))
        except NoCapacity:
            return False
        run = running[task.index] = _Running(arrival_at[task.index], len(chosen))
        predicted = getattr(policy, "last_runtime", {})
        for view in chosen:
            i = index[view.node_id]
            table.reserve(view.node_id)
            take(i, -1)
            rtt = truth.rtt_ms(req.submitter_region, view)
            transfer = truth.transfer_ms(req, view)
            runtime = (truth.runtime_ms(req.workload, req.compute_units, nodes[i], load[i])
                       * noise[task.index, i])
            finish = t + transfer + runtime
            busy += finish - t
            busy_window += max(0.0, min(finish, window_end) - t)
            placed[req.workload, nodes[i].cls.label] += 1
            run.max_rtt = max(run.max_rtt, rtt)
            if learned is not None:
                push(t + transfer, _START, (view.node_id, rtt))
                guess = predicted.get(view.node_id)
                predicted_count += guess is not None
                unpredicted += guess is None
                run.obs.append((task_shape(req), node_shape(view), runtime, guess))
            push(finish, _DONE, (task.index, i))
        return True

    def drain(t: float) -> None:
        """Place queued tasks oldest first; skip what cannot fit; stop after a few failures."""
        failed = 0
        kept: list[Task] = []
        for pos, task in enumerate(queue):
            if failed >= MAX_FAILED_PER_DRAIN or free_ops == 0:
                kept.extend(queue[pos:])
                break
            if not fits_now(task.request):
                kept.append(task)  # cannot fit now: no place() call, as in the live allocator
            elif not place(task, t):
                failed += 1
                kept.append(task)
        queue[:] = kept

    while events:
        t, _, kind, data = heapq.heappop(events)
        if kind == _ARRIVE:
            queue.append(data)
            drain(t)
        elif kind == _DONE:
            task_index, i = data
            table.release(nodes[i].node_id)
            take(i, +1)
            run = running[task_index]
            run.left -= 1
            run.last_finish = max(run.last_finish, t)
            if run.left == 0:
                push(run.last_finish + run.max_rtt, _VERIFY, task_index)
            drain(t)
        elif kind == _START:
            assert learned is not None
            learned.latency.observe_rtt(*data)
        elif kind == _VERIFY:
            run = running.pop(data)
            ttv[data] = t - run.arrival
            verified += 1
            last_verified = max(last_verified, t)
            if learned is not None:
                for task_s, node_s, runtime, predicted in run.obs:
                    learned.model.observe(Observation(task_s, node_s, runtime, predicted))
        elif kind == _TICK:
            load = walk.at(data)
            seq += 1
            for i in range(n_nodes):
                table.on_heartbeat(nodes[i].node_id, int(load[i] * 1000), free[i], seq, int(t))
            if verified < len(tasks):
                push(t + LOAD_STEP_MS, _TICK, data + 1)
    if verified != len(tasks):
        raise RuntimeError(f"{name}: {len(tasks) - verified} tasks never verified")
    result = RunResult(name, ttv, last_verified, busy / (total_slots * last_verified),
                       busy_window / (total_slots * window_end), placed, place_calls,
                       time.perf_counter() - wall)
    if learned is not None:
        result.mdape = learned.model.mdape()
        result.model_fits = learned.model.version
        result.predictions = predicted_count
        result.unpredicted = unpredicted
    return result


def make_oracle(truth: Truth, tasks: list[Task], noise: np.ndarray,
                knows_noise: bool) -> OraclePolicy:
    """The yardstick: the expected true runtime (with the noise too if ``knows_noise``)."""
    by_id = {t.request.task_id: t.index for t in tasks}

    def true_runtime(request: PlacementRequest, view: NodeView) -> float:
        i = truth.index[view.node_id]
        ms = truth.runtime_ms(request.workload, request.compute_units, truth.nodes[i],
                              view.load_permille / 1000)
        return ms * noise[by_id[request.task_id], i] if knows_noise else ms

    return OraclePolicy(true_runtime, truth.transfer_ms)


# -- 5. Prediction error and decision latency -----------------------------------------------

def synthetic_observations(count: int, truth: Truth, rng: random.Random) -> list[Observation]:
    """Random task on a random node under random load, with the true runtime (and noise)."""
    out = []
    for k in range(count):
        req = draw_task(rng, k).request
        node = rng.choice(truth.nodes)
        load = rng.uniform(0, LOAD_MAX)
        ms = (truth.runtime_ms(req.workload, req.compute_units, node, load)
              * math.exp(rng.gauss(0, NOISE_SIGMA)))
        out.append(Observation(
            TaskShape(req.workload, req.compute_units, req.memory_mb),
            node_shape_of(node, int(load * 1000)), ms))
    return out


def node_shape_of(node: Node, load_permille: int) -> NodeShape:
    return NodeShape(node.cls.device_class, node.tflops_milli, load_permille)


@dataclass
class Latency:
    n_nodes: int
    place_ms: list[float]
    parts_ms: dict[str, float]
    """Median ms of each step of one decision, timed separately."""
    build_s: float


def decision_latency(n_nodes: int, model: RuntimeModel, cpu_tflops: int, seed: int,
                     decisions: int) -> Latency:
    """``LearnedPolicy.place`` on an all-live table of ``n_nodes`` with free slots.

    Every node has a measured round trip (as after a while of heartbeats). Each
    request is a new task; the model caches its corrections per size bucket (compute and
    memory in quarter steps of log2), so it calls scikit-learn only for sizes it has not seen.
    Then a breakdown of one decision's steps, each timed on its own, on a sample.
    """
    rng = random.Random(seed)
    nodes = build_fleet(n_nodes, cpu_tflops, rng)
    started = time.perf_counter()
    table = NodeTable(stale_after_ms=10**12)
    register(table, nodes)
    for n in nodes:
        table.on_heartbeat(n.node_id, rng.randrange(0, 800), n.slots, 0, 0)
    build_s = time.perf_counter() - started
    policy = LearnedPolicy(model, LatencyModel())
    for n in nodes:
        policy.latency.observe_rtt(n.node_id, 20 + n.extra_rtt_ms)
    requests = [draw_task(rng, k).request for k in range(decisions)]
    times = []
    for req in requests:
        t0 = time.perf_counter()
        policy.place(req, table, 0)
        times.append((time.perf_counter() - t0) * 1000)
    parts: dict[str, list[float]] = {"table iteration": [], "constraints": [],
                                     "runtime prediction": [], "transfer estimates": [],
                                     "sort": []}
    fresh = [draw_task(rng, decisions + k).request for k in range(max(5, decisions // 10))]
    for req in fresh:  # new tasks, timed step by step as place() runs them
        t0 = time.perf_counter()
        list(table)
        t1 = time.perf_counter()
        candidates, _ = policy.candidates(req, table, 0)  # the same filter place() runs
        t2 = time.perf_counter()
        runtimes = policy.runtimes(req, candidates)
        t3 = time.perf_counter()
        eta = {n.node_id: r + t for n, r, t in zip(
            candidates, runtimes, policy.transfers(req, candidates), strict=True)}
        t4 = time.perf_counter()
        sorted(candidates, key=lambda n: (eta[n.node_id], policy.prices[n.tier], n.node_id))
        t5 = time.perf_counter()
        for key, a, b in zip(parts, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5), strict=True):
            parts[key].append((b - a) * 1000)
    return Latency(n_nodes, times, {k: statistics.median(v) for k, v in parts.items()}, build_s)


# -- 6. Output ------------------------------------------------------------------------------

def _fmt_ms(ms: float) -> str:
    if ms >= 100_000:
        return f"{ms / 1000:,.0f} s"
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    return f"{ms:.0f} ms"


def summarise(r: RunResult) -> dict[str, float]:
    return {"mean": statistics.fmean(r.ttv_ms), "p95": float(np.percentile(r.ttv_ms, 95)),
            "makespan": r.makespan_ms, "util": r.utilisation, "load": r.load}


class Bench:
    """The shared setup of every run: fleet, truth, trace, loads and noise."""

    def __init__(self, args: argparse.Namespace, profiles: dict[str, Profile],
                 cpu_tflops: int) -> None:
        self.args = args
        self.profiles = profiles
        self.cpu_tflops = cpu_tflops
        self.nodes = build_fleet(args.nodes, cpu_tflops, random.Random(args.seed))
        self.truth = Truth(self.nodes, profiles, cpu_tflops)
        trace_rng = random.Random(args.seed + 1)
        self.tasks = [draw_task(trace_rng, k) for k in range(args.tasks)]
        self.noise = np.random.default_rng([args.seed, 2]).lognormal(
            0, NOISE_SIGMA, (len(self.tasks), len(self.nodes)))
        self.walk = LoadWalk(len(self.nodes), args.seed)

    def policy(self, name: str) -> ConstrainedPolicy:
        if name == "learned":
            return LearnedPolicy(RuntimeModel(background=False, seed=self.args.seed),
                                 LatencyModel())
        if name == "oracle":
            return make_oracle(self.truth, self.tasks, self.noise, self.args.oracle_knows_noise)
        if name == "random":
            return RandomPolicy(self.args.seed)
        if name == "round-robin":
            return RoundRobinPolicy()
        if name == "least-loaded":
            return LeastLoadedPolicy()
        if name == "heuristic (old)":
            return HeuristicPolicy()
        raise ValueError(name)

    def run(self, name: str, rate: float) -> RunResult:
        return simulate(name, self.policy(name), self.nodes, self.tasks, rate, self.truth,
                        self.walk, self.noise)


POLICIES = ("learned", "oracle", "random", "round-robin", "least-loaded", "heuristic (old)")
CALIBRATION_TOLERANCE = 0.05


def calibrate(bench: Bench, target: float) -> tuple[float, RunResult]:
    """The arrival rate at which the oracle's load (busy slots while tasks arrive) is ``target``.

    The first guess puts every replica on the fastest node for its task, at mean
    load; then bracketing, interpolated in log-rate.
    """
    slots = sum(n.slots for n in bench.nodes)
    per_task_s = statistics.fmean(
        3 * min(bench.truth.runtime_ms(t.request.workload, t.request.compute_units, n, 0.4)
                for n in bench.nodes) / 1000 for t in bench.tasks[:200])
    rate = target * slots / per_task_s
    lo: tuple[float, float] | None = None
    hi: tuple[float, float] | None = None
    best: tuple[float, RunResult] | None = None
    for _ in range(CALIBRATION_RUNS):
        r = bench.run("oracle", rate)
        print(f"  {rate:9.2f} tasks/s -> oracle load {r.load:6.1%} (utilisation over the "
              f"makespan {r.utilisation:6.1%}), mean time to verified "
              f"{_fmt_ms(statistics.fmean(r.ttv_ms))}  [{r.wall_s:.1f} s]")
        if best is None or abs(r.load - target) < abs(best[1].load - target):
            best = (rate, r)
        if abs(r.load - target) <= CALIBRATION_TOLERANCE:
            break
        if r.load < target:
            lo = (rate, r.load)
        else:
            hi = (rate, r.load)
        if lo and hi:
            (r1, u1), (r2, u2) = lo, hi
            f = (target - u1) / (u2 - u1)
            rate = math.exp(math.log(r1) + f * (math.log(r2) - math.log(r1)))
        else:
            rate *= min(4.0, max(0.25, target / max(r.load, 1e-3)))
    assert best is not None
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1500)
    parser.add_argument("--nodes", type=int, default=240)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rate", type=float, default=None,
                        help="arrivals per second (default: calibrated on the oracle)")
    parser.add_argument("--target-load", type=float, default=0.65,
                        help="the oracle's slot load (while tasks arrive) to calibrate to")
    parser.add_argument("--oracle-knows-noise", action="store_true",
                        help="the oracle also knows each run's random noise")
    parser.add_argument("--decisions", type=int, default=300,
                        help="place() calls timed at 1,000 nodes (a third at 10,000; 0: skip)")
    parser.add_argument("--lighter", type=float, nargs="*", default=[0.5],
                        help="also run oracle, learned and least-loaded at these fractions of "
                             "the rate (default 0.5; none: skip)")
    args = parser.parse_args()
    started = time.perf_counter()

    # 1. Profiles.
    profiles, cpu_tflops = measure_profiles()
    print("1. CPU profiles, measured here (one torch thread, best of 2 runs per size), fitted as "
          "overhead + per_unit * units")
    print(f"   this CPU's matmul benchmark (node_runner.capability): {cpu_tflops} tflops_milli; "
          "the 'cpu' class's figure")
    print(f"   {'workload':<14} {'small':>19} {'larger':>19}   {'overhead':>9} {'per unit':>10}")
    for p in profiles.values():
        pts = "".join(f" {f'{u} u: {ms:.1f} ms':>19}" for u, ms in p.points)
        print(f"   {p.workload:<14}{pts}   {p.overhead_ms:6.2f} ms {p.per_unit_ms:7.4f} ms")
    print(f"   [{time.perf_counter() - started:.0f} s]")

    # 2. Fleet.
    bench = Bench(args, profiles, cpu_tflops)
    nodes, tasks = bench.nodes, bench.tasks
    probe = NodeTable()
    register(probe, nodes)
    tiers = Counter(v.tier.value for v in probe)
    print(f"\n2. Fleet: {len(nodes)} nodes, {sum(n.slots for n in nodes)} slots, "
          f"{len({n.operator_id for n in nodes})} operators, "
          f"{len({n.region for n in nodes})} regions; effective tiers: "
          f"{', '.join(f'{v} {k}' for k, v in sorted(tiers.items()))}; "
          f"{sum(1 for n in nodes if n.extra_rtt_ms)} nodes behind a hidden slow link")
    print(f"   {'class':<9} {'device_class':<11} {'nodes':>5} {'slots':>5} {'tflops_milli':>12} "
          f"{'GiB':>3}  {'effective tier':<20} {'ovh':>4} {'host':>4} | efficiency: "
          + " ".join(f"{w:>10}" for w in EFFICIENCY))
    for c in CLASSES:
        members = [n for n in nodes if n.cls is c]
        tier = Counter(probe.get(n.node_id).tier.value  # type: ignore[union-attr]
                       for n in members)
        tier_s = " ".join(f"{k[:4]} {v}" for k, v in sorted(tier.items()))
        print(f"   {c.label:<9} {c.device_class:<11} {len(members):>5} "
              f"{sum(n.slots for n in members):>5} {c.tflops_milli or cpu_tflops:>12,} "
              f"{c.memory_gib:>3}  {tier_s:<20} {c.overhead_factor:>4.1f} {c.host_cpu:>4.1f} | "
              f"{'':11}" + " ".join(f"{EFFICIENCY[w][c.label]:>10.4g}" for w in EFFICIENCY))
    print("   Hidden from every policy but the oracle: the efficiency table (sha256-search runs "
          "on the host CPU,\n   'host' x the reference), the overhead factor ('ovh'), slow "
          f"links (+50..300 ms), background load (a walk\n   in [0, 0.8], sigma {LOAD_WALK_SIGMA} "
          f"per 30 s step), runtime noise (lognormal, sigma {NOISE_SIGMA}). Benchmarks vary "
          "+-10 % per node.")

    # 3. Trace.
    mix = Counter(t.request.workload for t in tasks)
    units = [t.request.compute_units for t in tasks]
    cpu_ms = [profiles[t.request.workload].cpu_ms(t.request.compute_units) for t in tasks]
    best_ms = [min(bench.truth.runtime_ms(t.request.workload, t.request.compute_units, n, 0)
                   for n in nodes) for t in tasks]
    print(f"\n3. Trace: {len(tasks)} tasks "
          f"({', '.join(f'{v} {k}' for k, v in sorted(mix.items()))}), 3 replicas, quorum "
          f"{QUORUM}")
    print(f"   compute units: min {min(units):,}, median {int(statistics.median(units)):,}, "
          f"max {max(units):,}")
    print(f"   runtime on the reference CPU: median {_fmt_ms(statistics.median(cpu_ms))}, max "
          f"{_fmt_ms(max(cpu_ms))}; on the best node, idle: median "
          f"{_fmt_ms(statistics.median(best_ms))}, max {_fmt_ms(max(best_ms))}")
    print(f"   homogeneous (workload.homogeneous): {sum(t.request.homogeneous for t in tasks)}; "
          f"price limit {DEFAULT_PRICES[Tier.PROSUMER]} micro/unit (prosumer): "
          f"{sum(t.request.max_unit_price_micro is not None for t in tasks)}; payloads 1 KiB.."
          "50 MiB log-uniform; tier consumer")

    # 4. Arrival rate.
    oracle: RunResult | None = None
    if args.rate is not None:
        rate = args.rate
    else:
        print(f"\n4. Arrival rate: calibrated so that the oracle keeps {args.target_load:.0%} "
              f"(+-{CALIBRATION_TOLERANCE:.0%}) of the slots busy while tasks arrive")
        rate, oracle = calibrate(bench, args.target_load)
    window_s = sum(t.gap for t in tasks) / rate
    print(f"   Poisson arrivals at {rate:.1f} tasks/s: {len(tasks)} tasks over {window_s:.1f} s")

    # 5. Policies on the same trace.
    results: dict[str, RunResult] = {}
    for name in POLICIES:
        results[name] = oracle if name == "oracle" and oracle is not None else bench.run(name, rate)
    print(f"\n5. Time to a verified result (submission -> every replica done + the reveal round),"
          f" {len(tasks)} tasks at {rate:.1f}/s")
    print(f"   {'policy':<16} {'mean':>16} {'p95':>16} {'makespan':>17} {'utilisation':>14} "
          f"{'load':>6}  {'wall':>6}")
    base = summarise(results["oracle"])
    for name in POLICIES:
        s = summarise(results[name])
        cells = [f"{_fmt_ms(s[k])} {s[k] / base[k]:.2f}x" for k in ("mean", "p95", "makespan")]
        print(f"   {name:<16} {cells[0]:>16} {cells[1]:>16} {cells[2]:>17} "
              f"{s['util']:>6.1%} {s['util'] / base['util']:.2f}x {s['load']:>6.1%}  "
              f"{results[name].wall_s:5.1f}s")
    print("   (x: ratio to the oracle; utilisation: busy slot-time / (slots x makespan); load: "
          "busy slot-time while\n   tasks arrive / (slots x arrival window); wall: this "
          "machine's seconds for the run)")
    print("\n   Where the replicas ran (% of all replicas)")
    print(f"   {'policy':<16} " + " ".join(f"{c.label:>8}" for c in CLASSES))
    for name in POLICIES:
        by_class: Counter[str] = Counter()
        for (_, label), count in results[name].placed.items():
            by_class[label] += count
        total = sum(by_class.values())
        print(f"   {name:<16} "
              + " ".join(f"{100 * by_class[c.label] / total:>7.1f}%" for c in CLASSES))
    fast = ("rtx-4090", "a100", "h100")
    print(f"\n   Per workload, % of its replicas on the CPU class / on the fast GPUs "
          f"({', '.join(fast)})")
    shown = ("oracle", "learned", "least-loaded")
    print(f"   {'workload':<14} " + " ".join(f"{n:>15}" for n in shown))
    for w in sorted(PROFILE_SIZES):
        cells = []
        for name in shown:
            placed = results[name].placed
            total = sum(v for (pw, _), v in placed.items() if pw == w)
            cpu = placed[w, "cpu"] / total
            gpu = sum(placed[w, c] for c in fast) / total
            cells.append(f"{cpu:4.0%} / {gpu:4.0%}")
        print(f"   {w:<14} " + " ".join(f"{c:>15}" for c in cells))

    learned, least = summarise(results["learned"]), summarise(results["least-loaded"])
    vs_oracle = learned["mean"] / base["mean"]
    vs_least = least["mean"] / learned["mean"]
    skip = len(tasks) // 5
    warm = (statistics.fmean(results["learned"].ttv_ms[skip:])
            / statistics.fmean(results["oracle"].ttv_ms[skip:]))
    print(f"\n   learned vs least-loaded mean: {vs_least:.2f}x better")
    print(f"   learned vs oracle mean: {vs_oracle:.2f}x; leaving out the first {skip} tasks "
          f"(the cold start): {warm:.2f}x")
    print("   Goals:")
    print(f"     learned mean <= 1.10x the oracle's:       {vs_oracle:5.2f}x  "
          f"{'MET' if vs_oracle <= 1.10 else 'NOT MET'}")
    print(f"     learned >= 1.5x better than least-loaded: {vs_least:5.2f}x  "
          f"{'MET' if vs_least >= 1.5 else 'NOT MET'}")

    if args.lighter:
        print("\n   The same trace at lighter load: mean time to verified (x oracle)")
        print(f"   {'rate':>9} {'oracle load':>11} {'oracle':>9} {'learned':>15} "
              f"{'least-loaded':>16} {'learned vs least-loaded':>24}")
        for factor in args.lighter:
            r = {name: bench.run(name, rate * factor) for name in shown}
            m = {name: statistics.fmean(v.ttv_ms) for name, v in r.items()}
            print(f"   {rate * factor:7.1f}/s {r['oracle'].load:>11.1%} {_fmt_ms(m['oracle']):>9} "
                  f"{_fmt_ms(m['learned']):>9} {m['learned'] / m['oracle']:.2f}x "
                  f"{_fmt_ms(m['least-loaded']):>9} {m['least-loaded'] / m['oracle']:.2f}x "
                  f"{m['least-loaded'] / m['learned']:>21.2f}x")

    # 6. Prediction error.
    obs_rng = random.Random(args.seed + 3)
    held_out = synthetic_observations(1000, bench.truth, obs_rng)
    train = synthetic_observations(2000, bench.truth, obs_rng)
    analytic = RuntimeModel(background=False).evaluate(held_out)
    small = RuntimeModel(background=False, seed=args.seed)
    small.fit(train[:100])
    big = RuntimeModel(background=False, seed=args.seed)
    big.fit(train)
    floor = float(np.median(np.abs(np.random.default_rng([args.seed, 3]).lognormal(
        0, NOISE_SIGMA, 100_000) - 1)))
    live = results["learned"]
    print("\n6. Runtime prediction error: median absolute percentage error on 1,000 held-out "
          "observations\n   (random task, random node, random load, from the fleet truth)")
    print(f"   analytic estimate (never fitted):  {analytic:7.1%}")
    print(f"   fitted on   100 observations:      {small.evaluate(held_out):7.1%}")
    print(f"   fitted on 2,000 observations:      {big.evaluate(held_out):7.1%}")
    print(f"   (the truth's own noise, lognormal sigma {NOISE_SIGMA}, alone gives {floor:.1%})")
    if live.mdape is not None:
        print(f"   live learned run at its end, model.mdape(): {live.mdape:.1%} over its last "
              f"{min(1000, live.predictions)} checked predictions ({live.model_fits} fits); "
              f"{live.unpredicted} of {3 * len(tasks)} replicas had no prediction in "
              "policy.last_runtime")

    # 7. Decision latency.
    if args.decisions <= 0:
        print(f"\nTotal {time.perf_counter() - started:.0f} s")
        return
    print("\n7. LearnedPolicy.place() decision latency: model fitted on 2,000 observations, "
          "every node live with a\n   free slot and a measured round trip, each request a new "
          "task; steps timed apart on fresh requests")
    for size, count in ((1_000, args.decisions), (10_000, max(10, args.decisions // 3))):
        lat = decision_latency(size, big, cpu_tflops, args.seed + size, count)
        p50, p99 = (float(np.percentile(lat.place_ms, q)) for q in (50, 99))
        print(f"   {size:>6,} nodes: p50 {p50:7.1f} ms   p99 {p99:7.1f} ms   ({count} decisions; "
              f"the table built in {lat.build_s:.2f} s)")
        print("        median per step: " + ", ".join(f"{k} {v:.1f} ms"
                                                       for k, v in lat.parts_ms.items()))
        if size == 1_000:
            print(f"        goal <= 5 ms per decision at 1,000 nodes: p50 "
                  f"{'MET' if p50 <= 5 else 'NOT MET'}, p99 {'MET' if p99 <= 5 else 'NOT MET'}")
    print(f"\nTotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
