"""On 8 fake CPU devices with a (data=2, fsdp=2, tensor=2) mesh, `sharding.create_sharded` places
every weight on its shard, and the sharded CXR-LLaVA forward equals the single-device one.

XLA fixes the device count when JAX starts, so the 8-device part runs in a subprocess; it prints
its measurements as JSON and the assertions live here.
"""

import textwrap

import pytest

from tests.fake_devices import report_of

SCRIPT = textwrap.dedent("""
    import json

    import jax
    import numpy as np

    from cxrllava_jax import sharding
    from cxrllava_jax.models.configs import CXR_LLAVA_PRESETS, Runtime
    from cxrllava_jax.models.cxr_llava import CXRLLaVAModel

    cfg = CXR_LLAVA_PRESETS["cxr_llava_tiny"]
    rng = np.random.RandomState(0)
    images = rng.randn(4, cfg.vision.image_size, cfg.vision.image_size, 1).astype(np.float32)
    text = rng.randint(3, cfg.llama.vocab_size, (4, 12))
    tokens = np.concatenate([text[:, :2], np.full((4, cfg.num_image_tokens), cfg.image_token_id), text[:, 2:]], 1)
    valid = np.ones(tokens.shape, bool)
    valid[1, :3] = False  # one left-padded row
    tokens = np.where(valid, tokens, 0).astype(np.int32)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    report = {"devices": jax.device_count(), "mesh": dict(mesh.shape)}

    for scan in (False, True):
        model = CXRLLaVAModel(cfg, Runtime(scan=scan))
        variables, shardings = sharding.create_sharded(
            lambda key: model.init(key, images, tokens, valid), mesh, jax.random.key(0))
        params, param_shardings = variables["params"], shardings["params"]
        layers = params["llm"]["layers"]
        q_kernel = layers["block"]["q_proj"]["kernel"] if scan else layers["block_0"]["q_proj"]["kernel"]
        embedding = params["llm"]["embed_tokens"]["embedding"]

        def forward(params, images, tokens, valid):
            return model.apply({"params": params}, images, tokens, valid)[0]

        batch = [sharding.batch_sharding(mesh, a.ndim) for a in (images, tokens, valid)]
        with sharding.activate(mesh):
            sharded = jax.jit(forward, in_shardings=(param_shardings, *batch))(params, images, tokens, valid)
        one_device = jax.devices()[0]
        host_params = jax.device_put(jax.device_get(params), one_device)
        single = jax.jit(forward)(host_params, *jax.device_put((images, tokens, valid), one_device))
        report["scan" if scan else "unrolled"] = {
            "q_kernel_spec": [None if a is None else str(a) for a in q_kernel.sharding.spec],
            "q_kernel_shape": list(q_kernel.shape),
            "q_kernel_shard_shape": list(q_kernel.addressable_shards[0].data.shape),
            "q_kernel_devices": len(q_kernel.sharding.device_set),
            "embedding_spec": [None if a is None else str(a) for a in embedding.sharding.spec],
            "embedding_shard_shape": list(embedding.addressable_shards[0].data.shape),
            "logits_shard_shape": list(sharded.addressable_shards[0].data.shape),
            "max_abs_diff": float(np.abs(np.asarray(sharded) - np.asarray(single))[valid].max()),
            "max_abs_logit": float(np.abs(np.asarray(single)[valid]).max()),
        }
    print("REPORT" + json.dumps(report))
""")


@pytest.fixture(scope="module")
def report():
    return report_of(SCRIPT)


def test_mesh_has_the_three_axes(report):
    assert report["devices"] == 8
    assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("layout", ["unrolled", "scan"])
def test_params_are_created_sharded(report, layout):
    r = report[layout]
    # q_proj kernel [embed, heads, head_dim]: embed over fsdp, heads over tensor (scan adds a leading layers axis).
    lead = [None] if layout == "scan" else []
    assert r["q_kernel_spec"] == lead + ["fsdp", "tensor", None]
    full = r["q_kernel_shape"]
    assert r["q_kernel_shard_shape"] == full[:len(lead)] + [full[len(lead)] // 2, full[len(lead) + 1] // 2, full[-1]]
    assert r["q_kernel_devices"] == 8
    assert r["embedding_spec"] == ["tensor", "fsdp"]  # [vocab, embed]


@pytest.mark.parametrize("layout", ["unrolled", "scan"])
def test_sharded_forward_equals_single_device(report, layout):
    r = report[layout]
    assert r["logits_shard_shape"][0] == 1  # batch of 4 split over data x fsdp
    assert r["max_abs_logit"] > 0.1
    assert r["max_abs_diff"] <= 1e-5


def test_a_layout_jax_refuses_falls_back_to_device_order_and_says_so(monkeypatch, caplog):
    """JAX's topology-aware layout refuses some device sets (a TPU slice that is no contiguous cuboid, megacore
    chips); the mesh then keeps device order, and the log says so rather than hiding a slower layout."""
    import logging

    import jax

    from cxrllava_jax import sharding

    def refuse(*args, **kwargs):
        raise AssertionError('Constructed mesh contains a "hole"')

    monkeypatch.setattr(sharding.mesh_utils, "create_device_mesh", refuse)
    with caplog.at_level(logging.WARNING):
        mesh = sharding.make_mesh(devices=jax.devices()[:1])
    assert list(mesh.devices.flat) == jax.devices()[:1]
    assert 'contains a "hole"' in caplog.text and "device order" in caplog.text
