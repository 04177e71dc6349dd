"""Image decoding and preprocessing: parity with the release's CLIPImageProcessor, 16-bit PNG and DICOM (modality
LUT, VOI LUT sequence, window centre/width, MONOCHROME1) decoded to independently computed 8-bit images, and
bad files refused with an error that names them."""

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from cxrllava_jax.errors import InputError
from tests.dicom_files import write_dicom
from cxrllava_jax.domain.images import load_grayscale, preprocess

MEAN, STD = 0.4978, 0.2487  # one channel, as the release's image_preprocess_cfg


def radiograph(height, width, seed=0) -> np.ndarray:
    """A smooth gradient with structure and noise, so resampling differences would show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 120 + 80 * np.sin(x / 7.0) * np.cos(y / 5.0) + 40 * (x / width) + rng.normal(0, 12, (height, width))
    return np.clip(base, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("height,width,size", [(53, 37, 32), (67, 101, 48), (23, 41, 32), (512, 331, 224)])
def test_8bit_preprocessing_equals_clip_image_processor(tmp_path, height, width, size):
    import transformers

    pixels = radiograph(height, width)
    path = tmp_path / "cxr.png"
    Image.fromarray(pixels).save(path)
    # The release's processor: CLIPImageProcessor (the PIL implementation the release ran on) with shortest edge,
    # LANCZOS (resample=1), center crop, 1/255 and one channel's mean/std; fed the grayscale image as [H, W, 1].
    processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=1, do_center_crop=True,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[MEAN], image_std=[STD],
        do_convert_rgb=False)
    expected = processor(pixels[..., None], return_tensors="np")["pixel_values"][0]  # [1, S, S]
    ours = preprocess(path, size, MEAN, STD)
    assert ours.shape == (size, size, 1) and ours.dtype == np.float32
    np.testing.assert_allclose(ours[..., 0], expected[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(preprocess(pixels, size, MEAN, STD), ours, atol=0)


def test_letterbox_keeps_the_whole_image_and_pads_black():
    pixels = np.full((40, 80), 255, np.uint8)
    out = preprocess(pixels, 32, MEAN, STD, mode="pad")[..., 0]
    black, white = (0 - MEAN) / STD, (1 - MEAN) / STD
    np.testing.assert_allclose(out[:8], black, atol=1e-6)  # 80x40 -> 32x16, centred: 8 rows above and below
    np.testing.assert_allclose(out[24:], black, atol=1e-6)
    np.testing.assert_allclose(out[9:23], white, atol=1e-6)
    with pytest.raises(ValueError, match="'crop' or 'pad'"):
        preprocess(pixels, 32, MEAN, STD, mode="stretch")


def test_colour_images_become_luma(tmp_path):
    """Colour content is refused unless allowed (tests/test_faults_inputs.py); allowed, it becomes luma."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    got = np.asarray(load_grayscale(tmp_path / "rgb.png", allow_non_frontal=True), np.float64)
    assert np.abs(got - luma).max() <= 1.0
    alpha = rng.integers(0, 256, (20, 30, 1), dtype=np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], -1)).save(tmp_path / "rgba.png")
    got = np.asarray(load_grayscale(tmp_path / "rgba.png", allow_non_frontal=True), np.float64)
    assert np.abs(got - luma * alpha[..., 0] / 255.0).max() <= 1.5  # composited over black
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=95)
    assert load_grayscale(tmp_path / "rgb.jpg", allow_non_frontal=True).mode == "L"


def test_16bit_png_is_stretched_to_the_8bit_range(tmp_path):
    rng = np.random.default_rng(2)
    pixels = rng.integers(300, 4000, (31, 45)).astype(np.uint16)  # 12-bit data in a 16-bit PNG, as PadChest
    Image.fromarray(pixels).save(tmp_path / "16bit.png")
    assert Image.open(tmp_path / "16bit.png").mode.startswith("I")
    low, high = pixels.min(), pixels.max()
    expected = np.rint((pixels.astype(np.float64) - low) / (high - low) * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(load_grayscale(tmp_path / "16bit.png")), expected)


def stored_pixels(seed=3):
    return np.random.default_rng(seed).integers(0, 4096, (24, 36)).astype(np.uint16)


