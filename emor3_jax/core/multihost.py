"""Several processes, one run: start-up, and moving host data between processes.

The same command runs on every host. `initialize` joins the processes into one JAX runtime
when this is one process of several:
  - explicit: JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES, JAX_PROCESS_ID;
  - else any cluster jax.distributed detects by itself (jax._src.clusters, in its order):
    Open MPI, SLURM, a Cloud TPU VM slice on GKE (TPU_WORKER_HOSTNAMES) or GCE (the VM's
    metadata server: no environment variable needed), Kubernetes jobs; several TPU slices
    (MEGASCALE_NUM_SLICES) count every slice's workers. jax then finds the coordinator, the
    process count and this process's id itself.
A cluster of one process (one TPU VM host, a one-task SLURM step) and no cluster at all:
nothing happens. CPU devices need gloo for cross-process collectives, which `initialize` selects.

Data flow of a step: each process reads only its block of the global batch (see
data/pipeline.py), `gather_records` hands every process the whole global batch (encoded
records, in process order, so it equals what one process would read), every process then
builds the same host arrays, which jit places on the global mesh as replicated inputs and
shards inside the program. Device outputs come back with `to_host`; each process scores the
rewards of its own rows (`local_rows`) and `gather_rows` puts them together again.
"""

from __future__ import annotations

import os
import pickle

import jax
import numpy as np

_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def detected_cluster():
    """The cluster environment jax.distributed.initialize() would use without arguments (a
    jax._src.clusters.ClusterEnv subclass: its detection, in its order, skipping the opt-in
    ones such as mpi4py), or None. jax has no public API for this question."""
    from jax._src.clusters import ClusterEnv

    return next((e for e in ClusterEnv._cluster_types if not e.opt_in_only_method and e.is_env_present()), None)


def launch_mode() -> str:
    """'explicit', the cluster jax detects when it has more than one process (its class name:
    'GceTpuCluster', 'GkeTpuCluster', 'SlurmCluster', 'OmpiCluster', 'K8sCluster'), or 'single':
    how this process was started."""
    given = [k for k in _ENV if os.environ.get(k)]
    if given:
        if len(given) != len(_ENV):
            missing = sorted(set(_ENV) - set(given))
            raise ValueError(f"multi-process launch: {given} set but {missing} missing; set all three or none")
        return "explicit"
    cluster = detected_cluster()
    if cluster is not None and cluster.get_process_count() > 1:
        return cluster.__name__
    return "single"


def initialize() -> str:
    """Joins the other processes of this run (if any); call before anything touches devices."""
    mode = launch_mode()
    if mode == "single":
        return mode
    # CPU devices talk across processes only through gloo; the setting leaves GPUs and TPUs alone.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if mode == "explicit":
        n, pid = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        if not 0 <= pid < n:
            raise ValueError(f"JAX_PROCESS_ID={pid} must be in [0, JAX_NUM_PROCESSES={n})")
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], num_processes=n, process_id=pid)
    else:
        jax.distributed.initialize()  # detects the same cluster again (K8sCluster has no name to pass)
    if jax.process_index() == 0:
        print(
            f"multi-process ({mode}): {jax.process_count()} processes, {jax.device_count()} devices "
            f"({jax.local_device_count()} per process)",
            flush=True,
        )
    return mode


def is_main() -> bool:
    """The process that writes logs, results and exports."""
    return jax.process_index() == 0


def local_rows(rows: int) -> slice:
    """This process's rows of a global batch of `rows` (contiguous blocks in process order)."""
    n = jax.process_count()
    if rows % n:
        raise ValueError(f"a global batch of {rows} rows does not split over {n} processes")
    per = rows // n
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def gather_rows(local: np.ndarray) -> np.ndarray:
    """Per-process arrays [r, ...] (same shape everywhere) -> [processes * r, ...] in process order."""
    local = np.asarray(local)
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def gather_records(local: list) -> list:
    """Every process's list (of picklable records), concatenated in process order, on every process."""
    if jax.process_count() == 1:
        return list(local)
    blob = np.frombuffer(pickle.dumps(list(local)), np.uint8)
    sizes = gather_rows(np.array([blob.size], np.int64))
    padded = np.zeros((int(sizes.max()),), np.uint8)
    padded[: blob.size] = blob
    blobs = gather_rows(padded[None])
    out = []
    for row, size in zip(blobs, sizes):
        out.extend(pickle.loads(row[:size].tobytes()))
    return out


def to_host(x: jax.Array) -> np.ndarray:
    """A device array as numpy on this process, whole even when other processes hold parts of it
    (numpy passes through). The one way device outputs reach the host: np.asarray or
    jax.device_get on an array sharded across processes raises."""
    if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any (e.g. a SIGTERM one host received)."""
    return bool(gather_rows(np.array([flag], bool)).any())


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
