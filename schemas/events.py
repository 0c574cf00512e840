"""Events as Python values: the event type's name and its Avro record as plain data.

One mapping, no per-type classes: an event's ``fields`` are exactly the Avro
record (``envelope`` included), so decoding gives back an equal ``Event``.
Times are ``int`` milliseconds since the Unix epoch (UTC), ids are ``str``,
money is ``int`` micro-tokens, keys and digests are ``bytes``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from schemas.catalog import Catalog, default_catalog


@dataclass(frozen=True, slots=True)
class Event:
    """One event. Treat ``fields`` as read-only: use ``replace`` for a changed copy."""

    name: str
    """The event type, e.g. ``TaskSubmitted``."""
    fields: Mapping[str, Any]
    """The whole Avro record, ``envelope`` included."""
    raw: bytes | None = field(default=None, compare=False, repr=False, hash=False)
    """The single-object encoded bytes it was decoded from, exactly as written (None for
    an event built here). Signatures are checked over these bytes, never over a
    re-encoding; ``replace`` and ``with_envelope`` drop them."""

    @property
    def envelope(self) -> Mapping[str, Any]:
        """The metadata every event carries."""
        envelope: Mapping[str, Any] = self.fields["envelope"]
        return envelope

    @property
    def event_id(self) -> str:
        """The event's UUID, as text."""
        return str(self.envelope["event_id"])

    @property
    def occurred_at(self) -> int:
        """When the producer created it, in milliseconds since the Unix epoch (UTC)."""
        return int(self.envelope["occurred_at"])

    @property
    def producer_id(self) -> str:
        """Who produced it."""
        return str(self.envelope["producer_id"])

    @property
    def signature(self) -> bytes | None:
        """The outside party's signature, if any."""
        signature: bytes | None = self.envelope.get("signature")
        return signature

    @property
    def signer(self) -> str | None:
        """The id of the key that signed, if any."""
        signer: str | None = self.envelope.get("signer")
        return signer

    @property
    def body(self) -> dict[str, Any]:
        """The event's own fields, without the envelope."""
        return {k: v for k, v in self.fields.items() if k != "envelope"}

    def replace(self, **fields: Any) -> Event:
        """A copy with some of the event's own fields changed; the envelope stays."""
        if "envelope" in fields:
            raise TypeError("use with_envelope() to change the envelope")
        return Event(self.name, {**self.fields, **fields})

    def with_envelope(self, **changes: Any) -> Event:
        """A copy with envelope values changed (e.g. ``signature`` after signing)."""
        return Event(self.name, {**self.fields, "envelope": {**self.envelope, **changes}})


def now_ms() -> int:
    """The current time in milliseconds since the Unix epoch (UTC)."""
    return time.time_ns() // 1_000_000


def new_event(
    name: str,
    producer_id: str,
    /,
    *,
    event_id: str | None = None,
    occurred_at: int | None = None,
    signature: bytes | None = None,
    signer: str | None = None,
    catalog: Catalog | None = None,
    **fields: Any,
) -> Event:
    """A new event with a fresh envelope; omitted fields that have a default get it.

    Nothing is validated here: ``encode`` validates, so a bad event fails where
    it would leave the process.
    """
    catalog = catalog or default_catalog()
    envelope = {
        "event_id": event_id or str(uuid.uuid4()),
        "occurred_at": now_ms() if occurred_at is None else occurred_at,
        "producer_id": producer_id,
        "signature": signature,
        "signer": signer,
    }
    record = {"envelope": envelope}
    if name in catalog:
        record.update(catalog.defaults(name))
    record.update(fields)
    return Event(name, record)
