"""A content-addressed store for ciphertexts too big to travel inside an event.

A blob is named by the SHA-256 of its bytes (``blob:sha256:<hex>``), so a
reader checks what it got against the name and nobody can swap a blob's
content. Only ciphertexts are ever stored (sealed task inputs and results),
so the store needs no access control for confidentiality; integrity comes
from the name, authenticity from the AES-GCM tag inside.

The local directory backend serves one machine or a shared file system (the
local network and the tests). Nodes on other machines need a shared backend;
an S3-compatible one is future work (README, "Limits").
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO, TypeVar

from destra.crypto import digest
from destra.errors import DestraError

T = TypeVar("T")
_REF = re.compile(r"blob:sha256:([0-9a-f]{64})")


HASH_BESIDE_BYTES = 4 << 20
"""``BlobStore.put`` hashes data this large while another thread writes it."""
CHUNK_BYTES = 1 << 20
"""The slices ``BlobStore.put`` hands to ``put_chunks``."""


class BlobError(DestraError):
    """A blob reference is malformed, the blob is missing, or its content is not its name's."""


def ref_of(data: bytes) -> str:
    """The reference naming ``data``."""
    return "blob:sha256:" + digest(data).hex()


class BlobStore:
    """Blobs as files ``<root>/<first 2 hex>/<hex>``, written atomically, read verified."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, ref: str) -> Path:
        m = _REF.fullmatch(ref)
        if m is None:
            raise BlobError(f"not a blob reference: {ref[:80]!r}")
        return self.root / m.group(1)[:2] / m.group(1)

    def put(self, data: bytes) -> str:
        """Store ``data``; its reference (storing the same bytes twice is a no-op).

        Data of ``HASH_BESIDE_BYTES`` or more goes through ``put_chunks`` in 1 MiB slices:
        hashed on this thread while another writes it, then renamed into place (48 MiB:
        43 ms here, against about 60 for hashing, then writing)."""
        if len(data) >= HASH_BESIDE_BYTES:
            view = memoryview(data)
            return self.put_chunks(view[at:at + CHUNK_BYTES]
                                   for at in range(0, len(view), CHUNK_BYTES))
        name = ref_of(data)
        path = self._path(name)
        if path.exists():
            return name
        path.parent.mkdir(parents=True, exist_ok=True)
        return self._write(lambda f: f.write(data), path.parent, lambda: name)

    def put_chunks(self, chunks: Iterable[bytes | memoryview]) -> str:
        """Store the concatenation of ``chunks``; its reference. Each piece is made
        (``crypto.seal_chunks`` encrypts it as it is asked for) and hashed on this thread
        while another writes the pieces already hashed, so sealing, hashing and writing a
        large payload overlap and it is never whole in memory."""
        self.root.mkdir(parents=True, exist_ok=True)
        pieces: queue.Queue[bytes | memoryview | None] = queue.Queue(maxsize=8)
        hasher = hashlib.sha256()
        failed: list[BaseException] = []

        def drain(f: BinaryIO) -> None:
            while (piece := pieces.get()) is not None:
                if not failed:
                    try:
                        f.write(piece)
                    except BaseException as e:  # reported once the producer is done
                        failed.append(e)

        def written(f: BinaryIO) -> None:
            writer = threading.Thread(target=drain, args=(f,), name="blob-write", daemon=True)
            writer.start()
            try:
                for piece in chunks:
                    hasher.update(piece)
                    pieces.put(piece)
            finally:
                pieces.put(None)
                writer.join()
            if failed:
                raise failed[0]

        def hashed() -> str:
            name = "blob:sha256:" + hasher.hexdigest()
            self._path(name).parent.mkdir(parents=True, exist_ok=True)
            return name

        return self._write(written, self.root, hashed)

    def _write(self, write: Callable[[BinaryIO], object], where: Path,
               ref: Callable[[], str]) -> str:
        """``write`` a temporary file in ``where`` (the root, or the blob's own directory:
        never where ``files`` looks), then rename it to ``ref()``'s path."""
        fd, tmp = tempfile.mkstemp(dir=where, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            name = ref()
            path = self._path(name)
            if path.exists():  # stored already (hashed while writing): keep that one
                Path(tmp).unlink()
            else:
                os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return name

    def get(self, ref: str, *, verify: bool = True) -> bytes:
        """The blob named ``ref``; ``BlobError`` if missing or (``verify``) not matching
        its name. ``verify=False`` is for a caller that runs ``check`` itself before
        anything it derives from the bytes counts (the node: beside the task's run)."""
        path = self._path(ref)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlobError(f"blob {ref} is not in the store at {self.root}") from None
        if verify:
            check(ref, data)
        return data

    def files(self) -> list[Path]:
        """Every blob file (for audits and the plaintext scan)."""
        return sorted(p for p in self.root.glob("*/*") if p.is_file())


def check(ref: str, data: bytes) -> None:
    """``BlobError`` unless ``data`` is the blob ``ref`` names."""
    if ref_of(data) != ref:
        raise BlobError(f"blob {ref} is corrupt: its content hashes to another name")


def store_or_inline(store: BlobStore, data: bytes, inline_max: int) -> tuple[bytes | None,
                                                                              str | None]:
    """``(inline, None)`` for small data, ``(None, ref)`` once stored when too big."""
    if len(data) <= inline_max:
        return data, None
    return None, store.put(data)


def fetch(store: BlobStore, inline: bytes | None, ref: str | None, *,
          verify: bool = True) -> bytes:
    """The bytes an event carries inline or references; ``BlobError`` if neither
    (``verify``: as in ``BlobStore.get``)."""
    if inline is not None:
        return inline
    if ref is None:
        raise BlobError("the event carries neither inline data nor a blob reference")
    return store.get(ref, verify=verify)
