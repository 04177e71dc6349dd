"""What a training workdir remembers, and the checks made before a run touches it.

`config.json` records the run's config, and with it the stage the workdir belongs to: another stage's config
pointed at it is refused before anything is written (it would otherwise overwrite the record and then fail on a
checkpoint of another structure). `summary.json` marks a finished run: running it again leaves its records as
they are. Config values are checked here, when the run starts, so that no work is done for a config that
cannot work.
"""

import fcntl
import json
import math
import os
import re
from pathlib import Path

from cxrllava_jax import files, hub
from cxrllava_jax.errors import ConfigError, MismatchError
from cxrllava_jax.models.attention import KERNELS
from cxrllava_jax.models.configs import DTYPES
from cxrllava_jax.models.layers import NAMED_REMAT_POLICIES, remat_policy_of
from cxrllava_jax.training.tasks import task_key

CONFIG, SUMMARY, LOCK = "config.json", "summary.json", "run.lock"
MODEL_REFERENCES = ("checkpoint", "release", "llama", "bert")  # config.init fields that name a model

# (key, test, what it must be): checked in this order, the first failure named.
_POSITIVE = ("data.batch_size", "data.eval_batch_size", "data.seq_length", "data.text_length", "log_every_steps",
             "eval_every_steps", "checkpoint.every_steps", "checkpoint.keep", "optim.grad_accum_steps")
_NON_NEGATIVE = ("num_train_steps", "optim.warmup_steps", "text_unfreeze_step")


def check_config(cfg):
    """Raises ConfigError naming the first `config.key=value` that cannot work."""
    task_key(cfg)
    for key in _POSITIVE:
        _check(cfg, key, lambda v: isinstance(v, int) and v >= 1, "a whole number >= 1")
    for key in _NON_NEGATIVE:
        _check(cfg, key, lambda v: isinstance(v, int) and v >= 0, "a whole number >= 0")
    _check(cfg, "num_epochs", lambda v: math.isfinite(v) and v > 0, "a number > 0")
    _check(cfg, "optim.learning_rate", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
    _check(cfg, "data.max_bad_fraction", lambda v: 0 <= v < 1, "in [0, 1)")
    _check(cfg, "data.image_mode", lambda v: v in ("crop", "pad"), "'crop' or 'pad'")
    _check(cfg, "checkpoint.best_mode", lambda v: v in ("min", "max"), "'min' or 'max'")
    _check(cfg, "frozen", _regexes, "a tuple of regular expressions over parameter paths (e.g. ('img/.*',))")
    for key in ("runtime.dtype", "runtime.param_dtype"):
        _check(cfg, key, lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}")
    _check(cfg, "runtime.attention", lambda v: v in KERNELS, f"one of {', '.join(KERNELS)}")
    _check(cfg, "runtime.remat_policy", _known_remat_policy, f"'none', 'full', one of {', '.join(NAMED_REMAT_POLICIES)} "
           "or a jax.checkpoint_policies member")


def _regexes(patterns) -> bool:
    try:
        return not isinstance(patterns, str) and all(re.compile(p) for p in patterns)
    except (re.error, TypeError):
        return False


def _known_remat_policy(name) -> bool:
    if name == "none":
        return True
    try:
        remat_policy_of(name)
    except (ConfigError, TypeError):
        return False
    return True


def with_local_models(cfg):
    """A copy of `cfg` whose `config.init.*` model references (directories or Hugging Face Hub ids) are the local
    directories they name, resolved once (downloaded when need be) before any part of the run reads them."""
    resolved = cfg.copy_and_resolve_references()
    for key in MODEL_REFERENCES:
        if key in resolved.get("init", {}) and resolved.init[key]:
            resolved.init[key] = str(hub.resolve(resolved.init[key], what=f"config.init.{key}"))
    return resolved


def _check(cfg, key: str, ok, expected: str):
    value = cfg
    for part in key.split("."):
        if part not in value:
            return  # a field this stage's config does not have
        value = value[part]
    if not ok(value):
        raise ConfigError(f"config.{key}={value!r}: must be {expected}")


def absolute(workdir) -> Path:
    """The workdir as an absolute path, taken once from the current directory: Orbax refuses relative checkpoint
    paths, and a relative one would change meaning if anything changed the directory later."""
    return Path(os.path.abspath(workdir))


def claim(workdir: Path):
    """Refuses a workdir that another run is training in (both would write the same checkpoint steps and records).
    The claim is an exclusive lock held while the returned file is open, so a killed run leaves none behind."""
    handle = open(workdir / LOCK, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise MismatchError(f"{workdir}: another run is training in this workdir; wait for it to end, or give "
                            "another --workdir") from None
    except OSError:  # a filesystem without locks (some network mounts): the run goes on unguarded
        pass
    return handle


def identity(cfg) -> str:
    """What a workdir's checkpoints are: the stage, and for 1B which texts its text tower learns."""
    return f"1b/{cfg.data.text_kind}" if cfg.task == "1b" else cfg.task


def check_stage(workdir: Path, cfg):
    """Refuses a workdir that holds another stage's run (its config.json), before anything is written."""
    recorded = workdir / CONFIG
    if not recorded.is_file():
        return
    previous = files.read_json(recorded)
    previous = previous if isinstance(previous, dict) else {}
    data = previous.get("data", {})
    key = previous.get("task", previous.get("stage"))  # "stage": its name in older workdirs
    theirs = f"1b/{data.get('text_kind')}" if key == "1b" else key
    if theirs != identity(cfg):
        raise MismatchError(f"{workdir} holds a stage {theirs} run ({recorded}); this config is stage "
                            f"{identity(cfg)}: give another --workdir")


def record_config(workdir: Path, cfg):
    files.write_text_atomically(workdir / CONFIG, cfg.to_json_best_effort(indent=2))


def finished_summary(workdir: Path, step: int, total_steps: int) -> dict | None:
    """The summary of a run that has already done its `total_steps`, or None if there is work to do."""
    summary = workdir / SUMMARY
    if step < total_steps or not summary.is_file():
        return None
    return files.read_json(summary)


def record_summary(workdir: Path, summary: dict):
    files.write_text_atomically(workdir / SUMMARY, json.dumps(summary, indent=2))
