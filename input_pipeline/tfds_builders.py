"""TFDS builders: a source's records written once as ArrayRecord, read back by Grain without TensorFlow.

One builder class, `CxrRecords`, with one config per source adapter in `ADAPTERS` (an adapter is
`load(root, split=None) -> list[Record]`; adding a source is one line there). The builder's manual_dir is the
dataset as published, which the adapter reads; `download_and_prepare` writes every split the adapter reports
as ArrayRecord shards under `data_dir/cxr_records/<source>/<version>/`.

TensorFlow is not a dependency, and `tfds.features.Image` needs it to encode PNGs. So an example keeps the
image file's own bytes (a scalar `tfds.features.Tensor` of dtype object, stored as is) and Grain decodes them
with PIL or pydicom exactly as it decodes a file on disk: 16-bit PNG and DICOM keep their full range and
windowing until preprocessing, and the stored file is no bigger than the original. The rest are plain
features: labels float32 [14] (NaN = not mentioned), report, dataset, split, view, study id, the instruction
conversations as JSON, and the image's path under manual_dir (the name a decoding error gives).

    build("synthetic", manual_dir="data/synthetic", data_dir="data/tfds")
    source = data_source("synthetic", "data/tfds", "train")  # random access: grain.MapDataset.source(source)
    image = decode_image(source[0], size=512, mean=0.5, std=0.5)
    records("synthetic", "data/tfds", "train")  # Records whose images are read from the ArrayRecord shards

`CxrPixels` is the stage-1 speed version (`cxrllava preprocess`, or `build(..., pixels=(512, "crop"))`): the
preprocessing is deterministic, so each image is stored once as the uint8 [size, size, 1] it always becomes,
and reading an example costs no decoding or resizing (LANCZOS from 2,048 pixels is ~40 ms per image).

Training reads a built source with `config.data.tfds_dir` (see `records`); with `config.data.preprocessed`
the `CxrPixels` version at the model's image size and `config.data.image_mode`.
"""

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from cxrllava_jax import arguments
from cxrllava_jax.domain.findings import CHEXPERT_OBSERVATIONS
from cxrllava_jax.domain import images
from cxrllava_jax.errors import ConfigError, InputError, MismatchError
from input_pipeline.records import Record, relative_name
from input_pipeline.sources import ADAPTERS


def _features(image: dict) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({**image, **RECORD_FEATURES})


RECORD_FEATURES = {
    "image_name": tfds.features.Text(),  # the image's path under manual_dir
    "labels": tfds.features.Tensor(shape=(len(CHEXPERT_OBSERVATIONS),), dtype=np.float32),
    "report": tfds.features.Text(),
    "dataset": tfds.features.Text(),
    "split": tfds.features.Text(),
    "view": tfds.features.Text(),
    "study_id": tfds.features.Text(),
    "conversations": tfds.features.Text(),  # JSON list of conversations, '' when the source has none
}
FEATURES = _features({"image_bytes": tfds.features.Tensor(shape=(), dtype=np.object_)})  # the file, byte for byte


class CxrRecords(tfds.core.GeneratorBasedBuilder):
    """Chest radiographs of one source in the common record schema, with the encoded image files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Records of every split the source's adapter reports, image files as bytes."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name, description=f"the {name} source") for name in ADAPTERS]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the dataset as published (the layout its adapter in input_pipeline/ reads) in manual_dir; "
        "for the synthetic one, `cxrllava synth --out MANUAL_DIR`.")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=__doc__.splitlines()[0], features=FEATURES)

    def _split_generators(self, dl_manager):
        root = Path(dl_manager.manual_dir)
        by_split = {}
        source = getattr(self.builder_config, "source", self.builder_config.name)
        for record in ADAPTERS[source](root):
            if not record.split:
                raise InputError(f"{record.image}: the {source} adapter gives it no split")
            by_split.setdefault(record.split, []).append(record)
        return {split: self._generate_examples(root, records) for split, records in sorted(by_split.items())}

    def _generate_examples(self, root: Path, records):
        for record in records:
            path = Path(record.image)
            if not path.is_file():
                raise InputError(f"{path}: image file not found")
            name = relative_name(path, root)
            yield name, {
                **self._image(path), "image_name": name, "labels": record.labels,
                "report": record.report, "dataset": record.dataset, "split": record.split, "view": record.view,
                "study_id": record.study_id,
                "conversations": json.dumps(record.conversations) if record.conversations else "",
            }


    def _image(self, path: Path) -> dict:
        return {"image_bytes": path.read_bytes()}


@dataclasses.dataclass(eq=False)
class PixelsConfig(tfds.core.BuilderConfig):
    source: str = ""
    size: int = 512
    mode: str = "crop"


def pixels_config(source: str, size: int, mode: str) -> PixelsConfig:
    return PixelsConfig(name=f"{source}_{size}_{mode}", source=source, size=size, mode=mode,
                        description=f"the {source} source at {size}x{size} ({mode})")


class CxrPixels(CxrRecords):
    """The same records, each image stored as its model pixels: the uint8 [size, size, 1] that the release's
    deterministic preprocessing gives (`images.model_pixels`: decode, window, resize, crop or pad). Training
    reads them with no decoding or resizing and normalises on the accelerator. Configs: `pixels_config`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Records of every split, images as uint8 model pixels."}
    BUILDER_CONFIGS = []

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.size
        # Raw bytes: an uint8 Tensor feature without an encoding is written as a list of int64s, ~20 ms to parse.
        pixels = tfds.features.Tensor(shape=(size, size, 1), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES)
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__.splitlines()[0],
                                     features=_features({"pixels": pixels}))

    def _image(self, path: Path) -> dict:
        return {"pixels": images.model_pixels(path, self.builder_config.size, self.builder_config.mode)}


