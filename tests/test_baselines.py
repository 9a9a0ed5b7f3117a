"""RTN and GPTQ baselines: grids, error feedback, stored form, honest bits, bad input."""

import numpy as np
import pytest

from qdtk.errors import QdtkError
from qdtk.formats.bits import affine_bits
from qdtk.formats.solution import AffineLayer, read_solution_block, write_solution_block
from qdtk.math.baselines import (
    affine_codes,
    affine_dequantize,
    affine_grid,
    gptq,
    rtn,
    solve_gptq,
    solve_rtn,
)
from qdtk.math.forms import proxy_error
from qdtk.math.hessian import prepare_hessian
from qdtk.options import QuantizeOptions


def correlated_H(rng, m, T=600, r=None):
    """H = (2/T) X^T X for X = Z A: strongly correlated input columns."""
    r = r or m // 2
    X = rng.standard_normal((T, r)) @ rng.standard_normal((r, m))
    return 2.0 / T * X.T @ X


def naive_gptq(W, H, bits, percdamp=0.01):
    """GPTQ without lazy batches: every column's error goes straight to all later columns."""
    P = prepare_hessian(H, percdamp)
    U = P.U.astype(np.float32)
    W = np.array(W, np.float32)
    W[:, P.dead] = 0
    n, m = W.shape
    What = np.empty((n, m), np.float32)
    for j in range(m):
        if j % 128 == 0:
            s, z = affine_grid(W[:, j : j + 128], bits)
        c = affine_codes(W[:, j : j + 1], s, z, bits)
        What[:, j] = affine_dequantize(c, s, z)[:, 0]
        W[:, j:] -= np.outer((W[:, j] - What[:, j]) / U[j, j], U[j, j:])
    return What


@pytest.mark.parametrize("bits,m", [(2, 256), (2, 200), (4, 136), (3, 64)])
def test_rtn_exact_on_its_grid(rng, bits, m):
    n, maxq = 24, 2**bits - 1
    G = -(-m // 128)
    codes = rng.integers(0, maxq + 1, size=(n, m)).astype(np.uint8)
    for g in range(G):  # every row of every group spans the full code range
        codes[:, g * 128] = 0
        codes[:, g * 128 + 1] = maxq
    scale = rng.uniform(0.01, 0.2, (n, G)).astype(np.float16)
    zero = rng.integers(0, maxq + 1, (n, G)).astype(np.float16)
    W = AffineLayer(codes, scale, zero, bits).dequantize()
    layer = rtn(W, bits)
    np.testing.assert_array_equal(layer.codes, codes)
    np.testing.assert_array_equal(layer.dequantize(), W)


def test_rtn_rounds_to_nearest(rng):
    W = rng.standard_normal((16, 300)).astype(np.float32)
    layer = rtn(W, 2)
    What = layer.dequantize()
    g = np.arange(300) // 128
    s = layer.scale.astype(np.float32)[:, g]
    z = layer.zero.astype(np.float32)[:, g]
    levels = (np.arange(4)[None, None, :] - z[..., None]) * s[..., None]  # [n, m, 4]
    best = np.abs(W[..., None] - levels).min(-1)
    np.testing.assert_allclose(np.abs(W - What), best, atol=1e-6)
    assert layer.codes.max() == 3 and layer.codes.dtype == np.uint8


def test_gptq_8bit_reproduces_weights(rng):
    W = rng.standard_normal((32, 200)).astype(np.float32)
    H = correlated_H(rng, 200)
    layer, _ = gptq(W, H, bits=8)
    What = layer.dequantize()
    assert proxy_error(W, What, H) < 1e-3
    assert np.linalg.norm(W - What) / np.linalg.norm(W) < 1e-2


def test_gptq_beats_rtn_on_correlated_inputs(rng):
    W = rng.standard_normal((48, 256)).astype(np.float32)
    H = correlated_H(rng, 256)
    e_gptq = proxy_error(W, gptq(W, H, bits=2)[0].dequantize(), H)
    e_rtn = proxy_error(W, rtn(W, 2).dequantize(), H)
    assert e_gptq < 0.8 * e_rtn


@pytest.mark.parametrize("blocksize", [128, 32, 96, 256])
def test_gptq_lazy_batches_match_the_plain_sweep(rng, blocksize):
    W = rng.standard_normal((16, 300)).astype(np.float32)
    H = correlated_H(rng, 300)
    What = gptq(W, H, bits=3, blocksize=blocksize)[0].dequantize()
    ref = naive_gptq(W, H, 3)
    # float rounding differs with the order of the updates and may flip a rare rounding tie
    assert np.mean(What != ref) < 0.01
    assert proxy_error(W, What, H) == pytest.approx(proxy_error(W, ref, H), rel=1e-3)


def test_degenerate_rows_and_dead_columns_stay_finite(rng):
    n, m = 6, 160
    W = rng.standard_normal((n, m)).astype(np.float32)
    W[0] = 0
    W[1] = 3.0
    W[2] = -1e-9
    W[3, :128] = 7.5  # a constant group next to a normal one
    H = correlated_H(rng, m)
    H[5, :] = H[:, 5] = 0  # a dead column
    for layer in (rtn(W, 2), gptq(W, H, 2)[0]):
        What = layer.dequantize()
        assert np.all(np.isfinite(What))
        assert np.all(np.isfinite(layer.scale.astype(np.float32)))
        np.testing.assert_array_equal(What[0], 0)
    What = rtn(W, 2).dequantize()
    np.testing.assert_allclose(What[1], 3.0, rtol=1e-3)
    np.testing.assert_allclose(What[3, :128], 7.5, rtol=1e-3)
    np.testing.assert_allclose(What[2], -1e-9, atol=1e-8)


def test_solvers_report_honest_bits_and_proxy_error(rng, tmp_path):
    W = rng.standard_normal((64, 384)).astype(np.float32)
    H = correlated_H(rng, 384)
    for solve in (solve_rtn, solve_gptq):
        layer, report = solve(W, H, QuantizeOptions(method="rtn", bits=2), "x.weight")
        assert report["bits_per_weight"] == affine_bits(64, 384, 2) / (64 * 384) == 2.25
        assert report["proxy_error"] == pytest.approx(proxy_error(W, layer.dequantize(), H))
        assert report["seconds"] >= 0
        # the stored form dequantizes to exactly what was reported
        write_solution_block(tmp_path / "b.safetensors", {"x.weight": layer}, "fp")
        back = read_solution_block(tmp_path / "b.safetensors")["x.weight"]
        np.testing.assert_array_equal(back.dequantize(), layer.dequantize())
    assert solve_rtn(W, None, QuantizeOptions(method="rtn"))[1]["proxy_error"] is None


def test_bad_input_is_a_clear_error(rng):
    W = rng.standard_normal((4, 64)).astype(np.float32)
    with pytest.raises(QdtkError, match="w.weight: H has shape"):
        solve_gptq(W, np.eye(32), QuantizeOptions(method="gptq"), "w.weight")
    with pytest.raises(QdtkError, match="needs the statistic H"):
        solve_gptq(W, None, QuantizeOptions(method="gptq"))
    with pytest.raises(QdtkError, match="bits must be 1..8"):
        solve_rtn(W, None, QuantizeOptions(method="rtn", bits=9))
    W[0, 0] = np.nan
    with pytest.raises(QdtkError, match="finite"):
        solve_rtn(W, None, QuantizeOptions(method="rtn"))
