"""Packed inference: the kernels against the unpacked matmul, BCQLinear, qdtk.load and
transformers' from_pretrained on packed folders, and their errors on damaged ones."""

import numpy as np
import pytest
from numba import cuda, njit

torch = pytest.importorskip("torch")

import qdtk  # noqa: E402
from qdtk.errors import QdtkError  # noqa: E402
from qdtk.formats.bits import group_slices  # noqa: E402
from qdtk.formats.checkpoint import Checkpoint  # noqa: E402
from qdtk.formats.packed import PackedBCQ, plane_layout  # noqa: E402
from qdtk.math import bcq_matmul as kernels  # noqa: E402
from qdtk.math import bcq_matmul_cuda as kcuda  # noqa: E402
from qdtk.math.rotation import Rotation  # noqa: E402
from qdtk.math.simd import HAS_AVX512  # noqa: E402
from qdtk.pack import pack_checkpoint, unpack_checkpoint  # noqa: E402
from qdtk.torch.nn import linear  # noqa: E402
from qdtk.torch.nn.linear import BCQLinear  # noqa: E402
from tests.test_pack import BAD as PACK_BAD  # noqa: E402
from tests.test_pack import _edit_shard, random_bcq, write_quant  # noqa: E402

# ragged n and last groups (300 = 128 + 128 + 44, 33 < 32 + 2), several groups, one group
SHAPES = [(37, 300), (130, 256), (5, 33), (20, 520)]


def packed_layer(rng, n, m, orders=None):
    """(PackedBCQ, float32 What) with mixed orders 1..4 across the groups."""
    G = len(group_slices(m))
    layer = random_bcq(rng, n, m, rng.integers(1, 5, G) if orders is None else orders)
    return PackedBCQ.from_layer(layer), layer.dequantize()


def kernel_args(p: PackedBCQ):
    return p.planes, p.row_scale.view(np.uint16), p.col_scale.astype(np.float32)


def rel_err(y, ref) -> float:
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(y - ref).max() / np.abs(ref).max())


# ----------------------------------------------------------------------------- CPU kernels


@pytest.mark.parametrize("n,m", SHAPES)
def test_dequantized_tiles_are_unpacks_what_bit_for_bit(rng, n, m):
    p, What = packed_layer(rng, n, m)
    L = plane_layout(p.orders, m)
    out = np.full((n, m), np.nan, np.float32)
    for r0 in range(0, n, 16):  # tiles of 16 rows, the last one ragged
        r = min(16, n - r0)
        kernels.dequantize_rows(*kernel_args(p), L.start, L.width, L.word, L.col, r0,
                                out[r0 : r0 + r])
    np.testing.assert_array_equal(out.view(np.uint32), What.view(np.uint32))


@pytest.mark.parametrize("n,m", SHAPES + [(48, 300)])  # 16-row blocks with and without a rest
@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("tables", [False, pytest.param(True, marks=pytest.mark.skipif(
    not HAS_AVX512, reason="the table kernel needs AVX-512"))])
def test_packed_kernel_equals_the_unpacked_matmul(rng, monkeypatch, n, m, T, tables):
    p, What = packed_layer(rng, n, m)
    L = plane_layout(p.orders, m)
    monkeypatch.setattr(kernels, "TABLE_BYTES", 2 * 512 * L.words)  # passes of 2 tokens
    x = (rng.standard_normal((T, m)) + 2.0).astype(np.float32)  # a mean, as activations have
    y = kernels.matmul_packed(x, *kernel_args(p), L, tables=tables)
    assert y.shape == (T, n) and y.dtype == np.float32
    assert rel_err(y, x @ What.T) < 1e-5


