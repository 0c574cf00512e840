"""The ``destra`` command line: administer the local network and watch its events."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from destra.cli_common import (
    emit,
    kafka_address,
    load_settings,
    service_addresses,
    settings_options,
)
from destra.cli_common import passphrase as _passphrase
from destra.dashboard.cli import dashboard
from destra.errors import DestraError
from destra.gov_cli import gov
from destra.keys_cli import keys
from destra.views_cli import nodes, status, tasks
from streams.klog import setup_logging

if TYPE_CHECKING:
    from schemas.bindings import StakeConsent


class _Cli(click.Group):
    """Catches ``DestraError`` once: one clear line on stderr, exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DestraError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


@click.group(cls=_Cli)
@click.version_option(package_name="destra")
def cli() -> None:
    """Destra: a decentralized GPU compute network over Apache Kafka."""
    # Warnings and errors only for a person's commands (DESTRA_LOG_LEVEL for more);
    # `node run`, a service, logs at INFO.
    setup_logging(os.environ.get("DESTRA_LOG_LEVEL", "WARNING").upper())


@cli.group()
def infra() -> None:
    """Start, stop and inspect the local Kafka and Postgres."""


@infra.command("up")
@settings_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--insecure", is_flag=True, default=None,
              help="Plaintext Kafka: no TLS, no authentication, no ACLs. Local debugging "
                   "only [DESTRA_KAFKA_INSECURE=1].")
@click.option("--advertise", "advertise", multiple=True, metavar="HOST[:PORT]",
              help="Let other machines in: a TLS + SCRAM listener on every local address, "
                   "advertised as HOST (a DNS name or IP, named in the broker certificate), "
                   "on PORT (default: the Kafka port + 300). Repeatable or a comma list; "
                   "remembered for later `infra up`s, `--advertise none` forgets it "
                   "[DESTRA_KAFKA_ADVERTISE].")
def infra_up(as_json: bool, insecure: bool | None, advertise: tuple[str, ...],
             **flags: Any) -> None:
    """Start Kafka (KRaft) and Postgres, create topics, apply migrations.

    Kafka listens with TLS (a local CA and broker certificate in $DESTRA_HOME/tls)
    and SASL/SCRAM-SHA-512; every service gets its own principal and ACLs, their
    credentials beside their keys in $DESTRA_HOME/services. `destra node join` and
    `destra account create` give nodes and submitters theirs. Without --advertise it
    listens on loopback only.
    """
    from destra.progress import Reporter
    from governance.keys import ensure_tally_key
    from infra import services
    from streams.security import INSECURE_WARNING

    settings = load_settings(**flags).with_(kafka_insecure=insecure,
                                            kafka_advertise=advertise or None)
    if settings.kafka_insecure:
        click.echo(INSECURE_WARNING, err=True)
    # A spinner per step on a terminal, else a line per note (on stderr).
    with Reporter.for_stream(sys.stderr, enabled=not as_json) as progress:
        services.up(settings, say=progress.step)
        # The governance tally key (public half beside genesis.json, shares with the keys).
        ensure_tally_key(settings.genesis_path, settings.service_keys)
    emit(services.status(settings), as_json, _status_text)


@infra.command("down")
@settings_options
def infra_down(**flags: Any) -> None:
    """Stop every service `infra up` started; external ones are left alone."""
    from infra import services

    stopped = services.down(load_settings(**flags))
    click.echo("stopped: " + ", ".join(stopped) if stopped else "nothing was running")


@infra.command("status")
@settings_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def infra_status(as_json: bool, **flags: Any) -> None:
    """Addresses, pids, versions and data directories of the services."""
    from infra import services

    emit(services.status(load_settings(**flags)), as_json, _status_text)


def _status_text(s: dict[str, Any]) -> str:
    metrics = [f"metrics   {m['name']}  pid {m['pid']}  {m['url']}" for m in s.get("metrics", [])]
    if "kafka" not in s:
        return "\n".join([f"not running (no {s['state_file']})", *metrics])
    k, p = s["kafka"], s["postgres"]
    lines = [
        f"kafka     {'up' if k['live_brokers'] else 'DOWN'}  {k['bootstrap']}  "
        f"version {k['version']}  live brokers {k['live_brokers']}",
    ]
    if k.get("advertised"):
        lines.append(f"  advertised to other machines at {', '.join(k['advertised'])}")
    for b in k["brokers"]:
        lines.append(f"  broker {b['node_id']}  pid {b['pid']} {'alive' if b['alive'] else 'DEAD'}"
                     f"  data {b['data_dir']}  log {b['log']}")
    lines.append(f"postgres  {'up' if p['version'] else 'DOWN'}  {p['dsn']}  "
                 f"version {p['version']}  pid {p['pid']}  data {p['data_dir']}")
    lines.append(f"genesis   {s.get('genesis')}")
    return "\n".join(lines + metrics)


@cli.group()
def topics() -> None:
    """The topic catalogue."""


@topics.command("list")
@settings_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def topics_list(as_json: bool, **flags: Any) -> None:
    """Every topic: key, partitions, cleanup policy, retention, and its events."""
    from streams.topics import TOPICS

    settings = load_settings(**flags)
    rows = [
        {"topic": t.name(settings.topic_prefix), "key": t.key, "partitions": t.partitions,
         "cleanup": t.cleanup, "retention_ms": t.retention_ms, "events": list(t.events)}
        for t in TOPICS
    ]
    emit(rows, as_json, lambda rs: "\n".join(
        f"{r['topic']:<28} key={r['key']:<12} p={r['partitions']:<3} {r['cleanup']:<14} "
        f"retention={r['retention_ms']:<9} {', '.join(r['events'])}" for r in rs))


