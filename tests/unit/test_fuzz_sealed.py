"""Fuzzing the sealed formats: state snapshots (``seal_snapshot``/``open_snapshot``) and
the confidential payloads (task input, data-key grant, result; ``destra.confidential``).

Random and mutated bytes are refused with ``StateError`` / ``DecryptionFailed`` /
``InvalidParams``, and an untouched one opens to what was sealed. A sealed input whose
plaintext is not a task-input document (the submitter wrote it: it opens) is refused
with ``InvalidParams``.
"""

from __future__ import annotations

import json

from hypothesis import example, given
from hypothesis import strategies as st

from destra import crypto
from destra.confidential import (
    grant,
    open_grant,
    open_input,
    open_result,
    payload_ad,
    seal_input,
    seal_result,
)
from destra.errors import DecryptionFailed, InvalidParams, StateError
from streams.kafka_runner import open_snapshot, seal_snapshot
from tests.support import account_keys
from tests.unit.fuzzing import count, mutated

SERVICE = account_keys("verifier-service")
NODE = account_keys("node-a")
ALICE = account_keys("alice")
STATE = {"keys": {"a": bytes(32)}, "open_tasks": {"t"}, "closed": {"t0": 5}, "n": 2**70}
SNAPSHOT = seal_snapshot(STATE, SERVICE)
DATA_KEY, SEALED_INPUT = seal_input("t", {"seed": "42", "lr": "0.01"})
GRANT = grant("alice", "t", "node-a", 0, DATA_KEY, NODE.encryption_public)
RESULT = seal_result(ALICE.encryption_public, "t", "node-a", 0, b"output")
_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=20)


@given(st.one_of(mutated(SNAPSHOT), st.binary(max_size=200),
                 st.binary(max_size=200).map(lambda b: b"DSNP1" + b),
                 st.binary(max_size=200).map(lambda b: b"DSNP2" + b)))
def test_a_snapshot_opens_only_as_sealed(data: bytes) -> None:
    count("sealed: state snapshots")
    try:
        state = open_snapshot(data, SERVICE.signing_public)
    except StateError:
        assert data != SNAPSHOT
        return
    assert state == STATE


@given(st.one_of(mutated(SEALED_INPUT), st.binary(max_size=120)), st.sampled_from(["t", "t2"]))
def test_a_task_input_opens_only_as_sealed(sealed: bytes, task_id: str) -> None:
    count("sealed: task inputs")
    try:
        params = open_input(DATA_KEY, task_id, sealed)
    except (DecryptionFailed, InvalidParams):
        return
    assert (sealed, task_id) == (SEALED_INPUT, "t")
    assert params == {"seed": "42", "lr": "0.01"}


_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), _TEXT),
                     lambda inner: st.one_of(st.lists(inner, max_size=3),
                                             st.dictionaries(_TEXT, inner, max_size=3)),
                     max_leaves=8)


@st.composite
def _input_documents(draw: st.DrawFn) -> bytes:
    doc = draw(st.one_of(
        _JSON,
        st.fixed_dictionaries({"schema": st.sampled_from(["destra.task-input/1", "x"]),
                               "task_id": st.sampled_from(["t", "u"]),
                               "params": st.one_of(_JSON, st.dictionaries(_TEXT, _JSON))}),
    ))
    text = json.dumps(doc)
    return draw(st.one_of(st.just(text.encode()), mutated(text.encode()),
                          st.sampled_from([b"[" * 100_000, b'{"a":' * 50_000, b"\xff",
                                           b"NaN", b"1e999999"])))


@given(_input_documents())
@example(b"[" * 100_000)
def test_an_authentic_input_that_is_not_a_task_input_document_is_refused(
        plaintext: bytes) -> None:
    """The data key's holder (the submitter) can seal anything: it must still be refused
    with ``InvalidParams``, not crash the node that opens it."""
    count("sealed: authentic task-input plaintexts")
    sealed = crypto.seal(DATA_KEY, plaintext, payload_ad("t"))
    try:
        params = open_input(DATA_KEY, "t", sealed)
    except InvalidParams:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items())


@given(wrapped=st.one_of(mutated(GRANT.fields["wrapped_key"]), st.binary(max_size=80)),
       ephemeral=st.one_of(mutated(GRANT.fields["ephemeral_public_key"]),
                           st.binary(max_size=40),
                           st.sampled_from([bytes(32), b"\x01" + bytes(31), b"\xff" * 32])),
       node=st.sampled_from(["node-a", "node-b"]), attempt=st.sampled_from([0, 1, 2**31 - 1]))
def test_a_grant_opens_only_for_its_node_and_replica(wrapped: bytes, ephemeral: bytes,
                                                      node: str, attempt: int) -> None:
    count("sealed: data-key grants")
    event = GRANT.replace(wrapped_key=wrapped, ephemeral_public_key=ephemeral, node_id=node,
                          attempt=attempt)
    try:
        key = open_grant(NODE, event)
    except DecryptionFailed:
        return
    assert key == DATA_KEY
    assert event.fields == {**GRANT.fields, "node_id": node, "attempt": attempt}
    assert (node, attempt) == ("node-a", 0)


@given(st.one_of(mutated(RESULT), st.binary(max_size=120)),
       st.lists(st.sampled_from([ALICE, NODE, SERVICE]), min_size=0, max_size=3))
def test_a_result_opens_only_for_its_submitter(sealed: bytes, keyring: list[object]) -> None:
    count("sealed: results")
    try:
        output = open_result(tuple(keyring), "t", "node-a", 0, sealed)  # type: ignore[arg-type]
    except DecryptionFailed:
        return
    assert (output, sealed) == (b"output", RESULT)
    assert ALICE in keyring
