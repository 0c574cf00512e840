"""Tiered pricing: which tier a node sells in, what a compute unit costs, and quotes.

Pure and in integers: prices are micro-tokens, times are milliseconds since
the epoch passed in by the caller. The static ``PriceBook`` follows
``PriceUpdated`` events, which the demand-driven market (``allocator.market``)
emits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from destra.errors import InvalidRequest, QuoteExpired, UnknownTier

MAX_LONG = 2**63 - 1  # Avro long: every price must fit the events that carry it
MAX_REPLICAS = 15  # TaskSubmitted.replicas
MIN_PRICE_MICRO = 1


class Tier(StrEnum):
    """A price tier; later members are more capable (``rank``)."""

    CONSUMER = "consumer"
    PROSUMER = "prosumer"
    DATACENTER = "datacenter"

    @property
    def rank(self) -> int:
        """0 for consumer, 1 for prosumer, 2 for datacenter: "this tier or better" is ``>=``."""
        return _RANKS[self]


_RANKS = {tier: i for i, tier in enumerate(Tier)}


def tier_of(name: str | Tier) -> Tier:
    """The tier named ``name``; ``UnknownTier`` for any other name."""
    try:
        return Tier(name)
    except ValueError:
        raise UnknownTier(f"unknown tier {name!r}; known: {', '.join(Tier)}") from None


# Thresholds on the registration benchmark. Both must hold for a tier; the highest met wins.
# Datacenter: 40 GiB and 50 TFLOP/s (A100, H100, L40S). Prosumer: 20 GiB and 20 TFLOP/s
# (RTX 3090/4090/5090, A5000/A6000). Everything else, CPUs included, is consumer.
TIER_THRESHOLDS: tuple[tuple[Tier, int, int], ...] = (
    # tier, min tflops_milli, min memory_mb
    (Tier.DATACENTER, 50_000, 40 * 1024),
    (Tier.PROSUMER, 20_000, 20 * 1024),
)


def classify(tflops_milli: int, memory_mb: int) -> Tier:
    """The tier a node's measured capability earns."""
    for tier, min_tflops, min_memory in TIER_THRESHOLDS:
        if tflops_milli >= min_tflops and memory_mb >= min_memory:
            return tier
    return Tier.CONSUMER


def effective_tier(declared: str | Tier, tflops_milli: int, memory_mb: int) -> Tier:
    """The tier a node sells in: the one it declares, capped by what it measured.

    A node may sell below its capability, never above it.
    """
    declared_tier, measured = tier_of(declared), classify(tflops_milli, memory_mb)
    return declared_tier if declared_tier.rank <= measured.rank else measured


DEFAULT_PRICES: dict[Tier, int] = {
    Tier.CONSUMER: 100,
    Tier.PROSUMER: 250,
    Tier.DATACENTER: 600,
}
"""Micro-tokens per compute unit until a ``PriceUpdated`` says otherwise."""


@dataclass(frozen=True)
class PriceUpdate:
    """A new price for a tier from ``effective_at`` on (``PriceUpdated``)."""

    tier: str
    price_per_unit_micro: int
    effective_at: int
    """Milliseconds since the Unix epoch (UTC)."""


@dataclass(frozen=True)
class Quote:
    """A price offered for a task, binding until ``expires_at`` (inclusive)."""

    quote_id: str
    """Derived from the quote's content, so the same request at the same time gets the same id."""
    tier: Tier
    compute_units: int
    replicas: int
    price_micro: int
    """The whole task's price (``task_price``), at least 1."""
    expires_at: int
    trust: str = "fixed"
    """``fixed`` or ``adaptive`` (``task_price``)."""


class PricingEngine(Protocol):
    """Prices compute; the static ``PriceBook`` now, a demand-driven engine later."""

    def price_per_unit(self, tier: str | Tier, now_ms: int) -> int:
        """Micro-tokens for one compute unit in ``tier`` at ``now_ms``."""
        ...

    def quote(self, workload: str, compute_units: int, replicas: int, tier: str | Tier,
              now_ms: int, ttl_ms: int, trust: str = "fixed") -> Quote:
        """A quote for running ``workload`` on ``replicas`` nodes, valid for ``ttl_ms``."""
        ...


TRUSTS = ("fixed", "adaptive")
"""``TaskSubmitted.trust``: exactly ``replicas`` replicas, or reputation-based
(``allocator.trust``)."""

TRUST_PREMIUM_PERMILLE = 300
"""What an adaptive task pays on top of its ``replicas`` floor, per thousand: the
expected cost of its spot checks and escalations (``bench/trust.py`` measures the
compute they take). The escrow is shared by every agreeing replica, so a trusted node
that runs a task alone earns the premium too: what its reputation is worth."""


