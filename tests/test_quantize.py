"""The layer driver (compensation, errors, orders, bad input) and the `qdtk quantize` stage."""

import numpy as np
import pytest
from click.testing import CliRunner

from qdtk.cli.main import cli
from qdtk.cli.options import ROTATE_EXCLUDE
from qdtk.errors import QdtkError
from qdtk.formats.bits import bcq_bits, group_slices
from qdtk.formats.checkpoint import Checkpoint, CheckpointWriter
from qdtk.formats.io import read_json, write_json_atomic
from qdtk.formats.solution import REPORT, dequantize_block, read_solution_block
from qdtk.formats.stats import VALIDATION, InputStat, Stats, StatsWriter
from qdtk.math.forms import quadratic_form
from qdtk.math.group import solve_group
from qdtk.math.hessian import prepare_hessian
from qdtk.math.refine import MODES
from qdtk.options import QuantizeOptions
from qdtk.quantize import quantize_model
from qdtk.solve.layer import quantize_layer, refine_group, sweep
from qdtk.solve.solvers import make_solver, solve_daq


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


def test_block_feedback_reports_its_free_error_exactly(rng, monkeypatch):
    # with block feedback D = Err U: the sweep's sum ||Err_g||^2 is tr(D H D^T) on the damped H,
    # undamped by the driver; only the energy tr(W H W^T) needs a product with R
    from qdtk.solve import layer as driver

    n, m = 40, 300
    W = rng.standard_normal((n, m)).astype(np.float32)
    H = correlated_H(rng, m)
    H[7, :] = H[:, 7] = 0  # a dead column: its weights count nowhere
    calls = []
    monkeypatch.setattr(driver, "quadratic_form",
                        lambda X, *a: calls.append(1) or quadratic_form(X, *a))
    layer, report = quantize_layer(W, H, [2, 1, 3], feedback="block")
    assert len(calls) == 1
    e = output_error(W, layer.dequantize(), H)
    assert report.output_error == pytest.approx(e, rel=1e-4)
    assert report.weight_energy == pytest.approx(output_error(W, 0 * W, H), rel=1e-4)
    quantize_layer(W, H, [2, 1, 3], feedback="diagonal")  # not free: measured
    assert len(calls) == 3


def test_compensation_through_R_equals_gptq_through_U(rng):
    # float64 throughout: the left-looking solve with R and GPTQ's W[:, later] -= Err U[g, later];
    # 6 groups, so the sweep's super-block products (SUPER = 4 groups) are crossed
    n, m = 24, 700
    W = rng.standard_normal((n, m))
    P = prepare_hessian(correlated_H(rng, m), dtype=np.float64)
    orders = np.array([2, 1, 3, 1, 2, 2])

    def solve(Wg, o, dg):
        return solve_group(Wg, o, dg, backend="reference")

    Q_R = sweep(W.copy(), P.R, orders, solve)[0].dequantize()
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


def test_shrinkage_fits_on_shrunk_H_and_reports_on_H(rng):
    """--shrink: the factor is of (1 - a) H + a diag(H) damped; quadratic_form still gives the
    exact form on H; the layer's reported error is tr(D H D^T)/tr(W H W^T) on H itself."""
    from qdtk.math.forms import proxy_error

    n, m = 12, 260
    H = correlated_H(rng, m).astype(np.float64)
    H[7, :] = H[:, 7] = 0  # a dead column
    X = rng.standard_normal((5, m))
    P = prepare_hessian(H, 0.05, shrink=0.3)
    Hs = 0.7 * H + 0.3 * np.diag(np.diag(H))
    np.fill_diagonal(Hs, np.where(np.diag(H) == 0, 1, np.diag(H)) + P.damping)
    np.testing.assert_allclose(P.H, Hs, rtol=1e-12)
    np.testing.assert_allclose(P.R @ P.R.T, Hs, rtol=1e-9, atol=1e-9)
    assert quadratic_form(X, P) == pytest.approx(np.einsum("ij,ij->", X @ H, X), rel=1e-9)
    W = rng.standard_normal((n, m)).astype(np.float32)
    W[:, 7] = 0
    base, rep0 = solve_daq(W, H, QuantizeOptions(iters=3))
    for refine in ("none", "rows"):
        layer, rep = solve_daq(W, H, QuantizeOptions(iters=3, shrink=0.3, refine=refine))
        assert rep["proxy_error"] == pytest.approx(proxy_error(W, layer.dequantize(), H),
                                                   rel=1e-4)
    assert not np.array_equal(layer.dequantize(), base.dequantize())
    with pytest.raises(QdtkError, match="toward the diagonal"):
        solve_daq(W, H, QuantizeOptions(shrink=1.0))
    with pytest.raises(QdtkError, match="--shrink"):
        QuantizeOptions.of({"shrink": -0.1})


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

    layer2, _ = solve_daq(W, H, QuantizeOptions(iters=5), orders=by_salience)
    assert layer2.orders.tolist() == [2, 2, 1] and seen["d"].shape == (m,)
    with pytest.raises(QdtkError, match="blk.x: need 3 group orders"):
        quantize_layer(W, H, [2, 2], name="blk.x")


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
    def solve(W, H, options, name="layer", orders=None):
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt  # the run is killed here
        calls.append(name)
        return solver(W, H, options, name, orders)

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


def test_a_folder_solved_by_other_code_is_solved_again(model_and_stats, tmp_path, monkeypatch):
    import qdtk.quantize

    model, stats = model_and_stats
    quantize_model(model, stats, tmp_path / "q", OPTIONS, progress=False)
    calls = []
    quantize_model(model, stats, tmp_path / "q", OPTIONS, counting(solve_daq, calls),
                   progress=False)
    assert calls == []  # the same code resumes
    monkeypatch.setattr(qdtk.quantize, "solver_code", lambda: "an upgrade")
    quantize_model(model, stats, tmp_path / "q", OPTIONS, counting(solve_daq, calls),
                   progress=False)
    assert len(calls) == 9  # other code: nothing of the old folder is trusted


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
                                 str(tmp_path / "q"), "--iters", "2", "--abmp", "none"])
    assert r.exit_code == 1
    assert (".safetensors: tensor 'model.layers.1.mlp.down_proj.weight' has NaN at index "
            "[0, 0] (the first of 1 non-finite value)") in r.output
    assert not list((tmp_path / "q").glob("block_*"))  # found before the first solve


