"""Our ViT equals an open_clip-semantics PyTorch ViT (cxrllava_jax/reference/torch_models.py) whose state dict went
through safetensors and our open_clip converter, for every pooling/norm variant the release config allows;
plus position-embedding resampling and patch dropout."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cxrllava_jax.convert.layout import relayout
from cxrllava_jax.convert.open_clip import load_open_clip_vit
from cxrllava_jax.models.configs import Runtime, VisionConfig
from cxrllava_jax.models.vit import VisionTransformer, keep_random_patches, resample_position_embedding
from cxrllava_jax.reference.torch_models import VisionTransformer as TorchViT
from cxrllava_jax.reference.torch_models import randomize_, save_safetensors_dir

TOL = 1e-4
BASE = VisionConfig(image_size=32, patch_size=8, width=48, layers=2, head_width=16, mlp_ratio=2.0, embed_dim=24)
VARIANTS = {
    "tok": BASE,
    "tok_ln_after_pool": dataclasses.replace(BASE, final_ln_after_pool=True),
    "avg": dataclasses.replace(BASE, pool_type="avg"),
    "avg_ln_after_pool": dataclasses.replace(BASE, pool_type="avg", final_ln_after_pool=True),
    "no_ln_pre": dataclasses.replace(BASE, no_ln_pre=True),
    "layer_scale": dataclasses.replace(BASE, ls_init_value=0.1, layer_norm_eps=1e-6),
}


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(0).randn(3, BASE.image_size, BASE.image_size, 1).astype(np.float32)


def all_outputs(result) -> dict:
    """The encoder's (embedding, {"pooled", "tokens"}) as one dict of named outputs."""
    embedding, aux = result
    return {"embedding": embedding, **aux}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_vit_matches_open_clip_semantics(variant, images, tmp_path):
    cfg = VARIANTS[variant]
    torch.manual_seed(0)
    reference = randomize_(TorchViT(cfg), seed=1)
    state = reference.state_dict()
    assert ("ln_pre.weight" in state) != cfg.no_ln_pre
    assert ("transformer.resblocks.0.ls_1.gamma" in state) == (cfg.ls_init_value is not None)
    save_safetensors_dir({f"visual.{k}": v for k, v in state.items()}, tmp_path)
    params = load_open_clip_vit(tmp_path, cfg)
    ours = all_outputs(VisionTransformer(cfg).apply({"params": params}, images))
    with torch.no_grad():
        pooled, embedding, tokens = reference(torch.as_tensor(images).permute(0, 3, 1, 2))
    for name, expected in (("pooled", pooled), ("embedding", embedding), ("tokens", tokens)):
        np.testing.assert_allclose(np.asarray(ours[name]), expected.numpy(), atol=TOL, rtol=0, err_msg=name)


def test_scanned_vit_gives_the_same_outputs(images, tmp_path):
    cfg = VARIANTS["layer_scale"]
    save_safetensors_dir({f"visual.{k}": v for k, v in randomize_(TorchViT(cfg), seed=3).state_dict().items()},
                         tmp_path)
    params = load_open_clip_vit(tmp_path, cfg)
    unrolled = all_outputs(VisionTransformer(cfg).apply({"params": params}, images))
    scanned = all_outputs(VisionTransformer(cfg, Runtime(scan=True)).apply({"params": relayout(params, scan=True)},
                                                                           images))
    for name in unrolled:
        np.testing.assert_allclose(np.asarray(scanned[name]), np.asarray(unrolled[name]), atol=1e-5, rtol=0)


def test_position_embedding_resampling():
    table = np.random.RandomState(1).randn(1 + 4 * 4, 8).astype(np.float32)
    np.testing.assert_allclose(np.asarray(resample_position_embedding(table, 4)), table, atol=1e-6)
    larger = np.asarray(resample_position_embedding(table, 7))
    assert larger.shape == (1 + 7 * 7, 8)
    np.testing.assert_array_equal(larger[0], table[0])  # the class slot is not part of the grid
    # Upsampling is torch's bilinear interpolation with half-pixel centres, grid row-major as conv1 flattens it.
    grid = torch.as_tensor(table[1:]).reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(7, 7), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(larger[1:], expected.permute(0, 2, 3, 1).reshape(49, 8).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="not a square grid"):
        resample_position_embedding(table[:-1], 3)


def test_patch_dropout_keeps_the_class_token_and_the_right_count():
    tokens = jnp.asarray(np.random.RandomState(2).randn(2, 1 + 16, 4).astype(np.float32))
    kept = np.asarray(keep_random_patches(tokens, 0.25, jax.random.key(0)))
    assert kept.shape == (2, 1 + 12, 4)
    np.testing.assert_array_equal(kept[:, 0], tokens[:, 0])
    for row, original in zip(kept, np.asarray(tokens)):
        matches = [int(np.flatnonzero((original[1:] == patch).all(-1))[0]) for patch in row[1:]]
        assert len(set(matches)) == 12  # distinct original patches, none invented or repeated
    cfg = dataclasses.replace(BASE, patch_dropout=0.5)
    model = VisionTransformer(cfg)
    images = jnp.zeros((2, cfg.image_size, cfg.image_size, 1))
    params = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    _, out = jax.eval_shape(lambda p: model.apply({"params": p}, images, train=True, rngs={"dropout": jax.random.key(1)}),
                         params)
    assert out["tokens"].shape == (2, cfg.grid**2 // 2, cfg.width)
    _, eval_out = jax.eval_shape(lambda p: model.apply({"params": p}, images), params)
    assert eval_out["tokens"].shape == (2, cfg.grid**2, cfg.width)  # eval keeps all
