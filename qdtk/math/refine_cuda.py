"""The refinement's kernels on a GPU (qdtk.math.refine): Numba CUDA counterparts of its three CPU
kernels, with the same signatures, the same arithmetic in the same order, chosen by the backend
(qdtk.backend: a "cuda" kernel set).

    dequantize       What from the state, one thread per element (grid-stride)
    group_dots       the row refit's normal matrices, one thread per (row, plane, group), each
                     sum the 8-lane fixed-order qdtk.math.lanes.lane_dot of the CPU kernel
    sign_pass        the Gauss-Seidel sign pass of one group, two kernels: in sign_pass_group
                     a thread block owns `rows` rows, `lanes` threads per row; every thread of a
                     row finds the same best pattern (float64 scalars, as on the CPU), then the
                     row's lanes update its R, kept in shared memory, for the later columns; one
                     barrier per column. apply_changes then subtracts the group's changes
                     Delta H[group, :] from R on every column, one thread per element, the
                     changes in column order as the CPU kernel applies them

The CPU's sign pass updates R row by row inside its kernel; on a GPU, where rows are many and
short loops slow, the two kernels split that work with the same operations per element.
Arrays are CuPy arrays on a GPU (passed to the kernels through __cuda_array_interface__, no
copy) or NumPy arrays on Numba's simulator, where the results equal the CPU kernels' bit for
bit (tests/test_refine_cuda.py); on a GPU, fused multiply-adds may change the last bits.
Unmeasured on a GPU so far (none has been available).
"""

from __future__ import annotations

from functools import cache

import numba
import numpy as np
from numba import cuda

from qdtk.backend import array_module, simulator_enabled
from qdtk.formats.bits import GROUP
from qdtk.math.lanes import lane_dot, lane_dot_python

THREADS = 256  # threads per block of dequantize and group_dots
BLOCKS = 4096  # at most this many blocks; the threads stride over the rest
ROWS = 8  # sign_pass: rows per thread block of sign_pass_group
LANES = 32  # and threads per row (one warp)


@cache
def kernels(dtype: np.dtype):
    """(dequantize, group_dots, sign_pass_group, apply_changes) compiled for the working
    precision `dtype`."""
    T = numba.from_dtype(dtype)
    f64 = numba.float64
    dot = lane_dot_python if simulator_enabled() else lane_dot

    @cuda.jit
    def dequantize(S, a, b, group, out):
        """out [n, m] = sum_k a[k, g(j), i] b[k, j] S[k, i, j], planes added in order."""
        K, n, m = S.shape
        for q in range(cuda.grid(1), n * m, cuda.gridsize(1)):
            i, j = q // m, q % m
            acc = T(0)
            for k in range(K):
                acc += a[k, group[j], i] * b[k, j] * S[k, i, j]
            out[i, j] = acc

    @cuda.jit
    def group_dots(Y, V, starts, k, h, M):
        """M[i, k, h, l, g] = M[i, l, g, k, h] = sum_{j in group g} Y[i, j - starts[h]]
        V[l, i, j] for the groups g >= h, as qdtk.math.refine._group_dots."""
        n, K, G = M.shape[0], M.shape[1], M.shape[2]
        m = V.shape[2]
        later = G - h
        for q in range(cuda.grid(1), n * K * later, cuda.gridsize(1)):
            i, l, g = q // (K * later), (q // later) % K, h + q % later
            j0 = starts[g]
            stop = starts[g + 1] if g + 1 < G else m
            s = dot(Y[i, j0 - starts[h] :], V[l, i, j0:stop], stop - j0)
            M[i, k, h, l, g] = s
            M[i, l, g, k, h] = s

    @cuda.jit
    def sign_pass_group(S, ab, R, Hg, Delta):
        """One group's Gauss-Seidel sign choices, as in qdtk.math.refine.sign_pass (in place:
        S [o, n, w] int8, Delta [n, w]; R [n, w], the group's columns of D H, is read, its
        updates stay in shared memory; Hg [w, w] = H on the group).
        Block (lanes, rows): thread (x, y) works on row blockIdx.x * rows + y."""
        o, n, w = S.shape
        lane, r = cuda.threadIdx.x, cuda.threadIdx.y
        lanes = cuda.blockDim.x
        i = cuda.blockIdx.x * cuda.blockDim.y + r
        live = i < n  # the last block may be ragged; its idle rows still meet the barriers
        Rt = cuda.shared.array((ROWS, GROUP), T)
        if live:
            for jj in range(lane, w, lanes):
                Rt[r, jj] = R[i, jj]
        cuda.syncthreads()
        last_p, last_j = -1, 0
        for j in range(w):
            if live:
                if lane == 0 and last_p >= 0:  # the previous column's pattern: every thread
                    for k in range(o):  # of the row has read S[:, i, last_j] by now
                        S[k, i, last_j] = 1 if (last_p >> k) & 1 else -1
                q = f64(0)
                for k in range(o):
                    q += S[k, i, j] * f64(ab[k, i, j])
                best, best_p, d = f64(0), -1, f64(0)
                for p in range(1 << o):
                    v = f64(0)
                    for k in range(o):
                        v += f64(ab[k, i, j]) if (p >> k) & 1 else -f64(ab[k, i, j])
                    step = v - q
                    change = Hg[j, j] * step * step - 2.0 * step * Rt[r, j]
                    if change < best:
                        best, best_p, d = change, p, step
                last_p, last_j = best_p, j
                if best_p >= 0:
                    dd = T(d)  # the change in R's precision, as on the CPU
                    if lane == 0:
                        Delta[i, j] = dd
                    for jj in range(j + 1 + lane, w, lanes):
                        Rt[r, jj] -= dd * Hg[j, jj]
            cuda.syncthreads()
        if live and lane == 0 and last_p >= 0:
            for k in range(o):
                S[k, i, last_j] = 1 if (last_p >> k) & 1 else -1

    @cuda.jit
    def apply_changes(R, Delta, Hrows):
        """R[i, jj] -= Delta[i, j] Hrows[j, jj] for the changed j of row i, in column order."""
        n, m = R.shape
        w = Delta.shape[1]
        for q in range(cuda.grid(1), n * m, cuda.gridsize(1)):
            i, jj = q // m, q % m
            acc = R[i, jj]
            for j in range(w):
                dd = Delta[i, j]
                if dd != 0:
                    acc -= dd * Hrows[j, jj]
            R[i, jj] = acc

    return dequantize, group_dots, sign_pass_group, apply_changes


