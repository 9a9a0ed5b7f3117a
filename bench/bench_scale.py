"""The quantize stage at LLaDA-8B and Dream-7B scale: one transformer block of each shape, every
stage timed for each setting, projected to the whole model.

Blocks (rows x input columns of each Linear; Linears reading one input share its H):
  llada   q, k, v, attn_out 4096x4096; ff_proj, up_proj 12288x4096; ff_out 4096x12288 (x32)
  dream   q, o 3584x3584; k, v 512x3584; gate, up 18944x3584; down 3584x18944 (x28)
  bert4k  six 4096x4096 (the shape of the issue's measurement; x1)
W is Gaussian / sqrt(m); H = (2/T) X^T X of T correlated activations X = Z A (a decaying
spectrum, eight outlier channels twenty times larger), T = --tokens (2048 = -n 8 -L 256).

Settings (the options of `qdtk quantize` beside its defaults, budget per layer: the model-scope
pre-pass's forwards need a model and are timed by --forwards; unrotated, --rotate none, as the
blocks are random; the defaults: knapsack orders, block feedback, --iters 5, --group-refine 1,
--refine signs, four passes):
  published  --abmp swap --rho 0.05 --bits 2 --feedback diagonal --refine none --shrink 0
             --iters 15
  none       --refine none --group-refine 0 (knapsack orders and block feedback only)
  rows       --refine rows --group-refine 0
  full       --refine full --group-refine 0 --iters 15 (the default until session 6)
  full2      --refine full --refine-rounds 2 --group-refine 0
  group      --refine none (the group refinement in the sweep alone)
  signs2     --refine-rounds 2 (two sign passes instead of four)
  iters15    --iters 15 (the DAQ solver's published iterations)
  cand1      --candidate-iters 1 (the knapsack's candidates at one DAQ iteration)
  default    the defaults
Per layer: orders (ABMP: the knapsack's per-order group solves), factor (Cholesky of H), sweep
(block solves + compensation), refine, error (proxy error), pack (bit packing), the process CPU
seconds, and the peak NumPy memory (tracemalloc). Wall seconds are noisy on a shared machine;
CPU seconds less so. Where CuPy sees a GPU (qdtk.backend.gpu_available), every layer is also
solved with --backend cuda (sweep and refinement on the GPU) and the table's GPU column gives
that block's wall seconds; without one it says "not measured".

    .venv/bin/python bench/bench_scale.py [--blocks llada,dream] [--settings published,full]
        [--all-layers] [--forwards] [--roles ff_out]

By default only the first Linear of each distinct shape is timed and the block is projected
from them (each shape's layers cost alike); --all-layers times every one. --forwards also
times a forward of one LLaDA-shaped block on 8 x 128 tokens in torch (the model-scope pre-pass
runs, per Linear, the blocks from its own onward: half the model on average) and projects the
pre-pass of each model.
"""

from __future__ import annotations

# isort: off
import qdtk  # noqa: F401  (first: it sets OpenBLAS's thread policy before NumPy loads it)
# isort: on

import argparse
import sys
import time
import tracemalloc
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import quantize_options  # noqa: E402

from qdtk.backend import gpu_available
from qdtk.formats.packed import pack_layer
from qdtk.options import QuantizeOptions
from qdtk.solve.solvers import solve_daq

# name -> ([(role, n, m, input)], blocks in the model)
BLOCKS = {
    "llada": ([("q/k/v", 4096, 4096, "attn"), ("q/k/v", 4096, 4096, "attn"),
               ("q/k/v", 4096, 4096, "attn"), ("attn_out", 4096, 4096, "out"),
               ("ff/up", 12288, 4096, "ff"), ("ff/up", 12288, 4096, "ff"),
               ("ff_out", 4096, 12288, "down")], 32),
    "dream": ([("q", 3584, 3584, "attn"), ("k/v", 512, 3584, "attn"), ("k/v", 512, 3584, "attn"),
               ("o", 3584, 3584, "out"), ("gate/up", 18944, 3584, "ff"),
               ("gate/up", 18944, 3584, "ff"), ("down", 3584, 18944, "down")], 28),
    "bert4k": ([("linear", 4096, 4096, f"x{i}") for i in range(6)], 1),
}
SETTINGS = {
    "published": {"abmp": "swap", "rho": 0.05, "bits": 2, "feedback": "diagonal",
                  "refine": "none", "shrink": 0.0, "iters": 15},
    "none": {"refine": "none", "group_refine": 0},
    "rows": {"refine": "rows", "group_refine": 0},
    "full": {"refine": "full", "group_refine": 0, "iters": 15},  # the default until session 6
    "full2": {"refine": "full", "refine_rounds": 2, "group_refine": 0},
    "group": {"refine": "none"},
    "signs2": {"refine": "signs", "refine_rounds": 2},
    "iters15": {"iters": 15},
    "cand1": {"candidate_iters": 1},  # the knapsack's candidates at one DAQ iteration
    "default": {},
}
# the CLI's defaults (qdtk quantize without options), unrotated, budget per layer
BASE = quantize_options({"rotate": "none", "budget_scope": "layer", "backend": "cpu"})
PARTS = ("orders", "factor", "sweep", "refine", "error", "pack")


