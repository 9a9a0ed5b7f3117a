"""DAQ, the data-aware any-order block solver (METHOD.md §3): one public solve function, several
backends.

Backends share the conventions stated in reference.py (sign search tie rule, sign(0) = +1, EPS)
and return (signs [K, n, w] bool, a [K, n], b [K, w]) in W's dtype, not yet rounded to float16.

    reference   plain NumPy, the readable truth
    cpu         Numba kernels, parallel over rows (the default on CPU)
    cuda        Numba CUDA kernels (a GPU, or Numba's simulator in tests)

A backend is a module with `solve_block(W, order, E, *, iters, refit)`; add one by naming its
module in BACKENDS.
"""

from __future__ import annotations

import importlib

import numpy as np

from qdtk.errors import QdtkError
from qdtk.math.daq.reference import EPS, error_weights

BACKENDS: dict[str, str] = {
    "reference": "qdtk.math.daq.reference",
    "cpu": "qdtk.math.daq.cpu",
    "cuda": "qdtk.math.daq.cuda",
}

__all__ = ["BACKENDS", "EPS", "error_weights", "resolve_backend", "solve_block"]


def resolve_backend(name: str) -> str:
    """The DAQ kernel set for a --backend: "auto" and "cuda" are decided by qdtk.backend (the
    one place that knows whether a GPU is usable); "cpu" and "reference" name themselves."""
    if name in ("auto", "cuda"):
        from qdtk.backend import get_backend

        return get_backend(name).daq
    if name not in BACKENDS:
        raise QdtkError(f"unknown DAQ backend {name!r}; choose auto or {', '.join(BACKENDS)}")
    return name


def solve_block(
    W: np.ndarray,
    order: int,
    E: np.ndarray | None = None,
    *,
    iters: int = 15,
    refit: bool = True,
    backend: str = "cpu",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Approximate W [n, w] by `order` binary planes with row and column scales.

    E [n, w]: error weights (None = all ones, see `error_weights`). Returns signs [K, n, w]
    bool (True = +1), a [K, n] and b [K, w] in W's dtype (float32 or float64).
    """
    if order < 1:
        raise QdtkError(f"DAQ order must be at least 1, got {order}")
    try:
        module = importlib.import_module(BACKENDS[backend])
    except KeyError:
        raise QdtkError(
            f"unknown DAQ backend {backend!r}; choose one of {', '.join(BACKENDS)}"
        ) from None
    return module.solve_block(W, order, E, iters=iters, refit=refit)
