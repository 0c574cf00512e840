"""Where the network's tally key lives: the public half beside the genesis file, the shares
with the service keys.

``tally.json`` (public, next to ``genesis.json``) is what a voter's client encrypts to;
``tally-share-<i>.json`` (0600, one per trustee) in the service key folder. Made once,
by the first ``LocalNetwork`` or ``destra infra up`` that finds none, and never
rewritten: ballots already cast are encrypted to it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from governance.ballot import TallyKeyShare, TallyPublicKey, generate_tally_key
from schemas.errors import ConfigError

FORMAT = "destra-tally-key/1"
TRUSTEES = 3
DEFAULT_BITS = 2048


def public_path(genesis_path: Path) -> Path:
    """The public tally key's file: beside the genesis file."""
    return Path(genesis_path).with_name("tally.json")


def share_path(key_dir: Path, index: int) -> Path:
    """Trustee ``index``'s share of the tally key."""
    return Path(key_dir) / f"tally-share-{index}.json"


def ensure_tally_key(genesis_path: Path, key_dir: Path, bits: int | None = None) -> TallyPublicKey:
    """The network's tally key; made, and split among ``TRUSTEES``, when there is none."""
    path = public_path(genesis_path)
    if path.exists():
        return load_tally_key(genesis_path)
    bits = bits or int(os.environ.get("DESTRA_TALLY_BITS") or DEFAULT_BITS)
    key, shares = generate_tally_key(bits, TRUSTEES)
    Path(key_dir).mkdir(parents=True, exist_ok=True)
    for share in shares:
        target = share_path(key_dir, share.index)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(share.to_json())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "n": key.to_bytes().hex(),
                               "fingerprint": key.fingerprint()}, indent=2))
    os.replace(tmp, path)
    return key


def load_tally_key(genesis_path: Path) -> TallyPublicKey:
    """The public tally key of the network whose genesis file is ``genesis_path``."""
    path = public_path(genesis_path)
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}")
        return TallyPublicKey.from_bytes(bytes.fromhex(data["n"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: no readable tally key ({err}); get the network's "
                          "tally.json from its operator, beside genesis.json") from err


def load_tally_shares(key_dir: Path) -> list[TallyKeyShare]:
    """Every trustee share held in ``key_dir`` (all of them, in this release)."""
    return [TallyKeyShare.from_json(path.read_text())
            for path in sorted(Path(key_dir).glob("tally-share-*.json"))]
