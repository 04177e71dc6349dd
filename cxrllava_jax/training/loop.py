"""`train_and_evaluate`: one stage of training, from config to a saved model.

Sections in order: mesh, task and data, optimizer, initial state (resume > previous stage and
pretrained towers > random), the loop (steps, NaN guard, logging, evaluation, checkpoints),
and the final model export that the next stage starts from. Everything stage-specific is the task's
(training/tasks/): this module never asks which stage it runs.
"""

import math

import jax
from jax.experimental import multihost_utils
import numpy as np

from cxrllava_jax import sharding
from cxrllava_jax.training import data as stage_data
from cxrllava_jax.training import initial_weights, model_cards
from cxrllava_jax.training import workdir as run_records
from cxrllava_jax.training.checkpoints import RunCheckpoints
from cxrllava_jax.training.optim import warmup_warning
from cxrllava_jax.training.reporting import Reporter
from cxrllava_jax.training.steps import TrainState, hold_frozen, init_opt_state, jit_train_step, make_eval_step
from cxrllava_jax.training.tasks import make_task


class NonFiniteLossError(FloatingPointError):
    pass


def train_and_evaluate(cfg, workdir) -> dict:
    """Trains one stage in `workdir`; returns the summary also written to `workdir/summary.json`.

    A workdir that has done its steps is left as it is (its summary returned); one of another stage is refused.
    A relative `workdir` is taken from the current directory (Orbax needs absolute paths)."""
    workdir = run_records.absolute(workdir)
    run_records.check_config(cfg)
    run_records.check_stage(workdir, cfg)
    # A mesh the devices cannot fill, or a model preset or override that does not exist: refused before any work.
    mesh = sharding.make_mesh(**cfg.mesh.to_dict())
    cfg = run_records.with_local_models(cfg)
    task = make_task(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    writer = jax.process_index() == 0  # one process writes what is not a checkpoint
    claim = run_records.claim(workdir) if writer else None  # one job's processes share it, another job is refused
    if writer and not (workdir / run_records.SUMMARY).exists():  # a finished run's record is kept (below)
        run_records.record_config(workdir, cfg)

    data = stage_data.make_stage_data(cfg, task)
    total_steps = cfg.num_train_steps or math.ceil(cfg.num_epochs * data.steps_per_epoch)
    tx, schedule = task.optimizer(total_steps)
    if (warning := warmup_warning(cfg.optim, total_steps)) and writer:
        print(f"[stage {cfg.task}] {warning}", flush=True)
    checkpoints = RunCheckpoints(workdir / "checkpoints", cfg.checkpoint, task.unsaved, task.base_reference())
    checkpoints.check_base()
    if cfg.checkpoint.best_metric and cfg.checkpoint.every_steps % cfg.eval_every_steps:
        print(f"[stage {cfg.task}] note: only checkpoints on evaluation steps carry {cfg.checkpoint.best_metric!r}; "
              f"checkpoint.every_steps={cfg.checkpoint.every_steps} is not a multiple of eval_every_steps="
              f"{cfg.eval_every_steps}, so the best step is chosen among fewer checkpoints", flush=True)

    with sharding.activate(mesh):
        state, state_shardings = _initial_state(cfg, task, tx, mesh, checkpoints, data.train)
        step = int(state.step)
        finished = run_records.finished_summary(workdir, step, total_steps)
        if finished is not None:
            checkpoints.close()
            if claim:
                claim.close()
            print(f"[stage {cfg.task}] {workdir} has already done its {step} steps; its records are kept "
                  "(train further with a larger num_train_steps, or start anew in another --workdir)", flush=True)
            return finished
        if writer:
            run_records.record_config(workdir, cfg)
        reporter = Reporter(workdir, total_steps, task.unit, cfg.task, step)
        train_step = jit_train_step(task, tx, task.frozen, state_shardings)
        eval_step = jax.jit(make_eval_step(task))
        rng = jax.random.key(cfg.seed + 1)
        collected, last_eval = None, {}
        reporter.start(step)
        while step < total_steps:
            host_batch = next(data.train)
            state, metrics, loss = train_step(state, data.global_batch(host_batch, mesh), rng)
            step += 1
            collected = metrics if collected is None else collected.merge(metrics)
            reporter.count(task.units(host_batch) * jax.process_count())
            log_now = step % cfg.log_every_steps == 0 or step == total_steps
            save_now = step % cfg.checkpoint.every_steps == 0 or step == total_steps
            if log_now or save_now:  # the host waits for the device only here, not every step
                _check_finite(loss, step, cfg.task, checkpoints)
            if log_now:
                values = _host_values(collected)
                if data.train.bad_records:  # only runs with config.data.max_bad_fraction > 0 skip any
                    values["bad_records"] = data.train.bad_records
                reporter.progress(step, values, float(schedule(step)))
                collected = None
            evaluate_now = data.eval is not None and (step % cfg.eval_every_steps == 0 or step == total_steps)
            if evaluate_now:
                last_eval = evaluate(task, eval_step, state.params, data, mesh)
                reporter.scalars(step, last_eval, "eval")
                print(f"[stage {cfg.task}] eval at step {step}: " +
                      ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()), flush=True)
            if save_now:
                checkpoints.save(step, state, data.train, metrics=last_eval if evaluate_now else None)
        checkpoints.wait()
        final_params = _to_host(_params_to_export(cfg, checkpoints, state, state_shardings))
    summary = {"task": cfg.task, "steps": step, "eval": last_eval, "best_step": checkpoints.best_step()}
    if writer:
        exported = task.export(workdir / "model", final_params)
        model_cards.write_cards(workdir, cfg, task.export_kind, step)
        run_records.record_summary(workdir, summary)
    checkpoints.close()
    reporter.close()
    if claim:
        claim.close()
    if writer:
        print(f"[stage {cfg.task}] done after {step} steps: " + ", ".join(map(str, exported)), flush=True)
    return summary


