"""The DAQ block solver as Numba kernels (METHOD.md §3): the default on CPU.

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
which LLVM vectorises; only the row sums are reassociated (ROWSUM). Arithmetic is in W's dtype
(the scalar `eps` carries it into the kernels).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from qdtk.math.daq.reference import EPS
from qdtk.math.lanes import lane_dot

CHUNK = 64  # rows per parallel work item and per partial sum of the column scales
PARALLEL_MIN_ROWS = 1024  # smaller blocks run on one thread: a pass would not pay its launch
# No reassociation anywhere: the bits must not depend on where a kernel was compiled
# (qdtk.math.lanes). The row sums are `_lane_sum`s; the sign search keeps IEEE order too (its
# tie rule is shared with the reference).
ROWSUM = {"nsz"}


@njit(cache=True, inline="always")
def _lane_sum(x, w):
    """sum_{j < w} x[j] in qdtk.math.lanes' fixed order."""
    return lane_dot(x, None, w)


@njit(cache=True, inline="always")
def _others(W, S, a, b, i, k, K, Wt):
    """Wt := Wb_i - sum_{l < K, l != k} (a_l,i b_l) (.) B_l,i (one row, what plane k fits)."""
    for j in range(W.shape[1]):
        Wt[j] = W[i, j]
    for l in range(K):
        if l != k:
            al = a[l, i]
            for j in range(W.shape[1]):
                Wt[j] -= al * b[l, j] * S[l, i, j]


@njit(cache=True)
def _search_row_2(W, S, a, b, i):
    """_search_row for K = 2, the four candidates held in registers."""
    a0, a1 = a[0, i], a[1, i]
    for j in range(W.shape[1]):
        c0, c1, x = a0 * b[0, j], a1 * b[1, j], W[i, j]
        d0, d1 = abs(x - (-c0 - c1)), abs(x - (c0 - c1))
        d2, d3 = abs(x - (-c0 + c1)), abs(x - (c0 + c1))
        m01, m23 = min(d0, d1), min(d2, d3)
        # the smallest p among the least distances: pair winners, then the pairs
        lo = 0 if d0 <= d1 else 1
        hi = 2 if d2 <= d3 else 3
        bp = lo if m01 <= m23 else hi
        S[0, i, j] = 1 if bp & 1 else -1
        S[1, i, j] = 1 if bp & 2 else -1


@njit(cache=True)
def _search_row_3(W, S, a, b, i):
    """_search_row for K = 3, the eight candidates held in registers."""
    a0, a1, a2 = a[0, i], a[1, i], a[2, i]
    for j in range(W.shape[1]):
        c0, c1, c2, x = a0 * b[0, j], a1 * b[1, j], a2 * b[2, j], W[i, j]
        best, bp = np.inf, 0
        for p in range(8):
            v = c0 if p & 1 else -c0
            v = v + c1 if p & 2 else v - c1
            v = v + c2 if p & 4 else v - c2
            d = abs(x - v)
            bp, best = (p, d) if d < best else (bp, best)
        S[0, i, j] = 1 if bp & 1 else -1
        S[1, i, j] = 1 if bp & 2 else -1
        S[2, i, j] = 1 if bp & 4 else -1


@njit(cache=True)
def _search_row(W, S, a, b, i, C, V, best, bp):
    """S[:, i] := per element the smallest pattern p minimising |Wb_ij - v_p| (see reference).
    Branch-free updates of best and bp, so the loops vectorise; K = 2, 3 keep all candidates
    in registers."""
    K, w = a.shape[0], W.shape[1]
    if K == 2:
        return _search_row_2(W, S, a, b, i)
    if K == 3:
        return _search_row_3(W, S, a, b, i)
    for k in range(K):
        ak = a[k, i]
        for j in range(w):
            C[k, j] = ak * b[k, j]
    for j in range(w):
        best[j] = np.inf
        bp[j] = 0
    for p in range(1 << K):
        for j in range(w):
            V[j] = 0
        for k in range(K):
            if (p >> k) & 1:
                for j in range(w):
                    V[j] += C[k, j]
            else:
                for j in range(w):
                    V[j] -= C[k, j]
        for j in range(w):
            d = abs(W[i, j] - V[j])
            take = d < best[j]
            best[j] = d if take else best[j]
            bp[j] = p if take else bp[j]
    for k in range(K):
        for j in range(w):
            S[k, i, j] = 1 if (bp[j] >> k) & 1 else -1


