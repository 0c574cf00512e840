"""What is sealed, for whom, and bound to what: task inputs, data-key grants, results.

The formats shared by the submitter's client and the node runner (issue 4):

* **Task input.** The private parameters (``Workload.split``) as canonical JSON
  ``{"schema": INPUT_SCHEMA, "task_id": ..., "params": {...}}``, sealed under a
  fresh data key; the associated data binds the task id and the schema. Values over
  ``RAW_VALUE_BYTES`` (a user program's base64, tens of MB) travel beside the JSON,
  not in it: ``FRAMED_MAGIC``, a u32 length, the JSON (whose ``raw`` lists each such
  value's name and UTF-8 length, in order), then the values' bytes. A value of a
  workload's ``bytes`` parameter (the program and its input) travels as the bytes its
  base64 encodes, its entry marked ``"bytes"``, and opens as bytes: a quarter less to
  seal, store, fetch and open, and no base64 on the node. Python's JSON took
  300 ms to write and as long to read 64 MB of one string here; the framing costs a
  copy. ``open_input`` reads both encodings (sealed inputs of older clients stay in the
  blob store and are replayed).
* **Grant.** The data key wrapped to one assigned node's X25519 key, bound to
  task, node and attempt, in a ``DataKeyGranted`` signed by the submitter. A
  re-issued replica (a new attempt) needs its own grant.
* **Result.** The workload's canonical output sealed to the submitter's
  X25519 key, bound to task, node and attempt. The digest replicas commit to is
  SHA-256 of the plaintext, so verification never needs it.
"""

from __future__ import annotations

import binascii
import json
import struct
from collections.abc import Callable, Collection, Mapping
from typing import Any

import pybase64

from destra import crypto
from destra.blobs import BlobStore
from destra.crypto import KeyPair
from destra.errors import DecryptionFailed, InvalidParams
from schemas import Event, new_event

INPUT_SCHEMA = "destra.task-input/1"
FRAMED_MAGIC = b"DTI2"
"""First bytes of a framed task input (a JSON document starts with ``{``)."""
RAW_VALUE_BYTES = 4096
"""Private values longer than this (in UTF-8) travel beside the JSON of a framed input."""


def payload_ad(task_id: str) -> bytes:
    """Associated data of a task's sealed input."""
    return crypto.associated_data("payload", task_id, INPUT_SCHEMA)


def grant_ad(task_id: str, node_id: str, attempt: int) -> bytes:
    """Associated data of one replica's wrapped data key."""
    return crypto.associated_data("grant", task_id, node_id, attempt)


def result_ad(task_id: str, node_id: str, attempt: int) -> bytes:
    """Associated data of one replica's sealed result."""
    return crypto.associated_data("result", task_id, node_id, attempt)


def seal_input(task_id: str, private: Mapping[str, str],
               binary: Collection[str] = ()) -> tuple[bytes, bytes]:
    """``(data_key, sealed)``: the private parameters under a fresh data key, framed when a
    value is longer than ``RAW_VALUE_BYTES`` (module docstring). A long value named in
    ``binary`` (a workload's ``byte_names``) that is base64 travels as the bytes it
    encodes, and opens as them."""
    parts = _input_parts(task_id, private, binary)
    data_key = crypto.new_data_key()
    return data_key, crypto.seal(data_key, parts[0] if len(parts) == 1 else b"".join(parts),
                                 payload_ad(task_id))


def seal_input_to(store: BlobStore, inline_max: int, task_id: str,
                  private: Mapping[str, str], binary: Collection[str] = ()
                  ) -> tuple[bytes, bytes | None, str | None]:
    """``(data_key, inline, ref)``: ``seal_input``'s ciphertext inline when it is at most
    ``inline_max`` bytes, else streamed into ``store`` (``crypto.seal_chunks``,
    ``BlobStore.put_chunks``) and referenced: for a 48 MiB input, sealing, hashing and
    writing overlap, and neither the joined plaintext nor the ciphertext is made whole."""
    parts = _input_parts(task_id, private, binary)
    data_key, associated = crypto.new_data_key(), payload_ad(task_id)
    if sum(len(part) for part in parts) + crypto.SEALED_OVERHEAD <= inline_max:
        return data_key, crypto.seal(data_key, b"".join(parts), associated), None
    return data_key, None, store.put_chunks(crypto.seal_chunks(data_key, parts, associated))


