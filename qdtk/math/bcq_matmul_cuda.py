"""GPU kernels (Numba CUDA) for y = x What^T on the packed planes of docs/FORMAT.md section 3.

The same two ways as qdtk.math.bcq_matmul, on any arrays with __cuda_array_interface__ (torch CUDA
tensors through `cuda.as_cuda_array`, no copy; NumPy arrays on Numba's simulator):

- `dequantize_rows`: one thread per element of a tile of What, the canonical float32
  evaluation (same bits as the CPU kernel and `qdtk unpack`); the caller multiplies the tile
  with cuBLAS (tensor cores in bfloat16 are not used: the 1e-5 agreement needs float32).
- `matmul_packed`: one thread block per output row and token, its threads striding over the
  row's words (coalesced), each word's 32 signs applied bit by bit to x (.) b, then a
  shared-memory reduction. Reads the packed bytes only.

Unmeasured on a GPU so far (none has been available); tested on the simulator against the CPU
kernels.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from numba import cuda

from qdtk.math.bcq_matmul import WORD_BITS, half_to_float32

THREADS = 128  # threads per block of matmul_packed
TILE = (16, 16)  # (rows, columns) per block of dequantize_rows


@cache
def kernels():
    """(dequantize, matmul) compiled on first use (importing this module compiles nothing)."""
    half = cuda.jit(device=True, inline=True)(half_to_float32)  # POW2: a constant array

    @cuda.jit
    def dequantize(planes, row_scale, col_scale, first, orders, word, col, r0, out):
        """out[ii, j] = What[r0 + ii, j]. first [G] first plane of group g; orders [G]."""
        ii, j = cuda.grid(2)
        if ii >= out.shape[0] or j >= out.shape[1]:
            return
        i = r0 + ii
        g = j // 128
        jj = j - 128 * g
        acc = np.float32(0)
        for k in range(orders[g]):
            p = first[g] + k
            s = half(row_scale[p, i]) * col_scale[col[p] + jj]
            bits = planes[i, word[p] + jj // WORD_BITS]
            acc += s if (bits >> (jj % WORD_BITS)) & 1 else -s
        out[ii, j] = acc

    @cuda.jit
    def matmul(x, planes, row_scale, col_scale, plane_of, start, word, col, width, y):
        """y[t, i]; grid (n, T), THREADS threads; plane_of [U] the plane of each word."""
        i, t = cuda.blockIdx.x, cuda.blockIdx.y
        part = cuda.shared.array(THREADS, np.float32)
        acc = np.float32(0)
        for u in range(cuda.threadIdx.x, planes.shape[1], cuda.blockDim.x):
            p = plane_of[u]
            j0 = WORD_BITS * (u - word[p])
            bits = planes[i, u]
            s = np.float32(0)
            for e in range(min(WORD_BITS, width[p] - j0)):
                v = x[t, start[p] + j0 + e] * col_scale[col[p] + j0 + e]
                s += v if (bits >> e) & 1 else -v
            acc += half(row_scale[p, i]) * s
        part[cuda.threadIdx.x] = acc
        cuda.syncthreads()
        step = cuda.blockDim.x // 2
        while step > 0:
            if cuda.threadIdx.x < step:
                part[cuda.threadIdx.x] += part[cuda.threadIdx.x + step]
            cuda.syncthreads()
            step //= 2
        if cuda.threadIdx.x == 0:
            y[t, i] = part[0]

    return dequantize, matmul


def dequantize_rows(planes, row_scale, col_scale, layout, orders, r0, out, tile=TILE) -> None:
    """out [R, m] float32 = What[r0 : r0 + R] on the device; arguments as in
    qdtk.math.bcq_matmul.dequantize_rows, plus `orders` [G] and the layout's device arrays."""
    first, word, col = layout["first"], layout["word"], layout["col"]
    grid = (-(-out.shape[0] // tile[0]), -(-out.shape[1] // tile[1]))
    kernels()[0][grid, tile](planes, row_scale, col_scale, first, orders, word, col, r0, out)


def matmul_packed(x, planes, row_scale, col_scale, layout, y, threads: int = THREADS) -> None:
    """y [T, n] float32 = x What^T from the packed bytes on the device."""
    L = layout
    grid = (planes.shape[0], x.shape[0])
    kernels()[1][grid, threads](x, planes, row_scale, col_scale, L["plane_of"], L["start"],
                                L["word"], L["col"], L["width"], y)


def device_layout(layout, orders: np.ndarray) -> dict[str, np.ndarray]:
    """The int32 index arrays the CUDA kernels read, from a qdtk.formats.packed.PlaneLayout."""
    o = np.asarray(orders, np.int64)
    plane_of = np.repeat(np.arange(len(layout.word)), layout.n_words)  # [U]
    return {
        "first": np.concatenate([[0], np.cumsum(o)[:-1]]).astype(np.int32),
        "start": layout.start.astype(np.int32),
        "width": layout.width.astype(np.int32),
        "word": layout.word.astype(np.int32),
        "col": layout.col.astype(np.int32),
        "plane_of": plane_of.astype(np.int32),
    }
