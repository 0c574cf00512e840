"""The market: demand-driven prices per tier, emitted as ``PriceUpdated``.

A processor behind the processing contract (``streams.processing``), run in the
processors worker's allocator unit (``destra.processors``), its outputs signed by the
``pricing`` role. It reads

* ``TaskSubmitted`` / ``TaskAssigned`` / ``TaskFailed`` / ``TaskVerified``: the queue of
  each tier (submitted, not yet placed) and the wait to placement (the first
  ``TaskAssigned``'s time minus the submission's record time). A submission counts as
  demand only once the ledger has escrowed it (its ``escrow:<task>`` entry, as the
  allocator waits for): a forged, unpaid or replayed submission, which the ledger
  refuses or ignores without always saying so (a stale replay is dead-lettered), moves
  no price;
* ``NodeRegistered`` / ``NodeHeartbeat``: the capacity of each tier (the slots of the
  live nodes selling in it, ``effective_tier``) and how many are busy (the node's own
  count in its last heartbeat, plus what was assigned to it since). A registration must
  be signed by the key it registers and a heartbeat by that key, with a rising ``seq``,
  as the allocator requires: nobody moves a price with forged capacity;
* ``PriceUpdated``: its own outputs, so a restarted or second instance starts from the
  price in force (the one effective last);
* ``ParameterChanged``: the floors and ceilings (``price_floor_micro.<tier>``,
  ``price_ceiling_micro.<tier>``) through a ``ParamSchedule``; other parameters are kept
  but unused, unknown ones ignored.

Every ``interval_ms`` of the clock (``Context.now_ms`` at a tick) it measures each tier:
queue depth, utilisation (busy / live slots, in permille, the mean of ``SAMPLES`` looks
over the interval; a tier without live slots is full when it has a queue) and the p90
of the waits of the interval (the tasks placed in it and the age of those still
waiting). Then it moves each tier's price one step:

* up when tasks wait, their queue is not shrinking since the last step, and the p90
  wait exceeds ``target_wait_ms`` or utilisation is at least ``high_permille`` (a
  queue that drains at the price in force needs no higher one: the wait, which lags,
  would otherwise push the price far past the level that cleared the surge);
* down when the queue is empty, utilisation at most ``low_permille`` and the p90 wait at
  most half the target;
* otherwise it holds: the deadband between keeps a steady load from oscillating;
* a move against the tier's last one waits until its condition has held ``CONFIRM``
  steps in a row (hysteresis: near the clearing price random arrivals would flip it).

A step is at most ``step_permille`` of the price (``next_price``: the step rounded
down, at least 1 micro-token), then clamped to the floor and ceiling in force (a
governance change of a bound applies at the next step, whatever the step size). The first prices are
``allocator.pricing.DEFAULT_PRICES``. A ``PriceUpdated`` is emitted only when a price
changes, effective ``lead_ms`` after the step, so the ledger and the clients read it
before it applies; its event id is derived from its content, so two instances that
decide alike emit the same event. A rise never invalidates a quote already given: the
ledger honours a quote at the lowest price in force during the ``PRICE_GRACE_MS``
before a submission (``PriceBook.lowest``), and quotes live no longer than that.

Pure: no wall clock, no randomness; the same inputs and ticks give the same outputs.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from allocator.pricing import DEFAULT_PRICES, Tier, effective_tier
from schemas import Event, new_event
from schemas.errors import DestraError
from schemas.signatures import verify_event
from streams.params import ParamSchedule
from streams.processing import Context, Outcome, Recovery

STALE_AFTER_MS = 30_000
"""A node silent this long holds no live slots (``allocator.placement.NodeTable``)."""

FORGET_AFTER_MS = 900_000
"""A submission never placed nor failed, or a placement whose submission was never read,
is forgotten after this long (the allocator fails a task it cannot place after 2 min)."""

SAMPLES = 10
"""Utilisation is the mean of this many samples an interval (busy over live slots, summed),
not one look at the step: a few slots and random arrivals swing it from one second to
the next."""

CONFIRM = 3
"""A move against the tier's last one happens only once its condition held this many
steps in a row (a move the same way, at once)."""

_EVENT_IDS = uuid.UUID("6d1c2b1e-6a53-4c38-9f0e-5e8f0a7b3c21")


@dataclass(frozen=True)
class Rules:
    """The market's tunables (``destra.processors``: ``DESTRA_PRICE_*``)."""

    interval_ms: int = 10_000
    """How often prices may move."""
    target_wait_ms: int = 5_000
    """The p90 wait to placement above which a price rises."""
    step_permille: int = 100
    """The largest step, per thousand of the price."""
    high_permille: int = 900
    """Utilisation at or above which a tier with a queue rises."""
    low_permille: int = 500
    """Utilisation at or below which a tier without a queue falls."""
    lead_ms: int = 1_000
    """A new price is effective this long after the step that set it."""

    def __post_init__(self) -> None:
        if self.interval_ms < 1 or self.target_wait_ms < 0 or self.lead_ms < 0:
            raise ValueError("interval_ms must be positive, target_wait_ms and lead_ms "
                             "not negative")
        if not 1 <= self.step_permille <= 1_000:
            raise ValueError(f"step_permille {self.step_permille} must be in 1..1000")
        if not 0 <= self.low_permille < self.high_permille <= 1_000:
            raise ValueError(f"low_permille {self.low_permille} must be below high_permille "
                             f"{self.high_permille}, both in 0..1000")


