"""The `Task` base class and what every stage's task shares (see the package docstring for the interface)."""

import abc
import dataclasses
from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cxrllava_jax.convert import checkpoint as model_checkpoint
from cxrllava_jax.domain import images
from cxrllava_jax.errors import ConfigError
from cxrllava_jax.models import configs as mc
from cxrllava_jax.training.optim import build_optimizer
from input_pipeline import pipelines

if TYPE_CHECKING:  # TFDS loads only where stored records are read (a GPU node's image may not have it)
    from input_pipeline import tfds_builders


@dataclasses.dataclass
class Example:
    """One training example before encoding: an image plus the stage's target (label, text or conversation)."""

    image: "str | tfds_builders.StoredImage"
    label: int = 0
    text: str = ""
    conversation: list | None = None


def preset(presets: dict, cfg, tower: str) -> object:
    """`config.model.<tower>` (a preset's name) with `config.model.<tower>_overrides` applied."""
    name, overrides = cfg.model[tower], dict(cfg.model.get(f"{tower}_overrides") or {})
    if name not in presets:
        raise ConfigError(f"config.model.{tower}={name!r}: no such preset; known: {', '.join(sorted(presets))}")
    return with_overrides(presets[name], overrides, f"config.model.{tower}_overrides")


def with_overrides(config, overrides: dict, key: str):
    try:
        return dataclasses.replace(config, **overrides)
    except TypeError as error:  # a field the model does not have
        raise ConfigError(f"{key}={overrides}: {error}; the fields are "
                          f"{', '.join(f.name for f in dataclasses.fields(config))}") from error


def vision_config(cfg) -> mc.VisionConfig:
    return preset(mc.VISION_PRESETS, cfg, "vision")


def runtime(cfg) -> mc.Runtime:
    return mc.Runtime(**cfg.runtime.to_dict())


class Task(abc.ABC):
    """A stage's examples, batches, model, loss, metrics, trainable parameters over time and export.

    Subclasses set the class attributes and implement `examples`, `encode`, `abstract_batch`, `init` and
    `loss`; `__init__` builds `self.model` and `self.model_config` (the model's config, as exported).
    """

    unit: str  # what throughput counts: "img" or "tok"
    export_kind: str  # the model kind written to model_config.json (convert/checkpoint.py)
    train_metrics: type  # clu metrics.Collection built inside the jitted train step from `loss`'s outputs
    eval_metrics: type  # clu metrics.Collection built on the host from the eval step's outputs (AUROC lives here)

    def __init__(self, cfg):
        self.cfg = cfg
        self.name = cfg.task  # its key in TASKS
        # Which parameters train when: `frozen` never (no gradient, no optimizer state); each (regex, step) of
        # `releases` from that step on, gated by the optimizer so its state and the compiled step never change.
        self.frozen = tuple(cfg.frozen)
        self.releases = ()
        # Regexes of parameters the checkpoints leave out: ones that come unchanged from `base_reference()`.
        self.unsaved = ()

    # Data: records -> examples -> arrays.
    @abc.abstractmethod
    def examples(self, records) -> list[Example]:
        """The stage's examples from the common records."""

    @abc.abstractmethod
    def encoder(self) -> Callable[[Example], dict[str, np.ndarray]]:
        """example -> dict of numpy arrays: one row of `abstract_batch`. Loads tokenizers once."""

    @abc.abstractmethod
    def abstract_batch(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The shapes and dtypes of a batch, for compile-ahead, benchmarks and parameter creation."""

    def dummy_batch(self, batch_size: int) -> dict[str, jax.Array]:
        """A batch of `abstract_batch`'s shapes that the model accepts (zeros)."""
        return {k: jnp.zeros(s.shape, s.dtype) for k, s in self.abstract_batch(batch_size).items()}

    def image_size(self) -> int:
        return (self.model_config.vision if hasattr(self.model_config, "vision") else self.model_config).image_size

    def image(self, example: Example) -> np.ndarray:
        """The example's image as uint8 model pixels [size, size, 1]: a quarter of float32's bytes to move, and
        `model_images` normalises them on the accelerator."""
        return images.model_pixels(example.image, self.image_size(), mode=self.cfg.data.image_mode)

    def abstract_images(self, batch_size: int) -> jax.ShapeDtypeStruct:
        size = self.image_size()
        return jax.ShapeDtypeStruct((batch_size, size, size, 1), jnp.uint8)

    def normalisation(self) -> tuple[float, float]:
        """(mean, std) the model's towers were trained with: config.data's, unless the model brings its own."""
        return self.cfg.data.image_mean, self.cfg.data.image_std

    def model_images(self, pixels) -> jax.Array:
        """uint8 model pixels -> the normalised float32 the towers take, on the device; float images (tests,
        benchmarks) are taken as normalised already."""
        if pixels.dtype != jnp.uint8:
            return pixels
        return images.normalise(pixels, *self.normalisation())

    def sequence_buckets(self, examples) -> pipelines.Buckets | None:
        """Lengths to cut batches to, chosen from the examples (stage 2); None: batches keep their shape."""
        return None

    # Model: init, a pure loss and the throughput unit.
    @abc.abstractmethod
    def init(self, rng, batch) -> dict:
        """The model's variables for `batch`'s shapes."""

    @abc.abstractmethod
    def loss(self, params, batch, rng, train: bool = True) -> tuple[jax.Array, dict]:
        """(params, batch, rng) -> (scalar loss, outputs the metrics read). Pure: jitted by the steps."""

    def units(self, batch) -> int:
        return batch["image"].shape[0]

    def quantize_frozen(self, params):
        """The parameters as the train state holds them, after `steps.hold_frozen`: some frozen ones may be
        quantized (QLoRA). Arrays or abstract trees."""
        return params

    def base_reference(self) -> dict | None:
        """Where the `unsaved` parameters come from, recorded beside the checkpoints."""
        return None

    # Training schedule and export.
    def optimizer(self, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
        """config.optim's optimizer over the non-frozen parameters, holding back `releases` until their step."""
        return build_optimizer(self.cfg.optim, total_steps, self.releases)

    def export(self, path, params) -> list:
        """Writes the trained model in our checkpoint format: the next stage's `config.init.checkpoint`. Returns
        the directories written."""
        return [model_checkpoint.save_model(path, self.export_kind, self.model_config, jax.device_get(params),
                                            tokenizer_dir=self.export_tokenizer(), scan=self.cfg.runtime.scan,
                                            overwrite=True)]

    def export_tokenizer(self) -> str | None:
        """The tokenizer that belongs to the exported model (stage 1 models have none)."""
        return None