def activations_H(rng: np.random.Generator, m: int, T: int) -> np.ndarray:
    """(2/T) X^T X [m, m] float64 of correlated activations X [T, m] with outlier channels."""
    A = rng.standard_normal((m, m), dtype=np.float32) / np.sqrt(m)
    Z = rng.standard_normal((T, m), dtype=np.float32)
    Z *= np.exp(-np.arange(m, dtype=np.float32) / (m / 8))  # decaying spectrum
    X = Z @ A
    X[:, rng.choice(m, 8, replace=False)] *= 20
    return (2.0 / T) * (X.T.astype(np.float64) @ X)


def time_layer(W: np.ndarray, H: np.ndarray, options: QuantizeOptions, name: str = "layer"
               ) -> dict:
    tracemalloc.start()
    cpu, wall = time.process_time(), time.perf_counter()
    layer, rep = solve_daq(W, H, QuantizeOptions.of(options), name)
    t = time.perf_counter()
    pack_layer(layer)
    parts = {"factor": rep["seconds_factor"], "sweep": rep["seconds_sweep"],
             "refine": rep["seconds_refine"], "error": rep["seconds_error"],
             "pack": time.perf_counter() - t}
    parts["orders"] = max(rep["seconds"] - sum(v for k, v in parts.items() if k != "pack"), 0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {**parts, "wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu,
            "peak": peak, "proxy": rep["proxy_error"], "bits": rep["bits_per_weight"],
            "weights": W.size}


def capture_seconds_per_token(tokens: int = 1024) -> tuple[float, float]:
    """(forward, statistics) seconds per token of capturing one LLaDA-8B-shaped block: its
    forward, and the float64 X^T X sums of its four inputs (hidden 4096 x 3, intermediate
    12288), as qdtk.torch.capture.add_xtx accumulates them."""
    import torch

    from qdtk.torch.capture import add_xtx

    forward = block_forward_seconds(tokens)
    t = time.perf_counter()
    for m in (4096, 4096, 12288):  # attention and ff inputs, attn_out's, ff_out's
        add_xtx(None, torch.randn(tokens, m))
    return forward / tokens, (time.perf_counter() - t) / tokens


def block_forward_seconds(tokens: int = 1024) -> float:
    """Seconds of one LLaDA-8B-shaped block (qdtk's native forward, float32) on `tokens`."""
    import torch

    from qdtk.torch.models.layers import NativeConfig, rotary_tables
    from qdtk.torch.models.llada import LLaDABlock

    c = NativeConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32,
                     intermediate_size=12288, eps=1e-5, norm_bias=False, qkv_bias=False,
                     include_bias=False)
    block = LLaDABlock(c).eval()
    x = torch.randn(tokens // 128, 128, 4096)
    rope = rotary_tables(torch.arange(128)[None], 128, 500000.0)
    with torch.inference_mode():
        block(x, rope)
        t = time.perf_counter()
        block(x, rope)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", default="llada,dream")
    ap.add_argument("--settings", default="published,full,default")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--all-layers", action="store_true",
                    help="time every Linear (default: the first of each distinct shape)")
    ap.add_argument("--forwards", action="store_true")
    ap.add_argument("--roles", default="",
                    help="time only these Linears (e.g. ff_out); no block totals then")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    gpu = gpu_available()
    # compile the kernels outside the timings
    for dev in ("cpu", "cuda") if gpu else ("cpu",):
        for warm in ("full", "default"):
            solve_daq(rng.standard_normal((8, 256)).astype(np.float32), np.eye(256),
                      replace(BASE, **SETTINGS[warm], backend=dev))
    rows = []
    for block in args.blocks.split(","):
        linears, count = BLOCKS[block]
        if args.all_layers:
            chosen = linears
        else:  # the first Linear of each distinct shape
            chosen = list({(n, m): (role, n, m, inp) for role, n, m, inp in reversed(linears)}
                          .values())[::-1]
        if args.roles:
            chosen = [c for c in chosen if c[0] in args.roles.split(",")]
        Hs = {}
        for setting in args.settings.split(","):
            per_shape: dict[tuple, dict] = {}
            gpu_wall: dict[tuple, float] = {}
            for role, n, m, inp in chosen:
                if inp not in Hs:
                    Hs[inp] = activations_H(np.random.default_rng(zlib.crc32(inp.encode())), m,
                                            args.tokens)
                W = (np.random.default_rng(n * m).standard_normal((n, m), dtype=np.float32)
                     / np.sqrt(m))
                r = time_layer(W, Hs[inp], replace(BASE, **SETTINGS[setting]), role)
                per_shape.setdefault((n, m), r)
                print(f"  {block:6} {setting:9} {role:8} {n}x{m}: wall {r['wall']:.1f} s, "
                      f"cpu {r['cpu']:.1f} s, refine {r['refine']:.1f} s, proxy "
                      f"{r['proxy']:.5f}, peak {r['peak'] / 2**20:,.0f} MiB", flush=True)
                if gpu:
                    g = time_layer(W, Hs[inp], replace(BASE, **SETTINGS[setting], backend="cuda"),
                                   role)
                    gpu_wall.setdefault((n, m), g["wall"])
                    print(f"  {'':6} {'':9} {'':8} on the GPU: wall {g['wall']:.1f} s, refine "
                          f"{g['refine']:.1f} s, proxy {g['proxy']:.5f}", flush=True)
            if args.roles:
                continue
            # the block: every Linear costs as the measured one of its shape
            total = {k: sum(per_shape[(n, m)][k] for _, n, m, _ in linears)
                     for k in (*PARTS, "wall", "cpu")}
            proxies = [per_shape[(n, m)]["proxy"] for _, n, m, _ in linears]
            weights = sum(n * m for _, n, m, _ in linears)
            bits = sum(per_shape[(n, m)]["bits"] * n * m for _, n, m, _ in linears) / weights
            peak = max(r["peak"] for r in per_shape.values())
            on_gpu = (f"{sum(gpu_wall[(n, m)] for _, n, m, _ in linears):.1f}" if gpu
                      else "not measured (no GPU)")
            rows.append((block, setting, total, float(np.median(proxies)), bits, peak, count,
                         on_gpu))
    print("\n| block | setting | " + " | ".join(PARTS) + " | block wall (s) | block cpu (s) "
          "| median proxy | bits/w | peak MiB | model (h, wall) | GPU block wall (s) |")
    print("|" + "---|" * (len(PARTS) + 9))
    for block, setting, t, proxy, bits, peak, count, on_gpu in rows:
        print(f"| {block} | {setting} | " + " | ".join(f"{t[p]:.1f}" for p in PARTS)
              + f" | {t['wall']:.1f} | {t['cpu']:.1f} | {proxy:.4f} | {bits:.3f} | "
              f"{peak / 2**20:,.0f} | {t['wall'] * count / 3600:.2f} | {on_gpu} |")
    if args.forwards:
        fwd, xtx = capture_seconds_per_token()
        print(f"\ncapture of one LLaDA-shaped block: {fwd * 1e3:.2f} ms forward + {xtx * 1e3:.2f} "
              f"ms statistics per token; LLaDA-8B at -n 128 -L 2048 (262,144 tokens): "
              f"{(fwd + xtx) * 262144 * 32 / 3600:.1f} h on this CPU")
        f = block_forward_seconds()
        print(f"\none LLaDA-shaped block forward on 8 x 128 tokens: {f:.2f} s; the model-scope "
              f"pre-pass runs about n_layers/2 blocks per Linear:")
        for block, (linears, count) in BLOCKS.items():
            if count > 1:
                hours = len(linears) * count * (count / 2) * f / 3600
                print(f"  {block}: {len(linears) * count} Linears x {count / 2:.0f} blocks "
                      f"= {hours:.1f} h of forwards on this CPU")


if __name__ == "__main__":
    main()
