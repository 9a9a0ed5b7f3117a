"""Preparing H for a layer (SPEC 2): dead columns, damping with retries, U, salience.

U is the upper Cholesky factor of H^-1 (H^-1 = U^T U), as GPTQ uses it. One Cholesky gives it:
with J the reversal permutation, chol(J H J) = L gives H = R R^T for the upper triangular
R = J L J, hence H^-1 = R^-T R^-1 and U = R^-1, itself upper triangular with diagonal
d = 1 / diag(R). The layer driver compensates with R directly (a blocked triangular solve) and
never forms U; `U` is computed on first use (one triangular inverse) for those who want it.

`dtype=np.float32` factors in single precision: half the memory and about twice the speed of
float64, accurate enough for the damped H of GPTQ-style compensation (GPTQ itself runs float32).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.linalg import lapack

from qdtk.errors import QdtkError

log = logging.getLogger(__name__)


@dataclass
class PreparedHessian:
    H: np.ndarray  # [m, m] damped H, dead columns set to 1 on the diagonal
    R: np.ndarray  # [m, m] upper triangular, Fortran order, H = R R^T (so U = R^-1)
    dead: np.ndarray  # [m] bool, columns no calibration token excited
    damping: float  # delta actually added to the diagonal
    retries: int  # how many times delta was multiplied by 10
    _U: np.ndarray | None = field(default=None, repr=False)

    @property
    def d(self) -> np.ndarray:
        """[m] diag(U) = 1 / diag(R), the per-column scale of GPTQ's error feedback."""
        return 1.0 / np.diag(self.R)

    @property
    def U(self) -> np.ndarray:
        """[m, m] upper triangular, H^-1 = U^T U (computed on first use)."""
        if self._U is None:
            trtri = lapack.strtri if self.R.dtype == np.float32 else lapack.dtrtri
            U, info = trtri(self.R, lower=0)
            if info != 0:
                raise QdtkError(f"triangular inverse failed (info {info})")
            self._U = U
        return self._U


def flip(A: np.ndarray) -> np.ndarray:
    """J A J (rows and columns reversed) as a contiguous array of A's memory order.

    Reversing the flat buffer does it in one sequential pass; a reversed 2-D view copied
    element by element would walk memory with large strides (slow for big m).
    """
    order = "F" if A.flags.f_contiguous and not A.flags.c_contiguous else "C"
    return A.ravel(order=order)[::-1].reshape(A.shape, order=order).copy(order=order)


def cholesky_upper(H: np.ndarray) -> np.ndarray | None:
    """R upper (Fortran order) with R R^T = H, or None if H is not positive definite."""
    potrf = lapack.spotrf if H.dtype == np.float32 else lapack.dpotrf
    JHJ = flip(H)  # symmetric: its transpose is the same matrix, in Fortran order
    L, info = potrf(JHJ.T, lower=1, clean=1, overwrite_a=1)
    if info != 0 or not np.all(np.isfinite(np.diag(L))):
        return None
    return flip(L)


def prepare_hessian(
    H: np.ndarray,
    percdamp: float = 0.01,
    retries: int = 6,
    name: str = "layer",
    dtype: type = np.float64,
    cholesky: Callable[[np.ndarray], np.ndarray | None] = cholesky_upper,
) -> PreparedHessian:
    """Damp H (delta = percdamp * mean diag, x10 per failed try) and factor it in `dtype`.

    `cholesky` maps the damped H to R (or None); a GPU passes qdtk.backend's `cholesky`."""
    if not np.all(np.isfinite(H)):
        raise QdtkError(f"{name}: the statistic H contains NaN or Inf")
    H = np.array(H, dtype=dtype, order="C")  # a copy: the caller's H is not changed
    idx = np.arange(H.shape[0])
    dead = np.diag(H) == 0
    H[idx[dead], idx[dead]] = 1.0
    mean_diag = float(np.mean(np.diag(H), dtype=np.float64))
    delta = percdamp * mean_diag if mean_diag > 0 else percdamp
    added = 0.0
    for attempt in range(retries + 1):
        H[idx, idx] += delta - added  # the diagonal now carries exactly delta
        added = delta
        R = cholesky(H)
        if R is not None:
            if attempt:
                log.warning("%s: H needed damping %.3g (%d retries)", name, delta, attempt)
            return PreparedHessian(H, R, dead, delta, attempt)
        delta *= 10
    raise QdtkError(
        f"{name}: H is not positive definite even with damping {delta / 10:.3g}; "
        f"check the statistics (too few calibration tokens?) or raise --percdamp"
    )


def salience(W: np.ndarray, d: np.ndarray) -> np.ndarray:
    """[n, m] s_ij = W_ij^2 / d_j^2."""
    return (W / d[None, :]) ** 2
