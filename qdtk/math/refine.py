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
             gradient R = D H kept up to date: each element picks the pattern whose value is
             nearest to its H-compensated target What_ij + R_ij / H_jj.

Every step works on increments: for a change Delta of What, f(D - Delta) = f - 2<Delta, R> +
tr(Delta H Delta^T); a step whose predicted change is positive (round-off, singular systems) is
dropped, so f never increases. The state holds the signs as int8 (+-1, 0 on inactive planes:
a byte per sign where float32 took four, 200 MB instead of 800 MB for a 4096 x 12288 layer at
K = 4) and the scales in the working precision; the products that need signs times scales form
them a chunk of rows or columns at a time. The stored float16 scales are produced
once at the end (after balancing a against b), followed by one sign pass on the rounded scales,
and the result is kept only if it beats the input layer.

Everything here is pure NumPy/BLAS; costs are stated for an n x m layer with K planes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from qdtk.formats.bits import GROUP, group_slices
from qdtk.formats.solution import BinaryCodedLayer, group_index
from qdtk.math.forms import damped_quadratic_form
from qdtk.math.hessian import prepare_hessian
from qdtk.math.lanes import lane_dot
from qdtk.threads import thread_invariant

log = logging.getLogger(__name__)


@dataclass
class CodedState:
    """A binary-coded layer in the working form of the refinement: int8 signs, scales in the
    working precision (float64 or float32)."""

    orders: np.ndarray  # [G] int
    S: np.ndarray  # [K, n, m] int8, +-1 on active planes, 0 where k >= o_g(j)
    a: np.ndarray  # [K, G, n] row scales, 0 on inactive planes
    b: np.ndarray  # [K, m] column scales, 0 on inactive planes

    @property
    def dtype(self) -> np.dtype:
        """The working precision."""
        return self.a.dtype

    @property
    def active(self) -> np.ndarray:
        """[K, m] bool, plane k is used by column j."""
        K, _, m = self.S.shape
        return np.arange(K)[:, None] < self.orders[group_index(m)][None, :]

    def row_scale_columns(self, k: int, cols: slice = slice(None)) -> np.ndarray:
        """[n, c] a[k, g(j), i] expanded over the columns `cols` (all: [n, m])."""
        return self.a[k].T[:, group_index(self.S.shape[2])[cols]]

    def dequantize(self) -> np.ndarray:
        """[n, m] What = sum_k (a_k expanded * b_k) * S_k, planes added in order, in the
        state's working precision."""
        K, n, m = self.S.shape
        out = np.empty((n, m), self.dtype)
        return _dequantize(self.S, self.a, self.b, group_index(m), out)


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


def state_from_layer(layer: BinaryCodedLayer, dtype: type = np.float64) -> CodedState:
    """The layer in the working precision `dtype` (float64, or float32: half the memory and
    twice the BLAS rate for the n x m x m products)."""
    K, _, m = layer.signs.shape
    orders = np.asarray(layer.orders, np.int64)
    active = np.arange(K)[:, None] < orders[group_index(m)][None, :]  # [K, m]
    S = np.where(layer.signs, np.int8(1), np.int8(-1))  # [K, n, m] int8
    S *= active[:, None, :]
    a = layer.row_scale.astype(dtype) * (np.arange(K)[:, None] < orders[None, :])[..., None]
    b = layer.col_scale.astype(dtype) * active
    return CodedState(orders, S, a, b)


def layer_from_state(state: CodedState) -> BinaryCodedLayer:
    """Round the scales to float16 (the stored form); inactive planes are False / 0."""
    return BinaryCodedLayer(
        orders=state.orders.copy(),
        signs=state.S > 0,
        row_scale=state.a.astype(np.float16),
        col_scale=state.b.astype(np.float16),
    )




