"""The ledger's decisions: which money moves each domain event causes.

Pure and deterministic: given the same events at the same record times it
emits the same LedgerEntryPosted (and rejection TaskFailed) events. The
decisions are recorded as events, so the Postgres projection only folds
entries and its replay from offset 0 cannot decide differently from the live
run.

Freshness, by the broker's clock. ``tasks.submitted``, ``ledger.mints`` and
``nodes.penalties`` are ``broker_time`` topics: each record's time
(``Context.now_ms``) is its append time, which no producer can set. An input
that moves money by id is judged at that time, so a copy of it appended later,
byte for byte, is refused by age and the ledger need not remember its id for
ever (``ledger.horizon``):

- a submission appended after its quote expired (``quote_expires_at`` +
  ``CLOCK_SKEW_MS``) or more than ``MAX_SUBMISSION_AGE_MS`` after it was made
  is refused as ``stale-submission``; one made more than ``MAX_FUTURE_MS``
  after it was appended, ``future-submission`` (both as TaskFailed, like every
  refusal of a submission);
- a mint or a penalty appended more than ``MAX_AUTHORITY_AGE_MS`` after it was
  made, or made more than ``MAX_FUTURE_MS`` after, is refused: dead-lettered
  (``Outcome.rejected``), since a service's event has no submitter to tell.

Without a broker time (``decide`` with none: tests, tools) an event is judged
at its own ``occurred_at``.

Rules:
- AccountRegistered (signed by the signing key it registers: proof of possession):
  binds the account id to that key, for ever. The same key again changes nothing; another
  key for a bound id is refused (dead-lettered, ``account-taken``). Nothing is credited
  to, escrowed from or staked from an account before it is registered.
- TokensMinted: mint to ``user:<account>``, once per event id; to an account not
  registered, refused (dead-lettered, ``unregistered-account``): no money moves. A
  fresh mint takes its id credited or refused, so a refused one replayed after the
  account registered is not credited.
- TaskSubmitted: a task still escrowed here, or whose id a valid submission
  used within its ``MAX_SUBMISSION_AGE_MS``, is ignored, stale or not (the first
  submission stands, refused or escrowed: a refused submission replayed after its
  account was funded is not escrowed, a stale copy of a verified task does not fail
  it). One appended more than ``MAX_SUBMISSION_AGE_MS`` after it was made is
  dead-lettered (``stale-submission``), not failed: nobody waits for its verdict.
  Else reject (TaskFailed) when stale or future-dated (above);
  when it is not signed by the key it carries; when its account is not
  registered (``unregistered-account``) or that key is not the one registered
  (``wrong-key``); when it has sealed inputs (``payload`` or ``payload_ref``) but no
  32-byte commitment to their data key (``no-data-key-commitment``: a node handed a
  wrong key could not show it); when the quote expired before the submission
  was made (event time); when the quoted price is below the network's price
  for the compute (``PriceUpdated``), or exceeds the submitter's max price;
  when funds are short. Else escrow.
- NodeRegistered (signed by the key it registers): lock ``stake_micro`` from
  the operator's account as the node's stake, once per node, only with the
  operator's consent (``operator_consent``: signed by the key the operator's
  account registered, over network, operator, node, node key and amount,
  ``schemas.bindings``). Without it, or for an operator not registered, the node
  runs unstaked and the registration is dead-lettered with the reason
  (``no-stake-consent``); an operator without the funds gets no stake locked.
- TaskVerified: pay each agreeing replica's node wallet ``node:<id>`` by the
  compute it gave, the network fee to the treasury, the rest back.
- TaskFailed (from the verifier): refund whatever the task still holds.
- NodePenalized: slash the node's stake, then its unbonding (the tranches released
  last first), never below zero, once per event id.
- AccountOperation (``accounts.ops``, broker time; signed by the account's registered
  key): refused before anything when its account is not registered
  (``unregistered-account``), not signed by that key (``bad-signature``) or its ids hold
  a NUL (``invalid-id``); then its ``nonce`` must exceed the last one the account used
  (``replay``), and it takes it, executed or refused below, so a refused operation
  replayed once it could apply is not executed. TRANSFER: to a registered account
  (``unknown-account``), funds permitting (``insufficient-funds``). STAKE, UNSTAKE,
  WITHDRAW name a node this account operates (``unknown-node``, ``not-your-node``; the
  operator is the one the node's first validly signed registration named, for ever):
  STAKE locks more of the account's tokens (the signed request is the consent); UNSTAKE
  moves stake into ``unbonding:<node>``, released ``unbonding_ms`` (in force at the
  request's broker time) later (``insufficient-stake``); WITHDRAW pays the node's
  earnings and matured unbonding to the operator's account, ``still-bonding`` (with the
  release time) when only unmatured unbonding is left. An amount below 1 (0 for
  WITHDRAW, which takes all) is ``invalid-amount``. Each is one transaction
  ``op/<account>/<nonce>``.
- ProposalSubmitted (signed by the proposer's registered key): escrow ``deposit_micro``
  into ``deposit:<proposal>`` (``deposit/<proposal>``, kept for ever) when it is at least
  ``gov_deposit_micro`` (and at least 1) in force at its record time; else dead-lettered
  (``insufficient-deposit``, ``insufficient-funds``, ``bad-signature``,
  ``unregistered-account``, ``duplicate-proposal``).
- ProposalDecided (signed by governance): the deposit back to the proposer (REFUND,
  ``deposit-refund/<proposal>``), to ``burned`` (BURN, kind ``burn``,
  ``burn/<proposal>``), or nowhere (NONE). It takes what the deposit holds: once.
- ParameterChanged (signed by governance): the ledger's ``ParamSchedule`` follows it;
  ``fee_bps``, ``unbonding_ms`` and ``gov_deposit_micro`` are read in force at the
  deciding record's time.

Nothing is paid twice: escrow, mint and slash are refused twice by the ids the
ledger keeps until they expire (``escrow/<task>`` as ``task/<task>``,
``mint/<event>``, ``slash/<event>``), a stake by ``stake/<node>`` (kept: one
per node), a deposit by ``deposit/<proposal>`` (kept), an account's operation by
its nonce (``op/<account>/<nonce>``; the last nonce per account is kept); a
settlement, a refund or a deposit's release needs no id, as it takes what the
escrow or deposit still holds and the first one leaves it at zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from allocator.pricing import PriceBook, PriceUpdate, task_price
from destra.crypto import verify_event
from destra.errors import DestraError
from ledger.book import (
    BURNED,
    MINT,
    Book,
    InsufficientFunds,
    LedgerError,
    Posting,
    Share,
    Transaction,
    deposit,
    deposit_release_tx,
    deposit_tx,
    escrow,
    escrow_tx,
    mint_tx,
    refund_tx,
    release_of,
    settle_tx,
    slash_tx,
    stake,
    stake_tx,
    transfer_tx,
    unbonding,
    unstake_tx,
    user,
    withdraw_tx,
)
from ledger.events import entry_events
from ledger.horizon import Horizon
from schemas import Event, new_event
from schemas.bindings import stake_consent_valid
from streams.params import ParamSchedule
from streams.processing import Context, Outcome, Recovery
from streams.topics import topic_for

PRICE_GRACE_MS = 300_000
"""A quote made at the price of up to this long before the submission is honoured."""

CLOCK_SKEW_MS = 5_000
"""How far the network's clocks (the quote service's, the brokers') may disagree: a
submission appended up to this long after its quote's expiry still counts."""

