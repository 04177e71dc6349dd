"""train_and_evaluate end to end at tiny sizes: every stage runs and chains, runs resume exactly after
SIGKILL, a non-finite loss stops the run without losing the last checkpoint, sharded and multi-process
runs give the single-device losses, and every config loads."""

import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cxrllava_jax.convert import checkpoint as model_checkpoint
from cxrllava_jax.errors import ConfigError
from cxrllava_jax.training import loop, stages, steps
from cxrllava_jax.training.checkpoints import RunCheckpoints
from cxrllava_jax.training.tasks import make_task
from tests import training_setup as setup
from tests.sigkill import kill_when

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return setup.dataset(str(tmp_path_factory.getbasetemp() / "training_data"))


def flat_params(model_dir) -> dict:
    _, _, params = model_checkpoint.load_model(model_dir)
    return traverse_util.flatten_dict(params, sep="/")


def test_every_stage_runs_and_hands_its_model_to_the_next(data, tmp_path):
    """1A -> 1B (labels, text tower released mid-run) -> 1B (reports) -> 2A -> 2B, each from the previous model."""
    for stage in stages.NAMES:
        overrides = {"text_unfreeze_step": 2, "checkpoint.best_metric": ""} if stage == "1b_labels" else {}
        previous = stages.get(stage).previous
        if previous:
            overrides["init.checkpoint"] = str(stages.run_dir(tmp_path, previous) / "model")
        cfg = setup.parse(setup.stage_flags(stage, *data, steps=4, eval_every_steps=4, **overrides))
        summary = loop.train_and_evaluate(cfg, stages.run_dir(tmp_path, stage))
        assert summary["steps"] == 4
        assert all(np.isfinite(v) for v in summary["eval"].values()), summary
        assert (tmp_path / stage / "model" / "model_config.json").is_file()
        assert list((tmp_path / stage / "tensorboard").glob("events.out.tfevents.*"))
    assert "auroc" in json.loads((tmp_path / "1a" / "summary.json").read_text())["eval"]
    # The towers named in config.init.towers arrive unchanged; 2B's frozen image encoder leaves unchanged.
    stage2a, stage2b = flat_params(tmp_path / "2a" / "model"), flat_params(tmp_path / "2b" / "model")
    for path in (p for p in stage2a if p.startswith("img/")):
        np.testing.assert_array_equal(stage2a[path], stage2b[path], err_msg=path)
    assert any(not np.array_equal(stage2a[p], stage2b[p]) for p in stage2a if p.startswith("llm/"))
    assert (tmp_path / "2b" / "model" / "tokenizer" / "tokenizer.model").is_file()


def test_resume_after_sigkill_is_bitwise_exact(data, tmp_path):
    """A run killed with SIGKILL right after a checkpoint, resumed, ends where an uninterrupted run ends; its
    metrics.jsonl holds every step once. Both halves run as the README writes them, with a relative --workdir:
    the first from another directory (`python /path/train.py --config=/path/configs/...`), the second from the
    repository root. The log is the run's own lines (no Orbax INFO), warns that the run ends in its warm-up, and
    ends naming the model it wrote."""
    # Killed at step 8 of 16 (checkpoints at 4 and 8 on disk): the 8 steps, checkpoints and export still ahead are
    # the margin that the SIGKILL lands before the run ends.
    args = setup.stage_flags("2b", *data, steps=16, **{"checkpoint.every_steps": 4, "data.shuffle_seed": 7,
                                                        "optim.warmup_steps": 20})
    elsewhere = tmp_path / "elsewhere"
    killed = setup.TrainProcess(args, elsewhere / "killed", log_name="killed.log", cwd=elsewhere)
    kill_when(killed, (elsewhere / "killed" / "checkpoints" / "8" / "commit_success.txt").exists,
              "checkpoint at step 8")
    assert not (elsewhere / "killed" / "model").exists(), "the run finished before it could be killed"

    resumed = setup.TrainProcess(args, elsewhere / "killed", log_name="resumed.log", cwd=setup.ROOT)
    output = resumed.finish()
    assert resumed.returncode == 0, output
    assert "resumed from step" in output
    lines = output.strip().splitlines()
    assert "config.optim.warmup_steps=20 but the run makes only 16 optimizer updates" in lines[0], output
    assert lines[-1].endswith(f"done after 16 steps: {elsewhere / 'killed' / 'model'}"), output
    assert not [line for line in lines if not line.startswith("[stage 2b]")], output  # no library logs
    loop.train_and_evaluate(setup.parse(args), tmp_path / "straight")  # the uninterrupted run, in this process

    a, b = flat_params(elsewhere / "killed" / "model"), flat_params(tmp_path / "straight" / "model")
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=path)
    # Same data order too, and every step recorded once: the killed and resumed run's losses are the uninterrupted
    # run's, the steps between the checkpoint and the kill not twice.
    assert setup.train_losses(elsewhere / "killed") == setup.train_losses(tmp_path / "straight")


