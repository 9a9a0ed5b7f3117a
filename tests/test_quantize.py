"""The layer driver (compensation, errors, orders, bad input) and the `qdtk quantize` stage."""

import numpy as np
import pytest
from click.testing import CliRunner

from qdtk.bits import bcq_bits, group_slices
from qdtk.checkpoint import Checkpoint, CheckpointWriter
from qdtk.cli.main import cli
from qdtk.errors import QdtkError
from qdtk.hessian import prepare_hessian
from qdtk.quantize import (
    group_error,
    quadratic_form,
    quantize_layer,
    quantize_model,
    solve_daq,
    solve_group,
    sweep,
)
from qdtk.solution import REPORT, read_solution_block
from qdtk.stats import InputStat, StatsWriter


def correlated_H(rng, m, tokens=600):
    """H = (2/T) X^T X with X = Z A: strongly correlated inputs."""
    X = rng.standard_normal((tokens, m)) @ rng.standard_normal((m, m))
    return ((2.0 / tokens) * X.T @ X).astype(np.float32)


def output_error(W, What, H):
    D = np.asarray(W, np.float64) - What
    return float(np.einsum("ij,ij->", D @ np.asarray(H, np.float64), D))


def test_compensation_lowers_output_error(rng):
    n, m = 48, 300  # ragged last group of 44 columns
    W = rng.standard_normal((n, m)).astype(np.float32)
    H = correlated_H(rng, m)
    on, r_on = quantize_layer(W, H, [2, 2, 2])
    off, r_off = quantize_layer(W, H, [2, 2, 2], compensate=False)
    e_on, e_off = output_error(W, on.dequantize(), H), output_error(W, off.dequantize(), H)
    assert e_on < 0.9 * e_off
    # the report is the true output error of the stored solution, on the undamped H
    energy = output_error(W, 0 * W, H)
    assert r_on.output_error == pytest.approx(e_on, rel=1e-3)
    assert r_on.proxy_error == pytest.approx(e_on / energy, rel=1e-3)
    assert r_off.proxy_error == pytest.approx(e_off / energy, rel=1e-3)
    assert r_on.bits_per_weight == bcq_bits(n, m, [2, 2, 2]) / (n * m)
    assert r_on.orders == [2, 2, 2] and r_on.compensated and not r_off.compensated


def test_compensation_through_R_equals_gptq_through_U(rng):
    # float64 throughout: the left-looking solve with R and GPTQ's W[:, later] -= Err U[g, later]
    n, m = 24, 260
    W = rng.standard_normal((n, m))
    P = prepare_hessian(correlated_H(rng, m), dtype=np.float64)
    orders = np.array([2, 1, 3])

    def solve(Wg, o, dg):
        return solve_group(Wg, o, dg, backend="reference")

    Q_R = sweep(W.copy(), P, orders, solve).dequantize()
    U, d = P.U, P.d
    Wc, Q_U = W.copy(), np.empty_like(W)
    for g, cols in enumerate(group_slices(m)):
        Q_U[:, cols] = solve(Wc[:, cols].copy(), orders[g], d[cols])[3]
        Err = (Wc[:, cols] - Q_U[:, cols]) / d[cols]
        Wc[:, cols.stop :] -= Err @ U[cols, cols.stop :]
    np.testing.assert_allclose(Q_R, Q_U, rtol=1e-6, atol=1e-6)


def test_quadratic_form_uses_the_undamped_H(rng):
    m = 140
    H = correlated_H(rng, m).astype(np.float64)
    H[5, :] = H[:, 5] = 0  # a dead column
    X = rng.standard_normal((7, m))
    for dtype in (np.float64, np.float32):
        P = prepare_hessian(H, 0.05, dtype=dtype)
        expect = np.einsum("ij,ij->", X @ H, X)
        tol = 1e-4 if dtype == np.float32 else 1e-9
        assert quadratic_form(X, P) == pytest.approx(expect, rel=tol)


