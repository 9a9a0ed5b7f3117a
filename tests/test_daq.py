"""DAQ block solver: Numba against the NumPy reference, the objective, closed forms, edge cases."""

import numpy as np
import pytest

from qdtk.errors import QdtkError
from qdtk.math.daq import cpu, error_weights, reference, resolve_backend, solve_block


def rel(x, y):
    return np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-300)


def random_E(rng, W):
    """Salience-style weights: column-dependent scale, so some entries exceed tau."""
    s = W**2 * rng.uniform(0.2, 5.0, W.shape[1])
    return error_weights(s, 2.0, 3.0)


@pytest.mark.parametrize("K", [1, 2, 3, 4])
@pytest.mark.parametrize("n, w", [(1, 128), (70, 128), (130, 37), (cpu.PARALLEL_MIN_ROWS + 70, 24)])
def test_numba_agrees_with_reference_float64(rng, K, n, w):
    W = rng.standard_normal((n, w))
    E = random_E(rng, W)
    s1, a1, b1 = solve_block(W, K, E, backend="reference")
    s2, a2, b2 = solve_block(W, K, E, backend="cpu")
    assert s2.shape == (K, n, w) and a2.shape == (K, n) and b2.shape == (K, w)
    assert a2.dtype == b2.dtype == np.float64 and s2.dtype == bool
    np.testing.assert_array_equal(s1, s2)  # random data: no exact ties
    assert rel(reference.reconstruct(s2, a2, b2), reference.reconstruct(s1, a1, b1)) < 1e-5


@pytest.mark.parametrize("K", [1, 2, 3])
def test_numba_agrees_with_reference_float32_and_without_refit(rng, K):
    W = rng.standard_normal((96, 100)).astype(np.float32)
    E = random_E(rng, W)
    for refit in (True, False):
        s1, a1, b1 = solve_block(W, K, E, iters=7, refit=refit, backend="reference")
        s2, a2, b2 = solve_block(W, K, E, iters=7, refit=refit, backend="cpu")
        assert a2.dtype == np.float32 and b2.dtype == np.float32
        assert np.mean(s1 != s2) < 1e-3
        assert rel(reference.reconstruct(s2, a2, b2), reference.reconstruct(s1, a1, b1)) < 1e-3


@pytest.mark.parametrize("dist", ["gaussian", "student_t"])
@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_objective_never_increases(rng, dist, K):
    shape = (48, 128)
    W = rng.standard_normal(shape) if dist == "gaussian" else rng.standard_t(2.5, shape)
    E = random_E(rng, W)
    assert (E > 1).any()
    trace = []
    reference.solve_block(W, K, E, iters=10, trace=trace)
    # init, then per round 2K scale steps (+1 sign step for K >= 2), then the refit
    assert len(trace) == 1 + 10 * (2 * K + (K >= 2)) + 2 * K
    L0 = np.sum(E * W * W)
    assert trace[0] < L0
    steps = np.diff(trace)
    assert np.all(steps <= 1e-9 * trace[0]), steps.max()
    assert trace[-1] < trace[0]
    s, a, b = reference.solve_block(W, K, E, iters=10)
    assert reference.objective(W, E, s, a, b) == pytest.approx(trace[-1], rel=1e-12)


def test_more_planes_help(rng):
    err = {K: [] for K in range(1, 5)}
    for _ in range(4):
        W = rng.standard_normal((64, 128))
        for K in err:
            s, a, b = solve_block(W, K)
            err[K].append(np.sum((W - reference.reconstruct(s, a, b)) ** 2) / np.sum(W**2))
    means = [np.mean(err[K]) for K in range(1, 5)]
    assert means[0] > means[1] > means[2] > means[3]
    assert means[0] < 0.5  # one plane: sign times a rank-1 magnitude beats nothing clearly


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_order_one_closed_form_by_hand(backend):
    # E = 1, K = 1: B = sign(W) stays, and the scales alternate as a power iteration on |W|,
    # so What = sign(W) (.) (the best rank-1 approximation of |W|). For |W| = [[2, 1], [1, 1]]
    # the top eigenvalue is phi^2 with eigenvector (1, 1/phi), phi = (1 + sqrt 5) / 2, giving
    # phi^2 / (1 + phi^-2) * [[1, 1/phi], [1/phi, phi^-2]]
    #   = [[1 + 2/sqrt5, (5 + 3 sqrt5)/10], [(5 + 3 sqrt5)/10, (5 + sqrt5)/10]].
    r5 = np.sqrt(5.0)
    W = np.array([[2.0, -1.0], [1.0, -1.0]])
    expect = np.array([[1 + 2 / r5, -(5 + 3 * r5) / 10], [(5 + 3 * r5) / 10, -(5 + r5) / 10]])
    s, a, b = solve_block(W, 1, backend=backend)
    np.testing.assert_allclose(reference.reconstruct(s, a, b), expect, rtol=1e-7)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_order_one_is_sign_times_rank_one_of_abs(rng, backend):
    W = rng.standard_normal((40, 128))
    s, a, b = solve_block(W, 1, iters=30, backend=backend)
    U, S, Vt = np.linalg.svd(np.abs(W))
    expect = np.sign(W) * (S[0] * np.outer(U[:, 0], Vt[0]))
    np.testing.assert_allclose(reference.reconstruct(s, a, b), expect, rtol=1e-6, atol=1e-9)


