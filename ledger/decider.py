"""The ledger's decisions: which money moves each domain event causes.

Pure and deterministic: given the same events in the same order it emits the
same LedgerEntryPosted (and rejection TaskFailed) events. The decisions are
recorded as events, so the Postgres projection only folds entries and its
replay from offset 0 cannot decide differently from the live run.

Rules:
- TokensMinted: mint to ``user:<account>``.
- TaskSubmitted: reject (TaskFailed) when it is not signed by the key it
  carries, or that key is not the one the account first submitted with; when
  the quote expired before the submission was made (event time, not wall
  clock); when the quoted price is below the network's price for the compute
  (``PriceUpdated``), or exceeds the submitter's max price; when funds are
  short. Else escrow.
- NodeRegistered (signed by the key it registers): lock ``stake_micro`` from
  the operator's account as the node's stake, once per node; an operator
  without the funds gets no stake locked.
- TaskVerified: pay each agreeing replica's node wallet ``node:<id>`` by the
  compute it gave, the network fee to the treasury, the rest back.
- TaskFailed (from the verifier): refund whatever the task still holds.
- NodePenalized: slash the node's stake, never below zero.
Transaction ids derive from the deciding event (``escrow/<task>``), so a
decision made twice is refused by the book: nobody is paid twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from allocator.pricing import PriceBook, PriceUpdate, task_price
from destra.crypto import verify_event
from destra.errors import DestraError
from ledger.book import (
    Book,
    InsufficientFunds,
    Share,
    Transaction,
    escrow,
    escrow_tx,
    mint_tx,
    refund_tx,
    settle_tx,
    slash_tx,
    stake,
    stake_tx,
    user,
)
from ledger.events import entry_events
from schemas import Event, new_event
from streams.processing import Context, Outcome, Recovery

DEFAULT_FEE_BPS = 500
"""The network's fee on payouts: 5 %."""

PRICE_GRACE_MS = 300_000
"""A quote made at the price of up to this long before the submission is honoured."""


def node_wallet(node_id: str) -> str:
    """The account a node's earnings are paid into."""
    return f"node:{node_id}"


@dataclass(frozen=True)
class TaskTerms:
    """What the ledger must remember of a submission to settle it later."""

    payer: str
    compute_units: int
    replicas: int


