"""The market under demand surges and nodes arriving and leaving (issue 13, item 1).

    python bench/market.py [--minutes 45] [--interval-ms 10000] [--target-wait-ms 5000]
                           [--out bench/results/market.txt]

The real ``allocator.market.Market`` runs on the in-memory runner
(``streams.memory``) and its virtual clock. Placement is NOT the real allocator: a
simple queue model (``Cluster``) stands for it and for the nodes, driven by and
emitting the same events the market reads in production: signed ``NodeRegistered``
and ``NodeHeartbeat`` (every 2 virtual s, each node's own free-slot count),
``TaskSubmitted``, ``TaskAssigned`` (first come, first served, one slot per task, on
the node with the most free slots) and ``TaskVerified`` when a task's run time has
passed. The real allocator (``destra.sim``) runs the workloads for real, too slow for
thousands of tasks over 40 virtual minutes on this machine.

Demand is elastic: each arrival has a budget, drawn from a fixed seeded
distribution between 1x and 4x the tier's default price; it submits only when the
price in force is within it (else it is counted ``priced out``). So the price does
what it is for: at a surge it rises until enough demand steps aside for the queue to
drain, and falls back as nodes arrive.

The scenario (``SCENARIO``), consumer tier: a steady load, a surge to 3x, nodes
joining, a second surge, nodes leaving. Printed: per interval, demand (arrivals/s),
slots, queue, p90 wait, utilisation and the price; then per surge the time from its
start until the p90 wait is back under the target, the number of price direction
reversals, the largest step (percent), and the price range. With ``--out X.txt`` it
also writes ``X.png``: price, queue and wait over time.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allocator.market import Market, Measure, Rules  # noqa: E402
from allocator.pricing import DEFAULT_PRICES, PriceBook, PriceUpdate, Tier  # noqa: E402
from schemas import Event, new_event  # noqa: E402
from schemas.signatures import KeyPair, sign_event  # noqa: E402
from streams.memory import MemoryRunner  # noqa: E402
from streams.processing import Context, Outcome, Recovery  # noqa: E402

HEARTBEAT_MS = 2_000


def node_keys(name: str) -> KeyPair:
    """Deterministic keys for a simulated node (never use such keys for real)."""
    return KeyPair(hashlib.sha256(f"{name} signing".encode()).digest(),
                   hashlib.sha256(f"{name} x25519".encode()).digest())


@dataclass
class _Node:
    node_id: str
    keys: KeyPair
    slots: int
    running: dict[str, int] = field(default_factory=dict)
    """Task -> when it finishes."""


@dataclass
class Cluster:
    """Nodes and a FIFO placement in one processor: the events a network would emit.

    ``rate`` (arrivals per virtual second) and the nodes change between ``advance``
    calls (``add_nodes``, ``remove_nodes``). ``elastic``: an arrival submits only when
    the price is within its budget.
    """

    tier: str = "consumer"
    run_ms: int = 20_000
    rate: float = 0.0
    elastic: bool = True
    seed: int = 1
    step_ms: int = 250
    """The runner's tick: arrivals are counted per tick."""
    nodes: dict[str, _Node] = field(default_factory=dict)
    queue: deque[str] = field(default_factory=deque)
    prices: PriceBook = field(default_factory=PriceBook)
    submitted: int = 0
    priced_out: int = 0
    arrivals: int = 0
    _owed: float = 0.0
    _next_beat: int = 0
    _seq: int = 0
    _serial: int = 0
    _joining: list[Event] = field(default_factory=list)
    _leaving: set[str] = field(default_factory=set)

    name = "cluster"
    inputs = frozenset({"PriceUpdated"})
    recovery = Recovery.NONE

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)  # noqa: S311 - a repeatable simulation

    def add_nodes(self, count: int, slots: int = 2) -> None:
        """``count`` new nodes, registered at the next tick."""
        for _ in range(count):
            name = f"n{len(self.nodes) + len(self._joining) + len(self._leaving):03d}"
            keys = node_keys(name)
            self._joining.append(new_event(
                "NodeRegistered", name, node_id=name, operator_id=f"op-{name}",
                region="eu-west", signing_key=keys.signing_public,
                encryption_key=keys.encryption_public, device_name="simulated",
                device_class="cpu", tier=self.tier, tflops_milli=100, memory_mb=4096,
                slots=slots, stake_micro=0, software="bench", operator_consent=b""))

    def remove_nodes(self, count: int) -> None:
        """The ``count`` most recent nodes stop (their running tasks are lost: the
        verifier would re-place them; here they are dropped)."""
        for node_id in sorted(self.nodes)[-count:]:
            self._leaving.add(node_id)

    def handle(self, event: Event, ctx: Context) -> Outcome:
        f = event.fields
        self.prices.apply(PriceUpdate(f["tier"], f["price_per_unit_micro"], f["effective_at"]))
        return Outcome()

    def tick(self, ctx: Context) -> Outcome:
        now, out = ctx.now_ms, []
        for e in self._joining:
            self.nodes[e.fields["node_id"]] = _Node(e.fields["node_id"],
                                                    node_keys(e.fields["node_id"]),
                                                    e.fields["slots"])
            keys = node_keys(e.fields["node_id"])
            out.append(sign_event(e.with_envelope(occurred_at=now), keys, e.fields["node_id"]))
        self._joining = []
        for node_id in self._leaving:
            self.nodes.pop(node_id, None)
        self._leaving = set()
        for node in self.nodes.values():
            for task, done in list(node.running.items()):
                if done <= now:
                    del node.running[task]
                    out.append(new_event("TaskVerified", "verifier", occurred_at=now,
                                         task_id=task, digest=b"", quorum=1,
                                         contributions=[], result_ref=None))
        out += self._arrivals(now)
        out += self._place(now)
        if now >= self._next_beat:
            self._next_beat = now + HEARTBEAT_MS
            self._seq += 1
            for node in self.nodes.values():
                out.append(sign_event(new_event(
                    "NodeHeartbeat", node.node_id, occurred_at=now, node_id=node.node_id,
                    load_permille=len(node.running) * 1000 // node.slots,
                    free_slots=node.slots - len(node.running), seq=self._seq),
                    node.keys, node.node_id))
        return Outcome.of(out)

    def _arrivals(self, now: int) -> list[Event]:
        self._owed += self.rate * (self.step_ms / 1000)
        out = []
        price = self.prices.price_per_unit(self.tier, now)
        default = DEFAULT_PRICES[Tier(self.tier)]
        while self._owed >= 1:
            self._owed -= 1
            self.arrivals += 1
            budget = default * (1 + 3 * self.rng.random())
            if self.elastic and price > budget:
                self.priced_out += 1
                continue
            self._serial += 1
            task = f"t{self._serial:06d}"
            self.submitted += 1
            self.queue.append(task)
            out.append(new_event("TaskSubmitted", "alice", occurred_at=now, task_id=task,
                                 tier=self.tier))
            # The ledger's escrow: only paid demand moves a price (allocator.market).
            out.append(new_event("LedgerEntryPosted", "ledger", occurred_at=now,
                                 entry_id=f"escrow/{task}#1", transaction_id=f"escrow/{task}",
                                 account=f"escrow:{task}", amount_micro=1, kind="escrow",
                                 task_id=task, memo=""))
        return out

    def _place(self, now: int) -> list[Event]:
        out = []
        while self.queue:
            node = max(self.nodes.values(), key=lambda n: (n.slots - len(n.running),
                                                           n.node_id), default=None)
            if node is None or len(node.running) >= node.slots:
                break
            task = self.queue.popleft()
            node.running[task] = now + self.run_ms
            out.append(new_event("TaskAssigned", "allocator", occurred_at=now, task_id=task,
                                 node_id=node.node_id))
        return out

    def slots(self) -> int:
        """Slots of the nodes up now."""
        return sum(n.slots for n in self.nodes.values())


