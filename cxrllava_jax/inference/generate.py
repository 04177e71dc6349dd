"""Batched generation over a preallocated KV cache: one jitted prefill, one jitted `lax.while_loop` decode.

Prompts of different lengths are left-padded so that they all end at the same cache slot; each row's
positions count only its real tokens (as `Llama.__call__` does), so padding changes nothing a row computes.
Shapes are bucketed (the prompt and the cache round up to multiples of `length_bucket`, the batch to a
power of two), so a new prompt length reuses its bucket's two compiled functions. The decode loop ends
when every row has produced EOS or used its token budget; to stream, it runs in chunks of steps and the
host hands each chunk's tokens to the caller between calls (the same compiled loop, a different stop step,
and the tokens read back whole, so no new program is compiled for a chunk).

The cache is updated in place (see `models.llama`), and a step's attention reads only the filled part of
it: the decode program is a sequence of loops, each attending over a static span of leading slots that
doubles from `attention_bucket` up to the whole cache, and a step runs in the first span that holds it.

Works for the language model alone (`models.llama.Llama`, prompts of token ids) and for CXR-LLaVA
(`models.cxr_llava.CXRLLaVAModel`, prompts holding the image positions, plus one image per prompt).
"""

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cxrllava_jax.domain.prompting import PromptTooLongError
from cxrllava_jax.inference import sampling
from cxrllava_jax.models.cxr_llava import CXRLLaVAModel
from cxrllava_jax.models.layers import dtype_of
from cxrllava_jax.models.llama import attention_mask, init_cache, prompt_positions_and_mask

# The release writes at most this many tokens (and never past the context window).
RELEASE_MAX_NEW_TOKENS = 512


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """The release's defaults: temperature 0.2 and top-p 0.8; temperature 0 is greedy decoding."""

    temperature: float = 0.2
    top_p: float = 0.8
    max_new_tokens: int = RELEASE_MAX_NEW_TOKENS
    seed: int = 0

    def __post_init__(self):
        # One set of ranges for the API, the command line and the server (`sampling`), applied as the decoder reads
        # them: a top_p or temperature too small for float32 means the top token, not no token.
        values = sampling.checked(self.temperature, self.top_p, self.max_new_tokens, self.seed)
        for name, value in zip(("temperature", "top_p", "max_new_tokens", "seed"), values):
            object.__setattr__(self, name, value)


def sample_next(logits, temperature, top_p, key, draw=0):
    """logits [batch, vocab] fp32 -> next ids [batch]: argmax when temperature is 0, otherwise a draw (with
    `key` folded with the `draw` number) from softmax(logits / temperature) restricted to the top-p nucleus
    (transformers' TopPLogitsWarper rule: a token stays if the tokens more likely than it hold less than
    `top_p` of the mass). Greedy steps do no sampling work, not even the key's hash."""

    def greedy(_):
        return first_max(logits)

    def nucleus(_):
        scaled = logits / temperature
        descending = -jnp.sort(-scaled, axis=-1)
        probs = jax.nn.softmax(descending, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        threshold = jnp.min(jnp.where(mass_before < top_p, descending, jnp.inf), axis=-1, keepdims=True)
        nucleus_logits = jnp.where(scaled >= threshold, scaled, -jnp.inf)
        return jax.random.categorical(jax.random.fold_in(key, draw), nucleus_logits).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, nucleus, greedy, None)


