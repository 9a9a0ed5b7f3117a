"""Preparing H for a layer (METHOD.md §2): dead columns, shrinkage, damping with retries, U,
salience.

qdtk: H may be shrunk toward its diagonal before damping, H_s = (1 - alpha) H + alpha diag(H):
the off-diagonal correlations estimated from a few thousand calibration tokens are the part
that fits the calibration text (they differ most between texts), the diagonal is robust.

U is the upper Cholesky factor of H^-1 (H^-1 = U^T U), as GPTQ uses it. One Cholesky gives it:
with J the reversal permutation, chol(J H J) = L gives H = R R^T for the upper triangular
R = J L J, hence H^-1 = R^-T R^-1 and U = R^-1, itself upper triangular with diagonal
d = 1 / diag(R). The layer driver compensates with R directly (a blocked triangular solve) and
never forms U; `U` is computed on first use (one triangular inverse) for those who want it.

One m x m buffer does it all: J H J is written reversed from H into it, damped, factored in
place, and reversed in place into R. Large layers are memory-bound here: a fresh m x m array
costs a pass of page faults (about 1 s for m = 12288 on a small VM), so there is exactly one.
The damped H itself is formed only if asked for (`H`, for ABMP and refinement).

`dtype=np.float32` factors in single precision: half the memory and about twice the speed of
float64, accurate enough for the damped H of GPTQ-style compensation (GPTQ itself runs float32).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from numba import njit, prange
from scipy.linalg import lapack

from qdtk.backend import cholesky_lower
from qdtk.errors import QdtkError
from qdtk.threads import thread_invariant

log = logging.getLogger(__name__)


@dataclass
class PreparedHessian:
    R: np.ndarray  # [m, m] upper triangular, contiguous, H_damped = R R^T (so U = R^-1)
    dead: np.ndarray  # [m] bool, columns no calibration token excited
    damping: float  # delta actually added to the diagonal
    retries: int  # how many times delta was multiplied by 10
    source: np.ndarray = field(repr=False)  # [m, m] the undamped H as given (not copied)
    shrink: float = 0.0  # alpha: R factors (1 - alpha) H + alpha diag(H), then damped
    _H: np.ndarray | None = field(default=None, repr=False)
    _U: np.ndarray | None = field(default=None, repr=False)

    @property
    def H(self) -> np.ndarray:
        """[m, m] the shrunk, damped H (dead columns 1 + delta on the diagonal) in R's dtype."""
        if self._H is None:
            self._H = self.source.astype(self.R.dtype)  # a copy
            shrink_to_diagonal(self._H, self.shrink)
            damp(self._H, self.damping, self.dead)
        return self._H

    @property
    def d(self) -> np.ndarray:
        """[m] diag(U) = 1 / diag(R), the per-column scale of GPTQ's error feedback."""
        return 1.0 / np.diag(self.R)

    @property
    def U(self) -> np.ndarray:
        """[m, m] upper triangular, H^-1 = U^T U (computed on first use)."""
        if self._U is None:
            trtri = lapack.strtri if self.R.dtype == np.float32 else lapack.dtrtri
            with thread_invariant():
                U, info = trtri(self.R, lower=0)
            if info != 0:
                raise QdtkError(f"triangular inverse failed (info {info})")
            self._U = U
        return self._U


def shrink_to_diagonal(A: np.ndarray, alpha: float) -> None:
    """In place: A = (1 - alpha) A + alpha diag(A) (the diagonal is unchanged)."""
    if alpha:
        diag = np.diag(A).copy()
        A *= 1 - alpha
        A.reshape(-1, order="A")[:: A.shape[0] + 1] = diag


