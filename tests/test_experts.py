"""Mixture-of-experts layers (qdtk/torch/experts.py): every expert matrix is a layer with the H of
the tokens routed to it, on a tiny Qwen3-MoE whose experts transformers runs fused."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from click.testing import CliRunner  # noqa: E402

import qdtk.torch.experts as ex  # noqa: E402
from qdtk.cli.main import cli  # noqa: E402
from qdtk.errors import QdtkError  # noqa: E402
from qdtk.formats.checkpoint import Checkpoint  # noqa: E402
from qdtk.torch import capture as cap  # noqa: E402
from tests.test_capture import _capture_all, _masked, _rel, _session  # noqa: E402


def routed_reference(model, ids, att, power=0):
    """Per expert of every MoE layer, (2 / sum c) sum c x x^T of its routed tokens and of its
    down projection's input with c = w^power (w: the token's routing weight for the expert),
    from one ordinary forward: the router's choices and weights and the experts' input taken
    by hooks, the expert MLP written out."""
    keep = torch.as_tensor(att).reshape(-1)
    out, handles = {}, []
    for name, mod in model.named_modules():
        if not ex.is_fused_experts(mod):
            continue

        def hook(m, args, output, name=name):
            x, index, weights = args[0][keep].double(), args[1][keep], args[2][keep].double()
            for e in range(m.gate_up_proj.shape[0]):
                rows = (index == e).any(-1)
                X, c = x[rows], (weights * (index == e))[rows].sum(-1) ** power  # [T_e]
                if len(X) == 0:
                    continue
                gu = m.gate_up_proj[e].double()
                g, u = X @ gu[: gu.shape[0] // 2].T, X @ gu[gu.shape[0] // 2 :].T
                A = g / (1 + torch.exp(-g)) * u
                out[f"{name}.{e}.gate_proj"] = (2 / c.sum() * (X.T * c) @ X, len(X))
                out[f"{name}.{e}.down_proj"] = (2 / c.sum() * (A.T * c) @ A, len(X))

        handles.append(mod.register_forward_hook(hook))
    with torch.inference_mode():
        model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(att).long())
    for h in handles:
        h.remove()
    return out


def test_each_expert_gets_the_H_of_its_routed_tokens(tiny_moe):
    model = cap.load_model(tiny_moe)
    b = _masked(S=6, L=16, real=11)
    got = _capture_all(_session(model, b.ids, b.attention, tiny_moe, chunk_size=4))
    ref = routed_reference(model, b.ids, b.attention)
    experts = {k: s for k, s in got.items() if ".experts." in k}
    assert set(experts) == set(ref) and len(ref) == 2 * 4 * 2  # layers x experts x inputs
    for key, s in experts.items():
        H, T = ref[key]
        assert s.tokens == T and s.fallback is None
        assert _rel(s.H.astype(np.float64), H.numpy()) < 1e-6
    e0 = "model.layers.0.mlp.experts.0"
    assert got[e0 + ".gate_proj"].members == [e0 + ".gate_proj.weight", e0 + ".up_proj.weight"]
    routed = sum(s.tokens for k, s in experts.items() if k.endswith("gate_proj")) // 2
    assert routed == 2 * b.tokens  # top 2: every token reaches two experts in each layer


@pytest.mark.parametrize(("weighting", "power"), [("weight", 1), ("weight2", 2)])
def test_routing_weights_weight_each_experts_H(tiny_moe, weighting, power):
    model = cap.load_model(tiny_moe)
    b = _masked(S=6, L=16, real=11)
    got = _capture_all(_session(model, b.ids, b.attention, tiny_moe, chunk_size=4,
                                expert_weighting=weighting))
    ref = routed_reference(model, b.ids, b.attention, power)
    plain = routed_reference(model, b.ids, b.attention)
    for key, (H, T) in ref.items():
        assert got[key].tokens == T and got[key].fallback is None
        assert _rel(got[key].H.astype(np.float64), H.numpy()) < 1e-6
        assert _rel(H.numpy(), plain[key][0].numpy()) > 1e-3  # the weights do matter
    with pytest.raises(QdtkError, match="unknown expert weighting"):
        _session(model, b.ids, b.attention, tiny_moe, expert_weighting="w")


def test_an_expert_short_of_tokens_takes_the_stated_fallback(tiny_moe, monkeypatch):
    model = cap.load_model(tiny_moe)
    b = _masked(S=4, L=16)
    first = _capture_all(_session(model, b.ids, b.attention, tiny_moe, chunk_size=4))
    counts = {k: s.tokens for k, s in first.items() if k.endswith("experts.0.gate_proj")
              or ".experts." in k and k.endswith("gate_proj")}
    starved = min(counts, key=counts.get)
    monkeypatch.setattr(ex, "MIN_EXPERT_TOKENS", counts[starved] + 1)
    got = _capture_all(_session(model, b.ids, b.attention, tiny_moe, chunk_size=4))
    layer = starved.rsplit(".", 2)[0]  # "....experts"
    low = {k for k, t in counts.items() if t <= counts[starved]}
    for key in low:
        assert got[key].fallback == "all tokens"
        assert got[key.replace("gate_proj", "down_proj")].fallback == "pooled experts"
    # gate/up: the layer's input over every token, which the router sees
    everyone = routed_reference(model, b.ids, b.attention)
    X_all = sum(everyone[k][0] * everyone[k][1] for k in everyone
                if k.startswith(layer) and k.endswith("gate_proj")) / 2  # each token twice
    assert _rel(got[starved].H.astype(np.float64), (X_all * 2 / (2 * b.tokens)).numpy()) < 1e-6


def test_routers_stay_in_full_precision_and_experts_are_layers(tiny_moe):
    ckpt = Checkpoint(tiny_moe)
    names = ckpt.linear_names()
    assert ckpt.experts() == {"model.layers.0.mlp": 4, "model.layers.1.mlp": 4}
    assert ckpt.routers() == {"model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"}
    assert not ckpt.routers() & set(names)
    assert sum(".experts." in n for n in names) == 2 * 4 * 3
    r = CliRunner().invoke(cli, ["inspect", str(tiny_moe)])
    assert r.exit_code == 0, r.output
    assert ("Mixture of experts: 2 layers of 4 experts; 24 expert matrices among the Linears; "
            "2 routers kept in full precision") in r.output


def test_output_change_of_an_expert_slices_the_fused_parameter(tiny_moe):
    from qdtk.torch.evaluate import output_change_fn

    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    W = Checkpoint(tiny_moe).read(name, np.float32)
    change = output_change_fn(tiny_moe, n=2, L=16)
    assert change(name, W) == 0
    assert 0 < change(name, W + 0.01 * np.sign(W)) < change(name, W + 0.1 * np.sign(W))
    assert change(name, W) == 0  # restored


def test_run_end_to_end_replaces_every_expert(tiny_moe, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["run", str(tiny_moe), "--out", str(out), "-n", "4", "-L",
                                 "24", "--eval-n", "2", "--eval-length", "16", "--iters", "2",
                                 "--unpack", "float32"])
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())
    assert s["layers"] == 2 * (4 + 4 * 3)
    orig, dense = Checkpoint(tiny_moe), Checkpoint(out / "dense")
    packed = Checkpoint(out / "packed")
    report = json.loads((out / "quant" / "report.json").read_text())
    for name in orig.linear_names():
        if ".experts." in name:
            assert name in report["layers"]
            assert name not in packed and name.removesuffix(".weight") + ".planes" in packed
            assert not np.array_equal(orig.read(name, np.float32), dense.read(name, np.float32))
    for name in orig.routers():
        assert np.array_equal(orig.read(name, np.float32), dense.read(name, np.float32))


def test_statistics_of_a_dense_model_do_not_fit_an_moe(tiny_moe, tiny_llama, tmp_path):
    from qdtk.math.mcs import MaskOptions
    from qdtk.quantize import quantize_model
    from qdtk.torch.capture import CaptureOptions, capture

    stats = capture(tiny_llama, None, tmp_path / "stats",
                    CaptureOptions(n=2, L=16, mask=MaskOptions(mask=False)), progress=False)
    with pytest.raises(QdtkError, match="no statistic for .*experts.* captured from a model "
                       "without these experts"):
        quantize_model(tiny_moe, stats, tmp_path / "q", {"method": "rtn", "bits": 2},
                       progress=False)


# ----------------------------------------------------------------------------- fused 3-D tensors


def fused_model(folder, rng, E=3, d=40, inter=136):
    """A torch-free checkpoint with DiffusionGemma's fused experts: gate_up_proj [E, 2I, d],
    down_proj [E, d, I] (a ragged last 128-group), a router and a dense Linear."""
    from tests.test_pack import synthetic_model

    synthetic_model(folder, rng, {"model.layers.0.self_attn.q_proj.weight": (d, d)})
    from qdtk.formats.checkpoint import read_safetensors, write_safetensors

    tensors, meta = read_safetensors(folder / "model.safetensors")
    p = "model.layers.0.experts"
    tensors[p + ".gate_up_proj"] = rng.standard_normal((E, 2 * inter, d)).astype(np.float32)
    tensors[p + ".down_proj"] = rng.standard_normal((E, d, inter)).astype(np.float32)
    tensors["model.layers.0.router.proj.weight"] = rng.standard_normal((E, d)).astype(np.float32)
    write_safetensors(folder / "model.safetensors", tensors, meta)
    return folder


def test_a_fused_tensor_reads_as_one_matrix_per_expert(rng, tmp_path):
    ckpt = Checkpoint(fused_model(tmp_path / "m", rng))
    p = "model.layers.0.experts"
    gu, down = ckpt.read(p + ".gate_up_proj"), ckpt.read(p + ".down_proj")
    names = ckpt.linear_names()
    assert p + ".gate_up_proj" not in names and p + ".down_proj" not in names
    assert sorted(n for n in names if ".experts." in n) == sorted(
        ex.expert_weight(p, e, k) for e in range(3) for k in ex.PROJ)
    for e in range(3):
        assert np.array_equal(ckpt.read(ex.expert_weight(p, e, "gate_proj")), gu[e, :136])
        assert np.array_equal(ckpt.read(ex.expert_weight(p, e, "up_proj")), gu[e, 136:])
        assert np.array_equal(ckpt.read(ex.expert_weight(p, e, "down_proj")), down[e])
    assert ckpt.experts() == {"model.layers.0": 3}
    assert ckpt.routers() == {"model.layers.0.router.proj.weight"}
    assert ckpt.names() == list(ckpt.tensors)  # the stored tensors only
    with pytest.raises(QdtkError, match="2 of the 6 expert matrices of the fused tensor"):
        ckpt.covered([ex.expert_weight(p, 0, "gate_proj"), ex.expert_weight(p, 0, "up_proj")])


def test_fused_tensors_round_trip_through_pack_bit_for_bit(rng, tmp_path):
    from qdtk.formats.packed import read_quantization_config
    from qdtk.pack import pack_checkpoint, unpack_checkpoint
    from tests.test_pack import bits_of, write_quant

    model = fused_model(tmp_path / "m", rng)
    layers = write_quant(model, tmp_path / "quant", rng)
    packed = pack_checkpoint(tmp_path / "quant", tmp_path / "packed")
    p = "model.layers.0.experts"
    stored = Checkpoint(packed)
    assert p + ".gate_up_proj" not in stored.names() and p + ".0.up_proj.planes" in stored
    qc = read_quantization_config(packed)
    assert qc["fused"][p + ".down_proj"] == {
        "shape": [3, 40, 136], "dtype": "F32", "modules": [f"{p}.{e}.down_proj" for e in range(3)]}
    assert qc["format"] == "qdtk-bcq/2"  # a /1 reader would miss the fused tensors
    dense = Checkpoint(unpack_checkpoint(packed, tmp_path / "dense", dtype="float32"))
    assert set(dense.names()) == set(Checkpoint(model).names())
    gu = dense.read(p + ".gate_up_proj")
    for e in range(3):
        What = np.concatenate([layers[ex.expert_weight(p, e, k)].dequantize()
                               for k in ("gate_proj", "up_proj")])
        assert np.array_equal(bits_of(gu[e]), bits_of(What))
        assert np.array_equal(bits_of(dense.read(p + ".down_proj")[e]),
                              bits_of(layers[ex.expert_weight(p, e, "down_proj")].dequantize()))
    from tests.test_pack import _edit_config

    _edit_config(packed, lambda qc: qc.update(format="qdtk-bcq/1"))
    with pytest.raises(QdtkError, match="fused expert tensors, which qdtk-bcq/1 cannot record"):
        read_quantization_config(packed)
    r = CliRunner().invoke(cli, ["inspect", str(model)])
    assert r.exit_code == 0, r.output
    assert ("Mixture of experts: 1 layers of 3 experts; 9 expert matrices among the Linears; "
            "1 routers kept in full precision") in r.output
    from qdtk.cli.inspect_cmd import describe
    from qdtk.formats.bits import bcq_bits, group_widths

    ckpt = Checkpoint(model)
    d = describe(str(model))  # the fused tensors count as their matrices, not also as kept
    linears = ckpt.linear_names()
    kept = sum(ckpt.info(n).nbytes for n in ckpt.names()
               if n not in linears and n not in ckpt.fused)
    q_bits = sum(bcq_bits(*ckpt.info(n).shape, [2] * len(group_widths(ckpt.info(n).shape[1])))
                 for n in linears)
    assert d["size_at_2bit_bytes"] == kept + q_bits // 8


# ----------------------------------------------------------------------------- DiffusionGemma


def _decoder_name(name: str) -> str:
    """The checkpoint name of an encoder module (its weights are the decoder's)."""
    return name.replace("model.encoder.language_model.layers", "model.decoder.layers")


def test_diffusion_gemma_block_by_block_H_equals_the_full_forward(tiny_diffusion_gemma):
    """Encoder layer b on the prompt and decoder layer b on the noised canvas (reading the
    encoder's cache), each with its own sliding or full attention arguments: every dense
    Linear's H and every expert's routed H equals the one from hooks on one whole forward."""
    from qdtk.torch.models import forward_inputs, prompt_length

    model = cap.load_model(tiny_diffusion_gemma)
    stacks = [n for n, _ in cap.find_stacks(model)]
    assert stacks == ["model.encoder.language_model.layers", "model.decoder.layers"]
    L = 24
    assert prompt_length(model, L) == 16  # canvas 8
    ids = np.random.default_rng(0).integers(5, 100, (5, L))
    att = np.ones_like(ids, bool)
    session = _session(model, ids, att, tiny_diffusion_gemma, chunk_size=2)
    assert session.stack == "model.decoder.layers"
    got = _capture_all(session)

    sums, handles = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name and "vision" not in name:
            key = _decoder_name(name) + ".weight"

            def hook(m, args, out, key=key):
                X = args[0].reshape(-1, args[0].shape[-1]).double()
                S, T = sums.get(key, (0, 0))
                sums[key] = (S + X.T @ X, T + len(X))
            handles.append(mod.register_forward_hook(hook))
    ref = {}
    for name, mod in model.named_modules():
        if ex.is_fused_experts(mod):  # routed tokens of both the encoder's and decoder's call
            key = _decoder_name(name)

            def ehook(m, args, output, key=key):
                x, index = args[0].double(), args[1]
                for e in range(m.gate_up_proj.shape[0]):
                    X = x[(index == e).any(-1)]
                    gu = m.gate_up_proj[e].double()
                    g, u = X @ gu[: gu.shape[0] // 2].T, X @ gu[gu.shape[0] // 2:].T
                    A = torch.nn.functional.gelu(g, approximate="tanh") * u  # gelu_pytorch_tanh
                    for k, Z in (("gate_proj", X), ("down_proj", A)):
                        S, T = ref.get(f"{key}.{e}.{k}", (0, 0))
                        ref[f"{key}.{e}.{k}"] = (S + Z.T @ Z, T + len(Z))
            handles.append(mod.register_forward_hook(ehook))
    with torch.inference_mode():
        model(**forward_inputs(model, torch.as_tensor(ids)))
    for h in handles:
        h.remove()
    dense = {m: s for s in got.values() if ".experts." not in s.key for m in s.members}
    assert set(dense) == set(sums) and len(sums) == 8 + 7  # the full layer has no v_proj
    for name, (S, T) in sums.items():
        assert dense[name].tokens == T == 5 * L  # prompt and canvas tokens
        assert _rel(dense[name].H.astype(np.float64), (2 / T * S).numpy()) < 1e-6, name
    experts = {k: s for k, s in got.items() if ".experts." in k}
    assert set(experts) == set(ref) and len(ref) == 2 * 4 * 2
    for key, (S, T) in ref.items():
        assert experts[key].tokens == T and experts[key].fallback is None
        assert _rel(experts[key].H.astype(np.float64), (2 / T * S).numpy()) < 1e-6, key
    assert got["model.decoder.layers.0.experts.0.gate_proj"].members == [
        "model.decoder.layers.0.experts.0.gate_proj.weight",
        "model.decoder.layers.0.experts.0.up_proj.weight"]


def test_diffusion_gemma_capture_holds_no_encoder_cache_between_blocks(tiny_diffusion_gemma):
    """The encoder's cache is streamed: empty after the recorded forwards and after every
    block (encoder layer b writes its layer, decoder layer b reads it, then it is dropped); a
    rerun of a block (the sequential order's steps) gives the same H."""
    model = cap.load_model(tiny_diffusion_gemma)
    ids = np.random.default_rng(0).integers(5, 100, (4, 24))
    session = _session(model, ids, np.ones_like(ids, bool), tiny_diffusion_gemma, chunk_size=2)
    caches = [cap._caches(session._recorded[c]) for c in range(len(session.chunks))]
    assert [len(cs) for cs in caches] == [1, 1]

    def held():
        return sum(layer.keys is not None for cs in caches for cache in cs
                   for layer in cache.layers)

    assert held() == 0
    first = {s.key: s.H for s in session.run_block(0, advance=False)}
    assert held() == 0
    again = {s.key: s.H for s in session.run_block(0)}
    assert held() == 0 and set(first) == set(again)
    for key, H in first.items():
        assert np.array_equal(H, again[key]), key


def test_run_end_to_end_on_diffusion_gemma_replaces_every_fused_expert(tiny_diffusion_gemma,
                                                                      tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["run", str(tiny_diffusion_gemma), "--out", str(out), "-n", "4",
                                 "-L", "24", "--eval-n", "2", "--eval-length", "16",
                                 "--iters", "2", "--unpack", "float32"])
    assert r.exit_code == 0, r.output
    orig, dense = Checkpoint(tiny_diffusion_gemma), Checkpoint(out / "dense")
    report = json.loads((out / "quant" / "report.json").read_text())
    assert set(dense.names()) == set(orig.names())
    assert len(orig.fused) == 2 * 2
    for fused, parts in orig.fused.items():  # every expert matrix of every fused tensor
        assert fused not in Checkpoint(out / "packed").names()
        for name in parts:
            assert name in report["layers"]
            assert not np.array_equal(orig.read(name, np.float32), dense.read(name, np.float32))
    kept = orig.routers() | {n for n in orig.names() if "vision" in n}
    assert len(kept) == 2 + 16  # routers; the vision tower and its projection
    for name in kept:
        assert np.array_equal(orig.read(name, np.float32), dense.read(name, np.float32))
    r = CliRunner().invoke(cli, ["inspect", str(out / "packed")])
    assert r.exit_code == 0, r.output
    assert ("Mixture of experts: 24 of them are expert matrices, stacked back into 4 fused "
            "3-D tensors by unpack") in r.output
    stats = json.loads((out / "stats" / "manifest.json").read_text())
    assert stats["options"]["prompt_tokens"] == 16 and stats["options"]["noise"] == "uniform"
    ev = json.loads((out / "eval.json").read_text())
    assert "masked_ce@0.5" in json.dumps(ev)


def test_generate_on_diffusion_gemma_runs_its_own_sampler(tiny_diffusion_gemma, tmp_path):
    from transformers import DiffusionGemmaForBlockDiffusion

    from qdtk.torch.generate import GenerateOptions, generate
    from qdtk.torch.models import load_tokenizer

    opts = GenerateOptions(gen_length=16, block_length=16, steps=8, seed=3)
    got = generate(tiny_diffusion_gemma, "masked canvas", opts, progress=False)
    assert got["sampler"].startswith("DiffusionGemmaForBlockDiffusion.generate")
    assert len(got["tokens"]) == 16 and got["options"]["mask_token_id"] is None
    assert generate(tiny_diffusion_gemma, "masked canvas", opts, progress=False)["tokens"] == \
        got["tokens"]  # seeded
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(tiny_diffusion_gemma).eval()
    ids = load_tokenizer(tiny_diffusion_gemma)("masked canvas")["input_ids"]
    torch.manual_seed(3)
    ref = model.generate(torch.tensor([ids]), max_new_tokens=16, max_denoising_steps=4)
    assert ref.sequences[0, len(ids):len(ids) + 16].tolist() == got["tokens"]


def test_an_expert_no_token_reaches_takes_the_fallback_and_is_reported(tiny_moe, tmp_path,
                                                                       monkeypatch):
    """One calibration token reaches 2 of the 4 experts of each layer (top 2): the other two
    have no token at all, take the fallback, and capture says so; quantize then runs."""
    from qdtk.quantize import quantize_model

    monkeypatch.setattr(ex, "MIN_EXPERT_TOKENS", 1)  # the one token suffices for the others
    calib = tmp_path / "one.txt"
    calib.write_text("a")
    stats = tmp_path / "stats"
    r = CliRunner().invoke(cli, ["capture", str(tiny_moe), "--calib", str(calib), "-n", "1",
                                 "-L", "1", "--out", str(stats)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((stats / "manifest.json").read_text())
    inputs = {i["key"]: i for b in manifest["blocks"] for i in b["inputs"]}
    for layer in (0, 1):
        p = f"model.layers.{layer}.mlp.experts"
        tokens = [inputs[f"{p}.{e}.gate_proj"]["tokens"] for e in range(4)]
        assert sorted(tokens) == [0, 0, 1, 1]
        for e in range(4):
            gate, down = inputs[f"{p}.{e}.gate_proj"], inputs[f"{p}.{e}.down_proj"]
            assert gate.get("fallback") == ("all tokens" if tokens[e] == 0 else None)
            assert down.get("fallback") == ("pooled experts" if tokens[e] == 0 else None)
    assert "8 expert inputs were reached by fewer than 1 calibration tokens" in r.output
    assert "(0 tokens; H from all tokens)" in r.output
    quantize_model(tiny_moe, stats, tmp_path / "q", {"method": "rtn", "bits": 2},
                   progress=False)


def test_sequential_order_sets_expert_rows_of_the_shared_fused_parameter(tiny_diffusion_gemma):
    model = cap.load_model(tiny_diffusion_gemma)
    ids = np.random.default_rng(0).integers(5, 100, (2, 24))
    session = _session(model, ids, np.ones_like(ids, bool), tiny_diffusion_gemma)
    p = "model.decoder.layers.1.experts"
    assert {ex.expert_weight(p, e, k) for e in range(4) for k in ex.PROJ} <= set(
        session.weights(1))
    enc = model.model.encoder.language_model.layers[1].experts
    before = enc.gate_up_proj.detach().clone()
    up = np.full((48, 32), 0.5, np.float32)
    session.set_weights(1, {ex.expert_weight(p, 2, "up_proj"): up})
    after = enc.gate_up_proj.detach()  # the encoder's: tied to the decoder's
    assert torch.equal(after[2, 48:], torch.from_numpy(up))
    assert torch.equal(after[2, :48], before[2, :48]) and torch.equal(after[:2], before[:2])
    with pytest.raises(QdtkError, match="new weight has shape"):
        session.set_weights(1, {ex.expert_weight(p, 2, "down_proj"): up})


def test_sequential_run_quantizes_every_expert(tiny_moe, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["run", str(tiny_moe), "--out", str(out), "--sequential",
                                 "--budget-scope", "layer", "-n", "4", "-L", "24", "--eval-n",
                                 "2", "--eval-length", "16", "--iters", "2"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "quant" / "report.json").read_text())
    assert sum(".experts." in n for n in report["layers"]) == 2 * 4 * 3


def test_statistics_of_a_dense_model_do_not_fit_fused_experts(tiny_diffusion_gemma, tiny_llama,
                                                              tmp_path):
    from qdtk.math.mcs import MaskOptions
    from qdtk.quantize import quantize_model
    from qdtk.torch.capture import CaptureOptions, capture

    stats = capture(tiny_llama, None, tmp_path / "stats",
                    CaptureOptions(n=2, L=16, mask=MaskOptions(mask=False)), progress=False)
    with pytest.raises(QdtkError, match="no statistic for .*captured from a model without "
                       "these experts"):
        quantize_model(tiny_diffusion_gemma, stats, tmp_path / "q",
                       {"method": "rtn", "bits": 2}, progress=False)


# ----------------------------------------------------------------------------- list-of-experts


class _ListMoE(torch.nn.Module):
    """OLMoE-style remote code: a router and a list of expert MLPs, each called on the tokens
    routed to it (2-D inputs), no transformers MoE class."""

    def __init__(self, d=16, E=4, k=2):
        super().__init__()
        self.k = k
        self.router = torch.nn.Linear(d, E, bias=False)
        self.experts = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(d, 24), torch.nn.GELU(), torch.nn.Linear(24, d))
            for _ in range(E))

    def forward(self, h):
        x = h.reshape(-1, h.shape[-1])
        w, idx = self.router(x).softmax(-1).topk(self.k, dim=-1)
        out = torch.zeros_like(x)
        for e, mlp in enumerate(self.experts):
            rows = (idx == e).any(-1).nonzero()[:, 0]
            if rows.numel():
                out[rows] += mlp(x[rows]) * (w * (idx == e))[rows].sum(-1, keepdim=True)
        return h + out.reshape(h.shape)


class _ListMoEModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(100, 16)
        self.layers = torch.nn.ModuleList(_ListMoE() for _ in range(2))

    def forward(self, input_ids, attention_mask=None, **kwargs):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return h


def test_experts_held_as_a_list_of_modules_get_their_routed_tokens():
    model = _ListMoEModel().eval()
    ids = np.random.default_rng(0).integers(0, 100, (3, 10))
    got = _capture_all(cap.BlockSession(model, ids, np.ones_like(ids, bool), chunk_size=2))
    ref, handles = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".experts." in name:
            def hook(m, args, out, key=name):
                X = args[0].double()
                S, T = ref.get(key, (0, 0))
                ref[key] = (S + X.T @ X, T + len(X))
            handles.append(mod.register_forward_hook(hook))
    with torch.inference_mode():
        model(torch.as_tensor(ids))
    for h in handles:
        h.remove()
    assert len(ref) == 2 * 4 * 2
    routed = 0
    for key, (S, T) in ref.items():
        assert got[key].tokens == T < 30
        assert _rel(got[key].H.astype(np.float64), (2 / T * S).numpy()) < 1e-6, key
        routed += T if key.endswith(".0") else 0
    assert routed == 2 * 2 * 30  # top 2 of every token, in each of the 2 layers
    padded = np.ones_like(ids, bool)
    padded[1, 7:] = False
    with pytest.raises(QdtkError, match="holds only the tokens routed to it"):
        _capture_all(cap.BlockSession(model, ids, padded))


# ----------------------------------------------------------------------------- packed experts


def _numbers(tree, path=""):
    """{path: number} of every number in a JSON document."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) \
        if isinstance(tree, list) else None
    if items is not None:
        return {k: v for key, sub in items for k, v in _numbers(sub, f"{path}/{key}").items()}
    return {path: tree} if isinstance(tree, int | float) and not isinstance(tree, bool) else {}


@pytest.mark.parametrize("fixture", ["tiny_moe", "tiny_diffusion_gemma"])
def test_a_packed_moe_evaluates_and_generates_as_its_unpacked_folder(fixture, request, tmp_path):
    """Every expert matrix packed (DiffusionGemma: from fused 3-D tensors): `qdtk eval` and
    `qdtk generate` on the packed folder, run with packed experts, give the unpacked folder's
    metrics (to 4 digits) and tokens."""
    from qdtk.pack import pack_checkpoint, unpack_checkpoint
    from qdtk.torch.models import load_model
    from qdtk.torch.nn.experts import BCQExperts
    from tests.test_pack import write_quant

    model_dir = request.getfixturevalue(fixture)
    write_quant(model_dir, tmp_path / "quant", np.random.default_rng(1))
    packed = pack_checkpoint(tmp_path / "quant", tmp_path / "packed", model_dir)
    dense = unpack_checkpoint(packed, tmp_path / "dense", dtype="float32")
    if fixture == "tiny_diffusion_gemma" or ex.is_fused_experts(
            load_model(model_dir).model.layers[0].mlp.experts):  # transformers 5
        assert sum(isinstance(m, BCQExperts) for m in load_model(packed).modules()) == 2

    def run(*args):
        r = CliRunner().invoke(cli, [*args, "--json"])
        assert r.exit_code == 0, r.output
        return json.loads(r.output[r.output.index("{"):])

    fast = ["--n", "2", "-L", "24", "--batch", "2", "--text", "builtin:pydoc"]
    want = _numbers(run("eval", str(model_dir), str(dense), *fast)["sources"])
    got = _numbers(run("eval", str(model_dir), str(packed), *fast)["sources"])
    assert set(got) == set(want) and len(want) > 2
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    if fixture == "tiny_diffusion_gemma":  # tiny_moe is causal: no masked-diffusion sampler
        args = ["--prompt", "packed experts", "--gen-length", "16", "--steps", "8"]
        # (--block-length does not apply to its own sampler: the default 32 is not checked)
        a, b = run("generate", str(dense), *args), run("generate", str(packed), *args)
        assert a["tokens"] == b["tokens"] and len(a["tokens"]) == 16


def test_fused_experts_run_packed_only_whole(tiny_moe):
    """A runtime-fused experts module is replaced only when the checkpoint packs every one of
    its matrices with the model's shapes; otherwise one clear error, before any weight."""
    from qdtk.torch.models import load_model
    from qdtk.torch.nn.experts import BCQExperts
    from qdtk.torch.nn.hf import replace_modules

    model = load_model(tiny_moe)
    p = "model.layers.0.mlp.experts"
    if not ex.is_fused_experts(model.get_submodule(p)):
        pytest.skip("this transformers runs the experts as Linears")
    orders = np.ones(1, np.uint8)
    whole = {f"{p}.{e}.{k}": ((48, 32) if k != "down_proj" else (32, 48), orders, None)
             for e in range(4) for k in ex.PROJ}
    with pytest.raises(QdtkError, match="packs 11 of its 12 expert matrices"):
        replace_modules(model, {k: v for k, v in whole.items() if k != f"{p}.3.up_proj"})
    with pytest.raises(QdtkError, match=r"experts\.2\.down_proj: the model's expert matrix is "
                       "32 x 48, the checkpoint's 48 x 32"):
        replace_modules(model, whole | {f"{p}.2.down_proj": ((48, 32), orders, None)})
    assert ex.is_fused_experts(model.get_submodule(p))  # nothing replaced
    replace_modules(model, whole)
    assert isinstance(model.get_submodule(p), BCQExperts)
    assert sorted(k for k in model.state_dict() if k.startswith(p + ".1.")) == sorted(
        f"{p}.1.{k}.{f}" for k in ex.PROJ for f in ("orders", "planes", "row_scale",
                                                     "col_scale"))
