"""LLaMA-family tokenizers: load one from a directory, or train a small LLaMA-style one for the tiny models.

A directory with `tokenizer.model` (LLaMA-2's SentencePiece model, or the tiny models' own) loads as a
`SentencePieceTokenizer`, which tokenizes exactly as the release's pinned transformers 4.36.2 does; a directory
with only `tokenizer.json` (byte-level BPE: SmolLM2, Llama 3, ...) loads through `transformers.AutoTokenizer`.
Both answer `tokenizer(text)["input_ids"]`, `encode`, `decode`, `bos_token_id`, `eos_token_id` and `len()`.

The demo's tiny language models get a SentencePiece BPE model with LLaMA's conventions (byte fallback,
<unk>=0, <s>=1, </s>=2, no pad), trained on the synthetic reports and the prompts, saved in the same files
so the same loading code serves both.
"""

import json
import re
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from cxrllava_jax import files
from cxrllava_jax.errors import MismatchError

# The chat template's markers become single tokens in the small tokenizers (LLaMA-2 splits them).
CHAT_MARKERS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")
SPIECE_UNDERLINE = "\u2581"

# Files of a Hugging Face directory that belong to the tokenizer (SentencePiece or byte-level BPE for the LLaMA
# family, WordPiece for BERT), its chat template or generation; they travel with the weights in both directions.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "chat_template.jinja",
                   "generation_config.json")


