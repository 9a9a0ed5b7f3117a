"""The same bits at any BLAS thread count: how a --cluster task matches the serial run.

OpenBLAS's GEMM and GEMV split their output between threads, so each element is the same sum
in the same order whatever the thread count. Its LAPACK routines (potrf, trtri, getrf/gesv)
and its dot product split the work inside a reduction instead, so their bits depend on the
thread count: a 1536 x 1024 layer solved with 1 and with 2 BLAS threads differed, and only
through these calls (measured call by call). `thread_invariant()` runs them on one BLAS thread:
a layer's solution is then the same on a worker that reserved one CPU as on the driver that has
all of them, and the factorisations (about m^3 / 3 flops per layer against the sweep's
n m^2) pay little for it. Numba's kernels here are parallel over rows only: thread-invariant.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

_controller: Any = None


@contextlib.contextmanager
def thread_invariant() -> Iterator[None]:
    """BLAS/LAPACK calls inside run on one thread (threadpoolctl), the count restored after."""
    global _controller
    if _controller is None:  # built on first use, once NumPy and SciPy have loaded their BLAS
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    with _controller.limit(limits=1, user_api="blas"):
        yield
