"""Multi-host start-up: `jax.distributed` is the only communication layer (no home-made collectives)."""

import os

import jax


def initialize():
    """Joins the job's processes when launched multi-process; a single process needs nothing.

    On TPU pods and SLURM/Kubernetes GPU clusters JAX finds the coordinator itself. Elsewhere set
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. On CPU, cross-process collectives
    go through gloo.
    """
    num_processes = int(os.environ.get("JAX_NUM_PROCESSES", "1"))
    cluster = any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE"))
    if num_processes <= 1 and not cluster:
        return
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if num_processes > 1:
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=num_processes,
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()
