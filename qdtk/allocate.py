"""Model-scope ABMP: one knapsack budget over all layers, the pre-pass of `qdtk quantize`.

For every selected Linear: its prepared H, the candidate values e_g(o) of each group at each
allowed order (`abmp.group_errors`, groups solved alone by DAQ) and its sensitivity (model
output change per unit of layer output error, measured with the layer alone replaced by its
uniform-order-2 solution from the same cache). One knapsack over all groups, values weighted by
the sensitivities, gives the orders of every layer (`abmp.allocate_model`). The result is stored
in OUT/orders.json with a fingerprint of everything it depends on, so a resumed run reuses it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qdtk import abmp
from qdtk.hessian import prepare_hessian
from qdtk.io import fingerprint, read_json, write_json_atomic

log = logging.getLogger(__name__)

ORDERS_FILE = "orders.json"
# What the allocation depends on among the quantize options (compensation, refinement and the
# sweep do not change it).
ALLOCATION_KEYS = ("bits", "count", "orders", "iters", "tau", "lam", "percdamp", "refit", "shrink",
                   "rotate", "rotate_seed")
SENSITIVITY_WINDOWS = {"n": 8, "L": 128}  # calibration windows of the output-change measure


def allocate_orders(
    model_dir: str | Path,
    stats_dir: str | Path,
    out_dir: str | Path,
    options: Mapping[str, Any],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    progress: bool = True,
    output_change: Callable[[str, np.ndarray], float] | None = None,
    stats: Any = None,
) -> dict[str, Any]:
    """{"fingerprint", "bits" (the budget), "count", "bits_per_weight" (real, reached),
    "weighted_predicted_error", "layers": {name: {"orders", "predicted_error", "sensitivity"}}},
    read from OUT/orders.json when its fingerprint matches.

    `output_change(name, What)` defaults to `qdtk.evaluate.output_change_fn(model_dir)` (torch),
    built only when the allocation has to be computed.
    """
    from qdtk.checkpoint import Checkpoint
    from qdtk.quantize import DEFAULTS, knapsack_bits
    from qdtk.stats import Stats

    opts = {k: options.get(k, DEFAULTS[k]) for k in ALLOCATION_KEYS}
    # `stats`: the caller's open qdtk.stats.Stats of stats_dir (its files hashed once)
    ckpt, stats = Checkpoint(model_dir), stats if stats is not None else Stats(stats_dir)
    names = ckpt.linear_names(include, exclude)
    fp = fingerprint(ckpt.fingerprint(), stats.fingerprint, opts, names, SENSITIVITY_WINDOWS)
    path = Path(out_dir) / ORDERS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        old = read_json(path)
        if old.get("fingerprint") == fp:
            log.info("%s: reusing the model-scope allocation", path)
            return old
    if output_change is None:
        import torch

        from qdtk.evaluate import output_change_fn

        # the sensitivity forwards run where the solver does (a layer set of an 8B model is
        # hours of forwards on a CPU)
        gpu = options.get("backend") == "cuda" and torch.cuda.is_available()
        output_change = output_change_fn(
            model_dir, **SENSITIVITY_WINDOWS,
            trust_remote_code=bool(options.get("trust_remote_code", False)),
            model_code=options.get("model_code", "auto"), device="cuda" if gpu else "cpu")
    cands, weights = model_candidates(ckpt, stats, names, options, output_change, progress)
    order_set = cands[0].orders if cands else abmp.ORDERS
    bits = knapsack_bits(options, [(c.n, c.m) for c in cands])
    chosen = abmp.allocate_model(cands, bits, opts["count"], weights)
    layers = {}
    for cand, o, s in zip(cands, chosen, weights, strict=True):
        e = cand.E[np.arange(len(o)), np.searchsorted(order_set, o)]  # [G]
        layers[cand.name] = {"orders": o.tolist(), "predicted_error": float(e.sum()),
                             "sensitivity": s}
    result = {
        "fingerprint": fp,
        "bits": bits,
        "count": opts["count"],
        "bits_per_weight": abmp.model_bits_per_weight(
            [(c.n, c.m, o) for c, o in zip(cands, chosen, strict=True)]),
        "weighted_predicted_error": float(sum(
            s * r["predicted_error"] for s, r in zip(weights, layers.values(), strict=True))),
        "layers": layers,
    }
    write_json_atomic(path, result)
    return result


def model_candidates(
    ckpt: Any,
    stats: Any,
    names: Sequence[str],
    options: Mapping[str, Any],
    output_change: Callable[[str, np.ndarray], float],
    progress: bool = False,
) -> tuple[list[abmp.LayerCandidates], list[float]]:
    """Knapsack candidates (values e_g(o), DAQ groups solved alone) and sensitivity of every
    layer `names` of a Checkpoint with its Stats; the solves of one layer are cached and shared
    by the values and its uniform-order-2 solution (the sensitivity's What)."""
    from tqdm.auto import tqdm

    from qdtk.quantize import DEFAULTS, _group_solver
    from qdtk.rotation import layer_rotation, rotate_problem

    order_set = abmp.check_orders(options.get("orders", DEFAULTS["orders"]))
    percdamp = float(options.get("percdamp", DEFAULTS["percdamp"]))
    shrink = float(options.get("shrink", DEFAULTS["shrink"]))
    solve = _group_solver(options)
    cands, weights = [], []
    for name in tqdm(names, desc="allocate", unit="layer", disable=not progress):
        W = ckpt.read(name, np.float32)  # [n, m]
        H, _ = stats.hessian(name, dim=W.shape[1])
        # --rotate: the problem the layer's solve sees (qdtk.quantize.solve_rotated)
        rot = layer_rotation(*(options.get(k, DEFAULTS[k]) for k in ("rotate", "rotate_seed")),
                             W.shape[1])
        W, H = rotate_problem(W, H, rot)
        P = prepare_hessian(H, percdamp, name=name, dtype=np.float32, shrink=shrink)
        E = abmp.group_errors(W, P.H, P.d, order_set, solve)  # [G, C]
        What = abmp.dequantize_orders(W, P.d, np.full(E.shape[0], 2), solve)  # cached if 2 in C
        change = output_change if rot is None else (
            lambda w, X, rot=rot: output_change(w, rot.apply_t(X)))  # the model's own basis
        weights.append(abmp.sensitivity(name, W, P.H, What, change))
        cands.append(abmp.LayerCandidates(name, *W.shape, E, order_set))
        solve.clear()
    return cands, weights