def _input_parts(task_id: str, private: Mapping[str, str], binary: Collection[str]
                 ) -> list[bytes]:
    """The plaintext of a task's sealed input, in parts whose concatenation it is: the
    JSON document alone, or the frame's head and then each long value."""
    small: dict[str, str] = {}
    raw: list[tuple[str, bytes, bool]] = []
    for name, value in private.items():
        if name in binary and len(value) > RAW_VALUE_BYTES:
            try:
                raw.append((name, pybase64.b64decode(value, validate=True), True))
                continue
            except (binascii.Error, ValueError):
                pass  # not base64: sealed as text, for the workload to refuse
        data = value.encode("utf-8")
        if len(data) > RAW_VALUE_BYTES:
            raw.append((name, data, False))
        else:
            small[name] = value
    doc: dict[str, object] = {"schema": INPUT_SCHEMA, "task_id": task_id, "params": small}
    if raw:
        doc["raw"] = [[name, len(data), "bytes"] if binary_value else [name, len(data)]
                      for name, data, binary_value in raw]
    head = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    if not raw:
        return [head]
    return [FRAMED_MAGIC + struct.pack("<I", len(head)) + head, *(data for _, data, _ in raw)]


def open_input(data_key: bytes, task_id: str, sealed: bytes) -> dict[str, str | bytes]:
    """The private parameters (bytes for those sealed as bytes, ``seal_input``);
    ``DecryptionFailed`` or ``InvalidParams`` if not valid. Each long value is decrypted
    into its own object (``crypto.open_sealed_in_parts``): no copy of it out of the
    whole plaintext."""
    try:
        doc, values = crypto.open_sealed_in_parts(data_key, sealed, payload_ad(task_id),
                                                  _read_input)
        ok = (isinstance(doc, dict) and doc.get("schema") == INPUT_SCHEMA
              and doc.get("task_id") == task_id and isinstance(doc.get("params"), dict)
              and all(isinstance(k, str) and isinstance(v, str)
                      for k, v in doc["params"].items())
              and not any(name in doc["params"] for name, _ in values)
              and len(dict(values)) == len(values))
    except (ValueError, RecursionError, KeyError, TypeError, struct.error):
        # not JSON (or nested deeper than json.loads goes), or a broken frame
        ok = False
    if not ok:
        raise InvalidParams(f"task {task_id}: the decrypted input is not a {INPUT_SCHEMA} "
                            "document for this task")
    return {**doc["params"], **dict(values)}


def _read_input(read: Callable[[int], bytes]) -> tuple[Any, list[tuple[str, str | bytes]]]:
    """The JSON document of a task input and its long values, read piece by piece: a
    framed input (``FRAMED_MAGIC``) or a JSON document."""
    start = read(len(FRAMED_MAGIC))
    if start != FRAMED_MAGIC:
        return json.loads(start + read(-1)), []
    (n,) = struct.unpack("<I", read(4))
    doc = json.loads(read(n))
    values: list[tuple[str, str | bytes]] = []
    for entry in doc["raw"]:
        name, size, *kind = entry
        if (not isinstance(name, str) or type(size) is not int or size < 0
                or kind not in ([], ["bytes"])):
            raise ValueError("bad raw entry")
        data = read(size)
        if len(data) != size:
            raise ValueError("length mismatch")
        values.append((name, data if kind else data.decode("utf-8")))
    return doc, values


def merge_params(public: Mapping[str, str], private: Mapping[str, str | bytes]
                 ) -> dict[str, str | bytes]:
    """All of a task's parameters; a name both public and private is refused."""
    both = sorted(set(public) & set(private))
    if both:
        raise InvalidParams(f"parameter {both[0]!r} is both public and private")
    return {**public, **private}


def grant(producer_id: str, task_id: str, node_id: str, attempt: int, data_key: bytes,
          node_encryption_key: bytes) -> Event:
    """An unsigned ``DataKeyGranted`` of ``data_key`` for one replica (sign it to send)."""
    ephemeral, wrapped = crypto.wrap_key(data_key, node_encryption_key,
                                         grant_ad(task_id, node_id, attempt))
    return new_event("DataKeyGranted", producer_id, task_id=task_id, node_id=node_id,
                     attempt=attempt, wrapped_key=wrapped, ephemeral_public_key=ephemeral)


def open_grant(keys: KeyPair, event: Event) -> bytes:
    """The data key in a ``DataKeyGranted`` addressed to ``keys``."""
    f = event.fields
    return crypto.unwrap_key(keys, f["ephemeral_public_key"], f["wrapped_key"],
                             grant_ad(f["task_id"], f["node_id"], f["attempt"]))


def seal_result(result_key: bytes, task_id: str, node_id: str, attempt: int,
                output: bytes) -> bytes:
    """The output, readable by the submitter only."""
    return crypto.seal_to(result_key, output, result_ad(task_id, node_id, attempt))


def open_result(keyring: tuple[KeyPair, ...], task_id: str, node_id: str, attempt: int,
                sealed: bytes) -> bytes:
    """The output, with whichever of the submitter's keys (current or retired) it is for."""
    for keys in keyring:
        try:
            return crypto.open_sealed_to(keys, sealed, result_ad(task_id, node_id, attempt))
        except DecryptionFailed:
            continue
    raise DecryptionFailed(f"the result of {task_id} from {node_id} is not sealed to any of "
                           "this account's keys")