def first_max(logits):
    """`jnp.argmax(logits, axis=-1)` as int32 (the first of equal maxima; a NaN counts as the maximum), as two
    plain reductions: XLA's CPU backend runs argmax's (value, index) reduction element by element, which
    took as long as a third of a batch-8 decode step with a 32k vocabulary."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where((logits == top) | jnp.isnan(logits), ids, logits.shape[-1]), axis=-1)


@flax.struct.dataclass
class DecodeState:
    """What the decode loop carries. `tokens[:, :step]` are generated; finished rows hold EOS after their end."""

    step: jax.Array  # int32 scalar: tokens generated so far (the same for every row)
    tokens: jax.Array  # [batch, max_steps] int32
    done: jax.Array  # [batch] bool
    budget: jax.Array  # [batch] int32: how many tokens each row may generate
    positions: jax.Array  # [batch] int32: the next token's position in each row
    kv_valid: jax.Array  # [batch, cache_length] bool
    cache: dict
    key: jax.Array
    temperature: jax.Array
    top_p: jax.Array


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """The static half of the jitted functions. Flax modules compare by configuration, so every Generator of
    an equal model shares the compiled functions (loading a model twice does not compile twice)."""

    model: Any  # models.llama.Llama or models.cxr_llava.CXRLLaVAModel
    eos_id: int
    vocab_limit: int | None  # the tokenizer's size: ids past it (a padded embedding table) are never sampled
    attention_bucket: int = 256  # the first span of slots a decode step attends over; spans double from it

    @property
    def llama_config(self):
        return self.model.config.llama if isinstance(self.model, CXRLLaVAModel) else self.model.config

    def mask_vocab(self, logits):
        if self.vocab_limit is None or self.vocab_limit >= logits.shape[-1]:
            return logits
        return jnp.where(jnp.arange(logits.shape[-1]) < self.vocab_limit, logits, -jnp.inf)


class Generator:
    """Generates continuations of token prompts with `model` (a Llama or a CXRLLaVAModel) and its `params`."""

    def __init__(self, model, params, *, eos_id: int, vocab_limit: int | None = None, length_bucket: int = 64,
                 attention_bucket: int = 256):
        self.spec = DecodeSpec(model, eos_id, vocab_limit, attention_bucket)
        self.params, self.length_bucket = params, length_bucket
        self.multimodal = isinstance(model, CXRLLaVAModel)

    def generate(self, prompts: Sequence[np.ndarray], images: np.ndarray | None = None,
                 options: SamplingOptions = SamplingOptions(),
                 on_tokens: Callable[[list[list[int]]], None] | None = None, stream_every: int = 4) -> list[list[int]]:
        """Continuations of `prompts` (1-D token arrays), each cut before its EOS.

        `images` [batch, H, W, 1] go with the prompts of a CXRLLaVAModel. Each row writes at most
        `options.max_new_tokens` and never past the context window (the release's rule: at most
        context - prompt length - 1). With `on_tokens`, every `stream_every` steps it receives each row's
        new tokens (an empty list for rows that have finished).
        """
        batch = len(prompts)
        if batch == 0:
            return []
        if self.multimodal != (images is not None):
            raise ValueError("a CXR-LLaVA model needs one image per prompt; the language model takes none")
        if images is not None and len(images) != batch:
            raise ValueError(f"{batch} prompts but {len(images)} images")
        lengths = np.array([len(p) for p in prompts])
        context = self.spec.llama_config.max_position_embeddings
        budget = np.minimum(options.max_new_tokens, context - lengths - 1)
        if budget.min() < 1:
            row = int(budget.argmin())
            raise PromptTooLongError(f"prompt {row} is {lengths[row]} tokens but the model's context is {context}: "
                                     "nothing would be left to generate")
        tokens, valid, images, budget = self._pad_batch(prompts, images, budget)
        cache_length = round_up(tokens.shape[1] + int(budget.max()) - 1, self.length_bucket)
        state = prefill(self.spec, self.params, tokens, valid, images, budget, jnp.float32(options.temperature),
                        jnp.float32(options.top_p), jax.random.key(options.seed), cache_length=cache_length)
        max_steps, step = int(budget.max()), 1
        if on_tokens is not None:
            on_tokens(self._new_tokens(state, 0, step, batch))
        while step < max_steps and not bool(state.done.all()):
            stop = max_steps if on_tokens is None else min(step + stream_every, max_steps)
            state = decode(self.spec, self.params, state, jnp.int32(stop))
            previous, step = step, int(state.step)
            if on_tokens is not None:
                on_tokens(self._new_tokens(state, previous, step, batch))
        return [_cut_at_eos(row[:step], self.spec.eos_id) for row in np.asarray(state.tokens)[:batch]]

    def _pad_batch(self, prompts, images, budget):
        """Left-pads to the prompt bucket; fills the batch up to a power of two with finished copies of row 0."""
        batch = len(prompts)
        padded_batch = 1 << (batch - 1).bit_length()
        length = round_up(max(len(p) for p in prompts), self.length_bucket)
        tokens = np.zeros((padded_batch, length), np.int32)
        valid = np.zeros((padded_batch, length), bool)
        for row in range(padded_batch):
            prompt = np.asarray(prompts[row if row < batch else 0], np.int32)
            tokens[row, length - len(prompt):] = prompt
            valid[row, length - len(prompt):] = True
        budget = np.concatenate([budget, np.zeros(padded_batch - batch, budget.dtype)]).astype(np.int32)
        if images is not None:
            images = np.concatenate([images, np.repeat(images[:1], padded_batch - batch, axis=0)])
        return tokens, valid, images, budget

    def _new_tokens(self, state, start, stop, batch) -> list[list[int]]:
        eos = self.spec.eos_id
        rows = np.asarray(state.tokens)[:batch, :stop]  # sliced on the host: a device slice compiles per stop
        return [[] if eos in rows[i, :start] else _cut_at_eos(rows[i, start:], eos) for i in range(batch)]


# ---------------------------------------------------------------- the jitted parts

@functools.partial(jax.jit, static_argnames=("spec", "cache_length"))
def prefill(spec: DecodeSpec, params, tokens, valid, images, budget, temperature, top_p, key, *,
            cache_length: int) -> DecodeState:
    """Left-padded prompts [batch, length] into a fresh cache of `cache_length` slots; samples the first token."""
    batch, prompt_length = tokens.shape
    kv_valid = jnp.pad(valid, ((0, 0), (0, cache_length - prompt_length)))
    positions, mask = prompt_positions_and_mask(valid)  # the prompt reads only its own slots
    cache = init_cache(spec.llama_config, batch, cache_length, dtype_of(spec.model.runtime.dtype))
    logits, aux = spec.model.apply(params, tokens, images, positions, mask, cache, method="prefill")
    first = sample_next(spec.mask_vocab(logits), temperature, top_p, key, 0)
    out = jnp.full((batch, cache_length - prompt_length + 1), spec.eos_id, jnp.int32).at[:, 0].set(first)
    return DecodeState(step=jnp.int32(1), tokens=out, done=(first == spec.eos_id) | (budget <= 1), budget=budget,
                       positions=valid.sum(axis=1).astype(jnp.int32), kv_valid=kv_valid, cache=aux["cache"], key=key,
                       temperature=temperature, top_p=top_p)


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("state",))
def decode(spec: DecodeSpec, params, state: DecodeState, stop_step) -> DecodeState:
    """Generates one token per row and step until `stop_step` tokens exist or every row is done."""
    cache_length = state.kv_valid.shape[1]
    first_slot = cache_length - state.tokens.shape[1] + 1  # = the bucketed prompt length

    def one_token(span: int, s: DecodeState):
        slot = first_slot + s.step - 1  # where the previous token's key/value go
        previous = jax.lax.dynamic_index_in_dim(s.tokens, s.step - 1, axis=1, keepdims=True)
        kv_valid = s.kv_valid.at[:, slot].set(True)
        mask = attention_mask(jnp.full((previous.shape[0], 1), slot), kv_valid[:, :span])
        logits, aux = spec.model.apply(params, previous, s.positions[:, None], mask, s.cache, slot, method="step")
        new = sample_next(spec.mask_vocab(logits), s.temperature, s.top_p, s.key, s.step)
        new = jnp.where(s.done, spec.eos_id, new)
        done = s.done | (new == spec.eos_id) | (s.step + 1 >= s.budget)
        return s.replace(step=s.step + 1, tokens=s.tokens.at[:, s.step].set(new), done=done,
                         positions=s.positions + 1, kv_valid=kv_valid, cache=aux["cache"])

    for span in attention_spans(first_slot, cache_length, spec.attention_bucket):
        def keep_going(s: DecodeState, span=span):
            return (s.step < stop_step) & ~s.done.all() & (first_slot + s.step - 1 < span)

        state = jax.lax.while_loop(keep_going, functools.partial(one_token, span), state)
    return state


def attention_spans(first_slot: int, cache_length: int, bucket: int) -> list[int]:
    """The static numbers of leading slots the decode loops attend over: `bucket`, doubled, up to the cache;
    only spans past the prompt (`first_slot` is where the first generated token's key/value go)."""
    spans, span = [], bucket
    while span < cache_length:
        if span > first_slot:
            spans.append(span)
        span *= 2
    return spans + [cache_length]


def _cut_at_eos(ids: np.ndarray, eos_id: int) -> list[int]:
    ids = [int(i) for i in ids]
    return ids[:ids.index(eos_id)] if eos_id in ids else ids
