"""What weight-only quantization changes in two tiny language models: the tests' CXR-LLaVA LLaMA with random
weights, and a tiny LLaMA trained on a fixed template (cxrllava_jax/reference/trained_llama.py), whose
predictions are decisive.

    python benchmarks/bench_quantization.py   # prints the figures, writes benchmarks/results/quantization.json

For int8 (per channel) and int4 (grouped), Qwix, against the unquantized model in the same dtype: the largest
and the mean logit change (teacher-forced on the unquantized model's greedy continuations) and the share of
greedy tokens that are the same as the unquantized model's, over PROMPTS prompts with NEW_TOKENS new tokens
each (EOS never ends a row). The random model is run in float32 (its weights' dtype), the trained one in
bfloat16, as inference runs. A random model's top logits are often closer than int8 keeps them, so its
share is a lower bound; the trained model's shows what a model with decisive predictions keeps.
"""

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from cxrllava_jax.convert import release  # noqa: E402
from cxrllava_jax.models import quantize  # noqa: E402
from cxrllava_jax.inference.engine import Engine, Request, SamplingOptions  # noqa: E402
from cxrllava_jax.models.configs import Runtime  # noqa: E402
from cxrllava_jax.models.llama import Llama  # noqa: E402
from cxrllava_jax.reference import trained_llama  # noqa: E402
from cxrllava_jax.reference.tiny_models import release_dir  # noqa: E402

PROMPTS, PROMPT_LENGTH, NEW_TOKENS = 8, 24, 32
NEVER = -1


def random_model():
    config, params = release.load_release(release_dir())
    config = config.llama
    prompts = np.random.RandomState(0).randint(3, config.vocab_size, (PROMPTS, PROMPT_LENGTH)).astype(np.int32)
    return "tests' tiny CXR-LLaVA language model (random weights, float32)", config, Runtime(), params["llm"], prompts


def trained_model():
    params, chain = trained_llama.trained_llama()
    bf16 = Runtime(dtype="bfloat16", param_dtype="bfloat16")
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    prompts = trained_llama.chain_prompts(chain, PROMPTS, PROMPT_LENGTH, seed=7)
    return "tiny LLaMA trained on a fixed template (bfloat16)", trained_llama.CONFIG, bf16, params, prompts


def greedy_tokens(model, weights, prompts, greedy: SamplingOptions) -> list[list[int]]:
    engine = Engine(model, {"params": weights}, eos_id=NEVER, cache_bytes=0)
    return [c.tokens for c in engine.complete([Request(p, sampling=greedy) for p in prompts])]


def compare(name, config, runtime, params, prompts) -> dict:
    prompts = list(prompts)
    greedy = SamplingOptions(temperature=0.0, max_new_tokens=NEW_TOKENS)
    exact_tokens = greedy_tokens(Llama(config, runtime), params, prompts, greedy)
    sequences = jnp.asarray([np.concatenate([p, t]) for p, t in zip(prompts, exact_tokens)])
    exact, _ = Llama(config, runtime).apply({"params": params}, sequences)
    exact = np.asarray(exact, np.float32)[:, PROMPT_LENGTH - 1:-1]
    flat = traverse_util.flatten_dict(params, sep="/")
    result = {"model": name, "prompts": len(prompts), "new_tokens": NEW_TOKENS, "logit_std": round(float(exact.std()), 4)}
    top2 = np.sort(exact, axis=-1)[..., -2:]
    result["median_top1_top2_gap"] = round(float(np.median(top2[..., 1] - top2[..., 0])), 4)
    for kind in quantize.KINDS:
        model = quantize.quantized(Llama(config, runtime), kind)
        template = quantize.abstract_params(model, jnp.zeros((1, 1), jnp.int32))
        weights = traverse_util.unflatten_dict(
            {p: quantize.quantize_leaf(template, p, jnp.asarray(a)) for p, a in flat.items()}, sep="/")
        logits = np.asarray(model.apply({"params": weights}, sequences)[0], np.float32)[:, PROMPT_LENGTH - 1:-1]
        tokens = greedy_tokens(model, weights, prompts, greedy)
        same = np.mean([a == b for x, y in zip(tokens, exact_tokens) for a, b in zip(x, y)])
        result[kind] = {"max_logit_diff": round(float(np.abs(logits - exact).max()), 4),
                        "mean_logit_diff": round(float(np.abs(logits - exact).mean()), 4),
                        "same_greedy_tokens": round(float(same), 3),
                        "same_first_token": round(float(np.mean([t[0] == e[0] for t, e in zip(tokens, exact_tokens)])),
                                                  3)}
        print(f"{name}: {kind} {result[kind]}", flush=True)
    return result


def main():
    result = {"runs": [compare(*random_model()), compare(*trained_model())]}
    out = ROOT / "benchmarks" / "results" / "quantization.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
