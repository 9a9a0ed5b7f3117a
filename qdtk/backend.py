"""The one place that decides where the math runs: `--device auto|cpu|cuda`.

A `Backend` carries the array module (`xp`: numpy or cupy), the name of the DAQ kernel set
("cpu": Numba on the host, "cuda": Numba CUDA kernels; the `backend=` of qdtk.math.daq.solve_block),
the factorisation of H (`cholesky`, for hessian.prepare_hessian) and the host/device transfers,
so the rest of qdtk never branches on the device.

A real GPU is recognised only through CuPy (it must import, find a driver and count a device)
together with Numba's CUDA target. Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) also makes
`numba.cuda.is_available()` true, but it is not a GPU: "auto" ignores it, and an explicit
"cuda" runs the CUDA kernels on it with NumPy arrays (slow; for tests and debugging only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType

import numpy as np
from scipy.linalg import lapack

from qdtk.errors import QdtkError
from qdtk.threads import thread_invariant

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")


def simulator_enabled() -> bool:
    """Whether Numba's CUDA simulator replaces the GPU in this process (NUMBA_ENABLE_CUDASIM,
    as Numba read it when first imported)."""
    from numba import config

    return bool(config.ENABLE_CUDASIM)


@lru_cache(maxsize=1)
def gpu_status() -> tuple[bool, str]:
    """(True, device name) when CuPy and Numba CUDA both see a GPU, else (False, why not).

    Never raises: a missing CuPy, a missing or too old driver and a machine without devices
    all come back as (False, reason).
    """
    if simulator_enabled():
        return False, "NUMBA_ENABLE_CUDASIM=1 (Numba's CUDA simulator is on, not a GPU)"
    try:
        import cupy

        if not cupy.cuda.is_available() or cupy.cuda.runtime.getDeviceCount() < 1:
            return False, "CuPy reports no CUDA device"
        props = cupy.cuda.runtime.getDeviceProperties(0)
    except Exception as e:  # ImportError, CUDARuntimeError (no driver), ...
        return False, f"CuPy cannot use a GPU ({type(e).__name__}: {e})"
    try:
        from numba import cuda

        if not cuda.is_available():
            return False, "Numba's CUDA target finds no device"
    except Exception as e:
        return False, f"Numba's CUDA target is unusable ({type(e).__name__}: {e})"
    name = props["name"]
    return True, name.decode() if isinstance(name, bytes) else str(name)


def gpu_available() -> bool:
    return gpu_status()[0]


def array_module(x) -> ModuleType:
    """numpy or cupy: the module of array x (without importing CuPy for NumPy arrays)."""
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def to_host(x) -> np.ndarray:
    """Any array (NumPy, CuPy, Numba device array) as a NumPy array."""
    if hasattr(x, "copy_to_host"):  # Numba device array
        return x.copy_to_host()
    if hasattr(x, "get") and not isinstance(x, np.ndarray):  # CuPy
        return x.get()
    return np.asarray(x)


def _cupy() -> ModuleType:
    import cupy

    return cupy


def cholesky_lower(A: np.ndarray) -> np.ndarray | None:
    """L lower with L L^T = A for a symmetric C-ordered A, computed in A's memory (A is
    overwritten; L is A's buffer in Fortran order), or None if A is not positive definite."""
    potrf = lapack.spotrf if A.dtype == np.float32 else lapack.dpotrf
    with thread_invariant():  # the same factor on any thread count (qdtk.threads)
        L, info = potrf(A.T, lower=1, clean=1, overwrite_a=1)  # A.T: A itself, Fortran order
    if info != 0 or not np.all(np.isfinite(np.diag(L))):
        return None
    return L



def cholesky_lower_gpu(A: np.ndarray) -> np.ndarray | None:
    """cholesky_lower on the GPU: L lower with L L^T = A, or None (not positive definite),
    through cuSOLVER's potrf; A in and L out are NumPy, in A's dtype. prepare_hessian's
    `cholesky` hook on a CUDA backend (the damping policy and reversals stay here)."""
    import cupy
    import cupyx

    try:
        with cupyx.errstate(linalg="raise"):  # potrf's info != 0 raises instead of NaN
            L = cupy.linalg.cholesky(cupy.asarray(A))
    except np.linalg.LinAlgError:
        return None
    if not bool(cupy.isfinite(cupy.diagonal(L)).all()):
        return None
    return L.get()


@dataclass(frozen=True)
class Backend:
    """Where arrays live and which kernels run on them."""

    device: str  # "cpu" | "cuda"
    xp: ModuleType  # numpy or cupy: the array module of device arrays
    daq: str  # DAQ kernel set: "cpu" (Numba) or "cuda" (Numba CUDA)
    simulated: bool = False  # CUDA kernels on Numba's simulator, arrays stay NumPy

    @property
    def on_gpu(self) -> bool:
        """True when device arrays are CuPy arrays (a real GPU)."""
        return self.xp is not np

    @property
    def cholesky(self):
        """A -> L lower with L L^T = A, or None: the `cholesky` of hessian.prepare_hessian.
        cuSOLVER on a GPU, LAPACK otherwise; both take and return NumPy arrays."""
        return cholesky_lower_gpu if self.on_gpu else cholesky_lower

    def to_device(self, x, dtype=None):
        """x as an array of this backend (a copy only when needed)."""
        return self.xp.asarray(x, dtype=dtype)

    def synchronize(self) -> None:
        """Wait for queued device work (for timing); a no-op on the CPU."""
        if self.on_gpu:
            self.xp.cuda.get_current_stream().synchronize()


CPU = Backend("cpu", np, "cpu")


def get_backend(device: str = "auto") -> Backend:
    """The backend for `--device`: "auto" (a GPU when CuPy sees one, else CPU), "cpu", "cuda"."""
    if device not in DEVICES:
        raise QdtkError(f"--device {device!r}: expected one of {', '.join(DEVICES)}")
    if device == "cpu":
        return CPU
    ok, why = gpu_status()
    if ok:
        log.info("using CUDA device %s", why)
        return Backend("cuda", _cupy(), "cuda")
    if device == "auto":
        log.debug("no GPU (%s): using the CPU", why)
        return CPU
    if simulator_enabled():
        log.warning("--device cuda on Numba's CUDA simulator: correct but very slow")
        return Backend("cuda", np, "cuda", simulated=True)
    raise QdtkError(f"--device cuda: no usable CUDA GPU ({why}); use --device cpu or auto")
