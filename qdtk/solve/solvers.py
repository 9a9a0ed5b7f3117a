"""Layer solvers: the quantize options turned into one Linear's solve.

A layer solver is `solver(W, H, options, name="layer", orders=None) -> (QuantizedLayer, report
dict)`: W [n, m] the weight, H [m, m] its statistic, `options` the stage's QuantizeOptions,
`name` the Linear (for messages), `orders` the layer's group orders when the model-scope
allocation planned them. DAQ here; RTN and GPTQ in qdtk.math.baselines share the signature. This
is where options become the explicit arguments of the layer driver and of ABMP.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from qdtk.errors import QdtkError
from qdtk.formats.solution import BinaryCodedLayer, QuantizedLayer
from qdtk.math import abmp
from qdtk.math.baselines import SOLVERS
from qdtk.math.group import DaqGroupSolver
from qdtk.math.hessian import PreparedHessian
from qdtk.math.rotation import rotate_problem, rotate_statistic
from qdtk.options import QuantizeOptions
from qdtk.solve.layer import Orders, quantize_layer

LayerSolver = Callable[..., tuple[QuantizedLayer, dict]]


def solve_daq(
    W: np.ndarray, H: np.ndarray, options: QuantizeOptions, name: str = "layer",
    orders: Orders | None = None, validation: np.ndarray | None = None,
) -> tuple[BinaryCodedLayer, dict[str, Any]]:
    """DAQ as a pluggable layer solver. `validation` [m, m]: the validation statistic's H, which
    stops the refinement rounds (--early-stop).

    The group orders: `orders` when given (a list, or a function of (W, prepared H), e.g. the
    model-scope allocation's), else ABMP on this layer alone (`abmp.choose_orders` with abmp
    none/swap/knapsack). The ABMP report (orders histogram, bits, predicted error) joins the
    layer report; the predicted error is given where it is free or needed: with knapsack, or
    without compensation (whose sweep reuses the allocation's cached solves).
    """
    o = options
    # its memo pays where the solves are asked again (the uncompensated sweep) or batched
    # (cuda); elsewhere its hashes of every group would be all it adds
    gs = DaqGroupSolver(**o.group_settings())
    info: dict[str, Any] = {}
    if orders is None:
        if o.model_scope:
            raise QdtkError(f"{name}: --budget-scope model needs the model's allocation "
                            f"(quantize_model computes it from the statistics folder)")
        bits = o.budget([W.shape]) if o.knapsack else float(o.bits)
        group_solve = None  # swap and none rank groups without solving them
        if o.knapsack or not o.compensate:
            # the knapsack's candidates at their own iterations (set only with knapsack): a
            # memo of their own, which the sweep cannot use
            cs = gs if o.candidate_iters is None else DaqGroupSolver(
                **o.group_settings(candidates=True))
            memo = (cs is gs and not o.compensate) or o.backend == "cuda"
            group_solve = cs if memo else cs.uncached

        def orders(W_: np.ndarray, P: PreparedHessian) -> np.ndarray:
            chosen, rep = abmp.choose_orders(
                name, W_, P.H, P.d, method=o.abmp, rho=o.rho, bits=bits, count=o.count,
                orders=o.orders, uniform=2 if o.knapsack else int(bits),
                solve=group_solve,
            )
            info.update(rep)
            return chosen

    elif not callable(orders):
        orders = np.asarray(orders, np.int64)
    try:
        layer, report = quantize_layer(
            W, H, orders, iters=o.iters, tau=o.tau, lam=o.lam, percdamp=o.percdamp,
            compensate=o.compensate, feedback=o.feedback, refit=o.refit, backend=o.backend,
            name=name, refine=o.refine_mode(), shrink=o.shrink,
            # compensated groups never repeat the allocation's solves: no memo (its hashes)
            group_solver=None if o.compensate else gs.solution,
            validation=validation, group_rounds=o.group_refine,
        )
    finally:
        gs.clear()
    n, m = W.shape
    info = {"abmp": o.abmp, **abmp.layer_report(n, m, np.asarray(report.orders)), **info}
    return layer, {**report.to_dict(), **info, "refine": o.refine}


def make_solver(options: QuantizeOptions) -> LayerSolver:
    """The layer solver that `options` name (method daq, gptq or rtn), rotated under --rotate."""
    solver = solve_daq if options.method == "daq" else SOLVERS[options.method]
    return solver if options.rotate == "none" else partial(solve_rotated, solver)


def solve_rotated(
    solver: LayerSolver, W: np.ndarray, H: np.ndarray, options: QuantizeOptions,
    name: str = "layer", orders: Orders | None = None, **validation: np.ndarray,
) -> tuple[QuantizedLayer, dict]:
    """`solver` on the layer's problem in the rotated basis, W Q against Q^T H Q (--rotate,
    qdtk.math.rotation), a validation H rotated alike; the layer records Q. Its errors are
    those of W and H (Q is orthogonal)."""
    rot = options.rotation(name, W.shape[1])
    if rot is None:  # --rotate-exclude
        return solver(W, H, options, name=name, orders=orders, **validation)
    validation = {k: rotate_statistic(v, rot) for k, v in validation.items()}
    layer, rep = solver(*rotate_problem(W, H, rot), options, name=name, orders=orders,
                        **validation)
    layer.rotation = rot
    return layer, {**rep, "rotation": rot.to_dict()}