@pytest.mark.parametrize("nw", [0, 1, 3, 4, 5])  # empty, odd, full group, beyond
def test_signed_axpy_equals_its_scalar_definition(rng, nw):
    from numba import njit

    from qdtk.math.simd import signed_axpy

    @njit
    def run(out, b, a, words):
        signed_axpy(out, 3, b, 32, a, words, 1, nw)  # offsets: word 1 of words, lane 32 of b

    words = rng.integers(0, 2**32, 8, dtype=np.uint64).astype(np.uint32)
    b = rng.standard_normal(32 * 8).astype(np.float32)
    a = np.float32(0.37)
    out = rng.standard_normal(32 * 8).astype(np.float32)
    sign = (np.unpackbits(words.view(np.uint8), bitorder="little") * 2.0 - 1).astype(np.float32)
    want = out.copy()
    for j in range(32 * nw):  # the canonical order: one rounded product, then +-
        s = np.float32(a * b[32 + j])
        want[3 + j] = np.float32(want[3 + j] + (s if sign[32 + j] > 0 else -s))
    run(out, b, a, words)
    np.testing.assert_array_equal(out.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("n,i0", [(9, 0), (9, 4), (9, 8), (2, 0)])  # full, last full, clamped
@pytest.mark.parametrize("shift", [0.0, 3.0])  # inputs with a mean: no cancellation
def test_signed_row_sums_equal_their_definition(rng, n, i0, shift):
    from qdtk.math.bcq_matmul import plane_halves
    from qdtk.math.simd import ROWS, signed_row_sums

    @njit
    def run(src, half, planes, rs, word, n_words, y):
        signed_row_sums(src, half, planes, rs, i0, word, n_words, y)

    word, n_words = np.array([0, 4, 5, 8]), np.array([4, 1, 3, 2])  # full, 1 and 3 words, 2
    planes = rng.integers(0, 2**32, (n, 10), dtype=np.uint64).astype(np.uint32)
    src = (rng.standard_normal(32 * 10) + shift).astype(np.float32)
    rs = rng.standard_normal((4, n)).astype(np.float16)
    y = np.full(n, np.nan, np.float32)
    half = plane_halves(src[None], word, n_words)[0]
    run(src, half, planes, rs.view(np.uint16), word, n_words, y)
    sign = np.unpackbits(planes.view(np.uint8), axis=1, bitorder="little") * 2.0 - 1  # [n, 320]
    want = [sum(float(rs[p, i]) * sign[i, 32 * u : 32 * (u + k)] @ src[32 * u : 32 * (u + k)]
                for p, (u, k) in enumerate(zip(word, n_words, strict=True))) for i in range(n)]
    done = slice(i0, min(n, i0 + ROWS))
    np.testing.assert_allclose(y[done], np.array(want)[done], rtol=1e-5, atol=1e-5)
    assert np.isnan(y[: i0]).all() and np.isnan(y[i0 + ROWS :]).all()  # no other row written



@pytest.mark.skipif(not HAS_AVX512, reason="the table kernel needs AVX-512")
@pytest.mark.parametrize("rows", [32, 16])  # nibble_row_sums, nibble_row_sums_16
@pytest.mark.parametrize("i0", [0, 3])  # row scales and y at an odd offset
def test_nibble_row_sums_equal_their_definition(rng, rows, i0):
    from qdtk.math.bcq_matmul import nibble_tables
    from qdtk.math.simd import nibble_row_sums, nibble_row_sums_16

    kernel = nibble_row_sums if rows == 32 else nibble_row_sums_16

    @njit
    def run(table, planes, rs, word, n_words, y):
        kernel(table, planes, rs, i0, word, n_words, y)

    n = i0 + rows + 5
    word, n_words = np.array([0, 4, 8, 9]), np.array([4, 4, 1, 3])  # full, full, narrow, narrow
    planes = rng.integers(0, 2**32, (n, 12), dtype=np.uint64).astype(np.uint32)
    src = (rng.standard_normal(32 * 12) + 3.0).astype(np.float32)
    rs = rng.standard_normal((4, n)).astype(np.float16)
    y = np.full(n, np.nan, np.float32)
    run(nibble_tables(src[None])[0], planes, rs.view(np.uint16), word, n_words, y)
    sign = np.unpackbits(planes.view(np.uint8), axis=1, bitorder="little") * 2.0 - 1  # [n, 384]
    want = [sum(float(rs[p, i]) * sign[i, 32 * u : 32 * (u + k)] @ src[32 * u : 32 * (u + k)]
                for p, (u, k) in enumerate(zip(word, n_words, strict=True))) for i in range(n)]
    done = slice(i0, i0 + rows)
    np.testing.assert_allclose(y[done], np.array(want)[done], rtol=1e-5, atol=1e-5)
    assert np.isnan(y[:i0]).all() and np.isnan(y[i0 + rows :]).all()  # no other row written


def test_half_decoding_is_exact_for_every_float16():
    h = np.arange(2**16, dtype=np.uint16)
    want = h.view(np.float16).astype(np.float32)
    got = np.array([kernels._half(v) for v in h[::97]] + [kernels._half(h[-1])], np.float32)
    ref = np.concatenate([want[::97], want[-1:]])
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    ok = ~np.isnan(ref)
    np.testing.assert_array_equal(got[ok].view(np.uint32), ref[ok].view(np.uint32))


# ----------------------------------------------------------------------------- BCQLinear


@pytest.mark.parametrize("n,m", SHAPES)
# 2 T tokens: words, the last count of words, the first of tiles, tiles
@pytest.mark.parametrize("T", [1, linear.FEW_TOKENS // 2, linear.FEW_TOKENS // 2 + 1, 40])
@pytest.mark.parametrize("bias", [True, False])
def test_bcq_linear_is_the_unpacked_linear(rng, monkeypatch, n, m, T, bias):
    monkeypatch.setattr(linear, "TILE_ROWS", 16)  # tiles of 16 rows: n is ragged
    p, What = packed_layer(rng, n, m)
    b = torch.randn(n) if bias else None
    mod = BCQLinear.from_packed(p, b)
    x = torch.randn(2, T, m)
    ref = torch.nn.functional.linear(x, torch.from_numpy(What), b)
    y = mod(x)
    assert y.shape == (2, T, n) and y.dtype == torch.float32
    assert rel_err(y, ref) < 1e-5
    yb = mod(x.bfloat16())  # bfloat16 in and out; computed in float32, rounded once
    refb = torch.nn.functional.linear(x.bfloat16().float(), torch.from_numpy(What), b)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), refb.bfloat16().float(), rtol=2**-7, atol=1e-5)


@pytest.mark.parametrize("n,m", [(37, 300), (20, 512)])  # blocks of 4 and 512
@pytest.mark.parametrize("T", [1, 40])
def test_rotated_bcq_linear_is_the_unpacked_linear(rng, n, m, T):
    p, What = packed_layer(rng, n, m)
    p.rotation = Rotation(m, 5)
    mod = BCQLinear.from_packed(p, torch.randn(n))
    x = torch.randn(2, T, m)
    W = torch.from_numpy(What @ p.rotation.matrix().T.astype(np.float32))  # What Q^T
    ref = torch.nn.functional.linear(x, W, mod.bias)
    assert rel_err(mod(x), ref) < 1e-5
    assert list(mod.state_dict()) == ["bias", "orders", "planes", "row_scale", "col_scale"]


def test_bcq_linear_follows_its_buffers_after_a_forward(rng):
    """`_cpu_arrays` keeps views and a float32 col_scale between calls: every way a buffer
    changes (assignment, load_state_dict in place, an in-place edit) reaches the output."""
    orders = rng.integers(1, 5, 3).astype(np.uint8)
    (p, What), (q, Wq) = packed_layer(rng, 37, 300, orders), packed_layer(rng, 37, 300, orders)
    mod, x = BCQLinear.from_packed(p), torch.randn(3, 300)
    assert rel_err(mod(x), x @ torch.from_numpy(What).T) < 1e-5
    mod.planes = torch.from_numpy(q.planes.copy())  # a new tensor, as new as the old: q's signs
    want = BCQLinear.from_packed(PackedBCQ(p.shape, orders, q.planes, p.row_scale, p.col_scale))
    assert torch.equal(mod(x), want(x))
    mod.load_state_dict(BCQLinear.from_packed(q).state_dict())  # copies into the same tensors
    assert rel_err(mod(x), x @ torch.from_numpy(Wq).T) < 1e-5
    y = mod(x)
    mod.col_scale.mul_(2)  # in place: exact in float16, doubles every weight
    assert torch.equal(mod(x), 2 * y)


def test_bcq_linear_takes_inputs_that_require_grad(rng):
    p, _ = packed_layer(rng, 37, 300)
    mod = BCQLinear.from_packed(p, torch.randn(37))
    for T in (1, 40):  # words, tiles
        x = torch.randn(2, T, 300)
        y = mod(x.clone().requires_grad_())  # as inside a model run without no_grad
        assert not y.requires_grad and torch.equal(y, mod(x))


@pytest.mark.parametrize("cast", ["float", "double", "bfloat16", "half"])
def test_bcq_linear_keeps_its_float16_scales_through_module_casts(rng, cast):
    """model.bfloat16() and the like cast floating buffers: the scales must keep their bits
    (the kernels read them as float16), the bias follows, the output is the same What's."""
    p, What = packed_layer(rng, 37, 300)
    bias = torch.randn(37)
    mod = getattr(BCQLinear.from_packed(p, bias), cast)()
    assert mod.row_scale.dtype == mod.col_scale.dtype == torch.float16
    assert mod.row_scale.numpy().tobytes() == p.row_scale.tobytes()
    dtype = mod.bias.dtype
    assert dtype == getattr(torch, cast if cast != "half" else "float16")
    x = torch.randn(3, 300)
    want = x.double() @ torch.from_numpy(What).double().T + bias.to(dtype).double()
    assert rel_err(mod(x.to(dtype)).double(), want) < (1e-5 if dtype.itemsize >= 4 else 1e-2)


def test_bcq_linear_cache_pins_and_pickles_nothing(rng):
    import pickle
    import weakref

    p, _ = packed_layer(rng, 37, 300)
    mod = BCQLinear.from_packed(p)
    size = len(pickle.dumps(mod))
    mod(torch.randn(1, 300))
    assert len(pickle.dumps(mod)) == size  # no views or layouts saved next to them
    old = weakref.ref(mod.planes)
    del p
    mod.to("meta")  # the buffers replaced: the CPU ones are freed, not kept by the cache
    assert old() is None


def test_bcq_linear_buffers_are_the_packed_arrays(rng):
    p, _ = packed_layer(rng, 37, 300)
    sd = BCQLinear.from_packed(p).state_dict()
    assert list(sd) == ["orders", "planes", "row_scale", "col_scale"]
    for name in PackedBCQ.FIELDS:
        arr = getattr(p, name)
        assert sd[name].numpy().dtype == arr.dtype and sd[name].numpy().tobytes() == arr.tobytes()


# ----------------------------------------------------------------------------- CUDA kernels


@pytest.mark.skipif(not cuda.is_available(), reason="no CUDA device and no simulator")
@pytest.mark.parametrize("n,m", [(5, 300), (3, 33)])
def test_cuda_kernels_match_the_cpu_kernels(rng, n, m):
    p, What = packed_layer(rng, n, m)
    L = plane_layout(p.orders, m)
    DL = kcuda.device_layout(L, p.orders)
    planes, rs, cs = kernel_args(p)
    out = np.zeros((n - 1, m), np.float32)  # rows 1.. : a tile that starts inside the layer
    kcuda.dequantize_rows(planes, rs, cs, DL, p.orders, 1, out, tile=(2, 64))
    np.testing.assert_array_equal(out.view(np.uint32), What[1:].view(np.uint32))
    x = rng.standard_normal((2, m)).astype(np.float32)
    y = np.zeros((2, n), np.float32)
    kcuda.matmul_packed(x, planes, rs, cs, DL, y, threads=4)  # 4 threads stride over the words
    assert rel_err(y, kernels.matmul_packed(x, planes, rs, cs, L)) < 1e-5


# ----------------------------------------------------------------------------- loading


# (fixture, auto class): a decoder, an encoder, a Qwen3-MoE (per-expert 2-D weights that
# transformers 5 runs fused, 4.x as Linears) and DiffusionGemma (fused 3-D experts; encoder
# layers tied to the decoder's)
PACKED_MODELS = {"tiny_llama": "AutoModelForCausalLM", "tiny_bert": "AutoModelForMaskedLM",
                 "tiny_llama-rotated": "AutoModelForCausalLM", "tiny_moe": "AutoModelForCausalLM",
                 "tiny_diffusion_gemma": "AutoModelForImageTextToText"}


@pytest.fixture(params=list(PACKED_MODELS))
def packed_model(request, tmp_path_factory):
    """(packed folder, unpacked float32 folder, AutoModel class) of a tiny model whose every
    block Linear and expert matrix is quantized with mixed orders (rotated: each with an input
    rotation); the packed folder is sharded."""
    import transformers

    fixture, _, rotated = request.param.partition("-")
    model_dir = request.getfixturevalue(fixture)
    tmp = tmp_path_factory.mktemp(request.param + "_packed")
    write_quant(model_dir, tmp / "quant", np.random.default_rng(1), rotate=bool(rotated))
    packed = pack_checkpoint(tmp / "quant", tmp / "packed", model_dir, max_shard_bytes=40_000)
    dense = unpack_checkpoint(packed, tmp / "dense", dtype="float32")
    return packed, dense, getattr(transformers, PACKED_MODELS[request.param])


def test_load_keeps_the_files_tensors_bit_for_bit(packed_model):
    packed, _, _ = packed_model
    model = qdtk.load(packed)
    ckpt = Checkpoint(packed)
    sd = model.state_dict()
    assert set(ckpt.names()) <= set(sd)
    for name in ckpt.names():
        want = ckpt.read(name)
        got = sd[name].view(torch.uint16) if sd[name].dtype == torch.bfloat16 else sd[name]
        assert got.numpy().dtype == want.dtype.newbyteorder("=") or want.dtype.name == "bfloat16"
        assert got.numpy().tobytes() == want.tobytes(), name
    # resident: the packed bytes and the kept tensors, no dense copy (tied weights count once)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in list(model.parameters()) + list(model.buffers())
                if t.untyped_storage().data_ptr()}
    assert sum(storages.values()) <= 1.02 * ckpt.nbytes()
    qc = model.config.quantization_config
    assert sum(isinstance(m, BCQLinear) for m in model.modules()) == len(qc.modules)
    rotated = {m.rotation for m in model.modules() if isinstance(m, BCQLinear)} - {None}
    assert len(rotated) == (len(qc.modules) if qc.format == "qdtk-bcq/2" and
                            not getattr(qc, "fused", None) else 0)
    # no expert runs from 3-D parameters: every expert matrix is a packed module
    from qdtk.torch.experts import is_fused_experts

    assert not any(is_fused_experts(m) for m in model.modules())


