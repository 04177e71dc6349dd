"""A tiny LLaMA trained for a few seconds on a fixed template, for the tests and benchmarks that compare
generated tokens between two ways of running the same weights (float against int8).

An untrained model's top logits are often nearly tied, so any change of the arithmetic flips its argmax; a
comparison of greedy tokens then measures the model, not the change. This model learns one fixed successor
for every token (`chain`: a random permutation of the ordinary ids), so its greedy continuations follow the
chain with a wide margin between the first and the second logit.

    params, chain = trained_llama()           # float32, the tiny CONFIG below
    prompts = chain_prompts(chain, count=8, length=12)
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cxrllava_jax.models.configs import LlamaConfig
from cxrllava_jax.models.llama import Llama

CONFIG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                     rope_theta=500.0, max_position_embeddings=128)
FIRST_ORDINARY_ID = 3  # 0-2: unk, bos, eos
SEQUENCE_LENGTH, BATCH = 32, 32
TRAINING_SEEDS = 1_000_000  # training batches draw their starts from seeds past the ones prompts use


def successor_chain(vocab_size: int, seed: int = 0) -> np.ndarray:
    """chain[t]: the token after t (ids below FIRST_ORDINARY_ID map to themselves and never occur)."""
    ordinary = np.arange(FIRST_ORDINARY_ID, vocab_size)
    chain = np.arange(vocab_size)
    chain[ordinary] = np.random.RandomState(seed).permutation(ordinary)
    return chain


def chain_prompts(chain: np.ndarray, count: int, length: int, seed: int = 1) -> np.ndarray:
    """[count, length] int32 stretches of the chain from random starting ids."""
    starts = np.random.RandomState(seed).randint(FIRST_ORDINARY_ID, len(chain), count)
    rows = [starts]
    for _ in range(length - 1):
        rows.append(chain[rows[-1]])
    return np.stack(rows, axis=1).astype(np.int32)


@functools.cache
def trained_llama(config: LlamaConfig = CONFIG, steps: int = 300, seed: int = 0) -> tuple[dict, np.ndarray]:
    """Float32 parameters of `Llama(config)` trained `steps` Adam steps on chain stretches, and the chain."""
    chain = successor_chain(config.vocab_size, seed)
    model = Llama(config)
    params = nn.meta.unbox(model.init(jax.random.key(seed), jnp.zeros((1, SEQUENCE_LENGTH), jnp.int32))["params"])
    optimizer = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state, tokens):
        def loss(params):
            logits = model.apply({"params": params}, tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        grads = jax.grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state

    opt_state = optimizer.init(params)
    for i in range(steps):
        tokens = chain_prompts(chain, BATCH, SEQUENCE_LENGTH + 1, seed=TRAINING_SEEDS + seed * steps + i)
        params, opt_state = step(params, opt_state, tokens)
    return jax.device_get(params), chain
