"""The stages `qdtk pack` (QUANT folder + original model -> packed folder) and `qdtk unpack`
(packed folder -> dense checkpoint): resumable, atomic, every input checked first. The format
itself (docs/FORMAT.md) is qdtk.formats.packed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np

from qdtk.errors import QdtkError
from qdtk.formats.bits import GROUP
from qdtk.formats.checkpoint import (
    FLOAT_CODES,
    INDEX_NAME,
    SINGLE_NAME,
    Checkpoint,
    CheckpointWriter,
    copy_aux_files,
    read_header,
)
from qdtk.formats.io import (
    atomic_path,
    fingerprint,
    read_json,
    write_json_atomic,
)
from qdtk.formats.packed import (
    DEFAULT_SHARD_BYTES,
    FORMAT,
    FORMAT_2,
    LOADER_CODE,
    LOADER_FILE,
    OUT_DTYPES,
    QUANT_METHOD,
    WORD_BITS,
    PackedBCQ,
    fused_record,
    fused_tensor,
    gated_config,
    model_config,
    module_name,
    pack_layer,
    read_packed_layer,
    read_quantization_config,
    verify_packed,
)
from qdtk.formats.solution import FORMAT as QUANT_FORMAT
from qdtk.formats.solution import (
    REPORT,
    read_report,
    read_solution_block,
    recorded_hash,
)
from qdtk.formats.validate import check_free_space

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- stages


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _head_hash(path: Path) -> list:
    """A safetensors file's size and header: cheap, and changes with any rewrite we care about."""
    with open(path, "rb") as f:
        head = f.read(8)
        raw = f.read(int.from_bytes(head, "little"))
    return [path.name, path.stat().st_size, hashlib.sha256(raw).hexdigest()[:16]]


def _finished(out: Path, fp: str, packed: bool) -> bool:
    """A previous run with the same inputs completed: config.json is written last."""
    if not (out / "config.json").is_file():
        return False
    try:
        ckpt = Checkpoint(out)
        has_qc = "quantization_config" in read_json(out / "config.json")
    except QdtkError:
        return False
    return has_qc == packed and all(
        meta.get("qdtk_fingerprint") == fp for meta in ckpt.metadata.values()
    )


def _start_output(out: Path, *inputs: Path) -> None:
    out = out.resolve()
    for folder in inputs:
        if out == folder.resolve():
            raise QdtkError(f"{out}: the output folder must differ from the input {folder}")
    out.mkdir(parents=True, exist_ok=True)
    # A stale config.json would mark a half-rewritten folder as finished: it goes first.
    (out / "config.json").unlink(missing_ok=True)


def _remove_stale_shards(out: Path) -> None:
    """Delete shards of an earlier run that the writer just replaced (its index names the
    current ones; without an index there is one file)."""
    index = out / INDEX_NAME
    keep = set(read_json(index)["weight_map"].values()) if index.exists() else {SINGLE_NAME}
    for p in out.glob("*.safetensors"):
        if p.name not in keep:
            p.unlink()


def _read_report(quant: Path) -> dict:
    report = read_report(quant)
    if report.get("complete") is False:
        raise QdtkError(f"{quant}: quantize has not finished; rerun `qdtk quantize` to complete it")
    return report


