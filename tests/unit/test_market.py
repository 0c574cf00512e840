"""The market (``allocator.market``) on the in-memory runner and its virtual clock.

Capacity and placement come from ``bench/market.py``'s queue model (``Cluster``):
signed registrations and heartbeats, submissions, FIFO assignments, verdicts. One
scenario runs the production allocator, ledger and verifier (``destra.sim``).
"""

from __future__ import annotations

import pickle

from allocator.market import Market, Rules, next_price, p90
from allocator.pricing import PriceBook, PriceUpdate, Tier
from bench import market as bench
from ledger.book import escrow
from ledger.decider import PRICE_GRACE_MS, LedgerDecider
from schemas import Event, new_event
from schemas.samples import sample_event, with_fields
from streams.memory import MemoryRunner
from streams.params import DEFAULTS
from streams.processing import Context
from tests.support import registration, signed_submission

RULES = Rules(interval_ms=10_000, target_wait_ms=5_000)
CEILING = DEFAULTS["price_ceiling_micro.consumer"]
FLOOR = DEFAULTS["price_floor_micro.consumer"]




def _network(nodes: int, rate: float, elastic: bool = False,
             rules: Rules = RULES) -> tuple[MemoryRunner, Market, object]:
    market = Market(rules=rules)
    cluster = bench.Cluster(rate=rate, elastic=elastic, step_ms=250)
    cluster.add_nodes(nodes)
    runner = MemoryRunner([market, cluster], tick_ms=250)
    return runner, market, cluster


def _prices(runner: MemoryRunner, tier: str = "consumer") -> list[int]:
    return [e.fields["price_per_unit_micro"] for e in runner.events("PriceUpdated")
            if e.fields["tier"] == tier]


