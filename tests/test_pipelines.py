"""The Grain pipelines: epochs and shuffling, exact resume (in memory, through a checkpoint on disk and with
worker processes), sharding over processes, bad-record skipping and its limit, and each stage's batches."""

import functools
import logging

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cxrllava_jax.training import data as stage_data
from cxrllava_jax.training.checkpoints import RunCheckpoints
from cxrllava_jax.domain import images
from input_pipeline import mimic, pipelines, synthetic

SIZE = 32
BATCH = 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(root, examples): 40 synthetic studies; an example is (index, image path)."""
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.write_dataset(root, 40, SIZE, seed=3)
    return root, [(i, r.image) for i, r in enumerate(mimic.load(root))]


def encode(example):
    index, path = example
    return {"image": images.preprocess(path, SIZE, 0.5, 0.5), "index": np.int32(index)}


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def with_bad_files(examples, tmp_path, bad_indices):
    """A copy of `examples` whose listed entries point at corrupt image files."""
    out = list(examples)
    for i in bad_indices:
        path = tmp_path / f"corrupt-{i}.jpg"
        path.write_bytes(b"\xff\xd8 this is not a JPEG")
        out[i] = (i, str(path))
    return out


def test_epochs_cover_every_example_and_reshuffle(dataset):
    _, examples = dataset
    pipeline = pipelines.batches(examples, encode, BATCH, seed=0, repeat=True)
    stream = np.concatenate([b["index"] for b in take(iter(pipeline), 10)])
    first, second = stream[:40], stream[40:]
    assert sorted(first) == list(range(40)) and sorted(second) == list(range(40))
    assert not np.array_equal(first, second) and not np.array_equal(first, np.arange(40))
    again = np.concatenate([b["index"] for b in take(iter(pipelines.batches(examples, encode, BATCH, seed=0,
                                                                            repeat=True)), 10)])
    np.testing.assert_array_equal(stream, again)
    batch = next(iter(pipeline))
    assert batch["image"].shape == (BATCH, SIZE, SIZE, 1) and batch["image"].dtype == np.float32


def test_restored_state_continues_exactly(dataset):
    _, examples = dataset
    pipeline = pipelines.batches(examples, encode, BATCH, seed=1, repeat=True)
    iterator = iter(pipeline)
    take(iterator, 7)  # into the second epoch
    state = iterator.get_state()
    expected = take(iterator, 6)
    resumed = iter(pipeline)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 6), expected)


def test_restored_from_a_run_checkpoint_on_disk(dataset, tmp_path):
    _, examples = dataset
    pipeline = pipelines.batches(examples, encode, BATCH, seed=2, repeat=True)
    iterator = iter(pipeline)
    take(iterator, 3)
    cfg = ml_collections.ConfigDict(dict(keep=1, best_metric="", best_mode="min", async_save=False))
    checkpoints = RunCheckpoints(tmp_path / "checkpoints", cfg)
    state = {"w": jnp.arange(3.0)}
    checkpoints.save(3, state, iterator)
    checkpoints.wait()
    expected = take(iterator, 4)
    resumed = iter(pipeline)
    restored = checkpoints.restore(3, state, resumed)
    checkpoints.close()
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert_same_batches(take(resumed, 4), expected)


def test_worker_processes_give_the_same_batches_and_resume(dataset):
    _, examples = dataset

    def encode_in_worker(example):  # nested, so cloudpickle ships it by value: workers skip importing this module
        return {"image": images.preprocess(example[1], SIZE, 0.5, 0.5), "index": np.int32(example[0])}

    reference = take(iter(pipelines.batches(examples, encode_in_worker, BATCH, seed=4, repeat=True)), 9)
    pipeline = pipelines.batches(examples, encode_in_worker, BATCH, seed=4, repeat=True, num_workers=2)
    iterator = iter(pipeline)
    assert_same_batches(take(iterator, 4), reference[:4])
    state = iterator.get_state()
    assert_same_batches(take(iterator, 5), reference[4:])
    iterator.close()
    resumed = iter(pipeline)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 5), reference[4:])
    resumed.close()


@pytest.mark.parametrize("max_bad_fraction", [0.0, 0.2])
def test_two_processes_split_each_global_batch(dataset, tmp_path, max_bad_fraction):
    _, examples = dataset
    examples = with_bad_files(examples, tmp_path, [5, 17]) if max_bad_fraction else examples
    shard = functools.partial(pipelines.batches, examples, encode, BATCH, seed=5, repeat=True,
                              max_bad_fraction=max_bad_fraction)
    single = take(iter(shard()), 8)
    halves = [take(iter(shard(process_index=p, process_count=2)), 8) for p in (0, 1)]
    for whole, first, second in zip(single, *halves):
        assert first["image"].shape[0] == second["image"].shape[0] == BATCH // 2
        if not max_bad_fraction:  # (a substitute may repeat an index)
            assert not set(first["index"]) & set(second["index"])
        for k in whole:
            np.testing.assert_array_equal(np.concatenate([first[k], second[k]]), whole[k])
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        shard(process_index=0, process_count=3)


def test_a_bad_record_names_its_file_by_default(dataset, tmp_path):
    _, examples = dataset
    examples = with_bad_files(examples, tmp_path, [11])
    with pytest.raises(images.InputError, match="corrupt-11.jpg: cannot decode image"):
        take(iter(pipelines.batches(examples, encode, BATCH)), 5)


def test_bad_records_are_replaced_counted_and_resumed(dataset, tmp_path, caplog):
    _, examples = dataset
    examples = with_bad_files(examples, tmp_path, [3, 22])
    pipeline = pipelines.batches(examples, encode, BATCH, seed=6, repeat=True, max_bad_fraction=0.1)
    iterator = iter(pipeline)
    with caplog.at_level(logging.WARNING):
        epoch = take(iterator, 5)
    assert iterator.bad_records == 2 and iterator.records_read == 42
    assert "corrupt-3.jpg" in caplog.text and "corrupt-22.jpg" in caplog.text
    indices = np.concatenate([b["index"] for b in epoch])
    assert 3 not in indices and 22 not in indices and len(indices) == 40  # shapes stay static
    assert all(b["image"].shape == (BATCH, SIZE, SIZE, 1) for b in epoch)
    state = iterator.get_state()
    expected = take(iterator, 5)
    assert iterator.bad_records == 4  # the second epoch meets them again
    resumed = iter(pipeline)
    resumed.set_state(state)
    assert resumed.bad_records == 2
    assert_same_batches(take(resumed, 5), expected)
    assert resumed.bad_records == 4


def test_too_many_bad_records_stop_the_pipeline(dataset, tmp_path):
    _, examples = dataset
    examples = with_bad_files(examples, tmp_path, range(0, 40, 5))  # 8 of 40 = 20 %
    pipeline = pipelines.batches(examples, encode, BATCH, seed=7, repeat=True, max_bad_fraction=0.1)
    with pytest.raises(pipelines.TooManyBadRecords, match=r"max_bad_fraction=0.1 .*corrupt-\d+.jpg"):
        take(iter(pipeline), 10)
    tolerant = iter(pipelines.batches(examples, encode, BATCH, seed=7, repeat=True, max_bad_fraction=0.25))
    take(tolerant, 10)
    assert 16 <= tolerant.bad_records  # two epochs, each meets all 8 (and maybe bad substitutes)


# ---------------------------------------------------------------- each stage through make_stage_data

@pytest.fixture(scope="module")
def demo_data(dataset, tmp_path_factory):
    """The demo stage configs pointed at the test's synthetic data, with a small LLaMA-style tokenizer."""
    from cxrllava_jax.domain.tokenizer import train_tokenizer
    from cxrllava_jax.domain import prompting

    root, _ = dataset
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    texts = [r.report for r in mimic.load(root)] + [prompting.REPORT_PROMPT, prompting.DIFFERENTIAL_PROMPT]
    train_tokenizer(texts, vocab_size=400, out_dir=tokenizer_dir)
    return root, tokenizer_dir


