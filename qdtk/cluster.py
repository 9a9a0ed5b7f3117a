"""`--cluster ray`: per-layer work of `qdtk quantize` as tasks on a Ray cluster.

The stages hand this module a module-level function and its jobs; it knows nothing of what they
compute. The layer solves (`qdtk.quantize.solve_layer_at`) and the model-scope pre-pass's
per-layer candidates (`qdtk.allocate.layer_candidates_at`) run this way: each task reads its
weight and statistic from the folders every node sees and returns its result, while the driver
keeps everything that plans or records the result: the fingerprints, the resume, the progress
bar, report.json and the files, written in the serial run's order from the same values. Those
are the serial run's bit for bit whatever CPUs a task reserved: the solves' thread-dependent
LAPACK calls run on one thread everywhere (qdtk.threads).

Faults: a task whose worker dies is run again (Ray's `max_retries`); a task that raises is not,
and its QdtkError reaches the user as the serial run's would; a killed driver leaves the
finished blocks' files, which a rerun keeps (the stage's own resume).

Ray is the optional extra `ray`: nothing here imports it before a cluster is asked for.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
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


def task_resources(num_cpus: int = 1, gpu: bool = False) -> dict[str, int]:
    """What each task reserves: `num_cpus` CPUs, and one GPU when the backend is CUDA."""
    return {"num_cpus": int(num_cpus), "num_gpus": 1 if gpu else 0}


def run_task(fn: Callable[..., Any], threads: int, *args: Any) -> Any:
    """fn(*args) on a Ray worker, with Numba's threads held to the CPUs the task reserved
    (Ray sets OMP_NUM_THREADS, which BLAS reads, itself; the results do not depend on either
    count: qdtk.threads)."""
    import numba

    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    return fn(*args)


class Cluster:
    """The Ray cluster that --cluster names, connected on first use: a stage that finds all
    its work done never starts one. `close` ends a connection made here (which stops a local
    cluster started here); one the caller made stays."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self._connected_here = False

    def tasks(self, fn: Callable[..., Any], jobs: Sequence[tuple[Hashable, tuple]],
              resources: Mapping[str, int]) -> contextlib.AbstractContextManager:
        """`ray_tasks(fn, jobs, resources)` on this cluster."""
        ray = import_ray()
        if not ray.is_initialized():
            address = parse_cluster(check_cluster(self.spec))
            try:
                ray.init(address=address, include_dashboard=False)
            except ConnectionError as e:
                raise QdtkError(f"--cluster {self.spec}: no Ray cluster there ({e})") from None
            self._connected_here = True
        return ray_tasks(fn, jobs, resources)

    def close(self) -> None:
        if self._connected_here:
            import_ray().shutdown()
            self._connected_here = False


@contextlib.contextmanager
def connected(spec: str | None) -> Iterator[Cluster | None]:
    """A Cluster for --cluster SPEC (None without one), closed on exit."""
    if spec is None:
        yield None
        return
    cluster = Cluster(spec)
    try:
        yield cluster
    finally:
        cluster.close()


@contextlib.contextmanager
def ray_tasks(
    fn: Callable[..., Any],
    jobs: Sequence[tuple[Hashable, tuple]],
    resources: Mapping[str, int],
) -> Iterator[Callable[[Hashable], Any]]:
    """Submit one task `fn(*args)` per (key, args) of `jobs`, each reserving `resources`, to
    the connected cluster (`Cluster.tasks`); yield `result(key)`, which waits for that job's
    task and gives its value (a task's QdtkError is raised as the serial run's would be). `fn`
    must be importable by the workers (a module-level function). Tasks not yet collected are
    cancelled on exit."""
    ray = import_ray()
    task = ray.remote(run_task).options(**resources, max_retries=RETRIES)
    refs: dict[Hashable, Any] = {}

    def result(key: Hashable) -> Any:
        try:
            return ray.get(refs.pop(key))
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, QdtkError):  # bad input: the serial run's message
                raise e.cause from None
            raise

    try:
        for key, args in jobs:
            refs[key] = task.remote(fn, resources["num_cpus"], *args)
        log.info("%d tasks of %s submitted to Ray (%s CPUs in the cluster)", len(refs),
                 getattr(fn, "__name__", fn), ray.cluster_resources().get("CPU", 0))
        yield result
    finally:
        for ref in refs.values():
            ray.cancel(ref)