def test_resume_and_best_export_across_the_text_tower_release(data, tmp_path, capsys):
    """Checkpoints taken before the text tower is released hold Adam state for fewer parameters: resuming
    from the one at the release step works, and so does exporting the parameters of an earlier (best) step."""
    release = {"text_unfreeze_step": 4, "checkpoint.every_steps": 2, "checkpoint.keep": 3}
    loop.train_and_evaluate(setup.parse(setup.stage_flags("1b_labels", *data, steps=4, **release)), tmp_path)
    summary = loop.train_and_evaluate(setup.parse(setup.stage_flags("1b_labels", *data, steps=6, **release)),
                                      tmp_path)
    assert "resumed from step 4" in capsys.readouterr().out and summary["steps"] == 6
    exported = flat_params(tmp_path / "model")
    checkpoints = RunCheckpoints(tmp_path / "checkpoints", setup.parse(setup.stage_flags("1b_labels", *data, 6))
                                 .checkpoint)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(
        jax.devices()[0])), traverse_util.unflatten_dict(exported, sep="/"))
    before_release = traverse_util.flatten_dict(checkpoints.restore_params(2, abstract), sep="/")
    assert before_release.keys() == exported.keys()
    assert any(not np.array_equal(before_release[k], exported[k]) for k in exported)
    checkpoints.close()


