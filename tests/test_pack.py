"""qdtk-bcq/1: bit kernels, exact packed round trips, the packed matmul, pack/unpack stages."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from qdtk.cli.main import cli
from qdtk.errors import QdtkError
from qdtk.formats.bits import affine_bits, bcq_bits, group_slices
from qdtk.formats.checkpoint import Checkpoint, read_safetensors, write_safetensors
from qdtk.formats.io import write_json_atomic
from qdtk.formats.packed import (
    FORMAT,
    FORMAT_2,
    PackedAffine,
    PackedBCQ,
    bcq_matmul,
    pack_bits,
    plane_layout,
    read_quantization_config,
    unpack_bits,
)
from qdtk.formats.solution import FORMAT as QUANT_FORMAT
from qdtk.formats.solution import (
    AffineLayer,
    BinaryCodedLayer,
    dequantize_block,
    write_solution_block,
)
from qdtk.math.rotation import Rotation
from qdtk.pack import pack_checkpoint, parse_size, unpack_checkpoint

# ----------------------------------------------------------------------------- helpers


def random_bcq(rng, n, m, orders, scale=0.05) -> BinaryCodedLayer:
    """A solver-like layer: random planes and float16 scales, zero padding beyond each order."""
    orders = np.asarray(orders, np.int64)
    K = int(orders.max())
    signs = rng.random((K, n, m)) < 0.5
    row = (rng.random((K, len(orders), n)) * scale + scale / 4).astype(np.float16)
    col = (rng.random((K, m)) + 0.5).astype(np.float16)
    for g, cols in enumerate(group_slices(m)):
        signs[orders[g]:, :, cols] = False
        row[orders[g]:, g] = 0
        col[orders[g]:, cols] = 0
    return BinaryCodedLayer(orders, signs, row, col)


def random_affine(rng, n, m, bits) -> AffineLayer:
    G = len(group_slices(m))
    codes = rng.integers(0, 2**bits, (n, m)).astype(np.uint8)
    scale = (rng.random((n, G)) * 0.01 + 0.001).astype(np.float16)
    zero = rng.integers(0, 2**bits, (n, G)).astype(np.float16)
    return AffineLayer(codes, scale, zero, bits)


def write_quant(model_dir, quant_dir, rng, orders=None, affine=(), rotate=False) -> dict:
    """A QUANT folder (format qdtk-quant/1) with random solutions for the model's Linears.

    `orders(name, G)` gives each layer's orders (default: a mix of 1..4); names matching a
    pattern in `affine` get 3-bit affine solutions; `rotate`: every layer rotated (a seed of
    its own). One solution file per transformer block.
    """
    ckpt = Checkpoint(model_dir)
    quant_dir = Path(quant_dir)
    blocks: dict[int, dict] = {}
    for name in ckpt.linear_names():
        n, m = ckpt.info(name).shape
        G = len(group_slices(m))
        b = int(re.search(r"\.(\d+)\.", name).group(1))
        if any(re.search(p, name) for p in affine):
            layer = random_affine(rng, n, m, 3)
        else:
            o = orders(name, G) if orders else rng.integers(1, 5, G)
            layer = random_bcq(rng, n, m, o)
        if rotate:
            layer.rotation = Rotation(m, len(blocks.get(b, {})) + 7 * b)
        blocks.setdefault(b, {})[name] = layer
    report_blocks, layers = [], {}
    for b, block in sorted(blocks.items()):
        file = f"block_{b:04d}.safetensors"
        write_solution_block(quant_dir / file, block, f"fp{b}")
        report_blocks.append({"name": f"block {b}", "file": file, "fingerprint": f"fp{b}",
                              "layers": list(block)})
        layers.update(block)
    write_json_atomic(quant_dir / "report.json", {
        "format": QUANT_FORMAT,
        "model": {"path": str(model_dir), "fingerprint": ckpt.fingerprint()},
        "stats": None, "options": {"rotate": "hadamard"} if rotate else {},
        "blocks": report_blocks,
        "layers": {k: {"bits_per_weight": v.storage_bits() / np.prod(v.shape)}
                   for k, v in layers.items()},
        "summary": {},
    })
    return layers


def bits_of(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32)


def synthetic_model(folder: Path, rng, shapes: dict) -> Path:
    """A torch-free checkpoint folder: embeddings, norms and the given Linear weights."""
    tensors = {"model.embed_tokens.weight": rng.standard_normal((50, 64)).astype(np.float32)}
    for name, shape in shapes.items():
        tensors[name] = rng.standard_normal(shape).astype(np.float32)
        tensors[name.replace("weight", "bias")] = rng.standard_normal(shape[0]).astype(
            np.float32)
    tensors["model.norm.weight"] = np.ones(64, np.float32)
    write_safetensors(folder / "model.safetensors", tensors, {"format": "pt"})
    write_json_atomic(folder / "config.json", {"model_type": "toy", "torch_dtype": "float32"})
    (folder / "tokenizer.json").write_text("{}")
    return folder


# ----------------------------------------------------------------------------- bit kernels


@pytest.mark.parametrize("word", ["uint8", "uint32"])
@pytest.mark.parametrize("width", range(1, 9))
def test_pack_bits_matches_a_bit_stream_and_round_trips(rng, width, word):
    codes = rng.integers(0, 2**width, (6, 77)).astype(np.uint8)
    words = pack_bits(codes, width, word)
    wb = 8 * words.itemsize
    # reference: the row's bit stream, LSB first, cut into words
    stream = ((codes[:, :, None] >> np.arange(width)) & 1).reshape(6, -1)
    stream = np.pad(stream, ((0, 0), (0, words.shape[1] * wb - stream.shape[1])))
    ref = (stream.reshape(6, -1, wb).astype(np.uint64) << np.arange(wb, dtype=np.uint64)).sum(-1)
    assert words.dtype == np.dtype(word) and np.array_equal(words, ref)
    assert np.array_equal(unpack_bits(words, width, 77), codes)


def test_pack_bits_rejects_values_too_wide(rng):
    with pytest.raises(ValueError, match="3 bits"):
        pack_bits(np.array([[1, 8]], np.uint8), 3)


# ----------------------------------------------------------------------------- packed layers

SHAPES = [(37, 300), (64, 128), (5, 33), (96, 200)]  # ragged n, m and last groups


@pytest.mark.parametrize("n,m", SHAPES)
@pytest.mark.parametrize("order", [1, 2, 3, 4, "mixed"])
def test_bcq_round_trip_is_bit_exact(rng, n, m, order):
    G = len(group_slices(m))
    orders = rng.integers(1, 5, G) if order == "mixed" else np.full(G, order)
    layer = random_bcq(rng, n, m, orders)
    packed = PackedBCQ.from_layer(layer)
    for field, (dtype, shape) in packed.expected().items():
        assert getattr(packed, field).dtype == dtype and getattr(packed, field).shape == shape
    back = packed.to_layer()
    assert np.array_equal(bits_of(back.dequantize()), bits_of(layer.dequantize()))
    K = back.signs.shape[0]
    assert np.array_equal(back.signs, layer.signs[:K]) and not layer.signs[K:].any()
    assert np.array_equal(back.row_scale, layer.row_scale[:K])
    assert np.array_equal(back.col_scale, layer.col_scale[:K])


def test_bcq_layout_has_no_padding_planes_and_documented_bit_order(rng):
    n, m, orders = 7, 300, np.array([1, 3, 2])  # widths 128, 128, 44
    layer = random_bcq(rng, n, m, orders)
    p = PackedBCQ.from_layer(layer)
    assert p.planes.shape == (n, 1 * 4 + 3 * 4 + 2 * 2)  # only real planes; 44 cols -> 2 words
    assert p.row_scale.shape == (6, n) and p.col_scale.shape == (128 + 3 * 128 + 2 * 44,)
    # group 1, plane 2 starts at word 4 + 2*4 = 12; column 128 + 32*q + t is bit t of word 12+q
    i, q, t = 3, 2, 17
    assert (p.planes[i, 12 + q] >> t) & 1 == layer.signs[2, i, 128 + 32 * q + t]
    assert np.array_equal(p.row_scale[1 + 2], layer.row_scale[2, 1])
    assert np.array_equal(p.col_scale[128 + 2 * 128 : 128 + 3 * 128], layer.col_scale[2, 128:256])
    # group 2 (44 columns): plane 1 at words 16 + 2 = 18..19, high bits of word 19 are zero
    assert p.planes[:, 19].max() >> 12 == 0
    L = plane_layout(orders, m)
    assert list(L.word) == [0, 4, 8, 12, 16, 18] and L.words == 20


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_affine_round_trip_is_bit_exact(rng, bits):
    layer = random_affine(rng, 37, 300, bits)
    p = PackedAffine.from_layer(layer)
    assert p.codes.shape == (37, -(-300 * bits // 32))
    back = p.to_layer()
    assert np.array_equal(back.codes, layer.codes)
    assert np.array_equal(bits_of(back.dequantize()), bits_of(layer.dequantize()))


@pytest.mark.parametrize("n,m", [(37, 300), (130, 256)])
def test_packed_matmul_equals_dense_product(rng, n, m):
    layer = random_bcq(rng, n, m, rng.integers(1, 5, len(group_slices(m))))
    x = rng.standard_normal((5, m)).astype(np.float32)
    y = bcq_matmul(x, PackedBCQ.from_layer(layer))
    ref = x.astype(np.float64) @ layer.dequantize().astype(np.float64).T
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


# ----------------------------------------------------------------------------- stages


def test_packed_size_matches_the_bit_formula(rng, tmp_path):
    shapes = {"model.layers.0.mlp.up_proj.weight": (520, 1088),  # last group 64 wide
              "model.layers.1.mlp.down_proj.weight": (256, 640)}
    model = synthetic_model(tmp_path / "model", rng, shapes)
    layers = write_quant(model, tmp_path / "quant", rng, affine=[r"\.1\."])
    out = pack_checkpoint(tmp_path / "quant", tmp_path / "packed")
    formula = sum(v.storage_bits() for v in layers.values()) / 8
    assert layers["model.layers.1.mlp.down_proj.weight"].storage_bits() == affine_bits(256, 640, 3)
    copied = Checkpoint(model).nbytes() - sum(4 * np.prod(s) for s in shapes.values())
    on_disk = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert abs(on_disk - (formula + copied)) / (formula + copied) < 0.01
    qc = read_quantization_config(out)
    weights = sum(np.prod(s) for s in shapes.values())
    assert qc["bits_per_weight"] == pytest.approx(8 * formula / weights)
    bcq = layers["model.layers.0.mlp.up_proj.weight"]
    assert bcq.storage_bits() == bcq_bits(520, 1088, bcq.orders)
    assert (out / "tokenizer.json").exists()


@pytest.mark.parametrize("fixture,rotate", [("tiny_llama", False), ("tiny_bert", False),
                                            ("tiny_llama", True)])
def test_unpacked_model_gives_the_logits_of_what(request, rng, tmp_path, fixture, rotate):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    model_dir = request.getfixturevalue(fixture)
    auto = AutoModelForCausalLM if fixture == "tiny_llama" else AutoModelForMaskedLM
    layers = write_quant(model_dir, tmp_path / "quant", rng, affine=[r"\.0\.mlp\.up"],
                         rotate=rotate)
    packed = pack_checkpoint(tmp_path / "quant", tmp_path / "packed", model_dir,
                             max_shard_bytes=40_000)
    assert (packed / "model.safetensors.index.json").exists()  # sharded
    qc = read_quantization_config(packed)
    assert qc["format"] == (FORMAT_2 if rotate else FORMAT)
    assert all(("rotation" in info) == rotate for info in qc["modules"].values())
    out = unpack_checkpoint(packed, tmp_path / "dense", dtype="float32")

    # every original tensor, and nothing more: bert's tied decoder is not stored, llama's head is
    orig = set(Checkpoint(model_dir).names())
    head = {"tiny_bert": "cls.predictions.decoder.weight", "tiny_llama": "lm_head.weight"}[fixture]
    assert (head in orig) == (fixture == "tiny_llama")
    assert (head in Checkpoint(packed).names()) == (head in orig)
    dense = Checkpoint(out)
    assert set(dense.names()) == orig
    for name, layer in layers.items():  # What Q^T where rotated: the model's own basis
        assert np.array_equal(bits_of(dense.read(name)), bits_of(layer.weight()))
        if rotate:
            Q = layer.rotation.matrix()
            np.testing.assert_allclose(layer.weight(), layer.dequantize() @ Q.T, atol=1e-6)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    ids = torch.tensor(rng.integers(5, 100, (2, 12)))
    ref = auto.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        sd = ref.state_dict()
        for name, layer in layers.items():
            sd[name].copy_(torch.from_numpy(layer.weight()))
        got = auto.from_pretrained(out, dtype=torch.float32).eval()
        torch.testing.assert_close(got(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_unpack_casts_to_the_requested_dtype(rng, tmp_path, dtype):
    model = synthetic_model(tmp_path / "model", rng, {"model.layers.0.q.weight": (40, 200)})
    layers = write_quant(model, tmp_path / "quant", rng)
    pack_checkpoint(tmp_path / "quant", tmp_path / "packed")
    out = unpack_checkpoint(tmp_path / "packed", tmp_path / "dense", dtype=dtype)
    dense = Checkpoint(out)
    want = layers["model.layers.0.q.weight"].dequantize()
    assert dense.info("model.layers.0.q.weight").dtype == {"float16": "F16", "bfloat16": "BF16"}[
        dtype]
    np.testing.assert_array_equal(dense.read("model.layers.0.q.weight", np.float32),
                                  want.astype(dense.read("model.layers.0.q.weight").dtype)
                                  .astype(np.float32))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype


def test_pack_is_resumable_and_atomic(rng, tmp_path, monkeypatch):
    import qdtk.pack as pack_mod

    model = synthetic_model(tmp_path / "model", rng, {"model.layers.0.q.weight": (40, 200),
                                                       "model.layers.1.q.weight": (40, 200)})
    write_quant(model, tmp_path / "quant", rng)
    real = pack_mod.read_solution_block
    calls = []

    def dies_on_second(path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(pack_mod, "read_solution_block", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        pack_checkpoint(tmp_path / "quant", tmp_path / "packed")
    assert sorted(p.name for p in (tmp_path / "packed").iterdir()) == []  # nothing half-written
    monkeypatch.setattr(pack_mod, "read_solution_block", real)

    out = pack_checkpoint(tmp_path / "quant", tmp_path / "packed")
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    pack_checkpoint(tmp_path / "quant", tmp_path / "packed")  # finished: a no-op
    assert stamp == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    write_quant(model, tmp_path / "quant", np.random.default_rng(1))  # new inputs: redone
    pack_checkpoint(tmp_path / "quant", tmp_path / "packed")
    assert stamp["config.json"] != (out / "config.json").stat().st_mtime_ns


@pytest.fixture
def packed(rng, tmp_path):
    model = synthetic_model(tmp_path / "model", rng, {"model.layers.0.q.weight": (40, 200)})
    write_quant(model, tmp_path / "quant", rng)
    return pack_checkpoint(tmp_path / "quant", tmp_path / "packed")


def _edit_shard(folder: Path, edit) -> None:
    """Rewrite the shard edited, and its hash in config.json: damage that the content hash
    cannot see (a writer that hashes what it wrote wrong), for the format's own checks."""
    tensors, meta = read_safetensors(folder / "model.safetensors")
    edit(tensors)
    sha = write_safetensors(folder / "model.safetensors", tensors, meta)
    _edit_config(folder, lambda qc: qc["sha256"].update({"model.safetensors": sha}))


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config["quantization_config"])
    write_json_atomic(folder / "config.json", config)


