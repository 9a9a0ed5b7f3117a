"""Quality at about 2 bits: DAQ (published and qdtk settings) vs GPTQ vs RTN, end to end.

    .venv/bin/python bench/bench_quality.py [--models minilm,smollm] [--work DIR]
        [-n 64 -L 256] [--settings NAME,...]

Per model: H is captured once on the built-in calibration text (MCS masking for MiniLM, which
has a [MASK] token; plain for the causal SmolLM2, which has none), and once on the held-out text
(masked and unmasked) to measure every layer's relative output error
tr(D H D^T)/tr(W H W^T) on held-out inputs. Each setting is quantized from the same statistics,
packed, unpacked and compared with the original on the held-out text: the mean-pooled embedding
cosine (MiniLM) or the perplexity (SmolLM2). Bits per weight are real: planes and float16 scales
(DAQ), codes and float16 scale and zero per group of 128 (GPTQ, RTN).

Settings:
    published   DAQ as published: swap rho 0.05, diagonal error feedback, no refinement
    qdtk        DAQ with qdtk's defaults (`qdtk quantize` without options)
    qdtk-plain  qdtk's defaults on H from unmasked calibration (MiniLM: does MCS matter?)
    qdtk-2.00   qdtk's defaults at a budget of exactly 2.00 real bits per weight
    gptq, rtn   the baselines, 2 bits, group 128
The published and qdtk settings use the same real budget (the cost of uniform order 2).
Timings are wall seconds of the quantize stage on this machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import model_folder, quantize_options  # noqa: E402

SETTINGS = {
    "published": {"method": "daq", "abmp": "swap", "rho": 0.05, "refine": "none",
                  "budget_scope": "layer", "feedback": "diagonal"},
    "qdtk": {"method": "daq"},
    "qdtk-plain": {"method": "daq"},
    "qdtk-2.00": {"method": "daq", "bits": 2.0},
    "gptq": {"method": "gptq", "bits": 2},
    "rtn": {"method": "rtn", "bits": 2},
}


def heldout_source(work: Path) -> Path:
    from qdtk.calib import builtin_text

    path = work / "heldout.txt"
    if not path.exists():
        path.write_text(builtin_text("heldout"))
    return path


def capture_all(model: Path, work: Path, n: int, L: int, masked: bool) -> dict[str, Path]:
    """Statistics: calibration (masked when the model can), and held-out masked / plain."""
    from qdtk.capture import CaptureOptions, capture
    from qdtk.mcs import MaskOptions

    held = heldout_source(work)
    runs = {"calib": (None, masked), "held-plain": (held, False)}
    if masked:  # a model used without masks is calibrated on plain text anyway
        runs.update({"calib-plain": (None, False), "held-masked": (held, True)})
    out = {}
    for tag, (src, mask) in runs.items():
        opts = CaptureOptions(n=n, L=L, mask=MaskOptions(mask=mask))
        out[tag] = capture(model, src, work / f"stats-{tag}", opts, progress=False)
    return out


def run_setting(model: Path, stats: dict[str, Path], work: Path, setting: str) -> dict:
    from qdtk.evaluate import compare, layer_errors
    from qdtk.pack import pack_checkpoint, unpack_checkpoint
    from qdtk.quantize import make_solver, quantize_model

    options = quantize_options(SETTINGS[setting])
    calib = stats["calib-plain"] if setting == "qdtk-plain" else stats["calib"]
    q, p, u = (work / f"{kind}-{setting}" for kind in ("quant", "packed", "dense"))
    t0 = time.perf_counter()
    report = quantize_model(model, calib, q, options, make_solver(options), progress=False)
    seconds = time.perf_counter() - t0
    pack_checkpoint(q, p, model)
    unpack_checkpoint(p, u, "float32")
    metrics = compare(model, u, n=32, L=128)["metrics"]
    row = {
        "setting": setting,
        "bits_per_weight": report["summary"]["bits_per_weight"],
        "packed_MiB": sum(f.stat().st_size for f in p.glob("*.safetensors")) / 2**20,
        "calib_median": float(np.median([r["proxy_error"] for r in report["layers"].values()])),
        "seconds": seconds,
        "embedding_cosine": metrics["embedding_cosine"]["value"],
        "perplexity": metrics.get("perplexity", {}).get("b"),
        "perplexity_fp": metrics.get("perplexity", {}).get("a"),
    }
    for tag in ("held-plain", "held-masked"):
        if tag in stats:
            row[tag] = float(np.median(list(layer_errors(model, q, stats[tag]).values())))
    return row


def print_table(name: str, rows: list[dict]) -> None:
    print(f"\n{name}")
    head = (f"{'setting':<11} {'bits/w':>7} {'MiB':>6} {'calib err':>9} {'held err':>9} "
            f"{'held-mask':>9} {'emb cos':>8} {'ppl':>10} {'quant s':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ppl = f"{r['perplexity']:.4g}" if r.get("perplexity") else "-"
        masked = f"{r['held-masked']:.4f}" if "held-masked" in r else "-"
        print(f"{r['setting']:<11} {r['bits_per_weight']:>7.4f} {r['packed_MiB']:>6.1f} "
              f"{r['calib_median']:>9.4f} {r['held-plain']:>9.4f} {masked:>9} "
              f"{r['embedding_cosine']:>8.4f} {ppl:>10} {r['seconds']:>8.1f}")
    fp = rows[0].get("perplexity_fp")
    if fp:
        print(f"(original perplexity {fp:.4g})")
    print("calib/held err: median over layers of tr(D H D^T)/tr(W H W^T) on calibration and "
          "held-out inputs (held-mask: held-out inputs with MCS masking)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="minilm,smollm")
    ap.add_argument("--settings", default="published,qdtk,qdtk-plain,gptq,rtn")
    ap.add_argument("--work", type=Path, default=Path("runs/bench_quality"))
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("-L", type=int, default=256)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for name in args.models.split(","):
        work = args.work / name
        work.mkdir(parents=True, exist_ok=True)
        model = model_folder(name, work)
        masked = name == "minilm"
        stats = capture_all(model, work, args.n, args.L, masked)
        settings = [s for s in args.settings.split(",") if masked or s != "qdtk-plain"]
        rows = [run_setting(model, stats, work, s) for s in settings]
        (work / "results.json").write_text(json.dumps(rows, indent=2))
        print_table(name, rows)


if __name__ == "__main__":
    main()
