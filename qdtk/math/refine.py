"""Refining a binary-coded layer against the full H (qdtk; beyond the paper).

DAQ (METHOD.md §3) fits each 128-column block with a diagonal salience weighting; the quantity that
matters is the layer's output error

    f = tr(D H D^T),   D = W - What   [n, m],

which couples all columns of a row through H. After the block sweep, with the layer's
What[i, j] = sum_{k < o_g(j)} a[k, g(j), i] b[k, j] B[k, i, j], we lower f by block-coordinate
descent, each step the exact minimiser of f over its own variables with the others fixed:

    rows     the row scales a: for each row i an independent K*G-unknown least-squares problem
    columns  the column scales b: K*m unknowns coupled through H and shared by all rows; solved
             jointly in chunks of whole groups (one chunk = exact; several = block-coordinate)
    signs    every element's sign pattern, column by column (Gauss-Seidel), with the residual
             gradient R = D H kept up to date on every column (a change of element (i, j)
             updates row i of R at once): each element picks the pattern whose value is
             nearest to its H-compensated target What_ij + R_ij / H_jj; consecutive passes
             share one product D H.

Every step works on increments: for a change Delta of What, f(D - Delta) = f - 2<Delta, R> +
tr(Delta H Delta^T); a step whose predicted change is positive (round-off, singular systems) is
dropped, so f never increases. The state holds the signs as int8 (+-1, 0 on inactive planes:
a byte per sign where float32 took four, 200 MB instead of 800 MB for a 4096 x 12288 layer at
K = 4) and the scales in the working precision; the products that need signs times scales form
them a chunk of rows or columns at a time. The stored float16 scales are produced
once at the end (after balancing a against b), followed by one sign pass on the rounded scales
(sign passes alone keep the input's float16 scales), and the result is kept only if it beats
the input layer.

The arrays come from the backend's array module (qdtk.backend: `xp`, NumPy or CuPy), the same
code on both; the three compiled kernels (What, the row refit's normal matrices, the sign pass)
are Numba on the CPU and their Numba CUDA counterparts (qdtk.math.refine_cuda) on a "cuda"
backend. The sweep's group refinement (`refine_group_rows`, one 128-column group on its own
metric) is CPU kernels over rows; on a GPU the sweep runs `refine_layer` on the group instead.
Costs are stated for an n x m layer with K planes.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from types import ModuleType, SimpleNamespace

import numpy as np
from numba import njit, prange

from qdtk.backend import CPU, Backend, array_module, to_host
from qdtk.formats.bits import GROUP, group_slices
from qdtk.formats.solution import BinaryCodedLayer, group_index
from qdtk.math.abmp import output_error
from qdtk.math.forms import damped_quadratic_form
from qdtk.math.hessian import PreparedHessian, prepare_hessian
from qdtk.math.lanes import lane_dot
from qdtk.threads import thread_invariant

log = logging.getLogger(__name__)


@dataclass
class CodedState:
    """A binary-coded layer in the working form of the refinement: int8 signs, scales in the
    working precision (float64 or float32), arrays of `backend` (orders stay on the host)."""

    orders: np.ndarray  # [G] int
    S: np.ndarray  # [K, n, m] int8, +-1 on active planes, 0 where k >= o_g(j)
    a: np.ndarray  # [K, G, n] row scales, 0 on inactive planes
    b: np.ndarray  # [K, m] column scales, 0 on inactive planes
    backend: Backend = CPU  # where S, a, b live and which kernels run on them

    @property
    def xp(self) -> ModuleType:
        return self.backend.xp

    @property
    def kernels(self):
        """The compiled kernels for this backend (CPU Numba or Numba CUDA; same signatures)."""
        return kernels(self.backend)

    @property
    def dtype(self) -> np.dtype:
        """The working precision."""
        return self.a.dtype

    @property
    def active(self) -> np.ndarray:
        """[K, m] bool, plane k is used by column j."""
        K, _, m = self.S.shape
        return self.xp.asarray(np.arange(K)[:, None] < self.orders[group_index(m)][None, :])

    def row_scale_columns(self, k: int, cols: slice = slice(None)) -> np.ndarray:
        """[n, c] a[k, g(j), i] expanded over the columns `cols` (all: [n, m])."""
        return self.a[k].T[:, self.xp.asarray(group_index(self.S.shape[2])[cols])]

    def dequantize(self) -> np.ndarray:
        """[n, m] What = sum_k (a_k expanded * b_k) * S_k, planes added in order, in the
        state's working precision."""
        K, n, m = self.S.shape
        out = self.xp.empty((n, m), self.dtype)
        return self.kernels.dequantize(self.S, self.a, self.b,
                                       self.xp.asarray(group_index(m)), out)