@dataclass
class LedgerDecider:
    """Folds domain events into decisions; its state is rebuilt by replaying its inputs."""

    producer_id: str
    fee_bps: int = DEFAULT_FEE_BPS
    book: Book = field(default_factory=Book)
    tasks: dict[str, TaskTerms] = field(default_factory=dict)
    account_keys: dict[str, bytes] = field(default_factory=dict)
    """The signing key each account is bound to: the first it submitted a valid task with."""
    prices: PriceBook = field(default_factory=PriceBook)

    name = "ledger"
    inputs = frozenset({"TaskSubmitted", "TaskVerified", "NodePenalized", "TokensMinted",
                        "NodeRegistered", "PriceUpdated", "TaskFailed"})
    recovery = Recovery.REPLAY
    """Rebuilt from its latest checkpoint (``checkpoint_state``, written every 30 s) and
    its own entries, the prices and the submissions since (``ledger.processor.rebuild``)."""

    def handle(self, event: Event, ctx: Context) -> Outcome:
        """One input event (``streams.processing``): the entries it causes."""
        return Outcome.of(self.decide(event))

    def tick(self, ctx: Context) -> Outcome:
        """The ledger has no deadlines."""
        return Outcome()

    def decide(self, event: Event) -> list[Event]:
        """The events this one causes (empty when it moves no money or was seen)."""
        handler = getattr(self, f"_on_{event.name}", None)
        return handler(event) if handler is not None else []

    def _post(self, tx: Transaction) -> list[Event]:
        if not tx.postings or not self.book.apply(tx):
            return []
        return entry_events(tx, self.producer_id)

    def _on_TokensMinted(self, e: Event) -> list[Event]:  # noqa: N802 - named for the event
        f = e.fields
        return self._post(mint_tx(f"mint/{e.event_id}", user(f["account"]), f["amount_micro"]))

    def _on_TaskSubmitted(self, e: Event) -> list[Event]:  # noqa: N802
        f = e.fields
        task_id, payer = f["task_id"], user(f["submitter_id"])
        if task_id in self.tasks or f"escrow/{task_id}" in self.book.applied:
            return []  # a resubmitted id: the first submission stands
        price = f["quoted_price_micro"]
        reason = self._check_signature(e) or self._check_price(e)
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
            return [new_event("TaskFailed", self.producer_id, task_id=task_id,
                              reason=reason[0], detail=reason[1])]
        self.tasks[task_id] = TaskTerms(payer, f["compute_units"], f["replicas"])
        return self._post(tx)

    def _check_signature(self, e: Event) -> tuple[str, str] | None:
        """Why a submission's signature does not count, or None; binds new accounts."""
        f = e.fields
        account, key = f["submitter_id"], f["signing_key"]
        if not verify_event(e, key, account):
            return ("bad-signature", f"task {f['task_id']} is not signed by {account} "
                                     "with the key it carries")
        bound = self.account_keys.setdefault(account, key)
        if bound != key:
            return ("wrong-key", f"account {account} is bound to another signing key")
        return None

    def _check_price(self, e: Event) -> tuple[str, str] | None:
        """Why the quoted price is not the network's, or None."""
        f = e.fields
        try:
            unit = min(self.prices.price_per_unit(f["tier"], e.occurred_at),
                       self.prices.price_per_unit(f["tier"], e.occurred_at - PRICE_GRACE_MS))
            floor = task_price(f["compute_units"], f["replicas"], unit)
        except DestraError as err:
            return ("invalid-price", str(err))
        if f["quoted_price_micro"] < floor:
            return ("price-below-quote", f"quoted {f['quoted_price_micro']} < network price "
                                         f"{floor} for {f['compute_units']} units x "
                                         f"{f['replicas']} replicas in {f['tier']}")
        return None

    def _on_PriceUpdated(self, e: Event) -> list[Event]:  # noqa: N802
        f = e.fields
        try:
            self.prices.apply(PriceUpdate(f["tier"], f["price_per_unit_micro"],
                                          f["effective_at"]))
        except DestraError:
            pass  # an unknown tier prices nothing
        return []

    def _on_NodeRegistered(self, e: Event) -> list[Event]:  # noqa: N802
        f = e.fields
        node, amount = f["node_id"], f["stake_micro"]
        if amount <= 0 or f"stake/{node}" in self.book.applied:
            return []
        if not verify_event(e, f["signing_key"], node):
            return []
        payer = user(f["operator_id"])
        try:
            tx = stake_tx(f"stake/{node}", node, payer, amount, self.book.balance(payer))
        except DestraError:
            return []  # the operator cannot cover it: the node runs unstaked
        return self._post(tx)

    def _on_TaskVerified(self, e: Event) -> list[Event]:  # noqa: N802
        task_id = e.fields["task_id"]
        terms = self.tasks.get(task_id)
        held = self.book.balance(escrow(task_id))
        if terms is None or held == 0:
            return []  # not escrowed here, or already settled
        shares = [Share(node_wallet(c["node_id"]), c["compute_units"])
                  for c in e.fields["contributions"] if c["agreed"]]
        out = self._post(settle_tx(f"settle/{task_id}", task_id, terms.payer, held,
                                   terms.compute_units * terms.replicas, shares, self.fee_bps))
        self.tasks.pop(task_id, None)  # settled: its id stays in ``applied``, its terms go
        return out

    def _on_TaskFailed(self, e: Event) -> list[Event]:  # noqa: N802
        task_id = e.fields["task_id"]
        terms = self.tasks.get(task_id)
        held = self.book.balance(escrow(task_id))
        if terms is None or held == 0:
            return []  # a rejection this ledger made itself, or already refunded
        out = self._post(refund_tx(f"refund/{task_id}", task_id, terms.payer, held))
        self.tasks.pop(task_id, None)
        return out

    def _on_NodePenalized(self, e: Event) -> list[Event]:  # noqa: N802
        f = e.fields
        node = f["node_id"]
        return self._post(slash_tx(f"slash/{e.event_id}", node, f["task_id"], f["slash_micro"],
                                   self.book.balance(stake(node))))

    def restore(self, entry: Event) -> None:
        """Re-apply one of this ledger's own earlier entries (state rebuild on start)."""
        f = entry.fields
        self.book.balances[f["account"]] = self.book.balance(f["account"]) + f["amount_micro"]
        self.book.applied.add(f["transaction_id"])

    def remember(self, submission: Event) -> None:
        """Recall the terms of a submission escrowed before a restart (after ``restore``)."""
        f = submission.fields
        if f["signing_key"] and verify_event(submission, f["signing_key"], f["submitter_id"]):
            self.account_keys.setdefault(f["submitter_id"], f["signing_key"])
        if self.book.balance(escrow(f["task_id"])) > 0:  # escrowed, not settled yet
            self.tasks[f["task_id"]] = TaskTerms(user(f["submitter_id"]), f["compute_units"],
                                                 f["replicas"])

    def checkpoint_state(self) -> dict[str, object]:
        """What a restart needs, without what can no longer matter: tasks whose escrow is
        settled and accounts at zero are left out (a balance absent is zero). It still
        grows with history through the transaction ids applied, which keep a replayed
        or resubmitted task from being escrowed twice."""
        return {"balances": {a: b for a, b in self.book.balances.items() if b != 0},
                "applied": set(self.book.applied), "prices": self.prices,
                "account_keys": dict(self.account_keys),
                "tasks": {t: terms for t, terms in self.tasks.items()
                          if self.book.balance(escrow(t)) > 0}}

    def restore_state(self, state: dict[str, object]) -> None:
        """Take over a state ``checkpoint_state`` returned."""
        self.book.balances = dict(state["balances"])  # type: ignore[call-overload]
        self.book.applied = set(state["applied"])  # type: ignore[call-overload]
        self.prices = state["prices"]  # type: ignore[assignment]
        self.account_keys = dict(state["account_keys"])  # type: ignore[call-overload]
        self.tasks = dict(state["tasks"])  # type: ignore[call-overload]
