"""The capture statistics store: H = (2/T) sum x x^T per Linear input, one file per block.

Format "qdtk-stats/1", a folder:

    manifest.json
        {"format": "qdtk-stats/1",
         "model": {"path": str, "fingerprint": str},
         "options": {...capture options...},
         "fingerprint": str,              # of model fingerprint + options: what the blocks are of
         "complete": bool,                # every block written
         "blocks": [{"name": "model.layers.0", "file": "block_0000.safetensors",
                     "inputs": [{"key": str, "members": [weight names], "dim": m, "tokens": T}]}]}
    block_0000.safetensors, ...
        one float32 tensor [m, m] per input, named by its key; header metadata
        {"format": "qdtk-stats/1", "fingerprint": <manifest fingerprint>}

An *input* is what one or more Linears read: q/k/v share one, gate/up share one. Its key is a
module path (e.g. "model.layers.0.self_attn.q_proj"); `members` are the checkpoint tensor names
of the Linear weights that read it (e.g. "model.layers.0.self_attn.q_proj.weight"), which is
how `quantize` finds the H of a weight. T counts the tokens that entered H (padding never does).
Block files are written atomically and the manifest is rewritten after each, so a killed capture
resumes at the first block missing from the manifest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qdtk.checkpoint import read_header, read_safetensors, write_safetensors
from qdtk.errors import QdtkError
from qdtk.hessian import all_finite
from qdtk.io import clean_stale_temporaries, fingerprint, read_json, write_json_atomic

log = logging.getLogger(__name__)

FORMAT = "qdtk-stats/1"
MANIFEST = "manifest.json"


@dataclass
class InputStat:
    """The statistic of one Linear input."""

    key: str
    members: list[str]  # weight tensor names of the Linears reading this input
    H: np.ndarray  # [m, m] float32, (2/T) sum over counted tokens of x x^T
    tokens: int  # T


@dataclass
class BlockEntry:
    name: str
    file: str
    inputs: list[dict] = field(default_factory=list)


def hessian_from_sums(xtx: np.ndarray, tokens: int) -> np.ndarray:
    """H = (2/T) * sum x x^T, from the float64 sum; stored as float32."""
    if tokens <= 0:
        raise QdtkError("no calibration tokens reached this input (all padding?)")
    return (xtx * (2.0 / tokens)).astype(np.float32)


class StatsWriter:
    """Writes a stats folder block by block; resumes when the fingerprint matches."""

    def __init__(self, folder: str | Path, model_path: str, model_fingerprint: str, options: dict):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(self.folder)
        self.fingerprint = fingerprint(model_fingerprint, options)
        self.manifest = {
            "format": FORMAT,
            "model": {"path": str(model_path), "fingerprint": model_fingerprint},
            "options": options,
            "fingerprint": self.fingerprint,
            "complete": False,
            "blocks": [],
        }
        path = self.folder / MANIFEST
        if path.exists():
            old = read_json(path)
            if old.get("format") == FORMAT and old.get("fingerprint") == self.fingerprint:
                self.manifest["blocks"] = [
                    b for b in old.get("blocks", []) if (self.folder / b["file"]).exists()
                ]
                self.manifest["complete"] = bool(old.get("complete")) and len(
                    self.manifest["blocks"]
                ) == len(old.get("blocks", []))
            else:
                log.info("%s: statistics of other inputs or options; starting afresh", path)

    @property
    def complete(self) -> bool:
        return self.manifest["complete"]

    def done(self, block: str) -> bool:
        return any(b["name"] == block for b in self.manifest["blocks"])

    def write_block(self, index: int, name: str, stats: list[InputStat]) -> None:
        file = f"block_{index:04d}.safetensors"
        tensors = {}
        for s in stats:
            if not all_finite(s.H):
                raise QdtkError(f"block {name}: H of input {s.key!r} has NaN or Inf")
            tensors[s.key] = s.H.astype(np.float32, copy=False)
        write_safetensors(
            self.folder / file, tensors, {"format": FORMAT, "fingerprint": self.fingerprint}
        )
        entry = {
            "name": name,
            "file": file,
            "inputs": [
                {"key": s.key, "members": list(s.members), "dim": int(s.H.shape[0]),
                 "tokens": int(s.tokens)}
                for s in stats
            ],
        }
        self.manifest["blocks"] = [b for b in self.manifest["blocks"] if b["name"] != name]
        self.manifest["blocks"].append(entry)
        self.manifest["blocks"].sort(key=lambda b: b["file"])
        write_json_atomic(self.folder / MANIFEST, self.manifest)

    def finish(self) -> None:
        self.manifest["complete"] = True
        write_json_atomic(self.folder / MANIFEST, self.manifest)


class Stats:
    """Read access to a stats folder: which input each weight reads, and its H."""

    def __init__(self, folder: str | Path, require_complete: bool = True):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise QdtkError(f"{self.folder}: statistics folder not found")
        self.manifest = read_json(self.folder / MANIFEST)
        if self.manifest.get("format") != FORMAT:
            raise QdtkError(
                f"{self.folder / MANIFEST}: format {self.manifest.get('format')!r}, "
                f"expected {FORMAT!r}"
            )
        if require_complete and not self.manifest.get("complete"):
            raise QdtkError(f"{self.folder}: capture did not finish; rerun `qdtk capture`")
        self.fingerprint: str = self.manifest["fingerprint"]
        self.blocks = [
            BlockEntry(b["name"], b["file"], b["inputs"]) for b in self.manifest["blocks"]
        ]
        self._where: dict[str, tuple[BlockEntry, dict]] = {}
        for block in self.blocks:
            for inp in block.inputs:
                for member in inp["members"]:
                    self._where[member] = (block, inp)
        self._cache: tuple[str, dict[str, np.ndarray]] | None = None

    def layers(self) -> list[str]:
        """Every weight with a statistic, in block order."""
        return list(self._where)

    def block_of(self, weight: str) -> str:
        return self._entry(weight)[0].name

    def layers_of(self, block: str) -> list[str]:
        return [w for w, (b, _) in self._where.items() if b.name == block]

    def _entry(self, weight: str) -> tuple[BlockEntry, dict]:
        try:
            return self._where[weight]
        except KeyError:
            raise QdtkError(f"{self.folder}: no statistic for {weight!r}") from None

    def block_fingerprint(self, block: str) -> str:
        """Identifies one block's statistics (for the resume logic of later stages)."""
        entry = next(b for b in self.blocks if b.name == block)
        return fingerprint(self.fingerprint, entry.file, entry.inputs)

    def hessian(self, weight: str, dim: int | None = None) -> tuple[np.ndarray, int]:
        """(H [m, m] float32, T) of the input `weight` reads; checks shape and finiteness."""
        block, inp = self._entry(weight)
        path = self.folder / block.file
        if self._cache is None or self._cache[0] != block.file:
            infos, meta = read_header(path)
            if meta.get("fingerprint") != self.fingerprint:
                raise QdtkError(f"{path}: written by another capture run than the manifest's")
            self._cache = (block.file, read_safetensors(path)[0])
        H = self._cache[1].get(inp["key"])
        if H is None:
            raise QdtkError(f"{path}: missing statistic {inp['key']!r}")
        m = inp["dim"]
        if H.shape != (m, m) or (dim is not None and dim != m):
            raise QdtkError(
                f"{path}: statistic {inp['key']!r} has shape {list(H.shape)}, but {weight!r} "
                f"has {dim if dim is not None else m} input columns"
            )
        if not all_finite(H):
            raise QdtkError(f"{path}: statistic {inp['key']!r} contains NaN or Inf")
        return H, int(inp["tokens"])