def _steps_bounded(prices: list[int], start: int, permille: int = 100) -> bool:
    before = [start, *prices]
    return all(abs(b - a) <= max(1, a * permille // 1000)
               for a, b in zip(before, before[1:], strict=False))


def _reversals(prices: list[int], start: int) -> int:
    before = [start, *prices]
    signs = [(b > a) - (b < a) for a, b in zip(before, before[1:], strict=False)]
    return sum(1 for a, b in zip(signs, signs[1:], strict=False) if a != b)


def test_a_surge_raises_the_price_step_by_step_up_to_the_ceiling() -> None:
    runner, market, _ = _network(nodes=2, rate=2.0)  # 4 slots, 40 tasks wanted at once
    runner.advance(60_000)
    early = _prices(runner)
    assert early and early[0] == 110 and all(b > a for a, b in zip(early, early[1:],
                                                                     strict=False))
    assert len(early) <= 6  # one step an interval, at most
    runner.advance(600_000)
    prices = _prices(runner)
    assert _steps_bounded(prices, 100)
    assert max(prices) == prices[-1] == CEILING == market.price("consumer")
    updates = runner.events("PriceUpdated")
    assert all(u.fields["effective_at"] == u.occurred_at + RULES.lead_ms for u in updates)
    assert len(set(prices)) == len(prices)  # emitted only when the price changes
    idle = _prices(runner, "datacenter")  # no nodes, no demand: down to its floor, then quiet
    assert idle[-1] == DEFAULTS["price_floor_micro.datacenter"] and len(set(idle)) == len(idle)


def test_nodes_joining_bring_the_price_back_down_to_the_floor() -> None:
    runner, market, cluster = _network(nodes=2, rate=1.0)
    runner.advance(120_000)
    assert market.price("consumer") > 150
    cluster.add_nodes(20)  # 44 slots for 20 busy
    cluster.rate = 0.2
    runner.advance(900_000)
    prices = _prices(runner)
    high = max(prices)
    after = prices[prices.index(high) + 1:]  # the queue drained: only down from the peak
    assert after and all(b < a for a, b in zip([high, *after], after, strict=False))
    assert _steps_bounded(after, high)
    assert after[-1] == FLOOR == market.price("consumer")
    assert [m.direction for m in market.measures if m.tier == "consumer"] == [0]  # at rest


def test_a_steady_load_in_the_deadband_does_not_move_the_price() -> None:
    runner, market, _ = _network(nodes=10, rate=0.7, elastic=True)  # 14 of 20 slots busy
    runner.advance(60_000)  # the nodes start idle: at most a step down
    warm = _prices(runner)
    runner.advance(1_200_000)
    assert len(warm) <= 1 and _prices(runner) == warm
    m = next(m for m in market.measures if m.tier == "consumer")
    assert m.queue == 0 and 500 < m.utilisation_permille < 900


def test_elastic_demand_settles_without_oscillating() -> None:
    runner, market, _ = _network(nodes=5, rate=1.0, elastic=True)  # twice the 10 slots
    runner.advance(1_800_000)  # 180 steps
    prices = _prices(runner)
    assert prices and _steps_bounded(prices, 100)
    # It overshoots once (the queue built while it climbed drains late), then hovers near
    # the clearing price (about 250 here: half the arrivals' budgets reach it) in a band.
    assert _reversals(prices, 100) <= 10
    settled = prices[2 * len(prices) // 3:]
    assert max(settled) <= 1.5 * min(settled) and 200 < min(settled) < 300 < max(settled)
    assert 100 < market.price("consumer") < CEILING  # the price priced out the excess


def test_a_governance_ceiling_is_obeyed_from_when_it_applies() -> None:
    runner, market, _ = _network(nodes=2, rate=2.0)
    runner.advance(60_000)
    assert market.price("consumer") > 150
    runner.publish(new_event("ParameterChanged", "governance", parameter="price_ceiling_micro"
                             ".consumer", value=150, effective_at=runner.now_ms,
                             proposal_id="p1"))
    runner.publish(new_event("ParameterChanged", "governance", parameter="not_a_parameter",
                             value=1, effective_at=0, proposal_id="p2"))  # ignored
    runner.advance(300_000)
    prices = _prices(runner)
    cut = prices.index(150)
    assert prices[cut:] == [150]  # down to the new ceiling at the next step, then held
    assert market.price("consumer") == 150
    assert runner.dead_letters == []


def test_prices_are_deterministic_and_survive_snapshot_and_restore() -> None:
    def scenario() -> tuple[MemoryRunner, Market, object]:
        runner, market, cluster = _network(nodes=3, rate=1.5, elastic=True)
        runner.advance(200_000)
        return runner, market, cluster

    a, market_a, cluster_a = scenario()
    b, market_b, _ = scenario()
    assert [e.fields for e in a.events("PriceUpdated")] == [
        e.fields for e in b.events("PriceUpdated")]
    assert [e.event_id for e in a.events("PriceUpdated")] == [
        e.event_id for e in b.events("PriceUpdated")]
    restored = Market(rules=RULES)
    restored.restore(pickle.loads(pickle.dumps(market_b.snapshot())))
    b.processors = [restored, *b.processors[1:]]
    seen = len(a.log), len(b.log)
    cluster_a.add_nodes(4)  # type: ignore[attr-defined]
    b.processors[1].add_nodes(4)  # type: ignore[attr-defined]
    a.advance(400_000)
    b.advance(400_000)

    def later(runner: MemoryRunner, since: int) -> list[tuple[str, int, int, str]]:
        return [(e.fields["tier"], e.fields["price_per_unit_micro"], e.fields["effective_at"],
                 e.event_id) for e in (x.event for x in runner.log[since:])
                if e.name == "PriceUpdated"]

    assert later(a, seen[0]) == later(b, seen[1]) != []
    assert restored.snapshot() == market_a.snapshot()


def test_forged_capacity_is_refused() -> None:
    market = Market(rules=RULES)
    runner = MemoryRunner([market])
    keys = bench.node_keys("n1")
    forged = new_event("NodeRegistered", "n1", node_id="n1", operator_id="op",
                       region="eu-west", signing_key=keys.signing_public,
                       encryption_key=keys.encryption_public, device_name="x",
                       device_class="cpu", tier="consumer", tflops_milli=100, memory_mb=4096,
                       slots=1_000, stake_micro=0, software="x", operator_consent=b"")
    runner.publish(forged, new_event("NodeHeartbeat", "n9", node_id="n9", load_permille=0,
                                     free_slots=5, seq=1))
    assert [r.split(":")[0] for _, r in runner.dead_letters] == ["bad-signature"] * 2
    assert market.nodes == {}


def test_next_price_and_p90() -> None:
    assert next_price(100, 1, 100, 20, 1_000) == 110
    assert next_price(21, 1, 100, 20, 1_000) == 23  # 2.1 rounded down: never over 10 %
    assert next_price(22, -1, 100, 20, 1_000) == 20  # clamped at the floor
    assert next_price(5, 1, 100, 1, 1_000) == 6  # at least one micro-token
    assert next_price(990, 1, 100, 20, 1_000) == 1_000
    assert next_price(1_200, 0, 100, 20, 1_000) == 1_000  # a lowered ceiling applies at once
    assert p90([]) == 0 and p90([5]) == 5 and p90(list(range(1, 11))) == 9


def test_the_lowest_price_of_a_window_counts_every_update_inside_it() -> None:
    book = PriceBook({Tier.CONSUMER: 100, Tier.PROSUMER: 250, Tier.DATACENTER: 600})
    for at, price in ((1_000, 80), (2_000, 120), (3_000, 90), (5_000, 70)):
        book.apply(PriceUpdate("consumer", price, at))
    assert book.lowest("consumer", 0, 999) == 100
    assert book.lowest("consumer", 1_500, 2_500) == 80  # in force at its start
    assert book.lowest("consumer", 2_000, 4_000) == 90
    assert book.lowest("consumer", 2_000, 2_999) == 120
    assert book.lowest("consumer", 0, 10_000) == 70
    assert book.lowest("prosumer", 0, 10_000) == 250


T0 = 1_800_000_000_000


def test_a_quote_made_before_a_price_rise_is_escrowed_after_it() -> None:
    ledger = LedgerDecider("ledger", prices=PriceBook(dict.fromkeys(Tier, 100)))
    assert ledger.judge(registration("alice")).rejected == []
    ledger.decide(new_event("TokensMinted", "treasury", account="alice",
                            amount_micro=10**9, reason="test"))
    quoted_at = T0 - 30_000  # at 100 a unit, for 60 s
    quote = PriceBook(dict.fromkeys(Tier, 100)).quote("heat2d", 100, 3, "consumer", quoted_at,
                                                      60_000)
    for at, price in ((T0 - 20_000, 110), (T0 - 10_000, 121)):  # the market raised it twice
        ledger.decide(new_event("PriceUpdated", "pricing", tier="consumer",
                                price_per_unit_micro=price, effective_at=at))

    def submission(task_id: str, price: int) -> Event:
        e = with_fields(sample_event("TaskSubmitted"), task_id=task_id, submitter_id="alice",
                        quoted_price_micro=price, max_price_micro=price, compute_units=100,
                        replicas=3, quorum=2, quote_expires_at=quote.expires_at)
        return signed_submission(e.with_envelope(occurred_at=T0))

    out = ledger.decide(submission("t1", quote.price_micro))
    assert [e.fields["account"] for e in out] == ["user:alice", escrow("t1")]
    [refused] = ledger.decide(submission("t2", quote.price_micro - 1))
    assert refused.fields["reason"] == "price-below-quote"
    assert 60_000 <= PRICE_GRACE_MS  # the client's quotes live no longer than the grace


def test_the_markets_prices_are_quoted_escrowed_and_paid_on_the_production_services() -> None:
    from destra.sim import Compute, Sim

    sim = Sim(nodes=4, compute=Compute(reuse=True))
    market = Market(rules=Rules(interval_ms=2_000, target_wait_ms=500, lead_ms=100))
    for entry in sim.runner.log:  # what it would have read before it started
        if entry.event.name in market.inputs:
            market.handle(entry.event, Context(entry.at_ms))
    sim.runner.processors = [*sim.runner.processors, market]
    # The simulated tasks take no virtual time, so nothing waits: a governance floor above
    # the default moves the price instead.
    sim.runner.publish(new_event("ParameterChanged", "governance",
                                 parameter="price_floor_micro.consumer", value=150,
                                 effective_at=sim.runner.now_ms, proposal_id="p1"))
    sim.runner.advance(2_500)
    assert _prices(sim.runner) == [150]
    before = sim.balance("user:alice")
    sim.submit("t1")
    sim.runner.run_until(lambda: sim.verdict("t1") is not None, max_ms=60_000)
    verdict = sim.verdict("t1")
    assert verdict is not None and verdict.name == "TaskVerified", verdict
    [submitted] = [e for e in sim.runner.events("TaskSubmitted")]
    units = submitted.fields["compute_units"]
    assert submitted.fields["quoted_price_micro"] == units * 3 * 150
    assert before - sim.balance("user:alice") == units * 3 * 150
    assert sim.runner.dead_letters == []


def test_only_escrowed_submissions_are_demand() -> None:
    """A forged, unpaid or replayed submission (the ledger refuses or ignores it, a stale
    replay without a verdict) never enters the queue; a paid one does, whichever of its
    submission and its escrow entry is read first."""
    market = Market(rules=RULES)

    def submitted(task: str) -> Event:
        return new_event("TaskSubmitted", "alice", task_id=task, tier="consumer")

    def escrowed(task: str) -> Event:
        return new_event("LedgerEntryPosted", "ledger", entry_id=f"escrow/{task}#1",
                         transaction_id=f"escrow/{task}", account=f"escrow:{task}",
                         amount_micro=100, kind="escrow", task_id=task, memo="")

    for i in range(50):  # a flood nobody paid for
        market.handle(submitted(f"forged-{i}"), Context(1_000 + i))
    market.handle(submitted("paid"), Context(2_000))
    market.handle(escrowed("paid"), Context(2_005))
    market.handle(escrowed("paid-first"), Context(2_010))  # the entry read first
    market.handle(submitted("paid-first"), Context(2_000))
    assert sorted(market.queue) == ["paid", "paid-first"]
    assert market.queue["paid"] == ("consumer", 2_000)  # waiting since its submission
    restored = Market(rules=RULES)
    restored.restore(pickle.loads(pickle.dumps(market.snapshot())))
    restored.handle(escrowed("forged-3"), Context(3_000))  # paid late: now it is demand
    assert sorted(restored.queue) == ["forged-3", "paid", "paid-first"]
    assert not market.wants(new_event("LedgerEntryPosted", "ledger", entry_id="x#1",
                                      transaction_id="settle/t", account="node:n1",
                                      amount_micro=5, kind="payout", task_id="t", memo=""))
