"""Preparing H: the factor R, U = R^-1, dead columns, damping retries, salience."""

import numpy as np
import pytest

from qdtk.errors import QdtkError
from qdtk.math.hessian import (
    all_finite,
    cholesky_lower,
    prepare_hessian,
    reverse_inplace,
    reversed_copy,
    salience,
)


def correlated_H(rng, m, tokens=400):
    X = rng.standard_normal((tokens, m)) @ rng.standard_normal((m, m))
    return (2.0 / tokens) * X.T @ X


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-9), (np.float32, 1e-3)])
def test_factors(rng, dtype, tol):
    H = correlated_H(rng, 40)
    P = prepare_hessian(H, 0.01, dtype=dtype)
    assert P.H.dtype == P.R.dtype == dtype
    Hd = H + P.damping * np.eye(40)
    assert P.damping == pytest.approx(0.01 * np.mean(np.diag(H)))
    np.testing.assert_allclose(P.H, Hd, rtol=1e-6)
    R, U = P.R.astype(np.float64), P.U.astype(np.float64)
    assert np.all(np.tril(R, -1) == 0) and np.all(np.tril(U, -1) == 0)
    assert np.all(np.diag(R) > 0)
    assert np.abs(R @ R.T - Hd).max() <= tol * np.abs(Hd).max()
    assert np.abs(U.T @ U @ Hd - np.eye(40)).max() <= tol * 10
    np.testing.assert_allclose(P.d, np.diag(U), rtol=1e-6)
    # the GPTQ definition: U is the upper Cholesky factor of H^-1
    U_gptq = np.linalg.cholesky(np.linalg.inv(Hd)).T
    np.testing.assert_allclose(U, U_gptq, rtol=tol * 100, atol=tol * np.abs(U_gptq).max())
    assert cholesky_lower(-np.eye(3, dtype=dtype)) is None
    # the damped H is formed on demand from the caller's H, which stays as it was
    assert P.source is H and not np.shares_memory(P.H, H)


def test_reversals(rng):
    A = rng.standard_normal((5, 5))
    for X in (A, np.asfortranarray(A)):
        Y = X.copy(order="K")
        assert reverse_inplace(Y) is Y
        np.testing.assert_array_equal(Y, A[::-1, ::-1])
    S = A + A.T  # symmetric: its flat buffer reads the same in either order
    for X in (S, np.asfortranarray(S)):
        F = reversed_copy(X, np.float32)
        assert F.dtype == np.float32 and F.flags.c_contiguous
        np.testing.assert_array_equal(F, S[::-1, ::-1].astype(np.float32))


def test_all_finite():
    A = np.ones((3, 3), np.float32)
    assert all_finite(A)
    for bad in (np.nan, np.inf, -np.inf):
        B = A.copy()
        B[1, 2] = bad
        assert not all_finite(B)
    assert all_finite(np.full((3, 3), 3e38, np.float32))  # its float32 sum would overflow


def test_dead_columns(rng):
    H = correlated_H(rng, 10)
    H[3, :] = H[:, 3] = 0
    P = prepare_hessian(H)
    assert P.dead.tolist() == [j == 3 for j in range(10)]
    assert P.H[3, 3] == pytest.approx(1 + P.damping)
    assert np.all(np.isfinite(P.R))
    assert np.all(prepare_hessian(np.zeros((4, 4))).dead)


def test_damping_retries_and_failure():
    # eigenvalues 1, 1, -0.4 (mean diagonal 0.533): 0.01 and 0.1 x the mean fail, 1x works
    Q = np.linalg.qr(np.arange(9.0).reshape(3, 3) + np.eye(3))[0]
    H = Q @ np.diag([1.0, 1.0, -0.4]) @ Q.T
    P = prepare_hessian(H, 0.01, name="blk.q")
    assert P.retries == 2
    assert P.damping == pytest.approx(np.mean(np.diag(H)))
    with pytest.raises(QdtkError, match="blk.q.*not positive definite"):
        prepare_hessian(H, 0.01, retries=1, name="blk.q")


def test_nan_in_H_names_the_layer():
    H = np.eye(3)
    H[0, 1] = np.nan
    with pytest.raises(QdtkError, match="model.layers.0.mlp.up_proj"):
        prepare_hessian(H, name="model.layers.0.mlp.up_proj")


def test_salience():
    W = np.array([[1.0, -2.0], [3.0, 0.0]])
    d = np.array([0.5, 2.0])
    np.testing.assert_array_equal(salience(W, d), [[4.0, 1.0], [36.0, 0.0]])