def _builder(source: str, data_dir, pixels: tuple[int, str] | None = None, **kwargs) -> CxrRecords:
    if source not in ADAPTERS:
        raise ConfigError(f"no TFDS builder config for source {source!r}; sources: {sorted(ADAPTERS)}")
    if pixels is None:
        return CxrRecords(data_dir=str(data_dir), config=source, **kwargs)
    return CxrPixels(data_dir=str(data_dir), config=pixels_config(source, *pixels), **kwargs)


def build(source: str, manual_dir, data_dir, pixels: tuple[int, str] | None = None) -> CxrRecords:
    """Writes (once; later calls reuse it) the ArrayRecord version of `source` read from `manual_dir`: the image
    files as they are, or with `pixels=(size, mode)` the images preprocessed to uint8 model pixels."""
    builder = _builder(source, data_dir, pixels, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return builder


def data_source(source: str, data_dir, split: str, pixels: tuple[int, str] | None = None):
    """The built split as a random-access sequence of example dicts (text features come back as bytes)."""
    builder = _builder(source, data_dir, pixels)
    if not builder.is_prepared():
        raise InputError(f"{builder.data_dir}: the {source} records are not built; run tfds_builders.build "
                         "(or `cxrllava preprocess`) first")
    if split not in builder.info.splits:
        raise ConfigError(f"{builder.data_dir}: no split {split!r}; built splits: {sorted(builder.info.splits)}")
    return builder.as_data_source(split=split)


def decode_image(example: dict, size: int, mean: float, std: float, mode: str = "crop") -> np.ndarray:
    """An example's image file bytes -> float32 [size, size, 1], exactly as `images.preprocess` reads the file."""
    name = example["image_name"].decode()
    image = images.decode_grayscale(example["image_bytes"], name)
    try:
        return images.preprocess(image, size, mean, std, mode=mode)
    except InputError as error:  # preprocess calls an in-memory image just 'image'
        raise InputError(f"{name}: {error}") from error


@dataclasses.dataclass(frozen=True)
class StoredImage:
    """An image file kept in a built split, read from the ArrayRecord shards when it is decoded.

    Only names travel with it (it pickles small, into Grain worker processes too); each process opens the
    split once. `images.preprocess` takes it like a path.
    """

    source: str
    data_dir: str
    split: str
    index: int
    name: str

    def read_bytes(self) -> bytes:
        return _open_split(self.source, self.data_dir, self.split)[self.index]["image_bytes"]

    def __str__(self) -> str:
        return self.name


@dataclasses.dataclass(frozen=True)
class StoredPixels:
    """An image kept in a preprocessed split as its model pixels; `images.model_pixels` takes it as is."""

    source: str
    data_dir: str
    split: str
    index: int
    name: str
    size: int
    mode: str

    def model_pixels(self, size: int, mode: str) -> np.ndarray:
        if (size, mode) != (self.size, self.mode):
            raise MismatchError(f"{self.data_dir}: the {self.source} records hold {self.size}x{self.size} ({self.mode}) "
                                f"pixels, but {size}x{size} ({mode}) are asked for; preprocess them at that size")
        return _open_split(self.source, self.data_dir, self.split, (size, mode))[self.index]["pixels"]

    def __str__(self) -> str:
        return self.name


@functools.lru_cache(maxsize=None)
def _open_split(source: str, data_dir: str, split: str, pixels: tuple[int, str] | None = None):
    return data_source(source, data_dir, split, pixels)


def records(source: str, data_dir, split: str, pixels: tuple[int, str] | None = None) -> list[Record]:
    """The split's records, as the source's adapter gives them, with images left in the shards (the files, or
    with `pixels=(size, mode)` the preprocessed model pixels).

    One pass over the split reads the label and text features (ArrayRecord reads whole examples, so this
    streams the images once too); the images are read again only when a batch decodes them.
    """
    split_source = _open_split(source, str(data_dir), split, pixels)
    image = (functools.partial(StoredImage, source, str(data_dir), split) if pixels is None else
             lambda index, name: StoredPixels(source, str(data_dir), split, index, name, *pixels))
    out = []
    for index in range(len(split_source)):
        example = split_source[index]
        text = {k: example[k].decode() for k in ("image_name", "report", "dataset", "split", "view", "study_id",
                                                 "conversations")}
        out.append(Record(
            image=image(index, text["image_name"]),
            labels=np.asarray(example["labels"], np.float32), report=text["report"], dataset=text["dataset"],
            split=text["split"], view=text["view"], study_id=text["study_id"],
            conversations=json.loads(text["conversations"]) if text["conversations"] else None))
    return out


def preprocess_main(argv) -> int:
    """`cxrllava preprocess`: a source's images as uint8 model pixels in ArrayRecord (`CxrPixels`), once."""
    parser = arguments.parser("cxrllava preprocess", preprocess_main.__doc__)
    parser.add_argument("--source", required=True, choices=sorted(ADAPTERS))
    parser.add_argument("--manual_dir", required=True, help="the dataset as published (what the adapter reads)")
    parser.add_argument("--data_dir", required=True, type=arguments.output_dir,
                        help="where the records go (config.data.tfds_dir)")
    parser.add_argument("--size", type=arguments.whole_number(8, 4096), default=512, help="the model's image size")
    parser.add_argument("--mode", default="crop", choices=("crop", "pad"), help="config.data.image_mode")
    args = parser.parse_args(argv)
    try:
        builder = build(args.source, args.manual_dir, args.data_dir, pixels=(args.size, args.mode))
    except InputError as error:
        print(f"cxrllava preprocess: {error}")
        return 1
    splits = {name: info.num_examples for name, info in builder.info.splits.items()}
    print(f"{builder.data_dir}: {splits}")
    return 0
