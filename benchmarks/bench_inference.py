"""Generation speed on this machine: the engine's jitted prefill + while_loop decode against transformers' `generate`
on the same weights, and against recomputing the whole sequence every step (no KV cache).

    python benchmarks/bench_inference.py   # prints a table, writes benchmarks/results/inference.json

Greedy decoding of exactly NEW_TOKENS tokens per row (EOS never stops a row, so every contender does the
same work) from text prompts of PROMPT_LENGTH tokens, with the tests' tiny CXR-LLaVA language model
(cxrllava_jax/reference/tiny_models.py) and a larger random LLaMA with LLaMA-2's vocabulary. Each figure is the best
of REPEATS timed runs after a warm-up run that compiles; every contender's tokens are checked against ours.
PyTorch runs with one thread per core this process may use (`--torch-threads` to change it): more threads
than cores make its OpenMP threads spin against each other. OMP_PROC_BIND is refused: it binds the main
thread to one core once PyTorch starts its threads, and XLA's threads inherit that (measured: every JAX figure
halved). The load average is recorded with the figures; compare on a quiet machine (load < 0.5).
"""

import argparse

import json
import os
import pathlib
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from safetensors.torch import load_file

from cxrllava_jax.convert import hf_llama, release
from cxrllava_jax.inference.engine import Engine, Request, SamplingOptions
from cxrllava_jax.models.configs import LlamaConfig
from cxrllava_jax.models.llama import Llama
from cxrllava_jax.reference.tiny_models import release_dir
from cxrllava_jax.reference.torch_models import hf_llama_config, randomize_

PROMPT_LENGTH = 100
NEW_TOKENS = 128
BATCH_SIZES = (1, 8)
REPEATS = 3
NEVER = -1  # an EOS id no token equals
SMALL = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8,
                    num_kv_heads=8, max_position_embeddings=512)


def tiny_language_model(directory):
    """The tests' tiny CXR-LLaVA: its LLaMA as a transformers model and as ours (the same tensors)."""
    config, params = release.load_release(release_dir())
    torch_model = transformers.LlamaForCausalLM(hf_llama_config(config.llama))
    tensors = {}
    for shard in sorted(release_dir().glob("*.safetensors")):
        tensors.update(load_file(shard))
    state = {k.replace("llama.", "model.", 1): v for k, v in tensors.items() if k.startswith(("llama.", "lm_head."))}
    torch_model.load_state_dict(state)
    return "tiny (test checkpoint)", torch_model.eval(), config.llama, params["llm"]


def small_language_model(directory):
    torch.manual_seed(0)
    torch_model = randomize_(transformers.LlamaForCausalLM(hf_llama_config(SMALL)), seed=1, std=0.05)
    torch_model.save_pretrained(directory)
    config, params = hf_llama.load_hf_llama(directory)
    return "small (4x256, vocab 32000)", torch_model, config, params


def best_time(run) -> tuple[float, object]:
    result = run()  # warm-up: compiles
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return min(times), result


def recompute_without_cache(config: LlamaConfig, params, prompts: np.ndarray, new_tokens: int):
    """Greedy decoding that runs the full forward over the whole (right-padded) sequence for every token."""
    model = Llama(config)
    batch, length = prompts.shape

    @jax.jit
    def run(params, prompts):
        tokens = jnp.pad(prompts, ((0, 0), (0, new_tokens)))

        def step(i, tokens):
            logits, _ = model.apply({"params": params}, tokens, jnp.arange(tokens.shape[1])[None] < length + i)
            return tokens.at[:, length + i].set(jnp.argmax(logits[:, length + i - 1], axis=-1).astype(tokens.dtype))

        return jax.lax.fori_loop(0, new_tokens, step, tokens)[:, length:]

    return lambda: np.asarray(run(params, prompts)).tolist()


def measure(name, torch_model, config, params, batch_size: int) -> dict:
    rng = np.random.RandomState(0)
    prompts = rng.randint(3, config.vocab_size, (batch_size, PROMPT_LENGTH)).astype(np.int32)
    greedy = SamplingOptions(temperature=0.0, max_new_tokens=NEW_TOKENS)
    # No prefix cache: every timed run prefills its prompts, as the other contenders do.
    engine = Engine(Llama(config), {"params": params}, eos_id=NEVER, max_rows=batch_size, cache_bytes=0)
    ours_s, ours = best_time(lambda: [c.tokens for c in engine.complete([Request(p, sampling=greedy)
                                                                         for p in prompts])])

    def transformers_generate():
        with torch.no_grad():
            out = torch_model.generate(torch.as_tensor(prompts, dtype=torch.long), do_sample=False,
                                       max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                       pad_token_id=config.pad_token_id)
        return out[:, PROMPT_LENGTH:].tolist()

    hf_s, hf = best_time(transformers_generate)
    full_s, full = best_time(recompute_without_cache(config, params, prompts, NEW_TOKENS))
    tokens = batch_size * NEW_TOKENS
    row = {"model": name, "batch_size": batch_size, "prompt_tokens": PROMPT_LENGTH, "new_tokens": NEW_TOKENS,
           "ours_tok_s": round(tokens / ours_s, 1), "transformers_tok_s": round(tokens / hf_s, 1),
           "full_recompute_tok_s": round(tokens / full_s, 1), "speedup_vs_transformers": round(hf_s / ours_s, 2),
           "speedup_vs_recompute": round(full_s / ours_s, 2),
           "same_tokens_as_transformers": ours == hf, "same_tokens_as_recompute": ours == full}
    return row


def main():
    parser = argparse.ArgumentParser(description="generation speed against transformers' generate")
    parser.add_argument("--torch-threads", type=int, default=len(os.sched_getaffinity(0)))
    if os.environ.get("OMP_PROC_BIND", "false").lower() != "false":
        raise SystemExit(f"OMP_PROC_BIND={os.environ['OMP_PROC_BIND']}: unset it; it would pin JAX's threads to one "
                         "core too (see this script's docstring)")
    torch.set_num_threads(parser.parse_args().torch_threads)
    load_before = open("/proc/loadavg").read().split()[:3]
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for build in (tiny_language_model, small_language_model):
            name, torch_model, config, params = build(directory)
            for batch_size in BATCH_SIZES:
                rows.append(measure(name, torch_model, config, params, batch_size))
                r = rows[-1]
                print(f"{r['model']:<28} batch {r['batch_size']}: ours {r['ours_tok_s']:>8} tok/s | transformers "
                      f"{r['transformers_tok_s']:>7} ({r['speedup_vs_transformers']}x) | full recompute "
                      f"{r['full_recompute_tok_s']:>7} ({r['speedup_vs_recompute']}x) | same tokens: "
                      f"{r['same_tokens_as_transformers']}/{r['same_tokens_as_recompute']}", flush=True)
    result = {"machine": platform.machine(), "cpu_count": os.cpu_count(), "backend": jax.default_backend(),
              "torch_threads": torch.get_num_threads(), "goals": {"vs_transformers": 3.0, "vs_recompute": 4.0},
              "load_average_before": load_before, "load_average_after": open("/proc/loadavg").read().split()[:3],
              "runs": rows}
    out = pathlib.Path(__file__).parent / "results" / "inference.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