def _check_blocks(quant: Path, report: dict, ckpt: Checkpoint) -> tuple[list[Path], set[str]]:
    """Every solution file, checked before anything is written: it exists, is the one the
    report describes (fingerprint and content hash), and its layers are 2-D '*.weight'
    tensors of the model with the model's shapes, each in one block only. Returns the files
    and the weights they solve."""
    paths, seen = [], set()
    for block in report["blocks"]:
        path = quant / block["file"]
        if not path.is_file():
            raise QdtkError(f"{quant / REPORT}: block file {block['file']!r} is missing")
        _, meta = read_header(path)  # a damaged file is named as such
        fp = block.get("fingerprint")
        if fp is not None and (meta.get("format"), meta.get("fingerprint")) != (QUANT_FORMAT, fp):
            raise QdtkError(
                f"{path}: its fingerprint does not match {quant / REPORT}; rerun quantize"
            )
        recorded = recorded_hash(quant, block)
        if recorded is not None:
            recorded.check(path)
        try:
            layers = json.loads(meta["layers"])
            shapes = {w: tuple(info["shape"]) for w, info in layers.items()}
        except (KeyError, TypeError, ValueError):
            raise QdtkError(f"{path}: header metadata has no valid 'layers' entry") from None
        for weight, shape in shapes.items():
            if not weight.endswith(".weight"):
                raise QdtkError(f"{path}: layer {weight!r}: only Linear weights named "
                                "'*.weight' can be packed")
            if weight not in ckpt:
                raise QdtkError(f"{path}: layer {weight!r} is not a tensor of {ckpt.folder}")
            if ckpt.info(weight).shape != shape:
                raise QdtkError(f"{path}: layer {weight!r} has shape {list(shape)}, "
                                f"the model's is {list(ckpt.info(weight).shape)}")
            if weight in seen:
                raise QdtkError(f"{path}: layer {weight!r} is also in an earlier block")
            seen.add(weight)
        paths.append(path)
    return paths, seen


def _quantization_config(
    report: dict, modules: dict[str, dict], packed: dict[str, int], fp: str, model_bytes: int,
    version: str,
) -> dict:
    weights = sum(info["shape"][0] * info["shape"][1] for info in modules.values())
    kinds = sorted({info["kind"] for info in modules.values()})
    options = report.get("options")
    method = options.get("method") if isinstance(options, dict) else None
    return {
        "quant_method": QUANT_METHOD,
        "format": version,
        "method": method if isinstance(method, str) else "+".join(kinds),
        "group_size": GROUP,
        "word_bits": WORD_BITS,
        "orders_allowed": sorted({o for i in modules.values() for o in i.get("orders", [])}),
        "bits_per_weight": sum(packed.values()) / weights if weights else None,
        "quantized_weights": weights,
        "original_size_bytes": model_bytes,
        "fingerprint": fp,
        "modules": modules,
    }