MAX_SUBMISSION_AGE_MS = 600_000
"""A submission appended more than this long after it was made is refused, whatever its
quote says (a quote's expiry is the submitter's to copy, so it alone bounds nothing)."""

MAX_FUTURE_MS = 60_000
"""An input made more than this long after the broker appended it is refused: its
``occurred_at`` is the producer's clock, and a date far ahead would keep it fresh."""

MAX_AUTHORITY_AGE_MS = 600_000
"""A mint or a penalty appended more than this long after it was made is refused: the
services send them at once (the runner's producer gives up after 14 s)."""

ID_FREE_REFUSALS = frozenset({"stale-submission", "future-submission", "invalid-id",
                              "bad-signature", "unregistered-account", "wrong-key"})
"""The refusals of a submission decided before its task id is taken (``_submitted``): not
validly signed by its account's registered key, or judged by age alone."""

BROKER_TIMED = ("TaskSubmitted", "TokensMinted", "NodePenalized")
"""The ledger's inputs that move money by id; their topics stamp broker time."""
assert all(topic_for(name).broker_time for name in BROKER_TIMED)


def _unstorable(*ids: str) -> bool:
    """Whether an id holds a NUL, which no PostgreSQL text can: an entry naming it would be
    refused by the Postgres ledger (dead-lettered), so it moves no money here either."""
    return any("\x00" in i for i in ids)


MAX_TX_ID = 120
"""The longest transaction id a money operation or a deposit may make: its entries' ids
add ``/<leg>`` and the schema holds both to 128 characters."""


def proposal_staleness(e: Event, at: int) -> str | None:
    """Why a ``ProposalSubmitted`` appended at broker time ``at`` is too old or too far
    ahead to take (the ledger and governance judge alike), or None. A proposal refused
    for want of funds leaves no id behind, so a copy replayed once its proposer is funded
    would escrow a deposit the proposer was told was refused: by age, only within
    ``MAX_SUBMISSION_AGE_MS`` of its making, as a task's submission."""
    return age_refusal(e, at, MAX_SUBMISSION_AGE_MS, e.fields["proposal_id"],
                       "stale-proposal", "future-proposal")


def age_refusal(e: Event, at: int, max_age_ms: int, what: str, stale: str,
                future: str) -> str | None:
    """``stale: ...`` when ``e`` was made more than ``max_age_ms`` before broker time
    ``at``, ``future: ...`` when more than ``MAX_FUTURE_MS`` after it, else None."""
    if at - e.occurred_at > max_age_ms:
        return (f"{stale}: {what} made at {e.occurred_at}, appended at {at} (broker time), "
                f"more than {max_age_ms} ms later")
    if e.occurred_at - at > MAX_FUTURE_MS:
        return f"{future}: {what} made at {e.occurred_at}, appended at {at} (broker time)"
    return None


def node_wallet(node_id: str) -> str:
    """The account a node's earnings are paid into."""
    return f"node:{node_id}"


@dataclass(frozen=True)
class TaskTerms:
    """What the ledger must remember of a submission to settle it later."""

    payer: str
    compute_units: int
    replicas: int
    trust: str = "fixed"
    """``adaptive``: escalation rounds may bring more agreeing replicas than the escrow
    bought; they share it by compute (``settle_tx``'s ``pro_rata``)."""


