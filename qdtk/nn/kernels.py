"""CPU kernels (Numba) for y = x What^T on the packed planes of docs/FORMAT.md section 3.

Scope: arrays in, arrays out, no torch. The arrays are the packed buffers as stored (planes
uint32, scales float16 viewed as uint16: Numba has no float16 on the CPU) and the plane layout
of `qdtk.pack.plane_layout`. Two ways to the product:

- `dequantize_rows`: a tile of rows of What, evaluated exactly as FORMAT.md prescribes (same
  float32 operations in the same order, so the same bits as `qdtk unpack`); the caller then
  multiplies the tile with BLAS. For many tokens, where the GEMM's flops dominate.
- `matmul_lut`: reads only the packed bytes. Per token and byte position of a plane row, the
  256 signed sums of its 8 columns' b_j x_j are tabulated once; each output row then costs one
  lookup per byte of signs and one multiplication by a per plane (LUT-GEMM). For few tokens,
  where the weight bytes read dominate.

Inner loops index contiguous slices with range variables: Numba then drops its negative-index
wraparound and LLVM vectorises them (4x on `dequantize_rows`).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

WORD_BITS = 32

# 2^(max(e, 1) - 25) for the 5-bit exponent e of a float16: its value is
# (mantissa + 1024 if e else mantissa) * POW2[e] (subnormals included).
POW2 = np.array([2.0 ** (max(e, 1) - 25) for e in range(32)], np.float32)


def half_to_float32(h):
    """float16 bits (uint16) -> float32, exactly. Plain Python, compiled by Numba for the CPU
    here and for CUDA in qdtk.nn.cuda."""
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
        for p in range(start.shape[0]):  # group-major: plane k of a group adds after k - 1
            a = _half(row_scale[p, i])
            s0, w, u0, c0 = start[p], width[p], word[p], col[p]
            seg = row[s0 : s0 + w]
            b = col_scale[c0 : c0 + w]
            for q in range((w + WORD_BITS - 1) // WORD_BITS):
                bits = np.uint32(planes[i, u0 + q])
                j0 = WORD_BITS * q
                sq = seg[j0 : j0 + WORD_BITS]  # 32 columns, fewer in a narrow group's last word
                bq = b[j0 : j0 + WORD_BITS]
                if sq.shape[0] == WORD_BITS:  # constant trip count: unrolled and vectorised
                    for e in range(WORD_BITS):
                        s = a * bq[e]
                        sq[e] += s if bits & (np.uint32(1) << np.uint32(e)) else -s
                else:
                    for e in range(sq.shape[0]):
                        s = a * bq[e]
                        sq[e] += s if bits & (np.uint32(1) << np.uint32(e)) else -s
    return out


@njit(parallel=True, fastmath=True, cache=True)
def sign_tables(x, col_scale, start, width, word, col, n_bytes):
    """lut [T, n_bytes, 256]: lut[t, c, pat] = sum_e (+-1 from bit e of pat) b_j x[t, start_p
    + j], j = 8 (c - 4 word_p) + e < w_p, for byte c of plane p in a row of M.planes (bytes
    past the group's width add nothing)."""
    T = x.shape[0]
    lut = np.empty((T, n_bytes, 256), np.float32)
    for p in prange(start.shape[0]):
        s0, w, c0 = start[p], width[p], col[p]
        for c in range(-(-w // 8)):
            byte = 4 * word[p] + c
            for t in range(T):
                v = np.zeros(8, np.float32)
                for e in range(min(8, w - 8 * c)):
                    v[e] = x[t, s0 + 8 * c + e] * col_scale[c0 + 8 * c + e]
                tab = lut[t, byte]
                tab[0] = -v.sum()  # every sign -1
                for e in range(8):
                    for pat in range(1 << e, 2 << e):  # patterns whose highest set bit is e
                        tab[pat] = tab[pat - (1 << e)] + 2 * v[e]
        for c in range(-(-w // 8), 4 * -(-w // WORD_BITS)):  # padding bytes of the last word
            lut[:, 4 * word[p] + c, :] = 0
    return lut


# Tables per pass of the lookup kernel (1 KiB per byte of a plane row): they stay in L2 while
# every row reads them (4096 x 12288 at T = 1, one core: all 3 MiB in one pass 28 ms, passes
# of 512 KiB 21.5 ms; 128 KiB to 1 MiB within noise).
LUT_BYTES = 512 << 10


@njit(parallel=True, fastmath=True, cache=True)
def _lut_kernel(lut, planes8, row_scale, word, passes, y):
    """y[t, i] = sum_p a_p[i] sum_{c in plane p} lut[t, c, planes8[i, c]], planes taken in
    passes [passes[k], passes[k + 1]). planes8 [n, 4 U] uint8 (M.planes as little-endian
    bytes); y [T, n] float32, zeroed here."""
    n, nb = planes8.shape
    P = word.shape[0]
    y[:] = 0
    for t in range(lut.shape[0]):
        tabs = lut[t]
        for k in range(passes.shape[0] - 1):
            for i in prange(n):
                bytes_i = planes8[i]
                acc = np.float32(0)
                for p in range(passes[k], passes[k + 1]):
                    c1 = 4 * word[p + 1] if p + 1 < P else nb
                    s = np.float32(0)
                    for c in range(4 * word[p], c1):
                        s += tabs[c, bytes_i[c]]
                    acc += _half(row_scale[p, i]) * s
                y[t, i] += acc
    return y


def lut_passes(word: np.ndarray, n_bytes: int) -> np.ndarray:
    """Plane boundaries [passes + 1] of passes whose tables fit LUT_BYTES (one plane at least).
    word [P] first word of each plane; n_bytes: bytes of a row of M.planes."""
    first = 4 * np.asarray(word, np.int64)  # [P] first byte of each plane
    end = np.append(first[1:], n_bytes)  # [P] one past its last byte
    per_pass = LUT_BYTES // (256 * 4)  # bytes of a plane row whose tables fit
    bounds = [0]
    for p in range(1, len(first)):
        if end[p] - first[bounds[-1]] > per_pass:
            bounds.append(p)
    return np.array(bounds + [len(first)], np.int64)


def matmul_lut(
    x: np.ndarray, planes: np.ndarray, row_scale: np.ndarray, col_scale: np.ndarray, layout
) -> np.ndarray:
    """y [T, n] = x What^T from the packed bytes, What never formed.

    x [T, m] float32; planes [n, U] uint32; row_scale [P, n] uint16 (float16 bits);
    col_scale [C] float32; layout: `qdtk.pack.PlaneLayout` of the module's orders.
    """
    L = layout
    planes8 = planes.astype("<u4", copy=False).view(np.uint8)  # [n, 4 U]
    lut = sign_tables(x, col_scale, L.start, L.width, L.word, L.col, planes8.shape[1])
    y = np.empty((x.shape[0], planes.shape[0]), np.float32)
    return _lut_kernel(lut, planes8, row_scale, L.word, lut_passes(L.word, planes8.shape[1]), y)
