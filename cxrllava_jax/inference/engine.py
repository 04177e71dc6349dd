"""The inference engine: requests in, tokens out, one scheduler over a running batch. Everything that generates
(`CXRLLaVA`'s methods, the commands, eval, the server, the language model alone) submits requests here.

A request is prompt ids (with the places of its images, `num_image_tokens` each), its images (preprocessed, each
with a content digest) and its sampling options with their own seed. The engine keeps a running batch of rows on
the device; `step` admits waiting requests into free rows (prefill) and decodes a chunk of steps for every row,
handing each request its new tokens; a request leaves its row at EOS or at its budget, and the next waiting one
takes the row. So a request that arrives while others decode joins them at the next chunk.

A request's output depends only on the request: every row owns its cache slots, its prompt at slots [0, P) (no
padding: a row's token at slot j has position j) and one slot per token it writes after; a step writes each row
at its own slot and reads only its own valid slots; each row samples its n-th token with `fold_in(key(seed), n)`.
Greedy and sampled rows share steps.

Prefixes are reused (`prefix_cache`): a finished request's keys and values stay, keyed by its tokens and image
digests, and a later request that starts the same way copies them into its row and prefills only the rest, at
slots [m, P). Image features are kept by digest. Both within one memory bound.

Device layout: one cache array per layer for a batch of several rows, which a step reads where it lies; one
stacked array for one row (`keeps_per_layer`). The batch holds a power of two of rows, doubled when rows join and
halved when few are left; rows join in groups of powers of two. Compiled programs: the image encoder per group
size; the prefill per (group size, block, read span, cache length); the decode chunk per batch size and cache
length; small ones that place, take and resize rows. A decode step attends over a static span of leading slots
that doubles from `attention_bucket` up to the cache, in the first span that holds every row.

Threads: `run` drives the engine from the caller's thread (the library, the commands); `start` runs it in a
worker thread (the server). Both go through `step`, one at a time.
"""

import collections
import dataclasses
import functools
import logging
import threading
import time
from typing import Callable, Iterable, Iterator, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cxrllava_jax.domain import prompting
from cxrllava_jax.domain.prompting import PromptTooLongError
from cxrllava_jax.errors import ConfigError, InputError
from cxrllava_jax.inference import sampling
from cxrllava_jax.inference.prefix_cache import DEFAULT_CACHE_BYTES, PrefixCache, image_digest, image_key
from cxrllava_jax.models.cxr_llava import CXRLLaVAModel
from cxrllava_jax.models.layers import dtype_of
from cxrllava_jax.models.llama import attention_mask, init_cache

log = logging.getLogger(__name__)

# The release writes at most this many tokens (and never past the context window: `Engine.budget`).
RELEASE_MAX_NEW_TOKENS = 512
NO_TOKEN = -1  # in a chunk's tokens: the row wrote nothing at that step (it had ended)
LONGEST_CHUNK = 256  # decode steps between trips to the host when no request streams and none waits
# The first span of slots a decode step attends over; spans double from it (`attention_spans`). A step reads its
# span's keys and values for every row: with a first span of 256, rows of ~80-token prompts writing 48 tokens read
# twice the slots they hold, and those reads were about 30% of a decode step's time (XLA's CPU profile, the small
# model at 16 rows). From 64, they read 128 until a row passes it, and the server's requests/s against the one
# before the engine (`benchmarks/compare_serve.py`, paired, no prefix cache) went from 0.97x to 1.07x. Each smaller
# span adds one loop to the compiled decode chunk.
ATTENTION_BUCKET = 64
# The fewest slots a batch's rows have. Placing, resizing and decoding compile per cache length: lengths from 256
# keep those programs as few as spans from 256 did (a server's prompts of 40 and of 100 tokens share them).
SHORTEST_CACHE = 256


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


@dataclasses.dataclass(frozen=True)
class EngineImage:
    """A preprocessed image [H, W, C] and its content digest (the key of its features in the cache)."""

    pixels: np.ndarray
    digest: str

    @classmethod
    def of(cls, pixels: np.ndarray) -> "EngineImage":
        return cls(pixels, image_digest(pixels))


@dataclasses.dataclass(frozen=True)
class Request:
    """Prompt ids with `num_image_tokens` places per image, the images in the order of their places, sampling.
    `keep`: whether its keys and values stay for later requests (a follow-up can start with them)."""

    prompt: np.ndarray
    images: tuple = ()
    sampling: SamplingOptions = SamplingOptions()
    keep: bool = True


@dataclasses.dataclass(frozen=True)
class Completion:
    """What a request wrote (cut before EOS), why it ended ("stop": EOS, "length": its budget), and its counts."""

    tokens: list
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int  # prompt positions whose keys and values came from the prefix cache


