"""Continuous batching: prompts join a running batch between chunks of decode steps and leave it when they end.

`Generator.generate` runs a fixed batch from its prefill to its last row's end. A server's requests arrive while
others decode; here they join the running batch at the next chunk of steps instead of waiting for it to end.

Every row owns its cache slots: its prompt, left-padded to the bucket of the group it was admitted with, at
slots [0, P), then one slot per token it writes. `slot[row]` is where its next key/value go (each row writes at
its own slot: `models.llama.write_and_read`) and `position[row]` counts its real tokens, so a row computes what
it would alone. Each row samples with its own temperature, top-p and seed (its n-th token with
`fold_in(key(seed), n)`, as `Generator.generate` draws for a batch of one), so greedy and sampled requests share
steps. The cache is one array per layer, which a step reads where it lies (`keeps_per_layer`: one row keeps it
stacked). The batch holds a power of two of rows, doubled when rows join and halved when few are left (a step
costs in proportion to its rows); rows join in groups of powers of two. Compiled programs: the prefill per
(admitted rows, prompt bucket), the decode chunk per batch size, and small ones that place admitted rows and
resize the batch.
"""

import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cxrllava_jax.inference.generate import DecodeSpec, Generator, SamplingOptions, attention_spans, first_max, \
    round_up, sample_next
from cxrllava_jax.models.layers import dtype_of
from cxrllava_jax.models.llama import attention_mask, init_cache, prompt_positions_and_mask

NO_TOKEN = -1  # in a chunk's tokens: the row wrote nothing at that step (it had ended)


@flax.struct.dataclass
class Rows:
    """The running batch on the device, one entry per row."""

    cache: dict  # k, v as `models.llama.init_cache` lays them out: axis -4 the rows, axis -2 the slots
    kv_valid: jax.Array  # [rows, length] bool
    last: jax.Array  # [rows] int32: the token written last; its key/value go to `slot` at the next step
    slot: jax.Array  # [rows] int32
    position: jax.Array  # [rows] int32: the position of `last` among the row's real tokens
    written: jax.Array  # [rows] int32: tokens written so far
    budget: jax.Array  # [rows] int32: tokens the row may write
    done: jax.Array  # [rows] bool: ended (EOS, budget) or empty
    temperature: jax.Array  # [rows] float32
    top_p: jax.Array  # [rows] float32
    key: jax.Array  # [rows, 2] uint32: the key data of jax.random.key(seed)


def sample_rows(spec: DecodeSpec, logits, temperature, top_p, key, index):
    """Next ids [rows] from logits [rows, vocab], each row drawn as `sample_next` draws for a batch of one:
    greedy rows take the first maximum; a sampled row's `index`-th token is draw `index` of its key."""
    logits = spec.mask_vocab(logits)

    def one(row_logits, t, p, k, i):
        return sample_next(row_logits[None], t, p, jax.random.wrap_key_data(k), i)[0]

    return jax.lax.cond(jnp.any(temperature > 0), lambda: jax.vmap(one)(logits, temperature, top_p, key, index),
                        lambda: first_max(logits))


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


@functools.partial(jax.jit, static_argnames=("spec", "rows", "length"))
def empty_rows(spec: DecodeSpec, *, rows: int, length: int) -> Rows:
    zeros = jnp.zeros(rows, jnp.int32)
    return Rows(cache=init_cache(spec.llama_config, rows, length, dtype_of(spec.model.runtime.dtype),
                                 per_layer=keeps_per_layer(spec, rows)),
                kv_valid=jnp.zeros((rows, length), bool), last=zeros, slot=zeros, position=zeros, written=zeros,
                budget=zeros, done=jnp.ones(rows, bool), temperature=jnp.zeros(rows, jnp.float32),
                top_p=jnp.ones(rows, jnp.float32), key=jnp.zeros((rows, 2), jnp.uint32))


@functools.partial(jax.jit, static_argnames=("spec", "length"))
def prefill_rows(spec: DecodeSpec, params, tokens, valid, images, temperature, top_p, key, *, length: int):
    """Left-padded prompts [n, P] -> (their rows' cache (n rows of `length` slots) with the prompt at
    slots [0, P), first tokens [n]). Whole rows, so that placing them compiles per batch size, not per prompt."""
    positions, mask = prompt_positions_and_mask(valid)
    cache = init_cache(spec.llama_config, tokens.shape[0], length, dtype_of(spec.model.runtime.dtype),
                       per_layer=not spec.model.runtime.scan)
    logits, aux = spec.model.apply(params, tokens, images, positions, mask, cache, method="prefill")
    return aux["cache"], sample_rows(spec, logits, temperature, top_p, key, jnp.zeros(tokens.shape[0], jnp.int32))