@topics.command("create")
@settings_options
def topics_create(**flags: Any) -> None:
    """Create missing topics on the running cluster (idempotent)."""
    from infra import services
    from streams.admin import ensure_topics

    settings = load_settings(**flags)
    bootstrap = kafka_address(settings, services)
    created = ensure_topics(bootstrap, settings.topic_prefix,
                            replication_factor=settings.replication_factor,
                            min_insync_replicas=settings.min_insync_replicas)
    click.echo("created: " + ", ".join(created) if created else "all topics exist")


@cli.group()
def schemas() -> None:
    """The Avro event catalogue."""


@schemas.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def schemas_list(as_json: bool) -> None:
    """Every event type with its fingerprint and topic."""
    from schemas import default_catalog
    from streams.topics import topic_for

    catalog = default_catalog()
    rows = [{"event": n, "fingerprint": catalog.fingerprint(n).hex(),
             "topic": topic_for(n).suffix} for n in sorted(catalog.names)]
    emit(rows, as_json, lambda rs: "\n".join(
        f"{r['event']:<20} {r['fingerprint']}  {r['topic']}" for r in rs))


@schemas.command("check")
def schemas_check() -> None:
    """Check every schema against its released versions, both directions."""
    from schemas import default_catalog
    from schemas.compat import check_catalog, unreleased

    catalog = default_catalog()
    problems = {n: p for n, p in check_catalog(catalog).items() if p}
    for name, msgs in problems.items():
        for msg in msgs:
            click.echo(f"{name}: {msg}", err=True)
    pending = unreleased(catalog)
    if problems:
        raise DestraError(f"{len(problems)} schemas are incompatible with a released version")
    if pending:
        raise DestraError(f"changed but not released (run `destra schemas release`): "
                          f"{', '.join(pending)}")
    click.echo(f"all {len(catalog.names)} schemas are released and compatible with every "
               "earlier version, both directions")


@schemas.command("release")
def schemas_release() -> None:
    """Write each changed schema as its next version, if compatible both ways."""
    from schemas import Catalog
    from schemas.compat import release

    written = release(Catalog())
    click.echo("released: " + ", ".join(written) if written else "nothing changed")


@cli.group()
def events() -> None:
    """Watch events on the topics."""


@events.command("tail")
@settings_options
@click.option("--topic", "topic_suffixes", multiple=True,
              help="Topic without prefix (repeatable); default: all.")
@click.option("--max", "max_events", type=int, default=100, show_default=True,
              help="Stop after this many events.")
@click.option("--idle", type=float, default=5.0, show_default=True,
              help="Stop after this many seconds without an event.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def events_tail(topic_suffixes: tuple[str, ...], max_events: int, idle: float, as_json: bool,
                **flags: Any) -> None:
    """Print events from the beginning of the topics (a throwaway consumer group)."""
    import uuid

    from infra import services
    from streams.consumer import EventConsumer
    from streams.topics import TOPICS

    settings = load_settings(**flags)
    bootstrap = kafka_address(settings, services)
    names = [t.name(settings.topic_prefix) for t in TOPICS
             if not topic_suffixes or t.suffix in topic_suffixes]
    with EventConsumer(settings, bootstrap, f"destra-tail-{uuid.uuid4()}", names) as consumer:
        for n, d in enumerate(consumer.stream(idle_timeout_s=idle), start=1):
            click.echo(_event_line(d, as_json))
            if n >= max_events:
                break


def _event_line(d: Any, as_json: bool) -> str:
    fields = {k: v for k, v in d.event.fields.items() if k != "envelope"}
    if as_json:
        return json.dumps({"topic": d.topic, "partition": d.partition, "offset": d.offset,
                           "event": d.event.name, "fields": fields},
                          default=lambda v: v.hex() if isinstance(v, bytes) else str(v))
    summary = ", ".join(f"{k}={_short(v)}" for k, v in list(fields.items())[:5])
    return f"{d.topic}[{d.partition}]@{d.offset}  {d.event.name}  {summary}"


def _short(v: Any) -> str:
    text = v.hex() if isinstance(v, bytes) else str(v)
    return text if len(text) <= 24 else text[:21] + "..."


@cli.group()
def ledger() -> None:
    """The Postgres ledger projection: audit and rebuild."""


@ledger.command("check")
@settings_options
def ledger_check(**flags: Any) -> None:
    """Verify that entries sum to zero and every balance equals its entries."""
    from ledger.projection import LedgerProjection

    _, dsn = service_addresses(load_settings(**flags))
    projection = LedgerProjection(dsn)
    try:
        count = projection.check()
    finally:
        projection.close()
    click.echo(f"ledger OK: {count} entries sum to zero, balances match their entries")


@ledger.command("replay")
@settings_options
def ledger_replay(**flags: Any) -> None:
    """Rebuild the projection from offset 0 into a fresh schema and compare it with the live one."""
    from ledger.service import replay

    settings = load_settings(**flags)
    bootstrap, dsn = service_addresses(settings)
    report = replay(settings, bootstrap, dsn)
    click.echo(f"replayed {report.entries} entries into schema {report.schema}")
    click.echo(f"live   {report.live_hash}\nreplay {report.replay_hash}")
    if not report.matches:
        raise DestraError("the replayed ledger differs from the live one")
    click.echo("replay matches the live ledger")


@ledger.command("balances")
@settings_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def ledger_balances(as_json: bool, **flags: Any) -> None:
    """Every non-zero account balance, in micro-tokens."""
    from ledger.projection import LedgerProjection

    _, dsn = service_addresses(load_settings(**flags))
    projection = LedgerProjection(dsn)
    try:
        balances = dict(projection.balances())
    finally:
        projection.close()
    emit(balances, as_json, lambda b: "\n".join(f"{a:<40} {v:>20}" for a, v in b.items())
          or "no balances yet")


