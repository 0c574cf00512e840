"""The passphrase-encrypted keystore and ``destra keys``."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from destra import crypto, keystore
from destra.crypto import KeyPair
from destra.errors import ConfigError, DecryptionFailed, KeystoreError
from destra.keys_cli import keys as keys_group
from destra.settings import Settings

N = 2**14
PASS = b"correct horse battery staple"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "accounts" / "alice.json"


def _edit(path: Path, change: dict[str, object]) -> None:
    data = json.loads(path.read_text())
    data.update(change)
    path.write_text(json.dumps(data))


def test_round_trip(path: Path) -> None:
    original = KeyPair.generate()
    created = keystore.create(path, PASS, original, n=N)
    loaded = keystore.load(path, PASS)
    assert created.current == loaded.current == original
    assert loaded.previous == () and loaded.all() == (original,)
    data = json.loads(path.read_text())
    assert data["format"] == "destra-keystore" and data["version"] == 1
    assert data["kdf"]["name"] == "scrypt" and data["kdf"]["n"] == N
    assert len(bytes.fromhex(data["kdf"]["salt"])) == 16
    assert data["public"] == {"signing": original.signing_public.hex(),
                              "encryption": original.encryption_public.hex()}
    info = keystore.public_keys(path)
    assert info["signing"] == original.signing_public.hex()
    assert info["encryption"] == original.encryption_public.hex()
    assert info["fingerprint"] == crypto.digest(original.signing_public).hex()[:16]
    assert info["previous_keys"] == 0 and info["encrypted"] is True


def test_wrong_passphrase_is_refused(path: Path) -> None:
    keystore.create(path, PASS, n=N)
    with pytest.raises(KeystoreError, match="wrong passphrase or corrupted keystore"):
        keystore.load(path, b"not it")


def test_tampered_sealed_bytes_are_refused(path: Path) -> None:
    keystore.create(path, PASS, n=N)
    sealed = bytearray(bytes.fromhex(json.loads(path.read_text())["sealed"]))
    sealed[-20] ^= 0x01
    _edit(path, {"sealed": bytes(sealed).hex()})
    with pytest.raises(KeystoreError, match="wrong passphrase or corrupted keystore"):
        keystore.load(path, PASS)


def test_swapped_public_header_is_refused(path: Path, tmp_path: Path) -> None:
    keystore.create(path, PASS, n=N)
    other = KeyPair.generate()
    # Another signing key: the associated data no longer matches.
    _edit(path, {"public": {"signing": other.signing_public.hex(),
                            "encryption": json.loads(path.read_text())["public"]["encryption"]}})
    with pytest.raises(KeystoreError, match="wrong passphrase or corrupted keystore"):
        keystore.load(path, PASS)
    # Another encryption key only: caught by the header check.
    second = tmp_path / "second.json"
    keystore.create(second, PASS, n=N)
    header = json.loads(second.read_text())["public"]
    _edit(second, {"public": {**header, "encryption": other.encryption_public.hex()}})
    with pytest.raises(KeystoreError, match="wrong passphrase or corrupted keystore"):
        keystore.load(second, PASS)


def test_file_is_private_and_holds_no_secret_hex(path: Path) -> None:
    ring = keystore.create(path, PASS, n=N)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert ring.current.signing_seed.hex() not in text
    assert ring.current.encryption_secret.hex() not in text
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


def test_no_passphrase_in_the_environment() -> None:
    assert keystore.passphrase_from_env({}) is None
    with pytest.raises(KeystoreError, match="DESTRA_PASSPHRASE") as info:
        keystore.require_passphrase({})
    assert "DESTRA_PASSPHRASE_FILE" in str(info.value)
    assert keystore.require_passphrase({"DESTRA_PASSPHRASE": "pw"}) == b"pw"
    with pytest.raises(KeystoreError, match="empty"):
        keystore.require_passphrase({"DESTRA_PASSPHRASE": ""})


def test_empty_passphrase_is_refused(path: Path) -> None:
    with pytest.raises(KeystoreError, match="empty passphrase"):
        keystore.create(path, b"", n=N)
    assert not path.exists()


def test_passphrase_file_with_a_trailing_newline(path: Path, tmp_path: Path) -> None:
    secret_file = tmp_path / "pass.txt"
    secret_file.write_bytes(PASS + b"\n")
    passphrase = keystore.require_passphrase({"DESTRA_PASSPHRASE_FILE": str(secret_file)})
    assert passphrase == PASS
    keystore.create(path, passphrase, n=N)
    assert keystore.load(path, PASS).current == keystore.load(path, passphrase).current
    secret_file.write_bytes(PASS + b"\n\n")  # only one newline is stripped
    assert keystore.passphrase_from_env({"DESTRA_PASSPHRASE_FILE": str(secret_file)}) \
        == PASS + b"\n"
    missing = tmp_path / "missing.txt"
    with pytest.raises(KeystoreError, match="missing.txt"):
        keystore.passphrase_from_env({"DESTRA_PASSPHRASE_FILE": str(missing)})


def test_create_refuses_to_overwrite(path: Path) -> None:
    first = keystore.create(path, PASS, n=N)
    before = path.read_bytes()
    with pytest.raises(KeystoreError, match="already exists"):
        keystore.create(path, PASS, n=N)
    assert path.read_bytes() == before
    assert keystore.load_or_create(path, PASS).current == first.current


def test_load_of_a_missing_file(path: Path) -> None:
    with pytest.raises(KeystoreError, match="no keystore"):
        keystore.load(path, PASS)
    created = keystore.load_or_create(path, PASS, n=N)
    assert keystore.load(path, PASS).current == created.current


def test_rotate_keeps_the_old_key_for_old_messages(path: Path) -> None:
    old = keystore.create(path, PASS, n=N).current
    associated = crypto.associated_data("result", "task-1")
    message = crypto.seal_to(old.encryption_public, b"old result", associated)

    ring = keystore.rotate(path, PASS)
    assert ring.current != old and ring.previous == (old,)
    # The identity stays; only the encryption key is new.
    assert ring.current.signing_public == old.signing_public
    assert ring.current.encryption_public != old.encryption_public
    assert keystore.load(path, PASS) == ring
    assert crypto.open_sealed_to(ring.previous[0], message, associated) == b"old result"
    with pytest.raises(DecryptionFailed):
        crypto.open_sealed_to(ring.current, message, associated)
    data = json.loads(path.read_text())
    assert data["kdf"]["n"] == N
    assert data["previous_public"][0]["signing"] == old.signing_public.hex()
    assert data["previous_public"][0]["retired_at"] > 1_600_000_000_000
    assert keystore.public_keys(path)["previous_keys"] == 1

    again = keystore.rotate(path, PASS, b"a new passphrase")
    assert again.previous == (ring.current, old)
    with pytest.raises(KeystoreError, match="wrong passphrase"):
        keystore.load(path, PASS)
    assert keystore.load(path, b"a new passphrase") == again


def test_legacy_plaintext_file_is_upgraded_in_place(path: Path) -> None:
    legacy = KeyPair.generate()
    legacy.save(path)
    assert legacy.signing_seed.hex() in path.read_text()
    assert keystore.public_keys(path)["encrypted"] is False

    assert keystore.load(path, PASS, n=N).current == legacy
    text = path.read_text()
    assert legacy.signing_seed.hex() not in text and legacy.encryption_secret.hex() not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(text)["format"] == "destra-keystore"
    assert keystore.load(path, PASS).current == legacy
    with pytest.raises(KeystoreError, match="wrong passphrase"):
        keystore.load(path, b"another")


def test_paths_and_names(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    assert keystore.account_path(settings, "bob") == tmp_path / "accounts" / "bob.json"
    assert keystore.node_path(settings, "n1") == tmp_path / "nodes" / "n1" / "keys.json"
    for bad in ("", "..", "a/b"):
        with pytest.raises(ConfigError):
            keystore.account_path(settings, bad)


def test_cli_create_show_rotate(tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"DESTRA_HOME": str(tmp_path), "DESTRA_PASSPHRASE": PASS.decode(),
           "DESTRA_PASSPHRASE_FILE": None}
    path = tmp_path / "nodes" / "n1" / "keys.json"

    created = runner.invoke(keys_group, ["create", "--node", "n1"], env=env)
    assert created.exit_code == 0, created.output
    ring = keystore.load(path, PASS)
    assert ring.current.signing_public.hex() in created.output

    shown = runner.invoke(keys_group, ["show", "--node", "n1", "--json"], env=env)
    assert shown.exit_code == 0, shown.output
    info = json.loads(shown.output)
    assert info["node"] == "n1" and info["path"] == str(path)
    assert info["signing"] == ring.current.signing_public.hex()
    assert info["fingerprint"] == keystore.fingerprint(ring.current.signing_public)
    assert info["previous_keys"] == 0

    text = runner.invoke(keys_group, ["show", "--node", "n1"], env=env)
    assert text.exit_code == 0 and info["fingerprint"] in text.output
    assert ring.current.encryption_public.hex() in text.output

    again = runner.invoke(keys_group, ["create", "--node", "n1"], env=env)
    assert isinstance(again.exception, KeystoreError)

    new_pass = tmp_path / "new-pass"
    new_pass.write_text("rotated passphrase\n")
    rotated = runner.invoke(keys_group, ["rotate", "--node", "n1", "--new-passphrase-file",
                                         str(new_pass), "--json"], env=env)
    assert rotated.exit_code == 0, rotated.output
    after = keystore.load(path, b"rotated passphrase")
    assert after.previous == (ring.current,)
    assert json.loads(rotated.output)["signing"] == after.current.signing_public.hex()
    assert json.loads(rotated.output)["previous_keys"] == 1


def test_cli_prompts_when_the_environment_has_no_passphrase(tmp_path: Path) -> None:
    env = {"DESTRA_HOME": str(tmp_path), "DESTRA_PASSPHRASE": None,
           "DESTRA_PASSPHRASE_FILE": None}
    result = CliRunner().invoke(keys_group, ["create", "--account", "carol"], env=env,
                                input="typed secret\ntyped secret\n")
    assert result.exit_code == 0, result.output
    assert "typed secret" not in result.output
    ring = keystore.load(tmp_path / "accounts" / "carol.json", b"typed secret")
    assert keystore.public_keys(tmp_path / "accounts" / "carol.json")["signing"] \
        == ring.current.signing_public.hex()


@pytest.mark.parametrize("args", [["show"], ["show", "--account", "a", "--node", "b"]])
def test_cli_needs_exactly_one_owner(tmp_path: Path, args: list[str]) -> None:
    result = CliRunner().invoke(keys_group, args, env={"DESTRA_HOME": str(tmp_path)})
    assert result.exit_code == 2
    assert "exactly one of --account" in result.output


def test_cli_show_of_a_missing_keystore(tmp_path: Path) -> None:
    result = CliRunner().invoke(keys_group, ["show", "--account", "nobody"],
                                env={"DESTRA_HOME": str(tmp_path)})
    assert isinstance(result.exception, KeystoreError)
    assert not os.path.exists(tmp_path / "accounts")
