"""CPU kernels (Numba) for y = x What^T on the packed planes of docs/FORMAT.md section 3.

Scope: arrays in, arrays out, no torch. The arrays are the packed buffers as stored (planes
uint32, scales float16 viewed as uint16: Numba has no float16 on the CPU) and the plane layout
of `qdtk.formats.packed.plane_layout`. Two ways to the product, both on the stored layout (a row of
M.planes holds all planes of that output row, so each row is read once, front to back):

- `dequantize_rows`: a tile of rows of What, evaluated exactly as FORMAT.md prescribes (same
  float32 operations in the same order, so the same bits as `qdtk unpack`); the caller then
  multiplies the tile with BLAS. For many tokens, where the GEMM's flops dominate.
- `matmul_packed`: reads only the packed bytes. The column scales are applied to x once per
  token (`scaled_inputs`, x (.) b laid out like the sign words, 4 bytes per stored bit); each
  output row then costs, per word of 32 signs, one masked vector add of x b (the signed sum is
  twice the sum over the set bits less the plane's total), and per plane one multiplication by
  a; four rows share each load of x b. With AVX-512, 32 rows at a time instead, T-MAC style:
  a table of the 16 signed sums of every 4 inputs, the rows' 4-sign nibbles its indices (one
  vector permute per nibble of 16 rows, two vectors of rows per table load). For few tokens,
  where the weight bytes read dominate. (Tables looked up one row at a time, LUT-GEMM style,
  measured 3x slower: a scalar load per lookup. With the rows in the lanes, one permute does
  16 lookups.)

The word-wide steps are `qdtk.math.simd`'s LLVM vector primitives; Numba's own loops stay scalar.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from qdtk.math.simd import (
    HAS_AVX512,
    LANES,
    NIBBLES,
    ROWS,
    TABLE_ROWS,
    VECTOR_ROWS,
    nibble_row_sums,
    nibble_row_sums_16,
    signed_axpy,
    signed_row_sums,
)

WORD_BITS = LANES  # a word of signs is one vector of qdtk.math.simd

# 2^(max(e, 1) - 25) for the 5-bit exponent e of a float16: its value is
# (mantissa + 1024 if e else mantissa) * POW2[e] (subnormals included).
POW2 = np.array([2.0 ** (max(e, 1) - 25) for e in range(32)], np.float32)


def half_to_float32(h):
    """float16 bits (uint16) -> float32, exactly. Plain Python, compiled by Numba for the CPU
    here and for CUDA in qdtk.math.bcq_matmul_cuda."""
    e = (h >> 10) & 0x1F
    mant = h & 0x3FF
    if e == 0x1F:
        v = np.float32(np.inf) if mant == 0 else np.float32(np.nan)
    else:
        v = np.float32(mant + (1024 if e else 0)) * POW2[e]
    return -v if h >> 15 else v


_half = njit(inline="always", cache=True)(half_to_float32)


@njit(parallel=True, cache=True)
def dequantize_rows(planes, row_scale, col_scale, start, width, word, col, r0, out):
    """out[ii, :] = What[r0 + ii, :], the canonical float32 evaluation: s = a b, then +-s added
    in plane order, no fused multiply-add.

    planes [n, U] uint32; row_scale [P, n] uint16 (float16 bits); col_scale [C] float32;
    start, width, word, col [P] int64 (plane layout); out [R, m] float32.
    """
    for ii in prange(out.shape[0]):
        i = r0 + ii
        row = out[ii]
        row[:] = 0
        bits_i = planes[i]
        for p in range(start.shape[0]):  # group-major: plane k of a group adds after k - 1
            a = _half(row_scale[p, i])
            s0, w, u0, c0 = start[p], width[p], word[p], col[p]
            full = w // WORD_BITS
            signed_axpy(row, s0, col_scale, c0, a, bits_i, u0, full)
            bits = np.uint32(bits_i[u0 + full]) if full * WORD_BITS < w else np.uint32(0)
            for e in range(w - full * WORD_BITS):  # a narrow last group's last word
                s = a * col_scale[c0 + full * WORD_BITS + e]
                row[s0 + full * WORD_BITS + e] += s if bits & (np.uint32(1) << np.uint32(e)) \
                    else -s
    return out


@njit(parallel=True, cache=True)
def scaled_inputs(x, col_scale, start, width, word, col, n_words):
    """xb [T, 32 U]: xb[t, 32 word_p + j] = x[t, start_p + j] b_p[j] for j < w_p, zero in the
    rest of plane p's last word (whose sign bits are 0: they add -0)."""
    xb = np.zeros((x.shape[0], WORD_BITS * n_words), np.float32)
    for p in prange(start.shape[0]):
        s0, w, c0, j0 = start[p], width[p], col[p], WORD_BITS * word[p]
        for t in range(x.shape[0]):
            for j in range(w):
                xb[t, j0 + j] = x[t, s0 + j] * col_scale[c0 + j]
    return xb


