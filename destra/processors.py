"""The network's stream processors in one worker: the allocator and the verifier.

    python -m destra.processors

Reads ``DESTRA_*`` settings (or the state of ``destra infra up``). Tuning, all
in milliseconds: ``DESTRA_COMMIT_WINDOW_MS`` (floor of a replica's commit
window, default 30000), ``DESTRA_REVEAL_WINDOW_MS`` (15000),
``DESTRA_QUEUE_TIMEOUT_MS`` (120000), ``DESTRA_REISSUE_GRACE_MS`` (60000), and
``DESTRA_MAX_REISSUES`` (3 per task). Stops cleanly on SIGTERM.

Both run under ``streams.kafka_runner.KafkaRunner``: exactly-once batches, and
their state snapshotted in the same transaction as their outputs, so a worker
killed at any line restarts where the last committed batch left it, tasks in
flight and node table included. Their outputs are signed with the allocator's
and the verifier's keys from ``$DESTRA_HOME/services`` (see ``streams.authority``);
every input passes the genesis authority check first.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from typing import Any

from allocator.service import Allocator, Windows
from destra.errors import ConfigError
from destra.settings import Settings
from schemas import Event
from streams.authority import Genesis, held_signers, signers_by_event
from streams.kafka_runner import KafkaRunner
from verifier.service import Verifier


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{name} must not be negative, got {value}")
    return value


def build(settings: Settings, bootstrap: str,
          env: Mapping[str, str] | None = None) -> tuple[KafkaRunner, Allocator, Verifier]:
    """The runner with both processors, and the processors themselves."""
    env = os.environ if env is None else env
    windows = Windows(commit_ms=_int(env, "DESTRA_COMMIT_WINDOW_MS", 30_000),
                      reveal_ms=_int(env, "DESTRA_REVEAL_WINDOW_MS", 15_000),
                      queue_timeout_ms=_int(env, "DESTRA_QUEUE_TIMEOUT_MS", 120_000))
    allocator = Allocator(settings.producer_id or "allocator", windows=windows)
    verifier = Verifier(settings.producer_id or "verifier",
                        max_attempts=_int(env, "DESTRA_MAX_REISSUES", 3),
                        reissue_grace_ms=_int(env, "DESTRA_REISSUE_GRACE_MS", 60_000))
    genesis = Genesis.load(settings.genesis_path)
    signers = held_signers(settings.service_keys, genesis, ("allocator", "verifier"))
    if len(signers) != 2:
        raise ConfigError(f"the processors need the allocator's and the verifier's keys in "
                          f"{settings.service_keys}")
    by_event = signers_by_event(signers)

    def sign(event: Event) -> Event:
        signer = by_event.get(event.name)
        return signer.sign(event) if signer is not None else event

    runner = KafkaRunner(settings, bootstrap, [allocator, verifier],
                         group=f"{settings.topic_prefix}processors",
                         snapshot_keys=signers[0].keys, sign=sign, check=genesis.check)
    return runner, allocator, verifier


def main() -> None:
    """Run the worker until SIGTERM."""
    from infra import services

    settings = Settings.from_env()
    settings = settings.with_(producer_id=settings.producer_id or "processors")
    state = services.read_state(settings)
    bootstrap = settings.kafka_bootstrap or (state.kafka_bootstrap if state else None)
    if not bootstrap:
        raise SystemExit("processors: no Kafka; run `destra infra up` or set DESTRA_*")
    runner, _, _ = build(settings, bootstrap)
    stop = False

    def on_term(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    profile = os.environ.get("DESTRA_PROFILE")
    if profile:  # cProfile of the whole worker, written when it exits (bench/lifecycle.py)
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            runner.run(lambda: not stop)
        finally:
            profiler.disable()
            profiler.dump_stats(profile)
        return
    runner.run(lambda: not stop)


if __name__ == "__main__":
    main()
