"""The model cards of a training run's exports: WORKDIR/model (and WORKDIR/adapter, a fine-tuning's PEFT adapter)
get a README.md saying what they are, what they started from, which stage trained them, how and on what."""

from pathlib import Path

from cxrllava_jax import hub
from cxrllava_jax.convert import model_card

# The settings a reader of the card wants first; the whole config is WORKDIR/config.json.
SHOWN_SETTINGS = ("optim.name", "optim.learning_rate", "optim.schedule", "optim.warmup_steps", "data.batch_size",
                  "data.seq_length", "data.train", "num_epochs", "num_train_steps", "frozen", "lora.rank",
                  "lora.alpha", "lora.targets", "lora.base_quantize", "runtime.dtype", "seed")
INIT_FIELDS = ("release", "checkpoint", "llama", "bert")


def write_cards(workdir, cfg, kind: str, steps: int):
    """Cards for WORKDIR/model (`kind`: the exported model's kind) and, when it was written, WORKDIR/adapter."""
    workdir = Path(workdir)
    sources = {key: cfg.init[key] for key in INIT_FIELDS if cfg.get("init", {}).get(key)}
    hub_ids = [found for found in map(hub.hub_id, sources.values()) if found]
    facts = {"format": "cxrllava-jax", "model_kind": kind, "base_model": hub_ids[0] if len(hub_ids) == 1 else hub_ids
             or None, "base_source": ", ".join(f"config.init.{k}={v}" for k, v in sources.items()) or None,
             "training": {"task": cfg.task, "steps": int(steps), "config": _settings(cfg)},
             "datasets": list(cfg.get("data", {}).get("sources", ())), "evaluations": []}
    model_card.write(workdir / "model", facts)
    if (workdir / "adapter").is_dir():
        model_card.write(workdir / "adapter", {**facts, "format": "peft"})


def _settings(cfg) -> dict:
    shown = {}
    for key in SHOWN_SETTINGS:
        value = cfg
        for part in key.split("."):
            value = value.get(part) if hasattr(value, "get") else None
        if value not in (None, "", ()):
            shown[key] = list(value) if isinstance(value, tuple) else value
    return shown
