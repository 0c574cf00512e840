"""The Faust app factory and the Avro event codec Faust agents read and write with.

The allocator and the verifier are Faust agents. They speak the same bytes as
every other client: the codec here is the single-object Avro codec of
``schemas``, registered with Faust under the name ``destra-avro``. The
``Publisher`` signs the authority events a service emits with its role's key;
``install_service`` hands a handler only authority events the genesis accepts
and dead-letters the others (``streams.authority``).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import faust
from faust.serializers import codecs

from destra.errors import EventError
from destra.settings import Settings
from schemas import Event, decode, encode
from schemas.codec import encode_unchecked
from schemas.errors import ConfigError
from schemas.events import now_ms
from streams import security
from streams.authority import AUTHORITY, Genesis, ServiceSigner, held_signers, signers_by_event
from streams.consumer import letter
from streams.processing import Origin
from streams.topics import DEAD_LETTER, topic_for

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
    access = security.current()
    if access.secure:
        # SASL/SCRAM over TLS, trusting the network's CA, as every other client.
        context = ssl.create_default_context(cadata=access.ca_pem)
        defaults["broker_credentials"] = faust.SASLCredentials(
            username=access.username, password=access.password, ssl_context=context,
            mechanism=security.SCRAM_MECHANISM)
    defaults.update(options)
    app = faust.App(app_id, **defaults)
    if not defaults["web_enabled"]:
        # `faust worker` sets conf.web_enabled from --with-web (default on) and would bind
        # port 6066 on every interface; the boot strategy's own flag is checked first.
        app.boot_strategy.enable_web = False
    return app


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
        dead = letter(message.topic, message.partition, message.offset, message.key,
                      message.value or b"", str(cause), type(cause).__name__,
                      self.settings.producer_id)
        dead_letters = self.app.topic(DEAD_LETTER.name(self.settings.topic_prefix),
                                      value_serializer=CODEC_NAME, key_serializer="raw")
        sent = await dead_letters.send(key=message.topic.encode(), value=dead)
        await sent


def topic(app: faust.App, settings: Settings, suffix: str) -> faust.TopicT:
    """A catalogue topic as a Faust topic carrying ``Event`` values, dead-lettering bad ones."""
    return DeadLetteringTopic(app, topics=[settings.topic_prefix + suffix], settings=settings,
                              value_serializer=CODEC_NAME, key_serializer="raw")


def topics(app: faust.App, settings: Settings, *events: str) -> faust.TopicT:
    """One Faust topic reading every catalogue topic that carries one of ``events``."""
    names = sorted({topic_for(e).name(settings.topic_prefix) for e in events})
    return DeadLetteringTopic(app, topics=names, settings=settings,
                              value_serializer=CODEC_NAME, key_serializer="raw")


def origin_of(message: Any) -> Origin:
    """Where a Faust ``Message`` was (``streams.processing.Origin``)."""
    return Origin(message.topic, message.partition, message.offset, message.key)


def broker_ms(message: Any) -> int:
    """A Faust message's timestamp in milliseconds (the broker's on ``broker_time`` topics)."""
    return int(round(message.timestamp * 1000))


class Publisher:
    """Sends events from Faust agents to their catalogue topics, keyed as the catalogue says,
    signing each authority event with the service key ``signers`` maps its type to.

    ``signers`` None: the keys this operator holds under ``settings.service_keys``, each
    type signed by the first role of ``streams.authority.ROLES`` that may emit it (a
    worker should pass its own roles' signers). An authority event with no signer raises
    ``ConfigError``: unsigned, every consumer would refuse it.

    Events for ``tasks.assignments`` go to the partition ``partition_for`` gives
    their node, the only partition that node reads.
    """

    def __init__(self, app: faust.App, settings: Settings,
                 signers: Mapping[str, ServiceSigner] | None = None) -> None:
        self.app, self.settings = app, settings
        if signers is None:
            signers = signers_by_event(held_signers(
                settings.service_keys, Genesis.load(settings.genesis_path)))
        self.signers = dict(signers)
        self._topics: dict[str, faust.TopicT] = {}
        self.sent = 0

    def _topic(self, name: str) -> faust.TopicT:
        if name not in self._topics:
            self._topics[name] = self.app.topic(name, value_serializer=CODEC_NAME,
                                                key_serializer="raw")
        return self._topics[name]

    def sign(self, event: Event) -> Event:
        """``event`` signed by its type's service signer (other events as they are)."""
        if event.name not in AUTHORITY:
            return event
        signer = self.signers.get(event.name)
        if signer is None:
            raise ConfigError(f"no service key to sign {event.name}: this worker holds none "
                              f"of {', '.join(AUTHORITY[event.name])} (settings.service_keys)")
        return signer.sign(event)

    async def publish(self, events: Iterable[Event]) -> None:
        """Sign and send each event (awaiting its enqueueing, in order)."""
        for event in events:
            event = self.sign(event)
            spec = topic_for(event.name)
            key = str(event.fields[spec.key])
            partition = spec.partition_of(key)
            await self._topic(spec.name(self.settings.topic_prefix)).send(
                key=key.encode(), value=event, partition=partition)
            self.sent += 1

    async def reject(self, refused: list[tuple[Event, Any, str]], error: str = "Rejected") -> None:
        """Dead-letter events a handler refused, with the reason; empties the list.

        A refused event read from a topic is kept as the bytes it came as.
        """
        letters = []
        for event, origin, reason in refused:
            letters.append(letter(
                origin.topic if origin else "(none)", origin.partition if origin else 0,
                origin.offset if origin else 0, origin.key if origin else None,
                event.raw if event.raw is not None else encode_unchecked(event),
                reason, error, self.settings.producer_id))
        refused.clear()
        await self.publish(letters)


Handler = Callable[[Event, int, Any], list[Event]]
"""A service's reaction to one event: (event, broker time in ms, origin) -> events to publish."""


def install_service(app: faust.App, settings: Settings, name: str,
                    handlers: Mapping[str, Handler], rejected: list[tuple[Event, Any, str]],
                    on_tick: Callable[[int], list[Event]], publisher: Publisher,
                    tick_s: float = 0.25, genesis: Genesis | None = None) -> None:
    """Run a transport-free service as a Faust agent and a timer.

    The agent reads every topic carrying one of ``handlers``' event types,
    dead-letters an authority event the genesis refuses (default: the file
    ``settings.genesis_path``) before any handler sees it, calls the handler with
    the record's timestamp and origin, publishes what it returns and dead-letters
    whatever the service put in ``rejected``; the timer calls ``on_tick`` with the
    wall clock. Agent and timer share one event loop, so the service needs no locking.
    """
    genesis = genesis or Genesis.load(settings.genesis_path)

    @app.agent(topics(app, settings, *handlers), name=name)
    async def agent(stream: Any) -> None:
        async for record in stream.events():
            event = record.value
            handler = handlers.get(event.name)
            if handler is None:
                continue  # another event type sharing one of the topics
            refusal = genesis.check(event)
            if refusal is not None:
                await publisher.reject([(event, origin_of(record.message), refusal)],
                                       error="UnauthenticatedEvent")
                continue
            await publisher.publish(handler(event, broker_ms(record.message),
                                            origin_of(record.message)))
            if rejected:
                await publisher.reject(rejected)

    @app.timer(interval=tick_s, name=f"{name}-tick")
    async def tick() -> None:
        await publisher.publish(on_tick(now_ms()))
        if rejected:
            await publisher.reject(rejected)
