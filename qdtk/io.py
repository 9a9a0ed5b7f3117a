"""Atomic file output and input fingerprints: every stage writes through these.

A file appears under its final name only when complete (temporary name, fsync, rename), so a
killed run never leaves a half-written output; fingerprints let a rerun skip finished work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a QdtkError names the file when it is missing or malformed."""
    from qdtk.errors import QdtkError

    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise QdtkError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QdtkError(f"{path}: not valid JSON ({e})") from None


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (options, upstream fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def clean_stale_temporaries(folder: str | os.PathLike) -> None:
    """Remove temporaries left by a killed run (their writer is gone)."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob("*.tmp-*"):
            p.unlink(missing_ok=True)
