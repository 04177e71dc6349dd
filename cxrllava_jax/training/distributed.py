"""Multi-host start-up: `jax.distributed` is the only communication layer (no home-made collectives)."""

import logging
import os

import jax

log = logging.getLogger(__name__)

# The variables by which JAX's own cluster detection (jax/_src/clusters/) recognises a launcher that started
# several processes and can name their coordinator; `jax.distributed.initialize()` without arguments succeeds
# only where one of these sets is complete. SLURM's step variables exist under `srun` alone: an `sbatch`
# script or an `salloc` shell has SLURM_JOB_ID but no step, and is one process.
CLUSTER_VARIABLES = {
    "slurm": ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"),
    "ompi": ("OMPI_MCA_orte_hnp_uri",),
    "gketpu": ("TPU_WORKER_HOSTNAMES",),
}
# How many processes each launcher started (absent: JAX asks the launcher).
PROCESS_COUNTS = {"slurm": "SLURM_NTASKS", "ompi": "OMPI_COMM_WORLD_SIZE"}


def detected_cluster(env=os.environ) -> str | None:
    """The launcher JAX would detect that started more than one process, or None (nothing to join)."""
    for name, variables in CLUSTER_VARIABLES.items():
        if all(v in env for v in variables) and int(env.get(PROCESS_COUNTS.get(name, ""), "2")) > 1:
            if name == "gketpu" and len(env["TPU_WORKER_HOSTNAMES"].split(",")) < 2:
                continue
            return name
    return None


def initialize():
    """Joins the job's processes when launched multi-process; a single process needs nothing.

    Under `srun`, `mpirun` (Open MPI) and multi-host TPU slices JAX finds the coordinator itself. Elsewhere
    set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. On CPU, cross-process collectives
    go through gloo.
    """
    num_processes = int(os.environ.get("JAX_NUM_PROCESSES", "1"))
    cluster = detected_cluster()
    if num_processes <= 1 and cluster is None:
        if "SLURM_JOB_ID" in os.environ and "SLURM_STEP_NODELIST" not in os.environ:
            log.info("SLURM job without a step (sbatch or salloc without srun): running as one process; "
                     "launch with srun for one process per task")
        return
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if num_processes > 1:
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=num_processes,
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    else:  # the launcher we detected, by JAX's name for it (a TPU slice: JAX also reads the VM's metadata)
        jax.distributed.initialize(cluster_detection_method=None if cluster == "gketpu" else cluster)