def dicom_linear_window(x, center, width):
    """DICOM PS3.3 C.11.2.1.2.1, written out piecewise, output range [0, 255]."""
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255
    return np.rint(np.where(x <= low, 0, np.where(x > high, 255, y))).astype(np.uint8)


def test_dicom_rescale_and_window(tmp_path):
    stored = stored_pixels()
    path = write_dicom(tmp_path / "window.dcm", stored, RescaleSlope="2", RescaleIntercept="-1024",
                       WindowCenter="2000", WindowWidth="3000")
    expected = dicom_linear_window(stored * 2.0 - 1024, 2000, 3000)
    assert 0 < (expected == 0).sum() and 0 < (expected == 255).sum()  # the window clips both ends
    np.testing.assert_array_equal(np.asarray(load_grayscale(path)), expected)
    # Several windows: the first is the default. No suffix: recognised by the DICM preamble.
    path = write_dicom(tmp_path / "two_windows", stored, WindowCenter=["1500", "40"], WindowWidth=["1000", "400"])
    expected = dicom_linear_window(stored.astype(float), 1500, 1000)
    np.testing.assert_array_equal(np.asarray(load_grayscale(path)), expected)


def test_dicom_monochrome1_with_voi_lut_sequence(tmp_path):
    stored = stored_pixels(4)
    first, entries = 100, 3000
    lut = (np.sqrt(np.arange(entries)) * 70).astype(np.uint16)  # a non-linear VOI LUT, output up to 3834
    item = Dataset()
    item.add_new(0x00283002, "US", [entries, first, 12])  # LUT Descriptor: entries, first mapped value, bits
    item.add_new(0x00283006, "US", lut.tolist())  # LUT Data
    path = write_dicom(tmp_path / "voi.dcm", stored, photometric="MONOCHROME1", RescaleSlope="1",
                       RescaleIntercept="0", VOILUTSequence=Sequence([item]))
    values = lut[np.clip(stored.astype(np.int64) - first, 0, entries - 1)].astype(np.float64)
    normal = np.rint((values - lut.min()) / (lut.max() - lut.min()) * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(load_grayscale(path)), 255 - normal)


def test_dicom_without_voi_is_stretched_and_monochrome1_inverted(tmp_path):
    stored = stored_pixels(5)
    for photometric in ("MONOCHROME1", "MONOCHROME2"):
        path = write_dicom(tmp_path / f"{photometric}.dcm", stored, photometric=photometric, RescaleSlope="0.5",
                           RescaleIntercept="10")
        x = stored * 0.5 + 10
        stretched = np.rint((x - x.min()) / (x.max() - x.min()) * 255).astype(np.uint8)
        expected = 255 - stretched if photometric == "MONOCHROME1" else stretched
        np.testing.assert_array_equal(np.asarray(load_grayscale(path)), expected)
    assert preprocess(path, 16, MEAN, STD).shape == (16, 16, 1)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the broken file before refusing it
def test_bad_files_are_refused_with_their_name(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(radiograph(64, 64)).save(good)
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 10)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage" * 5)
    Image.fromarray(radiograph(8, 12)).save(tmp_path / "tiny.png")
    cases = {"truncated.png": "cannot decode", "corrupt.jpg": "cannot decode", "empty.png": "empty",
             "missing.png": "not found", "broken.dcm": "DICOM file without pixel data", "tiny.png": "12x8 is smaller than one 16"}
    for name, problem in cases.items():
        with pytest.raises(InputError, match=f"{name}.*{problem}"):
            preprocess(tmp_path / name, 32, MEAN, STD)
    assert pydicom.misc.is_dicom(tmp_path / "broken.dcm")


def test_float_and_16_bit_colour_arrays_are_windowed_not_wrapped():
    rng = np.random.default_rng(0)
    colour = rng.random((40, 50, 3))
    luma = colour @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_array_equal(preprocess(colour, 32, 0.5, 0.5), preprocess(luma, 32, 0.5, 0.5))
    wide = (colour * 65535).astype(np.uint16)  # a uint8 cast would wrap these values around
    wide_luma = wide.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_array_equal(preprocess(wide, 32, 0.5, 0.5), preprocess(wide_luma, 32, 0.5, 0.5))
    np.testing.assert_allclose(preprocess(wide, 32, 0.5, 0.5), preprocess(colour, 32, 0.5, 0.5), atol=2 / 255)
