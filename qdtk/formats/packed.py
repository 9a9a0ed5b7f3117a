"""The deployable checkpoint's format "qdtk-bcq/1" (and /2, with rotated modules): real bit
planes on disk, and the way back to floats.

Scope: bit packing kernels (Numba), the packed form of one quantized layer (`PackedBCQ`,
`PackedAffine`), a reference matmul on packed planes, the quantization_config of a packed
folder (its modules, fused expert tensors, and the gate that keeps transformers from loading it
without qdtk), and reading a packed layer back with every tensor checked. docs/FORMAT.md is the
normative description of the files; this module implements it. The stages that write and read
whole folders are qdtk.pack.

Bit streams: along each row, value j of width `width` occupies stream bits [j*width, (j+1)*width);
stream bit q is bit q % wb of word q // wb (wb = 8 or 32), least significant bit first. For 1-bit
sign planes a set bit means +1. Unpacking reproduces the solver's What bit for bit: it rebuilds a
`BinaryCodedLayer` / `AffineLayer` and evaluates it with their canonical `dequantize`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
from numba import njit, prange

from qdtk.errors import QdtkError
from qdtk.formats.bits import GROUP, affine_bits, bcq_bits, group_slices, group_widths
from qdtk.formats.checkpoint import (
    DTYPES,
    Checkpoint,
)
from qdtk.formats.io import (
    Recorded,
    read_json,
    warn_unhashed,
)
from qdtk.formats.solution import (
    AffineLayer,
    BinaryCodedLayer,
    QuantizedLayer,
)
from qdtk.math.rotation import Rotation

log = logging.getLogger(__name__)

FORMAT = "qdtk-bcq/1"
# /1 plus rotated modules (x -> x Q before the product) and fused expert tensors (rebuilt from
# their modules): a /1 reader would compute wrong weights or miss tensors, so a checkpoint with
# either says /2, one with neither stays /1.
FORMAT_2 = "qdtk-bcq/2"
FORMATS = (FORMAT, FORMAT_2)
QUANT_METHOD = "qdtk"
WORD = np.uint32  # the word of the packed format
WORD_BITS = 32
MAX_ORDER = 8
DEFAULT_SHARD_BYTES = 2 * 10**9  # "2GB", the CLI default

# Word types the kernels pack into: numba specialises one kernel per word type.
WORD_TYPES: dict[str, type] = {"uint8": np.uint8, "uint32": np.uint32}

OUT_DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
}


# --------------------------------------------------------------------------- bit kernels


# The bit kernels run serially: they are called per plane on slices of a few hundred thousand
# values, where a parallel launch costs more than it saves (and a loaded machine makes it worse).
@njit(cache=True)
def _pack_kernel(codes, width, words):  # codes [r, c] uint8 < 2^width; words [r, nw] out
    r, c = codes.shape
    nw = words.shape[1]
    wb = words.itemsize * 8
    mask = (np.uint64(1) << np.uint64(wb)) - np.uint64(1)
    for i in range(r):
        for q in range(nw):
            lo = q * wb  # the word's first stream bit
            j1 = min(c, (lo + wb + width - 1) // width)
            acc = np.uint64(0)
            for j in range(lo // width, j1):
                pos = j * width - lo
                v = np.uint64(codes[i, j])
                if pos >= 0:
                    acc |= v << np.uint64(pos)
                else:  # the value straddles from the previous word
                    acc |= v >> np.uint64(-pos)
            words[i, q] = acc & mask


@njit(cache=True)
def _unpack_kernel(words, width, codes):  # words [r, nw]; codes [r, c] uint8 out
    r, c = codes.shape
    nw = words.shape[1]
    wb = words.itemsize * 8
    shift = 3 if wb == 8 else 5  # log2(wb): word and bit of a stream position by shifts
    cmask = (np.uint64(1) << np.uint64(width)) - np.uint64(1)
    for i in range(r):
        for j in range(c):
            pos = j * width
            q = pos >> shift
            s = pos & (wb - 1)
            v = np.uint64(words[i, q]) >> np.uint64(s)
            if s + width > wb and q + 1 < nw:
                v |= np.uint64(words[i, q + 1]) << np.uint64(wb - s)
            codes[i, j] = v & cmask


def n_words(count: int, width: int, word: str = "uint32") -> int:
    """Words needed for `count` values of `width` bits in one row."""
    return -(-count * width // (8 * np.dtype(WORD_TYPES[word]).itemsize))


def pack_bits(
    codes: np.ndarray, width: int, word: str = "uint32", out: np.ndarray | None = None
) -> np.ndarray:
    """[r, c] values < 2^width -> [r, n_words(c)] words, LSB first along each row."""
    if word not in WORD_TYPES or not 1 <= width <= 8:
        raise ValueError(f"unsupported packing: {width} bits into {word}")
    codes = np.asarray(codes)
    codes = codes.view(np.uint8) if codes.dtype == bool else codes.astype(np.uint8, copy=False)
    if codes.size and int(codes.max()) >> width:
        raise ValueError(f"a value does not fit in {width} bits")
    shape = (codes.shape[0], n_words(codes.shape[1], width, word))
    if out is None:
        out = np.empty(shape, WORD_TYPES[word])
    assert out.shape == shape and out.dtype == WORD_TYPES[word], (out.shape, shape)
    _pack_kernel(codes, width, out)
    return out


def unpack_bits(
    words: np.ndarray, width: int, count: int, out: np.ndarray | None = None
) -> np.ndarray:
    """[r, nw] words -> [r, count] uint8 values: the inverse of `pack_bits`."""
    if words.dtype.name not in WORD_TYPES or not 1 <= width <= 8:
        raise ValueError(f"unsupported unpacking: {width} bits from {words.dtype}")
    if words.shape[1] != n_words(count, width, words.dtype.name):
        raise ValueError(f"{words.shape[1]} words cannot hold {count} values of {width} bits")
    if out is None:
        out = np.empty((words.shape[0], count), np.uint8)
    _unpack_kernel(words, width, out)
    return out


# --------------------------------------------------------------------------- packed layers


@dataclass(frozen=True)
class PlaneLayout:
    """Where plane p (group-major: group 0's planes k = 0..o_0-1, then group 1's, ...) lives."""

    group: np.ndarray  # [P] its group g
    k: np.ndarray  # [P] its index inside the group
    start: np.ndarray  # [P] first input column of the group
    width: np.ndarray  # [P] w_g
    word: np.ndarray  # [P] first word in a row of `planes`
    n_words: np.ndarray  # [P] its words in a row of `planes`
    col: np.ndarray  # [P] first entry in `col_scale`
    words: int  # words per row of `planes`
    cols: int  # length of `col_scale`


def plane_layout(orders: np.ndarray, m: int, group: int = GROUP) -> PlaneLayout:
    orders = np.asarray(orders, np.int64)
    w = group_widths(m, group)  # [G]
    g = np.repeat(np.arange(len(w)), orders)  # [P]
    first = np.concatenate([[0], np.cumsum(orders)[:-1]])  # [G] first plane of each group
    k = np.arange(len(g)) - first[g]
    u = -(-w[g] // WORD_BITS)  # [P] words per row of each plane
    word = np.concatenate([[0], np.cumsum(u)[:-1]]).astype(np.int64)
    col = np.concatenate([[0], np.cumsum(w[g])[:-1]]).astype(np.int64)
    return PlaneLayout(g, k, g * group, w[g], word, u.astype(np.int64), col, int(u.sum()),
                       int(w[g].sum()))


@dataclass
class PackedBCQ:
    """A binary-coded layer as stored: only the real planes of each group, no padding."""

    shape: tuple[int, int]
    orders: np.ndarray  # [G] uint8
    planes: np.ndarray  # [n, sum_g o_g ceil(w_g/32)] uint32
    row_scale: np.ndarray  # [sum_g o_g, n] float16
    col_scale: np.ndarray  # [sum_g o_g w_g] float16
    rotation: Rotation | None = None  # Q when the planes code W Q

    kind = "bcq"
    FIELDS = ("orders", "planes", "row_scale", "col_scale")

    @classmethod
    def from_layer(cls, layer: BinaryCodedLayer) -> PackedBCQ:
        n, m = layer.shape
        L = plane_layout(layer.orders, m)
        planes = np.empty((n, L.words), WORD)  # [n, words]
        for p in range(len(L.group)):
            cols = slice(L.start[p], L.start[p] + L.width[p])
            u = n_words(int(L.width[p]), 1)
            pack_bits(layer.signs[L.k[p], :, cols], 1, out=planes[:, L.word[p] : L.word[p] + u])
        row_scale = layer.row_scale[L.k, L.group].astype(np.float16)  # [P, n]
        col_scale = np.concatenate(
            [layer.col_scale[k, s : s + w] for k, s, w in zip(L.k, L.start, L.width, strict=True)]
        ).astype(np.float16)
        return cls((n, m), layer.orders.astype(np.uint8), planes, row_scale, col_scale,
                   layer.rotation)

    def to_layer(self) -> BinaryCodedLayer:
        n, m = self.shape
        L = plane_layout(self.orders, m)
        K = int(self.orders.max())
        signs = np.zeros((K, n, m), bool)  # [K, n, m]
        row_scale = np.zeros((K, len(self.orders), n), np.float16)  # [K, G, n]
        col_scale = np.zeros((K, m), np.float16)  # [K, m]
        for p in range(len(L.group)):
            k, s, w = L.k[p], L.start[p], L.width[p]
            u = n_words(int(w), 1)
            bits = unpack_bits(self.planes[:, L.word[p] : L.word[p] + u], 1, int(w))
            signs[k, :, s : s + w] = bits.view(bool)
            row_scale[k, L.group[p]] = self.row_scale[p]
            col_scale[k, s : s + w] = self.col_scale[L.col[p] : L.col[p] + w]
        return BinaryCodedLayer(self.orders.astype(np.int64), signs, row_scale, col_scale,
                                self.rotation)

    def expected(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        return bcq_expected(self.shape, self.orders)

    def tensors(self, module: str) -> dict[str, np.ndarray]:
        return {f"{module}.{f}": getattr(self, f) for f in self.FIELDS}

    def storage_bits(self) -> int:
        return bcq_bits(*self.shape, self.orders)


def bcq_expected(shape: tuple[int, int], orders: np.ndarray) -> dict[str, tuple]:
    """dtype and shape of every tensor of a packed binary-coded layer."""
    n, m = shape
    L = plane_layout(orders, m)
    P = len(L.group)
    return {
        "orders": (np.dtype(np.uint8), (len(group_widths(m)),)),
        "planes": (np.dtype(WORD), (n, L.words)),
        "row_scale": (np.dtype(np.float16), (P, n)),
        "col_scale": (np.dtype(np.float16), (L.cols,)),
    }


@dataclass
class PackedAffine:
    """An integer-coded layer (RTN, GPTQ) as stored: codes as a `bits`-wide bit stream per row."""

    shape: tuple[int, int]
    bits: int
    codes: np.ndarray  # [n, ceil(m*bits/32)] uint32
    scale: np.ndarray  # [n, G] float16
    zero: np.ndarray  # [n, G] float16
    rotation: Rotation | None = None  # Q when the codes code W Q

    kind = "affine"
    FIELDS = ("codes", "scale", "zero")

    @classmethod
    def from_layer(cls, layer: AffineLayer) -> PackedAffine:
        codes = pack_bits(layer.codes, layer.bits)
        return cls(layer.shape, layer.bits, codes, layer.scale.astype(np.float16),
                   layer.zero.astype(np.float16), layer.rotation)

    def to_layer(self) -> AffineLayer:
        codes = unpack_bits(self.codes, self.bits, self.shape[1])
        return AffineLayer(codes, self.scale, self.zero, self.bits, self.rotation)

    def expected(self) -> dict[str, tuple]:
        return affine_expected(self.shape, self.bits)

    def tensors(self, module: str) -> dict[str, np.ndarray]:
        return {f"{module}.{f}": getattr(self, f) for f in self.FIELDS}

    def storage_bits(self) -> int:
        return affine_bits(*self.shape, self.bits)


def affine_expected(shape: tuple[int, int], bits: int) -> dict[str, tuple]:
    n, m = shape
    G = len(group_slices(m))
    return {
        "codes": (np.dtype(WORD), (n, n_words(m, bits))),
        "scale": (np.dtype(np.float16), (n, G)),
        "zero": (np.dtype(np.float16), (n, G)),
    }


PackedLayer = PackedBCQ | PackedAffine


def pack_layer(layer: QuantizedLayer) -> PackedLayer:
    """The packed form of a solver's layer; ValueError if the format cannot hold it."""
    if isinstance(layer, BinaryCodedLayer):
        if layer.orders.max(initial=1) > MAX_ORDER:
            raise ValueError(f"order {layer.orders.max()} exceeds the format's {MAX_ORDER}")
        return PackedBCQ.from_layer(layer)
    return PackedAffine.from_layer(layer)


