"""The genesis file and the authority table: only the right service key makes an authority event."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from destra.crypto import KeyPair, sign_event
from destra.errors import ConfigError, UnauthenticatedEvent
from destra.settings import Settings
from schemas import decode, encode, new_event
from schemas.samples import sample_event
from streams.authority import (
    AUTHORITY,
    ROLES,
    Genesis,
    ServiceSigner,
    ensure_genesis,
    held_signers,
    key_path,
    load_signer,
    signers_by_event,
)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home")


@pytest.fixture
def genesis(settings: Settings) -> Genesis:
    return ensure_genesis(settings.genesis_path, settings.service_keys)


def _signer(settings: Settings, genesis: Genesis, role: str) -> ServiceSigner:
    return load_signer(settings.service_keys, role, genesis)


def test_the_genesis_names_a_key_per_role_and_the_private_keys_are_the_owners_only(
        settings: Settings, genesis: Genesis) -> None:
    assert settings.genesis_path == settings.home / "genesis.json"
    assert Genesis.load(settings.genesis_path) == genesis
    for role in ROLES:
        mode = stat.S_IMODE(key_path(settings.service_keys, role).stat().st_mode)
        assert mode == 0o600
        assert KeyPair.load(key_path(settings.service_keys, role)).signing_public == \
            genesis.keys[role]
    # Never rewritten: a second call reads the same network identity.
    assert ensure_genesis(settings.genesis_path, settings.service_keys) == genesis


def test_every_authority_event_signed_by_its_role_is_accepted_after_the_wire(
        settings: Settings, genesis: Genesis) -> None:
    signers = signers_by_event(held_signers(settings.service_keys, genesis))
    assert set(signers) == set(AUTHORITY)
    for name, signer in signers.items():
        event = signer.sign(sample_event(name))
        assert genesis.check(event) is None
        assert genesis.check(decode(encode(event))) is None


def test_an_unsigned_authority_event_is_refused_with_the_role_it_needs(genesis: Genesis) -> None:
    assert genesis.check(sample_event("TaskVerified")) == (
        "unsigned-authority-event: TaskVerified must be signed by the verifier")
    assert genesis.check(sample_event("TaskFailed")) == (
        "unsigned-authority-event: TaskFailed must be signed by the allocator, verifier "
        "or ledger")
    with pytest.raises(UnauthenticatedEvent, match="TokensMinted must be signed by the treasury"):
        genesis.require(sample_event("TokensMinted"))


def test_a_random_key_signing_as_the_role_is_a_bad_signature(genesis: Genesis) -> None:
    forged = sign_event(sample_event("TokensMinted"), KeyPair.generate(), "treasury")
    reason = genesis.check(decode(encode(forged)))
    assert reason is not None and reason.startswith("bad-signature: TokensMinted")


def test_another_roles_key_or_an_outside_party_cannot_sign_for_a_role(
        settings: Settings, genesis: Genesis) -> None:
    allocator = _signer(settings, genesis, "allocator")
    as_allocator = sign_event(sample_event("TaskVerified"), allocator.keys, "allocator")
    assert genesis.check(as_allocator).startswith("wrong-signer: TaskVerified signed as")
    posing = sign_event(sample_event("TaskVerified"), allocator.keys, "verifier")
    assert genesis.check(posing).startswith("bad-signature")
    with pytest.raises(ConfigError, match="the allocator may not emit TaskVerified"):
        allocator.sign(sample_event("TaskVerified"))


def test_task_failed_may_come_from_the_allocator_the_verifier_or_the_ledger(
        settings: Settings, genesis: Genesis) -> None:
    for role in ("allocator", "verifier", "ledger"):
        assert genesis.check(_signer(settings, genesis, role).sign(
            sample_event("TaskFailed"))) is None


def test_outside_parties_events_are_not_the_genesis_business(genesis: Genesis) -> None:
    for name in ("TaskSubmitted", "ResultCommitted", "NodeRegistered", "DeadLettered"):
        assert genesis.check(sample_event(name)) is None


def test_a_tampered_signed_event_is_refused(settings: Settings, genesis: Genesis) -> None:
    data = encode(_signer(settings, genesis, "treasury").sign(
        new_event("TokensMinted", "treasury", account="mallory", amount_micro=10,
                  reason="faucet")))
    tampered = data.replace(b"mallory", b"malloxy")
    assert genesis.check(decode(tampered)).startswith("bad-signature")


def test_a_key_that_is_not_the_genesis_ones_cannot_be_loaded_as_a_signer(
        settings: Settings, genesis: Genesis, tmp_path: Path) -> None:
    KeyPair.generate().save(key_path(tmp_path / "other", "treasury"))
    with pytest.raises(ConfigError, match="not the one the genesis file names"):
        load_signer(tmp_path / "other", "treasury", genesis)
    with pytest.raises(ConfigError, match="no pricing key"):
        load_signer(tmp_path / "other", "pricing", genesis)
    assert [s.role for s in held_signers(tmp_path / "nothing", genesis)] == []


def test_a_missing_or_malformed_genesis_is_a_clear_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no readable genesis file"):
        Genesis.load(tmp_path / "genesis.json")
    (tmp_path / "genesis.json").write_text('{"format": "destra-genesis/1", "keys": {}}')
    with pytest.raises(ConfigError, match="missing"):
        Genesis.load(tmp_path / "genesis.json")


def test_settings_name_the_genesis_and_the_service_keys(tmp_path: Path) -> None:
    s = Settings.from_env({"DESTRA_HOME": str(tmp_path), "DESTRA_GENESIS": "/etc/g.json",
                           "DESTRA_SERVICE_KEYS": "/srv/keys"})
    assert s.genesis_path == Path("/etc/g.json") and s.service_keys == Path("/srv/keys")
    s = Settings.from_env({"DESTRA_HOME": str(tmp_path)})
    assert s.genesis_path == tmp_path / "genesis.json"
    assert s.service_keys == tmp_path / "services"


def test_a_genesis_made_before_a_role_existed_gains_that_role_once(settings: Settings) -> None:
    genesis = ensure_genesis(settings.genesis_path, settings.service_keys)
    older = json.loads(settings.genesis_path.read_text())
    del older["keys"]["governance"]  # as the file was before governance
    settings.genesis_path.write_text(json.dumps(older))
    # The governance key is in the key folder: the genesis gains that same key.
    assert ensure_genesis(settings.genesis_path, settings.service_keys) == genesis
    # Not there either: a new one is made; every other role keeps its key.
    key_path(settings.service_keys, "governance").unlink()
    settings.genesis_path.write_text(json.dumps(older))
    upgraded = ensure_genesis(settings.genesis_path, settings.service_keys)
    assert upgraded.keys["governance"] != genesis.keys["governance"]
    assert {r: k for r, k in upgraded.keys.items() if r != "governance"} == {
        r: k for r, k in genesis.keys.items() if r != "governance"}
    assert Genesis.load(settings.genesis_path) == upgraded
