"""One 128-column group solved by DAQ (METHOD.md §3), and a memo of such solves.

`solve_group` is what the layer driver's sweep and ABMP's candidate values both call: the
salience weights of the group, the block solver, the scales rounded to float16 and the canonical
dequantisation of the stored solution. Arrays in, arrays out.
"""

from __future__ import annotations

import hashlib

import numpy as np

from qdtk.backend import to_host
from qdtk.formats.solution import dequantize_block
from qdtk.math.daq import error_weights, solve_block
from qdtk.math.hessian import salience

# (signs [K, n, w] bool, a [K, n] float16, b [K, w] float16, Q [n, w] float32)
GroupSolution = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def solve_group(
    Wg: np.ndarray,
    order: int,
    dg: np.ndarray,
    *,
    iters: int = 15,
    tau: float = 2.0,
    lam: float = 3.0,
    refit: bool = True,
    backend: str = "cpu",
) -> GroupSolution:
    """DAQ of one group Wg [n, w] with salience weights from dg = diag(U) of its columns.

    Returns (signs [K, n, w] bool, a [K, n] float16, b [K, w] float16, Q [n, w] float32), Q the
    canonical dequantisation of the stored solution.
    """
    E = error_weights(salience(Wg, dg), tau, lam)  # [n, w]
    signs, a, b = solve_block(Wg, order, E, iters=iters, refit=refit, backend=backend)
    a16, b16 = a.astype(np.float16), b.astype(np.float16)
    return signs, a16, b16, dequantize_block(signs, a16, b16)


class DaqGroupSolver:
    """`solve_group` with fixed settings, memoised on (W_g, order, d_g).

    `solution(W_g, order, d_g)` returns the cached GroupSolution, the signature of the layer
    driver's `sweep` solver, so an uncompensated sweep after ABMP's `group_errors` solves
    nothing twice; calling it returns Q, the canonical dequantisation of the stored solution
    (ABMP's GroupSolver), so the knapsack sees stored errors. Call `clear` after each layer
    (the cache holds every order of every group).
    """

    def __init__(self, *, iters: int = 15, tau: float = 2.0, lam: float = 3.0, refit: bool = True,
                 backend: str = "cpu") -> None:
        self.settings = dict(iters=iters, tau=tau, lam=lam, refit=refit, backend=backend)
        self._cache: dict[tuple, GroupSolution] = {}

    def solution(self, W_g: np.ndarray, order: int, d_g: np.ndarray) -> GroupSolution:
        h = hashlib.blake2b(digest_size=16)
        h.update(np.ascontiguousarray(to_host(W_g)).tobytes())  # device arrays too
        h.update(np.ascontiguousarray(to_host(d_g)).tobytes())
        key = (W_g.shape, W_g.dtype.str, d_g.dtype.str, int(order), h.digest())
        if key not in self._cache:
            self._cache[key] = solve_group(W_g, int(order), d_g, **self.settings)
        return self._cache[key]

    def __call__(self, W_g: np.ndarray, order: int, d_g: np.ndarray) -> np.ndarray:
        return self.solution(W_g, order, d_g)[3]

    def clear(self) -> None:
        self._cache.clear()
