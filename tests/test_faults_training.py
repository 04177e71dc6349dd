"""Fault cases for training workdirs: config values refused before any work or file, another stage's workdir
refused before anything in it changes, a finished run's records left intact when it is run again, a damaged
checkpoint named in one message, a run that ends in its warm-up warned of, metrics.jsonl without the steps a
resumed run does again, and the tokenizer a stage learned refused in favour of another of the same size."""

import json
import shutil
import sys
import types

import ml_collections
import pytest

from cxrllava_jax.convert.checkpoint import drop_closed_loop_echoes
from cxrllava_jax.errors import ConfigError, InputError, MismatchError
from cxrllava_jax.training import loop
from cxrllava_jax.training.optim import warmup_warning
from cxrllava_jax.training.reporting import Reporter
from cxrllava_jax.training import workdir as run_records
from tests.fault_files import swapped_tokenizer
from tests import training_setup as setup


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return setup.dataset(str(tmp_path_factory.getbasetemp() / "training_data"))


@pytest.mark.parametrize("override, message", [
    ({"data.batch_size": 0}, "config.data.batch_size=0: must be a whole number >= 1"),
    ({"checkpoint.every_steps": 0}, "config.checkpoint.every_steps=0"),
    ({"log_every_steps": -1}, "config.log_every_steps=-1"),
    ({"num_train_steps": -5}, "config.num_train_steps=-5"),
    ({"optim.learning_rate": float("nan")}, "config.optim.learning_rate=nan"),
    ({"data.max_bad_fraction": 1.0}, "config.data.max_bad_fraction=1.0"),
    ({"data.image_mode": "stretch"}, "config.data.image_mode='stretch'"),
])
def test_config_values_are_refused_before_any_work(tmp_path, override, message):
    cfg = setup.parse(setup.stage_flags("1a", tmp_path / "data", tmp_path / "tok", steps=2, **override))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        loop.train_and_evaluate(cfg, tmp_path / "workdir")
    assert not (tmp_path / "workdir").exists()


@pytest.mark.parametrize("recorded, running", [("1a", "2b"), ("1b_labels", "1b_reports")])
def test_another_stages_workdir_is_refused_untouched(tmp_path, recorded, running):
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    run_records.record_config(workdir, setup.parse(setup.stage_flags(recorded, tmp_path, tmp_path, steps=2)))
    before = (workdir / "config.json").read_bytes()
    with pytest.raises(MismatchError, match=f"{workdir} holds a stage .* run"):
        loop.train_and_evaluate(setup.parse(setup.stage_flags(running, tmp_path, tmp_path, steps=2)), workdir)
    assert (workdir / "config.json").read_bytes() == before and sorted(p.name for p in workdir.iterdir()) == [
        "config.json"]


@pytest.mark.slow
def test_rerunning_a_finished_workdir_keeps_its_records(data, tmp_path, capsys):
    flags = setup.stage_flags("1a", *data, steps=2, eval_every_steps=2)
    first = loop.train_and_evaluate(setup.parse(flags), tmp_path)
    assert first["eval"], "the first run evaluated"
    records = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    again = loop.train_and_evaluate(setup.parse(flags + ["--config.log_every_steps=5"]), tmp_path)
    assert again == first and "already done its 2 steps" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == records  # nothing rewritten or added
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["eval"] == first["eval"]

    # Its newest checkpoint damaged, trained further: one message naming the step and the way on.
    manifest = tmp_path / "checkpoints" / "2" / "state" / "manifest.ocdbt"
    manifest.write_bytes(manifest.read_bytes()[:20])
    with pytest.raises(InputError, match=r"checkpoints/2: cannot restore this checkpoint \(.*\); it is damaged.* Move "
                                         r"it out of .*checkpoints to start from the beginning"):
        loop.train_and_evaluate(setup.parse(setup.stage_flags("1a", *data, steps=4, eval_every_steps=2)), tmp_path)


def test_echoes_of_a_failed_orbax_read_are_dropped(monkeypatch):
    """A damaged checkpoint's first failed read closes Orbax's event loop; the reads still in flight each end in an
    unraisable "Event loop is closed" (6 to 140 tracebacks after the real message). Those, and only those, go."""
    shown = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: shown.append(str(unraisable.exc_value)))
    drop_closed_loop_echoes()
    for error in (RuntimeError("Event loop is closed"), RuntimeError("something else")):
        sys.unraisablehook(types.SimpleNamespace(exc_type=type(error), exc_value=error, exc_traceback=None,
                                                 err_msg=None, object=None))
    assert shown == ["something else"]


@pytest.mark.parametrize("warmup, steps, accumulate, warned", [
    (20, 10, 1, "warmup_steps=20 but the run makes only 10 optimizer updates"),
    (20, 20, 1, "its last update made at a learning rate of 1.90e-04, below config.optim.learning_rate=2.00e-04"),
    (20, 21, 1, None), (20, 80, 4, "only 20 optimizer updates (80 steps, config.optim.grad_accum_steps=4)"),
    (0, 5, 1, None),
])
def test_a_run_that_ends_in_its_warmup_is_warned_of(warmup, steps, accumulate, warned):
    cfg = ml_collections.ConfigDict(dict(warmup_steps=warmup, grad_accum_steps=accumulate, learning_rate=2e-4))
    warning = warmup_warning(cfg, steps)
    assert warning is None if warned is None else warned in warning


def test_metrics_of_steps_after_the_restored_checkpoint_are_dropped(tmp_path):
    """A run killed after its checkpoint at step 2 had logged steps 3 and 4 (the last cut off mid-line)."""
    lines = [json.dumps({"step": s, "split": "train", "loss": 1.0 / s}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "spl')
    Reporter(tmp_path, 10, "img", "1a", step=2).close()
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines[:2]) + "\n"


@pytest.mark.slow
def test_next_stage_refuses_a_tokenizer_other_than_the_one_its_model_learned(data, tmp_path, imported_checkpoint):
    """Stage 2B starting from a model saved with one tokenizer, given another of the same size."""
    swapped_tokenizer(imported_checkpoint / "tokenizer", tmp_path / "other_tokenizer")
    cfg = setup.parse(setup.stage_flags("2b", data[0], tmp_path / "other_tokenizer", steps=1,
                                        **{"init.checkpoint": str(imported_checkpoint)}))
    with pytest.raises(MismatchError, match="other_tokenizer: this tokenizer's vocabulary"):
        loop.train_and_evaluate(cfg, tmp_path / "run")
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


def test_a_workdir_another_run_trains_in_is_refused(tmp_path):
    held = run_records.claim(tmp_path)
    with pytest.raises(MismatchError, match="another run is training in this workdir"):
        run_records.claim(tmp_path)
    held.close()  # the run ended (or was killed): the workdir is free again
    run_records.claim(tmp_path).close()
