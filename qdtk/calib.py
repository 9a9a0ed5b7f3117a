"""Calibration text: a .txt file, a .jsonl file with a "text" field, a folder of them, or built in.

The built-in text is the standard library's `pydoc_data.topics` (English prose about Python, on
every machine, offline): its topics sorted by name and joined by blank lines, split at the topic
boundary nearest to 80% of the characters. The first part is the calibration text, the rest
the held-out evaluation text, so the two never overlap.
"""

from __future__ import annotations

import json
from pathlib import Path

from qdtk.errors import QdtkError

BUILTIN = "builtin"
CALIB_FRACTION = 0.8  # of the built-in text's characters, rounded to a topic boundary
SEPARATOR = "\n\n"


def builtin_text(split: str = "calib") -> str:
    """The built-in text: split "calib" (first ~80%) or "heldout" (the rest)."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    total = sum(len(d) for d in docs)
    acc, cut = 0, len(docs)
    for i, d in enumerate(docs):
        if acc + len(d) / 2 >= CALIB_FRACTION * total:  # topic i is mostly beyond the cut
            cut = i
            break
        acc += len(d)
    if split == "calib":
        return SEPARATOR.join(docs[:cut])
    if split == "heldout":
        return SEPARATOR.join(docs[cut:])
    raise QdtkError(f"unknown built-in split {split!r} (calib or heldout)")


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise QdtkError(f"{path}:{line_no}: not valid JSON ({e})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise QdtkError(f'{path}:{line_no}: no string field "text"')
            docs.append(text)
    return docs


def _read_file(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".txt":
        try:
            return [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as e:
            raise QdtkError(f"{path}: not UTF-8 text ({e})") from None
    raise QdtkError(f"{path}: calibration files must be .txt or .jsonl")


def calibration_documents(source: str | Path | None) -> list[str]:
    """The documents of a calibration source (None or "builtin": the built-in calib split)."""
    if source is None or str(source) == BUILTIN:
        return [builtin_text("calib")]
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
        if not files:
            raise QdtkError(f"{path}: folder holds no .txt or .jsonl files")
        docs = [d for p in files for d in _read_file(p)]
    elif path.is_file():
        docs = _read_file(path)
    else:
        raise QdtkError(f"{path}: calibration source not found")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise QdtkError(f"{path}: calibration source holds no text")
    return docs


def calibration_text(source: str | Path | None) -> str:
    """All documents of a source joined by blank lines: the stream windows are cut from."""
    return SEPARATOR.join(calibration_documents(source))