@njit(parallel=True, cache=True)
def plane_halves(xb, word, n_words):
    """half [T, 32 P]: half[t, 32 p + e] = (1/2) sum over plane p's words u of xb[t, 32 u + e]
    (`signed_row_sums` starts each row's lanes there)."""
    half = np.zeros((xb.shape[0], WORD_BITS * word.shape[0]), np.float32)
    for t in prange(xb.shape[0]):
        for p in range(word.shape[0]):
            for q in range(n_words[p]):
                for e in range(WORD_BITS):
                    half[t, WORD_BITS * p + e] += xb[t, WORD_BITS * (word[p] + q) + e]
            for e in range(WORD_BITS):
                half[t, WORD_BITS * p + e] *= np.float32(0.5)
    return half


@njit(parallel=True, cache=True)
def nibble_tables(xb):
    """table [T, 128 U]: table[t, 128 u + 16 j + c] = sum_{e < 4} (bit e of c ? +1 : -1)
    xb[t, 32 u + 4 j + e], the 16 signed sums of each 4 inputs of a word (`nibble_row_sums`)."""
    T, U = xb.shape[0], xb.shape[1] // WORD_BITS
    table = np.empty((T, 16 * NIBBLES * U), np.float32)
    for t in range(T):
        for u in prange(U):
            for j in range(NIBBLES):
                s0 = WORD_BITS * u + 4 * j
                x0, x1, x2, x3 = xb[t, s0], xb[t, s0 + 1], xb[t, s0 + 2], xb[t, s0 + 3]
                for c in range(16):
                    table[t, 16 * (NIBBLES * u + j) + c] = (
                        ((x0 if c & 1 else -x0) + (x1 if c & 2 else -x1))
                        + ((x2 if c & 4 else -x2) + (x3 if c & 8 else -x3)))
    return table


