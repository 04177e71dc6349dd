"""The stage chain, written once: the five training runs in order and the model each one starts from.

Every run of a chain lives in `root/<name>` and exports `root/<name>/model`; a run starts from its
previous stage's exported model, taking the towers listed. Read by `configs/stage*.py` (root `workdirs`),
`configs/demo.py` and the demo (root `demo_workdir`), the training notebook and the tests.
"""

import dataclasses
from pathlib import Path

from cxrllava_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # the run: configs/stage<name>.py, configs/demo.py:<name>, its directory under the chain's root
    task: str  # config.task: which task trains it (training/tasks/)
    previous: str | None = None  # the stage whose exported model it starts from
    towers: tuple[str, ...] = ()  # the top-level parameter groups it takes from that model


CHAIN = (
    Stage("1a", "1a"),
    Stage("1b_labels", "1b", previous="1a", towers=("img",)),
    Stage("1b_reports", "1b", previous="1b_labels", towers=("img", "txt", "logit_scale")),
    Stage("2a", "2a", previous="1b_reports", towers=("img",)),
    Stage("2b", "2b", previous="2a", towers=("img", "projector", "llm")),
)
STAGES = {stage.name: stage for stage in CHAIN}
NAMES = tuple(STAGES)


def get(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; the stages are {', '.join(NAMES)}")
    return STAGES[name]


def run_dir(root, name: str) -> Path:
    return Path(root) / get(name).name


def start_from_previous(cfg, name: str, root):
    """Sets `config.task` and points `config.init` at the previous stage's model in the chain under `root`."""
    stage = get(name)
    cfg.task = stage.task
    previous = str(run_dir(root, stage.previous) / "model") if stage.previous else ""
    cfg.init.update(checkpoint=previous, towers=stage.towers)
    return cfg
