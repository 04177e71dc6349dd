"""What a run tells its user: a progress line and TensorBoard event files (no TensorFlow)."""

import json
import time

import jax
from tensorboardX import SummaryWriter

from cxrllava_jax import files

METRICS = "metrics.jsonl"


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class Reporter:
    """Writes scalars to TensorBoard on the first process and prints one progress line per log step.

    A run that starts at `step` (resumed from its checkpoint) first forgets what an earlier attempt recorded after
    that step, so the steps it does again are recorded once: those lines are dropped from metrics.jsonl, and
    TensorBoard is told to purge its events from step + 1 on."""

    def __init__(self, workdir, total_steps: int, unit: str, stage: str, step: int = 0):
        self.total_steps, self.unit, self.stage = total_steps, unit, stage
        self.writer = self.jsonl = None
        if jax.process_index() == 0:
            self.writer = SummaryWriter(str(workdir / "tensorboard"), purge_step=step + 1)
            # The same scalars as JSON lines, for notebooks and scripts that should not parse event files.
            _drop_records_after(workdir / METRICS, step)
            self.jsonl = open(workdir / METRICS, "a", encoding="utf-8")
        self._mark_step, self._mark_time, self._units = None, None, 0

    def start(self, step: int):
        self._mark_step, self._mark_time, self._units = step, time.perf_counter(), 0

    def count(self, units: int):
        self._units += units

    def scalars(self, step: int, values: dict, prefix: str):
        if self.writer:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", float(value), step)
            self.writer.flush()
            record = {"step": step, "split": prefix, **{k: float(v) for k, v in values.items()}}
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def progress(self, step: int, values: dict, learning_rate: float):
        elapsed = time.perf_counter() - self._mark_time
        steps = step - self._mark_step
        rate = self._units / elapsed if elapsed > 0 else 0.0
        eta = (self.total_steps - step) * elapsed / steps if steps else 0.0
        shown = " | ".join(f"{k} {v:.4f}" for k, v in values.items())
        line = (f"[stage {self.stage}] step {step}/{self.total_steps} | {shown} | lr {learning_rate:.2e} | "
                f"{rate:,.0f} {self.unit}/s | ETA {format_duration(eta)}")
        if jax.process_index() == 0:
            print(line, flush=True)
        self.scalars(step, {**values, "learning_rate": learning_rate, f"{self.unit}_per_s": rate}, "train")
        self.start(step)

    def close(self):
        if self.writer:
            self.writer.close()
            self.jsonl.close()


def _drop_records_after(path, step: int):
    """Rewrites (atomically) a metrics.jsonl without its records past `step`; a line cut off by a kill goes too."""
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in files.read_text(path).splitlines():
        try:
            record = json.loads(line)
            recorded_step = record["step"]
        except (ValueError, TypeError, KeyError):
            recorded_step = None
        if isinstance(recorded_step, int) and recorded_step <= step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        files.write_text_atomically(path, "".join(kept))
