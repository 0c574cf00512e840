"""Disputes by bisection over Merkle-committed checkpoints, and a one-segment referee.

Two replicas of an iterative task (``workloads.checkpoints``) each commit to the Merkle
root of their per-segment leaves. When the roots differ, ``BisectionGame`` walks down
the two trees: at each node where the parties disagree, both reveal the node's two
children, each checked against that party's own node (a party whose children do not
hash to its own commitment loses at once), and the walk descends into the leftmost
child where they differ. After ``depth = ceil(log2 n)`` rounds it holds the first
diverging leaf ``i``, the two parties' claimed leaf ``i``, and their agreed leaf
``i - 1`` (opened with a Merkle proof when the walk did not reveal it), or the initial
state's leaf for ``i = 0``.

``referee`` then re-executes only segment ``i`` from the agreed pre-state and compares
its post-state leaf with both claims. A dispute therefore costs the referee one segment
(``segment_units``), about ``1 / n`` of a full rerun, plus ``log2 n`` rounds of hashes.

What this proves, and what it does not: it is refereed delegation (Gensyn's Verde,
Truebit), not a zero-knowledge or succinct proof. The referee sees the pre-state and
trusts its own bounded re-execution of one segment; the leaves pin states up to the
workload's digest rounding (see ``workloads.checkpoints``), and a party that is the
only one to hold the right answer wins only if the referee's re-execution is honest.
It decides between two claims; it says nothing about a task that every replica got
wrong the same way (that is the quorum's business).

Pure: no Kafka, no events. The verifier wiring calls ``first_divergence`` (both
parties' full leaf lists revealed) or drives ``BisectionGame`` (interactive), then
``referee``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from schemas.errors import InvalidParams, InvalidRequest, WorkloadFailed
from workloads.base import Workload
from workloads.checkpoints import (
    HASH_BYTES,
    checkpointed,
    initial_leaf,
    inner_node,
    leaf_node,
    level_sizes,
    merkle_levels,
    merkle_proof,
    merkle_root,
    run_segment,
    verify_proof,
)
from workloads.lazy import torch

Party = Literal["a", "b"]
PARTIES: tuple[Party, Party] = ("a", "b")


@dataclass(frozen=True)
class Query:
    """What both parties must answer next.

    ``kind == "children"``: reveal the two children of node ``(level, index)`` (level 0
    = leaves) with ``BisectionGame.answer``. Children on level >= 1 are node hashes;
    children on level 0 are the raw 32-byte leaves (the referee needs them). A node
    whose level below has no right sibling (the odd, promoted node) has one child:
    answer ``right=None``.

    ``kind == "open"``: open leaf ``index`` against your root with a Merkle proof, with
    ``BisectionGame.open_leaf`` (needed when the walk did not reveal a leaf it needs).
    """

    kind: Literal["children", "open"]
    level: int
    index: int


@dataclass(frozen=True)
class BisectionResult:
    """How a game ended."""

    n_leaves: int
    divergent_leaf: int | None
    """First leaf the parties disagree on; None when the roots agree or a party lost."""
    pre_leaf: bytes | None
    """The agreed leaf before it (leaf ``i - 1``), or the initial state's leaf for
    ``i = 0`` when the game was given one (else None: the referee derives it)."""
    claims: dict[str, bytes] = field(default_factory=dict)
    """Each party's claimed leaf ``divergent_leaf``."""
    losers: dict[str, str] = field(default_factory=dict)
    """Party -> why it lost by answering inconsistently with its own commitment."""
    rounds: int = 0
    """Rounds of the walk down the tree (at most ceil(log2 n))."""
    openings: int = 0
    """Leaf openings after the walk (0 or 1, 2 only for a one-leaf tree)."""


