"""Stages 2A/2B: next-token cross-entropy on the assistant tokens of image conversations.

2A (alignment) sees one report conversation per study, 2B (instruction tuning) every instruction conversation;
they differ otherwise only in what `config.frozen` holds.

With `config.data.max_images` > 1 (studies: conversation files with `"image": [..]` lists) a batch's images are
[batch, max_images, size, size, 1], a row's images in its `<image>` places' order and zeros after them; the model
reads as many slots as the row's tokens have places (models/cxr_llava.py), so the tokens are the mask.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cxrllava_jax.convert import checkpoint as model_checkpoint
from cxrllava_jax.convert import hf_llama
from cxrllava_jax.domain import images, prompting
from cxrllava_jax.domain.tokenizer import check_vocabulary, load_tokenizer
from cxrllava_jax.errors import ConfigError, InputError
from cxrllava_jax.models import configs as mc
from cxrllava_jax.models.cxr_llava import CXRLLaVAModel
from cxrllava_jax.training.metrics import averages
from cxrllava_jax.training.tasks.base import Example, Task, preset, runtime, vision_config, with_overrides
from input_pipeline import instructions, pipelines
from input_pipeline.records import image_paths


def language_model_config(cfg) -> mc.LlamaConfig:
    """The language model the stage starts from: the one `config.init.llama` names (any LLaMA-family Hugging Face
    directory), or the one inside `config.init.checkpoint` when its `llm` tower is loaded, else the
    `config.model.llama` preset; `config.model.llama_overrides` applies to each."""
    overrides = dict(cfg.model.get("llama_overrides") or {})
    if cfg.init.get("llama"):
        return with_overrides(hf_llama.read_config(cfg.init.llama), overrides, "config.model.llama_overrides")
    checkpoint = cfg.init.get("checkpoint")
    # A checkpoint that is not there yet fails by name when its weights load.
    if checkpoint and "llm" in cfg.init.get("towers", ()) and Path(checkpoint, "model_config.json").is_file():
        kind, config, _ = model_checkpoint.read_model_config(checkpoint)
        if kind == "cxr_llava":
            return with_overrides(config.llama, overrides, "config.model.llama_overrides")
    return preset(mc.LLAMA_PRESETS, cfg, "llama")


class InstructionTask(Task):
    unit = "tok"
    export_kind = "cxr_llava"
    train_metrics = eval_metrics = averages("loss", "token_accuracy", "tokens")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.model_config = self.make_model_config()
        self.model = self.build_model()
        self.seq_length = cfg.data.seq_length
        self.max_images = cfg.data.max_images
        self.tokenizer_dir = self.find_tokenizer()

    # What a subclass that starts from a finished model (fine-tuning) replaces.
    def make_model_config(self) -> mc.CXRLLaVAConfig:
        """The model the stage trains: the presets and `config.init` as the stage config sets them."""
        cfg = self.cfg
        return mc.CXRLLaVAConfig(vision=vision_config(cfg), llama=language_model_config(cfg),
                                 projector=cfg.model.projector, image_mean=cfg.data.image_mean,
                                 image_std=cfg.data.image_std, projector_pool=cfg.model.projector_pool)

    def build_model(self):
        return CXRLLaVAModel(self.model_config, runtime(self.cfg))

    def find_tokenizer(self):
        return self.cfg.data.tokenizer

    def examples(self, records) -> list[Example]:
        crowded = next((r for r in records if len(image_paths(r.image)) > self.max_images), None)
        if crowded is not None:  # before training starts, not at the batch that holds it
            raise ConfigError(f"{crowded.origin}: {len(crowded.image)} images in one example, more than "
                              f"config.data.max_images={self.max_images} slots a row; raise it")
        if self.cfg.data.conversations == "report":
            report_turns = lambda r: [{"role": "user", "content": prompting.REPORT_PROMPT},  # noqa: E731
                                      {"role": "assistant", "content": r.report}]
            return [Example(r.image, conversation=report_turns(r)) for r in records if r.report]
        # Instruction tuning: the study's own instruction turns where the source has them (the synthetic set),
        # else the ones built from its report.
        return [Example(r.image, conversation=c) for r in records
                for c in (r.conversations or instructions.conversations(r))]

    def encoder(self):
        tokenizer = load_tokenizer(self.tokenizer_dir)
        check_vocabulary(tokenizer, self.model_config.llama.vocab_size, self.tokenizer_dir)
        if self.cfg.init.get("checkpoint"):  # the previous stage's model learned this tokenizer's ids, no other's
            model_checkpoint.check_tokenizer(self.tokenizer_dir, self.cfg.init.checkpoint)

        def encode(e):
            origin = ", ".join(image_paths(e.image))
            prompting.check_image_count(e.conversation, len(image_paths(e.image)), origin)
            tokens, mask = self._tokens(e, tokenizer)
            tokens, mask, valid = fit_length(tokens, mask, self.seq_length, origin, self.model_config.image_token_id)
            return {"image": self.image(e), "tokens": tokens, "loss_mask": mask, "valid": valid}

        return encode

    def image(self, example) -> np.ndarray:
        """One image's model pixels [size, size, 1], or with `max_images` > 1 the row's slots [max_images, size,
        size, 1] (zeros after its images). A lateral view is read beside the others of its study."""
        sources = image_paths(example.image)  # at most max_images: `examples` refused more
        if self.max_images == 1:
            return super().image(example)
        size = self.image_size()
        slots = np.zeros((self.max_images, size, size, 1), np.uint8)
        for i, source in enumerate(sources):
            slots[i] = images.model_pixels(source, size, mode=self.cfg.data.image_mode, allow_lateral=len(sources) > 1)
        return slots

    def abstract_images(self, batch_size: int) -> jax.ShapeDtypeStruct:
        one = super().abstract_images(batch_size)
        if self.max_images == 1:
            return one
        return jax.ShapeDtypeStruct((batch_size, self.max_images, *one.shape[1:]), one.dtype)

    def _tokens(self, example, tokenizer):
        return prompting.encode_conversation(example.conversation, tokenizer, self.model_config.num_image_tokens,
                                             self.model_config.image_token_id)

    def sequence_buckets(self, examples, sample_size: int = 2000) -> pipelines.Buckets | None:
        """`config.data.seq_buckets` lengths chosen from a seeded sample of the examples' token counts, plus
        `config.data.seq_length` itself for the longest; None when off (0)."""
        if not self.cfg.data.seq_buckets:
            return None
        tokenizer, longest = load_tokenizer(self.tokenizer_dir), self.seq_length

        def length(example) -> int:
            return min(len(self._tokens(example, tokenizer)[0]), longest)

        sample = np.random.default_rng(self.cfg.data.shuffle_seed).permutation(len(examples))[:sample_size]
        sizes = pipelines.choose_buckets([length(examples[i]) for i in sample], longest, self.cfg.data.seq_buckets)
        return pipelines.Buckets(length, tuple(sorted(set(sizes) | {longest})), ("tokens", "loss_mask", "valid"))

    def abstract_batch(self, batch_size: int):
        tokens = (batch_size, self.seq_length)
        return {"image": self.abstract_images(batch_size),
                "tokens": jax.ShapeDtypeStruct(tokens, jnp.int32), "loss_mask": jax.ShapeDtypeStruct(tokens, bool),
                "valid": jax.ShapeDtypeStruct(tokens, bool)}

    def dummy_batch(self, batch_size: int):
        """All-valid rows with the image positions right after BOS, as tokenisation places them; no answer."""
        batch = super().dummy_batch(batch_size)
        places = slice(1, 1 + self.model_config.num_image_tokens)
        batch["tokens"] = batch["tokens"].at[:, places].set(self.model_config.image_token_id)
        batch["valid"] = jnp.ones_like(batch["valid"])
        return batch

    def init(self, rng, batch):
        return self.model.init(rng, self.model_images(batch["image"]), batch["tokens"], batch["valid"])

    def loss(self, params, batch, rng, train: bool = True):
        return next_token_loss(self.model, params, self.model_images(batch["image"]), batch,
                               self.model_config.num_image_tokens)

    def units(self, batch) -> int:
        return int(batch["valid"].sum())

    def export_tokenizer(self) -> str:
        return self.tokenizer_dir  # the tokenizer belongs to the language model and travels with it


def next_token_loss(model, params, images, batch, num_image_tokens: int, **apply_kwargs):
    """(loss, outputs) of next-token cross-entropy where `batch["loss_mask"]` marks the scored tokens."""
    # Position t predicts token t+1; only assistant tokens (loss_mask) are scored, and only the positions
    # that predict them are projected onto the vocabulary (never [batch, length, vocab] for the image).
    at, targets, weights = scored_positions(batch["tokens"], batch["loss_mask"], num_image_tokens)
    logits, _ = model.apply({"params": params}, images, batch["tokens"], batch["valid"], at, method="logits_at",
                            **apply_kwargs)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(targets, 0))
    count = jnp.maximum(weights.sum(), 1.0)
    loss = (per_token * weights).sum() / count
    correct = ((jnp.argmax(logits, -1) == targets) * weights).sum() / count
    return loss, {"loss": loss, "token_accuracy": correct, "tokens": weights.sum()}


def scored_positions(tokens, loss_mask, num_image_tokens: int):
    """(positions [batch, n], their next tokens, weights 1/0): the positions whose next token is scored, first.

    n is static: a row has `num_image_tokens` image positions, which are never scored, so at most
    length - 1 - num_image_tokens of its length - 1 predictions are; the rest of the n are weight-0 fillers.
    """
    scored = loss_mask[:, 1:]
    n = max(scored.shape[1] - num_image_tokens, 1)
    at = jnp.argsort(~scored, axis=1, stable=True)[:, :n]  # scored positions first, in order
    return (at, jnp.take_along_axis(tokens[:, 1:], at, axis=1),
            jnp.take_along_axis(scored, at, axis=1).astype(jnp.float32))


def fit_length(tokens, mask, length: int, origin: str, image_token_id: int):
    """Right-pads (or truncates the end of) a conversation to `length`; truncation never cuts the image."""
    first_answer = int(np.argmax(mask)) if mask.any() else len(tokens)
    if first_answer >= length:
        raise InputError(f"{origin}: the prompt alone is {first_answer} tokens ({int((tokens == image_token_id).sum())} "
                         f"of them image positions), leaving no room for the answer in config.data.seq_length={length}")
    valid = np.zeros(length, bool)
    valid[:min(len(tokens), length)] = True
    out_tokens = np.zeros(length, np.int32)
    out_mask = np.zeros(length, bool)
    out_tokens[:valid.sum()] = tokens[:length]
    out_mask[:valid.sum()] = mask[:length]
    return out_tokens, out_mask, valid
