"""The Faust app factory and the Avro event codec Faust agents read and write with.

The allocator and the verifier are Faust agents. They speak the same bytes as
every other client: the codec here is the single-object Avro codec of
``schemas``, registered with Faust under the name ``destra-avro``.
"""

from __future__ import annotations

from typing import Any

import faust
from faust.serializers import codecs

from destra.settings import Settings
from schemas import Event, decode, encode

CODEC_NAME = "destra-avro"


class AvroEventCodec(codecs.Codec):
    """Faust codec: ``Event`` <-> Avro single-object encoded bytes."""

    def _dumps(self, obj: Any) -> bytes:
        if not isinstance(obj, Event):
            raise TypeError(f"{CODEC_NAME} encodes schemas.Event, not {type(obj).__name__}")
        return encode(obj)

    def _loads(self, s: bytes) -> Any:
        return decode(s)


def register_codec() -> None:
    """Make ``destra-avro`` available to Faust topics and agents (idempotent)."""
    codecs.register(CODEC_NAME, AvroEventCodec())


def make_app(settings: Settings, app_id: str, bootstrap: str, **options: Any) -> faust.App:
    """A Faust app wired to the network's broker, codec and replication settings."""
    register_codec()
    brokers = [f"kafka://{server}" for server in bootstrap.split(",")]
    defaults: dict[str, Any] = {
        "broker": brokers,
        "value_serializer": CODEC_NAME,
        "key_serializer": "raw",
        "store": "memory://",
        "web_enabled": False,
        "topic_replication_factor": settings.replication_factor,
        "producer_acks": -1,
        "consumer_auto_offset_reset": "earliest",
    }
    defaults.update(options)
    return faust.App(app_id, **defaults)


def topic(app: faust.App, settings: Settings, suffix: str) -> faust.TopicT:
    """A catalogue topic as a Faust topic carrying ``Event`` values."""
    return app.topic(settings.topic_prefix + suffix, value_serializer=CODEC_NAME,
                     key_serializer="raw")