class BisectionGame:
    """The interactive game between parties ``"a"`` and ``"b"`` over ``n_leaves`` leaves.

    Loop: ``q = game.query()``; while ``q`` is not None, get both parties' answers for
    ``q`` (``answer`` or ``open_leaf``); then ``game.result()``. Answers may come in any
    order; a party answers each query once. Timeouts are the caller's business.
    """

    def __init__(self, n_leaves: int, root_a: bytes, root_b: bytes,
                 initial_leaf: bytes | None = None) -> None:
        self.sizes = level_sizes(n_leaves)
        self.n = n_leaves
        for name, value in (("root_a", root_a), ("root_b", root_b),
                            ("initial_leaf", initial_leaf)):
            if value is not None and (not isinstance(value, bytes) or len(value) != HASH_BYTES):
                raise InvalidParams(f"{name} must be {HASH_BYTES} bytes")
        self.roots: dict[str, bytes] = {"a": root_a, "b": root_b}
        self.initial_leaf = initial_leaf
        self.level = len(self.sizes) - 1
        self.index = 0
        # Each party's value of the current node: a node hash, or the raw leaf once the
        # walk has reached level 0 through a children answer.
        self.current: dict[str, bytes] = dict(self.roots)
        self.raw = False
        self.agreed_left: bytes | None = None  # raw leaf left of the current one, if seen
        self.pending: dict[str, Any] = {}
        self.losers: dict[str, str] = {}
        self.rounds = 0
        self.openings = 0
        self.claims: dict[str, bytes] = {}
        self.pre_leaf: bytes | None = None
        self.done = root_a == root_b

    # ------------------------------------------------------------------ protocol

    def query(self) -> Query | None:
        """The question both parties must answer now, or None when the game is over."""
        if self.done or self.losers:
            return None
        if self.level > 0:
            return Query("children", self.level, self.index)
        if not self.raw:
            return Query("open", 0, self.index)
        if self.index > 0 and self.agreed_left is None:
            return Query("open", 0, self.index - 1)
        return None

    def answer(self, party: str, left: bytes, right: bytes | None) -> None:
        """``party`` reveals the children of the queried node (see ``Query``).

        Children that do not hash to the party's own node make it lose, at once.
        """
        q = self._expect(party, "children")
        below = q.level - 1
        has_right = 2 * q.index + 1 < self.sizes[below]
        if not _is_hash(left) or (right is not None and not _is_hash(right)):
            self._lose(party, "revealed a child that is not 32 bytes")
            return
        if has_right != (right is not None):
            self._lose(party, f"revealed {'one child' if right is None else 'two children'} "
                              f"of node ({q.level}, {q.index}), which has "
                              f"{'two' if has_right else 'one'}")
            return
        lnode = leaf_node(left) if below == 0 else left
        rnode = None if right is None else (leaf_node(right) if below == 0 else right)
        parent = lnode if rnode is None else inner_node(lnode, rnode)
        if parent != self.current[party]:
            self._lose(party, f"children of node ({q.level}, {q.index}) do not hash to its "
                              "own commitment")
            return
        self.pending[party] = (left, right)
        if len(self.pending) == 2:
            self._descend()

    def open_leaf(self, party: str, leaf: bytes, proof: list[bytes]) -> None:
        """``party`` opens the queried leaf with a Merkle proof against its own root."""
        q = self._expect(party, "open")
        if not _is_hash(leaf) or not verify_proof(self.roots[party], leaf, q.index, self.n,
                                                  proof):
            self._lose(party, f"opening of leaf {q.index} does not verify against its root")
            return
        self.pending[party] = leaf
        if len(self.pending) == 2:
            a, b = self.pending["a"], self.pending["b"]
            self.pending = {}
            self.openings += 1
            if q.index == self.index:  # the diverging leaf itself (a one-leaf walk)
                self.current = {"a": a, "b": b}
                self.raw = True
            else:  # the agreed pre-leaf: both verified openings inside agreed subtrees
                if a != b:
                    raise InvalidRequest("two verified openings of an agreed leaf differ: "
                                         "a SHA-256 collision, or a bug")
                self.agreed_left = a
        self._finish_if_done()

    def result(self) -> BisectionResult:
        """The outcome; ``InvalidRequest`` while queries are still open."""
        if self.query() is not None:
            raise InvalidRequest("the bisection game is not over: answer query() first")
        if self.losers or self.roots["a"] == self.roots["b"]:
            return BisectionResult(self.n, None, None, {}, dict(self.losers), self.rounds,
                                   self.openings)
        pre = self.agreed_left if self.index > 0 else self.initial_leaf
        return BisectionResult(self.n, self.index, pre, dict(self.current), {},
                               self.rounds, self.openings)

    # ------------------------------------------------------------------ internals

    def _expect(self, party: str, kind: str) -> Query:
        if party not in PARTIES:
            raise InvalidRequest(f"party must be 'a' or 'b', got {party!r}")
        q = self.query()
        if q is None:
            raise InvalidRequest("the bisection game is over")
        if q.kind != kind:
            raise InvalidRequest(f"the open query is {q.kind!r}, not {kind!r}")
        if party in self.pending:
            raise InvalidRequest(f"party {party!r} already answered this query")
        return q

    def _lose(self, party: str, why: str) -> None:
        self.losers[party] = why
        self.pending = {}

    def _descend(self) -> None:
        (la, ra), (lb, rb) = self.pending["a"], self.pending["b"]
        self.pending = {}
        self.rounds += 1
        self.level -= 1
        if la != lb:
            self.index = 2 * self.index
            self.current = {"a": la, "b": lb}
        else:
            if ra is None or rb is None or ra == rb:
                raise InvalidRequest("both parties' children agree under a node they "
                                     "disagree on: a SHA-256 collision, or a bug")
            if self.level == 0:
                self.agreed_left = la
            self.index = 2 * self.index + 1
            self.current = {"a": ra, "b": rb}
        if self.level == 0:
            self.raw = True
        self._finish_if_done()

    def _finish_if_done(self) -> None:
        if self.level == 0 and self.query() is None:
            self.done = True


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == HASH_BYTES