@pytest.mark.parametrize("tokens", [(2, 24), (1, 3)])  # tiled GEMM, then lookup tables
def test_packed_model_gives_the_unpacked_models_logits(packed_model, tokens):
    from qdtk.torch.models import forward_inputs

    packed, dense, auto = packed_model
    ids = torch.tensor(np.random.default_rng(2).integers(5, 100, tokens))
    ref = auto.from_pretrained(dense, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(**forward_inputs(ref, ids)).logits
        for model in (qdtk.load(packed), auto.from_pretrained(packed)):
            assert isinstance(model, type(ref))
            assert rel_err(model(**forward_inputs(model, ids)).logits, want) < 1e-5


# transformers alone on a packed folder, in a fresh process without qdtk imported
WITHOUT_QDTK = """
import sys
folder, trust, hide = sys.argv[1], sys.argv[2] == "1", sys.argv[3] == "1"
if hide:  # as if qdtk were not installed
    class Hide:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "qdtk":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, Hide())
import torch, transformers
cls = transformers.LlamaForCausalLM if sys.argv[5] == "1" else transformers.AutoModelForCausalLM
try:
    model = cls.from_pretrained(folder, trust_remote_code=trust)
except Exception as e:
    print("ERROR", type(e).__name__, " ".join(str(e).split()))
    sys.exit(0)
assert "qdtk" in sys.modules
packed = sum(type(m).__name__ == "BCQLinear" for m in model.modules())
ids = torch.tensor([[5, 17, 42, 9]])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[4])
print("LOADED", type(model).__name__, packed)
"""


def from_pretrained_without_qdtk(tmp_path, folder, trust: bool, hide: bool = False,
                                concrete: bool = False):
    import subprocess
    import sys

    env = {**__import__("os").environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    r = subprocess.run([sys.executable, "-c", WITHOUT_QDTK, str(folder), str(int(trust)),
                        str(int(hide)), str(tmp_path / "logits.pt"), str(int(concrete))],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def test_transformers_without_qdtk_never_loads_random_linears(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    write_quant(tiny_llama, tmp_path / "quant", np.random.default_rng(1))
    packed = pack_checkpoint(tmp_path / "quant", tmp_path / "packed", tiny_llama)
    # untrusted: transformers stops before any weight (an unknown model_type with remote code)
    out = from_pretrained_without_qdtk(tmp_path, packed, trust=False)
    assert out.startswith("ERROR ValueError") and "trust_remote_code=True" in out, out
    # the model's own class, past AutoConfig: its config stops at the dtype, before any weight
    for trust in (False, True):
        out = from_pretrained_without_qdtk(tmp_path, packed, trust=trust, concrete=True)
        assert out.startswith("ERROR AttributeError") and "qdtk_load" in out, out
    # trusted without qdtk installed: the folder's code asks for it
    out = from_pretrained_without_qdtk(tmp_path, packed, trust=True, hide=True)
    assert "ImportError" in out.split()[1] and "qdtk" in out, out
    # trusted with qdtk installed: the folder's code imports it, the Linears come packed
    out = from_pretrained_without_qdtk(tmp_path, packed, trust=True)
    assert out.split() == ["LOADED", "LlamaForCausalLM", "14"], out  # 2 blocks of 7 Linears
    dense = unpack_checkpoint(packed, tmp_path / "dense", dtype="float32")
    assert not (dense / "qdtk_packed.py").exists()
    ref = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([[5, 17, 42, 9]])).logits
    assert rel_err(torch.load(tmp_path / "logits.pt"), want) < 1e-5
    assert ref.config.model_type == "llama"  # unpack gives the model's own config back


Q = "model.layers.0.self_attn.q_proj"
# unpack's own cases and messages, and one that needs a real model's module names
BAD = {case: PACK_BAD[case] for case in ("unknown format version", "truncated shard")}
BAD["planes inconsistent with orders"] = (  # group 0 changes order: planes no longer fits
    lambda f: _edit_shard(f, lambda t: t[Q + ".orders"].__setitem__(
        0, t[Q + ".orders"][0] % 4 + 1)),
    r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.q_proj\.planes' is U32 "
    r"\[64, \d+\], expected uint32 \[64, \d+\]",
)


@pytest.mark.parametrize("case", BAD)
def test_damaged_packed_folders_stop_with_unpacks_errors(rng, tmp_path, tiny_llama, case):
    from transformers import AutoModelForCausalLM

    write_quant(tiny_llama, tmp_path / "quant", rng)
    packed = pack_checkpoint(tmp_path / "quant", tmp_path / "packed", tiny_llama)
    damage, message = BAD[case]
    damage(packed)
    with pytest.raises(QdtkError, match=message):
        qdtk.load(packed)
    with pytest.raises(QdtkError, match=message):
        AutoModelForCausalLM.from_pretrained(packed)


def test_import_qdtk_is_torch_free_and_registers_with_transformers_later():
    import subprocess
    import sys

    code = (
        "import sys, qdtk\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "import transformers\n"
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M\n"
        "assert 'qdtk' in M, sorted(M)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
