"""The released model's Python interface, batched: reports, differential diagnoses, questions and chat.

    model = CXRLLaVA.from_pretrained("ECOFRI/CXR-LLAVA-v2")   # a Hub id, the release's directory, or our checkpoint
    model.write_radiologic_report("cxr.png")
    model.write_radiologic_reports(["a.dcm", "b.png"], temperature=0.0)
    model.ask_question("Is there a pneumothorax?", "cxr.png")
    model.chat([{"role": "user", "content": "Any effusion?"}, ...], "cxr.png")
    model.write_radiologic_report(["pa.dcm", "lateral.dcm", "prior_pa.dcm"])     # a study and its prior
    model.write_radiologic_report(Study.of(["pa.png", "lat.png"], views=["PA", "LL"], prior=Study.of("old.png")))

Images are paths, PIL images or arrays (8/16-bit PNG/JPEG, DICOM), preprocessed as the release does. Where a
method takes an image it takes a study (`domain.studies.Study`) or a list of images (`Study.of`: views read from
DICOM, two StudyInstanceUIDs a study and its prior) alike; one image is the release's prompt exactly.
A DICOM file whose tags say it is not a frontal chest radiograph (Modality, BodyPartExamined, ViewPosition) is
refused unless `allow_non_frontal=True` is passed to the answering method; a lateral view is read beside a frontal
one of its study.
Generation keywords and their release defaults: temperature=0.2 (0 = greedy), top_p=0.8,
max_new_tokens=512 (and never past the context window), seed=0.
"""

import concurrent.futures
import dataclasses
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cxrllava_jax import hub
from cxrllava_jax.convert import checkpoint, peft, release
from cxrllava_jax.convert.layout import relayout
from cxrllava_jax.domain import prompting
from cxrllava_jax.domain.studies import Study
from cxrllava_jax.inference import compile_cache, loading
from cxrllava_jax.models import quantize as quantization
from cxrllava_jax.inference.engine import Completion, Engine, EngineImage, Request, SamplingOptions
from cxrllava_jax.domain.tokenizer import check_vocabulary, load_tokenizer
from cxrllava_jax.models import cxr_llava
from cxrllava_jax.models.configs import CXRLLaVAConfig, Runtime, check_dtype
from cxrllava_jax.domain.images import normalise, preprocess
from cxrllava_jax.errors import ConfigError, InputError, MismatchError

DEFAULT_BATCH_SIZE = 8


