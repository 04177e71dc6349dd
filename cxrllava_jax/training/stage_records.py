"""What one training example of each stage is, from the common record schema.

1A: (image, normal/abnormal); 1B: (image, keyword or report text); 2A: (image, report conversation);
2B: (image, every instruction conversation of the study). `encoder` turns one such example into
arrays: the preprocessed image plus the stage's label or tokens.
"""

import dataclasses
from pathlib import Path

import numpy as np

from cxrllava_jax.domain import prompting
from cxrllava_jax.domain.tokenizer import load_tokenizer
from cxrllava_jax.domain import images
from input_pipeline import instructions, tfds_builders
from input_pipeline.records import is_abnormal, keyword_text
from input_pipeline.sources import ADAPTERS


@dataclasses.dataclass
class Example:
    image: str | tfds_builders.StoredImage
    label: int = 0
    text: str = ""
    conversation: list | None = None


def load(cfg, split: str) -> list[Example]:
    """The split's examples from every configured source: the published files under `config.data.data_dir`
    read by the adapters, or, with `config.data.tfds_dir`, the ArrayRecord version `tfds_builders.build` wrote."""
    examples = []
    for source in cfg.data.sources:
        if source not in ADAPTERS:
            raise ValueError(f"config.data.sources names {source!r}; adapters exist for {sorted(ADAPTERS)}")
        if cfg.data.get("tfds_dir"):
            records = tfds_builders.records(source, cfg.data.tfds_dir, split)
        else:
            root = Path(cfg.data.data_dir) / source if len(cfg.data.sources) > 1 else Path(cfg.data.data_dir)
            records = ADAPTERS[source](root, split)
        examples += _view(cfg, records)
    return examples


def _view(cfg, records) -> list[Example]:
    stage = cfg.stage
    if stage == "1a":
        labelled = ((r, is_abnormal(r.labels, cfg.data.uncertain_policy)) for r in records)
        return [Example(r.image, label=int(y)) for r, y in labelled if y is not None]
    if stage == "1b":
        if cfg.data.text_kind == "labels":
            # Records whose labels say nothing certain have no keyword text and are left out.
            texts = ((r, keyword_text(r.labels, r.findings)) for r in records)
            return [Example(r.image, text=t) for r, t in texts if t]
        return [Example(r.image, text=r.report) for r in records if r.report]
    if cfg.data.conversations == "report":
        report_turns = lambda r: [{"role": "user", "content": prompting.REPORT_PROMPT},  # noqa: E731
                                  {"role": "assistant", "content": r.report}]
        return [Example(r.image, conversation=report_turns(r)) for r in records if r.report]
    # Instruction tuning: the study's own instruction turns where the source has them (the synthetic set),
    # else the ones built from its report.
    return [Example(r.image, conversation=c) for r in records
            for c in (r.conversations or instructions.conversations(r))]


def encoder(cfg, task):
    """example -> dict of numpy arrays for the stage's task."""
    size = task_image_size(task)
    mean, std = cfg.data.image_mean, cfg.data.image_std

    def image(example):
        return images.preprocess(example.image, size, mean, std, mode=cfg.data.image_mode)

    if cfg.stage == "1a":
        return lambda e: {"image": image(e), "label": np.int32(e.label)}
    if cfg.stage == "1b":
        tokenizer = load_text_tokenizer(cfg)
        _check_vocabulary(tokenizer, task.config.text.vocab_size, cfg.data.text_tokenizer or cfg.init.bert)

        def encode_text(e):
            out = tokenizer(e.text, max_length=cfg.data.text_length, padding="max_length", truncation=True)
            return {"image": image(e), "input_ids": np.asarray(out["input_ids"], np.int32),
                    "attention_mask": np.asarray(out["attention_mask"], np.int32)}

        return encode_text
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model_config = task.config
    _check_vocabulary(tokenizer, model_config.llama.vocab_size, cfg.data.tokenizer)

    def encode_conversation(e):
        tokens, mask = prompting.encode_conversation(e.conversation, tokenizer, model_config.num_image_tokens,
                                                     model_config.image_token_id)
        tokens, mask, valid = fit_length(tokens, mask, cfg.data.seq_length, e.image)
        return {"image": image(e), "tokens": tokens, "loss_mask": mask, "valid": valid}

    return encode_conversation


def _check_vocabulary(tokenizer, model_vocab_size: int, origin: str):
    """Token ids past the embedding table would be silently clamped by the gather: refuse them up front."""
    if len(tokenizer) > model_vocab_size:
        raise ValueError(f"the tokenizer in {origin} has {len(tokenizer)} tokens but the model's vocabulary is "
                         f"{model_vocab_size}; use a matching tokenizer or a larger vocab_size")


def task_image_size(task) -> int:
    config = task.config
    return (config.vision if hasattr(config, "vision") else config).image_size


def load_text_tokenizer(cfg):
    import transformers

    path = cfg.data.text_tokenizer or cfg.init.bert
    if not path:
        raise ValueError("stage 1B needs config.data.text_tokenizer (or config.init.bert): a BERT tokenizer dir")
    return transformers.AutoTokenizer.from_pretrained(path)


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
