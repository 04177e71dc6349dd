"""Proves and times the GPU path on one accelerator in one command, in at most 8 minutes of wall clock.

    make device-check                                # on the GPU node (installs .whl/ offline, then runs this)
    python benchmarks/device_check.py                # writes benchmarks/results/device_<gpu-name>.json
    python benchmarks/device_check.py --dry-run      # every part at tiny sizes on CPU, in under a minute (CI)

Parts, in order, each with its own time budget (skipped with the reason when what is left of the whole budget
would not hold it; a failure is recorded with its error and the next part runs):
- device: the card, its memory, JAX/cuDNN versions; HBM bandwidth from a device-to-device copy (bytes read +
  written); the bf16 matrix-product rate.
- parity: the tests' tiny model (cxr_llava_tiny, LLaMA-2's tokenizer) answers with the same greedy text on the
  device as on the CPU (float32, matmuls at full precision), its bf16 logits agree within bf16 tolerance, and one
  stage-2B train step gives the CPU's loss. The CPU side runs in a child process (JAX_PLATFORMS=cpu) from the
  start, beside the device's parts.
- kernels: cuDNN attention equals XLA's on the device (outputs, and gradients for the training masks) for the
  ViT (1,025 tokens, no mask), BERT's key padding, stage 2's causal right-padded rows and a left-padded prompt
  with its image prefix (a dense mask); each kernel's time. (Dry run: cuDNN's arguments run through XLA.)
- decode: the 7B language model, random bf16 weights made on the device (no files), batch 1 and 16, bf16 and
  int8 (Qwix, weight-only): ms/token after warm-up and the fraction of the HBM roofline (weight bytes + the KV
  bytes a step reads, over the copy bandwidth).
- report: the whole 7B model through the Python API: a 512x512 image in, 100 tokens out (prefill of ~1,100
  tokens + decode), batch 1 and 8; the first call (compiles included) beside the warm one, and sampling with
  the release's top-p beside greedy (what sorting the vocabulary costs a step).
- serving: `cxrllava serve`'s application on the 7B model (in this process, uvicorn in a thread), 1 vs 16
  concurrent clients, requests/s.
- train: stage 2B at LLaMA-2-7B's width with as many layers as fit the card, and stage 1A (ViT-L/16 at 512):
  tokens or images per second, and MFU from the compiled program's FLOP count.
The JSON holds every part's status, seconds and figures; a short table is printed last. Exit status 0 when no
part failed (skipped parts are listed, not failed).
"""

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
import typing

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LLAMA2_TOKENIZER = ROOT / "tests" / "fixtures" / "llama2-tokenizer"
SCHEMA = 1
PARTS = ("device", "parity", "kernels", "decode", "report", "serving", "train")
# The figures each part's `results` holds in a real run and a dry run alike (the dry run's test checks them).
RESULT_KEYS = {
    "device": ("platform", "device_kind", "memory_bytes", "jax", "copy_gb_per_s", "matmul_tflops"),
    "parity": ("greedy_equal", "bf16_logits_relative_error", "train_loss_device", "train_loss_cpu",
               "train_loss_relative_error", "checks"),
    "kernels": ("cases", "checks"),
    "decode": ("runs",),
    "report": ("runs",),
    "serving": ("levels", "speedup_16_vs_1"),
    "train": ("runs",),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0,
                    "L4": 121.0, "A10": 125.0}  # dense bf16, the vendor's figure (MFU's denominator)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each part runs: the release's shapes on a device, tiny ones for the dry run."""

    budget_s: float
    part_budgets_s: dict
    copy_mib: int
    matmul: int
    big_vision: str  # the 7B model's ViT preset (decode, report, serving)
    big_llama: dict  # LlamaConfig overrides of llama2_7b
    tiny_layers: int | None = None  # the dry run's towers: one layer each (what compiles is what costs it)
    decode_batches: tuple = (1, 16)
    decode_context: int = 1152  # the slots a step reads: a report's prompt (1,024 image tokens + text) and more
    decode_tokens: int = 64
    report_batches: tuple = (1, 8)
    report_tokens: int = 100
    serving_levels: tuple = ((1, 4), (16, 32))  # (clients, requests)
    serving_batch: int = 16  # the server's --max-batch-size
    serving_tokens: int = 32
    train_2b: dict = dataclasses.field(default_factory=dict)  # config overrides
    train_1a: dict = dataclasses.field(default_factory=dict)
    kernel_cases: dict = dataclasses.field(default_factory=dict)  # name -> (batch, query, key, heads, head_dim)


DEVICE = Sizes(
    budget_s=480, copy_mib=2048, matmul=8192, big_vision="vit_l16_512", big_llama={},
    part_budgets_s={"device": 20, "parity": 60, "kernels": 30, "decode": 120, "report": 75, "serving": 60,
                    "train": 110},
    train_2b={"data.batch_size": 8, "data.seq_length": 1536},
    train_1a={"data.batch_size": 32},
    kernel_cases={"vit": (2, 1025, 1025, 16, 64), "bert_key_padding": (16, 128, 128, 12, 64),
                  "stage2_causal": (2, 1536, 1536, 32, 128), "prefill_left_padded": (2, 1101, 1101, 32, 128)})
