"""Placement policies under their hard constraints; the runtime and latency models."""

from __future__ import annotations

import random
import time

import pytest

from allocator.latency import LatencyModel
from allocator.placement import HeuristicPolicy, NodeTable, NodeView, PlacementRequest
from allocator.policies import (
    LearnedPolicy,
    LeastLoadedPolicy,
    OraclePolicy,
    RandomPolicy,
    RoundRobinPolicy,
)
from allocator.pricing import DEFAULT_PRICES, Tier
from allocator.runtime_model import NodeShape, Observation, RuntimeModel, TaskShape, analytic_ms
from destra.errors import NoCapacity

NOW = 1_000_000
CLASSES = [("cpu", 50, 32_768), ("rtx-4090", 80_000, 24_576), ("a100", 19_500, 81_920),
           ("t4", 8_000, 16_384), ("h100", 51_000, 81_920)]
REGIONS = ["eu-west", "us-east", "ap-east", "us-west", "eu-central", "sa-east"]


def _truth(request: PlacementRequest, node: NodeView) -> float:
    return float(len(node.node_id) + node.tflops_milli % 7)


def _policies() -> list[object]:
    return [LearnedPolicy(), OraclePolicy(_truth, lambda r, n: 1.0), RandomPolicy(3),
            RoundRobinPolicy(), LeastLoadedPolicy(), HeuristicPolicy()]


def _table(rng: random.Random, n: int = 40) -> NodeTable:
    table = NodeTable(stale_after_ms=30_000)
    for i in range(n):
        device, tflops, memory = rng.choice(CLASSES)
        tier = rng.choice(list(Tier))
        table.on_registered(f"n{i:03d}", f"op{rng.randrange(n // 2)}", rng.choice(REGIONS),
                            str(tier), device, tflops, memory, rng.randint(1, 3), 0,
                            NOW - rng.choice([0, 0, 0, 60_000]))  # some are stale
        table.on_heartbeat(f"n{i:03d}", rng.randrange(0, 900), rng.randint(0, 2), 1,
                           NOW - rng.choice([0, 0, 0, 60_000]))
    return table


def _request(rng: random.Random, table: NodeTable) -> PlacementRequest:
    nodes = list(table)
    return PlacementRequest(
        f"t{rng.randrange(10**6)}", rng.randint(1, 4), rng.choice([1, 10_000, 30_000]),
        rng.choice(list(Tier)), rng.choice(REGIONS), rng.random() < 0.3,
        frozenset(n.node_id for n in rng.sample(nodes, 2)), workload="matmul",
        compute_units=rng.randint(1, 10**6), payload_bytes=rng.randint(0, 10**7),
        max_unit_price_micro=rng.choice([None, DEFAULT_PRICES[Tier.PROSUMER]]))


@pytest.mark.parametrize("policy_index", range(6))
def test_every_policy_keeps_every_hard_constraint(policy_index: int) -> None:
    rng = random.Random(policy_index)
    placed = refused = 0
    for _ in range(300):
        table = _table(rng)
        request = _request(rng, table)
        policy = _policies()[policy_index]
        try:
            chosen = policy.place(request, table, NOW)  # type: ignore[attr-defined]
        except NoCapacity:
            refused += 1
            continue
        placed += 1
        assert len(chosen) == request.replicas
        assert len({n.operator_id for n in chosen}) == request.replicas  # one per operator
        excluded_ops = {table.get(i).operator_id for i in request.exclude_node_ids}  # type: ignore[union-attr]
        for node in chosen:
            assert table.is_live(node, NOW) and node.free_slots >= 1
            assert node.memory_mb >= request.memory_mb
            assert node.tier.rank >= Tier(request.tier).rank
            assert node.node_id not in request.exclude_node_ids
            assert node.operator_id not in excluded_ops
            if request.max_unit_price_micro is not None:
                assert DEFAULT_PRICES[node.tier] <= request.max_unit_price_micro
        if request.homogeneous:
            assert len({n.device_class for n in chosen}) == 1
    assert placed > 50 and refused > 10  # both paths were exercised


