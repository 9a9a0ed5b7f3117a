"""Layer errors and model comparisons: exact on identical models, sensitive to changes."""

import json

import numpy as np
import pytest

from qdtk.errors import QdtkError
from qdtk.torch.evaluate import (
    compare,
    compare_texts,
    default_sources,
    layer_errors,
    mask_positions,
    mean_cosine,
    mean_pool,
    proxy_error,
    token_windows,
)

pytest.importorskip("torch")

FAST = {"n": 3, "L": 24, "batch": 2}


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A 2-layer BertModel without a head (like MiniLM)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(1)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny_encoder")
    BertModel(config).eval().save_pretrained(path, safe_serialization=True)
    return path


def perturbed(src, dst, name_part, scale=0.05):
    """A copy of checkpoint src with noise added to every weight whose name contains name_part."""
    import shutil

    from qdtk.formats.checkpoint import read_safetensors, write_safetensors

    shutil.copytree(src, dst)
    tensors, meta = read_safetensors(dst / "model.safetensors")
    rng = np.random.default_rng(0)
    for k, v in tensors.items():
        if name_part in k and v.ndim == 2:
            tensors[k] = (v + scale * rng.standard_normal(v.shape)).astype(v.dtype)
    write_safetensors(dst / "model.safetensors", tensors, meta)
    return dst


def test_proxy_error_is_the_relative_output_error(rng):
    X = rng.standard_normal((500, 40)) @ rng.standard_normal((40, 40))
    W = rng.standard_normal((12, 40))
    What = W + 0.1 * rng.standard_normal(W.shape)
    want = np.sum((X @ W.T - X @ What.T) ** 2) / np.sum((X @ W.T) ** 2)
    assert proxy_error(W, What, X.T @ X) == pytest.approx(want, rel=1e-10)
    assert proxy_error(W, What, 7 * X.T @ X) == pytest.approx(want, rel=1e-10)
    assert proxy_error(W, W, X.T @ X) == 0


def test_mean_pool_ignores_padding_and_cosine_bounds(rng):
    H = rng.standard_normal((2, 5, 3))
    attention = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    E = mean_pool(H, attention)
    np.testing.assert_allclose(E[0], H[0, :3].mean(0))
    np.testing.assert_allclose(E[1], H[1].mean(0))
    assert mean_cosine(H, H) == pytest.approx(1, abs=1e-12)
    assert mean_cosine(H, -H) == pytest.approx(-1, abs=1e-12)
    assert mean_cosine(np.zeros((2, 3)), H[0, :2]) == 0


def test_windows_and_masks():
    text = "The quick brown fox jumps over the lazy dog. " * 20
    w = token_windows(text, None, 50, n=4, L=16)
    assert w.ids.shape == (4, 16) and w.ids.max() < 50 and not w.special.any()
    assert w.ids[0].tolist() == [b % 50 for b in text.encode()[:16]]
    special = np.zeros((4, 20), bool)
    special[:, 0] = special[:, -1] = True
    for r in (0.15, 0.5, 0.85):
        m = mask_positions(special, r, seed=3)
        np.testing.assert_array_equal(m, mask_positions(special, r, seed=3))
        assert not (m & special).any()
        np.testing.assert_array_equal(m.sum(1), max(1, round(r * 18)))
    assert not np.array_equal(mask_positions(special, 0.5, 3), mask_positions(special, 0.5, 4))
    with pytest.raises(QdtkError, match="too few"):
        token_windows("short", None, 50, n=2, L=16)


@pytest.mark.parametrize("fixture,kind,metric", [
    ("tiny_bert", "mlm", "masked_ce@0.5"),
    ("tiny_llama", "causal", "perplexity"),
    ("tiny_encoder", "encoder", None),
])
def test_identical_models_compare_exactly(request, tmp_path, fixture, kind, metric):
    path = request.getfixturevalue(fixture)
    result = compare(path, path, seed=1, **FAST)
    assert result["kind"] == kind
    metrics = result["metrics"]
    for key, m in metrics.items():
        if "ratio" in m:
            assert m["a"] == m["b"] and m["ratio"] == 1.0 and np.isfinite(m["a"]), key
    assert metrics["hidden_cosine"]["value"] == pytest.approx(1, abs=1e-9)
    assert metrics["embedding_cosine"]["value"] == pytest.approx(1, abs=1e-9)
    if kind == "mlm":
        assert {f"masked_ce@{r}" for r in (0.15, 0.5, 0.85)} <= set(metrics)
    assert (metric in metrics) if metric else set(metrics) == {"hidden_cosine",
                                                                 "embedding_cosine"}
    # a perturbed model B is measurably different, with the same masks for both
    other = perturbed(path, tmp_path / "b", "layers.1" if kind == "causal" else "layer.1")
    changed = compare(path, other, seed=1, **FAST)["metrics"]
    assert changed["hidden_cosine"]["value"] < 0.999
    if metric:
        assert changed[metric]["a"] == metrics[metric]["a"]
        assert changed[metric]["ratio"] != 1.0


