"""Placement: replicas on distinct operators with capacity, near and capable nodes first."""

from __future__ import annotations

import random

import pytest

from allocator.placement import (
    REGIONS,
    HeuristicPolicy,
    NodeTable,
    NodeView,
    PlacementPolicy,
    PlacementRequest,
    distance_km,
)
from allocator.pricing import Tier
from destra.errors import InvalidRequest, NoCapacity

NOW = 1_700_000_000_000


def register(table: NodeTable, node_id: str, operator_id: str, region: str = "us-east",
             slots: int = 2, now: int = NOW, tier: str = "datacenter",
             device_class: str = "cuda-sm90", tflops_milli: int = 60_000,
             memory_mb: int = 81_920) -> NodeView:
    """Register a node; by default an H100 in us-east with two slots."""
    return table.on_registered(node_id, operator_id, region, tier, device_class, tflops_milli,
                               memory_mb, slots, 1_000_000, now)


def register_4090(table: NodeTable, node_id: str, operator_id: str,
                  tier: str = "prosumer") -> NodeView:
    return register(table, node_id, operator_id, tier=tier, device_class="cuda-sm89",
                    tflops_milli=82_000, memory_mb=24_576)


def request(replicas: int = 3, memory_mb: int = 8_000, tier: str = "consumer",
            region: str | None = "us-east", homogeneous: bool = False,
            exclude: frozenset[str] = frozenset(), region_only: bool = False) -> PlacementRequest:
    return PlacementRequest("task-1", replicas, memory_mb, tier, region, homogeneous, exclude,
                            region_only)


def place(table: NodeTable, req: PlacementRequest, now: int = NOW) -> list[str]:
    return [n.node_id for n in HeuristicPolicy().place(req, table, now)]


def test_replicas_go_to_distinct_nodes_of_distinct_operators() -> None:
    table = NodeTable()
    for i in range(4):
        register(table, f"big-{i}", "megacorp", tflops_milli=90_000 + i)
    register(table, "alice-1", "alice")
    register(table, "bob-1", "bob")
    assert place(table, request()) == ["big-3", "alice-1", "bob-1"]


def test_one_operator_never_gets_two_replicas_even_when_that_leaves_too_few() -> None:
    table = NodeTable()
    for i in range(5):
        register(table, f"big-{i}", "megacorp")
    register(table, "alice-1", "alice")
    with pytest.raises(NoCapacity, match="3 replicas need as many operators, found 2") as raised:
        place(table, request())
    assert raised.value.retryable


def test_a_node_without_a_free_slot_or_enough_memory_is_never_chosen() -> None:
    table = NodeTable()
    register(table, "full", "a", tflops_milli=99_000)
    table.on_heartbeat("full", 900, 0, 1, NOW)
    register(table, "small", "b", tflops_milli=99_000, memory_mb=8_192)
    for op in "cde":
        register(table, f"ok-{op}", op)
    chosen = place(table, request(memory_mb=16_000))
    assert sorted(chosen) == ["ok-c", "ok-d", "ok-e"]


def test_homogeneous_replicas_share_one_device_class() -> None:
    table = NodeTable()
    register(table, "fast-1", "a", tflops_milli=200_000, device_class="cuda-sm100")
    register(table, "fast-2", "b", tflops_milli=200_000, device_class="cuda-sm100")
    for op in "cde":
        register(table, f"h100-{op}", op)
    assert place(table, request())[:2] == ["fast-1", "fast-2"]  # mixed classes allowed
    assert place(table, request(homogeneous=True)) == ["h100-c", "h100-d", "h100-e"]
    with pytest.raises(NoCapacity, match="of one device class"):
        place(table, request(replicas=4, homogeneous=True))


