"""One `Task` per stage: everything that differs between stages, behind one small interface.

The loop (`training/loop.py`), the data (`training/data.py`), the export and the benchmarks call only this:

    task = make_task(cfg)                 # by config.task: "1a", "1b", "2a", "2b", "finetune" (LoRA)
    # data
    task.examples(records)                # common-schema records -> [Example] (image + label/text/conversation)
    task.encoder()                        # -> encode(example) -> {name: np.ndarray}, one row of a batch
    task.abstract_batch(batch_size)       # {name: jax.ShapeDtypeStruct}: compile-ahead, benchmarks
    task.dummy_batch(batch_size)          # zeros of those shapes that the model accepts: parameter creation
    task.sequence_buckets(examples)       # lengths batches are cut to, chosen from the data (stage 2), or None
    task.model_images(batch["image"])     # the uint8 model pixels batches carry, normalised on the device
    # model, loss, metrics
    task.model, task.model_config         # the Flax module and its config (what the export writes)
    task.init(rng, batch)                 # -> variables
    task.loss(params, batch, rng, train)  # -> (scalar loss, outputs); pure, jitted by training/steps.py
    task.train_metrics                    # clu Collection, built from `outputs` inside the jitted train step
    task.eval_metrics                     # clu Collection, built from `outputs` on the host (AUROC collects there)
    task.unit, task.units(batch)          # "img"/"tok" and how many a batch holds: throughput
    # which parameters train when
    task.frozen                           # regexes never trained: no gradient, no optimizer state
    task.releases                         # ((regex, step), ...): trained from `step` on (stage 1B's text tower)
    task.optimizer(total_steps)           # -> (optax transformation that owns the releases, learning rate(step))
    # export
    task.export_kind, task.export(path, params)   # our checkpoint format, the next stage's init.checkpoint

A release is a schedule inside the optimizer: the released group's gradients and updates are multiplied by 0
before its step and 1 from it on, so the optimizer state has one structure for the whole run (a checkpoint
from any step restores into it) and the train step compiles once. Until the release the group's moments
stay exactly zero, as if it had no state; the price is its backward pass, computed and discarded (for 1B's
BERT-base beside ViT-L/16 at 512 px about 3% of a step).

A new stage is a subclass of `Task` (tasks/base.py) registered in TASKS; which stage starts from which is
`training/stages.py`.
"""

from cxrllava_jax.errors import ConfigError
from cxrllava_jax.training.tasks.base import Example, Task
from cxrllava_jax.training.tasks.classification import ClassificationTask
from cxrllava_jax.training.tasks.contrastive import ContrastiveTask
from cxrllava_jax.training.tasks.finetune import FinetuneTask
from cxrllava_jax.training.tasks.instruction import InstructionTask

TASKS = {"1a": ClassificationTask, "1b": ContrastiveTask, "2a": InstructionTask, "2b": InstructionTask,
         "finetune": FinetuneTask}

__all__ = ["Example", "Task", "TASKS", "make_task", "task_key"]


def task_key(cfg) -> str:
    """`config.task`, checked. A config that still sets `config.stage` (the key's name before) is refused, naming
    the new one, rather than trained as whatever task `config.task` defaults to."""
    if "stage" in cfg:
        raise ConfigError(f"config.stage={cfg.stage!r}: the key is now config.task (one of {', '.join(TASKS)})")
    if cfg.task not in TASKS:
        raise ConfigError(f"config.task={cfg.task!r}: expected one of {', '.join(TASKS)}")
    return cfg.task


def make_task(cfg) -> Task:
    return TASKS[task_key(cfg)](cfg)
