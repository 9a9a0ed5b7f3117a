"""Hugging Face checkpoint folders, tensor by tensor, without torch.

Reading: one `model.safetensors`, or shards listed by `model.safetensors.index.json`. Headers are
parsed here (not by the safetensors package) so that every damaged file gets an error naming it,
and tensors are memory-mapped: reading one never loads another. bfloat16 comes back as
`ml_dtypes.bfloat16` (bit-exact) or as float32 on request.

Writing: `CheckpointWriter` streams tensors into shards of bounded size; shards are written under
temporary names and renamed, then the index, so a killed write leaves no file under a final name
that is incomplete.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
import shutil
import struct
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from qdtk.errors import QdtkError, os_fault
from qdtk.formats.experts import fused_parts
from qdtk.formats.io import (
    Recorded,
    atomic_path,
    clean_stale_temporaries,
    fingerprint,
    hash_bytes,
    new_hash,
    os_faults,
    write_json_atomic,
)

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors dtype code <-> NumPy dtype (little endian on disk).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
CODES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_CODES = frozenset({"F16", "BF16", "F32", "F64"})

# Weights inside numbered blocks (layers.3., blocks.12., layer.0., h.5.) are the Linears of the
# transformer stack; embeddings, norms and the output head live outside or are excluded by name.
_IN_BLOCK = re.compile(r"\.\d+\.")
_NOT_LINEAR = re.compile(r"(norm|ln_|layernorm|embed|wte|wpe)", re.IGNORECASE)
_EXPERT = re.compile(r"^(?P<parent>.+)\.experts\.(?P<e>\d+)\.")
# Vision towers of multimodal models stay in full precision by default (--include selects them).
_VISION = re.compile(r"(^|\.)(vision_tower|vision_model|visual|embed_vision)\.")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file and absolute byte range, from the header alone."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    begin: int  # absolute byte offset in `file`
    end: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: tensors (by name, file order) and metadata."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise QdtkError(f"{path}: truncated safetensors file (no header length)")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or 8 + n > size:
                raise QdtkError(f"{path}: bad header length {n} for a file of {size} bytes")
            raw = f.read(n)
    except FileNotFoundError:
        raise QdtkError(f"{path}: file not found (removed while qdtk ran?)") from None
    except OSError as e:
        raise os_fault(e, path) from e
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise QdtkError(f"{path}: bad JSON header ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape = entry["dtype"], tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise QdtkError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if dtype not in DTYPES:
            raise QdtkError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        expected = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if end - begin != expected or begin < 0:
            raise QdtkError(
                f"{path}: tensor {name!r} spans {end - begin} bytes but shape {list(shape)} "
                f"of {dtype} needs {expected}"
            )
        if base + end > size:
            raise QdtkError(
                f"{path}: data shorter than the header says (tensor {name!r} ends at byte "
                f"{base + end}, file has {size}); the file is truncated"
            )
        tensors[name] = TensorInfo(name, dtype, shape, path, base + begin, base + end)
    ordered = dict(sorted(tensors.items(), key=lambda kv: kv[1].begin))
    return ordered, {str(k): str(v) for k, v in metadata.items()}


def match_name(name: str, pattern: str) -> bool:
    """A pattern is a glob (`*.q_proj.weight`), or a regex when written `re:...`."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def fused_views(info: TensorInfo) -> list[TensorInfo]:
    """The per-expert 2-D matrices of a fused 3-D expert tensor (qdtk.formats.experts.fused_parts)
    as views of its bytes: each is whole consecutive rows, so one contiguous byte range. [] if
    `info` is no fused expert tensor."""
    parts = fused_parts(info.name, info.shape) or []
    cols, item = (info.shape[2], DTYPES[info.dtype].itemsize) if parts else (0, 0)
    return [TensorInfo(name, info.dtype, (rows, cols), info.file,
                       info.begin + row * cols * item, info.begin + (row + rows) * cols * item)
            for name, row, rows in parts]


