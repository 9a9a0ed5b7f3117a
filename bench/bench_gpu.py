"""DAQ on GPU vs CPU: whole layers through the layer driver, on the CPU bench's shapes, against
their floors.

For each layer shape n x m (uniform order K, T rounds, block feedback) qdtk.solve.layer's
`quantize_layer` runs with --backend cuda (H factored by cuSOLVER, W, R and the sweep on the
GPU: CuPy GEMMs, Numba CUDA DAQ kernels) and with --backend cpu. Printed per shape:

    floors   DAQ kernels: bytes every pass moves / bandwidth (and the one-pass ideal: read W
             and E once, write the signs); compensation: max(flops / GEMM rate, bytes / bw);
             factorisation: fp32 potrf flops / rate; launches per layer
    measured seconds per phase from the layer report (factor; DAQ = the block solves; comp =
             the rest of the sweep; error = the proxy error's energy; total); all-G: every
             group solved at once by solve_blocks (no compensation: ABMP's e_g(o))

and the projection for an LLaDA-8B layer set (32 blocks of 4 x 4096x4096, 2 x 12288x4096,
1 x 4096x12288, each layer factoring its own H). Peaks are measured on the GPU (copy bandwidth,
fp32 GEMM); without a GPU the floors use H100 SXM datasheet peaks and say so.

    .venv/bin/python bench/bench_gpu.py [--order 2] [--iters 15] [--no-cpu] [--shapes ...]

Timings are noisy on a shared machine: rerun on an idle one before quoting them.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from qdtk import backend
from qdtk.formats.bits import group_slices
from qdtk.math.daq import cuda as daq_cuda
from qdtk.math.daq import error_weights
from qdtk.math.hessian import prepare_hessian
from qdtk.solve.layer import quantize_layer

SHAPES = [(4096, 4096), (4096, 12288), (12288, 4096)]
H100 = {"bw": 3.35e12, "fp32": 67e12}  # SXM datasheet: HBM3 bytes/s, fp32 flop/s
LLADA_SET = {(4096, 4096): 4, (12288, 4096): 2, (4096, 12288): 1}  # per block, x 32 blocks


def measure_peaks() -> dict[str, float]:
    """Copy bandwidth and GEMM rates of the current GPU (best of a few runs)."""
    import cupy

    def best(f, reps=5):
        f()
        cupy.cuda.Device().synchronize()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            cupy.cuda.Device().synchronize()
            ts.append(time.perf_counter() - t)
        return min(ts)

    x, y = cupy.ones(2**28, cupy.float32), cupy.empty(2**28, cupy.float32)  # 1 GiB each
    bw = 2 * x.nbytes / best(lambda: cupy.copyto(y, x))
    A = cupy.ones((8192, 8192), cupy.float32)
    fp32 = 2 * 8192**3 / best(lambda: A @ A)
    return {"bw": bw, "fp32": fp32}


def floors(n: int, m: int, K: int, T: int, peaks: dict[str, float]) -> dict[str, float]:
    """Seconds each phase needs at least, from the bytes and flops it must move and do."""
    nm = n * m
    passes = K * (T + 2)  # init, T rounds and the refit, K planes each
    daq_bytes = nm * (passes * (4 + 4 + 1) + T)  # W, E, sign byte read per pass; search writes
    ideal_bytes = nm * (4 + 4 + K / 8)  # read W and E once, write K packed sign planes
    before = sum(s.start for s in group_slices(m))  # columns fed forward, summed over groups
    comp_flops = 2 * n * 128 * before  # S = Y_<g R_<g,g (the 128 x 128 products are small)
    comp_bytes = 4 * n * before  # Y_<g^T read once per group
    fact_flops = m**3 / 3  # one float32 potrf (the driver never forms U)
    return {
        "daq": daq_bytes / peaks["bw"],
        "daq_ideal": ideal_bytes / peaks["bw"],
        "daq_bytes": daq_bytes,
        "comp": max(comp_flops / peaks["fp32"], comp_bytes / peaks["bw"]),
        "factor": fact_flops / peaks["fp32"],
        "launches": len(group_slices(m)) * 2 * passes,
    }


def kernel_times(n: int, K: int, reps: int = 20) -> dict[str, float]:
    """Device seconds of one plane_pass (the heaviest kind: sign search + update) and one
    finalize on an n x 128 block. A 1 GiB copy queued first keeps the GPU busy while the
    launches are enqueued, so the events time the kernels back to back, not Python."""
    import cupy
    from numba import cuda

    plane_pass, finalize = daq_cuda.kernels(np.dtype(np.float32))
    rng = np.random.default_rng(0)
    W = cuda.to_device(rng.standard_normal((n, 128), dtype=np.float32))
    E = cuda.to_device(np.ones((n, 128), np.float32))
    P = cuda.to_device(rng.integers(0, 2**K, (n, 128), dtype=np.uint8))
    a = cuda.to_device(rng.random((K, 1, n), dtype=np.float32))
    b = cuda.to_device(rng.random((K, 128), dtype=np.float32))
    tiles = -(-n // daq_cuda.ROWS)
    part = cuda.device_array((2, 1, tiles, 128), np.float32)
    x, y = cupy.ones(2**28, cupy.float32), cupy.empty(2**28, cupy.float32)

    def timed(launch) -> float:
        launch()
        cupy.cuda.Device().synchronize()
        cupy.copyto(y, x)
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(reps):
            launch()
        stop.record()
        stop.synchronize()
        return cupy.cuda.get_elapsed_time(start, stop) / 1e3 / reps

    args = (W, E, True, P, K, a, b, part, 0, daq_cuda.UPDATE, K >= 2, daq_cuda.ROWS)
    return {
        "pass": timed(lambda: plane_pass[(tiles, 1), daq_cuda.THREADS](*args)),
        "finalize": timed(
            lambda: finalize[1, (daq_cuda.THREADS, daq_cuda.SLICES)](part, b, 0, daq_cuda.UPDATE, n)
        ),
        "bytes": n * 128 * (4 + 4 + 2),  # W, E and the sign byte read; the sign byte written
    }


def random_layer(n: int, m: int, xp=np) -> tuple:
    """W [n, m] float32 and H [m, m] float64 (NumPy) from m/4 random tokens with a decaying
    spectrum: rank-deficient, as real H often is, so the damping matters. xp builds them."""
    rng = xp.random.default_rng(0)
    W = rng.standard_normal((n, m), dtype=xp.float32)
    X = rng.standard_normal((m // 4, m)) * xp.linspace(1, 0.1, m)
    H = X.T @ X / X.shape[0]
    return W, backend.to_host(H)


def run_layer(n: int, m: int, K: int, T: int, device: str) -> dict[str, float]:
    """Seconds per phase of qdtk.solve.layer.quantize_layer (block feedback, qdtk's default) on
    `device` ("cuda": R, W and the sweep on the GPU; "cpu": LAPACK, OpenBLAS and Numba), after
    a small warm-up layer that compiles the kernels."""
    W, H = random_layer(n, m)
    quantize_layer(W[:64, :256], H[:256, :256], [K, K], iters=T, backend=device,
                   feedback="block")
    G = len(group_slices(m))
    _, r = quantize_layer(W, H, [K] * G, iters=T, backend=device, feedback="block")
    return {"factor": r.seconds_factor, "daq": r.seconds_solve,
            "comp": r.seconds_sweep - r.seconds_solve, "error": r.seconds_error,
            "total": r.seconds}


def solve_all_groups(n: int, m: int, K: int, T: int) -> float:
    """GPU seconds to solve every group of a layer at once (solve_blocks; no compensation:
    ABMP's e_g(o) profiles)."""
    import cupy

    W, H = random_layer(n, m, cupy)
    d = cupy.asarray(prepare_hessian(H, dtype=np.float32).d)
    E = cupy.concatenate(
        [error_weights((W[:, c] / d[c][None, :]) ** 2) for c in group_slices(m)], 1
    )
    daq_cuda.solve_blocks(W[:, :256], K, E[:, :256], iters=T)  # compile
    cupy.cuda.Device().synchronize()
    t = time.perf_counter()
    daq_cuda.solve_blocks(W, K, E, iters=T)
    cupy.cuda.Device().synchronize()
    return time.perf_counter() - t


def ms(x: float) -> str:
    return f"{1e3 * x:9.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--order", type=int, default=2, help="planes per group (uniform)")
    p.add_argument("--iters", type=int, default=15, help="DAQ rounds T")
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU timings")
    p.add_argument(
        "--shapes", default=",".join(f"{n}x{m}" for n, m in SHAPES),
        help="comma-separated n x m layer shapes (default: the CPU bench's)",
    )
    args = p.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    K, T = args.order, args.iters

    gpu, why = backend.gpu_status()
    peaks = measure_peaks() if gpu else H100
    print(f"GPU: {why}" if gpu else f"no GPU ({why}): floors use H100 SXM datasheet peaks")
    print(
        f"peaks: {peaks['bw'] / 1e12:.2f} TB/s, fp32 {peaks['fp32'] / 1e12:.1f} TFLOP/s;"
        f"  order {K}, {T} rounds\n"
    )
    print(
        "shape (n x m)   | floor ms: DAQ  1-pass   comp  factor | launches"
        " | GPU ms: factor     DAQ    comp   error   total DAQ/floor  all-G"
        " | CPU ms: factor     DAQ    comp   error   total"
    )
    gpu_times: dict[tuple[int, int], float] = {}
    for n, m in shapes:
        f = floors(n, m, K, T, peaks)
        row = (
            f"{n:5d} x {m:<6d}  | {ms(f['daq'])}{ms(f['daq_ideal'])}{ms(f['comp'])}"
            f"{ms(f['factor'])} | {f['launches']:8d} |"
        )
        phases = ("factor", "daq", "comp", "error", "total")
        if gpu:
            g = run_layer(n, m, K, T, "cuda")
            gpu_times[n, m] = g["total"]
            row += "        " + "".join(ms(g[k]) for k in phases)
            row += f"{g['daq'] / f['daq']:10.1f}{ms(solve_all_groups(n, m, K, T))} |"
        else:
            row += " " * 64 + "|"
        if not args.no_cpu:
            c = run_layer(n, m, K, T, "cpu")
            row += "        " + "".join(ms(c[k]) for k in phases)
        print(row, flush=True)

    if gpu and set(LLADA_SET) <= set(gpu_times):
        print("\nkernels on one n x 128 block (device time, 20 back-to-back launches):")
        for n in (4096, 12288):
            kt = kernel_times(n, K)
            floor = kt["bytes"] / peaks["bw"]
            print(
                f"  n = {n:5d}: plane_pass {1e6 * kt['pass']:7.1f} us (floor {1e6 * floor:5.1f} us,"
                f" {kt['pass'] / floor:4.1f}x), finalize {1e6 * kt['finalize']:5.1f} us"
            )
        total = 32 * sum(c * gpu_times[s] for s, c in LLADA_SET.items())
        print(f"\nLLaDA-8B layer set (32 blocks) projected on this GPU: {total / 60:.1f} min")
    else:
        print(
            "\nno GPU here: GPU columns are empty. The floors above are what an H100 cannot beat;"
            " run this script on a GPU machine for the measured columns and the projection."
        )


if __name__ == "__main__":
    main()
