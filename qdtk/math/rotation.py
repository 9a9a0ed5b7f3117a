"""Random Hadamard rotation of a Linear's input dimension (incoherence processing, QuIP#).

A layer y = x W^T is quantized as W Q against Q^T H Q, Q [m, m] orthogonal: the product is
unchanged, (x Q)(W Q)^T = x W^T, and so is the proxy error, tr(D Q Q^T H Q Q^T D^T) with
D = W Q - What. The rotated W has no outlier columns and the rotated H a flatter diagonal, which
is what 2-bit codes fit well. The packed model keeps What (in the rotated basis) and rotates
each input online, x -> x Q, in O(m log m); `qdtk unpack` writes What Q^T instead.

    Q = diag(s) blockdiag(H_b, ..., H_b),   H_b = S_b / sqrt(b)

S_b is the Sylvester Hadamard matrix of order b (S_1 = [1], S_2k = [[S_k, S_k], [S_k, -S_k]]),
b the largest power of two dividing m (m = 1536: 512; m odd: 1, signs only), s [m] random
signs from a seed: s_j = +1 where the top bit of splitmix64(seed + (j + 1) * 0x9E3779B97F4A7C15)
is set, else -1 (64-bit unsigned arithmetic; docs/FORMAT.md). So
    x Q   = fwht_b(x * s) / sqrt(b),      x Q^T = fwht_b(x) * s / sqrt(b),
fwht_b the unnormalised Walsh-Hadamard transform of each block of b entries of the last axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from numba import njit, prange

from qdtk.backend import array_module
from qdtk.errors import QdtkError

KINDS = ("none", "hadamard")
GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def block_size(m: int) -> int:
    """The Hadamard block of an m-wide input: the largest power of two dividing m."""
    return m & -m


def random_signs(m: int, seed: int) -> np.ndarray:
    """[m] float32 +-1: the top bit of splitmix64 at seed + (j + 1) * GOLDEN, j = 0..m-1."""
    z = np.uint64(seed) + np.arange(1, m + 1, dtype=np.uint64) * GOLDEN  # wraps mod 2^64
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return np.where(z >> np.uint64(63), 1.0, -1.0).astype(np.float32)


def sylvester(b: int) -> np.ndarray:
    """[b, b] the unnormalised Sylvester Hadamard matrix S_b (b a power of two)."""
    S = np.ones((1, 1))
    while S.shape[0] < b:
        S = np.block([[S, S], [S, -S]])
    return S


def hadamard_matrix(m: int, seed: int) -> np.ndarray:
    """[m, m] float64 Q = diag(s) blockdiag(S_b / sqrt(b)): the dense reference."""
    b = block_size(m)
    blocks = np.kron(np.eye(m // b), sylvester(b) / np.sqrt(b))
    return random_signs(m, seed).astype(np.float64)[:, None] * blocks


def fwht_xp(x: Any, b: int) -> Any:
    """fwht_b of the last axis of x, in place, for any array module with NumPy's slicing
    (NumPy, CuPy, torch): log2(b) butterfly passes over the whole array. Returns the result
    (x itself when x is contiguous)."""
    v = x.reshape(-1, x.shape[-1])
    h = 1
    while h < b:
        pairs = v.reshape(v.shape[0], -1, 2, h)  # [T, m / 2h, 2, h] partners h apart
        top = pairs[:, :, 0] + pairs[:, :, 1]
        pairs[:, :, 1] = pairs[:, :, 0] - pairs[:, :, 1]
        pairs[:, :, 0] = top
        h *= 2
    return v.reshape(x.shape)  # x itself where reshape gave views


@njit(cache=True, inline="always")
def _butterflies8(row, i):
    """The passes h = 1, 2, 4 of the transform on row[i:i + 8], unrolled (the short inner loops
    of those passes do not vectorise): the same sums and differences in the same order."""
    a0, a1, a2, a3 = row[i], row[i + 1], row[i + 2], row[i + 3]
    a4, a5, a6, a7 = row[i + 4], row[i + 5], row[i + 6], row[i + 7]
    b0, b1, b2, b3 = a0 + a1, a0 - a1, a2 + a3, a2 - a3
    b4, b5, b6, b7 = a4 + a5, a4 - a5, a6 + a7, a6 - a7
    c0, c1, c2, c3 = b0 + b2, b1 + b3, b0 - b2, b1 - b3
    c4, c5, c6, c7 = b4 + b6, b5 + b7, b4 - b6, b5 - b7
    row[i], row[i + 1], row[i + 2], row[i + 3] = c0 + c4, c1 + c5, c2 + c6, c3 + c7
    row[i + 4], row[i + 5], row[i + 6], row[i + 7] = c0 - c4, c1 - c5, c2 - c6, c3 - c7


@njit(parallel=True, cache=True)
def _fwht_rows(x, b):  # x [T, m] contiguous, in place, blocks of b
    T, m = x.shape
    for t in prange(T):
        row = x[t]
        for s in range(0, m, b):
            h = 1
            if b >= 8:
                for i in range(s, s + b, 8):
                    _butterflies8(row, i)
                h = 8
            while h < b:
                for i in range(s, s + b, 2 * h):
                    lo, hi = row[i : i + h], row[i + h : i + 2 * h]
                    for j in range(h):
                        u, v = lo[j], hi[j]
                        lo[j] = u + v
                        hi[j] = u - v
                h *= 2


def fwht(x: Any, b: int) -> Any:
    """fwht_b of the last axis of x, in place (NumPy arrays: the Numba kernel). Returns x."""
    if isinstance(x, np.ndarray) and x.flags.c_contiguous and x.ndim >= 1:
        _fwht_rows(x.reshape(-1, x.shape[-1]), b)
        return x
    return fwht_xp(x, b)


@dataclass(frozen=True)
class Rotation:
    """The input rotation Q of an m-wide layer (kind "hadamard"), as recorded in the solution
    and packed files: {"kind", "seed", "block"}."""

    m: int
    seed: int
    kind: str = "hadamard"

    @property
    def block(self) -> int:
        return block_size(self.m)

    @property
    def scale(self) -> float:
        """1 / sqrt(b) as a float64 (NumPy rounds it to float32 for float32 arrays)."""
        return 1 / math.sqrt(self.block)

    @cached_property
    def signs(self) -> np.ndarray:
        return random_signs(self.m, self.seed)  # [m] float32

    def matrix(self) -> np.ndarray:
        return hadamard_matrix(self.m, self.seed)  # [m, m] float64

    def apply(self, x: Any) -> Any:
        """x Q, x [..., m] (a new array of x's kind; NumPy, CuPy or torch)."""
        return fwht(x * self._signs_like(x), self.block) * self.scale

    def apply_t(self, x: Any) -> Any:
        """x Q^T, x [..., m] (a new array of x's kind)."""
        return fwht(x * self.scale, self.block) * self._signs_like(x)

    def _signs_like(self, x: Any) -> Any:
        """The signs as an array of x's kind, dtype and device, made once per kind (a packed
        Linear on a GPU would otherwise copy them to the device on every forward)."""
        if isinstance(x, np.ndarray):
            return self.signs.astype(x.dtype, copy=False)
        import sys

        torch = sys.modules.get("torch")  # torch only when x is a tensor (never imported here)
        if torch is not None and isinstance(x, torch.Tensor):
            key = ("torch", str(x.device), str(x.dtype))
            if key not in self._signs_cache:
                self._signs_cache[key] = torch.from_numpy(self.signs).to(device=x.device,
                                                                         dtype=x.dtype)
        else:
            xp = array_module(x)
            key = (xp.__name__, str(getattr(x, "device", "")), str(x.dtype))
            if key not in self._signs_cache:
                self._signs_cache[key] = xp.asarray(self.signs, x.dtype)
        return self._signs_cache[key]

    @cached_property
    def _signs_cache(self) -> dict:
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "seed": self.seed, "block": self.block}

    @classmethod
    def from_dict(cls, d: Any, m: int) -> Rotation:
        """The rotation a file records for an m-wide layer; ValueError if malformed."""
        ok = (isinstance(d, dict) and d.get("kind") == "hadamard"
              and isinstance(d.get("seed"), int) and 0 <= d["seed"] < 2**63
              and d.get("block") == block_size(m))
        if not ok:
            raise ValueError(f"invalid rotation {d!r} for {m} input columns (expected kind "
                             f"'hadamard', a seed in 0..2^63-1, block {block_size(m)})")
        return cls(m, d["seed"])


