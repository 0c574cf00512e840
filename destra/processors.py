"""The network's stream processors: a worker that runs the allocator and the verifier.

    python -m destra.processors

Start one or several: the workers share the units of work (``streams.leases``:
the allocator, and the verifier's task shards) through one consumer group, and
a worker that dies hands its units to the others after
``DESTRA_LEASE_SESSION_MS`` (6000) of silence. Reads ``DESTRA_*`` settings (or
the state of ``destra infra up``). Tuning, all in milliseconds:
``DESTRA_COMMIT_WINDOW_MS`` (floor of a replica's commit window, default
30000), ``DESTRA_REVEAL_WINDOW_MS`` (15000), ``DESTRA_QUEUE_TIMEOUT_MS``
(120000), ``DESTRA_REISSUE_GRACE_MS`` (60000), and ``DESTRA_MAX_REISSUES`` (3
per task). The live network parameters (``streams.params``: fees, slashes, adaptive
trust's rules, price bounds, governance's rules) start at their defaults or at
``DESTRA_PARAM_<NAME>``, the same for every unit, and follow the ``ParameterChanged``
events passed proposals emit (``governance.service``, which runs in the allocator's
unit). The market (``allocator.market``, in the
allocator's unit, its ``PriceUpdated`` signed by the ``pricing`` role):
``DESTRA_PRICE_INTERVAL_MS`` (how often prices may move, 10000),
``DESTRA_PRICE_TARGET_WAIT_MS`` (the p90 wait to placement above which a price
rises, 5000), ``DESTRA_PRICE_STEP_PERMILLE`` (the largest step, 100: 10 %) and
``DESTRA_PRICE_LEAD_MS`` (a new price applies this long after it is set, 1000);
floors and ceilings are live parameters. Stops cleanly on SIGTERM, handing its
units over at once.

Each unit runs under ``streams.kafka_runner.KafkaRunner``: exactly-once
batches, and its state snapshotted in the same transaction as its outputs, so a
unit killed at any line restarts, here or on another worker, where its last
committed batch left it, tasks in flight and node table included. Outputs are
signed with the allocator's and the verifier's keys from
``$DESTRA_HOME/services`` (see ``streams.authority``); every input passes the
genesis authority check first.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Mapping
from typing import Any

from allocator.market import DEFAULT_RULES as DEFAULT_MARKET_RULES
from allocator.market import Market
from allocator.market import Rules as MarketRules
from allocator.service import Allocator, Windows
from allocator.trust import DEFAULT_RULES, TrustRules
from destra.errors import ConfigError
from destra.settings import Settings
from governance.keys import load_tally_key, load_tally_shares
from governance.service import Governance
from schemas import Event
from streams import metrics
from streams.authority import Genesis, held_signers, signers_by_event
from streams.kafka_runner import KafkaRunner
from streams.klog import setup_logging
from streams.leases import ALLOCATOR_UNIT, SESSION_MS, LeasedWorker, Shard, unit_name
from streams.params import DEFAULTS, ParamSchedule, params_from
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


def windows_from(env: Mapping[str, str]) -> Windows:
    """The allocator's deadlines from ``DESTRA_*_MS``."""
    return Windows(commit_ms=_int(env, "DESTRA_COMMIT_WINDOW_MS", 30_000),
                   reveal_ms=_int(env, "DESTRA_REVEAL_WINDOW_MS", 15_000),
                   queue_timeout_ms=_int(env, "DESTRA_QUEUE_TIMEOUT_MS", 120_000))


def rules_from(env: Mapping[str, str]) -> TrustRules:
    """Adaptive trust's rules as the network starts (``DESTRA_PARAM_TRUSTED_AFTER``,
    ``DESTRA_PARAM_SPOT_*``: ``streams.params``); governance changes them later."""
    return DEFAULT_RULES.with_params({**DEFAULTS, **params_from(env)})