DEFAULT_RULES = Rules()


@dataclass(frozen=True)
class Measure:
    """One tier at one step: what the market saw and decided."""

    at_ms: int
    tier: str
    queue: int
    live_slots: int
    busy_slots: int
    utilisation_permille: int
    wait_p90_ms: int
    price: int
    """The price after the step."""
    direction: int
    """+1 raised, -1 lowered, 0 held."""


def p90(samples: list[int]) -> int:
    """The 90th percentile, nearest rank (0 for no samples)."""
    if not samples:
        return 0
    ordered = sorted(samples)
    return ordered[max(0, -(-9 * len(ordered) // 10) - 1)]


def next_price(price: int, direction: int, step_permille: int, floor: int,
               ceiling: int) -> int:
    """One bounded step from ``price`` (up if ``direction > 0``, down if ``< 0``),
    clamped to ``[floor, ceiling]``; integers only. The step is ``step_permille`` of the
    price rounded down, so never more (at least 1 micro-token, which is more only under
    10 micro-tokens at 10 %): the new price is an integer, no fraction of a micro-token
    to round either way."""
    step = max(1, price * step_permille // 1_000)
    if direction > 0:
        price += step
    elif direction < 0:
        price -= step
    return max(floor, min(ceiling, price))


@dataclass
class Market:
    """The demand-driven price engine; see the module docstring."""

    producer_id: str = "pricing"
    rules: Rules = DEFAULT_RULES
    params: ParamSchedule = field(default_factory=ParamSchedule)
    prices: dict[str, tuple[int, int]] = field(
        default_factory=lambda: {str(t): (0, p) for t, p in DEFAULT_PRICES.items()})
    """Per tier, (effective_at, price) of the update effective last."""
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per node: tier, slots, key, last (sign of life), free, seq, assigned (since its
    last heartbeat)."""
    queue: dict[str, tuple[str, int]] = field(default_factory=dict)
    """Tasks submitted, escrowed and not yet placed: tier, submission record time."""
    unpaid: dict[str, tuple[str, int]] = field(default_factory=dict)
    """Tasks submitted whose escrow has not been read: tier, submission record time."""
    paid_early: dict[str, int] = field(default_factory=dict)
    """Tasks whose escrow entry was read before their submission (another topic)."""
    placed_early: dict[str, int] = field(default_factory=dict)
    """Tasks whose placement was read before their submission: the placement's time."""
    waits: dict[str, list[int]] = field(default_factory=dict)
    """Per tier, the waits of the tasks placed since the last step."""
    next_step_ms: int | None = None
    samples: dict[str, list[int]] = field(default_factory=dict)
    """Per tier, [busy, live] slots summed over the interval's samples, and their count."""
    next_sample_ms: int = 0
    trend: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Per tier, its last move (+1, -1) and for how many steps in a row a reversal held."""
    queued: dict[str, int] = field(default_factory=dict)
    """Per tier, the queue at the last step: a queue that shrinks is draining."""
    measures: list[Measure] = field(default_factory=list, repr=False)
    """The last step's measures (for benches and logs; not state)."""

    # -- the processing contract -------------------------------------------------------------

    name = "market"
    inputs = frozenset({"TaskSubmitted", "TaskAssigned", "TaskVerified", "TaskFailed",
                        "NodeRegistered", "NodeHeartbeat", "PriceUpdated", "ParameterChanged",
                        "LedgerEntryPosted"})
    recovery = Recovery.SNAPSHOT

    def wants(self, event: Event) -> bool:
        """Of the ledger's entries only a task's escrow."""
        if event.name != "LedgerEntryPosted":
            return True
        f = event.fields
        return bool(f["kind"] == "escrow" and f["task_id"]
                    and f["account"] == f"escrow:{f['task_id']}" and f["amount_micro"] > 0)

    def handle(self, event: Event, ctx: Context) -> Outcome:
        """One input event, at its record time."""
        f, now = event.fields, ctx.now_ms
        if event.name == "TaskSubmitted":
            self._on_submitted(f["task_id"], f["tier"], now)
        elif event.name == "TaskAssigned":
            self._on_assigned(f["task_id"], f["node_id"], now)
        elif event.name == "LedgerEntryPosted":
            self._on_escrowed(f["task_id"], now)
        elif event.name in ("TaskVerified", "TaskFailed"):
            for pending in (self.queue, self.unpaid, self.placed_early, self.paid_early):
                pending.pop(f["task_id"], None)
        elif event.name == "NodeRegistered":
            return self._on_registered(event, now)
        elif event.name == "NodeHeartbeat":
            return self._on_heartbeat(event, now)
        elif event.name == "PriceUpdated":
            tier, at = f["tier"], f["effective_at"]
            if tier in self.prices and at >= self.prices[tier][0]:
                self.prices[tier] = (at, f["price_per_unit_micro"])
        elif event.name == "ParameterChanged":
            self.params.follow(event)  # the allocator in this unit dead-letters a bad one
        return Outcome()

    def tick(self, ctx: Context) -> Outcome:
        """Time passed: every ``interval_ms``, one step of every tier's price."""
        now = ctx.now_ms
        if self.next_step_ms is None:
            self.next_step_ms = now + self.rules.interval_ms
        if now >= self.next_sample_ms:
            self.next_sample_ms = now + max(1, self.rules.interval_ms // SAMPLES)
            self._sample(now)
        if now < self.next_step_ms:
            return Outcome()
        self.next_step_ms = max(self.next_step_ms + self.rules.interval_ms,
                                now + 1)  # a clock that jumped does not step many times
        self._forget(now)
        return Outcome.of(self._step(now))

    def snapshot(self) -> dict[str, Any]:
        """Plain data: prices, nodes, queue, the interval's waits, the parameters."""
        return {"prices": dict(self.prices), "nodes": {n: dict(v) for n, v in self.nodes.items()},
                "queue": dict(self.queue), "placed_early": dict(self.placed_early),
                "unpaid": dict(self.unpaid), "paid_early": dict(self.paid_early),
                "waits": {t: list(w) for t, w in self.waits.items()},
                "samples": {t: list(v) for t, v in self.samples.items()},
                "trend": dict(self.trend), "queued": dict(self.queued),
                "next_step_ms": self.next_step_ms, "next_sample_ms": self.next_sample_ms,
                "params": self.params.state()}

    def restore(self, state: dict[str, Any]) -> None:
        """Take over a state ``snapshot`` returned."""
        self.prices = dict(state["prices"])
        self.nodes = {n: dict(v) for n, v in state["nodes"].items()}
        self.queue = dict(state["queue"])
        self.placed_early = dict(state["placed_early"])
        self.unpaid = dict(state.get("unpaid", {}))
        self.paid_early = dict(state.get("paid_early", {}))
        self.waits = {t: list(w) for t, w in state["waits"].items()}
        self.samples = {t: list(v) for t, v in state["samples"].items()}
        self.next_step_ms = state["next_step_ms"]
        self.next_sample_ms = state["next_sample_ms"]
        self.trend = dict(state["trend"])
        self.queued = dict(state["queued"])
        self.params = ParamSchedule.load(state["params"])

    # -- demand -----------------------------------------------------------------------------

    def _on_submitted(self, task_id: str, tier: str, now: int) -> None:
        if tier not in self.prices or task_id in self.queue:
            return  # the ledger refuses an unknown tier; a copy changes nothing
        if self.paid_early.pop(task_id, None) is not None:
            self._demand(task_id, tier, now)
        else:
            self.unpaid.setdefault(task_id, (tier, now))

    def _on_escrowed(self, task_id: str, now: int) -> None:
        submitted = self.unpaid.pop(task_id, None)
        if submitted is not None:
            self._demand(task_id, *submitted)
        elif task_id not in self.queue and len(self.paid_early) < 1_000_000:
            self.paid_early[task_id] = now

    def _demand(self, task_id: str, tier: str, since: int) -> None:
        """A paid task waits from its submission's record time, or was placed already."""
        placed = self.placed_early.pop(task_id, None)
        if placed is not None:
            self.waits.setdefault(tier, []).append(max(0, placed - since))
        else:
            self.queue[task_id] = (tier, since)

    def _on_assigned(self, task_id: str, node_id: str, now: int) -> None:
        node = self.nodes.get(node_id)
        if node is not None:
            node["assigned"] += 1
        waiting = self.queue.pop(task_id, None)
        if waiting is not None:
            tier, since = waiting
            self.waits.setdefault(tier, []).append(max(0, now - since))
        # A task's later replicas (reissues, rounds) are not demand waiting: only remember
        # a placement read before its submission (another topic, read first).
        elif task_id not in self.placed_early and len(self.placed_early) < 1_000_000:
            self.placed_early[task_id] = now

    # -- capacity ---------------------------------------------------------------------------

    def _on_registered(self, e: Event, now: int) -> Outcome:
        f = e.fields
        if not verify_event(e, f["signing_key"], f["node_id"]):
            return Outcome.refuse(e, f"bad-signature: registration of {f['node_id']} is not "
                                     "signed by the key it registers")
        known = self.nodes.get(f["node_id"])
        if known is not None and known["key"] != f["signing_key"]:
            return Outcome.refuse(e, f"wrong-key: {f['node_id']} is registered with another "
                                     "signing key")
        try:
            tier = str(effective_tier(f["tier"], f["tflops_milli"], f["memory_mb"]))
        except DestraError as err:
            return Outcome.refuse(e, f"invalid-registration: {err}")
        slots = max(0, f["slots"])
        self.nodes[f["node_id"]] = {"tier": tier, "slots": slots, "key": f["signing_key"],
                                    "last": now, "free": slots, "seq": -1, "assigned": 0}
        return Outcome()

    def _on_heartbeat(self, e: Event, now: int) -> Outcome:
        f = e.fields
        node = self.nodes.get(f["node_id"])
        if node is None or not verify_event(e, node["key"], f["node_id"]):
            return Outcome.refuse(e, "bad-signature: heartbeat not signed by a registered node")
        if f["seq"] <= node["seq"]:
            return Outcome()  # old or replayed: the allocator dead-letters it
        node.update(seq=f["seq"], last=max(now, node["last"]),
                    free=max(0, min(node["slots"], f["free_slots"])), assigned=0)
        return Outcome()

    # -- the step ---------------------------------------------------------------------------

    def _forget(self, now: int) -> None:
        horizon = now - FORGET_AFTER_MS
        for pending in (self.queue, self.unpaid):
            for task_id in [t for t, (_, at) in pending.items() if at < horizon]:
                del pending[task_id]
        for early in (self.placed_early, self.paid_early):
            for task_id in [t for t, at in early.items() if at < horizon]:
                del early[task_id]

    def price(self, tier: str | Tier) -> int:
        """The latest price the market knows for ``tier`` (in force or announced)."""
        return self.prices[str(tier)][1]

    def _slots(self, now: int) -> tuple[dict[str, int], dict[str, int]]:
        """Per tier, the live slots and the busy ones now."""
        live: dict[str, int] = {}
        busy: dict[str, int] = {}
        for node in self.nodes.values():
            if now - node["last"] > STALE_AFTER_MS:
                continue
            live[node["tier"]] = live.get(node["tier"], 0) + node["slots"]
            used = min(node["slots"], node["slots"] - node["free"] + node["assigned"])
            busy[node["tier"]] = busy.get(node["tier"], 0) + used
        return live, busy

    def _sample(self, now: int) -> None:
        live, busy = self._slots(now)
        for tier in (str(t) for t in Tier):
            acc = self.samples.setdefault(tier, [0, 0])
            acc[0] += busy.get(tier, 0)
            acc[1] += live.get(tier, 0)

    def _confirmed(self, tier: str, direction: int) -> int:
        """``direction``, unless it reverses the tier's last move and has not yet held for
        ``CONFIRM`` steps in a row: near the clearing price random arrivals alone would
        otherwise flip the price up and down."""
        last, held = self.trend.get(tier, (0, 0))
        if direction == 0:
            self.trend[tier] = (last, 0)
            return 0
        if direction == -last and held + 1 < CONFIRM:
            self.trend[tier] = (last, held + 1)
            return 0
        self.trend[tier] = (direction, 0)
        return direction

    def _step(self, now: int) -> list[Event]:
        r = self.rules
        live, busy = self._slots(now)
        queued: dict[str, list[int]] = {}
        for tier, since in self.queue.values():
            queued.setdefault(tier, []).append(max(0, now - since))
        out: list[Event] = []
        self.measures = []
        for tier in (str(t) for t in Tier):
            ages = queued.get(tier, [])
            waiting = len(ages)
            wait = p90(self.waits.get(tier, []) + ages)
            slots = live.get(tier, 0)
            used, offered = self.samples.get(tier, [0, 0])
            if not offered:  # no sample yet: the slots now
                used, offered = busy.get(tier, 0), slots
            util = (used * 1_000 // offered if offered
                    else (1_000 if waiting else 0))
            draining = waiting < self.queued.get(tier, 0)
            self.queued[tier] = waiting
            if waiting and not draining and (wait > r.target_wait_ms
                                             or util >= r.high_permille):
                direction = 1
            elif not waiting and util <= r.low_permille and 2 * wait <= r.target_wait_ms:
                direction = -1
            else:
                direction = 0
            direction = self._confirmed(tier, direction)
            price = self.price(tier)
            new = next_price(price, direction, r.step_permille,
                             self.params.value(f"price_floor_micro.{tier}", now),
                             self.params.value(f"price_ceiling_micro.{tier}", now))
            self.measures.append(Measure(now, tier, waiting, slots, busy.get(tier, 0), util,
                                         wait, new, (new > price) - (new < price)))
            if new != price:
                at = now + r.lead_ms
                self.prices[tier] = (at, new)
                out.append(new_event(
                    "PriceUpdated", self.producer_id,
                    event_id=str(uuid.uuid5(_EVENT_IDS, f"{tier}/{at}/{new}")),
                    occurred_at=now, tier=tier, price_per_unit_micro=new, effective_at=at))
        self.waits = {}
        self.samples = {}
        return out