def check_rotation(kind: str, seed: Any) -> None:
    """The quantize options --rotate / --rotate-seed, or a one-line QdtkError."""
    if kind not in KINDS:
        raise QdtkError(f"--rotate must be one of {', '.join(KINDS)}, got {kind!r}")
    if not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise QdtkError(f"--rotate-seed must be a whole number in 0..2^63-1, got {seed!r}")


def layer_rotation(kind: str, seed: int, m: int) -> Rotation | None:
    """The rotation the quantize options --rotate/--rotate-seed give an m-wide layer."""
    return None if kind == "none" else Rotation(m, int(seed))


def rotate_problem(W: np.ndarray, H: np.ndarray, rot: Rotation | None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(W Q [n, m] float32, Q^T H Q [m, m] float32): the layer's problem in the rotated basis.
    Columns no token reached (H_jj = 0) are zeroed first, as the unrotated solve treats them:
    rotated, their weights would spread over every column and cost accuracy for nothing."""
    if rot is None:
        return W, H
    W = np.array(W, np.float32)  # [n, m] a copy
    W[:, np.diag(H) == 0] = 0
    return rot.apply(W), rotate_statistic(H, rot)


def rotate_statistic(H: np.ndarray, rot: Rotation) -> np.ndarray:
    """[m, m] float32 Q^T H Q."""
    HQ = rot.apply(np.asarray(H, np.float64))  # [m, m] H Q
    return rot.apply(np.ascontiguousarray(HQ.T)).astype(np.float32)
