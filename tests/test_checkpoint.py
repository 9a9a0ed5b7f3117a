"""Checkpoint I/O: exact round trips, sharding, atomic writes, and an error for each bad input."""

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from qdtk.errors import QdtkError
from qdtk.formats.checkpoint import (
    INDEX_NAME,
    Checkpoint,
    CheckpointWriter,
    copy_aux_files,
    read_header,
    write_safetensors,
)
from qdtk.formats.io import atomic_path


def _tensors(rng):
    return {
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((48, 64)).astype(np.float32),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((96, 64)).astype(np.float16),
        "model.layers.1.self_attn.o_proj.weight": rng.standard_normal((64, 64)).astype(
            ml_dtypes.bfloat16
        ),
        "model.layers.0.input_layernorm.weight": rng.standard_normal(64).astype(np.float32),
        "model.embed_tokens.weight": rng.standard_normal((100, 64)).astype(ml_dtypes.bfloat16),
        "lm_head.weight": rng.standard_normal((100, 64)).astype(np.float32),
        "model.layers.0.post_attention_layernorm.weight": rng.standard_normal(64).astype(
            np.float16
        ),
    }


def _write(folder, tensors, max_shard_bytes):
    with CheckpointWriter(folder, max_shard_bytes=max_shard_bytes) as w:
        for name, arr in tensors.items():
            w.add(name, arr)


@pytest.mark.parametrize("max_shard_bytes", [10**9, 20_000, 1])
def test_round_trip_is_bit_exact_across_shards(tmp_path, rng, max_shard_bytes):
    tensors = _tensors(rng)
    _write(tmp_path, tensors, max_shard_bytes)
    ckpt = Checkpoint(tmp_path)
    assert set(ckpt.names()) == set(tensors)
    for name, arr in tensors.items():
        got = ckpt.read(name)
        assert got.dtype == arr.dtype and got.shape == arr.shape
        assert got.tobytes() == arr.tobytes()
    bf = "model.layers.1.self_attn.o_proj.weight"
    np.testing.assert_array_equal(ckpt.read(bf, np.float32), tensors[bf].astype(np.float32))


def test_index_names_every_tensor_and_shards_respect_the_limit(tmp_path, rng):
    tensors = _tensors(rng)
    limit = 20_000
    _write(tmp_path, tensors, limit)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) == len(set(index["weight_map"].values())) > 1
    for shard in shards:
        infos, _ = read_header(shard)
        data = sum(i.nbytes for i in infos.values())
        # a shard exceeds the limit only when it holds one tensor larger than the limit
        assert data <= limit or len(infos) == 1
        for name in infos:
            assert index["weight_map"][name] == shard.name


def test_single_shard_has_no_index(tmp_path, rng):
    _write(tmp_path, _tensors(rng), 10**9)
    assert (tmp_path / "model.safetensors").exists()
    assert not (tmp_path / INDEX_NAME).exists()


def test_transformers_style_readers_accept_our_files(tmp_path, rng):
    from safetensors.numpy import load_file

    t = {"a.weight": rng.standard_normal((3, 5)).astype(np.float32)}
    write_safetensors(tmp_path / "x.safetensors", t, {"format": "pt"})
    np.testing.assert_array_equal(load_file(tmp_path / "x.safetensors")["a.weight"], t["a.weight"])


def test_failed_write_leaves_no_file_under_a_final_name(tmp_path, rng):
    tensors = _tensors(rng)
    with pytest.raises(RuntimeError), CheckpointWriter(tmp_path, max_shard_bytes=20_000) as w:
        for i, (name, arr) in enumerate(tensors.items()):
            if i == 4:
                raise RuntimeError("killed")
            w.add(name, arr)
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"a": np.ones(3, np.float32)})
    before = path.read_bytes()
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half a file")
        raise RuntimeError("killed mid-write")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_unsupported_dtype_is_refused_before_writing(tmp_path):
    with pytest.raises(QdtkError, match="'b' has unsupported dtype complex64"):
        write_safetensors(tmp_path / "x.safetensors", {"b": np.ones(2, np.complex64)})
    assert list(tmp_path.iterdir()) == []


def test_linear_selection_defaults_and_patterns(tmp_path, rng):
    _write(tmp_path, _tensors(rng), 10**9)
    ckpt = Checkpoint(tmp_path)
    assert sorted(ckpt.linear_names()) == [
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
    ]
    assert ckpt.linear_names(exclude=["*.mlp.*"]) == [
        n for n in ckpt.linear_names() if ".mlp." not in n
    ]
    assert ckpt.linear_names(include=["lm_head.weight"]) == ["lm_head.weight"]
    assert ckpt.linear_names(include=[r"re:layers\.1\."]) == [
        "model.layers.1.self_attn.o_proj.weight"
    ]
    with pytest.raises(QdtkError, match="input_layernorm.weight.*2-D"):
        ckpt.linear_names(include=["*.input_layernorm.weight"])