class CXRLLaVA:
    """A loaded model that answers: its config, weights, tokenizer and the engine that runs them.

    Every answering method takes the generation keywords (temperature, top_p, max_new_tokens, seed).
    """

    def __init__(self, config: CXRLLaVAConfig, params: dict, tokenizer, runtime: Runtime = Runtime(),
                 origin: str = "model", model=None, quantize: str | None = None, adapter: str | None = None,
                 fingerprint: str | None = None, **engine):
        """`model`: the module that runs `params` (a quantized one from `from_pretrained`, with `quantize` its
        kind), by default `models.cxr_llava.CXRLLaVAModel(config, runtime)`. `origin`, `fingerprint`, `adapter`:
        where the weights came from (`provenance`). `engine`: `inference.engine.Engine`'s settings (max_rows,
        cache_bytes, ...)."""
        check_vocabulary(tokenizer, config.llama.vocab_size, origin)
        self.config, self.tokenizer, self.runtime, self.quantize = config, tokenizer, runtime, quantize
        self.origin, self.adapter, self.fingerprint = origin, adapter, fingerprint
        model = cxr_llava.CXRLLaVAModel(config, runtime) if model is None else model
        self.engine = Engine(model, {"params": params}, eos_id=tokenizer.eos_token_id, vocab_limit=len(tokenizer),
                             **engine)

    @classmethod
    def from_pretrained(cls, path, dtype: str | None = None, quantize: str | None = None, adapter=None, *,
                        revision: str | None = None, token: str | bool | None = None,
                        cache_dir=None) -> "CXRLLaVA":
        """Loads our checkpoint (tokenizer under CKPT/tokenizer) or the release's PyTorch directory
        (config.json with clip_vision_cfg, safetensors, tokenizer files), converting the latter on the fly.
        `path` and `adapter` are directories or Hugging Face Hub ids (`OWNER/NAME[@REVISION]`, see `hub.resolve`:
        `revision`, `token` and `cache_dir` go to `huggingface_hub`; an existing local directory wins).

        Tensors go to the devices one at a time (split over several devices by the logical-axis rules).
        `dtype`: parameter and compute dtype. By default accelerators get bfloat16 parameters (cast tensor by
        tensor as they load) and compute; on CPU parameters keep the dtype they are stored in (the release's
        bfloat16) and compute runs in float32.
        `quantize`: 'int8' (per channel) or 'int4' (grouped) weight-only quantization of the language model.
        `adapter`: a LoRA adapter directory in PEFT's format (what fine-tuning writes to WORKDIR/adapter, or one
        made with `peft` for the hf-llama export); it is folded into the weights in memory as they load.
        Compiled programs are kept in the persistent compilation cache (see `compile_cache`).
        Refusals name what is at fault: InputError for a path that is missing or cannot be read (the checkpoint,
        its tokenizer, the adapter), MismatchError for parts that do not belong together (a checkpoint of another
        kind of model, a config that does not describe its parameters, another tokenizer, an adapter for another
        model or on quantized weights); ConfigError for a `dtype` or `quantize` that cannot work.
        """
        check_dtype(dtype)  # the options and the adapter are checked before any weight is read
        quantization.check_kind(quantize)
        if adapter is not None:
            adapter = hub.resolve(adapter, token=token, cache_dir=cache_dir, what="adapter")
            adapter = (peft.load_peft(adapter), adapter)
        compile_cache.enable()
        path = hub.resolve(path, revision=revision, token=token, cache_dir=cache_dir)
        if release.is_release_dir(path):
            config, tensors = release.iter_release(path)
            return cls._from_tensors(path, config, tensors, path, False, dtype, quantize, adapter)
        config, scan, tokenizer_path = _read_checkpoint(path)
        stored = checkpoint.read_quantization(path)
        if stored is None:
            tensors = _drain(traverse_util.flatten_dict(checkpoint.load_model(path, Runtime(scan=scan))[2], sep="/"))
            return cls._from_tensors(path, config, tensors, tokenizer_path, scan, dtype, quantize, adapter)
        if adapter is not None:
            raise MismatchError(f"{path} holds quantized weights; apply the adapter to the checkpoint they were "
                                "quantized from")
        return cls._from_quantized(path, config, scan, stored, quantize, dtype, tokenizer_path)

    @classmethod
    def _from_tensors(cls, path, config, tensors, tokenizer_path, scan, dtype, quantize, adapter) -> "CXRLLaVA":
        """The model from (parameter path, host array) pairs, the adapter ((settings, tensors), its directory)
        folded in as they load."""
        if adapter is not None:
            # The adapter folds into the unscanned kernels it targets, so the model is gathered once for it.
            merged = peft.merge_adapter(relayout(traverse_util.unflatten_dict(dict(tensors), sep="/"), scan=False),
                                        *adapter)
            tensors, scan = _drain(traverse_util.flatten_dict(merged, sep="/")), False
        param_dtype = dtype or (None if jax.default_backend() == "cpu" else "bfloat16")
        runtime = _runtime(dtype, scan, param_dtype or "bfloat16")
        model, params = loading.place_params(tensors, cxr_llava.CXRLLaVAModel(config, runtime), _init_args(config),
                                             dtype=param_dtype, quantize=quantize)
        loaded = cls(config, params, load_tokenizer(tokenizer_path), runtime, origin=str(path), model=model,
                     quantize=quantize, adapter=None if adapter is None else str(adapter),
                     fingerprint=checkpoint.content_fingerprint(path))  # sizes checked
        checkpoint.check_tokenizer(tokenizer_path, path)  # ours records the vocabulary it was saved with
        return loaded

    @classmethod
    def _from_quantized(cls, path, config, scan, stored: dict, quantize, dtype, tokenizer_path) -> "CXRLLaVA":
        kind = stored["kind"]
        if quantize not in (None, kind):
            raise MismatchError(f"{path} holds {kind} weights; it cannot be loaded as {quantize}")
        runtime = _runtime(dtype, scan, stored["param_dtype"])
        model = quantization.quantized(cxr_llava.CXRLLaVAModel(config, runtime), kind)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                                nn.meta.unbox(quantization.abstract_params(model, *_init_args(config))))
        params = checkpoint.restore_params(path, abstract)
        loaded = cls(config, params, load_tokenizer(tokenizer_path), runtime, origin=str(path), model=model,
                     quantize=kind, fingerprint=checkpoint.content_fingerprint(path))
        checkpoint.check_tokenizer(tokenizer_path, path)
        return loaded

    def save(self, path, *, overwrite: bool = False):
        """Our checkpoint of this model, tokenizer included; quantized weights stay quantized, so quantizing is
        done once and `from_pretrained(path)` loads them as they are."""
        params = self.engine.params["params"]
        quantized = None
        if self.quantize is not None:
            quantized = {"kind": self.quantize, "param_dtype": str(params["llm"]["embed_tokens"]["embedding"].dtype)}
        with tempfile.TemporaryDirectory() as tokenizer_dir:
            self.tokenizer.save_pretrained(tokenizer_dir)
            checkpoint.save_model(path, "cxr_llava", self.config, params, tokenizer_dir=tokenizer_dir,
                                  scan=self.runtime.scan, overwrite=overwrite, quantize=quantized)

    # ---------------------------------------------------------------- the release's methods, and batches
    # `image`: one image, a list of images or a Study (see the module's doc); the plural methods take a list of
    # those. They answer every input: a text, or for an input that cannot be used (a bad image, a prompt too long)
    # its InputError in that place. The singular ones raise it.

    def write_radiologic_report(self, image, **options) -> str:
        return _one(self.write_radiologic_reports([image], **options))

    def write_radiologic_reports(self, images: Sequence, **options) -> list:
        return self.generate([_user_turn(prompting.REPORT_QUESTION)] * len(images), images, **options)

    def write_differential_diagnosis(self, image, **options) -> str:
        return _one(self.write_differential_diagnoses([image], **options))

    def write_differential_diagnoses(self, images: Sequence, **options) -> list:
        return self.generate([_user_turn(prompting.DIFFERENTIAL_QUESTION)] * len(images), images, **options)

    def ask_question(self, question: str, image, *, on_text: Callable[[str], None] | None = None, **options) -> str:
        return _one(self.generate([_user_turn(prompting.checked_question(question))], [image], on_text=on_text,
                                  **options))

    def ask_questions(self, questions: Sequence[str], images: Sequence, **options) -> list:
        if len(questions) != len(images):
            raise ValueError(f"{len(questions)} questions but {len(images)} images")
        return self.generate([_user_turn(prompting.checked_question(q)) for q in questions], images, **options)

    def chat(self, messages: Sequence[dict], image, *, on_text: Callable[[str], None] | None = None,
             **options) -> str:
        """The assistant's next answer in a conversation about `image` (an image, a list of them or a Study).

        `messages`: {"role": "user"|"assistant", "content"} turns ending with the user's, optionally after
        a {"role": "system"} message that replaces the release's system prompt. The images go into the
        first user turn (`Study.prompt`: `<image>\\n` in front of it for one image) unless it already has their
        `<image>` places. The conversation's earlier turns are not computed again when an earlier request ended with
        them (the engine's prefix cache).
        """
        return _one(self.generate([list(messages)], [image], on_text=on_text, **options))

    # ---------------------------------------------------------------- requests to the engine

    def generate(self, conversations: Sequence[Sequence[dict]], images: Sequence, **kwargs) -> list:
        """One answer per (conversation, image or study) pair, in order: its text, or the InputError that stopped
        it. Keywords: `iter_generate`'s and the generation options."""
        answers: list = [None] * len(conversations)

        def refused(index, error):
            answers[index] = error

        for index, answer in self.iter_generate(conversations, images, on_bad_image=refused, **kwargs):
            answers[index] = answer.text
        return answers

    def iter_generate(self, conversations: Sequence[Sequence[dict]], images: Sequence, *,
                      batch_size: int = DEFAULT_BATCH_SIZE, on_text: Callable[[str], None] | None = None,
                      on_bad_image: Callable[[int, InputError], None] | None = None,
                      allow_non_frontal: bool = False, keep: bool = True, workers: int = 0,
                      **options) -> Iterator[tuple[int, "Answer"]]:
        """Yields (index, Answer) as each answer ends. A bad image (or a prompt that cannot be used: too long, a
        second `<image>`) raises its InputError, or with `on_bad_image` is reported there and skipped, the others
        still answered. `batch_size`: rows decoded together. `on_text` streams the text of a single conversation
        as it is written. `allow_non_frontal` reads DICOM files whose tags say they are not frontal chest
        radiographs. `keep`: whether the answers' keys and values stay for follow-up questions. `workers`: threads
        that read and preprocess images ahead of the engine (0: in this thread, as each is needed)."""
        if isinstance(images, (str, Path)):
            raise TypeError(f"images must be a list (of paths, PIL images or arrays), got the path {images!r}")
        if len(conversations) != len(images):
            raise ValueError(f"{len(conversations)} conversations but {len(images)} images")
        if on_text is not None and len(conversations) != 1:
            raise ValueError("streaming (on_text) takes a single conversation")
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}: must be at least 1")
        sampling = SamplingOptions(**options)
        order: list[int] = []  # the engine's request number -> the input's index

        def prepare(index):
            study = Study.of(images[index])
            prompt = self.encode(conversations[index], study)  # a prompt too long is refused before any decode
            pixels = self.study_pixels(study, allow_non_frontal)
            return Request(prompt, tuple(EngineImage.of(p) for p in pixels), sampling, keep)

        def requests():
            for index, prepared in _ahead(prepare, range(len(conversations)), workers, 2 * batch_size):
                try:
                    request = prepared()
                    self.engine.check(request)
                except InputError as error:
                    if on_bad_image is None:
                        raise
                    on_bad_image(index, error)
                    continue
                order.append(index)
                yield request

        stream = TextStream(self.tokenizer, on_text) if on_text else None
        tokens = None if stream is None else (lambda _, new: stream(new))
        for number, completion in self.engine.run(requests(), max_rows=batch_size, on_tokens=tokens):
            answer = Answer(self.detokenize(completion.tokens), completion, sampling)
            if stream:
                stream.finish(answer.text)
            yield order[number], answer

    @property
    def provenance(self) -> dict:
        """Which weights answer: the checkpoint, a fingerprint of its content, the adapter, the quantization."""
        return {"checkpoint": self.origin, "fingerprint": self.fingerprint, "adapter": self.adapter,
                "quantize": self.quantize}

    def preprocess(self, image, allow_non_frontal: bool = False) -> np.ndarray:
        cfg = self.config
        return preprocess(image, cfg.vision.image_size, cfg.image_mean, cfg.image_std, min_size=cfg.vision.patch_size,
                          allow_non_frontal=allow_non_frontal)

    def study_pixels(self, study: Study, allow_non_frontal: bool = False) -> np.ndarray:
        """float32 [images, size, size, 1]: every image of the study (and its prior) in prompt order, preprocessed
        as `preprocess` does one (a lateral read beside its study's frontal)."""
        cfg = self.config
        pixels = study.pixels(cfg.vision.image_size, allow_non_frontal=allow_non_frontal, min_size=cfg.vision.patch_size)
        return normalise(pixels, cfg.image_mean, cfg.image_std)

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def encode(self, turns: Sequence[dict], study=None) -> np.ndarray:
        """The prompt token ids of a conversation (the turns `chat` takes) about `study` (a Study, images or an
        image; None: one image), image positions included. A first user turn without `<image>` gets the study's
        (`Study.prompt`); one with them must have one per image. A prompt the context cannot hold is refused
        naming its token counts."""
        turns = list(turns)
        system = prompting.SYSTEM_PROMPT
        if turns and turns[0].get("role") == "system":
            system, turns = turns[0]["content"], turns[1:]
        cfg = self.config
        study = None if study is None else Study.of(study)
        if study is not None:  # before any text is tokenized: its images alone may leave nothing to generate
            study.check_fits(cfg.num_image_tokens, cfg.llama.max_position_embeddings)
        if turns and prompting.IMAGE not in turns[0]["content"]:
            content = turns[0]["content"]
            turns[0] = {**turns[0], "content": f"{prompting.IMAGE}\n{content}" if study is None else study.prompt(content)}
        if turns:
            prompting.check_image_count(turns, 1 if study is None else len(study.all_images()))
        return prompting.encode_prompt(turns, self.tokenizer, cfg.num_image_tokens, cfg.image_token_id,
                                       max_length=cfg.llama.max_position_embeddings, system=system)