class QueueFull(Exception):
    pass


class Handle:
    """A submitted request: the tokens it has written so far, then its completion (or the error that ended it).
    `on_tokens(new ids)` and `on_end(handle)` are called on the thread that steps the engine."""

    def __init__(self, request: Request, budget: int, on_tokens=None, on_end=None):
        self.request, self.budget, self.on_tokens, self.on_end = request, budget, on_tokens, on_end
        self.tokens: list[int] = []
        self.completion: Completion | None = None
        self.error: Exception | None = None
        self.cancelled = False
        self.cached_tokens = 0  # prompt positions reused from the prefix cache
        self.key: np.ndarray | None = None  # its prefix key (`Engine._plan`)
        self.admitted_at: float | None = None  # time.monotonic() when it got its row, and its first token
        self.first_token_at: float | None = None

    @property
    def done(self) -> bool:
        return self.completion is not None or self.error is not None

    def _extend(self, tokens: list[int]):
        if tokens and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.tokens += tokens
        if tokens and self.on_tokens is not None and not self.cancelled:
            self.on_tokens(tokens)

    def _end(self, completion: Completion | None = None, error: Exception | None = None):
        self.completion, self.error = completion, error
        if self.on_end is not None:
            self.on_end(self)


# ---------------------------------------------------------------- sampling

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


def _key_data(sampling: SamplingOptions) -> np.ndarray:
    """The row's key: `key(seed)` (greedy rows draw nothing)."""
    if sampling.temperature == 0:
        return np.zeros(2, np.uint32)
    return np.asarray(jax.random.key_data(jax.random.key(sampling.seed)), np.uint32)


# ---------------------------------------------------------------- the device side

@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """The static half of the jitted functions. Flax modules compare by configuration, so every engine of an
    equal model shares the compiled functions (loading a model twice does not compile twice)."""

    model: object  # models.llama.Llama or models.cxr_llava.CXRLLaVAModel
    eos_id: int
    vocab_limit: int | None  # the tokenizer's size: ids past it (a padded embedding table) are never sampled
    attention_bucket: int = ATTENTION_BUCKET

    @property
    def llama_config(self):
        return self.model.config.llama if isinstance(self.model, CXRLLaVAModel) else self.model.config

    def mask_vocab(self, logits):
        if self.vocab_limit is None or self.vocab_limit >= logits.shape[-1]:
            return logits
        return jnp.where(jnp.arange(logits.shape[-1]) < self.vocab_limit, logits, -jnp.inf)


@flax.struct.dataclass
class Rows:
    """The running batch on the device, one entry per row."""

    cache: dict  # k, v as `models.llama.init_cache` lays them out: axis -4 the rows, axis -2 the slots
    kv_valid: jax.Array  # [rows, length] bool
    last: jax.Array  # [rows] int32: the token written last; its key/value go to `slot` at the next step
    slot: jax.Array  # [rows] int32: where the next key/value go, which is also the next token's position
    written: jax.Array  # [rows] int32: tokens generated (the n-th is drawn with fold_in(key, n))
    budget: jax.Array  # [rows] int32
    done: jax.Array  # [rows] bool
    temperature: jax.Array  # [rows] float32
    top_p: jax.Array  # [rows] float32
    key: jax.Array  # [rows, 2] uint32: each row's PRNG key data


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def attention_spans(first_slot: int, cache_length: int, bucket: int) -> list[int]:
    """The static numbers of leading slots the decode loops attend over: `bucket`, doubled, up to the cache;
    only spans past `first_slot`."""
    spans, span = [], bucket
    while span < cache_length:
        if span > first_slot:
            spans.append(span)
        span *= 2
    return spans + [cache_length]


def keeps_per_layer(spec: DecodeSpec, rows: int) -> bool:
    """Whether a batch of `rows` keeps one cache array per layer, which a step reads in place, or one stacked
    array, each layer sliced out for every step (`models.llama.write_and_read`). Scanned layers need it stacked.
    So does one row: XLA's CPU compiler copies a one-row batch's per-layer arrays inside the decode loop (the
    row's write becomes a dynamic-update-slice that it fuses, duplicated, into the attention's read)."""
    return rows > 1 and not spec.model.runtime.scan


def laid_out(cache: dict, per_layer: bool) -> dict:
    """k and v as a tuple of per-layer arrays or as one stacked array."""

    def one(c):
        if isinstance(c, tuple):
            return c if per_layer else jnp.stack(c)
        return tuple(c) if per_layer else c

    return {name: one(c) for name, c in cache.items()}


