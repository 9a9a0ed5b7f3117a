"""The CUDA DAQ kernels against the NumPy reference, on Numba's CUDA simulator (tiny shapes).

Launches are shrunk (rows per tile, threads per block) so that every block spans several
thread blocks, the last one ragged, and every thread strides over several columns.
"""

from functools import partial

import numpy as np
import pytest

from qdtk import backend
from qdtk.backend import cholesky_lower, cholesky_lower_gpu
from qdtk.errors import QdtkError
from qdtk.formats.bits import group_slices
from qdtk.formats.solution import dequantize_block
from qdtk.math.daq import cuda as daq_cuda
from qdtk.math.daq import reference, solve_block
from qdtk.math.hessian import prepare_hessian
from qdtk.solve import layer as driver
from tests.ptx import ptx_facts

needs_gpu = pytest.mark.skipif(
    not backend.gpu_available(), reason="needs a CUDA GPU (CuPy reports none)"
)
# 7 rows -> tiles of 3, 3, 1; 8 threads stride over up to 37 columns; 2 slices over 3 tiles
SMALL = {"rows": 3, "threads": 8, "slices": 2}


def block(rng, n=7, w=37, dtype=np.float64):
    W = rng.standard_normal((n, w)).astype(dtype)
    E = np.where(rng.random((n, w)) < 0.15, 3.0, 1.0).astype(dtype)
    return W, E