@functools.partial(jax.jit, static_argnames=("eos_id",), donate_argnames=("rows",))
def place_rows(rows: Rows, at, cache, kv_valid, slot, position, first, budget, temperature, top_p, key, *,
               eos_id: int) -> Rows:
    """Admitted rows (prefill outputs and their settings [n, ...]) into the batch at row indices `at` [n]."""

    def put(old, new):
        return old.at[at].set(new)

    return rows.replace(
        cache=jax.tree.map(lambda old, new: old.at[..., at, :, :, :].set(new), rows.cache,
                           laid_out(cache, isinstance(rows.cache["k"], tuple))),
        kv_valid=put(rows.kv_valid, kv_valid), last=put(rows.last, first), slot=put(rows.slot, slot),
        position=put(rows.position, position), written=put(rows.written, jnp.ones(at.shape, jnp.int32)),
        budget=put(rows.budget, budget), done=put(rows.done, (first == eos_id) | (budget <= 1)),
        temperature=put(rows.temperature, temperature), top_p=put(rows.top_p, top_p), key=put(rows.key, key))


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
        logits, aux = spec.model.apply(params, r.last[:, None], r.position[:, None], mask, r.cache, r.slot,
                                       method="step")
        live = ~r.done
        new = jnp.where(live, sample_rows(spec, logits, r.temperature, r.top_p, r.key, r.written), NO_TOKEN)
        written = r.written + live
        r = r.replace(cache=aux["cache"], kv_valid=kv_valid, last=jnp.where(live, new, r.last), slot=r.slot + live,
                      position=r.position + live, written=written,
                      done=r.done | (new == spec.eos_id) | (written >= r.budget))
        return i + 1, r, out.at[:, i].set(new)

    carry = (jnp.int32(0), rows, jnp.full((batch, chunk), NO_TOKEN, jnp.int32))
    for span in attention_spans(0, length, spec.attention_bucket):
        def keep_going(c, span=span):
            i, r, _ = c
            return (i < steps) & ~r.done.all() & (jnp.max(jnp.where(r.done, 0, r.slot)) < span)

        carry = jax.lax.while_loop(keep_going, functools.partial(one_token, span), carry)
    _, rows, out = carry
    return rows, out


