"""Placement: the live node table and the policy that picks nodes for a task's replicas.

Pure: the table is fed ``NodeRegistered`` / ``NodeHeartbeat`` values and the
caller's ``now_ms``; the policy only reads it. Replicas of one task always go
to distinct nodes of distinct operators, so one operator cannot fake a quorum.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from allocator.pricing import DEFAULT_PRICES, Tier, effective_tier, tier_of
from destra.errors import InvalidRequest, NoCapacity

# Rough coordinates (latitude, longitude) of each region's main data-centre cluster.
REGIONS: dict[str, tuple[float, float]] = {
    "us-east": (39.0, -77.5),  # northern Virginia
    "us-west": (45.6, -121.2),  # Oregon
    "eu-west": (53.3, -6.3),  # Dublin
    "eu-central": (50.1, 8.7),  # Frankfurt
    "ap-south": (19.1, 72.9),  # Mumbai
    "ap-east": (22.3, 114.2),  # Hong Kong
    "sa-east": (-23.5, -46.6),  # Sao Paulo
}
UNKNOWN_DISTANCE_KM = 20_000  # half the Earth's circumference: unknown regions rank last
EARTH_RADIUS_KM = 6371.0


def distance_km(a: str | None, b: str | None) -> int:
    """Great-circle distance between two regions' clusters, whole km; 0 when either is None."""
    if a is None or b is None or a == b:
        return 0
    if a not in REGIONS or b not in REGIONS:
        return UNKNOWN_DISTANCE_KM
    (lat1, lon1), (lat2, lon2) = (tuple(map(math.radians, REGIONS[r])) for r in (a, b))
    h = (math.sin((lat2 - lat1) / 2) ** 2
         + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2)
    return round(2 * EARTH_RADIUS_KM * math.asin(math.sqrt(h)))


@dataclass(frozen=True)
class NodeView:
    """What placement knows of a node: its registration and its latest heartbeat."""

    node_id: str
    operator_id: str
    region: str
    tier: Tier
    """The declared tier, capped by the tier its benchmark earns."""
    device_class: str
    tflops_milli: int
    memory_mb: int
    slots: int
    free_slots: int
    """From the latest heartbeat, less slots reserved since."""
    load_permille: int
    last_heartbeat_ms: int
    stake_micro: int


class NodeTable:
    """Known nodes, kept current by registrations, heartbeats and reservations."""

    def __init__(self, stale_after_ms: int = 30_000) -> None:
        if stale_after_ms < 0:
            raise InvalidRequest(f"stale_after_ms {stale_after_ms} must not be negative")
        self.stale_after_ms = stale_after_ms
        self._nodes: dict[str, NodeView] = {}
        self._seq: dict[str, int] = {}

    def on_registered(self, node_id: str, operator_id: str, region: str, tier: str,
                      device_class: str, tflops_milli: int, memory_mb: int, slots: int,
                      stake_micro: int, now_ms: int) -> NodeView:
        """A ``NodeRegistered``: the node is live now, idle, with every slot free.

        A registration starts a new node process, whose heartbeat ``seq``
        starts again, so the stale-heartbeat watermark is reset.
        """
        node = NodeView(node_id, operator_id, region, effective_tier(tier, tflops_milli, memory_mb),
                        device_class, tflops_milli, memory_mb, slots, slots, 0, now_ms,
                        stake_micro)
        self._nodes[node_id] = node
        self._seq.pop(node_id, None)
        return node

    def on_heartbeat(self, node_id: str, load_permille: int, free_slots: int, seq: int,
                     now_ms: int) -> bool:
        """A ``NodeHeartbeat``; False (and ignored) if the node is unknown or ``seq`` is old."""
        node = self._nodes.get(node_id)
        if node is None or seq <= self._seq.get(node_id, -1):
            return False
        self._seq[node_id] = seq
        self._nodes[node_id] = dataclasses.replace(
            node, load_permille=load_permille, free_slots=max(0, min(free_slots, node.slots)),
            last_heartbeat_ms=max(now_ms, node.last_heartbeat_ms))
        return True

    def reserve(self, node_id: str) -> None:
        """Take one of the node's free slots for a replica just placed on it.

        The node's next heartbeat reports its own count and replaces ours.
        """
        node = self._node(node_id)
        if node.free_slots < 1:
            raise NoCapacity(f"node {node_id} has no free slot to reserve")
        self._nodes[node_id] = dataclasses.replace(node, free_slots=node.free_slots - 1)

    def release(self, node_id: str) -> None:
        """Give back a reserved slot (the replica ended or was never started)."""
        node = self._node(node_id)
        self._nodes[node_id] = dataclasses.replace(
            node, free_slots=min(node.slots, node.free_slots + 1))

    def get(self, node_id: str) -> NodeView | None:
        """The node, or None if it never registered."""
        return self._nodes.get(node_id)

    def is_live(self, node: NodeView, now_ms: int) -> bool:
        """Whether the node's last sign of life is at most ``stale_after_ms`` old."""
        return now_ms - node.last_heartbeat_ms <= self.stale_after_ms

    def __iter__(self) -> Iterator[NodeView]:
        """Every known node, live or not, in node_id order."""
        return iter(sorted(self._nodes.values(), key=lambda n: n.node_id))

    def __len__(self) -> int:
        return len(self._nodes)

    def _node(self, node_id: str) -> NodeView:
        node = self._nodes.get(node_id)
        if node is None:
            raise NoCapacity(f"node {node_id} is not registered")
        return node