def shrunk_form_correction(X_col_sq: np.ndarray, H: np.ndarray, alpha: float,
                           shrunk_form: float) -> float:
    """tr(X H X^T) from tr(X H_s X^T) for H_s = (1 - alpha) H + alpha diag(H), exactly:
    tr(X H_s X^T) = (1 - alpha) tr(X H X^T) + alpha sum_j H_jj ||X_j||^2.
    X_col_sq [m] the column sums of squares of X; alpha < 1."""
    diag_part = float((np.diag(H).astype(np.float64) * X_col_sq).sum())  # no threaded dot
    return (shrunk_form - alpha * diag_part) / (1 - alpha)


def damp(A: np.ndarray, delta: float, dead: np.ndarray) -> None:
    """In place: A's diagonal += delta, after setting it to 1 on the dead columns."""
    diag = A.reshape(-1, order="A")[:: A.shape[0] + 1]  # a view: A is contiguous
    diag[dead] = 1
    diag += delta


@njit(parallel=True, cache=True)
def _reverse(x):
    n = x.shape[0]
    for i in prange(n // 2):
        x[i], x[n - 1 - i] = x[n - 1 - i], x[i]


def reverse_inplace(A: np.ndarray) -> np.ndarray:
    """J A J (rows and columns reversed) in A's own memory; A contiguous (C or Fortran)."""
    _reverse(A.reshape(-1, order="A"))
    return A


def reversed_copy(H: np.ndarray, dtype) -> np.ndarray:
    """J H J as a new C-ordered array of `dtype`, for a symmetric H (its flat buffer, read
    backwards, is J H J whether H is stored in C or Fortran order)."""
    out = np.empty(H.shape, dtype)
    out.reshape(-1)[:] = np.ravel(H, order="K")[::-1]
    return out


def all_finite(A: np.ndarray) -> bool:
    """Whether A has no NaN or Inf; a sum checks it without an A-sized temporary (an overflow
    of the sum, with finite entries, falls back to the exact test)."""
    return bool(np.isfinite(np.sum(A, dtype=np.float64))) or bool(np.all(np.isfinite(A)))


def prepare_hessian(
    H: np.ndarray,
    percdamp: float = 0.01,
    retries: int = 6,
    name: str = "layer",
    dtype: type = np.float64,
    cholesky: Callable[[np.ndarray], np.ndarray | None] = cholesky_lower,
    shrink: float = 0.0,
) -> PreparedHessian:
    """Shrink H toward its diagonal by `shrink` (alpha in [0, 1)), damp it (delta = percdamp *
    mean diag, x10 per failed try) and factor it in `dtype`.

    `cholesky(A)` gives the lower factor of the damped J H J it is handed (or None), and may
    overwrite A; a GPU passes qdtk.backend's. H is not changed."""
    if not 0 <= shrink < 1:
        raise QdtkError(f"{name}: shrinkage toward the diagonal must lie in [0, 1), got {shrink}")
    if not all_finite(H):
        raise QdtkError(f"{name}: the statistic H contains NaN or Inf")
    dead = np.diag(H) == 0
    diag = np.where(dead, 1.0, np.diag(H).astype(dtype))
    mean_diag = float(np.mean(diag, dtype=np.float64))
    delta = percdamp * mean_diag if mean_diag > 0 else percdamp
    for attempt in range(retries + 1):
        JHJ = reversed_copy(H, dtype)  # [m, m] C order
        shrink_to_diagonal(JHJ, shrink)
        damp(JHJ, delta, dead[::-1])
        L = cholesky(JHJ)
        if L is not None:
            if attempt:
                log.warning("%s: H needed damping %.3g (%d retries)", name, delta, attempt)
            R = reverse_inplace(L)  # [m, m] J L J, upper
            return PreparedHessian(R, dead, delta, attempt, source=H, shrink=shrink)
        delta *= 10
    raise QdtkError(
        f"{name}: H is not positive definite even with damping {delta / 10:.3g}; "
        f"check the statistics (too few calibration tokens?) or raise --percdamp"
    )


def salience(W: np.ndarray, d: np.ndarray) -> np.ndarray:
    """[n, m] s_ij = W_ij^2 / d_j^2."""
    return (W / d[None, :]) ** 2