class RunningBatch:
    """The host's side of a continuous batch over `generator`'s model: which rows are in use, by whom.

    `admit` prefills prompts into free rows and returns their first tokens; `run` decodes a chunk of steps and
    returns the tokens every row in use wrote; a row is in use from `admit` until its end (EOS, its budget)
    appears in what those return, or until `release`.
    """

    def __init__(self, generator: Generator, max_rows: int, chunk: int = 16):
        self.spec, self.params, self.bucket = generator.spec, generator.params, generator.length_bucket
        self.max_rows, self.chunk = max_rows, chunk
        context = self.spec.llama_config.max_position_embeddings
        # A row's prompt bucket plus its budget (at most context - prompt - 1) fits, alone or beside shorter ones.
        self.max_length = round_up(context, self.bucket) + self.bucket
        # The slots a row has: the first attention span that holds what the rows admitted so far need (a step
        # reads the spans that hold its rows' slots; placing and resizing rows copy whole rows).
        self.lengths = attention_spans(0, self.max_length, self.spec.attention_bucket)
        self.length = 0
        self.rows: Rows | None = None
        self.owners: list = []  # per row: who uses it (None: free)
        self._budgets: list[int] = []
        self._written: list[int] = []
        self._stop: set[int] = set()

    @property
    def in_use(self) -> int:
        return sum(owner is not None for owner in self.owners)

    @property
    def free(self) -> int:
        return self.max_rows - self.in_use

    def fits(self, prompts: Sequence[np.ndarray], budgets: Sequence[int]) -> bool:
        """Whether these prompts can be admitted as one group: each row's prompt bucket and budget fit its slots."""
        return round_up(max(map(len, prompts)), self.bucket) + max(budgets) <= self.max_length

    def admit(self, owners: list, prompts: Sequence[np.ndarray], images: np.ndarray | None, budgets: Sequence[int],
              samplings: Sequence[SamplingOptions]) -> list[tuple[object, list[int], bool]]:
        """Prefills the prompts into free rows -> (owner, [first token] or [] at EOS, ended) for each.

        They go in groups of powers of two, the binary digits of their number (7 = 4 + 2 + 1): prefill
        programs exist per power of two, and a group padded up to the next one (7 -> 8) would pay a prompt's
        prefill for nothing."""
        results, start = [], 0
        for bit in reversed(range(len(prompts).bit_length())):
            if len(prompts) >> bit & 1:
                part = slice(start, start + (1 << bit))
                results += self._admit_group(owners[part], prompts[part], None if images is None else images[part],
                                             budgets[part], samplings[part])
                start = part.stop
        return results

    def _admit_group(self, owners: list, prompts: Sequence[np.ndarray], images: np.ndarray | None,
                     budgets: Sequence[int], samplings: Sequence[SamplingOptions]) -> list:
        n = len(prompts)  # a power of two
        length = round_up(max(map(len, prompts)), self.bucket)
        tokens, valid = np.zeros((n, length), np.int32), np.zeros((n, length), bool)
        for i, prompt in enumerate(prompts):
            tokens[i, length - len(prompt):], valid[i, length - len(prompt):] = prompt, True
        temperature = np.array([s.temperature for s in samplings], np.float32)
        top_p = np.array([s.top_p for s in samplings], np.float32)
        keys = np.stack([_key_data(s) for s in samplings])
        self._lengthen(length + max(budgets))
        cache, first = prefill_rows(self.spec, self.params, tokens, valid, images, temperature, top_p, keys,
                                    length=self.length)
        at = self._make_room(n)
        self._stop -= set(at)  # a row freed by `release` and not yet stopped is taken over, not stopped
        kv_valid = np.pad(valid, ((0, 0), (0, self.length - length)))
        self.rows = place_rows(self.rows, np.array(at, np.int32), cache, kv_valid, np.full(n, length, np.int32),
                               valid.sum(axis=1, dtype=np.int32), first, np.array(budgets, np.int32), temperature,
                               top_p, keys, eos_id=self.spec.eos_id)
        results = []
        for row, owner, token, limit in zip(at, owners, np.asarray(first).tolist(), budgets):
            self.owners[row], self._budgets[row], self._written[row] = owner, limit, 1
            ended = token == self.spec.eos_id or limit <= 1
            results.append((owner, [] if token == self.spec.eos_id else [token], ended))
            if ended:
                self._free(row)
        return results

    def run(self, steps: int) -> list[tuple[object, list[int], bool]]:
        """Decodes up to `steps` tokens (at most `chunk`) -> (owner, new tokens before any EOS, ended) per row
        in use."""
        stop = np.zeros(len(self.owners), bool)
        stop[list(self._stop)] = True
        self._stop.clear()
        self.rows, out = decode_rows(self.spec, self.params, self.rows, np.int32(min(steps, self.chunk)), stop,
                                     chunk=self.chunk)
        results = []
        for row, tokens in enumerate(np.asarray(out).tolist()):
            owner = self.owners[row]
            if owner is None:
                continue
            new = [t for t in tokens if t != NO_TOKEN]
            self._written[row] += len(new)
            ended = self.spec.eos_id in new or self._written[row] >= self._budgets[row]
            if self.spec.eos_id in new:
                new = new[:new.index(self.spec.eos_id)]
            results.append((owner, new, ended))
            if ended:
                self._free(row)
        self._settle()
        return results

    def release(self, owner):
        """`owner`'s row ends before its time (its client has gone); it stops at the next chunk."""
        row = self.owners.index(owner)
        self._free(row)
        self._stop.add(row)
        self._settle()

    def _free(self, row: int):
        self.owners[row] = None

    def _lengthen(self, needed: int):
        length = next(span for span in self.lengths if span >= needed)
        if length > self.length:
            if self.rows is not None:
                self.rows = lengthen_rows(self.rows, length=length)
            self.length = length

    def _make_room(self, n: int) -> list[int]:
        """Free row indices for `n` rows, doubling the batch until it holds them (by doubling and halving only,
        resizing compiles two programs per batch size)."""
        if self.rows is None:
            self.rows = empty_rows(self.spec, rows=1, length=self.length)
            self.owners, self._budgets, self._written = [None], [0], [0]
        while self.in_use + n > len(self.owners):
            self._resize(list(range(len(self.owners))) + [-1] * len(self.owners))
        return [row for row, owner in enumerate(self.owners) if owner is None][:n]

    def _settle(self):
        """Halves the batch once a quarter or less of it is in use; an idle batch is dropped, so that the next
        rows start with one row and the slots they need."""
        size = len(self.owners)
        if not self.in_use:
            self.rows, self.owners, self.length, self._stop = None, [], 0, set()
        elif size > 1 and self.in_use * 4 <= size:
            used = [row for row, owner in enumerate(self.owners) if owner is not None]
            self._resize(used + [-1] * (size // 2 - len(used)))

    def _resize(self, keep: list[int]):
        self.rows = resize_rows(self.rows, np.array(keep, np.int32),
                                per_layer=keeps_per_layer(self.spec, len(keep)))

        def pick(values: list, empty) -> list:
            return [values[k] if k >= 0 else empty for k in keep]

        self.owners, self._budgets, self._written = pick(self.owners, None), pick(self._budgets, 0), \
            pick(self._written, 0)
        self._stop = {keep.index(row) for row in self._stop if row in keep}


def _key_data(sampling: SamplingOptions) -> np.ndarray:
    """The key `Generator.generate` draws with for this seed (greedy rows draw nothing)."""
    if sampling.temperature == 0:
        return np.zeros(2, np.uint32)
    return np.asarray(jax.random.key_data(jax.random.key(sampling.seed)), np.uint32)
