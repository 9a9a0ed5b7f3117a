"""Model-scope ABMP: one knapsack budget over all layers, the pre-pass of `qdtk quantize`.

For every selected Linear (`layer_candidates`): its prepared H, the candidate values e_g(o) of
each group at each allowed order (`abmp.group_errors`, groups solved alone by DAQ) and its
uniform-order-2 solution from the same cache; then its sensitivity (model output change per
unit of layer output error, measured with the layer alone replaced by that solution). One
knapsack over all groups, values weighted by the sensitivities, gives the orders of every layer
(`abmp.allocate_model`). The result is stored in OUT/orders.json with a fingerprint of
everything it depends on, so a resumed run reuses it. With --cluster the per-layer candidates
are Ray tasks (`layer_candidates_at`); the model's forwards stay on the driver.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from qdtk.cluster import Cluster, task_resources
from qdtk.errors import QdtkError
from qdtk.formats.calib import calibration_text, text_hash
from qdtk.formats.checkpoint import Checkpoint
from qdtk.formats.io import fingerprint, read_json, write_json_atomic
from qdtk.formats.stats import Stats
from qdtk.math import abmp
from qdtk.math.group import DaqGroupSolver
from qdtk.math.hessian import prepare_hessian
from qdtk.math.rotation import rotate_problem
from qdtk.options import QuantizeOptions
from qdtk.solve import solver_code

log = logging.getLogger(__name__)

ORDERS_FILE = "orders.json"
# What the allocation depends on among the quantize options (compensation, refinement and the
# sweep do not change it; iters: those of the candidate solves, --candidate-iters).
ALLOCATION_KEYS = ("bits", "count", "orders", "iters", "tau", "lam", "percdamp", "refit",
                   "shrink", "backend", "rotate", "rotate_seed")
SENSITIVITY_WINDOWS = {"n": 8, "L": 128}  # calibration windows of the output-change measure


def allocate_orders(
    model_dir: str | Path,
    stats_dir: str | Path,
    out_dir: str | Path,
    options: QuantizeOptions,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    progress: bool = True,
    output_change: Callable[[str, np.ndarray], float] | None = None,
    stats: Stats | None = None,
    cluster: Cluster | None = None,
) -> dict[str, Any]:
    """{"fingerprint", "bits" (the budget), "count", "bits_per_weight" (real, reached),
    "weighted_predicted_error", "layers": {name: {"orders", "predicted_error", "sensitivity"}}},
    read from OUT/orders.json when its fingerprint matches.

    `output_change(name, What)` defaults to `qdtk.torch.evaluate.output_change_fn(model_dir)`
    (torch), built only when the allocation has to be computed. `stats`: the caller's open Stats of
    stats_dir (its files hashed once). With a `cluster` (qdtk.cluster.connected) the per-layer
    work runs there.
    """
    opts = {k: getattr(options, k) for k in ALLOCATION_KEYS}
    opts["orders"] = list(options.orders)
    opts["iters"] = options.group_settings(candidates=True)["iters"]  # the candidates' own
    if options.rotate_exclude:  # (absent otherwise: earlier allocations stay valid)
        opts["rotate_exclude"] = list(options.rotate_exclude)
    ckpt, stats = Checkpoint(model_dir), stats if stats is not None else Stats(stats_dir)
    names = ckpt.linear_names(include, exclude)
    fp = fingerprint(ckpt.fingerprint(), stats.fingerprint, opts, names, SENSITIVITY_WINDOWS,
                     solver_code())
    path = Path(out_dir) / ORDERS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        old = read_json(path)
        if old.get("fingerprint") == fp:
            log.info("%s: reusing the model-scope allocation", path)
            return old
    built = output_change is None
    if built:
        output_change = default_output_change(model_dir, options, calibration_of(stats))
    cands, weights = model_candidates(ckpt, stats, names, options, output_change, progress,
                                      cluster)
    if built:  # the torch model lives in reference cycles: freed now, not during the sweep
        del output_change
        gc.collect()
    bits = options.budget([(c.n, c.m) for c in cands])
    chosen = abmp.allocate_model(cands, bits, options.count, weights)
    layers = {}
    for cand, o, s in zip(cands, chosen, weights, strict=True):
        e = cand.E[np.arange(len(o)), np.searchsorted(cand.orders, o)]  # [G]
        layers[cand.name] = {"orders": o.tolist(), "predicted_error": float(e.sum()),
                             "sensitivity": s}
    result = {
        "fingerprint": fp,
        "bits": bits,
        "count": options.count,
        "bits_per_weight": abmp.model_bits_per_weight(
            [(c.n, c.m, o) for c, o in zip(cands, chosen, strict=True)]),
        "weighted_predicted_error": float(sum(
            s * r["predicted_error"] for s, r in zip(weights, layers.values(), strict=True))),
        "layers": layers,
    }
    write_json_atomic(path, result)
    return result


def calibration_of(stats: Stats) -> str | None:
    """The text `stats` were captured on, for the sensitivity forwards (None: the built-in
    calibration); the built-in one, with a warning, where that file is gone or has changed."""
    calib = stats.manifest.get("options", {}).get("calib") or {}
    source = calib.get("source", "builtin")
    if source == "builtin":
        return None
    try:
        text = calibration_text(source)
    except QdtkError:
        text = None
    if text is None or text_hash(text) != calib.get("sha256"):
        log.warning("%s: the calibration text %s is gone or changed since capture; the layers' "
                    "sensitivities are measured on the built-in text", stats.folder, source)
        return None
    return text


def default_output_change(model_dir: str | Path, options: QuantizeOptions,
                          text: str | None = None) -> Callable[[str, np.ndarray], float]:
    """qdtk.torch.evaluate's output-change measure of the model in model_dir on windows of `text`
    (None: the built-in calibration), torch imported here only: the formats and the math run
    without it. The forwards run where the solver does (a layer set of an 8B model is hours of
    forwards on a CPU)."""
    from qdtk.torch.evaluate import output_change_fn

    return output_change_fn(model_dir, text=text, **SENSITIVITY_WINDOWS,
                            trust_remote_code=options.trust_remote_code,
                            model_code=options.model_code,
                            device="cuda" if options.backend == "cuda" else "cpu")


def layer_candidates(
    W: np.ndarray, H: np.ndarray, name: str, order_set: Sequence[int], percdamp: float,
    shrink: float, solve: DaqGroupSolver,
) -> tuple[np.ndarray, np.ndarray, float]:
    """(E [G, C], What [n, m], err) of one layer W [n, m] with its statistic H [m, m]: the
    candidate values e_g(o) (groups solved alone by `solve`), its uniform-order-2 solution What
    from the same cache, and that solution's output error tr(D H_damped D^T) (the denominator
    of its sensitivity)."""
    P = prepare_hessian(H, percdamp, name=name, dtype=np.float32, shrink=shrink)
    try:
        E = abmp.group_errors(W, P.H, P.d, order_set, solve)  # [G, C]
        What = abmp.dequantize_orders(W, P.d, np.full(E.shape[0], 2), solve)  # cached if 2 in C
    finally:
        solve.clear()
    err = abmp.output_error(np.asarray(W, np.float64) - What, np.asarray(P.H, np.float64))
    return E, What, err


def layer_candidates_at(model_dir: str, stats_dir: str, name: str,
                        options: QuantizeOptions) -> tuple[np.ndarray, np.ndarray, float]:
    """`layer_candidates` of the Linear `name`, read from the folders: a --cluster task."""
    return _candidates(Checkpoint(model_dir), Stats(stats_dir), name, options)


def _candidates(ckpt: Checkpoint, stats: Stats, name: str,
                options: QuantizeOptions) -> tuple[np.ndarray, np.ndarray, float]:
    W = ckpt.read(name, np.float32)  # [n, m]
    H, _ = stats.hessian(name, dim=W.shape[1])
    # --rotate: the problem the layer's solve sees (qdtk.solve.solvers.solve_rotated); What goes
    # back to the model's basis for the sensitivity's forward; err is the same in both (Q
    # orthogonal)
    rot = options.rotation(name, W.shape[1])
    E, What, err = layer_candidates(*rotate_problem(W, H, rot), name, options.orders,
                                    options.percdamp, options.shrink,
                                    DaqGroupSolver(**options.group_settings(candidates=True)))
    return E, (What if rot is None else rot.apply_t(What)), err


def model_candidates(
    ckpt: Checkpoint,
    stats: Stats,
    names: Sequence[str],
    options: QuantizeOptions,
    output_change: Callable[[str, np.ndarray], float],
    progress: bool = False,
    cluster: Cluster | None = None,
) -> tuple[list[abmp.LayerCandidates], list[float]]:
    """Knapsack candidates (values e_g(o), DAQ groups solved alone) and sensitivity of every
    layer `names` of a Checkpoint with its Stats. With a `cluster` each layer's candidates are
    a task there; the forwards of the sensitivities run here, in order,
    while the tasks run."""
    from tqdm.auto import tqdm

    if cluster is not None and names:
        jobs = [(w, (str(ckpt.folder), str(stats.folder), w, options)) for w in names]
        results = cluster.tasks(layer_candidates_at, jobs, task_resources(
            options.num_cpus, options.backend == "cuda"))
    else:
        results = nullcontext(lambda w: _candidates(ckpt, stats, w, options))
    cands, weights = [], []
    with results as candidates:
        for name in tqdm(names, desc="allocate", unit="layer", disable=not progress):
            E, What, err = candidates(name)
            weights.append(abmp.sensitivity_weight(name, err, float(output_change(name, What))))
            cands.append(abmp.LayerCandidates(name, *What.shape, E, options.orders))
    return cands, weights
