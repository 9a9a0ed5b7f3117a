"""The DAQ block solver as Numba kernels (SPEC 4): the default on CPU.

Same algorithm and conventions as reference.py (read that first); only the schedule differs.
Each pass runs over fixed chunks of CHUNK rows in parallel and does, per row, everything that
is row-local, so there are K passes per iteration and no [n, w, 2^K] temporaries:

    pass for plane k:  (k = 0 and a sign update is due: the row's sign search first)
                       Wt_i = Wb_i - sum_{l != k} (a_l,i b_l) (.) B_l,i
                       a_k,i = <E_i b_k B_k,i, Wt_i> / (<E_i, b_k^2> + eps)
                       this chunk's partial sums of the b_k update
    then               b_k = (partial sums added in chunk order) / (... + eps)

The sign search that ends iteration t is fused into the first pass of iteration t + 1: it only
needs row i's own signs and the final scales. Every chunk writes its own partial sums, so the
column scales do not depend on the thread count or the scheduling (runs are reproducible).
Blocks of fewer than PARALLEL_MIN_ROWS rows run the same chunks on one thread.

Inside a row the work is elementwise over the columns j (row buffers, signs held as int8 +-1),
which LLVM can vectorise without fastmath; row sums use LANES interleaved accumulators.
Arithmetic is in W's dtype (the scalars `zero` and `eps` carry it into the kernels).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from qdtk.daq.reference import EPS

CHUNK = 64  # rows per parallel work item and per partial sum of the column scales
LANES = 8  # interleaved accumulators of a row sum
PARALLEL_MIN_ROWS = 1024  # smaller blocks run on one thread: a pass would not pay its launch


@njit(cache=True, inline="always")
def _rowsum(x, acc, zero):
    """sum_j x_j with LANES interleaved partial sums (vectorisable, fixed order)."""
    w = x.shape[0]
    w8 = w - w % LANES
    for q in range(LANES):
        acc[q] = zero
    for j in range(0, w8, LANES):
        for q in range(LANES):
            acc[q] += x[j + q]
    s = zero
    for q in range(LANES):
        s += acc[q]
    for j in range(w8, w):
        s += x[j]
    return s


@njit(cache=True, inline="always")
def _search_row(W, S, a, b, i, C, V, best, bp):
    """S[:, i] := per element the smallest pattern p minimising |Wb_ij - v_p| (see reference)."""
    K, w = a.shape[0], W.shape[1]
    for k in range(K):
        for j in range(w):
            C[k, j] = a[k, i] * b[k, j]
    for j in range(w):
        best[j] = np.inf
        bp[j] = 0
    for p in range(1 << K):
        V[:] = 0
        for k in range(K):
            if (p >> k) & 1:
                for j in range(w):
                    V[j] += C[k, j]
            else:
                for j in range(w):
                    V[j] -= C[k, j]
        for j in range(w):
            d = abs(W[i, j] - V[j])
            if d < best[j]:
                best[j] = d
                bp[j] = p
    for k in range(K):
        for j in range(w):
            S[k, i, j] = 1 if (bp[j] >> k) & 1 else -1


@njit(cache=True, fastmath=False)
def _init_chunk(W, S, a, b, k, num, zero, c):
    """Greedy init of plane k on R = Wb - planes < k for the rows of chunk c: a_k, B_k, and
    the chunk's partial sums of |R| / a_k."""
    n, w = W.shape
    R = np.empty(w, W.dtype)
    absR = np.empty(w, W.dtype)
    acc = np.empty(LANES, W.dtype)
    num[c, :] = zero
    for i in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
        for j in range(w):
            R[j] = W[i, j]
        for l in range(k):
            al = a[l, i]
            for j in range(w):
                R[j] -= al * b[l, j] * S[l, i, j]
        for j in range(w):
            absR[j] = abs(R[j])
        ai = _rowsum(absR, acc, zero) / w
        a[k, i] = ai
        for j in range(w):
            S[k, i, j] = 1 if R[j] >= 0 else -1
        if ai > 0:
            for j in range(w):
                num[c, j] += absR[j] / ai


