"""Fuzz and fault cases for the inputs every command reads, in process: malformed and oversized images, DICOM edge
cases, CSV and JSONL edge cases. Each bad input must give an InputError naming the file (and line), never another
exception type, and nothing silently wrong."""

import json

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from cxrllava_jax import cli, files
from cxrllava_jax.domain import images, label_files, labeler, prompting
from cxrllava_jax.errors import InputError
from cxrllava_jax.evaluation import run
from cxrllava_jax.inference.cli import expand_images
from cxrllava_jax.inference.engine import SamplingOptions
from tests.dicom_files import write_dicom
from tests.fault_files import STORED, color_dicom, palette_dicom, png_header_only

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
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", path.stat().st_size - 1)
    with pytest.raises(InputError, match=r"a.png: \d+ bytes is past the \d+-byte limit"):
        images.load_grayscale(path)


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
    with pytest.raises(InputError, match="lut.dcm: cannot apply the DICOM pixel transforms"):
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
    expected = images.window_to_uint8(luma, luma.min(), luma.max())
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
    turns = [{"role": "user", "content": "<image>\n<image>\nDescribe."}]
    with pytest.raises(InputError, match="carries <image> 2 times"):
        prompting.chat_text(turns)


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
    assert status == 1 and "reports.csv: not UTF-8 text (byte 0xe9 at offset 16)" in err and "Traceback" not in err


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
