"""The ledger processor: domain events in, ledger entries out, exactly once.

    python -m ledger.processor [--idle-exit SECONDS]

Each batch of input records, the entries and rejections they cause and the
consumer's positions are committed in one Kafka transaction: a crash before
the commit shows none of them to ``read_committed`` readers and re-reads the
inputs, a crash after it never re-reads them. On start the decider's state is
rebuilt from its latest checkpoint, then its own committed entries, refusals
and the submissions after it. The checkpoint is bounded by the work in flight:
the ids the ledger keeps to refuse a replay expire by broker time
(``ledger.decider``, ``ledger.horizon``).
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from destra.errors import DestraError, EventError
from destra.settings import Settings
from ledger.book import TREASURY
from ledger.decider import LedgerDecider
from schemas import Event, decode
from streams import metrics
from streams.authority import Genesis, load_signer
from streams.kafka_runner import KafkaRunner, latest_record, open_snapshot
from streams.klog import setup_logging
from streams.params import ParamSchedule, params_from
from streams.reading import end_offsets, read_all
from streams.topics import DEAD_LETTER, STATE, topic_for

# Its own output topic (ledger.entries) is not among its inputs: it never reads
# back what it wrote, except once at start to rebuild its state.
INPUTS = ("TaskSubmitted", "TaskVerified", "NodePenalized", "TokensMinted", "NodeRegistered",
          "PriceUpdated", "AccountRegistered", "AccountOperation", "ProposalSubmitted",
          "ProposalDecided", "ParameterChanged")
BATCH = 200

_deciders: list[LedgerDecider] = []
"""The decider ``run`` is running (the last one), whose book ``balances`` reads."""


def balances() -> dict[tuple[str, ...], float]:
    """``destra_ledger_micro{account}``, read when scraped: the treasury's balance and the
    total held in ``escrow:*`` as the decider's book has them now (its in-memory state: a
    batch being decided may show before its commit), and the escrowed tasks' count."""
    if not _deciders:
        return {}
    # One C-level copy under the GIL: the runner's thread may be changing the book.
    held = list(_deciders[-1].book.balances.items())
    treasury = sum(b for a, b in held if a == TREASURY)
    escrows = [b for a, b in held if a.startswith("escrow:") and b != 0]
    return {("treasury",): float(treasury), ("escrow",): float(sum(escrows)),
            ("escrow-tasks",): float(len(escrows))}


metrics.register(metrics.Collected(
    "destra_ledger_micro", "The ledger decider's treasury balance and total escrow in "
    "micro-tokens (account=treasury|escrow), and the tasks escrowed (account=escrow-tasks)",
    ["account"], balances))


def _topic(settings: Settings, event: str) -> str:
    return topic_for(event).name(settings.topic_prefix)


