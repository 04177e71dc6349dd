"""The released model's Python interface, batched: reports, differential diagnoses, questions and chat.

    model = CXRLLaVA.from_pretrained("CXR-LLAVA-v2")      # the release's directory, or our checkpoint
    model.write_radiologic_report("cxr.png")
    model.write_radiologic_reports(["a.dcm", "b.png"], temperature=0.0)
    model.ask_question("Is there a pneumothorax?", "cxr.png")
    model.chat([{"role": "user", "content": "Any effusion?"}, ...], "cxr.png")

Images are paths, PIL images or arrays (8/16-bit PNG/JPEG, DICOM), preprocessed as the release does.
Generation keywords and their release defaults: temperature=0.2 (0 = greedy), top_p=0.8,
max_new_tokens=512 (and never past the context window), seed=0.
"""

import re
from pathlib import Path
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cxrllava_jax.convert import checkpoint, release
from cxrllava_jax.domain import prompting
from cxrllava_jax.inference.generate import Generator, SamplingOptions
from cxrllava_jax.domain.tokenizer import check_vocabulary, load_tokenizer
from cxrllava_jax.models import cxr_llava
from cxrllava_jax.models.configs import CXRLLaVAConfig, Runtime
from cxrllava_jax.domain.images import InputError, preprocess

DEFAULT_BATCH_SIZE = 8
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")  # SentencePiece's byte fallback pieces


