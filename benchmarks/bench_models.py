"""CXR-LLaVA training step speed, JAX against PyTorch, and what `scan` buys in compile time.

    python benchmarks/bench_models.py   # prints a table, writes benchmarks/results/models.json

1. One forward+backward step of the LM loss (next-token cross-entropy on the text after the image) of a
   small CXR-LLaVA (ViT 128px/16, 4 layers, width 128 -> 64 image tokens; LLaMA 4 layers, hidden 256;
   batch 4 x (64 text + 64 image) tokens), fp32: our jitted `value_and_grad` against the PyTorch release
   forward of cxrllava_jax/reference/torch_models.py in eager mode, with the same weights (exported from PyTorch and
   imported by our release converter; the two losses are checked equal before timing).
2. Compile time of that step for deeper models (8 and 16 layers in each tower) with and without `nn.scan`.

The frameworks are timed in alternating rounds and the median round is kept, so that load from other
processes on a shared machine hits both alike; the load average is recorded with the figures. PyTorch
runs with its default thread count and with one thread: on a loaded machine its OpenMP threads can
spin against each other and make the default many times slower than one thread.
"""

import dataclasses
import json
import os
import pathlib
import platform
import tempfile
import time

import flax.linen as nn
import jax
import numpy as np
import optax
import torch

from cxrllava_jax.convert import release
from cxrllava_jax.models.configs import CXRLLaVAConfig, LlamaConfig, Runtime, VisionConfig
from cxrllava_jax.models.cxr_llava import CXRLLaVAModel
from cxrllava_jax.reference.torch_models import IMAGE_PLACEHOLDER, ReleaseCXRLLaVA, randomize_, save_release_dir

BATCH, TEXT = 4, 64
ROUNDS, STEPS_PER_ROUND = 5, 2
DEPTHS = (8, 16)
VISION = VisionConfig(image_size=128, patch_size=16, width=128, layers=4, head_width=32, embed_dim=64)
LLAMA = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8,
                    num_kv_heads=8, max_position_embeddings=512)
CONFIG = CXRLLaVAConfig(vision=VISION, llama=LLAMA)


def deep(layers: int) -> CXRLLaVAConfig:
    return CXRLLaVAConfig(vision=dataclasses.replace(VISION, layers=layers),
                          llama=dataclasses.replace(LLAMA, num_layers=layers))


def make_batch(cfg: CXRLLaVAConfig):
    """Prompts of 2 text tokens, <image>, 62 text tokens; the loss scores the text after the image."""
    rng = np.random.RandomState(0)
    text = rng.randint(3, cfg.llama.vocab_size, (BATCH, TEXT))
    images = rng.randn(BATCH, cfg.vision.image_size, cfg.vision.image_size, 1).astype(np.float32)
    torch_ids = np.concatenate([text[:, :2], np.full((BATCH, 1), IMAGE_PLACEHOLDER), text[:, 2:]], 1)
    ours = np.concatenate([text[:, :2], np.full((BATCH, cfg.num_image_tokens), cfg.image_token_id), text[:, 2:]], 1)
    scored = np.zeros(ours.shape, bool)
    scored[:, 2 + cfg.num_image_tokens:] = True  # targets: every text token after the image
    return images, torch_ids, ours.astype(np.int32), scored


def jax_step(cfg: CXRLLaVAConfig, runtime: Runtime):
    model = CXRLLaVAModel(cfg, runtime)

    def loss_fn(params, images, tokens, scored):
        logits = model.apply({"params": params}, images, tokens)[0][:, :-1]
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        return (losses * scored[:, 1:]).sum() / scored[:, 1:].sum()

    return jax.jit(jax.value_and_grad(loss_fn))


def torch_loss(model: ReleaseCXRLLaVA, images, ids, cfg: CXRLLaVAConfig):
    logits = model(images, ids)[:, :-1]
    targets = torch.cat([ids[:, 1:2], torch.full((BATCH, cfg.num_image_tokens), -100), ids[:, 3:]], 1)
    targets[:, :1 + cfg.num_image_tokens] = -100  # the token after BOS and the image positions are not scored
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=-100)


