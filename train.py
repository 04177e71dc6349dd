"""Trains one CXR-LLaVA stage: python train.py --config=configs/stage2b.py --workdir=DIR [--config.key=value]."""

from absl import flags
from ml_collections import config_flags

from cxrllava_jax import errors
from cxrllava_jax.training import distributed
from cxrllava_jax.training.loop import train_and_evaluate

config_flags.DEFINE_config_file("config", None, "Stage config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and the exported model.")
flags.DEFINE_bool("debug", False, "on failure, show the traceback")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise errors.UsageError(f"unexpected arguments: {argv[1:]}")
    distributed.initialize()
    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    errors.run_absl("train.py", main)
