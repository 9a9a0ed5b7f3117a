"""DAQ on a GPU (METHOD.md §3, §4): Numba CUDA kernels for the block solver, CuPy for the layer's
algebra.

The block solver follows reference.py step for step (same update order, EPS placement, sign(0)
= +1, sign-search tie rule). A block Wb [n, w <= 128] is cut into tiles of up to ROWS rows;
one thread block owns one tile (grid: tiles x groups, so `solve_blocks` solves every group of a
layer at once when they are independent). One launch of `plane_pass` is one fused pass:

    load the tile (coalesced along the columns) into shared memory, optionally re-choosing every
    element's K signs first (the sign search of the previous round, 2^K patterns in registers),
    Wt = Wb - sum_{l != k} planes                      (tile, shared)
    a_k = row reduction of the tile                    (exact for the tile's rows)
    partial column sums of plane k's b_k update        -> part [2, G, tiles, 128]

and `finalize` (one block of THREADS x SLICES per group) reduces the partials over tiles in a
fixed order (deterministic, no atomics) into b_k. Per round that is K passes + K tiny
reductions; the sign search rides on the first pass of the next round, so the data is read K
times per round and nothing of size n*w*2^K is ever formed. An element's K signs are one
byte (bit k = plane k is +1), held in a register inside the kernels. All state (W, E, signs,
a, b) stays on the device between launches.

The layer helpers at the bottom (R from H through cuSOLVER, the compensation steps of
qdtk.solve.layer.sweep for NumPy and CuPy arrays) use CuPy on a real GPU; `qdtk.backend` decides.
"""

from __future__ import annotations

from functools import cache

import numba
import numpy as np
from numba import cuda

from qdtk.backend import array_module
from qdtk.errors import QdtkError
from qdtk.formats.bits import GROUP
from qdtk.math.daq.reference import EPS

ROWS = 16  # rows per tile (thread block): about 19 KB of shared memory in float32
KMAX = 4  # the most planes the kernels hold per element
THREADS = 128  # threads per block: one per column in the load, several per row in reductions
SLICES = 8  # finalize: threads per column, each summing every SLICES-th tile's partials
INIT, UPDATE, SEARCH = 0, 1, 2  # plane_pass modes: greedy init, scale update, sign search only


