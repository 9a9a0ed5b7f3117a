"""The refinement on the cuda backend (qdtk.math.refine_cuda) against the CPU path, on Numba's
CUDA simulator (tiny shapes, shrunk launches): each kernel equals its CPU kernel bit for bit (the
same arithmetic in the same order), and so does refine_layer; on a real GPU (needs_gpu) within
float rounding.
"""

from functools import partial

import numpy as np
import pytest

from qdtk import backend
from qdtk.formats.bits import group_slices
from qdtk.formats.solution import group_index
from qdtk.math import refine, refine_cuda
from qdtk.math.refine import MODES, refine_layer
from qdtk.solve import layer as driver
from tests.ptx import ptx_facts
from tests.test_refine import correlated_H, output_error, random_layer

needs_gpu = pytest.mark.skipif(
    not backend.gpu_available(), reason="needs a CUDA GPU (CuPy reports none)"
)
SIM = backend.Backend("cuda", np, "cuda", simulated=True)  # CUDA kernels, NumPy arrays


@pytest.fixture
def small_launches(monkeypatch):
    """Few simulated threads, each striding over several items; ragged last blocks."""
    for name, launch in [("dequantize", dict(threads=32, blocks=8)),
                         ("group_dots", dict(threads=16, blocks=4)),
                         ("sign_pass", dict(rows=3, lanes=2, threads=16, blocks=4))]:
        monkeypatch.setattr(refine_cuda, name, partial(getattr(refine_cuda, name), **launch))


def state_arrays(rng, K, n, m, dtype):
    S = rng.choice(np.array([-1, 1], np.int8), (K, n, m))
    S[-1, :, 128:] = 0  # an inactive plane on the second group
    a = rng.random((K, len(group_slices(m)), n)).astype(dtype)
    b = rng.random((K, m)).astype(dtype)
    return S, a, b


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dequantize_kernel(rng, small_launches, dtype):
    K, n, m = 3, 5, 200
    S, a, b = state_arrays(rng, K, n, m, dtype)
    want = refine._dequantize(S, a, b, group_index(m), np.empty((n, m), dtype))
    got = refine_cuda.dequantize(S, a, b, group_index(m), np.empty((n, m), dtype))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("h", [0, 1])
def test_group_dots_kernel(rng, small_launches, h):
    K, n, m = 2, 5, 300  # groups 128, 128, 44
    S, _, b = state_arrays(rng, K, n, m, np.float32)
    V = S * b[:, None, :]  # [K, n, m]
    starts = np.array([s.start for s in group_slices(m)])
    Y = rng.standard_normal((K * n, m - starts[h])).astype(np.float32)
    want, got = (np.zeros((n, K, 3, K, 3)) for _ in range(2))
    for k in range(K):
        refine._group_dots(Y[k * n : (k + 1) * n], V, starts, k, h, want)
        refine_cuda.group_dots(Y[k * n : (k + 1) * n], V, starts, k, h, got)
    assert np.count_nonzero(want) > 0
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("o", "w", "j0", "dtype"), [(1, 128, 0, np.float32),
                                                     (3, 45, 128, np.float32),
                                                     (2, 60, 100, np.float64)])
def test_sign_pass_kernel(rng, small_launches, o, w, j0, dtype):
    """One group at columns j0 .. j0 + w of a 7 x 300 R: the same patterns, changes and R on
    every column (rows in blocks of 3: the last block ragged)."""
    n, m = 7, 300
    S = rng.choice(np.array([-1, 1], np.int8), (o, n, w))
    ab = rng.random((o, n, w)).astype(dtype)
    R = rng.standard_normal((n, m)).astype(dtype)
    Hrows = correlated_H(rng, m).astype(dtype)[j0 : j0 + w]
    out = {}
    for name, kern in [("cpu", refine.sign_pass), ("cuda", refine_cuda.sign_pass)]:
        Sk, Rk, Dk = S.copy(), R.copy(), np.zeros((n, w), dtype)
        kern(Sk, ab, Rk, Hrows, j0, Dk)
        out[name] = Sk, Rk, Dk
    assert np.any(out["cpu"][0] != S)  # the pass changed something
    for c, g in zip(out["cpu"], out["cuda"], strict=True):
        np.testing.assert_array_equal(g, c)


def test_sign_pass_rejects_bad_launches():
    z = np.zeros((1, 2, 4), np.float32)
    with pytest.raises(ValueError, match="rows"):
        refine_cuda.sign_pass(z.astype(np.int8), z, z[0], np.zeros((4, 4)), 0, z[0], rows=9)


def test_refine_layer_on_the_cuda_backend_equals_cpu(rng, small_launches):
    """8 x 256, two groups of different orders, every step (rows, columns, signs; mode "all",
    one round): the CUDA kernels (simulated) and the NumPy array code give the CPU's layer bit
    for bit, never worse than its input."""
    n, m = 8, 256
    W, H = rng.standard_normal((n, m)), correlated_H(rng, m)
    layer = random_layer(rng, n, m, [2, 3])
    kw = {**MODES["all"], "rounds": 1}
    got = refine_layer(W, H, layer, **kw, backend=SIM)
    want = refine_layer(W, H, layer, **kw)
    for f in ("signs", "row_scale", "col_scale"):
        np.testing.assert_array_equal(getattr(got, f), getattr(want, f))
    assert output_error(W, got.dequantize(), H) < output_error(W, layer.dequantize(), H)