# --------------------------------------------------------------------------- packed matmul


ROW_BLOCK = 128  # output rows per task of the packed matmul


@njit(parallel=True, cache=True)
def _bcq_matmul_kernel(x, planes8, a, b, start, width, word, col, y):
    """y[t, i] = sum_p a[p, i] * sum_j b_p[j] x[t, start_p + j] B_p[i, j].

    Per token and plane, the 8 columns of each byte of signs are summed for all 256 sign
    patterns once (a lookup table, 1 KiB per byte position); every output row then costs one
    lookup per byte. Rows go in blocks so that one table row serves a whole block from L1.
    planes8 is M.planes viewed as bytes: byte 4u + c of a row is byte c of word u (little end).
    """
    T = x.shape[0]
    n = planes8.shape[0]
    P = start.shape[0]
    nch = (width + 7) // 8  # [P] bytes per plane row
    off = np.zeros(P + 1, np.int64)
    for p in range(P):
        off[p + 1] = off[p] + nch[p]
    lut = np.empty((off[P], 256), np.float32)  # [sum_p nch_p, 256]
    blocks = (n + ROW_BLOCK - 1) // ROW_BLOCK
    for t in range(T):
        for p in prange(P):
            for c in range(nch[p]):
                r = off[p] + c
                total = np.float32(0)
                for e in range(8):
                    j = 8 * c + e
                    if j < width[p]:
                        total += x[t, start[p] + j] * b[col[p] + j]
                lut[r, 0] = -total  # every sign -1
                for e in range(8):
                    j = 8 * c + e
                    v = x[t, start[p] + j] * b[col[p] + j] if j < width[p] else np.float32(0)
                    for pat in range(1 << e, 2 << e):  # patterns whose highest set bit is e
                        lut[r, pat] = lut[r, pat - (1 << e)] + 2 * v
        for blk in prange(blocks):
            i0 = blk * ROW_BLOCK
            rows = min(n, i0 + ROW_BLOCK) - i0
            s = np.empty(ROW_BLOCK, np.float32)  # [rows] one plane's signed sums
            acc = np.zeros(ROW_BLOCK, np.float32)  # [rows]
            for p in range(P):
                s[:] = 0
                for c in range(nch[p]):
                    byte = 4 * word[p] + c
                    r = off[p] + c
                    for ii in range(rows):
                        s[ii] += lut[r, planes8[i0 + ii, byte]]
                for ii in range(rows):
                    acc[ii] += a[p, i0 + ii] * s[ii]
            for ii in range(rows):
                y[t, i0 + ii] = acc[ii]


