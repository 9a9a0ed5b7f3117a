"""`--cluster ray` (qdtk.cluster): the layer solves as Ray tasks give the serial run's files bit
for bit, survive a killed worker and a killed driver, and stop on bad input as the serial run
does. One small local Ray cluster (2 CPUs) serves the whole module."""

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import qdtk.cluster
import qdtk.quantize
from qdtk.cli.main import cli
from qdtk.cluster import parse_cluster, task_resources
from qdtk.errors import QdtkError
from qdtk.formats.solution import REPORT
from qdtk.quantize import quantize_model
from qdtk.solve.solvers import solve_daq
from tests import test_quantize
from tests.test_quantize import OPTIONS, block_bytes, correlated_H, fake_output_change

model_and_stats = test_quantize.model_and_stats  # the stage tests' tiny model (3 blocks, 9 Linears)

# All tests of this module in one pytest-xdist worker: one Ray cluster, not one per worker.
pytestmark = pytest.mark.xdist_group("ray")
CLUSTER = {**OPTIONS, "cluster": "ray"}


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs (2 workers), small and quiet; quantize_model reuses it."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
             log_to_driver=False)
    yield ray
    ray.shutdown()


@dataclass
class Recording:
    """solve_daq, leaving a file LAYER@PID in `folder` per solve. The worker that gets the layer
    `die_on` first kills its own process; `nan_on` gets a NaN in its weight (bad input)."""

    folder: Path
    die_on: str | None = None
    nan_on: str | None = None

    def __call__(self, W, H, options, name="layer", orders=None):
        if name == self.die_on and not (self.folder / "died").exists():
            (self.folder / "died").write_text(str(os.getpid()))
            os._exit(1)
        if name == self.nan_on:
            W = W.copy()
            W[0, 0] = np.nan
        (self.folder / f"{name}@{os.getpid()}").touch()
        return solve_daq(W, H, options, name, orders)

    def solved(self) -> list[str]:
        return sorted(p.name.split("@")[0] for p in self.folder.glob("*@*"))

    def pids(self) -> set[int]:
        return {int(p.name.split("@")[1]) for p in self.folder.glob("*@*")}


def recording(tmp_path, name="calls", **kw) -> Recording:
    (tmp_path / name).mkdir()
    return Recording(tmp_path / name, **kw)


def report_without_times(out: Path) -> dict:
    report = json.loads((out / REPORT).read_text())
    for r in report["layers"].values():
        for k in [k for k in r if k.startswith("seconds")]:
            del r[k]
    del report["summary"]["seconds"]
    return report


def test_cluster_gives_the_serial_files_bit_for_bit(ray_cluster, model_and_stats, tmp_path):
    """Shapes this small run on one BLAS thread either way; on real ones the bits also need the
    serial run's BLAS threads per task (README: --num-cpus)."""
    model, stats = model_and_stats
    quantize_model(model, stats, tmp_path / "serial", OPTIONS, progress=False)
    calls = recording(tmp_path)
    quantize_model(model, stats, tmp_path / "ray", CLUSTER, calls, progress=False)
    assert block_bytes(tmp_path / "ray") == block_bytes(tmp_path / "serial")
    assert len(block_bytes(tmp_path / "ray")) == 3
    assert report_without_times(tmp_path / "ray") == report_without_times(tmp_path / "serial")
    assert len(calls.solved()) == 9 and os.getpid() not in calls.pids()  # solved by workers
    assert ray_cluster.is_initialized()  # a cluster the caller started stays up


