"""The network's live parameters: one home for every value governance can change.

Each parameter is an integer with a default, a range and a doc. Processors never
copy a default into a constant of their own: they hold a ``ParamSchedule``,
read the value in force at an event's time, and follow ``ParameterChanged``
events (signed by the governance role), which a passed proposal emits. Like
prices, a change applies from its ``effective_at``, so replaying the topics in
any order gives every processor the same values at the same instants.

A network may start from other values than the defaults: ``DESTRA_PARAM_<NAME>``
(the name upper-cased, dots as ``__``) in the environment of every service of the
network (``params_from``); ``LocalNetwork`` passes the same environment to all.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from schemas.errors import ConfigError
from schemas.events import Event

MAX_LONG = 2**63 - 1
TIERS = ("consumer", "prosumer", "datacenter")
"""The price tiers (``allocator.pricing.Tier``), named here so the floors and ceilings
have their home below every service."""


@dataclass(frozen=True)
class Param:
    """One live parameter."""

    name: str
    default: int
    low: int
    high: int
    doc: str
    owner: str
    """The processor that reads it (``ledger``, ``allocator``, ``verifier``, ``pricing``,
    ``governance``, ``client``), for the docs and ``destra gov params``."""


def _params(*params: Param) -> Mapping[str, Param]:
    return {p.name: p for p in params}


_TOKEN = 1_000_000

PARAMS: Mapping[str, Param] = _params(
    Param("fee_bps", 500, 0, 5_000, "The network's fee on payouts, in basis points.", "ledger"),
    Param("default_replicas", 3, 1, 15,
          "Replicas of a fixed-trust task when the submitter names none.", "client"),
    Param("slash_no_show_micro", 100_000, 0, 1_000 * _TOKEN,
          "Stake slashed when a node misses its commit window.", "verifier"),
    Param("slash_no_reveal_micro", 250_000, 0, 1_000 * _TOKEN,
          "Stake slashed when a node commits but does not reveal.", "verifier"),
    Param("slash_dissent_micro", _TOKEN, 0, 1_000 * _TOKEN,
          "Stake slashed when a node's digest dissents from the verified one.", "verifier"),
    Param("trusted_after", 10, 1, 10_000,
          "Consecutive agreements before a node runs adaptive tasks alone.", "allocator"),
    Param("spot_max_permille", 500, 1, 1_000,
          "Spot-check rate of a node that has just become trusted.", "allocator"),
    Param("spot_min_permille", 50, 1, 1_000,
          "The floor of the spot-check rate, however long the streak.", "allocator"),
    Param("spot_halving_streak", 40, 1, 1_000_000,
          "Agreements past trust over which the spot-check rate halves.", "allocator"),
    *(Param(f"price_floor_micro.{tier}", floor, 1, MAX_LONG,
            f"The lowest price per compute unit the price engine sets in the {tier} tier.",
            "pricing")
      for tier, floor in zip(TIERS, (20, 50, 120), strict=True)),
    *(Param(f"price_ceiling_micro.{tier}", ceiling, 1, MAX_LONG,
            f"The highest price per compute unit the price engine sets in the {tier} tier.",
            "pricing")
      for tier, ceiling in zip(TIERS, (1_000, 2_500, 6_000), strict=True)),
    Param("unbonding_ms", 7 * 24 * 3_600_000, 0, 365 * 24 * 3_600_000,
          "How long unstaked tokens stay slashable before they can be withdrawn.", "ledger"),
    Param("gov_deposit_micro", 10 * _TOKEN, 0, MAX_LONG,
          "The deposit a proposal escrows; refunded unless it fails quorum.", "governance"),
    Param("gov_voting_ms", 24 * 3_600_000, 1_000, 90 * 24 * 3_600_000,
          "How long a proposal's ballot stays open.", "governance"),
    Param("gov_quorum_permille", 334, 1, 1_000,
          "Stake that must vote (yes, no or abstain), per thousand of all bonded stake.",
          "governance"),
    Param("gov_threshold_permille", 500, 1, 999,
          "A proposal passes when yes exceeds this share of yes + no, per thousand.",
          "governance"),
)
"""Every live parameter, by name."""

_ORDERED = (("spot_min_permille", "spot_max_permille"),
            *((f"price_floor_micro.{t}", f"price_ceiling_micro.{t}") for t in TIERS))
"""Pairs whose first must not exceed their second."""


def param(name: str) -> Param:
    """The parameter named ``name``; ``ValueError`` naming the known ones otherwise."""
    found = PARAMS.get(name)
    if found is None:
        raise ValueError(f"unknown parameter {name!r}; known: {', '.join(PARAMS)}")
    return found


def parse_value(name: str, text: str) -> int:
    """A proposed value as its parameter's integer, in range; ``ValueError`` with the reason."""
    p = param(name)
    try:
        value = int(text.replace("_", ""), 10)
    except ValueError:
        raise ValueError(f"{name} takes an integer, got {text!r}") from None
    if not p.low <= value <= p.high:
        raise ValueError(f"{name} must lie in {p.low}..{p.high}, got {value}")
    return value