class SentencePieceTokenizer:
    """transformers 4.36.2's slow `LlamaTokenizer`, the one the release builds its prompts with, on SentencePiece.

    `tokenizer(text)["input_ids"]`: the text is split at the special tokens (`<unk>`, `<s>`, `</s>`), which
    become their ids; every other piece is encoded by SentencePiece on its own; BOS (EOS) is put in front
    (at the end) when tokenizer_config.json's `add_bos_token` (`add_eos_token`) says so (default: BOS only).
    With `legacy` (4.36.2's default when the config does not say) each piece gets SentencePiece's dummy
    prefix "▁", so the text after `<s>` in the chat template starts with "▁[" (518); with `"legacy": false`
    only the start of the text gets it. transformers 5 tokenizes pieces after a special token without the
    prefix whatever the config says (like `legacy: false`), so it cannot give the release's ids.
    """

    def __init__(self, directory):
        self.directory = directory = Path(directory)
        config_path = directory / "tokenizer_config.json"
        config = files.read_json(config_path) if config_path.is_file() else {}
        model = (directory / "tokenizer.model").read_bytes()
        self.sp = spm.SentencePieceProcessor(model_proto=model)
        self.legacy = config.get("legacy") is not False
        self.add_bos_token = config.get("add_bos_token", True)
        self.add_eos_token = config.get("add_eos_token", False)
        self.bos_token_id, self.eos_token_id, self.unk_token_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.bos_token, self.eos_token = self.sp.id_to_piece(self.bos_token_id), self.sp.id_to_piece(self.eos_token_id)
        self.special_ids = {self.sp.id_to_piece(i): i for i in (self.unk_token_id, self.bos_token_id,
                                                                 self.eos_token_id) if i >= 0}
        self._special = re.compile("(" + "|".join(map(re.escape, sorted(self.special_ids, key=len, reverse=True)))
                                   + ")")
        if not self.legacy:
            self._sp_no_prefix = _without_dummy_prefix(model)
            self._unk_length = len(self._sp_no_prefix.encode(self.sp.id_to_piece(self.unk_token_id)))

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    def __call__(self, text: str) -> dict:
        ids = self.encode(text, add_special_tokens=False)
        ids = ([self.bos_token_id] if self.add_bos_token else []) + ids
        return {"input_ids": ids + ([self.eos_token_id] if self.add_eos_token else [])}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if add_special_tokens:
            return self(text)["input_ids"]
        if not self.legacy and text:
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        ids: list[int] = []
        for piece in self._special.split(text):
            if piece in self.special_ids:
                ids.append(self.special_ids[piece])
            elif piece:
                ids += self.sp.encode(piece) if self.legacy else self._encode_without_prefix(piece)
        if not self.legacy and len(ids) > 1 and ids[0] == self.sp.piece_to_id(SPIECE_UNDERLINE) and \
                ids[1] in self.special_ids.values():
            ids = ids[1:]  # 4.36.2 drops the "▁" it put in front of a leading special token
        return ids

    def _encode_without_prefix(self, piece: str) -> list[int]:
        """4.36.2's non-legacy `_tokenize`: no dummy prefix; a leading space survives behind an `<unk>` it strips."""
        if not piece.startswith((SPIECE_UNDERLINE, " ")):
            return self._sp_no_prefix.encode(piece)
        unk = self.sp.id_to_piece(self.unk_token_id)
        return self._sp_no_prefix.encode(unk + piece)[self._unk_length:]

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False):
        """The directory's chat template (tokenizer_config.json's `chat_template` or chat_template.jinja) rendered
        as transformers renders it; `tokenize` encodes the text without adding special tokens, as it does."""
        text = render_chat_template(self.directory, messages, add_generation_prompt,
                                    bos_token=self.bos_token, eos_token=self.eos_token)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def convert_ids_to_tokens(self, ids):
        """The piece of an id, or the pieces of a list of ids (transformers' name for it)."""
        if isinstance(ids, (int, np.integer)):
            return self.sp.id_to_piece(int(ids))
        return [self.sp.id_to_piece(int(i)) for i in ids]

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.sp.piece_to_id(tokens)
        return [self.sp.piece_to_id(t) for t in tokens]

    def save_pretrained(self, directory):
        """Copies the tokenizer's files (tokenizer.model, its config, any chat template) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for source in self.directory.iterdir():
            if source.is_file() and source.name in TOKENIZER_FILES:
                shutil.copyfile(source, directory / source.name)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids.values()]
        return self.sp.decode(ids)


def render_chat_template(directory: Path, messages: Sequence[dict], add_generation_prompt: bool, **tokens) -> str:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    config_path, template_path = directory / "tokenizer_config.json", directory / "chat_template.jinja"
    template = json.loads(config_path.read_text()).get("chat_template") if config_path.is_file() else None
    if template is None and template_path.is_file():
        template = template_path.read_text()
    if template is None:
        raise ValueError(f"{directory}: the tokenizer has no chat template (tokenizer_config.json chat_template or "
                         "chat_template.jinja); use plain completion")

    def raise_exception(message):
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    try:
        return environment.from_string(template).render(messages=list(messages),
                                                        add_generation_prompt=add_generation_prompt, **tokens)
    except TemplateError as error:
        raise ValueError(f"{directory}: the chat template refused the conversation: {error}") from error


def _without_dummy_prefix(model: bytes) -> spm.SentencePieceProcessor:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def load_tokenizer(path):
    path = Path(path)
    if (path / "tokenizer.model").is_file():
        return SentencePieceTokenizer(path)
    if (path / "tokenizer.json").is_file():
        import transformers

        return transformers.AutoTokenizer.from_pretrained(str(path))
    raise FileNotFoundError(f"{path}: no tokenizer.model or tokenizer.json (a LLaMA tokenizer directory)")


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir) -> SentencePieceTokenizer:
    """Trains a LLaMA-style SentencePiece BPE model on `texts`; writes tokenizer.model and tokenizer_config.json
    as a LLaMA-2 directory has them (replacing a tokenizer there only once the new one is complete)."""
    with files.staged_directory(out_dir, overwrite=True, owns=("tokenizer.model", "tokenizer_config.json")) as staging:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(texts)), model_prefix=str(staging / "tokenizer"), vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
            user_defined_symbols=list(CHAT_MARKERS), split_digits=True, hard_vocab_limit=False, minloglevel=2,
        )
        (staging / "tokenizer.vocab").unlink(missing_ok=True)
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                  "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        (staging / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return SentencePieceTokenizer(out_dir)


def check_vocabulary(tokenizer, vocab_size: int, origin: str):
    """Refuses a tokenizer that does not belong to a model with `vocab_size` embedding rows.

    The table may be padded past the tokenizer (to a multiple of 64 or 128, as LLaVA-style models do);
    a tokenizer with more ids than the table, or a table larger than such padding explains, is another
    model's tokenizer, and its ids would mean other words.
    """
    size = len(tokenizer)
    if size > vocab_size or vocab_size > -(-size // 128) * 128:
        raise MismatchError(f"{origin}: the tokenizer has {size} tokens but the model's vocabulary has {vocab_size}; "
                            "this tokenizer does not belong to this model")
