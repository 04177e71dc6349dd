"""The train state, how it is laid out on the mesh, and the pure, jitted train and eval steps.

Layout: parameters carry the shardings their logical axis names give (`sharding.logical_shardings`);
every optimizer-state leaf shaped like a trainable parameter (Adam's moments, the `optax.MultiSteps`
gradient accumulator) is sharded exactly like that parameter and created in place, so no device ever
holds a full moment; the rest of the optimizer state (step counts) is replicated. Parameters frozen for
the whole stage are held in the compute dtype: they get no update, so they need no fp32 master copy.
"""

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from cxrllava_jax import sharding
from cxrllava_jax.training.optim import merge, split_trainable


class TrainState(flax.struct.PyTreeNode):
    step: Any
    params: Any  # the whole model, frozen parts included
    opt_state: Any  # over the trainable parameters only (a flat {path: leaf} tree)


def opt_state_shardings(tx: optax.GradientTransformation, trainable: dict):
    """Shardings for `tx.init(trainable)`: a leaf under a parameter's path with that parameter's shape is
    sharded like it; anything else is replicated (or left to the compiler when no parameter has a mesh)."""
    meshes = [x.sharding.mesh for x in trainable.values() if isinstance(getattr(x, "sharding", None),
                                                                         jax.sharding.NamedSharding)]
    other = sharding.replicated(meshes[0]) if meshes else None

    def place(path, leaf):
        for key in reversed(path):
            name = getattr(key, "key", None)
            if name in trainable and trainable[name].shape == leaf.shape:
                return getattr(trainable[name], "sharding", None)
        return other

    return jax.tree_util.tree_map_with_path(place, jax.eval_shape(tx.init, trainable))


def init_opt_state(tx: optax.GradientTransformation, params, frozen):
    """Optimizer state for the parameters that `frozen` leaves trainable (groups released later included),
    created on its shards (`opt_state_shardings`). Abstract parameters give the abstract state: nothing allocated."""
    trainable, _ = split_trainable(params, frozen)
    init = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, trainable))
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in trainable.values()):
        return init.eval_shape(trainable)
    return init(trainable)


def hold_frozen(params, frozen, dtype):
    """`params` with the parameters matching the `frozen` regexes cast to `dtype`, each on its own shards.

    Works on arrays and on abstract `jax.ShapeDtypeStruct` trees (what ahead-of-time compiles take)."""
    if not frozen:
        return params
    trainable, fixed = split_trainable(params, frozen)
    dtype = jnp.dtype(dtype)
    if all(x.dtype == dtype for x in fixed.values()):
        return params
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in fixed.values()):
        fixed = {k: jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding) for k, x in fixed.items()}
    else:
        shardings = {k: x.sharding for k, x in fixed.items()}
        fixed = jax.jit(lambda f: jax.tree.map(lambda x: x.astype(dtype), f), out_shardings=shardings,
                        donate_argnums=0)(fixed)
    return merge(trainable, fixed)


def abstract_train_state(task, tx: optax.GradientTransformation, frozen, mesh, frozen_dtype) -> TrainState:
    """The train state as `jax.ShapeDtypeStruct`s carrying their shardings, through the same `init_opt_state`,
    `hold_frozen` and `task.quantize_frozen` the real state goes through; nothing is allocated (for compiling ahead of time)."""
    init_fn = lambda rng: task.init(rng, task.dummy_batch(1))["params"]  # noqa: E731
    boxed = jax.eval_shape(init_fn, jax.random.key(0))
    shardings = nn.meta.unbox(sharding.logical_shardings(boxed, mesh))
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed),
                          shardings)
    params = task.quantize_frozen(hold_frozen(params, frozen, frozen_dtype))
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))
    return TrainState(step=step, params=params, opt_state=init_opt_state(tx, params, frozen))


def make_train_step(task, tx: optax.GradientTransformation, frozen: tuple[str, ...]):
    def train_step(state: TrainState, batch, rng):
        trainable, fixed = split_trainable(state.params, frozen)
        fixed = jax.lax.stop_gradient(fixed)
        rng = jax.random.fold_in(rng, state.step)

        def loss_fn(t):
            return task.loss(merge(t, fixed), batch, rng, train=True)

        (loss, outputs), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        new_state = state.replace(step=state.step + 1, params=merge(trainable, fixed), opt_state=opt_state)
        return new_state, task.train_metrics.single_from_model_output(**outputs), loss

    return train_step


def jit_train_step(task, tx: optax.GradientTransformation, frozen: tuple[str, ...], state_shardings):
    """The train step as the loop runs it: the state donated and kept on its shards."""
    return jax.jit(make_train_step(task, tx, frozen), donate_argnums=0, out_shardings=(state_shardings, None, None))


def make_eval_step(task):
    """(params, batch) -> the loss's outputs; `task.eval_metrics` reduces them on the host."""

    def eval_step(params, batch):
        _, outputs = task.loss(params, batch, jax.random.key(0), train=False)
        return outputs

    return eval_step
