"""The train state and the pure, jitted train and eval steps."""

from typing import Any

import flax.struct
import jax
import optax

from cxrllava_jax.training.optim import merge, split_trainable


class TrainState(flax.struct.PyTreeNode):
    step: Any
    params: Any  # the whole model, frozen parts included
    opt_state: Any  # over the trainable parameters only (a flat {path: leaf} tree)


def init_opt_state(tx: optax.GradientTransformation, params, frozen):
    """Optimizer state for the parameters that `frozen` leaves trainable (groups released later included)."""
    trainable, _ = split_trainable(params, frozen)
    return jax.jit(tx.init)(trainable)


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


def make_eval_step(task):
    """(params, batch) -> the loss's outputs; `task.eval_metrics` reduces them on the host."""

    def eval_step(params, batch):
        _, outputs = task.loss(params, batch, jax.random.key(0), train=False)
        return outputs

    return eval_step