BAD = {
    "wrong shape": (
        lambda f: _edit_shard(f, lambda t: t.update(
            {"model.layers.0.q.row_scale": t["model.layers.0.q.row_scale"][:, :-1]})),
        r"model\.safetensors: tensor 'model\.layers\.0\.q\.row_scale' is F16 \[\d+, 39\], "
        r"expected float16 \[\d+, 40\]",
    ),
    "unknown format version": (
        lambda f: _edit_config(f, lambda qc: qc.update(format="qdtk-bcq/9")),
        r"config\.json: quantization_config format 'qdtk-bcq/9' is not supported",
    ),
    "missing scales": (
        lambda f: _edit_shard(f, lambda t: t.pop("model.layers.0.q.col_scale")),
        r"packed: tensor 'model\.layers\.0\.q\.col_scale' of quantized module "
        r"'model\.layers\.0\.q' is missing",
    ),
    "truncated shard": (
        lambda f: (f / "model.safetensors").write_bytes(
            (f / "model.safetensors").read_bytes()[:-100]),
        r"model\.safetensors: data shorter than the header says \(tensor '.*'",
    ),
    "rotation in a /1 checkpoint": (
        lambda f: _edit_config(f, lambda qc: qc["modules"]["model.layers.0.q"].update(
            rotation={"kind": "hadamard", "seed": 0, "block": 8})),
        r"config\.json: module 'model\.layers\.0\.q' is rotated, which qdtk-bcq/1 cannot",
    ),
    "bad rotation": (
        lambda f: _edit_config(f, lambda qc: (qc.update(format=FORMAT_2), qc["modules"][
            "model.layers.0.q"].update(rotation={"kind": "hadamard", "seed": 0, "block": 64}))),
        r"config\.json: module 'model\.layers\.0\.q': invalid rotation .* block 8\)",
    ),
    "bad orders": (
        lambda f: _edit_shard(f, lambda t: t["model.layers.0.q.orders"].__setitem__(0, 9)),
        r"model\.safetensors: tensor 'model\.layers\.0\.q\.orders' holds orders outside",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_packed_input_is_named_and_nothing_is_written(packed, tmp_path, case):
    damage, message = BAD[case]
    damage(packed)
    with pytest.raises(QdtkError, match=message):
        unpack_checkpoint(packed, tmp_path / "dense")
    assert not (tmp_path / "dense").exists()


def test_pack_rejects_a_solution_that_does_not_fit_the_model(rng, tmp_path):
    model = synthetic_model(tmp_path / "model", rng, {"model.layers.0.q.weight": (40, 200)})
    write_quant(model, tmp_path / "quant", rng)
    out = pack_checkpoint(tmp_path / "quant", tmp_path / "packed")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    layer = random_bcq(rng, 40, 199, [2, 2])
    write_solution_block(tmp_path / "quant" / "block_0000.safetensors",
                         {"model.layers.0.q.weight": layer}, "fp0")
    with pytest.raises(QdtkError, match=r"block_0000\.safetensors: layer 'model\.layers\.0\.q"
                       r"\.weight' has shape \[40, 199\], the model's is \[40, 200\]"):
        pack_checkpoint(tmp_path / "quant", tmp_path / "packed")
    # checked before writing: the earlier finished pack is untouched
    assert before == {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


@pytest.mark.parametrize("text,size", [("2GB", 2 * 10**9), ("500MiB", 500 * 2**20),
                                       ("1.5kb", 1500), ("4096", 4096)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "2XB", "-1MB", "GB"])
def test_parse_size_rejects_nonsense(text):
    with pytest.raises(QdtkError, match="bad size"):
        parse_size(text)


def test_cli_pack_and_unpack(rng, tmp_path):
    model = synthetic_model(tmp_path / "model", rng, {"model.layers.0.q.weight": (40, 200)})
    layers = write_quant(model, tmp_path / "quant", rng)
    r = CliRunner().invoke(cli, ["pack", str(tmp_path / "quant"), "--model", str(model),
                                 "--out", str(tmp_path / "packed"), "--max-shard-size", "1MB"])
    assert r.exit_code == 0, r.output
    assert read_quantization_config(tmp_path / "packed")["format"] == FORMAT
    r = CliRunner().invoke(cli, ["unpack", str(tmp_path / "packed"), "--out",
                                 str(tmp_path / "dense"), "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    got = Checkpoint(tmp_path / "dense").read("model.layers.0.q.weight")
    assert np.array_equal(bits_of(got), bits_of(layers["model.layers.0.q.weight"].dequantize()))
    stamp = (tmp_path / "dense" / "model.safetensors").stat().st_mtime_ns
    unpack_checkpoint(tmp_path / "packed", tmp_path / "dense", dtype="float32")  # a no-op
    assert stamp == (tmp_path / "dense" / "model.safetensors").stat().st_mtime_ns
    r = CliRunner().invoke(cli, ["unpack", str(model), "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "Error:" in r.output and "not a packed checkpoint" in r.output


@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_dequantize_kernel_is_the_formula_bit_for_bit(rng, K):
    # the canonical float32 evaluation, written out: planes added in order k = 0, 1, ...
    signs = rng.random((K, 70, 37)) > 0.5
    a = (rng.standard_normal((K, 70)) * 1e-2).astype(np.float16)
    b = rng.standard_normal((K, 37)).astype(np.float16)
    want = np.zeros((70, 37), np.float32)
    for k in range(K):
        outer = np.outer(a[k].astype(np.float32), b[k].astype(np.float32))
        want += outer * np.where(signs[k], np.float32(1), np.float32(-1))
    got = dequantize_block(signs, a, b)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
    # a strided view of the signs (as BinaryCodedLayer.dequantize passes them) gives the same
    wide = np.concatenate([signs, ~signs], axis=2)
    np.testing.assert_array_equal(dequantize_block(wide[:, :, :37], a, b), want)


@pytest.mark.parametrize("own", [
    {"model_type": "llama", "torch_dtype": "bfloat16", "hidden_size": 8},
    {"model_type": "bert", "dtype": "float32", "auto_map": {"AutoModel": "m.M"}},
    {"hidden_size": 8},  # none of the gated entries
])
def test_gated_config_gives_the_models_config_back(own):
    from qdtk.formats.packed import DTYPE_GUARD, PACKED_MODEL_TYPE, gated_config, model_config

    config = {**own, "quantization_config": {"quant_method": "qdtk"}}
    gated = gated_config(config)
    assert gated["model_type"] == PACKED_MODEL_TYPE
    assert gated["torch_dtype"] == gated["dtype"] == DTYPE_GUARD
    back = model_config(gated)
    assert back == {**config, "quantization_config": gated["quantization_config"]}
    # a folder gated before the dtype entries were: its own dtype stays where it was
    older = {**gated, "torch_dtype": "float16", "quantization_config": {
        "quant_method": "qdtk", "model_config": {"model_type": "llama", "auto_map": None}}}
    assert model_config(older)["torch_dtype"] == "float16"
    assert model_config(older)["model_type"] == "llama" and "auto_map" not in model_config(older)
