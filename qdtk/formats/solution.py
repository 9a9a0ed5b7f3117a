"""Quantized layers as the solvers produce them, and the solution store `qdtk quantize` writes.

Two kinds of layer:

- `BinaryCodedLayer` (DAQ; METHOD.md §3 and §7): per 128-column group g an order o_g; for every
  plane k < o_g a sign plane, a row scale a[k, g] (n values) and a column scale b[k, j] (one per
  column):
      What[i, j] = sum_{k < o_g(j)} (a[k, g(j), i] * b[k, j]) * B[k, i, j]
  Scales are float16, exactly as packed; `dequantize` is the one canonical float32 evaluation
  (planes added in order k = 0, 1, ...), used by the solver for its reported errors and by
  unpack, so both agree bit for bit.
- `AffineLayer` (RTN, GPTQ baselines): integer codes with a float16 scale and zero per row and
  group: What[i, j] = (codes[i, j] - zero[i, g]) * scale[i, g].

Format "qdtk-quant/1", a folder:

    report.json     {"format", "model": {path, fingerprint}, "stats": {path, fingerprint},
                     "options", "blocks": [{"name", "file", "fingerprint", "sha256",
                                            "layers": [...]}],
                     "layers": {weight name: per-layer report}, "summary": {...}}
    block_0000.safetensors, ...   per weight name w (a checkpoint tensor name):
        binary coded:  w.orders    uint8   [G]
                       w.signs     uint8   [Kmax, n, ceil(m/8)]  bit j%8 of byte j//8 is
                                           column j's sign (1 = +1), least significant first
                       w.row_scale float16 [Kmax, G, n]   (0 where k >= o_g)
                       w.col_scale float16 [Kmax, m]      (0 where k >= o_g(j))
        affine:        w.codes uint8 [n, m]; w.scale, w.zero float16 [n, G]
        header metadata: {"format": "qdtk-quant/1", "fingerprint": str,
                          "layers": JSON {w: {"kind": "bcq" | "affine", "shape": [n, m],
                                              "bits": int (affine only),
                                              "rotation": {"kind": "hadamard", "seed",
                                                           "block"} (rotated only)}}}
A rotated layer (`qdtk quantize --rotate hadamard`, qdtk.math.rotation) codes W Q, not W: its planes
or codes dequantize to What in the rotated basis, and `weight()` gives What Q^T.
Planes beyond a group's order are padding here; the deployable packed format (pack.py) drops it.
A block's "sha256" is that of its file's bytes, computed while writing; readers check it (a report
without them, from an older qdtk, is read with one warning).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numba import njit

from qdtk.backend import array_module
from qdtk.errors import QdtkError
from qdtk.formats.bits import GROUP, affine_bits, bcq_bits, group_slices
from qdtk.formats.checkpoint import read_header, read_safetensors, write_safetensors
from qdtk.formats.io import Recorded, read_json, warn_unhashed
from qdtk.math.rotation import Rotation

FORMAT = "qdtk-quant/1"
REPORT = "report.json"


def group_index(m: int, group: int = GROUP) -> np.ndarray:
    """[m] the group of each column."""
    return np.arange(m) // group


def dequantize_block(signs, a, b):
    """[n, w] float32 sum_k (a_k b_k^T) (.) B_k of one group, planes added in order k = 0, 1, ...

    signs [K, n, w] bool (True = +1); a [K, n] and b [K, w] as stored (float16). This is the
    canonical evaluation: the solver reports errors with it and unpack reproduces it exactly.
    NumPy arrays go through a Numba kernel (the same float32 operations in the same order, no
    fused multiply-add, so the same bits, about 20x faster); CuPy arrays through the formula.
    """
    xp = array_module(signs)
    a, b = a.astype(xp.float32), b.astype(xp.float32)
    if xp is np:
        return _dequantize_block(signs, a, b, np.empty(signs.shape[1:], np.float32))
    What = xp.zeros(signs.shape[1:], xp.float32)
    for k in range(signs.shape[0]):
        What += xp.outer(a[k], b[k]) * xp.where(signs[k], xp.float32(1), xp.float32(-1))
    return What


@njit(cache=True)
def _dequantize_block(signs, a, b, What):
    K, n, w = signs.shape
    for i in range(n):
        for j in range(w):
            What[i, j] = 0
        for k in range(K):
            ak = a[k, i]
            for j in range(w):
                c = ak * b[k, j]
                What[i, j] += c if signs[k, i, j] else -c
    return What


class _InputBasis(ABC):
    """What a layer's code means in the model's own input basis (both kinds of layer)."""

    rotation: Rotation | None

    @abstractmethod
    def dequantize(self) -> np.ndarray:
        """[n, m] float32 What in the basis the layer was solved in."""

    def weight(self) -> np.ndarray:
        """[n, m] float32 What for the model's inputs: `dequantize()` Q^T when the layer codes
        W Q (rotated), else `dequantize()` itself."""
        What = self.dequantize()
        return What if self.rotation is None else self.rotation.apply_t(What)


@dataclass
class BinaryCodedLayer(_InputBasis):
    orders: np.ndarray  # [G] int, planes per group
    signs: np.ndarray  # [Kmax, n, m] bool, True = +1; False where k >= o_g
    row_scale: np.ndarray  # [Kmax, G, n] float16
    col_scale: np.ndarray  # [Kmax, m] float16
    rotation: Rotation | None = None  # Q when the planes code W Q (qdtk.math.rotation)

    kind = "bcq"

    @property
    def shape(self) -> tuple[int, int]:
        return self.signs.shape[1], self.signs.shape[2]

    def dequantize(self) -> np.ndarray:
        """[n, m] float32 What, the canonical evaluation."""
        n, m = self.shape
        What = np.empty((n, m), np.float32)
        for g, cols in enumerate(group_slices(m)):
            What[:, cols] = self.dequantize_group(g)
        return What

    def dequantize_group(self, g: int) -> np.ndarray:
        """[n, w] float32 What of group g (the same bits as its columns of `dequantize`)."""
        o, cols = int(self.orders[g]), group_slices(self.shape[1])[g]
        return dequantize_block(
            self.signs[:o, :, cols], self.row_scale[:o, g], self.col_scale[:o, cols]
        )

    def storage_bits(self) -> int:
        n, m = self.shape
        return bcq_bits(n, m, self.orders)

    def validate(self, name: str) -> None:
        K, n, m = self.signs.shape
        G = len(group_slices(m))
        want = {"orders": (G,), "row_scale": (K, G, n), "col_scale": (K, m)}
        for field, shape in want.items():
            if getattr(self, field).shape != shape:
                raise QdtkError(
                    f"{name}.{field}: shape {list(getattr(self, field).shape)}, "
                    f"expected {list(shape)}"
                )
        if self.orders.min(initial=1) < 1 or self.orders.max(initial=1) > K:
            raise QdtkError(f"{name}.orders: orders must lie in 1..{K}")

    def to_tensors(self, name: str) -> dict[str, np.ndarray]:
        return {
            f"{name}.orders": self.orders.astype(np.uint8),
            f"{name}.signs": np.packbits(self.signs, axis=-1, bitorder="little"),
            f"{name}.row_scale": self.row_scale.astype(np.float16),
            f"{name}.col_scale": self.col_scale.astype(np.float16),
        }

    @classmethod
    def from_tensors(cls, name: str, t: dict[str, np.ndarray], shape: tuple[int, int]):
        n, m = shape
        try:
            signs = np.unpackbits(t[f"{name}.signs"], axis=-1, count=m, bitorder="little")
            layer = cls(
                t[f"{name}.orders"].astype(np.int64),
                signs.astype(bool),
                t[f"{name}.row_scale"],
                t[f"{name}.col_scale"],
            )
        except KeyError as e:
            raise QdtkError(f"missing tensor {e.args[0]!r}") from None
        if layer.shape != (n, m):
            raise QdtkError(f"{name}.signs: shape {list(layer.shape)}, expected {[n, m]}")
        layer.validate(name)
        return layer


@dataclass
class AffineLayer(_InputBasis):
    codes: np.ndarray  # [n, m] uint8 in 0 .. 2^bits - 1
    scale: np.ndarray  # [n, G] float16
    zero: np.ndarray  # [n, G] float16
    bits: int
    rotation: Rotation | None = None  # Q when the codes code W Q (qdtk.math.rotation)

    kind = "affine"

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def dequantize(self) -> np.ndarray:
        n, m = self.shape
        g = group_index(m)
        scale = self.scale.astype(np.float32)[:, g]
        zero = self.zero.astype(np.float32)[:, g]
        return (self.codes.astype(np.float32) - zero) * scale

    def storage_bits(self) -> int:
        n, m = self.shape
        return affine_bits(n, m, self.bits)

    def to_tensors(self, name: str) -> dict[str, np.ndarray]:
        return {
            f"{name}.codes": self.codes.astype(np.uint8),
            f"{name}.scale": self.scale.astype(np.float16),
            f"{name}.zero": self.zero.astype(np.float16),
        }

    @classmethod
    def from_tensors(cls, name: str, t: dict[str, np.ndarray], shape, bits: int):
        try:
            layer = cls(t[f"{name}.codes"], t[f"{name}.scale"], t[f"{name}.zero"], bits)
        except KeyError as e:
            raise QdtkError(f"missing tensor {e.args[0]!r}") from None
        if layer.shape != tuple(shape):
            raise QdtkError(f"{name}.codes: shape {list(layer.shape)}, expected {list(shape)}")
        return layer


QuantizedLayer = BinaryCodedLayer | AffineLayer


def write_solution_block(
    path: str | Path, layers: dict[str, QuantizedLayer], fingerprint: str
) -> str:
    """Write the solutions of one block's layers atomically; returns the file's sha256."""
    tensors: dict[str, np.ndarray] = {}
    meta: dict[str, dict] = {}
    for name, layer in layers.items():
        tensors.update(layer.to_tensors(name))
        meta[name] = {"kind": layer.kind, "shape": list(layer.shape)}
        if isinstance(layer, AffineLayer):
            meta[name]["bits"] = layer.bits
        if layer.rotation is not None:
            meta[name]["rotation"] = layer.rotation.to_dict()
    return write_safetensors(
        path, tensors, {"format": FORMAT, "fingerprint": fingerprint, "layers": json.dumps(meta)}
    )


def solution_fingerprint(path: str | Path) -> str | None:
    """The fingerprint a solution file was written with (None if absent or unreadable)."""
    try:
        _, meta = read_header(path)
    except QdtkError:
        return None
    return meta.get("fingerprint") if meta.get("format") == FORMAT else None


def recorded_hash(quant: str | Path, block: dict) -> Recorded | None:
    """What report.json's entry `block` records of its file's content (None: older report)."""
    sha = block.get("sha256")
    return None if sha is None else Recorded(
        sha, Path(quant) / REPORT, "rerun `qdtk quantize` (it solves that block again)")


def read_solution_block(
    path: str | Path, recorded: Recorded | None = None
) -> dict[str, QuantizedLayer]:
    """Read every layer of one solution file (its content hash checked against `recorded`);
    errors name the file and tensor."""
    tensors, meta = read_safetensors(path, recorded)
    if meta.get("format") != FORMAT:
        raise QdtkError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        layers_meta = json.loads(meta["layers"])
    except (KeyError, json.JSONDecodeError):
        raise QdtkError(f"{path}: header metadata has no valid 'layers' entry") from None
    out: dict[str, QuantizedLayer] = {}
    for name, info in layers_meta.items():
        try:
            if info["kind"] == "bcq":
                out[name] = BinaryCodedLayer.from_tensors(name, tensors, tuple(info["shape"]))
            elif info["kind"] == "affine":
                out[name] = AffineLayer.from_tensors(
                    name, tensors, tuple(info["shape"]), int(info["bits"])
                )
            else:
                raise QdtkError(f"unknown layer kind {info['kind']!r}")
            if "rotation" in info:
                out[name].rotation = Rotation.from_dict(info["rotation"], out[name].shape[1])
        except (QdtkError, ValueError) as e:
            raise QdtkError(f"{path}: {e}") from None
    return out


def read_report(quant: str | Path) -> dict:
    """report.json of a solution folder, its format and block list checked."""
    path = Path(quant) / REPORT
    report = read_json(path)
    found = report.get("format") if isinstance(report, dict) else None
    if found != FORMAT:
        raise QdtkError(f"{path}: format {found!r}, expected {FORMAT!r}")
    blocks = report.get("blocks")
    if not isinstance(blocks, list) or not all(isinstance(b, dict) and "file" in b for b in blocks):
        raise QdtkError(f"{path}: 'blocks' must list objects with a 'file'")
    if any("sha256" not in b for b in blocks):
        warn_unhashed(quant, REPORT)
    return report


def verify_solutions(quant: str | Path) -> int:
    """Read every solution file report.json lists, checking its content hash and layers;
    returns the number of files."""
    blocks = read_report(quant)["blocks"]
    for block in blocks:
        read_solution_block(Path(quant) / block["file"], recorded_hash(quant, block))
    return len(blocks)
