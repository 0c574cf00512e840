"""The submitter's Python client: quotes, signed submissions, progress and verdicts.

    client = Client(settings, bootstrap, account="alice")
    quote = client.quote("nbody", {"bodies": "64"})
    task_id = client.submit(quote)
    verdicts = client.wait([task_id])

The account's Ed25519/X25519 keys live in ``$DESTRA_HOME/accounts/<account>.json``
(created on first use); the ledger binds the account to the first key it
submits with. Parameters are checked against the workload before anything is
sent, so a bad submission is a clear error here, not a dead task.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from allocator.pricing import PriceBook, PriceUpdate, Quote, check_quote, tier_of
from destra.crypto import KeyPair, sign_event
from destra.errors import DestraError, InvalidRequest
from destra.settings import Settings
from schemas import Event, decode, new_event
from schemas.events import now_ms
from streams.consumer import consumer_config, fetch
from streams.klog import KAFKA_LOG
from streams.producer import EventProducer
from streams.topics import topic_for
from workloads import get_workload

QUOTE_TTL_MS = 60_000
DEFAULT_DEADLINE_MS = 600_000
WATCHED = ("TaskAssigned", "ResultCommitted", "ResultRevealed", "TaskVerified", "TaskFailed")


@dataclass(frozen=True)
class TaskQuote:
    """A priced, validated task, ready to submit until ``quote.expires_at``."""

    workload: str
    params: dict[str, str]
    replicas: int
    quorum: int
    quote: Quote
    homogeneous: bool

    def as_dict(self) -> dict[str, Any]:
        """For ``--json`` output."""
        q = self.quote
        return {"workload": self.workload, "params": self.params, "replicas": self.replicas,
                "quorum": self.quorum, "tier": str(q.tier), "compute_units": q.compute_units,
                "price_micro": q.price_micro, "quote_id": q.quote_id,
                "expires_at": q.expires_at}


@dataclass
class Progress:
    """What the network has done with one task so far."""

    task_id: str
    assigned: int = 0
    committed: int = 0
    revealed: int = 0
    verdict: Event | None = None

    @property
    def state(self) -> str:
        """``queued``, ``running``, ``revealing``, ``verified`` or ``failed``."""
        if self.verdict is not None:
            return "verified" if self.verdict.name == "TaskVerified" else "failed"
        if self.revealed:
            return "revealing"
        return "running" if self.assigned else "queued"

    def as_dict(self) -> dict[str, Any]:
        """For ``--json`` output."""
        out: dict[str, Any] = {"task_id": self.task_id, "state": self.state,
                               "assigned": self.assigned, "committed": self.committed,
                               "revealed": self.revealed}
        if self.verdict is not None and self.verdict.name == "TaskVerified":
            v = self.verdict.fields
            out["digest"] = v["digest"].hex()
            out["contributions"] = [dict(c) for c in v["contributions"]]
        elif self.verdict is not None:
            out["reason"] = self.verdict.fields["reason"]
            out["detail"] = self.verdict.fields["detail"]
        return out


@dataclass
class Client:
    """One submitter account talking to a network."""

    settings: Settings
    bootstrap: str
    account: str
    keys: KeyPair = field(init=False)

    def __post_init__(self) -> None:
        if not self.account or len(self.account) > 128 or ":" in self.account:
            raise InvalidRequest(f"account {self.account!r}: 1 to 128 characters, no ':'")
        self.keys = KeyPair.load_or_create(
            self.settings.home / "accounts" / f"{self.account}.json")
        self._producer = EventProducer(self.settings, self.bootstrap)
        self._prices: PriceBook | None = None

    # -- quotes and submissions -------------------------------------------------------------

    def prices(self) -> PriceBook:
        """The network's prices: defaults, then every ``PriceUpdated`` on its topic."""
        if self._prices is None:
            book = PriceBook()
            for event in _read_topic(self.bootstrap, self._topic("PriceUpdated")):
                f = event.fields
                try:
                    book.apply(PriceUpdate(f["tier"], f["price_per_unit_micro"],
                                           f["effective_at"]))
                except DestraError:
                    continue
            self._prices = book
        return self._prices

    def quote(self, workload: str, params: Mapping[str, str], *, replicas: int = 3,
              quorum: int | None = None, tier: str = "consumer",
              ttl_ms: int = QUOTE_TTL_MS) -> TaskQuote:
        """Validate the task and price it; raises a ``DestraError`` saying what is wrong."""
        w = get_workload(workload)
        parsed = w.validate(params)
        quorum = replicas // 2 + 1 if quorum is None else quorum
        if not 1 <= replicas <= 15 or not replicas >= quorum > replicas / 2:
            raise InvalidRequest(f"{replicas} replicas with quorum {quorum}: replicas must be "
                                 "1..15 and the quorum a majority of them")
        quote = self.prices().quote(workload, w.compute_units(parsed), replicas, tier_of(tier),
                                    now_ms(), ttl_ms)
        return TaskQuote(workload, dict(params), replicas, quorum, quote, w.bit_exact)

    def submit(self, q: TaskQuote, *, max_price_micro: int | None = None,
               region: str | None = None, deadline_ms: int = DEFAULT_DEADLINE_MS,
               task_id: str | None = None, flush: bool = True) -> str:
        """Sign and send the submission; returns the task id.

        ``flush=False`` leaves it queued (call ``flush``): for submitting many at once.
        """
        check_quote(q.quote, now_ms())
        max_price = q.quote.price_micro if max_price_micro is None else max_price_micro
        if q.quote.price_micro > max_price:
            raise InvalidRequest(f"the quote is {q.quote.price_micro} micro-tokens, above your "
                                 f"max price {max_price}")
        task_id = task_id or f"task-{uuid.uuid4().hex[:20]}"
        event = new_event(
            "TaskSubmitted", self.settings.producer_id, task_id=task_id,
            submitter_id=self.account, workload=q.workload, params=q.params,
            replicas=q.replicas, quorum=q.quorum, compute_units=q.quote.compute_units,
            max_price_micro=max_price, quote_id=q.quote.quote_id,
            quoted_price_micro=q.quote.price_micro, quote_expires_at=q.quote.expires_at,
            tier=str(q.quote.tier), region=region, homogeneous=q.homogeneous,
            deadline_ms=deadline_ms, result_key=self.keys.encryption_public,
            payload_ref=None, payload=None, signing_key=self.keys.signing_public)
        self.send_signed(event, flush=flush)
        return task_id

    def send_signed(self, event: Event, flush: bool = True) -> None:
        """Sign ``event`` with the account's key and send it (flushed unless told not to)."""
        self._producer.send(sign_event(event, self.keys, self.account))
        if flush:
            self._producer.flush()

    def flush(self) -> None:
        """Wait until everything sent is acknowledged."""
        self._producer.flush()

    def sweep(self, params: Mapping[str, str], **options: Any) -> list[str]:
        """Fan a ``sweep`` out into one mlp-digits task per grid point; their task ids."""
        sweep = get_workload("sweep")
        points = sweep.expand(sweep.validate(params))  # type: ignore[attr-defined]
        replicas = options.pop("replicas", 3)
        tier = options.pop("tier", "consumer")
        return [self.submit(self.quote(name, raw, replicas=replicas, tier=tier), **options)
                for name, raw in points]

    # -- progress ---------------------------------------------------------------------------

    def watch(self) -> Watch:
        """Start watching before submitting, so no event about the task is missed."""
        return Watch(self.settings, self.bootstrap)

    def wait(self, task_ids: Iterable[str], *, watch: Watch | None = None,
             timeout_s: float = 600.0,
             on_progress: Callable[[Progress], None] | None = None) -> dict[str, Progress]:
        """Follow tasks until each has a verdict (or the timeout: ``DestraError``)."""
        own = watch is None
        watch = watch or Watch(self.settings, self.bootstrap, from_start=True)
        try:
            return watch.until_done(list(task_ids), timeout_s, on_progress)
        finally:
            if own:
                watch.close()

    def _topic(self, event: str) -> str:
        return topic_for(event).name(self.settings.topic_prefix)

    def close(self) -> None:
        """Flush what was sent."""
        self._producer.close()


