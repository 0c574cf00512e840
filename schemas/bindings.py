"""What an outside party signs or commits to beyond its own events: its account's keys, an
operator's consent to stake a node, a submitter's commitment to a task's data key.

* **Account registration.** ``AccountRegistered`` signed by the signing key it registers
  (proof of possession), with ``signer`` = the account id.
* **Stake consent.** The operator's Ed25519 signature over ``destra/stake-consent/1``,
  the network (its topic prefix), the operator, the node, the node's signing key and the
  amount: the ledger locks a node's stake from its operator's account only with it,
  checked against the key the operator's account registered. Bound to all of them, a
  consent cannot stake another node, another amount, or on another network.
* **Data-key commitment.** SHA-256 over ``destra/data-key-commitment/1``, the task id
  and the data key, carried in the signed submission: a node handed a key that does not
  match it can show so (``open_refused_grant``).
* **Ballot context.** ``destra/ballot/1``, the network, the proposal and the voter: what a
  secret ballot's proof of validity is bound to (``governance.ballot``), so a ballot
  copied to another voter, proposal or network fails its proof.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from schemas.errors import ConfigError
from schemas.events import Event, new_event
from schemas.signatures import KeyPair, sign_event, verify

STAKE_CONSENT = "destra/stake-consent/1"
DATA_KEY_COMMITMENT = "destra/data-key-commitment/1"
BALLOT = "destra/ballot/1"


def _joined(*parts: str | int | bytes) -> bytes:
    """Length-prefixed parts: no two different part lists give the same bytes."""
    out = bytearray()
    for part in parts:
        raw = part if isinstance(part, bytes) else str(part).encode()
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def account_registration(account: str, keys: KeyPair, producer_id: str | None = None,
                         occurred_at: int | None = None) -> Event:
    """The signed ``AccountRegistered`` binding ``account`` to ``keys``."""
    return sign_event(new_event("AccountRegistered", producer_id or account,
                                occurred_at=occurred_at, account_id=account,
                                signing_key=keys.signing_public,
                                encryption_key=keys.encryption_public), keys, account)


def ballot_context(network: str, proposal_id: str, voter_id: str) -> bytes:
    """What a secret ballot's proof is bound to (``governance.ballot.cast``)."""
    return _joined(BALLOT, network, proposal_id, voter_id)


def stake_consent_message(network: str, operator_id: str, node_id: str,
                          node_signing_key: bytes, stake_micro: int) -> bytes:
    """The bytes an operator signs to let ``node_id`` lock ``stake_micro`` of its tokens."""
    return _joined(STAKE_CONSENT, network, operator_id, node_id, node_signing_key, stake_micro)


def sign_stake_consent(operator_keys: KeyPair, network: str, operator_id: str, node_id: str,
                       node_signing_key: bytes, stake_micro: int) -> bytes:
    """The operator's consent (64 bytes) for ``NodeRegistered.operator_consent``."""
    return operator_keys.sign(stake_consent_message(network, operator_id, node_id,
                                                    node_signing_key, stake_micro))


CONSENT_FORMAT = "destra-stake-consent/1"


