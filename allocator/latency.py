"""Expected time to get a task's input to a node: round trip by distance, refined by
measurement, plus the payload over the node's bandwidth.

The prior round trip is light in fibre over the great-circle distance between the
submitter's and the node's regions (``placement.REGIONS``), times a routing
factor, plus a fixed base. Each measured round trip (the allocator feeds it the
delay of a node's heartbeats) moves the node's estimate by an exponentially
weighted average, so a node behind a slow link ranks as slow whatever its region.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from allocator.placement import NodeView, distance_km
from allocator.pricing import Tier

FIBRE_KM_PER_MS = 200.0
"""Light in glass covers about 200 km per millisecond."""
ROUTE_FACTOR = 1.5
"""Real routes are longer than great circles."""
BASE_RTT_MS = 2.0
BANDWIDTH_MBIT_S: dict[Tier, float] = {
    Tier.CONSUMER: 50.0, Tier.PROSUMER: 200.0, Tier.DATACENTER: 1000.0,
}
"""Assumed downlink per tier until measured."""


@lru_cache(maxsize=4096)
def _prior_rtt_ms(a: str | None, b: str) -> float:
    return BASE_RTT_MS + 2 * distance_km(a, b) * ROUTE_FACTOR / FIBRE_KM_PER_MS


@dataclass
class LatencyModel:
    """Round-trip and transfer estimates per node."""

    alpha: float = 0.2
    """Weight of each new measurement in the running average."""
    measured_rtt_ms: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def prior_rtt_ms(submitter_region: str | None, node: NodeView) -> float:
        """Round trip from distance alone."""
        return _prior_rtt_ms(submitter_region, node.region)

    def observe_rtt(self, node_id: str, rtt_ms: float) -> None:
        """A measured round trip to ``node_id`` (negative or absurd values are ignored)."""
        if not 0 <= rtt_ms < 60_000:
            return
        old = self.measured_rtt_ms.get(node_id)
        self.measured_rtt_ms[node_id] = (rtt_ms if old is None
                                         else (1 - self.alpha) * old + self.alpha * rtt_ms)

    def rtt_ms(self, submitter_region: str | None, node: NodeView) -> float:
        """The node's measured round trip if any (at least the distance's), else the prior."""
        prior = self.prior_rtt_ms(submitter_region, node)
        measured = self.measured_rtt_ms.get(node.node_id)
        return prior if measured is None else max(prior, measured)

    def transfer_many(self, submitter_region: str | None, nodes: list[NodeView],
                      payload_bytes: int) -> list[float]:
        """``transfer_ms`` of each node, in one pass."""
        bits = payload_bytes * 8 / 1000
        measured = self.measured_rtt_ms
        out = []
        for node in nodes:
            prior = _prior_rtt_ms(submitter_region, node.region)
            rtt = measured.get(node.node_id, prior)
            out.append((rtt if rtt > prior else prior) + bits / BANDWIDTH_MBIT_S[node.tier])
        return out

    def transfer_ms(self, submitter_region: str | None, node: NodeView,
                    payload_bytes: int) -> float:
        """Round trip plus the payload over the node's bandwidth."""
        return (self.rtt_ms(submitter_region, node)
                + payload_bytes * 8 / (BANDWIDTH_MBIT_S[node.tier] * 1000))
