"""qdtk's native LLaDA and Dream (qdtk/torch/models/): published checkpoints load without their own
code, every tensor under its own name, and the forward is the published math, checked against
a second formulation written out here on the state dict."""

import json
import logging
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from click.testing import CliRunner  # noqa: E402

from qdtk.cli.main import cli  # noqa: E402
from qdtk.errors import QdtkError  # noqa: E402
from qdtk.formats.checkpoint import Checkpoint  # noqa: E402
from qdtk.torch.models import load_model, logits_shift  # noqa: E402
from tests.dllm import write_dllm  # noqa: E402

ARCHS = ["llada", "dream"]


def _names(arch: str, i: int) -> dict[str, str]:
    """Role -> tensor name of block i (and the model-level tensors), per architecture."""
    if arch == "llada":
        b = f"model.transformer.blocks.{i}."
        return {"attn_norm": b + "attn_norm", "q": b + "q_proj", "k": b + "k_proj",
                "v": b + "v_proj", "o": b + "attn_out", "mlp_norm": b + "ff_norm",
                "gate": b + "ff_proj", "up": b + "up_proj", "down": b + "ff_out",
                "emb": "model.transformer.wte", "norm": "model.transformer.ln_f",
                "head": "model.transformer.ff_out"}
    b = f"model.layers.{i}."
    return {"attn_norm": b + "input_layernorm", "q": b + "self_attn.q_proj",
            "k": b + "self_attn.k_proj", "v": b + "self_attn.v_proj",
            "o": b + "self_attn.o_proj", "mlp_norm": b + "post_attention_layernorm",
            "gate": b + "mlp.gate_proj", "up": b + "mlp.up_proj", "down": b + "mlp.down_proj",
            "emb": "model.embed_tokens", "norm": "model.norm", "head": "lm_head"}


def reference_logits(arch, folder, ids, keep=None):
    """The published math in plain float64 ops on the checkpoint's tensors: pre-norm blocks,
    rotary embeddings as rotations of the pairs (j, j + hd/2), explicit softmax attention with
    every query head reading KV head h // (heads / kv_heads), padded keys excluded."""
    cfg = json.loads((folder / "config.json").read_text())
    ckpt = Checkpoint(folder)

    def t(name):
        return torch.from_numpy(ckpt.read(name + ".weight", np.float64))

    def bias(name):
        return (torch.from_numpy(ckpt.read(name + ".bias", np.float64))
                if name + ".bias" in ckpt else 0.0)

    if arch == "llada":
        layers, heads, kvh = cfg["n_layers"], cfg["n_heads"], cfg["n_kv_heads"]
        theta, eps, tie = cfg["rope_theta"], cfg["rms_norm_eps"], cfg["weight_tying"]
    else:
        layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
        kvh, theta, eps = cfg["num_key_value_heads"], cfg["rope_theta"], cfg["rms_norm_eps"]
        tie = cfg["tie_word_embeddings"]
    B, L = ids.shape
    keep = torch.ones(B, L, dtype=torch.bool) if keep is None else keep
    pos = (torch.arange(L)[None].expand(B, L) if arch == "llada"
           else (keep.long().cumsum(-1) - 1).clamp(min=0)).double()

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    n0 = _names(arch, 0)
    x = t(n0["emb"])[ids]
    d = x.shape[-1]
    hd = d // heads
    angle = pos[..., None] * theta ** (-2 * torch.arange(hd // 2).double() / hd)  # [B, L, hd/2]
    cos, sin = angle.cos()[:, :, None], angle.sin()[:, :, None]

    def rope(v):  # [B, L, h, hd]
        a, b = v[..., : hd // 2], v[..., hd // 2 :]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    kv_of = torch.arange(heads) // (heads // kvh)
    for i in range(layers):
        n = _names(arch, i)

        def lin(v, role, n=n):
            return v @ t(n[role]).T + bias(n[role])

        h = rms(x, t(n["attn_norm"]))
        q = rope(lin(h, "q").view(B, L, heads, hd))
        k = rope(lin(h, "k").view(B, L, kvh, hd))[:, :, kv_of]
        v = lin(h, "v").view(B, L, kvh, hd)[:, :, kv_of]
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
        a = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v).reshape(B, L, d)
        x = x + lin(a, "o")
        m = rms(x, t(n["mlp_norm"]))
        g = lin(m, "gate")
        x = x + lin(g / (1 + torch.exp(-g)) * lin(m, "up"), "down")
    x = rms(x, t(n0["norm"]))
    return x @ (t(n0["emb"]) if tie else t(n0["head"])).T


def _folder(tmp_path, arch, **kw):
    return write_dllm(tmp_path / arch, arch, **kw)


def _rel(a, b):
    return float((a.double() - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("code", ["missing", "raises"])
def test_native_loads_every_tensor_under_its_own_name(tmp_path, arch, code):
    folder = _folder(tmp_path, arch, code=code)
    model = load_model(folder)  # auto, code untrusted: native
    assert type(model).__name__ == {"llada": "LLaDA", "dream": "Dream"}[arch]
    ckpt = Checkpoint(folder)
    sd = model.state_dict()
    assert set(sd) == set(ckpt.names())
    for name, value in sd.items():
        assert value.dtype == torch.float32 and not value.is_meta
        assert torch.equal(value, torch.from_numpy(ckpt.read(name, np.float32)))
    bf16 = load_model(folder, dtype="bfloat16")  # the shards' own bits
    for name, value in bf16.state_dict().items():
        raw = ckpt.read(name).view(np.int16)
        assert value.dtype == torch.bfloat16
        assert torch.equal(value.view(torch.int16), torch.from_numpy(np.array(raw)))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tie", [False, True])
def test_native_forward_is_the_published_math(tmp_path, arch, tie):
    kw = {"tie": tie, **({"bias": True} if arch == "llada" else {})}
    folder = _folder(tmp_path, arch, **kw)
    model = load_model(folder)
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, 100, size=(3, 12)))
    keep = torch.ones(3, 12, dtype=torch.bool)
    keep[1, 7:] = False  # right padding
    keep[2, :3] = False  # left padding
    with torch.inference_mode():
        plain = model(input_ids=ids).logits
        padded = model(input_ids=ids, attention_mask=keep.long()).logits
    assert _rel(plain, reference_logits(arch, folder, ids)) < 1e-5
    ref = reference_logits(arch, folder, ids, keep)
    assert _rel(padded[keep], ref[keep]) < 1e-5
    # padding never reaches the real tokens: sequence 1 alone gives the same logits
    with torch.inference_mode():
        alone = model(input_ids=ids[1:2, :7]).logits[0]
    torch.testing.assert_close(padded[1, :7], alone, rtol=1e-5, atol=1e-5)
    assert logits_shift(model) == (1 if arch == "dream" else 0)


@pytest.mark.parametrize("arch", ARCHS)
def test_trusted_code_that_fails_falls_back_to_native_and_says_so(tmp_path, arch, caplog):
    folder = _folder(tmp_path, arch, code="raises")
    with caplog.at_level(logging.WARNING, logger="qdtk.torch.models"):
        model = load_model(folder, trust_remote_code=True)
    assert type(model).__module__ == f"qdtk.torch.models.{arch}"
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert str(folder) in warning and "RuntimeError" in warning and "native" in warning
    with pytest.raises(QdtkError) as e:
        load_model(folder, trust_remote_code=True, model_code="remote")
    msg = str(e.value)
    assert "\n" not in msg and str(folder) in msg and "--model-code native" in msg
    assert "written for another transformers release" in msg and "transformers 4.46" in msg


def test_model_code_errors(tmp_path, tiny_bert):
    with pytest.raises(QdtkError, match="no native forward for model_type 'bert'"):
        load_model(tiny_bert, model_code="native")
    folder = _folder(tmp_path, "llada")
    with pytest.raises(QdtkError, match="needs its own code: pass --trust-remote-code"):
        load_model(folder, model_code="remote")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "n_layers": 3}))
    with pytest.raises(QdtkError, match=r"has no tensor 'model.transformer.blocks.2"):
        load_model(folder)


