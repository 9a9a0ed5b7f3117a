"""ABMP end to end: uniform order 2, swap, knapsack per layer and per model, GPTQ 2-bit beside.

    .venv/bin/python bench/bench_abmp.py [--models minilm,smollm] [--work DIR] [-n 64 -L 256]
        [--refine none,full]

Per model: one MCS capture; then for every setting quantize (DAQ with compensation), pack,
unpack and compare with the original on the built-in held-out text. Budgets are real bits per
weight, scales included: 2.00, 2.10 and the uniform-order-2 point (whatever that costs on the
model's shapes). Columns: real bits per weight of the quantized Linears, the median layer proxy
error tr(D H D^T)/tr(W H W^T) (calibration H), and the model metric: the held-out embedding
cosine (MiniLM) or the perplexity ratio quantized/original (SmolLM2).

The knapsack values e_g(o) and, for the model scope, the per-layer sensitivities are computed
once per model by the library's pre-pass (qdtk.allocate.model_candidates): sensitivity =
change of the final hidden states (sum of squares per token, on calibration windows) when the
layer alone is replaced by its uncompensated uniform-order-2 DAQ solution, per unit of that
layer's output error. swap at rho 0.05 moves nothing on layers with fewer than 20 groups (all
of MiniLM's and SmolLM2's), so it equals uniform there; rho 0.25 is shown as well. Every DAQ
setting runs with each --refine mode (refit on the full H after the
sweep, qdtk.math.refine). Timings and thread counts on a shared machine are not the point here.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from qdtk.math import abmp

sys.path.insert(0, str(Path(__file__).parent))
from common import model_folder  # noqa: E402  (bench/common.py)

from qdtk.formats.bits import bcq_bits

DAQ = {"iters": 15, "tau": 2.0, "lam": 3.0, "refit": True, "backend": "cpu"}
OPTIONS = {"method": "daq", "percdamp": 0.01, "compensate": True, **DAQ}


def run_setting(model: Path, stats: Path, work: Path, tag: str, solver, options: dict) -> dict:
    from qdtk.pack import pack_checkpoint, unpack_checkpoint
    from qdtk.quantize import quantize_model
    from qdtk.torch.evaluate import compare

    q, p, u = work / f"q-{tag}", work / f"p-{tag}", work / f"u-{tag}"
    t0 = time.perf_counter()
    report = quantize_model(model, stats, q, options, solver=solver, progress=False)
    seconds = time.perf_counter() - t0
    pack_checkpoint(q, p, model)
    unpack_checkpoint(p, u)
    metrics = compare(model, u)["metrics"]
    errors = [r["proxy_error"] for r in report["layers"].values()]
    return {
        "bits_per_weight": report["summary"]["bits_per_weight"],
        "median_proxy_error": float(np.median(errors)),
        "embedding_cosine": metrics["embedding_cosine"]["value"],
        "perplexity_ratio": metrics.get("perplexity", {}).get("ratio"),
        "quantize_s": seconds,
    }


def bench_model(name: str, work: Path, n: int, L: int, refines: list[str]) -> list[dict]:
    from qdtk.allocate import SENSITIVITY_WINDOWS, model_candidates
    from qdtk.formats.checkpoint import Checkpoint
    from qdtk.formats.stats import Stats
    from qdtk.math.baselines import solve_gptq
    from qdtk.math.hessian import prepare_hessian
    from qdtk.options import QuantizeOptions
    from qdtk.solve.solvers import solve_daq
    from qdtk.torch.capture import CaptureOptions, capture
    from qdtk.torch.evaluate import output_change_fn

    work.mkdir(parents=True, exist_ok=True)
    model = model_folder(name, work)
    stats = capture(model, None, work / "stats", CaptureOptions(n=n, L=L), progress=False)
    ckpt = Checkpoint(model)
    names = ckpt.linear_names()
    cands, weights = model_candidates(  # the pre-pass of --budget-scope model, once
        ckpt, Stats(stats), names, QuantizeOptions.of(OPTIONS),
        output_change_fn(model, **SENSITIVITY_WINDOWS)
    )
    scores = {}
    for name in names:
        W = ckpt.read(name, np.float32)
        P = prepare_hessian(
            Stats(stats).hessian(name, dim=W.shape[1])[0], OPTIONS["percdamp"], dtype=np.float32
        )
        scores[name] = abmp.group_scores(W, P.d)
    shapes = [(c.n, c.m) for c in cands]
    uniform2 = sum(
        bcq_bits(n_, m_, [2] * c.E.shape[0]) for (n_, m_), c in zip(shapes, cands, strict=True)
    ) / sum(a * b for a, b in shapes)

    def fixed(orders: dict):
        return lambda W, H, o, name, _=None: solve_daq(W, H, o, name, orders[name])

    settings = [("uniform 2", None, fixed({c.name: np.full(c.E.shape[0], 2) for c in cands}))]
    for rho in (0.05, 0.25):
        orders = {c.name: abmp.swap_orders(scores[c.name], rho) for c in cands}
        settings.append((f"swap rho={rho}", None, fixed(orders)))
    for bits in (2.0, 2.1, round(uniform2, 4)):
        layer = {c.name: abmp.allocate_layer(c, bits) for c in cands}
        settings.append((f"knapsack layer {bits:.2f}", bits, fixed(layer)))
        model_orders = dict(
            zip(
                (c.name for c in cands),
                abmp.allocate_model(cands, bits, weights=weights),
                strict=True,
            )
        )
        settings.append((f"knapsack model {bits:.2f}", bits, fixed(model_orders)))
    rows = []
    for i, (label, bits, solver) in enumerate(settings):
        for refine in refines:
            opts = {**OPTIONS, "refine": refine}  # each setting in its own folder
            label_r = label if refine == "none" else f"{label} +{refine}"
            rows.append(
                {
                    "model": name,
                    "setting": label_r,
                    "budget": bits,
                    **run_setting(model, stats, work, f"{i:02d}{refine}", solver, opts),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    gptq = run_setting(
        model,
        stats,
        work,
        "gptq",
        solve_gptq,
        {"method": "gptq", "bits": 2, "percdamp": 0.01},
    )
    rows.append({"model": name, "setting": "GPTQ 2-bit g128", "budget": None, **gptq})
    print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="minilm", help="comma list of: minilm, smollm")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_abmp"))
    ap.add_argument("-n", type=int, default=64, help="calibration sequences")
    ap.add_argument("-L", type=int, default=256, help="tokens per calibration sequence")
    ap.add_argument(
        "--refine",
        default="none,full",
        help="comma list of --refine modes to run every DAQ setting with",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, args.work / name, args.n, args.L, args.refine.split(","))
    print(
        f"\n{'model':<8} {'setting':<28} {'bits/w':>7} {'med proxy':>10} {'emb cos':>8} "
        f"{'ppl ratio':>9}"
    )
    for r in rows:
        ppl = f"{r['perplexity_ratio']:.4f}" if r["perplexity_ratio"] is not None else "-"
        print(
            f"{r['model']:<8} {r['setting']:<28} {r['bits_per_weight']:>7.4f} "
            f"{r['median_proxy_error']:>10.4g} {r['embedding_cosine']:>8.4f} {ppl:>9}"
        )


if __name__ == "__main__":
    main()
