"""TFDS builders without TensorFlow: the synthetic dataset written as ArrayRecord and read back through a Grain
pipeline gives the same images, labels and texts as reading its files directly."""

import functools
import json

import numpy as np
import pytest
from PIL import Image

from cxrllava_jax.domain import images
from input_pipeline import mimic, pipelines, synthetic, tfds_builders
from cxrllava_jax.errors import InputError

SIZE = 32


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    manual = tmp_path_factory.mktemp("manual")
    synthetic.write_dataset(manual, 30, SIZE, seed=11)
    data_dir = tmp_path_factory.mktemp("tfds")
    tfds_builders.build("synthetic", manual, data_dir)
    return manual, data_dir


def encode(example):
    return {"image": tfds_builders.decode_image(example, SIZE, 0.5, 0.5), "labels": example["labels"]}


def test_array_record_files_hold_every_split(built):
    manual, data_dir = built
    folder = data_dir / "cxr_records" / "synthetic" / "1.0.0"
    for split in ("train", "validate", "test"):
        assert list(folder.glob(f"cxr_records-{split}.array_record-*"))
        assert len(tfds_builders.data_source("synthetic", data_dir, split)) == len(mimic.load(manual, split))
    with pytest.raises(ValueError, match="no split 'valid'"):
        tfds_builders.data_source("synthetic", data_dir, "valid")
    with pytest.raises(ValueError, match="the mimic records are not built"):
        tfds_builders.data_source("mimic", data_dir, "train")


def test_grain_reads_back_what_the_files_hold(built):
    manual, data_dir = built
    source = tfds_builders.data_source("synthetic", data_dir, "train")
    direct = {str(r.image).removeprefix(f"{manual}/"): r for r in mimic.load(manual, "train")}
    batches = list(pipelines.batches(source, encode, 4))  # no seed: the source's order, remainder dropped
    assert len(batches) == len(source) // 4
    for k, batch in enumerate(batches):
        for row in range(4):
            example = source[4 * k + row]
            record = direct[example["image_name"].decode()]
            np.testing.assert_array_equal(batch["image"][row], images.preprocess(record.image, SIZE, 0.5, 0.5))
            np.testing.assert_array_equal(batch["labels"][row], record.labels)  # NaN where not mentioned
            assert example["report"].decode() == record.report and example["view"].decode() == record.view
            assert json.loads(example["conversations"].decode()) == record.conversations
            assert example["image_bytes"] == open(record.image, "rb").read()


def test_16_bit_png_decodes_like_the_file(tmp_path):
    path = tmp_path / "sixteen.png"
    pixels = (np.arange(40 * 48, dtype=np.uint16).reshape(40, 48) * 31) % 60000 + 1000
    Image.fromarray(pixels).save(path)
    from_bytes = images.decode_grayscale(path.read_bytes(), "sixteen.png")
    np.testing.assert_array_equal(np.asarray(from_bytes), np.asarray(images.load_grayscale(path)))


def test_bad_image_bytes_are_named_and_can_be_skipped(tmp_path):
    manual = tmp_path / "manual"
    studies = synthetic.write_dataset(manual, 12, SIZE, seed=12)
    broken = next(manual.glob(f"files/**/{studies[0].dicom_id}.jpg"))
    broken.write_bytes(b"not an image at all")
    tfds_builders.build("synthetic", manual, tmp_path / "tfds")
    source = tfds_builders.data_source("synthetic", tmp_path / "tfds", "train")
    name = str(broken.relative_to(manual))
    batches = functools.partial(pipelines.batches, source, encode, 3)
    with pytest.raises(InputError, match=f"{name}: cannot decode image"):
        list(batches())
    iterator = iter(batches(max_bad_fraction=0.2))
    assert len(list(iterator)) == len(source) // 3 and iterator.bad_records == 1


def test_training_reads_the_built_records_as_it_reads_the_files(built):
    """config.data.tfds_dir: the same examples, encoded to the same arrays, as from the published files."""
    from configs import demo
    from cxrllava_jax.training import data as stage_data
    from cxrllava_jax.training import stage_records
    from cxrllava_jax.training.tasks import make_task

    manual, data_dir = built
    configs = {}
    for name, tfds_dir in (("files", ""), ("tfds", str(data_dir))):
        configs[name] = cfg = demo.get_config("1a")
        cfg.data.update(data_dir=str(manual), tfds_dir=tfds_dir, batch_size=4, eval_batch_size=2)
    task = make_task(configs["files"])
    encode = task.encoder()
    from_files = {str(e.image).removeprefix(f"{manual}/"): e
                  for e in task.examples(stage_records.load(configs["files"], "train"))}
    from_tfds = {str(e.image): e for e in task.examples(stage_records.load(configs["tfds"], "train"))}
    assert from_files.keys() == from_tfds.keys()
    for name, example in from_tfds.items():
        assert isinstance(example.image, tfds_builders.StoredImage)
        a, b = encode(from_files[name]), encode(example)
        np.testing.assert_array_equal(a["image"], b["image"], err_msg=name)
        assert a["label"] == b["label"], name
    batch = next(stage_data.make_stage_data(configs["tfds"], task).train)
    assert batch["image"].shape == (4, 64, 64, 1)


def test_preprocessed_pixel_records_equal_decoding_the_files(built, capsys):
    """`cxrllava preprocess` stores each image's uint8 model pixels: the same arrays decoding the file gives,
    and normalised the same float32 input the model sees from the file."""
    manual, data_dir = built
    assert tfds_builders.preprocess_main(["--source", "synthetic", "--manual_dir", str(manual), "--data_dir",
                                          str(data_dir), "--size", str(SIZE)]) == 0
    assert "'train'" in capsys.readouterr().out
    direct = {str(r.image).removeprefix(f"{manual}/"): r for r in mimic.load(manual, "train")}
    stored = tfds_builders.records("synthetic", data_dir, "train", pixels=(SIZE, "crop"))
    assert len(stored) == len(direct)
    for record in stored:
        file = direct[str(record.image)].image
        pixels = images.model_pixels(record.image, SIZE)
        assert pixels.dtype == np.uint8 and pixels.shape == (SIZE, SIZE, 1)
        np.testing.assert_array_equal(pixels, images.model_pixels(file, SIZE))
        np.testing.assert_array_equal(images.normalise(pixels, 0.5, 0.5), images.preprocess(file, SIZE, 0.5, 0.5))
        np.testing.assert_array_equal(record.labels, direct[str(record.image)].labels)
    with pytest.raises(ValueError, match="preprocess them at that size"):
        images.model_pixels(stored[0].image, 2 * SIZE)


def test_normalising_on_the_device_equals_the_host():
    import jax.numpy as jnp

    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    np.testing.assert_allclose(np.asarray(images.normalise(jnp.asarray(pixels), 0.5, 0.25)),
                               images.normalise(pixels, 0.5, 0.25), rtol=0, atol=1e-6)