@njit(cache=True, fastmath=False)
def _plane_chunk(W, E, S, a, b, k, search, num, den, zero, eps, c):
    """For the rows of chunk c: the sign search if `search`, then the row scales a_k and the
    chunk's partial sums of the b_k update."""
    n, w = W.shape
    K = a.shape[0]
    Wt = np.empty(w, W.dtype)
    T1 = np.empty(w, W.dtype)
    T2 = np.empty(w, W.dtype)
    acc = np.empty(LANES, W.dtype)
    C = np.empty((K, w), W.dtype)
    V = np.empty(w, W.dtype)
    best = np.empty(w, W.dtype)
    bp = np.empty(w, np.int64)
    num[c, :] = zero
    den[c, :] = zero
    for i in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
        if search:
            _search_row(W, S, a, b, i, C, V, best, bp)
        for j in range(w):
            Wt[j] = W[i, j]
        for l in range(K):
            if l != k:
                al = a[l, i]
                for j in range(w):
                    Wt[j] -= al * b[l, j] * S[l, i, j]
        for j in range(w):
            T1[j] = E[i, j] * b[k, j] * S[k, i, j] * Wt[j]
            T2[j] = E[i, j] * b[k, j] * b[k, j]
        ai = _rowsum(T1, acc, zero) / (_rowsum(T2, acc, zero) + eps)
        a[k, i] = ai
        for j in range(w):
            num[c, j] += E[i, j] * ai * S[k, i, j] * Wt[j]
            den[c, j] += E[i, j] * ai * ai


@njit(parallel=True, cache=True, fastmath=False)
def _init_pass(W, S, a, b, k, num, zero, parallel):
    if parallel:
        for c in prange(num.shape[0]):
            _init_chunk(W, S, a, b, k, num, zero, c)
    else:
        for c in range(num.shape[0]):
            _init_chunk(W, S, a, b, k, num, zero, c)


@njit(parallel=True, cache=True, fastmath=False)
def _plane_pass(W, E, S, a, b, k, search, num, den, zero, eps, parallel):
    if parallel:
        for c in prange(num.shape[0]):
            _plane_chunk(W, E, S, a, b, k, search, num, den, zero, eps, c)
    else:
        for c in range(num.shape[0]):
            _plane_chunk(W, E, S, a, b, k, search, num, den, zero, eps, c)


@njit(parallel=True, cache=True, fastmath=False)
def _search_pass(W, S, a, b):
    n, w = W.shape
    K = a.shape[0]
    for c in prange((n + CHUNK - 1) // CHUNK):
        C = np.empty((K, w), W.dtype)
        V = np.empty(w, W.dtype)
        best = np.empty(w, W.dtype)
        bp = np.empty(w, np.int64)
        for i in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
            _search_row(W, S, a, b, i, C, V, best, bp)


@njit(cache=True)
def _chunk_sum(part, j):
    s = part[0, j]
    for c in range(1, part.shape[0]):
        s += part[c, j]
    return s


@njit(cache=True)
def _solve(W, E, K, iters, refit, zero, eps):
    n, w = W.shape
    parallel = n >= PARALLEL_MIN_ROWS
    S = np.empty((K, n, w), np.int8)  # signs as +-1
    a = np.zeros((K, n), W.dtype)
    b = np.zeros((K, w), W.dtype)
    chunks = (n + CHUNK - 1) // CHUNK
    num = np.empty((chunks, w), W.dtype)
    den = np.empty((chunks, w), W.dtype)
    for k in range(K):
        _init_pass(W, S, a, b, k, num, zero, parallel)
        for j in range(w):
            b[k, j] = _chunk_sum(num, j) / n
    for t in range(iters + (1 if refit else 0)):
        for k in range(K):
            search = k == 0 and t > 0 and K >= 2  # the sign update that ended round t - 1
            _plane_pass(W, E, S, a, b, k, search, num, den, zero, eps, parallel)
            for j in range(w):
                b[k, j] = _chunk_sum(num, j) / (_chunk_sum(den, j) + eps)
    if K >= 2 and iters > 0 and not refit:
        _search_pass(W, S, a, b)
    return S > 0, a, b


def solve_block(
    W: np.ndarray,
    order: int,
    E: np.ndarray | None = None,
    *,
    iters: int = 15,
    refit: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(signs [K, n, w] bool, a [K, n], b [K, w]) in W's dtype; see qdtk.daq.solve_block."""
    W = np.ascontiguousarray(W)
    if W.dtype not in (np.float32, np.float64):
        W = W.astype(np.float64)
    E = np.ones_like(W) if E is None else np.ascontiguousarray(E, W.dtype)
    t = W.dtype.type
    return _solve(W, E, int(order), int(iters), bool(refit), t(0), t(EPS))