def _read_checkpoint(path: Path) -> tuple[CXRLLaVAConfig, bool, Path]:
    """(config, scan, tokenizer directory) of our CXR-LLaVA checkpoint at `path`."""
    if not path.is_dir():
        raise InputError(f"{path}: no such directory (a cxrllava-jax checkpoint or the release's PyTorch "
                         "directory)" if not path.exists() else f"{path} is a file; give the checkpoint's directory")
    if not (path / "model_config.json").is_file():
        raise InputError(f"{path} is neither a cxrllava-jax checkpoint (model_config.json) nor a release directory "
                         "(config.json with clip_vision_cfg)")
    kind, config, scan = checkpoint.read_model_config(path)
    if kind != "cxr_llava":
        raise MismatchError(f"{path} holds a {kind!r} model; inference needs a 'cxr_llava' checkpoint")
    tokenizer_path = checkpoint.tokenizer_dir(path)
    if tokenizer_path is None:
        raise InputError(f"{path}: no tokenizer/ directory; copy the LLaMA tokenizer files there")
    return config, scan, tokenizer_path


def _runtime(dtype: str | None, scan: bool, stored_dtype: str = "bfloat16") -> Runtime:
    """`dtype` for parameters and compute, or compute in float32 on CPU and bfloat16 on accelerators with the
    parameters in the dtype they are stored in."""
    compute = dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    return Runtime(dtype=compute, param_dtype=dtype or stored_dtype, scan=scan)


