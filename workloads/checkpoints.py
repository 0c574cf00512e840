"""Merkle-committed checkpoints of iterative workloads, so a dispute costs one segment.

An iterative workload (training epochs, time steps, grid points) is cut into at most
``MAX_SEGMENTS`` segments. A replica records a *leaf* after every segment: the SHA-256
of the state's canonical, rounded encoding (``Checkpointed.leaf_bytes``). It commits to
the Merkle root of its leaves. When two replicas' roots differ, a bisection over the
tree (``verifier.bisection``) finds the first segment whose end state they disagree on,
and a referee re-executes only that segment from the agreed pre-state and compares.

This is refereed delegation (as in Gensyn's Verde, or Truebit's verification game): the
referee trusts one bounded re-execution of one segment. It is NOT a zero-knowledge proof
and not a succinct proof: the referee sees the state and does real work, about
``1 / segments`` of a full rerun.

Two encodings of a state, on purpose:

- ``state_bytes``: exact (float64 bit patterns, generator state, counters). This is what
  a segment continues from, so that running all segments one after another gives the
  same bits as the workload's ``run()`` and therefore the same output digest.
- ``leaf_bytes``: the same fields with every float rounded to the workload's
  ``digest_bits`` (``workloads.canonical.round_tensor``, the rule of the final digest).
  Leaves are hashes of this, so an honest CPU replica and an honest GPU replica, whose
  floats differ in the last bits, commit to the same leaves wherever their final digests
  agree. The price: a pre-state is pinned by its leaf only up to that rounding, the same
  tolerance the final digest grants; a perturbation inside it is indistinguishable from
  honest device noise. Workloads marked ``bit_exact`` (n-body) must be refereed on the
  replicas' hardware class, as they must be replicated on one.

Merkle tree: level 0 holds ``H(0x00 || leaf)``, an inner node is ``H(0x01 || left ||
right)`` (domain separation: an inner node can never pass for a leaf). A level with an
odd number of nodes promotes its last node unchanged to the level above (no
duplication, so no two leaf lists of different lengths share a root for a given ``n``,
the flaw of Bitcoin's duplicate-the-last rule). ``n`` is always part of what is checked.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from struct import error as struct_error
from typing import Any

from schemas.errors import InvalidParams, WorkloadFailed
from workloads.base import Workload, WorkloadResult, deterministic
from workloads.canonical import canonical_json, round_tensor, tensor_b64, tensor_from_b64
from workloads.lazy import torch

MAX_SEGMENTS = 64
"""At most this many segments per task: the tree has depth <= 6, a dispute <= 6 rounds."""

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
CHECKPOINT_DOMAIN = b"destra/checkpoint/v1\x00"
"""Prefix of the bytes a leaf hashes, so a leaf is never another SHA-256 use's output."""

HASH_BYTES = 32


# --------------------------------------------------------------------------- Merkle


def _check_hash(value: bytes, what: str) -> bytes:
    if not isinstance(value, bytes | bytearray) or len(value) != HASH_BYTES:
        raise InvalidParams(f"{what} must be {HASH_BYTES} bytes")
    return bytes(value)


def leaf_node(leaf: bytes) -> bytes:
    """Level-0 node of ``leaf``: ``sha256(0x00 || leaf)``."""
    return hashlib.sha256(LEAF_PREFIX + _check_hash(leaf, "a leaf")).digest()


def inner_node(left: bytes, right: bytes) -> bytes:
    """Inner node over two children: ``sha256(0x01 || left || right)``."""
    return hashlib.sha256(NODE_PREFIX + _check_hash(left, "a node") +
                          _check_hash(right, "a node")).digest()


def level_sizes(n: int) -> list[int]:
    """Nodes per level, leaves first: ``[n, ceil(n/2), ..., 1]``; ``len - 1`` = depth."""
    if n < 1:
        raise InvalidParams(f"a Merkle tree needs at least one leaf, got {n}")
    sizes = [n]
    while sizes[-1] > 1:
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def merkle_levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """Every level of the tree, level 0 (leaf nodes) first, the root's level last."""
    level_sizes(len(leaves))
    levels = [[leaf_node(leaf) for leaf in leaves]]
    while len(levels[-1]) > 1:
        below = levels[-1]
        above = [inner_node(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)]
        if len(below) % 2:
            above.append(below[-1])  # odd node: promoted unchanged
        levels.append(above)
    return levels


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """Root over 32-byte ``leaves`` (at least one)."""
    return merkle_levels(leaves)[-1][0]


