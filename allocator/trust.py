"""Reputation and adaptive replication: how much checking a task needs, from whom.

Pure. ``Reputation`` folds the verifier's signed verdicts (``TaskVerified``: who
agreed with the accepted digest, who did not), its penalties (``NodePenalized``:
no-shows, missed reveals) and the ledger's entries on stake accounts (locks and
slashes) into one record per node: its streak of agreements, agreements, dissents,
no-shows, missed reveals, age and the stake it has left. It lives in the allocator's
state and is rebuilt by replaying those events, like every other state.

``TrustRules`` turns a record into placement (``Plan``) for a task submitted with
``trust="adaptive"``, after BOINC's adaptive replication:

* a node is *trusted* after ``trusted_after`` consecutive agreements (doubled for
  each dissent on its record), while it keeps at least ``min_stake_micro`` at stake;
  a new identity starts untrusted, so a Sybil that re-registers after a slash starts
  again from nothing and must stake;
* a task goes to one trusted node; with the node's *spot-check rate* a second node,
  drawn uniformly among all eligible nodes of other operators, runs it too. The
  rate falls with the streak and rises as the stake shrinks, and never falls below
  ``spot_min_permille``. The draw uses the handler's randomness, which in
  production is the operating system's: no submitter can predict or choose it;
* while too few nodes are trusted (the network's start), a task runs on
  ``bootstrap_replicas`` nodes drawn uniformly; that is how nodes earn trust;
* any dissent escalates (the verifier's rounds): round ``r`` runs ``2r + 1``
  fresh replicas on trusted nodes of operators the task has not used, drawn
  uniformly among them (lowest dissent count first when too few are trusted),
  and a majority of them decides; every node of every round whose digest differs
  from the decided one is penalized for dissent.

What it does not do: a node that behaves until trusted and then cheats is only
caught by a spot check, so on average it has ``1/p - 1`` wrong results accepted
before its first check at rate ``p``. That is what the stake and the slash are
sized against (``bench/trust.py`` prints the break-even).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from schemas import Event
from streams.params import PARAMS, ParamSchedule

PERMILLE = 1000

GOVERNED = ("trusted_after", "spot_max_permille", "spot_min_permille", "spot_halving_streak")
"""The rules live network parameters set (``streams.params``), by governance."""


@dataclass
class Record:
    """One node's verified history."""

    registered_at: int
    stake_micro: int
    """Its stake as the ledger holds it: locked, less every slash since."""
    agreements: int = 0
    streak: int = 0
    """Agreements since its last dissent or missed reveal."""
    dissents: int = 0
    no_shows: int = 0
    no_reveals: int = 0