def _init_args(config: CXRLLaVAConfig) -> tuple:
    """Example inputs that trace the model's parameter shapes: an image and a prompt of its image positions."""
    size = config.vision.image_size
    tokens = jnp.full((1, config.num_image_tokens + 1), config.image_token_id, jnp.int32)
    return jnp.zeros((1, size, size, config.vision.in_channels)), tokens


def _drain(flat: dict):
    """(path, array) pairs, each dropped from `flat` as it is handed out, so the host copy goes as it is placed."""
    for path in list(flat):
        yield path, flat.pop(path)


def _user_turn(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def _one(answers: list) -> str:
    if isinstance(answers[0], InputError):
        raise answers[0]
    return answers[0]


def _ahead(prepare: Callable, indices: Iterable[int], workers: int, window: int) -> Iterator[tuple[int, Callable]]:
    """(index, a call that returns `prepare(index)` or raises what it raised), in order; with `workers`, up to
    `window` are prepared ahead in that many threads (decoding DICOM's JPEG 2000 costs more than a decode step)."""
    if not workers:
        for index in indices:
            yield index, lambda index=index: prepare(index)
        return
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="cxrllava-images") as pool:
        pending: list = []
        try:
            for index in indices:
                pending.append((index, pool.submit(prepare, index)))
                if len(pending) >= window:
                    index, future = pending.pop(0)
                    yield index, future.result
            for index, future in pending:
                yield index, future.result
        finally:
            for _, future in pending:
                future.cancel()


