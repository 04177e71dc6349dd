"""A tiny synthetic dataset, tokenizer and stage configs shared by the training tests.

Runs are configured with the same `--config.key=value` flags `train.py` takes, so an in-process run and a
`train.py` subprocess of the same test read exactly the same configuration.
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from cxrllava_jax.domain import prompting
from cxrllava_jax.domain.tokenizer import train_tokenizer
from input_pipeline import synthetic

ROOT = Path(__file__).resolve().parents[1]
NUM_STUDIES, IMAGE_SIZE = 120, 32


@functools.lru_cache(maxsize=None)
def dataset(root: str) -> tuple[Path, Path]:
    """(data_dir, tokenizer_dir) under `root`, generated once per test session."""
    data_dir, tokenizer_dir = Path(root) / "data", Path(root) / "tokenizer"
    studies = synthetic.write_dataset(data_dir, NUM_STUDIES, IMAGE_SIZE, seed=3)
    texts = [s.report for s in studies] + [t["content"] for s in studies for c in s.conversations for t in c]
    train_tokenizer(texts + [prompting.SYSTEM_PROMPT], 512, tokenizer_dir)
    return data_dir, tokenizer_dir


def stage_flags(stage: str, data_dir: Path, tokenizer_dir: Path, steps: int, **overrides) -> list[str]:
    """`--config...` flags for a tiny run of a demo stage on the test dataset, from scratch."""
    values = {
        "model.vision": "vit_tiny_32", "model.vision_overrides.image_size": IMAGE_SIZE,
        "model.text": "bert_tiny", "model.llama_overrides.hidden_size": 64,
        "model.llama_overrides.intermediate_size": 128, "model.llama_overrides.vocab_size": 512,
        "data.data_dir": str(data_dir), "data.tokenizer": str(tokenizer_dir), "data.batch_size": 8,
        "data.eval_batch_size": 8, "data.text_length": 16, "data.seq_length": 320,
        "num_train_steps": steps, "log_every_steps": 1, "eval_every_steps": 1000,
        "checkpoint.every_steps": 2, "checkpoint.keep": 2, "checkpoint.async_save": False,
        "init.checkpoint": "", "init.bert": "",
    }
    values.update(overrides)
    return [f"--config=configs/demo.py:{stage}"] + [f"--config.{k}={v}" for k, v in values.items()]


def parse(args: list[str]):
    """The config `train.py` would build from these flags."""
    argv = ["train.py", *args]
    flag_values = flags.FlagValues()
    # Overrides are read from the argv the flag is given (sys.argv by default), as train.py reads them.
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


class TrainProcess(subprocess.Popen):
    """`python train.py` on CPU, its output going to a log file (a pipe nobody reads would fill up and block the
    run). In the repository root with `workdir` as given; or, with `cwd`, as the README's commands run from
    elsewhere: `python /path/to/train.py --config=/path/to/configs/...` with `workdir` relative to `cwd`."""

    def __init__(self, args: list[str], workdir: Path, env: dict | None = None, log_name: str = "train.log",
                 cwd: Path | None = None):
        Path(workdir).mkdir(parents=True, exist_ok=True)
        self.log_path = Path(workdir) / log_name
        full_env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), **(env or {})}
        if cwd is not None:
            args = [a.replace("--config=configs/", f"--config={ROOT}/configs/") for a in args]
            workdir = os.path.relpath(workdir, cwd)
        with open(self.log_path, "a", encoding="utf-8") as log:
            super().__init__([sys.executable, str(ROOT / "train.py"), *args, f"--workdir={workdir}"],
                             cwd=cwd or ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)

    def finish(self, timeout: float = 600) -> str:
        """Waits for the run (killed if it overruns `timeout`); returns its output."""
        try:
            self.wait(timeout)
        finally:
            if self.poll() is None:
                self.kill()
                self.wait()
        return self.log_path.read_text(encoding="utf-8")


def train_losses(workdir: Path) -> list[float]:
    """Per-step training losses from a run's metrics.jsonl (log_every_steps=1)."""
    lines = (json.loads(line) for line in open(Path(workdir) / "metrics.jsonl", encoding="utf-8"))
    return [r["loss"] for r in lines if r["split"] == "train"]