def _grid(items: int, threads: int, blocks: int) -> int:
    return max(1, min(blocks, -(-items // threads)))


def dequantize(S, a, b, group, out, *, threads: int = THREADS, blocks: int = BLOCKS):
    """out [n, m] = What of the state (S [K, n, m] int8, a [K, G, n], b [K, m], group [m]
    g(j)), in out's dtype; returns out."""
    n, m = out.shape
    kernels(np.dtype(out.dtype))[0][_grid(n * m, threads, blocks), threads](S, a, b, group, out)
    return out


def group_dots(Y, V, starts, k: int, h: int, M, *, threads: int = THREADS, blocks: int = BLOCKS):
    """The row refit's M entries of plane k and group h (qdtk.math.refine._group_dots)."""
    items = M.shape[0] * M.shape[1] * (M.shape[2] - h)
    kern = kernels(np.dtype(Y.dtype))[1]
    kern[_grid(items, threads, blocks), threads](Y, V, starts, k, h, M)


def sign_pass(S, ab, R, Hrows, j0: int, Delta, *, rows: int = ROWS, lanes: int = LANES,
              threads: int = THREADS, blocks: int = BLOCKS) -> None:
    """One group's sign pass in place (qdtk.math.refine.sign_pass): S, R [n, m] and Delta;
    `rows` (<= ROWS), `lanes`, `threads` and `blocks` shape the launches (tests shrink them)."""
    o, n, w = S.shape
    if not 1 <= rows <= ROWS or w > GROUP:
        raise ValueError(f"sign pass: need 1 <= rows <= {ROWS} and a group of at most {GROUP} "
                         f"columns; got rows {rows}, {w} columns")
    xp = array_module(R)
    cols = slice(j0, j0 + w)
    choose, apply = kernels(np.dtype(R.dtype))[2:]
    choose[-(-n // rows), (lanes, rows)](S, ab, xp.ascontiguousarray(R[:, cols]),
                                         xp.ascontiguousarray(Hrows[:, cols]), Delta)
    apply[_grid(R.size, threads, blocks), threads](R, Delta, Hrows)


def ptx(dtype=np.float32, cc: tuple[int, int] = (9, 0)) -> dict[str, str]:
    """PTX of the four kernels for compute capability `cc`, built without a GPU (needs NVVM and
    NUMBA_ENABLE_CUDASIM unset): shows they type-check and compile for a real device."""
    T = numba.from_dtype(np.dtype(dtype))
    A = {(t, nd): numba.types.Array(t, nd, "C") for t in (T, numba.int8, numba.int64,
                                                          numba.float64) for nd in (1, 2, 3, 5)}
    i, void = numba.int64, numba.types.void
    sigs = [
        void(A[numba.int8, 3], A[T, 3], A[T, 2], A[numba.int64, 1], A[T, 2]),
        void(A[T, 2], A[T, 3], A[numba.int64, 1], i, i, A[numba.float64, 5]),
        void(A[numba.int8, 3], A[T, 3], A[T, 2], A[T, 2], A[T, 2]),
        void(A[T, 2], A[T, 2], A[T, 2]),
    ]
    kern = kernels(np.dtype(dtype))
    return {k.py_func.__name__: cuda.compile_ptx(k.py_func, sig, cc=cc)[0]
            for k, sig in zip(kern, sigs, strict=True)}
