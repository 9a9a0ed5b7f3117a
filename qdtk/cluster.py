"""`--cluster ray`: the layer solves of `qdtk quantize` as tasks on a Ray cluster.

The driver (`qdtk.quantize.quantize_model`) keeps everything that plans or records the result:
the fingerprints, the resume, the progress bar, report.json and the solution files, which it
writes in the serial run's order from the same layers. A task solves one Linear exactly as the
serial run does (`qdtk.quantize.solve_layer`), reading its weight and statistic from the folders
every node sees, and returns the layer and its report; the files are the serial run's bit for
bit where each task's BLAS runs on as many threads as the serial run's did (OpenBLAS's results
depend on its thread count; a task's follow its CPUs: Ray sets OMP_NUM_THREADS).

Faults: a task whose worker dies is run again (Ray's `max_retries`); a task that raises is not,
and its QdtkError reaches the user as the serial run's would; a killed driver leaves the
finished blocks' files, which a rerun keeps (the stage's own resume).

Ray is the optional extra `ray`: nothing here imports it before a cluster is asked for.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from qdtk.errors import QdtkError

log = logging.getLogger(__name__)

SCHEME = "ray"
RETRIES = 3  # runs of a task after its worker died (Ray's own default for tasks)
INSTALL = "pip install 'qdtk[ray]' (in a qdtk checkout: .venv/bin/pip install -e '.[ray]')"


def parse_cluster(spec: str) -> str | None:
    """The Ray address of `--cluster SPEC`: "ray" gives None (ray.init's own choice: RAY_ADDRESS,
    else a cluster running on this node, else a new local one), "ray://ADDRESS" gives ADDRESS
    (a head node's HOST:PORT, or "auto")."""
    if spec == SCHEME:
        return None
    prefix = f"{SCHEME}://"
    if spec.startswith(prefix) and len(spec) > len(prefix):
        return spec[len(prefix):]
    raise QdtkError(f"--cluster {spec!r}: expected ray or ray://HOST:PORT (the Ray head node)")


def import_ray() -> Any:
    """The ray module, or a QdtkError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise QdtkError(f"--cluster ray needs Ray, qdtk's optional extra: {INSTALL}") from None
    return ray


def check_cluster(spec: str) -> str:
    """`spec` when it is a valid --cluster, Ray is installed and a HOST:PORT it names answers
    (checked before any work: Ray itself retries an address that does not for minutes)."""
    address = parse_cluster(spec)
    import_ray()
    host, _, port = (address or "").rpartition(":")
    if host and port.isdigit():
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as e:
            raise QdtkError(f"--cluster {spec}: no Ray head node answers at {address} "
                            f"({e.strerror or e})") from None
    return spec


def task_resources(options: Mapping[str, Any]) -> dict[str, int]:
    """What each task reserves: options["num_cpus"] CPUs (default 1), and one GPU with the
    CUDA backend."""
    return {"num_cpus": int(options.get("num_cpus", 1)),
            "num_gpus": 1 if options.get("backend") == "cuda" else 0}


def solve_task(model_dir: str, stats_dir: str, solver: Callable, options: Mapping[str, Any],
               name: str, orders: list[int] | None, threads: int) -> tuple:
    """One Linear on a Ray worker: the serial run's `solve_layer`, with Numba's threads held to
    the CPUs the task reserved (Ray sets OMP_NUM_THREADS, which BLAS reads, itself)."""
    import numba

    from qdtk.checkpoint import Checkpoint
    from qdtk.quantize import solve_layer
    from qdtk.stats import Stats

    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    return solve_layer(Checkpoint(model_dir), Stats(stats_dir), solver, options, name, orders)


@contextlib.contextmanager
def ray_layers(
    options: Mapping[str, Any],
    model_dir: str | Path,
    stats_dir: str | Path,
    solver: Callable,
    todo: Sequence[tuple[str, list[int] | None]],
) -> Iterator[Callable[[str], tuple]]:
    """Submit one task per (Linear, planned orders) of `todo` to the cluster options["cluster"]
    names; yield `result(name) -> (shape, layer, report)`, which waits for that Linear's task.

    Each task reserves `task_resources(options)`. On exit, tasks not yet collected are
    cancelled and a connection made here is closed (which stops a local cluster started here).
    """
    ray = import_ray()
    address = parse_cluster(check_cluster(options["cluster"]))
    connected_here = not ray.is_initialized()
    if connected_here:
        try:
            ray.init(address=address, include_dashboard=False)
        except ConnectionError as e:
            raise QdtkError(f"--cluster {options['cluster']}: no Ray cluster there ({e})") from None
    resources = task_resources(options)
    task = ray.remote(solve_task).options(**resources, max_retries=RETRIES)
    refs: dict[str, Any] = {}

    def result(name: str) -> tuple:
        try:
            return ray.get(refs.pop(name))
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, QdtkError):  # bad input: the serial run's message
                raise e.cause from None
            raise

    try:
        for w, orders in todo:
            refs[w] = task.remote(str(model_dir), str(stats_dir), solver, options, w, orders,
                                  resources["num_cpus"])
        log.info("%d layer solves submitted to Ray (%s CPUs in the cluster)", len(refs),
                 ray.cluster_resources().get("CPU", 0))
        yield result
    finally:
        for ref in refs.values():
            ray.cancel(ref)
        if connected_here:
            ray.shutdown()
