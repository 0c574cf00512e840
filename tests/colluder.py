"""A colluding node: ``python -m tests.colluder --name N --operator OP --stake S``.

A node of its own: its own keystore and Ed25519/X25519 keys (made on first use under
``$DESTRA_HOME/nodes/N``), its own Kafka principal (``destra node join N``'s
credentials), an operator account whose keystore signs its consent to the stake, as
``destra node run`` does. It registers, heartbeats, reads its own inbox topic, and
commits and reveals every replica it is assigned, each event signed with its own key by
the real node's code (``node_runner.runner.NodeRunner`` and ``node_runner.logic``).

One thing differs: it never computes the workload. Its "output" for a task is
``collusion_output(task_id)``, so every colluder, without a word between them, commits
to and reveals the same wrong digest ``sha256(b"collude:" + task_id)``. It is not the
node runner's ``--fault`` (whose wrong results differ per node): a separate process,
with separate identities, that agrees with its accomplices.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from destra import keystore
from destra.cli_common import kafka_address
from destra.settings import Settings
from infra import services
from node_runner.logic import Computed
from node_runner.runner import NodeConfig, NodeRunner
from schemas import Event
from workloads.canonical import sha256


def collusion_output(task_id: str) -> bytes:
    """What every colluder claims a task's output is."""
    return b"collude:" + task_id.encode()


def collusion_digest(task_id: str) -> bytes:
    """The digest every colluder commits to and reveals for a task."""
    return sha256(collusion_output(task_id))


class ColludingRunner(NodeRunner):
    """The real node runner, whose work is the agreed lie."""

    def _compute(self, assignment: Event, data_key: bytes | None) -> Computed:
        return Computed(collusion_output(assignment.fields["task_id"]), 1)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tests.colluder")
    parser.add_argument("--name", required=True)
    parser.add_argument("--operator", required=True)
    parser.add_argument("--stake", type=int, default=0)
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--region", default="eu-west")
    parser.add_argument("--tier", default="consumer")
    args = parser.parse_args(argv[1:])
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    settings = Settings.from_env()
    passphrase = keystore.require_passphrase()
    operator_keys = None
    if args.stake > 0:
        # The operator's consent to the stake, signed with its account's keys.
        operator_keys = keystore.load(keystore.account_path(settings, args.operator),
                                      passphrase).current
    config = NodeConfig(args.name, args.operator, args.region, args.tier, args.stake,
                        args.slots, threads=1, force_cpu=True, operator_keys=operator_keys)
    runner = ColludingRunner(settings, kafka_address(settings, services, node=args.name),
                             config, passphrase=passphrase)
    signal.signal(signal.SIGTERM, lambda *_: runner.stop())
    signal.signal(signal.SIGINT, lambda *_: runner.stop())
    runner.run(on_ready=lambda r: print(f"colluder {args.name} registered", flush=True))
    print(f"colluder {args.name} stopped after {runner.completed} task(s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