def rebuild(settings: Settings, bootstrap: str, decider: LedgerDecider, genesis: Genesis,
            checkpoint: Mapping[str, Any] | None = None,
            decided: Mapping[tuple[str, int], int] | None = None) -> int:
    """Restore the decider: from its latest checkpoint when there is one, then its own
    committed entries (which bring back the nonces of executed operations, the unbonding
    tranches, the stakes' and deposits' ids and the proposals' deposits), its refusals of
    submissions, the prices, the parameter changes, the account and node registrations
    (accounts' keys, nodes' operators) and the submissions after it (from offset 0
    without), and the ids of the mints and the nonces of the account operations it decided
    after it, up to ``decided`` (the input positions of its last committed batch,
    ``committed_positions``: a mint or an operation not read yet must find its id or nonce
    free). Only entries, refusals, prices, parameter changes and mints the genesis keys
    signed count. The number of entries read."""
    entries_from: dict[tuple[str, int], int] = {}
    positions: dict[tuple[str, int], int] = {}
    before: set[str] = set()
    if checkpoint is not None:
        decider.restore_state(checkpoint["state"])
        entries_from, positions = checkpoint["entries_from"], checkpoint["positions"]
        before = set(decider.recent)  # the checkpoint's own batch's transactions
        decider.checkpoint_taken()
    restored = 0

    def read(name: str, since: Mapping[tuple[str, int], int]) -> Iterator[tuple[Any, Event]]:
        """Each record of ``name``'s topic from ``since`` that decodes as a ``name`` (anyone
        can write any type to a topic: the live run ignored the rest, dead-lettered what
        did not decode, and so does the rebuild, or it would fail on it at every start)."""
        for msg in read_all(bootstrap, _topic(settings, name), since):
            try:
                event = decode(msg.value())
            except EventError:
                continue
            if event.name == name:
                yield msg, event

    for _, event in read("LedgerEntryPosted", entries_from):
        if genesis.check(event) is not None:
            continue
        if event.fields["transaction_id"] in before:
            continue  # in the checkpoint already (its own batch's entries)
        decider.restore(event)
        restored += 1
    for _, price in read("PriceUpdated", positions):
        if genesis.check(price) is None:  # a forged price is not the network's
            decider.decide(price)  # prices decide nothing: state only
    for _, change in read("ParameterChanged", positions):
        if genesis.check(change) is None:  # only governance's changes are the network's
            decider.decide(change)  # a parameter schedule: state only
    later: list[Event] = []
    for msg, registration in read("AccountRegistered", positions):
        # The bindings made after the checkpoint (the checkpoint holds the earlier ones):
        # in topic order, as the live run read them, so the first binding of an id stands.
        # Those the live run had not read yet are bound after the operations' nonces are
        # recalled (below): an operation refused `unregistered-account` took no nonce.
        if (msg.offset() or 0) >= (decided or {}).get((msg.topic() or "", msg.partition() or 0),
                                                      0):
            later.append(registration)
        else:
            decider.register(registration)
    for _, node in read("NodeRegistered", positions):
        decider.bind_operator(node)  # the first validly signed registration names it
    for _, verdict in read("TaskFailed", positions):
        # Its own refusals of submissions (committed with the batch that read them): a
        # copy replayed while still fresh must find the task id taken.
        if verdict.signer == "ledger" and genesis.check(verdict) is None:
            decider.refused(verdict)
    for msg, mint in read("TokensMinted", positions):
        where = (msg.topic() or "", msg.partition() or 0)
        if (msg.offset() or 0) >= (decided or {}).get(where, 0):
            continue  # not decided yet: the runner reads it after the rebuild
        # Every mint the live run read that the treasury signed and that was fresh took its
        # id, credited or refused (a refusal's entries are not on the log to restore).
        kind, at = msg.timestamp()
        if kind and at > 0 and genesis.check(mint) is None:
            decider.recall_mint(mint, at)
    for msg, op in read("AccountOperation", positions):
        where = (msg.topic() or "", msg.partition() or 0)
        if (msg.offset() or 0) >= (decided or {}).get(where, 0):
            continue  # not decided yet: the runner reads it after the rebuild
        # Every operation the live run read that its account's key signed with a nonce
        # above the last took it, executed or refused (a refusal leaves no entry).
        kind, at = msg.timestamp()
        if kind and at > 0:
            decider.recall_op(op, at)
    for registration in later:
        decider.register(registration)
    for _, submission in read("TaskSubmitted", positions):
        decider.remember(submission)
    return restored


def group(settings: Settings) -> str:
    """The ledger processor's group: its transactional id and its state record's key."""
    return f"{settings.topic_prefix}ledger-processor"


def read_past(settings: Settings, bootstrap: str, ledger_key: bytes,
              ends: Mapping[tuple[str, int], int]) -> bool:
    """Whether the ledger processor has committed a batch past every position in ``ends``
    (e.g. the registrations just written: their accounts are bound), by the input positions
    in its latest state record, which ``ledger_key`` (the genesis ledger key) signed."""
    data = latest_record(bootstrap, STATE.name(settings.topic_prefix), group(settings),
                         f"{group(settings)}-probe")
    if data is None:
        return not any(ends.values())
    positions = open_snapshot(data, ledger_key)["positions"]
    return all(positions.get(tp, 0) >= end for tp, end in ends.items())