# --- bad input: each gets an error naming the file ---


def test_missing_folder(tmp_path):
    with pytest.raises(QdtkError, match="not found"):
        Checkpoint(tmp_path / "nope")


def test_no_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(QdtkError, match="no .safetensors"):
        Checkpoint(tmp_path)


def test_index_names_missing_shard(tmp_path, rng):
    _write(tmp_path, _tensors(rng), 20_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(QdtkError, match=f"{shard.name}.*missing"):
        Checkpoint(tmp_path)


def test_tensor_in_two_shards(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"x.weight": np.ones(2, np.float32)})
    write_safetensors(tmp_path / "b.safetensors", {"x.weight": np.ones(2, np.float32)})
    with pytest.raises(QdtkError, match="b.safetensors.*'x.weight'.*also in a.safetensors"):
        Checkpoint(tmp_path)


def _raw(path, header: bytes, data: bytes = b"", length: int | None = None):
    n = len(header) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + header + data)


def test_bad_header_length(tmp_path):
    _raw(tmp_path / "model.safetensors", b"{}", length=10**6)
    with pytest.raises(QdtkError, match="model.safetensors: bad header length"):
        Checkpoint(tmp_path)


def test_truncated_before_header(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(QdtkError, match="model.safetensors: truncated"):
        Checkpoint(tmp_path)


def test_bad_json_header(tmp_path):
    _raw(tmp_path / "model.safetensors", b"{not json}")
    with pytest.raises(QdtkError, match="model.safetensors: bad JSON header"):
        Checkpoint(tmp_path)


def test_data_shorter_than_header_says(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", {"w": np.ones((8, 8), np.float32)})
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(QdtkError, match="model.safetensors: data shorter.*'w'"):
        Checkpoint(tmp_path)


def test_entry_size_mismatch(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    _raw(tmp_path / "model.safetensors", header, b"\0" * 16)
    with pytest.raises(QdtkError, match="'w' spans 8 bytes"):
        Checkpoint(tmp_path)


def test_copy_aux_files_skips_weights(tmp_path, rng):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _write(src, _tensors(rng), 20_000)
    (src / "config.json").write_text("{}")
    (src / "tokenizer.json").write_text("{}")
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text("{}")
    copied = copy_aux_files(src, dst)
    assert copied == ["1_Pooling", "config.json", "tokenizer.json"]
    assert (dst / "1_Pooling" / "config.json").exists()


def test_fingerprint_changes_with_content(tmp_path, rng):
    t = _tensors(rng)
    _write(tmp_path / "a", t, 10**9)
    t["lm_head.weight"] = t["lm_head.weight"][:50]
    _write(tmp_path / "b", t, 10**9)
    assert Checkpoint(tmp_path / "a").fingerprint() != Checkpoint(tmp_path / "b").fingerprint()
    assert Checkpoint(tmp_path / "a").fingerprint() == Checkpoint(tmp_path / "a").fingerprint()


def _mapped(path) -> int:
    """How many regions of this process map `path` (Linux /proc)."""
    with open("/proc/self/maps") as f:
        return sum(line.rstrip().endswith(str(path)) for line in f)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_a_read_maps_its_tensor_until_the_array_is_dropped(tmp_path, rng):
    """No map of the whole file stays open: every page once read would stay resident."""
    tensors = _tensors(rng)
    _write(tmp_path, tensors, 10**9)
    ckpt, path = Checkpoint(tmp_path), (tmp_path / "model.safetensors").resolve()
    arr = ckpt.read("lm_head.weight")
    assert _mapped(path) == 1 and arr.tobytes() == tensors["lm_head.weight"].tobytes()
    del arr
    W = ckpt.read("model.layers.0.self_attn.q_proj.weight", np.float32)
    assert _mapped(path) == 0 and W.flags.writeable and W.flags.owndata
    np.testing.assert_array_equal(W, tensors["model.layers.0.self_attn.q_proj.weight"])


def test_a_file_truncated_after_opening_is_named(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", {"w": np.ones((8, 8), np.float32)})
    ckpt, path = Checkpoint(tmp_path), tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(QdtkError, match="model.safetensors: truncated while qdtk ran.*'w'"):
        ckpt.read("w", np.float32)