@cli.command("mint")
@settings_options
@click.argument("account")
@click.argument("amount_micro", type=click.IntRange(min=1))
@click.option("--reason", default="faucet", show_default=True, help="Recorded with the mint.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0), default=60.0,
              show_default=True,
              help="Seconds to wait for the ledger's decision (0: send and do not wait).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def mint(account: str, amount_micro: int, reason: str, timeout_s: float, as_json: bool,
         **flags: Any) -> None:
    """Mint AMOUNT_MICRO micro-tokens to ACCOUNT: a TokensMinted signed with the treasury key.

    Only the operator holding the network's treasury key ($DESTRA_HOME/services/
    treasury.key, or DESTRA_SERVICE_KEYS) can mint; the ledger refuses any other mint,
    and a mint to an account not registered yet (`destra account create`): refused here
    when its registration is not on the registry.

    Then waits for the ledger's decision: its entries (exit 0), or its refusal with the
    reason (exit 1); no decision within --timeout exits 1 too (the mint may still be
    credited: `destra balance`). A refused mint's id is spent: a copy of it is never
    credited. The ledger reads the registry and the mints independently, so a mint sent
    right after a registration may be refused `unregistered-account`: wait a few seconds
    and run `destra mint` again (a new mint event; the refused one moved no money).
    """
    from infra import services
    from ledger.processor import mint_outcome
    from schemas import decode, new_event
    from schemas.errors import EventError
    from schemas.signatures import verify_event
    from streams.authority import Genesis, load_signer
    from streams.producer import EventProducer
    from streams.reading import end_offsets, read_all
    from streams.topics import DEAD_LETTER, topic_for

    settings = load_settings(**flags)
    genesis = Genesis.load(settings.genesis_path)
    treasury = load_signer(settings.service_keys, "treasury", genesis)
    bootstrap = kafka_address(settings, services, role="treasury")
    registered = False
    for msg in read_all(bootstrap, topic_for("AccountRegistered").name(settings.topic_prefix)):
        try:
            e = decode(msg.value() or b"")
        except EventError:
            continue
        if e.name == "AccountRegistered" and e.fields["account_id"] == account \
                and verify_event(e, e.fields["signing_key"], account):
            registered = True
            break
    if not registered:
        raise DestraError(f"account {account} is not registered (`destra account create "
                          f"{account}`): the ledger credits no unregistered account")
    event = new_event("TokensMinted", settings.producer_id, account=account,
                      amount_micro=amount_micro, reason=reason)
    # Where the ledger's answers start: taken before the mint is sent, so none is missed.
    watched = [topic_for("LedgerEntryPosted").name(settings.topic_prefix),
               DEAD_LETTER.name(settings.topic_prefix)]
    since = {t: end_offsets(bootstrap, t) for t in watched} if timeout_s > 0 else {}
    with EventProducer(settings, bootstrap, signer=treasury) as producer:
        producer.send(event)
    outcome, why = "sent", None
    if timeout_s > 0:
        outcome, why = mint_outcome(settings, bootstrap, genesis, event.event_id, since,
                                    timeout_s)
    result = {"event_id": event.event_id, "account": account, "amount_micro": amount_micro,
              "outcome": outcome, "reason": why}
    text = {
        "sent": f"mint {event.event_id} of {amount_micro} micro-tokens to {account} sent; "
                "the ledger processor decides it",
        "credited": f"minted {amount_micro} micro-tokens to {account} (event "
                    f"{event.event_id}): credited by the ledger",
        "refused": f"mint {event.event_id} of {amount_micro} micro-tokens to {account} "
                   f"refused by the ledger: {why}",
        "pending": f"mint {event.event_id} of {amount_micro} micro-tokens to {account}: no "
                   f"decision by the ledger within {timeout_s:g}s (is the ledger processor "
                   "running? it may still credit it: `destra balance`)",
    }[outcome]
    if as_json:
        click.echo(json.dumps(result))
    elif outcome in ("sent", "credited"):
        click.echo(text)
    else:
        click.echo(text, err=True)
    if outcome in ("refused", "pending"):
        sys.exit(1)


@cli.command("balance")
@settings_options
@click.argument("account")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def balance(account: str, as_json: bool, **flags: Any) -> None:
    """ACCOUNT's balance in the ledger projection (user:ACCOUNT unless it has a prefix)."""
    from ledger.projection import LedgerProjection

    _, dsn = service_addresses(load_settings(**flags))
    whole = ":" in account or account in ("treasury", "mint", "burned")
    name = account if whole else f"user:{account}"
    projection = LedgerProjection(dsn)
    try:
        micro = projection.balances().get(name, 0)
    finally:
        projection.close()
    emit({"account": name, "balance_micro": micro}, as_json,
          lambda b: f"{b['account']}: {b['balance_micro']} micro-tokens")


def _money_options(f: Any) -> Any:
    """The options every account operation takes."""
    for option in reversed((
            settings_options,
            click.option("--account", envvar="DESTRA_ACCOUNT", default="default",
                         show_default=True, help="The signing account (env DESTRA_ACCOUNT)."),
            click.option("--timeout", "timeout_s", type=click.FloatRange(min=0), default=60.0,
                         show_default=True, help="Seconds to wait for the ledger's decision "
                                                 "(0: send and do not wait)."),
            click.option("--json", "as_json", is_flag=True, help="Machine-readable output."))):
        f = option(f)
    return f