@dataclass(frozen=True)
class PlacementRequest:
    """What a task needs from its nodes."""

    task_id: str
    replicas: int
    memory_mb: int
    tier: str | Tier
    """The lowest tier acceptable; better tiers are too."""
    submitter_region: str | None
    """Nearer nodes are preferred; None when it does not matter."""
    homogeneous: bool
    """Every replica on one device_class, for digests that need bit-equal floats."""
    exclude_node_ids: frozenset[str] = frozenset()
    """Nodes already used by the task; their operators are excluded too."""
    region_only: bool = False
    """Only nodes in ``submitter_region`` (``TaskSubmitted.region`` as a hard limit)."""
    workload: str = ""
    """The workload, for policies that predict runtimes."""
    compute_units: int = 0
    """The task's compute, for policies that predict runtimes."""
    payload_bytes: int = 0
    """Input size to transfer to each node."""
    max_unit_price_micro: int | None = None
    """No node whose tier's price per compute unit is above this; None: no limit."""
    only_node_ids: frozenset[str] | None = None
    """When set, no node outside it (adaptive trust: only trusted nodes run a task alone,
    only eligible ones run it at all); None: any node."""
    rng: Any = field(default=None, compare=False, repr=False)
    """The handler's randomness (``Context.rng``: the operating system's in production, so
    no submitter can predict or choose it): a policy draws among candidates it cannot tell
    apart with it, so nodes that rank alike are not always chosen together. None: ties
    go by node id (benches that want repeatable placements)."""


class PlacementPolicy(Protocol):
    """Chooses the nodes for a task's replicas."""

    def place(self, request: PlacementRequest, table: NodeTable, now_ms: int) -> list[NodeView]:
        """``request.replicas`` nodes, one per replica; ``NoCapacity`` if not all fit."""
        ...


