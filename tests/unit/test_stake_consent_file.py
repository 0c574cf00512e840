"""A remote node's stake: the operator signs its consent on its own machine (`destra node
consent`), the node's machine carries the file (`destra node run --consent`) and never the
operator's keystore. A consent for another node or another amount is refused, by the
node's machine before it registers and by the ledger, which checks it today."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from destra import keystore
from destra.cli import cli
from destra.crypto import KeyPair, sign_event
from destra.settings import Settings
from ledger.book import stake, user
from schemas import Event, new_event
from schemas.bindings import StakeConsent
from schemas.errors import ConfigError
from schemas.samples import sample_event, with_fields
from tests.support import account_keys, registration
from tests.unit.test_accounts import T0, _decider

NETWORK = "destra."


def _node(node: str, operator: str, stake_micro: int, consent: bytes) -> Event:
    keys = account_keys(node)
    return sign_event(with_fields(sample_event("NodeRegistered"), node_id=node,
                                  operator_id=operator, stake_micro=stake_micro,
                                  signing_key=keys.signing_public, operator_consent=consent),
                      keys, node)


def _file(node: str = "gpu-7", stake_micro: int = 4_000) -> StakeConsent:
    """A consent as the node's machine reads it back from the operator's file."""
    made = StakeConsent.sign(account_keys("op"), NETWORK, "op", node,
                             account_keys(node).signing_public, stake_micro)
    return StakeConsent.from_json(made.to_json())


def test_the_ledger_locks_the_stake_the_file_consents_to_and_nothing_else() -> None:
    d = _decider()
    d.network = NETWORK
    d.judge(registration("op"), T0)
    d.judge(new_event("TokensMinted", "treasury", occurred_at=T0, account="op",
                      amount_micro=10_000, reason="test"), T0)
    consent = _file()
    # Used for another node, or for another amount: refused, nothing locked.
    for reg in (_node("gpu-8", "op", 4_000, consent.signature),
                _node("gpu-7", "op", 5_000, consent.signature),
                _node("gpu-7", "op", 3_000, consent.signature)):
        out = d.judge(reg, T0)
        assert out.emit == []
        assert out.rejected[0].reason.startswith("no-stake-consent: ")
    assert d.book.balance(user("op")) == 10_000
    # As given: the stake is locked.
    out = d.judge(_node("gpu-7", "op", 4_000, consent.signature), T0)
    assert [e.fields["account"] for e in out.emit] == [user("op"), stake("gpu-7")]
    assert d.book.balance(stake("gpu-7")) == 4_000


def test_the_nodes_machine_refuses_a_consent_for_another_node_amount_key_or_network() -> None:
    consent = _file()
    node_key = account_keys("gpu-7").signing_public
    consent.check_for(NETWORK, "op", "gpu-7", node_key, 4_000)  # its own: accepted
    for args, what in [((NETWORK, "op", "gpu-8", node_key, 4_000), "node"),
                       ((NETWORK, "op", "gpu-7", node_key, 5_000), "stake"),
                       ((NETWORK, "op", "gpu-7", account_keys("x").signing_public, 4_000),
                        "node signing key"),
                       (("other.", "op", "gpu-7", node_key, 4_000), "network"),
                       ((NETWORK, "mallory", "gpu-7", node_key, 4_000), "operator")]:
        with pytest.raises(ConfigError, match=f"another .*{what}"):
            consent.check_for(*args)


def test_a_damaged_or_edited_consent_file_is_refused() -> None:
    good = json.loads(_file().to_json())
    for field, value in [("stake_micro", 40_000), ("node_id", "gpu-8"),
                         ("signature", "00" * 64), ("stake_micro", -1), ("stake_micro", True),
                         ("node_signing_key", "zz"), ("format", "other")]:
        with pytest.raises(ConfigError):
            StakeConsent.from_json(json.dumps({**good, field: value}))
    with pytest.raises(ConfigError):
        StakeConsent.from_json("not json")


def test_node_consent_signs_with_the_operators_keystore_and_writes_no_secret(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DESTRA_PASSPHRASE", "a long enough passphrase")
    monkeypatch.setenv("DESTRA_HOME", str(tmp_path))
    monkeypatch.delenv("DESTRA_TOPIC_PREFIX", raising=False)
    settings = Settings.from_env()
    operator = KeyPair.generate()
    keystore.create(keystore.account_path(settings, "op"), b"a long enough passphrase",
                    operator, n=2**10)
    node_key = account_keys("gpu-7").signing_public
    out = tmp_path / "gpu-7.consent.json"
    result = CliRunner().invoke(cli, ["node", "consent", "--node", "gpu-7", "--operator", "op",
                                      "--stake", "4000", "--node-key", node_key.hex(),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    consent = StakeConsent.from_json(out.read_text())
    assert (consent.network, consent.operator_id, consent.node_id, consent.stake_micro,
            consent.node_signing_key, consent.operator_key) == (
        NETWORK, "op", "gpu-7", 4_000, node_key, operator.signing_public)
    text = out.read_text()
    for secret in (operator.signing_seed, operator.encryption_secret):
        assert secret.hex() not in text
    # Without the node's key or its keystore here: told how to get it.
    missing = CliRunner().invoke(cli, ["node", "consent", "--node", "gpu-9", "--operator", "op",
                                       "--stake", "1"])
    assert missing.exit_code == 1 and "--node-key" in missing.output


def test_the_runner_registers_with_the_files_signature_only_when_it_fits() -> None:
    from types import SimpleNamespace

    from node_runner.runner import NodeConfig, NodeRunner

    consent = _file()
    node = SimpleNamespace(settings=Settings(topic_prefix=NETWORK), node_id="gpu-7",
                           keys=account_keys("gpu-7"))
    node.config = NodeConfig("gpu-7", "op", stake_micro=4_000, consent=consent)
    assert NodeRunner.stake_consent(node) == consent.signature  # type: ignore[arg-type]
    node.config = NodeConfig("gpu-7", "op", stake_micro=5_000, consent=consent)
    with pytest.raises(ConfigError, match="another stake"):
        NodeRunner.stake_consent(node)  # type: ignore[arg-type]
    node.node_id = "gpu-8"
    node.config = NodeConfig("gpu-8", "op", stake_micro=4_000, consent=consent)
    with pytest.raises(ConfigError, match="another node"):
        NodeRunner.stake_consent(node)  # type: ignore[arg-type]