@njit(parallel=True, cache=True)
def _dequantize(S, a, b, group, out):  # pragma: no cover - compiled
    K, n, m = S.shape
    for i in prange(n):
        for j in range(m):
            out[i, j] = 0.0
        for k in range(K):
            for j in range(m):
                out[i, j] += a[k, group[j], i] * b[k, j] * S[k, i, j]
    return out


def state_from_layer(
    layer: BinaryCodedLayer, dtype: type = np.float64, backend: Backend = CPU
) -> CodedState:
    """The layer in the working precision `dtype` (float64, or float32: half the memory and
    twice the BLAS rate for the n x m x m products), its arrays on `backend`."""
    xp = backend.xp
    K, _, m = layer.signs.shape
    orders = np.asarray(layer.orders, np.int64)
    active = np.arange(K)[:, None] < orders[group_index(m)][None, :]  # [K, m]
    S = xp.where(xp.asarray(layer.signs), np.int8(1), np.int8(-1))  # [K, n, m] int8
    S *= xp.asarray(active[:, None, :])
    planes = np.arange(K)[:, None] < orders[None, :]  # [K, G]
    a = xp.asarray(layer.row_scale).astype(dtype) * xp.asarray(planes[..., None])
    b = xp.asarray(layer.col_scale).astype(dtype) * xp.asarray(active)
    return CodedState(orders, S, a, b, backend)


def layer_from_state(state: CodedState) -> BinaryCodedLayer:
    """Round the scales to float16 (the stored form), on the host; inactive planes are
    False / 0."""
    return BinaryCodedLayer(
        orders=state.orders.copy(),
        signs=to_host(state.S > 0),
        row_scale=to_host(state.a.astype(np.float16)),
        col_scale=to_host(state.b.astype(np.float16)),
    )




def residual_gradient(W: np.ndarray, H: np.ndarray, state: CodedState) -> np.ndarray:
    """[n, m] R = D H, D = W - What: the gradient (up to -2) of f = tr(D H D^T) in What."""
    return (W - state.dequantize()) @ H


def solve_increment(M: np.ndarray, g: np.ndarray, free: np.ndarray) -> np.ndarray:
    """[..., P] delta minimising delta^T M delta - 2 delta^T g over the free unknowns.

    M [..., P, P] symmetric PSD, g [..., P], free [..., P] bool, NumPy or CuPy (the batch
    solved by cuSOLVER on a GPU). Fixed unknowns get delta 0; a tiny relative ridge keeps
    singular systems (repeated or empty planes) solvable, and a system whose solution would not
    decrease the objective returns 0.
    """
    xp = array_module(M)
    fixed = ~free
    M = M * (free[..., :, None] & free[..., None, :])
    diag = xp.diagonal(M, axis1=-2, axis2=-1)  # [..., P]
    scale = xp.maximum(diag.max(axis=-1, keepdims=True), 1e-300)  # [..., 1]
    ridge = 1e-10 * scale + fixed * scale  # fixed unknowns: a unit diagonal, zero right side
    Mr = M + ridge[..., :, None] * xp.eye(M.shape[-1])
    # getrf's bits depend on the thread count on the CPU (qdtk.threads)
    with thread_invariant() if xp is np else contextlib.nullcontext():
        delta = xp.linalg.solve(Mr, (g * free)[..., None])[..., 0]
    gain = 2 * xp.sum(delta * g, -1) - xp.einsum("...i,...ij,...j->...", delta, M, delta)
    bad = ~xp.isfinite(gain) | (gain <= 0)
    return xp.where(bad[..., None], 0.0, delta)