def merkle_proof(leaves: Sequence[bytes], i: int) -> list[bytes]:
    """Sibling hashes from leaf ``i`` up to the root; a promoted node has no sibling."""
    if not 0 <= i < len(leaves):
        raise InvalidParams(f"leaf index {i} out of range 0..{len(leaves) - 1}")
    proof = []
    for level in merkle_levels(leaves)[:-1]:
        sibling = i ^ 1
        if sibling < len(level):
            proof.append(level[sibling])
        i //= 2
    return proof


def verify_proof(root: bytes, leaf: bytes, i: int, n: int, proof: Sequence[bytes]) -> bool:
    """True when ``proof`` opens ``leaf`` at index ``i`` of an ``n``-leaf tree to ``root``.

    Never raises on a bad proof (wrong length, wrong sizes): it is just not valid.
    """
    if n < 1 or not 0 <= i < n:
        return False
    try:
        node = leaf_node(leaf)
        siblings = iter(proof)
        for size in level_sizes(n)[:-1]:
            sibling = i ^ 1
            if sibling < size:
                other = next(siblings)
                node = inner_node(other, node) if i % 2 else inner_node(node, other)
            i //= 2
        if next(siblings, None) is not None:
            return False
    except (StopIteration, InvalidParams):
        return False
    return node == root


# --------------------------------------------------------------------------- interface


class Checkpointed(ABC):
    """An iterative workload whose run can be cut into segments and resumed exactly.

    Invariant (tested per workload): ``final_result(p, advance(...advance(initial_state(p))))``
    over all segments has the same output bytes as ``run(p)``. Call the methods inside
    ``workloads.base.deterministic(device)``; the module functions below do.
    """

    digest_bits: int

    @abstractmethod
    def segments(self, params: dict[str, Any]) -> int:
        """Number of segments, 1..MAX_SEGMENTS; each is ``k`` steps, k from params."""

    @abstractmethod
    def segment_units(self, params: dict[str, Any]) -> int:
        """Compute units of the largest segment: the bound on a referee's work."""

    @abstractmethod
    def initial_state(self, params: dict[str, Any], device: torch.device) -> Any:
        """The state before segment 0, derived from ``params`` (seed) alone."""

    @abstractmethod
    def advance(self, params: dict[str, Any], state: Any, segment: int,
                device: torch.device) -> Any:
        """Run exactly segment ``segment`` from ``state`` (which must be its pre-state)."""

    @abstractmethod
    def state_fields(self, state: Any) -> dict[str, int | torch.Tensor]:
        """The state as named integers and tensors (what both encodings hold)."""

    @abstractmethod
    def state_from_fields(self, params: dict[str, Any], fields: dict[str, Any],
                          device: torch.device) -> Any:
        """Rebuild a state from decoded fields; ``InvalidParams`` when they do not fit."""

    @abstractmethod
    def final_result(self, params: dict[str, Any], state: Any,
                     device: torch.device, started_ns: int | None = None) -> WorkloadResult:
        """The result of ``run(params)`` from the state after the last segment; its runtime
        counted from ``started_ns`` when given (``run_whole``), else from now."""

    def advance_many(self, params: dict[str, Any], state: Any, segments: range,
                     device: torch.device) -> list[Any]:
        """The state after each of ``segments`` (consecutive, the first continuing from
        ``state``). Default: ``advance`` one by one; a workload whose segments are costly
        to start (a user program's child process) runs them in one go."""
        states = []
        for segment in segments:
            state = self.advance(params, state, segment, device)
            states.append(state)
        return states

    def leaf_bits(self, fields: Mapping[str, Any]) -> int | None:
        """Mantissa bits a leaf keeps for a state with these fields (None: exact).
        Default: the workload's ``digest_bits``; a user program's state names its own."""
        return self.digest_bits

    def state_bytes(self, state: Any) -> bytes:
        """Exact encoding of ``state`` (float bits kept): what a segment resumes from."""
        return _encode(self.state_fields(state), None)

    def leaf_bytes(self, state: Any) -> bytes:
        """Encoding with floats rounded to ``leaf_bits``: what a leaf hashes."""
        fields = self.state_fields(state)
        return _encode(fields, self.leaf_bits(fields))

    def state_from_bytes(self, params: dict[str, Any], data: bytes,
                         device: torch.device) -> Any:
        """Decode what ``state_bytes`` wrote; ``InvalidParams`` for malformed bytes."""
        return self.state_from_fields(params, _decode(data), device)


