"""Several images in one sequence (a study) and the optional token pooling, on the tiny CXR-LLaVA."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxrllava_jax.models import configs as mc
from cxrllava_jax.models.cxr_llava import CXRLLaVAModel, pool_tokens

CONFIG = mc.CXR_LLAVA_PRESETS["cxr_llava_tiny"]  # a 4x4 patch grid: 16 tokens an image
IMAGE = CONFIG.image_token_id


def row(*spans, length=48, tokens=CONFIG.num_image_tokens):
    """Token ids: text 5.., then for each span an `<image>` run, then text; right-padded to `length`."""
    ids = [1, 5]
    for _ in range(spans[0]):
        ids += [IMAGE] * tokens + [7, 8]
    return np.asarray(ids + [9] * (length - len(ids)), np.int32)


@pytest.fixture(scope="module")
def tiny():
    model = CXRLLaVAModel(CONFIG, mc.Runtime(dtype="float32", scan=False))
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 2, 64, 64, 1))
    # Random weights of the right shapes (traced, not compiled: what these tests check holds for any weights).
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images[:, 0], jnp.asarray(np.stack([row(1), row(1)])))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.05, s.shape), s.dtype), shapes["params"])
    return model, params, images


def test_each_image_place_takes_its_own_images_tokens_in_slot_order(tiny):
    model, params, images = tiny
    tokens = jnp.asarray(np.stack([row(2), row(1)]))
    encode = jax.jit(lambda x: model.apply({"params": params}, x, method="encode_images"))
    embeds = jax.jit(lambda t, f: model.apply({"params": params}, t, f, method="embed"))(tokens, encode(images))
    one = lambda slot: encode(images[:, slot])  # noqa: E731
    places = np.flatnonzero(np.asarray(tokens[0]) == IMAGE)
    n = CONFIG.num_image_tokens
    np.testing.assert_allclose(embeds[0, places[:n]], one(0)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(embeds[0, places[n:]], one(1)[0], rtol=1e-5, atol=1e-5)
    # The second row has one place: its second slot is never read (the rest of the model sees only the embeddings).
    np.testing.assert_allclose(embeds[1, np.asarray(tokens[1]) == IMAGE], one(0)[1], rtol=1e-5, atol=1e-5)


def test_pooling_averages_each_square_of_patches_and_counts_its_tokens():
    tokens = jnp.arange(2 * 16 * 3, dtype=jnp.float32).reshape(2, 16, 3)
    pooled = pool_tokens(tokens, 2)
    grid = np.asarray(tokens).reshape(2, 4, 4, 3)
    expected = grid.reshape(2, 2, 2, 2, 2, 3).mean(axis=(2, 4)).reshape(2, 4, 3)
    np.testing.assert_allclose(pooled, expected)
    assert pool_tokens(tokens, 1) is tokens
    assert dataclasses.replace(CONFIG, projector_pool=2).num_image_tokens == 4 and CONFIG.num_image_tokens == 16
    with pytest.raises(ValueError, match="divisor of the ViT's 4-patch grid, got 3"):
        dataclasses.replace(CONFIG, projector_pool=3)


def test_a_pooled_model_averages_each_images_patches_before_its_linear_projector(tiny):
    model, params, images = tiny
    pooled = CXRLLaVAModel(dataclasses.replace(CONFIG, projector_pool=2), mc.Runtime(dtype="float32", scan=False))
    encode = lambda m: jax.jit(lambda x: m.apply({"params": params}, x, method="encode_images"))(images)  # noqa: E731
    features, full = encode(pooled), encode(model)  # the same parameters: pooling adds none
    assert features.shape == (2, 2 * 4, CONFIG.llama.hidden_size)
    per_image = pool_tokens(full.reshape(4, 16, -1), 2).reshape(2, 8, -1)  # a mean commutes with a linear layer
    np.testing.assert_allclose(features, per_image, rtol=1e-4, atol=1e-5)
