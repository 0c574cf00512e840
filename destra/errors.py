"""The one error hierarchy. The CLI catches ``DestraError`` once and prints it."""

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


class IncompatibleSchema(DestraError):
    """A schema change would break readers or writers of an earlier version."""


class DeliveryFailed(DestraError):
    """The broker did not acknowledge a produced event."""

    retryable = True