class Params(Mapping[str, int]):
    """The values in force at one instant (a read-only mapping by name)."""

    def __init__(self, values: Mapping[str, int]) -> None:
        self._values = dict(values)

    def __getitem__(self, name: str) -> int:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def conflict(self, name: str, value: int) -> str | None:
        """Why setting ``name`` to ``value`` would break an ordering rule here, or None."""
        for low, high in _ORDERED:
            if name == low and value > self[high]:
                return f"{name} {value} would exceed {high} {self[high]}"
            if name == high and value < self[low]:
                return f"{name} {value} would fall below {low} {self[low]}"
        return None


DEFAULTS = Params({name: p.default for name, p in PARAMS.items()})


class ParamSchedule:
    """Every parameter's value over time: a start, then each ``ParameterChanged``.

    ``apply`` is idempotent and order-free, as ``allocator.pricing.PriceBook`` is:
    the change effective last by an instant wins, and for one instant the one applied
    last (the topic's order decides, on replay too).
    """

    def __init__(self, start: Mapping[str, int] | None = None) -> None:
        values = dict(DEFAULTS)
        values.update(start or {})
        self._schedule: dict[str, dict[int, int]] = {}
        for name, value in values.items():
            self._schedule[name] = {0: self._checked(name, value)}

    @staticmethod
    def _checked(name: str, value: int) -> int:
        p = param(name)
        if type(value) is not int or not p.low <= value <= p.high:
            raise ValueError(f"{name} must be an integer in {p.low}..{p.high}, got {value!r}")
        return value

    def apply(self, name: str, value: int, effective_at: int) -> None:
        """Take a change; ``ValueError`` for an unknown parameter or a value out of range."""
        self._schedule[param(name).name][max(0, effective_at)] = self._checked(name, value)

    def follow(self, change: Event) -> str | None:
        """Take a ``ParameterChanged``; why it changes nothing (a dead letter's reason: a
        parameter this version does not know, a value out of range), or None."""
        f = change.fields
        try:
            self.apply(f["parameter"], f["value"], f["effective_at"])
        except ValueError as err:
            return f"invalid-parameter: {err}"
        return None

    def value(self, name: str, at_ms: int) -> int:
        """The value of ``name`` in force at ``at_ms``."""
        schedule = self._schedule[param(name).name]
        return schedule[max((t for t in schedule if t <= at_ms), default=0)]

    def at(self, at_ms: int) -> Params:
        """Every value in force at ``at_ms``."""
        return Params({name: self.value(name, at_ms) for name in self._schedule})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ParamSchedule) and self._schedule == other._schedule

    __hash__ = None  # type: ignore[assignment]  # mutable

    def latest(self) -> Params:
        """Every value as the last change made it, whenever it takes effect."""
        return self.at(MAX_LONG)

    def state(self) -> dict[str, dict[int, int]]:
        """Plain data for a snapshot (``load`` takes it back)."""
        return {name: dict(s) for name, s in self._schedule.items()}

    @classmethod
    def load(cls, state: Mapping[str, Mapping[int, int]]) -> ParamSchedule:
        """A schedule from ``state``; parameters it lacks (added since) start at default."""
        out = cls()
        for name, schedule in state.items():
            if name in PARAMS:
                out._schedule[name] = {int(t): int(v) for t, v in schedule.items()}
        return out


def params_from(env: Mapping[str, str]) -> dict[str, int]:
    """The start values a network's environment sets (``DESTRA_PARAM_<NAME>``)."""
    out: dict[str, int] = {}
    for name in PARAMS:
        raw = env.get("DESTRA_PARAM_" + name.upper().replace(".", "__"))
        if raw:
            try:
                out[name] = parse_value(name, raw)
            except ValueError as err:
                raise ConfigError(f"DESTRA_PARAM_{name.upper()}: {err}") from None
    defaults = dict(DEFAULTS)
    defaults.update(out)
    merged = Params(defaults)
    for name, value in out.items():
        reason = merged.conflict(name, value)
        if reason:
            raise ConfigError(f"network parameters: {reason}")
    return out
