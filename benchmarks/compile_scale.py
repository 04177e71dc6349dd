"""Will every stage fit at the paper's sizes? Compiles each stage's real train step ahead of time, allocating no
weights, for TPU pod slices and for 8 CPU devices (a stand-in for an 8-GPU host), and records per-device memory.

    make compile-scale   # a venv with libtpu (.venv-tpu), then this script; writes benchmarks/results/scale.json
    .venv-tpu/bin/python benchmarks/compile_scale.py [--stages 2b] [--targets v5e:4x4,cpu:8] [--layers N]

Sizes: ViT-L/16 at 512, a BERT-base text tower, LLaMA-2-7B; global batch 64 (1A), 128 (1B, as configured), 16
(2A, 2B); stage 2's sequence length is the bucket a typical sample needs (`SEQ_LEN`). Each (stage, target)
compiles in its own process, so a compile's host memory is measured (`host_peak_rss_gib`) and freed. TPU
devices come from `jax.experimental.topologies` (libtpu compiles for them without a TPU). `flops_per_step` is
analytic (model FLOPs: forward, plus backward where gradients flow; remat recomputation not counted), since
`cost_analysis()` counts a scanned layer body once. `--layers N` shrinks every tower to N layers (to try the
script on a small machine); the JSON then says so and is not the paper-size result.
"""

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

RESULTS = pathlib.Path(__file__).parent / "results" / "scale.json"
STAGES = {"1a": ("stage1a", 64), "1b": ("stage1b_reports", 128), "2a": ("stage2a", 16), "2b": ("stage2b", 16)}
TARGETS = ("v5e:2x4", "v5e:4x4", "v4:2x2x1", "v5p:2x2x1", "cpu:8")
# 1,024 image tokens + the system prompt (~60) + up to ~400 text tokens: the bucket (a multiple of 128, as the
# TPU attention kernel's blocks need) that holds a typical stage-2 sample. Buckets are chosen from the data at
# training time (config.data.seq_buckets); this is the longest common one.
SEQ_LEN = 1536


def stage_config(stage: str, layers: int | None):
    import importlib

    cfg = importlib.import_module(f"configs.{STAGES[stage][0]}").get_config()
    cfg.data.seq_length = SEQ_LEN
    cfg.init.update(checkpoint="", llama="", bert="")
    if layers:
        cfg.model.vision_overrides = {"layers": layers}
        cfg.model.llama_overrides = {"num_layers": layers}
        cfg.model.text_overrides = {"num_layers": layers}
    return cfg


def devices_of(target: str):
    import jax
    from jax.experimental import topologies

    if target.startswith("cpu:"):
        devices = jax.devices("cpu")
        if len(devices) != int(target[4:]):
            raise RuntimeError(f"{target}: this process has {len(devices)} CPU devices (XLA_FLAGS)")
        return devices
    return topologies.get_topology_desc(topology_name=target, platform="tpu").devices


def vit_flops(v, images: int) -> float:
    tokens = v.grid**2 + 1
    per_layer = 2 * tokens * (4 * v.width**2 + 2 * v.width * v.mlp_dim) + 4 * tokens**2 * v.width
    return images * (v.layers * per_layer + 2 * v.grid**2 * v.patch_size**2 * v.in_channels * v.width)


def bert_flops(b, sequences: int, length: int) -> float:
    per_layer = 2 * length * (4 * b.hidden_size**2 + 2 * b.hidden_size * b.intermediate_size)
    return sequences * b.num_layers * (per_layer + 4 * length**2 * b.hidden_size)


def llama_flops(l, sequences: int, length: int, scored: int) -> float:
    """Decoder layers over `length` tokens, the vocabulary projection over the `scored` positions only."""
    kv = l.num_kv_heads * l.kv_dim
    per_token = 2 * (2 * l.hidden_size**2 + 2 * l.hidden_size * kv + 3 * l.hidden_size * l.intermediate_size)
    attention = 4 * length * l.num_heads * l.kv_dim
    return sequences * (l.num_layers * length * (per_token + attention) + 2 * scored * l.hidden_size * l.vocab_size)


def flops_per_step(stage: str, task, batch: int) -> float:
    """Forward x3 where parameters train (forward + backward for activations and weights), x2 where only
    activation gradients pass through (2A's frozen LLM in front of the projector), x1 for a frozen tower in front."""
    config = task.config
    if stage == "1a":
        return 3 * vit_flops(config, batch)
    if stage == "1b":
        return 3 * (vit_flops(config.vision, batch) + bert_flops(config.text, batch, task.text_length))
    scored = SEQ_LEN - config.num_image_tokens
    llm = llama_flops(config.llama, batch, SEQ_LEN, scored)
    projector = 2 * batch * config.num_image_tokens * config.vision.width * config.llama.hidden_size
    return vit_flops(config.vision, batch) + 3 * projector + (2 if stage == "2a" else 3) * llm


