"""Orbax checkpoints of a run: train state and the Grain iterator position, saved together.

Keeps the latest `keep` steps and the best by a validation metric. Orbax writes each step into a
temporary directory and renames it when complete, so a checkpoint cut off mid-write is never listed
or restored. Restoring takes the target shardings, so a run can resume on a different mesh.

A run whose frozen parameters come unchanged from elsewhere (fine-tuning's base model) names them `unsaved`:
each step then saves only what trains (adapters, optimizer state), and the base is referenced once, by where
it came from (`base.json` beside the steps); a resumed run loads it from there again, and refuses a different one.
"""

import json
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp
from flax import traverse_util
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from cxrllava_jax import files
from cxrllava_jax.convert.checkpoint import drop_closed_loop_echoes
from cxrllava_jax.errors import InputError, MismatchError
from cxrllava_jax.training.optim import merge, split_trainable

BASE_RECORD = "base.json"


class RunCheckpoints:
    def __init__(self, directory, cfg, unsaved: tuple[str, ...] = (), base: dict | None = None):
        """`unsaved`: regexes of the parameters no step saves; `base`: where they come from (recorded once and
        checked on every later start)."""
        self.unsaved, self.base = tuple(unsaved), base
        policies = [pp.LatestN(n=cfg.keep)]
        self.best_metric, self.best_mode = cfg.best_metric, cfg.best_mode
        best_fn = None
        if self.best_metric:
            best_fn = lambda metrics: metrics[self.best_metric]  # noqa: E731
            policies.append(pp.BestN(get_metric_fn=best_fn, reverse=cfg.best_mode == "min", n=1,
                                     keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            # best_fn also makes Orbax store each step's metrics, which BestN and best_step() read.
            best_fn=best_fn, best_mode=cfg.best_mode,
            preservation_policy=pp.AnyPreservationPolicy(policies),
            enable_async_checkpointing=cfg.get("async_save", True),
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def check_base(self):
        """Records where the unsaved parameters come from, or refuses a run that takes them from elsewhere."""
        if not self.unsaved:
            return
        record = Path(self.manager.directory) / BASE_RECORD
        if record.is_file():
            if (recorded := files.read_json(record)) != self.base:
                raise MismatchError(f"{record}: the checkpoints hold adapters trained on the base {recorded}; this "
                                    f"run's base is {self.base}. Give the same base, or another --workdir")
        elif jax.process_index() == 0:
            record.parent.mkdir(parents=True, exist_ok=True)
            files.write_text_atomically(record, json.dumps(self.base, indent=2))

    def save(self, step: int, state, data_iterator, metrics: dict | None = None):
        args = ocp.args.Composite(state=ocp.args.StandardSave(self._saved(state)),
                                  data=grain.checkpoint.CheckpointSave(data_iterator))
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, step: int, state, data_iterator):
        """A step's train state in `state`'s shapes and shardings (`state` may be abstract, but must hold the
        unsaved parameters, which are taken from it); moves `data_iterator` in place."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(self._saved(state))),
                                  data=grain.checkpoint.CheckpointRestore(data_iterator))
        drop_closed_loop_echoes()
        try:
            restored = self.manager.restore(step, args=args)["state"]
        except Exception as error:  # Orbax and TensorStore raise many types for cut-off or damaged files
            earlier = [s for s in self.manager.all_steps() if s < step]
            then = f"to resume from step {max(earlier)}" if earlier else "to start from the beginning"
            raise InputError(f"{self.manager.directory / str(step)}: cannot restore this checkpoint "
                             f"({type(error).__name__}: {_first_line(error)}); it is damaged, or was saved by a "
                             f"run of other model sizes. Move it out of {self.manager.directory} {then}, or train "
                             "in another --workdir") from error
        if not self.unsaved:
            return restored
        return restored.replace(params=self._with_unsaved(restored.params, state.params))

    def restore_params(self, step: int, params):
        """The parameters of a step's train state, without its optimizer state, in `params`' shapes and
        shardings (the unsaved ones taken from `params`)."""
        target = {"params": _abstract(self._saved_params(params))}
        restore = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                         partial_restore=True)
        drop_closed_loop_echoes()
        with ocp.PyTreeCheckpointer() as checkpointer:
            restored = checkpointer.restore(self.manager.directory / str(step) / "state", args=restore)["params"]
        return self._with_unsaved(restored, params)

    def _saved(self, state):
        return state.replace(params=self._saved_params(state.params)) if self.unsaved else state

    def _saved_params(self, params):
        if not self.unsaved:
            return params
        return traverse_util.unflatten_dict(split_trainable(params, self.unsaved)[0], sep="/")

    def _with_unsaved(self, saved, params):
        if not self.unsaved:
            return saved
        return merge(traverse_util.flatten_dict(saved, sep="/"), split_trainable(params, self.unsaved)[1])

    def best_step(self) -> int | None:
        """The kept step with the best validation metric, or None if none was evaluated."""
        scored = []
        for step in self.manager.all_steps():
            values = self.manager.metrics(step) or {}
            if self.best_metric in values:
                scored.append((values[self.best_metric], step))
        if not scored:
            return None
        return (min if self.best_mode == "min" else max)(scored)[1]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def _first_line(error) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else ""


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def abstract_like(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