def _encode(fields: Mapping[str, int | torch.Tensor], bits: int | None) -> bytes:
    """Canonical JSON: integers as such, tensors as ``DTEN1`` base64 (rounded if ``bits``)."""
    body: dict[str, Any] = {}
    for name, value in fields.items():
        if isinstance(value, torch.Tensor):
            t = value.detach()
            if bits is not None and t.dtype in (torch.float32, torch.float64):
                t = round_tensor(t, bits)
            body[name] = {"tensor": tensor_b64(t)}
        elif isinstance(value, int) and not isinstance(value, bool):
            body[name] = value
        else:
            raise TypeError(f"state field {name!r} is neither an int nor a tensor")
    return canonical_json({"checkpoint": 1, "fields": body})


def _decode(data: bytes) -> dict[str, int | torch.Tensor]:
    try:
        body = json.loads(data)
        if body.get("checkpoint") != 1 or not isinstance(body.get("fields"), dict):
            raise ValueError("not a version-1 checkpoint")
        out: dict[str, int | torch.Tensor] = {}
        for name, value in body["fields"].items():
            if isinstance(value, dict):
                out[name] = tensor_from_b64(value["tensor"])
            elif isinstance(value, int) and not isinstance(value, bool):
                out[name] = value
            else:
                raise ValueError(f"field {name!r} has an unknown kind")
        return out
    except (ValueError, KeyError, TypeError, AttributeError, struct_error) as e:
        raise InvalidParams(f"checkpoint state is malformed: {e}") from None