def market_rules_from(env: Mapping[str, str]) -> MarketRules:
    """The market's tunables from ``DESTRA_PRICE_*``."""
    d = DEFAULT_MARKET_RULES
    try:
        return dataclasses.replace(
            d, interval_ms=_int(env, "DESTRA_PRICE_INTERVAL_MS", d.interval_ms),
            target_wait_ms=_int(env, "DESTRA_PRICE_TARGET_WAIT_MS", d.target_wait_ms),
            step_permille=_int(env, "DESTRA_PRICE_STEP_PERMILLE", d.step_permille),
            lead_ms=_int(env, "DESTRA_PRICE_LEAD_MS", d.lead_ms))
    except ValueError as err:
        raise ConfigError(f"market settings: {err}") from None


def build_unit(settings: Settings, bootstrap: str, unit: int, units: int,
               env: Mapping[str, str] | None = None) -> KafkaRunner:
    """The runner of one unit (``streams.leases``): the allocator, or one verifier shard."""
    env = os.environ if env is None else env
    genesis = Genesis.load(settings.genesis_path)
    roles = (("allocator", "pricing", "governance") if unit == ALLOCATOR_UNIT
             else ("verifier",))
    signers = held_signers(settings.service_keys, genesis, roles)
    if len(signers) != len(roles):
        raise ConfigError(f"the processors need the {' and '.join(roles)} keys in "
                          f"{settings.service_keys}")
    by_event = signers_by_event(signers)

    def sign(event: Event) -> Event:
        signer = by_event.get(event.name)
        return signer.sign(event) if signer is not None else event

    processors: list[Any]
    shard = None
    start = params_from(env)
    if unit == ALLOCATOR_UNIT:
        processors = [Allocator(settings.producer_id or "allocator", windows=windows_from(env),
                                rules=rules_from(env), params=ParamSchedule(start)),
                      Governance(settings.producer_id or "governance",
                                 load_tally_key(settings.genesis_path),
                                 load_tally_shares(settings.service_keys),
                                 network=settings.topic_prefix, params=ParamSchedule(start)),
                      Market(settings.producer_id or "pricing", rules=market_rules_from(env),
                             params=ParamSchedule(start))]
    else:
        shard = Shard(unit - 1, units - 1)
        processors = [Verifier(settings.producer_id or "verifier",
                               max_attempts=_int(env, "DESTRA_MAX_REISSUES", 3),
                               reissue_grace_ms=_int(env, "DESTRA_REISSUE_GRACE_MS", 60_000),
                               rules=rules_from(env), params=ParamSchedule(start))]
    return KafkaRunner(settings, bootstrap, processors,
                       group=f"{settings.topic_prefix}processors/{unit_name(unit, units)}",
                       snapshot_keys=signers[0].keys, sign=sign, check=genesis.check,
                       shard=shard)


def worker(settings: Settings, bootstrap: str,
           env: Mapping[str, str] | None = None) -> LeasedWorker:
    """A processors worker: it runs the units the group leases it."""
    env = os.environ if env is None else env
    return LeasedWorker(settings.topic_prefix, settings.producer_id or "processors", bootstrap,
                        lambda unit, units: build_unit(settings, bootstrap, unit, units, env),
                        session_ms=_int(env, "DESTRA_LEASE_SESSION_MS", SESSION_MS),
                        profile=env.get("DESTRA_PROFILE") or None)


def main() -> None:
    """Run the worker until SIGTERM."""
    from infra import services

    setup_logging()
    settings = Settings.from_env()
    settings = settings.with_(producer_id=settings.producer_id or "processors")
    state = services.read_state(settings)
    bootstrap = settings.kafka_bootstrap or (state.kafka_bootstrap if state else None)
    if not bootstrap:
        raise SystemExit("processors: no Kafka; run `destra infra up` or set DESTRA_*")
    metrics.serve(settings.producer_id or "processors", settings.home)
    services.use_service_access(settings, "processors")
    leased = worker(settings, bootstrap)
    stop = False

    def on_term(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    leased.run(lambda: not stop)


if __name__ == "__main__":
    main()
