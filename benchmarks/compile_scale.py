"""Will every stage fit at the paper's sizes? Compiles each stage's real train step ahead of time, allocating no
weights, for TPU pod slices and for 8 CPU devices (a stand-in for an 8-GPU host), and records per-device memory.

    make compile-scale   # a venv with libtpu (.venv-tpu), then this script; writes benchmarks/results/scale.json
    .venv-tpu/bin/python benchmarks/compile_scale.py [--stages 2b] [--targets v5e:4x4,cpu:8] [--layers N]
        [--seq-len 2048]   # stage 2 at another length (e.g. config.data.seq_length, the bucket of rare long samples)

Sizes: ViT-L/16 at 512, a BERT-base text tower, LLaMA-2-7B; global batch 64 (1A), 128 (1B, as configured), 16
(2A, 2B); stage 2's sequence length is the longest bucket the stage's own `sequence_buckets` chooses from real
data: the 3,851 Open-i reports (torchxrayvision wheel) made into that stage's conversations and tokenized with
LLaMA-2's tokenizer (`seq_lengths`). Each (stage, target)
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
import re
import resource
import subprocess
import sys
import time

RESULTS = pathlib.Path(__file__).parent / "results" / "scale.json"
STAGES = {"1a": ("stage1a", 64), "1b": ("stage1b_reports", 128), "2a": ("stage2a", 16), "2b": ("stage2b", 16)}
TARGETS = ("v5e:2x4", "v5e:4x4", "v4:2x2x1", "v5p:2x2x1", "cpu:8")
LLAMA2_TOKENIZER = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "llama2-tokenizer"


def stage_config(stage: str, layers: int | None, seq_len: int | None = None):
    import importlib

    cfg = importlib.import_module(f"configs.{STAGES[stage][0]}").get_config()
    cfg.init.update(checkpoint="", llama="", bert="")
    if seq_len:
        cfg.data.seq_length = seq_len
    if layers:
        cfg.model.vision_overrides = {"layers": layers}
        cfg.model.llama_overrides = {"num_layers": layers}
        cfg.model.text_overrides = {"num_layers": layers}
    return cfg


def seq_lengths(stage: str) -> dict:
    """The buckets stage 2's task chooses (`Task.sequence_buckets`, config.data.seq_buckets quantiles of a
    sample) from the Open-i reports as that stage's conversations, in LLaMA-2's tokens. A bucket over the data's
    largest sample (config.data.seq_length, kept for rare longer ones) is left out: training compiles it too,
    but at 2,048 it only holds samples longer than any in the sample."""
    import tempfile

    import numpy as np

    from cxrllava_jax.domain.findings import CHEXPERT_OBSERVATIONS
    from cxrllava_jax.reference.wheels import torchxrayvision_data
    from cxrllava_jax.training.tasks import make_task
    from input_pipeline import indiana
    from input_pipeline.records import FRONTAL, Record, sectioned_report

    with tempfile.TemporaryDirectory() as root:
        pathlib.Path(root, "NLMCXR_reports.tgz").write_bytes(torchxrayvision_data()("NLMCXR_reports.tgz"))
        records = [Record(image=f"{study}.png", labels=np.full(len(CHEXPERT_OBSERVATIONS), np.nan, np.float32), report=sectioned_report(sections), dataset="indiana",
                          split="train", view=FRONTAL, study_id=study)
                   for _, study, sections, _ in indiana.openi_reports(pathlib.Path(root))]
    records = [r for r in records if r.report]
    cfg = stage_config(stage, None)
    cfg.data.tokenizer = str(LLAMA2_TOKENIZER)
    task = make_task(cfg)
    buckets = task.sequence_buckets(task.examples(records))
    sizes = [s for s in buckets.sizes if s < cfg.data.seq_length] or list(buckets.sizes)
    return {"reports": len(records), "buckets": list(buckets.sizes), "seq_len": max(sizes)}


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
    kv = l.num_kv_heads * l.resolved_head_dim
    per_token = 2 * (2 * l.hidden_size**2 + 2 * l.hidden_size * kv + 3 * l.hidden_size * l.intermediate_size)
    attention = 4 * length * l.num_heads * l.resolved_head_dim
    return sequences * (l.num_layers * length * (per_token + attention) + 2 * scored * l.hidden_size * l.vocab_size)


def flops_per_step(stage: str, task, batch: int, seq_len: int | None) -> float:
    """Forward x3 where parameters train (forward + backward for activations and weights), x2 where only
    activation gradients pass through (2A's frozen LLM in front of the projector), x1 for a frozen tower in front."""
    config = task.model_config
    if stage == "1a":
        return 3 * vit_flops(config, batch)
    if stage == "1b":
        return 3 * (vit_flops(config.vision, batch) + bert_flops(config.text, batch, task.text_length))
    scored = seq_len - config.num_image_tokens
    llm = llama_flops(config.llama, batch, seq_len, scored)
    projector = 2 * batch * config.num_image_tokens * config.vision.width * config.llama.hidden_size
    return vit_flops(config.vision, batch) + 3 * projector + (2 if stage == "2a" else 3) * llm


def compile_one(stage: str, target: str, layers: int | None, seq_len: int | None) -> dict:
    """One (stage, target) compile, in this process."""
    from cxrllava_jax import sharding
    from cxrllava_jax.models import attention
    from cxrllava_jax.training.aot import lower_train_step
    from cxrllava_jax.training.tasks import make_task

    cfg = stage_config(stage, layers, seq_len)
    global_batch = STAGES[stage][1]
    task = make_task(cfg)
    tx, _ = task.optimizer(1000)
    mesh = sharding.make_mesh(**cfg.mesh.to_dict(), devices=devices_of(target))
    start = time.perf_counter()
    lowered, _ = lower_train_step(task, tx, task.frozen, mesh, global_batch, cfg.runtime.dtype)
    with sharding.activate(mesh):
        kernel = attention.resolve(cfg.runtime.attention)
    record = {"stage": stage, "target": target, "devices": mesh.size, "mesh": dict(mesh.shape),
              "global_batch": global_batch, "seq_len": seq_len,
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
    record["flops_per_step"] = flops_per_step(stage, task, global_batch, seq_len)
    return record


def in_child(*args: str) -> tuple[dict, float | None]:
    """This script with `args` in a child process (8 CPU devices, no GPU): the JSON it prints and its peak host
    memory in GiB. The parent never imports JAX, so each child can take libtpu for itself."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]), TF_CPP_MIN_LOG_LEVEL="3")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    lines = [line for line in result.stdout.splitlines() if line.startswith("RECORD")]
    if result.returncode or not lines:
        return {"error": (result.stderr.strip().splitlines() or ["no output"])[-1][:400]}, None
    # ru_maxrss of children is the largest child so far: exact for this one only when it is the largest.
    return json.loads(lines[-1][len("RECORD"):]), round(peak_kib / 2**20, 2) if peak_kib > before else None


def merged(out: pathlib.Path, record: dict) -> list[dict]:
    """The results file's records with `record` in place of the one for the same stage, target and length, in
    STAGES x TARGETS order: each compile is saved as it ends, so an interrupted run keeps what it measured."""
    records = json.loads(out.read_text()) if out.exists() else []
    key = lambda r: (r["stage"], r["target"], r.get("seq_len"))  # noqa: E731
    records = [r for r in records if key(r) != key(record)] + [record]
    order = {k: i for i, k in enumerate((s, t) for s in STAGES for t in TARGETS)}
    return sorted(records, key=lambda r: (order.get(key(r)[:2], len(order)), r.get("seq_len") or 0))


def table(records: list[dict]) -> str:
    lines = ["| stage | target | mesh | batch | seq | arguments GiB | temp GiB | total GiB/device | TFLOP/step "
             "| compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        mesh = "x".join(f"{k}{v}" for k, v in r.get("mesh", {}).items() if v > 1) or "1"
        if "bytes_per_device" not in r:
            error = r.get("error", "")
            short = re.search(r"HLO temporaries \(([\d.]+G)\) exceeds available HBM \(([\d.]+G)\)", error)
            error = f"temporaries {short[1]} > {short[2]} HBM" if short else error[:80]
            lines.append(f"| {r['stage']} | {r['target']} | {mesh} | {r.get('global_batch', '')} | "
                         f"{r.get('seq_len') or ''} | | | does not compile: {error} | | |")
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
    parser.add_argument("--seq-len", type=int, default=None,
                        help="stage 2 at this length instead of the longest bucket chosen from the data")
    parser.add_argument("--buckets", help=argparse.SUPPRESS)  # 'stage': its buckets from data, in this process
    args = parser.parse_args()
    if args.one:
        stage, target = args.one.split(",")
        print("RECORD" + json.dumps(compile_one(stage, target, args.layers, args.seq_len)), flush=True)
        return
    if args.buckets:
        print("RECORD" + json.dumps(seq_lengths(args.buckets)), flush=True)
        return
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    layers = ["--layers", str(args.layers)] if args.layers else []
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                            cwd=pathlib.Path(__file__).parent).stdout.strip() or None  # the code compiled
    for stage in args.stages.split(","):
        seq, data = [], None
        if stage.startswith("2") and args.seq_len:
            seq = ["--seq-len", str(args.seq_len)]
        elif stage.startswith("2"):
            data, _ = in_child("--buckets", stage)
            print(f"stage {stage} buckets from data: {json.dumps(data)}", flush=True)
            if "seq_len" not in data:
                raise SystemExit(f"stage {stage}: choosing the sequence length failed: {data['error']}")
            seq = ["--seq-len", str(data["seq_len"])]
        for target in args.targets.split(","):
            record, peak = in_child("--one", f"{stage},{target}", *layers, *seq)
            record = {"stage": stage, "target": target, **record, "host_peak_rss_gib": peak, "commit": commit}
            if data:
                record["seq_buckets_from_data"] = data
            print(json.dumps(record), flush=True)
            records = merged(out, record)
            out.write_text(json.dumps(records, indent=2) + "\n")
    print(table(json.loads(out.read_text())))


if __name__ == "__main__":
    main()