def solve_increment(M: np.ndarray, g: np.ndarray, free: np.ndarray) -> np.ndarray:
    """[..., P] delta minimising delta^T M delta - 2 delta^T g over the free unknowns.

    M [..., P, P] symmetric PSD, g [..., P], free [..., P] bool. Fixed unknowns get delta 0; a
    tiny relative ridge keeps singular systems (repeated or empty planes) solvable, and a system
    whose solution would not decrease the objective returns 0.
    """
    fixed = ~free
    M = M * (free[..., :, None] & free[..., None, :])
    diag = np.einsum("...ii->...i", M)
    scale = np.maximum(diag.max(axis=-1, keepdims=True), 1e-300)  # [..., 1]
    ridge = 1e-10 * scale + fixed * scale  # fixed unknowns: a unit diagonal, zero right side
    Mr = M + np.einsum("...i,ij->...ij", ridge, np.eye(M.shape[-1]))
    with thread_invariant():  # getrf's bits depend on the thread count (qdtk.threads)
        delta = np.linalg.solve(Mr, (g * free)[..., None])[..., 0]
    gain = 2 * np.sum(delta * g, -1) - np.einsum("...i,...ij,...j->...", delta, M, delta)
    bad = ~np.isfinite(gain) | (gain <= 0)
    return np.where(bad[..., None], 0.0, delta)


ROW_SYSTEMS_BYTES = 1 << 28  # the row refit builds its normal matrices this many bytes at a time