def test_compare_rejects_bad_inputs(tiny_bert, tiny_llama, tmp_path):
    with pytest.raises(QdtkError, match="not found"):
        compare(tmp_path / "missing", tiny_bert, **FAST)
    with pytest.raises(QdtkError, match="cannot load the model"):
        compare(tmp_path, tiny_bert, **FAST)
    with pytest.raises(QdtkError, match="causal model"):
        compare(tiny_bert, tiny_llama, **FAST)
    with pytest.raises(QdtkError, match="exceed"):
        compare(tiny_bert, tiny_bert, n=1, L=1000)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_layer_errors_of_a_quantized_model(tmp_path, rng, method):
    """The baselines run as a `quantize` stage; layer_errors reads the stored solutions back."""
    from qdtk.formats.checkpoint import write_safetensors
    from qdtk.formats.stats import InputStat, StatsWriter
    from qdtk.math.baselines import SOLVERS, rtn
    from qdtk.quantize import quantize_model

    model = tmp_path / "model"
    model.mkdir()
    W = {f"b.0.{k}.weight": rng.standard_normal((8, 136)).astype(np.float32) for k in "qk"}
    write_safetensors(model / "model.safetensors", W)
    X = rng.standard_normal((300, 40)) @ rng.standard_normal((40, 136))
    H = (2 / 300 * X.T @ X).astype(np.float32)
    writer = StatsWriter(tmp_path / "stats", str(model), "fp", {})
    writer.write_block(0, "b.0", [InputStat("b.0.q", list(W), H, 300)])
    writer.finish()
    report = quantize_model(model, tmp_path / "stats", tmp_path / "quant",
                            {"method": method, "bits": 2}, solver=SOLVERS[method],
                            progress=False)
    errors = layer_errors(model, tmp_path / "quant", tmp_path / "stats")
    assert set(errors) == set(W)
    for k, w in W.items():
        assert report["layers"][k]["bits_per_weight"] == (2 * 8 * 136 + 32 * 8 * 2) / (8 * 136)
        assert errors[k] == pytest.approx(report["layers"][k]["proxy_error"], rel=1e-5)
        assert errors[k] <= proxy_error(w, rtn(w).dequantize(), H) * (1 + 1e-6)
        assert 0 < errors[k] < 1


def test_compare_texts_matches_compare_on_each_text(tiny_bert, tmp_path):
    """Each text's metrics are those of a comparison on that text alone."""
    other = perturbed(tiny_bert, tmp_path / "b", "layer.1")
    texts = {"fox": "The quick brown fox jumps over the lazy dog. " * 20,
             "zen": "Beautiful is better than ugly. Explicit is better than implicit. " * 20}
    both = compare_texts(tiny_bert, other, texts, seed=1, **FAST)
    assert list(both["sources"]) == ["fox", "zen"]
    for label, text in texts.items():
        assert both["sources"][label] == compare(tiny_bert, other, text, seed=1, **FAST)["metrics"]
    assert both["sources"]["fox"] != both["sources"]["zen"]
    with pytest.raises(QdtkError, match="no text source"):
        compare_texts(tiny_bert, other, {}, **FAST)


def test_cli_eval(tiny_bert, tmp_path):
    from click.testing import CliRunner

    from qdtk.cli.main import cli

    args = ["eval", str(tiny_bert), str(tiny_bert), "--n", "2", "-L", "16", "--batch", "2"]
    res = CliRunner().invoke(cli, [*args, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{"):])
    assert list(out["sources"]) == list(default_sources()) == [
        "builtin:pydoc", "builtin:docstrings", "builtin:manpages"]
    for metrics in out["sources"].values():
        assert metrics["masked_ce@0.15"]["ratio"] == 1.0
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0 and "masked-token CE, mask ratio 0.85" in res.output
    assert "cosine of mean-pooled embeddings" in res.output
    header = next(line for line in res.output.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", *default_sources()]  # one column per source
    text = tmp_path / "t.txt"
    text.write_text("some held-out words " * 10)
    res = CliRunner().invoke(cli, [*args, "--text", str(text), "--text", "builtin:pydoc"])
    assert res.exit_code == 0, res.output
    header = next(line for line in res.output.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", str(text), "builtin:pydoc"]
    res = CliRunner().invoke(cli, ["eval", str(tmp_path / "nope"), str(tiny_bert)])
    assert res.exit_code == 1 and "Error:" in res.output and "nope" in res.output
    res = CliRunner().invoke(cli, [*args, "--text", str(tmp_path / "missing.txt")])
    assert res.exit_code == 1 and "text source not found" in res.output
    res = CliRunner().invoke(cli, [*args, "--text", "builtin:novels"])
    assert res.exit_code == 1 and "builtin:manpages" in res.output
    res = CliRunner().invoke(cli, ["eval", "--help"])
    assert res.exit_code == 0 and "--trust-remote-code" in res.output