@dataclass
class LedgerDecider:
    """Folds domain events into decisions; its state is rebuilt by replaying its inputs."""

    producer_id: str
    network: str = ""
    """The network's name (its topic prefix): a stake consent counts on its network only."""
    book: Book = field(default_factory=Book)
    tasks: dict[str, TaskTerms] = field(default_factory=dict)
    account_keys: dict[str, bytes] = field(default_factory=dict)
    """The signing key each registered account is bound to (``AccountRegistered``): one per
    account, kept for ever (an account id is never bound twice)."""
    prices: PriceBook = field(default_factory=PriceBook)
    horizon: Horizon = field(default_factory=lambda: Horizon(
        {name: topic_for(name).partitions for name in BROKER_TIMED}, margin_ms=CLOCK_SKEW_MS))
    """The ids of the submissions, mints and penalties seen, until each can no longer recur."""
    params: ParamSchedule = field(default_factory=ParamSchedule)
    """The live parameters (``streams.params``): start values, then each
    ``ParameterChanged``; read in force at the deciding record's time."""
    nonces: dict[str, int] = field(default_factory=dict)
    """The last nonce each account's operations took (``AccountOperation``): kept for ever,
    one per account."""
    operators: dict[str, str] = field(default_factory=dict)
    """Each node's operator, from its first validly node-signed registration: kept for
    ever, one per node."""
    bonding: dict[str, dict[int, int]] = field(default_factory=dict)
    """Each node's unbonding tranches: release time -> micro-tokens (they sum to the
    balance of ``unbonding:<node>``)."""
    proposals: dict[str, str] = field(default_factory=dict)
    """The proposer of each proposal whose deposit is held."""
    recent: set[str] = field(default_factory=set)
    """The transaction ids posted since the last checkpoint (``checkpoint_taken``): a rebuild
    skips the entries of the checkpoint's own batch, already in its state."""

    name = "ledger"
    inputs = frozenset({"TaskSubmitted", "TaskVerified", "NodePenalized", "TokensMinted",
                        "NodeRegistered", "PriceUpdated", "TaskFailed", "AccountRegistered",
                        "AccountOperation", "ProposalSubmitted", "ProposalDecided",
                        "ParameterChanged"})
    recovery = Recovery.REPLAY
    """Rebuilt from its latest checkpoint (``checkpoint_state``, written every 30 s, bounded
    by the work in flight) and its own entries, refusals, the prices and the submissions
    since (``ledger.processor.rebuild``)."""

    def handle(self, event: Event, ctx: Context) -> Outcome:
        """One input event (``streams.processing``) at its record time: the entries and
        rejections it causes, or its refusal (a stale or future-dated mint or penalty)."""
        partition = ctx.origin.partition if ctx.origin is not None else None
        return self.judge(event, ctx.now_ms, partition)

    def tick(self, ctx: Context) -> Outcome:
        """The ledger has no deadlines."""
        return Outcome()

    def decide(self, event: Event) -> list[Event]:
        """The events this one causes (empty when it moves no money, was seen or is
        refused), judged at its own ``occurred_at``: for tests and tools."""
        return self.judge(event).emit

    def judge(self, event: Event, at_ms: int | None = None,
              partition: int | None = None) -> Outcome:
        """What ``event``, read at broker time ``at_ms`` (None: its ``occurred_at``) from
        ``partition`` of its topic, causes. Advances its topic's watermark first, which
        lets go of the ids that can no longer recur."""
        at = event.occurred_at if at_ms is None else at_ms
        if event.name in BROKER_TIMED:
            self.horizon.observe(event.name, partition, at)
        handler = getattr(self, f"_on_{event.name}", None)
        if handler is None:
            return Outcome()
        return handler(event, at)  # type: ignore[no-any-return]

    def _post(self, tx: Transaction, at: int, *, remember: bool = False) -> list[Event]:
        """Apply ``tx`` and its entries, stamped ``at`` (the deciding record's time).
        ``remember``: the book keeps its id for ever (a stake); other ids are kept
        in ``horizon`` by the caller, or not at all (settle, refund)."""
        if not tx.postings or not self.book.apply(tx, remember=remember):
            return []
        self.recent.add(tx.transaction_id)
        return entry_events(tx, self.producer_id, at)

    def _stale_authority(self, e: Event, at: int) -> str | None:
        """Why a mint or penalty is too old or too far ahead of broker time ``at``, or None."""
        return age_refusal(e, at, MAX_AUTHORITY_AGE_MS, f"{e.name} {e.event_id}", "stale",
                           "future-dated")

    def registration_refusal(self, e: Event) -> str | None:
        """Why an ``AccountRegistered`` binds nothing, or None (it binds, or is a repeat)."""
        f = e.fields
        account, key = f["account_id"], f["signing_key"]
        if _unstorable(account):
            return ("invalid-account: an account id with a NUL character, which no ledger "
                    "can store (PostgreSQL text)")
        if not verify_event(e, key, account):
            return (f"bad-signature: registration of {account} is not signed by {account} "
                    "with the key it registers")
        bound = self.account_keys.get(account)
        if bound is not None and bound != key:
            return f"account-taken: account {account} is registered to another signing key"
        return None

    def _on_AccountRegistered(self, e: Event, at: int) -> Outcome:  # noqa: N802
        refusal = self.registration_refusal(e)
        if refusal is not None:
            return Outcome.refuse(e, refusal)
        self.account_keys.setdefault(e.fields["account_id"], e.fields["signing_key"])
        return Outcome()

    def register(self, e: Event) -> None:
        """Recall a registration read after the checkpoint (state rebuild on start)."""
        if self.registration_refusal(e) is None:
            self.account_keys.setdefault(e.fields["account_id"], e.fields["signing_key"])

    def _on_TokensMinted(self, e: Event, at: int) -> Outcome:  # noqa: N802 - named for the event
        f = e.fields
        key = f"mint/{e.event_id}"
        refusal = self._stale_authority(e, at)
        if refusal is not None:
            return Outcome.refuse(e, refusal)
        if key in self.horizon or key in self.book.applied:
            return Outcome()
        # Signed by the treasury (the runner's authority check) and fresh: its id is taken
        # whatever is decided below, credited or refused, so a copy replayed within its
        # validity (after the account registered) is not credited. A rebuild derives it
        # from the mints read alone (``recall_mint``): it depends on nothing else.
        self.horizon.keep(key, e.name, e.occurred_at + MAX_AUTHORITY_AGE_MS)
        if _unstorable(f["account"]):
            return Outcome.refuse(e, "invalid-mint: an account id with a NUL character, "
                                     "which no ledger can store (PostgreSQL text)")
        if f["account"] not in self.account_keys:
            return Outcome.refuse(e, f"unregistered-account: mint {e.event_id} to account "
                                     f"{f['account']}, which is not registered; no money "
                                     "moved, and its id is taken: mint again with a new "
                                     "event once the ledger has read the registration")
        try:
            tx = mint_tx(key, user(f["account"]), f["amount_micro"])
        except LedgerError as err:
            return Outcome.refuse(e, f"invalid-mint: {err}")
        return Outcome.of(self._post(tx, at))

    def recall_mint(self, mint: Event, at: int) -> None:
        """Recall a mint the live run read after the checkpoint (state rebuild on start),
        appended at broker time ``at``: one that passed the authority check and was fresh
        took its id, credited or refused (``_on_TokensMinted``). Only mints the live run
        decided (below its last committed positions) may be recalled: one not read yet
        must find its id free."""
        if self._stale_authority(mint, at) is None:
            self.horizon.keep(f"mint/{mint.event_id}", mint.name,
                              mint.occurred_at + MAX_AUTHORITY_AGE_MS)

    @staticmethod
    def submission_expiry(e: Event) -> int:
        """The broker time after which a submission is stale (refused by age)."""
        f = e.fields
        return min(f["quote_expires_at"] + CLOCK_SKEW_MS, e.occurred_at + MAX_SUBMISSION_AGE_MS)

    @staticmethod
    def submission_id_expiry(e: Event) -> int:
        """The broker time until which a submission's task id, once taken, is kept: its
        whole ``MAX_SUBMISSION_AGE_MS``, not just its quote. Any copy appended before then
        finds it (ignored: the first submission stands); any copy after is dead-lettered
        by age. So no copy of a decided submission ever fails its task."""
        return e.occurred_at + MAX_SUBMISSION_AGE_MS

    def _on_TaskSubmitted(self, e: Event, at: int) -> Outcome:  # noqa: N802
        f = e.fields
        if at - e.occurred_at > MAX_SUBMISSION_AGE_MS and f["task_id"] not in self.tasks:
            # No live submitter waits for it (a client's producer gives up on a record after
            # 2 minutes): a replay, maybe of a task verified long ago whose id is forgotten.
            # A TaskFailed would tell every reader of the verdicts that task failed.
            return Outcome.refuse(e, f"stale-submission: task {f['task_id']} made at "
                                     f"{e.occurred_at}, appended at {at} (broker time), more "
                                     f"than {MAX_SUBMISSION_AGE_MS} ms later: a replay; "
                                     "nothing escrowed, no verdict")
        return Outcome.of(self._submitted(e, at))

    def _submitted(self, e: Event, at: int) -> list[Event]:
        f = e.fields
        task_id, payer = f["task_id"], user(f["submitter_id"])
        if task_id in self.tasks:
            return []  # escrowed and in flight: the first submission stands
        if f"task/{task_id}" in self.horizon or f"escrow/{task_id}" in self.book.applied:
            # A resubmitted id, fresh or stale: the first submission stands, refused or
            # escrowed (a stale copy of a verified task must not fail it).
            return []
        price = f["quoted_price_micro"]
        reason: tuple[str, str] | None = None
        expiry = self.submission_expiry(e)
        if at > expiry:
            # Made within MAX_SUBMISSION_AGE_MS and never seen: a live submitter whose
            # record reached the broker after its quote expired; it waits for the verdict.
            reason = ("stale-submission", f"task {task_id} appended at {at} (broker time), "
                      f"after {expiry}: its quote {f['quote_id']} expired at "
                      f"{f['quote_expires_at']}, made at {e.occurred_at}")
        elif e.occurred_at - at > MAX_FUTURE_MS:
            reason = ("future-submission", f"task {task_id} made at {e.occurred_at}, "
                      f"appended at {at} (broker time)")
        if reason is None and _unstorable(task_id, payer):
            reason = ("invalid-id", "a task or account id with a NUL character: no ledger "
                                    "can store it (PostgreSQL text)")
        reason = reason or self._check_signature(e)
        if reason is None:
            # Signed by the account's key: its id is taken, whatever is decided below.
            self.horizon.keep(f"task/{task_id}", e.name, self.submission_id_expiry(e))
        reason = reason or self._check_commitment(e)
        reason = reason or self._check_price(e)
        if reason is None and f["quote_expires_at"] < e.occurred_at:
            reason = ("quote-expired", f"quote {f['quote_id']} expired at "
                      f"{f['quote_expires_at']}, submitted at {e.occurred_at}")
        if reason is None and price > f["max_price_micro"]:
            reason = ("over-max-price", f"quoted {price} > max price {f['max_price_micro']}")
        if reason is None:
            try:
                tx = escrow_tx(f"escrow/{task_id}", task_id, payer, price,
                               self.book.balance(payer))
            except InsufficientFunds as err:
                reason = ("insufficient-funds", str(err))
            except DestraError as err:
                reason = ("invalid-price", str(err))
        if reason is not None:
            return [new_event("TaskFailed", self.producer_id, occurred_at=at, task_id=task_id,
                              reason=reason[0], detail=reason[1])]
        self.tasks[task_id] = TaskTerms(payer, f["compute_units"], f["replicas"], f["trust"])
        return self._post(tx, at)

    def _check_signature(self, e: Event) -> tuple[str, str] | None:
        """Why a submission's signature does not count, or None: it must be signed by the
        key it carries, and that the key its account registered."""
        f = e.fields
        account, key = f["submitter_id"], f["signing_key"]
        if not verify_event(e, key, account):
            return ("bad-signature", f"task {f['task_id']} is not signed by {account} "
                                     "with the key it carries")
        bound = self.account_keys.get(account)
        if bound is None:
            return ("unregistered-account", f"account {account} is not registered "
                                            "(AccountRegistered)")
        if bound != key:
            return ("wrong-key", f"account {account} is registered to another signing key")
        return None

    @staticmethod
    def _check_commitment(e: Event) -> tuple[str, str] | None:
        """Why a sealed submission cannot be taken, or None: sealed inputs (inline or by
        reference) need the submitter's 32-byte commitment to the data key, else a node
        granted a wrong key could not prove it and would be judged for the submitter's
        fault."""
        f = e.fields
        sealed = bool(f.get("payload")) or bool(f.get("payload_ref"))
        commitment = f.get("data_key_commitment") or b""
        if sealed and len(commitment) != 32:
            return ("no-data-key-commitment",
                    f"task {f['task_id']} has sealed inputs but "
                    + ("no data-key commitment" if not commitment else
                       f"a {len(commitment)}-byte data-key commitment (32 needed)")
                    + ": a wrong data key could not be told from a node's fault")
        return None

    def _check_price(self, e: Event) -> tuple[str, str] | None:
        """Why the quoted price is not the network's, or None."""
        f = e.fields
        try:
            # The lowest price in force during the grace: a quote (valid at most that long)
            # made before a rise is honoured after it.
            unit = self.prices.lowest(f["tier"], e.occurred_at - PRICE_GRACE_MS, e.occurred_at)
            floor = task_price(f["compute_units"], f["replicas"], unit, f["trust"])
        except DestraError as err:
            return ("invalid-price", str(err))
        if f["quoted_price_micro"] < floor:
            return ("price-below-quote", f"quoted {f['quoted_price_micro']} < network price "
                                         f"{floor} for {f['compute_units']} units x "
                                         f"{f['replicas']} replicas in {f['tier']}")
        return None

    def _on_PriceUpdated(self, e: Event, at: int) -> Outcome:  # noqa: N802
        f = e.fields
        try:
            self.prices.apply(PriceUpdate(f["tier"], f["price_per_unit_micro"],
                                          f["effective_at"]))
        except DestraError:
            pass  # an unknown tier prices nothing
        return Outcome()

    def bind_operator(self, e: Event) -> bool:
        """Bind a node to the operator its registration names, if validly signed by the
        node and the node has none yet (state rebuild on start too). Whether the
        registration's operator is the node's."""
        f = e.fields
        node, operator = f["node_id"], f["operator_id"]
        if _unstorable(node, operator) or not verify_event(e, f["signing_key"], node):
            return False
        return self.operators.setdefault(node, operator) == operator

    def _on_NodeRegistered(self, e: Event, at: int) -> Outcome:  # noqa: N802
        f = e.fields
        node, amount = f["node_id"], f["stake_micro"]
        if _unstorable(node, f["operator_id"]):
            return Outcome()  # no ledger could store its stake's entries: it runs unstaked
        if not verify_event(e, f["signing_key"], node):
            return Outcome()
        if not self.bind_operator(e):
            if amount <= 0 or f"stake/{node}" in self.book.applied:
                return Outcome()
            return Outcome.refuse(e, f"operator-taken: node {node} is operated by "
                                     f"{self.operators[node]}, not {f['operator_id']}; "
                                     "no stake locked")
        if amount <= 0 or f"stake/{node}" in self.book.applied:
            return Outcome()
        operator_key = self.account_keys.get(f["operator_id"])
        if operator_key is None:
            return Outcome.refuse(e, f"no-stake-consent: node {node} names operator "
                                     f"{f['operator_id']}, not a registered account; it "
                                     "runs unstaked")
        if not stake_consent_valid(e, self.network, operator_key):
            return Outcome.refuse(e, f"no-stake-consent: node {node}'s stake of {amount} is "
                                     f"not consented to by operator {f['operator_id']}'s "
                                     "registered key; it runs unstaked")
        payer = user(f["operator_id"])
        try:
            tx = stake_tx(f"stake/{node}", node, payer, amount, self.book.balance(payer))
        except DestraError:
            return Outcome()  # the operator cannot cover it: the node runs unstaked
        return Outcome.of(self._post(tx, at, remember=True))

    def _on_TaskVerified(self, e: Event, at: int) -> Outcome:  # noqa: N802
        task_id = e.fields["task_id"]
        terms = self.tasks.get(task_id)
        held = self.book.balance(escrow(task_id))
        if terms is None or held == 0:
            return Outcome()  # not escrowed here, or already settled: no id needed
        shares = [Share(node_wallet(c["node_id"]), c["compute_units"])
                  for c in e.fields["contributions"] if c["agreed"]]
        try:
            # Checked whole before anything moves: shares beyond what the escrow bought
            # (a verifier's error, or its key misused) pay nobody and leave the escrow
            # held, the verdict dead-lettered with the reason.
            fee_bps = self.params.value("fee_bps", at)
            out = self._post(settle_tx(f"settle/{task_id}", task_id, terms.payer, held,
                                       terms.compute_units * terms.replicas, shares,
                                       fee_bps, pro_rata=terms.trust == "adaptive"), at)
        except LedgerError as err:
            return Outcome.refuse(e, f"unpayable-verdict: {err}")
        self.tasks.pop(task_id, None)  # settled: escrow at zero, its terms go
        return Outcome.of(out)

    def _on_TaskFailed(self, e: Event, at: int) -> Outcome:  # noqa: N802
        task_id = e.fields["task_id"]
        terms = self.tasks.get(task_id)
        held = self.book.balance(escrow(task_id))
        if terms is None or held == 0:
            return Outcome()  # a rejection this ledger made itself, or already refunded
        out = self._post(refund_tx(f"refund/{task_id}", task_id, terms.payer, held), at)
        self.tasks.pop(task_id, None)
        return Outcome.of(out)

    def _on_NodePenalized(self, e: Event, at: int) -> Outcome:  # noqa: N802
        f = e.fields
        node, key = f["node_id"], f"slash/{e.event_id}"
        refusal = self._stale_authority(e, at)
        if refusal is not None:
            return Outcome.refuse(e, refusal)
        if key in self.horizon or key in self.book.applied:
            return Outcome()
        # Kept even when the stake is empty: replayed after a new stake, it must not slash.
        self.horizon.keep(key, e.name, e.occurred_at + MAX_AUTHORITY_AGE_MS)
        tx = slash_tx(key, node, f["task_id"], f["slash_micro"], self.book.balance(stake(node)),
                      self.book.balance(unbonding(node)))
        out = self._post(tx, at)
        if out:
            self._unbond_taken(tx)
        return Outcome.of(out)

    def _unbond_taken(self, tx: Transaction) -> None:
        """Follow ``tx``'s postings on unbonding accounts in the tranches (``bonding``): an
        unstake adds a tranche at its release time; a slash takes from the tranches released
        last, a withdrawal from those released first (the matured ones)."""
        for p in tx.postings:
            if not p.account.startswith("unbonding:"):
                continue
            node = p.account.partition(":")[2]
            tranches = self.bonding.setdefault(node, {})
            if p.amount_micro > 0:
                release = release_of(tx.memo)
                if release is None:
                    raise LedgerError(f"{tx.transaction_id}: unbonding without a release time")
                tranches[release] = tranches.get(release, 0) + p.amount_micro
            else:
                left = -p.amount_micro
                for release in sorted(tranches, reverse=p.kind == "slash"):
                    taken = min(left, tranches[release])
                    tranches[release] -= taken
                    left -= taken
                    if tranches[release] == 0:
                        del tranches[release]
                    if left == 0:
                        break
            if not tranches:
                del self.bonding[node]

    # -- accounts' own operations -------------------------------------------------------

    def _on_AccountOperation(self, e: Event, at: int) -> Outcome:  # noqa: N802
        f = e.fields
        account, nonce, op = f["account"], f["nonce"], f["operation"]
        if _unstorable(account, f["target"], f["memo"]):
            return Outcome.refuse(e, "invalid-id: an id or memo with a NUL character, which "
                                     "no ledger can store (PostgreSQL text)")
        if len(f"op/{account}/{nonce}") > MAX_TX_ID:
            return Outcome.refuse(e, f"invalid-id: account id {account[:20]}... too long for "
                                     f"an operation's transaction id ({MAX_TX_ID} characters)")
        refusal = self._op_signature(e)
        if refusal is not None:
            return Outcome.refuse(e, refusal)
        last = self.nonces.get(account, 0)
        if nonce <= last:
            return Outcome.refuse(e, f"replay: {op} by {account} with nonce {nonce}, not above "
                                     f"its last nonce {last}")
        # Validly signed and new: its nonce is taken whatever is decided below. A rebuild
        # derives it from the operations read alone (``recall_op``).
        self.nonces[account] = nonce
        tx_id = f"op/{account}/{nonce}"
        try:
            tx = self._operation(e, tx_id, at)
        except LedgerError as err:
            return Outcome.refuse(e, str(err))
        out = self._post(tx, at)
        self._unbond_taken(tx)
        return Outcome.of(out)

    def _op_signature(self, e: Event) -> str | None:
        """Why an operation is not its account's (its nonce not taken), or None."""
        account = e.fields["account"]
        key = self.account_keys.get(account)
        if key is None:
            return f"unregistered-account: account {account} is not registered"
        if not verify_event(e, key, account):
            return (f"bad-signature: {e.fields['operation']} is not signed by {account} with "
                    "its registered key")
        return None

    def _operation(self, e: Event, tx_id: str, at: int) -> Transaction:
        """The transaction an operation makes; ``LedgerError`` with the refusal's reason."""
        f = e.fields
        account, op, target, amount = f["account"], f["operation"], f["target"], f["amount_micro"]
        payer = user(account)
        if op == "WITHDRAW" and amount != 0:
            raise LedgerError(f"invalid-amount: a withdrawal takes everything available; "
                              f"amount_micro must be 0, got {amount}")
        if op != "WITHDRAW" and amount < 1:
            raise LedgerError(f"invalid-amount: {op} of {amount} micro-tokens")
        if op == "TRANSFER":
            if target not in self.account_keys:
                raise LedgerError(f"unknown-account: {target} is not a registered account")
            if self.book.balance(payer) < amount:
                raise LedgerError(f"insufficient-funds: {account} has "
                                  f"{self.book.balance(payer)} micro-tokens, transfer of "
                                  f"{amount}")
            return transfer_tx(tx_id, payer, user(target), amount, self.book.balance(payer),
                               f["memo"])
        operator = self.operators.get(target)
        if operator is None:
            raise LedgerError(f"unknown-node: node {target} has no valid registration")
        if operator != account:
            raise LedgerError(f"not-your-node: node {target} is operated by {operator}, "
                              f"not {account}")
        if op == "STAKE":
            if self.book.balance(payer) < amount:
                raise LedgerError(f"insufficient-funds: {account} has "
                                  f"{self.book.balance(payer)} micro-tokens, stake of {amount}")
            return stake_tx(tx_id, target, payer, amount, self.book.balance(payer))
        if op == "UNSTAKE":
            held = self.book.balance(stake(target))
            if held < amount:
                raise LedgerError(f"insufficient-stake: node {target} has {held} staked, "
                                  f"unstake of {amount}")
            release = at + self.params.value("unbonding_ms", at)
            return unstake_tx(tx_id, target, payer, amount, held, release)
        if op == "WITHDRAW":
            tranches = self.bonding.get(target, {})
            matured = sum(v for t, v in tranches.items() if t <= at)
            pending = sorted(t for t in tranches if t > at)
            earnings = self.book.balance(node_wallet(target))
            if earnings + matured == 0:
                if pending:
                    raise LedgerError(f"still-bonding: node {target}'s "
                                      f"{sum(tranches[t] for t in pending)} unbonding "
                                      f"micro-tokens are released at {pending[0]} at the "
                                      f"earliest; now {at}")
                raise LedgerError(f"nothing-to-withdraw: node {target} has no earnings and "
                                  "no unbonding")
            memo = (f"withdraw of node {target}: {earnings} earned, {matured} unbonded"
                    + (f"; {sum(tranches[t] for t in pending)} still bonding until "
                       f"{pending[-1]}" if pending else ""))
            return withdraw_tx(tx_id, target, payer, earnings, matured, memo)
        raise LedgerError(f"invalid-operation: {op}")

    def recall_op(self, op: Event, at: int) -> None:
        """Recall an operation the live run read after the checkpoint (state rebuild on
        start): one validly signed by its account's registered key with a nonce above the
        last took it, executed or refused (``_on_AccountOperation``). Only operations the
        live run decided (below its last committed positions) may be recalled."""
        f = op.fields
        if (_unstorable(f["account"], f["target"], f["memo"]) or self._op_signature(op)
                or len(f"op/{f['account']}/{f['nonce']}") > MAX_TX_ID):
            return
        if f["nonce"] > self.nonces.get(f["account"], 0):
            self.nonces[f["account"]] = f["nonce"]

    # -- governance: deposits and parameters --------------------------------------------

    def _on_ProposalSubmitted(self, e: Event, at: int) -> Outcome:  # noqa: N802
        f = e.fields
        pid, proposer, amount = f["proposal_id"], f["proposer_id"], f["deposit_micro"]
        tx_id = f"deposit/{pid}"
        if _unstorable(pid, proposer) or len(f"deposit-refund/{pid}") > MAX_TX_ID:
            return Outcome.refuse(e, "invalid-id: a proposal or account id with a NUL "
                                     "character, which no ledger can store, or a proposal "
                                     f"id longer than {MAX_TX_ID - 15} characters")
        if tx_id in self.book.applied:
            return Outcome.refuse(e, f"duplicate-proposal: proposal {pid}'s deposit is "
                                     "already taken")
        stale = proposal_staleness(e, at)
        if stale is not None:
            return Outcome.refuse(e, stale)
        key = self.account_keys.get(proposer)
        if key is None:
            return Outcome.refuse(e, f"unregistered-account: proposer {proposer} is not "
                                     "registered")
        if not verify_event(e, key, proposer):
            return Outcome.refuse(e, f"bad-signature: proposal {pid} is not signed by "
                                     f"{proposer} with its registered key")
        minimum = max(1, self.params.value("gov_deposit_micro", at))
        if amount < minimum:
            return Outcome.refuse(e, f"insufficient-deposit: proposal {pid} deposits "
                                     f"{amount}, at least {minimum} needed")
        payer = user(proposer)
        try:
            tx = deposit_tx(tx_id, pid, payer, amount, self.book.balance(payer))
        except LedgerError as err:
            return Outcome.refuse(e, f"insufficient-funds: {err}")
        self.proposals[pid] = proposer
        return Outcome.of(self._post(tx, at, remember=True))

    def _on_ProposalDecided(self, e: Event, at: int) -> Outcome:  # noqa: N802
        f = e.fields
        pid, action = f["proposal_id"], f["deposit"]
        proposer = self.proposals.get(pid)
        held = self.book.balance(deposit(pid))
        if proposer is None or held == 0 or action == "NONE":
            return Outcome()  # no deposit held here (or kept), or already released
        if action == "BURN":
            tx = deposit_release_tx(f"burn/{pid}", pid, BURNED, held)
        else:
            tx = deposit_release_tx(f"deposit-refund/{pid}", pid, user(proposer), held)
        out = self._post(tx, at)
        self.proposals.pop(pid, None)
        return Outcome.of(out)

    def _on_ParameterChanged(self, e: Event, at: int) -> Outcome:  # noqa: N802
        refusal = self.params.follow(e)
        return Outcome.refuse(e, refusal) if refusal else Outcome()

    def restore(self, entry: Event) -> None:
        """Re-apply one of this ledger's own earlier entries (state rebuild on start).

        Its transaction's id is kept as the deciding input's would be. The input is not
        at hand, so its expiry is bounded from the entry's time (the input's record time,
        ``entry_events``): never earlier than the input's own, so it is kept at least as
        long; ``remember`` gives a submission's exact one."""
        f = entry.fields
        tx = f["transaction_id"]
        self.book.balances[f["account"]] = self.book.balance(f["account"]) + f["amount_micro"]
        kind, _, ref = tx.partition("/")
        account, amount = f["account"], f["amount_micro"]
        if account.startswith("unbonding:"):
            # Every entry of one account is on one partition, in the order it was posted:
            # the tranches follow as they did live.
            self._unbond_taken(Transaction(tx, (Posting(account, amount, f["kind"]),
                                                Posting(MINT, -amount, f["kind"])),
                                           memo=f["memo"]))
        if kind == "stake":
            self.book.applied.add(tx)
            if account.startswith("user:"):  # the operator who staked it at registration
                self.operators.setdefault(ref, account.partition(":")[2])
        elif kind == "op":
            holder, _, nonce = ref.rpartition("/")
            if nonce.isdigit() and int(nonce) > self.nonces.get(holder, 0):
                self.nonces[holder] = int(nonce)
        elif kind == "deposit":
            self.book.applied.add(tx)
            if account.startswith("user:"):  # released already or not: checkpoints and
                self.proposals[ref] = account.partition(":")[2]  # decisions look at the
                # deposit's balance, whichever partition was read first

        elif kind in ("deposit-refund", "burn") and self.book.balance(deposit(ref)) == 0:
            self.proposals.pop(ref, None)
        elif kind == "escrow":
            self.horizon.keep(f"task/{ref}", "TaskSubmitted",
                              entry.occurred_at + MAX_FUTURE_MS + MAX_SUBMISSION_AGE_MS)
        elif kind in ("mint", "slash"):
            self.horizon.keep(tx, "TokensMinted" if kind == "mint" else "NodePenalized",
                              entry.occurred_at + MAX_FUTURE_MS + MAX_AUTHORITY_AGE_MS)
        elif kind in ("settle", "refund") and self.book.balance(escrow(ref)) == 0:
            self.tasks.pop(ref, None)  # settled after the checkpoint: no longer in flight

    def remember(self, submission: Event) -> None:
        """Recall the terms of a submission escrowed before a restart (after ``restore``)."""
        f = submission.fields
        key = f"task/{f['task_id']}"
        if key in self.horizon:  # escrowed (restored) or refused: its exact expiry
            self.horizon.expires.pop(key)
            self.horizon.keep(key, "TaskSubmitted", self.submission_id_expiry(submission))
        if self.book.balance(escrow(f["task_id"])) > 0:  # escrowed, not settled yet
            self.tasks[f["task_id"]] = TaskTerms(user(f["submitter_id"]), f["compute_units"],
                                                 f["replicas"], f["trust"])

    def refused(self, rejection: Event) -> None:
        """Recall a submission this ledger refused before a restart (its ``TaskFailed``), so
        a copy replayed within its freshness is not escrowed. Its expiry is bounded from the
        rejection's time, which is no earlier than the submission's record time. A refusal
        decided before the id was taken (``ID_FREE_REFUSALS``) took none live, so none here
        either: a rebuild decides as the live run did."""
        if rejection.fields["reason"] in ID_FREE_REFUSALS:
            return
        self.horizon.keep(f"task/{rejection.fields['task_id']}", "TaskSubmitted",
                          rejection.occurred_at + MAX_FUTURE_MS + MAX_SUBMISSION_AGE_MS)

    def checkpoint_state(self) -> dict[str, Any]:
        """What a restart needs, bounded by the work in flight, not by history: tasks whose
        escrow is settled and accounts at zero are left out (a balance absent is zero); the
        ids of submissions, mints and penalties only until they expire (``horizon``); the
        transaction ids posted since the last checkpoint, so the rebuild skips this batch's
        entries, already in the state. Call ``checkpoint_taken`` once it is written."""
        return {"balances": {a: b for a, b in self.book.balances.items() if b != 0},
                "applied": set(self.book.applied), "recent": set(self.recent),
                "horizon": self.horizon.state(), "prices": self.prices,
                "account_keys": dict(self.account_keys),
                "params": self.params.state(), "nonces": dict(self.nonces),
                "operators": dict(self.operators),
                "bonding": {n: dict(t) for n, t in self.bonding.items()},
                "proposals": {p: who for p, who in self.proposals.items()
                              if self.book.balance(deposit(p)) > 0},
                "tasks": {t: terms for t, terms in self.tasks.items()
                          if self.book.balance(escrow(t)) > 0}}

    def checkpoint_taken(self) -> None:
        """A checkpoint was taken: ``recent`` starts again (a later checkpoint's batch
        comes after every entry posted so far)."""
        self.recent.clear()

    def restore_state(self, state: dict[str, Any]) -> None:
        """Take over a state ``checkpoint_state`` returned. One written before ids expired
        has every id in ``applied``: each skips the rebuild; the settlements' and refunds'
        are dropped, the others kept (they no longer grow)."""
        self.book.balances = dict(state["balances"])
        self.book.applied = {i for i in state["applied"]
                             if not i.startswith(("settle/", "refund/"))}
        self.recent = set(state.get("recent", state["applied"]))
        if "horizon" in state:
            self.horizon.load(state["horizon"])
        self.prices = state["prices"]
        self.account_keys = dict(state["account_keys"])
        self.tasks = dict(state["tasks"])
        if "params" in state:
            self.params = ParamSchedule.load(state["params"])
        self.nonces = dict(state.get("nonces", {}))
        self.operators = dict(state.get("operators", {}))
        self.bonding = {n: dict(t) for n, t in state.get("bonding", {}).items()}
        self.proposals = dict(state.get("proposals", {}))
