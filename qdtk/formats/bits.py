"""Groups of input columns and honest bit accounting (METHOD.md §7).

A binary-coded layer stores, for each 128-column group g of width w at order o_g: o_g sign
planes (1 bit per weight) and per plane a float16 row scale (n values) and a float16 column scale
(w values). Every report of bits per weight in qdtk comes from here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

GROUP = 128
SCALE_BITS = 16


def group_slices(m: int, group: int = GROUP) -> list[slice]:
    """Consecutive column groups of `group` columns; the last may be narrower."""
    return [slice(s, min(s + group, m)) for s in range(0, m, group)]


def group_widths(m: int, group: int = GROUP) -> np.ndarray:
    """[G] widths of the column groups of an m-column layer."""
    return np.array([s.stop - s.start for s in group_slices(m, group)], dtype=np.int64)


def group_bits(n: int, width: int | np.ndarray, order: int | np.ndarray) -> np.ndarray:
    """Storage bits of a group: o*n*w plane bits plus 16*o*(n+w) scale bits."""
    width, order = np.asarray(width, np.int64), np.asarray(order, np.int64)
    return order * n * width + SCALE_BITS * order * (n + width)


def group_plane_bits(n: int, width: int | np.ndarray, order: int | np.ndarray) -> np.ndarray:
    """Nominal sign-plane bits of a group, o*n*w, scales left out (the papers' "bits")."""
    width, order = np.asarray(width, np.int64), np.asarray(order, np.int64)
    return order * n * width


def bcq_bits(n: int, m: int, orders: Sequence[int] | np.ndarray, group: int = GROUP) -> int:
    """Total storage bits of an n x m binary-coded layer with the given per-group orders."""
    return int(group_bits(n, group_widths(m, group), np.asarray(orders)).sum())


def bcq_bits_per_weight(
    n: int, m: int, orders: Sequence[int] | np.ndarray, group: int = GROUP
) -> float:
    return bcq_bits(n, m, orders, group) / (n * m)


def affine_bits(n: int, m: int, bits: int, group: int = GROUP) -> int:
    """Storage bits of an asymmetric per-group integer layer (RTN, GPTQ): codes, fp16 scale+zero."""
    G = len(group_slices(m, group))
    return bits * n * m + 2 * SCALE_BITS * n * G
