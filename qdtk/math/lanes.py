"""Sums in a fixed order that still vectorise (Numba, inlined into the kernels that use them).

Reassociated sums (fastmath) let LLVM vectorise a reduction, but how it vectorised depended on
where the code was compiled: a kernel compiled with its caller and the same kernel loaded from
Numba's cache gave different bits, so a fresh process (a --cluster worker, a first run) and a
warm one disagreed. Eight interleaved partial sums combined in one fixed order give LLVM eight
independent chains to vectorise without changing a bit.
"""

from __future__ import annotations

from types import FunctionType

from numba import njit


@njit(cache=True, inline="always")
def _term(x, y, j):
    return x[j] if y is None else x[j] * y[j]  # y None: a plain sum (the branch compiles away)


@njit(cache=True, inline="always")
def lane_dot(x, y, w):
    """sum_{j < w} x[j] y[j] (y None: sum_{j < w} x[j]) as 8 interleaved partial sums combined
    in a fixed order: the same bits however LLVM vectorises it."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = x.dtype.type(0)
    j = 0
    while j + 8 <= w:
        s0 += _term(x, y, j)
        s1 += _term(x, y, j + 1)
        s2 += _term(x, y, j + 2)
        s3 += _term(x, y, j + 3)
        s4 += _term(x, y, j + 4)
        s5 += _term(x, y, j + 5)
        s6 += _term(x, y, j + 6)
        s7 += _term(x, y, j + 7)
        j += 8
    t = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    while j < w:
        t += _term(x, y, j)
        j += 1
    return t


# Numba's CUDA simulator runs kernels as Python on its own array type, which compiled functions
# cannot take: there the CUDA kernels call this, the same code with its helper as Python too.
lane_dot_python = FunctionType(lane_dot.py_func.__code__,
                               {**lane_dot.py_func.__globals__, "_term": _term.py_func})