@dataclass(frozen=True)
class StakeConsent:
    """An operator's consent to stake a node, as a file the operator sends the node's
    machine (``destra node consent``): public, no secret in it. The node's registration
    carries ``signature`` as ``operator_consent``; the ledger checks it against the
    operator account's registered key, ``operator_key`` here only lets the node's
    machine catch a damaged file early."""

    network: str
    operator_id: str
    node_id: str
    node_signing_key: bytes
    stake_micro: int
    operator_key: bytes
    signature: bytes

    @classmethod
    def sign(cls, operator_keys: KeyPair, network: str, operator_id: str, node_id: str,
             node_signing_key: bytes, stake_micro: int) -> StakeConsent:
        """The operator's consent, signed with its account's keys."""
        return cls(network, operator_id, node_id, node_signing_key, stake_micro,
                   operator_keys.signing_public,
                   sign_stake_consent(operator_keys, network, operator_id, node_id,
                                      node_signing_key, stake_micro))

    def to_json(self) -> str:
        """The consent file's text."""
        return json.dumps({"format": CONSENT_FORMAT, "network": self.network,
                           "operator_id": self.operator_id, "node_id": self.node_id,
                           "node_signing_key": self.node_signing_key.hex(),
                           "stake_micro": self.stake_micro,
                           "operator_key": self.operator_key.hex(),
                           "signature": self.signature.hex()}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> StakeConsent:
        """Read a consent file; a malformed one, or one whose signature does not verify
        under its own operator key, is a ``ConfigError``."""
        try:
            raw: Any = json.loads(text)
            if not isinstance(raw, dict) or raw.get("format") != CONSENT_FORMAT:
                raise ValueError(f"not a {CONSENT_FORMAT} file")
            network, operator_id, node_id = (raw[k] for k in ("network", "operator_id",
                                                              "node_id"))
            if not all(isinstance(v, str) for v in (network, operator_id, node_id)):
                raise ValueError("network, operator_id and node_id must be strings")
            stake = raw["stake_micro"]
            if isinstance(stake, bool) or not isinstance(stake, int) or stake <= 0:
                raise ValueError(f"stake_micro must be a positive integer, got {stake!r}")
            consent = cls(network, operator_id, node_id, bytes.fromhex(raw["node_signing_key"]),
                          stake, bytes.fromhex(raw["operator_key"]),
                          bytes.fromhex(raw["signature"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"unreadable stake consent: {e}") from e
        message = stake_consent_message(consent.network, consent.operator_id, consent.node_id,
                                        consent.node_signing_key, consent.stake_micro)
        if not verify(consent.operator_key, message, consent.signature):
            raise ConfigError("the stake consent's signature does not verify under its "
                              "operator key: the file is damaged or forged")
        return consent

    def check_for(self, network: str, operator_id: str, node_id: str,
                  node_signing_key: bytes, stake_micro: int) -> None:
        """Refuse (``ConfigError``) a consent given for another network, operator, node,
        node key or amount: the ledger would refuse the stake."""
        wanted = {"network": network, "operator": operator_id, "node": node_id,
                  "node signing key": node_signing_key.hex(), "stake": stake_micro}
        have = {"network": self.network, "operator": self.operator_id, "node": self.node_id,
                "node signing key": self.node_signing_key.hex(), "stake": self.stake_micro}
        wrong = [f"{k} {have[k]!r}, not {wanted[k]!r}" for k in wanted if have[k] != wanted[k]]
        if wrong:
            raise ConfigError("the stake consent is for another " + "; ".join(wrong))


def stake_consent_valid(registration: Event, network: str, operator_key: bytes) -> bool:
    """Whether a ``NodeRegistered`` carries its operator's consent to its stake, signed
    by ``operator_key`` (the operator account's registered key) for ``network``."""
    f = registration.fields
    consent = f.get("operator_consent") or b""
    return verify(operator_key, stake_consent_message(
        network, f["operator_id"], f["node_id"], f["signing_key"], f["stake_micro"]), consent)


def data_key_commitment(task_id: str, data_key: bytes) -> bytes:
    """The submitter's commitment to a task's data key (32 bytes)."""
    return hashlib.sha256(_joined(DATA_KEY_COMMITMENT, task_id, data_key)).digest()


OPERATIONS = ("TRANSFER", "STAKE", "UNSTAKE", "WITHDRAW")
"""What an ``AccountOperation`` does (``ledger.decider``)."""


def account_operation(account: str, keys: KeyPair, nonce: int, operation: str, target: str,
                      amount_micro: int = 0, memo: str = "",
                      occurred_at: int | None = None) -> Event:
    """An account's signed ``AccountOperation`` (signer = the account): a transfer to
    ``target`` (an account), or a stake, unstake or withdrawal on ``target`` (a node it
    operates). ``nonce`` must exceed every nonce the account used before."""
    if operation not in OPERATIONS:
        raise ConfigError(f"unknown operation {operation!r}; one of {', '.join(OPERATIONS)}")
    return sign_event(new_event("AccountOperation", account, occurred_at=occurred_at,
                                account=account, nonce=nonce, operation=operation,
                                target=target, amount_micro=amount_micro, memo=memo),
                      keys, account)