def pack_checkpoint(
    quant: str | Path,
    out: str | Path,
    model: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """The stage `qdtk pack`: solution store + original model -> packed checkpoint folder."""
    from tqdm import tqdm

    quant, out = Path(quant), Path(out)
    report = _read_report(quant)
    if model is None:
        model = (report.get("model") or {}).get("path")
        if not model:
            raise QdtkError(f"{quant / REPORT}: records no model path; pass --model")
    ckpt = Checkpoint(model)
    paths, quantized = _check_blocks(quant, report, ckpt)
    fp = fingerprint(FORMAT, _file_hash(quant / REPORT), [_head_hash(p) for p in paths],
                     ckpt.fingerprint(), max_shard_bytes)
    if _finished(out, fp, packed=True):
        log.info("%s: already packed from these inputs; nothing to do", out)
        return out
    recorded = (report.get("model") or {}).get("fingerprint")
    if recorded and recorded != ckpt.fingerprint():
        log.warning("%s: model fingerprint differs from the one %s records", ckpt.folder,
                    quant / REPORT)
    quantized |= ckpt.covered(quantized)  # fused expert tensors: replaced by their matrices
    copied = sum(ckpt.info(n).nbytes for n in ckpt.names() if n not in quantized)
    check_free_space(out, sum(p.stat().st_size for p in paths) + copied, "pack")  # upper bound
    _start_output(out, ckpt.folder, quant)

    modules: dict[str, dict] = {}
    packed_bits: dict[str, int] = {}
    rotated = (report.get("options") or {}).get("rotate", "none") != "none"
    fused = fused_record(ckpt, set(ckpt.fused) & quantized)
    version = FORMAT_2 if rotated or fused else FORMAT  # FORMAT.md section 6
    meta = {"format": "pt", "qdtk_format": version, "qdtk_fingerprint": fp}
    with CheckpointWriter(out, max_shard_bytes, meta) as writer:
        for path in tqdm(paths, desc="pack", unit="block"):
            for weight, layer in read_solution_block(path).items():
                module, info = module_name(weight), ckpt.info(weight)
                try:
                    p = pack_layer(layer)
                except ValueError as e:
                    raise QdtkError(f"{path}: layer {weight!r}: {e}") from None
                for name, arr in p.tensors(module).items():
                    writer.add(name, arr)
                modules[module] = {"kind": p.kind, "shape": list(p.shape), "dtype": info.dtype}
                if isinstance(p, PackedBCQ):
                    modules[module]["orders"] = sorted({int(o) for o in p.orders})
                else:
                    modules[module]["bits"] = p.bits
                if p.rotation is not None:
                    modules[module]["rotation"] = p.rotation.to_dict()
                packed_bits[module] = p.storage_bits()
        for name in ckpt.names():
            if name not in quantized:
                writer.add(name, ckpt.read(name))
    _remove_stale_shards(out)

    copy_aux_files(ckpt.folder, out)
    with atomic_path(out / LOADER_FILE) as tmp:
        tmp.write_text(LOADER_CODE)
    config = ckpt.config
    config["quantization_config"] = _quantization_config(
        report, modules, packed_bits, fp, ckpt.nbytes(), version
    )
    if fused:
        config["quantization_config"]["fused"] = fused
    config["quantization_config"]["sha256"] = writer.hashes
    write_json_atomic(out / "config.json", gated_config(config))
    log.info("%s: %d modules packed at %.3f bits/weight", out, len(modules),
             config["quantization_config"]["bits_per_weight"] or 0.0)
    return out


def unpack_checkpoint(
    packed: str | Path,
    out: str | Path,
    dtype: str = "float16",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """The stage `qdtk unpack`: packed folder -> dense checkpoint the model's own code loads."""
    from tqdm import tqdm

    packed, out = Path(packed), Path(out)
    if dtype not in OUT_DTYPES:
        raise QdtkError(f"unknown dtype {dtype!r}; choose one of {sorted(OUT_DTYPES)}")
    to = OUT_DTYPES[dtype]
    qc = read_quantization_config(packed)
    ckpt = Checkpoint(packed)
    fp = fingerprint("unpack", FORMAT, _file_hash(packed / "config.json"), ckpt.fingerprint(),
                     dtype, max_shard_bytes)
    if _finished(out, fp, packed=False):
        log.info("%s: already unpacked from these inputs; nothing to do", out)
        return out
    modules = qc["modules"]
    owned = verify_packed(packed, qc, ckpt)  # everything validated before anything is written
    dense = sum(i["shape"][0] * i["shape"][1] for i in modules.values()) * to.itemsize
    for info in (ckpt.info(n) for n in ckpt.names() if n not in owned):
        dense += info.numel * to.itemsize if info.dtype in FLOAT_CODES else info.nbytes
    check_free_space(out, dense, "unpack")
    _start_output(out, packed)

    def dequantized(module: str) -> np.ndarray:  # [n, m] float32
        return read_packed_layer(ckpt, module, modules[module]).to_layer().weight()

    fused = qc.get("fused", {})
    in_fused = {m for entry in fused.values() for m in entry["modules"]}
    with CheckpointWriter(out, max_shard_bytes, {"format": "pt", "qdtk_fingerprint": fp}) as w:
        for module in tqdm([m for m in modules if m not in in_fused], desc="unpack",
                           unit="layer"):
            w.add(f"{module}.weight", dequantized(module).astype(to))
        for name, entry in fused.items():
            w.add(name, fused_tensor(entry, dequantized, to))
        for name in ckpt.names():
            if name not in owned:
                arr = ckpt.read(name)
                w.add(name, arr.astype(to) if ckpt.info(name).dtype in FLOAT_CODES else arr)
    _remove_stale_shards(out)

    copy_aux_files(packed, out, skip={LOADER_FILE})
    config = model_config(read_json(packed / "config.json"))
    del config["quantization_config"]
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = dtype
    write_json_atomic(out / "config.json", config)
    log.info("%s: %d modules unpacked to %s", out, len(modules), dtype)
    return out


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB' or a plain number of bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper()
    num = s.rstrip("KMGTIB")
    try:
        value = float(num) * units[s[len(num):]]
    except (ValueError, KeyError):
        raise QdtkError(f"bad size {text!r}; write e.g. 2GB or 500MB") from None
    if not math.isfinite(value) or value < 1:
        raise QdtkError(f"bad size {text!r}")
    return int(value)
