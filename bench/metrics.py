"""What the runner's metrics cost an event: instrumented against not, in one process.

    python bench/metrics.py [--events 50000] [--rounds 5]

No broker: ``KafkaRunner._handle`` (decode, dispatch, the handler, and now the metrics)
runs over records that stand in for consumed ones, with the Echo processor of
``bench/runner_hop.py`` (each TokensMinted in, one TaskFailed out): the cheapest handler
there is, so the ratio printed is the worst case; a real handler (the ledger decider,
the verifier) costs tens of microseconds more per event and the ratio shrinks with it.

The runner's instrumentation per event is two ``perf_counter`` calls, one counter
``inc`` and one histogram ``observe`` as it handles, one counter ``inc`` for each event
it emits (``streams.metrics.Instruments``). "bare" replaces the instruments with no-ops
(the two clock reads stay: they are measured apart and taken off to give the runner
without metrics); the best of ``--rounds`` rounds of each is compared.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench.runner_hop import Echo
from destra.settings import Settings
from schemas import Event, new_event
from schemas.codec import encode
from schemas.signatures import KeyPair
from streams.kafka_runner import KafkaRunner
from streams.metrics import Instruments
from tests.support import Record


class Bare(Instruments):
    """Instruments that record nothing."""

    def handled(self, processor: str, event: str, seconds: float) -> None:
        pass

    def emitted(self, event: str) -> None:
        pass


def per_event_us(runner: KafkaRunner, records: list[Any], emit: bool) -> float:
    """Microseconds per record of the runner's handling, plus counting what it emits."""
    touched: set[int] = set()
    letters: list[Event] = []
    metrics = runner._metrics
    started = time.perf_counter()
    for record in records:
        for outcome, _ in runner._handle(record, touched, letters):
            if emit:
                for e in outcome.emit:
                    metrics.emitted(e.name)
    return (time.perf_counter() - started) / len(records) * 1e6


def clock_pair_ns(n: int) -> float:
    """Nanoseconds of the two ``perf_counter`` calls the runner makes around a handler."""
    clock = time.perf_counter
    started = clock()
    for _ in range(n):
        a = clock()
        _ = clock() - a
    loop = clock()
    for _ in range(n):
        pass
    empty = clock() - loop
    return ((loop - started) - empty) / n * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    runner = KafkaRunner(Settings(), "unused:9092", [Echo()], group="bench-metrics",
                         snapshot_keys=KeyPair.generate())
    topic = runner.inputs[0]
    records = [Record(encode(new_event("TokensMinted", "treasury", account=f"a{i}",
                                       amount_micro=1, reason="bench")), i, topic,
                      1_700_000_000_000 + i)
               for i in range(args.events)]
    instrumented, bare = Instruments(), Bare()
    best = {"instrumented": float("inf"), "bare": float("inf")}
    for _ in range(args.rounds):  # interleaved, so drifting machine load hits both
        for label, inst in (("bare", bare), ("instrumented", instrumented)):
            runner._metrics = inst
            best[label] = min(best[label], per_event_us(runner, records, emit=True))
    clocks = clock_pair_ns(args.events) / 1000
    without = best["bare"] - clocks  # the runner before it had metrics
    overhead = best["instrumented"] - without
    print(f"events {args.events}, best of {args.rounds} rounds, Echo processor (worst case)")
    print(f"  without metrics {without:7.2f} us/event (decode + dispatch + handler)")
    print(f"  instrumented    {best['instrumented']:7.2f} us/event")
    print(f"  metrics         {overhead:7.2f} us/event ({clocks:.2f} of them the clock reads)")
    print(f"  ratio           {best['instrumented'] / without:.3f}")


if __name__ == "__main__":
    main()
