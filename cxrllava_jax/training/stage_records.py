"""The records a run reads: every configured source's split in the common record schema.

The published files under `config.data.data_dir` read by the adapters, or, with `config.data.tfds_dir`,
the ArrayRecord version `tfds_builders.build` wrote. What a stage makes of the records is its task's
`examples` (training/tasks/).
"""

from pathlib import Path

from input_pipeline import tfds_builders
from input_pipeline.sources import ADAPTERS


def load(cfg, split: str) -> list:
    records = []
    for source in cfg.data.sources:
        if source not in ADAPTERS:
            raise ValueError(f"config.data.sources names {source!r}; adapters exist for {sorted(ADAPTERS)}")
        if cfg.data.get("tfds_dir"):
            records += tfds_builders.records(source, cfg.data.tfds_dir, split)
        else:
            root = Path(cfg.data.data_dir) / source if len(cfg.data.sources) > 1 else Path(cfg.data.data_dir)
            records += ADAPTERS[source](root, split)
    return records