def refit_row_scales(
    W: np.ndarray, H: np.ndarray, state: CodedState, max_bytes: int = ROW_SYSTEMS_BYTES
) -> CodedState:
    """Exact least squares of every row's K*G scales on H, signs and column scales fixed.

    Row i: What_i = Phi_i a_i with Phi_i[j, (k, g)] = b[k, j] B[k, i, j] [j in g]; we solve
    (Phi_i^T H Phi_i) delta_i = Phi_i^T H d_i, for chunks of rows whose n (K G)^2 float64
    normal matrices fit in max_bytes (K = 4 on a 4096 x 12288 layer would need 4.8 GB at
    once). Cost: K n m^2 (the per-group products V_k[:, h] H[h, h:], half of them by symmetry)
    + 2 n m^2 (D H) + K^2 G n m + n (K G)^3 / 3.
    """
    K, n, m = state.S.shape
    slices = group_slices(m)
    G = len(slices)
    starts = np.array([s.start for s in slices])
    R = (W - state.dequantize()) @ H  # [n, m]
    free = (np.arange(K)[:, None] < state.orders[None, :]).ravel()  # [K G]
    delta = np.empty((n, K * G))
    step = max(1, max_bytes // (8 * (K * G) ** 2))
    for r0 in range(0, n, step):
        rows = slice(r0, min(n, r0 + step))
        Vr = state.S[:, rows] * state.b[:, None, :]  # [K, c, m], What = sum_k a-expanded * V_k
        c = Vr.shape[1]
        g = np.stack([np.add.reduceat(Vr[k] * R[rows], starts, axis=1) for k in range(K)],
                     1)  # [c, K, G]
        M = np.empty((c, K, G, K, G))
        for h, cols in enumerate(slices):
            # the (k, h) columns of Phi_i times H, every k in one product, on groups h.. only
            # (M is symmetric)
            Y = Vr[:, :, cols].reshape(K * c, -1) @ H[cols, cols.start :]  # [K c, m - start]
            for k in range(K):
                _group_dots(Y[k * c : (k + 1) * c], Vr, starts, k, h, M)
        M = M.reshape(c, K * G, K * G)
        free_c = np.broadcast_to(free, (c, K * G))
        delta[rows] = solve_increment(M, g.reshape(c, K * G), free_c)
    a = (state.a + delta.reshape(n, K, G).transpose(1, 2, 0)).astype(state.a.dtype)
    return CodedState(state.orders, state.S, a, state.b)


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
    K, n, m = state.S.shape
    slices = group_slices(m)
    per_chunk = max(1, max_unknowns // (K * GROUP))
    active = state.active
    b = state.b.copy()
    R = (W - state.dequantize()) @ H  # [n, m]
    for first in range(0, len(slices), per_chunk):
        cols = slice(slices[first].start, slices[min(first + per_chunk, len(slices)) - 1].stop)
        # U_k[:, cols] = a-expanded * B_k on these columns: formed a chunk at a time
        Uc = np.stack([state.row_scale_columns(k, cols) * state.S[k][:, cols]
                       for k in range(K)])  # [K, n, c]
        c = Uc.shape[2]
        Hc = H[cols, cols]
        M = np.empty((K, c, K, c))
        for k in range(K):
            for l in range(K):
                M[k, :, l, :] = Hc * (Uc[k].T @ Uc[l])
        g = np.einsum("kic,ic->kc", Uc, R[:, cols])  # [K, c]
        delta = solve_increment(
            M.reshape(K * c, K * c), g.reshape(K * c), active[:, cols].reshape(K * c)
        ).reshape(K, c)
        b[:, cols] += delta
        R -= np.einsum("kic,kc->ic", Uc, delta) @ H[cols, :]
    return CodedState(state.orders, state.S, state.a, b)


@njit(parallel=True, cache=True)
def sign_pass_group(
    S: np.ndarray, ab: np.ndarray, R: np.ndarray, Hg: np.ndarray, Delta: np.ndarray
) -> None:
    """In place, one group: every element in turn takes its best sign pattern (Gauss-Seidel).

    S [o, n, w] +-1, ab [o, n, w] = a[k, g, i] b[k, j], R [n, w] = (D H) on the group, Hg [w, w]
    = H on the group; Delta [n, w] receives the change of What. Rows are independent; inside a
    row R is updated after each change so the next column sees it.
    """
    o, n, w = S.shape
    for i in prange(n):  # rows are independent
        for j in range(w):
            q = 0.0
            for k in range(o):
                q += S[k, i, j] * ab[k, i, j]
            best, best_p = 0.0, -1
            for p in range(2**o):
                v = 0.0
                for k in range(o):
                    v += ab[k, i, j] if (p >> k) & 1 else -ab[k, i, j]
                step = v - q
                change = Hg[j, j] * step * step - 2.0 * step * R[i, j]
                if change < best:
                    best, best_p, d = change, p, step
            if best_p < 0:
                continue
            for k in range(o):
                S[k, i, j] = 1 if (best_p >> k) & 1 else -1
            Delta[i, j] = d
            for jj in range(j + 1, w):
                R[i, jj] -= d * Hg[j, jj]


def refine_signs(W: np.ndarray, H: np.ndarray, state: CodedState) -> CodedState:
    """One Gauss-Seidel pass over the columns: every element takes its best sign pattern.

    With R = D H, changing What_ij by Delta changes f by H_jj Delta^2 - 2 Delta R_ij, so each
    element picks the pattern minimising that (the current one gives 0: f never increases).
    R is updated inside a group element by element (Numba) and after the group with one matrix
    product, as GPTQ does. Cost: 2 n m^2 (D H) + n m^2 (updates) + n m (128 + 2^K K).
    """
    S = state.S.copy()  # [K, n, m] int8
    R = (W - state.dequantize()) @ H  # [n, m]
    for g, cols in enumerate(group_slices(S.shape[2])):
        o = int(state.orders[g])
        ab = state.a[:o, g, :, None] * state.b[:o, None, cols]  # [o, n, w]
        Sg = np.ascontiguousarray(S[:o, :, cols])
        Delta = np.zeros((S.shape[1], cols.stop - cols.start), state.dtype)  # [n, w]
        sign_pass_group(Sg, ab, np.ascontiguousarray(R[:, cols]), H[cols, cols].copy(), Delta)
        S[:o, :, cols] = Sg
        R[:, cols.stop :] -= Delta @ H[cols, cols.stop :]  # only later groups still read R
    return CodedState(state.orders, S, state.a, state.b)


def balance_scales(state: CodedState) -> CodedState:
    """Rescale a[k, g] by c and b[k, g] by 1/c so both have the same RMS (What is unchanged).

    The pair (a, b) is defined only up to this factor; equal magnitudes keep both well inside
    float16's range before rounding.
    """
    a, b = state.a.copy(), state.b.copy()
    for g, cols in enumerate(group_slices(b.shape[1])):
        ra = np.sqrt(np.mean(a[:, g, :] ** 2, axis=1))  # [K]
        rb = np.sqrt(np.mean(b[:, cols] ** 2, axis=1))  # [K]
        ok = (ra > 0) & (rb > 0)
        c = np.where(ok, np.sqrt(np.where(ok, rb, 1) / np.where(ok, ra, 1)), 1.0)  # [K]
        a[:, g, :] *= c[:, None]
        b[:, cols] /= c[:, None]
    return CodedState(state.orders, state.S, a, b)


# What `qdtk quantize --refine MODE` maps to (measured in bench/bench_refine.py).
MODES: dict[str, dict | None] = {
    "none": None,
    "rows": dict(rounds=1, signs=False),  # one exact row-scale refit
    "full": dict(rounds=4),  # rows + signs alternated
    "all": dict(rounds=4, columns=True),  # rows + columns + signs: slower, slightly better
}


def refine_layer(
    W: np.ndarray,
    H: np.ndarray,
    layer: BinaryCodedLayer,
    *,
    rounds: int = 4,
    scales: bool = True,
    columns: bool = False,
    signs: bool = True,
    percdamp: float = 0.01,
    max_unknowns: int = 4096,
    name: str = "layer",
    shrink: float = 0.0,
    dtype: type = np.float32,
) -> BinaryCodedLayer:
    """Lower tr(D H D^T) of a solved layer by alternating exact refits on the full H.

    W [n, m], H [m, m] the layer's undamped statistic; the solver works on the damped H
    (METHOD.md §2), shrunk toward its diagonal by `shrink` first (qdtk.math.hessian).
    Each round: row scales (scales), column scales (scales and columns), signs (signs); then the
    scales are balanced and rounded to float16 and the signs refit once more on the rounded
    scales. The result is returned only if its error (damped H, canonical float32 evaluation)
    is below the input layer's. Cost per round about (2K + 6) n m^2 flops, plus with columns
    6 n m^2 + 2 K^2 n m c + m (K c)^2 / 3 (c = columns per chunk, see refit_col_scales).
    dtype: the working precision of the state and of those products. float32 (the default)
    halves the memory and doubles the BLAS rate; the small systems are solved in float64 and
    the final comparison is exact, so f still never increases (its error matched float64's to
    5 digits on 2048^2 layers).
    """
    P = prepare_hessian(H, percdamp, name=name, shrink=shrink)
    Hd = P.H.astype(dtype)  # [m, m]
    W64 = np.asarray(W, np.float64)
    W = W64.astype(dtype)
    state = state_from_layer(layer, dtype)
    for _ in range(rounds):
        if scales:
            state = refit_row_scales(W, Hd, state)
            if columns:
                state = refit_col_scales(W, Hd, state, max_unknowns)
        if signs:
            state = refine_signs(W, Hd, state)
    out = layer_from_state(balance_scales(state))
    if signs:
        out = layer_from_state(refine_signs(W, Hd, state_from_layer(out, dtype)))
    before = damped_quadratic_form(W64 - layer.dequantize(), P.R)  # tr(D Hd D^T), float64
    after = damped_quadratic_form(W64 - out.dequantize(), P.R)
    log.debug("%s: refine tr(DHD^T) %.4g -> %.4g", name, before, after)
    return out if after < before else layer