ROW_SYSTEMS_BYTES = 1 << 28  # the row refit builds its normal matrices this many bytes at a time


def refit_row_scales(
    W: np.ndarray, H: np.ndarray, state: CodedState, max_bytes: int = ROW_SYSTEMS_BYTES,
    R: np.ndarray | None = None,
) -> CodedState:
    """Exact least squares of every row's K*G scales on H, signs and column scales fixed.

    Row i: What_i = Phi_i a_i with Phi_i[j, (k, g)] = b[k, j] B[k, i, j] [j in g]; we solve
    (Phi_i^T H Phi_i) delta_i = Phi_i^T H d_i, for chunks of rows whose n (K G)^2 float64
    normal matrices fit in max_bytes (K = 4 on a 4096 x 12288 layer would need 4.8 GB at
    once). Cost: K n m^2 (the per-group products V_k[:, h] H[h, h:], half of them by symmetry)
    + 2 n m^2 (D H, unless R = residual_gradient of `state` is given) + K^2 G n m + n (K G)^3 / 3.
    """
    xp, group_dots = state.xp, state.kernels.group_dots
    K, n, m = state.S.shape
    slices = group_slices(m)
    G = len(slices)
    starts = xp.asarray(np.array([s.start for s in slices]))
    R = residual_gradient(W, H, state) if R is None else R  # [n, m]
    free = xp.asarray((np.arange(K)[:, None] < state.orders[None, :]).ravel())  # [K G]
    delta = xp.empty((n, K * G))
    step = max(1, max_bytes // (8 * (K * G) ** 2))
    for r0 in range(0, n, step):
        rows = slice(r0, min(n, r0 + step))
        Vr = state.S[:, rows] * state.b[:, None, :]  # [K, c, m], What = sum_k a-expanded * V_k
        c = Vr.shape[1]
        g = xp.stack([xp.add.reduceat(Vr[k] * R[rows], starts, axis=1) for k in range(K)],
                     1)  # [c, K, G]
        M = xp.empty((c, K, G, K, G))
        for h, cols in enumerate(slices):
            # the (k, h) columns of Phi_i times H, every k in one product, on groups h.. only
            # (M is symmetric)
            Y = Vr[:, :, cols].reshape(K * c, -1) @ H[cols, cols.start :]  # [K c, m - start]
            for k in range(K):
                group_dots(Y[k * c : (k + 1) * c], Vr, starts, k, h, M)
        M = M.reshape(c, K * G, K * G)
        free_c = xp.broadcast_to(free, (c, K * G))
        delta[rows] = solve_increment(M, g.reshape(c, K * G), free_c)
    a = (state.a + delta.reshape(n, K, G).transpose(1, 2, 0)).astype(state.a.dtype)
    return replace(state, a=a)


# Fixed-order sums (qdtk.math.lanes): the same bits fresh and from Numba's cache, vectorised
@njit(parallel=True, cache=True)
def _group_dots(Y, V, starts, k, h, M):  # pragma: no cover - compiled
    """M[i, k, h, l, g] = M[i, l, g, k, h] = sum_{j in group g} Y[i, j - starts[h]] V[l, i, j]
    for the groups g >= h (Y holds columns starts[h]..m): one pass, no temporaries, and M
    exactly symmetric (on the diagonal blocks, k = 0, 1, ... in turn, the later (k, l)
    writes both entries)."""
    n, K, G = M.shape[0], M.shape[1], M.shape[2]
    m = V.shape[2]
    for i in prange(n):
        for l in range(K):
            for g in range(h, G):
                j0, stop = starts[g], starts[g + 1] if g + 1 < G else m
                s = lane_dot(Y[i, j0 - starts[h] :], V[l, i, j0:stop], stop - j0)
                M[i, k, h, l, g] = s
                M[i, l, g, k, h] = s


def refit_col_scales(
    W: np.ndarray, H: np.ndarray, state: CodedState, max_unknowns: int = 4096
) -> CodedState:
    """Least squares of the column scales b on H, signs and row scales fixed.

    What[:, j] = sum_k U_k[:, j] b[k, j] with U_k[i, j] = a[k, g(j), i] B[k, i, j], so the normal
    matrix of the unknowns (k, j) is H[j, j'] * (U_k^T U_l)[j, j'] summed over the rows. Whole
    groups are solved together in chunks of at most max_unknowns unknowns (one chunk: the exact
    joint solution), the others fixed, with R = D H updated after each chunk. Cost: 2 n m^2
    (D H) + per chunk of c columns 2 K^2 n c^2 (Grams) + 2 n c m (update of R) + (K c)^3 / 3.
    """
    xp = state.xp
    K, n, m = state.S.shape
    slices = group_slices(m)
    per_chunk = max(1, max_unknowns // (K * GROUP))
    active = state.active
    b = state.b.copy()
    R = residual_gradient(W, H, state)  # [n, m]
    for first in range(0, len(slices), per_chunk):
        cols = slice(slices[first].start, slices[min(first + per_chunk, len(slices)) - 1].stop)
        # U_k[:, cols] = a-expanded * B_k on these columns: formed a chunk at a time
        Uc = xp.stack([state.row_scale_columns(k, cols) * state.S[k][:, cols]
                       for k in range(K)])  # [K, n, c]
        c = Uc.shape[2]
        Hc = H[cols, cols]
        M = xp.empty((K, c, K, c))
        for k in range(K):
            for l in range(K):
                M[k, :, l, :] = Hc * (Uc[k].T @ Uc[l])
        g = xp.einsum("kic,ic->kc", Uc, R[:, cols])  # [K, c]
        delta = solve_increment(
            M.reshape(K * c, K * c), g.reshape(K * c), active[:, cols].reshape(K * c)
        ).reshape(K, c)
        b[:, cols] += delta
        R -= xp.einsum("kic,kc->ic", Uc, delta) @ H[cols, :]
    return replace(state, b=b)


@njit(parallel=True, cache=True)
def sign_pass(
    S: np.ndarray, ab: np.ndarray, R: np.ndarray, Hrows: np.ndarray, j0: int, Delta: np.ndarray
) -> None:
    """In place, one group of columns j0 .. j0 + w: every element in turn takes its best sign
    pattern (Gauss-Seidel), and R stays D H on every column.

    S [o, n, w] +-1, ab [o, n, w] = a[k, g, i] b[k, j], R [n, m] = D H (all columns), Hrows
    [w, m] = H[group, :]; Delta [n, w] (zeros, R's dtype) receives the changes of What. Rows are
    independent; a change d of element (i, j) subtracts d H[j, :] from row i of R at once, so
    the next column sees it. Few elements change after the sweep (7% in the first pass, 1-3% in
    later ones, measured on 2048^2 layers), so these row updates cost far less than the
    product D H, computed once for all passes.
    """
    _, n, w = S.shape
    m = R.shape[1]
    for i in prange(n):  # rows are independent
        S_i, ab_i = S[:, i, :], ab[:, i, :]
        v = np.empty(2 ** S.shape[0])  # _best_step's scratch
        for j in range(w):
            d = _best_step(S_i, ab_i, j, Hrows[j, j0 + j], R[i, j0 + j], v)
            if d == 0.0:
                continue
            Delta[i, j] = d
            dd = Delta[i, j]  # the change in R's precision: the update vectorises in it
            for jj in range(m):
                R[i, jj] -= dd * Hrows[j, jj]


@njit(cache=True)
def _best_step(S_i, ab_i, j, hjj, rij, v):  # pragma: no cover - compiled
    """Element j of a row takes its best sign pattern: the one minimising the change of f,
    hjj step^2 - 2 step rij, for step = its value minus the current one; S_i [o, w] updated,
    the step returned (0: no pattern lowers f). ab_i [o, w] = a_k b_kj of the row; float64
    arithmetic, patterns in order (ties keep the earlier). v [2^o]: scratch.

    The values of all patterns are built plane by plane (v[p] = sum_k +-ab_kj, + where bit k of
    p is set, summed in the order k = 0, 1, ...): 2^(o+1) adds for the 2^o o of one sum per
    pattern, no branches; the current value is one of them, exactly."""
    o = S_i.shape[0]
    x = np.float64(ab_i[0, j])
    v[0], v[1] = 0.0 - x, 0.0 + x
    size, p0 = 2, 1 if S_i[0, j] > 0 else 0
    for k in range(1, o):
        x = np.float64(ab_i[k, j])
        for p in range(size):
            v[p + size] = v[p] + x
            v[p] = v[p] - x
        if S_i[k, j] > 0:
            p0 += size
        size *= 2
    q = v[p0]
    best, best_p = 0.0, -1
    for p in range(size):
        step = v[p] - q
        change = hjj * step * step - 2.0 * step * rij
        if change < best:
            best, best_p = change, p
    if best_p < 0:
        return 0.0
    for k in range(o):
        S_i[k, j] = 1 if (best_p >> k) & 1 else -1
    return v[best_p] - q


# One group's refinement on its own metric A, row by row (the sweep's --group-refine). With the
# column scales b fixed, the rows of f = tr(D A D^T) are independent: the products with A are
# BLAS over all rows, the small systems and the sign passes a kernel over the rows.


@njit(cache=True)
def _small_solve(M, g, ridge):  # pragma: no cover - compiled
    """(M + ridge I)^-1 g for a small symmetric positive semidefinite M: Gaussian elimination
    with partial pivoting; zeros where a pivot vanishes (no step), never an exception."""
    o = g.shape[0]
    T = np.empty((o, o + 1))
    for k in range(o):
        for l in range(o):
            T[k, l] = M[k, l]
        T[k, k] += ridge
        T[k, o] = g[k]
    for c in range(o):
        p = c
        for k in range(c + 1, o):
            if abs(T[k, c]) > abs(T[p, c]):
                p = k
        if not abs(T[p, c]) > 0.0:
            return np.zeros(o)
        for l in range(o + 1):
            T[c, l], T[p, l] = T[p, l], T[c, l]
        for k in range(c + 1, o):
            f = T[k, c] / T[c, c]
            for l in range(c, o + 1):
                T[k, l] -= f * T[c, l]
    x = np.empty(o)
    for k in range(o - 1, -1, -1):
        s = T[k, o]
        for l in range(k + 1, o):
            s -= T[k, l] * x[l]
        x[k] = s / T[k, k]
    return x


@njit(cache=True)
def _row_sign_pass(A, S, a, b, i, D, R):  # pragma: no cover - compiled
    """sign_pass on row i of one group, D[i] and R[i] = D[i] A kept up to date."""
    o, _, w = S.shape
    ab_i = np.empty((o, w))
    for k in range(o):
        for j in range(w):
            ab_i[k, j] = a[k, i] * b[k, j]
    S_i, v = S[:, i, :], np.empty(2**o)
    for j in range(w):
        d = _best_step(S_i, ab_i, j, A[j, j], R[i, j], v)
        if d == 0.0:
            continue
        D[i, j] -= d
        for jj in range(w):
            R[i, jj] -= d * A[j, jj]


@njit(parallel=True, cache=True)
def _rows_round(A, S, a, b, V, VA, D, R):  # pragma: no cover - compiled
    """In place, every row i: the exact least squares of its o scales on A (solve_increment's
    rule: a tiny ridge, no step that would not lower f_i = D[i] A D[i]^T), then a sign pass.
    V [o, n, w] = b_k S_k, VA = V A, D [n, w] the residual, R = D A (all float64)."""
    o, n, w = S.shape
    for i in prange(n):
        M, g = np.empty((o, o)), np.empty(o)
        top = 1e-300
        for k in range(o):
            g[k] = lane_dot(V[k, i], R[i], w)
            for l in range(o):
                M[k, l] = lane_dot(VA[k, i], V[l, i], w)
            top = max(top, M[k, k])
        delta = _small_solve(M, g, 1e-10 * top)
        gain = 0.0
        for k in range(o):
            gain += 2.0 * delta[k] * g[k]
            for l in range(o):
                gain -= delta[k] * M[k, l] * delta[l]
        if gain > 0.0:  # (not NaN)
            for k in range(o):
                a[k, i] += delta[k]
                for j in range(w):
                    D[i, j] -= delta[k] * V[k, i, j]
                    R[i, j] -= delta[k] * VA[k, i, j]
        _row_sign_pass(A, S, a, b, i, D, R)


@njit(parallel=True, cache=True)
def _rows_finish(A, S, a, b, D, R, S0, a0, start):  # pragma: no cover - compiled
    """In place, after the scales were rounded: one more sign pass per row, then each row whose
    f_i did not fall below start[i] gets its input S0[:, i], a0[:, i] back."""
    o, n, w = S.shape
    for i in prange(n):
        _row_sign_pass(A, S, a, b, i, D, R)
        if not lane_dot(D[i], R[i], w) < start[i]:
            for k in range(o):
                a[k, i] = a0[k, i]
                for j in range(w):
                    S[k, i, j] = S0[k, i, j]


@njit(parallel=True, cache=True)
def _rows_residual(Wg, S, a, b, V, D):  # pragma: no cover - compiled
    """V [o, n, w] = b_k S_k and D [n, w] = Wg - sum_k a_k V_k (planes in order), in place."""
    o, n, w = S.shape
    for i in prange(n):
        for j in range(w):
            v = 0.0
            for k in range(o):
                x = b[k, j] * S[k, i, j]
                V[k, i, j] = x
                v += a[k, i] * x
            D[i, j] = Wg[i, j] - v


def _group_residual(Wg, A, S, a, b):
    """(V [o, n, w] = b_k S_k, D = Wg - sum_k a_k V_k, R = D A), float64."""
    V, D = np.empty(S.shape), np.empty(Wg.shape)
    _rows_residual(Wg, S, a, b, V, D)
    return V, D, D @ A


def refine_group_rows(
    Wg: np.ndarray, A: np.ndarray, signs: np.ndarray, a: np.ndarray, b: np.ndarray,
    rounds: int
) -> tuple[np.ndarray, np.ndarray]:
    """(signs [o, n, w] bool, a [o, n] float16) of one group refined on its metric A [w, w]:
    per row `rounds` of exact row-scale refits and sign passes, the scales rounded to float16,
    one more sign pass on them (it gains little on large layers, 0.00706 -> 0.00705 on 4096^2,
    but MiniLM's held-out manpages cosine 0.8677 -> 0.8722); a row keeps its input unless its
    D A D^T fell. b [o, w] (float16) stays. Host arrays, float64; about (o + 2) n w^2 flops per
    round (BLAS), the rest linear."""
    S0 = np.where(signs, np.int8(1), np.int8(-1))  # [o, n, w]
    S, a0 = S0.copy(), np.asarray(a, np.float64)
    a1, b = a0.copy(), np.asarray(b, np.float64)
    Wg, A = np.asarray(Wg, np.float64), np.ascontiguousarray(A, np.float64)
    o, n, w = S.shape
    V, D, R = _group_residual(Wg, A, S, a1, b)
    start = np.einsum("nw,nw->n", D, R)  # [n] f_i of the input
    for r in range(rounds):
        if r:  # V of the new signs (D and R the kernel kept)
            _rows_residual(Wg, S, a1, b, V, np.empty_like(D))
        VA = (V.reshape(o * n, w) @ A).reshape(o, n, w)
        _rows_round(A, S, a1, b, V, VA, D, R)
    a1 = a1.astype(np.float16).astype(np.float64)  # the stored precision
    _, D, R = _group_residual(Wg, A, S, a1, b)
    _rows_finish(A, S, a1, b, D, R, S0, a0, start)
    return S > 0, a1.astype(np.float16)


CPU_KERNELS = SimpleNamespace(dequantize=_dequantize, group_dots=_group_dots, sign_pass=sign_pass)


def kernels(backend: Backend):
    """The kernel set of `backend`: Numba CPU kernels, or their Numba CUDA counterparts
    (qdtk.math.refine_cuda) on a "cuda" backend, a GPU or the simulator."""
    if backend.daq == "cuda":
        from qdtk.math import refine_cuda

        return refine_cuda
    return CPU_KERNELS


def refine_signs(
    W: np.ndarray, H: np.ndarray, state: CodedState, R: np.ndarray | None = None
) -> CodedState:
    """One Gauss-Seidel pass over the columns: every element takes its best sign pattern.

    With R = D H, changing What_ij by Delta changes f by H_jj Delta^2 - 2 Delta R_ij, so each
    element picks the pattern minimising that (the current one gives 0: f never increases).
    R [n, m] (= residual_gradient of `state`) is computed when not given and, when given, kept
    equal to D H of the returned state (updated in place), so passes chain without the product.
    Cost: 2 n m^2 for R, then n m (128 + 2^K K) + (changed elements) m.
    """
    xp, sign_pass = state.xp, state.kernels.sign_pass
    S = state.S.copy()  # [K, n, m] int8
    R = residual_gradient(W, H, state) if R is None else R
    for g, cols in enumerate(group_slices(S.shape[2])):
        o = int(state.orders[g])
        ab = state.a[:o, g, :, None] * state.b[:o, None, cols]  # [o, n, w]
        Sg = xp.ascontiguousarray(S[:o, :, cols])
        Delta = xp.zeros((S.shape[1], cols.stop - cols.start), R.dtype)  # [n, w]
        sign_pass(Sg, ab, R, H[cols], cols.start, Delta)
        S[:o, :, cols] = Sg
    return replace(state, S=S)


def balance_scales(state: CodedState) -> CodedState:
    """Rescale a[k, g] by c and b[k, g] by 1/c so both have the same RMS (What is unchanged).

    The pair (a, b) is defined only up to this factor; equal magnitudes keep both well inside
    float16's range before rounding.
    """
    xp = state.xp
    a, b = state.a.copy(), state.b.copy()
    for g, cols in enumerate(group_slices(b.shape[1])):
        ra = xp.sqrt(xp.mean(a[:, g, :] ** 2, axis=1))  # [K]
        rb = xp.sqrt(xp.mean(b[:, cols] ** 2, axis=1))  # [K]
        ok = (ra > 0) & (rb > 0)
        c = xp.where(ok, xp.sqrt(xp.where(ok, rb, 1) / xp.where(ok, ra, 1)), 1.0)  # [K]
        a[:, g, :] *= c[:, None]
        b[:, cols] /= c[:, None]
    return replace(state, a=a, b=b)


# What `qdtk quantize --refine MODE` maps to (measured in bench/bench_refine.py).
MODES: dict[str, dict | None] = {
    "none": None,
    "rows": dict(rounds=1, signs=False),  # one exact row-scale refit
    "signs": dict(rounds=4, scales=False),  # sign passes only: the scales stay the sweep's
    "full": dict(rounds=4),  # rows + signs alternated
    "all": dict(rounds=4, columns=True),  # rows + columns + signs: slower, slightly better
}


def refine_layer(
    W: np.ndarray,
    H: np.ndarray,
    layer: BinaryCodedLayer,
    *,
    percdamp: float = 0.01,
    shrink: float = 0.0,
    name: str = "layer",
    backend: Backend = CPU,
    **options,
) -> BinaryCodedLayer:
    """Lower tr(D H D^T) of a solved layer by alternating exact refits on the full H.

    W [n, m], H [m, m] the layer's undamped statistic; the solver works on the damped H
    (METHOD.md §2), shrunk toward its diagonal by `shrink` first (qdtk.math.hessian), factored
    here in float64 so that the final comparison is exact. `options`: those of
    `refine_prepared`, which does the work.
    """
    P = prepare_hessian(H, percdamp, name=name, shrink=shrink, cholesky=backend.cholesky)
    return refine_prepared(W, P, layer, name=name, backend=backend, **options)[0]


def refine_prepared(
    W: np.ndarray,
    P: PreparedHessian,
    layer: BinaryCodedLayer,
    *,
    rounds: int = 4,
    scales: bool = True,
    columns: bool = False,
    signs: bool = True,
    max_unknowns: int = 4096,
    name: str = "layer",
    dtype: type = np.float32,
    validation: np.ndarray | None = None,
    backend: Backend = CPU,
    R=None,
    start_error: float | None = None,
) -> tuple[BinaryCodedLayer, float | None, object]:
    """`refine_layer` on a prepared H: (the layer, its tr(D H_damped D^T) = ||D R||^2 where
    computed: None after a validation stop's comparison, D = W - What where formed: the
    refined layer's, in R's precision and where R lives; None when the input comes back).

    Each round: row scales (scales), column scales (scales and columns), signs (signs); then the
    scales are balanced and rounded to float16 and the signs refit once more on the rounded
    scales (without scales, the input's float16 scales stay and every round is one sign pass).
    The result is returned only if its error (damped H, canonical float32 evaluation, in P.R's
    precision) is below the input layer's. Cost per round about (2K + 6) n m^2 flops for
    rows + signs (the sign pass alone: its row updates only, after one 2 n m^2 product), plus
    with columns 6 n m^2 + 2 K^2 n m c + m (K c)^2 / 3 (c = columns per chunk, see
    refit_col_scales).
    dtype: the working precision of the state and of those products. float32 (the default)
    halves the memory and doubles the BLAS rate; the small systems are solved in float64 and
    the final comparison is on P.R, so f never increases beyond that comparison's rounding
    (none with a float64 P; its error matched float64's to 5 digits on 2048^2 layers).
    backend: where it runs (qdtk.backend): its arrays and kernels; W and the layer come and
    go as host arrays. R: P.R on the backend when the caller has it there; start_error: the
    input layer's ||D R||^2 when the caller knows it (the sweep's), saving a product.

    validation [m, m]: H of inputs the fit never saw (the validation statistic, qdtk.formats.
    stats). Then `rounds` is a cap: the rounds stop at the first that does not lower the error
    on it, the best state is kept, and the result must beat the input layer on it instead.
    """
    Hd = backend.to_device(P.H, dtype)  # [m, m]
    W64 = np.asarray(W, np.float64)
    W = backend.to_device(W64, dtype)
    state = state_from_layer(layer, dtype, backend)
    G = None  # D H of `state`, where known (the sign passes keep it)
    if validation is not None:  # (an n x m dequantisation: only when stopping on it)
        best = validation_error(W64, to_host(state.dequantize()), validation)
    for r in range(rounds):
        previous = state
        if scales:
            state = refit_row_scales(W, Hd, state, R=G)
            if columns:
                state = refit_col_scales(W, Hd, state, max_unknowns)
            G = None
        if signs:
            G = residual_gradient(W, Hd, state) if G is None else G
            state = refine_signs(W, Hd, state, G)
        if validation is not None:
            err = validation_error(W64, to_host(state.dequantize()), validation)
            if err >= best:
                log.debug("%s: refinement stopped after %d rounds (validation)", name, r)
                state = previous
                break
            best = err
    del G  # [n, m]
    if scales:  # the refit scales to float16, then the signs once more on the rounded ones
        out = layer_from_state(balance_scales(state))
        if signs:
            out = layer_from_state(refine_signs(W, Hd, state_from_layer(out, dtype, backend)))
    else:  # the scales are still the input's float16 ones
        out = layer_from_state(state)
    R = backend.to_device(P.R) if R is None else R
    What = out.dequantize()  # [n, m]
    D = array_module(R).asarray(W64 - What, R.dtype)  # [n, m]
    after = damped_quadratic_form(D, R)  # tr(D Hd D^T)
    if validation is not None:
        before = validation_error(W64, layer.dequantize(), validation)
        better = validation_error(W64, What, validation) < before
    else:
        before = (damped_quadratic_form(W64 - layer.dequantize(), R) if start_error is None
                  else start_error)
        better = after < before
        log.debug("%s: refine tr(DHD^T) %.4g -> %.4g", name, before, after)
    if better:
        return out, after, D
    return layer, (None if validation is not None else before), None


def validation_error(W: np.ndarray, What: np.ndarray, Hv: np.ndarray | None) -> float:
    """tr(D Hv D^T), D = W - What, in float64 (inf without a validation H: nothing to beat)."""
    return float("inf") if Hv is None else output_error(W - What, Hv)