def assert_same(got, want, rtol=1e-9):
    (s1, a1, b1), (s0, a0, b0) = got, want
    assert s1.dtype == bool and s1.shape == s0.shape
    np.testing.assert_array_equal(s1, s0)
    np.testing.assert_allclose(a1, a0, rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(b1, b0, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("K", [1, 2, 3])
def test_matches_reference_ragged(rng, K):
    W, E = block(rng)
    want = reference.solve_block(W, K, E, iters=2)
    assert_same(daq_cuda.solve_block(W, K, E, iters=2, **SMALL), want)


def test_all_groups_of_a_layer_at_once(rng):
    """solve_blocks: a full 128-column group and a ragged one in the same launches, each the
    reference solution of its group alone; a [K, G, n] and b [K, m] as a layer stores them."""
    W, E = block(rng, n=4, w=128 + 9)
    signs, a, b = daq_cuda.solve_blocks(W, 2, E, iters=1, rows=3, threads=8, slices=1)
    assert signs.shape == (2, 4, 137) and a.shape == (2, 2, 4) and b.shape == (2, 137)
    for g, cols in enumerate(group_slices(137)):
        want = reference.solve_block(W[:, cols], 2, E[:, cols], iters=1)
        assert_same((signs[:, :, cols], a[:, g], b[:, cols]), want)


def test_default_iterations(rng):
    """The default 15 rounds + refit."""
    W, E = block(rng, n=4, w=12)
    got = daq_cuda.solve_block(W, 2, E, rows=4, threads=4, slices=1)  # few simulated threads
    assert_same(got, reference.solve_block(W, 2, E))


def test_dispatch_and_default_launch(rng):
    """Registered in qdtk.math.daq; the default launch shape (tiles of 16 rows, 128 threads, 8
    slices: 1024 simulated threads per finalize, hence the short run)."""
    W, E = block(rng, n=17, w=5)
    want = reference.solve_block(W, 1, E, iters=0)
    assert_same(solve_block(W, 1, E, iters=0, backend="cuda"), want)


def test_no_refit_and_no_weights(rng):
    """refit=False ends on a standalone sign-search pass; E=None means all ones."""
    W, _ = block(rng, n=6, w=20)
    want = reference.solve_block(W, 3, None, iters=2, refit=False)
    assert_same(daq_cuda.solve_block(W, 3, None, iters=2, refit=False, **SMALL), want)


def test_float32_objective_close(rng):
    W, E = block(rng, n=6, w=24, dtype=np.float32)
    s, a, b = daq_cuda.solve_block(W, 2, E, iters=2, **SMALL)
    assert a.dtype == np.float32 and b.dtype == np.float32
    s0, a0, b0 = reference.solve_block(W, 2, E, iters=2)
    loss = reference.objective(W, E, s, a, b)
    assert loss == pytest.approx(reference.objective(W, E, s0, a0, b0), rel=1e-4)
    assert loss < reference.objective(W, E, *reference.greedy_init(W, 2))


def test_zero_rows_columns_and_constant_block(rng):
    W, E = block(rng, n=5, w=9)
    W[1] = 0
    W[:, 4] = 0
    want = reference.solve_block(W, 2, E, iters=2)
    got = daq_cuda.solve_block(W, 2, E, iters=2, **SMALL)
    assert all(np.all(np.isfinite(x)) for x in got[1:])
    assert_same(got, want)
    C = np.full((4, 6), 0.5)
    s, a, b = daq_cuda.solve_block(C, 2, None, iters=1, **SMALL)
    np.testing.assert_allclose(reference.reconstruct(s, a, b), C, atol=1e-6)


def test_bad_requests(rng):
    W, _ = block(rng, n=2, w=4)
    with pytest.raises(QdtkError, match="orders 1..4"):
        daq_cuda.solve_block(W, 5)
    with pytest.raises(ValueError, match="rows"):
        daq_cuda.solve_block(W, 1, rows=8, threads=4)
    with pytest.raises(ValueError, match="at most 128 columns"):
        daq_cuda.solve_block(np.zeros((2, 129)), 1)


def test_kernels_compile_for_a_real_gpu():
    """The simulator runs Python, not the CUDA target: compile the float32 kernels to sm_90 PTX
    (no GPU needed) so typing errors show here. Signs live in registers (no local memory) and
    the float32 kernels do no float64 arithmetic."""
    uses = ptx_facts("from qdtk.math.daq.cuda import ptx\n"
                     "uses = {k: ['.local' in v, '.f64' in v] for k, v in ptx().items()}")
    assert uses == {"plane_pass": [False, False], "finalize": [False, False]}


def layer(rng, n=6, m=300):
    X = rng.standard_normal((80, m)) * np.linspace(1, 0.2, m)
    return rng.standard_normal((n, m)).astype(np.float32), X.T @ X / 80


def sign_solver(Wg, order, dg):
    """A stand-in block solver (one plane, row means): the sweep's algebra is what is tested."""
    signs = (Wg >= 0)[None]
    a = np.abs(Wg).mean(axis=1)[None].astype(np.float16)
    b = np.ones((1, Wg.shape[1]), np.float16)
    return signs, a, b, dequantize_block(signs, a, b)


def test_device_steps_are_the_driver_sweep(rng):
    """compensated_block + feed_forward (written for NumPy and CuPy) reproduce
    qdtk.solve.layer.sweep exactly on NumPy, ragged last group included."""
    W, H = layer(rng)
    P = prepare_hessian(H, dtype=np.float32)
    want = driver.sweep(W.copy(), P.R, np.ones(3, np.int64), sign_solver)[0].dequantize()
    R, d = P.R, P.d.astype(np.float32)
    Y = np.empty_like(W)
    got = np.empty_like(W)
    for cols in group_slices(W.shape[1]):
        Wg, S, Ugg = driver.compensated_block(W, R, Y, cols)
        Q = sign_solver(np.ascontiguousarray(Wg), 1, d[cols])[3]
        driver.feed_forward(Y, Wg, Q, R, d, S, Ugg, cols)
        got[:, cols] = Q
    np.testing.assert_array_equal(got, want)


def test_prepare_hessian_takes_the_backend_cholesky(rng):
    """The hook the GPU uses: a factorisation that fails once makes the damping grow x10."""
    _, H = layer(rng, m=20)
    calls = []

    def flaky(Hd):
        calls.append(Hd[0, 0])
        return None if len(calls) == 1 else cholesky_lower(Hd)

    P = prepare_hessian(H, cholesky=flaky)
    assert P.retries == 1 and len(calls) == 2 and calls[1] > calls[0]
    np.testing.assert_allclose(P.R @ P.R.T, P.H, rtol=1e-10, atol=1e-12)


@needs_gpu
def test_gpu_layer_algebra_matches_cpu(rng):
    import cupy

    W, H = layer(rng, n=64)
    Hd = prepare_hessian(H).H
    L = cholesky_lower_gpu(Hd)
    np.testing.assert_allclose(L, cholesky_lower(Hd.copy()), rtol=1e-8, atol=1e-10)
    assert cholesky_lower_gpu(-np.eye(4)) is None
    R = prepare_hessian(H, cholesky=cholesky_lower_gpu).R
    np.testing.assert_allclose(R, prepare_hessian(H).R, rtol=1e-8, atol=1e-10)
    R32 = R.astype(np.float32)
    cols = slice(128, 256)
    Y = rng.standard_normal(W.shape).astype(np.float32)
    host = driver.compensated_block(W, R32, Y, cols)
    dev = driver.compensated_block(cupy.asarray(W), cupy.asarray(R32), cupy.asarray(Y), cols)
    for h, g in zip(host, dev, strict=True):
        np.testing.assert_allclose(g.get(), h, rtol=1e-4, atol=1e-4)


@needs_gpu
def test_gpu_solver_on_device_arrays(rng):
    import cupy

    W, E = block(rng, n=1000, w=128, dtype=np.float32)
    s, a, b = daq_cuda.solve_block(cupy.asarray(W), 3, cupy.asarray(E))
    assert isinstance(a, cupy.ndarray)
    s0, a0, b0 = reference.solve_block(W, 3, E)
    loss = reference.objective(W, E, s.get(), a.get(), b.get())
    assert loss == pytest.approx(reference.objective(W, E, s0, a0, b0), rel=1e-3)


def test_layer_driver_on_the_cuda_backend(rng, monkeypatch):
    """quantize_layer with --backend cuda: the sweep runs the CUDA kernels (here on the
    simulator with small launches, arrays NumPy; on a GPU, CuPy) and reports the true error
    of what it stores."""
    monkeypatch.setattr(daq_cuda, "solve_block", partial(daq_cuda.solve_block, **SMALL))
    W, H = layer(rng, n=3, m=131)  # a full group and a ragged one
    got, rep = driver.quantize_layer(W, H, [2, 1], iters=1, backend="cuda", feedback="block")
    want, rep0 = driver.quantize_layer(W, H, [2, 1], iters=1, backend="reference",
                                         feedback="block")
    assert got.signs.shape == want.signs.shape == (2, 3, 131)
    D = W.astype(np.float64) - got.dequantize()
    assert rep.output_error == pytest.approx(np.einsum("ij,ij->", D @ H, D), rel=1e-4)
    assert rep.proxy_error == pytest.approx(rep0.proxy_error, rel=0.05)


@needs_gpu
def test_layer_driver_on_a_gpu_matches_cpu(rng):
    W, H = layer(rng, n=256, m=300)
    got, rep = driver.quantize_layer(W, H, [2, 3, 1], iters=5, backend="cuda",
                                       feedback="block")
    _, rep0 = driver.quantize_layer(W, H, [2, 3, 1], iters=5, backend="cpu", feedback="block")
    D = W.astype(np.float64) - got.dequantize()
    assert rep.output_error == pytest.approx(np.einsum("ij,ij->", D @ H, D), rel=1e-4)
    assert rep.proxy_error == pytest.approx(rep0.proxy_error, rel=0.02)


def test_group_solver_prefetches_whole_layers(rng, monkeypatch):
    """DaqGroupSolver.prefetch on the cuda backend: one solve_blocks per order for all groups,
    and ABMP's candidate values exactly those of the groups solved one by one."""
    from qdtk.math import abmp
    from qdtk.math.group import DaqGroupSolver

    calls = []

    def counted(*args, _solve=daq_cuda.solve_blocks, **kw):
        calls.append(args[0].shape)
        return _solve(*args, **{**kw, **SMALL})

    monkeypatch.setattr(daq_cuda, "solve_blocks", counted)
    W, H = layer(rng, n=5, m=300)  # groups 128, 128, 44
    P = prepare_hessian(H, dtype=np.float32)
    batched = DaqGroupSolver(iters=1, backend="cuda")
    E = abmp.group_errors(W, P.H, P.d, (1, 2), batched)
    assert calls == [(5, 300), (5, 300)]  # the later per-group calls were all cached
    one_by_one = DaqGroupSolver(iters=1, backend="cuda")
    want = abmp.group_errors(W, P.H, P.d, (1, 2), one_by_one.__call__)  # no prefetch
    assert len(calls) == 2 + 2 * 3
    np.testing.assert_array_equal(E, want)
    for cols in group_slices(300):
        Wg, dg = np.ascontiguousarray(W[:, cols]), P.d.astype(np.float32)[cols]
        for got, ref in zip(batched.solution(Wg, 2, dg), one_by_one.solution(Wg, 2, dg),
                            strict=True):
            np.testing.assert_array_equal(got, ref)
