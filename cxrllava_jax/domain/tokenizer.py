"""LLaMA tokenizers: load one from a directory, or train a small LLaMA-style one for the tiny models.

Real runs use LLaMA-2's own `tokenizer.model`. The demo's tiny language models get a SentencePiece
BPE model with LLaMA's conventions (byte fallback, <unk>=0, <s>=1, </s>=2, no pad), trained on the
synthetic reports and the prompts, saved in the same files so the same loading code serves both.
"""

import hashlib
import json
from pathlib import Path
from typing import Iterable

import sentencepiece as spm
import transformers

from cxrllava_jax.errors import MismatchError

# The chat template's markers become single tokens in the small tokenizers (LLaMA-2 splits them).
CHAT_MARKERS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")


def load_tokenizer(path) -> transformers.PreTrainedTokenizerBase:
    path = Path(path)
    if not (path / "tokenizer.model").is_file() and not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.model or tokenizer.json (a LLaMA tokenizer directory)")
    if (path / "tokenizer.model").is_file():
        return transformers.LlamaTokenizer.from_pretrained(str(path))
    return transformers.AutoTokenizer.from_pretrained(str(path))


def vocabulary_fingerprint(tokenizer) -> str:
    """A hash of every token and its id (and the BOS/EOS ids): two tokenizers share it only if each id means the
    same piece, which a size comparison cannot tell."""
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    data = json.dumps([vocabulary, tokenizer.bos_token_id, tokenizer.eos_token_id], ensure_ascii=False)
    return "sha256:" + hashlib.sha256(data.encode("utf-8")).hexdigest()


def check_fingerprint(tokenizer, expected: str | None, tokenizer_origin, model_origin):
    """Refuses a tokenizer whose vocabulary is not the one the model was trained or saved with."""
    found = vocabulary_fingerprint(tokenizer)
    if expected and found != expected:
        raise MismatchError(f"{tokenizer_origin}: this tokenizer's vocabulary ({found[:19]}) is not the one "
                            f"{model_origin} was saved with ({expected[:19]}); use the tokenizer files that came "
                            "with the checkpoint")


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir) -> transformers.PreTrainedTokenizerBase:
    """Trains a LLaMA-style SentencePiece BPE model on `texts`; writes tokenizer.model and the HF files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_prefix=str(out_dir / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        user_defined_symbols=list(CHAT_MARKERS), split_digits=True, hard_vocab_limit=False, minloglevel=2,
    )
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    tokenizer = transformers.LlamaTokenizer.from_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def check_vocabulary(tokenizer, vocab_size: int, origin: str):
    """Refuses a tokenizer that does not belong to a model with `vocab_size` embedding rows.

    The table may be padded past the tokenizer (to a multiple of 64 or 128, as LLaVA-style models do);
    a tokenizer with more ids than the table, or a table larger than such padding explains, is another
    model's tokenizer, and its ids would mean other words.
    """
    size = len(tokenizer)
    if size > vocab_size or vocab_size > -(-size // 128) * 128:
        raise MismatchError(f"{origin}: the tokenizer has {size} tokens but the model's vocabulary has {vocab_size}; "
                            "this tokenizer does not belong to this checkpoint")