class CXRLLaVA:
    """A loaded model that answers: its config, weights, tokenizer and the generator that runs them.

    Every answering method takes the generation keywords (temperature, top_p, max_new_tokens, seed).
    """

    def __init__(self, config: CXRLLaVAConfig, params: dict, tokenizer, runtime: Runtime = Runtime(),
                 origin: str = "model"):
        check_vocabulary(tokenizer, config.llama.vocab_size, origin)
        self.config, self.tokenizer = config, tokenizer
        self.generator = Generator(cxr_llava.CXRLLaVAModel(config, runtime), {"params": params},
                                   eos_id=tokenizer.eos_token_id, vocab_limit=len(tokenizer))

    @classmethod
    def from_pretrained(cls, path, dtype: str | None = None) -> "CXRLLaVA":
        """Loads our checkpoint (tokenizer under CKPT/tokenizer) or the release's PyTorch directory
        (config.json with clip_vision_cfg, safetensors, tokenizer files), converting the latter on the fly.

        `dtype`: compute and parameter dtype; float32 on CPU and bfloat16 on accelerators by default.
        """
        path = Path(path)
        dtype = dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
        runtime = Runtime(dtype=dtype, param_dtype=dtype)
        if release.is_release_dir(path):
            config, params = release.load_release(path)
            tokenizer_path = path
        elif (path / "model_config.json").is_file():
            kind, config, params = checkpoint.load_model(path, runtime)
            if kind != "cxr_llava":
                raise ValueError(f"{path} holds a {kind!r} model; inference needs a 'cxr_llava' checkpoint")
            tokenizer_path = checkpoint.tokenizer_dir(path)
            if tokenizer_path is None:
                raise FileNotFoundError(f"{path}: no tokenizer/ directory; copy the LLaMA tokenizer files there")
        else:
            raise FileNotFoundError(f"{path} is neither a cxrllava-jax checkpoint (model_config.json) nor a "
                                    "release directory (config.json with clip_vision_cfg)")
        params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
        return cls(config, params, load_tokenizer(tokenizer_path), runtime, origin=str(path))

    # ---------------------------------------------------------------- the release's methods, and batches

    def write_radiologic_report(self, image, **options) -> str:
        return self.write_radiologic_reports([image], **options)[0]

    def write_radiologic_reports(self, images: Sequence, **options) -> list[str]:
        return self.generate([_task(prompting.REPORT_PROMPT)] * len(images), images, **options)

    def write_differential_diagnosis(self, image, **options) -> str:
        return self.write_differential_diagnoses([image], **options)[0]

    def write_differential_diagnoses(self, images: Sequence, **options) -> list[str]:
        return self.generate([_task(prompting.DIFFERENTIAL_PROMPT)] * len(images), images, **options)

    def ask_question(self, question: str, image, *, on_text: Callable[[str], None] | None = None, **options) -> str:
        return self.generate([_task(prompting.question_prompt(question))], [image], on_text=on_text, **options)[0]

    def ask_questions(self, questions: Sequence[str], images: Sequence, **options) -> list[str]:
        if len(questions) != len(images):
            raise ValueError(f"{len(questions)} questions but {len(images)} images")
        return self.generate([_task(prompting.question_prompt(q)) for q in questions], images, **options)

    def chat(self, messages: Sequence[dict], image, *, on_text: Callable[[str], None] | None = None,
             **options) -> str:
        """The assistant's next answer in a conversation about `image`.

        `messages`: {"role": "user"|"assistant", "content"} turns ending with the user's, optionally after
        a {"role": "system"} message that replaces the release's system prompt. The image goes into the
        first user turn (`<image>\\n` is put in front of it unless it is already there).
        """
        return self.generate([list(messages)], [image], on_text=on_text, **options)[0]

    # ---------------------------------------------------------------- the engine under them

    def generate(self, conversations: Sequence[Sequence[dict]], images: Sequence, *,
                 batch_size: int = DEFAULT_BATCH_SIZE, on_text: Callable[[str], None] | None = None,
                 **options) -> list[str]:
        """One answer per (conversation, image) pair, in batches of `batch_size`."""
        answers = [""] * len(conversations)
        for index, answer in self.iter_generate(conversations, images, batch_size=batch_size, on_text=on_text,
                                                **options):
            answers[index] = answer
        return answers

    def iter_generate(self, conversations: Sequence[Sequence[dict]], images: Sequence, *,
                      batch_size: int = DEFAULT_BATCH_SIZE, on_text: Callable[[str], None] | None = None,
                      on_bad_image: Callable[[int, InputError], None] | None = None,
                      **options) -> Iterator[tuple[int, str]]:
        """Yields (index, answer) batch by batch. A bad image raises its InputError, or with `on_bad_image`
        is reported there and skipped. `on_text` streams the text of a single conversation as it is written."""
        if isinstance(images, (str, Path)):
            raise TypeError(f"images must be a list (of paths, PIL images or arrays), got the path {images!r}")
        if len(conversations) != len(images):
            raise ValueError(f"{len(conversations)} conversations but {len(images)} images")
        if on_text is not None and len(conversations) != 1:
            raise ValueError("streaming (on_text) takes a single conversation")
        sampling = SamplingOptions(**options)
        prompts = [self.encode(turns) for turns in conversations]
        for start in range(0, len(prompts), batch_size):
            indices, pixels = [], []
            for i in range(start, min(start + batch_size, len(prompts))):
                try:
                    pixels.append(self.preprocess(images[i]))
                except InputError as error:
                    if on_bad_image is None:
                        raise
                    on_bad_image(i, error)
                    continue
                indices.append(i)
            if not indices:
                continue
            stream = TextStream(self.tokenizer, on_text) if on_text else None
            outputs = self.generator.generate([prompts[i] for i in indices], np.stack(pixels), sampling,
                                              on_tokens=stream)
            for i, ids in zip(indices, outputs):
                answer = self.decode(ids)
                if stream:
                    stream.finish(answer)
                yield i, answer

    def preprocess(self, image) -> np.ndarray:
        cfg = self.config
        return preprocess(image, cfg.vision.image_size, cfg.image_mean, cfg.image_std, min_size=cfg.vision.patch_size)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def encode(self, turns: Sequence[dict]) -> np.ndarray:
        """The prompt token ids of a conversation (the turns `chat` takes), image positions included."""
        turns = list(turns)
        system = prompting.SYSTEM_PROMPT
        if turns and turns[0].get("role") == "system":
            system, turns = turns[0]["content"], turns[1:]
        if turns and prompting.IMAGE not in turns[0]["content"]:
            turns[0] = {**turns[0], "content": f"{prompting.IMAGE}\n{turns[0]['content']}"}
        cfg = self.config
        return prompting.encode_prompt(turns, self.tokenizer, cfg.num_image_tokens, cfg.image_token_id,
                                       max_length=cfg.llama.max_position_embeddings, system=system)


def _task(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


class TextStream:
    """Token chunks of one conversation -> text pieces for `on_text`.

    Decoding the whole answer so far and sending what is new keeps SentencePiece's spaces right. What the
    next token can still change waits: trailing spaces (the answer is stripped), a trailing run of
    byte-fallback tokens (`<0xE2>`: the run is decoded as a whole, so a later byte can change how the earlier
    ones read) and a multi-byte character whose bytes have not all arrived (decoded as U+FFFD until they have).
    """

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.sent = ""

    def __call__(self, chunks: list[list[int]]):
        self.ids += chunks[0]
        settled = len(self.ids)
        while settled and _BYTE_TOKEN.fullmatch(self.tokenizer.convert_ids_to_tokens(self.ids[settled - 1]) or ""):
            settled -= 1
        text = self.tokenizer.decode(self.ids[:settled], skip_special_tokens=True)
        self._send(text.strip().rstrip("\ufffd").rstrip())

    def finish(self, answer: str):
        self._send(answer)

    def _send(self, text: str):
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text