def test_stale_nodes_are_not_eligible_until_they_beat_again() -> None:
    table = NodeTable(stale_after_ms=30_000)
    for op in "abc":
        register(table, f"n-{op}", op)
    assert len(place(table, request(), NOW + 30_000)) == 3  # exactly at the limit: still live
    with pytest.raises(NoCapacity, match="3 stale"):
        place(table, request(), NOW + 30_001)
    for seq, op in enumerate("abc"):
        assert table.on_heartbeat(f"n-{op}", 0, 2, seq, NOW + 40_000)
    assert len(place(table, request(), NOW + 40_001)) == 3


def test_no_capacity_when_impossible_says_what_was_refused() -> None:
    table = NodeTable()
    register(table, "cpu", "a", tier="consumer", device_class="cpu-x86_64", tflops_milli=500,
             memory_mb=32_000)
    register(table, "old", "b", now=NOW - 60_000)
    with pytest.raises(NoCapacity, match=r"found 0; nodes refused: 1 stale, 1 tier"):
        place(table, request(replicas=1, tier="datacenter"))
    with pytest.raises(NoCapacity, match="nodes refused: none"):
        HeuristicPolicy().place(request(replicas=1), NodeTable(), NOW)


def test_requested_tier_or_better_is_accepted() -> None:
    table = NodeTable()
    register(table, "dc", "a")
    register_4090(table, "pro", "b")
    register(table, "cpu", "c", tier="consumer", tflops_milli=500, memory_mb=32_000)
    assert sorted(place(table, request(replicas=2, tier="prosumer"))) == ["dc", "pro"]
    assert place(table, request(replicas=1, tier=Tier.DATACENTER)) == ["dc"]


def test_a_node_claiming_a_tier_above_its_benchmark_is_placed_by_its_benchmark() -> None:
    table = NodeTable()
    view = register_4090(table, "liar", "a", tier="datacenter")
    assert view.tier == Tier.PROSUMER
    with pytest.raises(NoCapacity):
        place(table, request(replicas=1, tier="datacenter"))


def test_the_nearer_region_is_preferred_between_equal_nodes() -> None:
    table = NodeTable()
    for region in ("ap-east", "eu-west", "us-west", "us-east"):
        register(table, f"n-{region}", f"op-{region}", region)
    assert place(table, request(replicas=2, region="eu-central")) == ["n-eu-west", "n-us-east"]
    assert place(table, request(replicas=1, region="us-west")) == ["n-us-west"]


def test_capability_and_low_load_are_preferred_and_ties_go_to_the_smaller_node_id() -> None:
    table = NodeTable()
    register(table, "b-strong", "b", tflops_milli=90_000)
    register(table, "a-busy", "a", tflops_milli=90_000)
    table.on_heartbeat("a-busy", 500, 1, 1, NOW)  # half its throughput is taken
    register(table, "d-twin", "d")
    register(table, "c-twin", "c")
    assert place(table, request(replicas=4)) == ["b-strong", "c-twin", "d-twin", "a-busy"]


def test_excluded_nodes_and_their_operators_are_not_used() -> None:
    table = NodeTable()
    register(table, "a-1", "a", tflops_milli=99_000)
    register(table, "a-2", "a", tflops_milli=99_000)
    for op in "bcd":
        register(table, f"{op}-1", op)
    chosen = place(table, request(exclude=frozenset({"a-1", "b-1"}), replicas=2))
    assert chosen == ["c-1", "d-1"]


def test_region_only_keeps_every_replica_in_the_region() -> None:
    table = NodeTable()
    register(table, "near", "a", "eu-west")
    register(table, "far", "b", "us-east", tflops_milli=500_000)
    assert place(table, request(replicas=1, region="eu-west", region_only=True)) == ["near"]
    with pytest.raises(NoCapacity, match="1 region"):
        place(table, request(replicas=2, region="eu-west", region_only=True))


