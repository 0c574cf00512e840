"""The task page's decryption, without a browser: the sealed-copies endpoint hands out only
the agreeing nodes' ciphertexts and the verified digest (a clear 404/409 otherwise), and
``static/decrypt.js``, run by Node.js where there is one, opens a real keystore (with a
retired key) and a real sealed result exactly as ``Client.result`` does."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess  # noqa: S404 - runs node on the test's own script
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch

from destra import crypto, keystore
from destra.blobs import BlobStore
from destra.confidential import open_result, seal_result
from destra.dashboard import pages
from destra.dashboard.app import STATIC, create_app
from destra.dashboard.hub import Hub
from destra.dashboard.sealed import NoSealedResult, sealed_copies
from destra.errors import DestraError
from schemas import Event, new_event
from workloads.program_tensors import write_tensors

OUTPUT = b'{"c":[[1.5,2.0],[3.0,4.25]],"n":2}'
DIGEST = crypto.digest(OUTPUT)
PASSPHRASE = "correct horse, b\u00e4ttery"  # not ASCII: the browser encodes UTF-8 as Python


def _verified(task_id: str = "t1") -> Event:
    return new_event("TaskVerified", "verifier", task_id=task_id, digest=DIGEST, quorum=2,
                     result_ref=None, contributions=[
                         {"node_id": n, "compute_units": 1, "agreed": n != "d2"}
                         for n in ("d0", "d1", "d2")])


def _reveal(task_id: str, node: str, attempt: int, sealed: bytes, store: BlobStore,
            inline: bool = True) -> Event:
    return new_event("ResultRevealed", node, task_id=task_id, node_id=node, attempt=attempt,
                     salt=bytes(16), digest=DIGEST, runtime_ms=5,
                     result_ref=None if inline else store.put(sealed),
                     result=sealed if inline else None, checkpoints=[])


def _reveals(key: bytes, store: BlobStore) -> list[Event]:
    """d0 inline, d1 in the blob store (attempt 1), d2 dissenting, and another task's."""
    return [_reveal("t1", "d0", 0, seal_result(key, "t1", "d0", 0, OUTPUT), store),
            _reveal("t1", "d1", 1, seal_result(key, "t1", "d1", 1, OUTPUT), store,
                    inline=False),
            _reveal("t1", "d2", 0, seal_result(key, "t1", "d2", 0, b"wrong"), store),
            _reveal("t2", "d0", 0, seal_result(key, "t2", "d0", 0, OUTPUT), store)]


def test_a_verified_task_gets_only_its_agreeing_nodes_sealed_copies(tmp_path: Path) -> None:
    keys = crypto.KeyPair.generate()
    store = BlobStore(tmp_path / "blobs")
    body = sealed_copies("t1", [_verified("t0"), _verified()], _reveals(
        keys.encryption_public, store), store)
    assert body["digest"] == DIGEST.hex() and body["problems"] == []
    assert [(c["node_id"], c["attempt"]) for c in body["copies"]] == [("d0", 0), ("d1", 1)]
    assert body["copies"][1]["source"].startswith("blob:sha256:")
    for c in body["copies"]:  # ciphertext only, which the submitter's key opens
        sealed = base64.b64decode(c["sealed"])
        assert OUTPUT not in sealed
        assert open_result((keys,), "t1", c["node_id"], c["attempt"], sealed) == OUTPUT


def test_a_copy_whose_blob_is_missing_is_listed_as_a_problem(tmp_path: Path) -> None:
    keys = crypto.KeyPair.generate()
    reveals = _reveals(keys.encryption_public, BlobStore(tmp_path / "elsewhere"))
    body = sealed_copies("t1", [_verified()], reveals, BlobStore(tmp_path / "empty"))
    assert [c["node_id"] for c in body["copies"]] == ["d0"]
    assert body["problems"][0].startswith("d1: blob blob:sha256:")
    no_store = sealed_copies("t1", [_verified()], reveals, None)
    assert "no blob store" in no_store["problems"][0]


def test_a_task_without_a_verdict_or_that_failed_has_no_sealed_result() -> None:
    with pytest.raises(NoSealedResult, match="t1 has no verdict yet") as e:
        sealed_copies("t1", [_verified("t0")], [], None)
    assert e.value.status == 404
    failed = new_event("TaskFailed", "verifier", task_id="t1", reason="no_quorum",
                       detail="2 digests, none agreed by 2")
    with pytest.raises(NoSealedResult, match="t1 failed: no_quorum: 2 digests") as e:
        sealed_copies("t1", [failed], [], None)
    assert e.value.status == 409


class _Reader:
    """The endpoint's source over given events rather than Kafka (none: Kafka is down)."""

    def __init__(self, events: list[Event], store: BlobStore) -> None:
        self.events, self.store = events, store

    def read(self, task_id: str) -> dict[str, Any]:
        if not self.events:
            raise DestraError("broker down")
        return sealed_copies(task_id, [e for e in self.events if e.name != "ResultRevealed"],
                             self.events, self.store)


