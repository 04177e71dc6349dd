"""Real radiographs end to end: NIH ChestX-ray14 PNGs and NEMA's compressed CR DICOM files (fixtures/real-cxr,
provenance and licences in its README), preprocessing, the frontal-chest guard and `cxrllava report`."""

import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import generate_frames

from cxrllava_jax import cli
from cxrllava_jax.domain.images import load_grayscale, preprocess
from cxrllava_jax.domain.radiograph_guard import NotFrontalChestError
from cxrllava_jax.errors import InputError
from cxrllava_jax.reference.tiny_models import checkpoint_dir
from tests.dicom_files import write_dicom

REAL = Path(__file__).parent / "fixtures" / "real-cxr"
NIH = sorted((REAL / "nih").glob("*.png"))
CHEST_PA = REAL / "dicom" / "RG1_J2KI.dcm"  # CR chest PA, MONOCHROME1, 15 bits stored, JPEG 2000
EXTREMITY = REAL / "dicom" / "RG3_J2KR.dcm"  # CR of an extremity, JPEG 2000 lossless
MEAN, STD = 0.4978, 0.2487  # one channel, as the release's image_preprocess_cfg
GREEDY = ["--temperature", "0", "--max-new-tokens", "4"]


@pytest.mark.parametrize("size", [512, 224])
@pytest.mark.parametrize("path", NIH, ids=lambda p: p.name)
def test_nih_png_preprocessing_equals_clip_image_processor_with_release_settings(path, size):
    import transformers

    # CXR_LLAVA_HF.py: shortest edge = image size, resample=True (LANCZOS), center crop, 1/255, its mean/std;
    # the grayscale image is fed as [H, W, 1].
    processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=1, do_center_crop=True,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[MEAN], image_std=[STD],
        do_convert_rgb=False)
    pixels = np.asarray(Image.open(path).convert("L"))[..., None]
    expected = processor(pixels, return_tensors="np")["pixel_values"][0, 0]
    np.testing.assert_allclose(preprocess(path, size, MEAN, STD)[..., 0], expected, atol=1e-5, rtol=0)


def independent_decode(path) -> np.ndarray:
    """The JPEG 2000 codestream of the file's one frame, decoded by OpenJPEG directly (not through pydicom)."""
    import openjpeg

    ds = pydicom.dcmread(path)
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    return np.asarray(openjpeg.decode(io.BytesIO(frame)))


@pytest.mark.parametrize("path, bits", [(CHEST_PA, 15), (EXTREMITY, 10)], ids=["chest_15bit", "extremity_10bit"])
def test_compressed_monochrome1_film_is_decoded_windowed_and_inverted(path, bits):
    ds = pydicom.dcmread(path)
    assert (ds.PhotometricInterpretation, ds.BitsStored) == ("MONOCHROME1", bits)
    stored = independent_decode(path).astype(np.float64)
    assert stored.shape == (ds.Rows, ds.Columns) and stored.max() > 255  # really more than 8 bits
    # No modality LUT in the files; DICOM's LINEAR window (PS3.3 C.11.2.1.2.1), then MONOCHROME1 shown inverted.
    assert "RescaleSlope" not in ds and "ModalityLUTSequence" not in ds and "VOILUTFunction" not in ds
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    windowed = np.clip(np.rint(((stored - (center - 0.5)) / (width - 1) + 0.5) * 255), 0, 255).astype(np.uint8)
    assert 0 < windowed.mean() < 255
    np.testing.assert_array_equal(np.asarray(load_grayscale(path, allow_non_frontal=True)), 255 - windowed)


def test_extremity_is_refused_naming_body_part_examined():
    with pytest.raises(NotFrontalChestError, match="BodyPartExamined is 'EXTREMITY'.*--allow-non-frontal"):
        load_grayscale(EXTREMITY)
    assert np.asarray(load_grayscale(EXTREMITY, allow_non_frontal=True)).shape == (1760, 1760)


def lateral_chest_film(path: Path) -> Path:
    """A chest film written as the lateral view of a CR study, from the real PA film's windowed pixels."""
    stored = np.asarray(Image.open(NIH[0]), np.uint16) * 16
    return write_dicom(path, stored, Modality="CR", BodyPartExamined="CHEST", ViewPosition="LL",
                       WindowCenter="2048", WindowWidth="4096")


def test_lateral_view_is_refused_naming_view_position(tmp_path):
    path = lateral_chest_film(tmp_path / "lateral.dcm")
    with pytest.raises(NotFrontalChestError, match="ViewPosition is 'LL'"):
        preprocess(path, 64, MEAN, STD)
    assert preprocess(path, 64, MEAN, STD, allow_non_frontal=True).shape == (64, 64, 1)


@pytest.mark.parametrize("tags, named", [
    (dict(Modality="CT", BodyPartExamined="CHEST"), "Modality is 'CT'"),
    (dict(Modality="DX", BodyPartExamined="ABDOMEN", ViewPosition="AP"), "BodyPartExamined is 'ABDOMEN'"),
])
def test_other_studies_are_refused_by_their_tags(tmp_path, tags, named):
    path = write_dicom(tmp_path / "study.dcm", np.full((32, 32), 100), **tags)
    with pytest.raises(NotFrontalChestError, match=named):
        load_grayscale(path)


def test_files_without_tags_pass_with_size_and_bit_depth_checked(tmp_path):
    write_dicom(tmp_path / "untagged.dcm", np.arange(32 * 32).reshape(32, 32), Modality="")
    assert np.asarray(load_grayscale(tmp_path / "untagged.dcm")).shape == (32, 32)
    Image.fromarray(np.eye(32, dtype=bool)).save(tmp_path / "bilevel.png")
    with pytest.raises(InputError, match="bilevel.png: 1-bit"):
        load_grayscale(tmp_path / "bilevel.png")
    with pytest.raises(InputError, match="smaller than one 16-pixel patch"):
        preprocess(Image.new("L", (8, 300)), 32, MEAN, STD)


@pytest.mark.slow
def test_report_command_on_real_files(model, tmp_path, capsys):
    """Reports for the NIH PNGs and the chest DICOM, as the Python API writes them; the extremity is refused, and
    read with the override."""
    out = tmp_path / "reports.jsonl"
    files = [*NIH, CHEST_PA, EXTREMITY]
    code = cli.main(["report", *map(str, files), "--checkpoint", str(checkpoint_dir()), "--jsonl", str(out),
                     *GREEDY])
    records = {r["image"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert code == 1 and sorted(records) == sorted(map(str, files))
    assert "BodyPartExamined is 'EXTREMITY'" in records[str(EXTREMITY)]["error"]
    # The API given the DICOM file's windowed pixels: the command's reading of the file is checked too.
    expected = [model.write_radiologic_report(image, temperature=0, max_new_tokens=4)
                for image in [*NIH, load_grayscale(CHEST_PA)]]
    assert [records[str(f)]["report"] for f in [*NIH, CHEST_PA]] == expected
    assert "skipped" in capsys.readouterr().err
    assert cli.main(["report", str(EXTREMITY), "--allow-non-frontal", "--checkpoint", str(checkpoint_dir()),
                     *GREEDY]) == 0
