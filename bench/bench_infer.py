"""Packed inference speed and memory: BCQLinear against dense float32 / bfloat16 torch.

(a) One layer (n x m, y = x What^T) at 2.3 bits (ABMP-like orders: 5% of groups at order 1,
    5% at 3, the rest 2) for T tokens: time of the packed module and of the dense matmuls, each
    next to its floor, max(bytes read / memory bandwidth, flops / float32 BLAS rate), both rates
    measured here first; up to FEW_TOKENS also the words kernel alone (the module less its glue).
(b) The two CPU paths of the packed module (sign words against x (.) b; tiles of What
    then BLAS) at small T: where they cross sets qdtk.torch.nn.linear.FEW_TOKENS.
(c) Whole models, each run in a fresh process: load time, one forward of T tokens, resident
    bytes of parameters and buffers, peak process memory (ru_maxrss), file size; packed
    (qdtk.load of a packed folder with random ABMP-like planes: speed and memory do not depend
    on the values) against the dense float32 original. GPU columns: not measured without one.

    .venv/bin/python bench/bench_infer.py [--shapes 4096x4096,4096x12288] [--tokens 1,16,256,1024]
        [--models minilm,smollm,llada-block] [--work /tmp/qdtk-bench-infer]

Timings are best of --repeat; numba compiles on the first call (excluded). On a shared
machine the times are noisy: compare columns of one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))
from bench_pack import abmp_like_layer  # noqa: E402
from common import best, model_folder  # noqa: E402

import qdtk  # noqa: E402, F401  (registers the quantizer)


def rates(repeat: int, clock) -> tuple[float, float]:
    """(memory read bandwidth in bytes/s, float32 GEMM rate in flop/s) of this machine."""
    import torch

    a = torch.ones(2**13, 2**13)  # 256 MiB: far beyond the caches
    v = torch.ones(1, 2**13)
    bw = a.numel() * 4 / min(best(lambda: a.sum(), repeat, True, clock),
                             best(lambda: v @ a.T, repeat, True, clock))  # the faster reader
    x, w = torch.randn(1024, 4096), torch.randn(4096, 4096)
    gemm = 2 * 1024 * 4096 * 4096 / best(lambda: x @ w.T, repeat, True, clock)
    return bw, gemm


def layer_table(shapes, tokens, repeat: int, clock) -> None:
    import torch

    bw, gemm = rates(repeat, clock)
    print(f"memory bandwidth {bw / 1e9:.1f} GB/s, float32 GEMM {gemm / 1e9:.0f} GFLOP/s "
          f"(torch threads {torch.get_num_threads()}); floor = max(bytes / bandwidth, "
          "flops / GEMM rate)\n")
    print("| layer n x m | bits/weight | T | packed ms | floor | its kernel ms | fp32 ms | floor "
          "| bf16 ms | floor | packed / fp32 | max rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for n, m in shapes:
        layer_rows(rng, n, m, tokens, repeat, bw, gemm, clock)


def layer_rows(rng, n: int, m: int, tokens, repeat: int, bw: float, gemm: float, clock) -> None:
    import torch

    from qdtk.formats.bits import bcq_bits_per_weight
    from qdtk.formats.packed import PackedBCQ
    from qdtk.math import bcq_matmul as kernels
    from qdtk.torch.nn.linear import FEW_TOKENS, BCQLinear, _cpu_arrays

    layer = abmp_like_layer(rng, n, m)
    bits = bcq_bits_per_weight(n, m, layer.orders)
    packed = PackedBCQ.from_layer(layer)
    W = torch.from_numpy(layer.dequantize())  # [n, m] float32
    del layer
    Wb = W.bfloat16()
    mod = BCQLinear.from_packed(packed, None)
    packed_bytes = sum(a.nbytes for a in packed.tensors("w").values())
    arrays = _cpu_arrays(mod)  # planes, scales and layout as the words kernel takes them
    for T in tokens:
        x = torch.randn(T, m)
        xb = x.bfloat16()
        ref = x @ W.T
        err = float((mod(x) - ref).abs().max() / ref.abs().max())  # also compiles
        t = {
            "packed": best(lambda x=x: mod(x), repeat, False, clock),
            "fp32": best(lambda x=x: x @ W.T, repeat, False, clock),
            "bf16": best(lambda xb=xb: xb @ Wb.T, repeat, True, clock),
        }
        io = 4 * T * (m + n)
        flop = 2 * T * n * m / gemm
        floor = {"packed": max((packed_bytes + io) / bw, flop),
                 "fp32": max((4 * n * m + io) / bw, flop),
                 "bf16": max((2 * n * m + io / 2) / bw, flop)}
        path = "words" if T <= FEW_TOKENS else "tiles"
        kernel = "-"
        if path == "words":  # the kernel alone on the module's arrays: the rest is torch's glue
            xn = x.numpy()
            t_kernel = best(lambda xn=xn: kernels.matmul_packed(xn, *arrays), repeat, True, clock)
            kernel = f"{1e3 * t_kernel:.2f}"
        cells = [f"{1e3 * t[k]:.2f} | {1e3 * floor[k]:.2f}" for k in t]
        print(f"| {n} x {m} | {bits:.3f} | {T} ({path}) | {cells[0]} | {kernel} | {cells[1]} "
              f"| {cells[2]} | {t['packed'] / t['fp32']:.2f} | {err:.1e} |")


def crossover_table(n: int, m: int, tokens, repeat: int, clock) -> None:
    import torch

    from qdtk.formats.packed import PackedBCQ
    from qdtk.torch.nn import linear

    rng = np.random.default_rng(1)
    mod = linear.BCQLinear.from_packed(PackedBCQ.from_layer(abmp_like_layer(rng, n, m)))
    print(f"\n| layer {n} x {m}: T | packed words ms | tiles + BLAS ms | chosen |")
    print("|---|---|---|---|")
    for T in tokens:
        x = torch.randn(T, m)
        t_words = best(lambda x=x: linear.matmul_packed(mod, x), repeat, True, clock)
        t_tile = best(lambda x=x: linear.matmul_tiled(mod, x), repeat, True, clock)
        chosen = "words" if T <= linear.FEW_TOKENS else "tiles"
        print(f"| {T} | {1e3 * t_words:.2f} | {1e3 * t_tile:.2f} | {chosen} |")


# ----------------------------------------------------------------------------- whole models


def llada_block(work: Path) -> Path:
    """A random one-block model of LLaDA-8B's shapes (hidden 4096, MLP 12288, 32 heads)."""
    folder = work / "llada-block"
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import save_char_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=12288,
                         num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=32,
                         max_position_embeddings=2048)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    save_char_tokenizer(folder)
    return folder


