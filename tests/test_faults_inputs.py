"""Fuzz and fault cases for the inputs every command reads, in process: malformed and oversized images, DICOM edge
cases, CSV and JSONL edge cases. Each bad input must give an InputError naming the file (and line), never another
exception type, and nothing silently wrong."""

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from cxrllava_jax import cli, files
from cxrllava_jax.domain import gray_levels, image_headers, images, label_files, labeler, prompting
from cxrllava_jax.domain.radiograph_guard import NotFrontalChestError
from cxrllava_jax.errors import InputError
from cxrllava_jax.evaluation import run
from cxrllava_jax.inference.cli import expand_images
from cxrllava_jax.inference.engine import SamplingOptions
from tests.dicom_files import write_dicom
from tests.fault_files import STORED, color_dicom, palette_dicom, png_8bit_gray, png_header_only, textured

# ---------------------------------------------------------------- images: every bad file is the file's InputError

@pytest.mark.parametrize("name, content", [
    ("empty.png", b""),
    ("text.png", b"this is not an image\n"),
    ("random.jpg", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))),
    ("truncated.png", None),
    ("preamble_only.dcm", b"\0" * 128 + b"DICM"),
    ("no_pixel_data.dcm", "no_pixels"),
])
def test_malformed_images_are_input_errors_naming_the_file(tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        Image.fromarray(np.full((64, 64), 7, np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:60])
    elif content == "no_pixels":
        write_dicom(path, STORED)
        from pydicom import dcmread

        ds = dcmread(path)
        del ds.PixelData
        ds.save_as(path, enforce_file_format=True)
    else:
        path.write_bytes(content)
    with pytest.raises(InputError, match=name):
        images.preprocess(path, 32, 0.5, 0.5)


def test_pixel_limit_is_ours_and_explicit(tmp_path):
    """Past our limit and past twice PIL's (where PIL raises DecompressionBombError): both InputErrors naming the
    file, without decoding the pixels."""
    ours = png_header_only(tmp_path / "big.png", 11_000, 10_000)  # 110 MP: PIL would only warn
    with pytest.raises(InputError, match=r"big.png: 110,000,000 pixels is past the 100,000,000-pixel limit"):
        images.load_grayscale(ours)
    bomb = png_header_only(tmp_path / "bomb.png", 20_000, 10_000)  # 200 MP: PIL's DecompressionBombError
    with pytest.raises(InputError, match="bomb.png: more than 100,000,000 pixels"):
        images.load_grayscale(bomb)
    dicom = write_dicom(tmp_path / "big.dcm", STORED, Rows=12_000, Columns=10_000)
    with pytest.raises(InputError, match="big.dcm: 120,000,000 pixels is past"):
        images.load_grayscale(dicom)


def test_byte_limit(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(path)
    monkeypatch.setattr(image_headers, "MAX_IMAGE_BYTES", path.stat().st_size - 1)
    with pytest.raises(InputError, match=r"a.png: \d+ bytes is past the \d+-byte limit"):
        images.load_grayscale(path)


# ---------------------------------------------------------------- the one validation step every decode goes through

def _dicom_with(path, **changes):
    """A valid 32x32 DICOM (tests/dicom_files.py) with elements then changed or deleted (value None)."""
    from pydicom import dcmread

    write_dicom(path, STORED)
    ds = dcmread(path)
    for name, value in changes.items():
        if value is None:
            delattr(ds, name)
        else:
            setattr(ds, name, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def _voi_lut(entries: int, data) -> Sequence:
    item = Dataset()
    item.add_new(0x00283002, "US", [entries, 0, 12])  # LUT Descriptor: entries, first mapped value, bits
    item.add_new(0x00283006, "US", data)  # LUT Data
    return Sequence([item])


def _tiff_pages(path, count: int):
    pages = [Image.fromarray(textured(48, 48, seed)) for seed in range(count)]
    pages[0].save(path, save_all=True, append_images=pages[1:])
    return path


DAMAGED = {  # name -> (how the file is made, what the error must say)
    "half_data.png": (lambda p: png_8bit_gray(p, textured(64, 64), keep_bytes=32 * 65),
                      r"the PNG image data ends early \(2,080 of 4,160 bytes, about 32 of 64 rows\)"),
    "rows_cropped.dcm": (lambda p: _dicom_with(p, Rows=20),
                         r"the pixel data holds 2,048 bytes, but Rows 20 x Columns 32 x 1 sample\(s\) x 16 bits make 1,280"),
    "rows_half.dcm": (lambda p: _dicom_with(p, Rows=16), r"the pixel data holds 2,048 bytes, but Rows 16"),
    "lut_short.dcm": (lambda p: write_dicom(p, STORED, VOILUTSequence=_voi_lut(4096, list(range(100)))),
                      r"the VOI LUT descriptor declares 4096 entries but its data holds 100"),
    "lut_empty.dcm": (lambda p: write_dicom(p, STORED, VOILUTSequence=_voi_lut(4096, [])),
                      r"the VOI LUT descriptor declares 4096 entries but its data holds 0"),
    "lut_constant.dcm": (lambda p: write_dicom(p, STORED, VOILUTSequence=_voi_lut(4, [7, 7, 7, 7])),
                         r"the VOI LUT maps every value to 7"),
    "slope_zero.dcm": (lambda p: write_dicom(p, STORED, RescaleSlope=0, RescaleIntercept=5),
                       r"RescaleSlope is 0, which makes every pixel 5"),
    "constant.dcm": (lambda p: write_dicom(p, np.full((32, 32), 100)), r"every pixel is 100 after the modality LUT"),
    "constant.png": (lambda p: Image.fromarray(np.full((64, 64), 7, np.uint8)).save(p),
                     r"every pixel of the image is 7 \(after windowing\): a constant image"),
    "constant16.png": (lambda p: Image.fromarray(np.full((64, 64), 4000, np.uint16)).save(p),
                       r"every pixel is 4000: a constant image"),
    "window_off.dcm": (lambda p: write_dicom(p, STORED, WindowCenter=60000, WindowWidth=10),
                       r"every pixel of the image is 0 \(after windowing\)"),
    "one_bit.dcm": (lambda p: _dicom_with(p, BitsAllocated=1, BitsStored=1, HighBit=0,
                                          PixelData=np.packbits(STORED > 2000, bitorder="little").tobytes()),
                    r"1-bit image \(2 gray levels\); a radiograph has 8 to 16 bits"),
    "one_bit.png": (lambda p: Image.fromarray(np.eye(32, dtype=bool)).save(p), r"1-bit image"),
    "four_bit.png": (lambda p: Image.fromarray(textured(32, 32) // 16).save(p, bits=4), r"4-bit image \(16 gray"),
    "bits_stored.dcm": (lambda p: _dicom_with(p, BitsStored=20), r"BitsStored 20 is more than BitsAllocated 16"),
    "bits_20.dcm": (lambda p: _dicom_with(p, BitsAllocated=32, BitsStored=20,
                                          PixelData=STORED.astype("<u4").tobytes()), r"BitsStored is 20"),
    "no_rows.dcm": (lambda p: _dicom_with(p, Rows=None), r"DICOM image elements missing"),
    "rows_zero.dcm": (lambda p: _dicom_with(p, Rows=0), r"the header declares an image of 32x0 pixels"),
    "samples_3_mono.dcm": (lambda p: _dicom_with(p, SamplesPerPixel=3), r"SamplesPerPixel 3 with photometric "
                                                                       r"interpretation 'MONOCHROME2'"),
    "declared_big.png": (lambda p: png_header_only(p, 3000, 2000),
                         r"the PNG image data ends early \(3,001 of 6,002,000 bytes, about 1 of 2000 rows\)"),
    "pages.tif": (lambda p: _tiff_pages(p, 3), r"TIFF file of 3 images \(pages or frames\)"),
    "animated.png": (lambda p: Image.fromarray(textured(48, 48)).save(
        p, save_all=True, append_images=[Image.fromarray(textured(48, 48, 1))]), r"PNG file of 2 images"),
    "frames.dcm": (lambda p: write_dicom(p, np.concatenate([STORED, STORED]).reshape(64, 32), NumberOfFrames=2,
                                         Rows=32), r"DICOM file of 2 images"),
    "animated.gif": (lambda p: Image.fromarray(textured(48, 48)).save(p, save_all=True,
                                                                       append_images=[Image.fromarray(textured(48, 48))]),
                     r"GIF image; radiographs are read from PNG, JPEG, TIFF or DICOM"),
    "lossless.webp": (lambda p: Image.fromarray(textured(48, 48)).save(p, lossless=True), r"WEBP image"),
    "nan.tif": (lambda p: Image.fromarray(np.where(textured(48, 48) > 120, 1.0, np.nan).astype(np.float32)).save(p),
                r"the pixel values include NaN or infinity"),
    "zero_bytes.png": (lambda p: p.write_bytes(b""), r"image file is empty \(0 bytes\)"),
    "half.jpg": (lambda p: p.write_bytes(_jpeg(textured(64, 64))[:400]), r"cannot decode image .*truncated"),
}


def _jpeg(pixels, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90, **options)
    return out.getvalue()


@pytest.mark.parametrize("name", sorted(DAMAGED))
@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about some of these files before we refuse them
def test_damaged_or_contradictory_images_are_refused_naming_the_fault(tmp_path, name):
    make, fault = DAMAGED[name]
    path = tmp_path / name
    make(path)
    with pytest.raises(InputError, match=f"{name}: {fault}"):
        images.preprocess(path, 32, 0.5, 0.5, allow_non_frontal=True)  # no override reads a damaged file


def test_multi_frame_dicom_is_refused_before_its_frames_are_decoded(tmp_path, monkeypatch):
    from pydicom.dataset import Dataset as PydicomDataset

    path = write_dicom(tmp_path / "frames.dcm", np.tile(STORED, (8, 1)), NumberOfFrames=8, Rows=32)
    monkeypatch.setattr(PydicomDataset, "pixel_array", property(lambda ds: pytest.fail("pixels were decoded")))
    with pytest.raises(InputError, match="frames.dcm: DICOM file of 8 images"):
        images.load_grayscale(path)


def test_interlaced_png_passes_the_completeness_check(tmp_path):
    pixels = textured(53, 37)
    path = png_8bit_gray(tmp_path / "adam7.png", pixels, interlace=True)
    np.testing.assert_array_equal(np.asarray(images.load_grayscale(path)), pixels)


@pytest.mark.parametrize("interlace", [False, True], ids=["rows", "adam7"])
@pytest.mark.parametrize("height", [22, 23])  # Adam7's last odd row is the last row or the one before it
def test_a_png_whose_data_stops_at_any_byte_is_refused(tmp_path, interlace, height):
    """Cut after every byte of its data (mid-row, mid-pass), a PNG is refused, and whole it is read: the check's
    shortcut (a byte other than zero in the last row the decoder writes) never passes a cut file. The pixels
    have no zero byte, so every row written shows; Pillow's memory is first dirtied with white images, so that
    rows it did not write would show too if it did not zero them."""
    pixels = np.maximum(textured(height, 19), 1)
    whole = png_8bit_gray(tmp_path / "whole.png", pixels, interlace).read_bytes()
    dirty = [Image.new("L", (19, height), 255).copy() for _ in range(64)]
    del dirty
    keep = 0
    while (path := png_8bit_gray(tmp_path / "cut.png", pixels, interlace, keep_bytes=keep)).read_bytes() != whole:
        with pytest.raises(InputError, match=r"cut.png: (the PNG image data ends early|cannot decode image)"):
            images.load_grayscale(path)
        keep += 1
    assert keep >= height * (1 + 19)  # every byte of the data was a place to stop
    np.testing.assert_array_equal(np.asarray(images.load_grayscale(tmp_path / "whole.png")), pixels)


def test_a_whole_png_whose_last_row_is_black_is_read(tmp_path):
    """The check's other path: a black last row proves nothing, so the data is inflated and counted."""
    pixels = textured(24, 19)
    pixels[-1] = 0
    np.testing.assert_array_equal(np.asarray(images.load_grayscale(png_8bit_gray(tmp_path / "black.png", pixels))),
                                  pixels)


def test_jpeg_exif_orientation_is_applied(tmp_path):
    """Orientation 6 (the camera was turned): viewers show the image turned 90 degrees clockwise, and so do we."""
    pixels = textured(48, 80)
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "turned.jpg").write_bytes(_jpeg(pixels, exif=exif))
    gray = np.asarray(images.load_grayscale(tmp_path / "turned.jpg"), np.float64)
    assert gray.shape == (80, 48)
    assert np.abs(gray - np.rot90(pixels, -1)).mean() < 3  # JPEG's loss only


def test_header_limits_come_before_any_decoding(tmp_path, monkeypatch):
    """A PNG declaring a size past the limit is refused from its header: Pillow never loads it."""
    path = png_header_only(tmp_path / "huge.png", 12_000, 9_000)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("pixels were decoded"))
    with pytest.raises(image_headers.ImageTooLargeError, match="huge.png: 108,000,000 pixels"):
        images.load_grayscale(path)
    header = image_headers.read_header(png_header_only(tmp_path / "ok.png", 6000, 6000).read_bytes(), "ok.png")
    assert (header.width, header.height, header.bits, header.frames) == (6000, 6000, 8, 1)


def test_16_bit_images_are_windowed_without_a_float64_copy_of_the_whole_image(monkeypatch):
    """2048x2048 16-bit: one float64 copy alone would be 32 MiB; the windowing allocates the 8-bit result (4 MiB)
    and a few float64 temporaries of one row block (here 64k pixels, 0.5 MiB each)."""
    import tracemalloc

    monkeypatch.setattr(gray_levels, "BLOCK_PIXELS", 1 << 16)
    pixels = (np.add.outer(np.arange(2048), np.arange(2048)) % 4000).astype(np.uint16)
    tracemalloc.start()
    try:
        gray = gray_levels.stretch_to_uint8(pixels, "big.png")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20 + 8 * 2**19, f"{peak / 2**20:.1f} MiB"
    low, high = pixels.min(), pixels.max()
    np.testing.assert_array_equal(gray[:64], np.rint((pixels[:64] - float(low)) / (high - low) * 255).astype(np.uint8))


# ---------------------------------------------------------------- files without DICOM tags: the content guard

def test_colour_photographs_and_extreme_shapes_are_refused_unless_allowed(tmp_path):
    rng = np.random.default_rng(0)
    photo = np.clip(rng.normal(128, 60, (64, 64, 3)) + [40, -30, 10], 0, 255).astype(np.uint8)
    (tmp_path / "photo.jpg").write_bytes(_jpeg(photo))
    Image.fromarray(textured(60, 300)).save(tmp_path / "strip.png")
    refusals = {"photo.jpg": r"photo.jpg: colour image \(\d+% of its pixels have colour\)",
                "strip.png": r"strip.png: image 300x60 is 5.0 times as long as it is wide"}
    for name, message in refusals.items():
        with pytest.raises(NotFrontalChestError, match=f"{message}.*pass --allow-non-frontal"):
            images.load_grayscale(tmp_path / name)
        assert images.load_grayscale(tmp_path / name, allow_non_frontal=True).mode == "L"
    with pytest.raises(NotFrontalChestError, match="colour image"):  # a PIL image passed in is no different
        images.preprocess(Image.fromarray(photo), 32, 0.5, 0.5)


def test_gray_stored_as_colour_is_a_radiograph(tmp_path):
    """RGB PNG of equal channels, a JPEG of it (chroma noise), a palette PNG, a few coloured marks: all pass."""
    gray = textured(96, 96)
    rgb = np.repeat(gray[..., None], 3, -1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    (tmp_path / "rgb.jpg").write_bytes(_jpeg(rgb))
    Image.fromarray(gray).convert("P").save(tmp_path / "palette.png")
    marked = rgb.copy()
    marked[4:8, 4:40] = [255, 0, 0]  # a red label: 1.6% of the image
    Image.fromarray(marked).save(tmp_path / "marked.png")
    for name in ("rgb.png", "rgb.jpg", "palette.png", "marked.png"):
        decoded = np.asarray(images.load_grayscale(tmp_path / name), np.int16)
        assert np.abs(decoded - gray).mean() < 3, name


@pytest.mark.parametrize("name", ["00000001_000.png", "00027426_000.png"])
def test_real_radiographs_pass_the_guard(name):
    path = Path(__file__).parent / "fixtures" / "real-cxr" / "nih" / name
    assert images.load_grayscale(path).size == (512, 512)


# ---------------------------------------------------------------- what names the image in messages

def test_messages_name_the_input(tmp_path):
    with pytest.raises(InputError, match=f"{tmp_path}: is a directory; give an image file"):
        images.load_grayscale(tmp_path)
    with pytest.raises(InputError, match=r"^no image given \(the image path is None\)"):
        images.preprocess(None, 32, 0.5, 0.5)
    with pytest.raises(InputError, match=r"^image \(BytesIO\): cannot decode image: not a readable PNG") as caught:
        images.preprocess(io.BytesIO(b"no image here"), 32, 0.5, 0.5)
    assert "0x" not in str(caught.value)
    Image.fromarray(textured(40, 40)).save(tmp_path / "cxr.png")
    with open(tmp_path / "cxr.png", "rb") as f:  # an open file is read and named
        assert images.preprocess(f, 32, 0.5, 0.5).shape == (32, 32, 1)


def test_a_file_name_that_is_not_utf8_is_named_with_escapes(tmp_path):
    path = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.png"))
    Image.fromarray(textured(40, 40)).save(path)
    with pytest.raises(InputError, match=r"caf\\xe9.png: the file name is not UTF-8 text") as caught:
        images.load_grayscale(path)
    str(caught.value).encode("utf-8")  # the message itself can be written anywhere
    with files.LockedAppender(tmp_path / "r.jsonl") as out:
        out.write({"image": files.printable(path), "error": str(caught.value)})
    assert json.loads((tmp_path / "r.jsonl").read_text())["image"].endswith("caf\\xe9.png")


def test_folders_with_symlink_loops_and_dangling_links(tmp_path):
    (tmp_path / "sub").mkdir()
    os.symlink(tmp_path, tmp_path / "sub" / "back")
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    Image.fromarray(textured(40, 40)).save(tmp_path / "a.png")
    assert [p.name for p in expand_images([tmp_path])] == ["a.png"]


# ---------------------------------------------------------------- DICOM edge cases

@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID", "LINEAR"])
def test_window_width_zero_is_refused_not_nan(tmp_path, function):
    path = write_dicom(tmp_path / f"{function}.dcm", STORED, WindowCenter=100, WindowWidth=0, VOILUTFunction=function)
    with pytest.raises(InputError, match=f"{function}.dcm: window width 0"):
        images.load_grayscale(path)


def test_empty_voi_lut_sequence_is_no_transform(tmp_path):
    """An empty VOILUTSequence holds no transform: the window (or min/max) applies, as without the sequence."""
    plain = write_dicom(tmp_path / "plain.dcm", STORED, WindowCenter=1000, WindowWidth=800)
    empty = write_dicom(tmp_path / "empty.dcm", STORED, WindowCenter=1000, WindowWidth=800,
                        VOILUTSequence=Sequence([]))
    np.testing.assert_array_equal(np.asarray(images.load_grayscale(empty)), np.asarray(images.load_grayscale(plain)))


def test_malformed_voi_lut_item_is_an_input_error(tmp_path):
    item = Dataset()
    item.LUTDescriptor = [4, 0, 16]  # no LUTData
    path = write_dicom(tmp_path / "lut.dcm", STORED, VOILUTSequence=Sequence([item]))
    with pytest.raises(InputError, match="lut.dcm: the VOI LUT lacks its LUTData"):
        images.load_grayscale(path)


def test_every_photometric_interpretation(tmp_path):
    """MONOCHROME1/2 windowed (1 inverted); RGB, YBR_FULL and PALETTE COLOR as luma; others refused."""
    mono2 = np.asarray(images.load_grayscale(write_dicom(tmp_path / "m2.dcm", STORED)))
    mono1 = np.asarray(images.load_grayscale(write_dicom(tmp_path / "m1.dcm", STORED, photometric="MONOCHROME1")))
    np.testing.assert_array_equal(mono1, 255 - mono2)
    rgb = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    luma = np.asarray(Image.fromarray(rgb).convert("L")).astype(int)
    for photometric in ("RGB", "YBR_FULL"):
        gray = np.asarray(images.load_grayscale(color_dicom(tmp_path / f"{photometric}.dcm", rgb, photometric)))
        assert np.abs(gray.astype(int) - luma).max() <= 1, photometric
    palette = np.random.default_rng(2).integers(0, 65536, (256, 3))
    indices = np.random.default_rng(3).integers(0, 256, (32, 32))
    gray = np.asarray(images.load_grayscale(palette_dicom(tmp_path / "palette.dcm", indices, palette)))
    luma = palette[indices].astype(np.float64) @ [0.299, 0.587, 0.114]
    expected = gray_levels.window_to_uint8(luma, luma.min(), luma.max())
    assert np.abs(gray.astype(int) - expected).max() <= 1  # the palette's colours, not the raw indices
    with pytest.raises(InputError, match="hsv.dcm: photometric interpretation 'HSV'"):
        images.load_grayscale(write_dicom(tmp_path / "hsv.dcm", STORED, photometric="HSV"))


def test_folder_mode_finds_dicom_by_content(tmp_path):
    write_dicom(tmp_path / "IM000001", STORED)  # PACS exports: no extension
    write_dicom(tmp_path / "1.2.840.113619", STORED)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "reports.jsonl").write_text("{}\n")
    found = [p.name for p in expand_images([tmp_path])]
    assert found == ["1.2.840.113619", "IM000001", "a.png"]
    assert images.preprocess(tmp_path / "IM000001", 32, 0.5, 0.5).shape == (32, 32, 1)


# ---------------------------------------------------------------- prompts and sampling options

def test_image_marker_in_user_text_is_refused():
    with pytest.raises(InputError, match="contains <image>"):
        prompting.question_prompt("what is <image> here?")
    # A study's conversation has one place per image (issue 25): two places for one image are refused.
    turns = [{"role": "user", "content": "<image>\n<image>\nDescribe."}]
    with pytest.raises(InputError, match="2 <image> place.* for 1 image"):
        prompting.check_image_count(turns, 1)


@pytest.mark.parametrize("options, key", [
    (dict(temperature=float("nan")), "temperature=nan"), (dict(temperature=float("inf")), "temperature=inf"),
    (dict(temperature=-1.0), "temperature=-1.0"), (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=float("nan")), "top_p=nan"), (dict(top_p=1.5), "top_p=1.5"), (dict(max_new_tokens=0), "max_new_tokens=0"),
])
def test_sampling_options_are_range_checked(options, key):
    with pytest.raises(ValueError, match=key):
        SamplingOptions(**options)


# ---------------------------------------------------------------- CSV: rows stay aligned, errors name the file

def _labeled_rows(tmp_path, text: str, encoding="utf-8", data: bytes | None = None):
    reports = tmp_path / "reports.csv"
    reports.write_bytes(data if data is not None else text.encode(encoding))
    out = tmp_path / "labels.csv"
    status = cli.main(["label", "--reports", str(reports), "--out", str(out)])
    return status, (label_files.read_labels_csv(out) if status == 0 else None)


def test_label_skips_a_header_and_keeps_whitespace_only_reports(tmp_path):
    status, table = _labeled_rows(tmp_path, 'Reports\nNo effusion.\n"   "\n   \nMild cardiomegaly.\n\n')
    assert status == 0
    # The header is no report; whitespace-only rows stay as empty reports so row i is input row i.
    assert table.reports == ["No effusion.", "   ", "   ", "Mild cardiomegaly."]
    empty = labeler.label_reports([""])[0]
    np.testing.assert_array_equal(table.labels[1:3], [empty, empty])
    assert table.labels[3, label_files.CHEXPERT_OBSERVATIONS.index("Cardiomegaly")] == 1.0


def test_refine_keeps_rows_aligned(tmp_path, capsys):
    (tmp_path / "in.csv").write_text('Report\nHeart is normal.\n"  "\nComparison is made to the prior study.\n')
    assert cli.main(["refine", "--reports", str(tmp_path / "in.csv"), "--out", str(tmp_path / "out.csv")]) == 0
    assert len(label_files.read_reports_csv(tmp_path / "out.csv")) == 3


def test_label_reads_a_one_megabyte_report(tmp_path):
    long_report = "No pleural effusion. " * 50_000  # ~1 MB, past csv's default 128 KiB field limit
    status, table = _labeled_rows(tmp_path, f'"{long_report}"\nCardiomegaly.\n')
    assert status == 0 and len(table.reports) == 2 and len(table.reports[0]) == len(long_report)


def test_non_utf8_reports_name_the_file_and_offset(tmp_path, capsys):
    status, _ = _labeled_rows(tmp_path, "", data="No effusion.\nCaf\xe9 au lait.\n".encode("latin-1"))
    err = capsys.readouterr().err
    assert status == 1 and "reports.csv: not UTF-8 text (byte 0xe9 at offset 16, line 2)" in err and "Traceback" not in err


def test_a_byte_order_mark_is_not_part_of_the_header(tmp_path):
    status, table = _labeled_rows(tmp_path, "", data="Reports\nNo effusion.\n".encode("utf-8-sig"))
    assert status == 0 and table.reports == ["No effusion."]
    (tmp_path / "config.json").write_bytes('{"a": 1}'.encode("utf-8-sig"))
    assert files.read_json(tmp_path / "config.json") == {"a": 1}


def test_an_unclosed_quote_is_refused_naming_its_line(tmp_path, capsys):
    status, _ = _labeled_rows(tmp_path, 'Reports\nNo effusion.\n"Mild cardiomegaly.\nNo pneumothorax.\nClear.\n')
    err = capsys.readouterr().err
    assert status == 1 and "reports.csv: line 3: a quoted field opened on this line is never closed" in err
    rows = files.read_csv(_write(tmp_path / "ok.csv", 'a,"multi\nline"\n\n"x"\n'))
    assert rows == [(1, ["a", "multi\nline"]), (3, []), (4, ["x"])]  # quoted newlines still fine


def _write(path, text):
    path.write_text(text)
    return path


def test_latin1_key_file_is_named_with_its_offset(tmp_path):
    from cxrllava_jax.serving.cli import _read_api_key

    key = _write(tmp_path / "key.txt", "")
    key.write_bytes("s\xe9cret\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"key.txt: not UTF-8 text \(byte 0xe9 at offset 1, line 1\)"):
        _read_api_key(key)


def test_dataset_tables_name_the_file_on_non_utf8(tmp_path):
    from input_pipeline import tables

    path = tmp_path / "train.csv"
    path.write_bytes("Path,Sex\na.jpg,Female\nb.jpg,M\xe4nnlich\n".encode("latin-1"))
    with pytest.raises(InputError, match="train.csv: not UTF-8 text"):
        list(tables.rows(path, ["Path"]))


def test_existing_label_output_is_kept_unless_overwrite(tmp_path, capsys):
    (tmp_path / "labels.csv").write_text("earlier output\n")
    status, _ = _labeled_rows(tmp_path, "No effusion.\n")
    assert status == 1 and "labels.csv exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "labels.csv").read_text() == "earlier output\n"
    assert cli.main(["label", "--reports", str(tmp_path / "reports.csv"), "--out", str(tmp_path / "labels.csv"),
                     "--overwrite"]) == 0
    assert (tmp_path / "labels.csv").read_text().startswith("Reports,")


# ---------------------------------------------------------------- JSONL: line numbers, duplicate ids

@pytest.mark.parametrize("lines, message", [
    (['{"id": 1, "generated": "a", "reference": "b"}', '{"id": 2, "generated": "a"'], r"p.jsonl:2: not valid JSON"),
    (['{"id": 1, "generated": "a", "reference": "b"}', '"just a string"'], r"p.jsonl:2: not a JSON object"),
    (['[1, 2]'], r"p.jsonl:1: not a JSON object but list"),
    (['{"id": 1, "generated": "a"}'], r"p.jsonl:1: record lacks \['reference'\]"),
    (['{"id": 1, "generated": 5, "reference": "b"}'], r"p.jsonl:1: 'generated' must be text"),
    (['{"id": 7, "generated": "a", "reference": "b"}', '', '{"id": "7", "generated": "c", "reference": "d"}'],
     r"p.jsonl:3: id '7' repeats line 1"),
])
def test_prediction_jsonl_errors_name_the_line(tmp_path, lines, message):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=message):
        run.read_prediction_records(path)


def test_json_errors_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"model": "cxr_llava", ')
    with pytest.raises(InputError, match=r"config.json: line 1 column \d+: not valid JSON"):
        files.read_json(tmp_path / "config.json")


# ---------------------------------------------------------------- the output helpers themselves

def test_replaced_atomically_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "out.csv"
    path.write_text("old\n")
    with pytest.raises(RuntimeError):
        with files.replaced_atomically(path) as f:
            f.write("half of the new")
            raise RuntimeError("stopped")
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


def test_locked_appender_writes_whole_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"earlier": true}\n')
    with files.LockedAppender(path) as out:
        out.write({"image": "a.png", "report": "x" * 100_000})
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"earlier": True} and len(json.loads(lines[1])["report"]) == 100_000