@dataclasses.dataclass(frozen=True)
class Answer:
    """One answer and how it came about."""

    text: str
    completion: Completion
    sampling: SamplingOptions

    def record(self) -> dict:
        """What a JSONL record or an API answer carries beside the text: the sampling settings, the seed, why it
        ended, the token counts."""
        c, s = self.completion, self.sampling
        return {"finish_reason": c.finish_reason, "temperature": s.temperature, "top_p": s.top_p,
                "max_new_tokens": s.max_new_tokens, "seed": s.seed, "prompt_tokens": c.prompt_tokens,
                "completion_tokens": len(c.tokens), "cached_tokens": c.cached_tokens}


_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")  # SentencePiece's byte-fallback pieces


class TextStream:
    """Token chunks of one conversation -> text pieces for `on_text`.

    Decoding the whole answer so far and sending what is new keeps SentencePiece's spaces right. What the
    next token can still change waits: trailing spaces (the answer is stripped), a multi-byte character
    whose bytes have not all arrived (decoded as U+FFFD until they have), and a trailing run of byte-fallback
    pieces (`<0x29>`): SentencePiece decodes a run of bytes as a whole, so a later invalid byte can turn
    the ")" already decoded from one into U+FFFD.
    """

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.sent = ""

    def __call__(self, new: list[int]):
        self.ids += new
        pieces = self.tokenizer.convert_ids_to_tokens(self.ids)
        settled = len(pieces)
        while settled and _BYTE_PIECE.fullmatch(pieces[settled - 1]):
            settled -= 1
        text = self.tokenizer.decode(self.ids[:settled], skip_special_tokens=True)
        self._send(text.strip().rstrip("\ufffd").rstrip())

    def finish(self, answer: str):
        self._send(answer)

    def _send(self, text: str):
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text