def packed_folder(model: Path, work: Path) -> Path:
    """The model packed with random ABMP-like planes (qdtk pack of a random QUANT folder)."""
    from qdtk.pack import pack_checkpoint
    from tests.test_pack import write_quant

    out = work / (model.name + "-packed")
    if (out / "config.json").exists():
        return out

    def orders(name: str, G: int) -> np.ndarray:
        return abmp_like_orders(np.random.default_rng(len(name)), G)

    write_quant(model, work / (model.name + "-quant"), np.random.default_rng(0), orders=orders)
    return pack_checkpoint(work / (model.name + "-quant"), out, model)


def abmp_like_orders(rng: np.random.Generator, G: int) -> np.ndarray:
    o = np.full(G, 2)
    k = int(0.05 * G)
    perm = rng.permutation(G)
    o[perm[:k]], o[perm[k : 2 * k]] = 1, 3
    return o


def measure(kind: str, folder: str, T: int, repeat: int) -> dict:
    """Run in a fresh process: load, forward T tokens, memory (printed as JSON)."""
    import torch

    from qdtk.torch.models import _auto_class

    t0 = time.perf_counter()
    if kind == "packed":
        model = qdtk.load(folder)
    else:
        import transformers

        config = transformers.AutoConfig.from_pretrained(folder)
        model = _auto_class(config, None).from_pretrained(folder, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    ids = torch.randint(5, 100, (1, T))
    with torch.no_grad():
        fwd = best(lambda: model(ids), repeat, warmup=True)
    tensors = list(model.parameters()) + list(model.buffers())
    resident = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    # VmHWM, not ru_maxrss: Linux carries the forking parent's peak across exec into the latter
    status = Path("/proc/self/status").read_text()
    peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
    return {"load_s": load_s, "forward_s": fwd, "resident": sum(resident.values()),
            "maxrss": peak}


def model_table(names, work: Path, T: int, repeat: int) -> None:
    print(f"\n| model | weights | file MiB | resident MiB | peak RSS MiB | load s | forward "
          f"{T} tok ms (CPU) | GPU |")
    print("|---|---|---|---|---|---|---|---|")
    work.mkdir(parents=True, exist_ok=True)
    for name in names:
        dense = llada_block(work) if name == "llada-block" else model_folder(name, work)
        packed = packed_folder(dense, work)
        for kind, folder in (("dense fp32", dense), ("packed", packed)):
            out = subprocess.run(
                [sys.executable, __file__, "--measure", kind.split()[0], str(folder),
                 "--measure-tokens", str(T), "--repeat", str(repeat)],
                capture_output=True, text=True, check=True,
            ).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            size = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
            print(f"| {name} | {kind} | {size / 2**20:.1f} | {r['resident'] / 2**20:.1f} "
                  f"| {r['maxrss'] / 2**20:.0f} | {r['load_s']:.1f} | {1e3 * r['forward_s']:.1f} "
                  "| not measured |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,4096x12288", help="n x m layer shapes")
    ap.add_argument("--tokens", default="1,16,256,1024", help="token counts T")
    ap.add_argument("--crossover", default="1,2,4,8,16,32",
                    help="T for the path table (empty: none)")
    ap.add_argument("--models", default="minilm,smollm,llada-block",
                    help="whole models (minilm, smollm, llada-block; empty: none)")
    ap.add_argument("--model-tokens", type=int, default=128, help="tokens per model forward")
    ap.add_argument("--work", default="/tmp/qdtk-bench-infer", help="converted/packed models")
    ap.add_argument("--repeat", type=int, default=3, help="runs per timing (best is kept)")
    ap.add_argument("--one-core", action="store_true",
                    help="one thread everywhere, CPU time of this process (layer tables): "
                    "steadier than the wall clock on a shared machine")
    ap.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--measure-tokens", type=int, default=128, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args.measure_tokens, args.repeat)))
        return
    clock = time.perf_counter
    if args.one_core:
        import numba
        import torch

        torch.set_num_threads(1)
        numba.set_num_threads(1)
        clock = time.process_time
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    if shapes:
        layer_table(shapes, [int(t) for t in args.tokens.split(",")], args.repeat, clock)
        if args.crossover:
            crossover_table(*shapes[0], [int(t) for t in args.crossover.split(",")],
                            args.repeat, clock)
    if args.models:
        model_table(args.models.split(","), Path(args.work), args.model_tokens, args.repeat)


if __name__ == "__main__":
    main()
