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

from cxrllava_jax import hub
from cxrllava_jax.convert import peft
from cxrllava_jax.convert.mapping import ConversionError
from cxrllava_jax.models import lora
from cxrllava_jax.models.cxr_llava import CXRLLaVAModel
from cxrllava_jax.training import base_model
from cxrllava_jax.training.tasks.base import runtime
from cxrllava_jax.training.tasks.instruction import InstructionTask, next_token_loss


class FinetuneTask(InstructionTask):
    def __init__(self, cfg):
        self.settings = lora.LoraSettings(**{k: (tuple(v) if k == "targets" else v)
                                             for k, v in cfg.lora.to_dict().items() if k != "base_dtype"})
        super().__init__(cfg)
        self.frozen = self.unsaved = (lora.BASE_PATTERN,)
        self.base_dtype = jnp.dtype(cfg.lora.base_dtype)

    def make_model_config(self):
        """The base model's own architecture and normalisation, whatever the presets and config.data say."""
        return base_model.config(self.cfg)

    def find_tokenizer(self):
        """The base model's own tokenizer unless config.data.tokenizer names another."""
        return base_model.tokenizer_dir(self.cfg)

    def build_model(self):
        return self.adapted(self.settings)

    def adapted(self, settings: lora.LoraSettings | None):
        """The base model with `settings`' adapters (None: the bare base, which QLoRA quantizes)."""
        base = CXRLLaVAModel(self.model_config, runtime(self.cfg))
        return base if settings is None else lora.with_lora(base, settings)

    def normalisation(self) -> tuple[float, float]:
        # Batches carry uint8 pixels like every stage's; they are normalised as the base model was trained.
        return self.model_config.image_mean, self.model_config.image_std

    def init(self, rng, batch):
        # Without logical rules in force: Qwix 0.1.8 unboxes the kernel's partitioning box around the new adapter
        # value while creating it, which under our rules constrains the 2-D adapter with the kernel's 3-D names.
        # Initial values are placed by `create_sharded`'s out_shardings either way.
        with nn.logical_axis_rules(()):
            variables = self.adapted(lora.float_settings(self.settings)).init(
                rng, self.model_images(batch["image"]), batch["tokens"], batch["valid"])
        lora.check_targets(variables["params"], self.settings)
        return {"params": lora.cast_base(variables["params"], self.base_dtype)}

    def quantize_frozen(self, params):
        if self.settings.base_quantize is None:
            return params
        batch = self.dummy_batch(1)
        return lora.quantize_base(params, self.adapted(None), self.settings.base_quantize,
                                  self.model_images(batch["image"]), batch["tokens"], batch["valid"])

    def base_reference(self) -> dict:
        return {"base": str(self.cfg.init.release or self.cfg.init.checkpoint),
                "quantize": self.settings.base_quantize}

    def loss(self, params, batch, rng, train: bool = True):
        # Qwix's LoRA dropout is always on: evaluation runs the same adapters without it.
        model = self.model if train else self.adapted(dataclasses.replace(self.settings, dropout=0.0))
        return next_token_loss(model, params, self.model_images(batch["image"]), batch,
                               self.model_config.num_image_tokens, rngs={"dropout": rng})

    def export(self, path, params) -> list:
        try:
            base = self.cfg.init.release or self.cfg.init.checkpoint
            adapter = [peft.save_peft(Path(path).parent / "adapter", params, self.settings, hub.hub_id(base) or base,
                                      overwrite=True)]
        except ConversionError as reason:
            print(f"[stage finetune] no PEFT adapter written: {reason}", flush=True)
            adapter = []
        return adapter + super().export(path, lora.merge(params, self.settings))
