"""The one error hierarchy. The CLI catches ``DestraError`` once and prints it.

It lives in the bottom layer so that every layer can raise it; ``destra.errors``
re-exports it, the name most of the code base imports it by.
"""

from __future__ import annotations


class DestraError(Exception):
    """Base of every error Destra raises on purpose.

    ``retryable`` says whether trying the same thing again may succeed.
    """

    retryable: bool = False


class ConfigError(DestraError):
    """A setting or flag is missing or malformed."""


class InfraError(DestraError):
    """A local service (Kafka, Postgres) failed to start, stop or answer."""

    retryable = True


class EventError(DestraError):
    """An event could not be encoded, decoded or validated."""


class CorruptEvent(EventError):
    """The bytes are not a well-formed Avro single-object encoded event."""


class UnknownSchema(EventError):
    """The event's schema fingerprint is not one this build knows."""


class InvalidEvent(EventError):
    """The event decoded but a value breaks its schema or its declared range."""


class UnauthenticatedEvent(EventError):
    """An event only a network service may emit is unsigned, or not signed by a role and
    key the genesis file allows for its type."""


class IncompatibleSchema(DestraError):
    """A schema change would break readers or writers of an earlier version."""


class DeliveryFailed(DestraError):
    """The broker did not acknowledge a produced event."""

    retryable = True


class InvalidParams(DestraError):
    """A workload parameter is unknown, malformed or outside its declared bounds."""


class UnknownWorkload(DestraError):
    """No workload is registered under the requested name."""


class WorkloadFailed(DestraError):
    """A workload ran but produced no valid output (NaN or infinity: the run diverged)."""


class InvalidQuorum(DestraError):
    """A task's replicas and quorum cannot give a safe verdict.

    Safe means ``replicas >= quorum > replicas / 2``: two disjoint quorums can
    never both agree, so at most one digest can ever be accepted.
    """


class QuoteExpired(DestraError):
    """A price quote was used after it lapsed; ask for a new quote (the same one never works)."""


class UnknownTier(DestraError):
    """A price tier that the network does not sell (known: consumer, prosumer, datacenter)."""


class NoCapacity(DestraError):
    """No set of eligible nodes can take every replica of a task now; capacity may free up later."""

    retryable = True


class InvalidRequest(DestraError):
    """A quote or placement request carries a value out of range (units, replicas, ttl)."""


class DecryptionFailed(DestraError):
    """A ciphertext did not open: wrong key, wrong context (task, node) or tampering."""


class KeystoreError(ConfigError):
    """A keystore is missing, malformed, or the passphrase is wrong or not given."""


class StateError(DestraError):
    """A processor's stored state cannot be restored: not a snapshot, or not signed by the
    service's own key (refused rather than trusted)."""