def seconds_per_step(fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def step_times() -> dict:
    torch.manual_seed(0)
    reference = randomize_(ReleaseCXRLLaVA(CONFIG), seed=1, std=0.05).train()
    with tempfile.TemporaryDirectory() as tmp:
        _, params = release.load_release(save_release_dir(reference, CONFIG, tmp))
    images, torch_ids, tokens, scored = make_batch(CONFIG)
    step = jax_step(CONFIG, Runtime())
    start = time.perf_counter()
    jax_loss = float(jax.block_until_ready(step(params, images, tokens, scored))[0])
    compile_s = time.perf_counter() - start

    pixels, ids = torch.as_tensor(images).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(torch_ids)

    def torch_step():
        reference.zero_grad(set_to_none=True)
        loss = torch_loss(reference, pixels, ids, CONFIG)
        loss.backward()
        return loss.detach()

    reference_loss = float(torch_step())
    if abs(jax_loss - reference_loss) > 1e-4:
        raise AssertionError(f"JAX loss {jax_loss} != PyTorch loss {reference_loss}: not the same model")
    default_threads = torch.get_num_threads()

    def torch_with(threads):
        torch.set_num_threads(threads)
        return seconds_per_step(torch_step, STEPS_PER_ROUND)

    rounds = [(seconds_per_step(lambda: jax.block_until_ready(step(params, images, tokens, scored)), STEPS_PER_ROUND),
               torch_with(default_threads), torch_with(1)) for _ in range(ROUNDS)]
    torch.set_num_threads(default_threads)
    jax_s, torch_s, torch_1_s = (float(np.median(column)) for column in zip(*rounds))
    return {"config": {"vision": dataclasses.asdict(VISION), "llama": dataclasses.asdict(LLAMA)},
            "batch": BATCH, "sequence": int(tokens.shape[1]), "image_tokens": CONFIG.num_image_tokens,
            "loss": jax_loss, "loss_pytorch": reference_loss, "jax_compile_s": round(compile_s, 2),
            "jax_ms": round(jax_s * 1e3, 1), "pytorch_eager_ms": round(torch_s * 1e3, 1),
            "pytorch_threads": default_threads, "pytorch_eager_1_thread_ms": round(torch_1_s * 1e3, 1),
            "best_pytorch_over_jax": round(min(torch_s, torch_1_s) / jax_s, 2)}


def compile_times() -> list[dict]:
    rows = []
    for layers in DEPTHS:
        cfg = deep(layers)
        images, _, tokens, scored = make_batch(cfg)
        for scan in (False, True):
            model = CXRLLaVAModel(cfg, Runtime(scan=scan))
            params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), images[:1], tokens[:1]))["params"]
            step = jax_step(cfg, Runtime(scan=scan))
            start = time.perf_counter()
            compiled = step.lower(params, images, tokens, scored).compile()
            compile_s = time.perf_counter() - start
            run_s = seconds_per_step(lambda: jax.block_until_ready(compiled(params, images, tokens, scored)), 3)
            rows.append({"layers_per_tower": layers, "scan": scan, "compile_s": round(compile_s, 2),
                         "step_ms": round(run_s * 1e3, 1)})
    return rows


def main():
    load_before = os.getloadavg()[0]
    steps = step_times()
    compiles = compile_times()
    print(f"train step (fwd+bwd, fp32), batch {steps['batch']} x {steps['sequence']} tokens "
          f"({steps['image_tokens']} image), loss {steps['loss']:.4f} (PyTorch {steps['loss_pytorch']:.4f})")
    print(f"{'':<22} {'ms/step':>8}")
    print(f"{'JAX jit':<22} {steps['jax_ms']:>8}")
    print(f"{'PyTorch eager, ' + str(steps['pytorch_threads']) + ' thr':<22} {steps['pytorch_eager_ms']:>8}")
    print(f"{'PyTorch eager, 1 thr':<22} {steps['pytorch_eager_1_thread_ms']:>8}")
    print(f"best PyTorch / JAX: {steps['best_pytorch_over_jax']}x   (JAX compile {steps['jax_compile_s']} s)")
    print(f"\n{'layers per tower':<17} {'scan':>5} {'compile s':>10} {'step ms':>8}")
    for r in compiles:
        print(f"{r['layers_per_tower']:<17} {str(r['scan']):>5} {r['compile_s']:>10} {r['step_ms']:>8}")
    out = pathlib.Path(__file__).parent / "results" / "models.json"
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "backend": jax.default_backend(),
                               "cpu_count": os.cpu_count(),
                               "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                               "jax": jax.__version__, "torch": torch.__version__, "train_step": steps,
                               "compile": compiles}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