def _get(app: Any, path: str) -> tuple[int, dict[str, str], Any]:
    """One GET through the ASGI app (no server, no lifespan: the hub never starts)."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(),
             "query_string": b"", "headers": [], "scheme": "http", "http_version": "1.1",
             "server": ("test", 80), "client": ("test", 1), "root_path": ""}
    asyncio.run(app(scope, receive, send))
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, json.loads(body)


def test_the_endpoint_answers_copies_or_says_why_not(tmp_path: Path) -> None:
    keys = crypto.KeyPair.generate()
    store = BlobStore(tmp_path / "blobs")
    failed = new_event("TaskFailed", "verifier", task_id="t3", reason="no_data_key", detail="")
    events = [_verified(), failed, *_reveals(keys.encryption_public, store)]
    app = create_app(Hub("postgresql://unused"), _Reader(events, store))
    status, headers, body = _get(app, "/api/task/t1/sealed")
    assert status == 200 and headers["cache-control"] == "no-store"
    assert [c["node_id"] for c in body["copies"]] == ["d0", "d1"]
    assert body["digest"] == DIGEST.hex()
    assert _get(app, "/api/task/t9/sealed")[::2] == (404, {
        "error": "task t9 has no verdict yet"})
    assert _get(app, "/api/task/t3/sealed")[::2] == (409, {
        "error": "task t3 failed: no_data_key: "})
    down = create_app(Hub("postgresql://unused"), _Reader([], store))
    status, _, body = _get(down, "/api/task/t1/sealed")
    assert status == 503 and "broker down" in body["error"]
    status, _, body = _get(create_app(Hub("postgresql://unused")), "/api/task/t1/sealed")
    assert status == 503 and "destra result" in body["error"]


def test_the_task_page_carries_the_form_and_its_scripts() -> None:
    html = pages.page("task", "task:t'1", {"html": {}}, task_id="t'1")
    assert "data-task='t&#x27;1'" in html
    assert "<input type='file' id='decrypt-keystore'" in html
    assert "<input type='password' id='decrypt-passphrase'" in html
    assert html.index("/static/scrypt-js/scrypt.js") < html.index("/static/decrypt.js")
    assert "decrypt.js" not in pages.page("tasks", "tasks", {"html": {}})
    assert (STATIC / "scrypt-js" / "scrypt.js").is_file()
    assert (STATIC / "scrypt-js" / "LICENSE.txt").is_file()
    pyproject = tomllib.loads((STATIC.parents[2] / "pyproject.toml").read_text())
    shipped = pyproject["tool"]["setuptools"]["package-data"]["destra"]
    assert {"dashboard/static/*.js", "dashboard/static/scrypt-js/*"} <= set(shipped)


NODE = shutil.which("node")
_NODE_SCRIPT = """
globalThis.scrypt = require(process.argv[2] + "/scrypt-js/scrypt.js");
require(process.argv[2] + "/decrypt.js");
const fs = require("fs"), D = globalThis.DestraDecrypt;
const [text, body] = [fs.readFileSync(process.argv[3], "utf8"),
                      JSON.parse(fs.readFileSync(process.argv[4], "utf8"))];
const run = async (passphrase, b) => {
  try {
    const pairs = await D.openKeystore(text, passphrase);
    const r = await D.openResult(pairs, b);
    return {keys: pairs.length, node: r.node_id,
            output: Buffer.from(r.output).toString("base64")};
  } catch (e) { return {error: e.message}; }
};
(async () => {
  const tampered = JSON.parse(JSON.stringify(body));
  tampered.copies = tampered.copies.slice(0, 1);
  tampered.copies[0].node_id = "d9";  // the associated data names another node
  console.log(JSON.stringify({
    right: await run(JSON.parse(process.argv[5]), body),
    wrong: await run("not it", body),
    tampered: await run(JSON.parse(process.argv[5]), tampered),
    digest: await run(JSON.parse(process.argv[5]), {...body, digest: "00".repeat(32)}),
    names: [D.fileFor("t", Buffer.from(process.argv[6], "base64")),
            D.fileFor("t", Buffer.from('{"a": 1}')), D.fileFor("t", Buffer.from([1, 2, 3]))]
      .map((f) => f.name)}));
})();
"""


@pytest.mark.skipif(NODE is None, reason="no node (Node.js) to run decrypt.js with")
def test_decrypt_js_opens_what_the_client_opens_with_a_retired_key(tmp_path: Path) -> None:
    path = tmp_path / "alice.json"
    old = keystore.create(path, PASSPHRASE.encode(), n=2**10).current
    keystore.rotate(path, PASSPHRASE.encode())  # the result is sealed to the retired key
    store = BlobStore(tmp_path / "blobs")
    body = sealed_copies("t1", [_verified()], _reveals(old.encryption_public, store), store)
    (tmp_path / "body.json").write_text(json.dumps(body))
    (tmp_path / "run.js").write_text(_NODE_SCRIPT)
    assert NODE is not None
    done = subprocess.run([NODE, str(tmp_path / "run.js"), str(STATIC), str(path),  # noqa: S603
                           str(tmp_path / "body.json"), json.dumps(PASSPHRASE),
                           base64.b64encode(write_tensors({"out0": torch.ones(2)})).decode()],
                          capture_output=True, text=True, timeout=60, check=True)
    out = json.loads(done.stdout)
    assert out["right"] == {"keys": 2, "node": "d0",
                            "output": base64.b64encode(OUTPUT).decode()}, out
    assert out["wrong"]["error"].startswith("wrong passphrase"), out
    assert "d9: no key of this keystore opens it" in out["tampered"]["error"], out
    assert "is not the verified digest 0000000000000000" in out["digest"]["error"], out
    # A user program's output tensors download as safetensors; JSON as .json.
    assert out["names"] == ["t.safetensors", "t.json", "t.out"], out