def _operate(operation: str, target: str, amount_micro: int, memo: str, account: str,
             timeout_s: float, as_json: bool, flags: dict[str, Any]) -> None:
    """Sign ACCOUNT's operation with its keystore and the next nonce (``Client.operate``),
    send it, and report the ledger's decision: its entries (exit 0), its refusal with the
    reason or no decision within the timeout (exit 1)."""
    from destra.client import Client
    from infra import services

    settings = load_settings(**flags)
    client = Client(settings, kafka_address(settings, services, account=account), account,
                    _passphrase())
    try:
        done = client.operate(operation, target, amount_micro, memo, timeout_s)
    finally:
        client.close()
    what = {"TRANSFER": f"transfer of {amount_micro} micro-tokens from {account} to {target}",
            "STAKE": f"stake of {amount_micro} micro-tokens on node {target} by {account}",
            "UNSTAKE": f"unstake of {amount_micro} micro-tokens from node {target} by "
                       f"{account}",
            "WITHDRAW": f"withdrawal of node {target}'s earnings and matured unbonding to "
                        f"{account}"}[operation]
    text = {"sent": f"{what} sent (nonce {done.nonce}); the ledger decides it",
            "posted": f"{what}: done ({done.transaction_id})",
            "refused": f"{what} refused by the ledger: {done.reason}",
            "pending": f"{what}: no decision by the ledger within {timeout_s:g}s (is the "
                       "ledger processor running? `destra balance` shows it once done)",
            }[done.outcome]
    if as_json:
        click.echo(json.dumps(done.as_dict()))
    else:
        click.echo(text, err=done.outcome in ("refused", "pending"))
    if done.outcome in ("refused", "pending"):
        sys.exit(1)


@cli.command("transfer")
@click.argument("to")
@click.argument("amount_micro", type=click.IntRange(min=1))
@click.option("--memo", default="", help="Recorded with the transfer (200 characters).")
@_money_options
def transfer(to: str, amount_micro: int, memo: str, account: str, timeout_s: float,
             as_json: bool, **flags: Any) -> None:
    """Send AMOUNT_MICRO micro-tokens from --account to the registered account TO."""
    _operate("TRANSFER", to, amount_micro, memo, account, timeout_s, as_json, flags)


@cli.command("stake")
@click.argument("node_id")
@click.argument("amount_micro", type=click.IntRange(min=1))
@_money_options
def stake(node_id: str, amount_micro: int, account: str, timeout_s: float, as_json: bool,
          **flags: Any) -> None:
    """Lock AMOUNT_MICRO more micro-tokens of --account as NODE_ID's stake (the account must
    be the operator the node registered with; the signed request is its consent)."""
    _operate("STAKE", node_id, amount_micro, "", account, timeout_s, as_json, flags)


@cli.command("unstake")
@click.argument("node_id")
@click.argument("amount_micro", type=click.IntRange(min=1))
@_money_options
def unstake(node_id: str, amount_micro: int, account: str, timeout_s: float, as_json: bool,
            **flags: Any) -> None:
    """Move AMOUNT_MICRO micro-tokens of NODE_ID's stake into unbonding: still slashable,
    withdrawable (`destra withdraw`) once the network's unbonding_ms has passed."""
    _operate("UNSTAKE", node_id, amount_micro, "", account, timeout_s, as_json, flags)


@cli.command("withdraw")
@click.argument("node_id")
@_money_options
def withdraw(node_id: str, account: str, timeout_s: float, as_json: bool,
             **flags: Any) -> None:
    """Move NODE_ID's earnings and its matured unbonding to --account (its operator);
    refused `still-bonding` (with the release time) when only unmatured unbonding is
    left."""
    _operate("WITHDRAW", node_id, 0, "", account, timeout_s, as_json, flags)


@cli.group()
def node() -> None:
    """Run a contributor node."""


@node.command("run")
@settings_options
@click.option("--name", default=None, help="Node id (default: node-<hostname>).")
@click.option("--operator", default=None, help="Operator account; its tokens back the stake "
              "(default: the node id).")
@click.option("--region", default="eu-west", show_default=True)
@click.option("--tier", default="datacenter", show_default=True,
              help="Tier offered; capped by what the benchmark measures.")
@click.option("--stake", "stake_micro", type=click.IntRange(min=0), default=None,
              help="Micro-tokens staked from the operator's account (default: the consent "
              "file's, else 0), with its consent: the --consent file, else signed here by "
              "the operator's keystore ($DESTRA_HOME/accounts/OPERATOR.json, the same "
              "passphrase).")
@click.option("--consent", "consent_file", type=click.Path(path_type=Path, dir_okay=False),
              default=None, help="The operator's signed consent to this node's stake, "
              "made on the operator's machine by `destra node consent` (public, no secret): "
              "this machine then needs no operator keystore.")
@click.option("--slots", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Tasks run at once.")
@click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True,
              help="torch threads per task.")
@click.option("--cpu", "force_cpu", is_flag=True, help="Ignore CUDA even when present.")
@click.option("--fault", type=click.Choice(["wrong-result", "no-show", "late", "late-reveal",
                                            "copy", "bad-checkpoint", "diverge",
                                            "tamper-input"]),
              default=None, help="Misbehave on purpose (tests and demos).")
def node_run(name: str | None, operator: str | None, region: str, tier: str,
             stake_micro: int | None, consent_file: Path | None, slots: int, threads: int,
             force_cpu: bool, fault: str | None, **flags: Any) -> None:
    """Benchmark, register and serve assignments until SIGTERM."""
    import signal
    import socket

    from destra import keystore
    from infra import services
    from node_runner.runner import Fault, NodeConfig, NodeRunner

    settings = load_settings(**flags)
    node_id = name or f"node-{socket.gethostname()}"
    passphrase = _passphrase()
    consent = _read_consent(consent_file) if consent_file is not None else None
    operator = operator or (consent.operator_id if consent else node_id)
    if stake_micro is None:
        stake_micro = consent.stake_micro if consent else 0
    operator_keys = None
    if stake_micro > 0 and consent is None:
        # The operator consents to the stake with its account's key; without it the
        # ledger locks nothing and the node runs unstaked.
        path = keystore.account_path(settings, operator)
        if not path.exists():
            raise DestraError(f"--stake {stake_micro} needs the operator's consent: no "
                              f"keystore for account {operator} at {path} (`destra "
                              "account create`)")
        operator_keys = keystore.load(path, passphrase or keystore.require_passphrase()
                                      ).current
    config = NodeConfig(node_id, operator, region, tier, stake_micro, slots,
                        Fault(fault) if fault else Fault.NONE, threads, force_cpu,
                        operator_keys=operator_keys, consent=consent)
    setup_logging()  # a service: INFO, JSON lines unless at a terminal
    runner = NodeRunner(settings, kafka_address(settings, services, node=node_id), config,
                        passphrase=passphrase, serve_metrics=True)
    runner.stake_consent()  # a consent for another node, key, amount or network: refused now
    signal.signal(signal.SIGTERM, lambda *_: runner.stop())
    signal.signal(signal.SIGINT, lambda *_: runner.stop())

    def ready(r: NodeRunner) -> None:
        cap = r.capability
        assert cap is not None
        click.echo(f"node {node_id} registered: {cap.device_name} ({cap.device_class}), "
                   f"{cap.tflops_milli / 1000:.2f} TFLOP/s, {cap.memory_mb} MiB, "
                   f"{slots} slot(s){', fault ' + fault if fault else ''}")

    runner.run(on_ready=ready)
    click.echo(f"node {node_id} stopped after {runner.completed} task(s)")


