"""Multi-host start-up: `initialize()` first thing in train.py / evaluate.py, before any JAX work.

One process per host (or per GPU); every process runs the same program. After initialize(),
jax.devices() lists the devices of all processes, meshes (sharding.make_mesh) span them, each
process reads only its own data shard (the Grain pipelines shard by jax.process_index()) and
feeds its rows with sharding.global_batch, and Orbax writes each checkpoint collectively (every
process its own shards, process 0 the metadata).

Where the processes learn of each other, in this order:
  1. JAX_COORDINATOR_ADDRESS=host:port (process 0's host), JAX_NUM_PROCESSES, JAX_PROCESS_ID
     (and optionally JAX_LOCAL_DEVICE_IDS): any launcher, e.g. a shell loop over hosts;
  2. a multi-process cluster launch that jax.distributed detects itself: SLURM (a job step started
     by srun with more than one task; not an salloc shell or an sbatch script without srun),
     Open MPI (mpirun), Kubernetes indexed jobs (with the `kubernetes` package), multi-host Cloud
     TPU VMs;
  3. neither: a single process, nothing to do.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Mapping

import jax

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


# The variables jax.distributed's own cluster detection needs (jax/_src/clusters/*): an
# `salloc` shell or an sbatch script without `srun` has SLURM_JOB_ID and SLURM_NTASKS but no
# step, and is one process.
_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_OMPI = ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE")


def _cluster_size(env: Mapping[str, str]) -> int:
    """Processes of a cluster launch that jax.distributed detects (1 when there is none)."""
    if all(k in env for k in _SLURM):
        return int(env["SLURM_NTASKS"])
    if all(k in env for k in _OMPI):
        return int(env["OMPI_COMM_WORLD_SIZE"])
    if "KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env:
        if importlib.util.find_spec("kubernetes") is None:  # jax's detection needs it
            raise ValueError("a Kubernetes indexed job: multi-host start-up asks the Kubernetes "
                             "API for the job's size, which needs `pip install kubernetes` (or "
                             f"set {ENV_ADDRESS}, {ENV_COUNT} and {ENV_ID})")
        return 2  # an indexed job: jax asks the Kubernetes API for the real size
    hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
    return max(1, len([h for h in hosts.split(",") if h]))


def initialize(env: Mapping[str, str] | None = None) -> bool:
    """Joins this process to the multi-host run the environment describes (see the module doc).
    Returns True if jax.distributed was initialised (now or before), False for a single process.
    ValueError (one line) for incomplete or malformed variables."""
    env = os.environ if env is None else env
    if jax.distributed.is_initialized():
        return True
    if env.get(ENV_ADDRESS):
        try:
            count = int(env[ENV_COUNT]) if env.get(ENV_COUNT) else None
            pid = int(env[ENV_ID]) if env.get(ENV_ID) else None
        except ValueError:
            raise ValueError(f"{ENV_COUNT}={env.get(ENV_COUNT)!r} and {ENV_ID}="
                             f"{env.get(ENV_ID)!r} must be integers") from None
        if (count is None or pid is None) and _cluster_size(env) == 1:
            raise ValueError(f"{ENV_ADDRESS} is set: set {ENV_COUNT} and {ENV_ID} too (or launch "
                             f"through SLURM / mpirun, which supply them)")
        jax.distributed.initialize(env[ENV_ADDRESS], num_processes=count, process_id=pid)
        return True
    if _cluster_size(env) > 1:
        jax.distributed.initialize()
        return True
    if env.get(ENV_COUNT, "1").strip() not in ("", "1") or env.get(ENV_ID, "0").strip() not in (
            "", "0"):  # each host would train alone, on the same workdir
        raise ValueError(f"{ENV_COUNT}={env.get(ENV_COUNT)!r} / {ENV_ID}={env.get(ENV_ID)!r} "
                         f"describe a multi-host run, but {ENV_ADDRESS} is not set: set it to "
                         f"process 0's host:port on every process")
    return False


def describe() -> str:
    """One line: this process among all and the devices it holds."""
    return (f"process {jax.process_index()}/{jax.process_count()}: "
            f"{jax.local_device_count()} of {jax.device_count()} devices "
            f"({jax.devices()[0].platform})")
