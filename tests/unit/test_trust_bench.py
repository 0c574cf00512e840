"""bench/trust.py's core on a tiny fleet: its counts add up and it sees what it should."""

from __future__ import annotations

from typing import Any

import pytest

from bench import trust

FIXED = trust.NETWORK_POLICIES["fixed-3/2"]


def run(strategy: str, nodes: int = 12, tasks: int = 60) -> Any:
    return trust.run(FIXED, trust.STRATEGIES[strategy], nodes, tasks, seed=3)


def test_honest_fleet_accepts_nothing_wrong_and_penalizes_nobody() -> None:
    r = run("honest")
    assert (r.submitted, r.verified, r.failed_total, r.in_flight) == (60, 60, 0, 0)
    assert r.wrong == 0
    assert not r.honest_penalized and not r.penalties and r.adversaries == 0
    assert r.assigned == 3 * r.verified
    assert r.honest_net_micro > 0  # paid, never slashed


def test_colluders_at_30_percent_win_some_majorities_under_fixed_3() -> None:
    # 4 colluders of 12: a random distinct triple holds >= 2 of them with chance 52/220.
    r = run("collude-30")
    assert r.adversaries == 4
    assert r.submitted == r.verified + r.failed_total + r.in_flight == 60
    assert r.in_flight == 0
    assert 0 < r.wrong < r.verified
    # Where they won, the honest replica was slashed for dissent; where they lost, they were.
    assert r.honest_penalized
    assert r.caught_after and all(k >= 1 for k in r.caught_after.values())
    assert r.adversary_net_micro < 0  # slashes outweigh their pay


def test_independent_cheaters_never_agree_and_are_caught() -> None:
    r = run("always-cheat-10", nodes=20)
    assert r.wrong == 0  # each forges its own digest: two of them never make a quorum
    assert r.submitted == r.verified + r.failed_total
    assert len(r.caught_after) == r.adversaries == 2
    assert not r.honest_penalized


def test_lazy_copiers_are_refused_by_commit_reveal() -> None:
    r = run("lazy-copy-10", nodes=20)
    assert r.wrong == 0 and not r.honest_penalized
    assert r.penalties["no_reveal"] > 0 and r.dead_letters["reveal_mismatch"] > 0


def test_forging_draw_is_per_replica_and_near_its_rate() -> None:
    forger = trust.Forging(trust.Compute(reuse=True), trust.STRATEGIES["rare-cheat-10"],
                           "n00001", seed=1)
    draws = [forger.cheats(f"t{i}", 1) for i in range(20_000)]
    assert draws == [forger.cheats(f"t{i}", 1) for i in range(20_000)]  # seeded
    assert 100 <= sum(draws) <= 300  # 1 %


@pytest.mark.parametrize(("bad", "n", "expected"), [(100, 1000, 0.027781), (4, 12, 52 / 220)])
def test_majority_expectation(bad: int, n: int, expected: float) -> None:
    assert trust.majority_of_3(0.1) == pytest.approx(0.028)
    assert trust.majority_of_3_exact(bad, n) == pytest.approx(expected, rel=1e-3)
