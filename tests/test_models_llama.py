"""Our LLaMA equals `transformers.LlamaForCausalLM` on weights imported through our HF converter.

Covers multi-head and grouped-query attention (with a head_dim that is not hidden/heads), an output head tied
to the embedding, the RoPE variants (llama3, linear, dynamic), left-padded batches, incremental decoding with
the KV cache, and the scanned layer layout.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from cxrllava_jax.convert import hf_llama
from cxrllava_jax.convert.layout import relayout
from cxrllava_jax.models.configs import LlamaConfig, RopeScaling, Runtime
from cxrllava_jax.models.llama import Llama, attention_mask, init_cache
from cxrllava_jax.reference.torch_models import hf_llama_config, randomize_

TOL = 1e-4
CONFIGS = {
    # Non-default rope_theta and eps so that a converter dropping them fails.
    "mha": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                       num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=5000.0, max_position_embeddings=128),
    "gqa": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=32, rms_norm_eps=1e-6, rope_theta=500.0, max_position_embeddings=128),
    # Llama 3.1's frequencies, with an original context short enough that all three of its bands are used.
    "tied_llama3": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                               num_kv_heads=2, rope_theta=10000.0, max_position_embeddings=128,
                               tie_word_embeddings=True,
                               rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0,
                                                        high_freq_factor=4.0, original_max_position_embeddings=64)),
}
LENGTHS = (12, 7, 3)  # one batch, left-padded to the longest


class Case:
    def __init__(self, name, tmp_path_factory):
        self.config = CONFIGS[name]
        torch.manual_seed(0)
        self.torch_model = randomize_(transformers.LlamaForCausalLM(hf_llama_config(self.config)), seed=1)
        directory = tmp_path_factory.mktemp(f"hf_llama_{name}")
        self.torch_model.save_pretrained(directory)
        self.imported_config, self.params = hf_llama.load_hf_llama(directory)
        rng = np.random.RandomState(2)
        self.rows = [rng.randint(3, self.config.vocab_size, n) for n in LENGTHS]
        width = max(LENGTHS)
        self.tokens = np.stack([np.pad(r, (width - len(r), 0)) for r in self.rows]).astype(np.int32)
        self.valid = np.stack([np.arange(width) >= width - len(r) for r in self.rows])

    def torch_logits(self, row):
        with torch.no_grad():
            return self.torch_model(torch.as_tensor(row[None], dtype=torch.long)).logits[0].numpy()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    return Case(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def forward(case):
    model = Llama(case.imported_config)
    return jax.jit(lambda params, tokens, valid: model.apply({"params": params}, tokens, valid)[0])


def test_config_read_from_the_hf_directory(case):
    assert case.imported_config == case.config


def test_left_padded_batch_matches_transformers_row_by_row(case, forward):
    logits = np.asarray(forward(case.params, case.tokens, case.valid))
    for i, row in enumerate(case.rows):
        expected = case.torch_logits(row)
        assert np.abs(expected).max() > 1.0  # the weights are not so small that any output would pass
        np.testing.assert_allclose(logits[i, case.valid[i]], expected, atol=TOL, rtol=0)


def test_kv_cache_decoding_equals_the_full_forward(case, forward):
    """Prefill the first tokens of the left-padded batch, then decode one slot at a time."""
    cfg, width = case.imported_config, case.tokens.shape[1]
    model = Llama(cfg)
    prefill_len, max_len = 5, width + 4
    full = np.asarray(forward(case.params, case.tokens, case.valid))

    def step(params, tokens, slots, kv_valid, cache, cache_index):
        positions = jnp.maximum(jnp.cumsum(kv_valid, axis=1) - 1, 0)
        positions = jnp.take_along_axis(positions, slots, axis=1)
        mask = attention_mask(slots, kv_valid)
        logits, aux = model.apply({"params": params}, model.apply({"params": params}, tokens, method=Llama.embed),
                                  positions, mask, cache, cache_index, method=Llama.cached_forward)
        return logits, aux["cache"]

    step = jax.jit(step)
    kv_valid = np.zeros((len(LENGTHS), max_len), bool)
    kv_valid[:, :width] = case.valid  # slots past the prompt stay invalid until written
    cache = init_cache(cfg, len(LENGTHS), max_len, jnp.float32)
    slots = np.broadcast_to(np.arange(prefill_len), (len(LENGTHS), prefill_len))
    logits, cache = step(case.params, case.tokens[:, :prefill_len], slots, kv_valid, cache, 0)
    pieces = [np.asarray(logits)]
    for t in range(prefill_len, width):
        slot = np.full((len(LENGTHS), 1), t)
        logits, cache = step(case.params, case.tokens[:, t:t + 1], slot, kv_valid, cache, t)
        pieces.append(np.asarray(logits))
    incremental = np.concatenate(pieces, axis=1)
    np.testing.assert_allclose(incremental[case.valid], full[case.valid], atol=TOL, rtol=0)


def test_scanned_layers_give_the_same_logits(case, forward):
    scanned = relayout(case.params, scan=True)
    assert scanned["layers"]["block"]["q_proj"]["kernel"].shape[0] == case.config.num_layers
    model = Llama(case.imported_config, Runtime(scan=True))
    logits, _ = model.apply({"params": scanned}, case.tokens, case.valid)
    expected = forward(case.params, case.tokens, case.valid)
    np.testing.assert_allclose(np.asarray(logits)[case.valid], np.asarray(expected)[case.valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("scaling", [RopeScaling("linear", factor=2.0), RopeScaling("dynamic", factor=3.0)],
                         ids=lambda s: s.rope_type)
def test_rope_scaling_past_the_context_matches_transformers(tmp_path, scaling):
    """One sequence longer than max_position_embeddings, where 'dynamic' grows its base (transformers takes the
    largest position of a forward call, so this compares single sequences, not a padded batch)."""
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=8, rope_scaling=scaling)
    torch.manual_seed(0)
    torch_model = randomize_(transformers.LlamaForCausalLM(hf_llama_config(config)), seed=1)
    torch_model.save_pretrained(tmp_path)
    imported, params = hf_llama.load_hf_llama(tmp_path)
    assert imported == config
    tokens = np.random.RandomState(2).randint(3, 256, (1, 20)).astype(np.int32)
    with torch.no_grad():
        expected = torch_model(torch.as_tensor(tokens, dtype=torch.long)).logits[0].numpy()
    logits = Llama(imported).apply({"params": params}, tokens)[0][0]
    np.testing.assert_allclose(np.asarray(logits), expected, atol=TOL, rtol=0)
    unscaled = Llama(dataclasses.replace(imported, rope_scaling=RopeScaling())).apply({"params": params},
                                                                                      tokens)[0][0]
    assert np.abs(np.asarray(unscaled) - expected).max() > 100 * TOL  # the scaling is what made them agree