def blas_threads() -> int:
    from threadpoolctl import threadpool_info

    return min((lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"),
               default=1)


@pytest.fixture
def wide_model(tmp_path):
    """One block of one 64 x 768 Linear: wide enough that OpenBLAS's LAPACK runs on 2 threads
    and its bits then differ from 1 thread's (measured: qdtk.threads)."""
    from qdtk.formats.checkpoint import Checkpoint, CheckpointWriter
    from qdtk.formats.stats import InputStat, StatsWriter

    rng = np.random.default_rng(3)
    model, stats = tmp_path / "wide", tmp_path / "wide-stats"
    with CheckpointWriter(model) as w:
        w.add("model.layers.0.mlp.down_proj.weight",
              rng.standard_normal((64, 768)).astype(np.float32))
    writer = StatsWriter(stats, str(model), Checkpoint(model).fingerprint(), {"test": True})
    writer.write_block(0, "model.layers.0", [InputStat(
        "model.layers.0.mlp.down_proj", ["model.layers.0.mlp.down_proj.weight"],
        correlated_H(rng, 768), 600)])
    writer.finish()
    return model, stats


def test_tasks_on_one_cpu_give_the_bits_of_a_serial_run_on_two(ray_cluster, wide_model,
                                                              tmp_path):
    """The serial run's BLAS uses the machine's threads, a task's the one CPU it reserved
    (Ray's OMP_NUM_THREADS): the thread-dependent LAPACK calls run on one thread in both."""
    if blas_threads() < 2:
        pytest.skip("BLAS runs on one thread here: nothing to compare")
    model, stats = wide_model
    options = {**OPTIONS, "iters": 3, "feedback": "block", "refine": "full", "shrink": 0.25}
    quantize_model(model, stats, tmp_path / "serial", options, progress=False)
    quantize_model(model, stats, tmp_path / "ray", {**options, "cluster": "ray", "num_cpus": 1},
                   progress=False)
    assert block_bytes(tmp_path / "ray") == block_bytes(tmp_path / "serial")
    assert report_without_times(tmp_path / "ray") == report_without_times(tmp_path / "serial")


def test_model_scope_prepass_runs_as_tasks_with_the_serial_result(
    ray_cluster, model_and_stats, tmp_path, monkeypatch
):
    """--cluster: the pre-pass's per-layer candidates are tasks too (the driver computes none
    itself, only the sensitivities' forwards), and orders.json and the files are the serial
    run's."""
    import qdtk.allocate
    import qdtk.torch.evaluate
    from qdtk.formats.io import read_json

    model, stats = model_and_stats
    calls = []
    monkeypatch.setattr(qdtk.torch.evaluate, "output_change_fn",
                        fake_output_change(model, {"down_proj": 1e3}, calls))
    options = {**OPTIONS, "abmp": "knapsack", "bits": None, "budget_scope": "model"}
    quantize_model(model, stats, tmp_path / "serial", options, progress=False)

    def not_here(*args):
        raise AssertionError("the driver computed a layer's candidates itself")

    monkeypatch.setattr(qdtk.allocate, "_candidates", not_here)
    calls.clear()
    quantize_model(model, stats, tmp_path / "ray", {**options, "cluster": "ray"}, progress=False)
    assert len(calls) == 1 + 9  # the forwards: built once, one per layer, on the driver
    assert read_json(tmp_path / "ray" / "orders.json") == \
        read_json(tmp_path / "serial" / "orders.json")
    assert block_bytes(tmp_path / "ray") == block_bytes(tmp_path / "serial")


def test_killed_worker_is_retried(ray_cluster, model_and_stats, tmp_path):
    model, stats = model_and_stats
    quantize_model(model, stats, tmp_path / "serial", OPTIONS, progress=False)
    victim = "model.layers.1.self_attn.q_proj.weight"
    calls = recording(tmp_path, die_on=victim)
    quantize_model(model, stats, tmp_path / "ray", CLUSTER, calls, progress=False)
    dead = int((calls.folder / "died").read_text())
    assert not (calls.folder / f"{victim}@{dead}").exists()  # died before solving it ...
    assert calls.solved().count(victim) == 1  # ... and solved once, by another worker
    assert block_bytes(tmp_path / "ray") == block_bytes(tmp_path / "serial")


def test_rerun_after_a_killed_driver_redoes_only_the_unfinished(
    ray_cluster, model_and_stats, tmp_path, monkeypatch
):
    model, stats = model_and_stats
    quantize_model(model, stats, tmp_path / "serial", OPTIONS, progress=False)
    real_write = qdtk.quantize.write_solution_block

    def write_then_die(path, *args):
        if Path(path).name == "block_0001.safetensors":
            raise KeyboardInterrupt  # the driver is killed after its first block
        real_write(path, *args)

    monkeypatch.setattr(qdtk.quantize, "write_solution_block", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(model, stats, tmp_path / "ray", CLUSTER, recording(tmp_path, "first"),
                       progress=False)
    assert list(block_bytes(tmp_path / "ray")) == ["block_0000.safetensors"]
    monkeypatch.setattr(qdtk.quantize, "write_solution_block", real_write)
    calls = recording(tmp_path, "rerun")
    quantize_model(model, stats, tmp_path / "ray", CLUSTER, calls, progress=False)
    assert len(calls.solved()) == 6
    assert not any(w.startswith("model.layers.0.") for w in calls.solved())
    assert block_bytes(tmp_path / "ray") == block_bytes(tmp_path / "serial")
    monkeypatch.setattr(qdtk.cluster, "ray_tasks", None)  # a finished run needs no cluster
    quantize_model(model, stats, tmp_path / "ray", CLUSTER, calls, progress=False)
    assert len(calls.solved()) == 6


def test_bad_input_stops_with_the_serial_message(ray_cluster, model_and_stats, tmp_path):
    model, stats = model_and_stats
    bad = "model.layers.1.mlp.down_proj.weight"
    with pytest.raises(QdtkError) as serial:
        quantize_model(model, stats, tmp_path / "serial", OPTIONS,
                       recording(tmp_path, "s", nan_on=bad), progress=False)
    with pytest.raises(QdtkError) as remote:
        quantize_model(model, stats, tmp_path / "ray", CLUSTER,
                       recording(tmp_path, "r", nan_on=bad), progress=False)
    assert str(remote.value) == str(serial.value) == f"{bad}: the weight contains NaN or Inf"
    assert block_bytes(tmp_path / "ray") == block_bytes(tmp_path / "serial")  # block 0 kept
    assert list(block_bytes(tmp_path / "ray")) == ["block_0000.safetensors"]


def test_cli_cluster_option(ray_cluster, model_and_stats, tmp_path):
    model, stats = model_and_stats
    args = ["quantize", str(model), "--stats", str(stats), "--iters", "2", "--abmp", "none",
            "--refine", "none", "--backend", "cpu"]
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "serial")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "ray"), "--cluster", "ray",
                                 "--num-cpus", "1"])
    assert r.exit_code == 0, r.output
    assert block_bytes(tmp_path / "ray") == block_bytes(tmp_path / "serial")
    options = json.loads((tmp_path / "ray" / REPORT).read_text())["options"]
    assert "cluster" not in options and "num_cpus" not in options  # not in the fingerprint