def compile_one(stage: str, target: str, layers: int | None) -> dict:
    """One (stage, target) compile, in this process."""
    from cxrllava_jax import sharding
    from cxrllava_jax.models import attention
    from cxrllava_jax.training.aot import lower_train_step
    from cxrllava_jax.training.tasks import make_task

    cfg = stage_config(stage, layers)
    global_batch = STAGES[stage][1]
    task = make_task(cfg)
    tx, _ = task.optimizer(1000)
    mesh = sharding.make_mesh(**cfg.mesh.to_dict(), devices=devices_of(target))
    start = time.perf_counter()
    lowered, _ = lower_train_step(task, tx, task.frozen, mesh, global_batch, cfg.runtime.dtype)
    with sharding.activate(mesh):
        kernel = attention.resolve(cfg.runtime.attention)
    record = {"stage": stage, "target": target, "devices": mesh.size, "mesh": dict(mesh.shape),
              "global_batch": global_batch, "seq_len": SEQ_LEN if stage.startswith("2") else None,
              "attention": kernel, "remat_policy": cfg.runtime.remat_policy, "layers": layers or "paper"}
    try:
        compiled = lowered.compile()
    except Exception as error:  # a program that does not fit: the compiler's message says by how much
        record.update(error=str(error).splitlines()[0][:400], compile_s=round(time.perf_counter() - start, 1))
        return record
    record["compile_s"] = round(time.perf_counter() - start, 1)
    memory = compiled.memory_analysis()
    sizes = {"arguments": memory.argument_size_in_bytes, "temp": memory.temp_size_in_bytes,
             "output": memory.output_size_in_bytes}
    sizes["total"] = sizes["arguments"] + sizes["output"] + sizes["temp"] - memory.alias_size_in_bytes
    record["bytes_per_device"] = sizes
    record["gib_per_device"] = round(sizes["total"] / 2**30, 2)
    record["flops_per_step"] = flops_per_step(stage, task, global_batch)
    return record


def run_isolated(stage: str, target: str, layers: int | None) -> dict:
    """`compile_one` in a child process (8 CPU devices, no GPU), with the child's peak host memory."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]), TF_CPP_MIN_LOG_LEVEL="3")
    args = [sys.executable, __file__, "--one", f"{stage},{target}"] + (["--layers", str(layers)] if layers else [])
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = subprocess.run(args, env=env, capture_output=True, text=True)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    lines = [line for line in result.stdout.splitlines() if line.startswith("RECORD")]
    if result.returncode or not lines:
        return {"stage": stage, "target": target, "error": result.stderr.strip().splitlines()[-1][:400]}
    record = json.loads(lines[-1][len("RECORD"):])
    # ru_maxrss of children is the largest child so far: exact for this one only when it is the largest.
    record["host_peak_rss_gib"] = round(peak_kib / 2**20, 2) if peak_kib > before else None
    return record


def table(records: list[dict]) -> str:
    lines = ["| stage | target | mesh | batch | seq | arguments GiB | temp GiB | total GiB/device | TFLOP/step "
             "| compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        mesh = "x".join(f"{k}{v}" for k, v in r.get("mesh", {}).items() if v > 1) or "1"
        if "bytes_per_device" not in r:
            lines.append(f"| {r['stage']} | {r['target']} | {mesh} | {r.get('global_batch', '')} | "
                         f"{r.get('seq_len') or ''} | | | does not compile: {r.get('error', '')[:80]} | | |")
            continue
        b = {k: v / 2**30 for k, v in r["bytes_per_device"].items()}
        lines.append(f"| {r['stage']} | {r['target']} | {mesh} | {r['global_batch']} | {r['seq_len'] or ''} | "
                     f"{b['arguments']:.2f} | {b['temp']:.2f} | **{b['total']:.2f}** | "
                     f"{r['flops_per_step'] / 1e12:.1f} | {r['compile_s']} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--layers", type=int, default=None, help="shrink every tower to this many layers")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # 'stage,target': compile in this process
    args = parser.parse_args()
    if args.one:
        print("RECORD" + json.dumps(compile_one(*args.one.split(","), args.layers)), flush=True)
        return
    records = []
    for stage in args.stages.split(","):
        for target in args.targets.split(","):
            record = run_isolated(stage, target, args.layers)
            records.append(record)
            print(json.dumps(record), flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=2) + "\n")
    print(table(records))


if __name__ == "__main__":
    main()
