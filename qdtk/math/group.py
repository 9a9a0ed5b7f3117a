"""One 128-column group solved by DAQ (METHOD.md §3), and a memo of such solves.

`solve_group` is what the layer driver's sweep and ABMP's candidate values both call: the
salience weights of the group, the block solver, the scales rounded to float16 and the canonical
dequantisation of the stored solution. Arrays in, arrays out. On the cuda backend the memo can
also solve every group of a layer at one order in one set of launches (`prefetch`).
"""

from __future__ import annotations

import hashlib

import numpy as np

from qdtk.backend import to_host
from qdtk.formats.bits import group_slices
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
    return stored_solution(signs, a, b)


def stored_solution(signs: np.ndarray, a: np.ndarray, b: np.ndarray) -> GroupSolution:
    """A group's block-solver result as it is stored: scales rounded to float16, and Q."""
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

    @staticmethod
    def _key(W_g: np.ndarray, order: int, d_g: np.ndarray) -> tuple:
        h = hashlib.blake2b(digest_size=16)
        h.update(np.ascontiguousarray(to_host(W_g)).tobytes())  # device arrays too
        h.update(np.ascontiguousarray(to_host(d_g)).tobytes())
        return (W_g.shape, W_g.dtype.str, d_g.dtype.str, int(order), h.digest())

    def solution(self, W_g: np.ndarray, order: int, d_g: np.ndarray) -> GroupSolution:
        key = self._key(W_g, order, d_g)
        if key not in self._cache:
            self._cache[key] = solve_group(W_g, int(order), d_g, **self.settings)
        return self._cache[key]

    def prefetch(self, W: np.ndarray, order: int, d: np.ndarray) -> None:
        """Solve every group of W [n, m] alone at `order` (d [m] = diag(U)) into the cache that
        `solution(W[:, g], order, d[g])` reads. On the cuda backend all groups go in one set of
        launches (qdtk.math.daq.cuda.solve_blocks: each group's result that of its own solve,
        the same bits, in 1/G of the launches); elsewhere a no-op, groups being solved when
        asked."""
        if self.settings["backend"] != "cuda":
            return
        from qdtk.math.daq import cuda as daq_cuda

        s = self.settings
        groups = [(g, cols, np.ascontiguousarray(W[:, cols]))
                  for g, cols in enumerate(group_slices(W.shape[1]))]
        keys = [self._key(Wg, order, d[cols]) for _, cols, Wg in groups]
        if all(key in self._cache for key in keys):
            return
        E = np.empty(W.shape, W.dtype)  # [n, m] each group's weights from its own salience
        for _, cols, Wg in groups:
            E[:, cols] = error_weights(salience(Wg, d[cols]), s["tau"], s["lam"])
        signs, a, b = daq_cuda.solve_blocks(W, int(order), E, iters=s["iters"],
                                            refit=s["refit"])
        signs, a, b = map(to_host, (signs, a, b))
        for (g, cols, _), key in zip(groups, keys, strict=True):
            self._cache.setdefault(key, stored_solution(signs[:, :, cols], a[:, g], b[:, cols]))

    def __call__(self, W_g: np.ndarray, order: int, d_g: np.ndarray) -> np.ndarray:
        return self.solution(W_g, order, d_g)[3]

    def uncached(self, W_g: np.ndarray, order: int, d_g: np.ndarray) -> np.ndarray:
        """Q of `solve_group` with these settings, neither looked up nor kept."""
        return solve_group(W_g, int(order), d_g, **self.settings)[3]

    def clear(self) -> None:
        self._cache.clear()
