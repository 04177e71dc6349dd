"""Compiling a stage's train step ahead of time for any mesh, real or a TPU topology's, with no weights.

The state and batch are `jax.ShapeDtypeStruct`s carrying their shardings (`steps.abstract_train_state`), and
the step is jitted exactly as the training loop jits it, so what compiles here is what would run there.
"""

import jax

from cxrllava_jax import sharding
from cxrllava_jax.training.steps import abstract_train_state, jit_train_step


def abstract_batch(task, global_batch: int, mesh):
    """The task's batch of `global_batch` rows as abstract arrays split over the mesh's batch axes."""
    return {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(mesh, x.ndim))
            for k, x in task.abstract_batch(global_batch).items()}


def lower_train_step(task, tx, frozen: tuple[str, ...], mesh, global_batch: int, frozen_dtype):
    """(lowered train step, abstract state): `.compile()` it, then read `memory_analysis()`."""
    state = abstract_train_state(task, tx, frozen, mesh, frozen_dtype)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
    step = jit_train_step(task, tx, frozen, state_shardings)
    with sharding.activate(mesh):
        return step.lower(state, abstract_batch(task, global_batch, mesh), rng), state
