"""What weight-only quantization changes in the tests' tiny CXR-LLaVA language model (random weights).

    python benchmarks/bench_quantization.py   # prints the figures, writes benchmarks/results/quantization.json

For int8 (per channel) and int4 (grouped), Qwix, against the float32 model: the largest and the mean logit
change (teacher-forced on the float model's greedy continuations) and the share of greedy tokens that are
the same as the float model's, over PROMPTS random prompts of PROMPT_LENGTH tokens with NEW_TOKENS new ones.
A random model's top logits are often close together, so the share is a lower bound for a trained model.
"""

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from cxrllava_jax.convert import release  # noqa: E402
from cxrllava_jax.models import quantize  # noqa: E402
from cxrllava_jax.inference.generate import Generator, SamplingOptions  # noqa: E402
from cxrllava_jax.models.llama import Llama  # noqa: E402
from cxrllava_jax.reference.tiny_models import release_dir  # noqa: E402

PROMPTS, PROMPT_LENGTH, NEW_TOKENS = 8, 24, 32
NEVER = -1


def main():
    config, params = release.load_release(release_dir())
    config, params = config.llama, params["llm"]
    prompts = list(np.random.RandomState(0).randint(3, config.vocab_size, (PROMPTS, PROMPT_LENGTH)).astype(np.int32))
    greedy = SamplingOptions(temperature=0.0, max_new_tokens=NEW_TOKENS)
    exact_tokens = Generator(Llama(config), {"params": params}, eos_id=NEVER).generate(prompts, options=greedy)
    sequences = jnp.asarray([np.concatenate([p, t]) for p, t in zip(prompts, exact_tokens)])
    exact = np.asarray(Llama(config).apply({"params": params}, sequences))[:, PROMPT_LENGTH - 1:-1]
    flat = traverse_util.flatten_dict(params, sep="/")
    result = {"model": "tests' tiny CXR-LLaVA language model", "prompts": PROMPTS, "new_tokens": NEW_TOKENS}
    for kind in quantize.KINDS:
        model = quantize.quantized(Llama(config), kind)
        template = quantize.abstract_params(model, jnp.zeros((1, 1), jnp.int32))
        weights = traverse_util.unflatten_dict(
            {p: quantize.quantize_leaf(template, p, jnp.asarray(a)) for p, a in flat.items()}, sep="/")
        logits = np.asarray(model.apply({"params": weights}, sequences))[:, PROMPT_LENGTH - 1:-1]
        tokens = Generator(model, {"params": weights}, eos_id=NEVER).generate(prompts, options=greedy)
        same = np.mean([a == b for x, y in zip(tokens, exact_tokens) for a, b in zip(x, y)])
        result[kind] = {"max_logit_diff": round(float(np.abs(logits - exact).max()), 4),
                        "mean_logit_diff": round(float(np.abs(logits - exact).mean()), 4),
                        "logit_std": round(float(exact.std()), 4),
                        "same_greedy_tokens": round(float(same), 3),
                        "same_first_token": round(float(np.mean([t[0] == e[0] for t, e in zip(tokens, exact_tokens)])),
                                                  3)}
        print(kind, result[kind], flush=True)
    out = ROOT / "benchmarks" / "results" / "quantization.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
