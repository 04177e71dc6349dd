"""Stage 1A: ViT + linear head, binary cross-entropy on normal (0) / abnormal (1)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cxrllava_jax.models.vit import ViTClassifier
from cxrllava_jax.training.metrics import AUROC, averages
from cxrllava_jax.training.tasks.base import Example, Task, runtime, vision_config
from input_pipeline.records import is_abnormal


class ClassificationTask(Task):
    unit = "img"
    export_kind = "vit_classifier"
    train_metrics = averages("loss", "accuracy")
    eval_metrics = averages("loss", "accuracy", auroc=AUROC)  # normal vs abnormal over the whole split

    def __init__(self, cfg):
        super().__init__(cfg)
        self.model = ViTClassifier(vision_config(cfg), runtime(cfg))
        self.model_config = self.model.config

    def examples(self, records) -> list[Example]:
        """Records whose labels decide normal vs abnormal (under `config.data.uncertain_policy`)."""
        labelled = ((r, is_abnormal(r.labels, self.cfg.data.uncertain_policy)) for r in records)
        return [Example(r.image, label=int(y)) for r, y in labelled if y is not None]

    def encoder(self):
        return lambda e: {"image": self.image(e), "label": np.int32(e.label)}

    def abstract_batch(self, batch_size: int):
        return {"image": self.abstract_images(batch_size), "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

    def init(self, rng, batch):
        return self.model.init(rng, self.model_images(batch["image"]))

    def loss(self, params, batch, rng, train: bool = True):
        logits, aux = self.model.apply({"params": params}, self.model_images(batch["image"]), train=train,
                                       rngs={"dropout": rng})
        labels = batch["label"].astype(jnp.float32)
        loss = optax.sigmoid_binary_cross_entropy(logits, labels).mean()
        outputs = {"loss": loss, "accuracy": ((logits > 0) == (labels > 0.5)).mean(),
                   "probability": aux["probability"], "label": labels}
        return loss, outputs
