"""`cxrllava label` and the label file readers: the CheXpert labeler's exact file formats."""

import math

import numpy as np
import pytest

from cxrllava_jax.cli import main as cxrllava
from cxrllava_jax.domain.label_files import read_labels_csv, read_reports_csv, write_labels_csv
from cxrllava_jax.domain.findings import CHEXPERT_OBSERVATIONS

HEADER = ("Reports,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Lesion,Lung Opacity,Edema,"
          "Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,Support Devices")


def test_label_command_round_trip(tmp_path):
    reports_csv = tmp_path / "reports.csv"
    reports_csv.write_text(
        'Heart size normal and lungs are clear. No edema or pneumonia. No effusion\n'
        '"1. Left pleural effusion with adjacent atelectasis. Right effusion is also present.\n'
        '\n'
        '2. Cardiomegaly without overt edema."\n'
        '\n'
        '"Mild cardiomegaly, no pneumothorax."\n'
        'Possible small left pleural effusion.\n'
    )
    out = tmp_path / "labeled.csv"
    assert cxrllava(["label", "--reports", str(reports_csv), "--out", str(out)]) == 0
    lines = out.read_text().split("\n")
    assert lines[0] == HEADER
    assert lines[1] == ("Heart size normal and lungs are clear. No edema or pneumonia. No effusion,"
                        "1.0,,0.0,,,0.0,,0.0,,,0.0,,,")
    assert lines[2] == '"1. Left pleural effusion with adjacent atelectasis. Right effusion is also present.'
    assert lines[4] == '2. Cardiomegaly without overt edema.",,,1.0,,,0.0,,,1.0,,1.0,,,'
    assert lines[5] == '"Mild cardiomegaly, no pneumothorax.",,,1.0,,,,,,,0.0,,,,'
    assert lines[6] == "Possible small left pleural effusion.,,,,,,,,,,,-1.0,,,"
    assert lines[7] == ""  # one row per report (the blank line of the input is no report), newline-terminated

    table = read_labels_csv(out)
    assert table.reports == read_reports_csv(reports_csv)
    assert table.ids == ["0", "1", "2", "3"]
    assert table.labels[3, CHEXPERT_OBSERVATIONS.index("Pleural Effusion")] == -1.0
    assert math.isnan(table.labels[3, CHEXPERT_OBSERVATIONS.index("No Finding")])


def test_reads_chexbert_output_in_its_column_order(tmp_path):
    chexbert_order = [o for o in CHEXPERT_OBSERVATIONS if o != "No Finding"] + ["No Finding"]
    path = tmp_path / "chexbert.csv"
    path.write_text("Report Impression," + ",".join(chexbert_order) + "\n"
                    "mild cardiomegaly,,1,,,,,,,,,,,,\n"
                    "no effusion,,,,,,,,,,0,,,,1\n")
    table = read_labels_csv(path)
    assert table.labels[0, CHEXPERT_OBSERVATIONS.index("Cardiomegaly")] == 1.0
    assert table.labels[1, CHEXPERT_OBSERVATIONS.index("Pleural Effusion")] == 0.0
    assert table.labels[1, CHEXPERT_OBSERVATIONS.index("No Finding")] == 1.0
    assert table.reports == ["mild cardiomegaly", "no effusion"]


def test_ids_survive_a_round_trip_and_bad_cells_are_named(tmp_path):
    labels = np.full((2, 14), np.nan)
    labels[0, 2], labels[1, 10] = 1.0, -1.0
    path = tmp_path / "labels.csv"
    write_labels_csv(path, ["a, with comma", "b"], labels, ids=["s1", "s2"])
    table = read_labels_csv(path)
    assert table.ids == ["s1", "s2"] and table.reports == ["a, with comma", "b"]
    np.testing.assert_array_equal(table.labels, labels)
    path.write_text(path.read_text().replace("-1.0", "maybe"))
    with pytest.raises(ValueError, match=r"row 2: label 'maybe'"):
        read_labels_csv(path)
    (tmp_path / "short.csv").write_text("Reports,Cardiomegaly\nx,1\n")
    with pytest.raises(ValueError, match="lacks the columns"):
        read_labels_csv(tmp_path / "short.csv")