def test_cluster_option_errors(model_and_stats, tmp_path, monkeypatch):
    model, stats = model_and_stats
    args = ["quantize", str(model), "--stats", str(stats), "--out", str(tmp_path / "q")]
    r = CliRunner().invoke(cli, [*args, "--cluster", "dask"])
    assert r.exit_code == 1 and "--cluster 'dask': expected ray or ray://HOST:PORT" in r.output
    if importlib.util.find_spec("ray"):
        r = CliRunner().invoke(cli, [*args, "--cluster", "ray://127.0.0.1:1"])
        assert r.exit_code == 1 and "no Ray head node answers at 127.0.0.1:1" in r.output
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    r = CliRunner().invoke(cli, [*args, "--cluster", "ray"])
    assert r.exit_code == 1
    assert "--cluster ray needs Ray, qdtk's optional extra: pip install 'qdtk[ray]'" in r.output
    assert not (tmp_path / "q").exists()  # nothing was started
    r = CliRunner().invoke(cli, ["run", str(model), "--sequential", "--cluster", "ray"])
    assert r.exit_code != 0 and "--sequential" in r.output and "--cluster" in r.output


def test_run_passes_the_cluster_to_the_quantize_stage(model_and_stats, monkeypatch):
    pytest.importorskip("ray")
    import qdtk.pipeline

    seen = {}

    def run(model, calib, out, opts, echo):
        seen.update(vars(opts.quantize))
        raise QdtkError("stopped here")

    monkeypatch.setattr(qdtk.pipeline, "run", run)
    model, _ = model_and_stats
    r = CliRunner().invoke(cli, ["run", str(model), "--cluster", "ray://auto", "--num-cpus", "2"])
    assert r.exit_code == 1 and "stopped here" in r.output
    assert seen["cluster"] == "ray://auto" and seen["num_cpus"] == 2


def test_addresses_and_task_resources():
    assert parse_cluster("ray") is None
    assert parse_cluster("ray://10.0.0.1:6379") == "10.0.0.1:6379"
    assert parse_cluster("ray://auto") == "auto"
    with pytest.raises(QdtkError, match="expected ray or ray://"):
        parse_cluster("ray://")
    assert task_resources(gpu=False) == {"num_cpus": 1, "num_gpus": 0}
    assert task_resources(4, gpu=True) == {"num_cpus": 4, "num_gpus": 1}
