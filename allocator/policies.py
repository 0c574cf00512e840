"""The placement policies, all under the same hard constraints (``ConstrainedPolicy``).

* ``LearnedPolicy``, the network's default: minimises the expected time to a
  verified result, then the price. A task is verified once every live replica has
  committed and the quorum has revealed, so the slowest chosen replica sets the
  time: ``transfer (LatencyModel) + predicted runtime (RuntimeModel)``. Replicas
  are taken fastest first, one per operator (for the minimum-of-maximum objective
  over a partition matroid, greedy is optimal); among equally fast ones, the
  cheaper tier and then the node id.
* ``OraclePolicy``: the same, with the true runtimes (the simulator knows them):
  the yardstick.
* Baselines: ``RandomPolicy``, ``RoundRobinPolicy``, ``LeastLoadedPolicy``.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from allocator.latency import LatencyModel
from allocator.placement import ConstrainedPolicy, NodeTable, NodeView, PlacementRequest
from allocator.runtime_model import NodeShape, RuntimeModel, TaskShape


def task_shape(request: PlacementRequest) -> TaskShape:
    """What the runtime model knows of the request's task."""
    return TaskShape(request.workload, request.compute_units, request.memory_mb)


def node_shape(node: NodeView) -> NodeShape:
    """What the runtime model knows of a node now."""
    return NodeShape(node.device_class, node.tflops_milli, node.load_permille)


NEAR_SLACK = 0.1
"""Expected times within 10 % of the best (plus ``NEAR_SLACK_MS``) rank alike."""
NEAR_SLACK_MS = 20.0


class _EtaPolicy(ConstrainedPolicy):
    """Ranks by expected time to the replica's result, then price, then node id."""

    def __init__(self) -> None:
        self.last_eta: dict[str, float] = {}
        """Expected ms to each candidate's result in the latest ``rank`` call."""
        self.last_runtime: dict[str, float] = {}
        """Predicted runtime (ms) on each candidate in the latest ``rank`` call."""

    def runtimes(self, request: PlacementRequest, nodes: list[NodeView]) -> list[float]:
        """Runtime in ms of the request's task on each node."""
        raise NotImplementedError

    def transfer(self, request: PlacementRequest, node: NodeView) -> float:
        """Transfer time in ms of the request's input to ``node``."""
        raise NotImplementedError

    def transfers(self, request: PlacementRequest, nodes: list[NodeView]) -> list[float]:
        """Transfer time in ms of the request's input to each node."""
        return [self.transfer(request, n) for n in nodes]

    def place(self, request: PlacementRequest, table: NodeTable, now_ms: int) -> list[NodeView]:
        self.last_eta, self.last_runtime = {}, {}  # filled by each group's ``rank``
        return super().place(request, table, now_ms)

    def rank(self, candidates: list[NodeView], request: PlacementRequest,
             now_ms: int) -> list[NodeView]:
        runtimes = self.runtimes(request, candidates)
        transfers = self.transfers(request, candidates)
        for n, r, t in zip(candidates, runtimes, transfers, strict=True):
            self.last_runtime[n.node_id] = r
            self.last_eta[n.node_id] = r + t
        ranked = sorted(candidates, key=lambda n: (self.last_eta[n.node_id],
                                                   self.prices[n.tier], n.node_id))
        if request.rng is None or not ranked:
            return ranked
        # Nodes whose expected times differ by less than the model can tell (NEAR_SLACK)
        # rank alike: drawn at random among them, cheaper tiers first, so that identical
        # idle nodes do not always take the same tasks (and the same colluders are not
        # always placed together).
        best = self.last_eta[ranked[0].node_id]
        band = best * (1 + NEAR_SLACK) + NEAR_SLACK_MS
        near = [n for n in ranked if self.last_eta[n.node_id] <= band]
        draw = {n.node_id: request.rng.random() for n in near}
        near.sort(key=lambda n: (self.prices[n.tier], draw[n.node_id]))
        return near + ranked[len(near):]

    def set_cost(self, chosen: list[NodeView], request: PlacementRequest) -> tuple[float, ...]:
        return (max(self.last_eta[n.node_id] for n in chosen),
                float(sum(self.prices[n.tier] for n in chosen)))


class LearnedPolicy(_EtaPolicy):
    """Predicted runtime (learned) plus transfer (distance and measured round trips)."""

    def __init__(self, model: RuntimeModel | None = None,
                 latency: LatencyModel | None = None) -> None:
        super().__init__()
        self.model = model or RuntimeModel()
        self.latency = latency or LatencyModel()

    def runtimes(self, request: PlacementRequest, nodes: list[NodeView]) -> list[float]:
        return self.model.predict(task_shape(request), nodes)

    def transfer(self, request: PlacementRequest, node: NodeView) -> float:
        return self.latency.transfer_ms(request.submitter_region, node, request.payload_bytes)

    def transfers(self, request: PlacementRequest, nodes: list[NodeView]) -> list[float]:
        return self.latency.transfer_many(request.submitter_region, nodes,
                                          request.payload_bytes)


class OraclePolicy(_EtaPolicy):
    """Knows the true runtime and transfer time of every task on every node."""

    def __init__(self, true_runtime: Callable[[PlacementRequest, NodeView], float],
                 true_transfer: Callable[[PlacementRequest, NodeView], float]) -> None:
        super().__init__()
        self.true_runtime = true_runtime
        self.true_transfer = true_transfer

    def runtimes(self, request: PlacementRequest, nodes: list[NodeView]) -> list[float]:
        return [self.true_runtime(request, n) for n in nodes]

    def transfer(self, request: PlacementRequest, node: NodeView) -> float:
        return self.true_transfer(request, node)


class RandomPolicy(ConstrainedPolicy):
    """Any eligible nodes, uniformly."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)  # noqa: S311 - a baseline, not cryptography

    def rank(self, candidates: list[NodeView], request: PlacementRequest,
             now_ms: int) -> list[NodeView]:
        ranked = list(candidates)
        self.rng.shuffle(ranked)
        return ranked


class RoundRobinPolicy(ConstrainedPolicy):
    """Eligible nodes in node-id order, starting after the last node it used."""

    def __init__(self) -> None:
        self.last = ""

    def rank(self, candidates: list[NodeView], request: PlacementRequest,
             now_ms: int) -> list[NodeView]:
        ordered = sorted(candidates, key=lambda n: n.node_id)
        after = [n for n in ordered if n.node_id > self.last]
        return after + [n for n in ordered if n.node_id <= self.last]

    def choose(self, ranked: list[NodeView], request: PlacementRequest) -> list[NodeView]:
        chosen = super().choose(ranked, request)
        if chosen:
            self.last = chosen[-1].node_id
        return chosen


class LeastLoadedPolicy(ConstrainedPolicy):
    """The least loaded nodes (reported load, then most free slots)."""

    def rank(self, candidates: list[NodeView], request: PlacementRequest,
             now_ms: int) -> list[NodeView]:
        return sorted(candidates, key=lambda n: (n.load_permille, -n.free_slots, n.node_id))
