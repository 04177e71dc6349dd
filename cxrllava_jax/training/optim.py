"""Optimizers, schedules and freezing, all from config.

Freezing is by parameter-path regex (`config.frozen`): frozen parameters are left out of the tree the
step differentiates and the optimizer sees, so they get no backward pass and no optimizer state.
A group released mid-run (stage 1B's text tower) is a per-regex schedule inside the optimizer instead,
as big_vision's `optax.make` does: see `released_at`.
"""

import math
import re
from typing import Any, Iterable

import jax.numpy as jnp
import optax
from flax import traverse_util

from cxrllava_jax.errors import ConfigError

Params = dict[str, Any]


def param_path(path: tuple[str, ...]) -> str:
    return "/".join(path)


def split_trainable(params: Params, frozen: Iterable[str]) -> tuple[dict, dict]:
    """Flat {path: leaf} dicts (trainable, frozen) by regexes matched against 'img/resblocks_0/...' paths."""
    patterns = [re.compile(p) for p in frozen]
    trainable, fixed = {}, {}
    for path, leaf in traverse_util.flatten_dict(params, sep="/").items():
        (fixed if any(p.fullmatch(path) for p in patterns) else trainable)[path] = leaf
    if not trainable:
        raise ConfigError(f"config.frozen {list(frozen)} freezes every parameter: nothing would train")
    return trainable, fixed


def merge(trainable: dict, fixed: dict) -> Params:
    return traverse_util.unflatten_dict({**fixed, **trainable}, sep="/")


def learning_rate_schedule(cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup, then `cfg.schedule` ('cosine', 'linear' or 'constant') to the end of training."""
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    decays = {
        "cosine": lambda: optax.cosine_decay_schedule(cfg.learning_rate, decay_steps, alpha=cfg.end_lr_fraction),
        "linear": lambda: optax.linear_schedule(cfg.learning_rate, cfg.learning_rate * cfg.end_lr_fraction,
                                                decay_steps),
        "constant": lambda: optax.constant_schedule(cfg.learning_rate),
    }
    if cfg.schedule not in decays:
        raise ConfigError(f"config.optim.schedule must be one of {sorted(decays)}, got {cfg.schedule!r}")
    if cfg.warmup_steps <= 0:
        return decays[cfg.schedule]()
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.join_schedules([warmup, decays[cfg.schedule]()], [cfg.warmup_steps])


def warmup_warning(cfg, total_steps: int) -> str | None:
    """A note when the run ends before its warm-up does: its learning rate never reaches config.optim.learning_rate."""
    updates = math.ceil(total_steps / max(cfg.grad_accum_steps, 1))
    if cfg.warmup_steps <= 0 or updates > cfg.warmup_steps:
        return None
    reached = cfg.learning_rate * (updates - 1) / cfg.warmup_steps  # the rate of the last update
    return (f"warning: config.optim.warmup_steps={cfg.warmup_steps} but the run makes only {updates} optimizer "
            f"updates ({total_steps} steps, config.optim.grad_accum_steps={cfg.grad_accum_steps}): it ends in warm-up, "
            f"its last update made at a learning rate of {reached:.2e}, below config.optim.learning_rate="
            f"{cfg.learning_rate:.2e}. Lower warmup_steps or train longer (num_train_steps / num_epochs)")


def released_at(pattern: str, step: int) -> optax.GradientTransformation:
    """Multiplies the leaves whose path matches `pattern` by 0 before training step `step` and by 1 from it on.

    Counts calls, i.e. training steps, so it sits outside gradient accumulation. Before the optimizer it keeps
    the group's gradients out of clipping and its moments at zero; after it, it also stops weight decay.
    """
    regex = re.compile(pattern)
    gate = optax.scale_by_schedule(lambda count: (count >= step).astype(jnp.float32))
    return optax.masked(gate, lambda flat: {path: bool(regex.fullmatch(path)) for path in flat})


def build_optimizer(cfg, total_steps: int, releases=()) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The paper's optimizers (SGD for stage 1, Adam for stage 2) plus clipping and accumulation.

    `releases` holds (regex, step) pairs: those parameters train from that step on (see `released_at`). The
    optimizer works on the flat {path: leaf} tree of trainable parameters (`split_trainable`).
    Returns the optimizer and the learning rate as a function of the training step. With accumulation over k
    steps the optimizer updates once every k steps, so the schedule (warmup included) counts updates.
    """
    every = max(cfg.grad_accum_steps, 1)
    schedule = learning_rate_schedule(cfg, math.ceil(total_steps / every))
    makers = {
        "sgd": lambda: optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=False),
        "adam": lambda: optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        "adamw": lambda: optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
    }
    if cfg.name not in makers:
        raise ConfigError(f"config.optim.name must be one of {sorted(makers)}, got {cfg.name!r}")
    chain = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm else []
    tx = optax.chain(*chain, makers[cfg.name]())
    if every > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=every)
    gates = [released_at(pattern, step) for pattern, step in releases]
    if gates:
        tx = optax.chain(*gates, tx, *gates)
    return tx, lambda step: schedule(step // every)
