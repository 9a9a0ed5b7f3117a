"""Preparing H for a layer (SPEC 2): dead columns, damping with retries, U, salience.

U is the upper Cholesky factor of H^-1 (H^-1 = U^T U), as GPTQ uses it. We get it with one
Cholesky and one triangular inverse instead of GPTQ's Cholesky, inverse, Cholesky: with J the
reversal permutation, chol(J H J) = L gives H = R R^T for the upper triangular R = J L J, hence
H^-1 = R^-T R^-1 and U = R^-1, itself upper triangular with a positive diagonal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.linalg import lapack

from qdtk.errors import QdtkError

log = logging.getLogger(__name__)


@dataclass
class PreparedHessian:
    H: np.ndarray  # [m, m] damped H, dead columns set to 1 on the diagonal
    U: np.ndarray  # [m, m] upper triangular, H^-1 = U^T U
    dead: np.ndarray  # [m] bool, columns no calibration token excited
    damping: float  # delta actually added to the diagonal
    retries: int  # how many times delta was multiplied by 10

    @property
    def d(self) -> np.ndarray:
        """[m] diag(U), the per-column scale of GPTQ's error feedback."""
        return np.diag(self.U)


def inverse_cholesky_upper(H: np.ndarray) -> np.ndarray | None:
    """U upper with U^T U = H^-1, or None when H is not positive definite."""
    L, info = lapack.dpotrf(H[::-1, ::-1], lower=1, clean=1, overwrite_a=0)
    if info != 0:
        return None
    R = np.ascontiguousarray(L[::-1, ::-1])  # upper, H = R R^T
    U, info = lapack.dtrtri(R, lower=0, overwrite_c=1)
    if info != 0 or not np.all(np.isfinite(U)):
        return None
    return U


def prepare_hessian(
    H: np.ndarray,
    percdamp: float = 0.01,
    retries: int = 6,
    name: str = "layer",
    factor: Callable[[np.ndarray], np.ndarray | None] = inverse_cholesky_upper,
) -> PreparedHessian:
    """Damp H (delta = percdamp * mean diag, x10 per failed try) and factor it.

    `factor` maps a damped H to U or None (not positive definite); the GPU passes its own.
    """
    if not np.all(np.isfinite(H)):
        raise QdtkError(f"{name}: the statistic H contains NaN or Inf")
    H = np.array(H, dtype=np.float64)  # a copy: the caller's H is not changed
    diag = np.diag(H)
    dead = diag == 0
    H[dead, dead] = 1.0
    mean_diag = float(np.mean(np.diag(H)))
    delta = percdamp * mean_diag if mean_diag > 0 else percdamp
    idx = np.arange(H.shape[0])
    for attempt in range(retries + 1):
        Hd = H.copy()
        Hd[idx, idx] += delta
        U = factor(Hd)
        if U is not None:
            if attempt:
                log.warning("%s: H needed damping %.3g (%d retries)", name, delta, attempt)
            return PreparedHessian(Hd, U, dead, delta, attempt)
        delta *= 10
    raise QdtkError(
        f"{name}: H is not positive definite even with damping {delta / 10:.3g}; "
        f"check the statistics (too few calibration tokens?) or raise --percdamp"
    )


def salience(W: np.ndarray, d: np.ndarray) -> np.ndarray:
    """[n, m] s_ij = W_ij^2 / d_j^2."""
    return (W / d[None, :]) ** 2
