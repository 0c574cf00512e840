"""The sealed result copies of a verified task, for the browser to open
(``GET /api/task/<id>/sealed``, ``static/decrypt.js``).

Ciphertext only: each agreeing node's copy is sealed to the submitter's X25519 key
(``destra.confidential.seal_result``), so this server hands out bytes it cannot read,
and never sees the keystore, its passphrase or the plaintext; the browser opens the
copy and checks it against the verified digest, as ``Client.result`` does.

The verdict and the reveals are read from Kafka on each request (a user's click), not
from Postgres: the views do not hold the sealed bytes, and the dashboard's one
statement per tick stays the only one it sends.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from destra.blobs import BlobStore
from destra.blobs import fetch as fetch_blob
from destra.errors import DestraError
from schemas import Event


class NoSealedResult(DestraError):
    """The task has no result to hand out: no verdict yet (404) or it failed (409)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def sealed_copies(task_id: str, verdicts: Iterable[Event], reveals: Iterable[Event],
                  blobs: BlobStore | None) -> dict[str, Any]:
    """The response for ``task_id``: the verified digest and each agreeing node's sealed
    copy (node, attempt, the ciphertext in base64), from its verdict and reveal events.

    ``NoSealedResult`` when the task has no verdict or failed. A copy whose blob cannot
    be read is listed under ``problems`` instead (another node's copy may still open).
    """
    verdict = next((e for e in verdicts if e.fields["task_id"] == task_id), None)
    if verdict is None:
        raise NoSealedResult(f"task {task_id} has no verdict yet", 404)
    if verdict.name == "TaskFailed":
        raise NoSealedResult(f"task {task_id} failed: {verdict.fields['reason']}: "
                             f"{verdict.fields['detail']}", 409)
    agreed = {c["node_id"] for c in verdict.fields["contributions"] if c["agreed"]}
    copies: list[dict[str, Any]] = []
    problems: list[str] = []
    for reveal in reveals:
        f = reveal.fields
        if reveal.name != "ResultRevealed" or f["task_id"] != task_id or (
                f["node_id"] not in agreed):
            continue
        try:
            if blobs is None and f["result"] is None:
                raise DestraError(f"its sealed result is blob {f['result_ref']}, and this "
                                  "dashboard was given no blob store")
            sealed = (f["result"] if blobs is None
                      else fetch_blob(blobs, f["result"], f["result_ref"]))
        except DestraError as e:
            problems.append(f"{f['node_id']}: {e}")
            continue
        copies.append({"node_id": f["node_id"], "attempt": f["attempt"],
                       "source": f["result_ref"] or "inline", "bytes": len(sealed),
                       "sealed": base64.b64encode(sealed).decode("ascii")})
    return {"task_id": task_id, "status": "verified",
            "digest": bytes(verdict.fields["digest"]).hex(), "copies": copies,
            "problems": problems}


class SealedSource(Protocol):
    """What the endpoint asks: ``sealed_copies`` of a task (``SealedReader`` reads Kafka)."""

    def read(self, task_id: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class SealedReader:
    """Reads a task's verdict and reveals from Kafka (each topic from its start to its end
    now) and its sealed copies from the blob store."""

    bootstrap: str
    prefix: str
    genesis_path: Path | None
    blobs: Path | None = None
    """The blob store's directory (``Settings.blobs``), for results too big to be inline."""

    def _events(self, name: str) -> list[Event]:
        from schemas import decode
        from streams.authority import Genesis
        from streams.reading import read_all
        from streams.topics import topic_for

        genesis = (Genesis.load(self.genesis_path) if self.genesis_path is not None
                   and self.genesis_path.exists() else None)
        events = []
        for msg in read_all(self.bootstrap, topic_for(name).name(self.prefix)):
            try:
                event = decode(msg.value() or b"")
                events.append(genesis.require(event) if genesis is not None else event)
            except DestraError:
                continue  # undecodable or not signed by whom the genesis names
        return events

    def read(self, task_id: str) -> dict[str, Any]:
        """``sealed_copies`` of ``task_id``; the reveals are read only once it is verified."""
        verdicts = self._events("TaskVerified")
        store = BlobStore(self.blobs) if self.blobs is not None else None
        sealed_copies(task_id, verdicts, [], store)  # raises before reading the reveals
        return sealed_copies(task_id, verdicts, self._events("ResultRevealed"), store)