# ---------------------------------------------------------------- the one wrapper every entry point uses

def test_report_errors_turns_failures_into_lines(capsys):
    from cxrllava_jax import errors

    def fail(error):
        def work():
            raise error
        return work

    assert errors.report_errors("prog", fail(InputError("a.png: cannot decode image"))) == errors.EXIT_ERROR
    assert capsys.readouterr().err == "prog: a.png: cannot decode image\n"
    assert errors.report_errors("prog", fail(FileNotFoundError(2, "No such file or directory", "x.csv"))) == 1
    assert capsys.readouterr().err == "prog: x.csv: No such file or directory\n"
    assert errors.report_errors("prog", fail(ZeroDivisionError("division by zero\nmore"))) == errors.EXIT_BUG
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "prog: ZeroDivisionError: division by zero" and "--debug" in lines[1] and len(lines) == 2
    assert errors.report_errors("prog", fail(ZeroDivisionError("x")), debug=True) == errors.EXIT_BUG
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    assert errors.report_errors("prog", lambda: None) == 0


# ---------------------------------------------------------------- the server: headers priced, admission before decoding

def test_uploads_are_checked_and_priced_from_their_header(tmp_path):
    from cxrllava_jax.serving import uploads
    from cxrllava_jax.serving.limits import Limits, RequestError

    limits = Limits()
    pages = _tiff_pages(tmp_path / "pages.tif", 2).read_bytes()
    with pytest.raises(RequestError, match="file: pages.tif: TIFF file of 2 images") as caught:
        uploads.from_upload(pages, "pages.tif", "file", limits)
    assert caught.value.status == 400 and caught.value.code == "invalid_image"
    bomb = png_header_only(tmp_path / "bomb.png", 20_000, 10_000).read_bytes()
    with pytest.raises(RequestError, match="file: bomb.png: more than 100,000,000 pixels") as caught:
        uploads.from_upload(bomb, "bomb.png", "file", limits)
    assert caught.value.status == 413
    big16 = png_header_only(tmp_path / "big16.png", 6000, 6000, depth=16).read_bytes()  # 72 MB of pixels, 20 bytes
    image = uploads.from_upload(big16, "big16.png", "file", limits)
    assert image.decode_bytes == 2 * 6000 * 6000 * 2 + 6000 * 6000 + 32 * image_headers.BLOCK_PIXELS