class Checkpoint:
    """A read-only view of a checkpoint folder: headers parsed eagerly, data mapped lazily.

    A fused 3-D expert tensor (`....experts.gate_up_proj` [E, 2I, d], `....experts.down_proj`
    [E, d, I]) is also readable per expert matrix, under the per-expert names
    `....experts.<e>.{gate,up,down}_proj.weight` (`fused`, `info`, `read`; `names` lists only the
    stored tensors), so that every stage treats each expert matrix as a Linear weight.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise QdtkError(f"{self.folder}: model folder not found")
        self.files = self._shard_files()
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[Path, dict[str, str]] = {}
        for file in self.files:
            infos, meta = read_header(file)
            self.metadata[file] = meta
            for name, info in infos.items():
                if name in self.tensors:
                    raise QdtkError(
                        f"{file}: tensor {name!r} is also in {self.tensors[name].file.name}"
                    )
                self.tensors[name] = info
        self._check_index()
        self.views: dict[str, TensorInfo] = {}  # per-expert name -> view of a fused tensor
        self.fused: dict[str, list[str]] = {}  # fused tensor -> its per-expert names, in order
        for info in list(self.tensors.values()):
            views = fused_views(info)
            if views:
                self.fused[info.name] = [v.name for v in views]
                self.views.update((v.name, v) for v in views if v.name not in self.tensors)

    def _shard_files(self) -> list[Path]:
        index = self.folder / INDEX_NAME
        if index.exists():
            from qdtk.formats.io import read_json

            self.index = read_json(index)
            weight_map = self.index.get("weight_map") if isinstance(self.index, dict) else None
            if not isinstance(weight_map, dict):
                raise QdtkError(f"{index}: no weight_map")
            names = sorted(set(weight_map.values()))
            for n in names:
                if not (self.folder / n).is_file():
                    raise QdtkError(f"{index}: names shard {n!r}, which is missing")
            return [self.folder / n for n in names]
        self.index = None
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise QdtkError(f"{self.folder}: no .safetensors files (and no {INDEX_NAME})")
        return files

    def _check_index(self) -> None:
        if self.index is None:
            return
        for name, shard in self.index["weight_map"].items():
            info = self.tensors.get(name)
            if info is None:
                raise QdtkError(f"{self.folder / INDEX_NAME}: tensor {name!r} not found in {shard}")
            if info.file.name != shard:
                raise QdtkError(
                    f"{self.folder / INDEX_NAME}: tensor {name!r} listed in {shard} "
                    f"but stored in {info.file.name}"
                )

    @property
    def config(self) -> dict:
        path = self.folder / "config.json"
        if not path.exists():
            return {}
        from qdtk.formats.io import read_json

        return read_json(path)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors or name in self.views

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        info = self.tensors.get(name) or self.views.get(name)
        if info is None:
            raise QdtkError(f"{self.folder}: no tensor named {name!r}")
        return info

    def covered(self, names: Iterable[str]) -> set[str]:
        """The fused expert tensors all of whose matrices are among `names` (they are replaced
        by those matrices); a fused tensor only partly among them is an error."""
        names = set(names)
        out = set()
        for fused, parts in self.fused.items():
            hit = [p for p in parts if p in names]
            if hit and len(hit) < len(parts):
                raise QdtkError(f"{self.folder}: {len(hit)} of the {len(parts)} expert matrices "
                                f"of the fused tensor {fused!r} are selected; select all or none")
            if hit:
                out.add(fused)
        return out

    def read(self, name: str, dtype: np.dtype | type | None = None) -> np.ndarray:
        """One tensor as a NumPy array (a read-only memory map unless `dtype` converts it).

        Each read maps its own tensor alone, unmapped when the array is dropped: a map of the
        whole file kept open would hold every page ever read in the resident set (a pass over
        all Linears: the model's size, however little is in use)."""
        info = self.info(name)
        if info.end == info.begin:  # nothing to map
            arr = np.empty(info.shape, DTYPES[info.dtype])
        else:
            try:
                with os_faults(info.file):
                    arr = np.memmap(info.file, dtype=DTYPES[info.dtype], mode="r",
                                    offset=info.begin, shape=tuple(info.shape))
            except ValueError:  # shorter than its header said when it was opened
                raise QdtkError(f"{info.file}: truncated while qdtk ran (tensor {name!r} ends "
                                f"at byte {info.end})") from None
        return arr if dtype is None else arr.astype(dtype)

    def linear_names(
        self, include: Iterable[str] = (), exclude: Iterable[str] = ()
    ) -> list[str]:
        """The Linear weights to quantize.

        Default: 2-D `*.weight` tensors inside numbered blocks, minus norms, embeddings,
        routers and vision towers; a fused 3-D expert tensor counts as its expert matrices (in
        its place). `include` patterns replace that default selection; `exclude` patterns remove
        from it. A tensor named by an include pattern that is not 2-D is an error.
        """
        include, exclude = list(include), list(exclude)
        candidates = [v for n in self.tensors for v in self.fused.get(n, [n])]
        if include:
            chosen = [n for n in candidates if any(match_name(n, p) for p in include)]
            for n in chosen:
                info = self.info(n)
                if len(info.shape) != 2:
                    raise QdtkError(
                        f"{info.file}: tensor {n!r} has shape {list(info.shape)}; only 2-D "
                        f"Linear weights can be quantized"
                    )
        else:
            routers = self.routers()
            chosen = [
                n
                for n in candidates
                if len(self.info(n).shape) == 2
                and n.endswith(".weight")
                and _IN_BLOCK.search(n)
                and not _NOT_LINEAR.search(n)
                and not _VISION.search(n)
                and n not in routers
            ]
        return [n for n in chosen if not any(match_name(n, p) for p in exclude)]

    def experts(self) -> dict[str, int]:
        """MoE layers, stored per expert or fused: parent module ("....mlp", or the block for
        DiffusionGemma's "....layers.0.experts") -> number of experts."""
        found: dict[str, set[int]] = {}
        for n in [*self.tensors, *self.views]:
            m = _EXPERT.match(n)
            if m:
                found.setdefault(m["parent"], set()).add(int(m["e"]))
        return {p: len(es) for p, es in found.items()}

    def routers(self) -> set[str]:
        """The routers of the MoE layers: a 2-D weight with one row per expert, right under an
        experts' parent or in a `router` module under it (they stay in full precision unless
        --include names them)."""
        experts = self.experts()
        out = set()
        for n, info in self.tensors.items():
            parent, _, leaf = n.removesuffix(".weight").rpartition(".")
            if parent.endswith(".router"):  # DiffusionGemma: ....layers.0.router.proj
                parent, leaf = parent.removesuffix(".router"), "router"
            if (len(info.shape) == 2 and n.endswith(".weight") and parent in experts
                    and info.shape[0] == experts[parent] and leaf != "experts"):
                out.add(n)
        return out

    def fingerprint(self) -> str:
        """Changes when any shard's header or size changes (cheap: no data is hashed)."""
        parts = []
        for file in self.files:
            with open(file, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                parts.append([file.name, file.stat().st_size, f.read(n).hex()])
        return fingerprint(parts)

    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())


def _encode_header(entries: dict[str, dict], metadata: dict[str, str] | None) -> bytes:
    header = dict(entries)
    if metadata:
        header = {"__metadata__": metadata, **header}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(
    path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> str:
    """Write one safetensors file atomically (tensors in the given order); returns the sha256
    of its bytes, computed while writing."""
    entries, offset = {}, 0
    arrays = {}
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype.newbyteorder("<") not in CODES and arr.dtype not in CODES:
            raise QdtkError(f"{path}: tensor {name!r} has unsupported dtype {arr.dtype}")
        code = CODES.get(arr.dtype) or CODES[arr.dtype.newbyteorder("<")]
        arr = arr.astype(DTYPES[code], copy=False)
        arrays[name] = arr
        entries[name] = {
            "dtype": code,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    h = new_hash()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for chunk in (_encode_header(entries, metadata),
                      *(arr.reshape(-1).view(np.uint8) for arr in arrays.values())):
            h.update(chunk)
            f.write(chunk)
    return h.hexdigest()


def read_safetensors(
    path: str | Path, recorded: Recorded | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a whole (small) safetensors file: arrays copied into memory, and its metadata;
    with `recorded`, its content hash is checked first."""
    infos, meta = read_header(path)
    with os_faults(path):
        data = Path(path).read_bytes()
    if recorded is not None:
        recorded.check(path, hash_bytes(data))
    out = {
        name: np.frombuffer(data, DTYPES[i.dtype], i.numel, i.begin).reshape(i.shape).copy()
        for name, i in infos.items()
    }
    return out, meta


class CheckpointWriter:
    """Stream tensors into a sharded checkpoint folder; use as a context manager.

    Shards hold at most `max_shard_bytes` (a single larger tensor gets a shard of its own).
    Nothing gets a final name until `close()` succeeds: shards are renamed from temporaries to
    `model-0000i-of-0000N.safetensors` (or `model.safetensors` when one suffices), then the
    index is written. `hashes` then maps each shard's name to the sha256 of its bytes.
    """

    def __init__(
        self,
        folder: str | Path,
        max_shard_bytes: int = 5 * 2**30,
        metadata: dict[str, str] | None = None,
    ):
        self.folder = Path(folder)
        with os_faults(self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
            for stale in self.folder.glob("*.partial"):  # left by a killed writer
                stale.unlink()
        clean_stale_temporaries(self.folder)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = metadata or {"format": "pt"}
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str], str]] = []  # temporary path, names, sha256
        self.hashes: dict[str, str] = {}
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, array: np.ndarray) -> None:
        if name in self._names:
            raise QdtkError(f"{self.folder}: tensor {name!r} written twice")
        self._names.add(name)
        if self._pending and self._pending_bytes + array.nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = array
        self._pending_bytes += array.nbytes
        self.total_bytes += array.nbytes

    def _flush(self) -> None:
        tmp = self.folder / f"shard-{len(self._shards) + 1:05d}.safetensors.partial"
        sha = write_safetensors(tmp, self._pending, self.metadata)
        self._shards.append((tmp, list(self._pending), sha))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Finish: name the shards and write the index. Returns the shard paths."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        finals = []
        if n == 1:
            finals.append(self.folder / SINGLE_NAME)
        else:
            finals += [
                self.folder / f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
            ]
        for (tmp, _, sha), final in zip(self._shards, finals, strict=True):
            with os_faults(final):
                tmp.replace(final)
            self.hashes[final.name] = sha
        index = self.folder / INDEX_NAME
        if n > 1:
            weight_map = {
                name: f.name
                for (_, names, _), f in zip(self._shards, finals, strict=True)
                for name in names
            }
            write_json_atomic(
                index, {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            )
        elif index.exists():
            with os_faults(index):
                index.unlink()
        return finals

    def abort(self) -> None:
        for tmp, _, _ in self._shards:
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")


def copy_aux_files(src: str | Path, dst: str | Path, skip: Collection[str] = ()) -> list[str]:
    """Copy every non-weight file: config, tokenizer, remote code, pooling folders; not the
    names in `skip`."""
    src, dst = Path(src), Path(dst)
    with os_faults(dst):
        dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for p in sorted(src.iterdir()):
        if p.name.startswith(".") or p.name == INDEX_NAME or p.name.endswith(_WEIGHT_SUFFIXES) \
                or p.name in skip:
            continue
        if p.is_dir() and dst.resolve().is_relative_to(p.resolve()):
            continue  # the output folder itself (a run folder inside the model's)
        if p.is_dir():
            with os_faults(dst / p.name):  # a shutil.Error is an OSError too
                shutil.copytree(p, dst / p.name, dirs_exist_ok=True)
        else:
            with atomic_path(dst / p.name) as tmp:
                shutil.copy2(p, tmp)
        copied.append(p.name)
    return copied
