"""What each stage trains: the model, its loss and its metrics.

Stage 1A classifies normal/abnormal, stage 1B is contrastive, stages 2A and 2B are next-token
prediction on conversations (they differ only in what `config.frozen` holds). A task's `loss`
is pure: (params, batch, rng) -> (scalar loss, per-batch outputs the metrics reduce).
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from clu import metrics

from cxrllava_jax.models import configs as mc
from cxrllava_jax.models.clip import ContrastiveModel, contrastive_loss
from cxrllava_jax.models.cxr_llava import CXRLLaVA
from cxrllava_jax.models.vit import ViTClassifier
from cxrllava_jax.errors import ConfigError


def _preset(presets: dict, name: str, overrides) -> object:
    if name not in presets:
        raise ConfigError(f"unknown model preset {name!r}; known: {sorted(presets)}")
    return dataclasses.replace(presets[name], **dict(overrides or {}))


def vision_config(cfg) -> mc.VisionConfig:
    return _preset(mc.VISION_PRESETS, cfg.model.vision, cfg.model.get("vision_overrides"))


def runtime(cfg) -> mc.Runtime:
    return mc.Runtime(**cfg.runtime.to_dict())


@metrics.flax.struct.dataclass
class ClassificationMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    accuracy: metrics.Average.from_output("accuracy")


@metrics.flax.struct.dataclass
class ContrastiveMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    retrieval_top1: metrics.Average.from_output("retrieval_top1")


@metrics.flax.struct.dataclass
class LanguageMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    token_accuracy: metrics.Average.from_output("token_accuracy")
    tokens: metrics.Average.from_output("tokens")


class ClassificationTask:
    """Stage 1A: ViT + linear head, binary cross-entropy on normal (0) / abnormal (1)."""

    metrics = ClassificationMetrics
    unit = "img"

    def __init__(self, cfg):
        self.model = ViTClassifier(vision_config(cfg), runtime(cfg))
        self.config = self.model.config

    def dummy_batch(self, batch_size: int):
        size = self.config.image_size
        return {"image": jnp.zeros((batch_size, size, size, 1)), "label": jnp.zeros((batch_size,), jnp.int32)}

    def init(self, rng, batch):
        return self.model.init(rng, batch["image"])

    def loss(self, params, batch, rng, train: bool = True):
        logits, _ = self.model.apply({"params": params}, batch["image"], train=train, rngs={"dropout": rng})
        labels = batch["label"].astype(jnp.float32)
        loss = optax.sigmoid_binary_cross_entropy(logits, labels).mean()
        outputs = {"loss": loss, "accuracy": ((logits > 0) == (labels > 0.5)).mean(),
                   "probability": jax.nn.sigmoid(logits), "label": labels}
        return loss, outputs

    def units(self, batch) -> int:
        return batch["image"].shape[0]


class ContrastiveTask:
    """Stage 1B: image tower against the BERT text tower, symmetric InfoNCE."""

    metrics = ContrastiveMetrics
    unit = "img"

    def __init__(self, cfg):
        text = _preset(mc.BERT_PRESETS, cfg.model.text, cfg.model.get("text_overrides"))
        self.config = mc.ContrastiveConfig(vision=vision_config(cfg), text=text, text_pooling=cfg.model.text_pooling)
        self.model = ContrastiveModel(self.config, runtime(cfg))
        self.text_length = cfg.data.text_length

    def dummy_batch(self, batch_size: int):
        size = self.config.vision.image_size
        ids = jnp.zeros((batch_size, self.text_length), jnp.int32)
        return {"image": jnp.zeros((batch_size, size, size, 1)), "input_ids": ids, "attention_mask": ids + 1}

    def init(self, rng, batch):
        return self.model.init(rng, batch["image"], batch["input_ids"], batch["attention_mask"])

    def loss(self, params, batch, rng, train: bool = True):
        img, txt, scale = self.model.apply({"params": params}, batch["image"], batch["input_ids"],
                                           batch["attention_mask"], train=train, rngs={"dropout": rng})
        loss, logits = contrastive_loss(img, txt, scale)
        top1 = (jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0])).mean()
        return loss, {"loss": loss, "retrieval_top1": top1}

    def units(self, batch) -> int:
        return batch["image"].shape[0]


class InstructionTask:
    """Stages 2A/2B: next-token cross-entropy on assistant tokens of image conversations."""

    metrics = LanguageMetrics
    unit = "tok"

    def __init__(self, cfg):
        llama = _preset(mc.LLAMA_PRESETS, cfg.model.llama, cfg.model.get("llama_overrides"))
        self.config = mc.CXRLLaVAConfig(vision=vision_config(cfg), llama=llama, projector=cfg.model.projector,
                                        image_mean=cfg.data.image_mean, image_std=cfg.data.image_std)
        self.model = CXRLLaVA(self.config, runtime(cfg))
        self.seq_length = cfg.data.seq_length

    def dummy_batch(self, batch_size: int):
        size = self.config.vision.image_size
        tokens = jnp.zeros((batch_size, self.seq_length), jnp.int32)
        tokens = tokens.at[:, 1:1 + self.config.num_image_tokens].set(self.config.image_token_id)
        return {"image": jnp.zeros((batch_size, size, size, 1)), "tokens": tokens,
                "loss_mask": jnp.zeros_like(tokens, bool), "valid": jnp.ones_like(tokens, bool)}

    def init(self, rng, batch):
        return self.model.init(rng, batch["image"], batch["tokens"], batch["valid"])

    def loss(self, params, batch, rng, train: bool = True):
        logits = self.model.apply({"params": params}, batch["image"], batch["tokens"], batch["valid"])
        # Position t predicts token t+1; only assistant tokens (loss_mask) are scored.
        targets = batch["tokens"][:, 1:]
        weights = batch["loss_mask"][:, 1:].astype(jnp.float32)
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], jnp.maximum(targets, 0))
        count = jnp.maximum(weights.sum(), 1.0)
        loss = (per_token * weights).sum() / count
        correct = ((jnp.argmax(logits[:, :-1], -1) == targets) * weights).sum() / count
        return loss, {"loss": loss, "token_accuracy": correct, "tokens": weights.sum()}

    def units(self, batch) -> int:
        return int(batch["valid"].sum())


TASKS = {"1a": ClassificationTask, "1b": ContrastiveTask, "2a": InstructionTask, "2b": InstructionTask}


def make_task(cfg):
    if cfg.stage not in TASKS:
        raise ConfigError(f"config.stage must be one of {sorted(TASKS)}, got {cfg.stage!r}")
    return TASKS[cfg.stage](cfg)