def bcq_matmul(x: np.ndarray, W: PackedBCQ) -> np.ndarray:
    """y = x What^T [T, n] from the packed planes and scales, without materialising What."""
    n, m = W.shape
    x = np.ascontiguousarray(x, np.float32)  # [T, m]
    if x.ndim != 2 or x.shape[1] != m:
        raise ValueError(f"x has shape {list(x.shape)}, expected [T, {m}]")
    L = plane_layout(W.orders, m)
    y = np.empty((x.shape[0], n), np.float32)
    planes8 = W.planes.astype("<u4", copy=False).view(np.uint8)  # [n, 4 words]
    _bcq_matmul_kernel(x, planes8, W.row_scale.astype(np.float32),
                       W.col_scale.astype(np.float32), L.start, L.width, L.word, L.col, y)
    return y


# --------------------------------------------------------------------------- config


def module_name(weight: str) -> str:
    """The module a quantized weight belongs to: its name without '.weight'."""
    return weight.removesuffix(".weight")


def read_quantization_config(folder: str | Path) -> dict:
    """The validated quantization_config of a packed folder."""
    path = Path(folder) / "config.json"
    qc = read_json(path).get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise QdtkError(f"{path}: no qdtk quantization_config; not a packed checkpoint")
    if qc.get("format") not in FORMATS:
        raise QdtkError(
            f"{path}: quantization_config format {qc.get('format')!r} is not supported "
            f"(this qdtk reads {' and '.join(map(repr, FORMATS))})"
        )
    if qc.get("group_size") != GROUP or qc.get("word_bits") != WORD_BITS:
        raise QdtkError(
            f"{path}: group_size {qc.get('group_size')} / word_bits {qc.get('word_bits')}; "
            f"{FORMAT} needs {GROUP} / {WORD_BITS}"
        )
    modules = qc.get("modules")
    if not isinstance(modules, dict):
        raise QdtkError(f"{path}: quantization_config has no 'modules' object")
    for module, info in modules.items():
        ok = (
            isinstance(info, dict)
            and info.get("kind") in ("bcq", "affine")
            and isinstance(info.get("shape"), list)
            and len(info["shape"]) == 2
            and all(isinstance(s, int) and s > 0 for s in info["shape"])
            and (info["kind"] == "bcq" or info.get("bits") in range(1, 9))
        )
        if not ok:
            raise QdtkError(f"{path}: quantization_config entry for module {module!r} is invalid")
        if "rotation" in info:
            if qc["format"] != FORMAT_2:
                raise QdtkError(f"{path}: module {module!r} is rotated, which {qc['format']} "
                                f"cannot record (a damaged or hand-edited config?)")
            try:
                Rotation.from_dict(info["rotation"], info["shape"][1])
            except ValueError as e:
                raise QdtkError(f"{path}: module {module!r}: {e}") from None
    if qc.get("fused") and qc["format"] != FORMAT_2:
        raise QdtkError(f"{path}: fused expert tensors, which {qc['format']} cannot record (a "
                        f"damaged or hand-edited config?)")
    for tensor, entry in qc.get("fused", {}).items():
        if not _fused_entry_ok(entry, modules):
            raise QdtkError(f"{path}: quantization_config entry for fused tensor {tensor!r} is "
                            f"invalid")
    return qc


