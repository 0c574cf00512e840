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
"""

from __future__ import annotations

import hashlib

from schemas.events import Event, new_event
from schemas.signatures import KeyPair, sign_event, verify

STAKE_CONSENT = "destra/stake-consent/1"
DATA_KEY_COMMITMENT = "destra/data-key-commitment/1"


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


def stake_consent_message(network: str, operator_id: str, node_id: str,
                          node_signing_key: bytes, stake_micro: int) -> bytes:
    """The bytes an operator signs to let ``node_id`` lock ``stake_micro`` of its tokens."""
    return _joined(STAKE_CONSENT, network, operator_id, node_id, node_signing_key, stake_micro)


def sign_stake_consent(operator_keys: KeyPair, network: str, operator_id: str, node_id: str,
                       node_signing_key: bytes, stake_micro: int) -> bytes:
    """The operator's consent (64 bytes) for ``NodeRegistered.operator_consent``."""
    return operator_keys.sign(stake_consent_message(network, operator_id, node_id,
                                                    node_signing_key, stake_micro))


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
