"""On 8 fake CPU devices with stage 2B's FSDP mesh, the optimizer state is sharded like the parameters.

Real widths (ViT-L/16 at 512, LLaMA-2-7B's 4096/11008/32000) with two scanned layers each, Adam under
`optax.MultiSteps`: every optimizer-state leaf over 1 MiB whose parameter is sharded must be sharded too
(a replicated Adam moment of 7B is 27 GB on every device). Abstract (nothing allocated) through the same
`init_opt_state` the training loop calls; a tiny model then checks the real arrays land on the same shards.
XLA fixes the device count when JAX starts, so this runs in a subprocess that prints JSON.
"""

import textwrap

import pytest

from tests.fake_devices import report_of

SCRIPT = textwrap.dedent("""
    import json

    import jax
    import numpy as np

    from configs import demo, stage2b
    from cxrllava_jax import sharding
    from cxrllava_jax.training.optim import split_trainable
    from cxrllava_jax.training.steps import abstract_train_state, hold_frozen, init_opt_state
    from cxrllava_jax.training.tasks import make_task

    def opt_leaves(opt_state):
        for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
            names = [k.key for k in path if isinstance(getattr(k, "key", None), str)]
            yield jax.tree_util.keystr(path), (names[-1] if names else None), leaf

    report = {}
    cfg = stage2b.get_config()
    cfg.model.llama_overrides = {"num_layers": 2}
    cfg.model.vision_overrides = {"layers": 2}
    cfg.optim.grad_accum_steps = 2
    task = make_task(cfg)
    tx, _ = task.optimizer(100)
    mesh = sharding.make_mesh(**cfg.mesh.to_dict())
    report["mesh"] = dict(mesh.shape)
    state = abstract_train_state(task, tx, tuple(cfg.frozen), mesh, cfg.runtime.dtype)
    params = split_trainable(state.params, ())[0]
    big, bad = [], []
    for path, name, leaf in opt_leaves(state.opt_state):
        if leaf.size * leaf.dtype.itemsize <= 2**20:
            continue
        big.append(path)
        param = params[name]
        if leaf.sharding.is_fully_replicated and not param.sharding.is_fully_replicated:
            bad.append(f"{path} {leaf.shape} replicated, its parameter {param.sharding.spec}")
    report["big_leaves"], report["replicated_while_param_sharded"] = len(big), bad
    report["frozen_dtypes"] = sorted({str(x.dtype) for k, x in params.items() if k.startswith("img/")})
    report["trainable_dtypes"] = sorted({str(x.dtype) for k, x in params.items() if not k.startswith("img/")})
    report["opt_state_of_frozen"] = [p for p, name, _ in opt_leaves(state.opt_state)
                                     if name and name.startswith("img/")]

    # The real arrays: a tiny stage 2B on the same mesh.
    cfg = demo.get_config("2b")
    cfg.mesh.update(data=1, fsdp=8)
    cfg.optim.grad_accum_steps = 2
    task = make_task(cfg)
    tx, _ = task.optimizer(100)
    mesh = sharding.make_mesh(**cfg.mesh.to_dict())
    init_fn = lambda rng: task.init(rng, task.dummy_batch(1))["params"]
    real_params, _ = sharding.create_sharded(init_fn, mesh, jax.random.key(0))
    real_params = hold_frozen(real_params, tuple(cfg.frozen), "bfloat16")
    trainable, fixed = split_trainable(real_params, tuple(cfg.frozen))
    mismatched, moments = [], 0
    for path, name, leaf in opt_leaves(init_opt_state(tx, real_params, tuple(cfg.frozen))):
        if name in trainable and leaf.shape == trainable[name].shape:
            moments += 1
            if not leaf.sharding.is_equivalent_to(trainable[name].sharding, leaf.ndim):
                mismatched.append(f"{path} {leaf.sharding.spec} vs {trainable[name].sharding.spec}")
    report["real_moments"], report["real_mismatched"] = moments, mismatched
    report["real_frozen_dtypes"] = sorted({str(x.dtype) for x in fixed.values()})
    print("REPORT" + json.dumps(report))
""")


@pytest.fixture(scope="module")
def report():
    return report_of(SCRIPT)


def test_stage_2b_uses_a_fully_sharded_mesh(report):
    assert report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}


def test_no_large_optimizer_leaf_is_replicated_while_its_parameter_is_sharded(report):
    # Adam's two moments and the accumulator for each of the ~14 big trainable tensors at least.
    assert report["big_leaves"] >= 30, report
    assert report["replicated_while_param_sharded"] == []


def test_frozen_tower_is_bf16_without_optimizer_state(report):
    assert report["frozen_dtypes"] == ["bfloat16"]
    assert report["trainable_dtypes"] == ["float32"]
    assert report["opt_state_of_frozen"] == []


def test_real_optimizer_state_lands_on_its_parameters_shards(report):
    assert report["real_moments"] > 0
    assert report["real_mismatched"] == []
    assert report["real_frozen_dtypes"] == ["bfloat16"]