@dataclass(frozen=True)
class TrustRules:
    """The parameters of adaptive replication (one home: the allocator and the bench
    read them here)."""

    trusted_after: int = PARAMS["trusted_after"].default
    """Consecutive agreements before a node runs tasks alone (BOINC: about 10)."""
    min_stake_micro: int = 1_000_000
    """Stake a node must have left to be placed on an adaptive task at all (one dissent's
    slash): an identity whose stake is gone earns nothing until it stakes again."""
    spot_max_permille: int = PARAMS["spot_max_permille"].default
    """The spot-check rate of a node that has just become trusted."""
    spot_min_permille: int = PARAMS["spot_min_permille"].default
    """The rate never falls below this, however long the streak."""
    spot_halving_streak: int = PARAMS["spot_halving_streak"].default
    """Agreements beyond ``trusted_after`` over which the rate halves."""
    reference_stake_micro: int = 5_000_000
    """At this stake the rate is as above; a node with less is checked more (up to twice
    as often), one with more no less often (stake does not buy a lower floor)."""
    bootstrap_replicas: int = 3
    """Replicas of a task while fewer trusted nodes than that are free."""
    max_rounds: int = 2
    """Escalation rounds after the first; the last one decides by majority."""

    def __post_init__(self) -> None:
        if not 0 < self.spot_min_permille <= self.spot_max_permille <= PERMILLE:
            raise ValueError("0 < spot_min_permille <= spot_max_permille <= 1000")
        if self.trusted_after < 1 or self.bootstrap_replicas < 2 or self.max_rounds < 1:
            raise ValueError("trusted_after >= 1, bootstrap_replicas >= 2, max_rounds >= 1")

    def with_params(self, params: Mapping[str, int]) -> TrustRules:
        """These rules with the governed ones (``GOVERNED``) as ``params`` has them."""
        return dataclasses.replace(self, **{name: params[name] for name in GOVERNED})

    def streak_needed(self, record: Record) -> int:
        """Agreements in a row a node needs to run alone: ``trusted_after``, doubled for
        each dissent it has on record (up to 16 x): a node caught with a wrong result
        earns trust back ever more slowly, so one that builds trust to cheat gets few
        turns (an honest node whose floats once differed loses little)."""
        return self.trusted_after << min(record.dissents, 4)

    def trusted(self, record: Record | None) -> bool:
        """Whether the node has earned single-replica placement."""
        return (record is not None and record.streak >= self.streak_needed(record)
                and record.stake_micro >= self.min_stake_micro)

    def eligible(self, record: Record | None) -> bool:
        """Whether the node may run an adaptive task's replica at all (enough stake)."""
        return record is not None and record.stake_micro >= self.min_stake_micro

    def spot_permille(self, record: Record) -> int:
        """The chance, per thousand, that a task placed on this trusted node is checked."""
        beyond = max(0, record.streak - self.streak_needed(record))
        rate = self.spot_max_permille * self.spot_halving_streak // (
            self.spot_halving_streak + beyond)
        stake = max(record.stake_micro, self.reference_stake_micro // 2)
        rate = rate * max(self.reference_stake_micro, stake) // stake
        return max(self.spot_min_permille, min(PERMILLE, rate))

    @property
    def slash_multiple(self) -> int:
        """A dissent costs this many times the task's price: ``1000 // spot_min_permille``
        (20 at 5 %). A node that runs a task alone and returns a wrong result without
        computing saves at most its price ``g`` (its compute cost, if it works for no
        profit); checked with chance ``p`` it loses ``S`` and the pay. Cheating gains
        ``(1 - p) g - p S``, negative whenever ``p > g / (g + S)``: 1/21 at ``S = 20 g``,
        under the lowest rate, 5 %. ``bench/trust.py`` prints the break-even."""
        return PERMILLE // self.spot_min_permille

    def dissent_slash_micro(self, price_micro: int, floor_micro: int) -> int:
        """The stake a dissent on an adaptive task of this price costs: at least
        ``floor_micro`` (the fixed penalty), else ``slash_multiple`` x the price."""
        return max(floor_micro, self.slash_multiple * price_micro)

    @staticmethod
    def round_size(round_: int) -> tuple[int, int]:
        """(replicas, quorum) of escalation round ``round_`` (>= 1): 2r + 1, a majority."""
        return 2 * round_ + 1, round_ + 1

    def escalation_rank(self, record: Record | None) -> tuple[int, int, int]:
        """Sort key for escalation replicas when too few are trusted: trusted first, then
        the fewest dissents, then the longest streak."""
        if record is None:
            return (1, 1 << 30, 0)
        return (0 if self.trusted(record) else 1, record.dissents, -record.streak)


DEFAULT_RULES = TrustRules()


def follow_parameter(params: ParamSchedule, rules: TrustRules, change: Event,
                     rejected: list[tuple[Event, Any, str]], where: Any = None) -> TrustRules:
    """Apply a ``ParameterChanged`` to ``params`` and return ``rules`` as they now stand (the
    allocator's and the verifier's, alike); a change out of range is refused."""
    refusal = params.follow(change)
    if refusal is not None:
        rejected.append((change, where, refusal))
        return rules
    return rules.with_params(params.at(change.fields["effective_at"]))


@dataclass
class Reputation:
    """Every node's ``Record``, folded from the verifier's verdicts and penalties."""

    records: dict[str, Record] = field(default_factory=dict)

    def on_registered(self, node_id: str, now_ms: int) -> None:
        """A registration: a new identity starts with nothing (its stake comes from the
        ledger's entries). A node that registers again (a restart) keeps its history."""
        record = self.records.setdefault(node_id, Record(now_ms, 0))
        if not record.registered_at:  # its stake entry was read first
            record.registered_at = now_ms

    def on_stake(self, node_id: str, amount_micro: int) -> None:
        """A ledger entry on the node's stake account: locked (positive) or slashed."""
        record = self.records.setdefault(node_id, Record(0, 0))
        record.stake_micro = max(0, record.stake_micro + amount_micro)

    def on_verdict(self, contributions: list[Any]) -> None:
        """A ``TaskVerified``'s contributions: agreeing nodes extend their streak,
        dissenting ones lose it."""
        for c in contributions:
            record = self.records.get(c["node_id"])
            if record is None:
                continue
            if c["agreed"]:
                record.agreements += 1
                record.streak += 1
            else:
                record.dissents += 1
                record.streak = 0

    def on_penalized(self, node_id: str, reason: str) -> None:
        """A ``NodePenalized``: a missed reveal (a node that committed and then would not
        open it) costs the streak, a no-show does not (a node may go down; that is not a
        wrong answer). Dissents count from the verdict, slashes from the ledger."""
        record = self.records.get(node_id)
        if record is None:
            return
        if reason == "no_show":
            record.no_shows += 1
        elif reason == "no_reveal":
            record.no_reveals += 1
            record.streak = 0

    def get(self, node_id: str) -> Record | None:
        """The node's record, None if it never registered."""
        return self.records.get(node_id)


@dataclass(frozen=True)
class Plan:
    """How an adaptive task's first round is placed."""

    nodes: tuple[str, ...]
    quorum: int
    kind: str
    """``single`` (one trusted node), ``spot-check`` (plus a random checker),
    ``bootstrap`` (too few trusted nodes), or ``floor`` (the submitter asked for more)."""