def sample_rows(spec: DecodeSpec, logits, temperature, top_p, key, index):
    """One token per row, each with its own settings: row i draws with fold_in(key[i], index[i])."""
    logits = spec.mask_vocab(logits)

    def one(row_logits, t, p, k, i):
        return sample_next(row_logits[None], t, p, jax.random.wrap_key_data(k), i)[0]

    return jax.lax.cond(jnp.any(temperature > 0), lambda: jax.vmap(one)(logits, temperature, top_p, key, index),
                        lambda: first_max(logits))


@functools.partial(jax.jit, static_argnames=("spec", "rows", "length"))
def empty_rows(spec: DecodeSpec, *, rows: int, length: int) -> Rows:
    zeros = jnp.zeros(rows, jnp.int32)
    return Rows(cache=init_cache(spec.llama_config, rows, length, dtype_of(spec.model.runtime.dtype),
                                 per_layer=keeps_per_layer(spec, rows)),
                kv_valid=jnp.zeros((rows, length), bool), last=zeros, slot=zeros, written=zeros, budget=zeros,
                done=jnp.ones(rows, bool), temperature=jnp.zeros(rows, jnp.float32), top_p=jnp.ones(rows, jnp.float32),
                key=jnp.zeros((rows, 2), jnp.uint32))


@functools.partial(jax.jit, static_argnames=("spec", "rows", "length"))
def empty_cache(spec: DecodeSpec, *, rows: int, length: int) -> dict:
    """A group's cache before its prefill: per layer (unless scanned), as the prefill writes it."""
    return init_cache(spec.llama_config, rows, length, dtype_of(spec.model.runtime.dtype),
                      per_layer=not spec.model.runtime.scan)


@functools.partial(jax.jit, static_argnames=("slots",), donate_argnames=("cache",))
def put_prefix(cache: dict, row, kv: dict, *, slots: int) -> dict:
    """The first `slots` of a kept prefix's keys and values {"k", "v"}: [layers, kv_heads, >= slots, head_dim]
    into row `row`'s first slots of a group's cache."""

    def put(c, p):
        p = p[:, :, :slots]
        if isinstance(c, tuple):
            return tuple(jax.lax.dynamic_update_slice(layer, p[i][None], (row, 0, 0, 0)) for i, layer in enumerate(c))
        return jax.lax.dynamic_update_slice(c, p[:, None], (0, row, 0, 0, 0))

    return {name: put(c, kv[name]) for name, c in cache.items()}


@functools.partial(jax.jit, static_argnames=("length",))
def take_prefix(cache: dict, row, *, length: int) -> dict:
    """Row `row`'s first `length` slots of the batch's cache -> {"k", "v"}: [layers, kv_heads, length, head_dim]."""

    def take(c):
        c = jnp.stack(c) if isinstance(c, tuple) else c
        return jax.lax.dynamic_slice(c, (0, row, 0, 0, 0), (c.shape[0], 1, c.shape[2], length, c.shape[4]))[:, 0]

    return {name: take(c) for name, c in cache.items()}


@functools.partial(jax.jit, static_argnames=("spec",))
def encode_images(spec: DecodeSpec, params, pixels):
    """Images [n, H, W, C] -> their projected features [n, num_image_tokens, hidden]."""
    return spec.model.apply(params, pixels, method="image_features")[0]


@functools.partial(jax.jit, static_argnames=("spec", "read"), donate_argnames=("cache",))
def prefill_rows(spec: DecodeSpec, params, cache, tokens, features, starts, kv_valid, last, temperature, top_p,
                 key, *, read: int):
    """A group's prompts past their reused prefixes: tokens [n, S] (right-padded) at slots starts..starts+S of
    `cache` (starts [n], or 0 for all; None: an empty one), attending over the first `read` slots.
    -> (cache, first tokens [n])."""
    if cache is None:  # made here, not by a program of its own: a short request pays for every dispatch
        cache = empty_cache(spec, rows=tokens.shape[0], length=kv_valid.shape[1])
    positions = jnp.reshape(starts, (-1, 1)) + jnp.arange(tokens.shape[1])
    positions = jnp.broadcast_to(positions, tokens.shape)
    mask = attention_mask(positions, kv_valid[:, :read])
    logits, aux = spec.model.apply(params, tokens, features, positions, mask, cache, starts, last, method="extend")
    return aux["cache"], sample_rows(spec, logits, temperature, top_p, key, jnp.zeros(tokens.shape[0], jnp.int32))