def _read_consent(path: Path) -> StakeConsent:
    """A consent file (``destra node consent``), its signature checked under its own key."""
    from schemas.bindings import StakeConsent

    try:
        text = path.expanduser().read_text()
    except OSError as e:
        raise DestraError(f"cannot read the stake consent {path}: {e}") from e
    return StakeConsent.from_json(text)


@node.command("consent")
@settings_options
@click.option("--node", "node_id", required=True, help="The node to be staked.")
@click.option("--operator", required=True, help="Your account, whose tokens back the stake.")
@click.option("--stake", "stake_micro", type=click.IntRange(min=1), required=True,
              help="Micro-tokens the node may lock from your account.")
@click.option("--node-key", default=None, metavar="HEX",
              help="The node's signing public key (`destra keys show --node NODE` on the "
                   "node's machine); default: read from the node's keystore here.")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the consent there (default: print it).")
def node_consent(node_id: str, operator: str, stake_micro: int, node_key: str | None,
                 out: Path | None, **flags: Any) -> None:
    """Sign, as the operator, your consent to stake NODE with STAKE of your tokens.

    Run on the operator's machine, with your account's keystore; send the output to the
    node's machine for `destra node run --consent FILE`. It holds no secret: only the
    network, operator, node, the node's signing key, the amount and your signature, which
    stakes that node with that amount on this network and nothing else.
    """
    from destra import keystore
    from schemas.bindings import StakeConsent

    settings = load_settings(**flags)
    if node_key is None:
        path = keystore.node_path(settings, node_id)
        if not path.exists():
            raise DestraError(f"no keystore for node {node_id} at {path}: give its signing "
                              "public key with --node-key (`destra keys show --node "
                              f"{node_id}` on its machine)")
        node_key = str(keystore.public_keys(path)["signing"])
    try:
        node_signing_key = bytes.fromhex(node_key)
    except ValueError as e:
        raise DestraError(f"--node-key is not hex: {e}") from e
    if len(node_signing_key) != 32:
        raise DestraError(f"--node-key must be a 32-byte Ed25519 public key, got "
                          f"{len(node_signing_key)} bytes")
    path = keystore.account_path(settings, operator)
    if not path.exists():
        raise DestraError(f"no keystore for account {operator} at {path} (`destra account "
                          "create`)")
    operator_keys = keystore.load(path, _passphrase() or keystore.require_passphrase()).current
    consent = StakeConsent.sign(operator_keys, settings.topic_prefix, operator, node_id,
                                node_signing_key, stake_micro)
    if out is None:
        click.echo(consent.to_json(), nl=False)
        return
    out.write_text(consent.to_json())
    click.echo(f"{operator} consents to stake node {node_id} with {stake_micro} micro-tokens "
               f"on network {settings.topic_prefix!r}: {out} (public; send it to the node's "
               "machine for `destra node run --consent`)", err=True)


def _issue(settings: Any, kind: str, name: str) -> None:
    """The operator's act: a principal with its ACLs, its credentials saved beside the
    party's keystore (copy that file to the party's machine); for a node, first its inbox
    topic, which must exist before the node registers and is assigned work."""
    from destra import keystore
    from infra import services
    from streams import security
    from streams.admin import ensure_inbox
    from streams.topics import INBOX_PREFIX

    bootstrap = kafka_address(settings, services)
    access = security.current()
    prefix = settings.topic_prefix
    if kind == "node":
        ensure_inbox(bootstrap, prefix, name, replication_factor=settings.replication_factor,
                     min_insync_replicas=settings.min_insync_replicas)
        click.echo(f"node {name}: inbox topic {prefix}{INBOX_PREFIX}{name}")
    if not access.secure:
        raise DestraError("this network runs --insecure: there are no principals to issue")
    if kind == "node":
        user, acls = security.node_principal(prefix, name), security.node_acls(prefix, name)
        path = keystore.node_credentials(settings, name)
    else:
        user, acls = security.account_principal(prefix, name), security.account_acls(prefix, name)
        path = keystore.account_credentials(settings, name)
    security.issue(bootstrap, user, access.ca_pem, path)
    security.create_acls(bootstrap, acls)
    if kind == "node":  # a node joined by an older version read every node's assignments
        security.delete_acls(bootstrap, security.obsolete_node_acls(prefix, name))
    click.echo(f"{kind} {name}: Kafka principal {user}, credentials in {path} (0600)")


@node.command("join")
@settings_options
@click.argument("name")
def node_join(name: str, **flags: Any) -> None:
    """Give node NAME its Kafka principal and ACLs (run by the network's operator).

    It may write its registration, heartbeats, commits and reveals, and read its inbox
    topic (its assignments, data-key grants and reveal calls), made here. The credentials
    go to $DESTRA_HOME/nodes/NAME/kafka.json, beside the node's keystore; on another
    machine, copy that file there (same path under its DESTRA_HOME, or name it with
    DESTRA_KAFKA_CREDENTIALS).
    """
    _issue(load_settings(**flags), "node", name)


