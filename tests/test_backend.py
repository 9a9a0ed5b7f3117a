"""Device selection: auto/cpu/cuda, the simulator, and a GPU check that never raises."""

import sys
import types

import numba
import numpy as np
import pytest

from qdtk import backend
from qdtk.errors import QdtkError


@pytest.fixture
def fresh_status():
    backend.gpu_status.cache_clear()
    yield
    backend.gpu_status.cache_clear()


def test_cpu_and_auto_here():
    """No GPU on this machine (and the simulator is on): auto is the CPU."""
    from qdtk.backend import cholesky_lower

    assert backend.get_backend("cpu") is backend.CPU
    b = backend.get_backend("auto")
    assert (b.device, b.xp, b.daq, b.cholesky) == ("cpu", np, "cpu", cholesky_lower)
    assert not b.on_gpu


def test_simulator_is_not_a_gpu(monkeypatch, fresh_status):
    monkeypatch.setattr(numba.config, "ENABLE_CUDASIM", 1)
    ok, why = backend.gpu_status()
    assert not ok and "simulator" in why
    assert backend.get_backend("auto").device == "cpu"
    b = backend.get_backend("cuda")  # explicit: the CUDA kernels on the simulator
    assert (b.device, b.xp, b.daq, b.simulated) == ("cuda", np, "cuda", True)


def test_cuda_without_gpu_is_a_clear_error(monkeypatch, fresh_status):
    monkeypatch.setattr(numba.config, "ENABLE_CUDASIM", 0)
    monkeypatch.setitem(sys.modules, "cupy", None)  # CuPy not installed
    ok, why = backend.gpu_status()
    assert not ok and "cupy" in why
    assert backend.get_backend("auto") is backend.CPU
    with pytest.raises(QdtkError, match="--device cuda: no usable CUDA GPU"):
        backend.get_backend("cuda")


def test_driver_errors_are_survived(monkeypatch, fresh_status):
    def broken():
        raise RuntimeError("cudaErrorInsufficientDriver")

    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(is_available=broken)
    monkeypatch.setattr(numba.config, "ENABLE_CUDASIM", 0)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    ok, why = backend.gpu_status()
    assert not ok and "InsufficientDriver" in why


def test_auto_picks_a_reported_gpu(monkeypatch):
    pytest.importorskip("cupy")
    monkeypatch.setattr(backend, "gpu_status", lambda: (True, "Test GPU"))
    from qdtk.backend import cholesky_lower_gpu

    for device in ("auto", "cuda"):
        b = backend.get_backend(device)
        assert (b.device, b.daq, b.on_gpu, b.xp.__name__) == ("cuda", "cuda", True, "cupy")
        assert b.cholesky is cholesky_lower_gpu


def test_unknown_device():
    with pytest.raises(QdtkError, match="expected one of auto, cpu, cuda"):
        backend.get_backend("tpu")


def test_transfers_and_array_module():
    from numba import cuda

    x = np.arange(6.0).reshape(2, 3)
    assert backend.array_module(x) is np
    assert backend.CPU.to_device(x) is x
    assert backend.CPU.to_device(x, np.float32).dtype == np.float32
    np.testing.assert_array_equal(backend.to_host(cuda.to_device(x)), x)
    np.testing.assert_array_equal(backend.to_host([1, 2]), [1, 2])
    backend.CPU.synchronize()


@pytest.mark.skipif(not backend.gpu_available(), reason="needs a CUDA GPU (CuPy reports none)")
def test_gpu_round_trip():
    b = backend.get_backend("cuda")
    x = np.arange(6.0)
    d = b.to_device(x)
    assert backend.array_module(d) is b.xp
    np.testing.assert_array_equal(backend.to_host(d), x)
