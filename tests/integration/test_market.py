"""The market on a live network (real broker, ledger, processors, node runners): a
demand surge on one slot raises the consumer price, more nodes bring it down again;
every ``PriceUpdated`` is signed by the pricing role (``allocator.market``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from destra.client import Client
from destra.network import LocalNetwork
from destra.settings import Settings
from schemas import Event, decode
from streams.authority import Genesis
from streams.reading import read_all
from streams.topics import topic_for
from tests.support import running_network

pytestmark = pytest.mark.integration

DEFAULT = 100  # the consumer tier's default price per unit


@pytest.fixture
def fast_market(network: Settings, kafka: str, pg_dsn: str,
                tmp_path: Path) -> Iterator[LocalNetwork]:
    """Prices may move every second; a p90 wait over half a second is too long."""
    with running_network(network.with_(home=tmp_path / "home"), kafka, pg_dsn, tmp_path, {
            "DESTRA_PRICE_INTERVAL_MS": "1000", "DESTRA_PRICE_TARGET_WAIT_MS": "500",
            "DESTRA_PRICE_LEAD_MS": "200", "DESTRA_COMMIT_WINDOW_MS": "30000"}) as net:
        yield net


def _prices(net: LocalNetwork) -> list[Event]:
    topic = topic_for("PriceUpdated").name(net.settings.topic_prefix)
    return [e for e in (decode(m.value() or b"") for m in read_all(net.bootstrap, topic))
            if e.name == "PriceUpdated" and e.fields["tier"] == "consumer"]


def _rose(events: list[Event]) -> bool:
    prices = [DEFAULT, *(e.fields["price_per_unit_micro"] for e in events)]
    return any(b > a for a, b in zip(prices, prices[1:], strict=False))


def _until(check: object, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def test_a_surge_raises_the_price_and_new_nodes_bring_it_down(
        fast_market: LocalNetwork) -> None:
    net = fast_market
    net.mint("alice")
    net.start_services()
    net.start_node("m0", slots=1)
    net.wait_registered(["m0"])
    client = Client(net.settings, net.bootstrap, "alice", net.passphrase)
    try:
        for i in range(10):  # one replica each, all on the one slot: a queue
            client.submit(client.quote("nbody", {"n": "256", "steps": "100", "seed": str(i)},
                                       replicas=1, quorum=1), flush=False)
        client.flush()
        # Idle before the surge, the price may first step down; then it rises.
        _until(lambda: _rose(_prices(net)), timeout_s=60)
        genesis = Genesis.load(net.settings.genesis_path)
        risen = _prices(net)
        assert all(e.signer == "pricing" and genesis.check(e) is None for e in risen)
        prices = [DEFAULT, *(e.fields["price_per_unit_micro"] for e in risen)]
        assert all(abs(b - a) <= max(1, a // 10)  # one bounded step at a time
                   for a, b in zip(prices, prices[1:], strict=False))
        peak_seen = len(risen)

        net.start_node("m1", slots=4)
        net.wait_registered(["m1"])

        def fell() -> bool:
            later = _prices(net)
            prices = [e.fields["price_per_unit_micro"] for e in later]
            return len(prices) > peak_seen and prices[-1] < max(prices)

        _until(fell, timeout_s=90)
        net.check_alive()
    finally:
        client.close()