# A fused 3-D expert tensor (FORMAT.md section 5) is stored as one module per expert matrix;
# quantization_config["fused"] names them in storage order, and unpack stacks them back.


def fused_record(ckpt: Checkpoint, fused: Iterable[str]) -> dict[str, dict]:
    """quantization_config["fused"]: per fused tensor its shape, dtype and modules in order."""
    return {name: {"shape": list(ckpt.info(name).shape), "dtype": ckpt.info(name).dtype,
                   "modules": [module_name(w) for w in ckpt.fused[name]]}
            for name in sorted(fused)}


def _fused_entry_ok(entry, modules: dict) -> bool:
    try:
        E, R, C = (int(s) for s in entry["shape"])
        parts = [modules[m]["shape"] for m in entry["modules"]]
        return (entry["dtype"] in DTYPES and min(E, R, C) > 0
                and all(p[1] == C for p in parts) and sum(p[0] for p in parts) == E * R)
    except (KeyError, TypeError, ValueError):
        return False


def fused_tensor(entry: dict, dequantized: Callable[[str], np.ndarray], to: np.dtype
                 ) -> np.ndarray:
    """A fused tensor rebuilt from its modules' weights: stacked along the rows, reshaped."""
    E, R, C = entry["shape"]
    out = np.empty((E * R, C), to)  # [E*R, C]
    row = 0
    for module in entry["modules"]:
        W = dequantized(module)  # [rows, C] float32
        out[row:row + W.shape[0]] = W.astype(to)
        row += W.shape[0]
    return out.reshape(E, R, C)


