"""Stage 1B: the image tower against the BERT text tower, symmetric InfoNCE, on label keywords or reports."""

import jax
import jax.numpy as jnp
import numpy as np

from cxrllava_jax.domain.tokenizer import check_vocabulary
from cxrllava_jax.errors import ConfigError
from cxrllava_jax.models import configs as mc
from cxrllava_jax.models.clip import ContrastiveModel, contrastive_loss
from cxrllava_jax.training.metrics import averages
from cxrllava_jax.training.tasks.base import Example, Task, preset, runtime, vision_config
from input_pipeline.records import keyword_text


class ContrastiveTask(Task):
    unit = "img"
    export_kind = "contrastive"
    train_metrics = eval_metrics = averages("loss", "retrieval_top1")

    def __init__(self, cfg):
        super().__init__(cfg)
        text = preset(mc.BERT_PRESETS, cfg, "text")
        self.model_config = mc.ContrastiveConfig(vision=vision_config(cfg), text=text,
                                                 text_pooling=cfg.model.text_pooling)
        self.model = ContrastiveModel(self.model_config, runtime(cfg))
        self.text_length = cfg.data.text_length
        if cfg.text_unfreeze_step > 0:  # the paper's text tower waits for the image tower (70k steps)
            self.releases = (("txt/.*", cfg.text_unfreeze_step),)

    def examples(self, records) -> list[Example]:
        if self.cfg.data.text_kind == "labels":
            # Records whose labels say nothing certain have no keyword text and are left out.
            texts = ((r, keyword_text(r.labels, r.findings)) for r in records)
            return [Example(r.image, text=t) for r, t in texts if t]
        return [Example(r.image, text=r.report) for r in records if r.report]

    def encoder(self):
        import transformers

        path = self.cfg.data.text_tokenizer or self.cfg.init.bert
        if not path:
            raise ConfigError("stage 1B needs config.data.text_tokenizer (or config.init.bert): a BERT tokenizer dir")
        # Padding on the right is what the text tower's attention promises its kernels (models/bert.py).
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, padding_side="right")
        check_vocabulary(tokenizer, self.model_config.text.vocab_size, path)

        def encode(e):
            out = tokenizer(e.text, max_length=self.text_length, padding="max_length", truncation=True)
            return {"image": self.image(e), "input_ids": np.asarray(out["input_ids"], np.int32),
                    "attention_mask": np.asarray(out["attention_mask"], np.int32)}

        return encode

    def abstract_batch(self, batch_size: int):
        text = jax.ShapeDtypeStruct((batch_size, self.text_length), jnp.int32)
        return {"image": self.abstract_images(batch_size), "input_ids": text, "attention_mask": text}

    def dummy_batch(self, batch_size: int):
        batch = super().dummy_batch(batch_size)
        batch["attention_mask"] = jnp.ones_like(batch["attention_mask"])  # every text one full-length token run
        return batch

    def init(self, rng, batch):
        return self.model.init(rng, self.model_images(batch["image"]), batch["input_ids"], batch["attention_mask"])

    def loss(self, params, batch, rng, train: bool = True):
        logits, _ = self.model.apply({"params": params}, self.model_images(batch["image"]), batch["input_ids"],
                                     batch["attention_mask"], train=train, rngs={"dropout": rng})
        loss = contrastive_loss(logits)
        top1 = (jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0])).mean()
        return loss, {"loss": loss, "retrieval_top1": top1}
