"""The DAQ block solver in plain NumPy (METHOD.md §3): written to be read, the truth the kernels
match.

One block Wb [n, w] (w <= 128) and an order K are approximated by

    What = sum_k (a_k b_k^T) (.) B_k,    a_k [n] row scale, b_k [w] column scale, B_k in {-1,+1}

minimising L = sum_ij E_ij (Wb_ij - What_ij)^2: greedy residual initialisation, then `iters`
alternating rounds (per plane: row scale, column scale; then, for K >= 2, the exhaustive sign
search), then (qdtk) one more round of scale updates. Every step minimises L exactly in its own
variables (up to EPS in the denominators), so L never increases.

Conventions shared with every backend (cpu.py, cuda.py):
- signs are bool, True = +1; sign(0) = +1 in the initialisation.
- Sign search: pattern p in 0 .. 2^K - 1 sets B_k = +1 where bit k of p is 1. Its value is
  v_p = sum_k (+-c_k) with c_k = a_k,i * b_k,j, added in order k = 0, 1, ... starting from 0.
  The element takes the smallest p with the least |Wb_ij - v_p| (ties go to the smaller p).
- The greedy initialisation divides by a_k,i only where a_k,i > 0 (a zero row contributes 0).
"""

from __future__ import annotations

import numpy as np

from qdtk.backend import array_module

EPS = 1e-8  # keeps the scale updates finite on zero rows and columns


def error_weights(s: np.ndarray, tau: float = 2.0, lam: float = 3.0) -> np.ndarray:
    """[n, w] E_ij = lam where the z-score of the block's salience exceeds tau, else 1."""
    xp = array_module(s)  # NumPy or CuPy
    std = float(s.std())
    if not std > 0:
        return xp.ones_like(s)
    return xp.where((s - s.mean()) / std > tau, s.dtype.type(lam), s.dtype.type(1))


def pm(signs: np.ndarray, dtype) -> np.ndarray:
    """Bool signs as +-1 of `dtype`."""
    return np.where(signs, 1, -1).astype(dtype)


def reconstruct(signs: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[n, w] sum_k (a_k b_k^T) (.) B_k in the dtype of a."""
    What = np.zeros(signs.shape[1:], a.dtype)
    for k in range(signs.shape[0]):
        What += np.outer(a[k], b[k]) * pm(signs[k], a.dtype)
    return What


def objective(W: np.ndarray, E: np.ndarray, signs, a, b) -> float:
    """L = sum_ij E_ij (Wb_ij - What_ij)^2, in float64."""
    D = W.astype(np.float64) - reconstruct(signs, a.astype(np.float64), b.astype(np.float64))
    return float(np.sum(E * D * D))


def greedy_init(W: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy residual binarisation: plane k fits the residual left by planes < k."""
    n, w = W.shape
    signs = np.empty((K, n, w), bool)
    a = np.empty((K, n), W.dtype)
    b = np.empty((K, w), W.dtype)
    R = W.copy()
    for k in range(K):
        absR = np.abs(R)
        a[k] = absR.mean(axis=1)
        safe = np.where(a[k] > 0, a[k], 1)
        b[k] = np.where(a[k][:, None] > 0, absR / safe[:, None], 0).mean(axis=0)
        signs[k] = R >= 0
        R -= np.outer(a[k], b[k]) * pm(signs[k], W.dtype)
    return signs, a, b


def others(W, signs, a, b, k) -> np.ndarray:
    """[n, w] Wt = Wb - sum_{l != k} (a_l b_l^T) (.) B_l: what plane k has to fit."""
    Wt = W.copy()
    for l in range(signs.shape[0]):
        if l != k:
            Wt -= np.outer(a[l], b[l]) * pm(signs[l], W.dtype)
    return Wt


def row_scale(Wt, E, Bk, bk) -> np.ndarray:
    """[n] a_k,i = sum_j E b B Wt / (sum_j E b^2 + eps): exact minimiser of L in a_k."""
    return (E * Bk * Wt) @ bk / (E @ (bk * bk) + EPS)


def col_scale(Wt, E, Bk, ak) -> np.ndarray:
    """[w] b_k,j = sum_i E a B Wt / (sum_i E a^2 + eps): exact minimiser of L in b_k."""
    return ak @ (E * Bk * Wt) / ((ak * ak) @ E + EPS)


def update_scales(W, E, signs, a, b, trace: list | None = None) -> None:
    """One round of row then column scale updates, plane by plane (in place)."""
    for k in range(signs.shape[0]):
        Wt = others(W, signs, a, b, k)
        Bk = pm(signs[k], W.dtype)
        a[k] = row_scale(Wt, E, Bk, b[k])
        if trace is not None:
            trace.append(objective(W, E, signs, a, b))
        b[k] = col_scale(Wt, E, Bk, a[k])
        if trace is not None:
            trace.append(objective(W, E, signs, a, b))


def update_signs(W, a, b) -> np.ndarray:
    """[K, n, w] per element, the sign pattern nearest to Wb (exhaustive over 2^K)."""
    K = a.shape[0]
    P = 2**K
    vals = np.zeros((P, *W.shape), W.dtype)  # [2^K, n, w]
    for k in range(K):
        c = np.outer(a[k], b[k])
        bit = ((np.arange(P) >> k) & 1).astype(bool)
        vals[bit] += c
        vals[~bit] -= c
    p = np.argmin(np.abs(W[None] - vals), axis=0)  # first minimum: the smallest p wins ties
    return np.stack([((p >> k) & 1).astype(bool) for k in range(K)])


def solve_block(
    W: np.ndarray,
    order: int,
    E: np.ndarray | None = None,
    *,
    iters: int = 15,
    refit: bool = True,
    trace: list | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(signs [K, n, w] bool, a [K, n], b [K, w]) in W's dtype; `trace` collects L per step."""
    W = np.asarray(W)
    E = np.ones_like(W) if E is None else np.asarray(E, W.dtype)
    signs, a, b = greedy_init(W, order)
    if trace is not None:
        trace.append(objective(W, E, signs, a, b))
    for _ in range(iters):
        update_scales(W, E, signs, a, b, trace)
        if order >= 2:
            signs = update_signs(W, a, b)
            if trace is not None:
                trace.append(objective(W, E, signs, a, b))
    if refit:
        update_scales(W, E, signs, a, b, trace)
    return signs, a, b
