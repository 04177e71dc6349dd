"""Step time and throughput of every stage's jitted train step at the demo (tiny) sizes on this machine.

    python benchmarks/bench_training.py   # prints a table, writes benchmarks/results/training.json

Measures the step alone (random data already on device), so it is the model's speed, not the input
pipeline's (benchmarks/bench_input_pipeline.py measures that).
"""

import json
import os
import pathlib
import platform
import time

import jax

from configs import demo
from cxrllava_jax.training.steps import TrainState, init_opt_state, make_train_step
from cxrllava_jax.training.tasks import make_task

STEPS = 20


def measure(stage: str) -> dict:
    cfg = demo.get_config(stage)
    task = make_task(cfg)
    # Random images on the task's dummy batch: step time does not depend on the values.
    batch = task.dummy_batch(cfg.data.batch_size)
    batch["image"] = jax.random.normal(jax.random.key(0), batch["image"].shape)
    params = jax.tree.map(lambda x: getattr(x, "value", x), task.init(jax.random.key(1), batch)["params"],
                          is_leaf=lambda x: hasattr(x, "value"))
    tx, _ = task.optimizer(1000)
    state = TrainState(step=0, params=params, opt_state=init_opt_state(tx, params, task.frozen))
    step = jax.jit(make_train_step(task, tx, task.frozen), donate_argnums=0)
    start = time.perf_counter()
    state, _, loss = step(state, batch, jax.random.key(2))
    loss.block_until_ready()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(STEPS):
        state, _, loss = step(state, batch, jax.random.key(2))
    loss.block_until_ready()
    step_s = (time.perf_counter() - start) / STEPS
    units = task.units(batch)
    return {"stage": stage, "batch_size": cfg.data.batch_size, "compile_s": round(compile_s, 2),
            "step_ms": round(step_s * 1e3, 1), "unit": task.unit, "per_s": round(units / step_s, 1)}


def main():
    rows = [measure(stage) for stage in ("1a", "1b_labels", "2a", "2b")]
    print(f"{'stage':<10} {'batch':>5} {'compile s':>9} {'step ms':>8} {'throughput':>14}")
    for r in rows:
        print(f"{r['stage']:<10} {r['batch_size']:>5} {r['compile_s']:>9} {r['step_ms']:>8} "
              f"{r['per_s']:>10,.0f} {r['unit']}/s")
    out = pathlib.Path(__file__).parent / "results" / "training.json"
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                               "devices": jax.device_count(), "backend": jax.default_backend(),
                               "load_average_1m": os.getloadavg()[0], "stages": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