def test_a_run_resumed_before_the_release_ends_where_an_uninterrupted_one_does(data, tmp_path):
    """The release is a schedule inside the optimizer: stopping before it and resuming changes nothing."""
    release = {"text_unfreeze_step": 3, "checkpoint.every_steps": 2, "checkpoint.best_metric": ""}
    for stop_at in (2, 5):  # stopped at step 2 (before the release at 3), then carried on
        loop.train_and_evaluate(setup.parse(setup.stage_flags("1b_labels", *data, steps=stop_at, **release)),
                                tmp_path / "resumed")
    loop.train_and_evaluate(setup.parse(setup.stage_flags("1b_labels", *data, steps=5, **release)), tmp_path / "straight")
    a, b = flat_params(tmp_path / "resumed" / "model"), flat_params(tmp_path / "straight" / "model")
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=path)
    assert setup.train_losses(tmp_path / "resumed") == setup.train_losses(tmp_path / "straight")


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch, capsys):
    real_step = steps.make_train_step

    def poisoned(task, tx, frozen):
        """The loss turns NaN from step 5 on, as a diverging run's would."""
        step_fn = real_step(task, tx, frozen)

        def train_step(state, batch, rng):
            new_state, metrics, loss = step_fn(state, batch, rng)
            return new_state, metrics, jnp.where(state.step >= 4, jnp.nan, loss)

        return train_step

    monkeypatch.setattr(steps, "make_train_step", poisoned)
    cfg = setup.parse(setup.stage_flags("1a", *data, steps=10))
    with pytest.raises(loop.NonFiniteLossError, match=r"became nan by step 5; stopped without saving. The last good checkpoint is step 4"):
        loop.train_and_evaluate(cfg, tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not (checkpoints / "6").exists()
    # A save cut off mid-write leaves only Orbax's temporary directory: it must never be picked up.
    partial = checkpoints / "6.orbax-checkpoint-tmp-1795560000000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "half-written").write_bytes(b"\0" * 100)
    monkeypatch.setattr(steps, "make_train_step", real_step)
    cfg = setup.parse(setup.stage_flags("1a", *data, steps=6))
    summary = loop.train_and_evaluate(cfg, tmp_path / "run")  # resumes from step 4 and finishes
    assert summary["steps"] == 6
    assert "resumed from step 4" in capsys.readouterr().out
    assert not partial.exists()


SHARDED = """
import json, sys
sys.path.insert(0, {root!r})
import jax
from tests import training_setup as setup
from cxrllava_jax.training.loop import train_and_evaluate
assert jax.device_count() == 8, jax.devices()
for name, args in json.loads(sys.argv[1]).items():
    train_and_evaluate(setup.parse(args), name)
"""


def test_sharded_and_remeshed_runs_match_one_device(data, tmp_path):
    """(data=2, fsdp=2, tensor=2) on 8 CPU devices gives the 1-device losses; a 1-device checkpoint resumes there."""
    mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    single = setup.stage_flags("2b", *data, steps=3)
    loop.train_and_evaluate(setup.parse(single), tmp_path / "single")
    longer = setup.stage_flags("2b", *data, steps=5)
    loop.train_and_evaluate(setup.parse(longer), tmp_path / "single_longer")
    # The 8-device process resumes a copy of the 1-device run at step 3 and carries it on to step 5.
    subprocess.run(["cp", "-r", str(tmp_path / "single"), str(tmp_path / "remeshed")], check=True)
    runs = {str(tmp_path / "sharded"): setup.stage_flags("2b", *data, steps=3, **mesh),
            str(tmp_path / "remeshed"): setup.stage_flags("2b", *data, steps=5, **mesh)}
    # Level 0: the 8-device programs are this process's own and run a few steps (LLVM's optimisation costs more).
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"}
    result = subprocess.run([sys.executable, "-c", SHARDED.format(root=str(setup.ROOT)), json.dumps(runs)],
                            cwd=setup.ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    np.testing.assert_allclose(setup.train_losses(tmp_path / "sharded"), setup.train_losses(tmp_path / "single"),
                               rtol=0, atol=1e-5)
    assert "resumed from step 3" in result.stdout
    np.testing.assert_allclose(setup.train_losses(tmp_path / "remeshed")[-2:],
                               setup.train_losses(tmp_path / "single_longer")[-2:], rtol=0, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(data, tmp_path):
    """Two processes on localhost through jax.distributed (gloo collectives) train as one process does; with the
    full-size runtime (scanned layers, rematerialisation) that the tiny configs otherwise leave off."""
    args = setup.stage_flags("1a", *data, steps=3, **{"checkpoint.every_steps": 3, "runtime.scan": True,
                                                        "runtime.remat_policy": "nothing_saveable"})
    loop.train_and_evaluate(setup.parse(args), tmp_path / "one")
    port = _free_port()
    workers = [setup.TrainProcess(args, tmp_path / "two", log_name=f"process{i}.log", env={
        "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "XLA_FLAGS": "--xla_backend_optimization_level=0"})  # their own programs, 3 steps: as the 8-device run's
        for i in range(2)]
    outputs = [w.finish(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n\n".join(outputs)
    np.testing.assert_allclose(setup.train_losses(tmp_path / "two"), setup.train_losses(tmp_path / "one"),
                               rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "two" / "model" / "model_config.json").read_text())["scan"] is True


def test_the_old_stage_key_is_refused_naming_the_new_one():
    cfg = importlib.import_module("configs.stage1a").get_config()
    cfg.stage = "1b"  # what configs said before the key was renamed: not trained as config.task's 1a
    with pytest.raises(ConfigError, match=r"config.stage='1b': the key is now config.task"):
        make_task(cfg)


def test_every_config_loads_and_takes_overrides():
    configs = sorted(Path(setup.ROOT, "configs").glob("*.py"))
    stages = [p for p in configs if p.stem.startswith("stage")]
    assert len(stages) == 5
    for path in stages:
        cfg = setup.parse([f"--config={path}", "--config.optim.learning_rate=0.5", "--config.mesh.fsdp=4"])
        assert cfg.optim.learning_rate == 0.5 and cfg.mesh.fsdp == 4
        assert cfg.task in ("1a", "1b", "2a", "2b")
    for stage in ("1a", "1b_labels", "1b_reports", "2a", "2b"):
        make_task(setup.parse([f"--config=configs/demo.py:{stage}"]))  # the model builds from the config
    for path in (p for p in configs if p.stem.startswith("eval_")):
        assert setup.parse([f"--config={path}"]).answer_kind in ("report", "json_labels")
    paper = {p.stem: setup.parse([f"--config={p}"]) for p in stages}
    assert (paper["stage1a"].optim.name, paper["stage1a"].optim.learning_rate) == ("sgd", 1e-3)
    assert (paper["stage2b"].optim.name, paper["stage2b"].optim.learning_rate) == ("adam", 2e-5)
    assert paper["stage2a"].frozen == ("img/.*", "llm/.*") and paper["stage2b"].frozen == ("img/.*",)
    with pytest.raises(Exception, match="no_such_field"):
        setup.parse(["--config=configs/stage2b.py", "--config.no_such_field=1"])
