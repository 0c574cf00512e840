"""The submitter's Python client: quotes, signed submissions, progress and verdicts.

    client = Client(settings, bootstrap, account="alice")
    quote = client.quote("nbody", {"bodies": "64"})
    task_id = client.submit(quote)
    verdicts = client.wait([task_id])

The account's Ed25519/X25519 keys live in a passphrase-encrypted keystore,
``$DESTRA_HOME/accounts/<account>.json`` (created on first use; the passphrase
comes from ``DESTRA_PASSPHRASE`` or ``DESTRA_PASSPHRASE_FILE``). The account exists
once ``register`` has sent its signed ``AccountRegistered`` (``destra account create``
does it): the ledger credits nothing to an unregistered account and refuses a
submission not signed by the registered key. Parameters are checked
against the workload before anything is sent, so a bad submission is a clear
error here, not a dead task.

Confidentiality: only a workload's public parameters (what its price depends
on) travel in the clear. The rest are sealed under a fresh data key
(``destra.confidential``), inline or in the blob store when large. The data
key stays with the submitter (kept sealed to the account's own key under
``$DESTRA_HOME/accounts/<account>.datakeys/``) and is granted, wrapped, to each
node the allocator assigns, while a ``Watch`` or ``destra grant-agent`` of the
account runs. A replica not granted by its commit deadline fails the task
``no_data_key``, refunded, nobody penalized. Results come back sealed to the
account's X25519 key: ``result`` opens one and checks it against the digest
the quorum verified.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from allocator.pricing import PriceBook, PriceUpdate, Quote, check_quote, tier_of
from destra import crypto, keystore
from destra.blobs import BlobStore
from destra.blobs import fetch as fetch_blob
from destra.confidential import grant, open_result, seal_input_to
from destra.crypto import KeyPair, sign_event, verify_event
from destra.errors import DecryptionFailed, DestraError, InvalidRequest
from destra.settings import Settings
from infra.notes import Step
from ledger.decider import PRICE_GRACE_MS
from schemas import Event, decode, new_event
from schemas.bindings import account_operation, account_registration, data_key_commitment
from schemas.events import now_ms
from streams.authority import Genesis
from streams.consumer import consumer_config, fetch
from streams.klog import KAFKA_LOG
from streams.params import ParamSchedule
from streams.producer import EventProducer
from streams.reading import read_all
from streams.topics import topic_for
from verifier.commitments import refusal_digest
from workloads import get_workload

QUOTE_TTL_MS = 60_000
"""How long a quote binds; at most the ledger's ``PRICE_GRACE_MS``, so a quote still
valid was made inside the window whose lowest price the ledger honours."""
PRICES_FRESH_MS = 5_000
"""The prices move (``allocator.market``): a client reads them again after this long."""
DEFAULT_DEADLINE_MS = 600_000
WATCHED = ("TaskAssigned", "ResultCommitted", "ResultRevealed", "TaskVerified", "TaskFailed")


@dataclass(frozen=True)
class OperationOutcome:
    """What the ledger did with one of the account's operations (``Client.operate``)."""

    event_id: str
    operation: str
    target: str
    amount_micro: int
    nonce: int
    transaction_id: str
    """``op/<account>/<nonce>``: its entries' transaction when executed."""
    outcome: str
    """``posted`` (executed: its entries are on the ledger), ``refused`` (dead-lettered:
    ``reason`` says why), ``pending`` (no decision within the timeout) or ``sent`` (not
    waited for)."""
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"event_id": self.event_id, "operation": self.operation, "target": self.target,
                "amount_micro": self.amount_micro, "nonce": self.nonce,
                "transaction_id": self.transaction_id, "outcome": self.outcome,
                "reason": self.reason}


class ResultRefused(DestraError):
    """No delivered result opens to the digest the quorum verified."""