def test_cli_names_the_failing_code_in_one_line(tmp_path):
    folder = _folder(tmp_path, "dream", code="raises")
    r = CliRunner().invoke(cli, ["eval", str(folder), str(folder), "--n", "2", "-L", "8",
                                 "--trust-remote-code", "--model-code", "remote"])
    assert r.exit_code == 1 and r.exception is not None and "Traceback" not in r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "--model-code native" in lines[0]


def test_eval_reads_dreams_masked_tokens_from_the_shifted_logits(tiny_dream):
    from qdtk.torch.evaluate import Windows, load_for_eval, model_outputs

    lm = load_for_eval(tiny_dream)
    ids = np.random.default_rng(3).integers(0, 290, size=(2, 10))
    masked = np.zeros((2, 10), bool)
    masked[:, [2, 5, 9]] = True
    out = model_outputs(lm, Windows(ids, np.zeros_like(masked)), {0.5: masked}, 301)
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.from_numpy(ids).masked_fill(
            torch.from_numpy(masked), 301)).logits.double()
    logp = logits.log_softmax(-1)
    t = torch.from_numpy(ids)
    m = torch.from_numpy(masked)
    shifted = -logp[:, :-1].gather(-1, t[:, 1:, None])[..., 0][m[:, 1:]]
    unshifted = -logp.gather(-1, t[..., None])[..., 0][m]
    np.testing.assert_allclose(out["masked_nll"][0.5], shifted.numpy(), rtol=1e-5)
    assert not np.allclose(out["masked_nll"][0.5], unshifted.numpy(), rtol=1e-3)


def test_attention_mask_in_the_form_each_model_takes():
    from qdtk.torch.models import attention_mask_for

    class DreamModel(torch.nn.Module):  # the name of Dream's own class
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1, dtype=torch.bfloat16))

    keep = torch.tensor([[True, True, True], [True, True, False]])
    assert attention_mask_for(DreamModel(), torch.ones(2, 3, dtype=torch.bool)) is None
    bias = attention_mask_for(DreamModel(), keep)
    assert bias.shape == (2, 1, 1, 3) and bias.dtype == torch.bfloat16
    assert bias[1, 0, 0, 2] == torch.finfo(torch.bfloat16).min and (bias[0] == 0).all()
    plain = attention_mask_for(torch.nn.Linear(1, 1), keep)
    assert plain.dtype == torch.long and torch.equal(plain, keep.long())