def committed_positions(settings: Settings, bootstrap: str,
                        ledger_key: bytes) -> dict[tuple[str, int], int]:
    """The input positions of the ledger processor's last committed batch (its state record,
    which ``ledger_key`` signed): where its runner resumes; empty on a first start."""
    data = latest_record(bootstrap, STATE.name(settings.topic_prefix), group(settings),
                         f"{group(settings)}-restore")
    return {} if data is None else dict(open_snapshot(data, ledger_key)["positions"])


def checkpoint(bootstrap: str, settings: Settings, decider: LedgerDecider,
               positions: dict[tuple[str, int], int]) -> dict[str, Any]:
    """The decider's checkpoint at the end of the current batch: its state, where its entries
    topic ends now (its entries from there on are this batch's, already in the state, or
    later ones), and the input positions after the batch."""
    state = decider.checkpoint_state()
    decider.checkpoint_taken()
    return {"state": state, "positions": positions,
            "entries_from": end_offsets(bootstrap, _topic(settings, "LedgerEntryPosted"))}


def run(settings: Settings, bootstrap: str, *, idle_exit_s: float | None = None,
        running: Callable[[], bool] = lambda: True, crash_before_commit: int = 0) -> int:
    """Process until ``running()`` is false or nothing arrives for ``idle_exit_s``.

    The decider runs under ``streams.kafka_runner.KafkaRunner`` like every service:
    its inputs pass the genesis authority check, its entries are signed with the
    ledger's key, and each batch commits in one transaction.
    """
    # The network's start values of its live parameters (``DESTRA_PARAM_<NAME>``, the same
    # environment every service of the network gets); changes follow from governance.
    decider = LedgerDecider(settings.producer_id or "ledger", network=settings.topic_prefix,
                            params=ParamSchedule(params_from(os.environ)))
    _deciders[:] = [decider]
    genesis = Genesis.load(settings.genesis_path)
    signer = load_signer(settings.service_keys, "ledger", genesis)

    def sign(event: Event) -> Event:
        return signer.sign(event) if signer.may_sign(event.name) else event

    runner = KafkaRunner(settings, bootstrap, [decider],
                         # Stable per network: a restarted processor fences its predecessor.
                         group=group(settings),
                         snapshot_keys=signer.keys, sign=sign, check=genesis.check,
                         crash_before_commit=crash_before_commit,
                         # After fencing: the killed predecessor's open transaction on
                         # ledger.entries would hold the rebuild's read back for the
                         # whole transaction timeout (the chaos test saw 25-60 s).
                         checkpoint=lambda at: checkpoint(bootstrap, settings, decider, at),
                         checkpoint_every_s=float(os.environ.get("DESTRA_LEDGER_CHECKPOINT_S",
                                                                 "30")))

    def prepare() -> None:
        rebuild(settings, bootstrap, decider, genesis, runner.latest_checkpoint(),
                committed_positions(settings, bootstrap, signer.keys.signing_public))

    runner.prepare = prepare
    return runner.run(running, idle_exit_s).emitted