# --------------------------------------------------------------------------- the gate

# transformers skips an unknown quant_method with a warning and loads the model with random
# Linears; an unknown model_type stops it before any weight loads. So a packed config.json names
# the model_type PACKED_MODEL_TYPE, which only qdtk knows (qdtk.torch.nn.hf registers it), and an
# auto_map to LOADER_FILE, code that imports qdtk, for transformers' trust_remote_code path.
# A concrete class (LlamaForCausalLM.from_pretrained) reads config.json without AutoConfig: its
# dtype entries name DTYPE_GUARD, which every transformers config (4.x and 5.x) looks up in torch
# before building anything, so that path stops too, with the way out in the error.
# The model's own entries are kept in quantization_config.model_config.
PACKED_MODEL_TYPE = "qdtk"
LOADER_FILE = "qdtk_packed.py"
LOADER_CLASS = "PackedConfig"
DTYPE_GUARD = "packed_by_qdtk__load_it_with_qdtk_load_or_import_qdtk_and_AutoModel"
GATED_KEYS = ("model_type", "auto_map", "torch_dtype", "dtype")
LOADER_CODE = f'''"""This folder is a qdtk packed checkpoint ({FORMAT}): its quantized
Linears are 2-bit sign planes that only qdtk computes with. Install qdtk and `import qdtk`
before `from_pretrained`, or load it with `qdtk.load(FOLDER)`. transformers runs this file only
with trust_remote_code=True; it hands the folder to qdtk, which restores the model's config."""

import qdtk.torch.nn.hf

{LOADER_CLASS} = qdtk.torch.nn.hf.packed_config_class()
'''


def gated_config(config: dict) -> dict:
    """config.json of a packed folder from the model's (quantization_config already in it): the
    model's own GATED_KEYS move into quantization_config.model_config."""
    out = dict(config)
    out["quantization_config"] = {**config["quantization_config"],
                                  "model_config": {k: config.get(k) for k in GATED_KEYS}}
    out["model_type"] = PACKED_MODEL_TYPE
    out["auto_map"] = {"AutoConfig": f"{LOADER_FILE.removesuffix('.py')}.{LOADER_CLASS}"}
    out["torch_dtype"] = out["dtype"] = DTYPE_GUARD
    return out