def stage_config(stage: str, root, tokenizer_dir):
    """The demo stage's config on the test data, its language model's vocabulary the small tokenizer's size."""
    from configs import demo
    from cxrllava_jax.domain.tokenizer import load_tokenizer

    cfg = demo.get_config(stage)
    cfg.data.update(data_dir=str(root), tokenizer=str(tokenizer_dir), batch_size=8, eval_batch_size=4)
    cfg.model.llama_overrides.vocab_size = len(load_tokenizer(tokenizer_dir))
    return cfg


@pytest.mark.parametrize("stage", ["1a", "1b_reports", "2b"])
def test_each_stage_batches(demo_data, stage, tmp_path):
    from cxrllava_jax.training.tasks import make_task

    root, tokenizer_dir = demo_data
    cfg = stage_config(stage, root, tokenizer_dir)
    data = stage_data.make_stage_data(cfg, make_task(cfg))
    batch = next(data.train)
    image_size = 64
    # uint8 model pixels: the task normalises them on the device
    assert batch["image"].shape == (8, image_size, image_size, 1) and batch["image"].dtype == np.uint8
    if stage == "1a":
        assert batch["label"].dtype == np.int32 and set(np.unique(batch["label"])) <= {0, 1}
    elif stage == "1b_reports":
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (8, cfg.data.text_length)
    else:
        length = batch["tokens"].shape[1]  # the sequence bucket that holds this batch's longest row
        assert batch["tokens"].shape == batch["loss_mask"].shape == batch["valid"].shape == (8, length)
        assert length <= cfg.data.seq_length
        assert batch["loss_mask"].any(axis=1).all()  # every row has answer tokens to learn
    assert data.steps_per_epoch >= 1 and data.train.bad_records == 0
    eval_batches = list(data.eval())
    assert eval_batches and all(b["image"].shape[0] == 4 for b in eval_batches)
    assert_same_batches(list(data.eval()), eval_batches)  # a fresh, identical pass each time


