"""The `Task` base class and what every stage's task shares (see the package docstring for the interface)."""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cxrllava_jax.convert import checkpoint as model_checkpoint
from cxrllava_jax.domain import images
from cxrllava_jax.models import configs as mc
from cxrllava_jax.training.optim import build_optimizer
from input_pipeline import tfds_builders


@dataclasses.dataclass
class Example:
    """One training example before encoding: an image plus the stage's target (label, text or conversation)."""

    image: str | tfds_builders.StoredImage
    label: int = 0
    text: str = ""
    conversation: list | None = None


def preset(presets: dict, name: str, overrides) -> object:
    if name not in presets:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(presets)}")
    return dataclasses.replace(presets[name], **dict(overrides or {}))


def vision_config(cfg) -> mc.VisionConfig:
    return preset(mc.VISION_PRESETS, cfg.model.vision, cfg.model.get("vision_overrides"))


def runtime(cfg) -> mc.Runtime:
    return mc.Runtime(**cfg.runtime.to_dict())


class Task:
    """A stage's examples, batches, model, loss, metrics, trainable parameters over time and export.

    Subclasses set the class attributes and implement `examples`, `encode`, `abstract_batch`, `init` and
    `loss`; `__init__` builds `self.model` and `self.config` (the model's config, as exported).
    """

    unit: str  # what throughput counts: "img" or "tok"
    export_kind: str  # the model kind written to model_config.json (convert/checkpoint.py)
    train_metrics: type  # clu metrics.Collection built inside the jitted train step from `loss`'s outputs
    eval_metrics: type  # clu metrics.Collection built on the host from the eval step's outputs (AUROC lives here)

    def __init__(self, cfg):
        self.cfg = cfg
        self.stage = cfg.stage
        # Which parameters train when: `frozen` never (no gradient, no optimizer state); each (regex, step) of
        # `releases` from that step on, gated by the optimizer so its state and the compiled step never change.
        self.frozen = tuple(cfg.frozen)
        self.releases = (("txt/.*", cfg.text_unfreeze_step),) if cfg.get("text_unfreeze_step", 0) > 0 else ()

    # Data: records -> examples -> arrays.
    def examples(self, records) -> list[Example]:
        raise NotImplementedError

    def encoder(self) -> Callable[[Example], dict[str, np.ndarray]]:
        """example -> dict of numpy arrays: one row of `abstract_batch`. Loads tokenizers once."""
        raise NotImplementedError

    def abstract_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The shapes and dtypes of a batch, for compile-ahead, benchmarks and parameter creation."""
        raise NotImplementedError

    def dummy_batch(self, batch_size: int) -> dict[str, jax.Array]:
        """A batch of `abstract_batch`'s shapes that the model accepts (zeros)."""
        return {k: jnp.zeros(s.shape, s.dtype) for k, s in self.abstract_batch(batch_size).items()}

    def image(self, example: Example) -> np.ndarray:
        size = (self.config.vision if hasattr(self.config, "vision") else self.config).image_size
        data = self.cfg.data
        return images.preprocess(example.image, size, data.image_mean, data.image_std, mode=data.image_mode)

    # Model: init, a pure loss and the throughput unit.
    def init(self, rng, batch) -> dict:
        raise NotImplementedError

    def loss(self, params, batch, rng, train: bool = True) -> tuple[jax.Array, dict]:
        """(params, batch, rng) -> (scalar loss, outputs the metrics read). Pure: jitted by the steps."""
        raise NotImplementedError

    def units(self, batch) -> int:
        return batch["image"].shape[0]

    # Training schedule and export.
    def optimizer(self, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
        """config.optim's optimizer over the non-frozen parameters, holding back `releases` until their step."""
        return build_optimizer(self.cfg.optim, total_steps, self.releases)

    def export(self, path, params):
        """Writes the trained model in our checkpoint format: the next stage's `config.init.checkpoint`."""
        model_checkpoint.save_model(path, self.export_kind, self.config, jax.device_get(params),
                                    tokenizer_dir=self.export_tokenizer(), scan=self.cfg.runtime.scan, overwrite=True)

    def export_tokenizer(self) -> str | None:
        """The tokenizer that belongs to the exported model (stage 1 models have none)."""
        return None
