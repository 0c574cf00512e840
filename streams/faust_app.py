"""The Faust app factory and the Avro event codec Faust agents read and write with.

The allocator and the verifier are Faust agents. They speak the same bytes as
every other client: the codec here is the single-object Avro codec of
``schemas``, registered with Faust under the name ``destra-avro``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import faust
from faust.serializers import codecs

from destra.errors import EventError
from destra.settings import Settings
from schemas import Event, decode, encode, new_event
from streams.topics import DEAD_LETTER

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


class DeadLetteringTopic(faust.Topic):
    """A topic whose undecodable records go to the dead-letter topic, not into a crash.

    Faust's default re-raises a value decode error inside the agent, which stops
    it. Here the record is written, with the reason and its original bytes, to
    the dead-letter topic and the agent goes on. Faust has already acknowledged
    the bad record when this runs; the letter is awaited before the next record
    is handled, so only a crash in that window can lose it from the letters (the
    original stays in its own topic).
    """

    def __init__(self, *args: Any, settings: Settings, **kwargs: Any) -> None:
        self.settings = settings
        super().__init__(*args, **kwargs)

    def _clone_args(self) -> Mapping[str, Any]:
        # Agents work on clones of their topic; the clone must keep the settings.
        return {**super()._clone_args(), "settings": self.settings}

    async def on_value_decode_error(self, exc: Exception, message: Any) -> None:
        """Dead-letter the record instead of raising in the agent."""
        cause = exc.__cause__ if isinstance(exc.__cause__, EventError) else exc
        letter = new_event(
            "DeadLettered",
            self.settings.producer_id,
            source_topic=message.topic,
            source_partition=message.partition,
            source_offset=message.offset,
            key=message.key,
            value=message.value or b"",
            reason=str(cause)[:2000],
            error=type(cause).__name__,
        )
        dead_letters = self.app.topic(DEAD_LETTER.name(self.settings.topic_prefix),
                                      value_serializer=CODEC_NAME, key_serializer="raw")
        sent = await dead_letters.send(key=message.topic.encode(), value=letter)
        await sent


def topic(app: faust.App, settings: Settings, suffix: str) -> faust.TopicT:
    """A catalogue topic as a Faust topic carrying ``Event`` values, dead-lettering bad ones."""
    return DeadLetteringTopic(app, topics=[settings.topic_prefix + suffix], settings=settings,
                              value_serializer=CODEC_NAME, key_serializer="raw")