def finetune_config(tmp_path):
    """configs/finetune.py on the tiny release directory and a small LLaVA JSONL of synthetic radiographs."""
    from configs import finetune
    from cxrllava_jax.reference.tiny_models import release_dir
    from tests.test_finetune import write_template_data

    cfg = finetune.get_config()
    cfg.init.release = str(release_dir())
    cfg.data.update(train=str(write_template_data(tmp_path, count=8)), batch_size=4, seq_length=192)
    return cfg


# Every registered task, by a config that selects it; a task registered without one here fails the check below.
TASK_CONFIGS = {"1a": "1a", "1b": "1b_reports", "2a": "2a", "2b": "2b", "finetune": "finetune"}


def test_every_registered_task_is_checked_against_a_real_batch():
    from cxrllava_jax.training.tasks import TASKS

    assert set(TASK_CONFIGS) == set(TASKS)


@pytest.mark.parametrize("stage", sorted(TASK_CONFIGS))
def test_a_real_batch_is_the_tasks_abstract_batch(demo_data, stage, tmp_path):
    """What the pipeline feeds a task's train step has exactly the shapes and dtypes its `abstract_batch` declares,
    which compile-ahead, the memory benchmarks and parameter creation compile against (sequence buckets off: with
    them a batch is cut to a bucket length on the sequence axis)."""
    from cxrllava_jax.training.tasks import make_task

    cfg = finetune_config(tmp_path) if stage == "finetune" else stage_config(TASK_CONFIGS[stage], *demo_data)
    if "seq_buckets" in cfg.data:
        cfg.data.seq_buckets = 0
    task = make_task(cfg)
    assert task.name == stage
    batch = next(stage_data.make_stage_data(cfg, task).train)
    declared = {k: (s.shape, np.dtype(s.dtype)) for k, s in task.abstract_batch(cfg.data.batch_size).items()}
    assert {k: (np.shape(v), np.asarray(v).dtype) for k, v in batch.items()} == declared


def test_a_tokenizer_the_model_cannot_use_is_refused(demo_data):
    """Training refuses a language model whose vocabulary inference would refuse (far larger than the tokenizer)."""
    from cxrllava_jax.training.tasks import make_task

    cfg = stage_config("2b", *demo_data)
    cfg.model.llama_overrides.vocab_size = 4 * cfg.model.llama_overrides.vocab_size
    with pytest.raises(ValueError, match="does not belong to this model"):
        make_task(cfg).encoder()


