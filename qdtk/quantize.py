"""The layer driver (SPEC 5) and the `qdtk quantize` stage.

Layer driver: blocks of 128 columns left to right; block g is solved by DAQ at order o_g on the
error-compensated weights, its scales rounded to float16, Q_g taken from the canonical
`dequantize_block`, and the error Err_g = (W_g - Q_g) / d_g is fed forward as in GPTQ:
    W[:, later] -= Err_g @ U[g, later],      H^-1 = U^T U, U = R^-1, H = R R^T.
That diagonal scaling is GPTQ's per-column rule applied to a block, as published. qdtk's
feedback "block" uses Err_g = (W_g - Q_g) U_gg^-1 = (W_g - Q_g) R_gg instead: the exact OBS
update for a whole block (the later columns absorb the block's error optimally, given Q_g), and
then D = Err U, so tr(D H D^T) = ||Err||^2 on the damped H: the layer's error comes free.
We never form U. With Y = Err U (so Y R = Err, a blocked triangular solve) the correction of
block g is c_g = sum_{h<g} Err_h U_hg = -(Y_<g R_<g,g) U_gg, and Y_g = (Err_g - S_g) U_gg with
S_g = Y_<g R_<g,g: left-looking products (the n m^2 flops of GPTQ), the share of all earlier
groups taken SUPER groups at a time (wider GEMMs), and only the 128 x 128 diagonal blocks of
U (R_gg^-1). W and R may be CuPy arrays (--backend cuda on a GPU): the sweep runs where they
live.

Stage: for every statistics block, its selected Linears are solved by a pluggable layer solver
`solver(W, H, options) -> (QuantizedLayer, report dict)` (DAQ here; RTN and GPTQ in
qdtk.baselines share the signature) and written as one solution file; a rerun skips blocks whose
file carries the same fingerprint (model, statistics block, options, layer names). Per-group
orders plug into DAQ the same way, e.g. with an allocator `abmp(W, P) -> orders [G]`:
    quantize_model(model, stats, out, {**options, "abmp": ...}, partial(solve_daq, orders=abmp))
(everything that changes the result belongs in `options`, which the fingerprint covers).
With options["cluster"] the layers are solved as Ray tasks instead (qdtk.cluster), collected in
the same order into the same files.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numba import njit, prange
from scipy.linalg import lapack

from qdtk import abmp
from qdtk.backend import CPU, array_module, get_backend, to_host
from qdtk.bits import bcq_bits, group_slices
from qdtk.checkpoint import FLOAT_CODES, Checkpoint
from qdtk.daq import error_weights, solve_block
from qdtk.errors import QdtkError
from qdtk.hessian import (
    PreparedHessian,
    all_finite,
    prepare_hessian,
    salience,
    shrunk_form_correction,
)
from qdtk.io import clean_stale_temporaries, fingerprint, hash_file, read_json, write_json_atomic
from qdtk.rotation import check_rotation, layer_rotation, rotate_problem
from qdtk.solution import (
    FORMAT,
    REPORT,
    BinaryCodedLayer,
    QuantizedLayer,
    dequantize_block,
    solution_fingerprint,
    write_solution_block,
)
from qdtk.validate import check_free_space, check_tensors_finite

if TYPE_CHECKING:
    from qdtk.stats import Stats

log = logging.getLogger(__name__)

# orders as an array [G], or a function of (W, prepared H) giving them (ABMP)
Orders = Sequence[int] | np.ndarray | Callable[[np.ndarray, PreparedHessian], np.ndarray]
LayerSolver = Callable[[np.ndarray, np.ndarray, Mapping[str, Any]], tuple[QuantizedLayer, dict]]


@dataclass
class LayerReport:
    orders: list[int]
    proxy_error: float  # tr(D H D^T) / tr(W H W^T), H undamped
    output_error: float  # tr(D H D^T)
    weight_energy: float  # tr(W H W^T)
    bits_per_weight: float  # honest, with the float16 scales (qdtk.bits)
    damping: float
    retries: int
    dead_columns: int
    compensated: bool
    seconds: float  # end to end; the parts below add up to about it
    seconds_factor: float  # damping + Cholesky of H
    seconds_sweep: float  # block solves + compensation
    seconds_solve: float  # of which the block solves (salience weights, DAQ, dequantisation)
    seconds_refine: float  # the refinement on the full H (0 without)
    seconds_error: float  # the proxy error (tr(W H W^T); tr(D H D^T) too unless the sweep gave it)

    def to_dict(self) -> dict[str, Any]:
        return {"method": "daq", **asdict(self)}


# ---------------------------------------------------------------------------------------------
# One group


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
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """DAQ of one group Wg [n, w] with salience weights from dg = diag(U) of its columns.

    Returns (signs [K, n, w] bool, a [K, n] float16, b [K, w] float16, Q [n, w] float32), Q the
    canonical dequantisation of the stored solution.
    """
    E = error_weights(salience(Wg, dg), tau, lam)  # [n, w]
    signs, a, b = solve_block(Wg, order, E, iters=iters, refit=refit, backend=backend)
    a16, b16 = a.astype(np.float16), b.astype(np.float16)
    return signs, a16, b16, dequantize_block(signs, a16, b16)


# ---------------------------------------------------------------------------------------------
# One layer


def triangular_inverse(R):
    """[w, w] R^-1 of an upper triangular R, NumPy (LAPACK trtri) or CuPy (cuBLAS trsm)."""
    if array_module(R) is np:
        trtri = lapack.strtri if R.dtype == np.float32 else lapack.dtrtri
        return trtri(R, lower=0)[0]
    from cupyx.scipy.linalg import solve_triangular

    return solve_triangular(R, array_module(R).eye(R.shape[0], dtype=R.dtype), lower=False)


def compensated_block(W, R, Y, cols: slice, S0=None, s0: int = 0):
    """(W_g - c_g [n, w], S [n, w], U_gg [w, w]): block g of W [n, m] with the error of the
    groups before it fed forward; Y [n, m] holds Y of those groups (Y R = Err). S0 [n, w]:
    Y_<s0 R_<s0,g when a wider product already gave it (`sweep`'s super-blocks).
    NumPy or CuPy arrays alike."""
    Ugg = triangular_inverse(R[cols, cols])  # [w, w] R_gg^-1 = U_gg
    S = Y[:, s0 : cols.start] @ R[s0 : cols.start, cols]  # [n, w] Y_<g R_<g,g
    if S0 is not None:
        S += S0
    return W[:, cols] + S @ Ugg, S, Ugg


def feed_forward(Y, Wg, Q, R, d, S, Ugg, cols: slice, feedback: str = "diagonal") -> float:
    """Y[:, cols] = Y_g = (Err_g - S) U_gg (in place), with Err_g = (W_g - Q_g) / d_g
    (diagonal, published) or (W_g - Q_g) R_gg (block, exact). Returns ||Err_g||^2 (float64).
    NumPy or CuPy arrays alike."""
    D = Wg - Q  # [n, w]
    Err = D @ R[cols, cols] if feedback == "block" else D / d[cols]
    array_module(Y).matmul(Err - S, Ugg, out=Y[:, cols])  # no [n, w] temporary
    return sum_squares(Err)


def sweep(
    W,
    R,
    orders: np.ndarray,
    solve: Callable[[Any, int, Any], tuple],
    compensate: bool = True,
    feedback: str = "diagonal",
) -> tuple[BinaryCodedLayer, float | None]:
    """Solve the groups of W [n, m] left to right with GPTQ-style compensation through R
    [m, m] (upper, H_damped = R R^T); feedback "diagonal" (published: Err_g = (W_g - Q_g) /
    d_g) or "block" (exact). W and R are NumPy or CuPy arrays: the groups are solved where
    they live, `solve(W_g, order, d_g)` taking and giving arrays of that kind.

    Returns the layer (host arrays) and, with compensation and block feedback, its output
    error on the damped H for free: D = Err U, so tr(D H_damped D^T) = sum_g ||Err_g||^2
    (None otherwise).
    """
    xp = array_module(W)
    n, m = W.shape
    slices = group_slices(m)
    d = 1.0 / xp.diag(R)  # [m] diag(U)
    K = int(orders.max())
    signs = np.zeros((K, n, m), bool)
    row_scale = np.zeros((K, len(slices), n), np.float16)
    col_scale = np.zeros((K, m), np.float16)
    Y = xp.empty((n, m), W.dtype) if compensate else None  # [n, m] Y R = Err
    err = 0.0
    for g, cols in enumerate(slices):
        o = int(orders[g])
        if compensate and g % SUPER == 0:  # every earlier group's share, SUPER groups at once
            span = slice(cols.start, slices[min(g + SUPER, len(slices)) - 1].stop)
            S_span = Y[:, : span.start] @ R[: span.start, span]  # [n, <= SUPER w]
        if compensate:
            part = S_span[:, cols.start - span.start : cols.stop - span.start]
            Wg, S, Ugg = compensated_block(W, R, Y, cols, part, span.start)
        else:
            Wg = W[:, cols]  # [n, w]
        sg, a, b, Q = solve(xp.ascontiguousarray(Wg), o, d[cols])
        signs[:o, :, cols], row_scale[:o, g], col_scale[:o, cols] = map(to_host, (sg, a, b))
        if compensate:
            err += feed_forward(Y, Wg, Q, R, d, S, Ugg, cols, feedback)
    layer = BinaryCodedLayer(np.asarray(orders, np.int64), signs, row_scale, col_scale)
    return layer, (err if compensate and feedback == "block" else None)


QF_BLOCK = 512  # columns of X R per product in damped_quadratic_form
SUPER = 4  # groups per compensation product from all earlier groups (wider, faster GEMMs)


def damped_quadratic_form(X, R) -> float:
    """tr(X H_damped X^T) = ||X R||^2 for H_damped = R R^T, R [m, m] upper triangular.

    X R costs n m^2 flops (half of X H), taken as products of QF_BLOCK columns: BLAS runs
    those faster than one triangular product. NumPy or CuPy (X is moved to R's kind)."""
    X = array_module(R).asarray(X, R.dtype)
    total = 0.0
    for s in range(0, X.shape[1], QF_BLOCK):
        e = min(X.shape[1], s + QF_BLOCK)
        total += sum_squares(X[:, :e] @ R[:e, s:e])  # (X R)[:, s:e]: R[e:, s:e] = 0
    return total


def quadratic_form(X, P: PreparedHessian, R=None) -> float:
    """tr(X H X^T) for the H as given: the damped form minus delta ||X||^2 and the dead
    columns' ||X_j||^2 (H_damped = H_s + delta I + 1 on dead columns), then the shrinkage
    undone (hessian.shrunk_form_correction); all exact.
    R: P.R where it lives (a CuPy copy on a GPU); X NumPy or of R's kind."""
    R = P.R if R is None else R
    xp = array_module(R)
    X = xp.asarray(X, R.dtype)
    total = damped_quadratic_form(X, R) - P.damping * sum_squares(X)
    total -= sum_squares(X[:, xp.asarray(P.dead)])
    if P.shrink:
        col_sq = (X * X).sum(axis=0, dtype=xp.float64)  # [m]
        total = shrunk_form_correction(to_host(col_sq), P.source, P.shrink, total)
    return max(total, 0.0)


def sum_squares(X) -> float:
    """||X||_F^2 of a 2-D array, accumulated in float64 (NumPy: one parallel pass, no
    temporary; CuPy: on the device)."""
    xp = array_module(X)
    if xp is np:
        return float(_row_sums_of_squares(X).sum())
    return float(xp.sum(xp.square(X), dtype=xp.float64))


@njit(parallel=True, cache=True)
def _row_sums_of_squares(X):
    out = np.empty(X.shape[0])
    for i in prange(X.shape[0]):
        s = 0.0
        for j in range(X.shape[1]):
            s += np.float64(X[i, j]) ** 2
        out[i] = s
    return out


def residual_sum_squares(
    W: np.ndarray, layer: BinaryCodedLayer, mask: np.ndarray
) -> tuple[float, float]:
    """(||W - What||^2, ||(W - What)[:, mask]||^2), mask [m] bool, group by group: What is
    never formed whole."""
    total = part = 0.0
    for g, sl in enumerate(group_slices(W.shape[1])):
        D = W[:, sl] - layer.dequantize_group(g)  # [n, w]
        total += sum_squares(D)
        part += sum_squares(D[:, mask[sl]])
    return total, part


def resolve_orders(orders: Orders, W: np.ndarray, P: PreparedHessian, name: str) -> np.ndarray:
    G = len(group_slices(W.shape[1]))
    o = np.asarray(orders(W, P) if callable(orders) else orders, np.int64).reshape(-1)
    if o.shape != (G,) or o.min() < 1:
        raise QdtkError(f"{name}: need {G} group orders >= 1, got {o.tolist()}")
    return o


def quantize_layer(
    W: np.ndarray,
    H: np.ndarray,
    orders: Orders,
    *,
    iters: int = 15,
    tau: float = 2.0,
    lam: float = 3.0,
    percdamp: float = 0.01,
    compensate: bool = True,
    feedback: str = "diagonal",
    refit: bool = True,
    backend: str = "cpu",
    name: str = "layer",
    group_solver: Callable[[np.ndarray, int, np.ndarray], tuple] | None = None,
    refine: Mapping[str, Any] | None = None,
    shrink: float = 0.0,
) -> tuple[BinaryCodedLayer, LayerReport]:
    """DAQ of one Linear weight W [n, m] against its statistic H [m, m] (SPEC 5), fitted on H
    shrunk toward its diagonal by `shrink` (qdtk.hessian); the reported errors are on H itself.

    `group_solver(W_g, order, d_g)` replaces `solve_group` (e.g. ABMP's memoising
    `DaqGroupSolver.solution`, so an uncompensated sweep reuses the allocation's solves);
    `refine` (keyword arguments of qdtk.refine.refine_layer, e.g. `refine.MODES["rows"]`)
    refits the solved layer on the full H before its error is measured.
    """
    t0 = time.perf_counter()
    W0 = np.asarray(W, dtype=np.float32)  # [n, m] never written to
    n, m = W0.shape
    if H.shape != (m, m):
        raise QdtkError(f"{name}: H has shape {list(H.shape)}, expected {[m, m]}")
    if not all_finite(W0):
        raise QdtkError(f"{name}: the weight contains NaN or Inf")
    dev = get_backend("cuda") if backend == "cuda" else CPU  # where the sweep's arrays live
    P = prepare_hessian(H, percdamp, name=name, dtype=np.float32, cholesky=dev.cholesky,
                        shrink=shrink)
    R = dev.to_device(P.R)
    t1 = time.perf_counter()
    o = resolve_orders(orders, W0, P, name)
    W = W0
    if P.dead.any():  # no token reached these columns: solve them as zeros
        W = W0.copy()
        W[:, P.dead] = 0

    solve_time = [0.0]

    def solve(Wg, order, dg):
        t = time.perf_counter()
        out = (group_solver or partial(
            solve_group, iters=iters, tau=tau, lam=lam, refit=refit, backend=backend
        ))(Wg, order, dg)
        solve_time[0] += time.perf_counter() - t
        return out

    t2 = time.perf_counter()
    layer, damped_err = sweep(dev.to_device(W), R, o, solve, compensate, feedback)
    t_sweep = time.perf_counter()
    if refine is not None:
        from qdtk.refine import refine_layer

        layer = refine_layer(W0, H, layer, **refine, percdamp=percdamp, shrink=shrink, name=name)
        damped_err = None
    if shrink:
        damped_err = None  # quadratic_form undoes the shrinkage
    t3 = time.perf_counter()
    if not (np.all(np.isfinite(layer.row_scale)) and np.all(np.isfinite(layer.col_scale))):
        raise QdtkError(f"{name}: scales overflow float16 (weights beyond 65504?)")
    if damped_err is None:
        err = quadratic_form(W0 - layer.dequantize(), P, R)
    else:  # the sweep's tr(Dz H_damped Dz^T), Dz = W - What (dead columns zeroed): undamp it
        dz2, dz2_dead = residual_sum_squares(W, layer, P.dead)
        err = max(damped_err - P.damping * dz2 - dz2_dead, 0.0)  # = tr(D H D^T), H undamped
    energy = quadratic_form(W0, P, R)
    report = LayerReport(
        orders=o.tolist(),
        proxy_error=err / energy if energy > 0 else (0.0 if err == 0 else float("inf")),
        output_error=err,
        weight_energy=energy,
        bits_per_weight=bcq_bits(n, m, o) / (n * m),
        damping=P.damping,
        retries=P.retries,
        dead_columns=int(P.dead.sum()),
        compensated=compensate,
        seconds=time.perf_counter() - t0,
        seconds_factor=t1 - t0,
        seconds_sweep=t_sweep - t2,
        seconds_solve=solve_time[0],
        seconds_refine=t3 - t_sweep,
        seconds_error=time.perf_counter() - t3,
    )
    return layer, report


# ---------------------------------------------------------------------------------------------
# Options -> layer solver

METHODS = ("daq", "gptq", "rtn")
SCOPES = ("layer", "model")
# The quantize options and what a missing key means: the published method (uniform or swap
# orders, no refinement), so option dicts written before ABMP and refinement keep their
# meaning. The CLI's defaults (qdtk.cli.options.quantize_options) are the measured best
# instead. For DAQ, `bits` is the uniform order with abmp none/swap and the budget in bits per
# weight (`count`) with knapsack, None meaning what uniform order 2 costs; for gptq/rtn it is
# the grid's bits.
DEFAULTS: dict[str, Any] = {
    "method": "daq", "bits": 2, "abmp": "none", "rho": 0.05, "count": "real",
    "budget_scope": "layer", "orders": list(abmp.ORDERS), "iters": 15, "tau": 2.0, "lam": 3.0,
    "percdamp": 0.01, "compensate": True, "feedback": "diagonal", "refit": True,
    "refine": "none", "refine_rounds": None, "backend": "cpu", "shrink": 0.0,
    "rotate": "none", "rotate_seed": 0,
}
FEEDBACK = ("diagonal", "block")


# Options that change how the stage runs but not its result (left out of the fingerprints):
# How the model-scope pre-pass runs the model (its own code, or qdtk's native forward); where
# the layers are solved (qdtk.cluster: a Ray cluster, and the CPUs per task).
RUN_ONLY = ("trust_remote_code", "model_code", "cluster", "num_cpus")


def _opt(options: Mapping[str, Any], key: str) -> Any:
    return options.get(key, DEFAULTS[key])


def check_options(options: Mapping[str, Any]) -> None:
    """Reject inconsistent options before any solve, with a message naming the option."""
    from qdtk.refine import MODES

    method, bits = _opt(options, "method"), _opt(options, "bits")
    if method not in METHODS:
        raise QdtkError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    check_rotation(_opt(options, "rotate"), _opt(options, "rotate_seed"))
    method_abmp = _opt(options, "abmp") if method == "daq" else "none"
    if method_abmp not in abmp.METHODS:
        raise QdtkError(f"--abmp must be one of {', '.join(abmp.METHODS)}, got {method_abmp!r}")
    if method_abmp == "knapsack":
        if bits is not None and not float(bits) > 0:
            raise QdtkError(f"--bits {bits}: the knapsack budget must be positive bits per weight")
    else:
        top = 4 if method == "daq" else 8
        if bits is None or float(bits) != int(float(bits)) or not 1 <= int(float(bits)) <= top:
            what = f"--abmp {method_abmp}" if method == "daq" else f"--method {method}"
            raise QdtkError(
                f"--bits {bits}: with {what} it is an integer 1..{top} "
                f"({'planes per group' if method == 'daq' else 'grid bits'}); a real budget "
                f"such as 2.1 bits per weight needs --method daq --abmp knapsack"
            )
    if method != "daq":
        return
    if not 0 <= float(_opt(options, "rho")) <= 1:
        raise QdtkError(f"--rho must lie in [0, 1], got {_opt(options, 'rho')}")
    if _opt(options, "count") not in abmp.COUNTS:
        raise QdtkError(f"--count must be one of {', '.join(abmp.COUNTS)}")
    scope = _opt(options, "budget_scope")
    if scope not in SCOPES:
        raise QdtkError(f"--budget-scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if scope == "model" and method_abmp != "knapsack":
        raise QdtkError("--budget-scope model needs --abmp knapsack (one budget for all layers)")
    abmp.check_orders(_opt(options, "orders"))
    if _opt(options, "feedback") not in FEEDBACK:
        raise QdtkError(f"--feedback must be one of {', '.join(FEEDBACK)}")
    if _opt(options, "refine") not in MODES:
        raise QdtkError(f"--refine must be one of {', '.join(MODES)}")
    rounds = _opt(options, "refine_rounds")
    if rounds is not None and (not isinstance(rounds, int) or rounds < 1):
        raise QdtkError(f"--refine-rounds must be a whole number >= 1, got {rounds!r}")
    if not 0 <= float(_opt(options, "shrink")) < 1:
        raise QdtkError(f"--shrink must lie in [0, 1), got {_opt(options, 'shrink')}")


def knapsack_bits(options: Mapping[str, Any], shapes: Sequence[Sequence[int]]) -> float:
    """The knapsack budget in bits per weight: options["bits"], or when that is None the cost
    of uniform order 2 on these (n, m) shapes (the published method's budget), as `count`
    counts."""
    if _opt(options, "bits") is not None:
        return float(_opt(options, "bits"))
    cost = sum(int(abmp.group_costs(n, m, (2,), _opt(options, "count")).sum()) for n, m in shapes)
    return cost / sum(n * m for n, m in shapes)


def _group_solver(options: Mapping[str, Any]) -> abmp.DaqGroupSolver:
    return abmp.DaqGroupSolver(**{k: _opt(options, k) for k in
                                  ("iters", "tau", "lam", "refit", "backend")})


def solve_daq(
    W: np.ndarray, H: np.ndarray, options: Mapping[str, Any], orders: Orders | None = None
) -> tuple[BinaryCodedLayer, dict[str, Any]]:
    """DAQ as a pluggable layer solver (the options of `DEFAULTS`, plus the layer's "name").

    The group orders: `orders` when given (a list, or a function of (W, prepared H)), else
    `options["layer_orders"]` (set by `quantize_model` from the model-scope allocation), else
    ABMP on this layer alone (`abmp.choose_orders` with abmp none/swap/knapsack). The ABMP
    report (orders histogram, bits, predicted error) joins the layer report; the predicted
    error is given where it is free or needed: with knapsack, or without compensation (whose
    sweep reuses the allocation's cached solves).
    """

    name = str(options.get("name", "layer"))
    method = _opt(options, "abmp")
    gs = _group_solver(options)
    compensate = bool(_opt(options, "compensate"))
    info: dict[str, Any] = {}
    if orders is None and options.get("layer_orders") is not None:
        orders = np.asarray(options["layer_orders"], np.int64)
    elif orders is None:
        if _opt(options, "budget_scope") == "model":
            raise QdtkError(f"{name}: --budget-scope model needs the model's allocation "
                            f"(quantize_model computes it from the statistics folder)")
        bits = (knapsack_bits(options, [W.shape]) if method == "knapsack"
                else float(_opt(options, "bits")))

        def orders(W_: np.ndarray, P: PreparedHessian) -> np.ndarray:
            o, rep = abmp.choose_orders(
                name, W_, P.H, P.d, method=method, rho=float(_opt(options, "rho")),
                bits=bits, count=_opt(options, "count"), orders=_opt(options, "orders"),
                uniform=int(bits) if method != "knapsack" else 2,
                solve=gs if method == "knapsack" or not compensate else None,
            )
            info.update(rep)
            return o

    try:
        layer, report = quantize_layer(
            W, H, orders,
            iters=int(_opt(options, "iters")),
            tau=float(_opt(options, "tau")),
            lam=float(_opt(options, "lam")),
            percdamp=float(_opt(options, "percdamp")),
            compensate=compensate,
            feedback=str(_opt(options, "feedback")),
            refit=bool(_opt(options, "refit")),
            backend=str(_opt(options, "backend")),
            name=name,
            group_solver=gs.solution,
            refine=refine_mode(options),
            shrink=float(_opt(options, "shrink")),
        )
    finally:
        gs.clear()
    n, m = W.shape
    info = {"abmp": method, **abmp.layer_report(n, m, np.asarray(report.orders)), **info}
    return layer, {**report.to_dict(), **info, "refine": _opt(options, "refine")}


def refine_mode(options: Mapping[str, Any]) -> dict | None:
    """refine_layer's keyword arguments for the options' --refine (None: no refinement), with
    --refine-rounds replacing the mode's own number of rounds."""
    from qdtk.refine import MODES

    mode = MODES[_opt(options, "refine")]
    rounds = _opt(options, "refine_rounds")
    return mode if mode is None or rounds is None else {**mode, "rounds": int(rounds)}


def make_solver(options: Mapping[str, Any]) -> LayerSolver:
    """The layer solver that `options` name (method daq, gptq or rtn), after checking them."""
    from qdtk.baselines import SOLVERS

    check_options(options)
    method = _opt(options, "method")
    solver = solve_daq if method == "daq" else SOLVERS[method]
    return solver if _opt(options, "rotate") == "none" else partial(solve_rotated, solver)


def solve_rotated(solver: LayerSolver, W: np.ndarray, H: np.ndarray, options: Mapping[str, Any]
                  ) -> tuple[QuantizedLayer, dict]:
    """`solver` on the layer's problem in the rotated basis, W Q against Q^T H Q (--rotate,
    qdtk.rotation); the layer records Q. Its errors are those of W and H (Q is orthogonal)."""
    rot = layer_rotation(_opt(options, "rotate"), _opt(options, "rotate_seed"), W.shape[1])
    layer, rep = solver(*rotate_problem(W, H, rot), options)
    layer.rotation = rot
    return layer, {**rep, "rotation": rot.to_dict()}


# ---------------------------------------------------------------------------------------------
# The stage


def _histogram(layers: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """Groups per order over all binary-coded layers (empty for the affine baselines)."""
    total: dict[str, int] = {}
    for r in layers.values():
        for o, k in r.get("orders_histogram", {}).items():
            total[o] = total.get(o, 0) + k
    return dict(sorted(total.items()))


def _summary(layers: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    weights = sum(r["shape"][0] * r["shape"][1] for r in layers.values())
    bits = sum(r["storage_bits"] for r in layers.values())
    errors = [r["proxy_error"] for r in layers.values() if r.get("proxy_error") is not None]
    return {
        "layers": len(layers),
        "weights": weights,
        "storage_bits": bits,
        "bits_per_weight": bits / weights if weights else None,
        "mean_proxy_error": float(np.mean(errors)) if errors else None,
        "median_proxy_error": float(np.median(errors)) if errors else None,
        "orders_histogram": _histogram(layers),
        "seconds": sum(r.get("seconds", r.get("time_s", 0.0)) for r in layers.values()),
    }


class SolutionReport:
    """report.json of a solution folder, rewritten after every block so a rerun can resume.

    `complete` turns true only when the whole stage has finished (pack checks it).
    """

    def __init__(self, out: Path, ckpt: Any, stats: Mapping[str, Any], options: Mapping[str, Any]):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(out)
        old = read_json(out / REPORT) if (out / REPORT).exists() else {}
        if old.get("format") != FORMAT:
            old = {}
        self.old_layers = old.get("layers", {})
        self.old_blocks = {b.get("file"): b for b in old.get("blocks", []) if isinstance(b, dict)}
        self.data: dict[str, Any] = {
            "format": FORMAT,
            "complete": False,
            "model": {"path": str(ckpt.folder), "fingerprint": ckpt.fingerprint()},
            "stats": dict(stats),
            "options": {k: v for k, v in options.items() if k not in RUN_ONLY},
            "blocks": [],
            "layers": {},
            "summary": {},
        }

    def done(self, file: str, weights: Sequence[str], fp: str) -> bool:
        """Whether `file` already holds these weights solved from the same inputs, with the
        content the old report recorded (a damaged file is solved again)."""
        if solution_fingerprint(self.out / file) != fp or not all(
            self.old_layers.get(w, {}).get("fingerprint") == fp for w in weights
        ):
            return False
        sha = self.old_blocks.get(file, {}).get("sha256")
        if sha is not None and hash_file(self.out / file) != sha:
            log.warning("%s: content does not match %s; solving it again", self.out / file,
                        REPORT)
            return False
        return True

    def keep(self, block: str, file: str, fp: str, weights: Sequence[str]) -> None:
        """Record a block solved by an earlier run."""
        self.data["layers"].update({w: self.old_layers[w] for w in weights})
        self.add_block(block, file, fp, weights, self.old_blocks.get(file, {}).get("sha256"))

    def add_layer(self, w: str, shape: Sequence[int], layer: QuantizedLayer, rep: Mapping,
                  fp: str) -> None:
        self.data["layers"][w] = {
            **rep, "shape": list(shape), "storage_bits": layer.storage_bits(), "fingerprint": fp,
        }

    def add_block(self, block: str, file: str, fp: str, weights: Sequence[str],
                  sha256: str | None) -> None:
        """Record a written block file and its content hash (None: from an older qdtk)."""
        entry = {"name": block, "file": file, "fingerprint": fp, "sha256": sha256,
                 "layers": list(weights)}
        self.data["blocks"].append({k: v for k, v in entry.items() if v is not None})
        self.data["summary"] = _summary(self.data["layers"])
        write_json_atomic(self.out / REPORT, self.data)

    def remove_stale(self, planned: set[str]) -> None:
        """Delete block files of an earlier run that this run does not write."""
        for stale in self.out.glob("block_*.safetensors"):
            if stale.name not in planned:
                stale.unlink()

    def finish(self) -> dict[str, Any]:
        self.data["complete"] = True
        self.data["summary"] = _summary(self.data["layers"])
        write_json_atomic(self.out / REPORT, self.data)
        return self.data


def solve_layer(
    ckpt: Any, stats: Any, solver: LayerSolver, options: Mapping[str, Any], w: str,
    orders: Sequence[int] | None = None,
) -> tuple[tuple[int, int], QuantizedLayer, dict]:
    """(shape, layer, report) of the Linear `w`: its weight from the checkpoint, its H from the
    statistics, solved by `solver` (with the model-scope allocation's `orders`, if any). The one
    solve of the stage, here or on a --cluster worker."""
    W = ckpt.read(w, np.float32)
    H, _ = stats.hessian(w, dim=W.shape[1])
    layer, rep = solver(W, H, {**options, "name": w, "layer_orders": orders})
    return W.shape, layer, rep


def quantize_model(
    model_dir: str | Path,
    stats_dir: str | Path,
    out_dir: str | Path,
    options: Mapping[str, Any],
    solver: LayerSolver | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Quantize every selected Linear of MODEL with its statistic; returns the report.

    `options` are passed to `solver` (default `make_solver(options)`, with the layer's "name")
    and fingerprinted: they must name everything that changes the result (the method, orders,
    ...). They are checked, budgets included, before any solve. With budget_scope "model" the
    group orders of all layers come first from one knapsack (`qdtk.allocate.allocate_orders`,
    stored in OUT/orders.json and reused by a rerun) and reach the solver as "layer_orders";
    options["trust_remote_code"] (not fingerprinted) lets that pre-pass run the model's code.
    """
    from tqdm.auto import tqdm

    from qdtk.stats import Stats

    check_options(options)
    solver = solver or make_solver(options)
    ckpt, stats = Checkpoint(model_dir), Stats(stats_dir)
    selected = ckpt.linear_names(include, exclude)
    have = set(stats.layers())
    missing = [w for w in selected if w not in have]
    if missing:
        experts = any(".experts." in w for w in missing) and not any(".experts." in w
                                                                     for w in have)
        raise QdtkError(
            f"{stats.folder}: no statistic for {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}; "
            f"{'captured from a model without these experts? ' if experts else ''}"
            f"recapture or --exclude them"
        )
    check_budgets(options, {w: ckpt.info(w).shape for w in selected})
    chosen = set(selected)
    plan = []  # (file, block name, weights)
    for i, block in enumerate(stats.blocks):
        weights = [w for w in stats.layers_of(block.name) if w in chosen]
        if weights:
            plan.append((f"block_{i:04d}.safetensors", block.name, weights))
    check_inputs(ckpt, stats, selected, progress)
    existing = sum(p.stat().st_size for p in Path(out_dir).glob("block_*.safetensors"))
    check_free_space(out_dir, sum(solution_bytes(ckpt.info(w).shape, options)
                                  for w in selected) - existing, "quantize")

    alloc: dict[str, Any] = {"fingerprint": None, "layers": {}}
    if _opt(options, "method") == "daq" and _opt(options, "budget_scope") == "model":
        from qdtk.allocate import allocate_orders

        alloc = allocate_orders(model_dir, stats_dir, out_dir, options, include, exclude,
                                progress=progress, stats=stats)
    report = SolutionReport(
        Path(out_dir), ckpt, {"path": str(stats.folder), "fingerprint": stats.fingerprint},
        options,
    )
    if alloc["fingerprint"] is not None:
        report.data["allocation"] = {k: v for k, v in alloc.items() if k != "layers"}
    report.remove_stale({file for file, _, _ in plan})
    model_fp = report.data["model"]["fingerprint"]
    result_options = report.data["options"]
    jobs = []  # (file, block name, weights, fingerprint, solved by an earlier run)
    for file, block, weights in plan:
        fp = fingerprint(model_fp, stats.block_fingerprint(block), result_options, weights,
                         alloc["fingerprint"])
        jobs.append((file, block, weights, fp, report.done(file, weights, fp)))
    orders = {w: alloc["layers"].get(w, {}).get("orders") for w in selected}
    todo = [(w, orders[w]) for *_, weights, _, done in jobs if not done for w in weights]
    if options.get("cluster") and todo:  # every unsolved layer a task, collected in this order
        from qdtk.cluster import ray_layers

        results = ray_layers(options, model_dir, stats_dir, solver, todo)
    else:
        results = nullcontext(lambda w: solve_layer(ckpt, stats, solver, options, w, orders[w]))
    with results as solve, tqdm(total=len(selected), unit="layer", disable=not progress) as bar:
        for file, block, weights, fp, done in jobs:
            if done:
                log.debug("%s: already solved, skipping", block)
                report.keep(block, file, fp, weights)
                bar.update(len(weights))
                continue
            solutions = {}
            for w in weights:
                bar.set_postfix_str(w, refresh=True)
                shape, layer, rep = solve(w)
                solutions[w] = layer
                planned = alloc["layers"].get(w, {})
                rep = {**rep, **{k: v for k, v in planned.items() if k != "orders"}}
                report.add_layer(w, shape, layer, rep, fp)
                bar.update(1)
            sha = write_solution_block(Path(out_dir) / file, solutions, fp)
            report.add_block(block, file, fp, weights, sha)
    return report.finish()


def check_inputs(ckpt: Checkpoint, stats: Stats, selected: Sequence[str],
                 progress: bool = True) -> None:
    """What the solves will read, checked before the first one: every weight a floating tensor
    with finite values, every statistic it reads intact (content hash), finite and of its
    size. One read of each; errors name the file, the tensor and the first bad index."""
    for w in selected:
        info = ckpt.info(w)
        if info.dtype not in FLOAT_CODES:
            raise QdtkError(f"{info.file}: tensor {w!r} is {info.dtype}; only floating-point "
                            f"Linear weights can be quantized")
    check_tensors_finite(ckpt, selected, progress)
    stats.verify({w: ckpt.info(w).shape[1] for w in selected})
    captured = stats.manifest.get("model") or {}
    if captured.get("fingerprint") not in (None, ckpt.fingerprint()):
        log.warning("%s: captured from %s, whose fingerprint differs from %s's: the shapes "
                    "fit, but the statistics may be of another model", stats.folder,
                    captured.get("path"), ckpt.folder)


def solution_bytes(shape: Sequence[int], options: Mapping[str, Any]) -> int:
    """An upper bound on a layer's bytes in a solution file: sign planes padded to the largest
    allowed order (DAQ) or one byte per code (baselines), with the float16 scales."""
    n, m = shape
    G = len(group_slices(m))
    if _opt(options, "method") != "daq":
        return n * m + 4 * n * G
    # knapsack: the allowed orders; none/swap: --bits planes, swap moving groups one up
    K = max(*abmp.check_orders(_opt(options, "orders")), int(float(_opt(options, "bits") or 0)) + 1)
    return K * (n * -(-m // 8) + 2 * G * n + 2 * m) + G


def check_budgets(options: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]) -> None:
    """The knapsack budget against the cheapest allocation, per layer or over the model."""
    if _opt(options, "method") != "daq" or _opt(options, "abmp") != "knapsack":
        return
    count = _opt(options, "count")
    low = abmp.check_orders(_opt(options, "orders"))[0]
    if _opt(options, "budget_scope") == "model":
        all_shapes = [tuple(s) for s in shapes.values()]
        abmp.check_budget(f"the model ({len(shapes)} layers)", all_shapes,
                          knapsack_bits(options, all_shapes), count, low)
    else:
        for w, shape in shapes.items():
            abmp.check_budget(w, [tuple(shape)], knapsack_bits(options, [shape]), count, low)
