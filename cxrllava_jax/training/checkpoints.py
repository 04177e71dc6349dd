"""Orbax checkpoints of a run: train state and the Grain iterator position, saved together.

Keeps the latest `keep` steps and the best by a validation metric. Orbax writes each step into a
temporary directory and renames it when complete, so a checkpoint cut off mid-write is never listed
or restored. Restoring takes the target shardings, so a run can resume on a different mesh.
"""

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp


class RunCheckpoints:
    def __init__(self, directory, cfg):
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

    def save(self, step: int, state, data_iterator, metrics: dict | None = None):
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=grain.checkpoint.CheckpointSave(data_iterator))
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, step: int, abstract_state, data_iterator):
        """Restores into `abstract_state`'s shapes and shardings and moves `data_iterator` in place."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=grain.checkpoint.CheckpointRestore(data_iterator))
        return self.manager.restore(step, args=args)["state"]

    def restore_params(self, step: int, abstract_params):
        """The parameters of a step's train state, without its optimizer state."""
        target = {"params": abstract_params}
        restore = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                         partial_restore=True)
        with ocp.PyTreeCheckpointer() as checkpointer:
            return checkpointer.restore(self.manager.directory / str(step) / "state", args=restore)["params"]

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


def abstract_like(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