def test_a_study_batch_is_the_tasks_abstract_batch(tmp_path):
    """LLaVA records with `"image": [..]` lists: a row's images fill its first slots, the rest stay zeros, and the
    batch is still exactly `abstract_batch`."""
    import json

    from cxrllava_jax.errors import ConfigError
    from cxrllava_jax.training.tasks import make_task
    from input_pipeline import conversations

    cfg = finetune_config(tmp_path)
    lines = [json.loads(line) for line in open(cfg.data.train)]
    names = [record["image"] for record in lines]
    for i, record in enumerate(lines):
        record["image"] = [names[i], names[(i + 1) % len(names)]]
        record["conversations"][0]["value"] = "Current study:\nPA view <image>\nlateral view <image>\nDescribe."
    (tmp_path / "studies.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    cfg.data.update(train=str(tmp_path / "studies.jsonl"), max_images=3, seq_buckets=0)
    task = make_task(cfg)
    batch = next(stage_data.make_stage_data(cfg, task).train)
    declared = {k: (s.shape, np.dtype(s.dtype)) for k, s in task.abstract_batch(cfg.data.batch_size).items()}
    assert {k: (np.shape(v), np.asarray(v).dtype) for k, v in batch.items()} == declared
    assert batch["image"][:, :2].reshape(4, 2, -1).max(axis=-1).min() > 0 and not batch["image"][:, 2].any()
    model_config = task.model_config
    assert ((batch["tokens"] == model_config.image_token_id).sum(axis=1) == 2 * model_config.num_image_tokens).all()
    task.max_images = 1  # as configured by config.data.max_images=1: refused before training starts
    with pytest.raises(ConfigError, match="studies.jsonl:1: 2 images in one example, more than config.data.max_images=1"):
        task.examples(conversations.load(cfg.data.train))


def test_the_demo_study_runs_read_the_same_reports_against_three_images_or_one(tmp_path):
    """configs/demo.py's study fine-tunes on `synth --studies` data: `studies` gives a row the current frontal, the
    lateral and the prior (every slot filled), `single` the current frontal alone, and both score the same reports."""
    from configs import demo
    from cxrllava_jax.domain import prompting
    from cxrllava_jax.domain.tokenizer import load_tokenizer, train_tokenizer
    from cxrllava_jax.training.tasks import make_task

    pairs = synthetic.write_studies(demo.study_data_dir(tmp_path), 12, 32, seed=1)
    prompt = prompting.study_prompt(prompting.COMPARISON_QUESTION, ["PA", "LATERAL"], ["PA"], "21791201", "")
    train_tokenizer([p.report for p in pairs] + [p.prior_report for p in pairs] + [prompting.SYSTEM_PROMPT, prompt],
                    400, tmp_path / "tokenizer")
    answers = {}
    for run, (slots, _) in demo.STUDY_RUNS.items():
        cfg = demo.get_config(run, root=str(tmp_path))
        assert cfg.init.checkpoint == str(tmp_path / "2b" / "model")  # from the chain's stage-2B model
        cfg.init.checkpoint = ""
        cfg.data.update(batch_size=4, seq_buckets=0, seq_length=1024)  # this small tokenizer spells words out
        cfg.model.llama_overrides.vocab_size = len(load_tokenizer(tmp_path / "tokenizer"))
        task = make_task(cfg)
        batch = next(stage_data.make_stage_data(cfg, task).train)
        assert batch["image"].shape[:2] == ((4, slots) if slots > 1 else (4, 64))
        assert batch["image"].reshape(4 * slots, -1).max(axis=-1).min() > 0  # no empty slot
        image_places = (batch["tokens"] == task.model_config.image_token_id).sum(axis=1)
        assert (image_places == slots * task.model_config.num_image_tokens).all()
        answers[run] = [tuple(t[m]) for t, m in zip(batch["tokens"], batch["loss_mask"])]
    assert answers["studies"] == answers["single"]
