"""Quality at about 2 bits: DAQ (published and qdtk settings) vs GPTQ vs RTN, end to end, on
every built-in held-out text.

    .venv/bin/python bench/bench_quality.py [--models minilm,smollm] [--work DIR]
        [-n 64 -L 256] [--settings NAME,...] [--calib SRC] [--extra KEY=VALUE,...]

Per model: H is captured once on the calibration text (--calib, default the built-in mix; MCS
masking for MiniLM, which has a [MASK] token; plain for the causal SmolLM2, which has none),
and once on the held-out part of every built-in source (qdtk.formats.calib: pydoc, docstrings,
manpages; plain, and masked for pydoc) to measure every layer's relative output error
tr(D H D^T)/tr(W H W^T) on held-out inputs. Each setting is quantized from the same statistics,
packed, unpacked and compared with the original on every held-out text: the mean-pooled
embedding cosine (MiniLM) or the perplexity (SmolLM2). Bits per weight are real: planes and
float16 scales (DAQ), codes and float16 scale and zero per group of 128 (GPTQ, RTN).

Settings:
    published   DAQ as published: swap rho 0.05, diagonal error feedback, no refinement, no
                shrinkage of H, no rotation
    qdtk        DAQ with qdtk's defaults (`qdtk quantize` without options)
    qdtk-unrotated  the same with `--rotate none` (the defaults before the rotation)
    qdtk-plain  qdtk's defaults on H from unmasked calibration (MiniLM: does MCS matter?)
    qdtk-2.00   qdtk's defaults at a budget of exactly 2.00 real bits per weight
    gptq, rtn   the baselines, 2 bits, group 128
The published and qdtk settings use the same real budget (the cost of uniform order 2).
--extra adds quantize options to the qdtk settings (e.g. shrink=0.25), to measure a lever.
Timings are wall seconds of the quantize stage on this machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import calibration_source, model_folder, quantize_options  # noqa: E402

from qdtk.formats.calib import EVAL_SOURCES, PREFIX  # noqa: E402

SETTINGS = {
    "published": {"method": "daq", "abmp": "swap", "rho": 0.05, "refine": "none",
                  "budget_scope": "layer", "feedback": "diagonal", "shrink": 0.0,
                  "rotate": "none"},
    "qdtk": {"method": "daq"},
    "qdtk-unrotated": {"method": "daq", "rotate": "none"},
    "qdtk-plain": {"method": "daq"},
    "qdtk-2.00": {"method": "daq", "bits": 2.0},
    "gptq": {"method": "gptq", "bits": 2},
    "rtn": {"method": "rtn", "bits": 2},
}


def heldout_source(work: Path, source: str) -> Path:
    from qdtk.formats.calib import builtin_text

    path = work / f"heldout-{source}.txt"
    if not path.exists():
        path.write_text(builtin_text("heldout", source))
    return path


def capture_all(model: Path, work: Path, calib: str, n: int, L: int, masked: bool
                ) -> dict[str, Path]:
    """Statistics: calibration (masked when the model can), held-out plain per source and
    held-out masked (pydoc)."""
    from qdtk.math.mcs import MaskOptions
    from qdtk.torch.capture import CaptureOptions, capture

    calib = calibration_source(calib, work)
    runs = {"calib": (calib, masked)}
    runs.update({f"held-{s}": (heldout_source(work, s), False) for s in EVAL_SOURCES})
    if masked:  # a model used without masks is calibrated on plain text anyway
        runs.update({"calib-plain": (calib, False),
                     "held-masked": (heldout_source(work, "pydoc"), True)})
    out = {}
    for tag, (src, mask) in runs.items():
        opts = CaptureOptions(n=n, L=L, mask=MaskOptions(mask=mask))
        out[tag] = capture(model, src, work / f"stats-{tag}", opts, progress=False)
    return out


def run_setting(model: Path, stats: dict[str, Path], work: Path, setting: str, extra: dict
                ) -> dict:
    from qdtk.pack import pack_checkpoint, unpack_checkpoint
    from qdtk.quantize import quantize_model
    from qdtk.solve.solvers import make_solver
    from qdtk.torch.evaluate import compare_texts, layer_errors, read_text

    over = SETTINGS[setting]
    options = quantize_options({**over, **(extra if over["method"] == "daq" else {})})
    calib = stats["calib-plain"] if setting == "qdtk-plain" else stats["calib"]
    q, p, u = (work / f"{kind}-{setting}" for kind in ("quant", "packed", "dense"))
    t0 = time.perf_counter()
    report = quantize_model(model, calib, q, options, make_solver(options), progress=False)
    seconds = time.perf_counter() - t0
    pack_checkpoint(q, p, model)
    unpack_checkpoint(p, u, "float32")
    texts = {s: read_text(PREFIX + s) for s in EVAL_SOURCES}
    sources = compare_texts(model, u, texts, n=32, L=128)["sources"]
    row = {
        "setting": setting,
        "bits_per_weight": report["summary"]["bits_per_weight"],
        "packed_MiB": sum(f.stat().st_size for f in p.glob("*.safetensors")) / 2**20,
        "calib_median": float(np.median([r["proxy_error"] for r in report["layers"].values()])),
        "seconds": seconds,
        "embedding_cosine": {s: m["embedding_cosine"]["value"] for s, m in sources.items()},
        "perplexity": {s: m["perplexity"]["b"] for s, m in sources.items() if "perplexity" in m},
        "perplexity_fp": {s: m["perplexity"]["a"] for s, m in sources.items()
                          if "perplexity" in m},
        "held_err": {},
    }
    for tag in stats:
        if tag.startswith("held-"):
            errors = layer_errors(model, q, stats[tag]).values()
            row["held_err"][tag[len("held-"):]] = float(np.median(list(errors)))
    return row


def print_table(name: str, rows: list[dict], calib: str) -> None:
    cols = list(rows[0]["held_err"])
    metric = "ppl" if rows[0]["perplexity"] else "emb cos"
    print(f"\n{name}, calibration {calib}")
    head = (f"{'setting':<11} {'bits/w':>7} {'calib err':>9} "
            + " ".join(f"{'err ' + c[:6]:>11}" for c in cols) + " "
            + " ".join(f"{metric + ' ' + s[:6]:>14}" for s in EVAL_SOURCES) + f" {'quant s':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        values = r["perplexity"] or r["embedding_cosine"]
        cells = [f"{values[s]:.4g}" if r["perplexity"] else f"{values[s]:.4f}"
                 for s in EVAL_SOURCES]
        print(f"{r['setting']:<11} {r['bits_per_weight']:>7.4f} {r['calib_median']:>9.4f} "
              + " ".join(f"{r['held_err'][c]:>11.4f}" for c in cols) + " "
              + " ".join(f"{c:>14}" for c in cells) + f" {r['seconds']:>8.1f}")
    fp = rows[0]["perplexity_fp"]
    if fp:
        print("original perplexity " + ", ".join(f"{s} {v:.4g}" for s, v in fp.items()))
    print("calib/err SOURCE: median over layers of tr(D H D^T)/tr(W H W^T) on calibration and "
          "held-out inputs (masked: held-out pydoc with MCS masking)")


def parse_extra(text: str) -> dict:
    """KEY=VALUE,... -> quantize option overrides (whole numbers as ints, other numbers as
    floats; A+B+... a list)."""
    out: dict = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        try:
            out[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            out[key] = tuple(value.split("+")) if "+" in value or key == "rotate_exclude" \
                else value
    return out


def extra_tag(extra: dict) -> str:
    """A folder name for the overrides."""
    parts = [f"{k}{v:g}" if isinstance(v, float) else
             f"{k}{'+'.join(v) if isinstance(v, tuple) else v}" for k, v in extra.items()]
    return re.sub(r"[^A-Za-z0-9_.+=-]", "_", "-".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="minilm,smollm")
    ap.add_argument("--settings", default="published,qdtk,qdtk-plain,gptq,rtn")
    ap.add_argument("--work", type=Path, default=Path("runs/bench_quality"))
    ap.add_argument("--calib", default="builtin",
                    help="calibration source, or mix:A,B for a mix of built-in sources")
    ap.add_argument("--extra", default="", help="quantize options for the qdtk settings")
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("-L", type=int, default=256)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    extra = parse_extra(args.extra)
    for name in args.models.split(","):
        work = args.work / name / f"{args.calib.replace('/', '_')}-n{args.n}-L{args.L}"
        work.mkdir(parents=True, exist_ok=True)
        model = model_folder(name, args.work / name)
        masked = name == "minilm"
        stats = capture_all(model, work, args.calib, args.n, args.L, masked)
        settings = [s for s in args.settings.split(",") if masked or s != "qdtk-plain"]
        tag = extra_tag(extra)
        out = work / tag if tag else work
        out.mkdir(exist_ok=True)
        rows = [run_setting(model, stats, out, s, extra) for s in settings]
        (work / f"results{'-' + tag if tag else ''}.json").write_text(json.dumps(rows, indent=2))
        print_table(name + (f" ({args.extra})" if extra else ""), rows, args.calib)


if __name__ == "__main__":
    main()
