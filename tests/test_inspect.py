"""`qdtk inspect` on an ordinary checkpoint and on a packed one (qdtk-bcq/1)."""

import json

from click.testing import CliRunner

from qdtk.cli.main import cli
from qdtk.formats.checkpoint import Checkpoint
from qdtk.pack import pack_checkpoint
from tests.test_pack import synthetic_model, write_quant

SHAPES = {"model.layers.0.q.weight": (40, 200), "model.layers.1.q.weight": (24, 128)}


def inspect_json(folder) -> dict:
    r = CliRunner().invoke(cli, ["inspect", str(folder), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_inspect_ordinary_checkpoint(rng, tmp_path):
    model = synthetic_model(tmp_path / "model", rng, SHAPES)
    d = inspect_json(model)
    assert [r["name"] for r in d["linears"]] == list(SHAPES)
    assert d["tensors"] == 2 + 2 * len(SHAPES)  # embeddings, norm, weights and biases
    # order 2: two planes per group of 2 bits... by hand: (n, m) = (40, 200) has groups 128, 72
    q0 = 2 * 40 * 200 + 16 * 2 * (40 + 128) + 16 * 2 * (40 + 72)
    q1 = 2 * 24 * 128 + 16 * 2 * (24 + 128)
    assert d["linears"][0]["bits_per_weight_at_order_2"] == q0 / (40 * 200)
    assert d["bits_per_weight_at_order_2"] == (q0 + q1) / (40 * 200 + 24 * 128)
    kept = 4 * (50 * 64 + 64 + 40 + 24)
    assert d["size_bytes"] == kept + 4 * (40 * 200 + 24 * 128)
    assert d["size_at_2bit_bytes"] == kept + (q0 + q1) // 8


def test_inspect_packed_checkpoint(rng, tmp_path):
    model = synthetic_model(tmp_path / "model", rng, SHAPES)
    write_quant(model, tmp_path / "quant", rng, orders=lambda name, G: [3, 1][:G],
                affine=[r"\.1\."])
    packed = pack_checkpoint(tmp_path / "quant", tmp_path / "packed")
    d = inspect_json(packed)
    assert d["packed"] and d["format"] == "qdtk-bcq/1"
    bcq, aff = d["modules"]
    # by hand: orders 3 (128 columns) and 1 (72 columns) on 40 rows, scales in float16
    q0 = 3 * 40 * 128 + 16 * 3 * (40 + 128) + 1 * 40 * 72 + 16 * 1 * (40 + 72)
    q1 = 3 * 24 * 128 + 2 * 16 * 24  # 3-bit codes, one fp16 scale and zero per row
    assert bcq["name"] == "model.layers.0.q" and bcq["orders"] == {"1": 1, "3": 1}
    assert bcq["bits_per_weight"] == q0 / (40 * 200)
    assert aff["kind"] == "affine" and aff["bits_per_weight"] == q1 / (24 * 128)
    assert d["bits_per_weight"] == (q0 + q1) / (40 * 200 + 24 * 128)
    # as stored: 3 planes x 4 words + 1 plane x 3 words per row, orders; codes 12 words per row
    stored0 = 40 * 15 * 4 + 4 * 40 * 2 + 2 * (3 * 128 + 72) + 2
    assert bcq["stored_bytes"] == stored0
    assert d["file_bytes"] == sum(p.stat().st_size for p in packed.glob("*.safetensors"))
    assert d["original_bytes"] == Checkpoint(model).nbytes()
    assert d["compression"] == d["original_bytes"] / d["file_bytes"]

    r = CliRunner().invoke(cli, ["inspect", str(packed)])
    assert r.exit_code == 0, r.output
    assert f"{q0 / (40 * 200):.3f} bits/weight" in r.output and "vs original" in r.output


def test_inspect_packed_names_a_missing_tensor(rng, tmp_path):
    from qdtk.formats.checkpoint import read_safetensors, write_safetensors

    model = synthetic_model(tmp_path / "model", rng, SHAPES)
    write_quant(model, tmp_path / "quant", rng)
    packed = pack_checkpoint(tmp_path / "quant", tmp_path / "packed")
    tensors, meta = read_safetensors(packed / "model.safetensors")
    del tensors["model.layers.1.q.planes"]
    write_safetensors(packed / "model.safetensors", tensors, meta)
    r = CliRunner().invoke(cli, ["inspect", str(packed)])
    assert r.exit_code == 1 and "'model.layers.1.q.planes'" in r.output
    assert "Traceback" not in r.output
