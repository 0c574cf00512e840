"""The contributor's process: keys, benchmark, registration, heartbeats, assignments, results.

    destra node run --name gpu-7 --region eu-west --stake 5000000

A node keeps an Ed25519 (signing) and X25519 (encryption) key pair in a
passphrase-encrypted keystore ``$DESTRA_HOME/nodes/<name>/keys.json`` (the
passphrase comes from ``DESTRA_PASSPHRASE`` or ``DESTRA_PASSPHRASE_FILE``),
measures its device with torch,
registers (a ``NodeRegistered`` signed with the key it registers, so the
claim proves possession of it), and then:

* reads only its own inbox topic (``streams.topics.inbox_spec``: the services and
  the submitters write each record of ``tasks.assignments`` addressed to it there
  too, and its principal may read no other node's), resuming from its committed
  position after a restart; on a network that made it no inbox (an older
  version) it reads its partition of ``tasks.assignments`` instead;
* for an encrypted task, waits for the submitter's signed ``DataKeyGranted``
  (checked against the submitter key in the assignment, refused when stale or
  replayed), unwraps the data key, opens the sealed input (inline or from the
  blob store) and merges its private parameters with the public ones; an input
  that opens but is not valid gives a deterministic error result, the same on
  every honest replica;
* runs each assigned replica on a thread, up to its slots, with PyTorch in
  deterministic mode, and publishes a signed ``ResultCommitted``
  (``H(salt, digest)`` bound to task, node and attempt);
* on ``RevealOpened`` publishes the signed ``ResultRevealed`` (salt, digest and
  the output sealed to the submitter's X25519 key, inline or in the blob store);
  a task its workload refuses (``workloads.base.WorkRefused``) is committed and
  revealed the same way, as its refusal (``node_runner.logic.refused``);
* sends a signed ``NodeHeartbeat`` (load, free slots) every few seconds;
* sends without waiting for each acknowledgement (the producer is idempotent and
  delivers in the background; ``run`` flushes on the way out, and a lost commit
  only costs the node this replica);
* on SIGTERM takes no new work, finishes what runs, answers the reveal calls of
  what it committed (up to a grace period) and exits.

What to do with each assignment, grant and reveal call is ``node_runner.logic.NodeLogic``
(the processing contract, also run by the in-memory runner in tests); this module is
its transport: the consumer, the producer, the task threads and the heartbeats.

``fault`` makes it misbehave, for tests and the demo: ``wrong-result`` (a
digest that is not the output's), ``no-show`` (takes work, never commits),
``late`` (commits after the commit deadline), ``copy`` (computes nothing,
commits to random bytes, then reveals a digest copied from other replicas'
reveals: the commitment does not open, so the copy is refused), ``late-reveal``
(reveals after its reveal deadline), ``bad-checkpoint`` (answers a dispute's
checkpoint request with another state), ``diverge`` (honest, but for long mlp-digits
training runs, whose state it perturbs from the middle segment on), ``tamper-input``
(alters the task's input before running it: a program's bytes, else its seed).
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from destra import __version__, keystore
from destra.blobs import BlobStore, store_or_inline
from destra.blobs import check as check_blob
from destra.blobs import fetch as fetch_blob
from destra.confidential import merge_params, open_input, seal_result
from destra.crypto import KeyPair, sign_event
from destra.errors import DecryptionFailed, DestraError, InvalidParams
from destra.settings import Settings
from node_runner.capability import Capability, measure, pick_device
from node_runner.logic import Computed, Fault, NodeLogic, refused, run_assignment
from schemas import Event, decode, new_event
from schemas.bindings import StakeConsent, sign_stake_consent
from schemas.events import now_ms
from streams import metrics
from streams.authority import Genesis
from streams.consumer import consumer_config, fetch
from streams.klog import KAFKA_LOG, task_extra
from streams.processing import Context, Outcome, Work
from streams.producer import EventProducer
from streams.topics import inbox_topic, partition_for, topic_for
from workloads import WORKLOADS, get_workload
from workloads.base import WorkRefused, checks_first

log = logging.getLogger(__name__)

HEARTBEAT_MS = 2_000
SHUTDOWN_GRACE_S = 30.0


@dataclass
class NodeConfig:
    """How a node runs; ``name`` is also its node id."""

    name: str
    operator: str
    region: str = "eu-west"
    tier: str = "datacenter"
    """The tier it offers; capped by what its benchmark earns."""
    stake_micro: int = 0
    slots: int = 1
    fault: Fault = Fault.NONE
    threads: int = 1
    """torch intra-op threads per running task."""
    force_cpu: bool = False
    heartbeat_ms: int = HEARTBEAT_MS
    operator_keys: KeyPair | None = None
    """The operator account's keys, to sign its consent to the stake (the ledger locks a
    stake only with it); None: the registration carries no consent, the node runs
    unstaked."""
    consent: StakeConsent | None = None
    """The operator's consent signed on its own machine (``destra node consent``), for a
    node whose machine does not hold the operator's keystore; used when ``operator_keys``
    is None."""


@dataclass
class NodeRunner:
    """One node: call ``run`` (blocks until ``stop``)."""

    settings: Settings
    bootstrap: str
    config: NodeConfig
    keys: KeyPair = field(init=False)
    capability: Capability | None = None
    passphrase: bytes | None = None
    """The keystore's passphrase; from the environment when not given."""
    serve_metrics: bool = False
    """Serve ``/metrics`` (``streams.metrics``) as ``node-<name>`` from ``run`` (the CLI's
    node does; a node run inside a test process need not)."""

    def __post_init__(self) -> None:
        self.node_id = self.config.name
        passphrase = self.passphrase or keystore.require_passphrase()
        self.keyring = keystore.load_or_create(
            keystore.node_path(self.settings, self.node_id), passphrase)
        self.keys = self.keyring.current
        self.blobs = BlobStore(self.settings.blobs)
        self.logic = NodeLogic(self.node_id, self.keyring.all(), self._compute, self._seal,
                               slots=self.config.slots, fault=self.config.fault,
                               producer_id=self.settings.producer_id,
                               copy_digest=self._copy_digest)
        """The task logic (``node_runner.logic``); this class is its transport and threads."""
        self._rng = random.SystemRandom()
        self.genesis = Genesis.load(self.settings.genesis_path)
        """Whose assignments and reveal calls to believe: the network's service keys."""
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._metrics = metrics.Instruments()
        """Events handled and emitted, as every runner counts them (``streams.metrics``);
        added to under ``_lock`` only, since the poll thread and the task threads both
        emit."""
        self._producer = EventProducer(self.settings, self.bootstrap)
        self._seq = 0
        self._pool = ThreadPoolExecutor(self.config.slots, thread_name_prefix="task")
        self._checks = ThreadPoolExecutor(self.config.slots, thread_name_prefix="blob-check")
        self.device = pick_device(self.config.force_cpu)

    # -- lifecycle --------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask ``run`` to finish (safe from a signal handler)."""
        self._stop.set()

    def stake_consent(self) -> bytes:
        """The operator's signed consent to this node's stake, or empty (no stake, or no
        operator keys at hand)."""
        c = self.config
        if c.stake_micro == 0:
            return b""
        if c.operator_keys is not None:
            return sign_stake_consent(c.operator_keys, self.settings.topic_prefix, c.operator,
                                      self.node_id, self.keys.signing_public, c.stake_micro)
        if c.consent is not None:
            # Refused here, before registering, when it is not for this very registration.
            c.consent.check_for(self.settings.topic_prefix, c.operator, self.node_id,
                                self.keys.signing_public, c.stake_micro)
            return c.consent.signature
        return b""

    def register(self) -> Event:
        """Benchmark the device and publish the signed registration."""
        torch.set_num_threads(self.config.threads)
        # Every run deterministic: set once for the process, so concurrent tasks
        # entering and leaving ``workloads.base.deterministic`` never flip it.
        torch.use_deterministic_algorithms(True)
        torch.set_float32_matmul_precision("highest")
        self.capability = cap = measure(self.device)
        cuda = f"; cuda {torch.version.cuda}" if cap.device == "cuda" else ""
        event = self._signed(new_event(
            "NodeRegistered", self.settings.producer_id, node_id=self.node_id,
            operator_id=self.config.operator, region=self.config.region,
            signing_key=self.keys.signing_public, encryption_key=self.keys.encryption_public,
            device_name=cap.device_name[:256], device_class=cap.device_class,
            tier=self.config.tier, tflops_milli=cap.tflops_milli, memory_mb=cap.memory_mb,
            slots=self.config.slots, stake_micro=self.config.stake_micro,
            software=f"destra {__version__}; torch {torch.__version__}{cuda}",
            operator_consent=self.stake_consent()))
        self._producer.send(event)
        self._producer.flush()
        return event

    def run(self, on_ready: Any = None) -> None:
        """Register, then serve assignments until stopped; then drain and exit."""
        # Its inbox is found first: a node that cannot read its work must not register
        # and be assigned any.
        consumer = self._consumer()
        if self.serve_metrics:
            metrics.serve(f"node-{self.node_id}", self.settings.home)
        try:
            self.register()
        except BaseException:
            consumer.close()
            raise
        beat = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        beat.start()
        if on_ready is not None:
            on_ready(self)
        try:
            while not self._stop.is_set():
                self._poll(consumer, accept_work=True)
            # Drain: no new work; finish running tasks, answer reveal calls.
            self._pool.shutdown(wait=False)
            deadline = time.monotonic() + SHUTDOWN_GRACE_S
            while time.monotonic() < deadline and self._unrevealed():
                self._poll(consumer, accept_work=False)
        finally:
            self._pool.shutdown(wait=True)
            self._checks.shutdown(wait=True)
            consumer.close()
            self._producer.flush()

    @property
    def completed(self) -> int:
        """Replicas this node has finished computing."""
        return self.logic.completed

    def _unrevealed(self) -> bool:
        with self._lock:
            return self.logic.pending(now_ms())

    def _consumer(self) -> Consumer:
        consumer = Consumer(consumer_config(
            self.bootstrap, f"{self.settings.topic_prefix}node-{self.node_id}",
            {"enable.auto.commit": True, "enable.auto.offset.store": False,
             "logger": KAFKA_LOG}))
        try:
            tp = self._source(consumer)
            (committed,) = consumer.committed([tp], timeout=30)
        except BaseException:
            consumer.close()
            raise
        start = committed.offset if committed.offset >= 0 else OFFSET_BEGINNING
        consumer.assign([TopicPartition(tp.topic, tp.partition, start)])
        return consumer

    def _source(self, consumer: Consumer) -> TopicPartition:
        """Where this node's assignments, grants and reveal calls are: its inbox topic; on
        a network that made it none (an older version: its principal may still read
        ``tasks.assignments``), its partition of that topic."""
        prefix = self.settings.topic_prefix
        inbox = inbox_topic(prefix, self.node_id)
        if inbox is not None and _readable(consumer, inbox):
            return TopicPartition(inbox, 0)
        spec = topic_for("TaskAssigned")
        shared = spec.name(prefix)
        if not _readable(consumer, shared):
            raise DestraError(
                f"node {self.node_id} has no inbox topic it may read "
                f"({inbox or 'its id cannot name a topic'}): the network's operator makes "
                f"it with `destra node join {self.node_id}`")
        log.warning("node %s has no inbox topic %s: reading its partition of %s, where "
                    "every node's work is (run `destra node join %s` to make its inbox)",
                    self.node_id, inbox, shared, self.node_id)
        return TopicPartition(shared, partition_for(self.node_id, spec.partitions))

    def _poll(self, consumer: Consumer, accept_work: bool) -> None:
        for msg in fetch(consumer, 100, 0.2):
            if msg.error() is not None:
                continue
            if msg.key() == self.node_id.encode():
                try:
                    event = decode(msg.value() or b"")
                except DestraError as err:
                    log.warning("undecodable assignment record skipped: %s", err)
                else:
                    self._handle(event, accept_work)
            consumer.store_offsets(msg)
        with self._lock:
            self.logic.accept_work = accept_work
            outcome = self.logic.tick(self._ctx())
        self._apply(outcome)

    def _ctx(self) -> Context:
        return Context(now_ms(), self._rng)

    def _handle(self, event: Event, accept_work: bool) -> None:
        if (refusal := self.genesis.check(event)) is not None:
            log.warning("%s refused: %s", event.name, refusal, extra=task_extra(event))
            return
        with self._lock:
            self.logic.accept_work = accept_work
            started = time.perf_counter()
            try:
                outcome = self.logic.handle(event, self._ctx())
            except Exception as err:  # one event the logic cannot take must not stop the node
                log.warning("%s refused: %s: %s", event.name, type(err).__name__, err,
                            extra=task_extra(event))
                return
            self._metrics.handled("node", event.name, time.perf_counter() - started)
        self._apply(outcome)

    def _apply(self, outcome: Outcome) -> None:
        """Send what the logic emitted; run the work it asked for on the task threads."""
        if outcome.emit:
            with self._lock:
                for event in outcome.emit:
                    self._metrics.emitted(event.name)
        for event in outcome.emit:
            self._producer.send(event)
        for r in outcome.rejected:
            log.warning("%s refused: %s", r.event.name, r.reason, extra=task_extra(r.event))
        for work in outcome.work:
            self._pool.submit(self._run, work)

    def _run(self, work: Work) -> None:
        if work.not_before_ms is not None:  # a faulty node's delay
            self._stop.wait(max(0.0, (work.not_before_ms - now_ms()) / 1000))
        assignment = work.key[2] if work.key[0] != "reveal" else None
        started = time.perf_counter()
        try:
            result: Any = work.run()
        except Exception as err:  # a failing task must not kill the node
            result = err
        if assignment is not None:  # a replica computed (not a late reveal's wait)
            seconds = time.perf_counter() - started
            named = str(assignment.fields.get("workload", ""))
            workload = named if named in WORKLOADS else "unknown"  # a label set stays small
            metrics.node_ran(workload, seconds)
            log.info("ran %s replica %s (attempt %s) in %.3f s%s", named,
                     assignment.fields.get("replica_index", "?"),
                     assignment.fields.get("attempt", "?"), seconds,
                     f": {type(result).__name__}: {result}"
                     if isinstance(result, BaseException) else "",
                     extra=task_extra(assignment))
        with self._lock:
            outcome = self.logic.finished(work.key, result, self._ctx())
        self._apply(outcome)

    # -- work -------------------------------------------------------------------------------

    def _compute(self, assignment: Event, data_key: bytes | None) -> Computed:
        """The canonical output and runtime of one replica.

        An input the submitter got wrong (unreadable with the key it granted, or
        parameters out of bounds) is refused ``invalid-input`` (``logic.refused``): every
        honest replica refuses it alike, the task fails ``refused`` and is refunded, and
        the sealed detail tells the submitter why.

        The sealed input's blob is checked against its name on another thread while the
        replica runs (45 ms for a 48 MiB input here, before the task could start); its
        ``BlobError`` replaces whatever the replica computed or refused, so nothing
        derived from a corrupt blob leaves the node, and a failed check is the reason
        given whatever else failed.
        """
        f = assignment.fields
        workload = get_workload(f["workload"])
        with checks_first([]) as checking:
            try:
                params = dict(f["params"])
                if data_key is not None:
                    started = time.perf_counter()
                    ref = f["payload_ref"]
                    sealed = fetch_blob(self.blobs, f["payload"], ref, verify=False)
                    if f["payload"] is None:
                        checking.append(self._checks.submit(check_blob, ref, sealed))
                    params = merge_params(params, open_input(data_key, f["task_id"], sealed))
                    log.info("fetched and opened the sealed input (%d bytes) in %.3f s",
                             len(sealed), time.perf_counter() - started,
                             extra=task_extra(assignment))
                parsed = workload.validate(params)
            except (DecryptionFailed, InvalidParams) as err:
                return refused(WorkRefused("invalid-input", str(err)))
            return run_assignment(assignment, workload, parsed, self.device,
                                  self.config.fault)

    def _seal(self, assignment: Event, output: bytes) -> tuple[bytes | None, str | None]:
        """The output sealed to the submitter, inline or in the blob store."""
        f = assignment.fields
        return store_or_inline(self.blobs, seal_result(f["result_key"], f["task_id"],
                                                       self.node_id, f["attempt"], output),
                               self.settings.inline_max_bytes)

    def _copy_digest(self, task_id: str) -> bytes | None:
        """The copier's trick: the first digest another replica revealed for the task."""
        spec = topic_for("ResultRevealed")
        topic = spec.name(self.settings.topic_prefix)
        consumer = Consumer(consumer_config(self.bootstrap, f"copy-{uuid.uuid4()}",
                                            {"enable.auto.commit": False,
                                             "logger": KAFKA_LOG}))
        try:
            partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                for msg in fetch(consumer, 500, 0.5):
                    if msg.error() is None and msg.key() == task_id.encode():
                        try:
                            event = decode(msg.value() or b"")
                        except DestraError:
                            continue
                        if event.fields["node_id"] != self.node_id:
                            digest: bytes = event.fields["digest"]
                            return digest
            return None
        finally:
            consumer.close()

    # -- heartbeats -------------------------------------------------------------------------

    def _heartbeats(self) -> None:
        while not self._stop.wait(self.config.heartbeat_ms / 1000):
            self.heartbeat()

    def heartbeat(self) -> None:
        """Publish load and free slots now."""
        with self._lock:
            load, free = self.logic.heartbeat_load()
        self._seq += 1
        self._producer.send(self._signed(new_event(
            "NodeHeartbeat", self.settings.producer_id, node_id=self.node_id,
            load_permille=load, free_slots=free, seq=self._seq)))

    def _signed(self, event: Event) -> Event:
        return sign_event(event, self.keys, self.node_id)


def _readable(consumer: Consumer, topic: str) -> bool:
    """Whether ``topic`` exists and this principal may see it (its metadata, no error)."""
    found = consumer.list_topics(topic, timeout=30).topics.get(topic)
    return found is not None and found.error is None and bool(found.partitions)
