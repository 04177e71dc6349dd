"""Stages 2A/2B: next-token cross-entropy on the assistant tokens of image conversations.

2A (alignment) sees one report conversation per study, 2B (instruction tuning) every instruction conversation;
they differ otherwise only in what `config.frozen` holds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from cxrllava_jax.domain import prompting
from cxrllava_jax.domain.tokenizer import check_vocabulary, load_tokenizer
from cxrllava_jax.models import configs as mc
from cxrllava_jax.models.cxr_llava import CXRLLaVAModel
from cxrllava_jax.training.metrics import averages
from cxrllava_jax.training.tasks.base import Example, Task, preset, runtime, vision_config
from input_pipeline import instructions


class InstructionTask(Task):
    unit = "tok"
    export_kind = "cxr_llava"
    train_metrics = eval_metrics = averages("loss", "token_accuracy", "tokens")

    def __init__(self, cfg):
        super().__init__(cfg)
        llama = preset(mc.LLAMA_PRESETS, cfg.model.llama, cfg.model.get("llama_overrides"))
        self.config = mc.CXRLLaVAConfig(vision=vision_config(cfg), llama=llama, projector=cfg.model.projector,
                                        image_mean=cfg.data.image_mean, image_std=cfg.data.image_std)
        self.model = CXRLLaVAModel(self.config, runtime(cfg))
        self.seq_length = cfg.data.seq_length

    def examples(self, records) -> list[Example]:
        if self.cfg.data.conversations == "report":
            report_turns = lambda r: [{"role": "user", "content": prompting.REPORT_PROMPT},  # noqa: E731
                                      {"role": "assistant", "content": r.report}]
            return [Example(r.image, conversation=report_turns(r)) for r in records if r.report]
        # Instruction tuning: the study's own instruction turns where the source has them (the synthetic set),
        # else the ones built from its report.
        return [Example(r.image, conversation=c) for r in records
                for c in (r.conversations or instructions.conversations(r))]

    def encoder(self):
        tokenizer = load_tokenizer(self.cfg.data.tokenizer)
        check_vocabulary(tokenizer, self.config.llama.vocab_size, self.cfg.data.tokenizer)

        def encode(e):
            tokens, mask = prompting.encode_conversation(e.conversation, tokenizer, self.config.num_image_tokens,
                                                         self.config.image_token_id)
            tokens, mask, valid = fit_length(tokens, mask, self.seq_length, e.image)
            return {"image": self.image(e), "tokens": tokens, "loss_mask": mask, "valid": valid}

        return encode

    def abstract_batch(self, batch_size: int):
        size = self.config.vision.image_size
        tokens = (batch_size, self.seq_length)
        return {"image": jax.ShapeDtypeStruct((batch_size, size, size, 1), jnp.float32),
                "tokens": jax.ShapeDtypeStruct(tokens, jnp.int32), "loss_mask": jax.ShapeDtypeStruct(tokens, bool),
                "valid": jax.ShapeDtypeStruct(tokens, bool)}

    def dummy_batch(self, batch_size: int):
        """All-valid rows with the image positions right after BOS, as tokenisation places them; no answer."""
        batch = super().dummy_batch(batch_size)
        batch["tokens"] = batch["tokens"].at[:, 1:1 + self.config.num_image_tokens].set(self.config.image_token_id)
        batch["valid"] = jnp.ones_like(batch["valid"])
        return batch

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

    def export_tokenizer(self) -> str:
        return self.cfg.data.tokenizer  # the tokenizer belongs to the language model and travels with it


def fit_length(tokens, mask, length: int, origin: str):
    """Right-pads (or truncates the end of) a conversation to `length`; truncation never cuts the image."""
    first_answer = int(np.argmax(mask)) if mask.any() else len(tokens)
    if first_answer >= length:
        raise ValueError(f"{origin}: the prompt alone is {first_answer} tokens, leaving no room for the answer in "
                         f"config.data.seq_length={length}")
    valid = np.zeros(length, bool)
    valid[:min(len(tokens), length)] = True
    out_tokens = np.zeros(length, np.int32)
    out_mask = np.zeros(length, bool)
    out_tokens[:valid.sum()] = tokens[:length]
    out_mask[:valid.sum()] = mask[:length]
    return out_tokens, out_mask, valid