def test_cli(model_and_stats, tmp_path):
    model, stats = model_and_stats
    r = CliRunner().invoke(cli, ["quantize", str(model), "--stats", str(stats), "--out",
                                 str(tmp_path / "q"), "--bits", "3", "--iters", "3",
                                 "--abmp", "none", "--refine", "none",
                                 "--backend", "cpu", "--no-compensation",
                                 "--exclude", "*.k_proj.weight"])
    assert r.exit_code == 0, r.output
    assert "model.layers.2.mlp.down_proj.weight" in r.output and "k_proj" not in r.output
    import json

    report = json.loads((tmp_path / "q" / REPORT).read_text())
    assert report["options"] == {
        "method": "daq", "bits": 3, "abmp": "none", "rho": 0.05, "count": "real",
        "budget_scope": "layer", "orders": [1, 2, 3], "iters": 3, "tau": 2.0, "lam": 3.0,
        "percdamp": 0.01, "compensate": False, "feedback": "block", "refit": True,
        "refine": "none", "refine_rounds": None, "shrink": 0.25, "backend": "cpu",
        "rotate": "hadamard", "rotate_seed": 0, "rotate_exclude": [ROTATE_EXCLUDE[0]]}
    assert f"{report['summary']['bits_per_weight']:.4f} bits/weight" in r.output
    assert report["summary"]["orders_histogram"] == {"3": sum(
        len(r_["orders"]) for r_ in report["layers"].values())}
    assert all(r_["orders"] == [3] * len(r_["orders"]) for r_ in report["layers"].values())
    r = CliRunner().invoke(cli, ["quantize", "--help"])
    assert r.exit_code == 0
    for opt in ("--stats", "--out", "--method", "--bits", "--abmp", "--rho", "--count",
                "--budget-scope", "--orders", "--iters", "--tau", "--lam", "--percdamp",
                "--no-compensation", "--refine", "--refine-rounds", "--backend", "--device",
                "--include", "--exclude", "--rotate", "--rotate-seed", "--rotate-exclude",
                "--early-stop"):
        assert opt in r.output


def test_cli_rotates_daq_but_not_the_attention_inputs_nor_the_baselines():
    o = parse([])
    assert o.rotate == "hadamard" and o.rotate_exclude == ROTATE_EXCLUDE
    names = {"model.layers.0.self_attn.q_proj.weight": None,
             "model.transformer.blocks.3.k_proj.weight": None,
             "encoder.layer.1.attention.self.value.weight": None,
             "model.layers.0.self_attn.o_proj.weight": 64,
             "model.layers.0.mlp.down_proj.weight": 64,
             "encoder.layer.1.attention.output.dense.weight": 64}
    for name, block in names.items():
        rot = o.rotation(name, 64)
        assert (rot and rot.block) == block, name
    assert parse(["--rotate-exclude", "none"]).rotate_exclude == ()
    assert parse(["--rotate-exclude", "*.o_proj.weight"]).rotate_exclude == ("*.o_proj.weight",)
    assert parse(["--rotate", "none"]).fingerprinted() == parse(
        ["--rotate", "none", "--rotate-exclude", "x"]).fingerprinted()
    for method in ("gptq", "rtn"):
        assert parse(["--method", method]).rotate == "none"
        assert parse(["--method", method, "--rotate", "hadamard"]).rotate == "hadamard"


def test_report_is_complete_only_when_the_stage_finished(model_and_stats, tmp_path):
    """pack refuses a solution folder whose quantize run was killed part way."""
    from qdtk.formats.io import read_json, write_json_atomic
    from qdtk.pack import pack_checkpoint

    model, stats = model_and_stats
    quant = tmp_path / "quant"
    quantize_model(model, stats, quant, OPTIONS, progress=False)
    report = read_json(quant / "report.json")
    assert report["complete"] is True
    write_json_atomic(quant / "report.json", {**report, "complete": False})
    with pytest.raises(QdtkError, match="quantize has not finished"):
        pack_checkpoint(quant, tmp_path / "packed", model)


# ---------------------------------------------------------------------------------------------
# Options -> solver, ABMP, refinement