def task_price(compute_units: int, replicas: int, price_per_unit_micro: int,
               trust: str = "fixed") -> int:
    """``compute_units * replicas * price_per_unit_micro``, at least ``MIN_PRICE_MICRO``;
    for ``trust="adaptive"`` plus ``TRUST_PREMIUM_PERMILLE`` (rounded up).

    Integers only, so nothing is rounded. An engine that scales prices (a
    demand multiplier in permille, say) must round up, with
    ``-(-x * m // 1000)``, so the network never sells below its price; the
    minimum of 1 keeps a free tier from making tasks that escrow nothing.
    """
    if trust not in TRUSTS:
        raise InvalidRequest(f"trust {trust!r} is not one of {', '.join(TRUSTS)}")
    price = compute_units * replicas * price_per_unit_micro
    if trust == "adaptive":
        price = -(-price * (1000 + TRUST_PREMIUM_PERMILLE) // 1000)
    if price > MAX_LONG:
        raise InvalidRequest(f"price {price} micro-tokens does not fit a 64-bit amount")
    return max(MIN_PRICE_MICRO, price)


def make_quote(workload: str, compute_units: int, replicas: int, tier: Tier,
               price_per_unit_micro: int, now_ms: int, ttl_ms: int,
               trust: str = "fixed") -> Quote:
    """A ``Quote`` at a given unit price; shared by every engine so their quotes agree."""
    if not workload:
        raise InvalidRequest("workload must be named")
    if compute_units < 1:
        raise InvalidRequest(f"compute_units {compute_units} must be at least 1")
    if not 1 <= replicas <= MAX_REPLICAS:
        raise InvalidRequest(f"replicas {replicas} out of 1..{MAX_REPLICAS}")
    if ttl_ms < 1 or now_ms < 0:
        raise InvalidRequest(f"ttl_ms {ttl_ms} must be positive and now_ms {now_ms} not negative")
    price = task_price(compute_units, replicas, price_per_unit_micro, trust)
    expires_at = now_ms + ttl_ms
    content = f"{workload}\0{compute_units}\0{replicas}\0{tier}\0{price}\0{now_ms}\0{expires_at}"
    if trust != "fixed":
        content += f"\0{trust}"
    quote_id = "q-" + hashlib.sha256(content.encode()).hexdigest()[:32]
    return Quote(quote_id, tier, compute_units, replicas, price, expires_at, trust)


def check_quote(quote: Quote, now_ms: int) -> None:
    """Raise ``QuoteExpired`` if ``quote`` has lapsed at ``now_ms``."""
    if now_ms > quote.expires_at:
        raise QuoteExpired(f"quote {quote.quote_id} expired at {quote.expires_at}, "
                           f"{now_ms - quote.expires_at} ms ago; ask for a new quote")


class PriceBook:
    """Static prices per tier: defaults, then whatever ``PriceUpdated`` events set.

    Each update applies from its ``effective_at``, so a price announced ahead
    of time takes over on time, and applying updates in any order gives the
    same prices (for one tier and one instant, the update applied last wins:
    the topic's order decides, on replay too).
    """

    def __init__(self, defaults: dict[Tier, int] | None = None) -> None:
        initial = DEFAULT_PRICES if defaults is None else defaults
        self._schedule: dict[Tier, dict[int, int]] = {
            tier: {0: self._checked(initial[tier])} for tier in Tier}

    @staticmethod
    def _checked(price: int) -> int:
        if type(price) is not int or not 0 <= price <= MAX_LONG:
            raise InvalidRequest(f"price per unit {price!r} must be an integer in 0..{MAX_LONG}")
        return price

    def apply(self, update: PriceUpdate) -> None:
        """Take a ``PriceUpdated``; applying the same one again changes nothing."""
        tier = tier_of(update.tier)
        self._schedule[tier][update.effective_at] = self._checked(update.price_per_unit_micro)

    def price_per_unit(self, tier: str | Tier, now_ms: int) -> int:
        """The price in force at ``now_ms``: the latest update effective by then."""
        schedule = self._schedule[tier_of(tier)]
        return schedule[max(t for t in schedule if t <= now_ms)] if now_ms >= 0 else schedule[0]

    def lowest(self, tier: str | Tier, since_ms: int, until_ms: int) -> int:
        """The lowest unit price in force at any instant of ``[since_ms, until_ms]``: the
        price at ``since_ms`` and every update effective inside the window. A quote made
        at any instant of the window is at least this (the ledger's check, so a price
        that rises after a quote never invalidates it)."""
        schedule = self._schedule[tier_of(tier)]
        if until_ms < since_ms:
            raise InvalidRequest(f"window [{since_ms}, {until_ms}] ends before it starts")
        inside = [p for t, p in schedule.items() if since_ms < t <= until_ms]
        return min([self.price_per_unit(tier, since_ms), *inside])

    def quote(self, workload: str, compute_units: int, replicas: int, tier: str | Tier,
              now_ms: int, ttl_ms: int, trust: str = "fixed") -> Quote:
        """A quote at the price in force at ``now_ms``."""
        resolved = tier_of(tier)
        return make_quote(workload, compute_units, replicas, resolved,
                          self.price_per_unit(resolved, now_ms), now_ms, ttl_ms, trust)
