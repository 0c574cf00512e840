"""Fuzzing the keystore file (``destra.keystore``): random files, mutated JSON values,
mutated bytes, and authentic files (sealed under the right passphrase) whose secrets are
not what they should be. Loading, showing the public keys and rotating either work or
refuse with a ``KeystoreError`` (a ``DestraError``); nothing else escapes, and a refused
rotation leaves the file as it was.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from destra import crypto, keystore
from destra.errors import DestraError
from tests.support import account_keys
from tests.unit.fuzzing import count, mutated

PASSPHRASE = b"correct horse"
N = 16
"""A cheap scrypt cost: the fuzzing is about the file, not the key derivation."""
KEYS = account_keys("keystore-owner")
_DIR = Path(tempfile.mkdtemp(prefix="destra-fuzz-keystore-"))
_VALID = _DIR / "valid.json"
keystore.create(_VALID, PASSPHRASE, KEYS, n=N)
keystore.rotate(_VALID, PASSPHRASE)  # one previous key, so the lists are not empty
VALID_TEXT = _VALID.read_text()
VALID = json.loads(VALID_TEXT)

_JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(),
    st.sampled_from([2**64, -1, 0, 1, 2, 3, 16, 2**31, float("inf"), float("nan"), "", "00",
                     "zz", "scrypt", "aes-256-gcm", "destra-keystore", "1" * 64, [], {}]),
    st.text(max_size=20), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value in a JSON document."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _set(doc: Any, path: tuple[Any, ...], value: Any, delete: bool) -> Any:
    if not path:
        return value
    copy = json.loads(json.dumps(doc))
    parent = copy
    for step in path[:-1]:
        parent = parent[step]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return copy


@st.composite
def _mutated_documents(draw: st.DrawFn, doc: Any) -> str:
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        doc = _set(doc, path, draw(_JSON_VALUES), delete=bool(path) and draw(st.booleans()))
    return json.dumps(doc)


def _files() -> st.SearchStrategy[bytes]:
    return st.one_of(
        _mutated_documents(VALID).map(str.encode),
        mutated(VALID_TEXT.encode()),
        st.binary(max_size=200),
        st.sampled_from([b"", b"null", b"[]", b"{}", b"\xff\xfe", b'{"ed25519_seed": 1}',
                         b'{"ed25519_seed": "00"}']),
    )


def _try(path: Path, passphrase: bytes) -> None:
    """Each reader of the file: it works or refuses with a ``DestraError``."""
    for read in (lambda: keystore.public_keys(path),
                 lambda: keystore.load(path, passphrase, n=N)):
        try:
            read()
        except DestraError:
            pass
    before = path.read_bytes()
    try:
        keystore.rotate(path, passphrase)
    except DestraError:
        assert path.read_bytes() == before, "a refused rotation rewrote the keystore"


@given(_files(), st.sampled_from([PASSPHRASE, b"wrong", b"\x00"]))
@example(json.dumps({**VALID, "kdf": {**VALID["kdf"], "n": float("inf")}}).encode(), PASSPHRASE)
def test_a_keystore_file_is_read_or_refused_with_a_keystore_error(data: bytes,
                                                                   passphrase: bytes) -> None:
    count("keystore: files")
    path = _DIR / "fuzzed.json"
    path.write_bytes(data)
    _try(path, passphrase)


_SECRETS = st.one_of(
    st.just({"current": {"seed": KEYS.signing_seed.hex(),
                         "secret": KEYS.encryption_secret.hex()}, "previous": []}),
    _JSON_VALUES)


@st.composite
def _authentic(draw: st.DrawFn) -> str:
    """A file sealed under the right passphrase and bound to its header, whose sealed
    secrets are fuzzed: only its owner could write it, but it must not crash a reader."""
    secrets = draw(_SECRETS)
    if isinstance(secrets, dict) and draw(st.booleans()):
        path = draw(st.sampled_from(_paths(secrets)))
        secrets = _set(secrets, path, draw(_JSON_VALUES), delete=bool(path) and draw(
            st.booleans()))
    if draw(st.booleans()):
        secrets = {"current": {"seed": KEYS.signing_seed.hex(),
                               "secret": KEYS.encryption_secret.hex()},
                   "previous": [{"seed": KEYS.signing_seed.hex(),
                                 "secret": KEYS.encryption_secret.hex(),
                                 "retired_at": draw(_JSON_VALUES)}]}
    return _sealed(secrets)


def _sealed(secrets: Any) -> str:
    """The valid keystore with ``secrets`` sealed in it under the right passphrase."""
    doc = json.loads(json.dumps(VALID))
    salt = bytes.fromhex(doc["kdf"]["salt"])
    key = crypto.passphrase_key(PASSPHRASE, salt, N, doc["kdf"]["r"], doc["kdf"]["p"])
    plaintext = json.dumps(secrets).encode()
    doc["sealed"] = crypto.seal(key, plaintext, crypto.associated_data(
        "keystore", doc["public"]["signing"])).hex()
    return json.dumps(doc)


_OWN = {"seed": KEYS.signing_seed.hex(), "secret": KEYS.encryption_secret.hex()}


@given(_authentic())
@example(json.dumps({**VALID, "sealed": "00"}))
@example(_sealed({"current": _OWN, "previous": [{**_OWN, "retired_at": float("inf")}]}))
def test_an_authentic_keystore_with_malformed_secrets_is_refused(text: str) -> None:
    count("keystore: authentic files with fuzzed secrets")
    path = _DIR / "authentic.json"
    path.write_text(text)
    _try(path, PASSPHRASE)