@cache
def kernels(dtype: np.dtype):
    """(plane_pass, finalize) compiled for float dtype `dtype` (float32 on GPUs, float64 too)."""
    T = numba.from_dtype(dtype)
    i8 = numba.int8
    eps = T(EPS)
    PAD = GROUP + 1  # odd row stride: threads walking down a column hit distinct banks

    @cuda.jit
    def plane_pass(W, E, has_E, P, K, a, b, part, k, mode, search, R):
        """One fused pass for plane k over the tile of R rows of group blockIdx.y owned by this
        thread block.

        W, E [n, m]; P [n, m] uint8, bit l = plane l's sign is +1; a [K, G, n]; b [K, m];
        part [2, G, tiles, GROUP].
        mode INIT: plane k = sign(residual r of planes < k), a_k = mean_j |r|,
                   part[0] = sum_i |r| / a_k.
        mode UPDATE: a_k = exact row minimiser, part = numerator, denominator of b_k's update.
        search: first give every element its best sign pattern (all planes) under a, b.
        """
        n, m = W.shape
        tid = cuda.threadIdx.x
        tpb = cuda.blockDim.x
        tile = cuda.blockIdx.x
        g = cuda.blockIdx.y
        r0 = tile * R
        rows = R if r0 + R <= n else n - r0  # the last tile may be ragged
        c0 = g * GROUP
        w = GROUP if c0 + GROUP <= m else m - c0  # and so may the last group
        Xt = cuda.shared.array((ROWS, PAD), T)  # Wt (UPDATE) or |residual| (INIT)
        Et = cuda.shared.array((ROWS, PAD), T)
        St = cuda.shared.array((ROWS, PAD), i8)  # plane k's signs, +-1
        at = cuda.shared.array((KMAX, ROWS), T)
        bt = cuda.shared.array((KMAX, GROUP), T)
        red = cuda.shared.array((2, THREADS), T)

        for q in range(tid, K * w, tpb):
            bt[q // w, q % w] = b[q // w, c0 + q % w]
        for q in range(tid, K * rows, tpb):
            at[q // rows, q % rows] = a[q // rows, g, r0 + q % rows]
        cuda.syncthreads()

        planes = k if mode == INIT else K  # INIT: planes >= k do not exist yet
        for q in range(tid, rows * w, tpb):  # consecutive threads, consecutive columns
            r = q // w
            j = q % w
            i = r0 + r
            x = W[i, c0 + j]
            if search:  # 2^K patterns, values built plane by plane as in the reference
                best = T(0)
                bits = 0
                for p in range(1 << K):
                    v = T(0)
                    for l in range(K):
                        c = at[l, r] * bt[l, j]
                        v = v + c if (p >> l) & 1 else v - c
                    d = abs(x - v)
                    if p == 0 or d < best:  # strict: ties keep the smaller pattern
                        best = d
                        bits = p
                P[i, c0 + j] = bits
            elif planes == 0:
                bits = 0
            else:
                bits = P[i, c0 + j]
            if mode == SEARCH:
                continue
            for l in range(planes):
                if l != k:
                    c = at[l, r] * bt[l, j]
                    x = x - c if (bits >> l) & 1 else x + c
            if mode == INIT:
                if x >= 0:  # sign(0) = +1
                    bits |= 1 << k
                P[i, c0 + j] = bits
                x = abs(x)
            Xt[r, j] = x
            St[r, j] = i8(1) if (bits >> k) & 1 else i8(-1)
            Et[r, j] = E[i, c0 + j] if has_E else T(1)
        if mode == SEARCH:
            return
        cuda.syncthreads()

        # Row reduction: `segs` threads per row, each over a strided share of the columns.
        segs = tpb // rows  # >= 1: the host ensures rows <= threads
        if tid < rows * segs:
            r = tid % rows
            num = T(0)
            den = T(0)
            for j in range(tid // rows, w, segs):
                if mode == INIT:
                    num += Xt[r, j]
                else:
                    e = Et[r, j]
                    bj = bt[k, j]
                    num += e * bj * St[r, j] * Xt[r, j]
                    den += e * bj * bj
            red[0, tid] = num
            red[1, tid] = den
        cuda.syncthreads()
        for r in range(tid, rows, tpb):
            num = T(0)
            den = T(0)
            for sg in range(segs):
                num += red[0, r + sg * rows]
                den += red[1, r + sg * rows]
            ak = num / T(w) if mode == INIT else num / (den + eps)
            at[k, r] = ak
            a[k, g, r0 + r] = ak
        cuda.syncthreads()

        # Column partial sums over this tile's rows, with the new a_k.
        for j in range(tid, w, tpb):
            num = T(0)
            den = T(0)
            for r in range(rows):
                ak = at[k, r]
                if mode == INIT:
                    if ak > 0:
                        num += Xt[r, j] / ak
                else:
                    e = Et[r, j]
                    num += e * ak * St[r, j] * Xt[r, j]
                    den += e * ak * ak
            part[0, g, tile, j] = num
            part[1, g, tile, j] = den

    @cuda.jit
    def finalize(part, b, k, mode, n):
        """b_k of group blockIdx.x from its tiles' partial sums. Thread (x, y) adds the tiles
        t = y mod blockDim.y of column x (many loads in flight), then row y = 0 adds the SLICES
        sums in order: a fixed order for a given launch shape, so runs are reproducible."""
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        acc = cuda.shared.array((2, SLICES, THREADS), T)
        g = cuda.blockIdx.x
        c0 = g * GROUP
        w = GROUP if c0 + GROUP <= b.shape[1] else b.shape[1] - c0
        for j0 in range(0, w, cuda.blockDim.x):  # uniform trip count: the syncs stay legal
            j = j0 + tx
            num = T(0)
            den = T(0)
            if j < w:
                for t in range(ty, part.shape[2], cuda.blockDim.y):
                    num += part[0, g, t, j]
                    den += part[1, g, t, j]
            acc[0, ty, tx] = num
            acc[1, ty, tx] = den
            cuda.syncthreads()
            if ty == 0 and j < w:
                for y in range(1, cuda.blockDim.y):
                    num += acc[0, y, tx]
                    den += acc[1, y, tx]
                b[k, c0 + j] = num / T(n) if mode == INIT else num / (den + eps)
            cuda.syncthreads()

    return plane_pass, finalize


def ptx(dtype=np.float32, cc: tuple[int, int] = (9, 0)) -> dict[str, str]:
    """PTX of both kernels for compute capability `cc`, built without a GPU (needs NVVM and
    NUMBA_ENABLE_CUDASIM unset): shows the kernels type-check and compile for a real device."""
    T = numba.from_dtype(np.dtype(dtype))
    A2, A3, A4 = (numba.types.Array(T, nd, "C") for nd in (2, 3, 4))
    P2 = numba.types.Array(numba.uint8, 2, "C")
    i, flag, void = numba.int64, numba.boolean, numba.types.void
    plane_pass, finalize = kernels(np.dtype(dtype))
    sigs = {
        "plane_pass": void(A2, A2, flag, P2, i, A3, A2, A4, i, i, flag, i),
        "finalize": void(A4, A2, i, i, i),
    }
    kern = {"plane_pass": plane_pass, "finalize": finalize}
    return {name: cuda.compile_ptx(kern[name].py_func, sig, cc=cc)[0] for name, sig in sigs.items()}


def solve_block(W, order: int, E=None, *, iters: int = 15, refit: bool = True, **launch):
    """(signs [K, n, w] bool, a [K, n], b [K, w]) as reference.solve_block computes them, for
    one block W [n, w <= 128]: `solve_blocks` with a single group."""
    if W.shape[1] > GROUP:
        raise ValueError(f"a block has at most {GROUP} columns, got {W.shape[1]}")
    signs, a, b = solve_blocks(W, order, E, iters=iters, refit=refit, **launch)
    return signs, a[:, 0], b


def solve_blocks(
    W,
    order: int,
    E=None,
    *,
    iters: int = 15,
    refit: bool = True,
    rows: int = ROWS,
    threads: int = THREADS,
    slices: int = SLICES,
):
    """Every 128-column group of W [n, m] solved alone at the same order, all in one launch per
    pass: (signs [K, n, m] bool, a [K, G, n], b [K, m]), the layout of solution.BinaryCodedLayer.
    Group g's result is reference.solve_block(W[:, g], order, E[:, g]) (up to rounding): what
    ABMP's error profiles e_g(o) and an uncompensated layer need.

    W, E: NumPy arrays (copied to the device) or CuPy arrays (used in place; the results then
    come back as CuPy arrays). Computes in W's dtype when it is float64, else float32.
    `rows` (<= ROWS), `threads` (<= THREADS) and `slices` (<= SLICES) shape the launches;
    tests shrink them.
    """
    K, (n, m) = int(order), W.shape
    if not 1 <= K <= KMAX:
        raise QdtkError(f"the CUDA DAQ kernels handle orders 1..{KMAX}, got {K}")
    if not (1 <= rows <= min(threads, ROWS) and threads <= THREADS and 1 <= slices <= SLICES):
        raise ValueError(
            f"launch shape: need 1 <= rows <= threads, rows <= {ROWS}, threads <= {THREADS}, "
            f"slices <= {SLICES}; got rows {rows}, threads {threads}, slices {slices}"
        )
    on_gpu = array_module(W) is not np
    dtype = np.dtype(np.float64 if W.dtype == np.float64 else np.float32)
    plane_pass, finalize = kernels(dtype)

    if on_gpu:
        import cupy

        W_d = cuda.as_cuda_array(cupy.ascontiguousarray(W, dtype=dtype))
        E_d = cuda.as_cuda_array(cupy.ascontiguousarray(E, dtype=dtype)) if E is not None else None
    else:
        W_d = cuda.to_device(np.ascontiguousarray(W, dtype=dtype))
        E_d = cuda.to_device(np.ascontiguousarray(E, dtype=dtype)) if E is not None else None
    has_E = E_d is not None
    if not has_E:
        E_d = cuda.device_array((1, 1), dtype)  # never read
    G, tiles = -(-m // GROUP), -(-n // rows)
    P = cuda.device_array((n, m), np.uint8)  # bit k: plane k's sign is +1
    a = cuda.to_device(np.zeros((K, G, n), dtype))
    b = cuda.to_device(np.zeros((K, m), dtype))
    part = cuda.device_array((2, G, tiles, GROUP), dtype)

    passes = plane_pass[(tiles, G), threads]  # launch configurations, bound once
    reduce = finalize[G, (threads, slices)]

    def scales(mode: int, search_first: bool) -> None:
        for k in range(K):
            passes(W_d, E_d, has_E, P, K, a, b, part, k, mode, search_first and k == 0, rows)
            reduce(part, b, k, mode, n)

    scales(INIT, False)
    search = K >= 2  # K = 1 keeps the initial signs
    for t in range(iters):
        scales(UPDATE, search and t > 0)  # the previous round's sign search, fused
    if refit:
        scales(UPDATE, search and iters > 0)
    elif search and iters > 0:
        passes(W_d, E_d, has_E, P, K, a, b, part, 0, SEARCH, True, rows)

    if on_gpu:
        import cupy

        P, a, b = cupy.asarray(P), cupy.asarray(a), cupy.asarray(b)
    else:
        P, a, b = P.copy_to_host(), a.copy_to_host(), b.copy_to_host()
    xp = array_module(P)
    signs = (P[None] >> xp.arange(K, dtype=xp.uint8)[:, None, None]) & 1  # [K, n, m]
    return signs.astype(bool), a, b


# ---- The layer driver's algebra on the GPU (METHOD.md §2, §4): CuPy (cuSOLVER, cuBLAS). ----
#
# qdtk.solve.layer.sweep compensates left-looking through R (H = R R^T, U = R^-1, never formed):
# per group g, U_gg = R_gg^-1, S = Y_<g R_<g,g, the compensated block Wg + S U_gg, and after
# the solve Y_g = (Err_g - S) U_gg. Those two steps (quantize.compensated_block and
# quantize.feed_forward) take NumPy and CuPy arrays alike (cuBLAS GEMMs and a cuBLAS trsm on a
# GPU), so a layer can run on the device with W, R and Y^T uploaded once.
