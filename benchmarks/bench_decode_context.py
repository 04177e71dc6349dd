"""Does a decode step cost in proportion to the filled context, or to the allocated cache?

    python benchmarks/bench_decode_context.py   # prints the figures, writes benchmarks/results/decode_context.json

A fixed small LLaMA (4 layers, hidden 256, vocabulary 512 so that the weights are small beside the cache),
batch 4, float32 on this CPU: decode ms/token with 256 and with 2,048 filled slots of the same 4,096-slot
cache. Each figure is the best of REPEATS runs of DECODE_STEPS tokens after a warm-up run that compiles; the
load average is recorded beside it. When attention reads the whole allocation the two times are about equal;
when it reads only the filled part (bucketed), the 2,048 figure is several times the 256 one.
"""

import json
import os
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cxrllava_jax.inference import engine  # noqa: E402
from cxrllava_jax.models.configs import LlamaConfig  # noqa: E402
from cxrllava_jax.models.llama import Llama  # noqa: E402

CONFIG = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8,
                     num_kv_heads=8, max_position_embeddings=8192)
BATCH = 4
CACHE_SLOTS = 4096
FILLED = (256, 2048)
DECODE_STEPS = 64
REPEATS = 3
NEVER = -1  # an EOS id no token equals: every run decodes all its steps


def decode_ms_per_token(spec, params, filled: int) -> float:
    rng = np.random.RandomState(0)
    tokens = rng.randint(3, CONFIG.vocab_size, (BATCH, filled)).astype(np.int32)
    kv_valid = np.zeros((BATCH, CACHE_SLOTS), bool)
    kv_valid[:, :filled] = True
    greedy = (np.zeros(BATCH, np.float32), np.ones(BATCH, np.float32), np.zeros((BATCH, 2), np.uint32))

    def fresh_rows():
        """The engine's running batch with every row's prompt prefilled into a CACHE_SLOTS-slot cache."""
        cache = engine.empty_cache(spec, rows=BATCH, length=CACHE_SLOTS)
        cache, first = engine.prefill_rows(spec, params, cache, tokens, None, np.int32(0), kv_valid,
                                           np.full(BATCH, filled - 1, np.int32), *greedy, read=filled)
        rows = engine.empty_rows(spec, rows=BATCH, length=CACHE_SLOTS)
        rows = engine.place_rows(rows, np.arange(BATCH, dtype=np.int32), cache, kv_valid,
                                 np.full(BATCH, filled, np.int32), first, np.full(BATCH, DECODE_STEPS + 1, np.int32),
                                 *greedy, eos_id=NEVER)
        return jax.block_until_ready(rows)

    times = []
    for _ in range(REPEATS + 1):  # the first run compiles
        rows = fresh_rows()
        start = time.perf_counter()
        rows, out = jax.block_until_ready(engine.decode_rows(spec, params, rows, np.int32(DECODE_STEPS),
                                                             np.zeros(BATCH, bool), chunk=DECODE_STEPS))
        times.append(time.perf_counter() - start)
        assert (np.asarray(out) != engine.NO_TOKEN).all()
    return 1000 * min(times[1:]) / DECODE_STEPS


def main():
    model = Llama(CONFIG)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    spec = engine.DecodeSpec(model, NEVER, None)
    load_before = open("/proc/loadavg").read().split()[:3]
    ms = {filled: decode_ms_per_token(spec, params, filled) for filled in FILLED}
    ratio = ms[FILLED[1]] / ms[FILLED[0]]
    for filled in FILLED:
        print(f"{filled:>5} filled of {CACHE_SLOTS} slots: {ms[filled]:.3f} ms/token")
    print(f"ratio {FILLED[1]}/{FILLED[0]}: {ratio:.2f} (load average {' '.join(load_before)})")
    result = {"machine": platform.machine(), "cpu_count": os.cpu_count(), "backend": jax.default_backend(),
              "model": {"layers": CONFIG.num_layers, "hidden": CONFIG.hidden_size, "vocab": CONFIG.vocab_size},
              "batch": BATCH, "cache_slots": CACHE_SLOTS, "decode_steps": DECODE_STEPS,
              "ms_per_token": {str(k): round(v, 3) for k, v in ms.items()}, "ratio": round(ratio, 2),
              "load_average": load_before}
    out = ROOT / "benchmarks" / "results" / "decode_context.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