def test_admission_holds_decoding_to_its_budget_and_counts_the_queue():
    """No timing: the event loop is stepped by hand and the state read between steps."""
    import asyncio

    from cxrllava_jax.serving.admission import Admission
    from cxrllava_jax.serving.limits import RequestError

    async def scenario():
        queued = [0]
        admission = Admission(budget_bytes=100, max_queue=3, queued=lambda: queued[0])
        releases, inside = {name: asyncio.Event() for name in "ab"}, []

        async def decode(name, cost):
            async with admission.admitted(cost, "file"):
                inside.append(name)
                await releases[name].wait()

        tasks = [asyncio.create_task(decode("a", 60)), asyncio.create_task(decode("b", 60))]
        for _ in range(5):
            await asyncio.sleep(0)
        assert inside == ["a"] and admission.decoding_bytes == 60 and admission.preparing == 2  # b waits for room
        with pytest.raises(RequestError, match="needs about 0 MiB") as too_big:
            async with admission.admitted(101, "file"):
                pass
        queued[0] = 1  # one prepared request waits for the model: 2 preparing + 1 queued = --max-queue 3
        with pytest.raises(RequestError, match="3 requests are already waiting") as busy:
            async with admission.admitted(10, "file"):
                pass
        releases["a"].set()
        for _ in range(5):
            await asyncio.sleep(0)
        assert inside == ["a", "b"] and admission.decoding_bytes == 60 and admission.preparing == 1
        releases["b"].set()
        await asyncio.gather(*tasks)
        assert admission.decoding_bytes == 0 and admission.preparing == 0
        return too_big.value.status, busy.value.status

    assert asyncio.run(scenario()) == (413, 503)
