"""Quadratic forms of a weight change with a layer's H: the measure of every layer error.

    tr(X H_damped X^T) = ||X R||^2 for H_damped = R R^T (qdtk.math.hessian), and tr(X H X^T) for the
    H as given, recovered exactly from it. NumPy or CuPy arrays alike; no options, no files.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from qdtk.backend import array_module, to_host
from qdtk.math.hessian import PreparedHessian, shrunk_form_correction

QF_BLOCK = 512  # columns of X R per product in damped_quadratic_form


def damped_quadratic_form(X, R) -> float:
    """tr(X H_damped X^T) = ||X R||^2 for H_damped = R R^T, R [m, m] upper triangular.

    X R costs n m^2 flops (half of X H), taken as products of QF_BLOCK columns: BLAS runs
    those faster than one triangular product. NumPy or CuPy (X is moved to R's kind)."""
    X = array_module(R).asarray(X, R.dtype)
    total = 0.0
    for s in range(0, X.shape[1], QF_BLOCK):
        e = min(X.shape[1], s + QF_BLOCK)
        total += sum_squares(X[:, :e] @ R[:e, s:e])  # (X R)[:, s:e]: R[e:, s:e] = 0
    return total


def quadratic_form(X, P: PreparedHessian, R=None) -> float:
    """tr(X H X^T) for the H as given: the damped form minus delta ||X||^2 and the dead
    columns' ||X_j||^2 (H_damped = H_s + delta I + 1 on dead columns), then the shrinkage
    undone (hessian.shrunk_form_correction); all exact.
    R: P.R where it lives (a CuPy copy on a GPU); X NumPy or of R's kind."""
    R = P.R if R is None else R
    X = array_module(R).asarray(X, R.dtype)
    return undamped_form(damped_quadratic_form(X, R), X, P)


def undamped_form(damped: float, X, P: PreparedHessian) -> float:
    """tr(X H X^T) for the H as given from damped = tr(X H_damped X^T) (quadratic_form's
    corrections, for a damped form known already); X NumPy or CuPy, n m flops."""
    xp = array_module(X)
    total = damped - P.damping * sum_squares(X)
    total -= sum_squares(X[:, xp.asarray(P.dead)])
    if P.shrink:
        col_sq = (X * X).sum(axis=0, dtype=xp.float64)  # [m]
        total = shrunk_form_correction(to_host(col_sq), P.source, P.shrink, total)
    return max(total, 0.0)


def sum_squares(X) -> float:
    """||X||_F^2 of a 2-D array, accumulated in float64 (NumPy: one parallel pass, no
    temporary, the same bits at any thread count; CuPy: on the device)."""
    xp = array_module(X)
    if xp is np:
        return float(_row_sums_of_squares(X).sum())
    return float(xp.sum(xp.square(X), dtype=xp.float64))


@njit(parallel=True, cache=True)
def _row_sums_of_squares(X):  # pragma: no cover - compiled
    out = np.empty(X.shape[0])
    for i in prange(X.shape[0]):
        s = 0.0
        for j in range(X.shape[1]):
            s += np.float64(X[i, j]) ** 2
        out[i] = s
    return out


def proxy_error(W: np.ndarray, What: np.ndarray, H: np.ndarray) -> float:
    """tr(D H D^T) / tr(W H W^T) with D = W - What, in float64 (0 when W H W^T vanishes)."""
    W = np.asarray(W, np.float64)
    H = np.asarray(H, np.float64)
    D = W - np.asarray(What, np.float64)  # [n, m]
    num = float(np.einsum("ij,ij->", D @ H, D))
    den = float(np.einsum("ij,ij->", W @ H, W))
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))