def _initial_state(cfg, task, tx, mesh, checkpoints, train_iterator):
    """Resume from this run's latest checkpoint if there is one, else start from the configured weights."""
    init_fn = lambda rng: task.init(rng, task.dummy_batch(1))["params"]  # noqa: E731
    params, param_shardings = sharding.create_sharded(init_fn, mesh, jax.random.key(cfg.seed))
    latest = checkpoints.latest_step()
    if latest is None or task.unsaved:  # the checkpoints do not hold the unsaved parameters
        params = initial_weights.load(cfg, params, param_shardings)
    params = task.quantize_frozen(hold_frozen(params, task.frozen, cfg.runtime.dtype))
    step = jax.device_put(np.int32(0), sharding.replicated(mesh))
    state = TrainState(step=step, params=params, opt_state=init_opt_state(tx, params, task.frozen))
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    if latest is not None:
        state = checkpoints.restore(latest, state, train_iterator)
        print(f"[stage {cfg.task}] resumed from step {latest}", flush=True)
    return state, state_shardings


def _check_finite(loss, step: int, stage: str, checkpoints: RunCheckpoints):
    """Stops before a non-finite state is saved. Checked at log and checkpoint steps (a NaN spreads through
    the parameters, so the losses after it stay non-finite), so the step named is where it was seen."""
    value = float(loss)
    if not math.isfinite(value):
        checkpoints.wait()
        raise NonFiniteLossError(
            f"stage {stage}: the training loss became {value} by step {step}; stopped without saving. "
            f"The last good checkpoint is step {checkpoints.latest_step()} in {checkpoints.manager.directory}.")


def _to_host(tree):
    """Every array's whole value as numpy; a collective when arrays span several processes' devices."""
    return jax.tree.map(lambda x: np.asarray(x) if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True),
                        tree)


def _host_values(collection) -> dict:
    return {k: float(v) for k, v in collection.compute().items()}


def evaluate(task, eval_step, params, data, mesh) -> dict:
    """`task.eval_metrics` over the whole eval split, reduced on the host from every global batch's outputs."""
    collected = None
    for host_batch in data.eval():
        outputs = _to_host(eval_step(params, data.global_batch(host_batch, mesh)))  # every process: all rows
        metrics = task.eval_metrics.single_from_model_output(**outputs)
        collected = metrics if collected is None else collected.merge(metrics)
    return _host_values(collected)


def _params_to_export(cfg, checkpoints, state, state_shardings):
    """The best checkpoint by the validation metric where the stage selects one (1A, 1B), else the last."""
    best = checkpoints.best_step()
    if not cfg.checkpoint.best_metric or best is None or best == int(state.step):
        return state.params
    # Only the parameters: the best step's optimizer state may cover other parameters (before a release).
    params = checkpoints.restore_params(best, state.params)
    print(f"[stage {cfg.task}] exporting the best step {best} by {cfg.checkpoint.best_metric}", flush=True)
    return params
