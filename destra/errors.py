"""The one error hierarchy, defined in ``schemas.errors`` (the bottom layer) and named here."""

from __future__ import annotations

from schemas.errors import (
    ConfigError,
    CorruptEvent,
    DecryptionFailed,
    DeliveryFailed,
    DestraError,
    EventError,
    IncompatibleSchema,
    InfraError,
    InvalidEvent,
    InvalidParams,
    InvalidQuorum,
    InvalidRequest,
    KeystoreError,
    NoCapacity,
    QuoteExpired,
    UnauthenticatedEvent,
    UnknownSchema,
    UnknownTier,
    UnknownWorkload,
    WorkloadFailed,
)

__all__ = [
    "ConfigError",
    "CorruptEvent",
    "DecryptionFailed",
    "DeliveryFailed",
    "DestraError",
    "EventError",
    "IncompatibleSchema",
    "InfraError",
    "InvalidEvent",
    "InvalidParams",
    "InvalidQuorum",
    "InvalidRequest",
    "KeystoreError",
    "NoCapacity",
    "QuoteExpired",
    "UnauthenticatedEvent",
    "UnknownSchema",
    "UnknownTier",
    "UnknownWorkload",
    "WorkloadFailed",
]
