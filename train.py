"""Trains one CXR-LLaVA stage: python train.py --config=configs/stage2b.py --workdir=DIR [--config.key=value]."""

from pathlib import Path

from absl import flags
from ml_collections import config_flags

from cxrllava_jax import arguments, errors

config_flags.DEFINE_config_file("config", None, "a stage config file (listed below)", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and the exported model.")
flags.DEFINE_bool("debug", False, arguments.DEBUG_HELP)
flags.mark_flags_as_required(["config", "workdir"])
arguments.require_directory("workdir")


def main(argv):
    if len(argv) > 1:
        raise errors.UsageError(f"unexpected arguments: {argv[1:]}")
    from cxrllava_jax.training import distributed  # here, not above: `--help` answers before JAX is imported
    from cxrllava_jax.training.loop import train_and_evaluate

    distributed.initialize()
    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    configs = Path(__file__).resolve().parent / "configs"
    arguments.run_absl("train.py", main, [*sorted(configs.glob("stage*.py")), configs / "finetune.py", configs / "demo.py"])