def first_divergence(leaves_a: list[bytes], leaves_b: list[bytes],
                     initial_leaf: bytes | None = None) -> BisectionResult:
    """Play the game with both parties' full leaf lists (both revealed everything).

    Returns the same result as the interactive game, ``rounds`` included, so the
    wiring can use one code path either way. ``InvalidParams`` for lists of different
    lengths (the segment count is fixed by the public parameters).
    """
    if len(leaves_a) != len(leaves_b):
        raise InvalidParams(f"leaf lists differ in length: {len(leaves_a)} and "
                            f"{len(leaves_b)}")
    lists = {"a": list(leaves_a), "b": list(leaves_b)}
    levels = {p: merkle_levels(v) for p, v in lists.items()}
    game = BisectionGame(len(leaves_a), merkle_root(leaves_a), merkle_root(leaves_b),
                         initial_leaf)
    while (q := game.query()) is not None:
        for p in PARTIES:
            if q.kind == "open":
                game.open_leaf(p, lists[p][q.index], merkle_proof(lists[p], q.index))
                continue
            below = lists[p] if q.level == 1 else levels[p][q.level - 1]
            right = below[2 * q.index + 1] if 2 * q.index + 1 < len(below) else None
            game.answer(p, below[2 * q.index], right)
    return game.result()


# ---------------------------------------------------------------------- referee


@dataclass(frozen=True)
class Ruling:
    """The referee's decision on one diverging segment."""

    outcome: Literal["a", "b", "neither", "rejected"]
    """Whose claimed post-state leaf the re-execution reproduced; ``neither`` when it
    reproduced neither; ``rejected`` when it could not rule (see ``reason``)."""
    reason: str
    segment: int
    referee_leaf: bytes | None
    """The post-state leaf the referee computed (None when rejected or it failed)."""
    units_used: int
    """Compute units the referee spent: one segment's, 0 when rejected before running."""
    task_units: int
    """The full task's compute units (what a whole rerun would have cost)."""
    runtime_ms: int = 0


def referee(workload: Workload, params: dict[str, Any], segment: int,
            pre_state_bytes: bytes | None, agreed_pre_leaf: bytes | None,
            claim_a: bytes, claim_b: bytes, device: torch.device) -> Ruling:
    """Re-execute ``segment`` alone from the agreed pre-state and rule between the claims.

    ``pre_state_bytes`` is the exact ``state_bytes`` of the pre-state (from either
    party); it must hash to ``agreed_pre_leaf`` or the ruling is ``rejected``, nothing
    run. For segment 0 both may be None: the referee builds the initial state from the
    parameters (cheap, and then nobody has to be trusted for it).
    """
    ckpt = checkpointed(workload)
    task_units = workload.compute_units(params)

    def rejected(why: str) -> Ruling:
        return Ruling("rejected", why, segment, None, 0, task_units)

    n = ckpt.segments(params)
    if not isinstance(segment, int) or not 0 <= segment < n:
        return rejected(f"segment {segment} out of range 0..{n - 1}")
    if not (_is_hash(claim_a) and _is_hash(claim_b)):
        return rejected("a claimed leaf is not 32 bytes")
    if claim_a == claim_b:
        return rejected("the claims agree: there is nothing to rule on")
    if pre_state_bytes is None:
        if segment != 0:
            return rejected(f"segment {segment} needs the agreed pre-state's bytes")
        leaf, pre_state_bytes = initial_leaf(ckpt, params, device)
        if agreed_pre_leaf is not None and agreed_pre_leaf != leaf:
            return rejected("the agreed initial leaf is not the parameters' initial state")
        agreed_pre_leaf = leaf
    if not _is_hash(agreed_pre_leaf):
        return rejected("the agreed pre-state leaf is missing or not 32 bytes")
    started = time.perf_counter_ns()
    try:
        _, post, _ = run_segment(ckpt, params, segment, pre_state_bytes, device,
                                 expected_pre_leaf=agreed_pre_leaf)
    except InvalidParams as e:
        return rejected(f"bad pre-state: {e}")
    except WorkloadFailed as e:  # the segment diverged (NaN): no leaf can be right
        return Ruling("neither", f"the re-executed segment failed: {e}", segment, None,
                      ckpt.segment_units(params), task_units, _ms(started))
    outcome: Literal["a", "b", "neither"] = (
        "a" if post == claim_a else "b" if post == claim_b else "neither")
    why = {"a": "re-execution reproduced a's leaf", "b": "re-execution reproduced b's leaf",
           "neither": "re-execution reproduced neither claimed leaf"}[outcome]
    return Ruling(outcome, why, segment, post, ckpt.segment_units(params), task_units,
                  _ms(started))


def _ms(started_ns: int) -> int:
    return (time.perf_counter_ns() - started_ns) // 1_000_000