@cli.group()
def account() -> None:
    """Submitter accounts."""


@account.command("create")
@settings_options
@click.argument("name")
def account_create(name: str, **flags: Any) -> None:
    """Create account NAME: its keys, its signed registration, its Kafka principal and
    ACLs (run by the network's operator).

    The keystore $DESTRA_HOME/accounts/NAME.json is made (or opened) with the keystore
    passphrase, and the account's AccountRegistered, signed by its key, binds NAME to it:
    the ledger credits nothing to an account before, and refuses a submission signed by
    any other key. On a secure network it may write its registration, submissions and
    data-key grants, and read the registry, assignments, results, verdicts and prices;
    the credentials go to $DESTRA_HOME/accounts/NAME.kafka.json, beside the keystore.
    """
    from destra import keystore
    from infra import services
    from schemas.bindings import account_registration
    from streams.producer import EventProducer

    settings = load_settings(**flags)
    keys = keystore.load_or_create(keystore.account_path(settings, name),
                                   _passphrase() or keystore.require_passphrase()).current
    try:
        _issue(settings, "account", name)
    except DestraError as err:
        if "--insecure" not in str(err):
            raise
        click.echo(f"account {name}: no Kafka principal ({err})", err=True)
    event = account_registration(name, keys, settings.producer_id)
    with EventProducer(settings, kafka_address(settings, services)) as producer:
        producer.send(event)
    click.echo(f"account {name} registered: signing key {keys.signing_public.hex()} "
               f"(event {event.event_id})")


def _params(pairs: tuple[str, ...]) -> dict[str, str]:
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--param")
        params[key] = value
    return params


@cli.command("submit")
@settings_options
@click.argument("workload", required=False)
@click.option("--param", "-p", "pairs", multiple=True, metavar="KEY=VALUE",
              help="A workload parameter (repeatable).")
@click.option("--program", "program_file", type=click.Path(exists=True, dir_okay=False,
                                                           path_type=Path), default=None,
              help="Your own torch.export program (a .pt2 archive), run as a `program` task "
                   "instead of WORKLOAD; with --input.")
@click.option("--input", "input_file", type=click.Path(exists=True, dir_okay=False,
                                                       path_type=Path), default=None,
              help="The program's inputs (a .safetensors file).")