def _node(node_id: str, device: str, tflops: int, operator: str | None = None,
          region: str = "eu-west", load: int = 0) -> tuple[str, ...]:
    return (node_id, operator or node_id, region, device, str(tflops), str(load))


def _fixed_table(*nodes: tuple[str, ...]) -> NodeTable:
    table = NodeTable()
    for node_id, operator, region, device, tflops, load in nodes:
        table.on_registered(node_id, operator, region, "consumer", device, int(tflops),
                            100_000, 2, 0, NOW)
        table.on_heartbeat(node_id, int(load), 2, 1, NOW)
    return table


def _req(workload: str = "matmul", units: int = 10**6, replicas: int = 2,
         region: str | None = "eu-west", homogeneous: bool = False) -> PlacementRequest:
    return PlacementRequest("t", replicas, 1, "consumer", region, homogeneous,
                            workload=workload, compute_units=units)


def test_the_learned_policy_starts_from_compute_over_speed_and_load() -> None:
    table = _fixed_table(_node("slow", "cpu", 50), _node("fast", "gpu", 50_000),
                         _node("fast-busy", "gpu", 50_000, load=900),
                         _node("mid", "gpu", 10_000))
    chosen = LearnedPolicy().place(_req(), table, NOW)
    assert [n.node_id for n in chosen] == ["fast", "mid"]  # at 90 % load: 10x slower
    chosen = LearnedPolicy().place(_req(replicas=4), table, NOW)
    assert [n.node_id for n in chosen] == ["fast", "mid", "fast-busy", "slow"]


def test_the_learned_policy_counts_distance_for_small_tasks() -> None:
    table = _fixed_table(_node("far", "gpu", 50_000, region="ap-east"),
                         _node("near", "gpu", 40_000, region="eu-west"),
                         _node("near2", "gpu", 40_000, region="eu-central"))
    chosen = LearnedPolicy().place(_req(units=1000), table, NOW)
    assert {n.node_id for n in chosen} == {"near", "near2"}


def _observations(rng: random.Random, n: int) -> list[Observation]:
    """A fleet where a small MLP is launch-bound on GPUs: 1/2000 of their matmul speed."""
    out = []
    for _ in range(n):
        workload = rng.choice(["matmul", "mlp-digits"])
        device, tflops, _ = rng.choice(CLASSES)
        task = TaskShape(workload, rng.randint(10, 10**6), 10)
        node = NodeShape(device, tflops, rng.randrange(0, 800))
        gpu = device != "cpu"
        speed = tflops * (0.9 if workload == "matmul" else 0.0005 if gpu else 1.0)
        true = task.compute_units / speed * 1000 / (1000 - node.load_permille)
        out.append(Observation(task, node, true * rng.lognormvariate(0, 0.1)))
    return out


def test_the_runtime_model_learns_what_compute_over_speed_misses() -> None:
    rng = random.Random(1)
    held_out = _observations(rng, 400)
    analytic = RuntimeModel(background=False)
    assert analytic.version == 0
    small, large = RuntimeModel(background=False), RuntimeModel(background=False)
    small.fit(_observations(rng, 60))
    large.fit(_observations(rng, 1500))
    errors = [m.evaluate(held_out) for m in (analytic, small, large)]
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 0.15
    # Where compute over speed is wrong by orders (small MLPs on GPUs), it learns most.
    gpu_mlp = [o for o in held_out if o.task.workload == "mlp-digits"
               and o.node.device_class != "cpu"]
    assert analytic.evaluate(gpu_mlp) > 0.99 and large.evaluate(gpu_mlp) < 0.2


def test_learning_changes_the_placement_of_a_small_mlp() -> None:
    table = _fixed_table(_node("gpu", "rtx-4090", 80_000, region="ap-east"),
                         _node("cpu-near", "cpu", 50), _node("cpu-near2", "cpu", 50))
    request = _req(workload="mlp-digits", units=100_000)
    model = RuntimeModel(background=False)
    policy = LearnedPolicy(model)
    assert "gpu" in {n.node_id for n in policy.place(request, table, NOW)}
    model.fit(_observations(random.Random(2), 1500))
    # Learned: the GPU runs a small MLP slower than a CPU; the near CPUs win.
    assert {n.node_id for n in policy.place(request, table, NOW)} == {"cpu-near", "cpu-near2"}