def test_reserving_slots_prevents_oversubscription_before_the_next_heartbeat() -> None:
    table = NodeTable()
    for op in "abc":
        register(table, f"n-{op}", op, slots=1)
    for node in HeuristicPolicy().place(request(), table, NOW):
        table.reserve(node.node_id)
    with pytest.raises(NoCapacity, match="3 busy"):
        place(table, request())
    with pytest.raises(NoCapacity):
        table.reserve("n-a")
    table.release("n-a")
    table.release("n-a")  # never above the node's slots
    assert [n.free_slots for n in table] == [1, 0, 0]
    assert table.on_heartbeat("n-b", 0, 1, 1, NOW + 1)  # the node's own count replaces ours
    assert place(table, request(replicas=2)) == ["n-a", "n-b"]


def test_old_heartbeats_are_ignored_and_a_new_registration_restarts_the_count() -> None:
    table = NodeTable()
    register(table, "n", "a", slots=4)
    assert table.on_heartbeat("n", 100, 3, 7, NOW + 10)
    assert not table.on_heartbeat("n", 900, 0, 7, NOW + 20)  # redelivered
    assert not table.on_heartbeat("n", 900, 0, 6, NOW + 20)  # older
    assert not table.on_heartbeat("ghost", 0, 1, 1, NOW)
    node = table.get("n")
    assert node is not None and (node.load_permille, node.free_slots) == (100, 3)
    assert node.last_heartbeat_ms == NOW + 10
    register(table, "n", "a", slots=4, now=NOW + 30)
    assert table.on_heartbeat("n", 50, 4, 0, NOW + 40)


def test_great_circle_distances_between_regions() -> None:
    assert 5_000 < distance_km("us-east", "eu-west") < 6_000
    assert distance_km("eu-west", "eu-central") < 1_500
    assert distance_km("us-east", "ap-east") == distance_km("ap-east", "us-east")
    assert distance_km("us-east", "us-east") == 0 and distance_km(None, "ap-south") == 0
    assert distance_km("moon-1", "us-east") == 20_000


def test_a_request_out_of_range_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        HeuristicPolicy().place(request(replicas=0), NodeTable(), NOW)


def test_random_tables_get_valid_placements_or_no_capacity_only_when_impossible() -> None:
    policy: PlacementPolicy = HeuristicPolicy()
    regions = sorted(REGIONS)
    for seed in range(200):
        rng = random.Random(seed)
        table = NodeTable(stale_after_ms=10_000)
        for i in range(rng.randint(0, 12)):
            register(table, f"n{i}", f"op{rng.randint(0, 5)}", rng.choice(regions),
                      slots=rng.randint(1, 3), now=NOW - rng.randint(0, 15_000),
                      tier=rng.choice(list(Tier)), device_class=rng.choice(["x", "y"]),
                      tflops_milli=rng.randint(0, 100_000), memory_mb=rng.randint(0, 90_000))
            if rng.random() < 0.3:
                table.reserve(f"n{i}")
        req = request(rng.randint(1, 4), rng.randint(0, 40_000), rng.choice(list(Tier)),
                      rng.choice([None, *regions]), rng.random() < 0.5,
                      frozenset(f"n{i}" for i in range(12) if rng.random() < 0.1))
        eligible = [n for n in table if table.is_live(n, NOW) and n.free_slots > 0
                    and n.memory_mb >= req.memory_mb and n.tier.rank >= Tier(req.tier).rank
                    and n.node_id not in req.exclude_node_ids]
        banned = {n.operator_id for n in table if n.node_id in req.exclude_node_ids}
        classes = {n.device_class for n in eligible} if req.homogeneous else {None}
        possible = any(len({n.operator_id for n in eligible if n.operator_id not in banned
                            and cls in (None, n.device_class)}) >= req.replicas
                       for cls in classes)
        try:
            chosen = policy.place(req, table, NOW)
        except NoCapacity:
            assert not possible, f"seed {seed}"
            continue
        assert possible and len(chosen) == req.replicas, f"seed {seed}"
        assert all(n in eligible and n.operator_id not in banned for n in chosen), f"seed {seed}"
        assert len({n.operator_id for n in chosen}) == req.replicas, f"seed {seed}"
        if req.homogeneous:
            assert len({n.device_class for n in chosen}) == 1, f"seed {seed}"