@click.option("--steps", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --program: times the program runs, each on the last one's outputs.")
@click.option("--carry", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --program: how many outputs feed the next step's inputs.")
@click.option("--mantissa-bits", "mantissa_bits", type=click.IntRange(min=0), default=0,
              show_default=True,
              help="With --program: float mantissa bits kept before hashing (0: bit-exact, "
                   "which places the replicas on one device class).")
@click.option("--max-runtime-ms", "max_runtime_ms", type=click.IntRange(min=0), default=0,
              show_default=True,
              help="With --program: stop it after this many milliseconds on each node, "
                   "tighter than the bound its units allow (0: that bound).")
@click.option("--replicas", type=click.IntRange(1, 15), default=None,
              help="Replicas (default: the network's default_replicas, 3 unless changed); "
                   "with --trust adaptive, the fewest (default 1).")
@click.option("--quorum", type=click.IntRange(1, 15), default=None,
              help="Agreeing replicas needed (default: a majority).")
@click.option("--trust", type=click.Choice(["fixed", "adaptive"]), default="fixed",
              show_default=True,
              help="fixed: exactly --replicas replicas. adaptive: one replica on a node that "
                   "earned trust, random spot checks, more replicas on any disagreement, "
                   "for the price of --replicas plus a 30% trust premium.")
@click.option("--tier", default="consumer", show_default=True)
@click.option("--max-price", "max_price", type=click.IntRange(min=1), default=None,
              help="Refuse to pay more micro-tokens than this (default: the quote).")
@click.option("--region", default=None, help="Your region; nearer nodes are preferred.")
@click.option("--account", envvar="DESTRA_ACCOUNT", default="default", show_default=True,
              help="The paying account (env DESTRA_ACCOUNT).")
@click.option("--wait", is_flag=True, help="Follow the task until its verdict.")
@click.option("--timeout", type=float, default=600.0, show_default=True,
              help="Seconds --wait waits.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def submit(workload: str | None, pairs: tuple[str, ...], program_file: Path | None,
           input_file: Path | None, steps: int, carry: int, mantissa_bits: int,
           max_runtime_ms: int, replicas: int | None, quorum: int | None,
           trust: str, tier: str, max_price: int | None, region: str | None, account: str,
           wait: bool, timeout: float, as_json: bool, **flags: Any) -> None:
    """Quote and submit a task of WORKLOAD, or your own program (--program FILE.pt2 --input
    FILE.safetensors); with --wait, follow it to its verdict."""

    from destra.client import Client
    from destra.progress import Reporter
    from infra import services

    _check_submit_form(workload, pairs, program_file, input_file)
    settings = load_settings(**flags)
    client = Client(settings, kafka_address(settings, services, account=account),
                    account, _passphrase())
    try:
        if program_file is not None and input_file is not None:
            q = client.quote_program(program_file.read_bytes(), input_file.read_bytes(),
                                     steps=steps, carry=carry, mantissa_bits=mantissa_bits,
                                     max_runtime_ms=max_runtime_ms, replicas=replicas,
                                     quorum=quorum, tier=tier, trust=trust)
        else:
            assert workload is not None
            q = client.quote(workload, _params(pairs), replicas=replicas, quorum=quorum,
                             tier=tier, trust=trust)
        if not as_json:
            how = (f"{q.replicas} replicas" if trust == "fixed" else
                   f"at least {q.replicas} replica{'s' if q.replicas > 1 else ''}, adaptive "
                   "trust")
            if program_file is not None:
                click.echo(_program_summary(q.params, q.quote.compute_units))
            click.echo(f"quote {q.quote.quote_id}: {q.quote.compute_units} units x {how} "
                       f"in {q.quote.tier} = {q.quote.price_micro} micro-tokens "
                       f"(valid until {q.quote.expires_at})")
        watch = client.watch() if wait else None
        task_id = client.submit(q, max_price_micro=max_price, region=region)
        if not as_json:
            click.echo(f"submitted {task_id}")
            if watch is None and client.data_key(task_id) is not None:
                click.echo(f"  its private parameters are encrypted: keep `destra grant-agent "
                           f"--account {account}` running until it is placed, so the "
                           "assigned nodes get the data key")
        # A program's private parameters are its whole bytes: not for the terminal.
        shown = q.as_dict() if program_file is None else q.as_dict(private=False)
        if watch is None:
            if as_json:
                click.echo(json.dumps({"task_id": task_id, "quote": shown}))
            return
        # A live bar on a terminal, else a line per change; nothing with --json (stderr).
        try:
            with Reporter.for_stream(sys.stderr, enabled=not as_json) as progress:
                progress.expect(task_id, q.replicas)
                done = client.wait([task_id], watch=watch, timeout_s=timeout,
                                   on_progress=lambda p: progress.task(p, q.replicas))
        finally:
            watch.close()
        result = done[task_id].as_dict()
        if as_json:
            click.echo(json.dumps({"task_id": task_id, "quote": shown, **result}))
        elif result["state"] == "verified":
            click.echo(f"verified: digest {result['digest']}")
        else:
            raise DestraError(f"task {task_id} failed: {result['reason']}: {result['detail']}")
    finally:
        client.close()


def _check_submit_form(workload: str | None, pairs: tuple[str, ...], program_file: Path | None,
                       input_file: Path | None) -> None:
    """Either WORKLOAD (with its --param) or --program with --input, not both."""
    if program_file is None:
        if workload is None:
            raise click.UsageError("give a WORKLOAD, or your own program with --program "
                                   "FILE.pt2 --input FILE.safetensors")
        if input_file is not None:
            raise click.UsageError("--input goes with --program")
        return
    if workload is not None or pairs:
        raise click.UsageError("--program runs your own program: give no WORKLOAD and no "
                               "--param with it")
    if input_file is None:
        raise click.UsageError("--program needs its inputs: --input FILE.safetensors")


def _program_summary(params: dict[str, str], units: int) -> str:
    """What a program task will cost, from its public parameters, before paying."""
    return (f"program {params.get('program_sha256', '?')[:16]} on inputs "
            f"{params.get('input_sha256', '?')[:16]}: {units:,} compute units, peak memory "
            f"{params.get('memory_mb', '?')} MiB, runtime bound "
            f"{params.get('max_runtime_ms', '?')} ms per replica "
            f"({params.get('steps', '1')} step(s))")


@cli.command("result")
@settings_options
@click.argument("task_id")
@click.option("--account", envvar="DESTRA_ACCOUNT", default="default", show_default=True,
              help="The submitting account (env DESTRA_ACCOUNT).")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the output here instead of printing it (a program's output, a "
                   "safetensors file, is only written).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def result(task_id: str, account: str, out: Path | None, as_json: bool, **flags: Any) -> None:
    """Fetch, decrypt and check the verified result of TASK_ID (one of your tasks)."""
    from destra.client import Client
    from destra.progress import Reporter
    from infra import services

    settings = load_settings(**flags)
    client = Client(settings, kafka_address(settings, services, account=account),
                    account, _passphrase())
    try:
        # A spinner per step (fetching, decrypting, checking) on a terminal (stderr).
        with Reporter.for_stream(sys.stderr, enabled=not as_json) as progress:
            r = client.result(task_id, say=progress.step)
    finally:
        client.close()
    program = r.workload == "program"
    if program and out is None:
        raise DestraError(f"task {task_id} ran a program: its output is a safetensors file, "
                          "not text; give --out FILE.safetensors")
    if out is not None:
        out.write_bytes(r.output)
    if as_json:
        click.echo(json.dumps({"task_id": task_id, "digest": r.digest.hex(), "node_id": r.node_id,
                               "bytes": len(r.output), "out": str(out) if out else None,
                               "format": "safetensors" if program else None,
                               "output": None if out else r.output.decode("utf-8", "replace")}))
        return
    click.echo(f"# {task_id}: {len(r.output)} bytes from {r.node_id}, SHA-256 {r.digest.hex()} "
               "= the verified digest", err=True)
    if program:
        click.echo(f"# wrote {out}: a safetensors file, the program's outputs (load it with "
                   "safetensors.torch.load_file)", err=True)
    if out is None:
        click.echo(r.output.decode("utf-8", "replace"))


@cli.command("grant-agent")
@settings_options
@click.option("--account", envvar="DESTRA_ACCOUNT", default="default", show_default=True,
              help="The submitting account (env DESTRA_ACCOUNT).")
@click.option("--idle-exit", type=float, default=None,
              help="Exit after this many seconds without events (default: run until stopped).")
def grant_agent(account: str, idle_exit: float | None, **flags: Any) -> None:
    """Grant your tasks' data keys to the nodes assigned them, from this machine.

    Needed while tasks submitted without --wait are being placed (and re-placed):
    a replica whose key is not granted by its commit deadline fails the task
    (no_data_key, refunded). Reads the assignments from the start, so a restart
    catches up.
    """
    from destra.client import Client
    from infra import services

    settings = load_settings(**flags)
    client = Client(settings, kafka_address(settings, services, account=account),
                    account, _passphrase())
    watch = client.watch(from_start=True)
    click.echo(f"granting data keys for {account}; Ctrl-C to stop", err=True)
    idle_since = time.monotonic()
    try:
        while idle_exit is None or time.monotonic() - idle_since < idle_exit:
            if watch.poll(1.0):
                idle_since = time.monotonic()
    except KeyboardInterrupt:
        pass
    finally:
        watch.close()
        client.close()


@cli.command("demo")
@settings_options
@click.option("--keep", is_flag=True, help="Leave the services running afterwards.")
def demo(keep: bool, **flags: Any) -> None:
    """Bring up the local network and show events of every type flowing through it."""
    from destra.demo import run_demo

    run_demo(load_settings(**flags), keep=keep, echo=click.echo)


@cli.command()
@settings_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def audit(as_json: bool, **flags: Any) -> None:
    """Replay every topic from offset 0 through the services' handlers; name each event they
    emitted that the replay would not have, and each one missing (exit 1 if any)."""
    import os

    from destra.processors import rules_from
    from infra import services
    from ledger.audit import AuditConfig, Record
    from ledger.audit import audit as run_audit
    from schemas import decode
    from schemas.errors import EventError
    from streams.authority import Genesis
    from streams.params import params_from
    from streams.reading import read_all
    from streams.topics import DEAD_LETTER, STATE, TOPICS

    settings = load_settings(**flags)
    bootstrap = kafka_address(settings, services)
    records = []
    for spec in TOPICS:
        if spec in (DEAD_LETTER, STATE):
            continue
        for msg in read_all(bootstrap, spec.name(settings.topic_prefix)):
            try:
                event = decode(msg.value() or b"")
            except EventError:
                continue  # dead-lettered when it was first read
            records.append(Record(event, msg.topic(), msg.partition(), msg.offset(),
                                  msg.timestamp()[1]))
    env = os.environ
    config = AuditConfig(  # the settings the processors ran with (destra.processors)
        max_attempts=int(env.get("DESTRA_MAX_REISSUES") or 3),
        reissue_grace_ms=int(env.get("DESTRA_REISSUE_GRACE_MS") or 60_000),
        queue_timeout_ms=int(env.get("DESTRA_QUEUE_TIMEOUT_MS") or 120_000),
        network=settings.topic_prefix, rules=rules_from(env), params=params_from(env))
    report = run_audit(records, Genesis.load(settings.genesis_path), config)
    emit(report.as_dict(), as_json, lambda _: "\n".join(
        [str(d) for d in report.discrepancies]
        + [f"audited {report.records} events ({report.checked}): "
           f"{len(report.discrepancies)} discrepancies"]))
    if not report.ok:
        sys.exit(1)


def _standing(row: dict[str, Any]) -> str:
    return "trusted" if row["trusted"] else "eligible" if row["eligible"] else "no stake"


@cli.command()
@settings_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def reputation(as_json: bool, **flags: Any) -> None:
    """Each node's trust, folded from the topics as the allocator folds it: streak,
    agreements, dissents, no-shows, missed reveals, stake left, whether it runs adaptive
    tasks alone and its spot-check rate (DESTRA_PARAM_TRUSTED_AFTER, DESTRA_PARAM_SPOT_* apply)."""
    import os

    from allocator.trust import Reputation
    from destra.processors import rules_from
    from infra import services
    from ledger.audit import Record, log_order
    from schemas import decode
    from schemas.errors import EventError
    from streams.authority import Genesis
    from streams.reading import read_all
    from streams.topics import topic_for

    settings = load_settings(**flags)
    bootstrap = kafka_address(settings, services)
    genesis = Genesis.load(settings.genesis_path)
    rules = rules_from(os.environ)
    names = ("NodeRegistered", "TaskVerified", "NodePenalized", "LedgerEntryPosted")
    records = []
    for topic in sorted({topic_for(n).name(settings.topic_prefix) for n in names}):
        for msg in read_all(bootstrap, topic):
            try:
                event = decode(msg.value() or b"")
            except EventError:
                continue
            if event.name in names and genesis.check(event) is None:
                records.append(Record(event, msg.topic(), msg.partition(), msg.offset(),
                                      msg.timestamp()[1]))
    fold = Reputation()
    for r in log_order(records):
        f = r.event.fields
        if r.event.name == "NodeRegistered":
            fold.on_registered(f["node_id"], r.timestamp)
        elif r.event.name == "TaskVerified":
            fold.on_verdict(f["contributions"])
        elif r.event.name == "NodePenalized":
            fold.on_penalized(f["node_id"], f["reason"])
        elif f["account"].startswith("stake:"):
            fold.on_stake(f["account"][len("stake:"):], f["amount_micro"])
    rows = [{"node_id": node, "trusted": rules.trusted(rec), "eligible": rules.eligible(rec),
             "streak": rec.streak, "agreements": rec.agreements, "dissents": rec.dissents,
             "no_shows": rec.no_shows, "no_reveals": rec.no_reveals,
             "stake_micro": rec.stake_micro,
             "spot_check_permille": rules.spot_permille(rec) if rules.trusted(rec) else None}
            for node, rec in sorted(fold.records.items())]
    emit(rows, as_json, lambda rs: "\n".join(
        f"{r['node_id']:<24} {_standing(r):<9}"
        f" streak {r['streak']:>5}  agreed {r['agreements']:>6}  dissented {r['dissents']:>4}"
        f"  no-shows {r['no_shows']:>3}  missed reveals {r['no_reveals']:>3}"
        f"  stake {r['stake_micro']:>12}"
        + (f"  spot checks {r['spot_check_permille'] / 10:g} %"
           if r['spot_check_permille'] is not None else "")
        for r in rs) or "no nodes")


cli.add_command(keys)
cli.add_command(gov)
cli.add_command(status)
cli.add_command(tasks)
cli.add_command(nodes)
cli.add_command(dashboard)


def main() -> None:
    """Entry point for ``python -m destra``."""
    cli()