@functools.partial(jax.jit, static_argnames=("eos_id",), donate_argnames=("rows",))
def place_rows(rows: Rows, at, cache, kv_valid, slot, first, budget, temperature, top_p, key, *,
               eos_id: int) -> Rows:
    """Admitted rows (prefill outputs and their settings [n, ...]) into the batch at row indices `at` [n]."""

    def put(old, new):
        return old.at[at].set(new)

    return rows.replace(
        cache=jax.tree.map(lambda old, new: old.at[..., at, :, :, :].set(new), rows.cache,
                           laid_out(cache, isinstance(rows.cache["k"], tuple))),
        kv_valid=put(rows.kv_valid, kv_valid), last=put(rows.last, first), slot=put(rows.slot, slot),
        written=put(rows.written, jnp.ones(at.shape, jnp.int32)), budget=put(rows.budget, budget),
        done=put(rows.done, (first == eos_id) | (budget <= 1)), temperature=put(rows.temperature, temperature),
        top_p=put(rows.top_p, top_p), key=put(rows.key, key))


@functools.partial(jax.jit, static_argnames=("spec",))
def start_rows(spec: DecodeSpec, cache, kv_valid, slot, first, budget, temperature, top_p, key) -> Rows:
    """A batch of just these admitted rows [n, ...]: `place_rows` into `empty_rows`, as one program."""
    n, length = kv_valid.shape
    return place_rows(empty_rows(spec, rows=n, length=length), jnp.arange(n, dtype=jnp.int32), cache, kv_valid,
                      slot, first, budget, temperature, top_p, key, eos_id=spec.eos_id)


@functools.partial(jax.jit, static_argnames=("length",))
def lengthen_rows(rows: Rows, *, length: int) -> Rows:
    """The batch with `length` cache slots a row (more than it has; the new ones empty)."""
    more = length - rows.kv_valid.shape[1]
    return rows.replace(cache=jax.tree.map(lambda c: jnp.pad(c, [(0, 0)] * (c.ndim - 2) + [(0, more), (0, 0)]),
                                           rows.cache),
                        kv_valid=jnp.pad(rows.kv_valid, ((0, 0), (0, more))))


@functools.partial(jax.jit, static_argnames=("per_layer",))
def resize_rows(rows: Rows, keep, *, per_layer: bool) -> Rows:
    """The rows `keep` [new size] of the batch, in that order; -1 makes an empty row. `per_layer`: the new size's
    cache layout (`keeps_per_layer`)."""
    taken = jax.tree.map(lambda a: jnp.take(a, jnp.maximum(keep, 0), axis=0), rows.replace(cache={}))
    cache = laid_out(jax.tree.map(lambda c: jnp.take(c, jnp.maximum(keep, 0), axis=-4), rows.cache), per_layer)
    empty = keep < 0
    return taken.replace(cache=cache, done=taken.done | empty, kv_valid=taken.kv_valid & ~empty[:, None])


@functools.partial(jax.jit, static_argnames=("spec", "chunk"), donate_argnames=("rows",))
def decode_rows(spec: DecodeSpec, params, rows: Rows, steps, stop, *, chunk: int):
    """Up to `steps` (<= chunk) tokens for every row not done; rows in `stop` [rows] end first.
    Returns the rows and the tokens [rows, chunk] each wrote (NO_TOKEN where it wrote none)."""
    batch, length = rows.kv_valid.shape
    every = jnp.arange(batch)
    rows = rows.replace(done=rows.done | stop)

    def one_token(span: int, carry):
        i, r, out = carry
        kv_valid = r.kv_valid.at[every, r.slot].set(True)
        mask = attention_mask(r.slot[:, None], kv_valid[:, :span])
        logits, aux = spec.model.apply(params, r.last[:, None], r.slot[:, None], mask, r.cache, r.slot,
                                       method="step")
        live = ~r.done
        new = jnp.where(live, sample_rows(spec, logits, r.temperature, r.top_p, r.key, r.written), NO_TOKEN)
        written = r.written + live
        r = r.replace(cache=aux["cache"], kv_valid=kv_valid, last=jnp.where(live, new, r.last), slot=r.slot + live,
                      written=written, done=r.done | (new == spec.eos_id) | (written >= r.budget))
        return i + 1, r, out.at[:, i].set(new)

    carry = (jnp.int32(0), rows, jnp.full((batch, chunk), NO_TOKEN, jnp.int32))
    for span in attention_spans(0, length, spec.attention_bucket):
        def keep_going(c, span=span):
            i, r, _ = c
            return (i < steps) & ~r.done.all() & (jnp.max(jnp.where(r.done, 0, r.slot)) < span)

        carry = jax.lax.while_loop(keep_going, functools.partial(one_token, span), carry)
    _, rows, out = carry
    return rows, out


@functools.partial(jax.jit, static_argnames=("rows",))
def _split_rows(features, *, rows: int):
    return tuple(features[i] for i in range(rows))


# ---------------------------------------------------------------- the engine

