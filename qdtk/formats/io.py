"""Atomic file output, input fingerprints and content hashes: every stage writes through these.

A file appears under its final name only when complete (temporary name, fsync, rename), so a
killed run never leaves a half-written output; fingerprints let a rerun skip finished work.
Content hashes (sha256 of a file's bytes, computed while it is written and recorded in its
folder's manifest) let every reader check, once per file, that it reads what was written.
An OSError while writing becomes a QdtkError naming the file (qdtk.errors.os_error_message).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qdtk.errors import QdtkError, os_fault

log = logging.getLogger(__name__)

HASH_CHUNK = 16 * 2**20  # bytes per read when a file is hashed from disk


@contextlib.contextmanager
def os_faults(path: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError inside the block into a QdtkError that names `path`."""
    try:
        yield
    except OSError as e:
        raise os_fault(e, path) from e


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with os_faults(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a QdtkError names the file when it is missing or malformed."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise QdtkError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QdtkError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise os_fault(e, path) from e


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (options, upstream fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def new_hash() -> Any:
    """The content hash of qdtk's files (sha256, hex digest recorded as "sha256")."""
    return hashlib.sha256()


def hash_bytes(data: bytes) -> str:
    h = new_hash()
    h.update(data)
    return h.hexdigest()


def hash_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = new_hash()
    with os_faults(path), open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Recorded:
    """A file's content hash as its folder's manifest records it, and what to do on a mismatch."""

    sha256: str
    manifest: str | os.PathLike
    fix: str  # e.g. "rerun `qdtk quantize` (it solves that block again)"

    def check(self, path: str | os.PathLike, actual: str | None = None) -> None:
        """A QdtkError naming `path` when its content (`actual`, else hashed from disk) differs."""
        if (hash_file(path) if actual is None else actual) != self.sha256:
            raise QdtkError(
                f"{path}: content does not match the sha256 recorded in {self.manifest} "
                f"(changed or damaged after qdtk wrote it); {self.fix}"
            )


def warn_unhashed(folder: str | os.PathLike, what: str) -> None:
    """Files written before content hashes are read unchecked, with one warning per folder."""
    log.warning("%s: %s records no content hashes (written by an older qdtk); its files are "
                "read without an integrity check", folder, what)


def clean_stale_temporaries(folder: str | os.PathLike) -> None:
    """Remove temporaries left by a killed run (their writer is gone)."""
    folder = Path(folder)
    if folder.is_dir():
        with os_faults(folder):
            for p in folder.glob("*.tmp-*"):
                p.unlink(missing_ok=True)
