"""Every task's real attention inputs through the cuDNN path with cuDNN's own trace-time checks on.

JAX checks cuDNN's constraints (dtypes, mask shapes, head dims) in Python while it traces, before anything runs
on a GPU; only the installed cuDNN's version is read from the GPU plugin. With that one function patched to
report a recent cuDNN, tracing on CPU meets every error a GPU run would meet first (a float32 model: "Q must be
fp16/bf16"; BERT's [batch, 1, 1, key] padding mask: "Bias must have same seq length as QKV", JAX issue 28974).
The traces count cuDNN's forward calls, so a path that quietly fell back to XLA fails too.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from cxrllava_jax.models import attention
from cxrllava_jax.models.configs import Runtime
from cxrllava_jax.models.cxr_llava import CXRLLaVAModel
from cxrllava_jax.models.llama import attention_mask, init_cache
from cxrllava_jax.training.tasks import make_task
from tests.training_setup import parse, stage_flags

BATCH = 2
CUDNN_CALL = "dot_product_attention_fwd_wrapper"  # the primitive of cuDNN's forward pass


@pytest.fixture
def cudnn_checks(monkeypatch):
    """cuDNN 9.10 as far as JAX's trace-time checks can tell."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)


def cudnn_calls(fn, *args) -> int:
    """cuDNN forward calls in fn's program, counted through the jaxprs nested in it (layers, remat, VJPs)."""

    def count(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            total += eqn.primitive.name == CUDNN_CALL
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        total += count(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        total += count(sub)
        return total

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


def stage_task(stage: str, **runtime):
    """The task of configs/demo.py's stage at the tests' sizes, with `runtime` fields overridden."""
    flags = stage_flags(stage, Path("unused"), Path("unused"), 1, **{f"runtime.{k}": v for k, v in runtime.items()})
    return make_task(parse(flags))


def trace_train_step(task) -> int:
    """cuDNN calls in the gradient of the task's loss on its own batch shapes (what the train step differentiates)."""
    batch = task.abstract_batch(BATCH)
    params = jax.eval_shape(task.init, jax.random.key(0), batch)["params"]
    return cudnn_calls(jax.grad(lambda p, b: task.loss(p, b, jax.random.key(1))[0]), params, batch)


def attention_layers(task) -> int:
    """The attention layers the stage's forward pass runs: the ViT's, plus BERT's or the LLaMA's."""
    cfg = task.model_config
    vision = getattr(cfg, "vision", cfg)
    text = getattr(cfg, "text", None) or getattr(cfg, "llama", None)
    return vision.layers + (text.num_layers if text is not None else 0)


# 1a: the ViT (1 + grid^2 tokens, no mask); 1b: ViT + BERT with right-padded keys; 2b: ViT + the LLaMA over
# right-padded causal rows.
@pytest.mark.parametrize("stage", ["1a", "1b_labels", "2b"])
def test_every_stage_trains_through_cudnn(cudnn_checks, stage):
    task = stage_task(stage, dtype="bfloat16", attention="cudnn")
    assert trace_train_step(task) == attention_layers(task)  # one per layer (its VJP holds the backward)


def test_the_demo_on_a_gpu_takes_xla(cudnn_checks, monkeypatch):
    """configs/demo.py trains in float32 with `auto` (`make demo`): on a GPU that chooses XLA, not cuDNN."""
    monkeypatch.setattr(attention, "_platform", lambda: "gpu")
    task = stage_task("1b_labels")
    assert (task.cfg.runtime.dtype, task.cfg.runtime.attention) == ("float32", "auto")
    assert trace_train_step(task) == 0


def test_inference_prefill_and_decode_through_cudnn(cudnn_checks):
    """The engine's prefill (`engine.prefill_rows`): right-padded prompt blocks written at each row's own first slot
    (row 1 continues a reused 5-slot prefix), the mask a dense [batch, 1, query, slots] array over the cache; then
    one decode step (one query: matrix-vector products against the cache, no kernel)."""
    task = stage_task("2b")
    config = task.model_config
    model = CXRLLaVAModel(config, Runtime(dtype="bfloat16", param_dtype="bfloat16", attention="cudnn"))
    length, slots = config.num_image_tokens + 9, config.num_image_tokens + 24
    tokens = jnp.full((BATCH, length), config.image_token_id, jnp.int32)
    images = jnp.zeros((BATCH, config.vision.image_size, config.vision.image_size, config.vision.in_channels))
    params = jax.eval_shape(model.init, jax.random.key(0), images, tokens)
    features = jnp.zeros((BATCH, config.num_image_tokens, config.llama.hidden_size), jnp.bfloat16)
    starts = jnp.array([0, 5])
    positions = starts[:, None] + jnp.arange(length)
    kv_valid = jnp.arange(slots)[None, :] < (starts + length)[:, None]
    mask = attention_mask(positions, kv_valid)
    last = jnp.array([length - 1, length - 3])  # the rows' prompts end at different places of the block
    cache = init_cache(config.llama, BATCH, slots)

    def prefill(params, cache):
        return model.apply(params, tokens, features, positions, mask, cache, starts, last, method="extend")

    def image_features(params):  # the engine encodes images apart from the prompts, so that it can keep them
        return model.apply(params, images, method="image_features")

    assert cudnn_calls(image_features, params) == config.vision.layers
    assert cudnn_calls(prefill, params, cache) == config.llama.num_layers

    def step(params, cache):
        step_mask = attention_mask(positions[:, -1:] + 1, kv_valid)
        return model.apply(params, tokens[:, :1], positions[:, -1:] + 1, step_mask, cache, length, method="step")

    jax.make_jaxpr(step)(params, cache)


def test_choices_and_reasons():
    q16, q32 = (jax.ShapeDtypeStruct((2, 1025, 16, 64), d) for d in (jnp.bfloat16, jnp.float32))
    assert attention.choose("auto", q16, q16, platform="gpu") == ("cudnn", "")
    assert attention.choose("auto", q32, q32, platform="gpu") == ("xla", "cuDNN takes bfloat16 or float16, got "
                                                                         "float32")
    wide = jax.ShapeDtypeStruct((2, 128, 4, 512), jnp.bfloat16)
    assert attention.choose("cudnn", wide, wide)[0] == "xla"
    assert attention.choose("auto", q16, q16, platform="tpu")[0] == "xla"  # ViT's 1,025 tokens: no splash block
    assert attention.choose("auto", q16, q16, platform="cpu") == ("xla", "")


def test_the_choice_is_logged_once(caplog):
    attention._log_choice.cache_clear()
    q = jnp.zeros((1, 8, 2, 8))
    with caplog.at_level("INFO", logger=attention.__name__):
        for _ in range(3):
            attention.attend(q, q, q, kernel="cudnn")
    assert [r.getMessage() for r in caplog.records] == [
        "attention: cudnn runs through xla: cuDNN takes bfloat16 or float16, got float32"]
