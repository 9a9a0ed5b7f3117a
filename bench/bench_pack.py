"""Speed of the packed format: pack / unpack throughput and the packed matmul vs dense float32.

For each layer shape, a random binary-coded layer with ABMP-like orders (5% of groups at order
1, 5% at 3, the rest 2) is packed into qdtk-bcq/1 (`PackedBCQ.from_layer`) and unpacked to the
float32 What (`to_layer().dequantize()`, the canonical evaluation unpack uses); throughput in
millions of weights per second. Then y = x What^T for T tokens: `bcq_matmul` on the planes (Numba,
lookup tables over bytes of signs) against NumPy's dense float32 x @ What.T (BLAS), best of
--repeat runs, and the bytes each reads (packed planes + scales vs dense float32).

    .venv/bin/python bench/bench_pack.py [--shapes 4096x4096,11008x4096] [--tokens 1,16,128]

Timings are noisy on a shared machine; numba compiles on the first call (excluded).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import best  # noqa: E402

from qdtk.formats.bits import bcq_bits_per_weight, group_slices
from qdtk.formats.packed import PackedBCQ, bcq_matmul
from qdtk.formats.solution import BinaryCodedLayer


def abmp_like_layer(rng: np.random.Generator, n: int, m: int) -> BinaryCodedLayer:
    G = len(group_slices(m))
    orders = np.full(G, 2)
    k = int(0.05 * G)
    perm = rng.permutation(G)
    orders[perm[:k]], orders[perm[k : 2 * k]] = 1, 3
    K = int(orders.max())
    signs = rng.random((K, n, m)) < 0.5
    row = (rng.random((K, G, n)) * 0.02).astype(np.float16)
    col = (rng.random((K, m)) + 0.5).astype(np.float16)
    for g, cols in enumerate(group_slices(m)):
        signs[orders[g] :, :, cols] = False
        row[orders[g] :, g] = 0
        col[orders[g] :, cols] = 0
    return BinaryCodedLayer(orders, signs, row, col)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,11008x4096", help="n x m layer shapes")
    ap.add_argument("--tokens", default="1,16,128", help="token counts T for the matmul")
    ap.add_argument("--repeat", type=int, default=3, help="runs per timing (best is kept)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    print(f"numba threads: {numba.get_num_threads()}")

    print("\n| layer n x m | bits/weight | pack Mw/s | unpack Mw/s | packed MiB | fp32 MiB |")
    print("|---|---|---|---|---|---|")
    layers = {}
    for n, m in shapes:
        layer = abmp_like_layer(rng, n, m)
        W = PackedBCQ.from_layer(layer)  # compiles
        W.to_layer().dequantize()
        t_pack = best(lambda layer=layer: PackedBCQ.from_layer(layer), args.repeat)
        t_unpack = best(lambda W=W: W.to_layer().dequantize(), args.repeat)
        nbytes = sum(a.nbytes for a in W.tensors("w").values())
        layers[(n, m)] = (W, layer.dequantize())
        print(f"| {n} x {m} | {bcq_bits_per_weight(n, m, layer.orders):.3f} "
              f"| {n * m / t_pack / 1e6:,.0f} | {n * m / t_unpack / 1e6:,.0f} "
              f"| {nbytes / 2**20:.1f} | {4 * n * m / 2**20:.1f} |")

    print("\n| layer n x m | T | packed ms | dense fp32 ms | packed / dense | max rel err |")
    print("|---|---|---|---|---|---|")
    for (n, m), (W, What) in layers.items():
        for T in tokens:
            x = rng.standard_normal((T, m)).astype(np.float32)
            y = bcq_matmul(x, W)  # compiles on the first shape
            ref = x @ What.T
            err = np.abs(y - ref).max() / np.abs(ref).max()
            t_packed = best(lambda x=x, W=W: bcq_matmul(x, W), args.repeat)
            t_dense = best(lambda x=x, What=What: x @ What.T, args.repeat)
            print(f"| {n} x {m} | {T} | {1e3 * t_packed:.2f} | {1e3 * t_dense:.2f} "
                  f"| {t_packed / t_dense:.2f} | {err:.1e} |")


if __name__ == "__main__":
    main()