# The dry run's budgets are generous (a loaded 2-core CI machine must not skip a part); what it costs is measured.
DRY = Sizes(
    budget_s=900, copy_mib=8, matmul=256, big_vision="vit_tiny_64", tiny_layers=1,
    big_llama={"hidden_size": 64, "intermediate_size": 172, "num_layers": 1, "num_heads": 4, "num_kv_heads": 4},
    part_budgets_s={"device": 60, "parity": 240, "kernels": 90, "decode": 90, "report": 90, "serving": 120,
                    "train": 150},
    decode_batches=(1, 2), decode_context=32, decode_tokens=4, report_batches=(1, 2), report_tokens=4,
    serving_levels=((1, 2), (16, 16)), serving_tokens=2, serving_batch=2,
    train_2b={"data.batch_size": 2, "data.seq_length": 64, "model.vision": "vit_tiny_64",
              "model.vision_overrides": {"layers": 1},
              "model.llama_overrides": {"hidden_size": 64, "intermediate_size": 172, "num_heads": 4,
                                        "num_kv_heads": 4}},
    train_1a={"data.batch_size": 2, "model.vision": "vit_tiny_64", "model.vision_overrides": {"layers": 1}},
    kernel_cases={"vit": (1, 17, 17, 2, 16), "bert_key_padding": (2, 16, 16, 2, 16),
                  "stage2_causal": (2, 32, 32, 2, 16), "prefill_left_padded": (2, 21, 21, 2, 16)})


class Skip(Exception):
    """A part that could not run any of its measurements within its budget."""


class Check:
    """One run: the parts, their budgets, the JSON."""

    def __init__(self, sizes: Sizes, dry_run: bool, budget_s: float):
        self.sizes, self.dry_run, self.budget_s = sizes, dry_run, budget_s
        self.start = time.monotonic()
        self.parts: dict[str, dict] = {}
        self.shared: dict = {}  # what parts hand on: the 7B model, the CPU reference process
        self.deadline = 0.0

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def part_left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, fn):
        budget = self.sizes.part_budgets_s[name] * self.budget_s / self.sizes.budget_s
        if budget > self.left():
            self.parts[name] = {"status": "skipped", "budget_s": round(budget, 1), "seconds": 0.0,
                                "reason": f"would overrun: {self.left():.0f} s of the budget left, the part needs "
                                          f"{budget:.0f} s"}
            return
        self.deadline = time.monotonic() + budget
        started, cpu = time.monotonic(), time.process_time()
        try:
            results = fn(self)
            checks = results.get("checks", {})
            status = ("passed" if all(checks.values()) else "failed") if checks else "measured"
            self.parts[name] = {"status": status, "results": results}
            if status == "failed":
                self.parts[name]["reason"] = "failed checks: " + ", ".join(k for k, ok in checks.items() if not ok)
        except Skip as reason:
            self.parts[name] = {"status": "skipped", "reason": str(reason)}
        except Exception as error:  # recorded; the next part still runs
            self.parts[name] = {"status": "failed", "error": f"{type(error).__name__}: {error}"[:2000],
                                "traceback": traceback.format_exc()[-3000:]}
        self.parts[name].update(seconds=round(time.monotonic() - started, 2), budget_s=round(budget, 1),
                                cpu_s=round(time.process_time() - cpu, 2))  # this process's threads

    def within_part(self, needed: float = 0.0) -> bool:
        """Whether the part's budget still holds a step of `needed` seconds (the rest of it is skipped)."""
        return self.part_left() > needed


# ---------------------------------------------------------------- helpers

def ran(units: list[dict]) -> list[dict]:
    """`units` (a part's runs), or Skip when none of them ran."""
    if not any("skipped" not in unit for unit in units):
        raise Skip("the part's budget was spent before its first measurement")
    return units


def peak_memory() -> int | None:
    """The device's peak bytes in use so far (None on CPU): what the engine's cache resizes held at once."""
    import jax

    return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def timed(fn, *args, repeats: int = 3) -> float:
    """The fastest of `repeats` calls (after one warm-up call), in seconds, results waited for."""
    import jax

    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def device_name() -> str:
    import jax

    return re.sub(r"[^a-z0-9]+", "-", jax.devices()[0].device_kind.lower()).strip("-")


def peak_tflops(kind: str) -> float | None:
    for name, tflops in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in kind.lower():
            return tflops
    return None


def big_config(sizes: Sizes):
    from cxrllava_jax.models.configs import CXRLLaVAConfig, LLAMA_PRESETS, VISION_PRESETS

    llama = dataclasses.replace(LLAMA_PRESETS["llama2_7b"], **sizes.big_llama)
    vision = VISION_PRESETS[sizes.big_vision]
    return CXRLLaVAConfig(vision=dataclasses.replace(vision, layers=sizes.tiny_layers or vision.layers), llama=llama)


def radiograph(size: int, seed: int):
    import numpy as np

    from input_pipeline import synthetic

    rng = np.random.default_rng(seed)
    return synthetic.draw_radiograph(synthetic.sample_findings(rng), size, rng)