@njit(cache=True, fastmath=ROWSUM)
def _init_chunk(W, S, a, b, k, num, c):
    """Greedy init of plane k on R = Wb - planes < k for the rows of chunk c: a_k, B_k, and
    the chunk's partial sums of |R| / a_k."""
    n, w = W.shape
    R = np.empty(w, W.dtype)
    for j in range(w):
        num[c, j] = 0
    for i in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
        _others(W, S, a, b, i, k, k, R)  # the planes before k
        for j in range(w):
            S[k, i, j] = 1 if R[j] >= 0 else -1
            R[j] = abs(R[j])
        ai = _lane_sum(R, w) / w
        a[k, i] = ai
        if ai > 0:
            for j in range(w):
                num[c, j] += R[j] / ai


@njit(cache=True, fastmath=ROWSUM)
def _plane_chunk(W, E, S, a, b, k, search, num, den, eps, c):
    """For the rows of chunk c: the sign search if `search`, then the row scales a_k and the
    chunk's partial sums of the b_k update."""
    n, w = W.shape
    K = a.shape[0]
    Wt = np.empty(w, W.dtype)
    P1 = np.empty(w, W.dtype)  # the terms of the row sums
    P2 = np.empty(w, W.dtype)
    C = np.empty((K, w), W.dtype)
    V = np.empty(w, W.dtype)
    best = np.empty(w, W.dtype)
    bp = np.empty(w, np.int32)
    for j in range(w):
        num[c, j] = 0
        den[c, j] = 0
    for i in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
        if search:
            _search_row(W, S, a, b, i, C, V, best, bp)
        _others(W, S, a, b, i, k, K, Wt)
        for j in range(w):
            e = E[i, j] * b[k, j]
            P1[j] = e * S[k, i, j] * Wt[j]
            P2[j] = e * b[k, j]
        ai = _lane_sum(P1, w) / (_lane_sum(P2, w) + eps)
        a[k, i] = ai
        for j in range(w):
            e = E[i, j] * ai
            num[c, j] += e * S[k, i, j] * Wt[j]
            den[c, j] += e * ai


@njit(parallel=True, cache=True)
def _init_pass(W, S, a, b, k, num, parallel):
    if parallel:
        for c in prange(num.shape[0]):
            _init_chunk(W, S, a, b, k, num, c)
    else:
        for c in range(num.shape[0]):
            _init_chunk(W, S, a, b, k, num, c)


@njit(parallel=True, cache=True)
def _plane_pass(W, E, S, a, b, k, search, num, den, eps, parallel):
    if parallel:
        for c in prange(num.shape[0]):
            _plane_chunk(W, E, S, a, b, k, search, num, den, eps, c)
    else:
        for c in range(num.shape[0]):
            _plane_chunk(W, E, S, a, b, k, search, num, den, eps, c)


@njit(parallel=True, cache=True)
def _search_pass(W, S, a, b):
    n, w = W.shape
    K = a.shape[0]
    for c in prange((n + CHUNK - 1) // CHUNK):
        C = np.empty((K, w), W.dtype)
        V = np.empty(w, W.dtype)
        best = np.empty(w, W.dtype)
        bp = np.empty(w, np.int32)
        for i in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
            _search_row(W, S, a, b, i, C, V, best, bp)


@njit(cache=True)
def _chunk_sum(part, j):
    s = part[0, j]
    for c in range(1, part.shape[0]):
        s += part[c, j]
    return s


@njit(cache=True)
def _solve(W, E, K, iters, refit, eps):
    n, w = W.shape
    parallel = n >= PARALLEL_MIN_ROWS
    S = np.empty((K, n, w), np.int8)  # signs as +-1
    a = np.zeros((K, n), W.dtype)
    b = np.zeros((K, w), W.dtype)
    chunks = (n + CHUNK - 1) // CHUNK
    num = np.empty((chunks, w), W.dtype)
    den = np.empty((chunks, w), W.dtype)
    for k in range(K):
        _init_pass(W, S, a, b, k, num, parallel)
        for j in range(w):
            b[k, j] = _chunk_sum(num, j) / n
    for t in range(iters + (1 if refit else 0)):
        for k in range(K):
            search = k == 0 and t > 0 and K >= 2  # the sign update that ended round t - 1
            _plane_pass(W, E, S, a, b, k, search, num, den, eps, parallel)
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
    """(signs [K, n, w] bool, a [K, n], b [K, w]) in W's dtype; see qdtk.math.daq.solve_block."""
    W = np.ascontiguousarray(W)
    if W.dtype not in (np.float32, np.float64):
        W = W.astype(np.float64)
    E = np.ones_like(W) if E is None else np.ascontiguousarray(E, W.dtype)
    return _solve(W, E, int(order), int(iters), bool(refit), W.dtype.type(EPS))