def test_error_weights():
    s = np.zeros((4, 5))
    s[0, 0] = 100.0  # z = (100 - 5) / sqrt(475 - 25) ~ 4.5 > 2
    E = error_weights(s, tau=2.0, lam=3.0)
    assert E[0, 0] == 3.0 and np.all(E.ravel()[1:] == 1.0)
    assert np.all(error_weights(s, tau=5.0, lam=3.0) == 1.0)
    assert np.all(error_weights(np.full((3, 3), 7.0)) == 1.0)  # constant salience: no outliers


def test_weighted_error_follows_E(rng):
    W = rng.standard_t(3, (64, 128))
    E = np.ones_like(W)
    E[:, :8] = 50.0
    s0, a0, b0 = solve_block(W, 2)
    s1, a1, b1 = solve_block(W, 2, E)
    err = lambda s, a, b: np.sum((W - reference.reconstruct(s, a, b))[:, :8] ** 2)  # noqa: E731
    assert err(s1, a1, b1) < err(s0, a0, b0)


def degenerate_blocks(rng):
    zero_row = rng.standard_normal((20, 128))
    zero_row[3] = 0
    zero_col = rng.standard_normal((20, 50))
    zero_col[:, 7] = 0
    return {
        "zeros": np.zeros((16, 128)),
        "constant": np.full((16, 40), 0.3),
        "zero_row": zero_row,
        "zero_col": zero_col,
        "one_element": np.array([[2.5]]),
    }


@pytest.mark.parametrize("K", [1, 2, 3])
def test_degenerate_blocks_are_finite(rng, K):
    for what, W in degenerate_blocks(rng).items():
        for dtype in (np.float64, np.float32):
            W = W.astype(dtype)
            res = {b: solve_block(W, K, backend=b) for b in ("reference", "cpu")}
            for backend, (s, a, b) in res.items():
                assert np.all(np.isfinite(a)) and np.all(np.isfinite(b)), (what, backend)
                What = reference.reconstruct(s, a, b)
                assert np.sum((W - What) ** 2) <= np.sum(W**2) * (1 + 1e-6), (what, backend)
            np.testing.assert_allclose(
                reference.reconstruct(*res["cpu"]), reference.reconstruct(*res["reference"]),
                atol=1e-5, err_msg=what,
            )
    s, a, b = solve_block(np.full((16, 40), 0.3), K)
    np.testing.assert_allclose(reference.reconstruct(s, a, b), 0.3, rtol=1e-6)
    W = degenerate_blocks(rng)["zero_row"]
    s, a, b = solve_block(W, K)
    assert np.all(a[:, 3] == 0)


def test_sign_search_tie_rule_is_shared():
    # two planes with equal magnitudes c: values -2c, 0, 0, 2c for p = 0..3; W = 0 ties
    # p = 1 (B0 = +1, B1 = -1) and p = 2: the smaller pattern, p = 1, wins in both backends
    a = np.array([[1.0, 2.0], [2.0, 4.0]])  # [K, n]
    b = np.array([[1.0, 0.5, 3.0], [0.5, 0.25, 1.5]])  # [K, w]: a0 b0 = a1 b1 per element
    W = np.zeros((2, 3))
    W[1, 2] = 7.0  # c = 6: nearer to 2c than to 0, so p = 3
    ref = reference.update_signs(W, a, b)
    S = np.zeros((2, 2, 3))
    cpu._search_pass(W, S, a, b)
    np.testing.assert_array_equal(S > 0, ref)
    expect = np.zeros((2, 2, 3), bool)
    expect[0] = True  # B0 = +1 everywhere, B1 = -1 ...
    expect[1, 1, 2] = True  # ... except the element nearest to +2c
    np.testing.assert_array_equal(ref, expect)


def test_backend_names():
    assert resolve_backend("auto") in ("cpu", "cuda")
    assert resolve_backend("reference") == "reference"
    with pytest.raises(QdtkError, match="unknown DAQ backend"):
        solve_block(np.ones((2, 2)), 1, backend="abacus")
    with pytest.raises(QdtkError, match="order"):
        solve_block(np.ones((2, 2)), 0)


def test_numba_is_deterministic(rng):
    W = rng.standard_normal((300, 128)).astype(np.float32)
    E = random_E(rng, W)
    first = solve_block(W, 2, E)
    for x, y in zip(first, solve_block(W, 2, E), strict=True):
        np.testing.assert_array_equal(x, y)
