"""Does LoRA fine-tuning of the 7B CXR-LLaVA fit one GPU? The real train step (configs/finetune.py: the frozen
base in bf16, or int8/int4 for QLoRA, fp32 adapters, AdamW, remat) compiled ahead of time on abstract shapes
(`training.aot`, the state built as the loop builds it), no weight allocated, and XLA's `memory_analysis()` read out.

    python benchmarks/finetune_memory.py                 # 7B (cxr_llava_v2), bf16 base; several GiB RAM
    python benchmarks/finetune_memory.py --size tiny     # the same code path at tiny sizes (a smoke test)
    python benchmarks/finetune_memory.py --topology v5p:2x2x1   # one TPU chip's compiler (a venv with libtpu)
    python benchmarks/finetune_memory.py --variants qlora_int8   # some rows only (the others kept in the JSON)

Prints a table and writes benchmarks/results/finetune_memory[_tiny][_TPU].json. The figure is XLA's buffer
assignment of this program (arguments + temporaries + outputs not aliased to donated arguments), not a measurement
on a device. The CPU backend has no bf16 matmul: it converts every frozen bf16 weight to f32 first (about 0.8 GiB
a layer of temporaries at 7B, hoisted out of the layer loop), which a GPU or TPU does not; a TPU topology's
compiler is the closer stand-in for one accelerator.
"""

import argparse
import json
import os
import pathlib
import platform
import tempfile

import jax

from configs import finetune
from cxrllava_jax import sharding
from cxrllava_jax.models import configs as mc
from cxrllava_jax.models import quantize
from cxrllava_jax.training.optim import split_trainable
from cxrllava_jax.training import aot
from cxrllava_jax.training.tasks import make_task

SIZES = {"7b": ("cxr_llava_v2", 4, 1536), "tiny": ("cxr_llava_tiny", 4, 128)}  # preset, batch, sequence length
# (name, quantized base (QLoRA), layers scanned, remat policy).
VARIANTS = (("lora_bf16", None, True, "nothing_saveable"), ("qlora_int8", "int8", True, "nothing_saveable"),
            ("qlora_int4", "int4", True, "nothing_saveable"))
GIB = 2**30


def target_device(topology: str | None):
    """The one device to compile for: this backend's first, or the first chip of a TPU topology (libtpu)."""
    if not topology:
        return jax.devices()[0]
    from jax.experimental import topologies

    return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]


def step_memory(preset: str, batch: int, seq_length: int, base_quantize, scan: bool, remat: str,
                device=None) -> dict:
    with tempfile.TemporaryDirectory() as base:
        # The base model is only its config here: fine-tuning reads the architecture from init.checkpoint.
        meta = {"model": "cxr_llava", "config": mc.to_dict(mc.CXR_LLAVA_PRESETS[preset]), "scan": scan}
        pathlib.Path(base, "model_config.json").write_text(json.dumps(meta))
        cfg = finetune.get_config()
        cfg.init.checkpoint = base
        cfg.lora.base_quantize = base_quantize
        cfg.runtime.scan = scan
        cfg.runtime.remat_policy = remat
        cfg.data.seq_length = seq_length
        cfg.data.batch_size = batch
        task = make_task(cfg)
    tx, _ = task.optimizer(1000)
    mesh = sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=[device or jax.devices()[0]])
    # The train step as the loop builds it: the state through `hold_frozen` and `quantize_frozen`.
    lowered, state = aot.lower_train_step(task, tx, task.frozen, mesh, batch, cfg.runtime.dtype)
    compiled = lowered.compile()
    params = state.params
    trainable, _ = split_trainable(params, task.frozen)
    memory = compiled.memory_analysis()
    leaves = [x.array.qvalue if quantize.is_quantized(x) else x
              for x in jax.tree.leaves(params, is_leaf=quantize.is_quantized)]
    adapter_count = sum(x.size for x in jax.tree.leaves(trainable))
    peak = (memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes)
    return {"batch": batch, "seq_length": seq_length, "scan": scan, "remat_policy": cfg.runtime.remat_policy,
            "lora_rank": cfg.lora.rank, "targets": list(cfg.lora.targets), "base": base_quantize or cfg.lora.base_dtype,
            "parameters": int(sum(x.size for x in leaves)), "adapter_parameters": int(adapter_count),
            "arguments_gib": memory.argument_size_in_bytes / GIB, "temporaries_gib": memory.temp_size_in_bytes / GIB,
            "outputs_gib": memory.output_size_in_bytes / GIB, "aliased_gib": memory.alias_size_in_bytes / GIB,
            "peak_gib": peak / GIB}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="7b")
    parser.add_argument("--topology", help="compile for one chip of this TPU topology (e.g. v5p:2x2x1; needs libtpu)")
    parser.add_argument("--variants", nargs="+", choices=[v[0] for v in VARIANTS], default=[v[0] for v in VARIANTS])
    args = parser.parse_args()
    device = target_device(args.topology)
    preset, batch, seq_length = SIZES[args.size]
    results = {}
    for name, qtype, scan, remat in (v for v in VARIANTS if v[0] in args.variants):
        results[name] = step_memory(preset, batch, seq_length, qtype, scan, remat, device)
        r = results[name]
        print(f"{name:11s} {preset} batch {batch} x {seq_length} tokens, base {r['base']}, remat "
              f"{r['remat_policy']}: peak {r['peak_gib']:.2f} GiB (arguments {r['arguments_gib']:.2f}, temporaries "
              f"{r['temporaries_gib']:.2f}); adapters {r['adapter_parameters']:,} of {r['parameters']:,} parameters",
              flush=True)
    suffix = ("" if args.size == "7b" else f"_{args.size}") + (f"_{args.topology.split(':')[0]}" if args.topology else "")
    out = pathlib.Path("benchmarks/results") / f"finetune_memory{suffix}.json"
    if out.is_file() and set(args.variants) != {v[0] for v in VARIANTS}:  # a partial run updates its rows
        results = {**json.loads(out.read_text()).get("results", {}), **results}
    out.write_text(json.dumps({"model": preset, "device": device.device_kind, "jax": jax.__version__,
                               "machine": platform.machine(), "cpus": os.cpu_count(), "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