def model_config(config: dict) -> dict:
    """The model's own config.json from a packed folder's (its GATED_KEYS back; quantization_config
    kept). Any other config is returned as it is."""
    qc = config.get("quantization_config")
    saved = qc.get("model_config") if isinstance(qc, dict) else None
    if not isinstance(saved, dict):
        return config
    out = dict(config)
    for key in GATED_KEYS:
        if key not in saved:  # packed before the gate covered it: the entry is the model's
            continue
        if saved[key] is None:
            out.pop(key, None)
        else:
            out[key] = saved[key]
    return out


def is_packed(folder: str | Path) -> bool:
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    qc = read_json(path).get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def _check_tensor(ckpt: Checkpoint, name: str, dtype: np.dtype, shape: tuple, module: str):
    if name not in ckpt:
        raise QdtkError(
            f"{ckpt.folder}: tensor {name!r} of quantized module {module!r} is missing"
        )
    info = ckpt.info(name)
    if DTYPES[info.dtype] != dtype or info.shape != tuple(shape):
        raise QdtkError(
            f"{info.file}: tensor {name!r} is {info.dtype} {list(info.shape)}, expected "
            f"{dtype.name} {list(shape)}"
        )


def check_packed_layer(ckpt: Checkpoint, module: str, info: dict
                       ) -> tuple[tuple[int, int], np.ndarray | None, dict, Rotation | None]:
    """(shape, orders [G] or None for affine, {field: (dtype, shape)}, rotation) of one module,
    every tensor's dtype and shape checked against the format from the shard headers; of the
    data only the few bytes of `M.orders` are read."""
    shape = (int(info["shape"][0]), int(info["shape"][1]))
    orders = None
    if info["kind"] == "affine":
        expected = affine_expected(shape, int(info["bits"]))
    else:
        G = len(group_widths(shape[1]))
        _check_tensor(ckpt, f"{module}.orders", np.dtype(np.uint8), (G,), module)
        orders = np.array(ckpt.read(f"{module}.orders"))
        if orders.min() < 1 or orders.max() > MAX_ORDER:
            raise QdtkError(
                f"{ckpt.info(module + '.orders').file}: tensor {module + '.orders'!r} holds "
                f"orders outside 1..{MAX_ORDER}"
            )
        expected = bcq_expected(shape, orders)
    for field, (dtype, fshape) in expected.items():
        _check_tensor(ckpt, f"{module}.{field}", dtype, fshape, module)
    rot = Rotation.from_dict(info["rotation"], shape[1]) if "rotation" in info else None
    return shape, orders, expected, rot


def read_packed_layer(ckpt: Checkpoint, module: str, info: dict) -> PackedLayer:
    """One module's packed tensors, every dtype and shape checked first (check_packed_layer)."""
    shape, _, expected, rot = check_packed_layer(ckpt, module, info)
    t = {f: np.array(ckpt.read(f"{module}.{f}")) for f in expected}
    if info["kind"] == "affine":
        return PackedAffine(shape, int(info["bits"]), t["codes"], t["scale"], t["zero"], rot)
    return PackedBCQ(shape, t["orders"], t["planes"], t["row_scale"], t["col_scale"], rot)


def verify_packed(folder: str | Path, qc: dict, ckpt: Checkpoint) -> set[str]:
    """Check a packed folder whole: every shard's content hash against the config's record,
    and every quantized module's tensors against the format (their headers). Returns the
    tensor names the modules own. Reads each file once."""
    recorded = qc.get("sha256")
    config = Path(folder) / "config.json"
    if recorded is None:
        warn_unhashed(folder, "config.json")
    else:
        fix = f"delete {folder} and rerun `qdtk pack`"
        for file in ckpt.files:
            if file.name not in recorded:
                raise QdtkError(f"{file}: not a shard that {config} records; {fix}")
            Recorded(recorded[file.name], config, fix).check(file)
    owned: set[str] = set()
    for module, info in qc["modules"].items():
        fields = PackedAffine.FIELDS if info["kind"] == "affine" else PackedBCQ.FIELDS
        owned |= {f"{module}.{f}" for f in fields}
        check_packed_layer(ckpt, module, info)  # the headers: the hashes above read the data
    return owned