class ConstrainedPolicy:
    """The hard constraints every policy keeps, around its own ranking of the candidates.

    A candidate is live, not excluded (nor its operator), has a free slot, enough
    memory, at least the requested tier, a tier price within the limit, and the
    submitter's region when required. Replicas go to distinct operators, and to one
    device class when the workload needs bit-equality (the class whose set is best by
    ``set_cost``). Subclasses order the candidates, best first (``rank``).
    """

    prices: dict[Tier, int] = DEFAULT_PRICES

    def rank(self, candidates: list[NodeView], request: PlacementRequest,
             now_ms: int) -> list[NodeView]:
        """The candidates, best first."""
        raise NotImplementedError

    def set_cost(self, chosen: list[NodeView], request: PlacementRequest) -> tuple[float, ...]:
        """How good a full set of replicas is (smaller is better); default: rank order."""
        return (0.0,)

    def choose(self, ranked: list[NodeView], request: PlacementRequest) -> list[NodeView]:
        """The replicas from one group's ranked candidates: the best of each operator."""
        return _one_per_operator(ranked, request.replicas)

    def place(self, request: PlacementRequest, table: NodeTable, now_ms: int) -> list[NodeView]:
        """``request.replicas`` nodes of distinct operators, best first."""
        if not 1 <= request.replicas <= 15 or request.memory_mb < 0:
            raise InvalidRequest(f"task {request.task_id}: replicas {request.replicas} "
                                 f"out of 1..15 or memory {request.memory_mb} negative")
        candidates, refused = self.candidates(request, table, now_ms)
        groups: dict[str, list[NodeView]] = {"": candidates}
        if request.homogeneous:
            groups = {}
            for node in candidates:
                groups.setdefault(node.device_class, []).append(node)
        best: list[NodeView] = []
        best_key: tuple[tuple[float, ...], str] | None = None
        for device_class, nodes in sorted(groups.items()):
            if len({n.operator_id for n in nodes}) < request.replicas:
                continue
            chosen = self.choose(self.rank(nodes, request, now_ms), request)
            if len(chosen) < request.replicas:
                continue
            key = (self.set_cost(chosen, request), device_class)
            if best_key is None or key < best_key:
                best, best_key = chosen, key
        if best_key is None:
            raise NoCapacity(self._why(request, groups, refused))
        return best

    def candidates(self, request: PlacementRequest, table: NodeTable,
                    now_ms: int) -> tuple[list[NodeView], dict[str, int]]:
        """Nodes that could take a replica, and how many were refused for each reason."""
        tier = tier_of(request.tier)
        excluded_operators = {n.operator_id for n in map(table.get, request.exclude_node_ids)
                              if n is not None}
        refused = dict.fromkeys(("stale", "excluded", "busy", "memory", "tier", "price",
                                 "region", "untrusted"), 0)
        only = request.only_node_ids
        limit = request.max_unit_price_micro
        candidates = []
        for node in table:
            if not table.is_live(node, now_ms):
                refused["stale"] += 1
            elif (node.node_id in request.exclude_node_ids
                  or node.operator_id in excluded_operators):
                refused["excluded"] += 1
            elif node.free_slots < 1:
                refused["busy"] += 1
            elif node.memory_mb < request.memory_mb:
                refused["memory"] += 1
            elif node.tier.rank < tier.rank:
                refused["tier"] += 1
            elif limit is not None and self.prices[node.tier] > limit:
                refused["price"] += 1
            elif request.region_only and node.region != request.submitter_region:
                refused["region"] += 1
            elif only is not None and node.node_id not in only:
                refused["untrusted"] += 1
            else:
                candidates.append(node)
        return candidates, refused

    @staticmethod
    def _why(request: PlacementRequest, groups: dict[str, list[NodeView]],
             refused: dict[str, int]) -> str:
        operators = max((len({n.operator_id for n in g}) for g in groups.values()), default=0)
        counts = ", ".join(f"{count} {reason}" for reason, count in refused.items() if count)
        scope = " of one device class" if request.homogeneous else ""
        return (f"task {request.task_id}: {request.replicas} replicas need as many operators"
                f"{scope}, found {operators}; nodes refused: {counts or 'none'}")


class HeuristicPolicy(ConstrainedPolicy):
    """Best nodes by throughput left after load, less a charge per km from the submitter.

    Score (higher is better), integers only:
    ``tflops_milli * (1000 - load_permille) // 1000 - milli_tflops_per_km * distance_km``.
    With the default of 2, being 5,000 km further costs as much as 10 TFLOP/s.
    Ties go to the smaller node_id. The baseline the learned policy replaced.
    """

    def __init__(self, milli_tflops_per_km: int = 2) -> None:
        self.milli_tflops_per_km = milli_tflops_per_km

    def score(self, node: NodeView, request: PlacementRequest) -> int:
        """How much this policy wants ``node`` for ``request``."""
        available = node.tflops_milli * (1000 - node.load_permille) // 1000
        return available - self.milli_tflops_per_km * distance_km(request.submitter_region,
                                                                  node.region)

    def rank(self, candidates: list[NodeView], request: PlacementRequest,
             now_ms: int) -> list[NodeView]:
        return sorted(candidates, key=lambda n: (-self.score(n, request), n.node_id))

    def set_cost(self, chosen: list[NodeView], request: PlacementRequest) -> tuple[float, ...]:
        return (-sum(self.score(n, request) for n in chosen),)


def _one_per_operator(ranked: list[NodeView], replicas: int) -> list[NodeView]:
    """The best node of each operator, best operators first, up to ``replicas``.

    Greedy is optimal here: taking each operator's best node never blocks a better choice.
    """
    chosen: list[NodeView] = []
    operators: set[str] = set()
    for node in ranked:
        if node.operator_id not in operators:
            chosen.append(node)
            operators.add(node.operator_id)
            if len(chosen) == replicas:
                break
    return chosen
