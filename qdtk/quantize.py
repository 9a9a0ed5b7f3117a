"""The `qdtk quantize` stage: every selected Linear of a model solved with its statistic.

For every statistics block, its selected Linears are solved by a pluggable layer solver
(qdtk.solve.solvers: `solver(W, H, options, name, orders) -> (QuantizedLayer, report dict)`; DAQ, or
RTN and GPTQ from qdtk.math.baselines) and written as one solution file; a rerun skips blocks whose
file carries the same fingerprint (model, statistics block, options, layer names). The options
are one QuantizeOptions (qdtk.options), checked when it is built; its `fingerprinted()` fields
name everything that changes the result. With budget scope "model" the group orders of all
layers come first from one knapsack (qdtk.allocate). With options.cluster the layers (and the
pre-pass's per-layer work) are solved as Ray tasks instead (qdtk.cluster), collected in the
same order into the same files.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from qdtk.allocate import allocate_orders
from qdtk.cluster import Cluster, connected, task_resources
from qdtk.errors import QdtkError
from qdtk.formats.bits import group_slices
from qdtk.formats.checkpoint import FLOAT_CODES, Checkpoint
from qdtk.formats.io import (
    clean_stale_temporaries,
    fingerprint,
    hash_file,
    read_json,
    write_json_atomic,
)
from qdtk.formats.solution import (
    FORMAT,
    REPORT,
    QuantizedLayer,
    solution_fingerprint,
    write_solution_block,
)
from qdtk.formats.stats import Stats
from qdtk.formats.validate import check_free_space, check_tensors_finite
from qdtk.math import abmp
from qdtk.options import QuantizeOptions
from qdtk.solve import solver_code
from qdtk.solve.solvers import LayerSolver, make_solver

log = logging.getLogger(__name__)


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

    def __init__(self, out: Path, ckpt: Any, stats: Mapping[str, Any],
                 options: Mapping[str, Any]):
        """`options`: what the solutions depend on (QuantizeOptions.fingerprinted(), plus
        "sequential" for the sequential mode)."""
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
            "options": dict(options),
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
    ckpt: Checkpoint, stats: Stats, solver: LayerSolver, options: QuantizeOptions, w: str,
    orders: Sequence[int] | None = None,
) -> tuple[tuple[int, int], QuantizedLayer, dict]:
    """(shape, layer, report) of the Linear `w`: its weight from the checkpoint, its H from the
    statistics, solved by `solver` (with the model-scope allocation's `orders`, if any). The one
    solve of the stage, here or on a --cluster worker."""
    W = ckpt.read(w, np.float32)
    H, _ = stats.hessian(w, dim=W.shape[1])
    val = stats.validation() if options.early_stop else None
    extra = {} if val is None else {"validation": val.hessian(w, dim=W.shape[1])[0]}
    layer, rep = solver(W, H, options, w, orders, **extra)
    return W.shape, layer, rep


def solve_layer_at(model_dir: str, stats_dir: str, solver: LayerSolver, options: QuantizeOptions,
                   w: str, orders: Sequence[int] | None) -> tuple[tuple[int, int], QuantizedLayer,
                                                                 dict]:
    """`solve_layer` with the checkpoint and statistics opened from their folders: a --cluster
    task."""
    return solve_layer(Checkpoint(model_dir), Stats(stats_dir), solver, options, w, orders)


def quantize_model(
    model_dir: str | Path,
    stats_dir: str | Path,
    out_dir: str | Path,
    options: QuantizeOptions | Mapping[str, Any],
    solver: LayerSolver | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Quantize every selected Linear of MODEL with its statistic; returns the report.

    `options`: QuantizeOptions, or a mapping of its fields (checked here, budgets included,
    before any solve). `solver` (default `make_solver(options)`) gets them with each layer's
    name. With budget_scope "model" the group orders of all layers come first from one
    knapsack (`qdtk.allocate.allocate_orders`, stored in OUT/orders.json and reused by a
    rerun) and reach the solver as its `orders`; options.trust_remote_code (not
    fingerprinted) lets that pre-pass run the model's code.
    """
    options = QuantizeOptions.of(options)
    ckpt, stats = Checkpoint(model_dir), Stats(stats_dir)
    if options.early_stop and stats.validation() is None:
        log.warning("%s: no validation statistic (capture --validation); refining without "
                    "early stopping", stats.folder)
        options = replace(options, early_stop=False)  # and fingerprinted as such
    solver = solver or make_solver(options)
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
    with connected(options.cluster) as cluster:
        return _quantize(ckpt, stats, Path(out_dir), options, solver, selected, plan,
                         include, exclude, progress, cluster)


def _quantize(ckpt: Checkpoint, stats: Stats, out: Path, options: QuantizeOptions,
              solver: LayerSolver, selected: Sequence[str],
              plan: Sequence[tuple[str, str, list[str]]], include: Sequence[str],
              exclude: Sequence[str], progress: bool, cluster: Cluster | None) -> dict[str, Any]:
    """quantize_model after its checks: the allocation, then every unsolved block."""
    alloc: dict[str, Any] = {"fingerprint": None, "layers": {}}
    if options.model_scope:
        alloc = allocate_orders(ckpt.folder, stats.folder, out, options, include, exclude,
                                progress=progress, stats=stats, cluster=cluster)
    report = SolutionReport(
        out, ckpt, {"path": str(stats.folder), "fingerprint": stats.fingerprint},
        options.fingerprinted(),
    )
    if alloc["fingerprint"] is not None:
        report.data["allocation"] = {k: v for k, v in alloc.items() if k != "layers"}
    report.remove_stale({file for file, _, _ in plan})
    model_fp = report.data["model"]["fingerprint"]
    result_options = report.data["options"]
    jobs = []  # (file, block name, weights, fingerprint, solved by an earlier run)
    for file, block, weights in plan:
        val = stats.validation() if options.early_stop else None
        fp = fingerprint(model_fp, stats.block_fingerprint(block), result_options, weights,
                         alloc["fingerprint"], solver_code(),
                         *([] if val is None else [val.block_fingerprint(block)]))
        jobs.append((file, block, weights, fp, report.done(file, weights, fp)))
    orders = {w: alloc["layers"].get(w, {}).get("orders") for w in selected}
    todo = [w for *_, weights, _, done in jobs if not done for w in weights]
    if cluster is not None and todo:  # every unsolved layer a task, collected in this order
        results = cluster.tasks(solve_layer_at, [
            (w, (str(ckpt.folder), str(stats.folder), solver, options, w, orders[w]))
            for w in todo], task_resources(options.num_cpus, options.backend == "cuda"))
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
            sha = write_solution_block(out / file, solutions, fp)
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


def solution_bytes(shape: Sequence[int], options: QuantizeOptions) -> int:
    """An upper bound on a layer's bytes in a solution file: sign planes padded to the largest
    allowed order (DAQ) or one byte per code (baselines), with the float16 scales."""
    n, m = shape
    G = len(group_slices(m))
    if options.method != "daq":
        return n * m + 4 * n * G
    # knapsack: the allowed orders; none/swap: --bits planes, swap moving groups one up
    K = max(*options.orders, int(options.bits or 0) + 1)
    return K * (n * -(-m // 8) + 2 * G * n + 2 * m) + G


def check_budgets(options: QuantizeOptions, shapes: Mapping[str, Sequence[int]]) -> None:
    """The knapsack budget against the cheapest allocation, per layer or over the model."""
    if not options.knapsack:
        return
    low = options.orders[0]
    if options.model_scope:
        all_shapes = [tuple(s) for s in shapes.values()]
        abmp.check_budget(f"the model ({len(shapes)} layers)", all_shapes,
                          options.budget(all_shapes), options.count, low)
    else:
        for w, shape in shapes.items():
            abmp.check_budget(w, [tuple(shape)], options.budget([shape]), options.count, low)