def test_orders_per_group_and_as_a_function(rng):
    n, m = 16, 300
    W = rng.standard_normal((n, m)).astype(np.float32)
    H = correlated_H(rng, m)
    layer, report = quantize_layer(W, H, [1, 3, 2], iters=5)
    assert layer.orders.tolist() == [1, 3, 2] and layer.signs.shape == (3, n, m)
    assert not layer.signs[1:, :, :128].any() and np.all(layer.row_scale[1:, 0] == 0)
    assert np.all(layer.col_scale[2, 256:] == 0) and np.any(layer.col_scale[1, 256:] != 0)
    assert report.bits_per_weight == bcq_bits(n, m, [1, 3, 2]) / (n * m)
    seen = {}

    def by_salience(W_, P):
        seen["d"] = P.d
        return np.array([2, 2, 1])

    layer2, _ = solve_daq(W, H, {"iters": 5}, orders=by_salience)
    assert layer2.orders.tolist() == [2, 2, 1] and seen["d"].shape == (m,)
    with pytest.raises(QdtkError, match="blk.x: need 3 group orders"):
        quantize_layer(W, H, [2, 2], name="blk.x")


def test_group_error_matches_its_definition(rng):
    W = rng.standard_normal((20, 128)).astype(np.float32)
    H = correlated_H(rng, 128)
    d = prepare_hessian(H).d
    errs = [group_error(W, H, o, d) for o in (1, 2, 3)]
    Q = solve_group(W, 2, d)[3]
    assert errs[1] == pytest.approx(output_error(W, Q, H), rel=1e-9)
    assert errs[0] > errs[1] > errs[2] > 0


def test_degenerate_layer_is_finite(rng):
    n, m = 12, 200
    W = rng.standard_normal((n, m)).astype(np.float32)
    W[4] = 0  # zero row
    W[:, 130:] = 0.25  # constant block
    H = correlated_H(rng, m)
    H[7, :] = H[:, 7] = 0  # dead column
    layer, report = quantize_layer(W, H, [2, 2])
    What = layer.dequantize()
    assert np.all(np.isfinite(What)) and np.isfinite(report.proxy_error)
    assert report.dead_columns == 1
    assert np.all(What[4, :128] == 0)
    np.testing.assert_allclose(What[:, 7], 0, atol=0.5)  # the dead column is quantized as 0
    layer, report = quantize_layer(np.zeros((3, 130), np.float32), np.zeros((130, 130)), [2, 1])
    assert np.all(layer.dequantize() == 0) and report.proxy_error == 0


@pytest.mark.parametrize("where", ["W", "H"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_stops_naming_the_layer(rng, where, bad):
    W = rng.standard_normal((4, 16)).astype(np.float32)
    H = correlated_H(rng, 16)
    (W if where == "W" else H)[1, 2] = bad
    with pytest.raises(QdtkError, match=r"model\.layers\.3\.mlp\.up_proj\.weight"):
        quantize_layer(W, H, [2], name="model.layers.3.mlp.up_proj.weight")


# ---------------------------------------------------------------------------------------------
# The stage on a small model written to disk, with statistics written in the capture format

BLOCKS = 3


def names(i):
    p = f"model.layers.{i}"
    return {
        "attn": (f"{p}.self_attn.q_proj", [f"{p}.self_attn.q_proj.weight",
                                           f"{p}.self_attn.k_proj.weight"]),
        "mlp": (f"{p}.mlp.down_proj", [f"{p}.mlp.down_proj.weight"]),
    }


@pytest.fixture
def model_and_stats(tmp_path):
    rng = np.random.default_rng(1)
    model, stats = tmp_path / "model", tmp_path / "stats"
    shapes = {"q_proj": (24, 160), "k_proj": (16, 160), "down_proj": (20, 96)}
    with CheckpointWriter(model, max_shard_bytes=40_000) as w:
        w.add("model.embed_tokens.weight", rng.standard_normal((50, 160)).astype(np.float32))
        for i in range(BLOCKS):
            for _, members in names(i).values():
                for member in members:
                    short = member.split(".")[-2]
                    w.add(member, rng.standard_normal(shapes[short]).astype(np.float32))
    writer = StatsWriter(stats, str(model), Checkpoint(model).fingerprint(), {"test": True})
    for i in range(BLOCKS):
        inputs = [
            InputStat(k, members, correlated_H(rng, 160 if key == "attn" else 96), 600)
            for key, (k, members) in names(i).items()
        ]
        writer.write_block(i, f"model.layers.{i}", inputs)
    writer.finish()
    return model, stats


OPTIONS = {"method": "daq", "bits": 2, "iters": 4, "backend": "cpu"}


def block_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("block_*.safetensors"))}


