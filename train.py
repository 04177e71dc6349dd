"""Trains one CXR-LLaVA stage: python train.py --config=configs/stage2b.py --workdir=DIR [--config.key=value]."""

from absl import flags
from ml_collections import config_flags

from cxrllava_jax import arguments, errors

config_flags.DEFINE_config_file("config", None, "a stage config file (listed below)", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and the exported model.")
arguments.define_absl_flags(required=("config", "workdir"), directory="workdir")


def main(argv):
    if len(argv) > 1:
        raise errors.UsageError(f"unexpected arguments: {argv[1:]}")
    from cxrllava_jax.training import distributed  # here, not above: `--help` answers before JAX is imported
    from cxrllava_jax.training.loop import train_and_evaluate

    distributed.initialize()
    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    arguments.run_absl("train.py", main, configs=("stage*.py", "finetune.py", "demo.py"),
                       renamed_keys={"stage": "task"})