@dataclass(frozen=True)
class TaskResult:
    """A verified task's output, decrypted and checked against the verified digest."""

    task_id: str
    output: bytes
    digest: bytes
    node_id: str
    """The agreeing node whose sealed copy was opened."""
    workload: str = ""
    """The task's workload (``program``: the output is a safetensors file)."""


@dataclass(frozen=True)
class TaskQuote:
    """A priced, validated task, ready to submit until ``quote.expires_at``."""

    workload: str
    params: dict[str, str]
    replicas: int
    quorum: int
    quote: Quote
    homogeneous: bool

    def as_dict(self, *, private: bool = True) -> dict[str, Any]:
        """For ``--json`` output; without ``private``, the public parameters only (a
        program's private ones are the whole program and its inputs)."""
        q = self.quote
        params = self.params
        if not private:
            public = get_workload(self.workload).public_names()
            params = {k: v for k, v in params.items() if k in public}
        return {"workload": self.workload, "params": params, "replicas": self.replicas,
                "quorum": self.quorum, "trust": q.trust, "tier": str(q.tier),
                "compute_units": q.compute_units,
                "price_micro": q.price_micro, "quote_id": q.quote_id,
                "expires_at": q.expires_at}


@dataclass
class Progress:
    """What the network has done with one task so far."""

    task_id: str
    assigned: int = 0
    encrypted: bool = False
    granted: int = 0
    committed: int = 0
    revealed: int = 0
    verdict: Event | None = None
    workload: str = ""
    """From its assignments."""
    reveals: list[Event] = field(default_factory=list)
    """The replicas' ``ResultRevealed`` seen so far (``Client.result`` opens them)."""

    @property
    def state(self) -> str:
        """``queued``, ``awaiting-key``, ``running``, ``revealing``, ``verified``, ``failed``.

        ``awaiting-key``: placed, but not every replica has its data key yet (the
        submitter's client or grant agent must be running to grant it).
        """
        if self.verdict is not None:
            return "verified" if self.verdict.name == "TaskVerified" else "failed"
        if self.revealed:
            return "revealing"
        if self.encrypted and self.granted < self.assigned and not self.committed:
            return "awaiting-key"
        return "running" if self.assigned else "queued"

    def as_dict(self) -> dict[str, Any]:
        """For ``--json`` output."""
        out: dict[str, Any] = {"task_id": self.task_id, "state": self.state,
                               "assigned": self.assigned, "granted": self.granted,
                               "committed": self.committed,
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
    passphrase: bytes | None = None
    """The keystore's passphrase; from the environment when not given."""
    keys: KeyPair = field(init=False)

    def __post_init__(self) -> None:
        if not self.account or len(self.account) > 128 or ":" in self.account:
            raise InvalidRequest(f"account {self.account!r}: 1 to 128 characters, no ':'")
        self.keyring = keystore.load_or_create(
            keystore.account_path(self.settings, self.account),
            self.passphrase or keystore.require_passphrase())
        self.keys = self.keyring.current
        self.blobs = BlobStore(self.settings.blobs)
        self._key_dir = self.settings.home / "accounts" / f"{self.account}.datakeys"
        self._data_keys: dict[str, bytes] = {}
        self._node_keys: dict[str, bytes] = {}
        self._granted: set[tuple[str, str, int]] = set()
        self._producer = EventProducer(self.settings, self.bootstrap)
        self._genesis: Genesis | None = None
        self._prices: PriceBook | None = None
        self._prices_read_ms = 0
        self._params: ParamSchedule | None = None
        self._params_read_ms = 0
        self._nonce = 0

    @property
    def genesis(self) -> Genesis:
        """The network's genesis file: a verdict, an assignment or a price is believed only
        when the service key it names signed it."""
        if self._genesis is None:
            self._genesis = Genesis.load(self.settings.genesis_path)
        return self._genesis

    # -- quotes and submissions -------------------------------------------------------------

    def prices(self) -> PriceBook:
        """The network's prices: defaults, then every ``PriceUpdated`` on its topic."""
        if self._prices is None or now_ms() - self._prices_read_ms > PRICES_FRESH_MS:
            self._prices_read_ms = now_ms()
            book = PriceBook()
            for event in self._events("PriceUpdated"):
                f = event.fields
                try:
                    book.apply(PriceUpdate(f["tier"], f["price_per_unit_micro"],
                                           f["effective_at"]))
                except DestraError:
                    continue
            self._prices = book
        return self._prices

    def network_params(self) -> ParamSchedule:
        """The live parameters (``streams.params``): defaults, then every governance-signed
        ``ParameterChanged``, read afresh at most every ``PRICES_FRESH_MS``."""
        if self._params is None or now_ms() - self._params_read_ms > PRICES_FRESH_MS:
            self._params_read_ms = now_ms()
            schedule = ParamSchedule()
            for event in self._events("ParameterChanged"):
                schedule.follow(event)
            self._params = schedule
        return self._params

    def quote(self, workload: str, params: Mapping[str, str], *, replicas: int | None = None,
              quorum: int | None = None, tier: str = "consumer",
              ttl_ms: int = QUOTE_TTL_MS, trust: str = "fixed") -> TaskQuote:
        """Validate the task and price it; raises a ``DestraError`` saying what is wrong.

        ``trust="fixed"`` runs exactly ``replicas`` replicas (default: the network's
        ``default_replicas``, 3 unless governance changed it); ``"adaptive"`` lets the
        network's reputation decide (``allocator.trust``), ``replicas`` (default 1) and
        ``quorum`` being floors, for the price of the floor plus the trust premium.
        """
        if not 1 <= ttl_ms <= PRICE_GRACE_MS:
            raise InvalidRequest(f"a quote lives 1..{PRICE_GRACE_MS} ms (the ledger's price "
                                 f"grace), not {ttl_ms}")
        if replicas is None:  # the network's default_replicas (a live parameter)
            replicas = 1 if trust == "adaptive" else self.network_params().value(
                "default_replicas", now_ms())
        w = get_workload(workload)
        parsed = w.validate(params)
        quorum = replicas // 2 + 1 if quorum is None else quorum
        if not 1 <= replicas <= 15 or not replicas >= quorum > replicas / 2:
            raise InvalidRequest(f"{replicas} replicas with quorum {quorum}: replicas must be "
                                 "1..15 and the quorum a majority of them")
        quote = self.prices().quote(workload, w.compute_units(parsed), replicas, tier_of(tier),
                                    now_ms(), ttl_ms, trust)
        return TaskQuote(workload, dict(params), replicas, quorum, quote, w.homogeneous(parsed))

    def quote_program(self, program: bytes, inputs: bytes, *, steps: int = 1, carry: int = 0,
                      mantissa_bits: int = 0, max_runtime_ms: int = 0,
                      replicas: int | None = None,
                      quorum: int | None = None, tier: str = "consumer",
                      ttl_ms: int = QUOTE_TTL_MS, trust: str = "fixed") -> TaskQuote:
        """Quote a user's own ``torch.export`` program (``program``: a ``.pt2`` archive) on
        ``inputs`` (a safetensors file) as a ``program`` task: its parameters
        (``workloads.program.program_params``: the hashes, compute units, peak memory and
        runtime bound in the clear, the program and inputs sealed) priced by ``quote``.
        ``max_runtime_ms`` states a tighter runtime bound than the rule's (0: the rule's)."""
        from workloads.program import program_params  # the program workload (issue 15)

        params = program_params(program, inputs, steps=steps, carry=carry,
                                mantissa_bits=mantissa_bits, max_runtime_ms=max_runtime_ms)
        return self.quote("program", {k: str(v) for k, v in params.items()},
                          replicas=replicas, quorum=quorum, tier=tier, ttl_ms=ttl_ms,
                          trust=trust)

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
        workload = get_workload(q.workload)
        public, private = workload.split(q.params)
        payload: bytes | None = None
        payload_ref: str | None = None
        commitment = b""
        if private:
            data_key, payload, payload_ref = seal_input_to(
                self.blobs, self.settings.inline_max_bytes, task_id, private,
                workload.byte_names())
            commitment = data_key_commitment(task_id, data_key)
            self._save_data_key(task_id, data_key)
        event = new_event(
            "TaskSubmitted", self.settings.producer_id, task_id=task_id,
            submitter_id=self.account, workload=q.workload, params=public,
            replicas=q.replicas, quorum=q.quorum, compute_units=q.quote.compute_units,
            max_price_micro=max_price, quote_id=q.quote.quote_id,
            quoted_price_micro=q.quote.price_micro, quote_expires_at=q.quote.expires_at,
            tier=str(q.quote.tier), region=region, homogeneous=q.homogeneous,
            deadline_ms=deadline_ms, result_key=self.keys.encryption_public,
            payload_ref=payload_ref, payload=payload, signing_key=self.keys.signing_public,
            data_key_commitment=commitment, trust=q.quote.trust)
        self.send_signed(event, flush=flush)
        return task_id

    def register(self, flush: bool = True) -> Event:
        """Send this account's signed ``AccountRegistered``, binding it to its current keys;
        again with the same keys, it changes nothing. Returns the event sent."""
        event = account_registration(self.account, self.keys, self.settings.producer_id)
        self._producer.send(event)
        if flush:
            self._producer.flush()
        return event

    # -- money: the account's own operations ------------------------------------------------

    def next_nonce(self) -> int:
        """The nonce of the account's next operation: the wall clock in milliseconds, or one
        above the last this client used when that is later. The ledger needs only that
        each exceeds the account's last (any nonce above works, gaps are fine), so no
        client must learn it first; two clients of one account sending in the same
        millisecond may collide, and the second is refused ``replay`` (send it again)."""
        self._nonce = max(now_ms(), self._nonce + 1)
        return self._nonce

    def operate(self, operation: str, target: str, amount_micro: int = 0, memo: str = "",
                timeout_s: float = 60.0) -> OperationOutcome:
        """Sign an ``AccountOperation`` with the next nonce, send it and, unless
        ``timeout_s`` is 0, wait for the ledger's entries or its dead letter."""
        from ledger.processor import ledger_outcome, outcome_positions

        nonce = self.next_nonce()
        event = account_operation(self.account, self.keys, nonce, operation, target,
                                  amount_micro, memo)
        since = outcome_positions(self.settings, self.bootstrap) if timeout_s > 0 else {}
        self._producer.send(event)
        self._producer.flush()
        tx = f"op/{self.account}/{nonce}"
        outcome, why = "sent", None
        if timeout_s > 0:
            outcome, why = ledger_outcome(self.settings, self.bootstrap, self.genesis, tx,
                                          "AccountOperation", event.event_id, since, timeout_s)
        return OperationOutcome(event.event_id, operation, target, amount_micro, nonce, tx,
                                outcome, why)

    def transfer(self, to: str, amount_micro: int, memo: str = "",
                 timeout_s: float = 60.0) -> OperationOutcome:
        """Send ``amount_micro`` to the registered account ``to``."""
        return self.operate("TRANSFER", to, amount_micro, memo, timeout_s)

    def stake(self, node_id: str, amount_micro: int,
              timeout_s: float = 60.0) -> OperationOutcome:
        """Lock more of the account's tokens as the stake of a node it operates."""
        return self.operate("STAKE", node_id, amount_micro, "", timeout_s)

    def unstake(self, node_id: str, amount_micro: int,
                timeout_s: float = 60.0) -> OperationOutcome:
        """Move part of a node's stake into unbonding: slashable, then withdrawable after
        the network's ``unbonding_ms``."""
        return self.operate("UNSTAKE", node_id, amount_micro, "", timeout_s)

    def withdraw(self, node_id: str, timeout_s: float = 60.0) -> OperationOutcome:
        """Take a node's earnings and its matured unbonding into the account."""
        return self.operate("WITHDRAW", node_id, 0, "", timeout_s)

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
        replicas = options.pop("replicas", None)
        tier = options.pop("tier", "consumer")
        trust = options.pop("trust", "fixed")
        return [self.submit(self.quote(name, raw, replicas=replicas, tier=tier, trust=trust),
                            **options)
                for name, raw in points]

    # -- data keys and grants ----------------------------------------------------------------

    def _save_data_key(self, task_id: str, data_key: bytes) -> None:
        """Keep a task's data key, sealed to the account's own key, for later grants."""
        self._data_keys[task_id] = data_key
        self._key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self._key_dir / task_id).write_bytes(crypto.seal_to(
            self.keys.encryption_public, data_key,
            crypto.associated_data("data-key", self.account, task_id)))

    def data_key(self, task_id: str) -> bytes | None:
        """The data key of one of this account's tasks, if this machine holds it."""
        if task_id not in self._data_keys:
            path = self._key_dir / task_id
            if "/" in task_id or not path.is_file():
                return None
            sealed = path.read_bytes()
            for keys in self.keyring.all():
                try:
                    self._data_keys[task_id] = crypto.open_sealed_to(
                        keys, sealed, crypto.associated_data("data-key", self.account, task_id))
                    break
                except DecryptionFailed:
                    continue
        return self._data_keys.get(task_id)

    def node_encryption_key(self, node_id: str) -> bytes | None:
        """A node's X25519 key from its latest self-signed registration.

        The node id is bound to the signing key of its first registration, as the
        verifier and allocator bind it; a later registration with that signing key
        may carry a rotated encryption key.
        """
        if node_id not in self._node_keys:
            bound: dict[str, bytes] = {}
            for e in self._events("NodeRegistered"):
                f = e.fields
                if not verify_event(e, f["signing_key"], f["node_id"]):
                    continue  # not proof of possession of the key it registers
                if bound.setdefault(f["node_id"], f["signing_key"]) == f["signing_key"]:
                    self._node_keys[f["node_id"]] = f["encryption_key"]
        return self._node_keys.get(node_id)

    def on_event(self, event: Event) -> None:
        """Grant the data key to each node assigned one of this account's tasks."""
        f = event.fields
        if event.name == "DataKeyGranted" and event.signer == self.account:
            self._granted.add((f["task_id"], f["node_id"], f["attempt"]))
        elif event.name == "TaskAssigned" and f["submitter_id"] == self.account:
            replica = (f["task_id"], f["node_id"], f["attempt"])
            if replica in self._granted or f["commit_deadline"] < now_ms():
                return
            data_key = self.data_key(f["task_id"])
            node_key = self.node_encryption_key(f["node_id"])
            if data_key is None or node_key is None:
                return  # not submitted from here, or a node without a valid registration
            # Not flushed one by one: the producer's thread sends it at once anyway, and
            # waiting for each acknowledgement held up every grant behind the last.
            self.send_signed(grant(self.settings.producer_id, f["task_id"], f["node_id"],
                                   f["attempt"], data_key, node_key), flush=False)
            self._granted.add(replica)

    # -- results ----------------------------------------------------------------------------

    def result(self, task_id: str, say: Callable[[str], None] = lambda _: None,
               progress: Progress | None = None) -> TaskResult:
        """The verified output of ``task_id``, decrypted and checked against its digest.

        Tries each agreeing node's sealed copy; ``ResultRefused`` if none opens to the
        verified digest, ``DestraError`` if the task has no verdict or failed. ``say``
        hears each step as it begins (reading the verdict, the results, fetching,
        decrypting, checking a copy), an ``infra.notes.Step`` note. ``progress``: what a
        ``Watch`` saw of the task; when it holds the verdict, the verdict and the reveals
        it saw are used instead of reading their topics from the start (a few hundred
        milliseconds saved), the topics being read only if no reveal it saw opens.
        """
        if (progress is not None and progress.task_id == task_id
                and progress.verdict is not None and progress.verdict.name == "TaskVerified"):
            try:
                return self._open_result(task_id, progress.verdict, progress.reveals,
                                         progress.workload, say)
            except ResultRefused:
                pass  # a reveal it did not see yet: read the topics below
        say(Step(f"reading the verdict of {task_id}"))
        verdict = next((e for e in self._events("TaskVerified")
                        if e.fields["task_id"] == task_id), None)
        if verdict is None:
            raise DestraError(f"task {task_id} has no verdict yet")
        if verdict.name == "TaskFailed":
            why = ""
            if verdict.fields["reason"] == "refused":
                say(Step("opening the refusal sealed to you"))
                document = self.refusal(task_id)
                why = f" ({document['detail']})" if document and document["detail"] else ""
            raise DestraError(f"task {task_id} failed: {verdict.fields['reason']}: "
                              f"{verdict.fields['detail']}{why}")
        say(Step("reading the revealed results"))
        reveals = [e for e in self._events("ResultRevealed") if e.fields["task_id"] == task_id]
        # The workload, from its assignments (an account may not read the submissions).
        assigned = next((e for e in self._events("TaskAssigned")
                         if e.name == "TaskAssigned" and e.fields["task_id"] == task_id), None)
        return self._open_result(task_id, verdict, reveals, assigned.fields["workload"]
                                 if assigned is not None else "", say)

    def _open_result(self, task_id: str, verdict: Event, reveals: Iterable[Event],
                     workload: str, say: Callable[[str], None]) -> TaskResult:
        """The first of ``reveals`` by an agreeing node that opens to the verdict's digest."""
        digest: bytes = verdict.fields["digest"]
        agreed = {c["node_id"] for c in verdict.fields["contributions"] if c["agreed"]}
        problems = []
        for reveal in reveals:
            f = reveal.fields
            if f["task_id"] != task_id or f["node_id"] not in agreed:
                continue
            try:
                say(Step(f"fetching {f['node_id']}'s sealed result " + (
                    f"(blob {f['result_ref']})" if f["result"] is None else "(inline)")))
                sealed = fetch_blob(self.blobs, f["result"], f["result_ref"])
                say(Step(f"decrypting {f['node_id']}'s result ({len(sealed):,} bytes)"))
                output = open_result(self.keyring.all(), task_id, f["node_id"],
                                     f["attempt"], sealed)
            except DestraError as err:
                problems.append(f"{f['node_id']}: {err}")
                continue
            say(Step("checking it against the verified digest"))
            if crypto.digest(output) != digest:
                problems.append(f"{f['node_id']}: its result's SHA-256 is not the verified "
                                f"digest {digest.hex()[:16]}...")
                continue
            return TaskResult(task_id, output, digest, f["node_id"], workload)
        raise ResultRefused(f"no result of {task_id} matches the verified digest "
                            f"{digest.hex()[:16]}...: " + ("; ".join(problems) or
                                                           "no agreeing node delivered one"))

    def refusal(self, task_id: str) -> dict[str, Any] | None:
        """Why a task failed ``refused``: the refusal document (``refused``: the code,
        ``detail``, and the ``node_id`` whose copy was opened) an agreeing refuser sealed to
        this account; None when the task was not refused or no copy opens."""
        verdict = next((e for e in self._events("TaskVerified")
                        if e.fields["task_id"] == task_id), None)
        if verdict is None or verdict.name != "TaskFailed" or \
                verdict.fields["reason"] != "refused":
            return None
        code = verdict.fields["detail"].split(":", 1)[0]
        for reveal in self._events("ResultRevealed"):
            f = reveal.fields
            if f["task_id"] != task_id or f.get("refusal") != code or \
                    f["digest"] != refusal_digest(code):
                continue
            try:
                sealed = fetch_blob(self.blobs, f["result"], f["result_ref"])
                document = json.loads(open_result(self.keyring.all(), task_id, f["node_id"],
                                                  f["attempt"], sealed))
            except (DestraError, ValueError):
                continue
            if isinstance(document, dict) and document.get("refused") == code:
                return {"refused": code, "detail": str(document.get("detail", "")),
                        "node_id": f["node_id"]}
        return None

    # -- progress ---------------------------------------------------------------------------

    def watch(self, from_start: bool = False) -> Watch:
        """Start watching before submitting, so no event about the task is missed.

        The watch also grants data keys to the nodes assigned this account's tasks.
        """
        return Watch(self.settings, self.bootstrap, from_start=from_start,
                     on_event=self.on_event, genesis=self.genesis)

    def wait(self, task_ids: Iterable[str], *, watch: Watch | None = None,
             timeout_s: float = 600.0,
             on_progress: Callable[[Progress], None] | None = None) -> dict[str, Progress]:
        """Follow tasks until each has a verdict (or the timeout: ``DestraError``)."""
        own = watch is None
        watch = watch or self.watch(from_start=True)
        try:
            return watch.until_done(list(task_ids), timeout_s, on_progress)
        finally:
            if own:
                watch.close()

    def _topic(self, event: str) -> str:
        return topic_for(event).name(self.settings.topic_prefix)

    def _events(self, name: str) -> list[Event]:
        """Every believable event on the topic of ``name`` events, from its start."""
        return _read_topic(self.bootstrap, self.genesis, self._topic(name))

    def read_events(self, name: str) -> list[Event]:
        """Every believable event on the topic of ``name`` events (other types on that
        topic too), from its start to its end now: for small topics (prices, governance)."""
        return self._events(name)

    def close(self) -> None:
        """Flush what was sent."""
        self._producer.close()