def want_tensor(fields: Mapping[str, Any], name: str, dtype: torch.dtype,
                shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Field ``name`` as a tensor of exactly ``dtype`` and ``shape``, moved to ``device``."""
    t = fields.get(name)
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
        raise InvalidParams(f"checkpoint field {name!r} is not a {dtype} tensor of {shape}")
    return t.to(device)


def want_int(fields: Mapping[str, Any], name: str, lo: int, hi: int) -> int:
    """Field ``name`` as an integer in ``[lo, hi]``."""
    v = fields.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise InvalidParams(f"checkpoint field {name!r} is not an integer in [{lo}, {hi}]")
    return v


def split_evenly(total: int) -> tuple[int, int]:
    """``(k, segments)`` for ``total`` steps: k = ceil(total / MAX_SEGMENTS) steps each,
    the last segment possibly shorter."""
    k = max(1, math.ceil(total / MAX_SEGMENTS))
    return k, math.ceil(total / k)


# --------------------------------------------------------------------------- helpers


def leaf_of(workload: Checkpointed, state: Any) -> bytes:
    """The 32-byte leaf of ``state``: ``sha256(CHECKPOINT_DOMAIN || leaf_bytes(state))``."""
    return hashlib.sha256(CHECKPOINT_DOMAIN + workload.leaf_bytes(state)).digest()


def checkpointed(workload: Workload) -> Checkpointed:
    """``workload`` as a ``Checkpointed``; ``InvalidParams`` when it has no checkpoints."""
    if not isinstance(workload, Checkpointed):
        raise InvalidParams(f"{workload.name}: this workload has no checkpoints")
    return workload


def _segment_index(workload: Checkpointed, params: dict[str, Any], segment: int) -> int:
    n = workload.segments(params)
    if not isinstance(segment, int) or not 0 <= segment < n:
        raise InvalidParams(f"segment {segment} out of range 0..{n - 1}")
    return segment


def initial_leaf(workload: Checkpointed, params: dict[str, Any], device: torch.device
                 ) -> tuple[bytes, bytes]:
    """``(leaf, state_bytes)`` of the initial state: segment 0's agreed pre-state."""
    with deterministic(device):
        state = workload.initial_state(params, device)
        return leaf_of(workload, state), workload.state_bytes(state)


def checkpoint_leaves(workload: Checkpointed, params: dict[str, Any], device: torch.device
                      ) -> tuple[list[bytes], Any]:
    """Run every segment; return one leaf per segment end, and the final state.

    ``workload.final_result(params, final_state, device)`` is then ``run(params)``'s result.
    """
    with deterministic(device):
        state = workload.initial_state(params, device)
        states = workload.advance_many(params, state, range(workload.segments(params)), device)
        leaves = [leaf_of(workload, s) for s in states]
    return leaves, states[-1]


def run_whole(workload: Checkpointed, params: dict[str, Any], device: torch.device
              ) -> WorkloadResult:
    """``run()`` of a checkpointed workload: every segment, then ``final_result``, with no
    leaves. The one computation behind ``run()``, a replica's recorded run and a referee's
    segment, so they cannot drift apart."""
    started = time.perf_counter_ns()
    with deterministic(device):
        state = workload.initial_state(params, device)
        n = workload.segments(params)
        state = workload.advance_many(params, state, range(n), device)[-1]
        return workload.final_result(params, state, device, started)


def run_checkpointed(workload: Checkpointed, params: dict[str, Any], device: torch.device
                     ) -> tuple[list[bytes], WorkloadResult]:
    """``checkpoint_leaves`` plus the final result (what a replica runs and commits)."""
    started = time.perf_counter_ns()
    leaves, state = checkpoint_leaves(workload, params, device)
    with deterministic(device):
        return leaves, workload.final_result(params, state, device, started)


def run_segment(workload: Checkpointed, params: dict[str, Any], segment: int,
                pre_state_bytes: bytes, device: torch.device,
                expected_pre_leaf: bytes | None = None) -> tuple[bytes, bytes, bytes]:
    """Re-execute one segment from exact pre-state bytes (what a referee does).

    Returns ``(pre_leaf, post_leaf, post_state_bytes)``. ``InvalidParams`` for a
    malformed pre-state or segment, or, before any work, for a pre-state whose leaf is
    not ``expected_pre_leaf`` (when given).
    """
    segment = _segment_index(workload, params, segment)
    with deterministic(device):
        state = workload.state_from_bytes(params, pre_state_bytes, device)
        try:
            pre_leaf = leaf_of(workload, state)
        except WorkloadFailed as e:  # NaN in the offered state: it can match no leaf
            raise InvalidParams(f"the pre-state has no leaf: {e}") from None
        if expected_pre_leaf is not None and pre_leaf != expected_pre_leaf:
            raise InvalidParams("the pre-state does not hash to the agreed leaf")
        post = workload.advance(params, state, segment, device)
        return pre_leaf, leaf_of(workload, post), workload.state_bytes(post)


MAX_INLINE_STATE_BYTES = 262_144
"""The largest exact state that travels inline in a dispute (``CheckpointProvided.state``,
``TaskAssigned.pre_state``): a task whose states are larger is disputed by full rounds."""


def run_recorded(workload: Checkpointed, params: dict[str, Any], device: torch.device,
                 tamper_from: int | None = None
                 ) -> tuple[list[bytes], list[bytes], WorkloadResult]:
    """``run_checkpointed`` keeping each segment end's exact ``state_bytes`` as well
    (``b""`` for a state over ``MAX_INLINE_STATE_BYTES``, which no dispute can use): what a
    node keeps to answer a dispute's checkpoint request. ``tamper_from`` (a node's
    ``diverge`` fault, for tests and the demo) perturbs the state after that segment: the
    leaves from there on, and the result, are consistently wrong."""
    started = time.perf_counter_ns()
    with deterministic(device):
        state = workload.initial_state(params, device)
        leaves, states = [], []
        n = workload.segments(params)
        # Runs of segments between tamperings: one advance_many each.
        cut = n if tamper_from is None or not 0 <= tamper_from < n else tamper_from + 1
        for run in (range(0, cut), range(cut, n)):
            if not run:
                continue
            advanced = workload.advance_many(params, state, run, device)
            for segment, state in zip(run, advanced, strict=True):
                if segment == tamper_from:
                    state = _tampered(workload, params, state, device)
                leaves.append(leaf_of(workload, state))
                exact = workload.state_bytes(state)
                states.append(exact if len(exact) <= MAX_INLINE_STATE_BYTES else b"")
        return leaves, states, workload.final_result(params, state, device, started)


def _tampered(workload: Checkpointed, params: dict[str, Any], state: Any,
              device: torch.device) -> Any:
    """The state with every float tensor nudged by 1 % (a skipped step's worth of error)."""
    fields = {name: (value * 1.01 if isinstance(value, torch.Tensor) and value.is_floating_point()
                     else value)
              for name, value in workload.state_fields(state).items()}
    return workload.state_from_fields(params, fields, device)


def state_leaf(workload: Checkpointed, data: bytes) -> bytes:
    """The leaf of exact state bytes, from their own fields: what a dispute checks an
    offered pre-state against, without the task's parameters (the verifier sees only the
    public ones). A state hashing to an agreed leaf has that leaf's rounded fields, so its
    kinds and shapes; the referee then rebuilds it with the full parameters.
    ``InvalidParams`` for bytes that are no checkpoint, or hold NaN."""
    fields = _decode(data)
    try:
        bits = workload.leaf_bits(fields)
        return hashlib.sha256(CHECKPOINT_DOMAIN + _encode(fields, bits)).digest()
    except WorkloadFailed as e:
        raise InvalidParams(f"the state has no leaf: {e}") from None
    except TypeError as e:
        raise InvalidParams(f"checkpoint state is malformed: {e}") from None