def main() -> None:
    """Run the processor until SIGTERM (or idle, with --idle-exit)."""
    from infra import services

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle-exit", type=float, default=None)
    parser.add_argument("--crash-before-commit", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup_logging()
    settings = Settings.from_env()
    state = services.read_state(settings)
    bootstrap = settings.kafka_bootstrap or (state.kafka_bootstrap if state else None)
    if not bootstrap:
        raise SystemExit("ledger processor: no Kafka; run `destra infra up` or set DESTRA_*")
    metrics.serve(settings.producer_id or "ledger-processor", settings.home)
    services.use_service_access(settings, "ledger")
    stop = False

    def on_term(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    run(settings, bootstrap, idle_exit_s=args.idle_exit, running=lambda: not stop,
        crash_before_commit=args.crash_before_commit)


if __name__ == "__main__":
    main()


def wait_for_transactions(settings: Settings, bootstrap: str, transaction_ids: Iterable[str],
                          timeout_s: float = 120.0) -> None:
    """Block until every named transaction (``settle/<task>``, ``slash/<event>``...) has
    committed entries on the ledger topic; ``DestraError`` after ``timeout_s``."""
    wanted = set(transaction_ids)
    deadline = time.monotonic() + timeout_s
    topic = _topic(settings, "LedgerEntryPosted")
    while True:
        posted = set()
        for msg in read_all(bootstrap, topic):
            try:
                posted.add(decode(msg.value()).fields["transaction_id"])
            except EventError:
                continue
        missing = wanted - posted
        if not missing:
            return
        if time.monotonic() > deadline:
            raise DestraError(f"{len(missing)} transactions not posted within {timeout_s:.0f}s, "
                              f"e.g. {sorted(missing)[0]}")
        time.sleep(0.5)  # poll interval: read_all already waited for the topic's end


def ledger_outcome(settings: Settings, bootstrap: str, genesis: Genesis, transaction_id: str,
                   source: str, event_id: str,
                   since: Mapping[str, Mapping[tuple[str, int], int]],
                   timeout_s: float = 60.0) -> tuple[str, str | None]:
    """How the ledger decided an input sent by a client: ``("posted", None)`` once the
    entries of ``transaction_id`` (signed by the ledger) are on the ledger topic,
    ``("refused", reason)`` once the input (event ``event_id``, of the event type
    ``source``) is dead-lettered from its topic, ``("pending", None)`` after
    ``timeout_s``. ``since``: where to start reading each topic (the ends of
    ``LedgerEntryPosted``'s and the dead letters' topics, taken before the input was sent:
    ``outcome_positions``). A dead letter is not signed: it says why, it moves no money."""
    entries = _topic(settings, "LedgerEntryPosted")
    dead = DEAD_LETTER.name(settings.topic_prefix)
    inputs = _topic(settings, source)
    start = {entries: dict(since.get(entries, {})), dead: dict(since.get(dead, {}))}
    deadline = time.monotonic() + timeout_s
    while True:
        for topic, positions in start.items():
            for msg in read_all(bootstrap, topic, positions):
                positions[(msg.topic() or "", msg.partition() or 0)] = (msg.offset() or 0) + 1
                try:
                    event = decode(msg.value())
                except EventError:
                    continue
                if (event.name == "LedgerEntryPosted"
                        and event.fields["transaction_id"] == transaction_id
                        and genesis.check(event) is None):
                    return "posted", None
                if event.name == "DeadLettered" and event.fields["source_topic"] == inputs:
                    try:
                        refused = decode(event.fields["value"])
                    except EventError:
                        continue
                    if refused.event_id == event_id:
                        return "refused", str(event.fields["reason"])
        if time.monotonic() > deadline:
            return "pending", None
        time.sleep(0.5)  # poll interval: read_all already waited for the topics' ends


def outcome_positions(settings: Settings,
                      bootstrap: str) -> dict[str, dict[tuple[str, int], int]]:
    """Where the ledger's answers start now (``ledger_outcome``'s ``since``): take them
    before sending the input, so none is missed."""
    return {t: end_offsets(bootstrap, t) for t in (_topic(settings, "LedgerEntryPosted"),
                                                   DEAD_LETTER.name(settings.topic_prefix))}


def mint_outcome(settings: Settings, bootstrap: str, genesis: Genesis, mint_id: str,
                 since: Mapping[str, Mapping[tuple[str, int], int]],
                 timeout_s: float = 60.0) -> tuple[str, str | None]:
    """How the ledger decided the mint ``mint_id`` (``ledger_outcome``): ``("credited",
    None)`` once its entries (``mint/<id>``) are posted, ``("refused", reason)`` once it is
    dead-lettered (unregistered account, stale, forged...), ``("pending", None)``."""
    outcome, why = ledger_outcome(settings, bootstrap, genesis, f"mint/{mint_id}",
                                  "TokensMinted", mint_id, since, timeout_s)
    return ("credited" if outcome == "posted" else outcome), why
