"""`training.distributed.initialize` joins processes exactly where JAX's own cluster detection can name a
coordinator: `srun` steps and Open MPI, never an `sbatch` script or `salloc` shell (SLURM_JOB_ID without a step),
where `jax.distributed.initialize()` would raise "coordinator_address should be defined"."""

import jax
import pytest
from jax._src import clusters

from cxrllava_jax.training import distributed

SRUN = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
        "SLURM_LOCALID": "0", "SLURM_NNODES": "2"}
SBATCH = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[001-002]"}
MPIRUN = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911", "OMPI_COMM_WORLD_SIZE": "4",
          "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
JAX_CLUSTERS = {"slurm": clusters.SlurmCluster, "ompi": clusters.OmpiCluster}


@pytest.mark.parametrize("env, expected", [
    (SRUN, "slurm"), (SBATCH, None), ({**SRUN, "SLURM_NTASKS": "1"}, None), (MPIRUN, "ompi"),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, None),  # Open MPI 5 without ORTE: JAX cannot find a coordinator
    ({}, None)])
def test_detection_agrees_with_jax(monkeypatch, env, expected):
    for name in {v for variables in distributed.CLUSTER_VARIABLES.values() for v in variables} | set(env):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert distributed.detected_cluster() == expected
    # JAX recognises exactly the launchers we join through (where they started more than one process).
    recognised = {name for name, cluster in JAX_CLUSTERS.items() if cluster.is_env_present()
                  and cluster.get_process_count() > 1}
    assert recognised == ({expected} - {None})


@pytest.mark.parametrize("env, joins", [(SRUN, True), (SBATCH, False), (MPIRUN, True)])
def test_initialize_calls_jax_only_when_a_launcher_is_there(monkeypatch, env, joins):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for name in {v for variables in distributed.CLUSTER_VARIABLES.values() for v in variables} | {"JAX_NUM_PROCESSES"}:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    distributed.initialize()
    assert calls == ([{"cluster_detection_method": distributed.detected_cluster()}] if joins else [])

