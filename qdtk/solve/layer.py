"""The layer driver (METHOD.md §4): one Linear's weight W and statistic H in, its binary-coded
solution and report out.

Blocks of 128 columns left to right; block g is solved by DAQ at order o_g on the
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
live. After the sweep the layer may be refined on the full H (qdtk.math.refine), on the same
backend.

Every setting arrives as an explicit argument: the options of `qdtk quantize` are read one
level up (qdtk.solve.solvers).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
from scipy.linalg import lapack

from qdtk.backend import CPU, Backend, array_module, get_backend, to_host
from qdtk.errors import QdtkError
from qdtk.formats.bits import bcq_bits, group_slices
from qdtk.formats.solution import BinaryCodedLayer
from qdtk.math.forms import quadratic_form, sum_squares, undamped_form
from qdtk.math.group import GroupSolution, solve_group, stored_solution
from qdtk.math.hessian import PreparedHessian, all_finite, prepare_hessian
from qdtk.math.refine import refine_group_rows, refine_layer, refine_prepared
from qdtk.threads import thread_invariant

# orders as an array [G], or a function of (W, prepared H) giving them (ABMP)
Orders = Sequence[int] | np.ndarray | Callable[[np.ndarray, PreparedHessian], np.ndarray]

SUPER = 4  # groups per compensation product from all earlier groups (wider, faster GEMMs)

@dataclass
class LayerReport:
    orders: list[int]
    proxy_error: float  # tr(D H D^T) / tr(W H W^T), H undamped
    output_error: float  # tr(D H D^T)
    weight_energy: float  # tr(W H W^T)
    bits_per_weight: float  # honest, with the float16 scales (qdtk.formats.bits)
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




def triangular_inverse(R):
    """[w, w] R^-1 of an upper triangular R, NumPy (LAPACK trtri) or CuPy (cuBLAS trsm)."""
    if array_module(R) is np:
        trtri = lapack.strtri if R.dtype == np.float32 else lapack.dtrtri
        with thread_invariant():
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


def refine_group(Wg, Rgg, solution: GroupSolution, rounds: int,
                 backend: Backend = CPU) -> GroupSolution:
    """A group's solution refined on the group's exact metric (qdtk.math.refine).

    With block feedback the later columns absorb the group's error optimally, and what remains
    is ||(W_g - Q_g) R_gg||^2 = tr(D A D^T) with A = R_gg R_gg^T [w, w]: the Schur complement
    of the later columns in H, so D's rows couple only through A. DAQ fits the group with
    diagonal salience weights; `rounds` of exact row-scale refits and sign passes on A lower
    that remainder row by row, never raising it (`refine_group_rows`: a row keeps its input
    otherwise). Cost per round about (K + 2) n w^2: small next to the sweep's products. On the
    CPU rows in parallel; on a "cuda" backend through refine_layer's GPU path. The arrays come
    from and go back to `backend` (where the sweep runs).
    """
    xp = backend.xp
    signs, a, b, _ = solution
    Rgg = to_host(Rgg).astype(np.float64)
    A = Rgg @ Rgg.T  # [w, w], positive definite: damped already
    if backend.daq != "cuda":
        signs, a = refine_group_rows(to_host(Wg), A, to_host(signs), to_host(a), to_host(b),
                                     rounds)
        return stored_solution(xp.asarray(signs), xp.asarray(a), b)
    # on a GPU: the layer refinement's array code and kernels on the group's problem (the same
    # steps, a guard for the whole group instead of per row; scales balanced before rounding)
    o = signs.shape[0]
    layer = BinaryCodedLayer(np.array([o]), to_host(signs), to_host(a)[:, None, :], to_host(b))
    out = refine_layer(to_host(Wg), A, layer, rounds=rounds, percdamp=1e-8, backend=backend)
    return stored_solution(*(xp.asarray(x) for x in (out.signs, out.row_scale[:, 0],
                                                      out.col_scale)))


def sweep(
    W,
    R,
    orders: np.ndarray,
    solve: Callable[[Any, int, Any], tuple],
    compensate: bool = True,
    feedback: str = "diagonal",
    group_rounds: int = 0,
    backend: Backend = CPU,
) -> tuple[BinaryCodedLayer, float | None]:
    """Solve the groups of W [n, m] left to right with GPTQ-style compensation through R
    [m, m] (upper, H_damped = R R^T); feedback "diagonal" (published: Err_g = (W_g - Q_g) /
    d_g) or "block" (exact). W and R are NumPy or CuPy arrays: the groups are solved where
    they live, `solve(W_g, order, d_g)` taking and giving arrays of that kind. With block
    feedback and compensation, `group_rounds` > 0 refines each group's solution on its exact
    metric before its error is fed forward (`refine_group`, on `backend`: the arrays' own).

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
        if group_rounds and compensate and feedback == "block":
            sg, a, b, Q = refine_group(Wg, R[cols, cols], (sg, a, b, Q), group_rounds,
                                       backend)
        signs[:o, :, cols], row_scale[:o, g], col_scale[:o, cols] = map(to_host, (sg, a, b))
        if compensate:
            err += feed_forward(Y, Wg, Q, R, d, S, Ugg, cols, feedback)
    layer = BinaryCodedLayer(np.asarray(orders, np.int64), signs, row_scale, col_scale)
    return layer, (err if compensate and feedback == "block" else None)



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
    validation: np.ndarray | None = None,
    group_rounds: int = 0,
) -> tuple[BinaryCodedLayer, LayerReport]:
    """DAQ of one Linear weight W [n, m] against its statistic H [m, m] (METHOD.md §4), fitted on H
    shrunk toward its diagonal by `shrink` (qdtk.math.hessian); the reported errors are on H itself.

    `group_solver(W_g, order, d_g)` replaces `solve_group` (e.g. the memoising
    `DaqGroupSolver.solution`: an uncompensated sweep reuses ABMP's solves);
    `refine` (keyword arguments of qdtk.math.refine.refine_layer, e.g. `refine.MODES["rows"]`)
    refits the solved layer on the full H before its error is measured, its rounds stopped on
    the error on `validation` [m, m] (H of inputs kept out of H) when given. `group_rounds`:
    rounds of each group's refinement inside the sweep (`refine_group`; block feedback only).
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
    layer, damped_err = sweep(dev.to_device(W), R, o, solve, compensate, feedback, group_rounds,
                              dev)
    t_sweep = time.perf_counter()
    X = None  # W0 - What where the refinement formed it (on dev, float32 as R)
    if refine is not None:
        # on the sweep's prepared H (float32, factored once); its error is the guard's start
        # when the sweep gave it for W0 itself (no dead columns zeroed)
        start = None if P.dead.any() else damped_err
        layer, damped_err, X = refine_prepared(W0, P, layer, **refine, name=name, backend=dev,
                                               validation=validation, R=R, start_error=start)
    t3 = time.perf_counter()
    if not (np.all(np.isfinite(layer.row_scale)) and np.all(np.isfinite(layer.col_scale))):
        raise QdtkError(f"{name}: scales overflow float16 (weights beyond 65504?)")
    if damped_err is None:
        err = quadratic_form(W0 - layer.dequantize() if X is None else X, P, R)
    elif X is not None:  # the refinement's tr(D H_damped D^T)
        err = undamped_form(damped_err, X, P)
    elif shrink:  # the sweep's, on Dz = W - What (dead columns zeroed: H is 0 there)
        err = undamped_form(damped_err, dev.to_device(W - layer.dequantize()), P)
    else:  # the sweep's, undamped group by group (What is never formed whole)
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