@njit(parallel=True, cache=True)
def _packed_kernel(xb, half, planes, row_scale, word, n_words, y):
    """y[t, i] = sum_p a_p[i] sum_{words u of plane p} sum_e (+-1 by bit e) xb[t, 32 u + e],
    ROWS output rows at a time (one load of xb serves them all)."""
    for block in prange(-(-planes.shape[0] // ROWS)):
        for t in range(xb.shape[0]):
            signed_row_sums(xb[t], half[t], planes, row_scale, block * ROWS, word, n_words, y[t])
    return y


# Bytes of tables (128 KiB a token for m = 4096) that one pass over the rows looks up: they stay
# in L2 (2 MiB a core here) next to the rows. Passes of more tokens measured 1.7-2.7x slower at
# T = 16 (4096 x 4096 and 4096 x 12288, one core): the tables came from L3 for every 32 rows.
TABLE_BYTES = 3 * 2**18


@njit(parallel=True, cache=True)
def _table_kernel(table, xb, half, planes, row_scale, word, n_words, y, chunk):
    """`_packed_kernel`'s y, TABLE_ROWS rows at a time by table lookups, then 16 rows if as
    many are left; the last n mod 16 rows as `_packed_kernel` computes them. One pass over the
    rows for every `chunk` tokens. (One vector of 16 rows per table load streamed 512 bytes of
    tables from L2 per word and vector, and measured 1.2-1.35x slower than two; with two,
    tables kept in L1, the best chunking of the planes could give, measured 7-10% faster, not
    worth scattering the reads of the rows.)"""
    n = planes.shape[0]
    full = n // TABLE_ROWS
    tail = full * TABLE_ROWS + (n - full * TABLE_ROWS) // VECTOR_ROWS * VECTOR_ROWS
    first = full + (tail - full * TABLE_ROWS) // VECTOR_ROWS  # the first block of ROWS rows
    for t0 in range(0, xb.shape[0], chunk):
        for block in prange(first + -(-(n - tail) // ROWS)):
            for t in range(t0, min(xb.shape[0], t0 + chunk)):
                if block < full:
                    nibble_row_sums(table[t], planes, row_scale, block * TABLE_ROWS, word,
                                    n_words, y[t])
                elif block < first:
                    nibble_row_sums_16(table[t], planes, row_scale, full * TABLE_ROWS, word,
                                       n_words, y[t])
                else:
                    signed_row_sums(xb[t], half[t], planes, row_scale,
                                    tail + (block - first) * ROWS, word, n_words, y[t])
    return y


def matmul_packed(
    x: np.ndarray, planes: np.ndarray, row_scale: np.ndarray, col_scale: np.ndarray, layout,
    tables: bool = HAS_AVX512,
) -> np.ndarray:
    """y [T, n] = x What^T from the packed bytes, What never formed.

    x [T, m] float32; planes [n, U] uint32; row_scale [P, n] uint16 (float16 bits);
    col_scale [C] float32; layout: `qdtk.formats.packed.PlaneLayout` of the module's orders.
    tables: 32 rows at a time by lookups in tables of 4-input signed sums (AVX-512: the
    default where this CPU has it), else 4 rows at a time by masked vector adds.
    """
    L = layout
    args = (x, planes, row_scale, col_scale, L.start, L.width, L.word, L.col, L.n_words, L.words)
    return _tables_product(*args, TABLE_BYTES) if tables and HAS_AVX512 else _words_product(*args)


# One compiled call for the whole product (serial itself: the kernels it calls run in parallel).
# At one token the kernels take about 0.6 ms, and each call from Python into Numba costs tens of
# microseconds once the rows have pushed the interpreter out of the caches.
@njit(cache=True)
def _tables_product(x, planes, row_scale, col_scale, start, width, word, col, n_words, words,
                    table_bytes):
    """`matmul_packed` by table lookups (AVX-512)."""
    xb = scaled_inputs(x, col_scale, start, width, word, col, words)  # [T, 32 U]
    y = np.empty((x.shape[0], planes.shape[0]), np.float32)
    # [T, 32 P]: needed only for the last n mod 16 rows
    half = (plane_halves(xb, word, n_words) if planes.shape[0] % VECTOR_ROWS
            else np.empty((x.shape[0], 0), np.float32))
    table = nibble_tables(xb)  # [T, 128 U]
    chunk = max(1, table_bytes // (4 * table.shape[1]))
    return _table_kernel(table, xb, half, planes, row_scale, word, n_words, y, chunk)


@njit(cache=True)
def _words_product(x, planes, row_scale, col_scale, start, width, word, col, n_words, words):
    """`matmul_packed` by masked vector adds."""
    xb = scaled_inputs(x, col_scale, start, width, word, col, words)  # [T, 32 U]
    y = np.empty((x.shape[0], planes.shape[0]), np.float32)
    half = plane_halves(xb, word, n_words)  # [T, 32 P]
    return _packed_kernel(xb, half, planes, row_scale, word, n_words, y)