class Watch:
    """Reads the task topics from now (or from the start) and tracks tasks' progress.

    An assignment or verdict not signed by the service the genesis names for it is
    skipped (the services' consumers dead-letter it); ``genesis`` defaults to the file
    ``settings.genesis_path``.
    """

    def __init__(self, settings: Settings, bootstrap: str, from_start: bool = False,
                 on_event: Callable[[Event], None] | None = None,
                 genesis: Genesis | None = None) -> None:
        self._on_event = on_event
        self._genesis = genesis or Genesis.load(settings.genesis_path)
        self.refused = 0
        """Authority events skipped for want of a valid service signature."""
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
            p.workload = event.fields["workload"]
            p.encrypted = (event.fields["payload"] is not None
                           or event.fields["payload_ref"] is not None)
        elif event.name == "DataKeyGranted":
            p.granted += 1
        elif event.name == "ResultCommitted":
            p.committed += 1
        elif event.name == "ResultRevealed":
            p.revealed += 1
            p.reveals.append(event)
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
            for p in self.poll(0.5):
                if p.task_id in wanted and on_progress is not None:
                    on_progress(p)
        return {t: self.progress[t] for t in task_ids}

    def poll(self, timeout_s: float) -> list[Progress]:
        """Read what arrived (waiting up to ``timeout_s`` for the first event); what moved."""
        moved = []
        for msg in fetch(self._consumer, 500, timeout_s):
            if msg.error() is not None:
                continue
            try:
                event = self._genesis.require(decode(msg.value() or b""))
            except DestraError:
                self.refused += 1
                continue
            if self._on_event is not None:
                self._on_event(event)
            p = self._fold(event)
            if p is not None:
                moved.append(p)
        return moved

    def close(self) -> None:
        """Leave."""
        self._consumer.close()


def _read_topic(bootstrap: str, genesis: Genesis, topic: str) -> list[Event]:
    """Every decodable event of a (small) topic, from its start to its end now, less the
    authority events the genesis refuses."""
    events = []
    for msg in read_all(bootstrap, topic):
        try:
            events.append(genesis.require(decode(msg.value() or b"")))
        except DestraError:
            continue
    return events
