"""Speed of DAQ on CPU: the layer driver end to end, Numba kernels against the NumPy reference.

For each layer shape n x m (rows x input columns) a Gaussian W and a correlated H = (2/T) X^T X
(X = Z A, rank m/2, so damping matters as on real layers) are quantized at K = --bits planes
per group, T = --iters iterations, with compensation, by `quantize_layer` with the Numba
backend ("cpu") and with the NumPy reference. Printed per shape:
  cold               seconds of the first layer of this shape (fresh memory, BLAS threads
                     starting; traced by tracemalloc)
  numba, cpu-s       seconds per layer (Numba) on the second layer of the shape, as every
                     layer after the first in a model run, and the CPU seconds of its threads
  factor/sweep/error its parts: H factorisation, sweep (block solves + compensation), proxy error
                     (the energy tr(W H W^T) of the report; with diagonal feedback tr(D H D^T) too)
  f+s                factorisation + sweep: the quantization itself, what the published code does
  ref, ratio         seconds per layer with the reference solver, ref / numba
  solve, ref, ratio  the block solves alone (the part the kernels replace; factorisation,
                     compensation and error are the same BLAS calls in both runs)
  GFLOP              the floor: Cholesky m^3/3 + compensation n m^2 + energy n m^2
                     (+ n m^2 for the error with diagonal feedback)
  proxy(nb/ref)      proxy errors of both runs and their relative difference (the
                     reconstructions drift apart along the compensation chain: a float32
                     near-tie decided differently in one group changes the inputs of every
                     later group, to equally good solutions)
  peak MiB, maxrss   NumPy allocations traced by tracemalloc during the cold run, and the
                     process's maximum resident set (MiB)

    .venv/bin/python bench/bench_daq.py [--shapes 384x1536,4096x4096] [--no-reference]

Numba compiles on a warm-up call (excluded). Timings are noisy on a shared machine, and on an
oversubscribed one the spinning worker threads of OpenBLAS and OpenMP make every parallel step
wait for a descheduled thread: there, OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 gives the CPU
cost per core (an idle 2-core machine takes about half of it).
"""

from __future__ import annotations

# isort: off
import qdtk  # noqa: F401  (first: it sets OpenBLAS's thread policy before NumPy loads it)
# isort: on

import argparse
import resource
import time
import tracemalloc

import numba
import numpy as np

from qdtk.formats.bits import group_slices
from qdtk.solve.layer import quantize_layer

SHAPES = "384x1536,576x1536,4096x4096,12288x4096,4096x12288"


def correlated_H(rng: np.random.Generator, m: int) -> np.ndarray:
    A = rng.standard_normal((m, m // 2), dtype=np.float32)  # [m, r] mixing of r latent inputs
    H = A @ A.T
    H *= 2.0 / m
    return H


def run(W, H, bits, iters, backend, feedback):
    """(layer, report, wall seconds, CPU seconds of all threads)."""
    G = len(group_slices(W.shape[1]))
    t, c = time.perf_counter(), time.process_time()
    layer, report = quantize_layer(W, H, [bits] * G, iters=iters, backend=backend,
                                   feedback=feedback)
    return layer, report, time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated n x m layer shapes")
    ap.add_argument("--bits", type=int, default=2, help="planes per group (K)")
    ap.add_argument("--iters", type=int, default=15, help="DAQ iterations (T)")
    ap.add_argument("--feedback", choices=("block", "diagonal"), default="block",
                    help="block (qdtk's default: the layer error comes free from the sweep) or "
                    "diagonal (as published: the error costs a second product with R)")
    ap.add_argument("--no-reference", action="store_true", help="skip the NumPy reference runs")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"numba threads {numba.get_num_threads()}, K={args.bits}, T={args.iters}, "
          f"compensation on, feedback {args.feedback}; times in seconds")
    warm = rng.standard_normal((64, 200)).astype(np.float32)
    run(warm, correlated_H(rng, 200), args.bits, 1, "cpu", args.feedback)  # compile

    head = (f"{'shape':>12} {'cold':>7} {'numba':>7} {'cpu-s':>7} {'factor':>7} {'sweep':>7} "
            f"{'error':>7} {'f+s':>7} "
            f"{'ref':>8} {'ratio':>6} {'solve':>7} {'ref':>8} {'ratio':>6} {'GFLOP':>7} "
            f"{'proxy(nb)':>10} {'proxy(ref)':>10} "
            f"{'rel.diff':>9} {'peak MiB':>9} {'maxrss':>7}")
    print(head)
    for shape in args.shapes.split(","):
        n, m = (int(x) for x in shape.lower().split("x"))
        W = rng.standard_normal((n, m), dtype=np.float32)
        H = correlated_H(rng, m)
        tracemalloc.start()
        t_cold = run(W, H, args.bits, args.iters, "cpu", args.feedback)[2]
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        layer, rep, t_nb, cpu_nb = run(W, H, args.bits, args.iters, "cpu", args.feedback)
        flops = (m**3 / 3 + (2 if args.feedback == "block" else 3) * n * m * m) / 1e9
        if args.no_reference:
            t_ref = proxy_ref = diff = solve_ref = float("nan")
        else:
            ref_rep, t_ref = run(W, H, args.bits, args.iters, "reference", args.feedback)[1:3]
            proxy_ref, solve_ref = ref_rep.proxy_error, ref_rep.seconds_solve
            diff = abs(rep.proxy_error - proxy_ref) / proxy_ref
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
        print(f"{shape:>12} {t_cold:7.2f} {t_nb:7.2f} {cpu_nb:7.2f} {rep.seconds_factor:7.2f} "
              f"{rep.seconds_sweep:7.2f} {rep.seconds_error:7.2f} "
              f"{rep.seconds_factor + rep.seconds_sweep:7.2f} {t_ref:8.2f} "
              f"{t_ref / t_nb:6.1f} {rep.seconds_solve:7.2f} {solve_ref:8.2f} "
              f"{solve_ref / rep.seconds_solve:6.1f} {flops:7.0f} "
              f"{rep.proxy_error:10.5f} {proxy_ref:10.5f} {diff:9.2e} {peak:9.0f} {maxrss:7.0f}",
              flush=True)


if __name__ == "__main__":
    main()