def test_quantize_layer_refines_on_its_backend(rng, small_launches, monkeypatch):
    """quantize_layer(backend="cuda") hands its backend to the refinement: the CUDA kernels run
    (counted), and the layer it reports is the one it returns."""
    from qdtk.math.daq import cuda as daq_cuda

    monkeypatch.setattr(daq_cuda, "solve_block",
                        partial(daq_cuda.solve_block, rows=3, threads=8, slices=2))
    calls = []

    def counted(*args, _kern=refine_cuda.group_dots):
        calls.append(1)
        return _kern(*args)

    monkeypatch.setattr(refine_cuda, "group_dots", counted)
    W = rng.standard_normal((3, 131)).astype(np.float32)
    H = correlated_H(rng, 131)
    got, rep = driver.quantize_layer(W, H, [2, 1], iters=1, backend="cuda", feedback="block",
                                     refine=MODES["rows"])
    assert calls
    D = W.astype(np.float64) - got.dequantize()
    assert rep.output_error == pytest.approx(np.einsum("ij,ij->", D @ H, D), rel=1e-4)


def test_group_refinement_on_the_cuda_backend(rng, small_launches, monkeypatch):
    """--group-refine with backend cuda: each group refined by the CUDA kernels (counted sign
    passes), never worse than the unrefined sweep, the report that of the returned layer."""
    from qdtk.math.daq import cuda as daq_cuda

    monkeypatch.setattr(daq_cuda, "solve_block",
                        partial(daq_cuda.solve_block, rows=3, threads=8, slices=2))
    calls = []

    def counted(*args, _kern=refine_cuda.sign_pass, **kw):
        calls.append(1)
        return _kern(*args, **kw)

    monkeypatch.setattr(refine_cuda, "sign_pass", counted)
    W = rng.standard_normal((3, 131)).astype(np.float32)
    H = correlated_H(rng, 131)
    out = {r: driver.quantize_layer(W, H, [2, 1], iters=1, backend="cuda", feedback="block",
                                    group_rounds=r) for r in (0, 1)}
    assert calls  # 2 groups x (1 round + the pass on the rounded scales)
    e = {r: output_error(W, lay.dequantize(), H) for r, (lay, _) in out.items()}
    assert e[1] <= e[0] * (1 + 1e-9)
    assert out[1][1].output_error == pytest.approx(e[1], rel=1e-4)


def test_kernels_compile_for_a_real_gpu():
    """The simulator runs Python, not the CUDA target: compile the kernels (float32 and float64
    states) to sm_90 PTX, so typing errors show here; nothing spills to local memory."""
    uses = ptx_facts("import numpy as np\nfrom qdtk.math.refine_cuda import ptx\n"
                     "uses = {k: '.local' in v for dt in (np.float32, np.float64) "
                     "for k, v in ptx(dt).items()}")
    assert uses == {"dequantize": False, "group_dots": False, "sign_pass_group": False,
                    "apply_changes": False}


@needs_gpu
@pytest.mark.parametrize("mode", ["rows", "full", "all"])
def test_refine_layer_on_a_gpu_matches_cpu(rng, mode):
    n, m = 256, 600
    W, H = rng.standard_normal((n, m)).astype(np.float32), correlated_H(rng, m)
    layer = random_layer(rng, n, m, [2, 3, 1, 4, 2])
    gpu = backend.get_backend("cuda")
    assert gpu.on_gpu
    got = refine_layer(W, H, layer, **MODES[mode], backend=gpu)
    want = refine_layer(W, H, layer, **MODES[mode])
    e = [output_error(W, x.dequantize(), H) for x in (layer, want, got)]
    assert e[2] < e[0]
    assert e[2] == pytest.approx(e[1], rel=1e-5)


@needs_gpu
def test_kernels_on_cupy_arrays_match_cpu(rng):
    import cupy

    K, n, m = 3, 300, 300
    S, a, b = state_arrays(rng, K, n, m, np.float32)
    want = refine._dequantize(S, a, b, group_index(m), np.empty((n, m), np.float32))
    dev = [cupy.asarray(x) for x in (S, a, b, group_index(m))]
    got = refine_cuda.dequantize(*dev, cupy.empty((n, m), np.float32))
    np.testing.assert_allclose(got.get(), want, rtol=1e-6, atol=1e-6)
    o, w, j0 = 3, 128, 128
    Sg, ab = S[:o, :, :w].copy(), rng.random((o, n, w)).astype(np.float32)
    R = rng.standard_normal((n, m)).astype(np.float32)
    Hrows = correlated_H(rng, m).astype(np.float32)[j0 : j0 + w]
    D0, Sd, D1 = np.zeros((n, w), np.float32), cupy.asarray(Sg), cupy.zeros((n, w), np.float32)
    refine_cuda.sign_pass(Sd, cupy.asarray(ab), cupy.asarray(R), cupy.asarray(Hrows), j0, D1)
    refine.sign_pass(Sg, ab, R.copy(), Hrows, j0, D0)
    # fused multiply-adds may flip a near tie, and a row's later columns follow it
    same = np.all(Sd.get() == Sg, axis=(0, 2))  # [n]
    assert same.mean() > 0.9
    np.testing.assert_allclose(D1.get()[same], D0[same], rtol=1e-4, atol=1e-5)