def param_bytes(tree) -> int:
    import jax

    return sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


# ---------------------------------------------------------------- parts

def part_device(check: Check) -> dict:
    import jax
    import jax.numpy as jnp

    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    cudnn = None
    with contextlib.suppress(Exception):
        from jax._src.lib import cuda_versions

        cudnn = cuda_versions.cudnn_get_version() if cuda_versions else None
    copy = jnp.zeros((check.sizes.copy_mib * 2**20 // 2,), jnp.bfloat16)
    negate = jax.jit(lambda x: -x)  # reads every byte once and writes it once: a device-to-device copy
    seconds = timed(negate, copy, repeats=10)
    n = check.sizes.matmul
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    matmul_s = timed(jax.jit(lambda x, y: x @ y), a, a, repeats=5)
    check.shared["copy_bytes_per_s"] = 2 * copy.nbytes / seconds
    check.shared["matmul_flops_per_s"] = 2 * n**3 / matmul_s
    return {"platform": device.platform, "device_kind": device.device_kind, "device_count": jax.device_count(),
            "memory_bytes": stats.get("bytes_limit"), "jax": jax.__version__, "cudnn": cudnn,
            "python": platform.python_version(), "copy_mib": check.sizes.copy_mib,
            "copy_gb_per_s": round(2 * copy.nbytes / seconds / 1e9, 1),
            "matmul_size": n, "matmul_tflops": round(2 * n**3 / matmul_s / 1e12, 2),
            "peak_bf16_tflops_spec": peak_tflops(device.device_kind)}


def reference_values(sizes: Sizes) -> dict:
    """What the parity part compares: computed on whatever device JAX uses (the child: the CPU)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cxrllava_jax.domain.tokenizer import load_tokenizer
    from cxrllava_jax.inference.api import CXRLLaVA
    from cxrllava_jax.models.configs import CXR_LLAVA_PRESETS, Runtime
    from cxrllava_jax.models.cxr_llava import CXRLLaVAModel

    tokenizer = load_tokenizer(LLAMA2_TOKENIZER)
    base = CXR_LLAVA_PRESETS["cxr_llava_tiny"]
    layers = sizes.tiny_layers or base.llama.num_layers
    config = dataclasses.replace(base, llama=dataclasses.replace(base.llama, vocab_size=len(tokenizer),
                                                                   num_layers=layers),
                                 vision=dataclasses.replace(base.vision,
                                                            layers=sizes.tiny_layers or base.vision.layers))
    size = config.vision.image_size
    images = [radiograph(size, seed) for seed in range(2)]
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):  # the same weights on both sides: made on the CPU, then placed
        model32 = CXRLLaVAModel(config, Runtime())
        # Jitted: run eagerly, every primitive of the forward pass is a compile of its own (hundreds, on CPU).
        params = jax.jit(model32.init)(jax.random.key(0), jnp.zeros((1, size, size, 1)), jnp.full(
            (1, config.num_image_tokens + 1), config.image_token_id, jnp.int32))["params"]
    params = jax.device_put(nn.meta.unbox(params), jax.devices()[0])
    out = {}
    with jax.default_matmul_precision("highest"):  # float32 parity: no TF32 on the GPU
        api = CXRLLaVA(config, params, tokenizer, Runtime(dtype="float32", param_dtype="float32"))
        out["greedy"] = api.write_radiologic_reports(images, temperature=0.0, max_new_tokens=8)
    tokens = jnp.asarray(np.stack([api.encode([{"role": "user", "content": "<image>\nDescribe the lungs."}])] * 2))
    pixels = jnp.asarray(np.stack([api.preprocess(image) for image in images]))
    model16 = CXRLLaVAModel(config, Runtime(dtype="bfloat16", param_dtype="bfloat16"))
    logits, _ = jax.jit(lambda params, pixels, tokens: model16.apply(
        {"params": jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)}, pixels, tokens))(params, pixels, tokens)
    out["bf16_logits"] = np.asarray(logits[:, -8:], np.float32)
    with jax.default_matmul_precision("highest"):
        out["train_losses"] = train_step_losses(sizes)
    return out


def stage_config(stage: str, overrides: dict):
    import importlib

    cfg = importlib.import_module(f"configs.stage{stage}").get_config()
    cfg.init.update(checkpoint="", llama="", bert="")
    for key, value in overrides.items():
        node = cfg
        *parents, last = key.split(".")
        for parent in parents:
            node = node[parent]
        node[last] = value
    return cfg


def train_state(task, cfg, mesh, key):
    """The real train state (`training.steps`): parameters made on the device, frozen ones in the compute dtype,
    optimizer state on the parameters' shards; and the loop's jitted step."""
    import flax.linen as nn
    import jax
    import numpy as np

    from cxrllava_jax import sharding
    from cxrllava_jax.training.steps import TrainState, hold_frozen, init_opt_state, jit_train_step

    tx, _ = task.optimizer(1000)
    frozen = tuple(cfg.frozen)
    init = lambda rng: task.init(rng, task.dummy_batch(1))["params"]  # noqa: E731
    with sharding.activate(mesh):
        shardings = nn.meta.unbox(sharding.logical_shardings(jax.eval_shape(init, key), mesh))
        params = jax.jit(lambda rng: nn.meta.unbox(init(rng)), out_shardings=shardings)(key)
    params = task.quantize_frozen(hold_frozen(params, frozen, cfg.runtime.dtype))
    # The step counter placed as the loop places it: an uncommitted one would compile the step a second time.
    step_count = jax.device_put(np.int32(0), sharding.replicated(mesh))
    state = TrainState(step=step_count, params=params, opt_state=init_opt_state(tx, params, frozen))
    step = jit_train_step(task, tx, frozen, jax.tree.map(lambda x: x.sharding, state))
    return state, step


def synthetic_batch(task, batch_size: int, seed: int) -> dict:
    """Random inputs of the task's batch shapes: right-padded rows, the last third of each scored."""
    import numpy as np

    rng = np.random.default_rng(seed)
    batch = {}
    for name, spec in task.abstract_batch(batch_size).items():
        if name in ("valid", "loss_mask"):
            lengths = rng.integers(spec.shape[1] // 2, spec.shape[1] + 1, batch_size)
            valid = np.arange(spec.shape[1])[None] < lengths[:, None]
            batch[name] = valid & (np.arange(spec.shape[1])[None] >= 2 * lengths[:, None] // 3) \
                if name == "loss_mask" else valid
        elif np.issubdtype(spec.dtype, np.integer):  # token ids, or uint8 pixels
            batch[name] = rng.integers(3, 500 if spec.dtype != np.uint8 else 256, spec.shape).astype(spec.dtype)
        else:
            batch[name] = rng.random(spec.shape).astype(spec.dtype)
    return batch


def train_step_losses(sizes: Sizes) -> list[float]:
    """Stage 2B's loss at the tiny sizes, before and after one step of the real train step (float32)."""
    import jax

    from cxrllava_jax import sharding
    from cxrllava_jax.training.tasks import make_task

    overrides = {**DRY.train_2b, "runtime.dtype": "float32", "runtime.scan": False, "model.llama": "llama_tiny",
                 "model.llama_overrides": {"vocab_size": 512, "num_layers": sizes.tiny_layers or 2}}
    if not sizes.tiny_layers:
        overrides["model.vision_overrides"] = {}
    cfg = stage_config("2b", overrides)
    task = make_task(cfg)
    mesh = sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    state, step = train_state(task, cfg, mesh, jax.random.key(0))  # threefry: the same weights on any backend
    batch = synthetic_batch(task, 2, seed=1)
    losses = []
    with sharding.activate(mesh):
        for _ in range(2):
            state, _, loss = step(state, batch, jax.random.key(1))
            losses.append(float(loss))
    return losses


def part_parity(check: Check) -> dict:
    import numpy as np

    device = reference_values(check.sizes)
    if "cpu_reference" not in check.shared:  # the dry run: after this process compiled the same CPU programs
        check.shared["cpu_reference"] = start_cpu_reference(check.dry_run)
    child, path, log = check.shared["cpu_reference"]
    try:
        # The dry run waits as long as it takes: a loaded CI machine must not turn slowness into a failure.
        child.wait(timeout=600 if check.dry_run else max(check.part_left(), 1))
    except subprocess.TimeoutExpired:
        child.kill()
        raise TimeoutError("the CPU reference did not finish within the part's budget")
    if child.returncode != 0:
        log.seek(0)
        raise RuntimeError(f"the CPU reference failed: {log.read()[-1500:]}")
    with np.load(path, allow_pickle=False) as saved:
        cpu = {"greedy": list(saved["greedy"]), "bf16_logits": saved["bf16_logits"],
               "train_losses": list(saved["train_losses"])}
    scale = float(np.abs(cpu["bf16_logits"]).max()) or 1.0
    logits_error = float(np.abs(device["bf16_logits"] - cpu["bf16_logits"]).max()) / scale
    loss_errors = [abs(a - b) / max(abs(b), 1e-6) for a, b in zip(device["train_losses"], cpu["train_losses"])]
    checks = {"greedy_equal": device["greedy"] == cpu["greedy"], "bf16_logits_within_2e-2": logits_error < 2e-2,
              "train_loss_within_1e-4": max(loss_errors) < 1e-4}
    return {"greedy_equal": checks["greedy_equal"], "greedy_device": device["greedy"], "greedy_cpu": cpu["greedy"],
            "bf16_logits_relative_error": logits_error, "train_loss_device": device["train_losses"],
            "train_loss_cpu": cpu["train_losses"], "train_loss_relative_error": max(loss_errors),
            "matmul_precision": "highest (float32 parity)", "checks": checks}


def part_kernels(check: Check) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cxrllava_jax.models import attention
    from cxrllava_jax.models.attention import CausalMask, KeyMask

    on_gpu = jax.default_backend() == "gpu"
    implementation = "cudnn" if on_gpu else "xla"  # the dry run: cuDNN's arguments through XLA
    cases, checks = {}, {}
    for name, (batch, query, key, heads, head_dim) in check.sizes.kernel_cases.items():
        if not check.within_part():
            cases[name] = {"skipped": "the part's budget is spent"}
            continue
        rng = np.random.default_rng(0)
        q, k, v = (jnp.asarray(rng.standard_normal((batch, n, heads, head_dim)), jnp.bfloat16)
                   for n in (query, key, key))
        lengths = jnp.asarray(np.r_[key, rng.integers(key // 2, key + 1, batch - 1)])  # row 0 unpadded
        valid = jnp.arange(key)[None] < lengths[:, None]
        mask, train = {"vit": (None, True), "bert_key_padding": (KeyMask(valid, right_padded=True), True),
                       "stage2_causal": (CausalMask(valid, right_padded=True), True),
                       "prefill_left_padded": (CausalMask(valid[:, ::-1]), False)}[name]
        real = np.ones((batch, query), bool) if name in ("vit", "bert_key_padding") else np.asarray(
            valid if name == "stage2_causal" else valid[:, ::-1])
        weights = jnp.asarray(real, jnp.float32)[:, :, None, None]

        def run(kernel):
            if kernel == "xla":
                return lambda q, k, v: attention.attend(q, k, v, mask, kernel="xla")
            return lambda q, k, v: attention.cudnn(q, k, v, mask, implementation=implementation)

        result = {"shape": [batch, query, key, heads, head_dim], "mask": type(mask).__name__ if mask else None}
        forward = {kernel: jax.jit(run(kernel)) for kernel in ("xla", "cudnn")}
        outs = {kernel: fn(q, k, v) for kernel, fn in forward.items()}
        error = float(jnp.abs((outs["cudnn"] - outs["xla"]).astype(jnp.float32) * weights).max())
        result["max_abs_diff"] = error
        checks[f"{name}_output"] = error < 2e-2
        for kernel, fn in forward.items():
            result[f"{kernel}_ms"] = round(timed(fn, q, k, v) * 1e3, 3)
        if train:
            grads = {kernel: jax.jit(jax.grad(lambda q, k, v, f=run(kernel): (
                f(q, k, v).astype(jnp.float32) * weights).sum(), argnums=(0, 1, 2)))(q, k, v)
                for kernel in ("xla", "cudnn")}
            scale = max(float(jnp.abs(g.astype(jnp.float32)).max()) for g in grads["xla"]) or 1.0
            grad_error = max(float(jnp.abs((a - b).astype(jnp.float32)).max())
                             for a, b in zip(grads["cudnn"], grads["xla"])) / scale
            result["grad_relative_diff"] = grad_error
            checks[f"{name}_gradients"] = grad_error < 5e-2
        cases[name] = result
    ran(list(cases.values()))
    return {"implementation": implementation, "cases": cases, "checks": checks}


def big_model(check: Check):
    """The 7B model (ViT + LLaMA) with random bf16 weights made on the device, once, shared by the 7B parts."""
    if "big" not in check.shared:
        import flax.linen as nn
        import jax
        import jax.numpy as jnp

        from cxrllava_jax.models.configs import Runtime
        from cxrllava_jax.models.cxr_llava import CXRLLaVAModel

        config = big_config(check.sizes)
        runtime = Runtime(dtype="bfloat16", param_dtype="bfloat16")
        size = config.vision.image_size
        model = CXRLLaVAModel(config, runtime)
        init = jax.jit(lambda rng: model.init(rng, jnp.zeros((1, size, size, 1)), jnp.full(
            (1, config.num_image_tokens + 1), config.image_token_id, jnp.int32))["params"])
        check.shared["big"] = (config, runtime, nn.meta.unbox(init(jax.random.key(0))))
    return check.shared["big"]


def part_decode(check: Check) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    from cxrllava_jax.inference import loading
    from cxrllava_jax.models.configs import Runtime
    from cxrllava_jax.models.llama import Llama, init_cache

    config, _, params = big_model(check)
    llama = config.llama
    sizes = check.sizes
    model = Llama(llama, Runtime(dtype="bfloat16", param_dtype="bfloat16"))
    weights = {"bf16": (model, params["llm"])}
    runs = []
    for kind in ("bf16", "int8"):
        for batch in sizes.decode_batches:
            if not check.within_part(5):
                runs.append({"weights": kind, "batch": batch, "skipped": "the part's budget is spent"})
                continue
            if kind not in weights:  # int8 from the bf16 weights, leaf by leaf, as loading quantizes
                flat = traverse_util.flatten_dict(params["llm"], sep="/")
                weights[kind] = loading.place_params(flat.items(), model, (jnp.zeros((1, 8), jnp.int32),),
                                                     quantize="int8")
            run_model, run_params = weights[kind]
            slots = sizes.decode_context + sizes.decode_tokens
            cache = init_cache(llama, batch, slots, jnp.bfloat16, per_layer=True)

            @jax.jit
            def decode(params, cache, tokens, run_model=run_model, batch=batch):
                def one(i, carry):
                    cache, tokens = carry
                    slot = sizes.decode_context + i
                    mask = jnp.broadcast_to(jnp.arange(slots) <= slot, (batch, 1, 1, slots))
                    positions = jnp.full((batch, 1), slot)
                    logits, aux = run_model.apply({"params": params}, tokens, positions, mask, cache, slot,
                                                  method="step")
                    return aux["cache"], jnp.argmax(logits, -1).astype(jnp.int32)[:, None]

                return jax.lax.fori_loop(0, sizes.decode_tokens, one, (cache, tokens))

            tokens = jnp.ones((batch, 1), jnp.int32)
            start = time.perf_counter()
            jax.block_until_ready(decode(run_params, cache, tokens))
            compile_s = time.perf_counter() - start
            seconds = timed(decode, run_params, cache, tokens, repeats=2)
            per_token = seconds / sizes.decode_tokens
            weight_bytes = param_bytes(nn.meta.unbox(run_params)) - llama.vocab_size * llama.hidden_size * 2 * (
                not llama.tie_word_embeddings)  # the embedding table: one row read a token
            # every slot
            kv_bytes = 2 * llama.num_layers * batch * llama.num_kv_heads * slots * llama.resolved_head_dim * 2
            bandwidth = check.shared.get("copy_bytes_per_s")
            runs.append({"weights": kind, "batch": batch, "ms_per_token": round(per_token * 1e3, 3),
                         "tokens_per_s": round(batch / per_token, 1), "first_call_s": round(compile_s, 2),
                         "weight_bytes": weight_bytes, "kv_bytes_per_step": kv_bytes,
                         "hbm_roofline_fraction": None if bandwidth is None else
                         round((weight_bytes + kv_bytes) / bandwidth / per_token, 3)})
    return {"layers": llama.num_layers, "context_slots": sizes.decode_context + sizes.decode_tokens, "runs": ran(runs)}


def big_api(check: Check):
    from cxrllava_jax.domain.tokenizer import load_tokenizer
    from cxrllava_jax.inference.api import CXRLLaVA

    if "api" not in check.shared:
        config, runtime, params = big_model(check)
        check.shared["api"] = CXRLLaVA(config, params, load_tokenizer(LLAMA2_TOKENIZER), runtime, origin="random")
    return check.shared["api"]


def part_report(check: Check) -> dict:
    from cxrllava_jax.domain import prompting

    api = big_api(check)
    sizes = check.sizes
    image = radiograph(512, seed=0)
    runs = []
    for batch in sizes.report_batches:
        for sampling in ({"temperature": 0.0}, {"temperature": 0.2, "top_p": 0.8}):
            if not check.within_part(2):
                runs.append({"batch": batch, **sampling, "skipped": "the part's budget is spent"})
                continue
            options = dict(max_new_tokens=sizes.report_tokens, **sampling)
            start = time.perf_counter()
            api.write_radiologic_reports([image] * batch, **options)
            first = time.perf_counter() - start
            start = time.perf_counter()
            answers = api.write_radiologic_reports([image] * batch, **options)
            warm = time.perf_counter() - start
            prompt = len(api.encode([{"role": "user", "content": prompting.REPORT_PROMPT}]))
            out = [len(api.tokenizer.encode(a, add_special_tokens=False)) for a in answers]
            runs.append({"batch": batch, **sampling, "seconds": round(warm, 3), "first_call_s": round(first, 2),
                         "prompt_tokens": prompt, "max_new_tokens": sizes.report_tokens,
                         "reencoded_tokens_out_min": min(out), "reencoded_tokens_out_max": max(out)})
    return {"image": 512, "runs": ran(runs), "peak_bytes_in_use": peak_memory()}


def part_serving(check: Check) -> dict:
    import asyncio
    import base64
    import io
    import socket
    import threading

    import aiohttp
    import uvicorn
    from PIL import Image

    from cxrllava_jax.serving.app import create_app

    api = big_api(check)
    png = io.BytesIO()
    Image.fromarray(radiograph(512, seed=1)).save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    body = json.dumps({"model": "device-check", "temperature": 0, "max_tokens": check.sizes.serving_tokens,
                       "messages": [{"role": "user", "content": [{"type": "text", "text": "Write the report."},
                                                                 {"type": "image_url", "image_url": {"url": url}}]}]})
    listener = socket.create_server(("127.0.0.1", 0))
    app = create_app(api, "device-check", max_batch_size=check.sizes.serving_batch)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base = "http://127.0.0.1:%d" % listener.getsockname()[1]
    address = f"{base}/v1/chat/completions"

    async def programs() -> int:
        async with aiohttp.ClientSession() as session, session.get(f"{base}/health") as reply:
            health = await reply.json()
        return health.get("programs_compiled", 0) + health.get("programs_loaded", 0)

    async def level(clients: int, requests: int) -> tuple[float, int]:
        statuses, pending = [], iter(range(requests))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
            async def client():
                for _ in pending:
                    async with session.post(address, data=body, headers={"Content-Type": "application/json"}) as r:
                        await r.read()
                        statuses.append(r.status)

            start = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(clients)))
            return time.perf_counter() - start, sum(s != 200 for s in statuses)

    levels = []
    try:
        for clients, requests in check.sizes.serving_levels:
            if not check.within_part(2):
                levels.append({"clients": clients, "skipped": "the part's budget is spent"})
                continue
            for _ in range(3):  # warm-up passes, until one compiles no new batch shape's program
                before = asyncio.run(programs())
                asyncio.run(level(clients, requests))
                if asyncio.run(programs()) == before:
                    break
            seconds, failed = asyncio.run(level(clients, requests))
            levels.append({"clients": clients, "requests": requests, "seconds": round(seconds, 3),
                           "requests_per_s": round(requests / seconds, 3), "failed": failed})
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    rates = {lv["clients"]: lv.get("requests_per_s") for lv in ran(levels)}
    speedup = rates[16] / rates[1] if rates.get(1) and rates.get(16) else None
    return {"max_tokens": check.sizes.serving_tokens, "levels": levels,
            "speedup_16_vs_1": None if speedup is None else round(speedup, 2), "peak_bytes_in_use": peak_memory(),
            "checks": {"no_failed_request": all(lv.get("failed", 0) == 0 for lv in levels)}}


def part_train(check: Check) -> dict:
    import gc

    import jax

    from cxrllava_jax import sharding

    check.shared.pop("api", None)  # the 7B inference weights make room for training
    check.shared.pop("big", None)
    gc.collect()
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    memory = stats["bytes_limit"] - stats.get("bytes_in_use", 0) if "bytes_limit" in stats else None  # free now
    peak = peak_tflops(device.device_kind)
    peak_flops = peak * 1e12 if peak else check.shared.get("matmul_flops_per_s")
    mesh = sharding.make_mesh(data=1, fsdp=1, tensor=1, devices=[device])
    runs = []
    for stage, overrides in (("2b", check.sizes.train_2b), ("1a", check.sizes.train_1a)):
        layers = None
        if stage == "2b":  # LLaMA-2-7B layers (202M parameters; fp32 master, Adam, gradient: 16 bytes) that fit
            layers = 1 if memory is None else max(1, min(32, int((0.45 * memory - 5e9) // 3.3e9)))
            overrides = {**overrides, "model.llama_overrides": {**overrides.get("model.llama_overrides", {}),
                                                                "num_layers": layers}}
        while True:
            if not check.within_part(5):
                runs.append({"stage": stage, "skipped": "the part's budget is spent"})
                break
            try:
                runs.append(train_throughput(stage, {**overrides, "runtime.scan": False}, mesh, peak_flops))
                runs[-1]["layers"] = layers
                break
            except Exception as error:  # a step that does not fit: half the layers, while there are some
                if "RESOURCE_EXHAUSTED" not in str(error) or not layers or layers == 1:
                    raise
                layers //= 2
                overrides["model.llama_overrides"]["num_layers"] = layers
    return {"mfu_basis": "vendor bf16 peak" if peak else "measured matmul rate", "runs": ran(runs)}


def train_throughput(stage: str, overrides: dict, mesh, peak_flops) -> dict:
    """Tokens (2B) or images (1A) per second of the loop's jitted step, and MFU from its compiled FLOP count
    (layers unrolled: a scanned body would be counted once)."""
    import jax

    from cxrllava_jax import sharding
    from cxrllava_jax.training.tasks import make_task

    cfg = stage_config(stage, overrides)
    task = make_task(cfg)
    state, step = train_state(task, cfg, mesh, jax.random.key(0))
    batch = synthetic_batch(task, cfg.data.batch_size, seed=2)
    rng = jax.random.key(1)
    with sharding.activate(mesh):
        start = time.perf_counter()
        compiled = step.lower(state, batch, rng).compile()
        compile_s = time.perf_counter() - start
        costs = compiled.cost_analysis()
        flops = (costs[0] if isinstance(costs, list) else costs or {}).get("flops")
        state, _, loss = compiled(state, batch, rng)
        jax.block_until_ready(loss)
        steps, start = 3, time.perf_counter()
        for _ in range(steps):
            state, _, loss = compiled(state, batch, rng)
        jax.block_until_ready(loss)
        seconds = (time.perf_counter() - start) / steps
    units = cfg.data.batch_size * (cfg.data.seq_length if stage == "2b" else 1)
    return {"stage": stage, "batch": cfg.data.batch_size, "seq_length": cfg.data.seq_length if stage == "2b" else None,
            "step_s": round(seconds, 4),
            ("tokens_per_s" if stage == "2b" else "images_per_s"): round(units / seconds, 1),
            "compile_s": round(compile_s, 1), "tflop_per_step": None if flops is None else round(flops / 1e12, 3),
            "mfu": None if not (flops and peak_flops) else round(flops / seconds / peak_flops, 4),
            "loss_finite": bool(jax.numpy.isfinite(loss))}


# ---------------------------------------------------------------- the run

def start_cpu_reference(dry_run: bool) -> tuple[subprocess.Popen, str, typing.IO]:
    path = tempfile.mktemp(suffix=".npz", prefix="device-check-cpu-")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    command = [sys.executable, __file__, "--cpu-reference", path] + (["--dry-run"] if dry_run else [])
    # Its stderr goes to a file, not a pipe: the parent reads it only after the child ends, and a child that wrote
    # more than a pipe holds (64 KiB: compile logs, warnings) would wait on it until the part's time ran out.
    log = tempfile.TemporaryFile("w+")
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True), path, log


def write_cpu_reference(path: str, sizes: Sizes):
    import numpy as np

    values = reference_values(sizes)
    np.savez(path, greedy=np.array(values["greedy"]), bf16_logits=values["bf16_logits"],
             train_losses=np.array(values["train_losses"]))


def summary_rows(parts: dict) -> list[str]:
    rows = []
    for name in PARTS:
        part = parts.get(name, {"status": "not run"})
        r = part.get("results", {})
        if name == "device" and r:
            figure = f"{r['device_kind']}: copy {r['copy_gb_per_s']} GB/s, matmul {r['matmul_tflops']} TFLOP/s"
        elif name == "parity" and r:
            figure = (f"greedy equal {r['greedy_equal']}, bf16 logits {r['bf16_logits_relative_error']:.1e}, "
                      f"train loss {r['train_loss_relative_error']:.1e}")
        elif name == "decode" and r:
            figure = "; ".join(f"{x['weights']} b{x['batch']} {x['ms_per_token']} ms/tok "
                               f"({x['hbm_roofline_fraction']} of roofline)" for x in r["runs"] if "ms_per_token" in x)
        elif name == "report" and r:
            figure = "; ".join(f"b{x['batch']} {'greedy' if not x['temperature'] else 'top-p'} {x['seconds']} s"
                               for x in r["runs"] if "seconds" in x)
        elif name == "serving" and r:
            figure = "; ".join(f"{x['clients']} clients {x['requests_per_s']} req/s" for x in r["levels"]
                               if "requests_per_s" in x) + f" (x{r['speedup_16_vs_1']})"
        elif name == "train" and r:
            figure = "; ".join(f"{x['stage']}: {x.get('tokens_per_s') or x.get('images_per_s')}/s MFU {x['mfu']}"
                               for x in r["runs"] if "step_s" in x)
        elif name == "kernels" and r:
            figure = ", ".join(f"{k} {v.get('max_abs_diff', '-'):.1e}" if "max_abs_diff" in v else f"{k} skipped"
                               for k, v in r["cases"].items())
        else:
            figure = part.get("reason") or part.get("error", "")[:100]
        rows.append(f"{name:<8} {part['status']:<8} {part.get('seconds', 0):>7.1f} s  {figure}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="every part at tiny sizes on CPU")
    parser.add_argument("--out", type=pathlib.Path, help="the JSON (default: benchmarks/results/device_<gpu>.json)")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default: 480; dry run 900)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--cpu-reference", help=argparse.SUPPRESS)  # the child computing the CPU side of parity
    args = parser.parse_args(argv)
    sizes = DRY if args.dry_run else DEVICE
    if args.dry_run or args.cpu_reference:
        os.environ["JAX_PLATFORMS"] = "cpu"
    flags = os.environ.get("XLA_FLAGS", "")
    if args.dry_run and "xla_backend_optimization_level" not in flags:  # tiny programs: optimising costs more
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
    if args.dry_run and not args.cpu_reference:
        # The CPU reference child compiles the programs this process compiled for the parity part: it loads them
        # from a compilation cache of this run's own instead (JAX reads these variables when it is imported).
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="device-check-xla-"))
        os.environ.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    else:
        from cxrllava_jax import accelerator

        accelerator.share_memory(1)  # one process on the card: all its usable memory, unless the user said
    if args.cpu_reference:
        write_cpu_reference(args.cpu_reference, sizes)
        return 0
    import jax  # noqa: F401  (imported before the clock starts: the first part does not pay for it)

    check = Check(sizes, args.dry_run, args.budget or sizes.budget_s)
    name = "dry-run" if args.dry_run else device_name()
    out = args.out or ROOT / "benchmarks" / "results" / f"device_{name}.json"
    if "parity" in args.parts and not args.dry_run:  # on the CPU beside the device's parts from the start
        check.shared["cpu_reference"] = start_cpu_reference(args.dry_run)
    functions = {"device": part_device, "parity": part_parity, "kernels": part_kernels, "decode": part_decode,
                 "report": part_report, "serving": part_serving, "train": part_train}
    try:
        for part in args.parts:
            check.run(part, functions[part])
            print(f"device-check: {part}: {check.parts[part]['status']} ({check.parts[part]['seconds']} s)",
                  flush=True)
            result = write_result(check, name, out)  # after every part: a run stopped from outside keeps its figures
    finally:
        if "cpu_reference" in check.shared and check.shared["cpu_reference"][0].poll() is None:
            check.shared["cpu_reference"][0].kill()
    print("\n".join(["", f"device check ({result['mode']}, {name}), {result['wall_s']} s of {check.budget_s:.0f}:"]
                    + summary_rows(check.parts) + [f"wrote {out}"]))
    return 1 if any(p["status"] == "failed" for p in check.parts.values()) else 0


def write_result(check: Check, name: str, out: pathlib.Path) -> dict:
    import jax

    result = {"schema": SCHEMA, "mode": "dry-run" if check.dry_run else "device", "device": name,
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "jax": jax.__version__,
              "budget_s": check.budget_s, "wall_s": round(time.monotonic() - check.start, 1),
              "load_average": os.getloadavg(), "parts": check.parts}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main())