def test_cpu_only_work_expects_host_speed_on_any_node() -> None:
    hash_search = TaskShape("sha256-search", 10_000, 1)
    on_gpu, on_cpu = NodeShape("h100", 51_000, 0), NodeShape("cpu", 50, 0)
    assert analytic_ms(hash_search, on_gpu) == analytic_ms(hash_search, on_cpu) == 200.0
    assert analytic_ms(TaskShape("matmul", 10_000, 1), on_gpu) < 1


def test_observing_refits_in_the_background_without_blocking() -> None:
    model = RuntimeModel(min_history=200, background=True)
    started = time.perf_counter()
    for obs in _observations(random.Random(3), 200):
        model.observe(obs)
    assert time.perf_counter() - started < 0.5  # appends; the fit runs elsewhere
    deadline = time.monotonic() + 30
    while model.version == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert model.version == 1


def test_prediction_errors_are_tracked() -> None:
    model = RuntimeModel(background=False)
    task, node = TaskShape("matmul", 1000, 1), NodeShape("cpu", 50, 0)
    model.observe(Observation(task, node, 40.0, predicted_ms=20.0))
    model.observe(Observation(task, node, 10.0, predicted_ms=11.0))
    model.observe(Observation(task, node, 100.0, predicted_ms=100.0))
    assert model.mdape() == pytest.approx(0.1)
    assert analytic_ms(task, node) == pytest.approx(20.0)


def test_latency_grows_with_distance_payload_and_measured_round_trips() -> None:
    table = _fixed_table(_node("a", "gpu", 1, region="eu-west"),
                         _node("b", "gpu", 1, region="ap-east"))
    a, b = table.get("a"), table.get("b")
    assert a is not None and b is not None
    latency = LatencyModel()
    assert latency.rtt_ms("eu-west", a) < latency.rtt_ms("eu-west", b)
    assert latency.transfer_ms("eu-west", a, 10**7) > latency.transfer_ms("eu-west", a, 0) + 1000
    before = latency.rtt_ms("eu-west", a)
    for _ in range(20):
        latency.observe_rtt("a", 300.0)
    assert latency.rtt_ms("eu-west", a) > before + 250
    latency.observe_rtt("a", -5.0)  # a clock going backwards is not a measurement
    assert latency.rtt_ms("eu-west", a) > before + 250


def test_nodes_that_rank_alike_are_drawn_at_random_and_a_clearly_faster_one_still_wins() -> None:
    """Identical idle nodes of distinct operators: with the handler's randomness, every one
    of them gets work (no fixed trio always placed together); without it, ties go by node
    id. A node far faster than the rest is outside the band and always chosen."""
    from dataclasses import replace

    from tests.unit.test_placement import NOW as NOW_MS
    from tests.unit.test_placement import register, request

    table = NodeTable()
    for i in range(9):
        register(table, f"n{i}", f"op{i}", slots=100)
    policy = LearnedPolicy()
    req = replace(request(), workload="heat2d", compute_units=1000)
    fixed = {tuple(sorted(n.node_id for n in policy.place(req, table, NOW_MS)))
             for _ in range(20)}
    assert fixed == {("n0", "n1", "n2")}
    rng = random.Random(3)
    chosen = [n.node_id for _ in range(60)
              for n in policy.place(replace(req, rng=rng), table, NOW_MS)]
    assert set(chosen) == {f"n{i}" for i in range(9)}
    assert max(chosen.count(f"n{i}") for i in range(9)) < 40  # spread, not one favourite

    register(table, "fast", "op-fast", slots=100, tflops_milli=60_000_000)
    big = replace(req, compute_units=10_000_000, rng=rng)  # 167 ms on the others, 0.2 here
    picks = [policy.place(big, table, NOW_MS) for _ in range(20)]
    assert all("fast" in {n.node_id for n in p} for p in picks)
