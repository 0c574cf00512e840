"""Pricing: tiers by measured capability, integer prices, quotes that expire."""

from __future__ import annotations

import pytest

from allocator.pricing import (
    DEFAULT_PRICES,
    MAX_LONG,
    PriceBook,
    PriceUpdate,
    PricingEngine,
    Quote,
    Tier,
    check_quote,
    classify,
    effective_tier,
    task_price,
    tier_of,
)
from destra.errors import DestraError, InvalidRequest, QuoteExpired, UnknownTier

NOW = 1_700_000_000_000


@pytest.mark.parametrize(("tflops_milli", "memory_mb", "tier"), [
    (0, 0, Tier.CONSUMER),  # a CPU
    (40_000, 16_384, Tier.CONSUMER),  # fast, but 16 GiB: RTX 4080
    (82_000, 24_576, Tier.PROSUMER),  # RTX 4090
    (20_000, 20 * 1024, Tier.PROSUMER),  # exactly at both thresholds
    (38_000, 49_152, Tier.PROSUMER),  # RTX A6000: memory enough, throughput not
    (60_000, 81_920, Tier.DATACENTER),  # H100
    (50_000, 40 * 1024, Tier.DATACENTER),
    (49_999, 81_920, Tier.PROSUMER),
])
def test_a_node_is_classified_by_measured_throughput_and_memory(
        tflops_milli: int, memory_mb: int, tier: Tier) -> None:
    assert classify(tflops_milli, memory_mb) == tier


def test_a_node_may_sell_below_its_capability_but_never_above() -> None:
    assert effective_tier("consumer", 60_000, 81_920) == Tier.CONSUMER
    assert effective_tier("datacenter", 82_000, 24_576) == Tier.PROSUMER
    assert Tier.CONSUMER.rank < Tier.PROSUMER.rank < Tier.DATACENTER.rank


def test_an_unknown_tier_is_refused_with_the_known_ones() -> None:
    with pytest.raises(UnknownTier, match="consumer, prosumer, datacenter"):
        tier_of("platinum")
    with pytest.raises(UnknownTier):
        PriceBook().apply(PriceUpdate("platinum", 1, 0))


def test_the_price_is_units_times_replicas_times_unit_price_in_integers() -> None:
    book = PriceBook()
    quote = book.quote("digits-mlp", 40, 3, "prosumer", NOW, 60_000)
    assert quote.price_micro == 40 * 3 * DEFAULT_PRICES[Tier.PROSUMER]
    assert type(quote.price_micro) is int
    assert quote == Quote(quote.quote_id, Tier.PROSUMER, 40, 3, 30_000, NOW + 60_000)


def test_the_price_is_at_least_one_micro_token_and_fits_a_long() -> None:
    assert task_price(5, 3, 0) == 1
    assert task_price(1, 1, MAX_LONG) == MAX_LONG
    with pytest.raises(InvalidRequest):
        task_price(2, 1, MAX_LONG)


@pytest.mark.parametrize(("units", "replicas", "ttl"), [(0, 3, 1), (1, 0, 1), (1, 16, 1),
                                                        (1, 3, 0)])
def test_a_quote_request_out_of_range_is_refused(units: int, replicas: int, ttl: int) -> None:
    with pytest.raises(InvalidRequest):
        PriceBook().quote("nbody", units, replicas, "consumer", NOW, ttl)


def test_a_quote_is_valid_until_its_expiry_inclusive_then_expired() -> None:
    quote = PriceBook().quote("nbody", 10, 3, Tier.CONSUMER, NOW, 60_000)
    check_quote(quote, NOW)
    check_quote(quote, NOW + 60_000)
    with pytest.raises(QuoteExpired, match=quote.quote_id) as raised:
        check_quote(quote, NOW + 60_001)
    assert isinstance(raised.value, DestraError) and not raised.value.retryable


def test_the_same_request_at_the_same_time_gets_the_same_quote_id_and_others_differ() -> None:
    book = PriceBook()
    same = book.quote("nbody", 10, 3, "consumer", NOW, 60_000)
    assert book.quote("nbody", 10, 3, "consumer", NOW, 60_000) == same
    others = [book.quote("nbody", 11, 3, "consumer", NOW, 60_000),
              book.quote("heat2d", 10, 3, "consumer", NOW, 60_000),
              book.quote("nbody", 10, 3, "consumer", NOW + 1, 60_000)]
    assert len({q.quote_id for q in [same, *others]}) == 4


def test_a_price_update_applies_from_its_effective_time() -> None:
    book = PriceBook()
    book.apply(PriceUpdate("datacenter", 900, NOW + 1_000))
    assert book.price_per_unit("datacenter", NOW + 999) == DEFAULT_PRICES[Tier.DATACENTER]
    assert book.price_per_unit("datacenter", NOW + 1_000) == 900
    assert book.quote("matmul-bench", 2, 1, "datacenter", NOW + 5_000, 1).price_micro == 1_800
    assert book.price_per_unit("consumer", NOW + 5_000) == DEFAULT_PRICES[Tier.CONSUMER]


def test_price_updates_in_any_order_or_twice_give_the_same_prices() -> None:
    updates = [PriceUpdate("consumer", 120, NOW), PriceUpdate("consumer", 150, NOW + 10),
               PriceUpdate("prosumer", 300, NOW + 5)]
    forward, backward = PriceBook(), PriceBook()
    for update in updates + updates:
        forward.apply(update)
    for update in reversed(updates):
        backward.apply(update)
    for at in (NOW - 1, NOW, NOW + 5, NOW + 9, NOW + 10):
        for tier in Tier:
            assert forward.price_per_unit(tier, at) == backward.price_per_unit(tier, at)
    assert forward.price_per_unit("consumer", NOW + 9) == 120


def test_prices_must_be_non_negative_integers() -> None:
    with pytest.raises(InvalidRequest):
        PriceBook().apply(PriceUpdate("consumer", -1, NOW))
    with pytest.raises(InvalidRequest):
        PriceBook({Tier.CONSUMER: 1.5, Tier.PROSUMER: 2, Tier.DATACENTER: 3})  # type: ignore[dict-item]


def test_the_price_book_is_a_pricing_engine() -> None:
    engine: PricingEngine = PriceBook()
    assert engine.price_per_unit("prosumer", NOW) == DEFAULT_PRICES[Tier.PROSUMER]
