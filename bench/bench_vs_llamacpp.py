"""qdtk against llama.cpp's 2-bit types, layer by layer, on SmolLM2-135M's ffn_down Linears.

    .venv/bin/python bench/bench_vs_llamacpp.py [--llama-quantize PATH] [--work DIR]
        [-n 32 -L 256] [--layers 0,3,6,...] [--settings NAME,...]

llama.cpp's IQ2_XS (2.3125 bits per weight, E8-lattice codebook) and IQ2_XXS (2.0625) need rows
that are multiples of 256: of SmolLM2's Linears only ffn_down (576 x 1536) qualifies, so the
table is over those (`--tensor-type ffn_down=TYPE`, every ffn_down at the type). Both sides see
the same calibration: H = (2/T) sum x x^T is captured on the built-in calibration text (plain,
SmolLM2 is causal), and llama.cpp's importance matrix is its diagonal, mean x^2 per input
column (what llama-imatrix computes), written in llama.cpp's legacy imatrix format. llama.cpp
requantizes the packaged Q4_1 GGUF (--allow-requantize): its input is the same dequantized W
that qdtk quantizes; its result is read back and dequantized with the gguf package.

Each method's error per layer is tr(D H D^T) / tr(W H W^T), D = W - What, on H from the
calibration text and from the held-out part of every built-in source (qdtk.formats.calib); the table
is the median over the layers. llama.cpp's quantizer (llama-quantize) builds from the
llama-cpp-python source distribution, which vendors llama.cpp:

    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp && cmake -B build -DLLAMA_CURL=OFF \\
        -DBUILD_SHARED_LIBS=OFF && cmake --build build --target llama-quantize -j 2

and is found through --llama-quantize, $LLAMA_QUANTIZE or PATH; without it the llama.cpp rows
are skipped with a message. Settings (qdtk ones are `qdtk quantize` options on one layer,
--budget-scope layer, whose defaults rotate ffn_down's inputs (`--rotate hadamard`, the random
Hadamard rotation of the input dimension); "unrotated" and the variants of it add `--rotate
none`):
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    calibration_source,
    model_folder,
    quantize_options,
    smollm_gguf,
)

LAYER = "model.layers.{}.mlp.down_proj.weight"
GGUF_LAYER = "blk.{}.ffn_down.weight"
N_LAYERS = 30
LLAMA_TYPES = {"iq2_xs": "IQ2_XS", "iq2_xxs": "IQ2_XXS"}
QDTK = {"budget_scope": "layer"}  # a layer's own budget: the cost of uniform order 2
PLAIN = {**QDTK, "rotate": "none"}  # in the input basis as given
SETTINGS = {
    "qdtk": {**QDTK},  # qdtk's defaults (--shrink 0.25, ffn_down rotated)
    "unrotated": {**PLAIN},  # the defaults before the rotation
    "shrink-0": {**PLAIN, "shrink": 0.0},
    "shrink-0.1": {**PLAIN, "shrink": 0.1},
    "shrink-0.5": {**PLAIN, "shrink": 0.5},
    "shrink-0.75": {**PLAIN, "shrink": 0.75},
    "refine-none-shrink-0": {**PLAIN, "refine": "none", "shrink": 0.0},
    "refine-none": {**PLAIN, "refine": "none"},
    "published": {"abmp": "swap", "rho": 0.05, "refine": "none", "budget_scope": "layer",
                  "feedback": "diagonal", "shrink": 0.0, "rotate": "none"},
    "no-compensation": {**PLAIN, "refine": "none", "no_compensation": True, "shrink": 0.0},
    "percdamp-0.1": {**PLAIN, "percdamp": 0.1, "shrink": 0.0},
    "rotated-shrink-0": {**QDTK, "shrink": 0.0, "rotate": "hadamard"},
    "rotated": {**QDTK, "rotate": "hadamard"},
    "rotated-refine-none": {**QDTK, "refine": "none", "rotate": "hadamard"},
}
__doc__ += "".join(f"    {k:<21} {v}\n" for k, v in SETTINGS.items())
DEFAULT_SETTINGS = "iq2_xs,iq2_xxs,qdtk,unrotated,rotated-refine-none,refine-none,published"


def find_llama_quantize(given: str | None) -> Path | None:
    for c in (given, os.environ.get("LLAMA_QUANTIZE"), shutil.which("llama-quantize")):
        if c and Path(c).is_file():
            return Path(c)
    return None


def write_imatrix(path: Path, diagonals: dict[str, np.ndarray], dataset: str) -> None:
    """llama.cpp's legacy imatrix file: per tensor its name, ncall, nval and the float32
    importances (mean x^2 per input column; ncall 1 so they are read as they are)."""
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(diagonals)))
        for name, values in diagonals.items():
            raw = name.encode()
            f.write(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", 1, len(values)))
            f.write(np.asarray(values, "<f4").tobytes())
        f.write(struct.pack("<i", 1) + struct.pack("<i", len(dataset)) + dataset.encode())


def llamacpp_layers(exe: Path, imatrix: Path, qtype: str, work: Path, layers: list[int]
                    ) -> dict[int, np.ndarray]:
    """Every ffn_down quantized by llama-quantize at `qtype`, read back dequantized [n, m]."""
    import hashlib

    from gguf import GGUFReader
    from gguf.quants import dequantize

    # named by the importance matrix it was quantized with: a new calibration requantizes
    key = hashlib.sha256(imatrix.read_bytes()).hexdigest()[:12]
    out = work / f"smollm-{qtype}-{key}.gguf"
    if not out.exists():
        cmd = [str(exe), "--allow-requantize", "--imatrix", str(imatrix), "--tensor-type",
               f"ffn_down={qtype}", str(smollm_gguf()), str(out), "Q8_0", "1"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"llama-quantize failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    tensors = {t.name: t for t in GGUFReader(out).tensors}
    result = {}
    for i in layers:
        t = tensors[GGUF_LAYER.format(i)]
        if t.tensor_type.name != LLAMA_TYPES[qtype]:
            raise SystemExit(f"{out}: {t.name} is {t.tensor_type.name}, not {qtype}")
        result[i] = dequantize(t.data, t.tensor_type).reshape(576, 1536).astype(np.float32)
    return result


def qdtk_layer(W: np.ndarray, H: np.ndarray, setting: str) -> tuple[np.ndarray, float]:
    """(What [n, m] in the model's basis, bits per weight) of one setting."""
    from qdtk.solve.solvers import make_solver

    options = quantize_options(SETTINGS[setting])
    layer, rep = make_solver(options)(W, H, options, name=setting)
    return layer.weight(), rep["bits_per_weight"]


def capture_stats(model: Path, work: Path, calib: str, n: int, L: int) -> dict[str, Path]:
    """Plain statistics on the calibration text and on each built-in held-out text."""
    from qdtk.formats.calib import EVAL_SOURCES, builtin_text
    from qdtk.math.mcs import MaskOptions
    from qdtk.torch.capture import CaptureOptions, capture

    sources: dict[str, str | None] = {"calib": calibration_source(calib, work)}
    for s in EVAL_SOURCES:
        path = work / f"heldout-{s}.txt"
        path.write_text(builtin_text("heldout", s))
        sources[s] = str(path)
    opts = CaptureOptions(n=n, L=L, mask=MaskOptions(mask=False))
    return {tag: capture(model, src, work / f"stats-{tag}", opts, progress=False)
            for tag, src in sources.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-quantize", default=None)
    ap.add_argument("--work", type=Path, default=Path("runs/bench_vs_llamacpp"))
    ap.add_argument("--calib", default="builtin",
                    help="calibration source, or mix:A,B for a mix of built-in sources")
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("-L", type=int, default=256)
    ap.add_argument("--layers", default=",".join(map(str, range(N_LAYERS))))
    ap.add_argument("--settings", default=DEFAULT_SETTINGS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from qdtk.formats.checkpoint import Checkpoint
    from qdtk.formats.stats import Stats
    from qdtk.math.forms import proxy_error

    calib_tag = "" if args.calib == "builtin" else args.calib.replace("/", "_") + "-"
    work = args.work / f"{calib_tag}n{args.n}-L{args.L}"
    work.mkdir(parents=True, exist_ok=True)
    model = model_folder("smollm", args.work)
    captured = capture_stats(model, work, args.calib, args.n, args.L)
    stats = {tag: Stats(p) for tag, p in captured.items()}
    layers = [int(i) for i in args.layers.split(",")]
    ckpt = Checkpoint(model)
    W = {i: ckpt.read(LAYER.format(i), np.float32) for i in layers}
    H = {tag: {i: s.hessian(LAYER.format(i), 1536)[0] for i in layers} for tag, s in stats.items()}

    settings = args.settings.split(",")
    exe = find_llama_quantize(args.llama_quantize)
    if exe is None and any(s in LLAMA_TYPES for s in settings):
        print("llama.cpp rows skipped: llama-quantize not found (--llama-quantize, "
              "$LLAMA_QUANTIZE or PATH; see this script's docstring to build it)")
        settings = [s for s in settings if s not in LLAMA_TYPES]
    if exe is not None:
        imatrix = work / "imatrix.dat"
        write_imatrix(imatrix, {GGUF_LAYER.format(i): np.diag(H["calib"][i]) / 2
                                for i in layers}, "qdtk builtin calibration")

    tags = list(H)
    print(f"\nSmolLM2-135M ffn_down (576 x 1536), {len(layers)} layers; H from {args.n} windows "
          f"of {args.L} tokens per text; calibration {args.calib}")
    head = f"{'method':<21} {'bits/w':>7} " + " ".join(f"{t:>10}" for t in tags)
    print(head + "\n" + "-" * len(head))
    for s in settings:
        if s in LLAMA_TYPES:
            What = llamacpp_layers(exe, imatrix, s, work, layers)
            bits = {"iq2_xs": 2.3125, "iq2_xxs": 2.0625}[s]
        else:
            solved = {i: qdtk_layer(W[i], H["calib"][i], s) for i in layers}
            What = {i: v[0] for i, v in solved.items()}
            bits = float(np.mean([v[1] for v in solved.values()]))
        med = [np.median([proxy_error(W[i], What[i], H[t][i]) for i in layers]) for t in tags]
        print(f"{s:<21} {bits:>7.4f} " + " ".join(f"{e:>10.4f}" for e in med), flush=True)
    print("median over layers of tr(D H D^T)/tr(W H W^T); calib: H from the calibration text "
          "(what every method fitted), the others: H from that source's held-out text")


if __name__ == "__main__":
    main()
