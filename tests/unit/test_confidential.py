"""Sealing, key wrapping, the task-input format, the blob store and replay/expiry checks."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from destra import crypto
from destra.blobs import BlobError, BlobStore, check, fetch, store_or_inline
from destra.confidential import (
    grant,
    merge_params,
    open_grant,
    open_input,
    open_result,
    seal_input,
    seal_result,
)
from destra.crypto import KeyPair
from destra.errors import ConfigError, DecryptionFailed, InvalidParams
from destra.freshness import Freshness
from destra.settings import Settings
from schemas import Event, new_event
from schemas.samples import with_fields
from workloads import WORKLOADS
from workloads.base import checks_first

ALICE, NODE, OTHER = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()


def test_a_sealed_payload_opens_only_with_its_key_and_its_context() -> None:
    key = crypto.new_data_key()
    sealed = crypto.seal(key, b"secret input", b"ctx")
    assert b"secret input" not in sealed and sealed[0] == 1
    assert crypto.open_sealed(key, sealed, b"ctx") == b"secret input"
    for wrong_key, ad, data in [(crypto.new_data_key(), b"ctx", sealed),
                                (key, b"other ctx", sealed),
                                (key, b"ctx", sealed[:-1] + bytes([sealed[-1] ^ 1])),
                                (key, b"ctx", b"\x02" + sealed[1:]),
                                (key, b"ctx", sealed[:20])]:
        with pytest.raises(DecryptionFailed):
            crypto.open_sealed(wrong_key, data, ad)


def test_a_sealed_payload_opens_in_pieces_given_out_only_once_authentic() -> None:
    key = crypto.new_data_key()
    sealed = crypto.seal(key, b"abcdef", b"ad")
    pieces = crypto.open_sealed_in_parts(key, sealed, b"ad",
                                         lambda read: [read(2), read(3), read(-1), read(5)])
    assert pieces == [b"ab", b"cde", b"f", b""]
    with pytest.raises(ValueError, match="4 bytes of plaintext left unread"):
        crypto.open_sealed_in_parts(key, sealed, b"ad", lambda read: read(2))

    def refuse(read: Callable[[int], bytes]) -> None:
        read(1)
        raise KeyError("what the bytes read so far parse to")

    with pytest.raises(KeyError):  # authentic: the parser's own error
        crypto.open_sealed_in_parts(key, sealed, b"ad", refuse)
    tampered = sealed[:-20] + bytes([sealed[-20] ^ 1]) + sealed[-19:]
    for parse in (refuse, lambda read: read(-1)):  # tampered: never what was parsed
        with pytest.raises(DecryptionFailed, match="authentication failed"):
            crypto.open_sealed_in_parts(key, tampered, b"ad", parse)
    with pytest.raises(DecryptionFailed, match="authentication failed"):
        crypto.open_sealed_in_parts(key, sealed, b"other", lambda read: read(-1))


def test_two_seals_of_the_same_plaintext_differ() -> None:
    key = crypto.new_data_key()
    assert crypto.seal(key, b"x", b"") != crypto.seal(key, b"x", b"")


def test_a_grant_opens_for_its_node_only_and_only_for_its_replica() -> None:
    key = crypto.new_data_key()
    g = grant("alice", "t1", "n1", 0, key, NODE.encryption_public)
    assert open_grant(NODE, g) == key
    with pytest.raises(DecryptionFailed):
        open_grant(OTHER, g)
    for relabelled in (with_fields(g, attempt=1), with_fields(g, node_id="n2"),
                       with_fields(g, task_id="t2")):
        with pytest.raises(DecryptionFailed):
            open_grant(NODE, relabelled)


def test_a_low_order_ephemeral_key_is_refused() -> None:
    g = grant("alice", "t1", "n1", 0, crypto.new_data_key(), NODE.encryption_public)
    with pytest.raises(DecryptionFailed):
        open_grant(NODE, with_fields(g, ephemeral_public_key=bytes(32)))


def test_a_result_opens_for_the_submitter_with_current_or_retired_keys() -> None:
    sealed = seal_result(ALICE.encryption_public, "t1", "n1", 0, b"output")
    assert open_result((OTHER, ALICE), "t1", "n1", 0, sealed) == b"output"
    with pytest.raises(DecryptionFailed, match="not sealed to any of this account's keys"):
        open_result((OTHER,), "t1", "n1", 0, sealed)
    with pytest.raises(DecryptionFailed):
        open_result((ALICE,), "t1", "n2", 0, sealed)  # another node's copy, relabelled


def test_the_task_input_is_bound_to_its_task() -> None:
    key, sealed = seal_input("t1", {"seed": "42"})
    assert open_input(key, "t1", sealed) == {"seed": "42"}
    with pytest.raises(DecryptionFailed):
        open_input(key, "t2", sealed)


def test_an_input_that_opens_but_is_not_a_task_input_is_invalid_params() -> None:
    key = crypto.new_data_key()
    from destra.confidential import payload_ad

    for plaintext in (b"not json", b'{"schema":"destra.task-input/1","task_id":"t1",'
                                   b'"params":{"seed":42}}', b"[]"):
        with pytest.raises(InvalidParams, match="not a destra.task-input/1 document"):
            open_input(key, "t1", crypto.seal(key, plaintext, payload_ad("t1")))



def test_large_values_travel_beside_the_json_and_older_json_inputs_still_open() -> None:
    from destra.confidential import FRAMED_MAGIC, RAW_VALUE_BYTES, payload_ad

    big = "QUJD" * (RAW_VALUE_BYTES // 2)  # base64 over the limit
    private = {"program": big, "input": big[:-4] + "RUY=", "seed": "7"}
    key, sealed = seal_input("t1", private)
    plaintext = crypto.open_sealed(key, sealed, payload_ad("t1"))
    assert plaintext.startswith(FRAMED_MAGIC) and big.encode() in plaintext
    assert open_input(key, "t1", sealed) == private
    # Small inputs stay plain JSON; a JSON input written by an older client still opens.
    small_key, small = seal_input("t1", {"seed": "7"})
    assert crypto.open_sealed(small_key, small, payload_ad("t1")).startswith(b"{")
    old = (b'{"params":{"input":"' + big.encode() + b'"},"schema":"destra.task-input/1",'
           b'"task_id":"t1"}')
    assert open_input(key, "t1", crypto.seal(key, old, payload_ad("t1"))) == {"input": big}
    # A frame whose lengths do not add up, or that names a value twice, is refused.
    head = plaintext[8:8 + int.from_bytes(plaintext[4:8], "little")]
    for bad in (plaintext[:-1], plaintext + b"x",
                FRAMED_MAGIC + len(head).to_bytes(4, "little") + head.replace(b'"seed"',
                                                                            b'"input"')):
        with pytest.raises(InvalidParams, match="not a destra.task-input/1 document"):
            open_input(key, "t1", crypto.seal(key, bad, payload_ad("t1")))

def test_byte_parameters_travel_as_the_bytes_their_base64_encodes_and_open_as_bytes(
        ) -> None:
    import base64

    from destra.confidential import RAW_VALUE_BYTES, payload_ad
    from workloads import get_workload

    program = get_workload("program")
    assert program.byte_names() == {"program", "input"}
    raw = bytes(range(256)) * (RAW_VALUE_BYTES // 64)
    text = base64.b64encode(raw).decode()
    private = {"program": text, "input": "not base64!" * 500, "seed": "7"}
    key, sealed = seal_input("t1", private, program.byte_names())
    opened = open_input(key, "t1", sealed)
    # The program's bytes, not their base64; text that is no base64 stays text (the
    # workload refuses it as before); other parameters are untouched.
    assert opened == {"program": raw, "input": private["input"], "seed": "7"}
    assert text.encode() not in crypto.open_sealed(key, sealed, payload_ad("t1"))
    assert len(sealed) < len(seal_input("t1", private)[1]) - len(text) // 5
    # The workload takes either form: bytes from the payload, base64 text elsewhere.
    spec = next(s for s in program.params if s.name == "program")
    assert spec.parse("program", raw) is raw and spec.parse("program", text) == text
    with pytest.raises(InvalidParams, match=r"longer than .* bytes; allowed: bytes"):
        spec.parse("program", b"x" * (spec.max_len * 3 // 4 + 1))
    # An entry of an unknown kind is refused.
    plaintext = crypto.open_sealed(key, sealed, payload_ad("t1"))
    forged = plaintext.replace(b'"bytes"]', b'"text!"]')
    with pytest.raises(InvalidParams, match="not a destra.task-input/1 document"):
        open_input(key, "t1", crypto.seal(key, forged, payload_ad("t1")))


def test_a_parameter_both_public_and_private_is_refused() -> None:
    assert merge_params({"n": "1"}, {"seed": "2"}) == {"n": "1", "seed": "2"}
    with pytest.raises(InvalidParams, match="'n' is both public and private"):
        merge_params({"n": "1"}, {"n": "2"})


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_a_workloads_cost_depends_on_its_public_parameters_only(name: str) -> None:
    w = WORKLOADS[name]
    public, private = w.split({s.name: str(s.default) for s in w.params})
    assert public and set(public) | set(private) == {s.name for s in w.params}
    # Change every private parameter to another allowed value: the cost stays.
    changed = {}
    for spec in w.params:
        if spec.name in private and spec.kind == "int":
            changed[spec.name] = str(spec.max if spec.default != spec.max else spec.min)
        elif spec.name in private and spec.kind == "float":
            changed[spec.name] = str(spec.max)
    if name == "sha256-search":
        changed["prefix"], changed["start"] = "ab" * 47, "0"
    full = w.validate({**public, **private, **changed})
    defaults = w.validate(public)
    assert w.compute_units(full) == w.compute_units(defaults)
    assert w.memory_mb(full) == w.memory_mb(defaults)


def test_blobs_are_named_by_their_hash_and_checked_on_read(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    ref = store.put(b"ciphertext")
    assert ref == "blob:sha256:" + crypto.digest(b"ciphertext").hex()
    assert store.put(b"ciphertext") == ref and store.get(ref) == b"ciphertext"
    store.files()[0].write_bytes(b"swapped")
    with pytest.raises(BlobError, match="corrupt"):
        store.get(ref)
    with pytest.raises(BlobError, match="not in the store"):
        store.get("blob:sha256:" + "0" * 64)
    with pytest.raises(BlobError, match="not a blob reference"):
        store.get("blob:sha256:../../etc/passwd")


def test_a_blob_checked_beside_the_work_replaces_its_result_or_error_when_corrupt(
        tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    sound, swapped = store.put(b"other"), store.put(b"ciphertext")
    next(p for p in store.files() if p.name in swapped).write_bytes(b"swapped")
    assert store.get(swapped, verify=False) == b"swapped"  # read as is, checked beside

    def work(ref: str, fail: bool) -> str:
        with checks_first([]) as checks:  # as the node runs a replica beside the check
            checks.append(pool.submit(check, ref, store.get(ref, verify=False)))
            if fail:
                raise InvalidParams("what the bytes decrypt to is refused")
            return "computed"

    with ThreadPoolExecutor(1) as pool:
        assert work(sound, fail=False) == "computed"
        with pytest.raises(InvalidParams):  # its own error, when the blob is sound
            work(sound, fail=True)
        for fail in (False, True):  # the corruption, whatever the work did
            with pytest.raises(BlobError, match="corrupt"):
                work(swapped, fail)


def test_a_large_blob_hashed_while_written_lands_under_its_name_and_nothing_else_stays(
        tmp_path: Path) -> None:
    from destra.blobs import HASH_BESIDE_BYTES

    store = BlobStore(tmp_path)
    data = os.urandom(HASH_BESIDE_BYTES + 1)
    ref = store.put(data)
    assert ref == "blob:sha256:" + crypto.digest(data).hex()
    assert store.put(data) == ref and store.get(ref) == data
    assert [p.name for p in store.files()] == [ref.rsplit(":", 1)[1]]
    assert sorted(p.name for p in tmp_path.iterdir()) == [ref.rsplit(":", 1)[1][:2]]


def test_a_large_input_is_sealed_in_pieces_straight_into_the_store(tmp_path: Path) -> None:
    import base64

    from destra.confidential import payload_ad, seal_input_to

    store = BlobStore(tmp_path)
    raw = os.urandom(3 * crypto.SEAL_CHUNK_BYTES + 7)  # several pieces and a partial one
    private = {"program": base64.b64encode(raw).decode(), "seed": "7"}
    key, inline, ref = seal_input_to(store, 1000, "t1", private, {"program"})
    assert inline is None and ref is not None
    sealed = store.get(ref)  # named by the hash of exactly what was written
    assert open_input(key, "t1", sealed) == {"program": raw, "seed": "7"}
    # the same format as sealing it whole: one-shot and piecewise plaintexts are equal
    whole_key, whole = seal_input("t1", private, {"program"})
    assert (crypto.open_sealed(key, sealed, payload_ad("t1"))
            == crypto.open_sealed(whole_key, whole, payload_ad("t1")))
    assert len(sealed) == len(whole)
    assert [p.name for p in store.files()] == [ref.rsplit(":", 1)[1]]
    # small enough: inline, nothing stored
    key, inline, ref = seal_input_to(store, 1000, "t2", {"seed": "7"})
    assert ref is None and inline is not None and open_input(key, "t2", inline) == {"seed": "7"}
    assert len(store.files()) == 1


def test_a_failing_piece_leaves_nothing_in_the_store(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)

    def pieces() -> Iterator[bytes]:
        yield b"x" * 1000
        raise OSError("the producer failed")

    with pytest.raises(OSError, match="producer failed"):
        store.put_chunks(pieces())
    assert store.files() == [] and [p for p in tmp_path.rglob("*") if p.is_file()] == []
    ref = store.put_chunks(iter([b"ab", b"", b"c"]))
    assert ref == "blob:sha256:" + crypto.digest(b"abc").hex() and store.get(ref) == b"abc"


def test_small_data_travels_inline_and_big_data_by_reference(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    assert store_or_inline(store, b"x" * 10, 10) == (b"x" * 10, None)
    inline, ref = store_or_inline(store, b"x" * 11, 10)
    assert inline is None and ref is not None and fetch(store, None, ref) == b"x" * 11
    with pytest.raises(BlobError, match="neither"):
        fetch(store, None, None)


def test_the_inline_limit_stays_under_the_broker_message_limit() -> None:
    with pytest.raises(ConfigError, match="inline_max_bytes"):
        Settings(inline_max_bytes=2_000_000).check()
    assert Settings.from_env({"DESTRA_INLINE_MAX_BYTES": "100"}).inline_max_bytes == 100


def _hb(occurred_at: int) -> Event:
    return new_event("NodeHeartbeat", "n1", node_id="n1", load_permille=0, free_slots=1,
                     seq=1).with_envelope(occurred_at=occurred_at)


def test_freshness_refuses_replays_within_the_window_and_stale_events_after_it() -> None:
    f = Freshness(max_age_ms=1000, max_skew_ms=100)
    e = _hb(10_000)
    assert f.refusal(e, 10_500) is None
    f.accept(e)
    assert str(f.refusal(e, 10_600)).startswith("replayed-event")
    f.prune(10_900)
    assert e.event_id in f.seen
    f.prune(11_001)  # expired: forgotten, and refused as stale instead
    assert e.event_id not in f.seen
    assert str(f.refusal(e, 11_001)).startswith("expired-event")
    assert "in the future" in str(f.refusal(_hb(20_000), 19_000))