class Watch:
    """Reads the task topics from now (or from the start) and tracks tasks' progress."""

    def __init__(self, settings: Settings, bootstrap: str, from_start: bool = False) -> None:
        self._consumer = Consumer(consumer_config(bootstrap, f"watch-{uuid.uuid4()}", {
            "enable.auto.commit": False, "logger": KAFKA_LOG}))
        topics = sorted({topic_for(e).name(settings.topic_prefix) for e in WATCHED})
        assignment = []
        for topic in topics:
            partitions = self._consumer.list_topics(topic, timeout=30).topics[topic].partitions
            for p in partitions:
                low, high = self._consumer.get_watermark_offsets(TopicPartition(topic, p),
                                                                 timeout=30)
                assignment.append(TopicPartition(topic, p, low if from_start else high))
        self._consumer.assign(assignment)
        self.progress: dict[str, Progress] = {}

    def _fold(self, event: Event) -> Progress | None:
        task_id = event.fields.get("task_id")
        if task_id is None:
            return None
        p = self.progress.setdefault(task_id, Progress(task_id))
        if event.name == "TaskAssigned":
            p.assigned += 1
        elif event.name == "ResultCommitted":
            p.committed += 1
        elif event.name == "ResultRevealed":
            p.revealed += 1
        elif event.name in ("TaskVerified", "TaskFailed") and p.verdict is None:
            p.verdict = event
        return p

    def until_done(self, task_ids: list[str], timeout_s: float,
                   on_progress: Callable[[Progress], None] | None = None
                   ) -> dict[str, Progress]:
        """Poll until every task in ``task_ids`` has a verdict."""
        wanted = set(task_ids)
        deadline = time.monotonic() + timeout_s
        while any(self.progress.get(t) is None or self.progress[t].verdict is None
                  for t in wanted):
            if time.monotonic() > deadline:
                pending = sorted(t for t in wanted if self.progress.get(t) is None
                                 or self.progress[t].verdict is None)
                raise DestraError(f"no verdict within {timeout_s:.0f}s for {len(pending)} "
                                  f"task(s), e.g. {pending[0]}")
            for msg in fetch(self._consumer, 500, 0.5):
                if msg.error() is not None:
                    continue
                try:
                    event = decode(msg.value() or b"")
                except DestraError:
                    continue
                p = self._fold(event)
                if p is not None and p.task_id in wanted and on_progress is not None:
                    on_progress(p)
        return {t: self.progress[t] for t in task_ids}

    def close(self) -> None:
        """Leave."""
        self._consumer.close()


def _read_topic(bootstrap: str, topic: str) -> list[Event]:
    """Every decodable event of a (small) topic, from its start to its end now."""
    from ledger.processor import read_all

    events = []
    for msg in read_all(bootstrap, topic):
        try:
            events.append(decode(msg.value() or b""))
        except DestraError:
            continue
    return events
