"""What the engine keeps between requests: finished prefixes' keys and values, and images' features.

A conversation's next turn, a second question on the same image, or a stateless client resending the whole
conversation starts with tokens whose keys and values an earlier request has already computed. The engine keeps
each finished request's (a row's cache slots [0, L), copied out) under its token key; a new request reuses the
longest prefix any kept entry shares with it and prefills only the rest. Image features are kept the same way,
under the image's content digest.

A key is the prompt's token ids with every image place replaced by a number drawn from its image's digest, so
equal text over another image never matches. Keys and values at position j depend only on the tokens (and image
features) at positions <= j, so any common prefix is reusable, not only whole entries.

One bound, `max_bytes`, covers both kinds; the least recently used entry goes first. The arrays live where the
model runs (device memory on an accelerator).
"""

import collections
import dataclasses
import hashlib

import numpy as np

# The engine's default: a few conversations of the release (about 0.5 MiB of keys and values a token in bfloat16)
# or hundreds of a small model's.
DEFAULT_CACHE_BYTES = 4 << 30


def image_digest(pixels: np.ndarray) -> str:
    """The content digest of a preprocessed image (its values, shape and dtype)."""
    pixels = np.ascontiguousarray(pixels)
    digest = hashlib.blake2b(pixels.data, digest_size=16)
    digest.update(f"{pixels.shape}{pixels.dtype}".encode())
    return digest.hexdigest()


def image_key(digest: str) -> int:
    """The number an image's places hold in a prefix key: negative, so that no token id equals it."""
    return -1 - int(digest[:15], 16)


@dataclasses.dataclass(eq=False)
class Prefix:
    """The keys and values of a finished request's first `len(key)` positions: `kv` {"k", "v"} each
    [layers, kv_heads, slots >= len(key), head_dim]."""

    key: np.ndarray  # int64 [length]
    kv: dict
    nbytes: int


class PrefixCache:
    """An LRU store of Prefix entries (by key) and image features (by digest) within `max_bytes`; 0 keeps none."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES):
        if max_bytes < 0:
            raise ValueError(f"the prefix cache's size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict = collections.OrderedDict()  # ("prefix", id) or ("image", digest)
        self.nbytes = 0
        self.counts = collections.Counter(prefix_hits=0, prefix_tokens=0, image_hits=0, evicted=0)

    def __len__(self):
        return len(self._entries)

    # ---------------------------------------------------------------- prefixes

    def longest(self, key: np.ndarray) -> tuple[int, Prefix | None]:
        """(how many leading positions of `key` an entry holds, that entry), the longest there is; (0, None)."""
        best, found = 0, None
        for name, entry in self._entries.items():
            if name[0] != "prefix":
                continue
            n = min(len(entry.key), len(key))
            differ = np.flatnonzero(entry.key[:n] != key[:n])
            shared = int(differ[0]) if len(differ) else n
            if shared > best:
                best, found = shared, entry
        return best, found

    def use(self, entry: Prefix, tokens: int):
        """Counts a reuse of `tokens` positions of `entry` and marks it recently used."""
        self._entries.move_to_end(("prefix", id(entry)))
        self.counts["prefix_hits"] += 1
        self.counts["prefix_tokens"] += tokens

    def holds(self, key: np.ndarray) -> bool:
        """Whether an entry holds every position of `key`; if so, that entry becomes the most recently used."""
        for name, entry in self._entries.items():
            if name[0] == "prefix" and len(entry.key) >= len(key) and np.array_equal(entry.key[:len(key)], key):
                self._entries.move_to_end(name)
                return True
        return False

    def add_prefix(self, key: np.ndarray, kv: dict, nbytes: int):
        """Keeps a finished request's prefix; entries that it extends are dropped (it holds all they hold)."""
        for name, entry in list(self._entries.items()):
            if name[0] == "prefix" and len(entry.key) <= len(key) and np.array_equal(entry.key, key[:len(entry.key)]):
                self._drop(name)
        entry = Prefix(key, kv, nbytes)
        self._add(("prefix", id(entry)), entry, nbytes)

    # ---------------------------------------------------------------- image features

    def features(self, digest: str):
        """The features kept for this image digest, or None."""
        name = ("image", digest)
        if name not in self._entries:
            return None
        self._entries.move_to_end(name)
        self.counts["image_hits"] += 1
        return self._entries[name][0]

    def add_features(self, digest: str, features, nbytes: int):
        self._add(("image", digest), (features, nbytes), nbytes)

    # ---------------------------------------------------------------- the bound

    def _add(self, name, value, nbytes: int):
        if nbytes > self.max_bytes:
            return
        if name in self._entries:
            self._drop(name)
        while self.nbytes + nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
            self.counts["evicted"] += 1
        self._entries[name] = value
        self.nbytes += nbytes

    def _drop(self, name):
        value = self._entries.pop(name)
        self.nbytes -= value.nbytes if isinstance(value, Prefix) else value[1]

    def clear(self):
        self._entries.clear()
        self.nbytes = 0
