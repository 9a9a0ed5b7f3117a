"""The baselines the paper compares with (METHOD.md §8): RTN and GPTQ, stored as `AffineLayer`.

Both quantize each row of a 128-column group on GPTQ's reference asymmetric min/max grid:
    What[i, j] = (codes[i, j] - zero[i, g]) * scale[i, g],   codes in 0 .. 2^bits - 1,
the row's range widened to contain 0 and the zero an integer in 0 .. 2^bits - 1 (so 0 is a grid
point: on MiniLM at 2 bits this gives RTN a lower median output error than a grid spanning
exactly [min, max] with a fractional zero, 0.19 vs 0.22). Scale and zero are float16, as stored;
codes are computed against the float16 scale, so the stored layer dequantizes to exactly the
What the solver reports. Honest bits per weight come from qdtk.formats.bits.affine_bits (2.25 at 2
bits, group 128).

GPTQ follows IST-DASLab/gptq (Frantar et al. 2022): columns left to right, each group's grid fixed
from the current (error-compensated) weights when the group starts, error feedback through U, the
upper Cholesky factor of H^-1 (from qdtk.math.hessian.prepare_hessian: the same damping and
dead-column handling as DAQ), lazy block updates; no act-order.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from qdtk.errors import QdtkError
from qdtk.formats.bits import GROUP, affine_bits, group_slices
from qdtk.formats.solution import AffineLayer
from qdtk.math.forms import proxy_error
from qdtk.math.hessian import prepare_hessian


def affine_grid(Wg: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Float16 (scale, zero) [n] of the grid of each row of a group Wg [n, w]."""
    maxq = 2**bits - 1
    lo = np.minimum(Wg.min(axis=1), 0).astype(np.float64)
    hi = np.maximum(Wg.max(axis=1), 0).astype(np.float64)
    scale16 = ((hi - lo) / maxq).astype(np.float16)
    scale16[scale16 == 0] = 1  # an all-zero (or sub-float16) row: codes = zero give What = 0
    zero16 = np.clip(np.rint(-lo / scale16), 0, maxq).astype(np.float16)
    return scale16, zero16


def affine_codes(Wg: np.ndarray, scale16: np.ndarray, zero16: np.ndarray, bits: int) -> np.ndarray:
    """[n, w] the nearest grid codes of Wg [n, w] on the float16 grid (scale, zero) [n]."""
    s = scale16.astype(np.float32)[:, None]
    z = zero16.astype(np.float32)[:, None]
    return np.clip(np.rint(Wg / s + z), 0, 2**bits - 1)


def affine_dequantize(codes: np.ndarray, scale16: np.ndarray, zero16: np.ndarray) -> np.ndarray:
    """[n, w] float32 (codes - zero) * scale: the formula of AffineLayer.dequantize."""
    return (codes.astype(np.float32) - zero16.astype(np.float32)[:, None]) * scale16.astype(
        np.float32
    )[:, None]


def rtn(W: np.ndarray, bits: int = 2) -> AffineLayer:
    """Round to nearest on each row's grid (affine_grid) per 128-column group."""
    n, m = W.shape
    slices = group_slices(m)
    codes = np.empty((n, m), np.uint8)
    scale = np.empty((n, len(slices)), np.float16)
    zero = np.empty((n, len(slices)), np.float16)
    for g, cols in enumerate(slices):
        scale[:, g], zero[:, g] = affine_grid(W[:, cols], bits)
        codes[:, cols] = affine_codes(W[:, cols], scale[:, g], zero[:, g], bits)
    return AffineLayer(codes, scale, zero, bits)


