"""The released model's size on this machine: peak resident memory and wall time of converting and loading a
directory shaped exactly like the release, and the per-token decode time of a 7B-shaped language model.

    python benchmarks/bench_release_scale.py --size 7b   # ~13 GiB of disk (cached), ~20 GiB of RAM at peak
    python benchmarks/bench_release_scale.py --size 1b   # a small shape to try it out

1. Writes (once; kept in --cache) a release directory of random bfloat16 weights with the release's key names,
   config.json and two-or-more shards: ViT-L/16@512 + LLaMA-2-7B for 7b.
2. In its own process each (peak RSS from `resource.getrusage`, wall time): `cxrllava import-torch` of it;
   loading it for inference in bfloat16 and with int8 weights (`CXRLLaVA.from_pretrained`'s loading path:
   `release.iter_release` -> `loading.place_params`; the tokenizer, which random weights have none of, aside).
3. Decode ms/token of the size's LLaMA shape cut to 2 layers (bfloat16 weights, batch 1, float32 compute on CPU).
Writes benchmarks/results/release_scale.json with the figures against the goals (x the bf16 weight size):
import <= 1.5, bf16 load <= 1.25, int8 load <= 0.75.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from cxrllava_jax.models.configs import CXRLLaVAConfig, LlamaConfig, VISION_PRESETS  # noqa: E402

SIZES = {
    "7b": CXRLLaVAConfig(vision=VISION_PRESETS["vit_l16_512"], llama=LlamaConfig()),
    "1b": CXRLLaVAConfig(vision=VISION_PRESETS["vit_b16_512"],
                         llama=LlamaConfig(hidden_size=2048, intermediate_size=5504, num_layers=16, num_heads=16,
                                           num_kv_heads=16)),
    "tiny": CXRLLaVAConfig(vision=VISION_PRESETS["vit_tiny_64"],
                           llama=LlamaConfig(hidden_size=256, intermediate_size=688, num_layers=2, num_heads=8,
                                             num_kv_heads=8)),
}
GOALS = {"import_torch": 1.5, "load_bf16": 1.25, "load_int8": 0.75}
DECODE_LAYERS, DECODE_TOKENS, DECODE_PROMPT = 2, 32, 64


def write_release(directory: pathlib.Path, config: CXRLLaVAConfig):
    """Random bf16 tensors under the release's names, one at a time, in shards of at most 5 GiB."""
    import ml_dtypes

    from cxrllava_jax.convert import release
    from cxrllava_jax.convert.mapping import torch_shape
    from cxrllava_jax.convert.safetensors_io import write_sharded

    expected = release.release_expected_shapes(config)
    rng = np.random.default_rng(0)
    shapes = {}
    for entry in release.release_entries(config):
        shape = torch_shape(entry, expected[entry.path])
        shapes[entry.torch_key] = shape  # fused tensors (the ViT's in_proj) appear once per part

    def tensors():
        for key, shape in shapes.items():
            yield key, (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    staging = directory.with_name(directory.name + ".partial")
    write_sharded(staging, tensors(), max_shard_bytes=5 * 2**30)
    (staging / "config.json").write_text(json.dumps(release.config_to_release(config), indent=2))
    staging.rename(directory)


def weight_bytes(directory: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def run_child(job: str, *args) -> dict:
    """One measurement in a fresh process; it prints its figures as its last line of JSON."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", job, *map(str, args)], check=True,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    figures["wall_s"] = round(time.perf_counter() - start, 1)
    return figures


def child(job: str, args: list[str]):
    if job == "import_torch":
        from cxrllava_jax.cli import main

        main(["import-torch", "--src", args[0], "--out", args[1], "--overwrite"])
    elif job in ("load_bf16", "load_int8"):
        import jax

        from cxrllava_jax.convert import release
        from cxrllava_jax.inference import api, loading
        from cxrllava_jax.models import cxr_llava
        from cxrllava_jax.models.configs import Runtime

        config, tensors = release.iter_release(args[0])
        model = cxr_llava.CXRLLaVAModel(config, Runtime(param_dtype="bfloat16"))
        _, params = loading.place_params(tensors, model, api._init_args(config),
                                         quantize="int8" if job == "load_int8" else None)
        jax.block_until_ready(params)
    elif job == "decode":
        print(json.dumps({"ms_per_token": decode_ms_per_token(SIZES[args[0]].llama)}))
        return
    print(json.dumps({"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))


def decode_ms_per_token(llama: LlamaConfig) -> float:
    import jax
    import jax.numpy as jnp

    from cxrllava_jax.inference.engine import Engine, Request, SamplingOptions
    from cxrllava_jax.models.configs import Runtime
    from cxrllava_jax.models.llama import Llama

    model = Llama(dataclasses.replace(llama, num_layers=DECODE_LAYERS), Runtime(param_dtype="bfloat16"))
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    engine = Engine(model, params, eos_id=-1, cache_bytes=0)
    request = Request(np.arange(3, 3 + DECODE_PROMPT, dtype=np.int32),
                      sampling=SamplingOptions(temperature=0.0, max_new_tokens=DECODE_TOKENS))
    engine.complete([request])  # compiles
    start = time.perf_counter()
    engine.complete([request])
    return round(1000 * (time.perf_counter() - start) / DECODE_TOKENS, 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="7b")
    parser.add_argument("--cache", type=pathlib.Path,
                        default=pathlib.Path(tempfile.gettempdir()) / "cxrllava-release-scale")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1:])
    config = SIZES[args.size]
    directory = args.cache / f"release-{args.size}"
    if not directory.is_dir():
        print(f"writing {directory} ...", flush=True)
        write_release(directory, config)
    size_gib = weight_bytes(directory) / 2**30
    load = open("/proc/loadavg").read().split()[:3]
    runs = {}
    with tempfile.TemporaryDirectory(dir=args.cache) as scratch:
        runs["import_torch"] = run_child("import_torch", directory, pathlib.Path(scratch) / "ckpt")
    runs["load_bf16"] = run_child("load_bf16", directory)
    runs["load_int8"] = run_child("load_int8", directory)
    for name, figures in runs.items():
        figures["x_weights"] = round(figures["peak_rss_gib"] / size_gib, 2)
        figures["goal_x_weights"] = GOALS[name]
        print(f"{name:<13} peak RSS {figures['peak_rss_gib']:>6} GiB = {figures['x_weights']}x the bf16 weights "
              f"(goal <= {GOALS[name]}x), {figures['wall_s']} s", flush=True)
    decode = run_child("decode", args.size)
    print(f"decode, {args.size} LLaMA shape with {DECODE_LAYERS} layers: {decode['ms_per_token']} ms/token")
    result = {"size": args.size, "machine": platform.machine(), "cpu_count": os.cpu_count(),
              "bf16_weights_gib": round(size_gib, 2), "load_average": load, "runs": runs,
              "decode": {"layers": DECODE_LAYERS, "batch": 1, "prompt": DECODE_PROMPT, "new_tokens": DECODE_TOKENS,
                         "ms_per_token": decode["ms_per_token"]}}
    name = "release_scale.json" if args.size == "7b" else f"release_scale_{args.size}.json"
    out = ROOT / "benchmarks" / "results" / name
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
