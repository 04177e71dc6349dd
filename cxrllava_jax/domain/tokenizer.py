"""LLaMA tokenizers: load one from a directory, or train a small LLaMA-style one for the tiny models.

Real runs use LLaMA-2's own `tokenizer.model`. The demo's tiny language models get a SentencePiece
BPE model with LLaMA's conventions (byte fallback, <unk>=0, <s>=1, </s>=2, no pad), trained on the
synthetic reports and the prompts, saved in the same files so the same loading code serves both.
"""

from pathlib import Path
from typing import Iterable

import sentencepiece as spm
import transformers

# The chat template's markers become single tokens in the small tokenizers (LLaMA-2 splits them).
CHAT_MARKERS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")


def load_tokenizer(path) -> transformers.PreTrainedTokenizerBase:
    path = Path(path)
    if not (path / "tokenizer.model").is_file() and not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.model or tokenizer.json (a LLaMA tokenizer directory)")
    if (path / "tokenizer.model").is_file():
        return transformers.LlamaTokenizer.from_pretrained(str(path))
    return transformers.AutoTokenizer.from_pretrained(str(path))


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
        raise ValueError(f"{origin}: the tokenizer has {size} tokens but the model's vocabulary has {vocab_size}; "
                         "this tokenizer does not belong to this model")