def test_stage_writes_solutions_and_report(model_and_stats, tmp_path):
    model, stats = model_and_stats
    report = quantize_model(model, stats, tmp_path / "q", OPTIONS, progress=False)
    files = block_bytes(tmp_path / "q")
    assert list(files) == [f"block_{i:04d}.safetensors" for i in range(BLOCKS)]
    assert len(report["layers"]) == 3 * BLOCKS
    ckpt = Checkpoint(model)
    total_bits = total_weights = 0
    for entry in report["blocks"]:
        layers = read_solution_block(tmp_path / "q" / entry["file"])
        assert list(layers) == entry["layers"]
        for name, layer in layers.items():
            W = ckpt.read(name, np.float32)
            r = report["layers"][name]
            assert layer.shape == W.shape and r["shape"] == list(W.shape)
            assert r["orders"] == [2] * len(group_slices(W.shape[1]))
            assert 0 < r["proxy_error"] < 1
            total_bits += layer.storage_bits()
            total_weights += W.size
    s = report["summary"]
    assert s["bits_per_weight"] == pytest.approx(total_bits / total_weights)
    assert s["layers"] == 3 * BLOCKS and s["weights"] == total_weights
    assert "embed" not in " ".join(report["layers"])


def counting(solver, calls, stop_after=None):
    def solve(W, H, options):
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt  # the run is killed here
        calls.append(options["name"])
        return solver(W, H, options)

    return solve


def test_stage_resumes_bit_for_bit(model_and_stats, tmp_path):
    model, stats = model_and_stats
    quantize_model(model, stats, tmp_path / "full", OPTIONS, progress=False)
    calls = []
    with pytest.raises(KeyboardInterrupt):  # killed inside the second block
        quantize_model(model, stats, tmp_path / "resumed", OPTIONS,
                       counting(solve_daq, calls, stop_after=4), progress=False)
    assert list(block_bytes(tmp_path / "resumed")) == ["block_0000.safetensors"]
    calls.clear()
    quantize_model(model, stats, tmp_path / "resumed", OPTIONS, counting(solve_daq, calls),
                   progress=False)
    assert not any(c.startswith("model.layers.0.") for c in calls) and len(calls) == 6
    assert block_bytes(tmp_path / "resumed") == block_bytes(tmp_path / "full")
    # a finished run is a no-op; a lost output is redone alone; new options redo everything
    calls.clear()
    (tmp_path / "resumed" / "block_0001.safetensors").unlink()
    quantize_model(model, stats, tmp_path / "resumed", OPTIONS, counting(solve_daq, calls),
                   progress=False)
    assert len(calls) == 3 and all(c.startswith("model.layers.1.") for c in calls)
    assert block_bytes(tmp_path / "resumed") == block_bytes(tmp_path / "full")
    calls.clear()
    quantize_model(model, stats, tmp_path / "resumed", {**OPTIONS, "iters": 3},
                   counting(solve_daq, calls), progress=False)
    assert len(calls) == 9


