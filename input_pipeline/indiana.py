"""Indiana University chest X-rays (Open-i, NLMCXR) in either published layout:

- Open-i: the reports ecgen-radiology/N.xml (or the NLMCXR_reports.tgz they come in: AbstractText elements
  labelled COMPARISON, INDICATION, FINDINGS, IMPRESSION, and one parentImage id per image, e.g.
  CXR1_1_IM-0001-3001) and the PNGs NLMCXR_png/ID.png;
- Kaggle (chest-xrays-indiana-university): indiana_reports.csv (uid, MeSH, Problems, image, indication,
  comparison, findings, impression) and the PNGs images/images_normalized/FILENAME.
Either way the view comes from indiana_projections.csv (uid, filename, projection: Frontal/Lateral; filename
like 1_IM-0001-3001.dcm.png), since neither the XML nor the PNGs say which image is frontal. Images the
table does not list are left out (their view is unknown), as are images whose report has no FINDINGS or
IMPRESSION text (nothing to compare a generated report with).

The paper uses Indiana as its external test set: every record is split 'test'. The report keeps FINDINGS
and IMPRESSION; labels stay NaN, since the paper labels these reports with the CheXpert labeler.
"""

import os
import tarfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Iterator

import numpy as np

from cxrllava_jax.domain.findings import CHEXPERT_OBSERVATIONS
from input_pipeline import tables
from cxrllava_jax.errors import InputError
from input_pipeline.records import FRONTAL, Record, sectioned_report

SPLIT = "test"


def load(root, split: str | None = None) -> list[Record]:
    root = Path(root)
    if split and split != SPLIT:
        return []
    frontal = _frontal_images(root)
    reports = _kaggle_reports(root) if tables.find(root, "indiana_reports.csv") else _openi_reports(root)
    records = []
    for origin, study, sections, images in reports:
        report = sectioned_report(sections)
        if not report:
            continue
        for key, image in images:
            if key in frontal:
                records.append(Record(image=image, labels=np.full(len(CHEXPERT_OBSERVATIONS), np.nan, np.float32),
                                      report=report, dataset="indiana", split=SPLIT, view=FRONTAL, study_id=study,
                                      origin=origin))
    return records


def image_key(name: str) -> str:
    """The image id both layouts share: 'CXR1_1_IM-0001-3001' (Open-i) or '1_IM-0001-3001.dcm.png' (Kaggle)
    -> '1_IM-0001-3001'."""
    name = name.removesuffix(".png").removesuffix(".dcm")
    return name.removeprefix("CXR")


def _frontal_images(root: Path) -> set[str]:
    path = tables.require(root, "indiana_projections.csv", dataset="Indiana (projections table)")
    frontal = set()
    for origin, row in tables.rows(path, ("filename", "projection")):
        if row["projection"] not in ("Frontal", "Lateral"):
            raise InputError(f"{origin}: projection {row['projection']!r}; expected Frontal or Lateral")
        if row["projection"] == "Frontal":
            frontal.add(image_key(row["filename"]))
    return frontal


Report = tuple[str, str, list[tuple[str, str]], list[tuple[str, str]]]  # origin, study, sections, (key, image)


def _kaggle_reports(root: Path) -> Iterator[Report]:
    images: dict[str, list[tuple[str, str]]] = {}
    for _, row in tables.rows(tables.require(root, "indiana_projections.csv", dataset="Indiana"), ("uid", "filename")):
        images.setdefault(row["uid"], []).append(
            (image_key(row["filename"]), os.path.join(root, "images", "images_normalized", row["filename"])))
    path = tables.require(root, "indiana_reports.csv", dataset="Indiana")
    for origin, row in tables.rows(path, ("uid", "findings", "impression")):
        yield origin, row["uid"], [("FINDINGS", row["findings"]), ("IMPRESSION", row["impression"])], \
            images.get(row["uid"], [])


def _openi_reports(root: Path) -> Iterator[Report]:
    for origin, xml in _report_files(root):
        try:
            tree = ElementTree.fromstring(xml)
        except ElementTree.ParseError as error:
            raise InputError(f"{origin}: not a readable Open-i report ({error})") from None
        sections = {node.get("Label"): node.text or "" for node in tree.iter("AbstractText")}
        images = [(image_key(node.get("id")), os.path.join(root, "NLMCXR_png", f"{node.get('id')}.png"))
                  for node in tree.iter("parentImage")]
        uid = tree.find("uId")
        yield origin, uid.get("id") if uid is not None else origin, \
            [(name, sections.get(name, "")) for name in ("FINDINGS", "IMPRESSION")], images


def _report_files(root: Path) -> Iterator[tuple[str, bytes]]:
    """(name, content) of every report XML, from ecgen-radiology/ or else from NLMCXR_reports.tgz."""
    folder = root / "ecgen-radiology"
    if folder.is_dir():
        for path in sorted(folder.glob("*.xml")):
            yield f"ecgen-radiology/{path.name}", path.read_bytes()
        return
    archive = root / "NLMCXR_reports.tgz"
    if not archive.is_file():
        raise InputError(f"{root}: neither ecgen-radiology/, NLMCXR_reports.tgz nor indiana_reports.csv found; "
                         "is this an Indiana (Open-i) directory?")
    with tarfile.open(archive) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile() and member.name.endswith(".xml"):
                yield f"{archive.name}:{member.name}", tar.extractfile(member).read()
