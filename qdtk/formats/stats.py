"""The capture statistics store: H = (2/T) sum x x^T per Linear input, one file per block.

Format "qdtk-stats/1", a folder:

    manifest.json
        {"format": "qdtk-stats/1",
         "model": {"path": str, "fingerprint": str},
         "options": {...capture options...},
         "fingerprint": str,              # of model fingerprint + options: what the blocks are of
         "complete": bool,                # every block written
         "validation": {"folder": "validation", "fingerprint": str, "windows": V, "tokens": T},
                                          # optional: the validation statistic (below)
         "blocks": [{"name": "model.layers.0", "file": "block_0000.safetensors",
                     "sha256": str,       # of the block file's bytes, checked by every reader
                     "inputs": [{"key": str, "members": [weight names], "dim": m, "tokens": T}]}]}
    block_0000.safetensors, ...
        one float32 tensor [m, m] per input, named by its key; header metadata
        {"format": "qdtk-stats/1", "fingerprint": <manifest fingerprint>}

An *input* is what one or more Linears read: q/k/v share one, gate/up share one. Its key is a
module path (e.g. "model.layers.0.self_attn.q_proj"); `members` are the checkpoint tensor names
of the Linear weights that read it (e.g. "model.layers.0.self_attn.q_proj.weight"), which is
how `quantize` finds the H of a weight. T counts the tokens that entered H (padding never does);
for a mixture-of-experts expert, the tokens routed to it, and an expert that too few reached has
"fallback": what its H was taken from instead (qdtk.torch.capture.Recorder.statistics).
The validation statistic (`qdtk capture --validation V`, absent from older folders and where
the text was too short) is a stats folder of its own in OUT/validation: the H of V windows of
the same text, disjoint from those in OUT's H, its options recording "validation_of": OUT's
fingerprint. Quantize measures fits on it (inputs they were not fitted to); it is not part of
OUT's fingerprint, so adding it changes no solution that does not use it.
Block files are written atomically and the manifest is rewritten after each, so a killed capture
resumes at the first block missing from the manifest. A manifest without "sha256" entries (older
qdtk) is read with one warning and no integrity check.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qdtk.errors import QdtkError
from qdtk.formats.checkpoint import read_header, read_safetensors, write_safetensors
from qdtk.formats.io import (
    Recorded,
    clean_stale_temporaries,
    fingerprint,
    os_faults,
    read_json,
    warn_unhashed,
    write_json_atomic,
)
from qdtk.formats.validate import check_finite, check_free_space

log = logging.getLogger(__name__)

FORMAT = "qdtk-stats/1"
MANIFEST = "manifest.json"
VALIDATION = "validation"  # the validation statistic's sub-folder


@dataclass
class InputStat:
    """The statistic of one Linear input."""

    key: str
    members: list[str]  # weight tensor names of the Linears reading this input
    H: np.ndarray  # [m, m] float32, (2/T) sum over counted tokens of x x^T
    tokens: int  # T (an expert: the tokens routed to it)
    fallback: str | None = None  # an expert too few tokens reached: what H was taken from


@dataclass
class BlockEntry:
    name: str
    file: str
    inputs: list[dict] = field(default_factory=list)
    sha256: str | None = None  # None: written before content hashes


def hessian_from_sums(xtx: np.ndarray, tokens: int) -> np.ndarray:
    """H = (2/T) * sum x x^T, from the float64 sum; stored as float32."""
    if tokens <= 0:
        raise QdtkError("no calibration tokens reached this input (all padding?)")
    return (xtx * (2.0 / tokens)).astype(np.float32)


class StatsWriter:
    """Writes a stats folder block by block; resumes when the fingerprint matches."""

    def __init__(self, folder: str | Path, model_path: str, model_fingerprint: str, options: dict):
        self.folder = Path(folder)
        with os_faults(self.folder):
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
                if old.get("validation"):
                    self.manifest["validation"] = old["validation"]
            else:
                log.info("%s: statistics of other inputs or options; starting afresh", path)

    def check_space(self, need: int) -> None:
        """Before the first block: room for `need` bytes of statistics, less those kept."""
        kept = sum((self.folder / b["file"]).stat().st_size for b in self.manifest["blocks"])
        check_free_space(self.folder, need - kept, "capture")

    @property
    def complete(self) -> bool:
        return self.manifest["complete"]

    def done(self, block: str) -> bool:
        return any(b["name"] == block for b in self.manifest["blocks"])

    def write_block(self, index: int, name: str, stats: list[InputStat]) -> None:
        file = f"block_{index:04d}.safetensors"
        tensors = {}
        for s in stats:
            check_finite(s.H, f"{self.folder / file}: block {name}: H of input {s.key!r}")
            tensors[s.key] = s.H.astype(np.float32, copy=False)
        sha = write_safetensors(
            self.folder / file, tensors, {"format": FORMAT, "fingerprint": self.fingerprint}
        )
        entry = {
            "name": name,
            "file": file,
            "sha256": sha,
            "inputs": [
                {"key": s.key, "members": list(s.members), "dim": int(s.H.shape[0]),
                 "tokens": int(s.tokens), **({"fallback": s.fallback} if s.fallback else {})}
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

    def set_validation(self, entry: dict) -> None:
        """Record the validation statistic (a complete stats folder inside this one)."""
        self.manifest["validation"] = entry
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
            BlockEntry(b["name"], b["file"], b["inputs"], b.get("sha256"))
            for b in self.manifest["blocks"]
        ]
        if any(b.sha256 is None for b in self.blocks):
            warn_unhashed(self.folder, MANIFEST)
        self._where: dict[str, tuple[BlockEntry, dict]] = {}
        for block in self.blocks:
            for inp in block.inputs:
                for member in inp["members"]:
                    self._where[member] = (block, inp)
        self._cache: tuple[str, dict[str, np.ndarray]] | None = None
        self._verified: set[str] = set()  # block files whose content hash was checked
        self._validation: Stats | None | bool = False  # False: not opened yet

    def validation(self) -> Stats | None:
        """The validation statistic (H of calibration windows kept out of this H), or None when
        the manifest records none (older folders) or it does not belong to this capture (a
        warning then)."""
        if self._validation is not False:
            return self._validation
        self._validation = self._open_validation()
        return self._validation

    def _open_validation(self) -> Stats | None:
        entry = self.manifest.get("validation")
        if not entry:
            return None
        folder = self.folder / entry.get("folder", VALIDATION)
        try:
            val = Stats(folder)
        except QdtkError as e:
            log.warning("%s; quantizing without the validation statistic", e)
            return None
        if (val.fingerprint != entry.get("fingerprint")
                or val.manifest.get("options", {}).get("validation_of") != self.fingerprint):
            log.warning("%s: not the validation statistic of %s; quantizing without it", folder,
                        self.folder)
            return None
        return val

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

    def _load(self, block: BlockEntry) -> dict[str, np.ndarray]:
        """A block file's statistics (one block cached); its header fingerprint checked, and
        its content hash when the manifest records one."""
        path = self.folder / block.file
        if self._cache is None or self._cache[0] != block.file:
            _, meta = read_header(path)
            if meta.get("fingerprint") != self.fingerprint:
                raise QdtkError(f"{path}: written by another capture run than the manifest's")
            recorded = None if block.sha256 is None or block.file in self._verified else Recorded(
                block.sha256, self.folder / MANIFEST,
                "delete it and rerun `qdtk capture` (it recomputes that block)")
            self._cache = (block.file, read_safetensors(path, recorded)[0])
            self._verified.add(block.file)
        return self._cache[1]

    def _checked(self, block: BlockEntry, inp: dict, weight: str | None = None,
                 dim: int | None = None) -> np.ndarray:
        """[m, m] H of input `inp`: present, of the manifest's (and the weight's) size, finite."""
        path = self.folder / block.file
        H = self._load(block).get(inp["key"])
        if H is None:
            raise QdtkError(f"{path}: missing statistic {inp['key']!r}")
        if H.dtype != np.float32:
            raise QdtkError(f"{path}: statistic {inp['key']!r} is {H.dtype}, expected float32")
        m = inp["dim"]
        if H.shape != (m, m) or (dim is not None and dim != m):
            reader = f"{weight!r} has {dim if dim is not None else m}" if weight else \
                f"the manifest says {m}"
            raise QdtkError(
                f"{path}: statistic {inp['key']!r} has shape {list(H.shape)}, but {reader} "
                f"input columns"
            )
        check_finite(H, f"{path}: statistic {inp['key']!r}")
        return H

    def hessian(self, weight: str, dim: int | None = None) -> tuple[np.ndarray, int]:
        """(H [m, m] float32, T) of the input `weight` reads; checks shape and finiteness."""
        block, inp = self._entry(weight)
        return self._checked(block, inp, weight, dim), int(inp["tokens"])

    def verify(self, dims: dict[str, int] | None = None) -> int:
        """Check every block file (content hash, fingerprint) and statistic (shape, finite),
        and with `dims` (weight -> input columns) that each statistic fits its weight; only
        the blocks holding those weights then. Returns the number of files checked."""
        blocks = self.blocks if dims is None else \
            [b for b in self.blocks if any(w in dims for i in b.inputs for w in i["members"])]
        for block in blocks:
            for inp in block.inputs:
                members = [w for w in inp["members"] if dims is not None and w in dims]
                for w in members or [None]:
                    self._checked(block, inp, w, dims[w] if w else None)
        return len(blocks)