@dataclasses.dataclass(eq=False)
class _Admission:
    """A request on its way into a row: what its prefill needs."""

    handle: Handle
    key: np.ndarray  # its prefix key
    start: int  # positions reused from the prefix cache
    prefix: object  # the cache entry they come from, or None
    features: list  # the features of its images whose places lie past `start`


class Engine:
    """Generates for `model` (a Llama or a CXRLLaVAModel) with `params`. `max_rows`: rows of the running batch;
    `max_waiting`: requests that may wait (None: any number); `check_every`/`stream_every`: decode steps between
    admissions when requests wait, or when one streams; `cache_bytes`: the prefix and image-feature cache's bound
    (0 keeps nothing)."""

    def __init__(self, model, params, *, eos_id: int, vocab_limit: int | None = None, max_rows: int = 16,
                 max_waiting: int | None = None, check_every: int = 16, stream_every: int = 4,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, length_bucket: int = 64,
                 attention_bucket: int = ATTENTION_BUCKET):
        if max_rows < 1 or (max_waiting is not None and max_waiting < 1):
            raise ConfigError(f"the batch and the queue must hold at least one request, got {max_rows} rows and "
                              f"{max_waiting} waiting")
        self.spec = DecodeSpec(model, eos_id, vocab_limit, attention_bucket)
        self.params, self.length_bucket = params, length_bucket
        self.max_rows, self.max_waiting = max_rows, max_waiting
        self.check_every, self.stream_every = check_every, stream_every
        self.cache = PrefixCache(cache_bytes)
        self.multimodal = isinstance(model, CXRLLaVAModel)
        context = self.spec.llama_config.max_position_embeddings
        # A row's prompt (and the padding of its group's prefill block) plus its budget fits.
        self.max_length = round_up(context, length_bucket) + length_bucket
        self._waiting: collections.deque[Handle] = collections.deque()
        self._changed = threading.Condition()
        self._stepping = threading.RLock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._reset()
        # Every key exists from the start: stats() copies it while the engine updates it. batches: groups
        # prefilled together; rows: requests admitted; chunks, row_chunks: decode chunks and the rows they ran.
        self.counts = collections.Counter(batches=0, rows=0, chunks=0, row_chunks=0, abandoned_rows=0, running=0,
                                          prompt_tokens=0, cached_tokens=0, completion_tokens=0)

    def sibling(self, **settings) -> "Engine":
        """A new engine of the same model, parameters and decoding, with its own batch, queue and cache and these
        settings (the server's beside the library's)."""
        mine = dict(eos_id=self.spec.eos_id, vocab_limit=self.spec.vocab_limit, max_rows=self.max_rows,
                    max_waiting=self.max_waiting, check_every=self.check_every, stream_every=self.stream_every,
                    cache_bytes=self.cache.max_bytes, length_bucket=self.length_bucket,
                    attention_bucket=self.spec.attention_bucket)
        return type(self)(self.spec.model, self.params, **{**mine, **settings})

    def _reset(self):
        self.rows: Rows | None = None
        self.length = 0  # cache slots a row has
        self.owners: list[Handle | None] = []  # per row
        self._stop: set[int] = set()  # rows released by `cancel` that end at the next chunk

    # ---------------------------------------------------------------- requests

    @property
    def context(self) -> int:
        return self.spec.llama_config.max_position_embeddings

    def budget(self, prompt_length: int, sampling: SamplingOptions) -> int:
        """The release's rule: at most `max_new_tokens`, and never past the context (context - prompt - 1)."""
        budget = min(sampling.max_new_tokens, self.context - prompt_length - 1)
        if budget < 1:
            raise PromptTooLongError(f"the prompt is {prompt_length} tokens but the model's context is "
                                     f"{self.context}: nothing would be left to generate")
        return budget

    def check(self, request: Request) -> int:
        """The request's budget; an InputError if it cannot run (its images do not fit its places)."""
        if self.multimodal:
            config = self.spec.model.config
            prompting.check_image_ids(request.prompt, len(request.images), config.num_image_tokens,
                                      config.image_token_id)
        elif request.images:
            raise InputError("the language model takes no images")
        return self.budget(len(request.prompt), request.sampling)

    def submit(self, request: Request, on_tokens: Callable[[list], None] | None = None,
               on_end: Callable[[Handle], None] | None = None) -> Handle:
        """Queues a request; it joins the running batch at the next step. Raises QueueFull past `max_waiting`."""
        request = dataclasses.replace(request, prompt=np.asarray(request.prompt, np.int32))
        handle = Handle(request, self.check(request), on_tokens, on_end)
        with self._changed:
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (the limit)")
            self._waiting.append(handle)
            self._changed.notify()
        return handle

    def cancel(self, handle: Handle):
        """Its client has gone: a waiting request leaves the queue, a running one its row at the next step."""
        with self._changed:
            handle.cancelled = True
            if handle in self._waiting:
                self._waiting.remove(handle)

    def run(self, requests: Iterable[Request], *, max_rows: int | None = None,
            on_tokens: Callable[[int, list], None] | None = None) -> Iterator[tuple[int, Completion]]:
        """Generates for every request, stepping the engine in this thread: yields (index, completion) as each
        ends. Requests are taken from the iterable as rows free up (it may prepare them as it goes). `max_rows`
        caps the rows these requests use. Leaving the loop early cancels the rest."""
        limit = min(max_rows or self.max_rows, self.max_rows)
        pending = enumerate(requests)
        live: list[Handle] = []  # only these: a finished request (its images, its tokens) is not held for the run
        ended: collections.deque[tuple[int, Handle]] = collections.deque()
        exhausted = False
        try:
            while True:
                while not exhausted and len(live) < limit:
                    item = next(pending, None)
                    if item is None:
                        exhausted = True
                        break
                    index, request = item
                    tokens = None if on_tokens is None else functools.partial(on_tokens, index)
                    live.append(self.submit(request, tokens, lambda h, i=index: ended.append((i, h))))
                while ended:
                    index, handle = ended.popleft()
                    live.remove(handle)
                    if handle.error is not None:
                        raise handle.error
                    yield index, handle.completion
                if exhausted and not live:
                    return
                self.step(streaming=on_tokens is not None)
        finally:
            for handle in live:
                if not handle.done:
                    self.cancel(handle)

    def complete(self, requests: Sequence[Request], **kwargs) -> list[Completion]:
        """Every request's completion, in order."""
        completions = [None] * len(requests)
        for index, completion in self.run(requests, **kwargs):
            completions[index] = completion
        return completions

    def stats(self) -> dict:
        """Plain numbers: waiting, running, the batch's rows, what was admitted and decoded, what the cache holds."""
        with self._changed:
            return {"waiting": len(self._waiting), **self.counts, "batch_rows": len(self.owners),
                    "cache_bytes": self.cache.nbytes, "cache_entries": len(self.cache), **self.cache.counts}

    # ---------------------------------------------------------------- the worker thread (the server)

    def start(self):
        """Steps the engine in a worker thread whenever there is work, until `close`."""
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="cxrllava-engine", daemon=True)
        self._thread.start()

    def close(self):
        with self._changed:
            self._closed = True
            self._changed.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _work(self):
        while True:
            with self._changed:
                while not self._waiting and not self.counts["running"] and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
            try:
                self.step()
            except Exception:  # the server keeps serving; these requests got their error
                log.exception("a step of the engine failed")

    # ---------------------------------------------------------------- one step

    def step(self, streaming: bool = False, steps: int | None = None):
        """Admits what waits (as many as free rows allow), then decodes one chunk of steps for every row: `steps`
        (0: admits only), or `stream_every` when a request streams, `check_every` when requests wait or the worker thread runs (it
        admits new ones between chunks), or up to LONGEST_CHUNK."""
        with self._stepping:
            admitted = self._take()
            try:
                if admitted:
                    self._admit(admitted)
                for handle in [h for h in self.owners if h is not None and h.cancelled]:
                    self._release(handle)
                    self.counts["abandoned_rows"] += 1
                if any(h is not None for h in self.owners) and steps != 0:
                    self._decode(streaming, steps)
            except Exception as error:  # every request in flight ends with it; the batch starts anew
                for handle in {*[h for h in self.owners if h is not None], *admitted}:
                    if not handle.done:
                        handle._end(error=error)
                self._reset()
                raise
            finally:
                self.counts["running"] = sum(h is not None for h in self.owners)

    def _take(self) -> list[Handle]:
        with self._changed:
            free = self.max_rows - sum(h is not None for h in self.owners)
            admitted = []
            while self._waiting and len(admitted) < free:
                admitted.append(self._waiting.popleft())
            return admitted

    def _admit(self, handles: list[Handle]):
        admissions = [self._plan(handle) for handle in handles]
        self._encode_missing(admissions)
        self.counts["batches"] += 1
        self.counts["rows"] += len(handles)
        # In groups of powers of two, the binary digits of their number (7 = 4 + 2 + 1): prefill programs exist
        # per power of two, and a group padded up to the next one would pay a prompt's prefill for nothing.
        start = 0
        for bit in reversed(range(len(admissions).bit_length())):
            if len(admissions) >> bit & 1:
                self._admit_group(admissions[start:start + (1 << bit)])
                start += 1 << bit

    def _plan(self, handle: Handle) -> _Admission:
        """How much of the request's prompt the prefix cache holds (never its last token, whose logits start
        the answer; never part of an image's places, whose features go in whole)."""
        request = handle.request
        key = request.prompt.astype(np.int64)
        places = self._image_places(request)
        for (begin, end), image in zip(places, request.images):
            key[begin:end] = image_key(image.digest)
        start, prefix = self.cache.longest(key)
        start = min(start, len(key) - 1)
        for begin, end in places:
            if begin < start < end:
                start = begin
        if start == 0:
            prefix = None
        elif prefix is not None:
            self.cache.use(prefix, start)
        handle.cached_tokens = start
        later = [image for (begin, _), image in zip(places, request.images) if begin >= start]
        return _Admission(handle, key, start, prefix, later)

    def _image_places(self, request: Request) -> list[tuple[int, int]]:
        if not request.images:
            return []
        config = self.spec.model.config
        where = np.flatnonzero(request.prompt == config.image_token_id)
        return [(int(where[i]), int(where[i]) + config.num_image_tokens)
                for i in range(0, len(where), config.num_image_tokens)]

    def _encode_missing(self, admissions: list[_Admission]):
        """Replaces each admission's images by their features: from the cache, or encoded here in groups of
        powers of two."""
        found, missing = {}, {}
        for admission in admissions:
            for image in admission.features:
                if image.digest not in found and image.digest not in missing:
                    features = self.cache.features(image.digest)
                    if features is None:
                        missing[image.digest] = image.pixels
                    else:
                        found[image.digest] = features
        digests = list(missing)
        start = 0
        for bit in reversed(range(len(digests).bit_length())):
            if len(digests) >> bit & 1:
                part = digests[start:start + (1 << bit)]
                features = encode_images(self.spec, self.params, np.stack([missing[d] for d in part]))
                for digest, one in zip(part, _split_rows(features, rows=len(part))):
                    found[digest] = one
                    self.cache.add_features(digest, one, one.nbytes)
                start += len(part)
        for admission in admissions:
            admission.features = [found[image.digest] for image in admission.features]

    def _admit_group(self, group: list[_Admission]):
        n = len(group)
        prompts = [a.handle.request.prompt for a in group]
        starts = np.array([a.start for a in group], np.int32)
        suffixes = [len(p) - s for p, s in zip(prompts, starts)]
        block = round_up(max(suffixes), self.length_bucket)
        budgets = [a.handle.budget for a in group]
        self._lengthen(max(max(starts) + block, max(len(p) + b for p, b in zip(prompts, budgets))))
        tokens = np.zeros((n, block), np.int32)
        kv_valid = np.zeros((n, self.length), bool)
        for i, (prompt, start) in enumerate(zip(prompts, starts)):
            tokens[i, :len(prompt) - start] = prompt[start:]
            kv_valid[i, :len(prompt)] = True
        cache = None
        for i, admission in enumerate(group):
            if admission.prefix is not None:
                if cache is None:
                    cache = empty_cache(self.spec, rows=n, length=self.length)
                slots = min(round_up(admission.start, self.length_bucket), self.length)
                cache = put_prefix(cache, np.int32(i), admission.prefix.kv, slots=slots)
        samplings = [a.handle.request.sampling for a in group]
        temperature = np.array([s.temperature for s in samplings], np.float32)
        top_p = np.array([s.top_p for s in samplings], np.float32)
        keys = np.stack([_key_data(s) for s in samplings])
        read = min(round_up(max(map(len, prompts)), self.length_bucket), self.length)
        cache, first = prefill_rows(self.spec, self.params, cache, tokens, self._group_features(group), 
                                    starts if starts.any() else np.int32(0), kv_valid,
                                    np.array(suffixes, np.int32) - 1, temperature, top_p, keys, read=read)
        placed = (cache, kv_valid, np.array([len(p) for p in prompts], np.int32), first, np.array(budgets, np.int32),
                  temperature, top_p, keys)
        if self.rows is None:
            at, self.owners = list(range(n)), [None] * n
            self.rows = start_rows(self.spec, *placed)
        else:
            at = self._make_room(n)
            self._stop -= set(at)  # a row freed by `cancel` and not yet stopped is taken over, not stopped
            self.rows = place_rows(self.rows, np.array(at, np.int32), *placed, eos_id=self.spec.eos_id)
        for row, admission, token in zip(at, group, np.asarray(first).tolist()):
            handle = admission.handle
            handle.key, handle.admitted_at = admission.key, time.monotonic()
            self.owners[row] = handle
            self.counts["prompt_tokens"] += len(handle.request.prompt)
            self.counts["cached_tokens"] += admission.start
            self._deliver(row, [token])

    def _group_features(self, group: list[_Admission]):
        """[n, images * places, hidden] of the images past each row's reused prefix (zeros where a row has fewer),
        or None when no row has any."""
        most = max(len(a.features) for a in group)
        if most == 0:
            return None
        some = next(a.features[0] for a in group if a.features)
        blank = jnp.zeros_like(some)
        return jnp.stack([jnp.concatenate(a.features + [blank] * (most - len(a.features))) for a in group])

    def _decode(self, streaming: bool, steps: int | None):
        live = [h for h in self.owners if h is not None]
        self.counts["chunks"] += 1
        self.counts["row_chunks"] += len(live)
        if steps is not None:
            steps = min(steps, LONGEST_CHUNK)
        elif streaming or any(h.on_tokens is not None for h in live):
            steps = self.stream_every
        elif self._waiting or self._thread is not None:
            steps = self.check_every
        else:
            steps = LONGEST_CHUNK
        stop = np.zeros(len(self.owners), bool)
        stop[list(self._stop)] = True
        self._stop.clear()
        self.rows, out = decode_rows(self.spec, self.params, self.rows, np.int32(steps), stop, chunk=LONGEST_CHUNK)
        for row, tokens in enumerate(np.asarray(out).tolist()):
            if self.owners[row] is not None:
                self._deliver(row, [t for t in tokens if t != NO_TOKEN])
        self._settle()

    def _deliver(self, row: int, new: list[int]):
        """The row's new tokens to its request; at its end (EOS, its budget), its completion, and its keys and
        values into the cache."""
        handle = self.owners[row]
        eos = self.spec.eos_id
        stopped = eos in new
        if stopped:
            new = new[:new.index(eos)]
        handle._extend(new)
        length = not stopped and len(handle.tokens) >= handle.budget
        if not (stopped or length):
            return
        if handle.request.keep and self.cache.max_bytes:
            self._keep(row, handle, fed=handle.tokens if stopped else handle.tokens[:-1])
        self.owners[row] = None
        self.counts["completion_tokens"] += len(handle.tokens)
        handle._end(Completion(handle.tokens, "stop" if stopped else "length", len(handle.request.prompt),
                               handle.cached_tokens))

    def _keep(self, row: int, handle: Handle, fed: list[int]):
        """The row's keys and values (its prompt and the tokens fed back) into the prefix cache, unless an entry
        holds them all already (the same conversation again: a retry, a client resending a finished one)."""
        key = np.concatenate([handle.key, np.asarray(fed, np.int64)])
        if self.cache.holds(key):
            return
        slots = min(round_up(len(key), self.length_bucket), self.length)
        kv = take_prefix(self.rows.cache, np.int32(row), length=slots)
        self.cache.add_prefix(key, kv, sum(a.nbytes for a in kv.values()))

    def _release(self, handle: Handle):
        row = self.owners.index(handle)
        self.owners[row] = None
        self._stop.add(row)

    # ---------------------------------------------------------------- the batch's size and slots

    def _lengthen(self, needed: int):
        """Gives every row at least `needed` slots: the first span that holds them, and never fewer than
        SHORTEST_CACHE (the spans a step reads start shorter than the cache lengths, which programs are compiled
        for)."""
        needed = min(max(needed, SHORTEST_CACHE), self.max_length)
        length = next(span for span in attention_spans(0, self.max_length, self.spec.attention_bucket)
                      if span >= needed)
        if length > self.length:
            if self.rows is not None:
                self.rows = lengthen_rows(self.rows, length=length)
            self.length = length

    def _make_room(self, n: int) -> list[int]:
        """Free row indices for `n` rows, doubling the batch until it holds them (by doubling and halving only,
        resizing compiles two programs per batch size)."""
        in_use = sum(h is not None for h in self.owners)
        while in_use + n > len(self.owners):
            self._resize(list(range(len(self.owners))) + [-1] * len(self.owners))
        return [row for row, owner in enumerate(self.owners) if owner is None][:n]

    def _settle(self):
        """Halves the batch once a quarter or less of it is in use; an idle batch is dropped, so that the next
        rows start with the rows and slots they need."""
        size = len(self.owners)
        used = [row for row, owner in enumerate(self.owners) if owner is not None]
        if not used:
            self._reset()
        elif size > 1 and len(used) * 4 <= size:
            self._resize(used + [-1] * (size // 2 - len(used)))

    def _resize(self, keep: list[int]):
        self.rows = resize_rows(self.rows, np.array(keep, np.int32), per_layer=keeps_per_layer(self.spec, len(keep)))
        self.owners = [self.owners[k] if k >= 0 else None for k in keep]
        self._stop = {keep.index(row) for row in self._stop if row in keep}
