"""Wall time of the quantize stage's solves, serial vs `--cluster ray` with local Ray workers.

    .venv/bin/python bench/bench_cluster.py [--workers 2] [--cases minilm,rtn,llada]
        [--work DIR] [--repeat 1]

Cases (the statistics are made once and kept in --work):
    minilm  all-MiniLM-L6-v2 (36 Linears), H from the built-in calibration text (-n 64 -L 256,
            as `qdtk run`), qdtk's defaults; the model-scope pre-pass runs once beforehand and
            its OUT/orders.json is reused by every timed run (it stays serial; timed apart)
    rtn     the same 36 Linears with --method rtn: almost no work per layer, so the difference
            to the serial run is what Ray adds per task (submission, a worker opening the
            checkpoint and statistics, shipping the result back)
    llada   one LLaDA-8B-shaped block (q, k, v, attn_out 4096x4096; ff_proj, up_proj
            12288x4096; ff_out 4096x12288) with random weights and low-rank random H,
            --abmp none --refine none (the README's DAQ speed table)

The serial run uses every core through its threads; each Ray task reserves one CPU (so with 2
workers on 2 cores both runs use the whole machine). Starting the local cluster is timed apart:
a user's cluster is already running. Timings are noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

# isort: off
import qdtk  # noqa: F401  (first: it sets OPENBLAS_THREAD_TIMEOUT before NumPy loads OpenBLAS)
import numpy as np

# isort: on

sys.path.insert(0, str(Path(__file__).parent))
from bench_quality import SETTINGS  # noqa: E402
from common import best, minilm, quantize_options  # noqa: E402

from qdtk.formats.io import read_json  # noqa: E402
from qdtk.options import QuantizeOptions  # noqa: E402
from qdtk.quantize import quantize_model  # noqa: E402

LLADA = {  # weight: (rows, columns, input key); q, k, v and ff_proj, up_proj share an input
    "q_proj": (4096, 4096, "attn"), "k_proj": (4096, 4096, "attn"),
    "v_proj": (4096, 4096, "attn"), "attn_out": (4096, 4096, "attn_out"),
    "ff_proj": (12288, 4096, "ff"), "up_proj": (12288, 4096, "ff"),
    "ff_out": (4096, 12288, "ff_out"),
}
LLADA_OPTIONS = {"method": "daq", "bits": 2, "abmp": "none", "feedback": "block",
                 "refine": "none", "backend": "cpu"}


def minilm_stats(work: Path) -> tuple[Path, Path]:
    from qdtk.torch.capture import CaptureOptions, capture

    model = minilm()
    stats = capture(model, "builtin", work / "minilm-stats", CaptureOptions(n=64, L=256),
                    progress=False)
    return model, stats


def llada_block(work: Path, tokens: int = 1024) -> tuple[Path, Path]:
    """One LLaDA-shaped block: W ~ N(0, 0.02^2), H = (2/T) X^T X of T random correlated rows."""
    from qdtk.formats.checkpoint import Checkpoint, CheckpointWriter
    from qdtk.formats.stats import InputStat, StatsWriter

    model, stats = work / "llada-block", work / "llada-stats"
    if (stats / "manifest.json").exists():
        return model, stats
    rng = np.random.default_rng(0)
    prefix = "model.transformer.blocks.0"
    with CheckpointWriter(model) as w:
        for name, (n, m, _) in LLADA.items():
            W = (0.02 * rng.standard_normal((n, m))).astype(np.float32)
            w.add(f"{prefix}.{name}.weight", W)
    writer = StatsWriter(stats, str(model), Checkpoint(model).fingerprint(), {"bench": "llada"})
    inputs = []
    for key in dict.fromkeys(k for _, _, k in LLADA.values()):
        m = next(m for _, m, k in LLADA.values() if k == key)
        X = rng.standard_normal((tokens, m), dtype=np.float32)
        X += rng.standard_normal((tokens, 1), dtype=np.float32)  # a shared direction
        members = [f"{prefix}.{name}.weight" for name, (*_, k) in LLADA.items() if k == key]
        inputs.append(InputStat(f"{prefix}.{key}", members, (2.0 / tokens) * (X.T @ X), tokens))
    writer.write_block(0, prefix, inputs)
    writer.finish()
    return model, stats


def timed(model: Path, stats: Path, out: Path, options: dict, repeat: int) -> float:
    """Best wall seconds of the stage into `out`, redoing every solve (orders.json is kept)."""

    def once():
        for p in [*out.glob("block_*.safetensors"), out / "report.json"]:
            p.unlink(missing_ok=True)
        quantize_model(model, stats, out, options, progress=False)

    return best(once, repeat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cases", default="minilm,rtn,llada")
    ap.add_argument("--work", type=Path, default=Path("runs/bench_cluster"))
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    args.work.mkdir(parents=True, exist_ok=True)
    cases = args.cases.split(",")
    data = {}
    if {"minilm", "rtn"} & set(cases):
        data["minilm"] = data["rtn"] = minilm_stats(args.work)
    if "llada" in cases:
        data["llada"] = llada_block(args.work)
    options = {"minilm": quantize_options(SETTINGS["qdtk"]),
               "rtn": quantize_options(SETTINGS["rtn"]), "llada": QuantizeOptions.of(LLADA_OPTIONS)}
    rows = []
    for case in cases:
        model, stats = data[case]
        out = args.work / f"quant-{case}"
        prepass = None
        if options[case].model_scope:  # compute OUT/orders.json once
            t = time.perf_counter()
            quantize_model(model, stats, out, options[case], progress=False)
            prepass = time.perf_counter() - t
        serial = timed(model, stats, out, options[case], args.repeat)
        if prepass is not None:
            prepass -= serial
        t = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        start = time.perf_counter() - t
        cluster = replace(options[case], cluster="ray", num_cpus=1)
        on_ray = timed(model, stats, out, cluster, args.repeat)
        ray.shutdown()
        report = read_json(out / "report.json")  # of the Ray run
        busy = report["summary"]["seconds"]  # the tasks' own seconds, added up
        rows.append((case, len(report["layers"]), prepass, serial, on_ray, busy, start))
        print(f"{case}: serial {serial:.1f} s, ray {on_ray:.1f} s", file=sys.stderr)
    print(f"\nquantize stage, wall seconds; Ray: {args.workers} local workers, 1 CPU per task")
    print("(pre-pass: the model-scope allocation, serial, before both; busy: the Ray tasks' "
          "seconds added up; s/task: rtn's added wall seconds per task, its solves being "
          "almost free)")
    print(f"{'case':<8} {'layers':>6} {'pre-pass':>8} {'serial':>8} {'ray':>8} {'speedup':>8} "
          f"{'busy':>8} {'s/task':>7} {'ray start':>9}")
    for case, layers, prepass, serial, on_ray, busy, start in rows:
        pre = "-" if prepass is None else f"{prepass:.1f}"
        per_task = f"{(on_ray - serial) / layers:.3f}" if case == "rtn" else "-"
        print(f"{case:<8} {layers:>6} {pre:>8} {serial:>8.2f} {on_ray:>8.2f} "
              f"{serial / on_ray:>7.2f}x {busy:>8.2f} {per_task:>7} {start:>9.1f}")

if __name__ == "__main__":
    main()