def gptq(
    W: np.ndarray,
    H: np.ndarray,
    bits: int = 2,
    percdamp: float = 0.01,
    blocksize: int = 128,
    name: str = "layer",
) -> tuple[AffineLayer, dict[str, Any]]:
    """GPTQ of W [n, m] against H [m, m]: the layer and {damping, retries, dead_columns}."""
    n, m = W.shape
    P = prepare_hessian(H, percdamp, name=name)
    U = P.U.astype(np.float32)  # [m, m] upper, H^-1 = U^T U
    W = np.array(W, dtype=np.float32)
    W[:, P.dead] = 0
    G = len(group_slices(m))
    codes = np.empty((n, m), np.uint8)
    scale = np.empty((n, G), np.float16)
    zero = np.empty((n, G), np.float16)
    for i1 in range(0, m, blocksize):
        i2 = min(i1 + blocksize, m)
        W1 = W[:, i1:i2].copy()  # [n, B] updated column by column
        Err1 = np.zeros_like(W1)  # [n, B] scaled errors (w - q) / d
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            g = j // GROUP
            if j % GROUP == 0:  # the group's grid, from the weights as compensated so far
                end = min(j + GROUP, m)
                Wg = W1[:, i : end - i1]
                if end > i2:  # columns right of the block, with this block's pending update
                    pending = W[:, i2:end] - Err1[:, :i] @ U[i1 : i1 + i, i2:end]
                    Wg = np.hstack([Wg, pending])
                scale[:, g], zero[:, g] = affine_grid(Wg, bits)
            w = W1[:, i : i + 1]  # [n, 1]
            c = affine_codes(w, scale[:, g], zero[:, g], bits)
            codes[:, j] = c[:, 0]
            q = affine_dequantize(c, scale[:, g], zero[:, g])
            err = (w - q) / U1[i, i]  # [n, 1]
            W1[:, i:] -= err @ U1[i : i + 1, i:]
            Err1[:, i] = err[:, 0]
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # the lazy update of everything right of the block
    report = {"damping": P.damping, "retries": P.retries, "dead_columns": int(P.dead.sum())}
    return AffineLayer(codes, scale, zero, bits), report


def _check(W: np.ndarray, H: np.ndarray | None, bits: int, name: str) -> None:
    if not 1 <= bits <= 8:
        raise QdtkError(f"{name}: baselines store uint8 codes: bits must be 1..8, got {bits}")
    if W.ndim != 2 or not np.all(np.isfinite(W)):
        raise QdtkError(f"{name}: the weight must be a finite 2-D array")
    if H is not None and H.shape != (W.shape[1], W.shape[1]):
        raise QdtkError(f"{name}: H has shape {list(H.shape)}, expected {[W.shape[1]] * 2}")


def _report(layer: AffineLayer, W: np.ndarray, H: np.ndarray | None, method: str, t0: float,
            **extra: Any) -> dict[str, Any]:
    n, m = layer.shape
    return {
        "method": method,
        "bits": layer.bits,
        "bits_per_weight": affine_bits(n, m, layer.bits) / (n * m),
        "proxy_error": None if H is None else proxy_error(W, layer.dequantize(), H),
        **extra,
        "seconds": time.perf_counter() - t0,
    }


def solve_rtn(
    W: np.ndarray, H: np.ndarray | None, options: Any, name: str = "layer", orders: None = None
) -> tuple[AffineLayer, dict[str, Any]]:
    """RTN as a pluggable layer solver (qdtk.solve.solvers; reads options.bits); H (optional) only
    for the reported proxy error."""
    bits = int(options.bits)
    _check(W, H, bits, name)
    t0 = time.perf_counter()
    layer = rtn(W, bits)
    return layer, _report(layer, W, H, "rtn", t0)


def solve_gptq(
    W: np.ndarray, H: np.ndarray, options: Any, name: str = "layer", orders: None = None
) -> tuple[AffineLayer, dict[str, Any]]:
    """GPTQ as a pluggable layer solver (qdtk.solve.solvers; reads options.bits and .percdamp)."""
    bits = int(options.bits)
    if H is None:
        raise QdtkError(f"{name}: GPTQ needs the statistic H")
    _check(W, H, bits, name)
    t0 = time.perf_counter()
    layer, info = gptq(W, H, bits, float(options.percdamp), name=name)
    return layer, _report(layer, W, H, "gptq", t0, **info)


SOLVERS = {"rtn": solve_rtn, "gptq": solve_gptq}
