"""The records a run reads: every configured source's split in the common record schema.

The published files under `config.data.data_dir` read by the adapters, or, with `config.data.tfds_dir`,
the ArrayRecord version `tfds_builders.build` wrote (with `config.data.preprocessed`, the version holding the
images as uint8 model pixels that `cxrllava preprocess` wrote); or the user's own conversation files,
`config.data.train` and `config.data.eval` (a split other than `config.data.train_split` reads `eval`). What a
stage makes of the records is its task's `examples` (training/tasks/).
"""

from pathlib import Path

from cxrllava_jax.errors import ConfigError
from cxrllava_jax.training.tasks.base import vision_config
from input_pipeline import conversations, tfds_builders
from input_pipeline.sources import ADAPTERS


def load(cfg, split: str) -> list:
    # Stage 2 and fine-tuning can read the user's own conversation files instead (input_pipeline/conversations.py).
    if cfg.data.get("train"):
        path = cfg.data.train if split == cfg.data.train_split else cfg.data.get("eval")
        return conversations.load(path) if path else []
    records = []
    for source in cfg.data.sources:
        if source not in ADAPTERS:
            raise ConfigError(f"config.data.sources names {source!r}; adapters exist for {sorted(ADAPTERS)}")
        if cfg.data.get("tfds_dir"):
            pixels = (vision_config(cfg).image_size, cfg.data.image_mode) if cfg.data.preprocessed else None
            records += tfds_builders.records(source, cfg.data.tfds_dir, split, pixels)
        else:
            root = Path(cfg.data.data_dir) / source if len(cfg.data.sources) > 1 else Path(cfg.data.data_dir)
            records += ADAPTERS[source](root, split)
    return records
