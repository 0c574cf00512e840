"""The network's stream processors in one Faust worker: the allocator and the verifier.

    python -m destra.processors

Reads ``DESTRA_*`` settings (or the state of ``destra infra up``). Tuning, all
in milliseconds: ``DESTRA_COMMIT_WINDOW_MS`` (floor of a replica's commit
window, default 30000), ``DESTRA_REVEAL_WINDOW_MS`` (15000),
``DESTRA_QUEUE_TIMEOUT_MS`` (120000), ``DESTRA_REISSUE_GRACE_MS`` (60000), and
``DESTRA_MAX_REISSUES`` (3 per task). Stops cleanly on SIGTERM.

The agents keep their state in memory, fed from the topics as they run; a
restarted worker resumes from its committed offsets without the state of the
tasks in flight (rebuilding it by replay is future work, see the README).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import faust

from allocator import agents as allocator_agents
from allocator.service import Allocator, Windows
from destra.errors import ConfigError
from destra.settings import Settings
from streams.faust_app import Publisher, make_app
from verifier import agents as verifier_agents
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
          env: Mapping[str, str] | None = None) -> tuple[faust.App, Allocator, Verifier]:
    """The Faust app with both agents installed, and their state objects."""
    env = os.environ if env is None else env
    app_id = f"{settings.topic_prefix}processors"
    datadir = settings.home / "faust" / app_id
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = make_app(settings, app_id, bootstrap, datadir=str(datadir))
    windows = Windows(commit_ms=_int(env, "DESTRA_COMMIT_WINDOW_MS", 30_000),
                      reveal_ms=_int(env, "DESTRA_REVEAL_WINDOW_MS", 15_000),
                      queue_timeout_ms=_int(env, "DESTRA_QUEUE_TIMEOUT_MS", 120_000))
    allocator = Allocator(settings.producer_id, windows=windows)
    verifier = Verifier(settings.producer_id,
                        max_attempts=_int(env, "DESTRA_MAX_REISSUES", 3),
                        reissue_grace_ms=_int(env, "DESTRA_REISSUE_GRACE_MS", 60_000))
    publisher = Publisher(app, settings)
    allocator_agents.install(app, settings, allocator, publisher)
    verifier_agents.install(app, settings, verifier, publisher)
    return app, allocator, verifier


def main() -> None:
    """Run the worker until SIGTERM."""
    from infra import services

    settings = Settings.from_env()
    settings = settings.with_(producer_id=settings.producer_id or "processors")
    state = services.read_state(settings)
    bootstrap = settings.kafka_bootstrap or (state.kafka_bootstrap if state else None)
    if not bootstrap:
        raise SystemExit("processors: no Kafka; run `destra infra up` or set DESTRA_*")
    app, _, _ = build(settings, bootstrap)
    profile = os.environ.get("DESTRA_PROFILE")
    if profile:  # cProfile of the whole worker, written when it exits (bench/lifecycle.py)
        import atexit
        import cProfile

        profiler = cProfile.Profile()

        def dump() -> None:
            profiler.disable()
            profiler.dump_stats(profile)

        atexit.register(dump)
        profiler.enable()
    level = os.environ.get("DESTRA_LOG_LEVEL", "warn")
    sys.argv = [sys.argv[0], "worker", "--loglevel", level]
    app.main()


if __name__ == "__main__":
    main()