def parse(args):
    """The QuantizeOptions that `qdtk quantize ARGS` would use."""
    import click

    from qdtk.cli.options import quantize_options, quantize_options_from

    seen = {}

    @click.command()
    @quantize_options()
    def cmd(include, exclude, **kw):
        seen["options"] = quantize_options_from(kw)

    r = CliRunner().invoke(cmd, args, standalone_mode=False, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return seen["options"]


def test_options_map_to_the_solver(model_and_stats, tmp_path):
    from qdtk.formats.solution import AffineLayer, BinaryCodedLayer
    from qdtk.math.baselines import solve_gptq, solve_rtn
    from qdtk.solve.solvers import make_solver

    model, stats = model_and_stats
    for method, solver in (("gptq", solve_gptq), ("rtn", solve_rtn)):
        options = parse(["--method", method])
        assert options.fingerprinted() == {"method": method, "bits": 2, "percdamp": 0.01}
        assert make_solver(options) is solver
        quantize_model(model, stats, tmp_path / method, options, make_solver(options),
                       include=["*layers.0.*"], progress=False)
        layers = read_solution_block(tmp_path / method / "block_0000.safetensors")
        assert all(isinstance(x, AffineLayer) and x.bits == 2 for x in layers.values())
    options = parse(["--abmp", "swap", "--rho", "0.5", "--iters", "2", "--refine", "none",
                     "--backend", "cpu", "--rotate", "none"])
    assert options.bits == 2 and options.budget_scope == "layer"  # model: knapsack only
    assert make_solver(options) is solve_daq
    report = quantize_model(model, stats, tmp_path / "swap", options, progress=False)
    assert {type(x) for x in read_solution_block(tmp_path / "swap" / "block_0000.safetensors")
            .values()} == {BinaryCodedLayer}
    for r in report["layers"].values():  # 2 groups (160 columns): one at 1, one at 3
        assert np.mean(r["orders"]) == 2 and sorted(r["orders"]) == ([1, 3] if len(
            r["orders"]) == 2 else [2])
        assert r["abmp"] == "swap" and sum(r["orders_histogram"].values()) == len(r["orders"])


@pytest.mark.parametrize("args, match", [
    (["--abmp", "swap", "--bits", "2.1"], r"--bits 2.1: with --abmp swap it is an integer"),
    (["--abmp", "none", "--bits", "5"], r"--bits 5: with --abmp none it is an integer 1\.\.4"),
    (["--method", "gptq", "--bits", "2.5"], r"with --method gptq it is an integer 1..8"),
    (["--abmp", "knapsack", "--orders", "0,2"], r"--orders must be a non-empty subset"),
    (["--abmp", "knapsack", "--bits", "-1"], r"budget must be positive"),
])
def test_bad_option_combinations_are_clear_errors(args, match):
    with pytest.raises(QdtkError, match=match):
        parse(args)


def test_budget_below_the_minimum_fails_before_any_solve(model_and_stats, tmp_path):
    model, stats = model_and_stats
    calls = []
    for scope in ("layer", "model"):
        options = {**OPTIONS, "abmp": "knapsack", "bits": 1.1, "budget_scope": scope}
        with pytest.raises(QdtkError, match=r"--bits 1.1 is below the minimum of 1\.\d+ bits"):
            quantize_model(model, stats, tmp_path / scope, options, counting(solve_daq, calls),
                           progress=False)
    assert calls == [] and not (tmp_path / "model" / "orders.json").exists()


def uniform2_bits(report):
    return {w: bcq_bits(*r["shape"], [2] * len(r["orders"])) / np.prod(r["shape"])
            for w, r in report["layers"].items()}


def test_knapsack_per_layer_respects_each_budget(model_and_stats, tmp_path):
    model, stats = model_and_stats
    options = {**OPTIONS, "abmp": "knapsack", "bits": 1.8, "count": "planes",
               "budget_scope": "layer"}
    report = quantize_model(model, stats, tmp_path / "q", options, progress=False)
    for r in report["layers"].values():
        assert r["plane_bits_per_weight"] <= 1.8 and 1 in r["orders"]
        assert r["predicted_error"] > 0 and r["abmp"] == "knapsack"
        if r["shape"][1] == 160:  # 128 + 32 columns: the wide group at order 2 fits exactly
            assert r["orders"] == [2, 1] and r["plane_bits_per_weight"] == 1.8
    # no --bits: each layer's budget is what uniform order 2 costs it, scales included
    report = quantize_model(model, stats, tmp_path / "q", {**options, "bits": None,
                                                            "count": "real"}, progress=False)
    u2 = uniform2_bits(report)
    assert all(r["bits_per_weight"] <= u2[w] for w, r in report["layers"].items())


def fake_output_change(model, scales, calls):
    """A model whose output change is scale * ||W - What||^2 for each layer (no torch)."""
    ckpt = Checkpoint(model)

    def build(path, **kw):
        calls.append("built")

        def output_change(name, What):
            calls.append(name)
            return scales.get(name.split(".")[-2], 1.0) * float(
                np.sum((ckpt.read(name, np.float64) - What) ** 2))

        return output_change

    return build


def test_model_scope_respects_the_budget_and_resumes_without_the_prepass(
        model_and_stats, tmp_path, monkeypatch):
    import qdtk.torch.evaluate
    from qdtk.formats.io import read_json

    model, stats = model_and_stats
    calls = []
    monkeypatch.setattr(qdtk.torch.evaluate, "output_change_fn",
                        fake_output_change(model, {"down_proj": 1e3}, calls))
    options = {**OPTIONS, "abmp": "knapsack", "bits": None, "budget_scope": "model"}
    out = tmp_path / "q"
    report = quantize_model(model, stats, out, options, progress=False)
    assert len(calls) == 1 + 3 * BLOCKS  # built once, one measurement per layer
    u2 = uniform2_bits(report)  # the default budget: what uniform order 2 costs the model
    weights = {w: np.prod(r["shape"]) for w, r in report["layers"].items()}
    budget = sum(u2[w] * weights[w] for w in u2) / sum(weights.values())
    assert report["summary"]["bits_per_weight"] <= budget
    assert report["allocation"]["bits"] == pytest.approx(budget)
    alloc = read_json(out / "orders.json")
    assert report["allocation"]["fingerprint"] == alloc["fingerprint"]
    for name, r in report["layers"].items():
        assert r["orders"] == alloc["layers"][name]["orders"]
        assert r["sensitivity"] == alloc["layers"][name]["sensitivity"] > 0
    # the far more sensitive down_proj layers get at least the mean order of the others
    mean = {k: np.mean([np.mean(r["orders"]) for n, r in report["layers"].items() if k in n])
            for k in ("down_proj", "q_proj")}
    assert mean["down_proj"] > mean["q_proj"]
    # resumed (a block lost): no pre-pass, same result; options outside the allocation reuse it
    calls.clear()
    before = block_bytes(out)
    (out / "block_0001.safetensors").unlink()
    quantize_model(model, stats, out, options, progress=False)
    assert calls == [] and block_bytes(out) == before
    solves = []  # trust_remote_code changes how it runs, not what: nothing is redone
    quantize_model(model, stats, out, {**options, "trust_remote_code": True},
                   counting(solve_daq, solves), progress=False)
    assert calls == solves == [] and block_bytes(out) == before
    import qdtk.allocate

    with monkeypatch.context() as m:  # written by other code: the pre-pass runs again
        m.setattr(qdtk.allocate, "solver_code", lambda: "an upgrade")
        quantize_model(model, stats, out, options, progress=False)
    assert len(calls) == 1 + 3 * BLOCKS
    calls.clear()
    quantize_model(model, stats, out, options, progress=False)  # back: orders.json recomputed
    assert len(calls) == 1 + 3 * BLOCKS
    calls.clear()
    report2 = quantize_model(model, stats, tmp_path / "q2", options, progress=False)
    assert len(calls) == 1 + 3 * BLOCKS  # a new folder measures again
    calls.clear()
    quantize_model(model, stats, out, {**options, "compensate": False}, progress=False)
    assert read_json(out / "orders.json") == alloc
    calls.clear()
    quantize_model(model, stats, out, {**options, "bits": 4.0}, progress=False)
    assert len(calls) == 1 + 3 * BLOCKS and read_json(out / "orders.json") != alloc
    assert report2["summary"]["bits_per_weight"] == report["summary"]["bits_per_weight"]


def test_knapsack_candidates_are_solved_at_their_own_iterations(
        rng, model_and_stats, tmp_path, monkeypatch):
    """--candidate-iters: every candidate solve (each group alone at each allowed order) runs
    that many DAQ iterations, the sweep --iters; the allocation depends on the former only."""
    import qdtk.math.group
    import qdtk.torch.evaluate

    iters = []
    solve_block = qdtk.math.group.solve_block
    monkeypatch.setattr(qdtk.math.group, "solve_block",
                        lambda *a, **kw: iters.append(kw["iters"]) or solve_block(*a, **kw))
    W = rng.standard_normal((32, 384)).astype(np.float32)
    options = QuantizeOptions(abmp="knapsack", bits=2.2, iters=3, candidate_iters=1,
                              budget_scope="layer")
    solve_daq(W, correlated_H(rng, 384), options)
    G, C = len(group_slices(384)), len(options.orders)
    assert sorted(iters) == [1] * (G * C) + [3] * G
    # model scope: the pre-pass solves at candidate_iters, and only they change the allocation
    model, stats = model_and_stats
    calls = []
    monkeypatch.setattr(qdtk.torch.evaluate, "output_change_fn",
                        fake_output_change(model, {}, calls))
    model_scope = {**OPTIONS, "abmp": "knapsack", "bits": None, "budget_scope": "model",
                   "candidate_iters": 1}
    out = tmp_path / "q"
    iters.clear()
    quantize_model(model, stats, out, model_scope, progress=False)
    assert set(iters) == {1, OPTIONS["iters"]} and iters.count(1) > iters.count(OPTIONS["iters"])
    alloc = read_json(out / "orders.json")
    calls.clear()
    quantize_model(model, stats, out, {**model_scope, "iters": 2}, progress=False)
    assert calls == [] and read_json(out / "orders.json") == alloc  # the sweep's alone
    quantize_model(model, stats, out, {**model_scope, "candidate_iters": 2}, progress=False)
    assert calls and read_json(out / "orders.json")["fingerprint"] != alloc["fingerprint"]


def test_rotate_solves_the_rotated_problem_everywhere(model_and_stats, tmp_path, monkeypatch):
    """--rotate hadamard: the pre-pass and the solves see W Q and Q^T H Q, the sensitivity
    forwards What in the model's basis, the errors are those of What Q^T on H, and the packed
    and unpacked folders carry it."""
    import qdtk.torch.evaluate
    from qdtk.formats.io import read_json
    from qdtk.formats.packed import read_quantization_config
    from qdtk.formats.stats import Stats
    from qdtk.math.forms import proxy_error
    from qdtk.math.rotation import Rotation
    from qdtk.pack import pack_checkpoint, unpack_checkpoint
    from qdtk.solve.solvers import make_solver

    model, stats = model_and_stats
    ckpt, st = Checkpoint(model), Stats(stats)
    seen = {}

    def build(path, **kw):
        def output_change(name, What):  # relative error: ~1.4 were What in the rotated basis
            W = ckpt.read(name, np.float64)
            seen[name] = np.linalg.norm(W - What) / np.linalg.norm(W)
            return float(np.sum((W - What) ** 2))
        return output_change

    monkeypatch.setattr(qdtk.torch.evaluate, "output_change_fn", build)
    options = {**OPTIONS, "abmp": "knapsack", "bits": None, "budget_scope": "model",
               "shrink": 0.25, "refine": "rows", "feedback": "block"}
    plain = quantize_model(model, stats, tmp_path / "plain", options, progress=False)
    rotated = {**options, "rotate": "hadamard", "rotate_seed": 3}
    report = quantize_model(model, stats, tmp_path / "q", rotated,
                            make_solver(QuantizeOptions.of(rotated)),
                            progress=False)
    assert len(seen) == 3 * BLOCKS and max(seen.values()) < 0.9
    alloc = read_json(tmp_path / "q" / "orders.json")
    assert alloc["fingerprint"] != read_json(tmp_path / "plain" / "orders.json")["fingerprint"]
    layers = {}
    for entry in report["blocks"]:
        layers.update(read_solution_block(tmp_path / "q" / entry["file"]))
    errs = {}
    for name, layer in layers.items():
        W, r = ckpt.read(name, np.float32), report["layers"][name]
        assert layer.rotation == Rotation(W.shape[1], 3) and r["rotation"]["seed"] == 3
        assert r["orders"] == alloc["layers"][name]["orders"] == layer.orders.tolist()
        H, _ = st.hessian(name, W.shape[1])
        assert proxy_error(W, layer.weight(), H) == pytest.approx(r["proxy_error"], rel=1e-3)
        errs[name] = r["proxy_error"]
    # correlated random H, Gaussian W: rotation changes the error, it does not break it
    assert 0.5 < np.median(list(errs.values())) / np.median(
        [r["proxy_error"] for r in plain["layers"].values()]) < 1.5
    packed = pack_checkpoint(tmp_path / "q", tmp_path / "packed", model)
    qc = read_quantization_config(packed)
    assert qc["format"] == "qdtk-bcq/2"
    assert {m: i["rotation"]["seed"] for m, i in qc["modules"].items()} == {
        w.removesuffix(".weight"): 3 for w in layers}
    dense = Checkpoint(unpack_checkpoint(packed, tmp_path / "dense", dtype="float32"))
    for name, layer in layers.items():
        assert dense.read(name).tobytes() == layer.weight().tobytes()
    with pytest.raises(QdtkError, match=r"--rotate-seed must be a whole number"):
        QuantizeOptions.of({**rotated, "rotate_seed": -1})
    with pytest.raises(QdtkError, match=r"--rotate must be one of none, hadamard, got 'givens'"):
        QuantizeOptions.of({**rotated, "rotate": "givens"})


def test_rotate_exclude_leaves_those_layers_as_unrotated(model_and_stats, tmp_path):
    from qdtk.formats.packed import read_quantization_config
    from qdtk.pack import pack_checkpoint, unpack_checkpoint

    model, stats = model_and_stats
    options = {**OPTIONS, "refine": "rows", "feedback": "block"}
    plain = quantize_model(model, stats, tmp_path / "plain", options, progress=False)
    mixed = {**options, "rotate": "hadamard", "rotate_exclude": ("*.k_proj.weight",)}
    report = quantize_model(model, stats, tmp_path / "q", mixed,
                            make_solver(QuantizeOptions.of(mixed)), progress=False)
    assert report["options"]["rotate_exclude"] == ["*.k_proj.weight"]
    layers, base = {}, {}
    for entry in report["blocks"]:
        layers.update(read_solution_block(tmp_path / "q" / entry["file"]))
        base.update(read_solution_block(tmp_path / "plain" / entry["file"]))
    for name, layer in layers.items():
        if name.endswith(".k_proj.weight"):
            assert layer.rotation is None and "rotation" not in report["layers"][name]
            assert layer.weight().tobytes() == base[name].weight().tobytes()
            assert report["layers"][name]["proxy_error"] == plain["layers"][name]["proxy_error"]
        else:
            assert layer.rotation is not None
    packed = pack_checkpoint(tmp_path / "q", tmp_path / "packed", model)
    modules = read_quantization_config(packed)["modules"]
    assert {m for m, i in modules.items() if "rotation" not in i} == {
        w.removesuffix(".weight") for w in layers if w.endswith(".k_proj.weight")}
    dense = Checkpoint(unpack_checkpoint(packed, tmp_path / "dense", dtype="float32"))
    for name, layer in layers.items():
        assert dense.read(name).tobytes() == layer.weight().tobytes()


def test_refine_lowers_the_proxy_error(model_and_stats, tmp_path):
    model, stats = model_and_stats
    base = quantize_model(model, stats, tmp_path / "none", {**OPTIONS, "refine": "none"},
                          progress=False)
    rows = quantize_model(model, stats, tmp_path / "rows", {**OPTIONS, "refine": "rows"},
                          progress=False)
    assert block_bytes(tmp_path / "none") != block_bytes(tmp_path / "rows")
    for name, r in rows["layers"].items():
        assert r["proxy_error"] <= base["layers"][name]["proxy_error"] * (1 + 1e-6)
        assert r["refine"] == "rows" and r["orders"] == base["layers"][name]["orders"]
    assert rows["summary"]["mean_proxy_error"] < 0.95 * base["summary"]["mean_proxy_error"]


def add_validation(stats, H, windows=2):
    """A validation statistic of `stats` whose every H is H(m) (qdtk.formats.stats)."""
    main = Stats(stats)
    writer = StatsWriter(stats / VALIDATION, str(main.manifest["model"]["path"]),
                         main.manifest["model"]["fingerprint"],
                         {"validation_of": main.fingerprint, "n": windows})
    for i, block in enumerate(main.blocks):
        writer.write_block(i, block.name, [InputStat(inp["key"], inp["members"], H(inp["dim"]),
                                                     10) for inp in block.inputs])
    writer.finish()
    manifest = read_json(stats / "manifest.json")
    manifest["validation"] = {"folder": VALIDATION, "fingerprint": writer.fingerprint}
    write_json_atomic(stats / "manifest.json", manifest)


@pytest.mark.parametrize("rotate", ["none", "hadamard"])
def test_early_stop_on_the_validation_statistic(model_and_stats, tmp_path, caplog, rotate):
    model, stats = model_and_stats
    opts = {**OPTIONS, "refine": "full", "rotate": rotate}
    full = quantize_model(model, stats, tmp_path / "full", opts, progress=False)
    with caplog.at_level("WARNING"):  # no validation statistic: refined and fingerprinted as usual
        same = quantize_model(model, stats, tmp_path / "same", {**opts, "early_stop": True},
                              progress=False)
    assert "no validation statistic" in caplog.text
    assert same["options"] == full["options"] and block_bytes(tmp_path / "same") == \
        block_bytes(tmp_path / "full")
    # a validation H that no refinement lowers (zero): every layer stays the sweep's solution
    add_validation(stats, lambda m: np.zeros((m, m), np.float32))
    stopped = quantize_model(model, stats, tmp_path / "stop", {**opts, "early_stop": True},
                             progress=False)
    quantize_model(model, stats, tmp_path / "none", {**opts, "refine": "none"}, progress=False)
    assert stopped["options"]["early_stop"] is True
    assert [b["fingerprint"] for b in stopped["blocks"]] != \
        [b["fingerprint"] for b in full["blocks"]]
    for b in stopped["blocks"]:
        a = read_solution_block(tmp_path / "stop" / b["file"])
        n = read_solution_block(tmp_path / "none" / b["file"])
        for w in a:
            np.testing.assert_array_equal(a[w].weight(), n[w].weight())
    # another validation statistic: other solutions, other fingerprints
    for f in (stats / VALIDATION).iterdir():
        f.unlink()
    add_validation(stats, lambda m: correlated_H(np.random.default_rng(m), m), windows=3)
    val = quantize_model(model, stats, tmp_path / "val", {**opts, "early_stop": True},
                         progress=False)
    assert [b["fingerprint"] for b in val["blocks"]] != \
        [b["fingerprint"] for b in stopped["blocks"]]


def test_output_change_of_a_real_model(tiny_bert):
    from qdtk.torch.evaluate import output_change_fn

    name = "bert.encoder.layer.1.intermediate.dense.weight"
    W = Checkpoint(tiny_bert).read(name, np.float32)
    change = output_change_fn(tiny_bert, n=2, L=32)
    assert change(name, W) == 0
    small = change(name, W + 0.01 * np.sign(W))
    assert 0 < small < change(name, W + 0.1 * np.sign(W))
    assert change(name, W) == 0  # the weight was restored


@pytest.mark.parametrize("which", ["bert", "llama", "llada", "dream"])
def test_output_change_replays_the_blocks_before_the_weight(which, request, monkeypatch):
    """A weight in the last block runs that block alone (the first block's Linears never run),
    and gives the change that a whole forward of the modified model gives."""
    import torch

    import qdtk.torch.evaluate as ev
    from qdtk.formats.calib import calibration_text
    from qdtk.torch.capture import find_blocks

    path = request.getfixturevalue(f"tiny_{which}")
    loaded = []
    real_load = ev.load_for_eval
    monkeypatch.setattr(ev, "load_for_eval", lambda *a, **k: loaded.append(real_load(*a, **k))
                        or loaded[-1])
    change = ev.output_change_fn(path, n=2, L=16, at_rest="float32")  # a float32 reference
    model = loaded[-1].model
    _, blocks = find_blocks(model)
    last = len(blocks) - 1
    key, mod = next((k, m) for k, m in blocks[last].named_modules()
                    if isinstance(m, torch.nn.Linear))
    first = next(m for m in blocks[0].modules() if isinstance(m, torch.nn.Linear))
    ran = []
    first.register_forward_pre_hook(lambda *a: ran.append(1))
    name = next(n for n in Checkpoint(path).names() if n.endswith(f".{last}.{key}.weight"))
    W = mod.weight.detach().numpy().copy()
    What = W + 0.05 * np.sign(W)
    got = change(name, What)
    assert ran == []  # block 0 replayed, not run

    ids = torch.from_numpy(ev.token_windows(
        calibration_text(None), loaded[-1].tokenizer, loaded[-1].config["vocab_size"], 2,
        16).ids)
    with torch.inference_mode():
        base = ev._forward(model, ids, hidden=True)[1].double()
        mod.weight.copy_(torch.from_numpy(What))
        new = ev._forward(model, ids, hidden=True)[1].double()
        mod.weight.copy_(torch.from_numpy(W))
    assert got > 0 and got == pytest.approx(float(((new - base) ** 2).sum() / ids.numel()),
                                            rel=1e-6)


def test_output_change_never_writes_into_the_model_weights(tiny_llama, monkeypatch):
    """What is swapped in as the parameter's tensor, not copied into it: the model's own
    tensors (memory-mapped from the checkpoint) stay untouched, no private copy per Linear."""
    import qdtk.torch.evaluate as ev

    loaded = []
    real_load = ev.load_for_eval
    monkeypatch.setattr(ev, "load_for_eval", lambda *a, **k: loaded.append(real_load(*a, **k))
                        or loaded[-1])
    change = ev.output_change_fn(tiny_llama, n=2, L=16)
    name = "model.layers.1.self_attn.o_proj.weight"
    mod = loaded[-1].model.get_submodule(name.removesuffix(".weight"))
    own, before = mod.weight.data, mod.weight.detach().clone()
    seen = []
    mod.register_forward_pre_hook(lambda m, a: seen.append(m.weight.data_ptr()))
    What = before.numpy() + 0.05
    assert change(name, What) > 0
    assert seen and seen[0] != own.data_ptr()  # ran on What, held elsewhere
    assert mod.weight.data_ptr() == own.data_ptr() and bool((own == before).all())


@pytest.mark.parametrize("which", ["bert", "llama", "llada", "dream"])
def test_output_change_of_a_bfloat16_checkpoint_keeps_its_blocks_narrow(which, request,
                                                                       tmp_path, monkeypatch):
    """The blocks rest in bfloat16 as stored, widened for their own forward only: the same
    sensitivities, bit for bit, as the whole model loaded in float32."""
    import torch

    import qdtk.torch.evaluate as ev
    from qdtk.torch.capture import find_blocks

    path = request.getfixturevalue(f"tiny_{which}")
    if which in ("bert", "llama"):  # the float32 test models, stored in bfloat16
        lm = ev.load_for_eval(path)
        lm.model.to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
        for f in path.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                (tmp_path / f.name).write_bytes(f.read_bytes())
        path = tmp_path
    assert ev.stored_dtype(path) == "bfloat16"
    loaded = []
    real_load = ev.load_for_eval
    monkeypatch.setattr(ev, "load_for_eval", lambda *a, **k: loaded.append(real_load(*a, **k))
                        or loaded[-1])
    wide = ev.output_change_fn(path, n=2, L=16, at_rest="float32")
    narrow = ev.output_change_fn(path, n=2, L=16)
    _, blocks = find_blocks(loaded[-1].model)
    widths = []  # inside the last block's forward: the dtypes of its parameters
    inner = next(m for m in blocks[-1].modules() if isinstance(m, torch.nn.Linear))
    inner.register_forward_pre_hook(
        lambda m, a: widths.append({p.dtype for p in blocks[-1].parameters()}))
    ckpt = Checkpoint(path)
    names = ckpt.linear_names()
    assert {p.dtype for blk in blocks for p in blk.parameters()} == {torch.bfloat16}
    for name in (names[0], names[-1]):
        W = ckpt.read(name, np.float32)
        What = W + 0.01 * np.sign(W) * np.abs(W).mean()  # not representable in bfloat16
        got = narrow(name, What)
        assert got > 0 and got == wide(name, What)
    assert {p.dtype for blk in blocks for p in blk.parameters()} == {torch.bfloat16}
    assert widths and all(w == {torch.float32} for w in widths)


def test_output_change_needs_no_head(tiny_llama, monkeypatch):
    import qdtk.torch.evaluate as ev

    loaded = []
    real_load = ev.load_for_eval
    monkeypatch.setattr(ev, "load_for_eval", lambda *a, **k: loaded.append(real_load(*a, **k))
                        or loaded[-1])
    name = "model.layers.0.mlp.down_proj.weight"
    W = Checkpoint(tiny_llama).read(name, np.float32)
    What = W + 0.05 * np.sign(W)
    full = ev.output_change_fn(tiny_llama, n=2, L=16, skip_head=False)(name, What)
    change = ev.output_change_fn(tiny_llama, n=2, L=16)
    head = loaded[-1].model.get_output_embeddings()
    widths = []
    head.register_forward_hook(lambda m, a, out: widths.append(out.shape[-1]))
    assert full > 0 and change(name, What) == pytest.approx(full, rel=1e-12)
    assert widths == [1]  # the head gave one column, not the vocabulary
    assert "forward" not in vars(head)  # and is itself again


def test_output_change_keeps_a_head_the_model_needs(tiny_llama, monkeypatch):
    import qdtk.torch.evaluate as ev

    name = "model.layers.0.mlp.down_proj.weight"
    W = Checkpoint(tiny_llama).read(name, np.float32)
    What = W + 0.05 * np.sign(W)
    full = ev.output_change_fn(tiny_llama, n=2, L=16, skip_head=False)(name, What)
    real = ev._forward

    def needs_logits(model, ids, hidden, **kw):  # a model's own code that reads every logit
        if "forward" in vars(model.get_output_embeddings()):
            raise RuntimeError("shape mismatch")
        return real(model, ids, hidden, **kw)

    monkeypatch.setattr(ev, "_forward", needs_logits)
    assert ev.output_change_fn(tiny_llama, n=2, L=16)(name, What) == pytest.approx(full)


def test_uncompensated_sweep_reuses_the_allocation_solves(rng, monkeypatch):
    import qdtk.math.group as q

    n, m = 16, 300  # 3 groups
    W = rng.standard_normal((n, m)).astype(np.float32)
    H = correlated_H(rng, m)
    calls = []
    real = q.solve_group

    def counting_solve(Wg, order, dg, **kw):
        calls.append(order)
        return real(Wg, order, dg, **kw)

    monkeypatch.setattr(q, "solve_group", counting_solve)
    base = {"iters": 3, "compensate": False}
    layer, rep = solve_daq(W, H, QuantizeOptions.of(
        {**base, "abmp": "knapsack", "bits": 2.2, "count": "planes"}), "L")
    assert len(calls) == 3 * 3  # every group at every order, once; the sweep reused them
    assert rep["plane_bits_per_weight"] <= 2.2 and rep["abmp"] == "knapsack"
    # groups solved alone: the predicted error is the stored solution's error (no compensation)
    assert rep["predicted_error"] == pytest.approx(rep["output_error"], rel=0.05)
    calls.clear()
    solve_daq(W, H, QuantizeOptions.of({**base, "abmp": "none"}), "L")
    assert calls == [2, 2, 2]


def test_block_feedback_is_the_exact_update_of_the_later_columns(rng):
    """With the last group left unquantized (Q = its compensated input), block feedback reaches
    the least error any later columns can give for the first group's error: the Schur
    complement (W0 - Q0)(H00 - H01 H11^-1 H10)(W0 - Q0)^T. The published diagonal rule does not.
    """
    from qdtk.math.hessian import prepare_hessian

    W = rng.standard_normal((16, 256)).astype(np.float32)
    P = prepare_hessian(correlated_H(rng, 256), dtype=np.float32)
    Hd = P.R.astype(np.float64) @ P.R.T.astype(np.float64)  # the damped H the sweep uses

    def errors(feedback):
        Qs = []

        def solve(Wg, order, dg):
            if not Qs:  # group 0: a real 1-plane solve
                out = solve_group(Wg, 1, dg, iters=3)
            else:  # group 1: kept exactly
                K = 1
                out = (np.ones((K, *Wg.shape), bool), np.zeros((K, Wg.shape[0]), np.float16),
                       np.zeros((K, Wg.shape[1]), np.float16), Wg.copy())
            Qs.append(out[3])
            return out

        sweep(W.copy(), P.R, np.array([1, 1]), solve, True, feedback)
        D = W.astype(np.float64) - np.concatenate(Qs, axis=1)
        return np.einsum("ij,ij->", D @ Hd, D), D[:, :128]

    block, D0 = errors("block")
    H00, H01, H11 = Hd[:128, :128], Hd[:128, 128:], Hd[128:, 128:]
    schur = H00 - H01 @ np.linalg.solve(H11, H01.T)
    assert block == pytest.approx(np.einsum("ij,ij->", D0 @ schur, D0), rel=1e-4)
    diagonal, _ = errors("diagonal")
    assert block < diagonal


def test_block_feedback_lowers_the_layer_error(rng):
    W = rng.standard_normal((64, 384)).astype(np.float32)
    H = correlated_H(rng, 384)
    err = {fb: quantize_layer(W, H, [2, 2, 2], iters=5, feedback=fb)[1].proxy_error
           for fb in ("diagonal", "block")}
    assert err["block"] < err["diagonal"]


def test_refine_rounds_option(rng):
    assert QuantizeOptions(refine="full").refine_mode()["rounds"] == 4
    assert QuantizeOptions(refine="full", refine_rounds=2).refine_mode()["rounds"] == 2
    assert QuantizeOptions(refine="none", refine_rounds=2).refine_mode() is None
    with pytest.raises(QdtkError, match="--refine-rounds"):
        QuantizeOptions.of({"refine": "full", "refine_rounds": 0})
    W = rng.standard_normal((16, 256)).astype(np.float32)
    H = correlated_H(rng, 256)
    errors = [solve_daq(W, H, QuantizeOptions(iters=3, refine="full", refine_rounds=r))[1]
              ["proxy_error"] for r in (1, 3)]
    none = solve_daq(W, H, QuantizeOptions(iters=3))[1]["proxy_error"]
    assert errors[1] <= errors[0] * 1.001 and errors[0] < none


def test_the_bits_do_not_depend_on_the_blas_thread_count(rng):
    """qdtk.threads: a 64 x 768 layer (whose Cholesky and refinement solves OpenBLAS splits
    between 2 threads) gives the same solution and report on 1 and on 2 BLAS threads."""
    from threadpoolctl import threadpool_info, threadpool_limits

    if max((lib["num_threads"] for lib in threadpool_info()), default=1) < 2:
        pytest.skip("BLAS runs on one thread here: nothing to compare")
    W = rng.standard_normal((64, 768)).astype(np.float32)
    H = correlated_H(rng, 768)
    options = QuantizeOptions(iters=3, feedback="block", refine="full", shrink=0.25)
    runs = []
    for threads in (1, 2):
        with threadpool_limits(threads, user_api="blas"):
            layer, rep = solve_daq(W, H, options)
        runs.append((layer, {k: v for k, v in rep.items() if not k.startswith("seconds")}))
    (a, rep_a), (b, rep_b) = runs
    for field in ("orders", "signs", "row_scale", "col_scale"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert rep_a == rep_b


def test_sensitivities_are_measured_on_the_captured_calibration_text(tmp_path, caplog):
    from types import SimpleNamespace

    from qdtk.allocate import calibration_of
    from qdtk.formats.calib import text_hash

    def stats_of(source, text):  # the manifest entry capture writes
        return SimpleNamespace(folder=tmp_path, manifest={"options": {"calib": {
            "source": str(source), "sha256": text_hash(text)}}})

    assert calibration_of(stats_of("builtin", "")) is None  # the built-in text
    own = tmp_path / "domain.txt"
    own.write_text("text of the user's own domain, which the sensitivities must see")
    stats = stats_of(own, own.read_text())
    assert calibration_of(stats) == own.read_text()
    own.write_text("edited since the capture")  # changed: the built-in text, with a warning
    with caplog.at_level("WARNING"):
        assert calibration_of(stats) is None
    assert "gone or changed" in caplog.text
    own.unlink()
    assert calibration_of(stats) is None


def test_group_refinement_in_the_sweep_lowers_the_error(rng):
    """group_rounds refines each group on its exact metric R_gg R_gg^T before its error is fed
    forward: lower layer error, the report still the stored layer's true error; nothing
    without block feedback."""
    W = rng.standard_normal((48, 384)).astype(np.float32)
    H = correlated_H(rng, 384)
    out = {r: quantize_layer(W, H, [2, 1, 3], iters=3, feedback="block", group_rounds=r)
           for r in (0, 1, 2)}
    e = {r: output_error(W, layer.dequantize(), H) for r, (layer, _) in out.items()}
    assert e[1] < 0.95 * e[0] and e[2] <= e[1] * 1.001
    for r, (_, report) in out.items():
        assert report.output_error == pytest.approx(e[r], rel=1e-4)
    diag = [quantize_layer(W, H, [2, 1, 3], iters=3, group_rounds=r)[0] for r in (0, 1)]
    np.testing.assert_array_equal(diag[0].signs, diag[1].signs)


def test_refine_group_never_raises_the_group_metric(rng):
    n, w = 20, 128
    Wg = rng.standard_normal((n, w)).astype(np.float32)
    Rgg = prepare_hessian(correlated_H(rng, w), dtype=np.float32).R  # as in the sweep
    A = np.asarray(Rgg, np.float64) @ Rgg.T
    start = solve_group(Wg, 2, 1 / np.diag(Rgg))
    errors = [output_error(Wg, start[3], A)]
    for rounds in (1, 3):
        signs, a, b, Q = refine_group(Wg, Rgg, start, rounds)
        np.testing.assert_array_equal(Q, dequantize_block(signs, a, b))
        assert a.dtype == b.dtype == np.float16
        errors.append(output_error(Wg, Q, A))
    assert errors[1] < errors[0] and errors[2] <= errors[1] * 1.001


@pytest.mark.parametrize("refine", ["signs", "full"])
@pytest.mark.parametrize("shrink", [0.0, 0.25])
def test_refined_report_is_the_true_error(rng, refine, shrink):
    """After refinement on the sweep's prepared H the report comes from the refinement's own
    final error (undamped, unshrunk): the true tr(D H D^T), dead columns included."""
    W = rng.standard_normal((24, 300)).astype(np.float32)
    H = correlated_H(rng, 300)
    H[5, :] = H[:, 5] = 0
    for dead in (False, True):
        Hx = H if dead else correlated_H(rng, 300)
        layer, report = quantize_layer(W, Hx, [2, 1, 2], iters=2, feedback="block",
                                       refine=MODES[refine], shrink=shrink, group_rounds=1)
        e = output_error(W, layer.dequantize(), Hx)
        assert report.output_error == pytest.approx(e, rel=1e-4)
        assert report.proxy_error == pytest.approx(e / output_error(W, 0 * W, Hx), rel=1e-4)