SCENARIO: list[tuple[int, str, float]] = [
    # (minute, action, amount)
    (0, "nodes", 10),     # 20 slots; a task runs 20 s: 1 task/s fills them
    (0, "rate", 0.5),
    (5, "rate", 1.5),     # surge 1: 3x
    (12, "nodes", 10),    # help arrives
    (15, "rate", 0.5),
    (22, "rate", 3.0),    # surge 2: 1.5x the 40 slots
    (28, "rate", 0.5),
    (32, "rate", 1.2),    # a steady load that 40 slots carry...
    (36, "leave", 10),    # ...until half the nodes leave
]


@dataclass
class Row:
    at_ms: int
    arrivals: float
    slots: int
    measure: Measure


def run(minutes: int, rules: Rules, tick_ms: int = 250) -> tuple[list[Row], Cluster, Market]:
    """The scenario; one row per market step."""
    market = Market(rules=rules)
    cluster = Cluster(step_ms=tick_ms)
    runner = MemoryRunner([market, cluster], tick_ms=tick_ms)
    start = runner.now_ms
    events = sorted(SCENARIO)
    rows: list[Row] = []
    last_arrivals, last_at = 0, start
    for minute in range(minutes * 60 * 1000 // rules.interval_ms):
        at = minute * rules.interval_ms
        while events and events[0][0] * 60_000 <= at:
            _, action, amount = events.pop(0)
            if action == "nodes":
                cluster.add_nodes(int(amount))
            elif action == "leave":
                cluster.remove_nodes(int(amount))
            else:
                cluster.rate = amount
        runner.advance(rules.interval_ms)
        consumer = next((m for m in market.measures if m.tier == cluster.tier), None)
        if consumer is not None and consumer.at_ms != (rows[-1].measure.at_ms if rows else 0):
            rate = (cluster.arrivals - last_arrivals) * 1000 / max(1, runner.now_ms - last_at)
            last_arrivals, last_at = cluster.arrivals, runner.now_ms
            rows.append(Row(consumer.at_ms - start, rate, cluster.slots(), consumer))
    return rows, cluster, market


def summary(rows: list[Row], rules: Rules) -> list[str]:
    """Recovery per surge, reversals, largest step, price range."""
    lines = []
    surges = sorted({m for m, action, amount in SCENARIO
                     if (action == "rate" and amount > 1.2) or action == "leave"})
    for minute in surges:
        start = minute * 60_000
        target = rules.target_wait_ms
        over = [r for r in rows if r.at_ms > start and r.measure.wait_p90_ms > target]
        if not over:
            lines.append(f"surge or departure at {minute:2d} min: the p90 wait never "
                         "exceeded the target")
            continue
        first = over[0].at_ms
        back = next((r.at_ms for r in rows if r.at_ms > first
                     and r.measure.wait_p90_ms <= rules.target_wait_ms), None)
        took = "never" if back is None else f"{(back - start) / 1000:.0f} s"
        lines.append(f"surge or departure at {minute:2d} min: wait over target from "
                     f"{(first - start) / 1000:.0f} s, back under target after {took}")
    directions = [r.measure.direction for r in rows if r.measure.direction]
    reversals = sum(1 for a, b in zip(directions, directions[1:], strict=False) if a != b)
    prices = [DEFAULT_PRICES[Tier.CONSUMER]] + [r.measure.price for r in rows]
    steps = [abs(b - a) * 100 / a for a, b in zip(prices, prices[1:], strict=False) if a]
    lines.append(f"price changes: {len(directions)} of {len(rows)} steps; direction "
                 f"reversals: {reversals}")
    lines.append(f"largest step: {max(steps, default=0):.1f} % (bound "
                 f"{rules.step_permille / 10:.1f} %); price range {min(prices)}..{max(prices)} "
                 f"micro-tokens/unit (default {prices[0]})")
    return lines


def table(rows: list[Row]) -> list[str]:
    """One line per step."""
    out = [f"{'t (s)':>6} {'demand/s':>8} {'slots':>5} {'busy':>4} {'queue':>5} "
           f"{'wait p90 s':>10} {'util %':>6} {'price':>5} {'dir':>3}"]
    for r in rows:
        m = r.measure
        out.append(f"{r.at_ms / 1000:6.0f} {r.arrivals:8.2f} {r.slots:5d} {m.busy_slots:4d} "
                   f"{m.queue:5d} {m.wait_p90_ms / 1000:10.1f} {m.utilisation_permille / 10:6.1f} "
                   f"{m.price:5d} {'+-'[m.direction < 0] if m.direction else '':>3}")
    return out


def plot(rows: list[Row], rules: Rules, path: Path) -> None:
    """Price, queue and p90 wait over time, in one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r.at_ms / 60_000 for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    axes[0].step(t, [r.measure.price for r in rows], where="post", color="tab:red")
    axes[0].set_ylabel("price (µ-tokens/unit)")
    axes[1].plot(t, [r.measure.queue for r in rows], color="tab:blue", label="queue")
    axes[1].plot(t, [r.slots for r in rows], color="tab:green", label="slots")
    axes[1].set_ylabel("tasks")
    axes[1].legend(loc="upper right")
    axes[2].plot(t, [r.measure.wait_p90_ms / 1000 for r in rows], color="tab:purple")
    axes[2].axhline(rules.target_wait_ms / 1000, color="grey", linestyle="--", label="target")
    axes[2].set_ylabel("wait p90 (s)")
    axes[2].set_xlabel("virtual minutes")
    axes[2].legend(loc="upper right")
    for minute, action, amount in SCENARIO:
        for ax in axes:
            ax.axvline(minute, color="lightgrey", linewidth=0.8)
        axes[0].annotate(f"{action} {amount:g}", (minute, axes[0].get_ylim()[1]), fontsize=7,
                         rotation=90, va="top")
    fig.suptitle("bench/market.py: consumer tier, elastic demand, queue model")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=int, default=45)
    parser.add_argument("--interval-ms", type=int, default=10_000)
    parser.add_argument("--target-wait-ms", type=int, default=5_000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rules = Rules(interval_ms=args.interval_ms, target_wait_ms=args.target_wait_ms)
    rows, cluster, _ = run(args.minutes, rules)
    lines = [f"bench/market.py: {args.minutes} virtual min, interval {rules.interval_ms} ms, "
             f"target p90 wait {rules.target_wait_ms} ms, step <= {rules.step_permille / 10:.0f} %"
             f", tasks run {cluster.run_ms} ms, 2 slots a node; placement: a FIFO queue model "
             "(not the real allocator)",
             "scenario: " + "; ".join(f"{m} min {a} {v:g}" for m, a, v in SCENARIO),
             "", *table(rows), "", *summary(rows, rules),
             f"arrivals {cluster.arrivals}, submitted {cluster.submitted}, priced out "
             f"{cluster.priced_out}"]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        plot(rows, rules, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
