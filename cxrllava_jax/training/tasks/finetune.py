"""Fine-tuning a trained CXR-LLaVA (the release or any of our checkpoints) on the user's conversations with LoRA.

The architecture, normalisation and tokenizer are the base model's own (training/base_model.py), not the
presets'. Only the adapters train (`frozen` is everything else); the base is kept in `config.lora.base_dtype`,
the adapters in fp32. The export is the adapted model with the adapters merged, plus the adapters alone in
PEFT's format beside it (`WORKDIR/adapter`) when they adapt only the language model.

QLoRA (`config.lora.base_quantize`): the base's language model is quantized as inference quantizes it, after
its weights are loaded (`hold_frozen`); the model trains and evaluates on those weights. Checkpoints leave the
base out (`unsaved`): it is loaded again from `config.init` when a run resumes.
"""

import dataclasses
from pathlib import Path

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from cxrllava_jax.convert import peft
from cxrllava_jax.convert.mapping import ConversionError
from cxrllava_jax.domain import images
from cxrllava_jax.models import lora
from cxrllava_jax.models.cxr_llava import CXRLLaVAModel
from cxrllava_jax.training import base_model
from cxrllava_jax.training.tasks.base import Task, runtime
from cxrllava_jax.training.tasks.instruction import InstructionTask, next_token_loss


class FinetuneTask(InstructionTask):
    def __init__(self, cfg):
        Task.__init__(self, cfg)
        self.frozen = (lora.BASE_PATTERN,)
        self.config = base_model.config(cfg)
        self.settings = lora.LoraSettings(**{k: (tuple(v) if k == "targets" else v)
                                             for k, v in cfg.lora.to_dict().items() if k != "base_dtype"})
        base = lambda: CXRLLaVAModel(self.config, runtime(cfg))  # noqa: E731
        self.model = lora.with_lora(base(), self.settings)
        # Qwix's LoRA dropout is always on: evaluation runs the same adapters without it.
        self.eval_model = lora.with_lora(base(), dataclasses.replace(self.settings, dropout=0.0))
        self.init_model = lora.with_lora(base(), lora.float_settings(self.settings))
        self.base_model = base()
        self.seq_length = cfg.data.seq_length
        self.base_dtype = jnp.dtype(cfg.lora.base_dtype)
        self.unsaved = self.frozen

    @property
    def tokenizer_dir(self):
        """The base model's own tokenizer unless config.data.tokenizer names another."""
        return base_model.tokenizer_dir(self.cfg)

    def image(self, example) -> np.ndarray:
        """Preprocessed as the base model was trained (its normalisation, whatever config.data says)."""
        cfg = self.config
        return images.preprocess(example.image, cfg.vision.image_size, cfg.image_mean, cfg.image_std,
                                 mode=self.cfg.data.image_mode)

    def init(self, rng, batch):
        # Without logical rules in force: Qwix 0.1.8 unboxes the kernel's partitioning box around the new adapter
        # value while creating it, which under our rules constrains the 2-D adapter with the kernel's 3-D names.
        # Initial values are placed by `create_sharded`'s out_shardings either way.
        with nn.logical_axis_rules(()):
            variables = self.init_model.init(rng, batch["image"], batch["tokens"], batch["valid"])
        lora.check_targets(variables["params"], self.settings)
        return {"params": lora.cast_base(variables["params"], self.base_dtype)}

    def quantize_frozen(self, params):
        if self.settings.base_quantize is None:
            return params
        batch = self.dummy_batch(1)
        return lora.quantize_base(params, self.base_model, self.settings.base_quantize,
                                  self.model_images(batch["image"]), batch["tokens"], batch["valid"])

    def base_reference(self) -> dict:
        return {"base": str(self.cfg.init.release or self.cfg.init.checkpoint),
                "quantize": self.settings.base_quantize}

    def loss(self, params, batch, rng, train: bool = True):
        model = self.model if train else self.eval_model
        return next_token_loss(model, params, self.model_images(batch["image"]), batch, self.config.num_image_tokens,
                               rngs={"dropout": rng})

    def export(self, path, params) -> list:
        try:
            adapter = [peft.save_peft(Path(path).parent / "adapter", params, self.settings,
                                      self.cfg.init.release or self.cfg.init.checkpoint, overwrite=True)]
        except ConversionError as reason:
            print(f"[stage finetune] no PEFT adapter written: {reason}", flush=True)
            adapter = []
        return adapter + super().export(path, lora.merge(params, self.settings))
