"""A converted language model alone, to check a conversion before training a projector on it.

    lm = LanguageModel.from_checkpoint("ckpt/smollm2")        # a 'llama' checkpoint, or a 'cxr_llava' one's LLM
    lm.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0)
    lm.complete("The capital of France is", temperature=0)

`chat` renders the tokenizer's own chat template (tokenizer_config.json's `chat_template` or
chat_template.jinja) with the generation prompt, and tokenizes it without adding special tokens, as
`apply_chat_template(..., tokenize=True)` does; `complete` continues `tokenizer(text)`. Generation keywords:
temperature (0 = greedy), top_p, max_new_tokens, seed; it stops at the tokenizer's EOS.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cxrllava_jax import hub
from cxrllava_jax.convert import checkpoint, peft
from cxrllava_jax.convert.layout import relayout
from cxrllava_jax.errors import InputError, MismatchError
from cxrllava_jax.inference.engine import Engine, Request, SamplingOptions
from cxrllava_jax.domain.tokenizer import chat_template, check_vocabulary, load_tokenizer
from cxrllava_jax.models.configs import LlamaConfig, Runtime
from cxrllava_jax.models.llama import Llama


class LanguageModel:
    def __init__(self, config: LlamaConfig, params: dict, tokenizer, runtime: Runtime = Runtime(),
                 origin: str = "model"):
        check_vocabulary(tokenizer, config.vocab_size, origin)
        self.config, self.tokenizer = config, tokenizer
        self.engine = Engine(Llama(config, runtime), {"params": params}, eos_id=tokenizer.eos_token_id,
                             vocab_limit=len(tokenizer))

    @classmethod
    def from_checkpoint(cls, path, dtype: str | None = None, adapter=None, chat: bool = False) -> "LanguageModel":
        """`path`: a checkpoint directory or a Hub id of one (`hub.resolve`). `adapter`: a LoRA adapter (PEFT
        format; a directory or Hub id) folded into the weights as they load. `chat`: the model will be asked
        through its chat template, so a tokenizer without one is refused before the weights are read. Refusals
        name the checkpoint: InputError for what is missing, MismatchError for a checkpoint that holds no language
        model (stage 1A's or 1B's)."""
        path = hub.resolve(path)
        adapter = None if adapter is None else hub.resolve(adapter, what="adapter")
        dtype = dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
        # Scanned layers: one compiled layer body, so a 30- or 80-layer model compiles in seconds.
        runtime = Runtime(dtype=dtype, param_dtype=dtype, scan=True)
        kind = checkpoint.read_model_config(path)[0]
        if kind not in checkpoint.LANGUAGE_MODEL_KINDS:
            raise MismatchError(f"{path} holds a {kind!r} model, which has no language model; give a 'llama' or "
                                "'cxr_llava' checkpoint")
        tokenizer_path = checkpoint.tokenizer_dir(path)
        if tokenizer_path is None:
            raise InputError(f"{path}: no tokenizer/ directory; import the model with its tokenizer files")
        if chat:
            chat_template(tokenizer_path)
        _, config, params = checkpoint.load_model(path, runtime)
        if adapter is not None:  # it folds into the unscanned kernels it targets (llm/... in a CXR-LLaVA)
            params = relayout(peft.apply_adapter(relayout(params, scan=False), adapter), scan=True)
        if kind == "cxr_llava":
            config, params = config.llama, params["llm"]
        params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
        return cls(config, params, load_tokenizer(tokenizer_path), runtime, origin=str(path))

    def chat_ids(self, messages: Sequence[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def chat(self, messages: Sequence[dict], **options) -> str:
        """The assistant's answer to a conversation of {"role", "content"} turns that ends with the user's."""
        return self.generate([self.chat_ids(messages)], **options)[0]

    def complete(self, text: str, **options) -> str:
        """The continuation of `text`, with the space it starts with: SentencePiece puts a word's space in front of
        it ("▁is"), and a continuation decoded alone loses it, so the prompt and continuation are decoded together
        and the prompt's text is cut off."""
        prompt = self.tokenizer(text)["input_ids"]
        ids = self.continuations([prompt], **options)[0]
        head = self.tokenizer.decode(prompt, skip_special_tokens=True)
        whole = self.tokenizer.decode(list(prompt) + list(ids), skip_special_tokens=True)
        return whole[len(head):] if whole.startswith(head) else self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate(self, prompts: Sequence[Sequence[int]], **options) -> list[str]:
        """Continuations of token-id prompts, decoded without special tokens."""
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in self.continuations(prompts, **options)]

    def continuations(self, prompts: Sequence[Sequence[int]], **options) -> list[list[int]]:
        """The token ids generated after each prompt."""
        sampling = SamplingOptions(**options)
        completions = self.engine.complete([Request(np.asarray(p, np.int32), sampling=sampling) for p in prompts])
        return [list(c.tokens) for c in completions]