def test_stage_include_exclude_and_missing_statistics(model_and_stats, tmp_path):
    model, stats = model_and_stats
    report = quantize_model(model, stats, tmp_path / "q", OPTIONS, progress=False,
                            exclude=["*.down_proj.weight"], include=["*layers.[01].*"])
    assert sorted(report["layers"]) == sorted(
        n for i in (0, 1) for n in names(i)["attn"][1]
    )
    assert list(block_bytes(tmp_path / "q")) == ["block_0000.safetensors", "block_0001.safetensors"]
    with pytest.raises(QdtkError, match="no statistic for model.embed_tokens.weight"):
        quantize_model(model, stats, tmp_path / "q2", OPTIONS, include=["*embed*"])


def test_stage_mismatched_statistic_names_file_and_tensor(model_and_stats, tmp_path):
    model, stats = model_and_stats
    rng = np.random.default_rng(2)
    writer = StatsWriter(tmp_path / "bad", str(model), Checkpoint(model).fingerprint(), {})
    for i in range(BLOCKS):
        (ka, ma), (km, mm) = names(i).values()
        dim = 150 if i == 1 else 160
        writer.write_block(i, f"model.layers.{i}", [
            InputStat(ka, ma, correlated_H(rng, dim), 10),
            InputStat(km, mm, correlated_H(rng, 96), 10),
        ])
    writer.finish()
    with pytest.raises(QdtkError, match=r"block_0001\.safetensors.*model\.layers\.1\.self_attn"):
        quantize_model(model, tmp_path / "bad", tmp_path / "q", OPTIONS, progress=False)


def test_stage_nan_weight_names_the_layer(model_and_stats, tmp_path, monkeypatch):
    model, stats = model_and_stats
    real_read = Checkpoint.read

    def read(self, name, dtype=None):
        W = real_read(self, name, dtype)
        if name == "model.layers.1.mlp.down_proj.weight":
            W = W.copy()
            W[0, 0] = np.nan
        return W

    monkeypatch.setattr(Checkpoint, "read", read)
    r = CliRunner().invoke(cli, ["quantize", str(model), "--stats", str(stats), "--out",
                                 str(tmp_path / "q"), "--iters", "2"])
    assert r.exit_code == 1
    assert "Error: model.layers.1.mlp.down_proj.weight: the weight contains NaN" in r.output


def test_cli(model_and_stats, tmp_path):
    model, stats = model_and_stats
    r = CliRunner().invoke(cli, ["quantize", str(model), "--stats", str(stats), "--out",
                                 str(tmp_path / "q"), "--bits", "3", "--iters", "3",
                                 "--backend", "cpu", "--no-compensation",
                                 "--exclude", "*.k_proj.weight"])
    assert r.exit_code == 0, r.output
    assert "model.layers.2.mlp.down_proj.weight" in r.output and "k_proj" not in r.output
    import json

    report = json.loads((tmp_path / "q" / REPORT).read_text())
    assert report["options"] == {"method": "daq", "bits": 3, "iters": 3, "tau": 2.0, "lam": 3.0,
                                 "percdamp": 0.01, "compensate": False, "refit": True,
                                 "backend": "cpu"}
    assert f"{report['summary']['bits_per_weight']:.4f} bits/weight" in r.output
    assert all(r_["orders"] == [3] * len(r_["orders"]) for r_ in report["layers"].values())
    r = CliRunner().invoke(cli, ["quantize", "--help"])
    assert r.exit_code == 0
    for opt in ("--stats", "--out", "--bits", "--iters", "--tau", "--lam", "--percdamp",
                "--no-compensation", "--backend", "--include", "--exclude"):
        assert opt in r.output


def test_report_is_complete_only_when_the_stage_finished(model_and_stats, tmp_path):
    """pack refuses a solution folder whose quantize run was killed part way."""
    from qdtk.io import read_json, write_json_atomic
    from qdtk.pack import pack_checkpoint

    model, stats = model_and_stats
    quant = tmp_path / "quant"
    quantize_model(model, stats, quant, OPTIONS, progress=False)
    report = read_json(quant / "report.json")
    assert report["complete"] is True
    write_json_atomic(quant / "report.json", {**report, "complete": False})
    with pytest.raises(QdtkError, match="quantize has not finished"):
        pack_checkpoint(quant, tmp_path / "packed", model)
