"""Merkle-committed checkpoints, the bisection game and the one-segment referee."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from destra.errors import InvalidParams, InvalidRequest
from verifier.bisection import BisectionGame, first_divergence, referee
from workloads import get_workload
from workloads.checkpoints import (
    MAX_SEGMENTS,
    Checkpointed,
    checkpoint_leaves,
    checkpointed,
    initial_leaf,
    inner_node,
    leaf_node,
    leaf_of,
    merkle_levels,
    merkle_proof,
    merkle_root,
    run_checkpointed,
    verify_proof,
)

CPU = torch.device("cpu")
SMALL: dict[str, dict[str, str]] = {
    "mlp-digits": {"hidden": "8", "epochs": "4"},
    "heat2d": {"grid": "16", "steps": "70"},  # k = 2: 35 segments, all of 2 steps
    "nbody": {"n": "8", "steps": "13"},
}
MLP_RAW = {"hidden": "8", "epochs": "8"}


def fake_leaves(n: int, tag: int = 0) -> list[bytes]:
    return [hashlib.sha256(f"{tag}/{i}".encode()).digest() for i in range(n)]


def params_of(name: str, raw: dict[str, str]) -> tuple[Checkpointed, dict[str, Any]]:
    workload = get_workload(name)
    return checkpointed(workload), workload.validate(raw)


# ---------------------------------------------------------------------------- Merkle


def test_merkle_proofs_open_every_leaf_of_every_size_up_to_17() -> None:
    for n in range(1, 18):
        leaves = fake_leaves(n)
        root = merkle_root(leaves)
        for i in range(n):
            proof = merkle_proof(leaves, i)
            assert len(proof) <= math.ceil(math.log2(n)) if n > 1 else proof == []
            assert verify_proof(root, leaves[i], i, n, proof)


def test_a_tampered_leaf_a_wrong_index_size_or_proof_fails_verification() -> None:
    leaves = fake_leaves(7)
    root, proof = merkle_root(leaves), merkle_proof(leaves, 4)
    assert verify_proof(root, leaves[4], 4, 7, proof)
    assert not verify_proof(root, fake_leaves(1, tag=9)[0], 4, 7, proof)
    assert not verify_proof(root, leaves[4], 5, 7, proof)
    # n is not hashed into the root (it comes from the public parameters), but a
    # proof only verifies for the tree shape it was made for.
    assert not verify_proof(root, leaves[6], 6, 8, merkle_proof(leaves, 6))
    assert verify_proof(root, leaves[6], 6, 7, merkle_proof(leaves, 6))
    assert not verify_proof(root, leaves[4], 7, 7, proof)
    assert not verify_proof(root, leaves[4], 4, 7, proof[:-1])
    assert not verify_proof(root, leaves[4], 4, 7, [*proof, proof[0]])
    assert not verify_proof(root, leaves[4], 4, 7, [b"short", *proof[1:]])
    tampered = list(leaves)
    tampered[2] = fake_leaves(1, tag=9)[0]
    assert merkle_root(tampered) != root


def test_an_odd_node_is_promoted_and_leaves_and_inner_nodes_are_domain_separated() -> None:
    l0, l1, l2 = fake_leaves(3)
    assert merkle_root([l0, l1, l2]) == inner_node(inner_node(leaf_node(l0), leaf_node(l1)),
                                                   leaf_node(l2))
    assert merkle_root([l0]) == hashlib.sha256(b"\x00" + l0).digest()
    assert inner_node(l0, l1) == hashlib.sha256(b"\x01" + l0 + l1).digest()
    # Not Bitcoin's duplicate-the-last rule: [l0, l1, l2] and [l0, l1, l2, l2] differ.
    assert merkle_root([l0, l1, l2]) != merkle_root([l0, l1, l2, l2])
    assert [len(level) for level in merkle_levels(fake_leaves(5))] == [5, 3, 2, 1]
    with pytest.raises(InvalidParams):
        merkle_root([])
    with pytest.raises(InvalidParams):
        merkle_root([b"too short"])


# ---------------------------------------------------------------------------- workloads


@pytest.mark.parametrize("name", sorted(SMALL))
def test_running_every_segment_gives_exactly_the_digest_of_run(name: str) -> None:
    ckpt, params = params_of(name, SMALL[name])
    leaves, result = run_checkpointed(ckpt, params, CPU)
    expected = get_workload(name).run(params, CPU)
    assert result.output == expected.output
    assert result.digest == expected.digest
    assert len(leaves) == ckpt.segments(params) == len(set(leaves))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_state_bytes_round_trip_exactly_and_a_resumed_run_ends_the_same(name: str) -> None:
    ckpt, params = params_of(name, SMALL[name])
    _, init_bytes = initial_leaf(ckpt, params, CPU)
    state = ckpt.initial_state(params, CPU)
    for segment in range(ckpt.segments(params)):
        # Resume every segment from decoded bytes: any loss in the encoding shows here.
        data = ckpt.state_bytes(state)
        restored = ckpt.state_from_bytes(params, data, CPU)
        assert ckpt.state_bytes(restored) == data
        assert leaf_of(ckpt, restored) == leaf_of(ckpt, state)
        state = ckpt.advance(params, restored, segment, CPU)
        if segment == 0:
            assert data == init_bytes
    assert ckpt.final_result(params, state, CPU).digest == get_workload(name).run(
        params, CPU).digest


def test_segments_are_bounded_and_their_units_are_a_fraction_of_the_task() -> None:
    for name, raw in (("mlp-digits", {"epochs": "10000", "batch_size": "2048"}),
                      ("heat2d", {"steps": "100000", "grid": "8"}),
                      ("heat2d", {"steps": "6400", "grid": "256"}),
                      ("nbody", {"steps": "100000", "n": "2"}),
                      ("nbody", {"steps": "6400", "n": "64"})):
        ckpt, params = params_of(name, raw)
        n = ckpt.segments(params)
        assert 1 <= n <= MAX_SEGMENTS
        # Units round up (at most one unit per segment) and the last segment may be
        # shorter, so n - 1 full segments fit in the task.
        assert n == 1 or n > 60
        total = get_workload(name).compute_units(params)
        assert ckpt.segment_units(params) * (n - 1) <= total + n


def test_a_malformed_state_is_refused_with_invalid_params() -> None:
    ckpt, params = params_of("mlp-digits", MLP_RAW)
    good = ckpt.state_bytes(ckpt.initial_state(params, CPU))
    for bad in (b"", b"not json", good.replace(b'"epoch":0', b'"epoch":99'),
                good.replace(b'"step":0', b'"step":-1'), good.replace(b'"w1"', b'"w9"')):
        with pytest.raises(InvalidParams):
            ckpt.state_from_bytes(params, bad, CPU)
    _, wider = params_of("mlp-digits", {**MLP_RAW, "hidden": "9"})
    with pytest.raises(InvalidParams, match="w1"):
        ckpt.state_from_bytes(wider, good, CPU)
    with pytest.raises(InvalidParams, match="no checkpoints"):
        checkpointed(get_workload("matmul"))


# ---------------------------------------------------------------------------- game


def test_the_game_finds_the_first_divergence_for_every_size_and_position() -> None:
    start = fake_leaves(1, tag=7)[0]
    for n in range(1, 18):
        honest = fake_leaves(n)
        for j in range(n):
            cheat = honest[:j] + fake_leaves(n - j, tag=1)
            r = first_divergence(honest, cheat, initial_leaf=start)
            assert (r.divergent_leaf, r.losers) == (j, {})
            assert r.claims == {"a": honest[j], "b": cheat[j]}
            assert r.pre_leaf == (honest[j - 1] if j else start)
            assert r.rounds == math.ceil(math.log2(n))
            assert r.openings <= (2 if n == 1 else 1)
    same = first_divergence(fake_leaves(5), fake_leaves(5))
    assert same.divergent_leaf is None and same.rounds == 0


def test_a_party_revealing_children_that_do_not_hash_to_its_own_node_loses() -> None:
    a, b = fake_leaves(8), fake_leaves(8, tag=1)
    game = BisectionGame(8, merkle_root(a), merkle_root(b))
    q = game.query()
    assert q is not None and (q.kind, q.level, q.index) == ("children", 3, 0)
    levels_a = merkle_levels(a)
    game.answer("a", levels_a[2][0], levels_a[2][1])
    game.answer("b", levels_a[2][0], levels_a[2][1])  # a's children, not b's own
    assert game.query() is None
    result = game.result()
    assert result.divergent_leaf is None
    assert set(result.losers) == {"b"} and "own commitment" in result.losers["b"]


def test_a_party_opening_a_leaf_with_a_bad_proof_loses() -> None:
    a = fake_leaves(4)
    b = [*a[:2], *fake_leaves(2, tag=1)]  # diverges at leaf 2: a left child, so leaf 1
    game = BisectionGame(4, merkle_root(a), merkle_root(b))  # is opened after the walk
    lists = {"a": a, "b": b}
    while (q := game.query()) is not None and q.kind == "children":
        for p, leaves in lists.items():
            below = leaves if q.level == 1 else merkle_levels(leaves)[q.level - 1]
            game.answer(p, below[2 * q.index], below[2 * q.index + 1])
    assert q is not None and (q.kind, q.index) == ("open", 1)
    game.open_leaf("a", a[1], merkle_proof(a, 1))
    game.open_leaf("b", fake_leaves(1, tag=5)[0], merkle_proof(b, 1))
    assert set(game.result().losers) == {"b"}


def test_the_game_refuses_answers_out_of_turn() -> None:
    a, b = fake_leaves(4), fake_leaves(4, tag=1)
    game = BisectionGame(4, merkle_root(a), merkle_root(b))
    with pytest.raises(InvalidRequest, match="not over"):
        game.result()
    with pytest.raises(InvalidRequest, match="party"):
        game.answer("c", a[0], a[1])
    with pytest.raises(InvalidRequest, match="not 'open'"):
        game.open_leaf("a", a[0], merkle_proof(a, 0))
    levels = merkle_levels(a)
    game.answer("a", levels[1][0], levels[1][1])
    with pytest.raises(InvalidRequest, match="already answered"):
        game.answer("a", levels[1][0], levels[1][1])
    with pytest.raises(InvalidParams):
        BisectionGame(0, a[0], b[0])


# ---------------------------------------------------------------------------- disputes


@pytest.fixture(scope="module")
def mlp_honest() -> tuple[Checkpointed, dict[str, Any], list[bytes], list[bytes]]:
    """(workload, params, honest leaves, honest state bytes before each segment)."""
    ckpt, params = params_of("mlp-digits", MLP_RAW)
    pre_states, leaves = [], []
    state = ckpt.initial_state(params, CPU)
    for segment in range(ckpt.segments(params)):
        pre_states.append(ckpt.state_bytes(state))
        state = ckpt.advance(params, state, segment, CPU)
        leaves.append(leaf_of(ckpt, state))
    assert checkpoint_leaves(ckpt, params, CPU)[0] == leaves
    return ckpt, params, leaves, pre_states


def cheater_leaves(ckpt: Checkpointed, params: dict[str, Any], pre_states: list[bytes],
                   j: int) -> list[bytes]:
    """Honest up to segment j, then perturbs w1 after segment j and carries on honestly."""
    state = ckpt.state_from_bytes(params, pre_states[j], CPU)
    leaves = []
    for segment in range(j, ckpt.segments(params)):
        state = ckpt.advance(params, state, segment, CPU)
        if segment == j:
            state.weights["w1"].add_(1e-3)
        leaves.append(leaf_of(ckpt, state))
    return leaves


@pytest.fixture
def count_optimizer_steps() -> Iterator[list[int]]:
    counter = [0]

    def hook(*_: Any) -> None:
        counter[0] += 1

    handle = register_optimizer_step_post_hook(hook)
    yield counter
    handle.remove()


@pytest.mark.parametrize("j", [0, 3, 7])
def test_an_mlp_dispute_is_settled_by_re_executing_one_epoch(
        mlp_honest: tuple[Checkpointed, dict[str, Any], list[bytes], list[bytes]],
        count_optimizer_steps: list[int], j: int) -> None:
    ckpt, params, honest, pre_states = mlp_honest
    n = ckpt.segments(params)
    assert n == 8
    cheat = honest[:j] + cheater_leaves(ckpt, params, pre_states, j)
    start, _ = initial_leaf(ckpt, params, CPU)

    # The cheater is b here and a in the mirrored game: the ruling follows the truth.
    for cheater, result in (("b", first_divergence(honest, cheat, initial_leaf=start)),
                            ("a", first_divergence(cheat, honest, initial_leaf=start))):
        honest_party = "a" if cheater == "b" else "b"
        assert result.divergent_leaf == j
        assert result.rounds == math.ceil(math.log2(n)) == 3
        assert result.pre_leaf == (honest[j - 1] if j else start)
        count_optimizer_steps[0] = 0
        ruling = referee(get_workload("mlp-digits"), params, j, pre_states[j],
                         result.pre_leaf, result.claims["a"], result.claims["b"], CPU)
        assert ruling.outcome == honest_party, ruling.reason
        assert ruling.referee_leaf == honest[j]
        # Compute: the declared units of one segment, 1/n of the task here ...
        assert ruling.units_used == ckpt.segment_units(params)
        assert ruling.units_used * n == pytest.approx(ruling.task_units, rel=0.05)
        assert ruling.units_used < ruling.task_units / 2
        # ... and measured: the optimizer steps the referee really ran.
        referee_steps = count_optimizer_steps[0]
        count_optimizer_steps[0] = 0
        get_workload("mlp-digits").run(params, CPU)
        full_steps = count_optimizer_steps[0]
        assert full_steps == 8 * math.ceil(1348 / 128) == 88
        assert referee_steps * n == full_steps


def test_the_referee_rejects_a_pre_state_that_is_not_the_agreed_one(
        mlp_honest: tuple[Checkpointed, dict[str, Any], list[bytes], list[bytes]],
        count_optimizer_steps: list[int]) -> None:
    ckpt, params, honest, pre_states = mlp_honest
    mlp = get_workload("mlp-digits")
    claims = honest[3], fake_leaves(1)[0]
    wrong = referee(mlp, params, 3, pre_states[2], honest[2], *claims, CPU)
    assert wrong.outcome == "rejected" and "agreed leaf" in wrong.reason
    garbage = referee(mlp, params, 3, b"{}", honest[2], *claims, CPU)
    nan_state = ckpt.state_from_bytes(params, pre_states[3], CPU)
    nan_state.weights["w1"][0, 0] = float("nan")
    poisoned = referee(mlp, params, 3, ckpt.state_bytes(nan_state), honest[2], *claims, CPU)
    assert poisoned.outcome == "rejected" and "no leaf" in poisoned.reason
    assert garbage.outcome == "rejected" and "bad pre-state" in garbage.reason
    stale = referee(mlp, params, 4, pre_states[3], honest[2], *claims, CPU)
    assert stale.outcome == "rejected"  # pre-state of 3 offered for 4: wrong leaf
    assert referee(mlp, params, 8, pre_states[3], honest[2], *claims, CPU).outcome == "rejected"
    assert referee(mlp, params, 3, pre_states[3], honest[2], claims[0], claims[0],
                   CPU).outcome == "rejected"
    assert count_optimizer_steps[0] == 0  # nothing was run for a rejected ruling
    assert all(r.units_used == 0 for r in (wrong, garbage, stale, poisoned))


def test_the_referee_rules_neither_when_both_claims_are_wrong_and_derives_segment_0(
        mlp_honest: tuple[Checkpointed, dict[str, Any], list[bytes], list[bytes]]) -> None:
    ckpt, params, honest, pre_states = mlp_honest
    mlp = get_workload("mlp-digits")
    both_wrong = referee(mlp, params, 5, pre_states[5], honest[4], *fake_leaves(2), CPU)
    assert both_wrong.outcome == "neither" and both_wrong.referee_leaf == honest[5]
    derived = referee(mlp, params, 0, None, None, fake_leaves(1)[0], honest[0], CPU)
    assert derived.outcome == "b"
    bogus_start = referee(mlp, params, 0, None, fake_leaves(1)[0], honest[0],
                          fake_leaves(1, tag=1)[0], CPU)
    assert bogus_start.outcome == "rejected"


def test_a_heat2d_dispute_at_the_last_segment_is_ruled_by_re_executing_it() -> None:
    ckpt, params = params_of("heat2d", SMALL["heat2d"])
    n = ckpt.segments(params)
    state = ckpt.initial_state(params, CPU)
    honest, pres = [], []
    for segment in range(n):
        pres.append(ckpt.state_bytes(state))
        state = ckpt.advance(params, state, segment, CPU)
        honest.append(leaf_of(ckpt, state))
    cheat = [*honest[:-1], fake_leaves(1)[0]]
    result = first_divergence(cheat, honest)
    assert result.divergent_leaf == n - 1 and result.rounds == math.ceil(math.log2(n))
    ruling = referee(get_workload("heat2d"), params, n - 1, pres[-1], result.pre_leaf,
                     result.claims["a"], result.claims["b"], CPU)
    assert ruling.outcome == "b" and ruling.referee_leaf == honest[-1]
    assert ruling.units_used == ckpt.segment_units(params)
